"""Fuzz targets for hostile input: what reaches ingestion and activation's expression parser.

Each :class:`FuzzTarget` pairs a Hypothesis strategy with a function that feeds one drawn input
to the code as the service runs it, and that accepts only the documented outcomes:

- ``ingestion.events``: the raw request bytes of ``SendEvent``, ``SendEvents`` and
  ``StreamEvents``, decoded and answered by the same handler wrapping and servicer the server
  uses (the error interceptor's decoder, the wire-compatible views, the event checks, tracking
  plans, deduplication), over an in-memory log. Outcomes: a response whose every event is
  accepted, a duplicate, or rejected with violations under its own path; or INVALID_ARGUMENT
  for the whole request, with the field named and nothing appended.
- ``ingestion.records``: the same for ``ImportRecords``.
- ``ingestion.tracking_plans``: a tracking-plan file (YAML or JSON text, or bytes that are
  neither) loaded as at start-up; loaded, or InvalidArgument naming the file.
- ``ingestion.file_sources``: a JSON Lines or CSV file read by the file connectors, its items
  converted and checked as a source run does; per-row problems and per-item rejections, or a
  domain error for the whole run.
- ``activation.segments_text`` and ``activation.segments_grammar``: arbitrary text, and
  expressions generated from the grammar (deeply nested, very long, slightly broken), parsed,
  checked and compiled; InvalidArgument whose description starts with the position, or an
  expression whose predicate answers a boolean for any profile.

Anything else is a crash: another exception, another status, a payload in the log that does not
decode, or an input that runs longer than :data:`HANG_SECONDS`. Inputs are generated with
wire-level knowledge (protobuf fields, invalid UTF-8 placed in string fields, Struct nesting
past the parser's depth, events and batches over the limits), so that they get past the first
check instead of being refused as garbage. ``tests/test_hostile_input.py`` runs every target
briefly; ``bench/fuzz.py`` runs them for a time budget and reports the figures.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import csv
import io
import json
import shutil
import signal
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf import message_factory, struct_pb2, timestamp_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from hypothesis import strategies as st

from profilemesh.ingestion.v1 import (
    event_log_pb2,
    event_pb2,
    ingestion_service_pb2,
    record_pb2,
)
from profilemesh.plugins.file_sources import CsvSource, JsonlSource
from profilemesh.services.activation.profile_view import ProfileView
from profilemesh.services.activation.segment_expressions import (
    MAX_EXPRESSION_LENGTH,
    Catalog,
    parse_segment,
)
from profilemesh.services.ingestion.intake import Intake
from profilemesh.services.ingestion.servicer import REQUEST_VIEWS, IngestionServicer
from profilemesh.services.ingestion.tracking_plans import TrackingPlans, plan_from_dict
from profilemesh.shared.error_interceptor import STATUS_DETAILS_KEY, wrap_handler
from profilemesh.shared.errors import DomainError, InvalidArgument
from profilemesh.shared.record_rows import record_from_item
from profilemesh.shared.segment_json import event_bytes
from profilemesh.shared.settings import IngestionSettings

HANG_SECONDS = 10.0
"""One input taking longer than this is a hang (the slowest legitimate ones take milliseconds)."""

LIMITS = IngestionSettings(
    max_event_bytes=4096, max_batch_events=20, max_batch_bytes=32 * 1024, dedup_max_ids=1000
)
"""Smaller than the defaults, so that inputs over each limit are cheap to draw; the checks are
the same code whatever the numbers."""

SERVICE = ingestion_service_pb2.DESCRIPTOR.services_by_name["IngestionService"]
PLANNED_EVENT = "Order Completed"


class UndocumentedOutcome(AssertionError):
    """The code under test answered in a way its contract does not allow."""


class Hang(BaseException):
    """One input ran longer than :data:`HANG_SECONDS`. Not an ``Exception``, so that
    Hypothesis stops at once instead of shrinking by running more slow inputs."""


@dataclass(frozen=True)
class FuzzTarget:
    """A named target: inputs come from ``strategy``; ``run`` raises on a crash."""

    name: str
    strategy: st.SearchStrategy[Any]
    run: Callable[[Any], None]

    def __call__(self, value: Any) -> None:
        try:
            with _watchdog(HANG_SECONDS):
                self.run(value)
        except Hang as hang:
            shown = repr(value)
            raise Hang(f"{hang}: {shown[:300]}{'...' if len(shown) > 300 else ''}") from None


@contextlib.contextmanager
def _watchdog(seconds: float) -> Iterator[None]:
    """Raise :class:`Hang` in the body once it has run ``seconds`` (main thread only, where
    signals are delivered; elsewhere the body runs unwatched)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise Hang(f"one input ran longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- wire-level building blocks ---------------------------------------------------------------


def varint(value: int) -> bytes:
    """Protobuf's base-128 encoding (of a value already made non-negative)."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field_bytes(number: int, data: bytes) -> bytes:
    """A length-delimited field: ``data`` as a string, bytes or embedded message."""
    return varint(number << 3 | 2) + varint(len(data)) + data


def nested_struct(levels: int, leaf: bytes = b"") -> bytes:
    """A ``Struct`` holding a ``Struct`` under key ``a``, ``levels`` deep (three messages per
    level: the struct, its map entry and the value)."""
    inner = leaf
    for _ in range(levels):
        inner = field_bytes(1, field_bytes(1, b"a") + field_bytes(2, field_bytes(5, inner)))
    return inner


def nested_lists(levels: int) -> bytes:
    """A ``Struct`` ``{"a": [[[...]]]}`` with ``levels`` nested lists: the cheapest depth
    (two messages per level, a few bytes each)."""
    inner = b""
    for _ in range(levels):
        inner = field_bytes(1, field_bytes(6, inner))
    return field_bytes(1, field_bytes(1, b"a") + field_bytes(2, field_bytes(6, inner)))


BAD_UTF8 = st.sampled_from(
    [b"\xff", b"\xc3", b"\xed\xa0\x80", b"ok\xfe\xff", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"\x80x"]
)
"""Byte strings that are not UTF-8: a lone lead byte, a surrogate, an overlong form, past
U+10FFFF, a stray continuation byte."""

# Paths (field numbers from the outermost message in) to a string field of an ``Event``.
EVENT_STRING_PATHS: tuple[tuple[int, ...], ...] = (
    (1,),  # message_id
    (2,),  # user_id
    (3,),  # anonymous_id
    (7, 2),  # context.ip
    (7, 6, 1),  # context.library.name
    (10, 1),  # track.event
    (10, 2, 1, 1),  # track.properties: a key
    (10, 2, 1, 2, 3),  # track.properties: a string value
    (11, 1, 1, 2, 4, 1, 3),  # identify.traits: a string inside a list
    (7, 18, 1, 1),  # context.consent.category_preferences: a key
)


def at_path(path: Sequence[int], data: bytes) -> bytes:
    """``data`` placed at ``path``, each step an embedded message."""
    for number in reversed(path):
        data = field_bytes(number, data)
    return data


def _mostly(usual: st.SearchStrategy[Any], *unusual: st.SearchStrategy[Any]) -> Any:
    """``usual`` about nine times in ten, else one of ``unusual``."""
    choices = [usual] * (9 * len(unusual)) + list(unusual)
    return st.sampled_from(choices).flatmap(lambda strategy: strategy)


def json_values(text: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[Any]:
    """JSON values, small and a few levels deep."""
    return st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**53), 2**53)
        | st.floats(allow_nan=False, allow_infinity=False)
        | (text or st.text(max_size=12)),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(text or st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=10,
    )


JSON_VALUES = json_values()
SMALL_OBJECTS = st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4)
# Strategies are built once: building one validates it, which costs more than drawing from it.
PLAN_VALUES = st.sampled_from(["pro", "free", 3])
USER_IDS = _mostly(st.sampled_from(["u1", "u2"]), st.just(""), st.text(max_size=12))
ANONYMOUS_IDS = _mostly(st.just(""), st.just("a1"), st.just("a" * 257))
EVENT_NAMES = st.sampled_from([PLANNED_EVENT, "", "Signed Up"]) | st.text(max_size=10)
NANOS = _mostly(st.integers(0, 10**9 - 1), st.sampled_from([0, 999_999_999, 10**9, -1]))
JUNK = _mostly(st.just(b""), st.sampled_from([b"\x0a\x05ab", b"\xff", b"\x0b", b"\x22\x00"]))


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def _draw_bag(draw: st.DrawFn) -> struct_pb2.Struct:
    """Properties or traits: usually small, sometimes built to be over the event limit."""
    if draw(st.integers(0, 9)) == 0:
        return _struct({"blob": "x" * draw(st.integers(LIMITS.max_event_bytes - 64, 9000))})
    planned = {"revenue": draw(JSON_VALUES), "plan": draw(PLAN_VALUES)}
    other = draw(SMALL_OBJECTS)
    return _struct({**other, **planned} if draw(st.booleans()) else other)


def _draw_timestamp(draw: st.DrawFn) -> timestamp_pb2.Timestamp | None:
    kind = draw(st.sampled_from(["none", "now", "now", "now", "edge", "wild"]))
    if kind == "none":
        return None
    seconds = {
        "now": draw(st.integers(1_500_000_000, 1_900_000_000)),
        "edge": draw(st.sampled_from([0, -1, 7_258_118_400, 7_258_118_401])),
        "wild": draw(st.integers(-(2**63), 2**63 - 1)),
    }[kind]
    nanos = draw(NANOS)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


MESSAGE_IDS = _mostly(
    # Fresh each time (Hypothesis' own uuids repeat): ids seen before are duplicates.
    st.builds(lambda: str(uuid.uuid4())),
    st.sampled_from(["", "m-1", "m-2"]),
    st.text(max_size=12),
    st.just("i" * 300),
)


@st.composite
def events(draw: st.DrawFn) -> bytes:
    """A serialized ``Event`` of any type, mostly plausible."""
    event = event_pb2.Event(
        message_id=draw(MESSAGE_IDS),
        user_id=draw(USER_IDS),
        anonymous_id=draw(ANONYMOUS_IDS),
    )
    for name in ("timestamp", "sent_at"):
        stamp = _draw_timestamp(draw)
        if stamp is not None:
            getattr(event, name).CopyFrom(stamp)
    body = draw(st.sampled_from([None, "track", "track", "identify", "page", "screen", "group"]))
    names = EVENT_NAMES
    if body == "track":
        event.track.event = draw(names)
        event.track.properties.CopyFrom(_draw_bag(draw))
    elif body == "identify":
        event.identify.traits.CopyFrom(_draw_bag(draw))
    elif body in ("page", "screen"):
        getattr(event, body).name = draw(names)
        getattr(event, body).properties.CopyFrom(_draw_bag(draw))
    elif body == "group":
        event.group.group_id = draw(st.sampled_from(["", "g1"]))
        event.group.traits.CopyFrom(_draw_bag(draw))
    if draw(st.booleans()):
        event.context.ip = draw(st.text(max_size=15))
        event.context.screen.width = draw(st.integers(-(2**31), 2**31 - 1))
        event.context.consent.category_preferences["ads"] = draw(st.booleans())
        event.context.extra.CopyFrom(_struct(draw(SMALL_OBJECTS)))
    return event.SerializeToString()


EVENTS = events()
SMALL_EVENTS = EVENTS.filter(lambda raw: len(raw) < 512)


@st.composite
def hostile_events(draw: st.DrawFn) -> bytes:
    """An ``Event``'s bytes, often made hostile at the wire level."""
    raw = draw(EVENTS)
    kind = draw(
        st.sampled_from(
            [
                "as is",
                "as is",
                "as is",
                "as is",
                "as is",
                "bad utf8",
                "deep",
                "very deep",
                "truncated",
                "flipped",
                "unknown fields",
                "garbage",
                "empty",
            ]
        )
    )
    if kind == "bad utf8":
        path = draw(st.sampled_from(EVENT_STRING_PATHS))
        return raw + at_path(path, draw(BAD_UTF8))
    if kind == "deep":  # around the parser's limit of 100 nested messages
        levels = draw(st.integers(28, 36))
        return raw + at_path((10, 2), nested_struct(levels))
    if kind == "very deep":
        levels = draw(st.sampled_from([60, 200, 2000]))
        return raw + at_path((10, 2), nested_lists(levels))
    if kind == "truncated" and raw:
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if kind == "flipped" and raw:
        position = draw(st.integers(0, len(raw) - 1))
        value = draw(st.integers(0, 255))
        return raw[:position] + bytes([value]) + raw[position + 1 :]
    if kind == "unknown fields":
        number = draw(st.sampled_from([16, 100, 2**29 - 1, 0]))
        wire = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7]))
        return raw + varint(number << 3 | wire) + draw(st.binary(max_size=12))
    if kind == "garbage":
        return draw(st.binary(max_size=200))
    if kind == "empty":
        return b""
    return raw


