"""What the NATS JetStream log does beyond the contract every backend passes
(``test_log_contract``): redaction by deletion with offsets kept, a fixed partition count,
retention, surviving lost consumers and server restarts, and how services open it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import nats
import pytest

from profilemesh.shared.errors import InvalidArgument, NotFound
from profilemesh.shared.log.api import REDACTED_HEADER, LogRecord, RecordBatch
from profilemesh.shared.log.consumer import LogConsumer
from profilemesh.shared.log.hosting import HostedLog, open_service_log, remote_log
from profilemesh.shared.log.nats_log import NatsLog, NatsLogReader, stream_name
from profilemesh.shared.log.sqlite_store import SqliteConsumerStore
from profilemesh.shared.settings import NatsSettings, Settings, StreamSettings
from tests.log_backends import APPLIED_SCHEMA, applied_counts, count_applied
from tests.nats_server import NatsServer, running_nats

TIMEOUT = 20.0
SECRET = b"alice@example.org"


@pytest.fixture
def server() -> Iterator[NatsServer]:
    with running_nats() as server:
        yield server


@pytest.fixture
async def log(server: NatsServer) -> AsyncIterator[NatsLog]:
    log = await NatsLog.open(server.url, "events", partitions=1, prefix="t", idle_seconds=0.3)
    yield log
    await log.close()


def payload(person: str, seq: int) -> bytes:
    contact = SECRET if person == "alice" else b"bob@example.org"
    return b"%s:%d:%s" % (person.encode(), seq, contact)


async def fill(log: NatsLog, people: Sequence[str], first: int, count: int) -> None:
    """One append per record, cycling through ``people``."""
    for seq in range(first, first + count):
        person = people[seq % len(people)]
        await log.append_batch([(person, payload(person, seq))], {"traceparent": "00-ab-cd-01"})


def mentions_secret(partition: int, batch: RecordBatch) -> list[bool]:
    return [SECRET in record.payload for record in batch]


async def every_record(log: NatsLog, partition: int = 0, from_offset: int = 0) -> list[LogRecord]:
    async with asyncio.timeout(TIMEOUT):
        return [
            record
            async for batch in log.subscribe(partition, from_offset, stop_at_end=True)
            for record in batch
        ]


def is_redacted(record: LogRecord) -> bool:
    return record.headers.get(REDACTED_HEADER) == "1"


# -- redaction --------------------------------------------------------------------------------


async def test_redacted_records_keep_their_offsets_wherever_they_are(log: NatsLog) -> None:
    # alice's records come first, in the middle and last: a leading run, gaps and a tail.
    people = ["alice", "alice", "bob", "alice", "bob", "bob"]
    await fill(log, people, 0, 30)
    await fill(log, ["alice"], 30, 3)
    before = await log.offsets()

    erased = await log.redact(mentions_secret)

    assert erased == 5 * 3 + 3
    assert await log.offsets() == before  # the first offsets are not "expired"
    records = await every_record(log)
    assert [record.offset for record in records] == list(range(33))
    for seq, record in enumerate(records):
        if seq >= 30 or people[seq % 6] == "alice":
            assert is_redacted(record)
            assert (record.key, record.payload) == ("", b"")
        else:
            assert record.payload == payload("bob", seq)
            assert not is_redacted(record)
    assert await log.redact(mentions_secret) == 0  # nothing left to erase

    # Reading from inside the leading run or the gaps works as from anywhere.
    assert [r.offset for r in await every_record(log, 0, 1)] == list(range(1, 33))
    assert [r.offset for r in await every_record(log, 0, 31)] == [31, 32]


async def test_redacted_bytes_are_gone_from_the_server(log: NatsLog, server: NatsServer) -> None:
    await fill(log, ["alice", "bob"], 0, 40)
    await log.redact(mentions_secret)
    await log.close()
    server.stop()  # its files are complete once it has stopped
    store = server.directory / "store"
    assert not any(SECRET in path.read_bytes() for path in store.rglob("*") if path.is_file())
    assert any(b"bob@example.org" in path.read_bytes() for path in store.rglob("*.blk"))
    server.start()


async def test_a_consumer_skips_redacted_records_and_moves_past_them(
    log: NatsLog, tmp_path: Path
) -> None:
    await fill(log, ["alice", "bob", "alice"], 0, 30)
    await log.redact(mentions_secret)
    store = SqliteConsumerStore(tmp_path / "consumer.sqlite3")
    store.schema(APPLIED_SCHEMA)
    try:
        async with asyncio.timeout(TIMEOUT):
            await LogConsumer("counter", log, store, count_applied).run_until_caught_up()
        assert applied_counts(store) == {(0, seq): 1 for seq in range(30) if seq % 3 == 1}
        assert store.committed("counter", "events") == {0: 30}
    finally:
        store.close()


async def test_a_following_subscription_reads_past_redacted_last_records(log: NatsLog) -> None:
    await fill(log, ["bob"], 0, 3)
    await fill(log, ["alice"], 3, 2)
    await log.redact(mentions_secret)  # the log now ends with records that are not stored
    received: list[LogRecord] = []

    async def follow() -> None:
        async for batch in log.subscribe(0, 1):
            received.extend(batch)

    follower = asyncio.create_task(follow())
    try:
        async with asyncio.timeout(TIMEOUT):  # without waiting for another append
            while len(received) < 4:
                await asyncio.sleep(0.01)
        await fill(log, ["bob"], 5, 2)
        async with asyncio.timeout(TIMEOUT):
            while len(received) < 6:
                await asyncio.sleep(0.01)
    finally:
        follower.cancel()
    assert [record.offset for record in received] == list(range(1, 7))
    assert [is_redacted(record) for record in received] == [False, False, True, True, False, False]


# -- layout and retention ---------------------------------------------------------------------


async def test_the_partition_count_is_fixed_at_creation(server: NatsServer) -> None:
    log = await NatsLog.open(server.url, "events", partitions=4, payload_type="type/x")
    try:
        with pytest.raises(ValueError, match="4 partitions"):
            await NatsLog.open(server.url, "events", partitions=8)
        reader = await NatsLog.open(server.url, "events", configure=False)
        assert (reader.partitions, reader.payload_type) == (4, "type/x")
        await reader.close()
        with pytest.raises(NotFound):
            await NatsLog.open(server.url, "missing")
    finally:
        await log.close()


async def test_the_producer_sets_retention_and_readers_leave_it(server: NatsServer) -> None:
    async def max_age() -> float:
        connection = await nats.connect(server.url)
        try:
            info = await connection.jetstream().stream_info(stream_name("profilemesh", "s", 1))
        finally:
            await connection.close()
        assert info.config.max_age is not None
        return info.config.max_age

    log = await NatsLog.open(server.url, "s", partitions=2, max_age_seconds=3600)
    await log.close()
    assert await max_age() == 3600
    log = await NatsLog.open(server.url, "s", partitions=2, max_age_seconds=60, configure=False)
    await log.close()
    assert await max_age() == 3600
    log = await NatsLog.open(server.url, "s", partitions=2, max_age_seconds=7200)
    await log.close()
    assert await max_age() == 7200


async def test_a_record_the_server_cannot_take_is_refused_before_anything_is_stored(
    log: NatsLog,
) -> None:
    too_large = b"x" * (9 * 1024 * 1024)  # the test server takes up to 8 MiB
    with pytest.raises(InvalidArgument, match="max_payload"):
        await log.append_batch([("a", b"small"), ("b", too_large)])
    assert [(r.first, r.next) for r in await log.offsets()] == [(0, 0)]


# -- failures ---------------------------------------------------------------------------------


async def test_a_subscription_goes_on_when_its_consumer_is_removed(
    log: NatsLog, server: NatsServer
) -> None:
    await fill(log, ["bob"], 0, 5)
    received: list[LogRecord] = []

    async def follow() -> None:
        async for batch in log.subscribe(0, 0, max_records=2):
            received.extend(batch)

    follower = asyncio.create_task(follow())
    connection = await nats.connect(server.url)
    try:
        async with asyncio.timeout(TIMEOUT):
            while len(received) < 5:
                await asyncio.sleep(0.01)
        # As the server does with a consumer nobody pulled from for a while.
        stream = stream_name("t", "events", 0)
        names = await connection.request(f"$JS.API.CONSUMER.NAMES.{stream}", b"")
        for name in json.loads(names.data)["consumers"]:
            await connection.jetstream().delete_consumer(stream, name)
        await fill(log, ["bob"], 5, 5)
        async with asyncio.timeout(TIMEOUT):
            while len(received) < 10:
                await asyncio.sleep(0.01)
    finally:
        follower.cancel()
        await connection.close()
    assert [record.offset for record in received] == list(range(10))


async def test_appends_and_subscriptions_resume_after_the_server_restarts(
    log: NatsLog, server: NatsServer
) -> None:
    await fill(log, ["bob"], 0, 5)
    received: list[LogRecord] = []

    async def follow() -> None:
        async for batch in log.subscribe(0, 0):
            received.extend(batch)

    follower = asyncio.create_task(follow())
    try:
        async with asyncio.timeout(TIMEOUT):
            while len(received) < 5:
                await asyncio.sleep(0.01)
        server.stop(kill=True)
        server.start()
        async with asyncio.timeout(TIMEOUT):
            while True:  # appends fail while the client reconnects
                try:
                    await fill(log, ["bob"], 5, 5)
                    break
                except Exception:
                    await asyncio.sleep(0.2)
            while len(received) < 10:
                await asyncio.sleep(0.01)
        assert not follower.done()
    finally:
        follower.cancel()
    assert [record.offset for record in received] == list(range(10))
    assert [int(record.payload.split(b":")[1]) for record in received] == list(range(10))


# -- how services open it ---------------------------------------------------------------------


async def test_on_the_scale_out_backend_services_append_and_read_in_nats(
    server: NatsServer, tmp_path: Path
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        backend="postgres",
        nats=NatsSettings(url=server.url, stream_prefix="mesh"),
        streams=StreamSettings(partitions=3),
    )
    hosted = HostedLog(settings, "identity")
    await hosted.open()
    reader = remote_log(settings, "identity")
    try:
        assert isinstance(hosted.log, NatsLog)
        assert (hosted.log.stream, hosted.log.partitions) == ("resolutions", 3)
        assert hosted.servicer.logs == {}  # served by NATS, not by the service
        assert not (tmp_path / "identity").exists()  # nothing on local disk
        await hosted.log.append_batch([(f"profile-{i}", b"entry %d" % i) for i in range(30)])

        assert isinstance(reader, NatsLogReader)  # no gRPC hop to the identity service
        ranges = await reader.offsets()
        assert sum(r.next for r in ranges) == 30
        read = [
            record
            for r in ranges
            async for batch in reader.subscribe(r.partition, 0, stop_at_end=True)
            for record in batch
        ]
        assert sorted(record.payload for record in read) == sorted(
            b"entry %d" % i for i in range(30)
        )
        # The event log (the source of truth) is kept whole; derived logs expire.
        events = await open_service_log(settings, "ingestion")
        assert events.max_age_ns == 0 and hosted.log.max_age_ns == 168 * 3600 * 10**9
        await events.close()
    finally:
        await reader.close()
        await hosted.close()
