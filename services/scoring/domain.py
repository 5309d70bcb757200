"""The scoring domain: the model registry, training runs, online and batch scores, rescoring as
features change, behavioural clusters and lookalikes.

Scoring reads features only through the features service (online vectors, point-in-time
tables), so a score is computed from exactly what features serves. What it keeps itself: the
registry (models, clusterings) and each profile's latest scores and clusters, which the
rescoring consumer commits with its offset in the ``feature-changes`` log.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pyarrow as pa

from profilemesh.common.v1 import identifier_pb2, job_pb2
from profilemesh.scoring.v1 import clustering_pb2, model_pb2
from profilemesh.services.scoring import rescoring, training_run
from profilemesh.services.scoring.clustering import discover
from profilemesh.services.scoring.features_client import (
    FeaturesClient,
    matrix_of,
    pin,
    vector_row,
)
from profilemesh.services.scoring.lookalikes import score_lookalikes
from profilemesh.services.scoring.models_in_use import ModelsInUse, ProfileScorer, ScoredRows
from profilemesh.services.scoring.registry import ModelRegistry
from profilemesh.shared import deletion_reports
from profilemesh.shared.deletion_reports import DeletionReporter
from profilemesh.shared.errors import InvalidArgument, NotFound, Unavailable
from profilemesh.shared.log.api import Log, LogReader
from profilemesh.shared.log.consumer import LogConsumer
from profilemesh.shared.log.outbox import Outbox
from profilemesh.shared.log.sqlite_store import SqliteConsumerStore
from profilemesh.shared.log.stores import StoreOpener, files_under
from profilemesh.shared.supervision import fail_stop, stop_background

log = logging.getLogger(__name__)

CONSUMER = "scoring"
RESCORE_CHUNK = 1_000
"""Profiles per call to features and per transaction when everyone is rescored."""


class Scoring:
    """The scoring service's state under ``data_dir``; usable once :meth:`open` ran."""

    def __init__(
        self,
        data_dir: Path,
        features: FeaturesClient,
        identity_channel: Callable[[], grpc.aio.Channel] | None = None,
        stores: StoreOpener | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.stores = stores or files_under(data_dir)
        """Opens the store (a SQLite file under ``data_dir`` unless the backend says else)."""
        self.features = features
        self.identity_channel = identity_channel
        """How to reach identity, to report the deletions this service carried out."""
        self.lock = threading.Lock()
        self.runs: dict[str, model_pb2.TrainingRun] = {}
        self._registry: ModelRegistry | None = None
        self._models: ModelsInUse | None = None
        self._store: SqliteConsumerStore | None = None
        self._outbox: Outbox | None = None
        self._rescorer: rescoring.Rescorer | None = None
        self._consumer: LogConsumer[object] | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    @property
    def registry(self) -> ModelRegistry:
        if self._registry is None:
            raise Unavailable("scoring is starting or stopping")
        return self._registry

    @property
    def models(self) -> ModelsInUse:
        if self._models is None:
            raise Unavailable("scoring is starting or stopping")
        return self._models

    @property
    def store(self) -> SqliteConsumerStore:
        if self._store is None:
            raise Unavailable("scoring is starting or stopping")
        return self._store

    async def open(self, changes: Log, feature_changes: LogReader) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._registry = ModelRegistry(self.stores("registry"))
        self._models = ModelsInUse(self._registry)
        store = self.stores("scoring")
        store.schema(rescoring.SCHEMA)
        store.schema(deletion_reports.SCHEMA)
        outbox = Outbox(store, changes)
        rescorer = rescoring.Rescorer(self._models, self.features, outbox, self.lock)
        reporter = DeletionReporter("scoring", lambda: self.store, self._identity_channel)

        def applied(_: object) -> None:
            outbox.notify()
            if rescorer.deleted:
                rescorer.deleted = False
                reporter.notify()

        consumer: LogConsumer[object] = LogConsumer(
            CONSUMER,
            feature_changes,
            store,  # type: ignore[arg-type]
            rescorer,  # type: ignore[arg-type]
            on_applied=applied,
        )
        self._store, self._outbox, self._rescorer, self._consumer = (
            store,
            outbox,
            rescorer,
            consumer,
        )
        self._tasks = [
            asyncio.create_task(fail_stop("scoring", "outbox", outbox.run)),
            asyncio.create_task(fail_stop("scoring", "consumer", consumer.run)),
            asyncio.create_task(fail_stop("scoring", "deletion reports", reporter.run)),
        ]

    def _identity_channel(self) -> grpc.aio.Channel:
        if self.identity_channel is None:
            raise Unavailable("scoring was started without a way to reach identity")
        return self.identity_channel()

    async def close(self) -> None:
        await stop_background([self._consumer] if self._consumer else [], self._tasks, self._outbox)
        if self._store is not None:
            self._store.close()
        if self._registry is not None:
            self._registry.close()
        self._store = self._outbox = self._consumer = self._registry = self._models = None

    # -- training and the registry ----------------------------------------------------------------

    def start_training(self, request: Any) -> model_pb2.TrainingRun:
        """Check the request, then train in the background; the run in state PENDING."""
        training_run.check_request(request)
        run = training_run.new_run(request.model)
        self.runs[run.run_id] = run
        self._tasks.append(asyncio.create_task(self._train(request, run)))
        return run

    async def _train(self, request: Any, run: model_pb2.TrainingRun) -> None:
        try:
            version = await training_run.run_training(request, run, self.features, self.registry)
        except Exception as error:  # reported by GetTrainingRun
            log.warning("training run %s failed: %s", run.run_id, error)
            run.state = job_pb2.JOB_STATE_FAILED
            run.error = str(error)
        else:
            run.state, run.model_version, run.progress = (
                job_pb2.JOB_STATE_SUCCEEDED,
                version.version,
                1.0,
            )
            run.stage = "done"
            self.models.changed()
            if version.champion:
                self._rescore_everyone_later()
        run.finished_at.GetCurrentTime()

    def run(self, run_id: str) -> model_pb2.TrainingRun:
        found = self.runs.get(run_id)
        if found is None:
            raise NotFound("no such training run", violations=[("run_id", "unknown")])
        return found

    def promote(self, model: str, version: str) -> tuple[model_pb2.ModelVersion, str]:
        promoted, previous = self.registry.promote(model, version)
        self.models.changed()
        self._rescore_everyone_later()
        return promoted, previous

    # -- scores -------------------------------------------------------------------------------

    async def score(
        self,
        model: str,
        version: str,
        top: int,
        *,
        profile_id: str = "",
        identifier: identifier_pb2.Identifier | None = None,
    ) -> tuple[str, Any]:
        """One profile's score now, from its current features, with reasons."""
        scorer = self.models.scorer(model, version)
        vector = await self.features.vector(
            scorer.feature_names, profile_id=profile_id, identifier=identifier
        )
        row = vector_row(vector, scorer.feature_names)
        scored = scorer.explain(row.reshape(1, -1), top).score(0)
        return vector.profile_id, scored.to_proto(scorer, time.time_ns(), row)

    async def score_table(
        self, model: str, version: str, profile_ids: Sequence[str], top: int
    ) -> tuple[ProfileScorer, list[str], ScoredRows]:
        """Scores of ``profile_ids`` (everyone when empty), in request order, unknown ids left
        out."""
        scorer = self.models.scorer(model, version)
        names = scorer.feature_names
        if profile_ids:
            ids: list[str] = []
            rows = []
            for start in range(0, len(profile_ids), RESCORE_CHUNK):
                chunk = list(profile_ids[start : start + RESCORE_CHUNK])
                for asked, vector in zip(
                    chunk, await self.features.vectors(chunk, names), strict=True
                ):
                    if vector.values:
                        ids.append(asked)
                        rows.append(vector_row(vector, names))
            matrix = np.vstack(rows) if rows else np.empty((0, len(names)))
        else:
            table = await self.features.historical(names, cutoffs=[time.time_ns()])
            ids = table.column("profile_id").to_pylist()
            matrix = matrix_of(table, names)
        scored = await asyncio.to_thread(scorer.explain, matrix, top)
        return scorer, ids, scored

    def stored_scores(self, profile_id: str) -> list[rescoring.StoredScore]:
        return self.store.read(lambda c: rescoring.stored_scores(c, profile_id))

    def stored_clusters(self, profile_id: str) -> list[tuple[str, str, int]]:
        return self.store.read(lambda c: rescoring.stored_clusters(c, profile_id))

    def _rescore_everyone_later(self) -> None:
        self._tasks.append(asyncio.create_task(self._rescore_everyone()))

    async def _rescore_everyone(self) -> None:
        """After a promotion or a new clustering: every profile, in chunks."""
        try:
            table = await self.features.historical(["orders_lifetime"], cutoffs=[time.time_ns()])
        except Exception as error:
            log.warning("rescoring everyone skipped: %s", error)
            return
        ids = table.column("profile_id").to_pylist()
        rescorer, outbox = self._rescorer, self._outbox
        assert rescorer is not None and outbox is not None
        for start in range(0, len(ids), RESCORE_CHUNK):
            chunk = ids[start : start + RESCORE_CHUNK]

            def apply(chunk: list[str] = chunk) -> None:
                with self.store.transaction() as tx:
                    outbox.put(tx, rescorer.rescore(tx, chunk))

            await asyncio.to_thread(apply)
            outbox.notify()

    # -- clusters and lookalikes ------------------------------------------------------------------

    async def _everyone(self, names: Sequence[str]) -> tuple[list[str], np.ndarray]:
        table = await self.features.historical(names, cutoffs=[time.time_ns()])
        return table.column("profile_id").to_pylist(), matrix_of(table, names)

    async def discover_clusters(
        self, name: str, feature_names: Sequence[str], k: int, max_k: int
    ) -> clustering_pb2.Clustering:
        if not training_run.NAME.match(name):
            raise InvalidArgument.for_field("name", "lower_snake_case, at most 63 characters")
        if len(feature_names) < 2:
            raise InvalidArgument.for_field("feature_names", "name at least two features")
        names = pin(feature_names, await self.features.definitions())
        ids, matrix = await self._everyone(names)
        model = await asyncio.to_thread(discover, matrix, names, k=k, max_k=max_k or 10)
        metadata = clustering_pb2.Clustering(
            name=name,
            feature_names=names,
            silhouette=model.silhouette,
            profile_count=len(ids),
        )
        metadata.create_time.GetCurrentTime()
        for persona in model.personas:
            cluster = metadata.clusters.add(
                cluster_id=persona.cluster_id,
                persona=persona.label,
                description=persona.description,
                size=persona.size,
            )
            for feature, value in zip(names, persona.centroid, strict=True):
                plain, _, version = feature.partition("@")
                cluster.centroid.add(name=plain, version=int(version), double_value=value)
        stored = self.registry.register_clustering(metadata, model.to_json())
        self.models.changed()
        self._rescore_everyone_later()
        return stored

    async def lookalikes(
        self, seed_ids: Sequence[str], feature_names: Sequence[str], top_n: int
    ) -> tuple[list[tuple[str, float]], int]:
        if not seed_ids:
            raise InvalidArgument.for_field("seed_profile_ids", "name at least one profile")
        if len(seed_ids) > 10_000:
            raise InvalidArgument.for_field("seed_profile_ids", "at most 10,000 profiles")
        if feature_names:
            names = pin(feature_names, await self.features.definitions())
        else:
            latest = self.models.clusterings()
            if not latest:
                raise InvalidArgument.for_field(
                    "feature_names", "name the features (no clustering to borrow them from)"
                )
            names = list(
                max(latest, key=lambda c: c.metadata.create_time.ToNanoseconds()).feature_names
            )
        ids, matrix = await self._everyone(names)
        seeds = set(seed_ids)
        mask = np.array([p in seeds for p in ids], dtype=bool)
        found = await asyncio.to_thread(
            score_lookalikes, matrix, mask, top_n=min(top_n or 100, 10_000)
        )
        return (
            [
                (ids[i], float(s))
                for i, s in zip(found.indices.tolist(), found.similarity.tolist(), strict=True)
            ],
            found.seed_size,
        )


def scores_table(
    scorer: ProfileScorer, ids: Sequence[str], scored: ScoredRows, top: int
) -> pa.Table:
    """The ScoreBatch columns: profile_id, score, model_version and (with top) reasons."""
    columns: dict[str, Any] = {
        "profile_id": pa.array(list(ids), pa.string()),
        "score": pa.array(np.asarray(scored.scores, dtype=np.float64)),
        "model_version": pa.array([scorer.version] * len(ids), pa.string()),
    }
    if top:
        reason = pa.struct([("feature", pa.string()), ("contribution", pa.float64())])
        columns["reasons"] = pa.array(
            [[{"feature": f, "contribution": c} for f, c in row] for row in scored.reasons],
            pa.list_(reason),
        )
    return pa.table(columns)
