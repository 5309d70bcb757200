"""The features domain as a whole: definitions, streaming state, the event store, the consumer
of the resolution log and the outbox of the feature-change log.

The state lives in memory and changes only under ``lock``: by the consumer (in its worker
thread) and by backfills, which rebuild profiles a chunk at a time so that online reads and the
consumer never wait long.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa

from profilemesh.services.features import batch, lifetime_value
from profilemesh.services.features.applier import Applier
from profilemesh.services.features.definitions import FeatureDefinition, FeatureSet
from profilemesh.services.features.event_store import VIEW, DuckDBEventStore, EventStore
from profilemesh.services.features.lifetime_value import LifetimeValueModel
from profilemesh.services.features.postgres_events import PostgresEventStore
from profilemesh.services.features.registry import Registry
from profilemesh.services.features.state import ProfileState
from profilemesh.services.features.state_table import StateTable, build_states
from profilemesh.shared import deletion_reports
from profilemesh.shared.deletion_reports import DeletionReporter
from profilemesh.shared.errors import InvalidArgument, NotFound, Unavailable
from profilemesh.shared.log.api import Log, LogReader, RecordBatch, partition_for
from profilemesh.shared.log.consumer import LogConsumer
from profilemesh.shared.log.outbox import Outbox
from profilemesh.shared.log.postgres_store import PostgresConsumerStore
from profilemesh.shared.log.sqlite_store import SqliteConsumerStore
from profilemesh.shared.log.stores import StoreOpener, files_under
from profilemesh.shared.supervision import fail_stop, stop_background

log = logging.getLogger(__name__)

CONSUMER = "features"
STREAM = "resolutions"
LIFETIME_VALUE_REFIT_NS = 3600 * 1_000_000_000
"""The lifetime value model is refitted when it is older than this and asked for."""
BACKFILL_CHUNK = 2_000
"""Profiles rebuilt per step of a backfill (the lock is held for one step)."""


class BackfillJob:
    """Progress of one backfill, as GetBackfill reports it."""

    def __init__(self, names: Sequence[str]) -> None:
        self.job_id = uuid.uuid4().hex[:16]
        self.feature_names = list(names)
        self.state = "PENDING"
        self.progress = 0.0
        self.events_processed = 0
        self.profiles_updated = 0
        self.error = ""
        self.created_at = time.time_ns()
        self.started_at = 0
        self.finished_at = 0


class Features:
    """The features service's state under ``data_dir``; usable once :meth:`open` ran."""

    def __init__(
        self,
        data_dir: Path,
        definitions_file: Path | None = None,
        identity_channel: Callable[[], grpc.aio.Channel] | None = None,
        stores: StoreOpener | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.stores = stores or files_under(data_dir)
        """Opens the store (a SQLite file under ``data_dir`` unless the backend says else)."""
        self.identity_channel = identity_channel
        """How to reach identity, to report the deletions this service carried out."""
        self.definitions_file = definitions_file
        # Locks are always taken in this order: the store's transaction, ``writer``, ``lock``.
        self.writer = threading.Lock()
        """Held by whoever changes states for a while: the consumer (a batch), a backfill step,
        a definition change."""
        self.lock = threading.Lock()
        """Held only while a state or the feature set changes, and by online reads."""
        self.registry = Registry()
        self.states = StateTable()
        self.jobs: dict[str, BackfillJob] = {}
        self.lifetime_value: LifetimeValueModel | None = None
        self._fit_lock = threading.Lock()
        self._store: SqliteConsumerStore | None = None
        self._events: EventStore | None = None
        self._outbox: Outbox | None = None
        self._consumer: LogConsumer[object] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def store(self) -> SqliteConsumerStore:
        if self._store is None:
            raise Unavailable("features is starting or stopping")
        return self._store

    @property
    def events(self) -> EventStore:
        if self._events is None:
            raise Unavailable("features is starting or stopping")
        return self._events

    @property
    def feature_set(self) -> FeatureSet:
        return self.registry.feature_set

    async def open(self, changes: Log, resolutions: LogReader) -> None:
        """Load definitions and states, then follow the resolution log."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        store = self.stores("features")
        store.schema(Registry.schema())
        store.schema(StateTable.schema())
        store.schema(deletion_reports.SCHEMA)
        events = self._open_events(store)
        discarded = events.discard_uncommitted(store.committed(CONSUMER, STREAM))
        if discarded:
            log.info("discarded %d events of a batch that never committed", discarded)
        # In a write transaction: the first start stores the definitions file's definitions.
        with store.transaction() as tx:
            self.registry.load(tx, self.definitions_file)
        await asyncio.to_thread(store.read, self.states.load)
        outbox = Outbox(store, changes)
        applier = Applier(self.registry, self.states, events, outbox, self.lock, self.writer)
        reporter = DeletionReporter(
            "features", lambda: self.store, self._identity_channel, scrubbers=[events.scrub]
        )

        def applied(_: object) -> None:
            outbox.notify()
            if applier.deleted:
                applier.deleted = False
                reporter.notify()

        def apply(tx: object, batch: RecordBatch) -> None:
            with events.within(tx):  # the events commit with the states and offsets
                applier(tx, batch)  # type: ignore[arg-type]

        consumer: LogConsumer[object] = LogConsumer(
            CONSUMER,
            resolutions,
            store,  # type: ignore[arg-type]
            apply,
            on_applied=applied,
            on_assigned=self._reload_states,
        )
        self._store, self._events, self._outbox, self._consumer = store, events, outbox, consumer
        self._tasks = [
            asyncio.create_task(fail_stop("features", "outbox", outbox.run)),
            asyncio.create_task(fail_stop("features", "consumer", consumer.run)),
            asyncio.create_task(fail_stop("features", "deletion reports", reporter.run)),
        ]
        pending = self.registry.backfilling()
        if pending:  # a backfill was cut short by a restart: run it again
            self.start_backfill(pending)
        threading.Thread(target=self.fit_lifetime_value, name="clv-fit", daemon=True).start()

    def _open_events(self, store: SqliteConsumerStore) -> EventStore:
        """The event store beside ``store``: in its PostgreSQL schema on the ``postgres``
        backend, shared by every replica; else a DuckDB file under ``data_dir``."""
        shared: object = store
        if isinstance(shared, PostgresConsumerStore):
            return PostgresEventStore(shared)
        return DuckDBEventStore(self.data_dir / "events.duckdb")

    def _reload_states(self, gained: frozenset[int]) -> None:
        """This replica now applies more partitions of the resolution log (scale-out backend):
        another replica changed their profiles' states in the shared store meanwhile, so the
        in-memory states are read again before anything is applied on top of them."""
        with self.writer, self.lock:
            self.store.read(self.states.load)
        log.info("reloaded %d profile states for partitions %s", len(self.states), sorted(gained))

    def _identity_channel(self) -> grpc.aio.Channel:
        if self.identity_channel is None:
            raise Unavailable("features was started without a way to reach identity")
        return self.identity_channel()

    async def close(self) -> None:
        await stop_background([self._consumer] if self._consumer else [], self._tasks, self._outbox)
        if self._store is not None:
            self._store.close()
        if self._events is not None:
            self._events.close()
        self._store = self._events = self._outbox = self._consumer = None

    async def lag(self) -> dict[int, int]:
        if self._consumer is None:
            raise Unavailable("features is starting or stopping")
        return await self._consumer.lag()

    # -- online -------------------------------------------------------------------------------

    def online_values(
        self, profile_id: str, names: Sequence[str], as_of_ns: int | None = None
    ) -> tuple[str, dict[str, Any], int]:
        """The live id of ``profile_id``, its values of ``names`` (all served ones when empty)
        and the time they describe. :class:`NotFound` for a profile features never saw."""
        [(live, values)], now = self.online_many([profile_id], names, as_of_ns)
        if values is None:
            raise NotFound(
                "no such profile", violations=[("profile_id", "features has no events of it")]
            )
        return live, values, now

    def online_many(
        self, profile_ids: Sequence[str], names: Sequence[str], as_of_ns: int | None = None
    ) -> tuple[list[tuple[str, dict[str, Any] | None]], int]:
        """As :meth:`online_values` for many profiles at once (names checked once, the lock
        taken once); an unknown profile's values are ``None``."""
        model = self.lifetime_value
        predicted = [n for n in names if n in lifetime_value.OUTPUTS]
        if not names and model is not None:
            predicted = list(lifetime_value.OUTPUTS)
        rest = [n for n in names if n not in predicted]
        wanted = self.registry.served_names(rest) if rest or not names else []
        ordered = [n.partition("@")[0] for n in names] if names else [*wanted, *predicted]
        now = time.time_ns() if as_of_ns is None else as_of_ns
        feature_set = self.registry.feature_set
        found: list[tuple[str, dict[str, Any] | None]] = []
        inputs: list[dict[str, Any] | None] = []
        foreign = self._states_applied_elsewhere(profile_ids)
        with self.lock:
            for profile_id in profile_ids:
                live = self.states.canonical(profile_id)
                state = foreign[live] if live in foreign else self.states.state(live)
                if state is None:
                    found.append((profile_id, None))
                    inputs.append(None)
                    continue
                found.append((live, state.values(feature_set, now, wanted) if wanted else {}))
                inputs.append(
                    state.values(feature_set, now, lifetime_value.INPUTS) if predicted else None
                )
        results: list[tuple[str, dict[str, Any] | None]] = []
        for (live, values), given in zip(found, inputs, strict=True):
            if values is None:
                results.append((live, None))
                continue
            if predicted and given is not None:
                outputs = model.predict(given) if model is not None else {}
                values.update({name: outputs.get(name) for name in predicted})
            results.append((live, {name: values.get(name) for name in ordered}))
        return results, now

    def _states_applied_elsewhere(
        self, profile_ids: Sequence[str]
    ) -> dict[str, ProfileState | None]:
        """On the scale-out backend, the states of profiles whose partition another replica
        applies, read from the shared store: this replica's copy of them is as old as its
        last reload. Empty when this replica applies every partition."""
        leases = self._consumer.leases if self._consumer is not None else None
        if leases is None:
            return {}
        owned, partitions = leases.owned, leases.partitions
        with self.lock:
            elsewhere = {
                live
                for live in (self.states.canonical(p) for p in profile_ids)
                if partition_for(live, partitions) not in owned
            }
        if not elsewhere:
            return {}
        marks = ", ".join("?" for _ in elsewhere)

        def query(connection: Any) -> dict[str, ProfileState | None]:
            rows = connection.execute(
                f"SELECT profile_id, state FROM feature_states WHERE profile_id IN ({marks})",
                sorted(elsewhere),
            ).fetchall()
            return {str(p): ProfileState.from_bytes(blob) for p, blob in rows}

        stored = self.store.read(query)
        return {live: stored.get(live) for live in elsewhere}

    def fit_lifetime_value(self, force: bool = False) -> LifetimeValueModel | None:
        """(Re)fit the lifetime value model when it is missing or old; the model in use."""
        with self._fit_lock:
            model = self.lifetime_value
            try:
                fresh = (
                    model is not None
                    and time.time_ns() - model.fit_time_ns < LIFETIME_VALUE_REFIT_NS
                    and lifetime_value.purchases(self.events) < 1.1 * model.purchases
                )
                if fresh and not force:
                    return model
                fitted = lifetime_value.fit(self.events)
            except (ValueError, Unavailable) as error:  # degenerate data or shutting down
                log.warning("lifetime value model not fitted: %s", error)
                return model
            if fitted is not None:
                self.lifetime_value = fitted
            return self.lifetime_value

    # -- offline ------------------------------------------------------------------------------

    def historical(
        self,
        entity_rows: pa.Table | None,
        names: Sequence[str],
        extra: Sequence[FeatureDefinition] = (),
        cutoffs: Sequence[int] = (),
    ) -> pa.Table:
        """Each entity row's features as of its timestamp (point-in-time correct).

        ``extra`` definitions are computed for this call only; without entity rows, the rows
        are every profile with an event at or before each of ``cutoffs`` (a spine).
        """
        feature_set = self.registry.feature_set
        extra_names = [d.name for d in extra]
        if extra:
            for index, definition in enumerate(extra):
                if definition.name in feature_set:
                    raise InvalidArgument.for_field(
                        f"extra_definitions[{index}].name", f"{definition.name!r} is taken"
                    )
            feature_set = FeatureSet([*self.registry.stored_definitions(), *extra])
        plain = [n for n in names if n.partition("@")[0] not in extra_names]
        wanted = self.registry.served_names(plain) if plain else []
        wanted += [n for n in names if n in extra_names]
        if not wanted:
            raise InvalidArgument.for_field("feature_names", "name at least one feature")
        if entity_rows is None:
            entity_rows = self.spine(cutoffs)
        with self.lock:
            redirects = {
                p: self.states.canonical(p)
                for p in set(entity_rows.column("profile_id").to_pylist())
                if p is not None
            }
        return batch_point_in_time(self.events, feature_set, entity_rows, wanted, redirects)

    def spine(self, cutoffs: Sequence[int]) -> pa.Table:
        """``profile_id``, ``event_timestamp``: every profile with an event at or before each
        cut-off, cut-offs in the order given, profiles sorted."""
        stamps = pa.table({"cutoff": pa.array(list(cutoffs), pa.int64())})
        with self.events.reader() as cursor:
            cursor.register("spine_cutoffs", stamps)
            table = cursor.sql(
                f"SELECT e.profile_id, c.cutoff FROM spine_cutoffs c"
                f" JOIN (SELECT profile_id, min(timestamp_ns) AS first FROM {VIEW}"
                f" GROUP BY profile_id) e ON e.first <= c.cutoff"
                f" ORDER BY c.cutoff, e.profile_id"
            ).to_arrow_table()
        return pa.table(
            {
                "profile_id": table.column("profile_id"),
                "event_timestamp": table.column("cutoff").cast(pa.timestamp("ns", tz="UTC")),
            }
        )

    def batch_values(self, as_of_ns: int) -> pa.Table:
        """Every profile's features as of one time, computed from the event store (DuckDB)."""
        with self.events.reader() as cursor:
            return batch.batch_values(cursor, VIEW, self.registry.feature_set, as_of_ns)

    # -- definitions and backfills ---------------------------------------------------------------

    async def create_definition(self, definition: FeatureDefinition) -> tuple[Any, BackfillJob]:
        """Store a new definition (or version) and backfill it from the event store."""
        stored = await asyncio.to_thread(self._create_definition, definition)
        job = self.start_backfill([stored.name])
        return stored, job

    def _create_definition(self, definition: FeatureDefinition) -> FeatureDefinition:
        with self.store.transaction() as tx, self.writer, self.lock:
            return self.registry.create(tx, definition)

    async def delete_definition(self, name: str, version: int) -> None:
        def run() -> None:
            with self.store.transaction() as tx, self.writer, self.lock:
                self.registry.delete(tx, name, version)

        await asyncio.to_thread(run)

    def start_backfill(self, names: Sequence[str]) -> BackfillJob:
        """Recompute every profile's state from the event store, in the background."""
        job = BackfillJob(names or [d.name for d in self.registry.feature_set.definitions])
        self.jobs[job.job_id] = job
        threading.Thread(target=self._backfill, args=(job,), name="backfill", daemon=True).start()
        return job

    def _backfill(self, job: BackfillJob) -> None:
        job.state, job.started_at = "RUNNING", time.time_ns()
        try:
            profiles = self.events.profile_ids()
            for start in range(0, len(profiles), BACKFILL_CHUNK):
                chunk = profiles[start : start + BACKFILL_CHUNK]
                # Under ``writer``, the event store holds exactly what the states reflect, so
                # nothing the consumer applies meanwhile is lost or counted twice; readers wait
                # only for the swap.
                with self.store.transaction() as tx, self.writer:
                    events = self.events.events_of(chunk)
                    rebuilt = build_states(events, self.registry.feature_set)
                    job.events_processed += sum(len(e) for e in events.values())
                    with self.lock:
                        self.states.replace(rebuilt)
                    self.states.save(tx)
                job.profiles_updated += len(chunk)
                job.progress = min(1.0, (start + len(chunk)) / max(1, len(profiles)))
            with self.store.transaction() as tx, self.writer, self.lock:
                self.registry.activate(tx, job.feature_names)
            job.state, job.progress = "SUCCEEDED", 1.0
        except Exception as error:  # reported by GetBackfill; the definitions stay BACKFILLING
            log.exception("backfill %s failed", job.job_id)
            job.state, job.error = "FAILED", str(error)
        finally:
            job.finished_at = time.time_ns()


def batch_point_in_time(
    events: EventStore,
    feature_set: FeatureSet,
    entity_rows: pa.Table,
    names: Sequence[str],
    redirects: dict[str, str],
) -> pa.Table:
    """Point-in-time values of ``names`` for entity rows (``profile_id``, ``event_timestamp``)."""
    profile_ids = [redirects.get(p, p) for p in entity_rows.column("profile_id").to_pylist()]
    stamps = entity_rows.column("event_timestamp").cast(pa.timestamp("ns", tz="UTC"))
    keys = pa.table(
        {
            "profile_id": pa.array(profile_ids, pa.string()),
            "timestamp_ns": stamps.cast(pa.int64()),
        }
    )
    with events.reader() as cursor:
        values = batch.point_in_time_values(cursor, VIEW, feature_set, keys, names=list(names))
    feature_columns = {name: values.column(name) for name in names}
    result = entity_rows
    for name, column in feature_columns.items():
        result = result.append_column(name, column)
    return result
