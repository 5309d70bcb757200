"""The Python SDK (profilemesh.client): queue at once, batch, retry, report, flush on exit.

The client's peer here is a small real gRPC server implementing IngestionService.SendEvents
(``FakeIngestion``), so that every failure the service can answer with is reproducible; the
last test runs the client against the real ingestion service when it answers SendEvents.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

import profilemesh.client
from profilemesh.common.v1 import errors_pb2
from profilemesh.ingestion.v1 import (
    event_pb2,
    ingestion_service_pb2,
    ingestion_service_pb2_grpc,
    result_pb2,
)
from profilemesh.services.ingestion.client import (
    LIBRARY_NAME,
    Client,
    ClientClosedError,
    DeliveryAbandonedError,
    QueueFullError,
    RejectedEvent,
)
from tests.conftest import free_port

# Retries in these tests wait milliseconds, not the production tenths of seconds.
FAST_RETRIES: dict[str, Any] = {"backoff_initial": 0.01, "backoff_max": 0.05}


@dataclass
class Failure:
    """What the fake answers one SendEvents call with instead of a response."""

    code: grpc.StatusCode
    retry_delay: float | None = None


@dataclass
class FakeIngestion(ingestion_service_pb2_grpc.IngestionServiceServicer):
    """IngestionService.SendEvents as the real service answers it: dedup by message id,
    per-event rejections, and scripted failures for the first calls."""

    target: str = ""
    failures: list[Failure] = field(default_factory=list)
    reject: Callable[[event_pb2.Event], str | None] = lambda event: None
    delay: float = 0.0
    gate: threading.Event | None = None
    requests: list[ingestion_service_pb2.SendEventsRequest] = field(default_factory=list)
    call_times: list[float] = field(default_factory=list)
    entered: threading.Event = field(default_factory=threading.Event)
    _seen: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def SendEvents(
        self, request: ingestion_service_pb2.SendEventsRequest, context: grpc.ServicerContext
    ) -> ingestion_service_pb2.SendEventsResponse:
        with self._lock:
            self.call_times.append(time.monotonic())
            failure = self.failures.pop(0) if self.failures else None
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.delay)
        if failure is not None:
            _abort(context, failure)
        response = ingestion_service_pb2.SendEventsResponse()
        with self._lock:
            self.requests.append(request)
            for index, event in enumerate(request.events):
                result = response.results.add(index=index, message_id=event.message_id)
                reason = self.reject(event)
                if reason is not None:
                    result.status = result_pb2.ITEM_STATUS_REJECTED
                    result.violations.append(
                        errors_pb2.FieldViolation(
                            field=f"events[{index}].track.event", description=reason
                        )
                    )
                    response.rejected_count += 1
                elif event.message_id in self._seen:
                    result.status = result_pb2.ITEM_STATUS_DUPLICATE
                    response.duplicate_count += 1
                else:
                    self._seen.add(event.message_id)
                    result.status = result_pb2.ITEM_STATUS_ACCEPTED
                    response.accepted_count += 1
        return response

    @property
    def events(self) -> list[event_pb2.Event]:
        """Every event of every answered request, in arrival order."""
        with self._lock:
            return [event for request in self.requests for event in request.events]


def _abort(context: grpc.ServicerContext, failure: Failure) -> None:
    status = status_pb2.Status(code=failure.code.value[0], message=f"scripted {failure.code.name}")
    if failure.retry_delay is not None:
        delay = duration_pb2.Duration()
        delay.FromTimedelta(timedelta(seconds=failure.retry_delay))
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        status.details.append(detail)
    context.abort_with_status(rpc_status.to_status(status))


@pytest.fixture
def ingestion() -> Iterator[FakeIngestion]:
    # Only SendEvents is implemented; the other RPCs answer UNIMPLEMENTED, as intended.
    fake = FakeIngestion()  # type: ignore[abstract]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    ingestion_service_pb2_grpc.add_IngestionServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    fake.target = f"127.0.0.1:{port}"
    yield fake
    if fake.gate is not None:
        fake.gate.set()
    server.stop(0)


@dataclass
class Reports:
    """What a client passed to its callbacks."""

    errors: list[tuple[Exception, list[event_pb2.Event]]] = field(default_factory=list)
    rejected: list[RejectedEvent] = field(default_factory=list)

    def on_error(self, error: Exception, events: list[event_pb2.Event]) -> None:
        self.errors.append((error, events))

    def on_rejected(self, events: list[RejectedEvent]) -> None:
        self.rejected.extend(events)


@pytest.fixture
def reports() -> Reports:
    return Reports()


def _client(target: str, reports: Reports, **options: Any) -> Client:
    return Client(target, on_error=reports.on_error, on_rejected=reports.on_rejected, **options)


# -- batching and the background consumer ----------------------------------------------------


def test_events_are_sent_in_batches_each_message_id_exactly_once(
    ingestion: FakeIngestion, reports: Reports
) -> None:
    with _client(ingestion.target, reports, max_batch_events=100, flush_interval=5) as client:
        ids = [client.track(f"user-{n % 7}", "Item Viewed", {"n": n}) for n in range(250)]
        assert client.flush(timeout=5)
        assert (client.sent, client.accepted, client.failed) == (250, 250, 0)
    assert len(ingestion.requests) == 3
    assert [len(request.events) for request in ingestion.requests] == [100, 100, 50]
    assert sorted(event.message_id for event in ingestion.events) == sorted(ids)
    assert reports.errors == []


def test_a_batch_never_exceeds_max_batch_bytes(ingestion: FakeIngestion, reports: Reports) -> None:
    with _client(ingestion.target, reports, max_batch_bytes=16 * 1024, flush_interval=5) as client:
        for n in range(40):
            client.track("user-1", "Document Saved", {"body": "x" * 2000, "n": n})
        assert client.flush(timeout=5)
    assert len(ingestion.events) == 40
    assert len(ingestion.requests) >= 5
    assert all(request.ByteSize() <= 16 * 1024 for request in ingestion.requests)


def test_a_partial_batch_is_sent_after_flush_interval(ingestion: FakeIngestion) -> None:
    with Client(ingestion.target, flush_interval=0.2) as client:
        client.track("user-1", "Signed In")
        deadline = time.monotonic() + 3
        while not ingestion.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(ingestion.events) == 1


def test_track_returns_at_once_while_a_send_is_in_flight(
    ingestion: FakeIngestion, reports: Reports
) -> None:
    ingestion.gate = threading.Event()  # the service holds the first call until released
    with _client(ingestion.target, reports, flush_interval=0) as client:
        client.track("user-1", "Button Clicked", {"n": 0})
        assert ingestion.entered.wait(5)
        started = time.monotonic()
        for n in range(1, 50):
            client.track("user-1", "Button Clicked", {"n": n})
        assert time.monotonic() - started < 0.2
        assert client.queued == 49
        ingestion.gate.set()
        assert client.flush(timeout=5)
    assert len(ingestion.events) == 50


def test_shutdown_sends_what_is_queued_without_waiting_for_the_interval(
    ingestion: FakeIngestion,
) -> None:
    client = Client(ingestion.target, flush_interval=60)
    for n in range(30):
        client.identify(f"user-{n}", {"plan": "pro"})
    started = time.monotonic()
    assert client.shutdown(timeout=5)
    assert time.monotonic() - started < 2
    assert len(ingestion.events) == 30


def test_shutdown_with_a_timeout_gives_up_and_reports_what_was_not_delivered(
    ingestion: FakeIngestion, reports: Reports
) -> None:
    ingestion.gate = threading.Event()  # the service never answers in time
    client = _client(ingestion.target, reports, max_batch_events=2, flush_interval=0)
    client.track("user-1", "Step", {"n": 0})
    assert ingestion.entered.wait(5)
    for n in range(1, 5):
        client.track("user-1", "Step", {"n": n})
    started = time.monotonic()
    assert not client.shutdown(timeout=0.3)
    assert time.monotonic() - started < 2
    assert all(isinstance(error, DeliveryAbandonedError) for error, _ in reports.errors)
    assert sum(len(events) for _, events in reports.errors) == 5
    assert client.failed == 5


def test_events_queued_at_interpreter_exit_are_flushed(
    ingestion: FakeIngestion, tmp_path: Path
) -> None:
    script = tmp_path / "send_and_exit.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            import profilemesh.client as profilemesh

            profilemesh.target = sys.argv[1]
            profilemesh.configure(flush_interval=60)
            for n in range(120):
                profilemesh.track(f"user-{n}", "Report Exported", {"n": n})
            # No flush(), no shutdown(): the atexit hook must send them.
            """
        )
    )
    subprocess.run([sys.executable, str(script), ingestion.target], check=True, timeout=30)
    sent = [event.message_id for event in ingestion.events]
    assert len(sent) == 120
    assert len(set(sent)) == 120


