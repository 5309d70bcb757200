"""The activation domain: profile views fed by the other services' logs, segments evaluated as
profiles change and in batch, destinations and the delivery outbox, and the unified profile.

Locks are taken in one order: a store transaction, then ``lock`` (views and memberships).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from profilemesh.activation.v1 import segment_pb2
from profilemesh.common.v1 import identifier_pb2, job_pb2, profile_pb2
from profilemesh.features.v1 import feature_definition_pb2 as fd
from profilemesh.features.v1 import features_service_pb2, features_service_pb2_grpc
from profilemesh.identity.v1 import identity_service_pb2, identity_service_pb2_grpc
from profilemesh.scoring.v1 import scoring_service_pb2, scoring_service_pb2_grpc
from profilemesh.services.activation import deliveries
from profilemesh.services.activation.applier import ActivationApplier
from profilemesh.services.activation.segment_expressions import Catalog, parse_segment
from profilemesh.services.activation.segments import SegmentBook
from profilemesh.services.activation.store import prepare as prepare_store
from profilemesh.services.activation.views import ViewTable
from profilemesh.shared import deletion_reports
from profilemesh.shared.deletion_reports import DeletionReporter
from profilemesh.shared.errors import InvalidArgument, NotFound, Unavailable
from profilemesh.shared.extension_points import Activator
from profilemesh.shared.log.api import Log, LogReader
from profilemesh.shared.log.consumer import LogConsumer
from profilemesh.shared.log.outbox import Outbox
from profilemesh.shared.log.sqlite_store import SqliteConsumerStore
from profilemesh.shared.log.stores import StoreOpener, files_under
from profilemesh.shared.plugin_manager import PluginSet
from profilemesh.shared.supervision import fail_stop, stop_background

log = logging.getLogger(__name__)

SEGMENT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_VALUE_TYPES = {fd.VALUE_TYPE_DOUBLE: "double", fd.VALUE_TYPE_INT64: "int64"}
EVALUATION_CHUNK = 5_000
"""Profiles per transaction of a batch evaluation (the lock is held for one chunk)."""


class Evaluation:
    def __init__(self, segment_ids: Sequence[str]) -> None:
        self.message = segment_pb2.SegmentEvaluation(
            evaluation_id=uuid.uuid4().hex[:16],
            segment_ids=segment_ids,
            state=job_pb2.JOB_STATE_PENDING,
        )
        self.message.created_at.GetCurrentTime()


class Clients:
    """The other services activation asks (channels opened on first use, in the loop)."""

    def __init__(self, connect: Callable[[str], grpc.aio.Channel]) -> None:
        self._connect = connect
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, service: str) -> grpc.aio.Channel:
        if service not in self._channels:
            self._channels[service] = self._connect(service)
        return self._channels[service]

    def open_channel(self, service: str) -> grpc.aio.Channel:
        """A channel of the caller's own to ``service`` (the caller closes it)."""
        return self._connect(service)

    def identity(self) -> identity_service_pb2_grpc.IdentityServiceStub:
        return identity_service_pb2_grpc.IdentityServiceStub(self._channel("identity"))

    def features(self) -> features_service_pb2_grpc.FeaturesServiceStub:
        return features_service_pb2_grpc.FeaturesServiceStub(self._channel("features"))

    def scoring(self) -> scoring_service_pb2_grpc.ScoringServiceStub:
        return scoring_service_pb2_grpc.ScoringServiceStub(self._channel("scoring"))

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


