"""Replicas sharing a log's partitions through leases: a fair share each, everything taken over
when one dies, nothing applied twice or lost — checked with three consumers on one shared
store file, one of them killed mid-way (its leases are not given back: a crash)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from profilemesh.shared.log.api import RecordBatch
from profilemesh.shared.log.consumer import LogConsumer
from profilemesh.shared.log.embedded import EmbeddedLog
from profilemesh.shared.log.partition_leases import LeaseLost, PartitionLeases
from profilemesh.shared.log.sqlite_store import SqliteConsumerStore

PARTITIONS = 8
SECOND = 1_000_000_000


def store_at(path: Path) -> SqliteConsumerStore:
    store = SqliteConsumerStore(path)
    store.schema(
        "CREATE TABLE IF NOT EXISTS applied (partition INTEGER, record INTEGER,"
        " replica TEXT, PRIMARY KEY (partition, record))"
    )
    return store


def test_each_replica_takes_a_fair_share_and_a_dead_ones_share_is_taken_over(
    tmp_path: Path,
) -> None:
    stores = [store_at(tmp_path / "shared.sqlite") for _ in range(3)]
    replicas = [
        PartitionLeases(store, "features", PARTITIONS, member=f"r{i}", ttl_seconds=10)
        for i, store in enumerate(stores)
    ]
    now = 1_000 * SECOND
    for _ in range(2):  # the first round sees fewer members than the second
        for replica in replicas:
            replica.renew(now)
        now += SECOND
    owned = [replica.owned for replica in replicas]
    assert sorted(len(o) for o in owned) == [2, 3, 3]
    assert frozenset().union(*owned) == frozenset(range(PARTITIONS))
    assert sum(len(o) for o in owned) == PARTITIONS  # disjoint

    # r2 dies: until its leases expire nobody takes them; then the two survivors share all.
    survivors = replicas[:2]
    for replica in survivors:
        replica.renew(now + 5 * SECOND)
    assert frozenset().union(*(r.owned for r in survivors)) == owned[0] | owned[1]
    for replica in [*survivors, *survivors]:
        replica.renew(now + 12 * SECOND)
    assert sorted(len(r.owned) for r in survivors) == [4, 4]
    assert survivors[0].owned | survivors[1].owned == frozenset(range(PARTITIONS))


def test_a_replica_past_its_lease_cannot_commit(tmp_path: Path) -> None:
    store = store_at(tmp_path / "shared.sqlite")
    leases = PartitionLeases(store, "features", 2, member="slow", ttl_seconds=0.05)
    leases.renew()
    with store.transaction() as tx:
        leases.check(tx, 0)
        with pytest.raises(LeaseLost):
            leases.check(tx, 5)
    other = PartitionLeases(store, "features", 2, member="other", ttl_seconds=10)
    import time

    time.sleep(0.1)
    other.renew()
    with store.transaction() as tx, pytest.raises(LeaseLost):
        leases.check(tx, 0)


async def test_three_consumers_one_killed_apply_every_record_exactly_once(
    tmp_path: Path,
) -> None:
    log = await EmbeddedLog.open(tmp_path / "log", "resolutions", partitions=PARTITIONS)
    total = 4_000
    try:

        def handler_for(name: str):  # type: ignore[no-untyped-def]
            def handle(tx: sqlite3.Connection, batch: RecordBatch) -> None:
                # A record applied twice breaks the primary key and fails the consumer.
                tx.executemany(
                    "INSERT INTO applied (partition, record, replica) VALUES (?, ?, ?)",
                    [(batch.partition, batch.base_offset + i, name) for i in range(len(batch))],
                )

            return handle

        stores = [store_at(tmp_path / "shared.sqlite") for _ in range(3)]
        consumers = []
        for i, store in enumerate(stores):
            leases = PartitionLeases(
                store, "features", PARTITIONS, member=f"replica-{i}", ttl_seconds=0.6
            )
            consumers.append(
                LogConsumer(
                    "features",
                    log,
                    store,
                    handler_for(f"replica-{i}"),
                    leases=leases,
                    max_records=50,
                )
            )
        tasks = [asyncio.create_task(c.run()) for c in consumers]

        def settled() -> bool:
            held = [c.leases.owned for c in consumers if c.leases is not None]
            return all(held) and sum(len(h) for h in held) == PARTITIONS

        while not settled():
            await asyncio.sleep(0.02)
        await log.append_batch([(f"k{i}", f"{i}".encode()) for i in range(total)])

        def applied() -> int:
            count: int = stores[0].read(
                lambda c: c.execute("SELECT count(*) FROM applied").fetchone()[0]
            )
            return count

        while applied() < total // 4:
            await asyncio.sleep(0.02)
        # A crash: the victim stops renewing and never gives its leases back.
        victim = consumers[2]
        assert victim.leases is not None
        victim.leases.release = lambda: None  # type: ignore[method-assign]
        tasks[2].cancel()
        await asyncio.gather(tasks[2], return_exceptions=True)
        await log.append_batch([(f"k{i}", f"{i}".encode()) for i in range(total, 2 * total)])

        deadline = asyncio.get_running_loop().time() + 30
        while applied() < 2 * total:
            assert asyncio.get_running_loop().time() < deadline, applied()
            for task in tasks[:2]:
                if task.done():
                    task.result()  # a double apply surfaces here
            await asyncio.sleep(0.05)
        rows = stores[0].read(
            lambda c: c.execute("SELECT replica, count(*) FROM applied GROUP BY replica").fetchall()
        )
        assert sum(n for _, n in rows) == 2 * total
        assert {name for name, _ in rows} == {"replica-0", "replica-1", "replica-2"}
        for consumer in consumers[:2]:
            consumer.stop()
        await asyncio.gather(*tasks[:2])
    finally:
        await log.close()