HOSTILE_EVENTS = hostile_events()


SOURCES = st.sampled_from([b"", b"web", b"planned", b"flagged", "ünï".encode(), b"\xff\xfeweb"])
"""Sources, one of them not UTF-8; ``planned`` and ``flagged`` have tracking plans."""


@st.composite
def event_batches(draw: st.DrawFn) -> bytes:
    """The body of an ``EncodedEvents`` / ``EncodedEvent``: events, source, flags, and junk."""
    shape = draw(st.sampled_from(["small"] * 6 + ["too many", "too big"]))
    if shape == "too many":
        one = draw(SMALL_EVENTS)
        entries = [one] * draw(
            st.integers(LIMITS.max_batch_events + 1, 3 * LIMITS.max_batch_events)
        )
    elif shape == "too big":
        count = draw(st.integers(9, 12))
        entries = [bytes([n]) * (LIMITS.max_event_bytes - 1) for n in range(count)]
    else:
        entries = draw(st.lists(HOSTILE_EVENTS, max_size=6))
    body = b"".join(field_bytes(1, entry) for entry in entries)
    source = draw(SOURCES)
    if source:
        body += field_bytes(2, source)
    flag = draw(st.sampled_from([b"", b"", b"\x18\x01", b"\x18\x00", b"\x18\xff\xff\xff\xff\x0f"]))
    junk: bytes = draw(JUNK)
    return body + flag + junk