# -- retries -----------------------------------------------------------------------------------


def test_unavailable_is_retried_until_the_service_answers(
    ingestion: FakeIngestion, reports: Reports
) -> None:
    ingestion.failures = [Failure(grpc.StatusCode.UNAVAILABLE)] * 3
    with _client(ingestion.target, reports, flush_interval=60, **FAST_RETRIES) as client:
        ids = [client.track("user-1", "Cart Updated", {"n": n}) for n in range(5)]
        assert client.flush(timeout=5)
        assert (client.accepted, client.failed) == (5, 0)
    assert len(ingestion.call_times) == 4  # one batch: three refusals, then accepted
    assert sorted(event.message_id for event in ingestion.events) == sorted(ids)
    assert reports.errors == []


def test_a_service_that_stays_down_is_given_up_on_after_max_retries(reports: Reports) -> None:
    target = f"127.0.0.1:{free_port()}"  # nobody listens: UNAVAILABLE every time
    with _client(target, reports, max_retries=2, flush_interval=0, **FAST_RETRIES) as client:
        client.track("user-1", "Cart Updated")
        client.flush(timeout=10)
        assert client.failed == 1
    [(error, events)] = reports.errors
    assert isinstance(error, grpc.RpcError)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert [event.track.event for event in events] == ["Cart Updated"]


