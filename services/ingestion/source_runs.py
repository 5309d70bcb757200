"""Source runs: source connector plugins read into ingestion, resumably, in the background.

A run instantiates its connector (an invalid configuration fails ``start`` before any run
exists), then pulls batches from ``check()`` and ``read(checkpoint)`` in a thread of their own,
converts each batch (Segment JSON events, ``CustomerRecord`` JSON records) and hands it to
:class:`~profilemesh.services.ingestion.intake.Intake`. Only once the batch is durable in the
event log are its checkpoint and the run's counters committed to ingestion's consumer store
``source_runs``, together. So:

- a run stopped anywhere (cancelled, failed, the process killed) restarts from the checkpoint
  after the last stored batch: nothing is lost, and a batch stored but not yet checkpointed is
  read again and answered as duplicates by ingestion's deduplication;
- the counters always describe what is stored: ``items_read`` = accepted + duplicates + rejected.

Checkpoints belong to a (connector, source) pair: the next run of the same pair resumes where
the last one stopped, whatever its outcome, unless it asks for a full refresh. A connector that
raises fails its run with the error's message; it never takes ingestion down.

Where runs are kept. On the embedded backend the store is a SQLite file under ingestion's data
directory, this process's alone: runs it finds active when it opens were left so by its own
last stop. On the ``postgres`` backend it is a schema of the shared database, so runs and
checkpoints survive a pod's restart and every replica sees every run. A run is then executed by
the replica that started it (its ``owner``), which marks its active runs alive every
:data:`HEARTBEAT_SECONDS`; a run whose heartbeat is older than :data:`STALE_AFTER_SECONDS` (its
replica was killed) is failed as interrupted by any replica, and can be started again to resume.
"One active run per source" holds across replicas: ``start`` checks the store, in the
transaction that records the run. A cancel request received by another replica is stored and
reaches the owner at its next heartbeat or checkpoint. A run failed that way by another replica
never moves its checkpoint again: its next commit finds it no longer RUNNING and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

from profilemesh.ingestion.v1 import record_pb2
from profilemesh.services.ingestion.intake import Intake
from profilemesh.shared.errors import (
    DomainError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from profilemesh.shared.extension_points import Checkpoint, SourceBatch, SourceConnector
from profilemesh.shared.log.sqlite_store import SqliteConsumerStore
from profilemesh.shared.log.stores import StoreOpener
from profilemesh.shared.plugin_manager import PluginSet
from profilemesh.shared.record_rows import record_from_item
from profilemesh.shared.segment_json import event_bytes

log = logging.getLogger(__name__)

MAX_REJECTIONS = 20
"""Rejection reasons kept per run: enough to see what is wrong, bounded however bad the source."""

DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000

ERASED = "[erased: it mentioned a suppressed or purged identifier]"
"""What is stored in place of a text that mentioned a deleted person."""

INTERRUPTED = (
    "interrupted: ingestion stopped before the run finished; start the run again to resume "
    "from its last checkpoint"
)

SUPERSEDED = (
    "the run was taken for interrupted (no heartbeat from its replica) and stopped; start the "
    "run again to resume from its last checkpoint"
)

STORE_NAME = "source_runs"
"""The consumer store runs live in (``source_runs.sqlite`` on the embedded backend)."""

HEARTBEAT_SECONDS = 5.0
"""How often a replica sharing the store marks its active runs alive and reads cancel requests."""

STALE_AFTER_SECONDS = 60.0
"""How old the heartbeat of an active run in a shared store is when its replica is taken for
gone and the run is failed as interrupted."""

_T = TypeVar("_T")


class RunState(StrEnum):
    """Where a run is in its lifecycle (``profilemesh.common.v1.JobState``)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def final(self) -> bool:
        """Whether the run is over (it never changes again)."""
        return self not in (RunState.PENDING, RunState.RUNNING)


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why an item read by a run was not stored: where and what is wrong.

    ``where`` is the connector's location for a row it could not read (``line 17``), else the
    item's number among those the run read, counted from 0, with the field at fault
    (``items[12].timestamp``).
    """

    where: str
    description: str


@dataclass(frozen=True, slots=True)
class SourceRunInfo:
    """A run and its progress, as committed."""

    run_id: str
    connector: str
    source: str
    full_refresh: bool
    state: RunState
    created_at: datetime
    items_read: int = 0
    items_accepted: int = 0
    items_duplicate: int = 0
    items_rejected: int = 0
    checkpoint: Checkpoint | None = None
    """The checkpoint after the last stored batch of this run; ``None`` before the first."""
    rejections: tuple[Rejection, ...] = ()
    """The first :data:`MAX_REJECTIONS` reasons items were rejected."""
    error: str = ""
    started_at: datetime | None = None
    finished_at: datetime | None = None


@dataclass(slots=True)
class _Progress:
    """Counters of a run, grown batch by batch and committed with each checkpoint."""

    read: int = 0
    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0
    items: int = 0
    """Items the connector yielded in this run: numbers them in rejection reasons."""
    rejections: list[Rejection] = field(default_factory=list)

    def reject(self, where: str, description: str) -> None:
        """Remember why an item was rejected, while there is room (counting is the caller's)."""
        if len(self.rejections) < MAX_REJECTIONS:
            self.rejections.append(Rejection(where, description))


class _Cancelled(Exception):
    """A cancel request reached the run between two checkpoints."""


class _Superseded(Exception):
    """Another replica failed the run as interrupted: it must not go on."""


class SourceRuns:
    """Starts, tracks and cancels source runs; their state lives in the store ``source_runs``
    that ``stores`` opens (see the module's description)."""

    def __init__(
        self,
        stores: StoreOpener,
        plugins: PluginSet,
        intake: Intake,
        *,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        stale_after_seconds: float = STALE_AFTER_SECONDS,
    ) -> None:
        self.plugins = plugins
        self.intake = intake
        self.owner = uuid.uuid4().hex
        """This instance, as the owner of the runs it executes."""
        self.heartbeat_seconds = heartbeat_seconds
        self._store = _RunStore(stores, self.owner, stale_after_seconds)
        self._active: dict[str, _ActiveRun] = {}
        self._starting = asyncio.Lock()  # one start at a time: "one active run per source"
        self._heartbeat: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Open the store; runs left PENDING or RUNNING by a crash become FAILED (interrupted),
        so that they can be started again and resume (in a shared store, only those whose
        heartbeat stopped). Call once, before serving."""
        failed = await asyncio.to_thread(self._store.open, INTERRUPTED, _now())
        if failed:
            log.warning("source runs interrupted by the last stop", extra={"runs": failed})
        if self._store.shared:
            self._heartbeat = asyncio.create_task(self._beat(), name="source-runs-heartbeat")

    async def close(self) -> None:
        """Stop every active run now (each becomes FAILED, interrupted, resumable) and close
        the store."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
            self._heartbeat = None
        runs = list(self._active.values())
        for run in runs:
            run.task.cancel()
        await asyncio.gather(*(run.task for run in runs), return_exceptions=True)
        await asyncio.to_thread(self._store.close)

    async def _beat(self) -> None:
        """Mark this replica's active runs alive; pass on cancel requests other replicas took."""
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            try:
                cancelled = await asyncio.to_thread(
                    self._store.heartbeat, list(self._active), _now()
                )
            except Exception:
                log.exception("the source runs' heartbeat failed; will retry")
                continue
            for run_id in cancelled:
                run = self._active.get(run_id)
                if run is not None:
                    run.stop_requested.set()

    async def start(
        self,
        connector: str,
        source: str,
        config: Mapping[str, object],
        full_refresh: bool = False,
    ) -> SourceRunInfo:
        """Start a run of ``connector`` reading as ``source``; returns it PENDING.

        Raises ``NotFound`` for an unknown connector, ``InvalidArgument`` for a missing name
        or an invalid configuration (``config.<field>`` violations), ``FailedPrecondition``
        while another run of ``source`` is active. Nothing is recorded when it raises.
        """
        missing = [
            name for name, value in (("connector", connector), ("source", source)) if not value
        ]
        if missing:
            raise InvalidArgument(
                f"{' and '.join(missing)} required",
                violations=[FieldViolation(name, "required") for name in missing],
            )
        instance = _instantiate(self.plugins.source_connector(connector), config)
        try:
            stored_config = _to_json(config)
        except ValueError as error:
            raise InvalidArgument.for_field("config", f"not JSON: {error}") from None
        suppressions = self.intake.suppressions
        if suppressions.active:  # an inline source's items are in its configuration
            erased = _erased(json.loads(stored_config), suppressions.mentions)
            stored_config = json.dumps(erased, sort_keys=True)
        async with self._starting:
            active = next((r for r in self._active.values() if r.info.source == source), None)
            if active is not None:
                raise FailedPrecondition(
                    f"run {active.info.run_id} of source {source!r} is still active; wait for "
                    "it or cancel it",
                    reason="SOURCE_RUN_ACTIVE",
                    metadata={"run_id": active.info.run_id},
                )
            info = SourceRunInfo(
                run_id=uuid.uuid4().hex,
                connector=connector,
                source=source,
                full_refresh=full_refresh,
                state=RunState.PENDING,
                created_at=_now(),
            )
            # The store refuses the run too if another replica has one of ``source`` active.
            await asyncio.to_thread(self._store.insert, info, stored_config, _now())
            run = _ActiveRun(info, instance)
            run.task = asyncio.create_task(self._execute(run), name=f"source-run-{info.run_id}")
            self._active[info.run_id] = run
        return info

    async def get(self, run_id: str) -> SourceRunInfo:
        """The run as committed; ``NotFound`` for an unknown id."""
        info = await asyncio.to_thread(self._store.get, run_id)
        if info is None:
            raise NotFound(f"no source run {run_id!r}", metadata={"run_id": run_id})
        return info

    async def list(
        self,
        source: str | None = None,
        connector: str | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[SourceRunInfo], str]:
        """Runs, newest first, optionally of one source and connector; with the token of the
        next page (``""`` on the last). ``page_size`` 0 means 100; above 1000 means 1000."""
        if page_size < 0:
            raise InvalidArgument.for_field("page_size", "must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        before = None
        if page_token:
            if not page_token.isdigit():
                raise InvalidArgument.for_field("page_token", "not a token this service issued")
            before = int(page_token)
        rows = await asyncio.to_thread(
            self._store.page, source or None, connector or None, size + 1, before
        )
        page = rows[:size]
        next_token = str(page[-1][0]) if len(rows) > size else ""
        return [info for _, info in page], next_token

    async def cancel(self, run_id: str) -> SourceRunInfo:
        """Ask an active run to stop at its next checkpoint; returns the run as it is now
        (still RUNNING until then). A finished run is returned unchanged. A run another
        replica executes gets the request through the store."""
        run = self._active.get(run_id)
        if run is not None:
            run.stop_requested.set()
        else:
            await asyncio.to_thread(self._store.request_cancel, run_id)
        return await self.get(run_id)

    async def wait(self, run_id: str) -> SourceRunInfo:
        """The run once it has reached a final state (for tests and embedding)."""
        run = self._active.get(run_id)
        if run is not None:
            await asyncio.shield(run.task)
        return await self.get(run_id)

    async def scrub(self, mentions: Callable[[str], bool]) -> int:
        """Erase what the stored runs keep (rejection reasons, errors, configurations,
        checkpoints) where ``mentions`` flags it, for a purge; how many runs changed."""
        return await asyncio.to_thread(self._store.scrub, mentions)

    def _withheld(self, text: str) -> str:
        # What runs store about items they read must not name a suppressed person either.
        return self.intake.suppressions.withheld(text)

    # -- running -------------------------------------------------------------------------------

    async def _execute(self, run: _ActiveRun) -> None:
        info = run.info
        try:
            state, error = await self._read_all(run)
        except asyncio.CancelledError:
            state, error = RunState.FAILED, INTERRUPTED
            await self._finish(info, state, error)
            raise
        except _Superseded:
            log.warning("source run taken over as interrupted", extra={"run_id": info.run_id})
            self._active.pop(info.run_id, None)
            return
        except Exception as failure:  # the connector's or intake's; never the service's
            state, error = RunState.FAILED, _describe(failure)
            log.warning(
                "source run failed",
                extra={"run_id": info.run_id, "connector": info.connector, "error": error},
                exc_info=not isinstance(failure, DomainError),
            )
        await self._finish(info, state, error)

    async def _finish(self, info: SourceRunInfo, state: RunState, error: str) -> None:
        try:
            error = self._withheld(error)
            await asyncio.to_thread(self._store.finish, info.run_id, state, error, _now())
        except Exception:  # SQLite's or PostgreSQL's: the run is left to the interrupted sweep
            log.exception("recording the end of source run %s failed", info.run_id)
        finally:
            # Only once the final state is stored: until then ``wait`` must find the run
            # active, or it would read the stored state while it still says RUNNING.
            self._active.pop(info.run_id, None)

    async def _read_all(self, run: _ActiveRun) -> tuple[RunState, str]:
        info = run.info
        if run.stop_requested.is_set():
            return RunState.CANCELLED, ""
        checkpoint = None
        if not info.full_refresh:
            checkpoint = await asyncio.to_thread(
                self._store.checkpoint, info.connector, info.source
            )
        await asyncio.to_thread(self._store.started, info.run_id, _now())
        progress = _Progress()
        reader = _BatchReader(run.connector, checkpoint, asyncio.get_running_loop())
        reader.start()
        try:
            while True:
                batch = await self._next(run, reader)
                if batch is None:
                    return RunState.SUCCEEDED, ""
                await self._store_batch(run, batch, progress)
                if run.stop_requested.is_set():
                    return RunState.CANCELLED, ""
        except _Cancelled:
            return RunState.CANCELLED, ""
        finally:
            reader.stop()

    async def _next(self, run: _ActiveRun, reader: _BatchReader) -> SourceBatch | None:
        """The next batch, or ``None`` at the end; :class:`_Cancelled` if a cancel request
        comes first (nothing is half-stored while waiting for the source)."""
        return await _unless_stopped(run, reader.next())

    async def _store_batch(self, run: _ActiveRun, batch: SourceBatch, progress: _Progress) -> None:
        """Ingest ``batch`` and, once it is durable, commit its checkpoint and the counters."""
        if not isinstance(batch, SourceBatch):
            raise TypeError(f"the connector yielded a {type(batch).__name__}, not a SourceBatch")
        info = run.info
        first_item = progress.items
        progress.items += len(batch.items)
        progress.read += len(batch.items) + len(batch.problems)
        progress.rejected += len(batch.problems)
        for where, description in batch.problems:
            progress.reject(where, description)
        if batch.kind == "events":
            await self._send_events(run, batch.items, first_item, progress)
        elif batch.kind == "records":
            await self._import_records(run, batch.items, first_item, progress)
        else:
            raise ValueError(f"the connector yielded a batch of kind {batch.kind!r}")
        try:
            checkpoint = _to_json(batch.checkpoint)
        except ValueError as error:
            raise ValueError(f"the connector's checkpoint is not JSON: {error}") from None
        if self.intake.suppressions.active:
            progress.rejections[:] = [
                Rejection(self._withheld(r.where), self._withheld(r.description))
                for r in progress.rejections
            ]
        cancel_requested = await asyncio.to_thread(self._store.commit, info, progress, checkpoint)
        if cancel_requested:
            run.stop_requested.set()

    async def _send_events(
        self, run: _ActiveRun, items: Sequence[Mapping[str, Any]], first: int, progress: _Progress
    ) -> None:
        payloads: list[bytes] = []
        numbers: list[int] = []  # the run-wide item number of each payload
        for offset, item in enumerate(items):
            try:
                # History replayed from a source: its sentAt says nothing about today's clock.
                payloads.append(event_bytes(item, correct_clock_skew=False))
                numbers.append(first + offset)
            except InvalidArgument as error:
                _reject(progress, first + offset, error.violations)
        if not payloads:
            return
        outcome = await _retrying(
            run, lambda: self.intake.send_events(payloads, run.info.source, path="items")
        )
        progress.accepted += len(outcome.accepted)
        progress.duplicate += len(outcome.duplicates)
        for rejected in outcome.rejected:
            _reject(
                progress, numbers[rejected.index], rejected.violations, f"items[{rejected.index}]"
            )

    async def _import_records(
        self, run: _ActiveRun, items: Sequence[Mapping[str, Any]], first: int, progress: _Progress
    ) -> None:
        records: list[record_pb2.CustomerRecord] = []
        numbers: list[int] = []
        for offset, item in enumerate(items):
            try:
                record = record_from_item(item, where="")
            except InvalidArgument as error:
                _reject(progress, first + offset, error.violations)
                continue
            # A record names its system of record; by default that is the source being read.
            record.source = record.source or run.info.source
            records.append(record)
            numbers.append(first + offset)
        if not records:
            return
        outcome = await _retrying(run, lambda: self.intake.import_records(records, path="items"))
        progress.accepted += len(outcome.accepted)
        progress.duplicate += len(outcome.duplicates)
        for rejected in outcome.rejected:
            _reject(
                progress, numbers[rejected.index], rejected.violations, f"items[{rejected.index}]"
            )


@dataclass(eq=False)
class _ActiveRun:
    """A run this process is executing: its connector, task and cancel request."""

    info: SourceRunInfo
    connector: SourceConnector
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] = field(init=False)


def _instantiate(cls: type[SourceConnector], config: Mapping[str, object]) -> SourceConnector:
    """``cls(config)``; an invalid configuration is InvalidArgument, a plugin bug
    FailedPrecondition (the plugin, not the request, is at fault)."""
    try:
        return cls(config)
    except DomainError:
        raise
    except Exception as error:
        raise FailedPrecondition(
            f"connector {cls.name} failed to start: {_describe(error)}",
            reason="CONNECTOR_FAILED",
        ) from error


async def _unless_stopped(run: _ActiveRun, work: Awaitable[_T]) -> _T:
    """Await ``work``, unless a cancel request comes first: then :class:`_Cancelled`."""
    task = asyncio.ensure_future(work)
    stop = asyncio.ensure_future(run.stop_requested.wait())
    try:
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finished = task.done()
    finally:
        stop.cancel()
        if not task.done():
            task.cancel()
    if not finished:
        raise _Cancelled
    return task.result()


async def _retrying(run: _ActiveRun, call: Callable[[], Awaitable[_T]]) -> _T:
    """``await call()``, again after the delay ingestion asks for while its log is full."""
    while True:
        try:
            return await call()
        except ResourceExhausted as error:
            delay = max(error.retry_after_seconds, 0.05)
            log.info("event log full; source run %s waits %.2fs", run.info.run_id, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.stop_requested.wait(), delay)
                raise _Cancelled from None


def _reject(
    progress: _Progress,
    number: int,
    violations: Sequence[FieldViolation],
    prefix: str = "",
) -> None:
    """Count an item rejected and keep its reasons, with field paths rebased from ``prefix``
    (ingestion's path for the item) onto the item's number in the run."""
    progress.rejected += 1
    where = f"items[{number}]"
    for violation in violations or [FieldViolation("", "rejected")]:
        path = violation.field
        if prefix and path.startswith(prefix):
            path = path[len(prefix) :].lstrip(".")
        progress.reject(f"{where}.{path}" if path else where, violation.description)


def _describe(error: BaseException) -> str:
    if isinstance(error, DomainError):
        return error.message
    return f"{type(error).__name__}: {error}"


def _to_json(value: Mapping[str, object]) -> str:
    def plain(item: object) -> object:
        if isinstance(item, Mapping):
            return dict(item)
        if isinstance(item, Sequence) and not isinstance(item, str | bytes):
            return list(item)
        return str(item)  # e.g. a Path in a configuration given from Python

    return json.dumps(value, default=plain, allow_nan=False, sort_keys=True)


def _now() -> datetime:
    return datetime.now(UTC)


# -- the connector's thread ------------------------------------------------------------------


class _BatchReader:
    """Runs a connector's ``check``, ``read`` and ``close`` in one thread of its own, at most
    ``depth`` batches ahead of the run, so that a slow source and a slow log overlap and a
    blocking connector never blocks the event loop."""

    def __init__(
        self,
        connector: SourceConnector,
        checkpoint: Checkpoint | None,
        loop: asyncio.AbstractEventLoop,
        depth: int = 2,
    ) -> None:
        self._connector = connector
        self._checkpoint = checkpoint
        self._loop = loop
        # A batch, the connector's exception, or None after the last batch.
        self._queue: asyncio.Queue[SourceBatch | BaseException | None] = asyncio.Queue()
        self._slots = threading.Semaphore(depth)
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"source-{connector.name}", daemon=True
        )

    def start(self) -> None:
        """Start the thread; batches arrive through :meth:`next`."""
        self._thread.start()

    async def next(self) -> SourceBatch | None:
        """The next batch; ``None`` after the last; the connector's exception if it raised."""
        item = await self._queue.get()
        self._slots.release()
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self) -> None:
        """Let the thread finish: it closes the connector once its current ``next`` returns."""
        self._stopping.set()

    def _run(self) -> None:
        batches: Iterator[SourceBatch] | None = None
        try:
            self._connector.check()
            batches = self._connector.read(self._checkpoint)
            for batch in batches:
                if not self._put(batch):
                    return
            self._put(None)
        except Exception as error:  # handed to the run, which fails with it
            self._put(error)
        except BaseException as error:
            # SystemExit or KeyboardInterrupt from a plugin must not escape into the service.
            self._put(RuntimeError(f"the connector raised {type(error).__name__}: {error}"))
        finally:
            with contextlib.suppress(Exception):
                if batches is not None and hasattr(batches, "close"):
                    batches.close()
            try:
                self._connector.close()
            except Exception:
                log.exception("closing connector %s failed", self._connector.name)

    def _put(self, item: SourceBatch | BaseException | None) -> bool:
        while not self._slots.acquire(timeout=0.1):
            if self._stopping.is_set():
                return False
        if self._stopping.is_set():
            return False
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            return False
        return True