@st.composite
def event_requests(draw: st.DrawFn) -> tuple[str, list[bytes]]:
    """An RPC name and the raw bytes of its request messages (several for a stream)."""
    rpc = draw(st.sampled_from(["SendEvents", "SendEvents", "SendEvent", "StreamEvents"]))
    if rpc == "SendEvent":
        event = draw(HOSTILE_EVENTS)
        body = field_bytes(1, event) + (
            field_bytes(2, draw(SOURCES)) if draw(st.booleans()) else b""
        )
        return rpc, [body + draw(st.sampled_from([b"", b"\x18\x01", b"\xff"]))]
    if rpc == "StreamEvents":
        return rpc, draw(st.lists(event_batches(), min_size=0, max_size=3))
    return rpc, [draw(event_batches())]


@st.composite
def records(draw: st.DrawFn) -> bytes:
    """A serialized ``CustomerRecord``, often made hostile at the wire level."""
    record = record_pb2.CustomerRecord(
        source=draw(st.sampled_from(["", "crm", "s" * 300]) | st.text(max_size=8)),
        record_id=draw(st.sampled_from(["", "r1", "r2"]) | st.text(max_size=8)),
    )
    for _ in range(draw(st.integers(0, 3))):
        identifier = record.identifiers.add()
        identifier.type = draw(st.sampled_from(["email", "", "crm_id"]))
        identifier.value = draw(st.text(max_size=10))
    if draw(st.booleans()):
        record.attributes.CopyFrom(_draw_bag(draw))
    if draw(st.booleans()):
        stamp = _draw_timestamp(draw)
        if stamp is not None:
            record.updated_at.CopyFrom(stamp)
    raw = record.SerializeToString()
    kind = draw(st.sampled_from(["as is"] * 4 + ["bad utf8", "deep", "very deep", "garbage"]))
    if kind == "bad utf8":
        path = draw(st.sampled_from([(1,), (2,), (3, 2), (4, 1, 1), (4, 1, 2, 3)]))
        return raw + at_path(path, draw(BAD_UTF8))
    if kind == "deep":
        return raw + field_bytes(4, nested_struct(draw(st.integers(28, 36))))
    if kind == "very deep":
        return raw + field_bytes(4, nested_lists(draw(st.sampled_from([60, 2000]))))
    if kind == "garbage":
        return draw(st.binary(max_size=100))
    return raw


RECORDS = records()
SMALL_RECORDS = RECORDS.filter(lambda raw: len(raw) < 512)


@st.composite
def record_requests(draw: st.DrawFn) -> tuple[str, list[bytes]]:
    """``ImportRecords`` and the raw bytes of its request."""
    if draw(st.integers(0, 7)) == 0:
        one = draw(SMALL_RECORDS)
        entries = [one] * draw(
            st.integers(LIMITS.max_batch_events + 1, 3 * LIMITS.max_batch_events)
        )
    else:
        entries = draw(st.lists(RECORDS, max_size=6))
    body = b"".join(field_bytes(1, entry) for entry in entries)
    body += draw(st.sampled_from([b"", b"\x10\x01", b"\xff"]))
    return "ImportRecords", [body]


# -- the ingestion service, in process ---------------------------------------------------------


