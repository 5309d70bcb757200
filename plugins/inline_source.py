"""The ``inline`` source connector: events or records written in the configuration itself.

For tests, demos and tiny one-off imports. The checkpoint is the index of the next item, so a
restarted import resumes at the first item not yet stored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from profilemesh.shared.errors import InvalidArgument
from profilemesh.shared.extension_points import BatchKind, Checkpoint, SourceBatch, SourceConnector
from profilemesh.shared.hookspecs import hookimpl


class InlineSourceConfig(BaseModel):
    """The items themselves, what they are, and how many go in one batch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["events", "records"] = "events"
    items: list[dict[str, JsonValue]]
    batch_size: int = Field(default=100, ge=1, le=10_000)


class InlineSource(SourceConnector):
    """Reads the items listed in its configuration, ``batch_size`` at a time."""

    name = "inline"
    description = "Events or customer records listed in the configuration (tests, demos)."
    config_model = InlineSourceConfig
    config: InlineSourceConfig

    def read(self, checkpoint: Checkpoint | None) -> Iterator[SourceBatch]:
        """Yield the items from the checkpoint's ``next_index`` (0 without one) to the end."""
        items = self.config.items
        kind: BatchKind = self.config.kind
        start = 0 if checkpoint is None else _next_index(checkpoint, len(items))
        for begin in range(start, len(items), self.config.batch_size):
            end = min(begin + self.config.batch_size, len(items))
            yield SourceBatch(kind=kind, items=items[begin:end], checkpoint={"next_index": end})


def _next_index(checkpoint: Checkpoint, item_count: int) -> int:
    index = checkpoint.get("next_index")
    # bool is an int in Python; a checkpoint of ``True`` is corrupt, not item 1.
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= item_count:
        raise InvalidArgument.for_field(
            "checkpoint.next_index", f"must be an integer from 0 to {item_count}, not {index!r}"
        )
    return index


@hookimpl
def register_sources(register: Callable[[type[SourceConnector]], None]) -> None:
    """Register the ``inline`` connector."""
    register(InlineSource)
