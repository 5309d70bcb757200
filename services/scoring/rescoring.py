"""Rescoring profiles as their features change, and publishing what changed.

Consumes the features service's ``feature-changes`` log. For each batch, the changed profiles'
current vectors are read from features in one ``BatchGetFeatures`` call, every champion model
scores them and every clustering assigns them; a score or a cluster that changed goes on the
``score-changes`` log, committed (through the outbox) with the offset and the stored scores.

Scores are derived data: if features cannot be reached for a while, the batch is applied
without rescoring (logged), and those profiles are rescored at their next change or when a
champion is promoted. Nothing acknowledged is lost by that; the log's input is still consumed
exactly once.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from profilemesh.common.v1 import profile_pb2, removal_pb2
from profilemesh.features.v1 import feature_log_pb2
from profilemesh.scoring.v1 import score_log_pb2
from profilemesh.services.scoring.features_client import FeaturesClient, vector_row
from profilemesh.services.scoring.models_in_use import ModelsInUse, ProfileScorer
from profilemesh.shared import deletion_reports
from profilemesh.shared.log.api import RecordBatch
from profilemesh.shared.log.outbox import Outbox

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS profile_scores (
    profile_id TEXT NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    score REAL NOT NULL,
    scored_at INTEGER NOT NULL,
    reasons TEXT NOT NULL,
    PRIMARY KEY (profile_id, model)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS profile_clusters (
    profile_id TEXT NOT NULL,
    clustering TEXT NOT NULL,
    version TEXT NOT NULL,
    cluster_id INTEGER NOT NULL,
    PRIMARY KEY (profile_id, clustering)
) WITHOUT ROWID;
"""

TOP_REASONS = 3
RETRY_SECONDS = 5.0
SCORE_EPSILON = 1e-9
"""Smaller moves are not a change worth telling activation about."""


@dataclass(frozen=True, slots=True)
class StoredScore:
    model: str
    version: str
    score: float
    scored_at: int
    reasons: list[tuple[str, float]]


def stored_scores(connection: sqlite3.Connection, profile_id: str) -> list[StoredScore]:
    rows = connection.execute(
        "SELECT model, version, score, scored_at, reasons FROM profile_scores"
        " WHERE profile_id = ? ORDER BY model",
        (profile_id,),
    ).fetchall()
    return [StoredScore(m, v, s, t, [tuple(r) for r in json.loads(j)]) for m, v, s, t, j in rows]


def stored_clusters(connection: sqlite3.Connection, profile_id: str) -> list[tuple[str, str, int]]:
    return connection.execute(
        "SELECT clustering, version, cluster_id FROM profile_clusters WHERE profile_id = ?"
        " ORDER BY clustering",
        (profile_id,),
    ).fetchall()