class MemoryLog:
    """Stands in for the event log: keeps the batches appended since :meth:`clear`."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[str, bytes]]] = []

    async def append_batch(self, entries: Sequence[tuple[str, bytes]], headers: Any = None) -> None:
        self.batches.append(list(entries))

    def clear(self) -> None:
        self.batches.clear()


class Aborted(Exception):
    """``context.abort`` was called: the status a client would receive."""

    def __init__(self, code: grpc.StatusCode, details: str, metadata: dict[str, Any]) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.metadata = metadata

    def field_violations(self) -> list[tuple[str, str]]:
        """The ``BadRequest`` field violations of the status details."""
        raw = self.metadata.get(STATUS_DETAILS_KEY)
        if raw is None:
            return []
        found: list[tuple[str, str]] = []
        for detail in status_pb2.Status.FromString(raw).details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                found.extend((v.field, v.description) for v in bad_request.field_violations)
        return found


class _Context:
    """The part of ``grpc.aio.ServicerContext`` the handlers use."""

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> None:
        raise Aborted(code, details, dict(trailing_metadata))


_HANDLERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
}


@dataclass
class Ingestion:
    """The ingestion servicer over an in-memory log, its handlers wrapped as the server's are."""

    folder: Path
    log: MemoryLog
    intake: Intake
    handlers: dict[str, grpc.RpcMethodHandler] = field(default_factory=dict)
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)

    def call(self, rpc: str, messages: list[bytes]) -> Message:
        """Answer ``rpc`` for the raw request ``messages``; :class:`Aborted` for an error."""
        handler = self.handlers[rpc]
        decode = handler.request_deserializer
        context = _Context()
        if handler.request_streaming:

            async def requests() -> AsyncIterator[Any]:
                for message in messages:
                    yield decode(message)

            work = handler.stream_unary(requests(), context)
        else:
            work = handler.unary_unary(decode(messages[0]), context)
        response: Message = self.loop.run_until_complete(work)
        return response


@cache
def ingestion() -> Ingestion:
    """The one in-process ingestion of this process (its files in a temporary folder)."""
    folder = Path(tempfile.mkdtemp(prefix="fuzz-", dir=_scratch()))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    plans = TrackingPlans(folder / "tracking_plans.json")
    for name, policy, sources in (
        ("planned", "reject", ["planned"]),
        ("flagged", "flag", ["flagged"]),
    ):
        document = {
            "name": name,
            "policy": policy,
            "sources": sources,
            "reject_unplanned_events": True,
            "events": [
                {
                    "event_name": PLANNED_EVENT,
                    "reject_unplanned_properties": policy == "reject",
                    "properties": [
                        {"name": "revenue", "type": "number", "required": True, "minimum": 0},
                        {"name": "plan", "type": "string", "allowed_values": ["pro", "free"]},
                        {"name": "coupon", "type": "string", "pattern": "[A-Z]{2,8}[0-9]*"},
                        {"name": "when", "type": "timestamp"},
                        {"name": "count", "type": "integer", "maximum": 100},
                    ],
                },
                {"event_type": "identify", "properties": [{"name": "email", "type": "string"}]},
            ],
        }
        plans.create(plan_from_dict(document, name), timestamp_pb2.Timestamp(seconds=1))
    log = MemoryLog()
    intake = Intake(log, LIMITS, plans, folder / "dedup.snapshot")  # type: ignore[arg-type]
    servicer = IngestionServicer(_Domain(intake, plans, LIMITS))  # type: ignore[arg-type]
    service = Ingestion(folder, log, intake)
    for name in ("SendEvent", "SendEvents", "StreamEvents", "ImportRecords"):
        method = SERVICE.methods_by_name[name]
        request: Any = REQUEST_VIEWS.get(name) or message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        factory = _HANDLERS[(method.client_streaming, method.server_streaming)]
        handler = factory(
            getattr(servicer, name),
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )
        service.handlers[name] = wrap_handler(handler, f"/{SERVICE.full_name}/{name}")
    return service


@dataclass
class _Domain:
    """What the servicer reads of the ingestion domain."""

    intake: Intake
    plans: TrackingPlans
    settings: IngestionSettings
    plugins: Any = None
    source_runs: Any = None


def _scratch() -> str | None:
    """A folder in memory when there is one: files are written for every input."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() else None


def _check_aborted(aborted: Aborted, prefixes: tuple[str, ...]) -> None:
    """A whole request refused: INVALID_ARGUMENT naming fields that start with one of
    ``prefixes`` (or none, for a request whose own encoding is broken)."""
    if aborted.code is not grpc.StatusCode.INVALID_ARGUMENT:
        raise UndocumentedOutcome(f"{aborted.code.name}: {aborted.details}") from aborted
    violations = aborted.field_violations()
    if not violations and "encoding is broken" not in aborted.details:
        raise UndocumentedOutcome(f"INVALID_ARGUMENT without a field: {aborted.details}")
    for name, description in violations:
        if not description or not name.startswith(prefixes):
            raise UndocumentedOutcome(f"violation of {name!r} ({description!r})")


def _check_stored(service: Ingestion) -> int:
    """Every payload appended decodes as an ``IngestedItem`` within the size limit; their
    number."""
    count = 0
    for batch in service.log.batches:
        if not batch:
            raise UndocumentedOutcome("an empty batch was appended")
        for _, payload in batch:
            try:
                item = event_log_pb2.IngestedItem.FromString(payload)
            except DecodeError as error:
                raise UndocumentedOutcome(
                    f"the log got bytes that do not decode: {payload!r}"
                ) from error
            size = item.event.ByteSize() if item.HasField("event") else item.record.ByteSize()
            if size > LIMITS.max_event_bytes + 128:  # the fields ingestion adds
                raise UndocumentedOutcome(f"a {size}-byte item was stored")
            count += 1
    return count


def _check_results(results: Sequence[Any], total: int, field_name: str) -> int:
    """One result per item, in order; a rejected one has violations under its path. The
    number accepted."""
    if len(results) != total:
        raise UndocumentedOutcome(f"{len(results)} results for {total} items")
    accepted = 0
    for index, result in enumerate(results):
        if result.index != index:
            raise UndocumentedOutcome(f"result {index} says index {result.index}")
        if result.status == 3:  # REJECTED
            if not result.violations:
                raise UndocumentedOutcome(f"item {index} rejected without a violation")
            for violation in result.violations:
                if not violation.field.startswith(f"{field_name}[{index}]"):
                    raise UndocumentedOutcome(f"item {index}: violation of {violation.field!r}")
        elif result.status == 1:
            accepted += 1
        elif result.status != 2:
            raise UndocumentedOutcome(f"item {index} has status {result.status}")
    return accepted


_FIELDS = {
    "SendEvent": ("event", "source"),
    "SendEvents": ("events", "source"),
    "StreamEvents": ("messages[", "source"),
    "ImportRecords": ("records",),
}
"""The request fields an RPC's errors may name."""