class Activation:
    """The activation service's state under ``data_dir``; usable once :meth:`open` ran."""

    def __init__(
        self,
        data_dir: Path,
        plugins: PluginSet,
        clients: Clients,
        policy: deliveries.RetryPolicy | None = None,
        stores: StoreOpener | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.stores = stores or files_under(data_dir)
        """Opens the store (a SQLite file under ``data_dir`` unless the backend says else)."""
        self.plugins = plugins
        self.clients = clients
        self.policy = policy or deliveries.RetryPolicy()
        self.lock = threading.Lock()
        self.views = ViewTable()
        self.book = SegmentBook()
        self.destinations: dict[str, segment_pb2.Destination] = {}
        self.evaluations: dict[str, Evaluation] = {}
        self._activators: dict[str, tuple[bytes, Activator]] = {}
        self._store: SqliteConsumerStore | None = None
        self._outbox: Outbox | None = None
        self._worker: deliveries.DeliveryWorker | None = None
        self._consumers: list[LogConsumer[object]] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def store(self) -> SqliteConsumerStore:
        if self._store is None:
            raise Unavailable("activation is starting or stopping")
        return self._store

    @property
    def outbox(self) -> Outbox:
        if self._outbox is None:
            raise Unavailable("activation is starting or stopping")
        return self._outbox

    async def open(self, activations: Log, sources: Mapping[str, LogReader]) -> None:
        """Load the state, then follow identity's, features' and scoring's logs."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        store = self.stores("activation")
        prepare_store(store)
        store.schema(deletion_reports.SCHEMA)
        await asyncio.to_thread(store.read, self._load)
        outbox = Outbox(store, activations)
        worker = deliveries.DeliveryWorker(
            store, outbox, lambda: self.destinations, self._activator, self._view, self.policy
        )
        self._store, self._outbox, self._worker = store, outbox, worker
        self._loop = asyncio.get_running_loop()

        reporter = DeletionReporter(
            "activation", lambda: self.store, lambda: self.clients.open_channel("identity")
        )
        handlers: list[ActivationApplier] = []

        def applied(_: object) -> None:
            outbox.notify()
            worker.notify()
            for handler in handlers:
                if handler.deleted:
                    handler.deleted = False
                    reporter.notify()

        for stream, reader in sources.items():
            handler = ActivationApplier(
                stream, self.views, self.book, self._by_segment, self.lock, outbox
            )
            handlers.append(handler)
            self._consumers.append(
                LogConsumer(
                    f"activation-{stream}",
                    reader,
                    store,  # type: ignore[arg-type]
                    handler,  # type: ignore[arg-type]
                    on_applied=applied,
                )
            )
        self._tasks = [
            asyncio.create_task(fail_stop("activation", "outbox", outbox.run)),
            asyncio.create_task(fail_stop("activation", "deliveries", worker.run)),
            asyncio.create_task(fail_stop("activation", "daily sync", self._daily_sync)),
            asyncio.create_task(fail_stop("activation", "deletion reports", reporter.run)),
            *(asyncio.create_task(fail_stop("activation", c.name, c.run)) for c in self._consumers),
        ]

    def _load(self, connection: Any) -> None:
        self.views.load(connection)
        self.book.load(connection)
        for (blob,) in connection.execute("SELECT destination FROM destinations"):
            destination = segment_pb2.Destination.FromString(blob)
            self.destinations[destination.destination_id] = destination

    async def close(self) -> None:
        await stop_background(self._consumers, self._tasks, self._outbox)
        for _, activator in self._activators.values():
            with contextlib.suppress(Exception):
                await activator.close()
        self._activators.clear()
        if self._store is not None:
            self._store.close()
        self._store = self._outbox = self._worker = None
        self._consumers = []

    def wake(self) -> None:
        """Something was queued (from any thread): publish and deliver soon."""
        loop, outbox, worker = self._loop, self._outbox, self._worker
        if loop is None or outbox is None or worker is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(outbox.notify)
        loop.call_soon_threadsafe(worker.notify)

    def _view(self, profile_id: str) -> Any:
        with self.lock:
            return self.views.get(profile_id)

    def _by_segment(self) -> dict[str, list[segment_pb2.Destination]]:
        grouped: dict[str, list[segment_pb2.Destination]] = {}
        for destination in self.destinations.values():
            grouped.setdefault(destination.segment_id, []).append(destination)
        return grouped

    def _activator(self, destination: segment_pb2.Destination) -> Activator:
        """The activator instance of a destination, made again when its config changed."""
        fingerprint = destination.config.SerializeToString(deterministic=True) + (
            destination.activator.encode()
        )
        cached = self._activators.get(destination.destination_id)
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        cls = self.plugins.activator(destination.activator)
        instance = cls(json_format.MessageToDict(destination.config))
        self._activators[destination.destination_id] = (fingerprint, instance)
        return instance

    # -- segments -----------------------------------------------------------------------------

    async def catalog(self, expression: str) -> Catalog:
        """What the expression may refer to, asked of features and scoring now."""
        try:
            listed = await self.clients.features().ListFeatureDefinitions(
                features_service_pb2.ListFeatureDefinitionsRequest(page_size=1000)
            )
            models = await self.clients.scoring().ListModels(
                scoring_service_pb2.ListModelsRequest(champions_only=True, page_size=1000)
            )
        except grpc.aio.AioRpcError as error:
            raise Unavailable(f"cannot check the expression's names: {error.details()}") from None
        features = {d.name: _VALUE_TYPES.get(d.value_type, "string") for d in listed.definitions}
        clusterings = set()
        for name in set(re.findall(r"clusters\.([A-Za-z0-9_]+)", expression)):
            try:
                await self.clients.scoring().GetClustering(
                    scoring_service_pb2.GetClusteringRequest(name=name)
                )
                clusterings.add(name)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    raise Unavailable(f"scoring: {error.details()}") from None
        return Catalog(
            features=features,
            models=frozenset(m.model for m in models.models),
            clusterings=frozenset(clusterings),
        )

    async def create_segment(
        self, segment: segment_pb2.Segment, validate_only: bool
    ) -> segment_pb2.Segment:
        segment_id = segment.segment_id or f"segment-{uuid.uuid4().hex[:12]}"
        if not SEGMENT_ID.match(segment_id):
            raise InvalidArgument.for_field(
                "segment.segment_id", "lowercase letters, digits, _ and -, at most 63 characters"
            )
        if segment_id in self.book.segments:
            from profilemesh.shared.errors import AlreadyExists

            raise AlreadyExists(
                f"segment {segment_id!r} exists", violations=[("segment.segment_id", "taken")]
            )
        if not segment.name:
            raise InvalidArgument.for_field("segment.name", "required")
        catalog = await self.catalog(segment.expression)
        expression = parse_segment(segment.expression, catalog, field="segment.expression")
        stored = segment_pb2.Segment()
        stored.CopyFrom(segment)
        stored.segment_id = segment_id
        stored.member_count = 0
        stored.ClearField("last_evaluated_time")
        stored.create_time.GetCurrentTime()
        stored.update_time.CopyFrom(stored.create_time)
        if validate_only:
            return stored

        def save() -> None:
            with self.store.transaction() as tx, self.lock:
                self.book.save(tx, stored, expression, catalog)

        await asyncio.to_thread(save)
        self.start_evaluation([segment_id])
        return self.book.get(segment_id)

    async def update_segment(
        self, segment: segment_pb2.Segment, paths: Sequence[str]
    ) -> segment_pb2.Segment:
        current = self.book.get(segment.segment_id)
        paths = list(paths) or ["name", "description", "expression"]
        for path in paths:
            if path not in ("name", "description", "expression"):
                raise InvalidArgument.for_field("update_mask", f"{path!r} cannot be changed")
            setattr(current, path, getattr(segment, path))
        catalog = await self.catalog(current.expression)
        expression = parse_segment(current.expression, catalog, field="segment.expression")
        current.update_time.GetCurrentTime()

        def save() -> None:
            with self.store.transaction() as tx, self.lock:
                self.book.save(tx, current, expression, catalog)

        await asyncio.to_thread(save)
        if "expression" in paths:
            self.start_evaluation([current.segment_id])
        return self.book.get(current.segment_id)

    async def delete_segment(self, segment_id: str) -> None:
        attached = [
            d.destination_id for d in self.destinations.values() if d.segment_id == segment_id
        ]
        if attached:
            from profilemesh.shared.errors import FailedPrecondition

            raise FailedPrecondition(
                f"destinations {', '.join(attached)} deliver this segment; delete them first",
                violations=[("segment_id", "in use")],
            )

        def delete() -> None:
            with self.store.transaction() as tx, self.lock:
                self.book.delete(tx, segment_id)

        await asyncio.to_thread(delete)

    # -- batch evaluation -----------------------------------------------------------------------

    def start_evaluation(self, segment_ids: Sequence[str]) -> Evaluation:
        for index, segment_id in enumerate(segment_ids):
            if segment_id not in self.book.segments:
                raise InvalidArgument.for_field(f"segment_ids[{index}]", "no such segment")
        evaluation = Evaluation(list(segment_ids) or list(self.book.segments))
        self.evaluations[evaluation.message.evaluation_id] = evaluation
        self._tasks.append(asyncio.create_task(asyncio.to_thread(self._evaluate, evaluation)))
        return evaluation

    def _evaluate(self, evaluation: Evaluation) -> None:
        message = evaluation.message
        message.state = job_pb2.JOB_STATE_RUNNING
        message.started_at.GetCurrentTime()
        try:
            with self.lock:
                ids = self.views.ids()
            segment_ids = list(message.segment_ids)
            for start in range(0, len(ids), EVALUATION_CHUNK):
                chunk = ids[start : start + EVALUATION_CHUNK]
                with self.store.transaction() as tx, self.lock:
                    live = [s for s in segment_ids if s in self.book.segments]
                    transitions = self.book.evaluate(
                        tx, [(p, self.views.get(p)) for p in chunk], segment_ids=live
                    )
                    deliveries.queue(tx, transitions, self._by_segment(), self.views.get)
                    self.outbox.put(tx, _membership_entries(transitions))
                message.profiles_evaluated += len(chunk)
                for change in transitions:
                    if change.transition == 1:
                        message.entered_count += 1
                    else:
                        message.exited_count += 1
            now = time.time_ns()
            with self.store.transaction() as tx, self.lock:
                for segment_id in segment_ids:
                    segment = self.book.segments.get(segment_id)
                    if segment is not None:
                        segment.last_evaluated_time.FromNanoseconds(now)
                        tx.execute(
                            "UPDATE segments SET segment = ? WHERE segment_id = ?",
                            (segment.SerializeToString(), segment_id),
                        )
            message.state = job_pb2.JOB_STATE_SUCCEEDED
        except Exception as error:
            log.exception("segment evaluation failed")
            message.state, message.error = job_pb2.JOB_STATE_FAILED, str(error)
        finally:
            message.finished_at.GetCurrentTime()
            self.wake()

    # -- destinations -------------------------------------------------------------------------

    def create_destination(self, destination: segment_pb2.Destination) -> segment_pb2.Destination:
        self._check_destination(destination)
        stored = segment_pb2.Destination()
        stored.CopyFrom(destination)
        stored.destination_id = f"dest-{uuid.uuid4().hex[:12]}"
        stored.create_time.GetCurrentTime()
        stored.update_time.CopyFrom(stored.create_time)
        self._save_destination(stored, initial_sync=True)
        return stored

    def update_destination(
        self, destination: segment_pb2.Destination, paths: Sequence[str]
    ) -> segment_pb2.Destination:
        current = self.get_destination(destination.destination_id)
        changeable = {
            "name", "config", "triggers", "mappings", "consent_purpose",
            "rate_limit_per_second", "frequency_cap_per_day", "paused",
        }  # fmt: skip
        for path in paths or sorted(changeable):
            if path not in changeable:
                raise InvalidArgument.for_field("update_mask", f"{path!r} cannot be changed")
            current.ClearField(path)  # type: ignore[arg-type]
            if path in ("config",):
                current.config.CopyFrom(destination.config)
            elif path in ("triggers", "mappings"):
                getattr(current, path).extend(getattr(destination, path))
            else:
                setattr(current, path, getattr(destination, path))
        self._check_destination(current)
        current.update_time.GetCurrentTime()
        self._save_destination(current)
        return current

    def _check_destination(self, destination: segment_pb2.Destination) -> None:
        if not destination.name:
            raise InvalidArgument.for_field("destination.name", "required")
        if destination.segment_id not in self.book.segments:
            raise InvalidArgument.for_field("destination.segment_id", "no such segment")
        if not destination.consent_purpose:
            raise InvalidArgument.for_field(
                "destination.consent_purpose", "required: there is no send without consent"
            )
        if not destination.triggers or any(
            t == segment_pb2.DELIVERY_TRIGGER_UNSPECIFIED for t in destination.triggers
        ):
            raise InvalidArgument.for_field("destination.triggers", "at least one trigger")
        if destination.activator not in self.plugins.activators():
            known = ", ".join(sorted(self.plugins.activators())) or "none"
            raise InvalidArgument.for_field(
                "destination.activator", f"no activator {destination.activator!r} (known: {known})"
            )
        cls = self.plugins.activator(destination.activator)
        try:
            cls(json_format.MessageToDict(destination.config))
        except InvalidArgument as error:
            raise InvalidArgument(
                str(error),
                violations=[(f"destination.{v.field}", v.description) for v in error.violations],
            ) from None

    def _save_destination(
        self, destination: segment_pb2.Destination, *, initial_sync: bool = False
    ) -> None:
        """Store a destination; a new one starts with the segment's current members, as a
        destination connected to an existing audience does."""
        with self.store.transaction() as tx, self.lock:
            tx.execute(
                "INSERT OR REPLACE INTO destinations VALUES (?, ?)",
                (destination.destination_id, destination.SerializeToString()),
            )
            self.destinations[destination.destination_id] = destination
            if initial_sync:
                members = dict(self.book.members.get(destination.segment_id, {}))
                deliveries.queue_current_members(tx, destination, members, self.views.get)
        self.wake()

    def get_destination(self, destination_id: str) -> segment_pb2.Destination:
        found = self.destinations.get(destination_id)
        if found is None:
            raise NotFound("no such destination", violations=[("destination_id", "unknown")])
        copy = segment_pb2.Destination()
        copy.CopyFrom(found)
        return copy

    async def delete_destination(self, destination_id: str) -> None:
        self.get_destination(destination_id)
        with self.store.transaction() as tx:
            tx.execute("DELETE FROM destinations WHERE destination_id = ?", (destination_id,))
            # Its queued and dead-lettered deliveries have nowhere to go any more.
            tx.execute(
                "DELETE FROM deliveries WHERE destination_id = ? AND state IN (?, ?, ?)",
                (
                    destination_id,
                    deliveries.PENDING,
                    deliveries.RETRYING,
                    deliveries.DEAD_LETTERED,
                ),
            )
        del self.destinations[destination_id]
        cached = self._activators.pop(destination_id, None)
        if cached is not None:
            await cached[1].close()

    async def _daily_sync(self) -> None:
        """At each UTC midnight, every member of a segment goes to its DAILY_SYNC destinations."""
        while True:
            day = datetime.now(UTC).toordinal()
            done = await asyncio.to_thread(
                self.store.read,
                lambda c: c.execute(
                    "SELECT value FROM activation_settings WHERE name = 'daily_sync_day'"
                ).fetchone(),
            )
            if done is None or int(done[0]) < day:
                await asyncio.to_thread(self._sync, day)
            await asyncio.sleep(60)

    def _sync(self, day: int) -> None:
        with self.store.transaction() as tx, self.lock:
            for destination in self.destinations.values():
                if segment_pb2.DELIVERY_TRIGGER_DAILY_SYNC in destination.triggers:
                    members = list(self.book.members.get(destination.segment_id, {}))
                    deliveries.queue_sync(tx, destination, members, self.views.get, day)
            tx.execute(
                "INSERT OR REPLACE INTO activation_settings VALUES ('daily_sync_day', ?)",
                (str(day),),
            )
        self.wake()

    # -- dead letters ---------------------------------------------------------------------------

    def dead_letters(self, destination_id: str, after: str, limit: int) -> list[dict[str, Any]]:
        def query(connection: Any) -> list[dict[str, Any]]:
            import sqlite3

            connection.row_factory = sqlite3.Row
            try:
                rows = connection.execute(
                    "SELECT * FROM deliveries WHERE state = ? AND (? = '' OR destination_id = ?)"
                    " AND delivery_id > ? ORDER BY delivery_id LIMIT ?",
                    (deliveries.DEAD_LETTERED, destination_id, destination_id, after, limit),
                ).fetchall()
            finally:
                connection.row_factory = None
            return [dict(r) for r in rows]

        return self.store.read(query)

    def retry_dead_letters(self, destination_id: str, delivery_ids: Sequence[str]) -> int:
        with self.store.transaction() as tx:
            if delivery_ids:
                count = 0
                for delivery_id in delivery_ids:
                    count += tx.execute(
                        "UPDATE deliveries SET state = ?, attempts = 0, next_attempt_at = 0"
                        " WHERE delivery_id = ? AND state = ? AND (? = '' OR destination_id = ?)",
                        (
                            deliveries.PENDING,
                            delivery_id,
                            deliveries.DEAD_LETTERED,
                            destination_id,
                            destination_id,
                        ),
                    ).rowcount
            else:
                count = tx.execute(
                    "UPDATE deliveries SET state = ?, attempts = 0, next_attempt_at = 0"
                    " WHERE state = ? AND (? = '' OR destination_id = ?)",
                    (deliveries.PENDING, deliveries.DEAD_LETTERED, destination_id, destination_id),
                ).rowcount
        self.wake()
        return count

    # -- the unified profile ----------------------------------------------------------------------

    async def unified_profile(
        self,
        *,
        profile_id: str = "",
        identifier: identifier_pb2.Identifier | None = None,
        recent_events: int = 20,
    ) -> profile_pb2.UnifiedProfile:
        """Everything known about a person now: identity's part (identities, traits, consent,
        recent events) asked of identity, which also resolves the identifier; features, scores,
        clusters and segments from activation's own views."""
        request = identity_service_pb2.GetProfileRequest(recent_events_limit=recent_events)
        if identifier is not None:
            request.identifier.CopyFrom(identifier)
        else:
            request.profile_id = profile_id
        try:
            response = await self.clients.identity().GetProfile(request)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound("no such profile", violations=[("identifier", "unknown")]) from None
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument.for_field("identifier", error.details() or "") from None
            raise Unavailable(f"identity: {error.details()}") from None
        profile = profile_pb2.UnifiedProfile()
        profile.CopyFrom(response.profile)
        with self.lock:
            live = self.views.canonical(profile.profile_id)
            view = self.views.get(live)
            details = self.views.details(live)
            memberships = self.book.memberships_of(live)
            names = {s: self.book.segments[s].name for s, _ in memberships}
        for name in sorted(details.features):
            profile.features.add().ParseFromString(details.features[name])
        for model in sorted(details.scores):
            profile.scores.add().ParseFromString(details.scores[model])
        for clustering in sorted(details.clusters):
            profile.clusters.add().ParseFromString(details.clusters[clustering])
        for segment_id, entered_at in memberships:
            membership = profile.segments.add(segment_id=segment_id, segment_name=names[segment_id])
            membership.entered_at.FromNanoseconds(entered_at)
        if not profile.consents and view is not None:
            for purpose, granted in sorted(view.consent.items()):
                profile.consents.add(purpose=purpose, granted=granted, source="traits")
        return profile


def _membership_entries(transitions: Sequence[Any]) -> list[tuple[str, bytes]]:
    from profilemesh.activation.v1 import activation_log_pb2

    entries = []
    for change in transitions:
        entry = activation_log_pb2.ActivationEntry(membership_changed=change.to_proto())
        entries.append((change.profile_id, entry.SerializeToString()))
    return entries
