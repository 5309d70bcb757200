"""The training set of a scoring model, and which of its rows do what.

A row is a (profile, cut-off) pair: the profile's features as they were at the cut-off, and a
label saying what happened in the horizon after it. A model is used on today's profiles to
predict what comes next, so it is judged the same way: the rows of the latest cut-offs are held
out, and the booster learns only from earlier ones. A random split would let it learn from the
very period it is judged on (a season, a campaign, a price change) and report numbers it will
not reach in production.

The held-out rows have three jobs that must not see each other's data: choosing the number of
boosting rounds, fitting the calibrator, and measuring. They are split in two halves with a
seeded shuffle, stratified by cut-off and label so that both halves look alike: the *tuning*
half drives early stopping and fits the calibrator, the *metric* half is only ever scored, to
compute the metrics. (Cross-fitting, swapping the halves and averaging, would measure on every
row, but it needs a second booster, and the one that serves would be neither.) With one
validation cut-off each profile has one held-out row, so no profile is in both halves.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt

from profilemesh.shared.errors import InvalidArgument

Indices = npt.NDArray[np.intp]


# -- The training set ------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingSet:
    """Rows of (profile, cut-off): features, a 0/1 label and when the features were taken.

    ``matrix`` is rows x features (NaN for a missing value), ``cutoffs`` nanoseconds since the
    epoch. ``baseline_columns`` are the columns the baseline reads (e.g. recency, frequency,
    monetary value); empty means the first column.
    """

    feature_names: tuple[str, ...]
    matrix: np.ndarray
    labels: np.ndarray
    cutoffs: np.ndarray
    baseline_columns: tuple[int, ...] = ()
    horizon_ns: int = 0
    """How far after its cut-off a row's label looks. A training row whose label window reaches
    into the validation period has seen the validation outcomes of the same people, so such
    rows are left out of training (0: labels look at nothing after the cut-off)."""

    def __post_init__(self) -> None:
        _check_features(self.feature_names, self.matrix)
        rows = len(self.matrix)
        _check_labels(self.labels, rows)
        if self.cutoffs.shape != (rows,):
            raise InvalidArgument.for_field(
                "cutoffs", f"expected one cut-off per row ({rows}), got shape {self.cutoffs.shape}"
            )
        _check_baseline_columns(self.baseline_columns, len(self.feature_names))

    @property
    def baseline(self) -> tuple[int, ...]:
        """The columns the baseline reads."""
        return self.baseline_columns or (0,)


def _check_features(names: tuple[str, ...], matrix: np.ndarray) -> None:
    if not names:
        raise InvalidArgument.for_field("feature_names", "at least one feature is needed")
    if len(set(names)) != len(names):
        raise InvalidArgument.for_field("feature_names", "feature names must be unique")
    if matrix.ndim != 2 or matrix.shape[1] != len(names):
        raise InvalidArgument.for_field(
            "matrix", f"expected rows of {len(names)} features, got shape {matrix.shape}"
        )
    if not len(matrix):
        raise InvalidArgument.for_field("matrix", "the training set has no rows")


def _check_labels(labels: np.ndarray, rows: int) -> None:
    if labels.shape != (rows,):
        raise InvalidArgument.for_field(
            "label", f"expected one label per row ({rows}), got shape {labels.shape}"
        )
    if not np.isin(labels, (0, 1)).all():
        raise InvalidArgument.for_field("label", "labels must be 0 or 1")


def _check_baseline_columns(columns: tuple[int, ...], features: int) -> None:
    if any(not 0 <= c < features for c in columns) or len(set(columns)) != len(columns):
        raise InvalidArgument.for_field(
            "baseline_columns", f"must be distinct column numbers from 0 to {features - 1}"
        )


# -- Which rows do what -----------------------------------------------------------------------


@dataclass(frozen=True)
class RowSplit:
    """Row numbers by role: ``train`` (earlier cut-offs), ``tune`` (early stopping and
    calibration) and ``measure`` (metrics), the last two from ``validation_cutoffs``."""

    train: Indices
    tune: Indices
    measure: Indices
    validation_cutoffs: tuple[int, ...]


def _format_cutoff(nanoseconds: int) -> str:
    return datetime.fromtimestamp(nanoseconds / 1e9, UTC).isoformat()


def _halves(rows: Indices, cutoffs: np.ndarray, labels: np.ndarray, seed: int) -> list[Indices]:
    """``rows`` dealt alternately into two halves, ordered by label, then cut-off, then a
    seeded shuffle: each half gets its share of every (label, cut-off) group, and with two
    positives or more, at least one of them."""
    shuffle = np.random.default_rng(seed).random(len(rows))
    order = rows[np.lexsort((shuffle, cutoffs[rows], labels[rows]))]
    return [np.sort(order[0::2]), np.sort(order[1::2])]


def split_rows(training: TrainingSet, *, validation_cutoffs: int = 1, seed: int = 0) -> RowSplit:
    """The rows of the latest ``validation_cutoffs`` distinct cut-offs, halved into tuning and
    metric rows, and the rows of all earlier cut-offs for training."""
    if validation_cutoffs < 1:
        raise InvalidArgument.for_field(
            "validation_cutoffs", f"must be at least 1, not {validation_cutoffs}"
        )
    distinct = np.unique(training.cutoffs)
    if len(distinct) <= validation_cutoffs:
        raise InvalidArgument.for_field(
            "cutoffs",
            f"time-based validation holds out the latest {validation_cutoffs} cut-off(s) and "
            f"trains on earlier ones, so it needs at least {validation_cutoffs + 1} distinct "
            f"cut-offs; the training set has {len(distinct)}",
        )
    held_out = distinct[-validation_cutoffs:]
    validation = np.isin(training.cutoffs, held_out)
    # Only rows whose label window closed before the validation period starts: otherwise the
    # model learns the very outcomes it is then measured on.
    train = ~validation & (training.cutoffs + training.horizon_ns <= held_out[0])
    if not train.any():
        raise InvalidArgument.for_field(
            "cutoffs",
            "no training cut-off is at least one horizon before the first validation cut-off"
            f" ({_format_cutoff(int(held_out[0]))}); add earlier cut-offs or a shorter horizon",
        )
    tune, measure = _halves(np.flatnonzero(validation), training.cutoffs, training.labels, seed)
    return RowSplit(
        train=np.flatnonzero(train),
        tune=tune,
        measure=measure,
        validation_cutoffs=tuple(int(c) for c in held_out),
    )


def _label_count(count: int, kind: str) -> str:
    return f"no {kind} labels" if count == 0 else f"only {count} {kind} label(s)"


def _require_classes(labels: np.ndarray, rows: str, minimum: int, why: str) -> None:
    """At least ``minimum`` positive and negative labels among ``labels``."""
    positives = int(labels.sum())
    for count, kind in ((positives, "positive"), (len(labels) - positives, "negative")):
        if count < minimum:
            raise InvalidArgument.for_field(
                "label", f"the {rows} have {_label_count(count, kind)}: {why}"
            )


def check_classes(training: TrainingSet, split: RowSplit) -> None:
    """Enough of both labels to train (one each) and to calibrate and measure (two each)."""
    first = _format_cutoff(split.validation_cutoffs[0])
    _require_classes(
        training.labels[split.train],
        f"training rows (cut-offs before {first})",
        1,
        "the model has nothing to tell apart",
    )
    _require_classes(
        training.labels[np.concatenate([split.tune, split.measure])],
        f"validation rows (cut-offs from {first})",
        2,
        "at least 2 of each are needed, one to calibrate on and one to measure on",
    )
