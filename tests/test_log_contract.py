"""The log contract: what every Log backend guarantees, and what a consumer built on it gets.

Every test runs against each backend in ``tests.log_backends.BACKENDS``, and every consumer
test against each consumer-store backend too (``tests.store_backends``).
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from profilemesh.shared.errors import Unavailable
from profilemesh.shared.log.api import (
    Log,
    LogReader,
    LogRecord,
    OffsetOutOfRange,
    PartitionRange,
    RecordBatch,
    partition_for,
)
from profilemesh.shared.log.consumer import LogConsumer
from profilemesh.shared.log.sqlite_store import SqliteConsumerStore
from tests.log_backends import (
    APPLIED_SCHEMA,
    BACKENDS,
    LogBackend,
    LogHarness,
    applied_counts,
    count_applied,
    count_records,
)
from tests.store_backends import StoreHarness

# Long enough never to fire on a slow machine; short enough that a hang fails instead of
# blocking the suite.
TIMEOUT = 20.0


@pytest.fixture(params=BACKENDS, ids=lambda backend: backend.name)
async def logs(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LogHarness]:
    backend: LogBackend = request.param
    async with backend.location(tmp_path) as location:
        harness = LogHarness(backend, location)
        try:
            yield harness
        finally:
            await harness.close()


@pytest.fixture
def store(stores: StoreHarness) -> Iterator[SqliteConsumerStore]:
    """The consumer's store, on each store backend (``tests.store_backends``) in turn."""
    store: SqliteConsumerStore = stores.open("consumer")
    store.schema(APPLIED_SCHEMA)
    yield store
    store.close()


async def records_of(
    log: LogReader, partition: int, from_offset: int = 0, max_records: int = 5000
) -> list[LogRecord]:
    """Every record of ``partition`` from ``from_offset`` present now."""
    async with asyncio.timeout(TIMEOUT):
        return [
            record
            async for batch in log.subscribe(
                partition, from_offset, stop_at_end=True, max_records=max_records
            )
            for record in batch
        ]


async def all_records(log: Log) -> list[LogRecord]:
    """Every record of every partition, partition by partition."""
    return [record for p in range(log.partitions) for record in await records_of(log, p)]


def entries(producer: str, keys: Sequence[str], first: int, count: int) -> list[tuple[str, bytes]]:
    """``count`` entries cycling through ``keys``, payload ``producer:key:sequence``."""
    return [
        (key, f"{producer}:{key}:{seq}".encode())
        for seq in range(first, first + count)
        for key in [keys[seq % len(keys)]]
    ]


def sequences_by_key(records: Sequence[LogRecord]) -> dict[str, list[int]]:
    """key -> the sequence numbers of its records, in log order."""
    by_key: dict[str, list[int]] = defaultdict(list)
    for record in records:
        _, key, seq = record.payload.decode().split(":")
        assert key == record.key
        by_key[key].append(int(seq))
    return by_key


# -- appending and ordering -------------------------------------------------------------------


async def test_every_key_lands_in_its_hashed_partition_and_keeps_its_order(
    logs: LogHarness,
) -> None:
    log = await logs.open(partitions=4)
    keys = [f"user-{i}" for i in range(97)]
    appended: list[tuple[str, bytes]] = []
    for start in range(0, 2000, 250):
        batch = entries("p", keys, start, 250)
        positions = await log.append_batch(batch)
        assert [position.partition for position in positions] == [
            partition_for(key, 4) for key, _ in batch
        ]
        appended.extend(batch)

    records = await all_records(log)
    assert all(record.partition == partition_for(record.key, 4) for record in records)
    by_key = sequences_by_key(records)
    assert set(by_key) == set(keys)
    for key, sequences in by_key.items():
        assert sequences == [seq for seq in range(2000) if keys[seq % len(keys)] == key]
    assert sorted(record.payload for record in records) == sorted(p for _, p in appended)


async def test_append_reports_where_each_entry_landed(logs: LogHarness) -> None:
    log = await logs.open(partitions=3)
    await log.append_batch(entries("p", ["a", "b", "c", "d"], 0, 10))
    batch = entries("p", ["a", "b", "c", "d", "e"], 10, 25)
    positions = await log.append_batch(batch)
    for (key, payload), (partition, offset) in zip(batch, positions, strict=True):
        record = (await records_of(log, partition, offset))[0]
        assert (record.partition, record.offset, record.key, record.payload) == (
            partition,
            offset,
            key,
            payload,
        )


