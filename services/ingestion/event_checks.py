"""The hot path of ingestion: each event checked and turned into its log payload.

Each event arrives as its serialized bytes (the request is decoded through a wire-compatible
view that leaves events encoded). It is parsed in full, so that nothing malformed (invalid
UTF-8, broken nesting) ever reaches the log, but it is stored as the client's own bytes plus a
few appended fields (protobuf's last-occurrence-wins sets them): the generated message id,
``received_at``, and the clock-skew corrected ``timestamp`` with the original kept in
``original_timestamp``. Nothing is re-encoded.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from profilemesh.ingestion.v1 import event_pb2
from profilemesh.services.ingestion.tracking_plans import TrackingPlans
from profilemesh.shared.errors import FieldViolation
from profilemesh.shared.settings import IngestionSettings
from profilemesh.shared.wire import length_delimited, string_field, timestamp_field, varint
from profilemesh.shared.wire_problems import locate

MAX_ID_LENGTH = 256
# Timestamps outside these bounds (1970..2200) are mistakes, not events.
MIN_SECONDS, MAX_SECONDS = 0, 7_258_118_400
MIN_NS, MAX_NS = MIN_SECONDS * 10**9, MAX_SECONDS * 10**9
SKEW_PROBLEM = "timestamp corrected by sent_at falls outside 1970-2200: check the client's clock"

_Event = event_pb2.Event


@dataclass(slots=True)
class CheckedEvent:
    """An event that passed the checks, ready to append."""

    index: int
    message_id: str
    key: str
    payload: bytes
    flagged: list[FieldViolation] = field(default_factory=list)


@dataclass(slots=True)
class RejectedEvent:
    """An event that failed a check, and why."""

    index: int
    message_id: str
    violations: list[FieldViolation]


def _timestamp_ns(view: object) -> int:
    return view.seconds * 1_000_000_000 + view.nanos  # type: ignore[attr-defined, no-any-return]


class EventChecker:
    """Checks events against the limits and the tracking plans; builds their log payloads."""

    def __init__(self, limits: IngestionSettings, plans: TrackingPlans) -> None:
        self.max_event_bytes = limits.max_event_bytes
        self.plans = plans

    def check(
        self,
        events: Sequence[bytes],
        source: str,
        received_at_ns: int,
        path: str = "events",
        first_index: int = 0,
        indexed: bool = True,
    ) -> tuple[list[CheckedEvent], list[RejectedEvent]]:
        """Split ``events`` (serialized ``Event`` s) into accepted and rejected ones.

        ``path`` names the request field in violations (``events[3].track.event``);
        ``first_index`` numbers events of a stream across its messages; without ``indexed``
        (a single event) paths start at ``path`` itself (``event.user_id``).
        """
        accepted: list[CheckedEvent] = []
        rejected: list[RejectedEvent] = []
        plan = self.plans.plan_for(source)
        received = timestamp_field(6, received_at_ns)
        item_tail = timestamp_field(3, received_at_ns) + string_field(4, source)
        max_bytes = self.max_event_bytes
        for offset, raw in enumerate(events):
            index = first_index + offset
            where = f"{path}[{index}]" if indexed else path
            if len(raw) > max_bytes:
                rejected.append(
                    RejectedEvent(
                        index,
                        "",
                        [FieldViolation(where, f"{len(raw)} bytes; the limit is {max_bytes}")],
                    )
                )
                continue
            try:
                view = _Event.FromString(raw)
            except DecodeError:
                # Only refused bytes are walked again, to name the field (event.context.ip).
                rejected.append(RejectedEvent(index, "", [locate(_Event.DESCRIPTOR, raw, where)]))
                continue
            problems = _structural_problems(view, where)
            body = view.WhichOneof("body")
            flagged: list[FieldViolation] = []
            plan_name = ""
            if not problems and plan is not None:
                plan_name = plan.name
                found, reject = plan.check(view, body, where)  # type: ignore[arg-type]
                if reject:
                    problems = found
                else:
                    flagged = found
            if problems:
                rejected.append(RejectedEvent(index, view.message_id, problems))
                continue
            message_id = view.message_id
            parts = [raw, received]
            if not message_id:
                message_id = str(uuid.uuid4())
                parts.append(string_field(1, message_id))
            if view.HasField("timestamp"):
                sent = _timestamp_ns(view.timestamp)
                corrected = sent
                if view.HasField("sent_at"):
                    corrected = received_at_ns - (_timestamp_ns(view.sent_at) - sent)
                    if not MIN_NS <= corrected <= MAX_NS:
                        rejected.append(
                            RejectedEvent(
                                index,
                                message_id,
                                [FieldViolation(f"{where}.sent_at", SKEW_PROBLEM)],
                            )
                        )
                        continue
                # The original is copied as the client encoded it; only the corrected time
                # needs encoding.
                original = view.timestamp.SerializeToString()
                parts.append(b"\x4a" + varint(len(original)) + original)
                if corrected == sent:
                    parts.append(b"\x22" + varint(len(original)) + original)
                else:
                    parts.append(timestamp_field(4, corrected))
            else:
                parts.append(timestamp_field(4, received_at_ns))
            event_bytes = b"".join(parts)
            payload = b"".join((b"\x0a", varint(len(event_bytes)), event_bytes, item_tail))
            for violation in flagged:
                payload += length_delimited(
                    6, string_field(1, violation.field) + string_field(2, violation.description)
                )
            if plan_name:
                payload += string_field(7, plan_name)
            accepted.append(
                CheckedEvent(index, message_id, view.user_id or view.anonymous_id, payload, flagged)
            )
        return accepted, rejected


def _plainly_valid(view: event_pb2.Event) -> bool:
    """The common case in one expression: a track, identify or page event with an id, short
    ids and sane times. Anything else goes through the detailed checks."""
    body = view.WhichOneof("body")
    user_id = view.user_id
    timestamp, sent_at = view.timestamp, view.sent_at
    return (
        ((body == "track" and bool(view.track.event)) or body in ("identify", "page", "screen"))
        and bool(user_id or view.anonymous_id)
        and len(user_id) <= MAX_ID_LENGTH
        and len(view.anonymous_id) <= MAX_ID_LENGTH
        and len(view.message_id) <= MAX_ID_LENGTH
        and MIN_SECONDS <= timestamp.seconds <= MAX_SECONDS
        and MIN_SECONDS <= sent_at.seconds <= MAX_SECONDS
        and 0 <= timestamp.nanos < 1_000_000_000
        and 0 <= sent_at.nanos < 1_000_000_000
    )


def _structural_problems(view: event_pb2.Event, where: str) -> list[FieldViolation]:
    """What makes an event invalid whatever the tracking plan says (Segment's rules)."""
    if _plainly_valid(view):
        return []
    problems = []
    if not view.user_id and not view.anonymous_id:
        problems.append(FieldViolation(f"{where}.user_id", "user_id or anonymous_id is required"))
    for name in ("message_id", "user_id", "anonymous_id"):
        value = getattr(view, name)
        if len(value) > MAX_ID_LENGTH:
            problems.append(
                FieldViolation(f"{where}.{name}", f"longer than {MAX_ID_LENGTH} characters")
            )
    for name, stamp in (("timestamp", view.timestamp), ("sent_at", view.sent_at)):
        if not MIN_SECONDS <= stamp.seconds <= MAX_SECONDS or not 0 <= stamp.nanos < 10**9:
            problems.append(FieldViolation(f"{where}.{name}", "not a time between 1970 and 2200"))
    body = view.WhichOneof("body")
    if body is None:
        problems.append(
            FieldViolation(
                f"{where}.body",
                "one of track, identify, page, screen, group or alias is required",
            )
        )
    elif body == "track" and not view.track.event:
        problems.append(FieldViolation(f"{where}.track.event", "the event name is required"))
    elif body == "group" and not view.group.group_id:
        problems.append(FieldViolation(f"{where}.group.group_id", "group_id is required"))
    elif body == "alias":
        if not view.alias.previous_id:
            problems.append(FieldViolation(f"{where}.alias.previous_id", "previous_id is required"))
        if not view.user_id:
            problems.append(FieldViolation(f"{where}.user_id", "an alias needs the new user_id"))
    return problems
