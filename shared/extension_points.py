"""The abstract classes plugins implement: source connectors and activators.

A plugin registers subclasses of these through the hooks in :mod:`profilemesh.shared.hookspecs`.
Each subclass names itself (``name``), says what it does (``description``) and declares its
configuration as a pydantic model (``config_model``); the service instantiates it with a
configuration from the user, which is validated before the plugin sees it.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from types import TracebackType
from typing import ClassVar, Literal, Self, TypeAlias, TypeVar

from pydantic import BaseModel, ValidationError

from profilemesh.shared.errors import FieldViolation, InvalidArgument

JSONValue: TypeAlias = (
    "bool | int | float | str | Sequence[JSONValue] | Mapping[str, JSONValue] | None"
)
"""A value that survives ``json.dumps`` and ``json.loads``."""

JSONObject: TypeAlias = Mapping[str, JSONValue]
"""A JSON object: an event in the Segment spec, a customer record, a checkpoint."""

Checkpoint: TypeAlias = JSONObject
"""Where a source read has got to, as the connector chooses to express it (an offset, a cursor).

Ingestion stores it as JSON after each batch and hands it back to ``read`` on a restart, so it
must survive a JSON round trip.
"""

BatchKind: TypeAlias = Literal["events", "records"]
"""What a batch holds: Segment-spec events, or customer records (CRM rows)."""

Transition: TypeAlias = Literal["entered", "exited", "sync"]
"""Why a delivery happens: a profile entered or left a segment, or a full sync re-sends it."""

ConfigModel = TypeVar("ConfigModel", bound=BaseModel)


def validate_config(
    model: type[ConfigModel], config: Mapping[str, object] | BaseModel
) -> ConfigModel:
    """``config`` validated against ``model``; an invalid one is :class:`InvalidArgument`.

    The error has one violation per bad field, named ``config.<path>`` (``config.items[2]``),
    so that the user who wrote the configuration sees which part of it is wrong.
    """
    if isinstance(config, model):
        return config
    data = config.model_dump() if isinstance(config, BaseModel) else config
    try:
        return model.model_validate(data)
    except ValidationError as error:
        violations = [
            FieldViolation(_config_path(detail["loc"]), detail["msg"]) for detail in error.errors()
        ]
        raise InvalidArgument(
            f"invalid {model.__name__}: "
            + "; ".join(f"{v.field}: {v.description}" for v in violations),
            violations=violations,
            reason="INVALID_PLUGIN_CONFIG",
        ) from error


def _config_path(loc: tuple[int | str, ...]) -> str:
    path = "config"
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


@dataclass(frozen=True, slots=True)
class SourceBatch:
    """Items read from a source, and the checkpoint to resume from once they are stored.

    ``checkpoint`` is the position *after* the last item of this batch: reading again from it
    yields exactly the items that follow, none of these again and none skipped.
    """

    kind: BatchKind
    items: Sequence[JSONObject]
    checkpoint: Checkpoint
    problems: Sequence[tuple[str, str]] = ()
    """Rows of this batch the connector read but could not turn into items, as
    ``(location, description)`` pairs (``("line 17", "not JSON: ...")``). Ingestion counts them
    as read and rejected and reports them with the run; the checkpoint moves past them, so a
    bad row never stops an import."""


class SourceConnector(abc.ABC):
    """Reads events or customer records from an external system, resumably.

    Ingestion instantiates the class once per import run with that run's configuration, calls
    :meth:`check`, then iterates :meth:`read` and stores each batch together with its checkpoint
    before asking for the next; finally it calls :meth:`close`. A restarted run calls ``read``
    with the last stored checkpoint. Subclasses declare ``config: TheirConfigModel`` to get the
    validated configuration typed.
    """

    name: ClassVar[str]
    """Unique connector name users refer to (``inline``, ``postgres``); lower_snake_case."""

    description: ClassVar[str]
    """One line for ``profilemesh plugins`` and the docs."""

    config_model: ClassVar[type[BaseModel]]
    """The pydantic model configurations are validated against."""

    config: BaseModel
    """The validated configuration, an instance of ``config_model``."""

    def __init__(self, config: Mapping[str, object] | BaseModel) -> None:
        """Validate ``config`` against ``config_model``; an invalid one is InvalidArgument.

        Only validate and store here; open connections in :meth:`check` or :meth:`read`, so that
        a configuration can be checked without touching the external system.
        """
        self.config = validate_config(type(self).config_model, config)

    def check(self) -> None:
        """Verify the source is reachable and readable with this configuration.

        Called before a run and when a user tests a configuration. Raise a
        :class:`~profilemesh.shared.errors.DomainError`: ``Unavailable`` for a system that
        cannot be reached now, ``FailedPrecondition`` for one that refuses (permissions, a
        missing table), ``InvalidArgument`` for configuration only the system can reject. The
        default does nothing, for sources with nothing to check.
        """
        return None  # Deliberately empty, not abstract: most sources have nothing to check.

    @abc.abstractmethod
    def read(self, checkpoint: Checkpoint | None) -> Iterator[SourceBatch]:
        """Yield the source's items in order, in batches, each with the checkpoint after it.

        ``checkpoint`` is ``None`` for a first run, otherwise a checkpoint this connector
        yielded before (after a JSON round trip, possibly in another process): resume right
        after it. A malformed checkpoint is ``InvalidArgument``; a source that fails mid-read
        raises ``Unavailable`` (retried from the last stored checkpoint).
        """

    def close(self) -> None:
        """Release connections and files. Called once, after the last ``read``; default no-op."""
        return None  # Deliberately empty, not abstract: many sources hold nothing open.

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message to a destination: a profile entered or left a segment, or is re-synced.

    ``idempotency_key`` is the same every time this message is retried: an activator uses it to
    make a retry of an already delivered message harmless. ``fields`` are the profile's traits,
    features and scores the destination is configured to receive. ``occurred_at`` is
    timezone-aware.
    """

    idempotency_key: str
    profile_id: str
    segment_id: str
    transition: Transition
    fields: Mapping[str, JSONValue]
    occurred_at: datetime


