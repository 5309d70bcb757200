"""Observability of the whole mesh: one trace follows an event from ingestion's RPC through every
log to the webhook delivery, and the services report RPC durations, consumer lag, applied
records and deliveries as metrics, in memory and as Prometheus text on ``metrics_port``."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricsData, NumberDataPoint
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from profilemesh.activation.v1 import activation_service_pb2 as activation_pb2
from profilemesh.activation.v1 import activation_service_pb2_grpc, segment_pb2
from profilemesh.ingestion.v1 import event_pb2, ingestion_service_pb2, ingestion_service_pb2_grpc
from profilemesh.shared.channel import create_channel
from profilemesh.shared.log.consumer import LogConsumer
from profilemesh.shared.log.embedded import EmbeddedLog
from profilemesh.shared.log.outbox import Outbox
from profilemesh.shared.log.sqlite_store import SqliteConsumerStore
from profilemesh.shared.metrics import configure_metrics
from profilemesh.shared.settings import SERVICE_NAMES, Settings
from profilemesh.shared.telemetry import linked_context, restored_trace_context
from tests.conftest import free_port
from tests.receivers import SECRET, WebhookReceiver, eventually
from tests.running_service import RunningIngestion, RunningService

INGESTION = "profilemesh.ingestion.v1.IngestionService"
ACTIVATION = "profilemesh.activation.v1.ActivationService"


@dataclass
class CapturedMetrics:
    """The metrics of this test process: read in memory, and served on ``port``."""

    reader: InMemoryMetricReader
    port: int

    async def collect(self) -> MetricsData:
        # Collected in a worker thread, as a Prometheus scrape is: consumer lag is asked of
        # the event loop the services run on.
        data: MetricsData = await asyncio.to_thread(self.reader.get_metrics_data)
        return data


_CAPTURED: CapturedMetrics | None = None


@pytest.fixture
def captured_metrics() -> CapturedMetrics:
    """Metrics as ``profilemesh serve`` sets them up when ``metrics_port`` is set, plus an
    in-memory reader. One meter provider per process: installed once, values cumulative."""
    global _CAPTURED
    if _CAPTURED is None:
        reader = InMemoryMetricReader()
        port = free_port()
        configure_metrics(Settings(metrics_port=port), "tests", readers=[reader])
        _CAPTURED = CapturedMetrics(reader, port)
    return _CAPTURED


@pytest.fixture
async def mesh(mesh_settings: Settings) -> AsyncIterator[list[RunningService]]:
    services = [
        RunningIngestion(mesh_settings, port=mesh_settings.services.ingestion.port),
        *(
            RunningService(mesh_settings, name, mesh_settings.services.of(name).port)
            for name in ("identity", "features", "scoring", "activation")
        ),
    ]
    for service in services:
        await service.start()
    yield services
    for service in reversed(services):
        if service.server is not None:
            await service.stop()


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver().start()
    yield receiver
    receiver.stop()


async def subscribe_webhook(settings: Settings, webhook: WebhookReceiver) -> None:
    """Buyers who agreed to email enter a segment; a webhook destination is told."""
    async with create_channel(settings.services.activation.target, settings) as channel:
        activation = activation_service_pb2_grpc.ActivationServiceStub(channel)
        await activation.CreateSegment(
            activation_pb2.CreateSegmentRequest(
                segment=segment_pb2.Segment(
                    segment_id="buyers",
                    name="Buyers",
                    expression="features.orders_lifetime >= 1 and consent.email",
                )
            )
        )
        hook = segment_pb2.Destination(
            name="CRM webhook",
            activator="webhook",
            segment_id="buyers",
            triggers=[segment_pb2.DELIVERY_TRIGGER_ENTERED],
            consent_purpose="email",
            mappings=[segment_pb2.FieldMapping(source="traits.first_name", target="first_name")],
        )
        hook.config.update({"url": webhook.url, "secret": SECRET, "timeout_seconds": 2})
        await activation.CreateDestination(
            activation_pb2.CreateDestinationRequest(destination=hook)
        )


def identify_and_order(user: str) -> list[event_pb2.Event]:
    identify = event_pb2.Event(user_id=user)
    identify.identify.traits.update(
        {"email": f"{user}@example.com", "first_name": "Ann", "consent": {"email": True}}
    )
    order = event_pb2.Event(user_id=user)
    order.track.event = "Order Completed"
    order.track.properties.update({"revenue": 40.0})
    return [identify, order]


async def send_events(settings: Settings, events: Sequence[event_pb2.Event]) -> None:
    async with create_channel(settings.services.ingestion.target, settings) as channel:
        response = await ingestion_service_pb2_grpc.IngestionServiceStub(channel).SendEvents(
            ingestion_service_pb2.SendEventsRequest(events=events)
        )
    assert response.accepted_count == len(events)


def delivered_to(webhook: WebhookReceiver, first_name: str) -> bool:
    return any(p.get("fields", {}).get("first_name") == first_name for p in webhook.payloads())


# -- traces -------------------------------------------------------------------------------------


async def test_one_trace_follows_an_event_from_ingestion_to_its_delivery(
    spans: InMemorySpanExporter,
    mesh: list[RunningService],
    mesh_settings: Settings,
    webhook: WebhookReceiver,
) -> None:
    await subscribe_webhook(mesh_settings, webhook)
    with trace.get_tracer("test").start_as_current_span("customer app") as root:
        await send_events(mesh_settings, identify_and_order("u-ann"))
    await eventually(lambda: delivered_to(webhook, "Ann"), 60, "the webhook delivery")

    trace_id = root.get_span_context().trace_id

    def in_trace() -> list[ReadableSpan]:
        return [s for s in spans.get_finished_spans() if s.context.trace_id == trace_id]

    await eventually(
        lambda: any(s.name == "deliver webhook" for s in in_trace()), 10, "the delivery span"
    )
    found = in_trace()

    def consumed(stream: str, consumer: str) -> list[ReadableSpan]:
        return [
            s
            for s in found
            if s.name == f"consume {stream}"
            and s.attributes is not None
            and s.attributes["messaging.consumer.group.name"] == consumer
        ]

    def ids(chosen: list[ReadableSpan]) -> set[int]:
        return {s.context.span_id for s in chosen}

    [ingestion] = [
        s for s in found if s.name == f"/{INGESTION}/SendEvents" and s.kind is SpanKind.SERVER
    ]

    # identity applies ingestion's events: its span continues the RPC's trace.
    identity = consumed("events", "identity")
    assert identity
    for span in identity:
        assert span.kind is SpanKind.CONSUMER
        assert span.parent is not None and span.parent.span_id == ingestion.context.span_id
        # Linked to every producer of its batch: here, the one RPC.
        assert [link.context.span_id for link in span.links] == [ingestion.context.span_id]
        attributes = span.attributes or {}
        assert attributes["messaging.system"] == "profilemesh"
        assert attributes["messaging.destination.name"] == "events"
        assert attributes["messaging.operation.type"] == "process"
        batch_size = attributes["messaging.batch.message_count"]
        assert isinstance(batch_size, int) and batch_size >= 1
        first = attributes["messaging.profilemesh.first_offset"]
        last = attributes["messaging.profilemesh.last_offset"]
        assert isinstance(first, int) and isinstance(last, int)
        assert last - first + 1 == batch_size
        assert "messaging.destination.partition.id" in attributes

    # features applies identity's resolutions, published through identity's outbox by a
    # background task: the context is still the consumer span that queued them.
    features = consumed("resolutions", "features")
    assert features
    assert all(s.parent is not None and s.parent.span_id in ids(identity) for s in features)

    # scoring and activation both follow features' changes.
    scoring = consumed("feature-changes", "scoring")
    assert scoring
    assert all(s.parent is not None and s.parent.span_id in ids(features) for s in scoring)
    activation = [
        *consumed("resolutions", "activation-resolutions"),
        *consumed("feature-changes", "activation-feature-changes"),
    ]
    assert activation
    assert all(
        s.parent is not None and s.parent.span_id in ids(identity) | ids(features)
        for s in activation
    )

    # The delivery: queued by one of activation's batches, sent later by the delivery worker.
    [deliver] = [s for s in found if s.name == "deliver webhook"]
    assert deliver.kind is SpanKind.CLIENT
    assert deliver.parent is not None and deliver.parent.span_id in ids(activation)
    assert [link.context.span_id for link in deliver.links] == [deliver.parent.span_id]
    assert (deliver.attributes or {})["profilemesh.activator"] == "webhook"


async def test_a_batch_continues_its_first_producers_trace_and_links_every_producer(
    spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    log = await EmbeddedLog.open(tmp_path / "log", "s", partitions=1)
    producer = SqliteConsumerStore(tmp_path / "producer.sqlite")
    outbox = Outbox(producer, log)
    tracer = trace.get_tracer("test")
    # Two transactions in two traces queue a message each; a background task publishes both
    # in one append, in a span of its own that must not become the messages' producer.
    with tracer.start_as_current_span("first producer") as first, producer.transaction() as tx:
        outbox.put(tx, [("k", b"1")])
    with tracer.start_as_current_span("second producer") as second, producer.transaction() as tx:
        outbox.put(tx, [("k", b"2")])
    with tracer.start_as_current_span("publisher"):
        assert await outbox.publish_pending() == 2
    state = SqliteConsumerStore(tmp_path / "state.sqlite")
    consumer: LogConsumer[Any] = LogConsumer("c", log, state, lambda tx, batch: None)
    await consumer.run_until_caught_up()
    state.close()
    producer.close()
    await log.close()

    [span] = [s for s in spans.get_finished_spans() if s.name == "consume s"]
    assert span.parent is not None
    assert span.parent.span_id == first.get_span_context().span_id
    assert span.context.trace_id == first.get_span_context().trace_id
    assert [link.context.span_id for link in span.links] == [
        first.get_span_context().span_id,
        second.get_span_context().span_id,
    ]
    assert (span.attributes or {})["messaging.batch.message_count"] == 2


async def test_an_outbox_made_before_trace_contexts_were_kept_still_publishes(
    tmp_path: Path,
) -> None:
    with sqlite3.connect(tmp_path / "old.sqlite") as old:
        old.execute(
            "CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
            " partition INTEGER NOT NULL, key TEXT NOT NULL, payload BLOB NOT NULL)"
        )
        old.execute("INSERT INTO outbox (partition, key, payload) VALUES (0, 'k', x'01')")
    old.close()
    log = await EmbeddedLog.open(tmp_path / "log", "s", partitions=1)
    store = SqliteConsumerStore(tmp_path / "old.sqlite")
    outbox = Outbox(store, log)
    with store.transaction() as tx:
        outbox.put(tx, [("k", b"\x02")])
    assert await outbox.publish_pending() == 2
    [batch] = await log.read(0, 0)
    store.close()
    await log.close()
    assert batch.payload_list() == [b"\x01", b"\x02"]


async def test_an_activation_store_made_before_deliveries_kept_their_trace_still_queues(
    spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    from profilemesh.services.activation import deliveries
    from profilemesh.services.activation import store as activation_store

    old_schema = activation_store.SCHEMA.replace(",\n    trace_context TEXT\n", "\n")
    assert "trace_context" not in old_schema
    with sqlite3.connect(tmp_path / "activation.sqlite") as old:
        old.executescript(old_schema)
    old.close()
    store = SqliteConsumerStore(tmp_path / "activation.sqlite")
    activation_store.prepare(store)
    destination = segment_pb2.Destination(destination_id="d", segment_id="s", activator="webhook")
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("daily sync") as sync, store.transaction() as tx:
        assert deliveries.queue_sync(tx, destination, ["p-1"], lambda _: None, day=1) == 1
    [(kept,)] = store.read(lambda c: c.execute("SELECT trace_context FROM deliveries").fetchall())
    store.close()
    assert kept is not None
    carried = trace.get_current_span(linked_context(restored_trace_context(kept)))
    assert carried.get_span_context().span_id == sync.get_span_context().span_id


# -- metrics ------------------------------------------------------------------------------------


def points(data: MetricsData, name: str) -> list[NumberDataPoint | Any]:
    return [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == name
        for point in metric.data.data_points
    ]


async def test_services_measure_calls_lag_applied_records_and_deliveries(
    captured_metrics: CapturedMetrics,
    mesh: list[RunningService],
    mesh_settings: Settings,
    webhook: WebhookReceiver,
) -> None:
    await subscribe_webhook(mesh_settings, webhook)
    await send_events(mesh_settings, identify_and_order("u-bo"))
    async with create_channel(mesh_settings.services.activation.target, mesh_settings) as channel:
        with pytest.raises(grpc.aio.AioRpcError):  # a typo: an error, counted as such
            await activation_service_pb2_grpc.ActivationServiceStub(channel).CreateSegment(
                activation_pb2.CreateSegmentRequest(
                    segment=segment_pb2.Segment(name="Typo", expression="features.orderz >= 1")
                )
            )
    await eventually(lambda: webhook.payloads() != [], 60, "the webhook delivery")
    data = await captured_metrics.collect()

    calls = {
        (a["rpc.service"], a["rpc.method"], a["rpc.grpc.status_code"]): p
        for p in points(data, "rpc.server.duration")
        if (a := p.attributes) is not None
    }
    assert calls[(INGESTION, "SendEvents", grpc.StatusCode.OK.value[0])].count >= 1
    assert calls[(ACTIVATION, "CreateSegment", grpc.StatusCode.OK.value[0])].count >= 1
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert calls[(ACTIVATION, "CreateSegment", invalid)].count >= 1
    assert all(p.attributes["rpc.system"] == "grpc" for p in calls.values())
    assert not any(service.startswith("grpc.health") for service, _, _ in calls)

    lag = {
        (p.attributes["consumer"], p.attributes["stream"], p.attributes["partition"])
        for p in points(data, "profilemesh.consumer.lag")
    }
    partitions = mesh_settings.streams.partitions
    for consumer, stream in (
        ("identity", "events"),
        ("features", "resolutions"),
        ("scoring", "feature-changes"),
        ("activation-resolutions", "resolutions"),
        ("activation-feature-changes", "feature-changes"),
        ("activation-score-changes", "score-changes"),
    ):
        assert {(consumer, stream, p) for p in range(partitions)} <= lag, consumer

    applied = {
        p.attributes["messaging.consumer.group.name"]: p.value
        for p in points(data, "messaging.client.consumed.messages")
        if p.attributes["messaging.destination.name"] == "events"
    }
    assert applied["identity"] >= 2

    deliveries = {
        (p.attributes["activator"], p.attributes["outcome"]): p.value
        for p in points(data, "profilemesh.deliveries")
    }
    assert deliveries[("webhook", "delivered")] >= 1


async def test_metrics_are_served_as_prometheus_text_on_the_metrics_port(
    captured_metrics: CapturedMetrics,
    mesh: list[RunningService],
    mesh_settings: Settings,
    webhook: WebhookReceiver,
) -> None:
    await subscribe_webhook(mesh_settings, webhook)
    await send_events(mesh_settings, identify_and_order("u-cy"))
    await eventually(lambda: webhook.payloads() != [], 60, "the webhook delivery")

    text = await asyncio.to_thread(scrape, captured_metrics.port)
    assert "rpc_server_duration_milliseconds_bucket{" in text
    assert 'rpc_method="SendEvents"' in text
    assert 'profilemesh_consumer_lag{consumer="identity"' in text
    assert "messaging_client_consumed_messages_total{" in text
    assert "messaging_process_duration_seconds_bucket{" in text
    assert 'profilemesh_deliveries_total{activator="webhook"' in text
    assert 'outcome="delivered"' in text


def test_profilemesh_up_gives_every_service_a_metrics_port_of_its_own() -> None:
    from profilemesh.services.mesh import Mesh

    ports = [
        Mesh(Settings(metrics_port=9400))._metrics_port_of(name)["PROFILEMESH_METRICS_PORT"]
        for name in SERVICE_NAMES
    ]
    assert ports == ["9400", "9401", "9402", "9403", "9404"]
    assert Mesh(Settings())._metrics_port_of("identity") == {}


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body: bytes = response.read()
    return body.decode()


async def test_profilemesh_serve_exposes_metrics_when_metrics_port_is_set(
    mesh_settings: Settings, mesh_env: dict[str, str]
) -> None:
    from bench.harness import wait_serving

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "profilemesh.services.cli", "serve", "ingestion"],
        env={**mesh_env, "PROFILEMESH_METRICS_PORT": str(port), "PROFILEMESH_LOG_LEVEL": "WARNING"},
    )
    try:
        await wait_serving(mesh_settings.services.ingestion.target, process)
        await send_events(mesh_settings, identify_and_order("u-di"))
        text = await asyncio.to_thread(scrape, port)
    finally:
        process.terminate()
        process.wait(timeout=20)
    assert "rpc_server_duration_milliseconds_count{" in text
    assert 'rpc_method="SendEvents"' in text
    assert 'service_name="profilemesh-ingestion"' in text  # target_info: who is speaking
