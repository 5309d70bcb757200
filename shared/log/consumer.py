"""Applying a log to a consumer's state, with the offset committed in the same transaction.

A consumer's state and its position in the log live in one store and change together: a batch
is applied by a handler inside a transaction that also moves the committed offset, so a crash
at any point leaves either both or neither. Restarting resumes at the committed offset and
skips whatever was already applied, so every record takes effect exactly once (effectively
once) although the log delivers at least once.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import random
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import ClassVar, Generic, TypeVar

from opentelemetry import trace

from profilemesh.shared import metrics
from profilemesh.shared.errors import Unavailable
from profilemesh.shared.log.api import LogReader, OffsetOutOfRange, RecordBatch
from profilemesh.shared.log.partition_leases import LeaseLost, PartitionLeases
from profilemesh.shared.telemetry import batch_span

log = logging.getLogger(__name__)

_T = TypeVar("_T")
Tx = TypeVar("Tx")
"""What a store's transaction hands the handler (a connection, a session...)."""

Handler = Callable[[Tx, RecordBatch], None]
"""Applies one batch to the consumer's state through the open transaction."""

# Errors after which subscribing again may succeed: the remote client raises Unavailable, a
# socket ConnectionError (an OSError). Anything else is a bug or a decision to stop.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (Unavailable, OSError)


_tracer = trace.get_tracer(__name__)


class ConsumerStore(ABC, Generic[Tx]):
    """Where consumers keep their state and their committed offsets, in one transaction.

    An implementation provides a transaction and reading/writing an offset inside it; the
    skipping and committing logic of :meth:`apply` is shared. Methods are synchronous (they
    run in a worker thread, see :class:`LogConsumer`) because the stores are blocking
    databases (SQLite, PostgreSQL).
    """

    concurrency: ClassVar[int] = 1
    """How many :meth:`apply` calls may run at once (a single SQLite connection: one)."""

    @abstractmethod
    def committed(self, consumer: str, stream: str) -> dict[int, int]:
        """Partition -> next offset to read, for every partition ``consumer`` has committed."""

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Tx]:
        """A transaction: committed when the block exits normally, rolled back if it raises.

        It must exclude other writers of the offsets from the start (SQLite's
        ``BEGIN IMMEDIATE``, a row lock in PostgreSQL), so that reading the committed offset
        and moving it cannot interleave with another apply.
        """

    @abstractmethod
    def committed_offset(self, tx: Tx, consumer: str, stream: str, partition: int) -> int | None:
        """The next offset to read of one partition, read inside ``tx`` (None: never committed)."""

    @abstractmethod
    def commit_offset(
        self, tx: Tx, consumer: str, stream: str, partition: int, next_offset: int
    ) -> None:
        """Record ``next_offset`` as the partition's next offset to read, inside ``tx``."""

    def apply(
        self,
        consumer: str,
        stream: str,
        batch: RecordBatch,
        handler: Handler[Tx],
        fence: Callable[[Tx, int], None] | None = None,
    ) -> None:
        """Apply the records of ``batch`` not applied yet and move the offset, atomically.

        ``fence``, when given, runs first inside the transaction and may raise to refuse the
        apply (a replica that lost its lease on the partition, see :mod:`.partition_leases`).

        Records below the committed offset were applied by an earlier delivery and are skipped
        (the whole batch, if it lies entirely below); so are redacted records, the handler
        being called once per run of consecutive records around them (not at all when every
        record is redacted). If ``handler`` raises, the transaction rolls back, leaving state
        and offset as they were, and the exception propagates.
        Raises :class:`OffsetOutOfRange` if the batch starts beyond the committed offset:
        applying it would silently skip records.
        """
        with self.transaction() as tx:
            if fence is not None:
                fence(tx, batch.partition)
            committed = self.committed_offset(tx, consumer, stream, batch.partition)
            if committed is not None:
                if batch.next_offset <= committed:
                    return
                if batch.base_offset > committed:
                    raise OffsetOutOfRange(
                        f"{consumer} committed {stream}/{batch.partition} up to offset "
                        f"{committed}, but the batch starts at {batch.base_offset}",
                        reason="OFFSET_GAP",
                    )
                batch = batch.starting_at(committed)
            # Redacted records (a person's data erased) hold nothing to apply: the handler
            # sees the runs around them, and the offset still moves past them.
            for run in batch.without_redacted():
                handler(tx, run)
            self.commit_offset(tx, consumer, stream, batch.partition, batch.next_offset)