def run_ingestion_request(request: tuple[str, list[bytes]]) -> None:
    """One request through the ingestion handlers; see the module docstring."""
    rpc, messages = request
    service = ingestion()
    service.log.clear()
    if not messages and rpc != "StreamEvents":
        return
    try:
        response: Any = service.call(rpc, messages)
    except Aborted as aborted:
        _check_aborted(aborted, _FIELDS[rpc])
        stored = _check_stored(service)
        if stored and rpc != "StreamEvents":  # a stream keeps the messages before the bad one
            raise UndocumentedOutcome(f"a refused request stored {stored} items") from aborted
        return
    stored = _check_stored(service)
    if rpc == "SendEvent":
        if response.result.status not in (1, 2):
            raise UndocumentedOutcome(f"SendEvent answered {response}")
        return
    if rpc == "StreamEvents":
        answered = response.accepted_count + response.duplicate_count + response.rejected_count
        if stored != response.accepted_count or answered > sum(len(m) for m in messages):
            raise UndocumentedOutcome(f"{stored} stored for {response}")
        return
    field_name = _FIELDS[rpc][0]
    accepted = _check_results(response.results, len(response.results), field_name)
    if accepted != response.accepted_count:
        raise UndocumentedOutcome("accepted_count does not match the results")
    view: Any = REQUEST_VIEWS.get(rpc) or ingestion_service_pb2.ImportRecordsRequest
    if stored != (0 if view.FromString(messages[0]).validate_only else accepted):
        raise UndocumentedOutcome(f"{stored} items stored for {accepted} accepted")


# -- tracking plans ----------------------------------------------------------------------------

_PLAN_KEYS = st.sampled_from(
    ["name", "policy", "sources", "events", "reject_unplanned_events", "description", "bogus"]
)
_RULE_KEYS = st.sampled_from(
    ["event_name", "event_type", "properties", "reject_unplanned_properties", "description"]
)
_PROPERTY_KEYS = st.sampled_from(
    ["name", "type", "required", "allowed_values", "pattern", "minimum", "maximum"]
)
_WILD = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=10),
    st.sampled_from(
        [
            "reject",
            "flag",
            "allow",
            "number",
            "track",
            "identify",
            "NOPE",
            "[a-z]+",
            "(",
            "a{99999999999}",
            "\ud800",  # a lone surrogate: YAML's and JSON's escapes allow it
            -1,  # enums are open: numbers no enum value has
            42,
        ]
    ),
    st.lists(st.text(max_size=4), max_size=3),
)


@st.composite
def plan_documents(draw: st.DrawFn) -> Any:
    """A tracking plan in its YAML/JSON form, right or wrong in every field."""
    properties = [
        draw(st.dictionaries(_PROPERTY_KEYS, _WILD, max_size=5))
        for _ in range(draw(st.integers(0, 3)))
    ]
    rules = []
    for _ in range(draw(st.integers(0, 3))):
        rule = draw(st.dictionaries(_RULE_KEYS, _WILD, max_size=3))
        if draw(st.booleans()):
            rule["properties"] = properties
        rules.append(rule)
    plan = draw(st.dictionaries(_PLAN_KEYS, _WILD, max_size=4))
    plan.setdefault("name", draw(st.sampled_from(["p1", "web plan", ""]) | st.text(max_size=5)))
    if rules:
        plan["events"] = rules
    return plan


PLAN_DOCUMENTS = plan_documents()


def _alias_bomb(levels: int, width: int) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, levels):
        refs = ", ".join(f"*a{level - 1}" for _ in range(width))
        lines.append(f"a{level}: &a{level} [{refs}]")
    lines.append(f"plans: [{{name: bomb, sources: *a{levels - 1}}}]")
    return "\n".join(lines) + "\n"


@st.composite
def plan_files(draw: st.DrawFn) -> bytes:
    """The bytes of a tracking-plans file: YAML, JSON, or hostile."""
    kind = draw(
        st.sampled_from(
            [
                "yaml",
                "yaml",
                "json",
                "json",
                "mutated",
                "deep",
                "alias bomb",
                "self alias",
                "tags",
                "bad utf8",
                "garbage",
                "top level",
            ]
        )
    )
    document = {"plans": draw(st.lists(PLAN_DOCUMENTS, max_size=3))}
    if kind == "json":
        return json.dumps(document).encode()
    text = yaml.safe_dump(document, allow_unicode=True)
    if kind == "mutated":
        position = draw(st.integers(0, len(text)))
        insert = draw(
            st.sampled_from(["\t", ":", "- ", "{", "[", "&x ", "*x", "!!", "\n  ", "'", "%YAML"])
        )
        return (text[:position] + insert + text[position:]).encode()
    if kind == "deep":
        depth = draw(st.sampled_from([50, 500, 5000]))
        opener = draw(st.sampled_from(["[", "{a: "]))
        return f"plans: [{{name: deep, sources: {opener * depth}".encode()
    if kind == "alias bomb":
        return _alias_bomb(draw(st.integers(2, 9)), draw(st.integers(2, 10))).encode()
    if kind == "self alias":
        return b"plans: &p [{name: loop, events: *p}]\n"
    if kind == "tags":
        tag = draw(
            st.sampled_from(
                [
                    "!!python/object:os.system",
                    "!!binary",
                    "!!timestamp",
                    "!!set",
                    "!!float",
                    "!custom",
                ]
            )
        )
        return f"plans: [{{name: {tag} 'x'}}]\n".encode()
    if kind == "bad utf8":
        return text.encode()[:20] + draw(BAD_UTF8) + text.encode()[20:]
    if kind == "garbage":
        return draw(st.binary(max_size=200))
    if kind == "top level":
        return yaml.safe_dump(draw(_WILD)).encode()
    return text.encode()