class Rescorer:
    """The feature-change consumer's handler."""

    def __init__(
        self, models: ModelsInUse, features: FeaturesClient, outbox: Outbox, lock: threading.Lock
    ) -> None:
        self.models = models
        self.features = features
        self.outbox = outbox
        self.lock = lock
        self.deleted = False
        """Set when a batch erased a person: the deletion reporter has work."""

    def __call__(self, tx: sqlite3.Connection, batch: RecordBatch) -> None:
        changed: dict[str, str] = {}
        published: list[tuple[str, bytes]] = []
        for payload in batch.payload_list():
            try:
                entry = feature_log_pb2.FeatureChangeEntry.FromString(payload)
            except DecodeError:
                log.warning("skipped an undecodable feature change")
                continue
            if entry.HasField("changed"):
                changed[entry.changed.profile_id] = entry.changed.message_id
            elif entry.HasField("removed"):
                removed = entry.removed
                changed.pop(removed.profile_id, None)
                forget(tx, removed.profile_id)
                if removed.reason == removal_pb2.REMOVAL_REASON_DELETED:
                    deletion_reports.owe(tx, removed.deletion_job_id)
                    self.deleted = True
                published.append(
                    removed_entry(
                        removed.profile_id,
                        removed.reason,
                        removed.surviving_profile_id,
                        removed.deletion_job_id,
                    )
                )
        if changed:
            published += self.rescore(tx, list(changed), changed)
        self.outbox.put(tx, published)

    def rescore(
        self,
        tx: sqlite3.Connection,
        profile_ids: Sequence[str],
        message_ids: dict[str, str] | None = None,
    ) -> list[tuple[str, bytes]]:
        """Score ``profile_ids`` with every champion, assign them to every clustering, store
        and return the changes to publish."""
        scorers = self.models.champions()
        clusterings = self.models.clusterings()
        if not scorers and not clusterings:
            return []
        names = sorted(
            {n for s in scorers for n in s.feature_names}
            | {n for c in clusterings for n in c.feature_names}
        )
        vectors = self._vectors(profile_ids, names)
        if vectors is None:
            return []
        live = [v.profile_id for v in vectors]
        rows = {v.profile_id: vector_row(v, names) for v in vectors if v.values}
        ids = [p for p in live if p in rows]
        if not ids:
            return []
        matrix = np.vstack([rows[p] for p in ids])
        position = {name: i for i, name in enumerate(names)}
        published: list[tuple[str, bytes]] = []
        now = time.time_ns()
        message_ids = message_ids or {}
        for scorer in scorers:
            columns = [position[n] for n in scorer.feature_names]
            scores = scorer.explain(matrix[:, columns], TOP_REASONS)
            for index, profile_id in enumerate(ids):
                score = scores.score(index)
                previous = tx.execute(
                    "SELECT score FROM profile_scores WHERE profile_id = ? AND model = ?",
                    (profile_id, scorer.model),
                ).fetchone()
                tx.execute(
                    "INSERT OR REPLACE INTO profile_scores VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        profile_id,
                        scorer.model,
                        scorer.version,
                        score.score,
                        now,
                        json.dumps(score.reasons),
                    ),
                )
                if previous is not None and abs(previous[0] - score.score) < SCORE_EPSILON:
                    continue
                changed = score_log_pb2.ScoreChanged(
                    profile_id=profile_id,
                    score=score.to_proto(scorer, now, matrix[index, columns]),
                    previous_score=previous[0] if previous is not None else 0.0,
                    had_previous=previous is not None,
                    message_id=message_ids.get(profile_id, ""),
                )
                entry = score_log_pb2.ScoreChangeEntry(score_changed=changed)
                entry.occurred_at.FromNanoseconds(now)
                published.append((profile_id, entry.SerializeToString()))
        for clustering in clusterings:
            columns = [position[n] for n in clustering.feature_names]
            assigned = clustering.assign(matrix[:, columns])
            for profile_id, cluster_id in zip(ids, assigned.tolist(), strict=True):
                previous = tx.execute(
                    "SELECT version, cluster_id FROM profile_clusters"
                    " WHERE profile_id = ? AND clustering = ?",
                    (profile_id, clustering.name),
                ).fetchone()
                if previous is not None and tuple(previous) == (clustering.version, cluster_id):
                    continue
                tx.execute(
                    "INSERT OR REPLACE INTO profile_clusters VALUES (?, ?, ?, ?)",
                    (profile_id, clustering.name, clustering.version, cluster_id),
                )
                entry = score_log_pb2.ScoreChangeEntry(
                    cluster_changed=score_log_pb2.ClusterChanged(
                        profile_id=profile_id,
                        assignment=clustering.assignment(cluster_id, now),
                    )
                )
                entry.occurred_at.FromNanoseconds(now)
                published.append((profile_id, entry.SerializeToString()))
        return published

    def _vectors(self, profile_ids: Sequence[str], names: Sequence[str]) -> list[Any] | None:
        deadline = time.monotonic() + RETRY_SECONDS
        delay = 0.1
        while True:
            try:
                return self.features.vectors_blocking(profile_ids, names)
            except grpc.RpcError as error:
                code = error.code() if isinstance(error, grpc.Call) else None
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    # A model's features are gone or at a newer version: scoring with it
                    # would be wrong, so nothing is rescored until a model matches again.
                    log.warning("features refused a model's schema: %s", error)
                    return None
                if time.monotonic() > deadline:
                    log.warning("features unreachable; %d profiles not rescored", len(profile_ids))
                    return None
                time.sleep(delay)
                delay = min(delay * 2, 2.0)


def forget(tx: sqlite3.Connection, profile_id: str) -> None:
    tx.execute("DELETE FROM profile_scores WHERE profile_id = ?", (profile_id,))
    tx.execute("DELETE FROM profile_clusters WHERE profile_id = ?", (profile_id,))


def removed_entry(profile_id: str, reason: int, survivor: str, job_id: str) -> tuple[str, bytes]:
    entry = score_log_pb2.ScoreChangeEntry(
        removed=score_log_pb2.ProfileScoresRemoved(
            profile_id=profile_id,
            reason=reason or removal_pb2.REMOVAL_REASON_MERGED,  # type: ignore[arg-type]
            surviving_profile_id=survivor,
            deletion_job_id=job_id,
        )
    )
    entry.occurred_at.GetCurrentTime()
    return profile_id, entry.SerializeToString()


def profile_score(
    scorer: ProfileScorer, score: float, reasons: list[tuple[str, float]], scored_at: int
) -> profile_pb2.ProfileScore:
    message = profile_pb2.ProfileScore(
        model=scorer.model, model_version=scorer.version, score=score
    )
    message.scored_at.FromNanoseconds(scored_at)
    for feature, contribution in reasons:
        message.reasons.add(feature=feature, contribution=contribution)
    return message
