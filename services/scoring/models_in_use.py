"""The models and clusterings that serve, loaded once and kept until the registry changes.

Loading a LightGBM booster from text takes milliseconds, scoring one row a fraction of one, so
boosters are cached by (model, version); the champions and the latest clusterings are re-read
from the registry only when a training run, a promotion or a discovery says they changed.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from profilemesh.common.v1 import profile_pb2
from profilemesh.services.scoring.clustering import ClusterModel
from profilemesh.services.scoring.model import Scorer
from profilemesh.services.scoring.registry import ModelRegistry, StoredClustering, StoredModel

Floats = np.ndarray[Any, np.dtype[np.float64]]


@dataclass(frozen=True, slots=True)
class RowScore:
    """One profile's calibrated score and its top reasons (feature, contribution)."""

    score: float
    base_value: float
    reasons: list[tuple[str, float]]

    def to_proto(
        self, scorer: ProfileScorer, scored_at: int, row: Floats | None = None
    ) -> profile_pb2.ProfileScore:
        message = profile_pb2.ProfileScore(
            model=scorer.model,
            model_version=scorer.version,
            score=self.score,
            base_value=self.base_value,
        )
        message.scored_at.FromNanoseconds(scored_at)
        position = {name: i for i, name in enumerate(scorer.feature_names)}
        for feature, contribution in self.reasons:
            reason = message.reasons.add(feature=feature, contribution=contribution)
            name, _, version = feature.partition("@")
            reason.value.name = name
            reason.value.version = int(version or 0)
            if row is not None and feature in position:
                value = float(row[position[feature]])
                if not np.isnan(value):
                    reason.value.double_value = value
        return message


class ScoredRows:
    """Scores of a matrix's rows with their reasons."""

    def __init__(self, scores: Floats, base_value: float, reasons: list[list[tuple[str, float]]]):
        self.scores = scores
        self.base_value = base_value
        self.reasons = reasons

    def score(self, index: int) -> RowScore:
        reasons = self.reasons[index] if self.reasons else []
        return RowScore(float(self.scores[index]), self.base_value, reasons)


class ProfileScorer:
    """A model version ready to score: name, version, feature schema, booster."""

    def __init__(self, stored: StoredModel) -> None:
        metadata = stored.metadata
        self.model = metadata.model
        self.version = metadata.version
        self.feature_names: tuple[str, ...] = tuple(metadata.feature_names)
        self.metadata = metadata
        self.scorer = Scorer.load(self.feature_names, stored.booster_text, stored.calibration)

    def explain(self, matrix: Floats, top: int) -> ScoredRows:
        if top <= 0:
            return ScoredRows(self.scorer.score(matrix), float("nan"), [])
        explanations = self.scorer.explain(matrix, top)
        return ScoredRows(
            np.asarray(explanations.scores, dtype=np.float64),
            float(explanations.base_value),
            [list(row) for row in explanations.reasons],
        )


class ClusteringInUse:
    """A clustering version ready to assign profiles."""

    def __init__(self, stored: StoredClustering) -> None:
        self.metadata = stored.metadata
        self.name = stored.metadata.name
        self.version = stored.metadata.version
        self.feature_names: tuple[str, ...] = tuple(stored.metadata.feature_names)
        self.model = ClusterModel.from_json(stored.model)
        self._personas = {c.cluster_id: c.persona for c in stored.metadata.clusters}

    def assign(self, matrix: Floats) -> np.ndarray[Any, np.dtype[np.int64]]:
        return np.asarray(self.model.assign(matrix), dtype=np.int64)

    def assignment(
        self, cluster_id: int, assigned_at: int, distance: float = 0.0
    ) -> profile_pb2.ClusterAssignment:
        message = profile_pb2.ClusterAssignment(
            clustering=self.name,
            clustering_version=self.version,
            cluster_id=cluster_id,
            persona=self._personas.get(cluster_id, ""),
            distance=distance,
        )
        message.assigned_at.FromNanoseconds(assigned_at)
        return message


class ModelsInUse:
    """Cached scorers and clusterings over the registry."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self._lock = threading.Lock()
        self._scorers: dict[tuple[str, str], ProfileScorer] = {}
        self._champion_versions: dict[str, str] = {}
        self._champions: list[ProfileScorer] | None = None
        self._clusterings: list[ClusteringInUse] | None = None

    def changed(self) -> None:
        """The registry changed (a new version, a promotion, a clustering): re-read it."""
        with self._lock:
            self._champions = None
            self._clusterings = None
            self._champion_versions.clear()

    def scorer(self, model: str, version: str = "") -> ProfileScorer:
        """The scorer of a version (the champion when empty); NotFound from the registry.

        A cached scorer is found without reading the registry: loading a large booster's text
        costs milliseconds, which an online score cannot spend."""
        with self._lock:
            cached_version = version or self._champion_versions.get(model)
            scorer = self._scorers.get((model, cached_version)) if cached_version else None
        if scorer is not None:
            return scorer
        stored = self.registry.get(model, version)
        key = (stored.metadata.model, stored.metadata.version)
        scorer = ProfileScorer(stored)
        with self._lock:
            scorer = self._scorers.setdefault(key, scorer)
            if not version:
                self._champion_versions[model] = stored.metadata.version
        return scorer

    def champions(self) -> list[ProfileScorer]:
        with self._lock:
            if self._champions is not None:
                return self._champions
        champions = [
            self.scorer(s.metadata.model, s.metadata.version) for s in self.registry.champions()
        ]
        with self._lock:
            self._champions = champions
        return champions

    def clusterings(self) -> list[ClusteringInUse]:
        with self._lock:
            if self._clusterings is not None:
                return self._clusterings
        clusterings = [ClusteringInUse(s) for s in self.registry.latest_clusterings()]
        with self._lock:
            self._clusterings = clusterings
        return clusterings

    def feature_names(self, scorers: Sequence[ProfileScorer]) -> list[str]:
        return sorted({n for s in scorers for n in s.feature_names})
