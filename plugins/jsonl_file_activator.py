"""The ``jsonl_file`` activator: appends each delivery to a file as one JSON line.

For tests, demos and hand-offs to tools that tail a file. Idempotent: the idempotency keys
already in the file are read on first use, and a delivery whose key is there is reported
delivered without being written again.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from profilemesh.shared.extension_points import Activator, Delivery, DeliveryOutcome
from profilemesh.shared.hookspecs import hookimpl


class JsonlFileConfig(BaseModel):
    """Where the lines go; missing parent folders are created."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path


class JsonlFileActivator(Activator):
    """Appends deliveries to a JSON Lines file, each idempotency key at most once."""

    name = "jsonl_file"
    description = "Appends each delivery as a JSON line to a file (tests, demos, hand-offs)."
    config_model = JsonlFileConfig
    config: JsonlFileConfig

    def __init__(self, config: Mapping[str, object] | BaseModel) -> None:
        """Validate the configuration; the file is read on the first delivery."""
        super().__init__(config)
        self._written: set[str] | None = None
        # Concurrent deliver() calls must not interleave their appends or their key checks.
        self._lock = asyncio.Lock()

    async def deliver(self, deliveries: Sequence[Delivery]) -> list[DeliveryOutcome]:
        """Append the deliveries whose keys are not in the file yet; fsync before reporting."""
        async with self._lock:
            return await asyncio.to_thread(self._append, deliveries)

    def _append(self, deliveries: Sequence[Delivery]) -> list[DeliveryOutcome]:
        try:
            if self._written is None:
                self._written = _keys_in(self.config.path)
        except OSError as error:
            return [self._unwritable(error)] * len(deliveries)
        outcomes: list[DeliveryOutcome | None] = []
        lines: list[str] = []
        new_keys: set[str] = set()
        for delivery in deliveries:
            key = delivery.idempotency_key
            if key in self._written or key in new_keys:
                outcomes.append(DeliveryOutcome.delivered())
                continue
            try:
                lines.append(_to_line(delivery))
            except (TypeError, ValueError) as error:
                outcomes.append(DeliveryOutcome.permanent(f"fields are not JSON: {error}"))
                continue
            new_keys.add(key)
            outcomes.append(None)  # Known once the write has succeeded or failed.
        try:
            if lines:
                self._write(lines)
        except OSError as error:
            failed = self._unwritable(error)
            return [failed if outcome is None else outcome for outcome in outcomes]
        self._written |= new_keys
        return [DeliveryOutcome.delivered() if o is None else o for o in outcomes]

    def _unwritable(self, error: OSError) -> DeliveryOutcome:
        # A full disk or a permission fixed by an operator: worth retrying, not dead-lettering.
        return DeliveryOutcome.retryable(f"cannot append to {self.config.path}: {error}")

    def _write(self, lines: list[str]) -> None:
        path = self.config.path
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a+b") as file:
            # A crash can leave a torn last line; start on a fresh one so ours stay parseable.
            torn = False
            if file.seek(0, os.SEEK_END) > 0:
                file.seek(-1, os.SEEK_END)
                torn = file.read(1) != b"\n"
            file.write((("\n" if torn else "") + "".join(lines)).encode())
            file.flush()
            os.fsync(file.fileno())


def _to_line(delivery: Delivery) -> str:
    record = {
        "idempotency_key": delivery.idempotency_key,
        "profile_id": delivery.profile_id,
        "segment_id": delivery.segment_id,
        "transition": delivery.transition,
        "fields": delivery.fields,
        "occurred_at": delivery.occurred_at.isoformat(),
    }
    return json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n"


def _keys_in(path: Path) -> set[str]:
    """The idempotency keys of the complete lines already in ``path``."""
    keys: set[str] = set()
    if not path.exists():
        return keys
    with path.open(encoding="utf-8") as file:
        for line in file:
            try:
                keys.add(json.loads(line)["idempotency_key"])
            except (ValueError, KeyError, TypeError):
                continue  # A torn line from a crash was never acknowledged as delivered.
    return keys


@hookimpl
def register_activators(register: Callable[[type[Activator]], None]) -> None:
    """Register the ``jsonl_file`` activator."""
    register(JsonlFileActivator)