# -- the store --------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL UNIQUE,
    connector TEXT NOT NULL,
    source TEXT NOT NULL,
    full_refresh INTEGER NOT NULL,
    config TEXT NOT NULL,
    state TEXT NOT NULL,
    items_read INTEGER NOT NULL DEFAULT 0,
    items_accepted INTEGER NOT NULL DEFAULT 0,
    items_duplicate INTEGER NOT NULL DEFAULT 0,
    items_rejected INTEGER NOT NULL DEFAULT 0,
    checkpoint TEXT,
    rejections TEXT NOT NULL DEFAULT '[]',
    error TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    owner TEXT NOT NULL DEFAULT '',
    heartbeat_at REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_by_source ON runs (source, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    connector TEXT NOT NULL,
    source TEXT NOT NULL,
    checkpoint TEXT NOT NULL,
    run_id TEXT NOT NULL,
    PRIMARY KEY (connector, source)
);
"""

_COLUMNS = (
    "seq, run_id, connector, source, full_refresh, state, items_read, items_accepted, "
    "items_duplicate, items_rejected, checkpoint, rejections, error, created_at, started_at, "
    "finished_at"
)


_ADDED_COLUMNS = (
    ("owner", "TEXT NOT NULL DEFAULT ''"),
    ("heartbeat_at", "REAL"),
    ("cancel_requested", "INTEGER NOT NULL DEFAULT 0"),
)
"""Columns added since the first version of ``runs``: stores made before gain them."""

_ACTIVE = (RunState.PENDING, RunState.RUNNING)


class _RunStore:
    """Runs and checkpoints in a consumer store (on SQLite: WAL, synchronous=FULL, a committed
    checkpoint survives a power cut). Blocking; called through ``asyncio.to_thread``."""

    def __init__(self, stores: StoreOpener, owner: str, stale_after_seconds: float) -> None:
        self.stores = stores
        self.owner = owner
        self.stale_after_seconds = stale_after_seconds
        self._store: SqliteConsumerStore | None = None

    @property
    def shared(self) -> bool:
        """Whether other replicas keep their runs in the same store."""
        return bool(getattr(self._store, "shared", False))

    def open(self, interrupted: str, now: datetime) -> int:
        """Create the tables; fail runs left active by an earlier process (in a shared store,
        those whose heartbeat stopped). How many were."""
        store = self.stores(STORE_NAME)
        try:
            store.schema(_SCHEMA)
            for column, declaration in _ADDED_COLUMNS:
                store.ensure_column("runs", column, declaration)
        except BaseException:
            store.close()
            raise
        self._store = store
        with store.transaction() as tx:
            return self._fail_interrupted(tx, interrupted, now, everyone=not self.shared)

    def _fail_interrupted(
        self, tx: sqlite3.Connection, interrupted: str, now: datetime, *, everyone: bool
    ) -> int:
        """Fail the active runs nobody executes any more: all of them (``everyone``: the
        store is this process's alone), else those whose heartbeat stopped."""
        statement = "UPDATE runs SET state = ?, error = ?, finished_at = ? WHERE state IN (?, ?)"
        parameters: tuple[object, ...] = (RunState.FAILED, interrupted, now.timestamp(), *_ACTIVE)
        if not everyone:
            statement += " AND (heartbeat_at IS NULL OR heartbeat_at < ?)"
            parameters += (now.timestamp() - self.stale_after_seconds,)
        return int(tx.execute(statement, parameters).rowcount)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def insert(self, info: SourceRunInfo, config: str, now: datetime) -> None:
        """Record a new run of this owner; ``FailedPrecondition`` (nothing recorded) while a
        run of the same source is active in the store, whichever replica executes it."""
        with self._open_store().transaction() as tx:
            if self.shared:
                self._fail_interrupted(tx, INTERRUPTED, now, everyone=False)
            active = tx.execute(
                "SELECT run_id FROM runs WHERE source = ? AND state IN (?, ?) LIMIT 1",
                (info.source, *_ACTIVE),
            ).fetchone()
            if active is not None:
                raise FailedPrecondition(
                    f"run {active[0]} of source {info.source!r} is still active; wait for "
                    "it or cancel it",
                    reason="SOURCE_RUN_ACTIVE",
                    metadata={"run_id": active[0]},
                )
            tx.execute(
                "INSERT INTO runs (run_id, connector, source, full_refresh, config, state, "
                "created_at, owner, heartbeat_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    info.run_id,
                    info.connector,
                    info.source,
                    int(info.full_refresh),
                    config,
                    info.state,
                    info.created_at.timestamp(),
                    self.owner,
                    now.timestamp(),
                ),
            )

    def started(self, run_id: str, now: datetime) -> None:
        with self._open_store().transaction() as tx:
            tx.execute(
                "UPDATE runs SET state = ?, started_at = ?, heartbeat_at = ? WHERE run_id = ?",
                (RunState.RUNNING, now.timestamp(), now.timestamp(), run_id),
            )

    def heartbeat(self, run_ids: Sequence[str], now: datetime) -> list[str]:
        """Mark the runs this replica executes alive; those of them another replica asked to
        stop."""
        if not run_ids:
            return []
        placeholders = ", ".join("?" for _ in run_ids)
        with self._open_store().transaction() as tx:
            tx.execute(
                f"UPDATE runs SET heartbeat_at = ? WHERE run_id IN ({placeholders}) "
                "AND owner = ? AND state IN (?, ?)",
                (now.timestamp(), *run_ids, self.owner, *_ACTIVE),
            )
            rows = tx.execute(
                f"SELECT run_id FROM runs WHERE run_id IN ({placeholders}) "
                "AND cancel_requested = 1",
                tuple(run_ids),
            ).fetchall()
        return [row[0] for row in rows]

    def request_cancel(self, run_id: str) -> None:
        """Ask the replica executing ``run_id`` to stop it (if it is still active)."""
        with self._open_store().transaction() as tx:
            tx.execute(
                "UPDATE runs SET cancel_requested = 1 WHERE run_id = ? AND state IN (?, ?)",
                (run_id, *_ACTIVE),
            )

    def commit(self, info: SourceRunInfo, progress: _Progress, checkpoint: str) -> bool:
        """The batch is durable: store its checkpoint and the counters, in one transaction.
        Whether a cancel request came through the store; :class:`_Superseded` (nothing
        stored) if the run is no longer RUNNING."""
        rejections = json.dumps([[r.where, r.description] for r in progress.rejections])
        with self._open_store().transaction() as tx:
            updated = tx.execute(
                "UPDATE runs SET items_read = ?, items_accepted = ?, items_duplicate = ?, "
                "items_rejected = ?, checkpoint = ?, rejections = ?, heartbeat_at = ? "
                "WHERE run_id = ? AND state = ?",
                (
                    progress.read,
                    progress.accepted,
                    progress.duplicate,
                    progress.rejected,
                    checkpoint,
                    rejections,
                    time.time(),
                    info.run_id,
                    RunState.RUNNING,
                ),
            ).rowcount
            if not updated:
                raise _Superseded(info.run_id)
            tx.execute(
                "INSERT INTO checkpoints (connector, source, checkpoint, run_id) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (connector, source) DO UPDATE SET "
                "checkpoint = excluded.checkpoint, run_id = excluded.run_id",
                (info.connector, info.source, checkpoint, info.run_id),
            )
            [cancel_requested] = tx.execute(
                "SELECT cancel_requested FROM runs WHERE run_id = ?", (info.run_id,)
            ).fetchone()
        return bool(cancel_requested)

    def finish(self, run_id: str, state: RunState, error: str, now: datetime) -> None:
        """End an active run (one another replica already failed as interrupted stays so)."""
        with self._open_store().transaction() as tx:
            tx.execute(
                "UPDATE runs SET state = ?, error = ?, finished_at = ? "
                "WHERE run_id = ? AND state IN (?, ?)",
                (state, error, now.timestamp(), run_id, *_ACTIVE),
            )

    def scrub(self, mentions: Callable[[str], bool]) -> int:
        """Erase what ``mentions`` flags: rejection reasons and errors (overwritten), items and
        values of a configuration (an inline source's items), checkpoints (forgotten). How
        many runs changed. Then, on SQLite, the WAL is emptied, so no copy of the old text is
        left (deleted and rewritten rows are overwritten: ``secure_delete``)."""
        changed: set[str] = set()
        store = self._open_store()
        with store.transaction() as tx:
            rows = tx.execute("SELECT run_id, config, rejections, error, checkpoint FROM runs")
            for run_id, config, rejections, error, checkpoint in rows.fetchall():
                if not mentions(f"{config}\n{rejections}\n{error}\n{checkpoint}"):
                    continue
                reasons = [
                    [ERASED if mentions(where) else where, ERASED if mentions(text) else text]
                    for where, text in json.loads(rejections)
                ]
                tx.execute(
                    "UPDATE runs SET config = ?, rejections = ?, error = ?, checkpoint = ? "
                    "WHERE run_id = ?",
                    (
                        json.dumps(_erased(json.loads(config), mentions), sort_keys=True),
                        json.dumps(reasons),
                        ERASED if mentions(error) else error,
                        None if checkpoint is None or mentions(checkpoint) else checkpoint,
                        run_id,
                    ),
                )
                changed.add(run_id)
            rows = tx.execute("SELECT connector, source, checkpoint, run_id FROM checkpoints")
            for connector, source, checkpoint, run_id in rows.fetchall():
                if mentions(checkpoint):
                    tx.execute(
                        "DELETE FROM checkpoints WHERE connector = ? AND source = ?",
                        (connector, source),
                    )
                    changed.add(run_id)
        store.scrub()
        return len(changed)

    def checkpoint(self, connector: str, source: str) -> Checkpoint | None:
        rows = self._query(
            "SELECT checkpoint FROM checkpoints WHERE connector = ? AND source = ?",
            (connector, source),
        )
        return json.loads(rows[0][0]) if rows else None

    def get(self, run_id: str) -> SourceRunInfo | None:
        rows = self._query(f"SELECT {_COLUMNS} FROM runs WHERE run_id = ?", (run_id,))
        return _info(rows[0]) if rows else None

    def page(
        self, source: str | None, connector: str | None, limit: int, before: int | None
    ) -> list[tuple[int, SourceRunInfo]]:
        conditions: list[str] = []
        parameters: list[object] = []
        if source is not None:
            conditions.append("source = ?")
            parameters.append(source)
        if connector is not None:
            conditions.append("connector = ?")
            parameters.append(connector)
        if before is not None:
            conditions.append("seq < ?")
            parameters.append(before)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        rows = self._query(
            f"SELECT {_COLUMNS} FROM runs {where} ORDER BY seq DESC LIMIT ?", (*parameters, limit)
        )
        return [(int(row[0]), _info(row)) for row in rows]

    def _query(self, statement: str, parameters: Sequence[object]) -> list[tuple[Any, ...]]:
        def query(db: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return [tuple(row) for row in db.execute(statement, parameters).fetchall()]

        return self._open_store().read(query)

    def _open_store(self) -> SqliteConsumerStore:
        if self._store is None:
            raise RuntimeError("the source run store is not open: call SourceRuns.open() first")
        return self._store


def _erased(value: Any, mentions: Callable[[str], bool]) -> Any:
    """A JSON value with every string, and every object or list inside a list (an item),
    that ``mentions`` flags replaced by :data:`ERASED`."""
    if isinstance(value, str):
        return ERASED if mentions(value) else value
    if isinstance(value, list):
        return [
            ERASED
            if isinstance(element, dict | list) and mentions(json.dumps(element))
            else _erased(element, mentions)
            for element in value
        ]
    if isinstance(value, dict):
        return {
            (ERASED if mentions(key) else key): _erased(element, mentions)
            for key, element in value.items()
        }
    return value


def _info(row: tuple[Any, ...]) -> SourceRunInfo:
    (
        _,
        run_id,
        connector,
        source,
        full_refresh,
        state,
        read,
        accepted,
        duplicate,
        rejected,
        checkpoint,
        rejections,
        error,
        created_at,
        started_at,
        finished_at,
    ) = row
    return SourceRunInfo(
        run_id=run_id,
        connector=connector,
        source=source,
        full_refresh=bool(full_refresh),
        state=RunState(state),
        created_at=_time(created_at),
        items_read=read,
        items_accepted=accepted,
        items_duplicate=duplicate,
        items_rejected=rejected,
        checkpoint=None if checkpoint is None else json.loads(checkpoint),
        rejections=tuple(Rejection(where, what) for where, what in json.loads(rejections)),
        error=error,
        started_at=None if started_at is None else _time(started_at),
        finished_at=None if finished_at is None else _time(finished_at),
    )


def _time(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)