async def test_offsets_are_dense_from_zero_in_every_partition(logs: LogHarness) -> None:
    log = await logs.open(partitions=4)
    rng = random.Random(7)
    first = 0
    for _ in range(30):
        count = rng.randint(1, 40)
        await log.append_batch(entries("p", [f"k{i}" for i in range(13)], first, count))
        first += count

    total = 0
    for partition in range(4):
        offsets = [record.offset for record in await records_of(log, partition)]
        assert offsets == list(range(len(offsets)))
        total += len(offsets)
    assert total == first


async def test_offsets_report_the_retained_range_of_every_partition(logs: LogHarness) -> None:
    log = await logs.open(partitions=3)
    assert await log.offsets() == [PartitionRange(p, 0, 0) for p in range(3)]
    assert await log.partition_count() == 3

    batch = entries("p", [f"k{i}" for i in range(7)], 0, 50)
    await log.append_batch(batch)
    counts = [sum(1 for key, _ in batch if partition_for(key, 3) == p) for p in range(3)]
    assert await log.offsets() == [PartitionRange(p, 0, counts[p]) for p in range(3)]


async def test_reading_from_any_offset_returns_exactly_the_suffix(logs: LogHarness) -> None:
    log = await logs.open(partitions=1)
    # Batches of growing size, so that start offsets fall on and inside batch boundaries.
    first = 0
    for size in range(1, 12):
        await log.append_batch(entries("p", ["k"], first, size))
        first += size
    everything = await records_of(log, 0)
    assert len(everything) == first

    for offset in range(first + 1):
        suffix = await records_of(log, 0, offset)
        assert suffix == everything[offset:], f"reading from offset {offset}"
        batches = await log.read(0, offset)
        assert [r for batch in batches for r in batch] == everything[offset:]


async def test_small_max_records_still_delivers_every_record_once_in_order(
    logs: LogHarness,
) -> None:
    log = await logs.open(partitions=1)
    for first in range(0, 100, 10):
        await log.append_batch(entries("p", ["k"], first, 10))
    records = await records_of(log, 0, max_records=3)
    assert [record.offset for record in records] == list(range(100))


async def test_subscribing_outside_the_retained_range_raises_offset_out_of_range(
    logs: LogHarness,
) -> None:
    log = await logs.open(partitions=2)
    await log.append_batch(entries("p", ["a", "b", "c"], 0, 12))
    [_, (_, _, next_offset)] = await log.offsets()
    assert await records_of(log, 1, next_offset) == []  # the next offset itself is valid

    for offset in (next_offset + 1, next_offset + 1000, -1):
        with pytest.raises(OffsetOutOfRange):
            await records_of(log, 1, offset)


# -- subscriptions ----------------------------------------------------------------------------


async def test_stop_at_end_ends_after_the_records_present_when_it_started(
    logs: LogHarness,
) -> None:
    log = await logs.open(partitions=1)
    await log.append_batch(entries("p", ["k"], 0, 10))
    seen: list[int] = []
    async with asyncio.timeout(TIMEOUT):
        async for batch in log.subscribe(0, 0, stop_at_end=True, max_records=1):
            seen.extend(record.offset for record in batch)
            if len(seen) == 1:
                await log.append_batch(entries("p", ["k"], 10, 10))  # arrives too late
    assert seen == list(range(10))

    empty = await logs.open("empty", partitions=1)
    assert await records_of(empty, 0) == []  # returns at once, does not wait for records


async def test_subscription_waits_for_new_records_and_delivers_them_in_order(
    logs: LogHarness,
) -> None:
    log = await logs.open(partitions=1)
    await log.append_batch(entries("p", ["k"], 0, 3))
    received: list[LogRecord] = []
    arrived = asyncio.Event()

    async def follow() -> None:
        async for batch in log.subscribe(0, 0):
            received.extend(batch)
            arrived.set()

    follower = asyncio.create_task(follow())
    try:
        async with asyncio.timeout(TIMEOUT):
            while len(received) < 3:
                await arrived.wait()
                arrived.clear()
        await asyncio.sleep(0.1)
        assert len(received) == 3  # caught up: waiting, not ending, not repeating

        for first in (3, 8, 13):
            await log.append_batch(entries("p", ["k"], first, 5))
        async with asyncio.timeout(TIMEOUT):
            while len(received) < 18:
                await arrived.wait()
                arrived.clear()
        assert not follower.done()
    finally:
        follower.cancel()
    assert [record.offset for record in received] == list(range(18))
    assert [int(record.payload.split(b":")[2]) for record in received] == list(range(18))


