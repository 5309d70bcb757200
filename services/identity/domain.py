"""The identity domain as a whole: the graph, its store, the resolver and the outbox.

The graph lives in memory and is changed only under ``lock``: by the event-log consumer (in
its worker thread) and by the manual operations (merge, unmerge, rules), each in a store
transaction that also queues what the resolution log must say.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import grpc

from profilemesh.common.v1 import identifier_pb2, profile_pb2
from profilemesh.identity.v1 import deletion_pb2
from profilemesh.ingestion.v1 import ingestion_service_pb2, ingestion_service_pb2_grpc
from profilemesh.services.identity import consent, deletions, messages, suppression
from profilemesh.services.identity.consent import ConsentBook
from profilemesh.services.identity.extraction import Evidence
from profilemesh.services.identity.graph import (
    DeletionOutcome,
    IdentityGraph,
    MergeOutcome,
    UnmergeOutcome,
)
from profilemesh.services.identity.identifiers import Identifier
from profilemesh.services.identity.record_matching import RecordMatcher
from profilemesh.services.identity.resolver import Resolver, entry_bytes
from profilemesh.services.identity.rules import Rules
from profilemesh.services.identity.store import GraphStore
from profilemesh.services.identity.suppression import SuppressionList
from profilemesh.shared.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from profilemesh.shared.log.api import Log, LogReader
from profilemesh.shared.log.consumer import LogConsumer
from profilemesh.shared.log.outbox import Outbox
from profilemesh.shared.log.sqlite_store import SqliteConsumerStore
from profilemesh.shared.log.stores import StoreOpener, files_under
from profilemesh.shared.supervision import fail_stop, stop_background

log = logging.getLogger(__name__)
T = TypeVar("T")

CONSUMER = "identity"


class Identity:
    """The identity service's state under ``data_dir``; usable once :meth:`open` ran."""

    def __init__(
        self,
        data_dir: Path,
        rules_file: Path | None = None,
        *,
        match_min_records: int = 1000,
        connect_ingestion: Callable[[], grpc.aio.Channel] | None = None,
        stores: StoreOpener | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.stores = stores or files_under(data_dir)
        """Opens the store (a SQLite file under ``data_dir`` unless the backend says else)."""
        self.rules_file = rules_file
        self.matcher = RecordMatcher(match_min_records)
        self.suppressions = SuppressionList()
        self.connect_ingestion = connect_ingestion
        """How to reach ingestion, which drops suppressed events and purges deleted ones."""
        self.lock = threading.Lock()
        self._consent: ConsentBook | None = None
        self._driver: deletions.Driver | None = None
        self._graph: IdentityGraph | None = None
        self._store: SqliteConsumerStore | None = None
        self._outbox: Outbox | None = None
        self._consumer: LogConsumer[object] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def graph(self) -> IdentityGraph:
        if self._graph is None:
            raise Unavailable("identity is starting or stopping")
        return self._graph

    @property
    def store(self) -> SqliteConsumerStore:
        if self._store is None:
            raise Unavailable("identity is starting or stopping")
        return self._store

    async def open(self, resolutions: Log, events: LogReader) -> None:
        """Load the graph, then follow the event log and publish the resolution log."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        store = self.stores("identity")
        store.schema(GraphStore.schema())
        store.schema(RecordMatcher.schema())
        store.schema(suppression.SCHEMA)
        store.schema(consent.SCHEMA)
        store.schema(deletions.SCHEMA)
        store.read(self.matcher.load)
        store.read(self.suppressions.load)
        rules = store.read(GraphStore.load_rules)
        if rules is None:
            rules = Rules.from_yaml(self.rules_file) if self.rules_file else Rules()
        graph = await asyncio.to_thread(store.read, lambda c: GraphStore.load(c, rules))
        # The graph is millions of long-lived objects: without freezing them, every full
        # garbage collection walks them all (100-700 ms pauses in the middle of an item).
        gc.freeze()
        consent_book = ConsentBook(graph.identifiers_of)
        consent_book.restore(store.read(consent.load))
        outbox = Outbox(store, resolutions)
        resolver = Resolver(graph, self.lock, outbox, self.matcher, self.suppressions, consent_book)
        consumer: LogConsumer[object] = LogConsumer(
            CONSUMER,
            events,
            store,  # type: ignore[arg-type]
            resolver,  # type: ignore[arg-type]
            on_applied=lambda _: outbox.notify(),
        )
        driver = deletions.Driver(store, resolutions, outbox, self._ingestion_channel)
        self._store, self._graph, self._outbox, self._consumer = store, graph, outbox, consumer
        self._consent, self._driver = consent_book, driver
        self._tasks = [
            asyncio.create_task(fail_stop("identity", "outbox", outbox.run)),
            asyncio.create_task(fail_stop("identity", "consumer", consumer.run)),
            asyncio.create_task(fail_stop("identity", "deletions", driver.run)),
        ]

    async def close(self) -> None:
        """Stop following the log, publish what is queued, close the store."""
        await stop_background([self._consumer] if self._consumer else [], self._tasks, self._outbox)
        if self._store is not None:
            self._store.close()
        self._store = self._graph = self._outbox = self._consumer = None
        self._consent = self._driver = None

    @property
    def consent(self) -> ConsentBook:
        if self._consent is None:
            raise Unavailable("identity is starting or stopping")
        return self._consent

    def _ingestion_channel(self) -> grpc.aio.Channel:
        if self.connect_ingestion is None:
            raise Unavailable("identity was started without a way to reach ingestion")
        return self.connect_ingestion()

    async def lag(self) -> dict[int, int]:
        """How far the consumer is behind the event log, per partition."""
        if self._consumer is None:
            raise Unavailable("identity is starting or stopping")
        return await self._consumer.lag()

    # -- manual operations ------------------------------------------------------------------

    async def _change(
        self,
        operation: Callable[[IdentityGraph], T],
        publish: Callable[[T], list[tuple[str, bytes]]],
        *,
        extra: Callable[[sqlite3.Connection], None] | None = None,
        extra_with_result: Callable[[sqlite3.Connection, T], None] | None = None,
    ) -> T:
        """Run ``operation`` on the graph in a store transaction with what it publishes (and
        what ``extra`` writes beside the graph)."""
        graph, store = self.graph, self.store
        outbox = self._outbox
        assert outbox is not None

        def run() -> T:
            with self.lock, store.transaction() as tx:
                result = operation(graph)
                GraphStore.save(tx, graph.drain_changes())
                entries = publish(result)
                if extra is not None:
                    extra(tx)
                if extra_with_result is not None:
                    extra_with_result(tx, result)
                outbox.put(tx, entries)
                return result

        result = await asyncio.to_thread(run)
        outbox.notify()
        return result

    async def merge(self, profile_ids: Sequence[str], reason: str) -> MergeOutcome:
        """Merge profiles by hand (refused when a limit would break)."""

        def publish(outcome: MergeOutcome) -> list[tuple[str, bytes]]:
            record = outcome.record
            entries = [(record.surviving_profile_id, entry_bytes(messages.merge_entry(record)))]
            if outcome.traits is not None:
                t = outcome.traits
                entry = messages.traits_entry(t.profile_id, t.traits, t.changed, record.occurred_at)
                entries.append((t.profile_id, entry_bytes(entry)))
            return entries

        return await self._change(lambda g: g.merge(profile_ids, reason), publish)

    async def unmerge(
        self, profile_id: str, identifiers: Sequence[Identifier], reason: str
    ) -> UnmergeOutcome:
        """Split identifiers off a profile."""

        graph = self.graph

        def publish(outcome: UnmergeOutcome) -> list[tuple[str, bytes]]:
            record = outcome.record
            original = record.profile_ids[0] if record.profile_ids else ""
            # Runs under the graph's lock, so the members are those right after the split.
            members = {p: graph.identifiers_of(p) for p in record.resulting_profile_ids}
            entries = [(original, entry_bytes(messages.merge_entry(record, members)))]
            for t in outcome.traits:
                entry = messages.traits_entry(t.profile_id, t.traits, t.changed, record.occurred_at)
                entries.append((t.profile_id, entry_bytes(entry)))
            return entries

        return await self._change(lambda g: g.unmerge(profile_id, identifiers, reason), publish)

    async def set_rules(self, rules: Rules) -> Rules:
        """Replace the rules (they apply to what arrives from now on)."""

        def apply(graph: IdentityGraph) -> Rules:
            graph.rules = rules
            return rules

        def save(_: Rules) -> list[tuple[str, bytes]]:
            return []

        result = await self._change(apply, save)
        await asyncio.to_thread(self._save_rules, rules)
        return result

    def _save_rules(self, rules: Rules) -> None:
        with self.store.transaction() as tx:
            GraphStore.save_rules(tx, rules)

    # -- privacy -----------------------------------------------------------------------------

    async def update_consent(
        self,
        profile_id: str | None,
        identifier: Identifier | None,
        decisions: Sequence[tuple[str, bool, int, str]],
    ) -> tuple[str, list[profile_pb2.ConsentState]]:
        """Record ``(purpose, granted, updated_at_ns, source)`` decisions for a profile, or for
        the profile of ``identifier`` (created for it when none has it yet, so that consent can
        be recorded before a person's first event)."""
        consent_book = self.consent
        now = time.time_ns()

        def operation(graph: IdentityGraph) -> tuple[str, list[profile_pb2.ConsentState]]:
            if identifier is not None:
                if self.suppressions.any_suppressed([identifier]):
                    raise FailedPrecondition(
                        "the identifier is suppressed",
                        violations=[("identifier", "suppressed: unsuppress it first")],
                    )
                live = graph.resolve(identifier)
                if live is None:
                    outcome = graph.link(
                        Evidence(identifiers=(identifier,), source="api", occurred_at=now)
                    )
                    if outcome.profile_id is None:
                        raise InvalidArgument.for_field("identifier", "this identifier never links")
                    live = outcome.profile_id
            else:
                assert profile_id is not None
                live = graph.canonical(profile_id)
                if live is None:
                    raise NotFound(
                        "no such profile", violations=[("profile_id", "no profile has it")]
                    )
            anchor = graph.identifiers_of(live)[0]
            changed: set[str] = set()
            for purpose, granted, updated_at, source in decisions:
                changed |= set(
                    consent_book.observe(live, anchor, {purpose: granted}, source, updated_at)
                )
            return live, consent_book.states(live, changed) if changed else []

        def publish(result: tuple[str, list[profile_pb2.ConsentState]]) -> list[tuple[str, bytes]]:
            live, changed = result
            if not changed:
                return []
            return [(live, entry_bytes(messages.consent_entry(live, changed, now)))]

        live, _ = await self._change(
            operation, publish, extra=lambda tx: consent.save(tx, consent_book.drain_dirty())
        )
        return live, consent_book.states(live)

    async def delete(
        self, profile_id: str | None, identifier: Identifier | None, reason: str, suppress: bool
    ) -> deletion_pb2.DeletionJob:
        """Erase a person from identity now and start the job that erases them everywhere."""
        consent_book = self.consent
        jobs: list[deletion_pb2.DeletionJob] = []

        def operation(graph: IdentityGraph) -> DeletionOutcome:
            target = profile_id
            field = "profile_id"
            if identifier is not None:
                target, field = graph.resolve(identifier), "identifier"
            live = graph.canonical(target) if target else None
            if live is None:
                raise NotFound("no such profile", violations=[(field, "no profile has it")])
            return graph.delete(live)

        def publish(outcome: DeletionOutcome) -> list[tuple[str, bytes]]:
            now = time.time_ns()
            job = deletions.new_job(outcome.profile_id, reason, suppress)
            jobs.append(job)
            return [
                (
                    outcome.profile_id,
                    entry_bytes(messages.deletion_entry(outcome.profile_id, job.job_id, now)),
                )
            ]

        def extra(tx: sqlite3.Connection, outcome: DeletionOutcome) -> None:
            consent_book.forget(outcome.identifiers)
            consent.erase(tx, outcome.identifiers)
            RecordMatcher.forget(tx, outcome.identifiers)
            if suppress:
                self.suppressions.add(tx, outcome.identifiers, f"deleted: {reason}")
                self.suppressions.apply(added=outcome.identifiers)
            deletions.create(tx, jobs[0], outcome.identifiers, outcome.profile_ids)

        await self._change(operation, publish, extra_with_result=extra)
        if self._driver is not None:
            self._driver.notify()
        return jobs[0]

    async def deletion(self, job_id: str) -> deletion_pb2.DeletionJob:
        job = await asyncio.to_thread(self.store.read, lambda c: deletions.get(c, job_id))
        if job is None:
            raise NotFound("no such deletion job", violations=[("job_id", "unknown")])
        return job

    async def report_deletion(
        self, job_id: str, service: str, state: int, error: str
    ) -> deletion_pb2.DeletionJob:
        def write() -> deletion_pb2.DeletionJob | None:
            with self.store.transaction() as tx:
                return deletions.report(tx, job_id, service, state, error)

        job = await asyncio.to_thread(write)
        if job is None:
            raise NotFound("no such deletion job", violations=[("job_id", "unknown")])
        return job

    async def suppress(self, identifiers: Sequence[Identifier], reason: str) -> None:
        """Suppress ``identifiers`` here, then at ingestion (which drops their events)."""

        def write() -> None:
            with self.lock, self.store.transaction() as tx:
                self.suppressions.add(tx, identifiers, reason)
                self.suppressions.apply(added=identifiers)

        await asyncio.to_thread(write)
        await self._at_ingestion("SuppressIdentifiers", identifiers, reason)

    async def unsuppress(self, identifiers: Sequence[Identifier], reason: str) -> int:
        """Lift the suppression of ``identifiers`` here and at ingestion; how many were."""

        def write() -> int:
            with self.lock, self.store.transaction() as tx:
                removed = self.suppressions.remove(tx, identifiers)
                self.suppressions.apply(removed=identifiers)
                return removed

        removed = await asyncio.to_thread(write)
        await self._at_ingestion("UnsuppressIdentifiers", identifiers, reason)
        return removed

    async def _at_ingestion(
        self, method: str, identifiers: Sequence[Identifier], reason: str
    ) -> None:
        request_type = getattr(ingestion_service_pb2, f"{method}Request")
        channel = self._ingestion_channel()
        try:
            stub = ingestion_service_pb2_grpc.IngestionServiceStub(channel)
            wire = [identifier_pb2.Identifier(type=i.type, value=i.value) for i in identifiers]
            request = request_type(identifiers=wire)
            if method == "SuppressIdentifiers":
                request.reason = reason
            await getattr(stub, method)(request)
        except grpc.aio.AioRpcError as error:
            raise Unavailable(
                f"ingestion did not take the change ({error.details()}); identity did:"
                " repeat the call"
            ) from None
        finally:
            await channel.close()
