"""Erasing a person from ingestion, and keeping them out: purge and suppression over gRPC.

After a purge no file under ingestion's data directory holds the person's identifiers, in the
form the events carried them or normalised, while everyone else's events stay readable at the
same offsets. A suppressed person's later events are acknowledged but never stored.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from google.protobuf import struct_pb2

from profilemesh.common.v1 import identifier_pb2, job_pb2
from profilemesh.ingestion.v1 import (
    event_log_pb2,
    event_pb2,
    ingestion_service_pb2,
    ingestion_service_pb2_grpc,
    record_pb2,
    result_pb2,
)
from profilemesh.shared.channel import create_channel
from profilemesh.shared.log.api import RecordBatch
from profilemesh.shared.log.client import RemoteLog
from profilemesh.shared.log.consumer import LogConsumer
from profilemesh.shared.log.sqlite_store import SqliteConsumerStore
from profilemesh.shared.settings import Settings, StreamSettings
from tests.log_backends import APPLIED_SCHEMA
from tests.running_service import RunningIngestion

ACCEPTED = result_pb2.ITEM_STATUS_ACCEPTED
Stub = ingestion_service_pb2_grpc.IngestionServiceStub


@dataclass(frozen=True)
class Person:
    """How a person appears in events (raw) and in identity's normalised identifiers."""

    name: str
    email: str
    phone: str
    user_id: str
    anonymous_id: str
    device_id: str
    record_id: str
    normalised_email: str
    normalised_phone: str

    @property
    def identifiers(self) -> list[identifier_pb2.Identifier]:
        """What identity sends: normalised, typed."""
        return [
            identifier_pb2.Identifier(type=kind, value=value)
            for kind, value in (
                ("email", self.normalised_email),
                ("phone", self.normalised_phone),
                ("user_id", self.user_id),
                ("anonymous_id", self.anonymous_id),
                ("device_id", self.device_id),
                ("crm_id", f"crm:{self.record_id}"),
            )
        ]

    @property
    def raw_needles(self) -> list[bytes]:
        """Every identifier as the events carry it."""
        return [
            text.encode()
            for text in (
                self.email,
                self.phone,
                self.user_id,
                self.anonymous_id,
                self.device_id,
                self.record_id,
            )
        ]

    @property
    def needles(self) -> list[bytes]:
        """Every form of every identifier, raw and normalised, as a file could hold it."""
        return [*self.raw_needles, self.normalised_email.encode(), self.normalised_phone.encode()]


JANE = Person(
    "jane",
    "Jane.Doe@Example.COM",
    "+31 6 1234 5678",
    "user-jane-4411",
    "anon-jane-4411",
    "device-jane-4411",
    "jane-rec-4411",
    "jane.doe@example.com",
    "+31612345678",
)
BOB = Person(
    "bob",
    "Bob.Roe@Example.NET",
    "+44 20 7946 0018",
    "user-bob-5522",
    "anon-bob-5522",
    "device-bob-5522",
    "bob-rec-5522",
    "bob.roe@example.net",
    "+442079460018",
)


def events_of(person: Person, first: int, count: int) -> list[event_pb2.Event]:
    """An identify, then tracks and pages carrying the person's ids in various places."""
    events = []
    for n in range(first, first + count):
        if n % 4 == 0:
            event = event_pb2.Event(anonymous_id=person.anonymous_id)
            event.identify.traits.update(
                {"email": person.email, "phone": person.phone, "name": person.name.title()}
            )
        elif n % 4 == 1:
            event = event_pb2.Event(anonymous_id=person.anonymous_id)
            event.page.name = "Pricing"
            event.page.properties.update({"url": "https://shop.example/pricing", "n": n})
        else:
            event = event_pb2.Event(user_id=person.user_id)
            event.track.event = "Order Completed"
            event.track.properties.update({"revenue": n, "order_id": f"{person.name}-{n}"})
            event.context.device.id = person.device_id
        event.message_id = f"{person.name}-{n}"
        events.append(event)
    return events


def record_of(person: Person) -> record_pb2.CustomerRecord:
    record = record_pb2.CustomerRecord(
        source="crm",
        record_id=person.record_id,
        identifiers=[identifier_pb2.Identifier(type="email", value=person.email)],
    )
    record.attributes.update({"phone": person.phone, "first_name": person.name.title()})
    return record


@pytest.fixture
def settings(mesh_settings: Settings) -> Settings:
    # Two partitions; closed segments are archived as soon as maintenance runs (the test runs
    # it itself).
    streams = StreamSettings(partitions=2, archive_after_hours=0, maintenance_interval_seconds=3600)
    return mesh_settings.model_copy(update={"streams": streams})


@pytest.fixture
async def service(settings: Settings) -> AsyncIterator[RunningIngestion]:
    running = await RunningIngestion(settings).start()
    yield running
    if running.server is not None:
        await running.stop()


