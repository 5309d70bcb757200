"""Property-based test of ``profilemesh serve ingestion``: any input gets a well-formed answer,
the service survives it, and what it accepts is in the event log.

A real service runs in a subprocess (started as a user would, on a free port, over a temporary
data directory) and Hypothesis feeds it random requests: events of every type with random ids
(empty, over 256 characters, unicode, or drawn from a small pool so that duplicates happen),
random nested properties (some over the 32 KB event limit), timestamps in and out of range,
missing bodies, and malformed entries placed in the ``events`` field as raw bytes (garbage,
truncated events, events with undecodable nested messages). Requests go through raw-bytes
methods, so the bytes the service gets are exactly the ones drawn.

Properties:

- the service never crashes: it is alive and SERVING at the end, and no call fails with
  anything but a whole-request INVALID_ARGUMENT (never INTERNAL/UNKNOWN);
- ``SendEvents`` answers a batch within the limits with one result per event, in order, each
  ACCEPTED or DUPLICATE (with its message id), or REJECTED with at least one violation whose
  field starts with ``events[<index>]``, and counts that match; a batch over the limits fails
  as a whole with INVALID_ARGUMENT naming ``events``; ``SendEvent`` and ``StreamEvents`` keep
  the same rules;
- an id once stored is never accepted again;
- nothing accepted is missing from the log: the log grew by exactly the number of events
  accepted, every stored payload decodes as an ``IngestedItem``, every accepted message id is
  there, and no message id is there twice.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2, timestamp_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from profilemesh.common.v1 import log_service_pb2, log_service_pb2_grpc
from profilemesh.ingestion.v1 import event_log_pb2, event_pb2, ingestion_service_pb2, result_pb2
from profilemesh.shared.log.client import RemoteLog
from profilemesh.shared.settings import Settings
from tests.conftest import free_port

SERVICE = "/profilemesh.ingestion.v1.IngestionService"
ACCEPTED = result_pb2.ITEM_STATUS_ACCEPTED
DUPLICATE = result_pb2.ITEM_STATUS_DUPLICATE
REJECTED = result_pb2.ITEM_STATUS_REJECTED

MAX_BATCH_EVENTS = 500
# The contract says "4 MB"; the service counts 4 MiB. Batches between the two may go either way.
SURELY_WITHIN_BYTES = 4_000_000
SURELY_OVER_BYTES = 4 * 1024 * 1024
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # the server's default gRPC message limit

ID_POOL = ["dup-1", "dup-2", "dup-3", "évènement-4", "🙂-5"]
"""Message ids drawn again and again, so that duplicates across requests happen."""


# -- strategies ------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _mostly(usual: st.SearchStrategy[Any], *unusual: st.SearchStrategy[Any]) -> Any:
    """``usual`` about two times in three, else one of ``unusual``. (``st.one_of`` would not
    do: it draws each distinct strategy equally often, however many times it is listed.)"""
    return st.sampled_from([usual] * (2 * len(unusual)) + list(unusual)).flatmap(lambda s: s)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
small_objects = st.dictionaries(st.text(max_size=12), json_values, max_size=5)
# Over the 32 KB event limit once serialized.
huge_objects = st.integers(33_000, 40_000).map(lambda size: {"blob": "x" * size})
json_objects = st.sampled_from([small_objects] * 12 + [huge_objects]).flatmap(lambda s: s)
"""JSON objects, one in a dozen or so huge."""


ids = _mostly(
    # Fresh each time (Hypothesis' own uuids repeat across examples): a replayed example then
    # meets the service in the same state, so that its failure reproduces.
    st.builds(lambda: str(uuid.uuid4())),
    st.just(""),
    st.sampled_from(ID_POOL),
    st.text(max_size=30),
    st.text(min_size=257, max_size=280),
    st.integers(250, 300).map("u".__mul__),
)
user_ids = _mostly(
    st.text(min_size=1, max_size=12), st.just(""), st.integers(250, 300).map("p".__mul__)
)
seconds = _mostly(
    st.integers(0, 7_258_118_400),
    st.sampled_from([0, 1, 7_258_118_400]),  # the bounds of the accepted range (1970..2200)
    st.integers(-(2**62), 2**62),
)
nanos = _mostly(st.integers(0, 999_999_999), st.integers(-(2**31), 2**31 - 1))
timestamps = st.none() | st.builds(timestamp_pb2.Timestamp, seconds=seconds, nanos=nanos)
BODIES = [None, "track", "track", "track", "identify", "page", "screen", "group", "alias"]


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


@dataclass(frozen=True)
class Item:
    """One entry of a request's ``events`` field: its bytes, and the message id it was built
    with (``None`` for bytes that are not an ``Event`` we built)."""

    raw: bytes
    message_id: str | None = None


@st.composite
def events(draw: st.DrawFn) -> Item:
    """A random ``Event``: valid-ish, of any type, with anything in it."""
    event = event_pb2.Event(
        message_id=draw(ids), user_id=draw(user_ids), anonymous_id=draw(user_ids)
    )
    for name in ("timestamp", "sent_at"):
        stamp = draw(timestamps)
        if stamp is not None:
            getattr(event, name).CopyFrom(stamp)
    body = draw(st.sampled_from(BODIES))
    text = st.text(max_size=20)
    if body == "track":
        event.track.event = draw(text)
        event.track.properties.CopyFrom(_struct(draw(json_objects)))
    elif body == "identify":
        event.identify.traits.CopyFrom(_struct(draw(json_objects)))
    elif body in ("page", "screen"):
        getattr(event, body).name = draw(text)
        getattr(event, body).properties.CopyFrom(_struct(draw(json_objects)))
    elif body == "group":
        event.group.group_id = draw(text)
        event.group.traits.CopyFrom(_struct(draw(json_objects)))
    elif body == "alias":
        event.alias.previous_id = draw(text)
    if draw(st.booleans()):
        event.context.ip = draw(text)
        event.context.user_agent = draw(text)
        event.context.traits.CopyFrom(_struct(draw(json_objects)))
    if draw(st.booleans()):
        event.integrations.CopyFrom(_struct(draw(json_objects)))
    return Item(event.SerializeToString(), event.message_id)


@st.composite
def malformed(draw: st.DrawFn) -> Item:
    """Bytes in the ``events`` field that are not a proper ``Event``."""
    kind = draw(st.sampled_from(["garbage", "truncated", "bad_context", "bad_utf8", "empty"]))
    if kind == "garbage":
        return Item(draw(st.binary(max_size=300)))
    if kind == "empty":
        return Item(b"")
    raw = draw(events()).raw
    if kind == "truncated":
        return Item(raw[: draw(st.integers(0, max(0, len(raw) - 1)))])
    if kind == "bad_context":  # the context (field 7) is not a Context
        return Item(raw + _field(7, draw(st.binary(min_size=1, max_size=50))))
    return Item(raw + _field(7, _field(2, b"\xff\xfe ip")))  # context.ip is not UTF-8


items = st.sampled_from([events()] * 3 + [malformed()]).flatmap(lambda s: s)
"""Mostly events, a quarter malformed entries."""


@dataclass(frozen=True)
class Call:
    """One request: which RPC, its entries, source and flags."""

    rpc: str
    items: list[Item]
    source: str = ""
    validate_only: bool = False
    splits: tuple[int, ...] = ()

    def __repr__(self) -> str:
        entries = [
            item.raw if len(item.raw) < 200 else f"<{len(item.raw)} bytes>" for item in self.items
        ]
        return (
            f"Call({self.rpc}, {entries[:20]}, source={self.source!r}, "
            f"validate_only={self.validate_only}, splits={self.splits})"
        )

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """Hypothesis prints a failing example with this (huge items abbreviated)."""
        printer.text(repr(self))


sources = st.sampled_from(["", "web", "backend", "ünïcode"])


@st.composite
def calls(draw: st.DrawFn) -> Call:
    """A ``SendEvents`` batch (within or over the limits), a ``SendEvent`` or a stream."""
    rpc = draw(st.sampled_from(["SendEvents"] * 5 + ["SendEvent", "StreamEvents"]))
    if rpc == "SendEvent":
        return Call(rpc, draw(st.lists(items, max_size=1)), draw(sources), draw(st.booleans()))
    if rpc == "StreamEvents":
        batch = draw(st.lists(items, max_size=12))
        splits = tuple(sorted(draw(st.lists(st.integers(0, len(batch)), max_size=2))))
        return Call(rpc, batch, draw(sources), splits=splits)
    shape = draw(st.sampled_from(["within"] * 8 + ["too_many", "too_big"]))
    if shape == "too_many":
        event = draw(events().filter(lambda item: len(item.raw) < 4096))
        batch = [event] * draw(st.integers(MAX_BATCH_EVENTS + 1, MAX_BATCH_EVENTS + 20))
    elif shape == "too_big":
        size = draw(st.integers(900_000, 1_000_000))
        batch = [Item(bytes([n]) * size) for n in range(5)]
    else:
        batch = draw(st.lists(items, max_size=12))
    validate_only = draw(st.sampled_from([False, False, False, True]))
    return Call(rpc, batch, draw(sources), validate_only)


# -- the service -----------------------------------------------------------------------------


@dataclass
class Ingestion:
    """The running service, and what the test has seen it accept."""

    target: str
    process: subprocess.Popen[bytes]
    channel: grpc.Channel
    data_dir: Path
    accepted_count: int = 0
    stored_ids: set[str] = field(default_factory=set)


def _health(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    status: int = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
    return status


@pytest.fixture(scope="module")
def ingestion(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ingestion]:
    """``profilemesh serve ingestion`` in a subprocess on a free port, SERVING."""
    data_dir = tmp_path_factory.mktemp("ingestion-properties")
    port = free_port()
    env = {
        **os.environ,
        "PROFILEMESH_DATA_DIR": str(data_dir),
        "PROFILEMESH_SERVICES__INGESTION__PORT": str(port),
        "PROFILEMESH_LOG_LEVEL": "WARNING",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "profilemesh.services.cli", "serve", "ingestion"], env=env
    )
    target = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(target)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"the service exited with {process.returncode}"
            try:
                if _health(channel) == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "the service is not SERVING after 60 s"
            time.sleep(0.1)
        yield Ingestion(target, process, channel, data_dir)
    finally:
        channel.close()
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- one call, and its properties ------------------------------------------------------------


def _events_field(batch: Sequence[Item]) -> bytes:
    """The ``events`` field (1) of a request: each entry's bytes as they are."""
    return b"".join(_field(1, item.raw) for item in batch)


