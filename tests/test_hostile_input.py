"""Hostile input gets a clear error, in bounded time and memory, and never crashes a service.

First every fuzz target of ``bench/fuzz_targets.py`` (ingestion's requests, records,
tracking-plan files and file sources; activation's segment expressions) runs a few hundred
inputs: each must end in one of its documented outcomes. ``bench/fuzz.py`` runs the same
targets for longer.

Then a real ``profilemesh serve ingestion``, started in a subprocess as a user would, is sent
raw request bytes that no well-behaved client would produce: an event over ``max_event_bytes``,
a message over the gRPC limit, properties nested 10,000 levels deep, invalid UTF-8 in string
fields, a batch over ``max_batch_events``. Each is refused with the documented status and the
field it concerns; nothing refused reaches the event log; and after a burst of all of them the
service is SERVING, accepts a valid event, and its resident memory has stayed bounded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings

from bench.fuzz_targets import (
    TARGETS,
    at_path,
    field_bytes,
    nested_lists,
    nested_struct,
    target,
)
from profilemesh.common.v1 import log_service_pb2, log_service_pb2_grpc
from profilemesh.ingestion.v1 import event_pb2, ingestion_service_pb2, record_pb2, result_pb2
from profilemesh.services.ingestion.tracking_plans import plan_from_dict
from profilemesh.shared.errors import InvalidArgument
from tests.conftest import free_port

CI = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
"""The CI budget: a few hundred inputs per target, all targets well under a minute."""


@pytest.mark.parametrize("name", [t.name for t in TARGETS])
def test_a_fuzz_target_only_ever_sees_its_documented_outcomes(name: str) -> None:
    fuzz_target = target(name)

    @CI
    @given(fuzz_target.strategy)
    def any_input(value: object) -> None:
        fuzz_target(value)

    any_input()


def test_a_tracking_plan_with_enum_numbers_that_name_nothing_is_refused_naming_each() -> None:
    document = {
        "name": "p",
        "policy": 7,
        "events": [
            {"event_type": -1, "event_name": "e", "properties": [{"name": "a", "type": 42}]}
        ],
    }
    with pytest.raises(InvalidArgument) as error:
        plan_from_dict(document, "plan")
    assert [v.field for v in error.value.violations] == [
        "plan.policy",
        "plan.events[0].event_type",
        "plan.events[0].properties[0].type",
    ]


# -- a real service --------------------------------------------------------------------------

SERVICE = "/profilemesh.ingestion.v1.IngestionService"
MAX_EVENT_BYTES = 256 * 1024
"""Raised from the default 32 KB so that 10,000 levels of nesting fit: the depth, not the size,
must be what refuses them."""
MAX_BATCH_EVENTS = 500
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
ACCEPTED = result_pb2.ITEM_STATUS_ACCEPTED


@dataclass
class Service:
    """The running service and a channel to it that sends whatever it is given."""

    process: subprocess.Popen[bytes]
    channel: grpc.Channel

    def call(self, method: str, request: bytes, timeout: float = 30) -> bytes:
        """The raw response of ``method`` (``SendEvent`` ...) to the raw ``request``."""
        call = self.channel.unary_unary(
            f"{SERVICE}/{method}", request_serializer=None, response_deserializer=None
        )
        response: bytes = call(request, timeout=timeout)
        return response

    def refusal(self, method: str, request: bytes) -> grpc.RpcError:
        """The error ``method`` answers ``request`` with (it must fail)."""
        with pytest.raises(grpc.RpcError) as caught:
            self.call(method, request)
        error: grpc.RpcError = caught.value
        return error

    def logged(self) -> int:
        """Items in the event log."""
        stub = log_service_pb2_grpc.LogServiceStub(self.channel)
        answer = stub.GetOffsets(log_service_pb2.GetOffsetsRequest(stream="events"), timeout=10)
        return sum(p.next_offset - p.first_offset for p in answer.partitions)

    def serving(self) -> bool:
        stub = health_pb2_grpc.HealthStub(self.channel)
        answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    def rss_mib(self) -> float:
        """The service process's resident memory."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """``profilemesh serve ingestion`` in a subprocess on a free port, SERVING."""
    port = free_port()
    env = {
        **os.environ,
        "PROFILEMESH_DATA_DIR": str(tmp_path_factory.mktemp("hostile")),
        "PROFILEMESH_SERVICES__INGESTION__PORT": str(port),
        "PROFILEMESH_INGESTION__MAX_EVENT_BYTES": str(MAX_EVENT_BYTES),
        "PROFILEMESH_LOG_LEVEL": "WARNING",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "profilemesh.services.cli", "serve", "ingestion"], env=env
    )
    limit = 64 * 1024 * 1024  # the client's own limits must not stop oversized requests
    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}",
        options=[
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
        ],
    )
    running = Service(process, channel)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"the service exited with {process.returncode}"
            try:
                if running.serving():
                    break
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "the service is not SERVING after 60 s"
            time.sleep(0.1)
        yield running
    finally:
        channel.close()
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    status = rpc_status.from_call(error)
    assert status is not None, f"{error.code()} without details: {error.details()}"
    found: list[tuple[str, str]] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            found.extend((v.field, v.description) for v in bad_request.field_violations)
    return found