@pytest.fixture
async def stub(service: RunningIngestion, settings: Settings) -> AsyncIterator[Stub]:
    async with create_channel(service.target, settings) as channel:
        yield ingestion_service_pb2_grpc.IngestionServiceStub(channel)


def data_dir(settings: Settings) -> Path:
    return settings.service_data_dir("ingestion")


def files_containing(directory: Path, needle: bytes) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file() and needle in p.read_bytes()]


async def send(stub: Stub, events: list[event_pb2.Event]) -> None:
    for start in range(0, len(events), 100):
        response = await stub.SendEvents(
            ingestion_service_pb2.SendEventsRequest(events=events[start : start + 100])
        )
        assert response.accepted_count == len(events[start : start + 100])


async def stored_items(service: RunningIngestion) -> list[event_log_pb2.IngestedItem]:
    items = []
    for partition in await service.log.offsets():
        async for batch in service.log.subscribe(partition.partition, 0, stop_at_end=True):
            for run in batch.without_redacted():
                items.extend(event_log_pb2.IngestedItem.FromString(p) for p in run.payload_list())
    return items


async def wait_for_run(stub: Stub, run_id: str) -> None:
    async with asyncio.timeout(20):
        while True:
            response = await stub.GetSourceRun(
                ingestion_service_pb2.GetSourceRunRequest(run_id=run_id)
            )
            if response.run.state not in (job_pb2.JOB_STATE_PENDING, job_pb2.JOB_STATE_RUNNING):
                return
            await asyncio.sleep(0.02)


async def run_inline_source(stub: Stub, items: list[dict[str, object]]) -> None:
    config = struct_pb2.Struct()
    config.update({"items": items})
    started = await stub.StartSourceRun(
        ingestion_service_pb2.StartSourceRunRequest(connector="inline", source="app", config=config)
    )
    await wait_for_run(stub, started.run.run_id)


async def test_a_purge_leaves_no_trace_of_the_person_and_everyone_else_intact(
    service: RunningIngestion, stub: Stub, settings: Settings
) -> None:
    service.log.segment_bytes = 4096  # small segments, so that some of them get archived
    await send(stub, events_of(JANE, 0, 40) + events_of(BOB, 0, 40))
    await stub.ImportRecords(
        ingestion_service_pb2.ImportRecordsRequest(records=[record_of(JANE), record_of(BOB)])
    )
    assert await asyncio.to_thread(service.log.maintain) > 0
    await send(stub, events_of(JANE, 40, 40) + events_of(BOB, 40, 40))
    # A source run whose rejection reason quotes Jane's address, and whose inline config holds
    # her identify event.
    await run_inline_source(
        stub,
        [
            {"type": "track", "userId": BOB.user_id, "event": {"email": JANE.email}},
            {"type": "identify", "anonymousId": JANE.anonymous_id, "traits": {"x": 1}},
        ],
    )
    parts = service.log._parts
    assert any(part.archived for part in parts) and any(part.closed for part in parts)
    offsets = await service.log.offsets()
    bob_before = [i for i in await stored_items(service) if JANE.name not in str(i).lower()]
    for needle in JANE.raw_needles:
        assert files_containing(data_dir(settings), needle), needle  # there to be found

    response = await stub.PurgeIdentifiers(
        ingestion_service_pb2.PurgeIdentifiersRequest(job_id="job-1", identifiers=JANE.identifiers)
    )

    assert response.purged_count == 80 + 1 + 1  # her events, her record, the inline identify
    assert response.scrubbed_source_run_count == 1
    for needle in JANE.needles:
        assert files_containing(data_dir(settings), needle) == [], needle
    assert await service.log.offsets() == offsets
    assert await stored_items(service) == bob_before
    for needle in BOB.raw_needles:
        assert files_containing(data_dir(settings), needle), needle

    # A subscriber over gRPC reads Bob's items and nothing of Jane's, and gets to the end.
    store = SqliteConsumerStore(data_dir(settings).parent / "subscriber.sqlite3")
    store.schema(APPLIED_SCHEMA)
    seen: list[bytes] = []

    def handler(tx: sqlite3.Connection, batch: RecordBatch) -> None:
        seen.extend(batch.payload_list())

    remote = RemoteLog(service.target, "events", settings)
    consumer = LogConsumer("subscriber", remote, store, handler)
    await consumer.run_until_caught_up()
    assert [event_log_pb2.IngestedItem.FromString(p) for p in seen if p] == bob_before
    assert all(seen)  # no empty payload reached the handler
    assert await consumer.lag() == {0: 0, 1: 0}
    await remote.close()
    store.close()

    # A retry (after a crash, say) finds nothing left and answers the same way.
    again = await stub.PurgeIdentifiers(
        ingestion_service_pb2.PurgeIdentifiersRequest(job_id="job-1", identifiers=JANE.identifiers)
    )
    assert (again.purged_count, again.scrubbed_source_run_count) == (0, 0)
    await service.restart()
    assert await service.log.offsets() == offsets
    assert await stored_items(service) == bob_before