class LogConsumer(Generic[Tx]):
    """Follows partitions of a log and applies every batch to a :class:`ConsumerStore`.

    One task per owned partition subscribes from the committed offset (or the first retained
    one when nothing is committed) and hands each batch to ``store.apply`` in a worker thread;
    at most ``store.concurrency`` applies run at once. A subscription that fails with a
    transient error is resumed after the last applied batch, after an exponential backoff with
    jitter. A handler error stops the consumer and propagates from :meth:`run`: skipping a
    record that cannot be applied would silently corrupt the state.
    """

    def __init__(
        self,
        name: str,
        source: LogReader,
        store: ConsumerStore[Tx],
        handler: Handler[Tx],
        *,
        partitions: Iterable[int] | None = None,
        max_records: int = 5000,
        initial_backoff_seconds: float = 0.05,
        max_backoff_seconds: float = 5.0,
        on_applied: Callable[[RecordBatch], None] | None = None,
        leases: PartitionLeases | None = None,
        on_assigned: Callable[[frozenset[int]], None] | None = None,
    ) -> None:
        self.name = name
        self.leases = leases
        """Set when replicas share the partitions (see :mod:`.partition_leases`); a store
        that says it is ``shared`` gets leases of its own when the consumer starts."""
        self.on_assigned = on_assigned
        """Called (in a worker thread) with the partitions this replica has just gained,
        before it applies any of them: in-memory state must be reloaded from the store, which
        another replica changed meanwhile."""
        self.on_applied = on_applied
        self.source = source
        self.store = store
        self.handler = handler
        self.max_records = max_records
        self.initial_backoff_seconds = initial_backoff_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self._owned = sorted(set(partitions)) if partitions is not None else None
        self._next: dict[int, int] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._runner: asyncio.Task[None] | None = None
        self._stopping = False

    async def run(self) -> None:
        """Apply every batch as it arrives, until :meth:`stop` (then return normally)."""
        await self._run(stop_at_end=False)

    async def run_until_caught_up(self) -> None:
        """Apply every record present now, then return (tests, batch rebuilds)."""
        await self._run(stop_at_end=True)

    def stop(self) -> None:
        """Ask the consumer to stop.

        A run in progress returns once its in-flight applies have committed or rolled back; a
        run that has not started yet returns at once.
        """
        self._stopping = True
        if self._runner is not None:
            self._runner.cancel()

    async def lag(self) -> dict[int, int]:
        """Partition -> how many retained records are not applied yet, per owned partition.

        Positions come from the store (what is committed is what is applied), so the answer
        never lags behind a transaction that has just committed.
        """
        ranges = await self.source.offsets()
        committed = await asyncio.to_thread(self.store.committed, self.name, self.source.stream)
        owned = self._owned if self._owned is not None else [r.partition for r in ranges]
        return {
            p: max(0, ranges[p].next - committed.get(p, ranges[p].first))
            for p in owned
            if p < len(ranges)
        }

    # -- running ---------------------------------------------------------------------------

    async def _run(self, stop_at_end: bool) -> None:
        if self._runner is not None:
            raise RuntimeError(f"consumer {self.name} is already running")
        runner = asyncio.current_task()
        if runner is None:
            raise RuntimeError("LogConsumer must run inside an asyncio task")
        executor = ThreadPoolExecutor(
            max_workers=self.store.concurrency, thread_name_prefix=f"consumer-{self.name}"
        )
        self._executor, self._runner = executor, runner
        metrics.watch_lag(self)
        try:
            if not self._stopping:
                await self._consume_all(stop_at_end)
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            runner.uncancel()  # the cancellation was our own stop(), not the caller's
        finally:
            metrics.unwatch_lag(self)
            self._executor = self._runner = None
            self._stopping = False
            # Applies still running were waited for; nothing is left for these threads.
            executor.shutdown(wait=False)

    async def _consume_all(self, stop_at_end: bool) -> None:
        ranges = await self._retrying("read the offsets", self.source.offsets)
        if self.leases is None and self._owned is None and getattr(self.store, "shared", False):
            self.leases = await asyncio.to_thread(
                PartitionLeases,
                self.store,  # type: ignore[arg-type]
                self.name,
                len(ranges),
            )
        if self.leases is not None:
            await self._consume_leased(stop_at_end)
            return
        committed = await self._in_store(self.store.committed, self.name, self.source.stream)
        owned = self._owned if self._owned is not None else [r.partition for r in ranges]
        for partition in owned:
            if not 0 <= partition < len(ranges):
                raise ValueError(f"{self.source.stream} has no partition {partition}")
            self._next[partition] = committed.get(partition, ranges[partition].first)
        tasks = [
            asyncio.create_task(
                self._consume(partition, stop_at_end), name=f"{self.name}/p{partition}"
            )
            for partition in owned
        ]
        if not tasks:
            return
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()
            # Wait even when cancelled: each task waits for its in-flight apply.
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            if not task.cancelled() and (error := task.exception()) is not None:
                raise error

    async def _consume_leased(self, stop_at_end: bool) -> None:
        """Consume the partitions this replica holds a lease on, following the leases as they
        move between replicas; give them back when stopping."""
        leases = self.leases
        assert leases is not None
        tasks: dict[int, asyncio.Task[None]] = {}
        changes = leases.changes()
        next_change: asyncio.Task[frozenset[int]] = asyncio.ensure_future(anext(changes))
        try:
            while True:
                done, _ = await asyncio.wait(
                    {next_change, *tasks.values()}, return_when=asyncio.FIRST_COMPLETED
                )
                for partition, task in list(tasks.items()):
                    if task in done:
                        del tasks[partition]
                        if not task.cancelled() and (error := task.exception()) is not None:
                            raise error
                if next_change not in done:
                    if stop_at_end and not tasks:
                        return
                    continue
                owned = next_change.result()
                next_change = asyncio.ensure_future(anext(changes))
                for partition in set(tasks) - owned:
                    tasks.pop(partition).cancel()
                gained = frozenset(owned - set(tasks))
                if not gained:
                    continue
                log.info(
                    "consumer %s now holds %s/%s", self.name, self.source.stream, sorted(owned)
                )
                if self.on_assigned is not None:
                    await asyncio.to_thread(self.on_assigned, gained)
                ranges = await self._retrying("read the offsets", self.source.offsets)
                committed = await self._in_store(
                    self.store.committed, self.name, self.source.stream
                )
                for partition in gained:
                    self._next[partition] = committed.get(partition, ranges[partition].first)
                    tasks[partition] = asyncio.create_task(
                        self._consume(partition, stop_at_end), name=f"{self.name}/p{partition}"
                    )
        finally:
            next_change.cancel()
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(next_change, *tasks.values(), return_exceptions=True)
            await changes.aclose()
            try:
                await asyncio.to_thread(leases.release)
            except Exception:  # the leases expire on their own
                log.warning("consumer %s could not give its leases back", self.name)

    async def _consume(self, partition: int, stop_at_end: bool) -> None:
        failures = 0
        while True:
            subscription = self.source.subscribe(
                partition,
                self._next[partition],
                stop_at_end=stop_at_end,
                max_records=self.max_records,
            )
            try:
                while True:
                    # Only the subscription's errors may be transient: a failed apply is not
                    # retried, it stops the consumer.
                    try:
                        batch = await anext(subscription)
                    except StopAsyncIteration:
                        return
                    except TRANSIENT_ERRORS as error:
                        failures += 1
                        delay = self._backoff(failures)
                        log.warning(
                            "consumer %s lost %s/%d (%s); resuming at offset %d in %.2fs",
                            self.name,
                            self.source.stream,
                            partition,
                            error,
                            self._next[partition],
                            delay,
                        )
                        break
                    failures = 0
                    try:
                        await self._apply(batch)
                    except LeaseLost as lost:
                        log.warning("consumer %s: %s; letting it go", self.name, lost)
                        return
            finally:
                await _close(subscription)
            await asyncio.sleep(delay)

    async def _apply(self, batch: RecordBatch) -> None:
        # One span per batch, the child of its first record's producer (the trace context
        # travels in each record's headers), so that one trace follows a message from service
        # to service, and linked to every producer of the batch. Whatever the handler appends
        # or queues in its outbox carries this span's context on.
        source = self.source
        common = {
            "messaging.system": source.messaging_system,
            "messaging.destination.name": source.stream,
            "messaging.destination.partition.id": str(batch.partition),
            "messaging.consumer.group.name": self.name,
        }
        started = time.perf_counter()
        with batch_span(
            _tracer,
            f"consume {source.stream}",
            (batch.headers_of(index) for index in range(len(batch))),
            kind=trace.SpanKind.CONSUMER,
            attributes={
                **common,
                "messaging.operation.type": "process",
                "messaging.batch.message_count": len(batch),
                "messaging.profilemesh.first_offset": batch.base_offset,
                "messaging.profilemesh.last_offset": batch.last_offset,
            },
        ):
            await self._apply_in_store(batch)
        metrics.process_duration.record(time.perf_counter() - started, common)
        metrics.consumed_messages.add(len(batch), common)
        if self.on_applied is not None:
            self.on_applied(batch)

    async def _apply_in_store(self, batch: RecordBatch) -> None:
        fence = self.leases.check if self.leases is not None else None
        future = self._in_store(
            self.store.apply, self.name, self.source.stream, batch, self.handler, fence
        )
        cancelled = False
        # The transaction runs to its end in its thread whatever happens here, so a
        # cancellation waits for it: the store must not be closed under a running apply, and
        # the position kept must be what the store committed.
        while not future.done():
            try:
                await asyncio.wait([future])
            except asyncio.CancelledError:
                cancelled = True
        if future.exception() is None:
            self._next[batch.partition] = batch.next_offset
        if cancelled:
            raise asyncio.CancelledError
        future.result()

    def _in_store(self, function: Callable[..., _T], *args: object) -> asyncio.Future[_T]:
        """Run a store call on the consumer's executor, in the caller's context (tracing)."""
        if self._executor is None:
            raise RuntimeError(f"consumer {self.name} is not running")
        call = functools.partial(contextvars.copy_context().run, function, *args)
        return asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def _retrying(self, what: str, call: Callable[[], Awaitable[_T]]) -> _T:
        failures = 0
        while True:
            try:
                return await call()
            except TRANSIENT_ERRORS as error:
                failures += 1
                delay = self._backoff(failures)
                log.warning(
                    "consumer %s could not %s of %s (%s); retrying in %.2fs",
                    self.name,
                    what,
                    self.source.stream,
                    error,
                    delay,
                )
                await asyncio.sleep(delay)

    def _backoff(self, failures: int) -> float:
        """Exponential in the failures so far, capped, with jitter so that consumers that
        lost the same producer do not all come back at the same instant."""
        ceiling = min(
            self.max_backoff_seconds, self.initial_backoff_seconds * 2.0 ** min(failures - 1, 20)
        )
        return ceiling * random.uniform(0.5, 1.0)


async def _close(subscription: AsyncIterator[RecordBatch]) -> None:
    """Close an async generator now (a gRPC call is cancelled, a file released), not when the
    garbage collector gets to it."""
    aclose = getattr(subscription, "aclose", None)
    if aclose is not None:
        await aclose()