# -- durability -------------------------------------------------------------------------------


async def test_reopened_log_keeps_its_records_and_continues_the_offsets(
    logs: LogHarness,
) -> None:
    log = await logs.open(partitions=3)
    keys = [f"k{i}" for i in range(11)]
    await log.append_batch(entries("p", keys, 0, 300))
    before = await all_records(log)
    ranges = await log.offsets()

    log = await logs.restart(log)
    assert await all_records(log) == before
    assert await log.offsets() == ranges

    positions = await log.append_batch(entries("p", keys, 300, 30))
    for partition, offset in positions:
        assert offset >= ranges[partition].next
    for partition in range(3):
        offsets = [record.offset for record in await records_of(log, partition)]
        assert offsets == list(range(len(offsets)))
    assert len(await all_records(log)) == 330


async def test_concurrent_producers_all_land_and_keep_their_order_per_key(
    logs: LogHarness,
) -> None:
    log = await logs.open(partitions=4)
    producers, batches, size = 8, 25, 20

    async def produce(producer: int) -> None:
        rng = random.Random(producer)
        keys = [f"prod{producer}-key{i}" for i in range(5)]
        for batch in range(batches):
            await log.append_batch(entries(f"prod{producer}", keys, batch * size, size))
            await asyncio.sleep(rng.random() / 1000)  # interleave the producers differently

    async with asyncio.timeout(TIMEOUT):
        await asyncio.gather(*(produce(producer) for producer in range(producers)))

    records = await all_records(log)
    assert len(records) == producers * batches * size
    by_key = sequences_by_key(records)
    for producer in range(producers):
        for i in range(5):
            expected = [seq for seq in range(batches * size) if seq % 5 == i]
            assert by_key[f"prod{producer}-key{i}"] == expected
    for partition in range(4):
        offsets = [record.offset for record in records if record.partition == partition]
        assert offsets == list(range(len(offsets)))


# -- contents ---------------------------------------------------------------------------------


async def test_batch_headers_are_delivered_with_every_record_of_the_batch(
    logs: LogHarness,
) -> None:
    log = await logs.open(partitions=2)
    traced = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    await log.append_batch(entries("p", ["a", "b", "c"], 0, 6), traced)
    await log.append_batch(entries("p", ["a", "b", "c"], 6, 6), {"source": "crm", "x": ""})
    await log.append_batch(entries("p", ["a", "b", "c"], 12, 6))

    expected: Mapping[int, Mapping[str, str]] = {
        **{seq: traced for seq in range(6)},
        **{seq: {"source": "crm", "x": ""} for seq in range(6, 12)},
        **{seq: {} for seq in range(12, 18)},
    }
    records = await all_records(log)
    assert len(records) == 18
    for record in records:
        seq = int(record.payload.split(b":")[2])
        assert dict(record.headers) == expected[seq]


async def test_message_headers_add_to_the_batch_headers_for_their_own_record(
    logs: LogHarness,
) -> None:
    # An outbox publishes messages queued in different traces in one append: each keeps its own.
    log = await logs.open(partitions=2)
    appended = entries("p", ["a", "b", "c"], 0, 6)
    own = [{"traceparent": f"00-{seq:032x}-{seq + 1:016x}-01"} for seq in range(6)]
    await log.append_batch(appended, {"outbox-seq": "6"}, message_headers=own)

    records = await all_records(log)
    assert len(records) == 6
    for record in records:
        seq = int(record.payload.split(b":")[2])
        assert dict(record.headers) == {"outbox-seq": "6", **own[seq]}


async def test_empty_and_large_payloads_round_trip(logs: LogHarness) -> None:
    log = await logs.open(partitions=2)
    rng = random.Random(3)
    large = rng.randbytes(1024 * 1024)
    payloads = [b"", large, b"", b"x", rng.randbytes(1024 * 1024 + 17), b""]
    for i, payload in enumerate(payloads):
        await log.append_batch([("k", payload), (f"other{i}", b"")])
    await log.append_batch([("k", payload) for payload in payloads])

    partition = partition_for("k", 2)
    mine = [record.payload for record in await records_of(log, partition) if record.key == "k"]
    assert mine == payloads + payloads
    others = [r for p in range(2) for r in await records_of(log, p) if r.key != "k"]
    assert len(others) == len(payloads)
    assert all(record.payload == b"" for record in others)


# -- consumers: state and offset in one transaction -------------------------------------------


