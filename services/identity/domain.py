"""The identity domain as a whole: the graph, its store, the resolver and the outbox.

The graph lives in memory and is changed only under ``lock``: by the event-log consumer (in
its worker thread) and by the manual operations (merge, unmerge, rules), each in a store
transaction that also queues what the resolution log must say.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from profilemesh.services.identity import messages
from profilemesh.services.identity.graph import IdentityGraph, MergeOutcome, UnmergeOutcome
from profilemesh.services.identity.identifiers import Identifier
from profilemesh.services.identity.record_matching import RecordMatcher
from profilemesh.services.identity.resolver import Resolver, entry_bytes
from profilemesh.services.identity.rules import Rules
from profilemesh.services.identity.store import GraphStore
from profilemesh.shared.errors import Unavailable
from profilemesh.shared.log.api import LogReader
from profilemesh.shared.log.consumer import LogConsumer
from profilemesh.shared.log.embedded import EmbeddedLog
from profilemesh.shared.log.outbox import Outbox
from profilemesh.shared.log.sqlite_store import SqliteConsumerStore
from profilemesh.shared.supervision import fail_stop, stop_background

log = logging.getLogger(__name__)
T = TypeVar("T")

CONSUMER = "identity"


class Identity:
    """The identity service's state under ``data_dir``; usable once :meth:`open` ran."""

    def __init__(
        self, data_dir: Path, rules_file: Path | None = None, *, match_min_records: int = 1000
    ) -> None:
        self.data_dir = data_dir
        self.rules_file = rules_file
        self.matcher = RecordMatcher(match_min_records)
        self.lock = threading.Lock()
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

    async def open(self, resolutions: EmbeddedLog, events: LogReader) -> None:
        """Load the graph, then follow the event log and publish the resolution log."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        store = SqliteConsumerStore(self.data_dir / "identity.sqlite")
        store.schema(GraphStore.schema())
        store.schema(RecordMatcher.schema())
        store.read(self.matcher.load)
        rules = store.read(GraphStore.load_rules)
        if rules is None:
            rules = Rules.from_yaml(self.rules_file) if self.rules_file else Rules()
        graph = await asyncio.to_thread(store.read, lambda c: GraphStore.load(c, rules))
        # The graph is millions of long-lived objects: without freezing them, every full
        # garbage collection walks them all (100-700 ms pauses in the middle of an item).
        gc.freeze()
        outbox = Outbox(store, resolutions)
        consumer: LogConsumer[object] = LogConsumer(
            CONSUMER,
            events,
            store,  # type: ignore[arg-type]
            Resolver(graph, self.lock, outbox, self.matcher),  # type: ignore[arg-type]
            on_applied=lambda _: outbox.notify(),
        )
        self._store, self._graph, self._outbox, self._consumer = store, graph, outbox, consumer
        self._tasks = [
            asyncio.create_task(fail_stop("identity", "outbox", outbox.run)),
            asyncio.create_task(fail_stop("identity", "consumer", consumer.run)),
        ]

    async def close(self) -> None:
        """Stop following the log, publish what is queued, close the store."""
        await stop_background([self._consumer] if self._consumer else [], self._tasks, self._outbox)
        if self._store is not None:
            self._store.close()
        self._store = self._graph = self._outbox = self._consumer = None

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
    ) -> T:
        """Run ``operation`` on the graph in a store transaction with what it publishes."""
        graph, store = self.graph, self.store
        outbox = self._outbox
        assert outbox is not None

        def run() -> T:
            with self.lock, store.transaction() as tx:
                result = operation(graph)
                GraphStore.save(tx, graph.drain_changes())
                outbox.put(tx, publish(result))
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
