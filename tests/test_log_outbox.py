"""A consumer's output is published once: committed with its state, sent after, never twice."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from profilemesh.shared.log.api import RecordBatch
from profilemesh.shared.log.consumer import LogConsumer
from profilemesh.shared.log.embedded import EmbeddedLog
from profilemesh.shared.log.outbox import SEQUENCE_HEADER, Outbox
from profilemesh.shared.log.sqlite_store import SqliteConsumerStore


async def _payloads(log: EmbeddedLog) -> list[bytes]:
    found = []
    for partition in await log.offsets():
        async for batch in log.subscribe(partition.partition, 0, stop_at_end=True):
            found.extend(batch.payload_list())
    return sorted(found)


async def test_a_consumer_publishes_one_derived_message_per_input(tmp_path: Path) -> None:
    source = await EmbeddedLog.open(tmp_path / "in", "in", partitions=3)
    target = await EmbeddedLog.open(tmp_path / "out", "out", partitions=2)
    store = SqliteConsumerStore(tmp_path / "state.sqlite")
    outbox = Outbox(store, target)

    def handler(tx: sqlite3.Connection, batch: RecordBatch) -> None:
        outbox.put(tx, [(r.key, b"derived-" + r.payload) for r in batch])

    await source.append_batch([(f"k{i % 7}", str(i).encode()) for i in range(500)])
    consumer = LogConsumer("c", source, store, handler, on_applied=lambda _: outbox.notify())
    publisher = asyncio.create_task(outbox.run())
    await consumer.run_until_caught_up()
    for _ in range(100):
        if len(await _payloads(target)) == 500:
            break
        await asyncio.sleep(0.02)
    publisher.cancel()
    assert await _payloads(target) == sorted(b"derived-%d" % i for i in range(500))
    assert store.read(lambda tx: tx.execute("SELECT count(*) FROM outbox").fetchone()[0]) == 0
    store.close()
    for log in (source, target):
        await log.close()


async def test_a_crash_between_append_and_delete_does_not_publish_twice(tmp_path: Path) -> None:
    target = await EmbeddedLog.open(tmp_path / "out", "out", partitions=2)
    store = SqliteConsumerStore(tmp_path / "state.sqlite")
    outbox = Outbox(store, target)
    with store.transaction() as tx:
        outbox.put(tx, [(f"k{i}", b"m%d" % i) for i in range(10)])
    # What publish_pending does, "killed" after the append and before the delete:
    rows = store.read(
        lambda tx: tx.execute("SELECT seq, partition, key, payload FROM outbox").fetchall()
    )
    by_partition: dict[int, list[tuple[int, str, bytes]]] = {}
    for seq, partition, key, payload in rows:
        by_partition.setdefault(partition, []).append((seq, key, payload))
    first = min(by_partition)
    group = by_partition[first]
    await target.append_batch([(k, p) for _, k, p in group], {SEQUENCE_HEADER: str(group[-1][0])})

    restarted = Outbox(store, target)
    await restarted.recover()
    await restarted.publish_pending()
    assert await _payloads(target) == sorted(b"m%d" % i for i in range(10))
    store.close()
    await target.close()


async def test_flushing_after_a_cancelled_publisher_sends_nothing_twice(tmp_path: Path) -> None:
    target = await EmbeddedLog.open(tmp_path / "out", "out", partitions=2)
    store = SqliteConsumerStore(tmp_path / "state.sqlite")
    outbox = Outbox(store, target)
    with store.transaction() as tx:
        outbox.put(tx, [(f"k{i}", b"m%d" % i) for i in range(10)])
    rows = store.read(
        lambda tx: tx.execute("SELECT seq, key, payload FROM outbox ORDER BY seq").fetchall()
    )
    # The publisher was cancelled between its append and its delete:
    await target.append_batch([(k, p) for _, k, p in rows], {SEQUENCE_HEADER: str(rows[-1][0])})
    await outbox.flush()
    assert await _payloads(target) == sorted(b"m%d" % i for i in range(10))
    store.close()
    await target.close()