class FailOnce:
    """A handler that applies records like ``count_applied`` but raises the first time it
    reaches each of ``failing`` (partition, offset)s, after applying the records before it."""

    def __init__(self, failing: set[tuple[int, int]]) -> None:
        self.failing = set(failing)

    def __call__(self, tx: sqlite3.Connection, batch: RecordBatch) -> None:
        for record in batch:
            if (record.partition, record.offset) in self.failing:
                self.failing.discard((record.partition, record.offset))
                raise RuntimeError(f"handler failed at {record.partition}/{record.offset}")
            count_records(tx, [record])


def prefix(batch: RecordBatch, count: int) -> RecordBatch:
    """The first ``count`` records of ``batch``, as a batch (a delivery cut short)."""
    return RecordBatch(
        partition=batch.partition,
        base_offset=batch.base_offset,
        append_time_ns=batch.append_time_ns,
        keys=batch.keys[:count],
        payload_sizes=batch.payload_sizes[:count],
        payloads=batch.payloads[: sum(batch.payload_sizes[:count])],
        headers=batch.headers,
    )


async def first_batch(log: Log, partition: int) -> RecordBatch:
    async with asyncio.timeout(TIMEOUT):
        async for batch in log.subscribe(partition, 0, stop_at_end=True):
            return batch
    raise AssertionError("the partition is empty")


async def test_a_handler_that_fails_mid_batch_changes_neither_state_nor_offset(
    logs: LogHarness, store: SqliteConsumerStore
) -> None:
    log = await logs.open(partitions=1)
    await log.append_batch(entries("p", ["k"], 0, 10))
    batch = await first_batch(log, 0)

    with pytest.raises(RuntimeError, match="failed at 0/6"):
        store.apply("counter", log.stream, batch, FailOnce({(0, 6)}))
    assert applied_counts(store) == {}  # records 0..5 were written, then rolled back
    assert store.committed("counter", log.stream) == {}

    store.apply("counter", log.stream, batch, count_applied)
    assert applied_counts(store) == {(0, offset): 1 for offset in range(10)}
    assert store.committed("counter", log.stream) == {0: 10}


async def test_redelivered_records_are_applied_only_once(
    logs: LogHarness, store: SqliteConsumerStore
) -> None:
    log = await logs.open(partitions=1)
    await log.append_batch(entries("p", ["k"], 0, 10))
    batch = await first_batch(log, 0)

    store.apply("counter", log.stream, prefix(batch, 4), count_applied)
    store.apply("counter", log.stream, batch, count_applied)  # overlaps: 0..3 skipped
    store.apply("counter", log.stream, batch, count_applied)  # entirely below: skipped
    store.apply("counter", log.stream, prefix(batch, 2), count_applied)
    assert applied_counts(store) == {(0, offset): 1 for offset in range(10)}
    assert store.committed("counter", log.stream) == {0: 10}
    # Offsets are kept per consumer: another consumer of the same store starts afresh.
    assert store.committed("other", log.stream) == {}


async def test_a_batch_beyond_the_committed_offset_is_refused(
    logs: LogHarness, store: SqliteConsumerStore
) -> None:
    log = await logs.open(partitions=1)
    await log.append_batch(entries("p", ["k"], 0, 4))
    await log.append_batch(entries("p", ["k"], 4, 4))
    first, second = [batch async for batch in log.subscribe(0, 0, stop_at_end=True)]

    store.apply("counter", log.stream, prefix(first, 2), count_applied)
    with pytest.raises(OffsetOutOfRange):
        store.apply("counter", log.stream, second, count_applied)  # would skip offsets 2, 3
    assert store.committed("counter", log.stream) == {0: 2}


async def test_rerunning_a_failed_consumer_applies_every_record_exactly_once(
    logs: LogHarness, store: SqliteConsumerStore
) -> None:
    log = await logs.open(partitions=4)
    keys = [f"k{i}" for i in range(29)]
    for first in range(0, 600, 40):
        await log.append_batch(entries("p", keys, first, 40))
    ranges = await log.offsets()
    everything = {(p, offset) for p, _, end in ranges for offset in range(end)}
    failing = set(random.Random(11).sample(sorted(everything), 12))
    handler = FailOnce(failing)

    failures = 0
    while True:
        consumer = LogConsumer("counter", log, store, handler)
        try:
            async with asyncio.timeout(TIMEOUT):
                await consumer.run_until_caught_up()
            break
        except RuntimeError:
            failures += 1
            assert failures <= len(failing)
    assert failures >= 1
    assert not handler.failing  # every planned failure happened

    assert applied_counts(store) == dict.fromkeys(everything, 1)
    assert store.committed("counter", log.stream) == {p: end for p, _, end in ranges}
    assert await consumer.lag() == dict.fromkeys(range(4), 0)