def _flags(source: str, validate_only: bool) -> bytes:
    return (_field(2, source.encode()) if source else b"") + (b"\x18\x01" if validate_only else b"")


def _bad_request_fields(error: grpc.RpcError) -> list[str]:
    """The fields named by the ``BadRequest`` detail of a failed call."""
    status = rpc_status.from_call(error)
    assert status is not None, f"{error.code()} without a google.rpc.Status: {error.details()}"
    fields: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            fields.extend(v.field for v in bad_request.field_violations)
    return fields


def _check_result(
    result: result_pb2.EventResult, index: int, item: Item, where: str, service: Ingestion
) -> None:
    """One event's result: well formed, and consistent with what was stored before."""
    assert result.index == index
    assert result.status in (ACCEPTED, DUPLICATE, REJECTED), result
    if result.status == REJECTED:
        assert result.violations, f"rejected without a violation: {result}"
        for violation in result.violations:
            assert violation.field.startswith(where), (violation.field, where)
        return
    assert result.message_id, result
    if item.message_id:
        assert result.message_id == item.message_id
    if result.status == ACCEPTED:
        assert result.message_id not in service.stored_ids, f"accepted again: {result}"
    try:
        event_pb2.Event.FromString(item.raw)
    except DecodeError as error:
        status = result_pb2.ItemStatus.Name(result.status)
        pytest.fail(f"{status} for bytes that are not an Event ({error}): {item.raw!r}")