class DeliveryStatus(StrEnum):
    """What happened to one delivery."""

    DELIVERED = "delivered"
    """Accepted by the destination (or already delivered before: a duplicate is a success)."""

    RETRYABLE = "retryable"
    """Not delivered this time; the outbox retries it with backoff (a timeout, a 503, a 429)."""

    PERMANENT = "permanent"
    """Never deliverable as it is (rejected payload, unknown recipient): dead-lettered."""


@dataclass(frozen=True, slots=True)
class DeliveryOutcome:
    """The result of one delivery; ``error`` says why for anything but ``DELIVERED``."""

    status: DeliveryStatus
    error: str | None = None
    retry_after_seconds: float | None = None
    """For ``RETRYABLE``: the destination asked to wait this long (a Retry-After header)."""

    def __post_init__(self) -> None:
        # A failure without a reason would leave the dead-letter queue unexplained.
        if (self.status is DeliveryStatus.DELIVERED) != (self.error is None):
            raise ValueError("an outcome has an error exactly when it is not DELIVERED")

    @classmethod
    def delivered(cls) -> DeliveryOutcome:
        """The destination has the message."""
        return cls(DeliveryStatus.DELIVERED)

    @classmethod
    def retryable(cls, error: str, retry_after_seconds: float | None = None) -> DeliveryOutcome:
        """Not delivered; worth trying again later."""
        return cls(DeliveryStatus.RETRYABLE, error, retry_after_seconds)

    @classmethod
    def permanent(cls, error: str) -> DeliveryOutcome:
        """Not delivered, and retrying will not help."""
        return cls(DeliveryStatus.PERMANENT, error)


class Activator(abc.ABC):
    """Delivers segment entries, exits and syncs to one kind of destination.

    Activation instantiates the class once per destination with that destination's
    configuration, calls :meth:`deliver` from its outbox with batches of deliveries (retrying
    those that come back ``RETRYABLE``, so the same delivery may arrive more than once), and
    calls :meth:`close` on shutdown. Subclasses declare ``config: TheirConfigModel`` to get the
    validated configuration typed.
    """

    name: ClassVar[str]
    """Unique activator name users refer to (``webhook``, ``jsonl_file``); lower_snake_case."""

    description: ClassVar[str]
    """One line for ``profilemesh plugins`` and the docs."""

    config_model: ClassVar[type[BaseModel]]
    """The pydantic model configurations are validated against."""

    config: BaseModel
    """The validated configuration, an instance of ``config_model``."""

    def __init__(self, config: Mapping[str, object] | BaseModel) -> None:
        """Validate ``config`` against ``config_model``; an invalid one is InvalidArgument.

        Only validate and store here; open connections lazily in :meth:`deliver`.
        """
        self.config = validate_config(type(self).config_model, config)

    @abc.abstractmethod
    async def deliver(self, deliveries: Sequence[Delivery]) -> list[DeliveryOutcome]:
        """Send ``deliveries``; return one outcome per delivery, in the same order.

        Must be idempotent by ``idempotency_key``: a delivery already delivered, in this batch
        or an earlier call or process, is reported ``DELIVERED`` without being sent twice where
        the destination allows it. Report per-delivery failures as outcomes; raise only when
        the whole batch failed before anything was sent (it is then retried as a whole).
        """

    async def close(self) -> None:
        """Release connections and files. Called once, on shutdown; default no-op."""
        return None  # Deliberately empty, not abstract: many activators hold nothing open.

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
