"""A transactional outbox: what a consumer publishes is committed with its state, then sent.

A consumer's handler writes the messages it wants to publish into the ``outbox`` table of its
own SQLite database, in the transaction that applies the input batch and commits the input
offset. A publisher task then appends them to the service's log and deletes them. Each append
carries the highest outbox sequence number it holds, per partition; on start-up the tail of
every partition tells what was already published, so a crash between the append and the delete
neither loses a message nor publishes it twice.

On a store that several replicas share (the scale-out backend), one replica at a time publishes,
holding a lease (:mod:`.partition_leases`), and deletes exactly the rows it published; every
record carries a name of its own (:data:`~.api.DEDUP_HEADER`), so a group published again after
a crash or a change of leader is stored once by NATS JetStream.

Each row also keeps the trace context of the transaction that queued it (the consumer span or
the RPC that caused it), and the message is appended with that context in its headers, not the
publisher task's: a trace follows the message through the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import zlib
from collections.abc import Iterable

from profilemesh.shared.log.api import DEDUP_HEADER, Log
from profilemesh.shared.log.partition_leases import PartitionLeases
from profilemesh.shared.log.sqlite_store import SqliteConsumerStore
from profilemesh.shared.telemetry import restored_trace_context, stored_trace_context

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    partition INTEGER NOT NULL,
    key TEXT NOT NULL,
    payload BLOB NOT NULL,
    trace_context TEXT
);
"""
SEQUENCE_HEADER = "outbox-seq"
BATCH_ROWS = 2000


class Outbox:
    """Publishes what handlers put in the outbox of ``store`` to ``target``."""

    def __init__(self, store: SqliteConsumerStore, target: Log) -> None:
        self.store = store
        self.target = target
        self._wakeup = asyncio.Event()
        store.schema(SCHEMA)
        # Outboxes made before rows kept their trace context have no such column yet.
        store.ensure_column("outbox", "trace_context", "TEXT")
        self._leader: PartitionLeases | None = None
        """On a store shared by replicas (scale-out backend), the lease of the one replica
        that publishes; the others only queue. Order per key holds: a key's rows all come
        from the replica owning its input partition, in commit order."""
        if getattr(store, "shared", False):
            self._leader = PartitionLeases(store, f"outbox/{target.stream}", 1)

    def put(self, tx: sqlite3.Connection, entries: Iterable[tuple[str, bytes]]) -> None:
        """Queue ``(key, payload)`` messages inside the caller's open transaction."""
        partitions = self.target.partitions
        context = stored_trace_context()
        tx.executemany(
            "INSERT INTO outbox (partition, key, payload, trace_context) VALUES (?, ?, ?, ?)",
            (
                (zlib.crc32(key.encode()) % partitions, key, payload, context)
                for key, payload in entries
            ),
        )

    def notify(self) -> None:
        """Something may have been queued: publish soon."""
        self._wakeup.set()

    async def recover(self) -> None:
        """Forget queued messages that the log already holds (published before a crash)."""
        published: dict[int, int] = {}
        for partition in await self.target.offsets():
            if partition.next == 0:
                continue
            [batch] = (await self.target.read(partition.partition, partition.next - 1))[:1]
            sequence = batch.headers_of(len(batch) - 1).get(SEQUENCE_HEADER)
            if sequence is not None:
                published[partition.partition] = int(sequence)

        def forget(tx: sqlite3.Connection) -> None:
            for partition, sequence in published.items():
                tx.execute(
                    "DELETE FROM outbox WHERE partition = ? AND seq <= ?", (partition, sequence)
                )

        await asyncio.to_thread(self._write, forget)

    def _write(self, change: object) -> None:
        with self.store.transaction() as tx:
            change(tx)  # type: ignore[operator]

    async def publish_pending(self) -> int:
        """Append everything queued now; how many messages were published."""
        published = 0
        while True:
            rows = await asyncio.to_thread(
                self.store.read,
                lambda tx: tx.execute(
                    "SELECT seq, partition, key, payload, trace_context FROM outbox"
                    " ORDER BY seq LIMIT ?",
                    (BATCH_ROWS,),
                ).fetchall(),
            )
            if not rows:
                return published
            groups: dict[int, list[tuple[int, str, bytes, str | None]]] = {}
            for sequence, partition, key, payload, context in rows:
                groups.setdefault(partition, []).append((sequence, key, payload, context))
            # One append per partition, so each stored batch says how far its partition got.
            await asyncio.gather(*(self._append(group) for group in groups.values()))
            if self._leader is None:
                last = rows[-1][0]
                await asyncio.to_thread(
                    self._write,
                    lambda tx, last=last: tx.execute("DELETE FROM outbox WHERE seq <= ?", (last,)),
                )
            else:
                # Replicas commit concurrently: a lower sequence number may commit after a
                # higher one was read, so only the rows just published go.
                sent = [(row[0],) for row in rows]
                await asyncio.to_thread(
                    self._write,
                    lambda tx, sent=sent: tx.executemany("DELETE FROM outbox WHERE seq = ?", sent),
                )
            published += len(rows)

    async def _append(self, group: list[tuple[int, str, bytes, str | None]]) -> None:
        headers = {SEQUENCE_HEADER: str(group[-1][0])}
        contexts = {context for *_, context in group}
        entries = [(key, payload) for _, key, payload, _ in group]
        if self._leader is not None:
            # Each record is named by its row, so that a group published again after a crash
            # (by this replica or the next leader) is stored once.
            parsed = {context: restored_trace_context(context) for context in contexts}
            await self.target.append_batch(
                entries,
                headers,
                message_headers=[
                    {**parsed[context], DEDUP_HEADER: f"outbox-{seq}"}
                    for seq, _, _, context in group
                ],
            )
            return
        if len(contexts) == 1:  # all queued in one trace (the usual case): said once
            [context] = contexts
            headers.update(restored_trace_context(context))
            await self.target.append_batch(entries, headers)
            return
        parsed = {context: restored_trace_context(context) for context in contexts}
        await self.target.append_batch(
            entries, headers, message_headers=[parsed[context] for *_, context in group]
        )

    async def flush(self) -> int:
        """Publish what is queued, after stopping :meth:`run` (at shutdown).

        A cancelled publisher may have appended a group without deleting it yet; recovering
        first makes sure such a group is not sent a second time. A replica that does not lead
        leaves the queue to the one that does.
        """
        if self._leader is not None:
            if 0 not in await asyncio.to_thread(self._leader.renew):
                return 0
            return await self.publish_pending()
        await self.recover()
        return await self.publish_pending()

    async def run(self) -> None:
        """Publish whenever notified (and once at start), until cancelled."""
        if self._leader is not None:
            await self._lead()
            return
        await self.recover()
        while True:
            self._wakeup.clear()
            await self.publish_pending()
            await self._wakeup.wait()

    async def _lead(self) -> None:
        """Shared store: publish only while holding the outbox's lease, renewing it."""
        leader = self._leader
        assert leader is not None
        try:
            while True:
                self._wakeup.clear()
                if 0 in await asyncio.to_thread(leader.renew):
                    await self.publish_pending()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), leader.interval_seconds)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(leader.release)