def run_tracking_plans(content: bytes) -> None:
    """A plans file loaded as at start-up: loaded, or InvalidArgument naming the file."""
    folder = Path(tempfile.mkdtemp(prefix="plans-", dir=_scratch()))
    try:
        file = folder / "plans.yaml"
        file.write_bytes(content)
        plans = TrackingPlans(folder / "tracking_plans.json")
        try:
            plans.load_yaml(file)
        except InvalidArgument as error:
            fields = [v.field for v in error.violations]
            if not fields or not all(name.startswith("plans.yaml") for name in fields):
                raise UndocumentedOutcome(f"violations {fields} do not name the file") from error
            return
        for plan in plans.list():
            compiled = plans.plan_for(plan.sources[0] if plan.sources else "")
            if compiled is None:
                continue
            for event in _PLAN_PROBES:
                body = event.WhichOneof("body")
                assert body is not None
                compiled.check(event, body, "event")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _probe_events() -> list[event_pb2.Event]:
    probes = []
    bags: list[dict[str, Any]] = [{"revenue": 10, "plan": "pro"}, {"a": [1, {"b": None}]}, {}]
    for properties in bags:
        event = event_pb2.Event(user_id="u1")
        event.track.event = PLANNED_EVENT
        event.track.properties.update(properties)
        probes.append(event)
    identify = event_pb2.Event(user_id="u1")
    identify.identify.traits.update({"email": "a@example.com"})
    probes.append(identify)
    return probes


_PLAN_PROBES = _probe_events()


# -- file sources ------------------------------------------------------------------------------

MAPPING = {"record_id": "id", "identifiers": {"email": "email"}, "updated_at": "updated"}
_HOSTILE_JSON = [
    "[" * 100_000,
    '{"a":' * 3000 + "1" + "}" * 3000,
    "[" * 500 + "]" * 500,
    '{"type": "track", "event": "e", "userId": "u", "properties": ' + "[" * 900 + "]" * 900 + "}",
    '{"type": "track", "event": "e", "userId": ' + "1" * 5000 + "}",
    '{"type": "track", "event": "e", "userId": "u", "properties": {"n": ' + "9" * 400 + "}}",
    '{"type": "track", "event": "e", "userId": "u", "properties": {"n": 1e400}}',
    '{"type": "track", "event": "\\ud800", "userId": "u"}',
    '{"type": "track", "event": "e", "userId": "\\udfff", "properties": {"\\ud83d": 1}}',
    '{"type": "track", "event": "e", "userId": "u", "properties": {"n": NaN, "m": -Infinity}}',
    '{"type": "track", "event": "e", "userId": "u", "context": {"screen": {"width": 1e400}}}',
    '{"type": "track", "event": "e", "userId": "u", "context": {"app": {"build": '
    + "7" * 4400
    + "}}}",
    '{"type": "track", "event": "e", "userId": "u", '
    '"context": {"consent": {"categoryPreferences": {"\\ud800": true}}}}',
    '{"type": "track", "event": "e", "userId": "u", "timestamp": "9999-12-31T23:59:59-23:59"}',
    '{"type": "track", "event": "e", "userId": "u", "timestamp": "0001-01-01T00:00:00+23:59"}',
    '{"type": "track", "event": "e", "userId": "u", "context": '
    + '{"device": ' * 400
    + "1"
    + "}" * 401,
    '{"id": "r1", "email": "\\ud800", "updated": "2024-01-01"}',
    '{"id": ' + "1" * 5000 + ', "email": "a@example.com"}',
    '{"id": "r1", "email": ["a", ["b"]], "nested": ' + "[" * 700 + "]" * 700 + "}",
    '{"id": "r1", "n": 1e400, "m": ' + "1" * 400 + "}",
    '{"id": 1.5e300, "updated": 12}',
]
"""Lines no strategy is likely to draw: nesting past every recursion limit, numbers past the
integer conversion limit and the float range, lone surrogate escapes, times at the edges."""


def segment_events() -> st.SearchStrategy[dict[str, Any]]:
    """Segment-spec JSON events, with wrong types in any field."""
    wild = JSON_VALUES | st.integers() | st.sampled_from(["2024-05-01T12:00:00Z", "yesterday"])
    return st.fixed_dictionaries(
        {"type": st.sampled_from(["track", "identify", "page", "alias", "TRACK", "x", 3])},
        optional={
            "userId": st.text(max_size=8) | st.integers() | wild,
            "anonymousId": st.text(max_size=8),
            "messageId": st.text(max_size=8),
            "event": st.text(max_size=8) | wild,
            "properties": SMALL_OBJECTS | wild,
            "traits": wild,
            "context": st.dictionaries(
                st.sampled_from(["ip", "screen", "app", "device", "consent", "locale", "x"]),
                wild
                | st.dictionaries(
                    st.sampled_from(["width", "build", "name", "categoryPreferences", "y"]),
                    wild,
                    max_size=3,
                ),
                max_size=4,
            ),
            "timestamp": wild,
            "sentAt": wild,
            "groupId": wild,
            "previousId": wild,
        },
    )


def record_rows() -> st.SearchStrategy[dict[str, Any]]:
    """Flat customer rows for the records mapping, with wrong types in any column."""
    wild = JSON_VALUES | st.integers() | st.sampled_from(["2024-05-01", "not a date", ""])
    return st.fixed_dictionaries(
        {},
        optional={
            "id": st.text(max_size=6) | wild,
            "email": st.text(max_size=10) | wild,
            "updated": wild,
            "tier": wild,
        },
    )


SEGMENT_EVENTS = segment_events()
RECORD_ROWS = record_rows()