async def test_a_consumer_follows_the_tail_until_stopped(
    logs: LogHarness, store: SqliteConsumerStore
) -> None:
    log = await logs.open(partitions=2)
    await log.append_batch(entries("p", ["a", "b", "c"], 0, 30))
    consumer = LogConsumer("counter", log, store, count_applied)
    assert await consumer.lag() == {p: end for p, _, end in await log.offsets()}

    running = asyncio.create_task(consumer.run())
    for first in range(30, 90, 15):
        await log.append_batch(entries("p", ["a", "b", "c"], first, 15))
    async with asyncio.timeout(TIMEOUT):
        while len(applied_counts(store)) < 90:
            await asyncio.sleep(0.01)
    assert await consumer.lag() == {0: 0, 1: 0}
    assert not running.done()

    consumer.stop()
    async with asyncio.timeout(TIMEOUT):
        await running  # returns normally
    assert set(applied_counts(store).values()) == {1}


async def test_a_consumer_of_some_partitions_applies_only_those(
    logs: LogHarness, store: SqliteConsumerStore
) -> None:
    log = await logs.open(partitions=4)
    await log.append_batch(entries("p", [f"k{i}" for i in range(20)], 0, 200))
    consumer = LogConsumer("counter", log, store, count_applied, partitions=[1, 3])
    await consumer.run_until_caught_up()

    ranges = await log.offsets()
    applied = applied_counts(store)
    assert {p for p, _ in applied} == {1, 3}
    assert len(applied) == ranges[1].next + ranges[3].next
    assert store.committed("counter", log.stream) == {1: ranges[1].next, 3: ranges[3].next}
    assert await consumer.lag() == {1: 0, 3: 0}


class FlakyReader(LogReader):
    """A reader whose subscriptions drop with ``Unavailable`` after a few batches, a number
    of times, like a producer restarting under a remote consumer."""

    def __init__(self, log: Log, drops: int, every: int) -> None:
        self.log = log
        self.stream = log.stream
        self.drops = drops
        self.every = every
        self.subscriptions: list[tuple[int, int]] = []

    async def offsets(self) -> list[PartitionRange]:
        return await self.log.offsets()

    async def subscribe(
        self,
        partition: int,
        from_offset: int,
        *,
        stop_at_end: bool = False,
        max_records: int = 5000,
    ) -> AsyncIterator[RecordBatch]:
        self.subscriptions.append((partition, from_offset))
        delivered = 0
        async for batch in self.log.subscribe(
            partition, from_offset, stop_at_end=stop_at_end, max_records=max_records
        ):
            if delivered == self.every and self.drops > 0:
                self.drops -= 1
                raise Unavailable("producer went away")
            delivered += 1
            yield batch


async def test_a_consumer_resumes_after_its_subscription_drops(
    logs: LogHarness, store: SqliteConsumerStore
) -> None:
    log = await logs.open(partitions=2)
    for first in range(0, 200, 10):
        await log.append_batch(entries("p", ["a", "b", "c", "d"], first, 10))
    flaky = FlakyReader(log, drops=6, every=2)
    consumer = LogConsumer("counter", flaky, store, count_applied, initial_backoff_seconds=0.001)
    async with asyncio.timeout(TIMEOUT):
        await consumer.run_until_caught_up()

    assert flaky.drops == 0
    assert len(flaky.subscriptions) == 2 + 6
    # Each resubscription starts after the last applied batch, never from the beginning.
    assert all(offset > 0 for _, offset in flaky.subscriptions[2:])
    ranges = await log.offsets()
    assert applied_counts(store) == {
        (p, offset): 1 for p, _, end in ranges for offset in range(end)
    }


async def test_a_consumer_starts_at_the_committed_offset(
    logs: LogHarness, store: SqliteConsumerStore
) -> None:
    log = await logs.open(partitions=1)
    await log.append_batch(entries("p", ["k"], 0, 5))
    await LogConsumer("counter", log, store, count_applied).run_until_caught_up()
    await log.append_batch(entries("p", ["k"], 5, 5))

    flaky = FlakyReader(log, drops=0, every=0)
    await LogConsumer("counter", flaky, store, count_applied).run_until_caught_up()
    assert flaky.subscriptions == [(0, 5)]
    assert applied_counts(store) == {(0, offset): 1 for offset in range(10)}
