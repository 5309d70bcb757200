"""Sharing a log's partitions among the replicas of a consuming service.

On the scale-out backend several replicas of a service read the same log. Each partition must
be applied by exactly one of them at a time (its records in order, its offset committed by one
writer), and a partition whose replica died must be picked up by another. The replicas agree
through the store they share, with leases:

- every replica renews a heartbeat row; the live ones are those seen within ``ttl_seconds``;
- each takes a fair share, ``ceil(partitions / live replicas)``: it keeps and renews the leases
  it holds, gives back the ones beyond its share (so that a replica that joins gets some), and
  claims partitions nobody holds, or whose lease expired (a replica that was killed);
- every apply checks, inside its own transaction, that this replica still holds an unexpired
  lease on the partition (:meth:`PartitionLeases.check`). A replica paused past its lease
  (a long GC, a partitioned network) therefore cannot commit once another has taken over: its
  transaction fails with :class:`LeaseLost` and it lets the partition go.

The SQL is the codebase's SQLite dialect, so the same leases run on a SQLite file (several
processes on one machine; what the unit tests use) and on PostgreSQL through its store, whose
transactions are serialisable against each other for these rows.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import socket
import time
import uuid
import zlib
from collections.abc import AsyncGenerator
from contextlib import AbstractContextManager
from typing import Any, Protocol

from profilemesh.shared.errors import Unavailable

SCHEMA = """
CREATE TABLE IF NOT EXISTS partition_leases (
    consumer TEXT NOT NULL,
    partition INTEGER NOT NULL,
    owner TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (consumer, partition)
);
CREATE TABLE IF NOT EXISTS consumer_members (
    consumer TEXT NOT NULL,
    member TEXT NOT NULL,
    seen_at INTEGER NOT NULL,
    PRIMARY KEY (consumer, member)
);
"""

NS = 1_000_000_000


class LeaseLost(Unavailable):
    """This replica no longer holds the partition it was about to commit for."""


class LeaseStore(Protocol):
    """What the leases need of a consumer store."""

    def schema(self, sql: str) -> None: ...

    def transaction(self) -> AbstractContextManager[Any]: ...


@functools.cache
def replica_name() -> str:
    """This process's name among the replicas (the same for all its leases): host, pid and a
    random suffix, so that a restarted process with a reused pid is a new member."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class PartitionLeases:
    """This replica's share of ``partitions`` partitions of what ``consumer`` reads."""

    def __init__(
        self,
        store: LeaseStore,
        consumer: str,
        partitions: int,
        *,
        member: str | None = None,
        ttl_seconds: float = 10.0,
    ) -> None:
        self.store = store
        self.consumer = consumer
        self.partitions = partitions
        self.member = member or replica_name()
        self.ttl_ns = int(ttl_seconds * NS)
        self.interval_seconds = ttl_seconds / 4
        self.owned: frozenset[int] = frozenset()
        store.schema(SCHEMA)

    def renew(self, now_ns: int | None = None) -> frozenset[int]:
        """One round: heartbeat, keep and renew this replica's share, give back the excess,
        claim what is free or expired. Returns the partitions held now."""
        now = time.time_ns() if now_ns is None else now_ns
        expires = now + self.ttl_ns
        with self.store.transaction() as tx:
            tx.execute(
                "INSERT INTO consumer_members (consumer, member, seen_at) VALUES (?, ?, ?)"
                " ON CONFLICT (consumer, member) DO UPDATE SET seen_at = excluded.seen_at",
                (self.consumer, self.member, now),
            )
            tx.execute(
                "DELETE FROM consumer_members WHERE consumer = ? AND seen_at < ?",
                (self.consumer, now - self.ttl_ns),
            )
            live = tx.execute(
                "SELECT count(*) FROM consumer_members WHERE consumer = ?", (self.consumer,)
            ).fetchone()[0]
            share = math.ceil(self.partitions / max(1, int(live)))
            leases = {
                int(partition): (str(owner), int(until))
                for partition, owner, until in tx.execute(
                    "SELECT partition, owner, expires_at FROM partition_leases WHERE consumer = ?",
                    (self.consumer,),
                ).fetchall()
            }
            mine = sorted(
                p for p, (owner, until) in leases.items() if owner == self.member and until > now
            )
            keep, give_back = mine[:share], mine[share:]
            free = [
                p
                for p in range(self.partitions)
                if p not in leases or leases[p][1] <= now or not leases[p][0]
            ]
            # Claim the free partitions this replica is nearest to (a stable spread): fewer
            # moves when replicas come and go at once.
            offset = zlib.crc32(self.member.encode()) % self.partitions
            free.sort(key=lambda p: (p - offset) % self.partitions)
            claimed = free[: max(0, share - len(keep))]
            for partition in give_back:
                tx.execute(
                    "UPDATE partition_leases SET owner = '', expires_at = 0"
                    " WHERE consumer = ? AND partition = ? AND owner = ?",
                    (self.consumer, partition, self.member),
                )
            for partition in [*keep, *claimed]:
                tx.execute(
                    "INSERT INTO partition_leases (consumer, partition, owner, expires_at)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (consumer, partition)"
                    " DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at",
                    (self.consumer, partition, self.member, expires),
                )
        self.owned = frozenset([*keep, *claimed])
        return self.owned

    def release(self) -> None:
        """Give every lease back (a replica stopping cleanly): the others take over at their
        next round instead of waiting for the leases to expire."""
        with self.store.transaction() as tx:
            tx.execute(
                "UPDATE partition_leases SET owner = '', expires_at = 0"
                " WHERE consumer = ? AND owner = ?",
                (self.consumer, self.member),
            )
            tx.execute(
                "DELETE FROM consumer_members WHERE consumer = ? AND member = ?",
                (self.consumer, self.member),
            )
        self.owned = frozenset()

    def check(self, tx: Any, partition: int) -> None:
        """Inside an apply's transaction: raise :class:`LeaseLost` unless this replica holds
        an unexpired lease on ``partition``."""
        row = tx.execute(
            "SELECT owner, expires_at FROM partition_leases WHERE consumer = ? AND partition = ?",
            (self.consumer, partition),
        ).fetchone()
        if row is None or row[0] != self.member or int(row[1]) <= time.time_ns():
            raise LeaseLost(f"{self.member} no longer holds {self.consumer}/{partition}")

    async def changes(self) -> AsyncGenerator[frozenset[int], None]:
        """The partitions held, each time they change (the first round's at once); renews
        every quarter of the lease."""
        previous: frozenset[int] | None = None
        while True:
            owned = await asyncio.to_thread(self.renew)
            if owned != previous:
                previous = owned
                yield owned
            await asyncio.sleep(self.interval_seconds)