@st.composite
def source_files(draw: st.DrawFn) -> tuple[str, str, bytes]:
    """(``jsonl`` or ``csv``, ``events`` or ``records``, the file's bytes)."""
    file_format = draw(st.sampled_from(["jsonl", "csv"]))
    kind = draw(st.sampled_from(["events", "records"]))
    rows = draw(st.lists(SEGMENT_EVENTS if kind == "events" else RECORD_ROWS, max_size=8))
    lines: list[bytes]
    if file_format == "jsonl":
        lines = [json.dumps(row, ensure_ascii=draw(st.booleans())).encode() for row in rows]
    else:
        columns = sorted({column for row in rows for column in row}) or ["type"]
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(column)) for column in columns])
        lines = text.getvalue().encode().splitlines()
    for _ in range(draw(st.integers(0, 3))):
        hostile = draw(
            st.sampled_from(
                [
                    "json",
                    "bad utf8",
                    "garbage",
                    "blank",
                    "long",
                    "huge cell",
                    "ragged",
                    "quote",
                    "nul",
                ]
            )
        )
        if hostile == "json":
            line = draw(st.sampled_from(_HOSTILE_JSON)).encode()
            if file_format == "csv":
                line = b'track,"' + line.replace(b'"', b'""') + b'"'
        elif hostile == "bad utf8":
            line = b'{"type": "track", "event": "' + draw(BAD_UTF8) + b'"}'
        elif hostile == "garbage":
            line = draw(st.binary(max_size=60)).replace(b"\n", b" ")
        elif hostile == "blank":
            line = b"   "
        elif hostile == "long":
            line = (
                b'{"type": "track", "event": "e", "userId": "u", "properties": {"s": "'
                + b"x" * draw(st.sampled_from([5000, 200_000, 1024 * 1024 + 10]))
                + b'"}}'
            )
        elif hostile == "huge cell":
            line = b"track," + b"y" * 140_000
        elif hostile == "ragged":
            line = b",".join([b"a"] * draw(st.integers(0, 40)))
        elif hostile == "quote":
            line = b'"unterminated, "quote'
        else:
            line = b"track,\x00,e"
        lines.insert(draw(st.integers(0, len(lines))), line)
    ending = draw(st.sampled_from([b"\n", b"\r\n"]))
    content = ending.join(lines) + draw(st.sampled_from([ending, b""]))
    if draw(st.integers(0, 9)) == 0:
        content = b"\xef\xbb\xbf" + content  # a byte-order mark, as Excel writes
    return file_format, kind, content


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value)


def run_file_source(source: tuple[str, str, bytes]) -> None:
    """A file read by its connector and its items converted and checked as a source run
    does: rows become items or problems; items are stored or rejected with a reason; a whole
    run may only fail with a domain error."""
    file_format, kind, content = source
    service = ingestion()
    service.log.clear()
    folder = Path(tempfile.mkdtemp(prefix="source-", dir=_scratch()))
    try:
        path = folder / f"rows.{file_format}"
        path.write_bytes(content)
        config: dict[str, Any] = {"path": str(path), "kind": kind, "batch_size": 7}
        if kind == "records":
            config["mapping"] = MAPPING
        connector = CsvSource(config) if file_format == "csv" else JsonlSource(config)
        try:
            connector.check()
            for batch in connector.read(None):
                for where, description in batch.problems:
                    if not where or not description:
                        raise UndocumentedOutcome(
                            f"a problem without a place or reason: {batch.problems}"
                        )
                _store_items(service, kind, batch.items)
        except DomainError:
            return
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _store_items(service: Ingestion, kind: str, items: Sequence[Any]) -> None:
    if kind == "events":
        payloads = []
        for item in items:
            try:
                payloads.append(event_bytes(item, correct_clock_skew=False))
            except InvalidArgument as error:
                if not error.violations:
                    raise UndocumentedOutcome(f"refused without a violation: {error}") from error
        if payloads:
            outcome = service.loop.run_until_complete(
                service.intake.send_events(payloads, "files", path="items")
            )
            for rejected in outcome.rejected:
                if not rejected.violations:
                    raise UndocumentedOutcome("an item rejected without a violation")
        return
    converted = []
    for item in items:
        try:
            record = record_from_item(item, where="")
        except InvalidArgument as error:
            if not error.violations:
                raise UndocumentedOutcome(f"refused without a violation: {error}") from error
            continue
        record.source = record.source or "files"
        converted.append(record)
    if converted:
        service.loop.run_until_complete(service.intake.import_records(converted, path="items"))
    _check_stored(service)


# -- segment expressions -----------------------------------------------------------------------

CATALOG = Catalog(
    features={"orders_90d": "int64", "revenue_90d": "double", "plan": "string"},
    models=frozenset({"churn", "upsell"}),
    clusterings=frozenset({"behaviour"}),
)
NAMES = [
    "traits.age",
    "traits.address.city",
    "traits.a.b.c.d",
    "features.orders_90d",
    "features.revenue_90d",
    "features.plan",
    "scores.churn",
    "clusters.behaviour",
    "consent.email",
    "identifiers.phone",
    "features.orderz_90d",
    "scores.churn.x",
    "nope.x",
    "traits",
    "TRUE",
    "And",
]
NUMBERS = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(
        [
            "1e308",
            "1e309",
            "-1e309",
            "1e-400",
            ".5",
            "5.",
            "0x10",
            "1_000",
            "9" * 400,
            "-0",
            "1e",
            "3.",
        ]
    ),
)
STRINGS = st.one_of(
    st.text(max_size=8).map(lambda text: json.dumps(text, ensure_ascii=False)),
    st.sampled_from(["'it\\'s'", '"tab\\t"', '"\\q"', '"unclosed', "'", '"a\nb"', '"\\', "''"]),
)
LITERALS = st.one_of(NUMBERS, STRINGS, st.sampled_from(["true", "false", "-3", "- 3", "-x"]))
OPERATORS = st.sampled_from(["==", "!=", "<", "<=", ">", ">=", "=", "===", "<>", "=>"])


@st.composite
def comparisons(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(NAMES))
    shape = draw(
        st.sampled_from(
            ["name op value", "value op name", "name op name", "in", "not in", "bare", "value"]
        )
    )
    if shape == "name op value":
        return f"{name} {draw(OPERATORS)} {draw(LITERALS)}"
    if shape == "value op name":
        return f"{draw(LITERALS)} {draw(OPERATORS)} {name}"
    if shape == "name op name":
        return f"{name} {draw(OPERATORS)} {draw(st.sampled_from(NAMES))}"
    if shape in ("in", "not in"):
        values = draw(st.lists(LITERALS, max_size=4))
        trailing = draw(st.sampled_from(["", ",", ",,"]))
        return f"{name} {shape} [{', '.join(values)}{trailing}]"
    if shape == "value":
        return draw(LITERALS)
    return name