def _send_events(service: Ingestion, call: Call) -> None:
    send = service.channel.unary_unary(
        f"{SERVICE}/SendEvents",
        request_serializer=None,
        response_deserializer=ingestion_service_pb2.SendEventsResponse.FromString,
    )
    request = _events_field(call.items) + _flags(call.source, call.validate_only)
    size = sum(len(item.raw) for item in call.items)
    over = len(call.items) > MAX_BATCH_EVENTS or size > SURELY_OVER_BYTES
    assert len(request) < MAX_MESSAGE_BYTES
    try:
        response = send(request, timeout=30)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
        assert over or size > SURELY_WITHIN_BYTES, f"a batch within the limits failed: {error}"
        assert _bad_request_fields(error) == ["events"]
        return
    assert not over, "a batch over the limits was answered"
    assert len(response.results) == len(call.items)
    statuses = Counter(result.status for result in response.results)
    assert response.accepted_count == statuses[ACCEPTED]
    assert response.duplicate_count == statuses[DUPLICATE]
    assert response.rejected_count == statuses[REJECTED]
    for index, (result, item) in enumerate(zip(response.results, call.items, strict=True)):
        _check_result(result, index, item, f"events[{index}]", service)
        if result.status == ACCEPTED and not call.validate_only:
            service.stored_ids.add(result.message_id)
    if not call.validate_only:
        service.accepted_count += response.accepted_count