def test_resource_exhausted_waits_the_delay_the_service_asks_for(
    ingestion: FakeIngestion, reports: Reports
) -> None:
    ingestion.failures = [Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, retry_delay=0.6)]
    with _client(ingestion.target, reports, flush_interval=0, **FAST_RETRIES) as client:
        client.track("user-1", "Cart Updated")
        assert client.flush(timeout=5)
        assert client.accepted == 1
    first, second = ingestion.call_times
    # The fast backoff alone would retry within 10 ms.
    assert 0.55 <= second - first <= 1.5


def test_invalid_argument_is_not_retried_and_reaches_on_error(
    ingestion: FakeIngestion, reports: Reports
) -> None:
    ingestion.failures = [Failure(grpc.StatusCode.INVALID_ARGUMENT)]
    with _client(ingestion.target, reports, flush_interval=0, **FAST_RETRIES) as client:
        message_id = client.track("user-1", "Cart Updated")
        assert client.flush(timeout=5)
        assert (client.sent, client.failed) == (0, 1)
    assert len(ingestion.call_times) == 1
    [(error, events)] = reports.errors
    assert isinstance(error, grpc.RpcError)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [event.message_id for event in events] == [message_id]


def test_sent_at_is_renewed_on_each_attempt(ingestion: FakeIngestion) -> None:
    ingestion.failures = [Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, retry_delay=0.3)]
    with Client(ingestion.target, sync_mode=True) as client:
        before_retry = datetime.now(UTC) + timedelta(seconds=0.25)
        client.track("user-1", "Cart Updated")
    [event] = ingestion.events
    assert event.sent_at.ToDatetime(UTC) >= before_retry


# -- what the service says about events --------------------------------------------------------


def test_rejected_events_reach_on_rejected_with_their_violations(
    ingestion: FakeIngestion, reports: Reports
) -> None:
    ingestion.reject = lambda event: (
        "not in the tracking plan" if event.track.event == "Oops" else None
    )
    with _client(ingestion.target, reports, flush_interval=5) as client:
        client.track("user-1", "Order Completed")
        bad = client.track("user-1", "Oops", {"why": "typo"})
        client.track("user-1", "Order Shipped")
        assert client.flush(timeout=5)
        assert (client.sent, client.accepted, client.rejected, client.failed) == (3, 2, 1, 0)
    [rejected] = reports.rejected
    assert rejected.message_id == bad
    assert rejected.event.track.properties["why"] == "typo"
    assert [(v.field, v.description) for v in rejected.violations] == [
        ("events[1].track.event", "not in the tracking plan")
    ]
    assert reports.errors == []


def test_a_resent_message_id_is_counted_as_a_duplicate(ingestion: FakeIngestion) -> None:
    with Client(ingestion.target, sync_mode=True) as client:
        client.track("user-1", "Order Completed", message_id="order-17-completed")
        client.track("user-1", "Order Completed", message_id="order-17-completed")
        assert (client.sent, client.accepted, client.duplicates) == (2, 1, 1)


# -- the queue ---------------------------------------------------------------------------------


def test_a_full_queue_drops_the_event_and_calls_on_error(
    ingestion: FakeIngestion, reports: Reports
) -> None:
    ingestion.gate = threading.Event()  # the service holds the first batch until released
    with _client(
        ingestion.target, reports, max_batch_events=1, max_queue_events=3, flush_interval=0
    ) as client:
        client.track("user-1", "Step", {"n": 0})
        assert ingestion.entered.wait(5)
        kept = [client.track("user-1", "Step", {"n": n}) for n in range(1, 4)]
        dropped = client.track("user-1", "Step", {"n": 4})
        [(error, events)] = reports.errors
        assert isinstance(error, QueueFullError)
        assert [event.message_id for event in events] == [dropped]
        ingestion.gate.set()
        assert client.flush(timeout=5)
        assert (client.accepted, client.failed) == (4, 1)
    assert {event.message_id for event in ingestion.events} >= set(kept)
    assert dropped not in {event.message_id for event in ingestion.events}


