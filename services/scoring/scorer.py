"""A trained model ready to score: the booster parsed once, calibrated scores, reasons.

This is the online path (one profile, a few milliseconds end to end through gRPC) as well as
batch scoring, so it does as little as possible beyond ``Booster.predict``: the matrix is
checked by shape only, the calibration is a vectorised numpy map, and the feature names are
checked once per request by :meth:`Scorer.check_schema` rather than per row.

Small requests run the booster on one thread: spinning up OpenMP workers costs more than the
trees for a handful of rows, and a server handling many requests at once is better served by
one thread each. LightGBM keeps its thread count in a process-wide setting that every call with
``num_threads`` overwrites, so every call here passes one explicitly.

Reasons are LightGBM's per-feature contributions (TreeSHAP, ``pred_contrib``): in log-odds of
the raw booster, they add up with the base value (the last column) to the raw score. They are
reported uncalibrated, since calibration is a monotone map of the total and has no share per
feature; their signs and order are what a reader needs.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightgbm
import numpy as np
import numpy.typing as npt

from profilemesh.services.scoring.calibration import Calibration, calibration_from_json
from profilemesh.shared.errors import FailedPrecondition, InvalidArgument

Floats = npt.NDArray[np.float64]
Reason = tuple[str, float]

# Up to this many rows a call runs on one thread (see the module docstring); measured on two
# cores, a second thread starts to pay off at about 16 rows.
SINGLE_THREAD_ROWS = 8


@dataclass(frozen=True)
class Explanations:
    """Calibrated scores of a batch of rows and why each got its score.

    ``base_value`` is the booster's expected raw score (log-odds) before any feature is seen
    (NaN for no rows); ``reasons[i]`` are the features with the largest contributions to row
    ``i``'s raw score, as (feature, contribution in log-odds), largest magnitude first.
    """

    scores: Floats
    base_value: float
    reasons: tuple[tuple[Reason, ...], ...]


def _load_booster(booster_text: str) -> lightgbm.Booster:
    """The booster of a ``model_to_string()`` text, or an error naming the field."""
    try:
        return lightgbm.Booster(model_str=booster_text)
    except lightgbm.basic.LightGBMError as error:
        raise InvalidArgument.for_field("booster_text", f"not a LightGBM model: {error}") from None


def _schema_problems(expected: Sequence[str], given: Sequence[str]) -> list[str]:
    """What differs between the model's feature names and ``given``, for a reader."""
    missing = Counter(expected) - Counter(given)
    extra = Counter(given) - Counter(expected)
    problems = []
    if missing:
        problems.append("missing " + ", ".join(sorted(missing)))
    if extra:
        problems.append("unexpected " + ", ".join(sorted(extra)))
    if not problems:
        position = next(i for i, (a, b) in enumerate(zip(expected, given, strict=True)) if a != b)
        problems.append(
            f"out of order: position {position} is {given[position]!r}, "
            f"the model expects {expected[position]!r}"
        )
    return problems


class Scorer:
    """A trained model ready to score: booster loaded once, calibrated scores, reasons."""

    def __init__(
        self,
        feature_names: Sequence[str],
        booster: lightgbm.Booster,
        calibration: Calibration,
        *,
        num_threads: int = 0,
    ) -> None:
        self.feature_names: tuple[str, ...] = tuple(feature_names)
        self.calibration = calibration
        self._booster = booster
        self._columns = len(self.feature_names)
        # 0 leaves the batch thread count to OpenMP (one per core).
        self._num_threads = num_threads
        if booster.num_feature() != self._columns:
            raise InvalidArgument.for_field(
                "feature_names",
                f"the booster has {booster.num_feature()} features, not {self._columns} as named",
            )

    @classmethod
    def load(
        cls,
        feature_names: Sequence[str],
        booster_text: str,
        calibration: Mapping[str, Any],
        *,
        num_threads: int = 0,
    ) -> Scorer:
        """The scorer of a stored model: ``booster_text`` from ``model_to_string()`` and the
        calibrator's JSON. ``num_threads`` bounds batch calls (0: one per core)."""
        return cls(
            feature_names,
            _load_booster(booster_text),
            calibration_from_json(calibration),
            num_threads=num_threads,
        )

    def check_schema(self, names: Sequence[str]) -> None:
        """Refuse features that are not exactly the model's, in the model's order."""
        if tuple(names) == self.feature_names:
            return
        problems = _schema_problems(self.feature_names, names)
        description = "; ".join(problems)
        raise FailedPrecondition(
            f"the features do not match the model's schema: {description}",
            violations=[("feature_names", description)],
        )

    def _rows(self, matrix: npt.ArrayLike) -> Floats:
        """``matrix`` as a C-ordered float64 rows x features array (one row if 1-D)."""
        rows = np.asarray(matrix, dtype=np.float64)
        if rows.ndim == 1:
            rows = rows.reshape(1, -1)
        if rows.ndim != 2 or rows.shape[1] != self._columns:
            raise InvalidArgument.for_field(
                "matrix", f"expected rows of {self._columns} features, got shape {rows.shape}"
            )
        return np.ascontiguousarray(rows)

    def _threads(self, rows: int) -> int:
        return 1 if rows <= SINGLE_THREAD_ROWS else self._num_threads

    def raw_scores(self, matrix: npt.ArrayLike) -> Floats:
        """The booster's uncalibrated scores (log-odds) of each row."""
        rows = self._rows(matrix)
        raw = self._booster.predict(rows, raw_score=True, num_threads=self._threads(len(rows)))
        return np.asarray(raw, dtype=np.float64)

    def score(self, matrix: npt.ArrayLike) -> Floats:
        """Calibrated probabilities, one per row (a 1-D ``matrix`` is one row). NaN is a
        missing value."""
        return self.calibration.apply(self.raw_scores(matrix))

    def explain(self, matrix: npt.ArrayLike, top: int) -> Explanations:
        """Calibrated scores and, per row, the ``top`` features with the largest contributions
        by magnitude (fewer when the model has fewer features)."""
        if top < 0:
            raise InvalidArgument.for_field("top", f"must be at least 0, not {top}")
        rows = self._rows(matrix)
        if not len(rows):
            return Explanations(scores=np.empty(0), base_value=math.nan, reasons=())
        contributions = np.asarray(
            self._booster.predict(rows, pred_contrib=True, num_threads=self._threads(len(rows))),
            dtype=np.float64,
        )
        scores = self.calibration.apply(contributions.sum(axis=1))
        base_value = float(contributions[0, -1])
        reasons = _top_reasons(contributions[:, :-1], self.feature_names, top)
        return Explanations(scores=scores, base_value=base_value, reasons=reasons)


def _top_reasons(
    contributions: Floats, names: tuple[str, ...], top: int
) -> tuple[tuple[Reason, ...], ...]:
    """Per row, the ``top`` (name, contribution) pairs of largest magnitude, largest first;
    ties in the order of the features."""
    k = min(top, contributions.shape[1])
    if k == 0:
        return tuple(() for _ in range(len(contributions)))
    # A stable sort on -|c| puts ties in feature order; argpartition would not.
    order = np.argsort(-np.abs(contributions), axis=1, kind="stable")[:, :k]
    chosen = np.take_along_axis(contributions, order, axis=1)
    return tuple(
        tuple((names[i], float(c)) for i, c in zip(row, values, strict=True))
        for row, values in zip(order.tolist(), chosen.tolist(), strict=True)
    )