def _valid_event(user: str = "u1") -> bytes:
    event = event_pb2.Event(user_id=user)
    event.track.event = "Order Completed"
    event.track.properties.update({"revenue": 10})
    return event.SerializeToString()


def _oversized_event() -> bytes:
    event = event_pb2.Event(user_id="u1")
    event.track.event = "Order Completed"
    event.track.properties.update({"blob": "x" * (MAX_EVENT_BYTES + 1)})
    return event.SerializeToString()


def _deep_event(levels: int = 10_000) -> bytes:
    """A track event whose properties are ``{"a": {"a": ...}}``, ``levels`` Structs deep."""
    return _valid_event() + field_bytes(10, field_bytes(2, nested_struct(levels)))


def _deep_record(levels: int = 10_000) -> bytes:
    record = record_pb2.CustomerRecord(source="crm", record_id="r1")
    record.identifiers.add(type="email", value="a@example.com")
    return record.SerializeToString() + field_bytes(4, nested_lists(levels))


def test_an_event_over_max_event_bytes_is_invalid_argument_naming_the_limit(
    service: Service,
) -> None:
    before = service.logged()
    error = service.refusal("SendEvent", field_bytes(1, _oversized_event()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    [(field, description)] = _violations(error)
    assert field == "event"
    assert f"the limit is {MAX_EVENT_BYTES}" in description
    assert service.logged() == before


def test_a_message_over_the_grpc_limit_is_resource_exhausted_and_the_service_stays_up(
    service: Service,
) -> None:
    huge = field_bytes(1, b"x" * (MAX_MESSAGE_BYTES + 1024))
    error = service.refusal("SendEvents", huge)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert service.serving()
    response = ingestion_service_pb2.SendEventResponse.FromString(
        service.call("SendEvent", field_bytes(1, _valid_event()))
    )
    assert response.result.status == ACCEPTED


def test_properties_nested_10000_levels_deep_are_invalid_argument_not_a_crash(
    service: Service,
) -> None:
    before = service.logged()
    deep = _deep_event()
    assert len(deep) < MAX_EVENT_BYTES  # refused for its depth, not its size
    error = service.refusal("SendEvent", field_bytes(1, deep))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violations(error) == [("event.track.properties", "nested more than 100 levels deep")]
    # A record is decoded with its request: the same refusal comes from the request decoder.
    error = service.refusal("ImportRecords", field_bytes(1, _deep_record()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violations(error) == [("records[0].attributes", "nested more than 100 levels deep")]
    assert service.logged() == before


@pytest.mark.parametrize(
    ("method", "request_bytes", "field"),
    [
        ("SendEvent", field_bytes(1, _valid_event() + at_path((7, 2), b"\xff")),
         "event.context.ip"),
        # a key of the track's properties (a Struct: named by the field holding it)
        ("SendEvent", field_bytes(1, _valid_event() + at_path((10, 2, 1, 1), b"\xc3")),
         "event.track.properties"),
        ("SendEvents", field_bytes(1, _valid_event()) + field_bytes(2, b"web\xed\xa0\x80"),
         "source"),
        ("ImportRecords", at_path((1,), field_bytes(1, b"crm") + field_bytes(2, b"r\xfe1")),
         "records[0].record_id"),
    ],
    ids=["event.context.ip", "a properties key", "source", "records[0].record_id"],
)  # fmt: skip
def test_invalid_utf8_in_a_string_field_is_invalid_argument_naming_the_field(
    service: Service, method: str, request_bytes: bytes, field: str
) -> None:
    before = service.logged()
    error = service.refusal(method, request_bytes)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violations(error) == [(field, "not valid UTF-8 text")]
    assert service.logged() == before


def test_invalid_utf8_inside_one_event_of_a_batch_rejects_that_event_only(
    service: Service,
) -> None:
    before = service.logged()
    bad = _valid_event() + field_bytes(2, b"\xff")  # user_id
    request = field_bytes(1, _valid_event()) + field_bytes(1, bad)
    response = ingestion_service_pb2.SendEventsResponse.FromString(
        service.call("SendEvents", request)
    )
    assert [r.status for r in response.results] == [ACCEPTED, result_pb2.ITEM_STATUS_REJECTED]
    [violation] = response.results[1].violations
    assert (violation.field, violation.description) == ("events[1].user_id", "not valid UTF-8 text")
    assert service.logged() == before + 1


def test_a_batch_over_max_batch_events_is_refused_whole_and_nothing_is_stored(
    service: Service,
) -> None:
    before = service.logged()
    batch = b"".join(field_bytes(1, _valid_event(f"u{n}")) for n in range(MAX_BATCH_EVENTS + 1))
    error = service.refusal("SendEvents", batch)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    [(field, description)] = _violations(error)
    assert field == "events"
    assert f"at most {MAX_BATCH_EVENTS}" in description
    assert service.logged() == before


HOSTILE = [
    ("SendEvent", field_bytes(1, _oversized_event())),
    ("SendEvents", field_bytes(1, b"x" * (MAX_MESSAGE_BYTES + 1024))),
    ("SendEvent", field_bytes(1, _deep_event())),
    ("ImportRecords", field_bytes(1, _deep_record())),
    ("SendEvents", field_bytes(1, _valid_event()) + field_bytes(2, b"\xff")),
    ("SendEvents", b"".join(field_bytes(1, _valid_event()) for _ in range(MAX_BATCH_EVENTS + 1))),
    ("ImportRecords", b"\x0a\xff\xff\xff\xff\x0f"),  # a length past the end
    ("SendEvents", field_bytes(1, _oversized_event()) * 20),  # over max_batch_bytes
]
"""One of each hostile request, all refused whole."""


def test_after_a_burst_of_hostile_requests_the_service_answers_stores_nothing_of_them_and_its_memory_is_bounded(  # noqa: E501
    service: Service,
) -> None:
    service.call("SendEvent", field_bytes(1, _valid_event()))  # warm up before measuring
    rss_before = service.rss_mib()
    logged_before = service.logged()

    def send(request: tuple[str, bytes]) -> grpc.StatusCode:
        method, body = request
        try:
            service.call(method, body)
        except grpc.RpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    rounds = 10
    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = list(pool.map(send, HOSTILE * rounds))
    assert set(codes) <= {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert service.process.poll() is None, "the service exited"
    assert service.serving()
    assert service.logged() == logged_before, "a refused request left items in the log"
    response = ingestion_service_pb2.SendEventResponse.FromString(
        service.call("SendEvent", field_bytes(1, _valid_event("after-the-burst")))
    )
    assert response.result.status == ACCEPTED
    assert service.logged() == logged_before + 1
    grown = service.rss_mib() - rss_before
    # 80 requests, 10 of them over 16 MiB: a leak of even one request each would show.
    assert grown < 160, f"the service grew by {grown:.0f} MiB"