def test_events_after_shutdown_are_dropped_and_reported(
    ingestion: FakeIngestion, reports: Reports
) -> None:
    client = _client(ingestion.target, reports)
    client.shutdown()
    client.track("user-1", "Too Late")
    [(error, _)] = reports.errors
    assert isinstance(error, ClientClosedError)


# -- the events themselves ---------------------------------------------------------------------


def test_sent_at_is_set_when_sent_and_the_timestamp_is_kept(ingestion: FakeIngestion) -> None:
    happened = datetime(2024, 3, 1, 9, 30, 15, 250_000, tzinfo=timezone(timedelta(hours=1)))
    with Client(ingestion.target, sync_mode=True, source="backend") as client:
        before = datetime.now(UTC)
        message_id = client.track("user-1", "Order Completed", timestamp=happened)
        after = datetime.now(UTC)
    [request] = ingestion.requests
    [event] = request.events
    assert request.source == "backend"
    assert event.message_id == message_id
    assert event.timestamp.ToDatetime(UTC) == happened
    assert before <= event.sent_at.ToDatetime(UTC) <= after
    assert event.context.library.name == LIBRARY_NAME
    assert event.context.library.version


def test_the_timestamp_defaults_to_now(ingestion: FakeIngestion) -> None:
    with Client(ingestion.target, sync_mode=True) as client:
        before = datetime.now(UTC)
        client.page(anonymous_id="cookie-9", name="Pricing", properties={"path": "/pricing"})
        after = datetime.now(UTC)
    [event] = ingestion.events
    assert before <= event.timestamp.ToDatetime(UTC) <= after
    assert (event.anonymous_id, event.page.name) == ("cookie-9", "Pricing")


def test_every_kind_of_event_is_built_per_the_segment_spec(ingestion: FakeIngestion) -> None:
    with Client(ingestion.target, sync_mode=True) as client:
        client.track(
            42, "Order Completed", {"revenue": Decimal("42.50"), "at": datetime(2024, 1, 1)}
        )
        client.identify("user-1", {"email": "ada@example.com"}, anonymous_id="cookie-1")
        client.page("user-1", "Docs", "Guides", {"path": "/docs"})
        client.screen("user-1", "Checkout", "Shop")
        client.group("user-1", "acme", {"employees": 120})
        client.alias("cookie-1", "user-1")
    track, identify, page, screen, group, alias = ingestion.events
    assert track.user_id == "42"
    assert dict(track.track.properties) == {"revenue": 42.5, "at": "2024-01-01T00:00:00"}
    assert identify.identify.traits["email"] == "ada@example.com"
    assert identify.anonymous_id == "cookie-1"
    assert (page.page.name, page.page.category, page.page.properties["path"]) == (
        "Docs",
        "Guides",
        "/docs",
    )
    assert (screen.screen.name, screen.screen.category) == ("Checkout", "Shop")
    assert (group.group.group_id, group.group.traits["employees"]) == ("acme", 120)
    assert (alias.alias.previous_id, alias.user_id) == ("cookie-1", "user-1")