def _send_event(service: Ingestion, call: Call) -> None:
    send = service.channel.unary_unary(
        f"{SERVICE}/SendEvent",
        request_serializer=None,
        response_deserializer=ingestion_service_pb2.SendEventResponse.FromString,
    )
    item = call.items[0] if call.items else None
    request = (_field(1, item.raw) if item else b"") + _flags(call.source, call.validate_only)
    try:
        response = send(request, timeout=30)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
        fields = _bad_request_fields(error)
        assert fields, "a rejected event without a BadRequest detail"
        assert all(f.startswith("event") for f in fields), fields
        return
    result = response.result
    assert result.status in (ACCEPTED, DUPLICATE), result
    _check_result(result, 0, item or Item(b""), "event", service)
    if result.status == ACCEPTED and not call.validate_only:
        service.stored_ids.add(result.message_id)
        service.accepted_count += 1


def _stream_events(service: Ingestion, call: Call) -> None:
    stream = service.channel.stream_unary(
        f"{SERVICE}/StreamEvents",
        request_serializer=None,
        response_deserializer=ingestion_service_pb2.StreamEventsResponse.FromString,
    )
    bounds = [0, *call.splits, len(call.items)]
    messages = [
        _events_field(call.items[start:end]) + (_flags(call.source, False) if i == 0 else b"")
        for i, (start, end) in enumerate(itertools.pairwise(bounds))
    ]
    response = stream(iter(messages), timeout=30)
    total = response.accepted_count + response.duplicate_count + response.rejected_count
    assert total == len(call.items), response
    assert len(response.rejected) == response.rejected_count
    for result in response.rejected:
        assert 0 <= result.index < len(call.items)
        assert result.status == REJECTED
        assert result.violations
        for violation in result.violations:
            assert violation.field.startswith(f"events[{result.index}]"), violation
    service.accepted_count += response.accepted_count


# -- the end state ---------------------------------------------------------------------------


def _logged_count(channel: grpc.Channel) -> int:
    stub = log_service_pb2_grpc.LogServiceStub(channel)
    answer = stub.GetOffsets(log_service_pb2.GetOffsetsRequest(stream="events"), timeout=10)
    return sum(p.next_offset - p.first_offset for p in answer.partitions)


async def _logged_ids(target: str) -> list[str]:
    """The message id of every event in the log, read to its end over gRPC."""
    log = RemoteLog(target, "events", Settings())
    found: list[str] = []
    try:
        for partition in await log.offsets():
            async for batch in log.subscribe(partition.partition, 0, stop_at_end=True):
                for offset, payload in enumerate(batch.payload_list(), batch.base_offset):
                    try:
                        item = event_log_pb2.IngestedItem.FromString(payload)
                    except DecodeError:
                        pytest.fail(f"partition {partition.partition} offset {offset}: {payload!r}")
                    assert item.HasField("event"), item
                    found.append(item.event.message_id)
    finally:
        await log.close()
    return found


def test_any_request_gets_a_well_formed_answer_and_accepted_events_are_logged(
    ingestion: Ingestion,
) -> None:
    """Random and malformed requests; then the service is up and the log holds the accepted."""
    logged_before = _logged_count(ingestion.channel)
    senders = {"SendEvents": _send_events, "SendEvent": _send_event, "StreamEvents": _stream_events}

    @settings(
        max_examples=120,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(call=calls())
    def any_request(call: Call) -> None:
        senders[call.rpc](ingestion, call)

    any_request()

    assert ingestion.process.poll() is None, "the service exited"
    assert _health(ingestion.channel) == health_pb2.HealthCheckResponse.SERVING
    assert _logged_count(ingestion.channel) - logged_before == ingestion.accepted_count
    logged = Counter(asyncio.run(_logged_ids(ingestion.target)))
    missing = ingestion.stored_ids - logged.keys()
    assert not missing, f"{len(missing)} accepted ids not in the log, e.g. {sorted(missing)[:5]}"
    twice = [message_id for message_id, count in logged.items() if count > 1]
    assert not twice, f"{len(twice)} ids stored more than once, e.g. {twice[:5]}"