COMPARISONS = comparisons()


def _conditions() -> st.SearchStrategy[str]:
    return st.recursive(
        COMPARISONS,
        lambda inner: st.one_of(
            st.tuples(inner, st.sampled_from([" and ", " or ", " AND ", " && "]), inner).map(
                "".join
            ),
            inner.map(lambda text: f"not {text}"),
            inner.map(lambda text: f"({text})"),
        ),
        max_leaves=8,
    )


CONDITIONS = _conditions()


@st.composite
def segment_expressions(draw: st.DrawFn) -> str:
    """Expressions from the grammar: plausible, deeply nested, very long, or slightly broken."""
    kind = draw(
        st.sampled_from(["grammar"] * 4 + ["nested", "not chain", "long", "long list", "mutated"])
    )
    if kind == "nested":
        depth = draw(st.sampled_from([63, 64, 65, 100, 1000, 1999]))
        opener, closer = draw(st.sampled_from([("(", ")"), ("not (", ")"), ("(not ", ")")]))
        core = draw(COMPARISONS)
        return opener * depth + core + closer * draw(st.sampled_from([depth, depth - 1, depth + 1]))
    if kind == "not chain":
        return "not " * draw(st.sampled_from([64, 65, 999])) + "consent.email"
    if kind == "long":
        part = draw(COMPARISONS)
        joiner = draw(st.sampled_from([" and ", " or "]))
        count = max(1, (MAX_EXPRESSION_LENGTH + draw(st.integers(-40, 40))) // (len(part) + 5))
        return joiner.join([part] * count)
    if kind == "long list":
        count = draw(st.sampled_from([500, 999, 2000]))
        return "features.orders_90d in [" + ",".join(["1"] * count) + "]"
    text = draw(CONDITIONS)
    if kind == "mutated" and text:
        position = draw(st.integers(0, len(text)))
        insert = draw(
            st.sampled_from(
                [
                    "(",
                    ")",
                    "[",
                    "]",
                    ",",
                    '"',
                    "'",
                    "\\",
                    ".",
                    "-",
                    "not ",
                    " in ",
                    "\x00",
                    "\n",
                    "é",
                    "\u0661",  # an Arabic-Indic digit
                ]
            )
        )
        cut = draw(st.integers(0, 3))
        text = text[:position] + insert + text[position + cut :]
    return text


def profile_views() -> st.SearchStrategy[ProfileView]:
    """Profiles with values of every documented type, missing ones and nested traits."""
    values = (
        st.none()
        | st.integers(-100, 100)
        | st.floats(allow_nan=True)
        | st.text(max_size=5)
        | st.booleans()
    )
    traits = st.dictionaries(
        st.sampled_from(["age", "address", "a", "x"]),
        values
        | st.dictionaries(
            st.sampled_from(["city", "b"]),
            values | st.dictionaries(st.just("c"), values),
            max_size=2,
        )
        | st.lists(values, max_size=2),
        max_size=4,
    )
    return st.builds(
        ProfileView,
        profile_id=st.just("p1"),
        traits=traits,
        features=st.dictionaries(
            st.sampled_from(["orders_90d", "revenue_90d", "plan"]),
            st.none() | st.integers() | st.floats() | st.text(max_size=4),
            max_size=3,
        ),
        scores=st.dictionaries(st.sampled_from(["churn", "upsell"]), st.floats(0, 1), max_size=2),
        clusters=st.dictionaries(
            st.just("behaviour"), st.tuples(st.integers(0, 5), st.text(max_size=5)), max_size=1
        ),
        consent=st.dictionaries(st.sampled_from(["email", "ads"]), st.booleans(), max_size=2),
        identifiers=st.dictionaries(
            st.sampled_from(["phone", "email"]),
            st.lists(st.text(max_size=4), max_size=2),
            max_size=2,
        ),
    )


def run_segment_expression(case: tuple[str, list[ProfileView]]) -> None:
    """Parsed, checked and compiled; InvalidArgument at a position, or a predicate that answers
    a boolean for every profile."""
    text, views = case
    try:
        expression = parse_segment(text, CATALOG)
    except InvalidArgument as error:
        [violation] = error.violations
        if violation.field != "segment.expression" or not violation.description.startswith("at "):
            raise UndocumentedOutcome(f"an error without its position: {violation}") from error
        return
    for view in views:
        answer = expression.matches(view)
        if answer is not True and answer is not False:
            raise UndocumentedOutcome(f"{text!r} answered {answer!r}")
        expression.affected_by(["traits.address", "scores.churn", "features.x"])


_ANY_TEXT = st.one_of(
    st.text(max_size=200),
    st.text(
        alphabet=st.sampled_from(list("()[],.-<>=!&|'\"\\ \n\t0123456789eE_abcdinortuflsx")),
        max_size=300,
    ),
    st.text(min_size=MAX_EXPRESSION_LENGTH - 5, max_size=MAX_EXPRESSION_LENGTH + 5, alphabet="( "),
)

TARGETS: tuple[FuzzTarget, ...] = (
    FuzzTarget("ingestion.events", event_requests(), run_ingestion_request),
    FuzzTarget("ingestion.records", record_requests(), run_ingestion_request),
    FuzzTarget("ingestion.tracking_plans", plan_files(), run_tracking_plans),
    FuzzTarget("ingestion.file_sources", source_files(), run_file_source),
    FuzzTarget(
        "activation.segments_text",
        st.tuples(_ANY_TEXT, st.lists(profile_views(), max_size=2)),
        run_segment_expression,
    ),
    FuzzTarget(
        "activation.segments_grammar",
        st.tuples(segment_expressions(), st.lists(profile_views(), max_size=3)),
        run_segment_expression,
    ),
)
"""Every target, by name."""


def target(name: str) -> FuzzTarget:
    """The target called ``name``."""
    for candidate in TARGETS:
        if candidate.name == name:
            return candidate
    raise KeyError(name)
