"""What a downstream service owes identity after erasing a person: a report, kept until sent.

Identity tracks a deletion job across the mesh. Features, scoring and activation erase the
person inside the transaction that commits their log offset, and in that same transaction
record that they owe identity a report (:func:`owe`). The :class:`DeletionReporter` then makes
the erasure physical — the SQLite WAL and any other store the service names is scrubbed, so no
page image of the person is left — and reports with ``IdentityService.ReportDeletionProgress``,
forgetting the debt only once identity has it. A crash anywhere in between repeats the report,
which identity treats idempotently; nothing can make it go missing.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence

import grpc

from profilemesh.common.v1 import job_pb2
from profilemesh.identity.v1 import identity_service_pb2, identity_service_pb2_grpc
from profilemesh.shared.log.sqlite_store import SqliteConsumerStore
from profilemesh.shared.supervision import repeat_when_notified

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS deletion_reports (
    job_id TEXT PRIMARY KEY,
    error TEXT NOT NULL,
    recorded_at INTEGER NOT NULL
) WITHOUT ROWID;
"""

RETRY_SECONDS = 1.0
"""How long the reporter waits after identity could not be reached or a scrub was busy."""


def owe(tx: sqlite3.Connection, job_id: str, error: str = "") -> None:
    """Record, inside the caller's transaction, that deletion ``job_id`` is done here (or
    failed with ``error``) and identity must be told."""
    if job_id:
        tx.execute(
            "INSERT OR REPLACE INTO deletion_reports (job_id, error, recorded_at) VALUES (?, ?, ?)",
            (job_id, error, time.time_ns()),
        )


class DeletionReporter:
    """Scrubs the service's stores, then reports owed deletions to identity."""

    def __init__(
        self,
        service: str,
        store: Callable[[], SqliteConsumerStore],
        connect: Callable[[], grpc.aio.Channel],
        *,
        scrubbers: Sequence[Callable[[], bool]] = (),
    ) -> None:
        self.service = service
        self._store = store
        self._connect = connect
        self._scrubbers = scrubbers
        self._wake = asyncio.Event()
        self._channel: grpc.aio.Channel | None = None

    def notify(self) -> None:
        """A deletion was just committed: report it without waiting for the next poll."""
        self._wake.set()

    async def run(self) -> None:
        """Report until cancelled."""
        try:
            await repeat_when_notified(
                self.report_owed,
                self._wake,
                retry_seconds=RETRY_SECONDS,
                idle_seconds=5 * RETRY_SECONDS,
            )
        finally:
            if self._channel is not None:
                await self._channel.close()

    async def report_owed(self) -> bool:
        """Send every owed report; False when something must be retried."""
        store = self._store()
        owed = await asyncio.to_thread(
            store.read,
            lambda c: c.execute("SELECT job_id, error FROM deletion_reports").fetchall(),
        )
        if not owed:
            return True
        if not await asyncio.to_thread(self._scrub, store):
            return False
        if self._channel is None:
            self._channel = self._connect()
        stub = identity_service_pb2_grpc.IdentityServiceStub(self._channel)
        for job_id, error in owed:
            request = identity_service_pb2.ReportDeletionProgressRequest(
                job_id=job_id,
                service=self.service,
                state=job_pb2.JOB_STATE_FAILED if error else job_pb2.JOB_STATE_SUCCEEDED,
                error=error,
            )
            try:
                await stub.ReportDeletionProgress(request)
            except grpc.aio.AioRpcError as failure:
                if failure.code() != grpc.StatusCode.NOT_FOUND:
                    log.warning("reporting deletion %s failed: %s", job_id, failure.details())
                    return False
                log.warning("identity knows no deletion job %s; forgetting it", job_id)
            await asyncio.to_thread(self._forget, store, job_id)
        return True

    def _scrub(self, store: SqliteConsumerStore) -> bool:
        return all([scrub() for scrub in self._scrubbers]) and store.scrub()

    @staticmethod
    def _forget(store: SqliteConsumerStore, job_id: str) -> None:
        with store.transaction() as tx:
            tx.execute("DELETE FROM deletion_reports WHERE job_id = ?", (job_id,))