def test_a_segment_style_context_is_mapped_onto_the_context_fields(
    ingestion: FakeIngestion,
) -> None:
    context = {
        "ip": "203.0.113.7",
        "userAgent": "Mozilla/5.0",
        "page": {"path": "/pricing", "url": "https://example.com/pricing"},
        "campaign": {"name": "spring_sale", "source": "newsletter"},
        "traits": {"plan": "pro"},
        "experiment": "b",
    }
    with Client(ingestion.target, sync_mode=True) as client:
        client.track("user-1", "Plan Viewed", context=context, integrations={"webhook": False})
    [event] = ingestion.events
    assert (event.context.ip, event.context.user_agent) == ("203.0.113.7", "Mozilla/5.0")
    assert event.context.page.path == "/pricing"
    assert event.context.campaign.source == "newsletter"
    assert event.context.traits["plan"] == "pro"
    assert dict(event.context.extra) == {"experiment": "b"}
    assert event.context.library.name == LIBRARY_NAME
    assert dict(event.integrations) == {"webhook": False}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.track(event="Signed In"), "user_id or an anonymous_id"),
        (lambda c: c.track("user-1"), "event name"),
        (lambda c: c.track("user-1", ""), "event name"),
        (lambda c: c.group("user-1"), "group_id"),
        (lambda c: c.alias(None, "user-1"), "previous_id"),
        (lambda c: c.alias("cookie-1", None), "new user_id"),
        (lambda c: c.identify("u" * 300), "longer than 256"),
        (lambda c: c.track("user-1", "X", message_id=""), "message_id"),
        (lambda c: c.track("user-1", "X", timestamp=datetime(2024, 1, 1)), "timezone-aware"),
        (lambda c: c.track("user-1", "X", properties=["a"]), "properties must be a mapping"),
        (lambda c: c.track("user-1", "X", {"blob": b"\x00"}), r"properties\.blob"),
        (lambda c: c.track("user-1", "X", context={"ip": 7}), "context"),
        (lambda c: c.track("user-1", "X", {"body": "x" * 4096}), "max_batch_bytes"),
    ],
)
def test_invalid_calls_raise_value_error_before_anything_is_sent(
    call: Callable[[Client], object], message: str
) -> None:
    target = f"127.0.0.1:{free_port()}"  # nothing listens: a send would fail differently
    with Client(target, sync_mode=True, max_batch_bytes=4096) as client:
        with pytest.raises(ValueError, match=message):
            call(client)
        assert client.failed == 0


def test_sync_mode_sends_in_the_calling_thread_and_raises_on_failure(
    ingestion: FakeIngestion,
) -> None:
    ingestion.failures = [Failure(grpc.StatusCode.INVALID_ARGUMENT)]
    with Client(ingestion.target, sync_mode=True) as client:
        with pytest.raises(grpc.RpcError):
            client.track("user-1", "Refused")
        client.track("user-1", "Accepted")
        assert len(ingestion.events) == 1  # already there when track() returned
        assert (client.accepted, client.failed) == (1, 1)


# -- the module-level default client ------------------------------------------------------------


def test_module_functions_use_a_default_client_from_the_module_settings(
    ingestion: FakeIngestion, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(profilemesh.client, "target", ingestion.target)
    monkeypatch.setattr(profilemesh.client, "source", "web")
    try:
        message_id = profilemesh.client.track("user-1", "Signed Up", {"plan": "free"})
        profilemesh.client.identify("user-1", {"email": "ada@example.com"})
        assert profilemesh.client.flush(timeout=5)
        assert profilemesh.client.default_client().accepted == 2
    finally:
        profilemesh.client.shutdown()
    assert [request.source for request in ingestion.requests] == ["web"]
    assert ingestion.events[0].message_id == message_id


def test_configure_replaces_the_default_client_and_flushes_the_old_one(
    ingestion: FakeIngestion, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(profilemesh.client, "target", ingestion.target)
    monkeypatch.setattr(profilemesh.client, "sync_mode", False)
    try:
        first = profilemesh.client.configure(flush_interval=60)
        profilemesh.client.track("user-1", "Queued")
        second = profilemesh.client.configure(sync_mode=True)
        assert second is not first
        assert len(ingestion.events) == 1  # the old client was flushed
        profilemesh.client.track("user-1", "Sent Now")
        assert len(ingestion.events) == 2
    finally:
        profilemesh.client.shutdown()


# -- against the real service --------------------------------------------------------------------


async def test_the_real_ingestion_service_accepts_a_thousand_events(tmp_path: Path) -> None:
    from profilemesh.services.runner import load_app
    from profilemesh.shared.server import create_server
    from profilemesh.shared.settings import Settings

    settings = Settings(data_dir=tmp_path)
    app = load_app("ingestion", settings)
    server, port = create_server(app.bindings, settings, port=0)
    await app.start()
    await server.start()
    target = f"127.0.0.1:{port}"
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = ingestion_service_pb2_grpc.IngestionServiceStub(channel)
            try:
                await stub.SendEvents(ingestion_service_pb2.SendEventsRequest(), timeout=5)
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                    pytest.skip("the ingestion service does not answer SendEvents yet")

        def send() -> Client:
            # The client blocks in flush(); the service runs on this test's event loop.
            with Client(target, source="sdk-test", flush_interval=0.05) as client:
                for n in range(1000):
                    client.track(f"user-{n % 50}", "Item Viewed", {"n": n})
                assert client.flush(timeout=30)
            return client

        client = await asyncio.to_thread(send)
        assert (client.sent, client.accepted, client.rejected, client.failed) == (1000, 1000, 0, 0)
    finally:
        await server.stop(0)
        await app.close()
