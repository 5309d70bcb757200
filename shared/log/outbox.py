"""A transactional outbox: what a consumer publishes is committed with its state, then sent.

A consumer's handler writes the messages it wants to publish into the ``outbox`` table of its
own SQLite database, in the transaction that applies the input batch and commits the input
offset. A publisher task then appends them to the service's log and deletes them. Each append
carries the highest outbox sequence number it holds, per partition; on start-up the tail of
every partition tells what was already published, so a crash between the append and the delete
neither loses a message nor publishes it twice.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import zlib
from collections.abc import Iterable

from profilemesh.shared.log.embedded import EmbeddedLog
from profilemesh.shared.log.sqlite_store import SqliteConsumerStore

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    partition INTEGER NOT NULL,
    key TEXT NOT NULL,
    payload BLOB NOT NULL
);
"""
SEQUENCE_HEADER = "outbox-seq"
BATCH_ROWS = 2000


class Outbox:
    """Publishes what handlers put in the outbox of ``store`` to ``target``."""

    def __init__(self, store: SqliteConsumerStore, target: EmbeddedLog) -> None:
        self.store = store
        self.target = target
        self._wakeup = asyncio.Event()
        store.schema(SCHEMA)

    def put(self, tx: sqlite3.Connection, entries: Iterable[tuple[str, bytes]]) -> None:
        """Queue ``(key, payload)`` messages inside the caller's open transaction."""
        partitions = self.target.partitions
        tx.executemany(
            "INSERT INTO outbox (partition, key, payload) VALUES (?, ?, ?)",
            ((zlib.crc32(key.encode()) % partitions, key, payload) for key, payload in entries),
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
                    "SELECT seq, partition, key, payload FROM outbox ORDER BY seq LIMIT ?",
                    (BATCH_ROWS,),
                ).fetchall(),
            )
            if not rows:
                return published
            groups: dict[int, list[tuple[int, str, bytes]]] = {}
            for sequence, partition, key, payload in rows:
                groups.setdefault(partition, []).append((sequence, key, payload))
            # One append per partition, so each stored batch says how far its partition got.
            await asyncio.gather(
                *(
                    self.target.append_batch(
                        [(key, payload) for _, key, payload in group],
                        {SEQUENCE_HEADER: str(group[-1][0])},
                    )
                    for group in groups.values()
                )
            )
            last = rows[-1][0]
            await asyncio.to_thread(
                self._write,
                lambda tx, last=last: tx.execute("DELETE FROM outbox WHERE seq <= ?", (last,)),
            )
            published += len(rows)

    async def flush(self) -> int:
        """Publish what is queued, after stopping :meth:`run` (at shutdown).

        A cancelled publisher may have appended a group without deleting it yet; recovering
        first makes sure such a group is not sent a second time.
        """
        await self.recover()
        return await self.publish_pending()

    async def run(self) -> None:
        """Publish whenever notified (and once at start), until cancelled."""
        await self.recover()
        while True:
            self._wakeup.clear()
            await self.publish_pending()
            await self._wakeup.wait()