async def test_a_suppressed_person_is_acknowledged_but_not_stored_and_counted(
    service: RunningIngestion, stub: Stub, settings: Settings
) -> None:
    suppressed = await stub.SuppressIdentifiers(
        ingestion_service_pb2.SuppressIdentifiersRequest(
            identifiers=[identifier_pb2.Identifier(type="email", value=JANE.normalised_email)],
            reason=f"erasure request from {JANE.email}",
        )
    )
    assert suppressed.added_count == 1
    event = event_pb2.Event(anonymous_id="anon-new", message_id="m-1")
    event.identify.traits.update({"email": " JANE.DOE@example.com"})

    response = await stub.SendEvent(ingestion_service_pb2.SendEventRequest(event=event))

    assert response.result.status == ACCEPTED
    assert await stored_items(service) == []
    stats = await stub.GetSuppressionStats(ingestion_service_pb2.GetSuppressionStatsRequest())
    assert (stats.suppressed_count, stats.dropped_count) == (1, 1)
    for needle in JANE.needles:  # not even the reason keeps her address
        assert files_containing(data_dir(settings), needle) == [], needle

    await service.restart()
    async with create_channel(service.target, settings) as channel:
        stub = ingestion_service_pb2_grpc.IngestionServiceStub(channel)
        stats = await stub.GetSuppressionStats(ingestion_service_pb2.GetSuppressionStatsRequest())
        assert (stats.suppressed_count, stats.dropped_count) == (1, 1)
        retry = await stub.SendEvent(ingestion_service_pb2.SendEventRequest(event=event))
        assert retry.result.status == result_pb2.ITEM_STATUS_DUPLICATE  # as for a stored one

        removed = await stub.UnsuppressIdentifiers(
            ingestion_service_pb2.UnsuppressIdentifiersRequest(
                identifiers=[identifier_pb2.Identifier(type="email", value=JANE.normalised_email)]
            )
        )
        assert removed.removed_count == 1
        event.message_id = "m-2"
        accepted = await stub.SendEvent(ingestion_service_pb2.SendEventRequest(event=event))
        assert accepted.result.status == ACCEPTED
        [stored] = await stored_items(service)
        assert stored.event.identify.traits["email"] == " JANE.DOE@example.com"
        stats = await stub.GetSuppressionStats(ingestion_service_pb2.GetSuppressionStatsRequest())
        assert (stats.suppressed_count, stats.dropped_count) == (0, 1)


async def test_records_and_source_runs_of_a_suppressed_person_are_dropped_too(
    service: RunningIngestion, stub: Stub, settings: Settings
) -> None:
    await stub.SuppressIdentifiers(
        ingestion_service_pb2.SuppressIdentifiersRequest(
            identifiers=[identifier_pb2.Identifier(type="phone", value=JANE.normalised_phone)]
        )
    )
    imported = await stub.ImportRecords(
        ingestion_service_pb2.ImportRecordsRequest(records=[record_of(JANE), record_of(BOB)])
    )
    assert [r.status for r in imported.results] == [ACCEPTED, ACCEPTED]
    await run_inline_source(
        stub,
        [
            {"type": "identify", "userId": "someone", "traits": {"mobile": "0031 6 1234 5678"}},
            {"type": "identify", "userId": BOB.user_id, "traits": {"phone": BOB.phone}},
        ],
    )

    stored = await stored_items(service)
    assert sorted(i.WhichOneof("item") for i in stored) == ["event", "record"]
    assert all(JANE.phone not in str(i) for i in stored)
    stats = await stub.GetSuppressionStats(ingestion_service_pb2.GetSuppressionStatsRequest())
    assert stats.dropped_count == 2
    assert files_containing(data_dir(settings), b"0031 6 1234 5678") == []  # nor the run's config


async def test_bad_requests_name_the_field(stub: Stub) -> None:
    import grpc

    with pytest.raises(grpc.aio.AioRpcError) as empty:
        await stub.SuppressIdentifiers(ingestion_service_pb2.SuppressIdentifiersRequest())
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as blank:
        await stub.PurgeIdentifiers(
            ingestion_service_pb2.PurgeIdentifiersRequest(
                job_id="j", identifiers=[identifier_pb2.Identifier(type="email", value=" ")]
            )
        )
    assert "identifiers[0].value" in (blank.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as no_job:
        await stub.PurgeIdentifiers(
            ingestion_service_pb2.PurgeIdentifiersRequest(identifiers=JANE.identifiers)
        )
    assert "job_id" in (no_job.value.details() or "")
