"""Deletion jobs: erasing a person from the whole mesh, tracked until every service is done.

``DeleteProfile`` removes the person from identity's graph in one transaction that also
stores the job and queues ``ProfileDeleted`` on the resolution log. What is left happens here
and in the other services, each step idempotent so that a crash only repeats it:

- ingestion: the person's identifiers are suppressed there (unless the caller said not to)
  and their events purged from the event log and its Parquet archive; the :class:`Driver`
  calls ingestion until it succeeds;
- identity: the person's entries in the resolution log are redacted (the driver, once the
  outbox has published everything queued before), then the store's WAL is scrubbed;
- features, scoring, activation: they erase the person when ``ProfileDeleted`` (or the removal
  it causes) reaches them and report with ``ReportDeletionProgress``.

The identifiers and profile ids a step needs are kept with the job only until that step is
done; after that, the job holds the profile id and the outcome, nothing that identifies the
person.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import uuid
from collections.abc import Callable, Sequence

import grpc

from profilemesh.common.v1 import identifier_pb2, job_pb2
from profilemesh.identity.v1 import deletion_pb2, resolution_log_pb2
from profilemesh.ingestion.v1 import ingestion_service_pb2, ingestion_service_pb2_grpc
from profilemesh.services.identity.identifiers import Identifier
from profilemesh.shared.log.api import Log, RecordBatch
from profilemesh.shared.log.outbox import Outbox
from profilemesh.shared.log.sqlite_store import SqliteConsumerStore
from profilemesh.shared.supervision import repeat_when_notified

log = logging.getLogger(__name__)

SERVICES = ("ingestion", "identity", "features", "scoring", "activation")
"""Every service that holds personal data, in flow order (the order of a job's progress)."""

RETRY_SECONDS = 2.0
MIN_MATCHED_VALUE = 6
"""Identifier values at least this long are also searched for inside other profiles' entries
(an unmerge names every identifier of both parts); shorter ones could match by chance."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS identity_deletions (
    job_id TEXT PRIMARY KEY,
    job BLOB NOT NULL,
    identifiers TEXT,
    profile_ids TEXT
) WITHOUT ROWID;
"""

SUCCEEDED = job_pb2.JOB_STATE_SUCCEEDED
FAILED = job_pb2.JOB_STATE_FAILED
PENDING = job_pb2.JOB_STATE_PENDING
RUNNING = job_pb2.JOB_STATE_RUNNING


def new_job(profile_id: str, reason: str, suppressed: bool) -> deletion_pb2.DeletionJob:
    """A RUNNING job whose services are all PENDING."""
    job = deletion_pb2.DeletionJob(
        job_id=f"del_{uuid.uuid4().hex[:16]}",
        state=RUNNING,
        profile_id=profile_id,
        suppressed=suppressed,
        reason=reason,
        services=[deletion_pb2.ServiceDeletionProgress(service=s, state=PENDING) for s in SERVICES],
    )
    job.created_at.GetCurrentTime()
    return job


def create(
    tx: sqlite3.Connection,
    job: deletion_pb2.DeletionJob,
    identifiers: Sequence[Identifier],
    profile_ids: Sequence[str],
) -> None:
    """Store ``job`` with what its ingestion and identity steps need (caller's transaction)."""
    tx.execute(
        "INSERT INTO identity_deletions (job_id, job, identifiers, profile_ids)"
        " VALUES (?, ?, ?, ?)",
        (
            job.job_id,
            job.SerializeToString(),
            json.dumps([i.key for i in identifiers]),
            json.dumps(list(profile_ids)),
        ),
    )


def get(connection: sqlite3.Connection, job_id: str) -> deletion_pb2.DeletionJob | None:
    row = connection.execute(
        "SELECT job FROM identity_deletions WHERE job_id = ?", (job_id,)
    ).fetchone()
    return None if row is None else deletion_pb2.DeletionJob.FromString(row[0])


def report(
    tx: sqlite3.Connection, job_id: str, service: str, state: int, error: str = ""
) -> deletion_pb2.DeletionJob | None:
    """Record a service's outcome (a repeated report changes nothing); the job after it, or
    None when there is no such job."""
    job = get(tx, job_id)
    if job is None:
        return None
    for progress in job.services:
        if progress.service == service and progress.state not in (SUCCEEDED, FAILED):
            progress.state = state  # type: ignore[assignment]
            progress.error = error
            progress.finished_at.GetCurrentTime()
    states = [p.state for p in job.services]
    if job.state == RUNNING and all(s in (SUCCEEDED, FAILED) for s in states):
        failed = [p for p in job.services if p.state == FAILED]
        job.state = FAILED if failed else SUCCEEDED
        job.error = "; ".join(f"{p.service}: {p.error}" for p in failed)
        job.finished_at.GetCurrentTime()
    tx.execute(
        "UPDATE identity_deletions SET job = ? WHERE job_id = ?",
        (job.SerializeToString(), job_id),
    )
    return job


def _step_done(tx: sqlite3.Connection, job_id: str, column: str, service: str) -> None:
    tx.execute(f"UPDATE identity_deletions SET {column} = NULL WHERE job_id = ?", (job_id,))
    report(tx, job_id, service, SUCCEEDED)


class Driver:
    """Carries out the ingestion and identity steps of every unfinished job."""

    def __init__(
        self,
        store: SqliteConsumerStore,
        resolutions: Log,
        outbox: Outbox,
        connect_ingestion: Callable[[], grpc.aio.Channel],
    ) -> None:
        self._store = store
        self._resolutions = resolutions
        self._outbox = outbox
        self._connect = connect_ingestion
        self._wake = asyncio.Event()
        self._channel: grpc.aio.Channel | None = None

    def notify(self) -> None:
        """A job was created: start on it now."""
        self._wake.set()

    async def run(self) -> None:
        try:
            await repeat_when_notified(
                self.work, self._wake, retry_seconds=RETRY_SECONDS, idle_seconds=30
            )
        finally:
            if self._channel is not None:
                await self._channel.close()

    async def work(self) -> bool:
        """One pass over the unfinished steps; False when one must be retried."""
        pending = await asyncio.to_thread(
            self._store.read,
            lambda c: c.execute(
                "SELECT job, identifiers, profile_ids FROM identity_deletions"
                " WHERE identifiers IS NOT NULL OR profile_ids IS NOT NULL"
            ).fetchall(),
        )
        done = True
        for blob, identifiers, profile_ids in pending:
            job = deletion_pb2.DeletionJob.FromString(blob)
            if identifiers is not None:
                keys = [Identifier.parse(key) for key in json.loads(identifiers)]
                done = await self._ingestion_step(job, keys) and done
            if profile_ids is not None:
                await self._identity_step(
                    job, json.loads(profile_ids), json.loads(identifiers or "[]")
                )
        return done

    async def _ingestion_step(
        self, job: deletion_pb2.DeletionJob, identifiers: list[Identifier]
    ) -> bool:
        if self._channel is None:
            self._channel = self._connect()
        stub = ingestion_service_pb2_grpc.IngestionServiceStub(self._channel)
        wire = [identifier_pb2.Identifier(type=i.type, value=i.value) for i in identifiers]
        try:
            if job.suppressed:
                await stub.SuppressIdentifiers(
                    ingestion_service_pb2.SuppressIdentifiersRequest(
                        identifiers=wire, reason=f"deletion {job.job_id}"
                    )
                )
            purged = await stub.PurgeIdentifiers(
                ingestion_service_pb2.PurgeIdentifiersRequest(job_id=job.job_id, identifiers=wire)
            )
        except grpc.aio.AioRpcError as error:
            log.warning("deletion %s: ingestion step failed: %s", job.job_id, error.details())
            return False
        log.info("deletion %s: ingestion purged %s events", job.job_id, purged.purged_count)
        await asyncio.to_thread(self._finish, job.job_id, "identifiers", "ingestion")
        return True

    async def _identity_step(
        self, job: deletion_pb2.DeletionJob, profile_ids: list[str], keys: list[str]
    ) -> None:
        # Entries of the person still queued in the outbox must be in the log before it is
        # redacted, or they would be published after it.
        await self._outbox.flush()
        ids = set(profile_ids)
        values = [
            value.encode()
            for key in keys
            if len(value := key.partition(":")[2]) >= MIN_MATCHED_VALUE
        ]
        redacted = await self._resolutions.redact(_selector(ids, values))
        log.info("deletion %s: redacted %d resolution entries", job.job_id, redacted)
        await asyncio.to_thread(self._finish, job.job_id, "profile_ids", "identity")
        await asyncio.to_thread(self._store.scrub)

    def _finish(self, job_id: str, column: str, service: str) -> None:
        with self._store.transaction() as tx:
            _step_done(tx, job_id, column, service)


def _selector(
    profile_ids: set[str], values: list[bytes]
) -> Callable[[int, RecordBatch], list[bool]]:
    """Which resolution entries to redact: those keyed by the person's profile ids or naming
    one of their identifiers — but never a ``ProfileDeleted``, which downstream services must
    still read to erase the person themselves."""

    def select(_: int, batch: RecordBatch) -> list[bool]:
        marks = []
        for key, payload in zip(batch.keys, batch.payload_list(), strict=True):
            hit = key in profile_ids or any(value in payload for value in values)
            if hit:
                with contextlib.suppress(Exception):
                    entry = resolution_log_pb2.ResolutionEntry.FromString(payload)
                    hit = entry.WhichOneof("change") != "profile_deleted"
            marks.append(hit)
        return marks

    return select
