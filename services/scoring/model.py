"""Training a scoring model: time-based validation, early stopping, calibration, metrics.

The rows of the latest cut-offs are held out and halved (see :mod:`.training_set`): the booster
learns from the earlier cut-offs, the tuning half drives early stopping and fits the calibrator,
the metric half is only ever scored, to compute the metrics.

The booster is not retrained on the held-out cut-offs afterwards: the model that serves is the
one that was measured, and its metrics describe it exactly. The metric rows are scored through
a :class:`Scorer` loaded from the stored text and calibration, the same path serving takes.

Positives are up-weighted by the square root of the negative-to-positive ratio, so that a rare
outcome shapes the trees without a few rows dominating the gradient. Early stopping watches the
log loss of the tuning rows weighted the same way, which is the very objective the booster
minimises: smoother than ROC-AUC, which on a few hundred rows can peak after two rounds by
chance. The weights distort the booster's probabilities, not its ranking; the calibrator
restores the probabilities.

The baseline (:mod:`.baseline`) takes the same steps: fitted on the training rows, calibrated
on the tuning half, measured on the metric half.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightgbm
import numpy as np
import numpy.typing as npt

from profilemesh.services.scoring.baseline import fit_baseline
from profilemesh.services.scoring.calibration import fit_calibration
from profilemesh.services.scoring.metrics import Metrics, evaluate
from profilemesh.services.scoring.scorer import Explanations, Scorer
from profilemesh.services.scoring.training_set import (
    RowSplit,
    TrainingSet,
    check_classes,
    split_rows,
)
from profilemesh.shared.errors import InvalidArgument

__all__ = [
    "Explanations",
    "Metrics",
    "RowSplit",
    "Scorer",
    "TrainedModel",
    "TrainingSet",
    "default_params",
    "split_rows",
    "train",
]

Floats = npt.NDArray[np.float64]
Labels = npt.NDArray[np.int8]

# Boosting rounds at most, and rounds without improvement on the tuning half before stopping.
MAX_ROUNDS = 1000
EARLY_STOPPING_ROUNDS = 50
# Smallest leaf: 0.1% of the training rows, within these bounds, so that a leaf is never a
# handful of profiles on a small set nor a needlessly fine slice of a large one.
_MIN_LEAF_ROWS = (20, 500)
# Training runs on two threads from this many rows on, on one below: on a small set OpenMP's
# barriers cost more than the second core brings, and on cores shared with other processes a
# descheduled worker stalls every barrier (ten times slower, measured).
_PARALLEL_ROWS = 50_000


# -- The booster ------------------------------------------------------------------------------


def _min_leaf_rows(training_rows: int) -> int:
    low, high = _MIN_LEAF_ROWS
    return int(np.clip(training_rows // 1000, low, high))


def default_params(training_rows: int, positives: int, *, seed: int = 0) -> dict[str, Any]:
    """LightGBM parameters for tabular churn or propensity data of 1k to 1M rows, with
    ``positives`` of the ``training_rows`` labelled 1."""
    negatives = training_rows - positives
    return {
        "objective": "binary",
        "metric": "binary_logloss",
        "learning_rate": 0.05,
        "num_leaves": 31,
        # Leaf-wise growth can chain 31 leaves 15 deep; 8 costs no accuracy on churn-like
        # data, curbs overfitting on small sets, and makes explanations (TreeSHAP, quadratic
        # in depth) a quarter cheaper on the online path.
        "max_depth": 8,
        "min_data_in_leaf": _min_leaf_rows(training_rows),
        "feature_fraction": 0.8,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "lambda_l2": 1.0,
        "scale_pos_weight": math.sqrt(negatives / positives),
        "seed": seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": 2 if training_rows >= _PARALLEL_ROWS else 1,
        "verbose": -1,
    }


@dataclass(frozen=True)
class _Fitted:
    text: str
    rounds: int
    gains: Floats


def _tuning_weights(settings: Mapping[str, Any], train: Labels, tune: Labels) -> Floats:
    """Weights of the tuning rows that count each positive as training does: by
    ``scale_pos_weight``, or by the negative-to-positive ratio under ``is_unbalance``."""
    if settings.get("is_unbalance"):
        positives = int(train.sum())
        weight = (len(train) - positives) / positives
    else:
        weight = float(settings.get("scale_pos_weight", 1.0))
    return np.where(tune == 1, weight, 1.0)


def _whole_numbers_as_int(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with whole floats as ints: parameters that arrive through JSON or a
    protobuf Struct are all floats, and LightGBM refuses ``num_leaves=31.0``."""
    return {
        key: int(value) if isinstance(value, float) and value.is_integer() else value
        for key, value in params.items()
    }


def _fit_booster(
    matrix: Floats, labels: Labels, split: RowSplit, params: dict[str, Any]
) -> _Fitted:
    """A booster on the training rows, stopped early on the tuning rows; its text holds only
    the rounds up to the best one."""
    settings = dict(params)
    max_rounds = int(settings.pop("num_boost_round", MAX_ROUNDS))
    patience = int(settings.pop("early_stopping_rounds", EARLY_STOPPING_ROUNDS))
    train_set = lightgbm.Dataset(matrix[split.train], labels[split.train], params=settings)
    tune_set = lightgbm.Dataset(
        matrix[split.tune],
        labels[split.tune],
        weight=_tuning_weights(settings, labels[split.train], labels[split.tune]),
        reference=train_set,
    )
    try:
        booster = lightgbm.train(
            settings,
            train_set,
            num_boost_round=max_rounds,
            valid_sets=[tune_set],
            callbacks=[lightgbm.early_stopping(patience, first_metric_only=True, verbose=False)],
        )
    except lightgbm.basic.LightGBMError as error:
        raise InvalidArgument.for_field("params", f"LightGBM refused them: {error}") from None
    rounds = int(booster.best_iteration or booster.current_iteration())
    return _Fitted(
        text=booster.model_to_string(num_iteration=rounds),
        rounds=rounds,
        gains=np.asarray(
            booster.feature_importance(importance_type="gain", iteration=rounds), dtype=np.float64
        ),
    )


def _importances(names: tuple[str, ...], gains: Floats) -> tuple[tuple[str, float], ...]:
    """Each feature's share of the total gain, largest first (ties in feature order)."""
    total = float(gains.sum())
    shares = gains / total if total > 0 else np.zeros_like(gains)
    order = np.argsort(-shares, kind="stable")
    return tuple((names[i], float(shares[i])) for i in order)


# -- Training ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainedModel:
    """A trained, calibrated and measured model, ready to be recorded as a ModelVersion.

    ``params`` are the LightGBM parameters used, with ``num_boost_round`` the number of rounds
    early stopping chose; ``importances`` each feature's share of the total split gain, by
    decreasing share; ``validation_cutoffs`` the held-out cut-offs (ns), oldest first.
    """

    feature_names: tuple[str, ...]
    booster_text: str
    calibration: dict[str, Any]
    params: dict[str, Any]
    metrics: Metrics
    baseline: str
    baseline_metrics: Metrics
    importances: tuple[tuple[str, float], ...]
    validation_cutoffs: tuple[int, ...]

    def scorer(self, *, num_threads: int = 0) -> Scorer:
        """A scorer for this model."""
        return Scorer.load(
            self.feature_names, self.booster_text, self.calibration, num_threads=num_threads
        )


def _baseline_metrics(
    training: TrainingSet, matrix: Floats, labels: Labels, split: RowSplit
) -> tuple[str, Metrics]:
    """The baseline's name and its metrics, fitted and measured like the booster."""
    baseline = fit_baseline(
        matrix[split.train], labels[split.train], training.baseline, training.feature_names
    )
    calibration = fit_calibration(baseline.raw_scores(matrix[split.tune]), labels[split.tune])
    probabilities = calibration.apply(baseline.raw_scores(matrix[split.measure]))
    metrics = evaluate(labels[split.measure], probabilities, training_rows=len(split.train))
    return baseline.name, metrics


def train(
    training: TrainingSet,
    *,
    validation_cutoffs: int = 1,
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> TrainedModel:
    """Train, early-stop, calibrate and measure a model on ``training``, and its baseline.

    The latest ``validation_cutoffs`` distinct cut-offs are held out (see
    :mod:`.training_set`). ``params`` override :func:`default_params`; ``num_boost_round``
    there is the most rounds to try and ``early_stopping_rounds`` the patience. ``seed`` fixes
    the split of the held-out rows and LightGBM's sampling, so the same inputs give the same
    model.
    """
    split = split_rows(training, validation_cutoffs=validation_cutoffs, seed=seed)
    check_classes(training, split)
    matrix = np.asarray(training.matrix, dtype=np.float64)
    labels = np.asarray(training.labels, dtype=np.int8)
    used = default_params(len(split.train), int(labels[split.train].sum()), seed=seed)
    overrides = _whole_numbers_as_int(params or {})
    if "is_unbalance" in overrides:
        # LightGBM takes one way of weighting the classes, not both.
        del used["scale_pos_weight"]
    used.update(overrides)
    fitted = _fit_booster(matrix, labels, split, used)

    threads = int(used.get("num_threads", 0))
    booster = lightgbm.Booster(model_str=fitted.text)
    tune_raw = booster.predict(matrix[split.tune], raw_score=True, num_threads=threads)
    calibration = fit_calibration(np.asarray(tune_raw, dtype=np.float64), labels[split.tune])
    scorer = Scorer.load(
        training.feature_names, fitted.text, calibration.to_json(), num_threads=threads
    )
    metrics = evaluate(
        labels[split.measure], scorer.score(matrix[split.measure]), training_rows=len(split.train)
    )
    baseline, baseline_metrics = _baseline_metrics(training, matrix, labels, split)

    used.pop("early_stopping_rounds", None)
    return TrainedModel(
        feature_names=training.feature_names,
        booster_text=fitted.text,
        calibration=calibration.to_json(),
        params={**used, "num_boost_round": fitted.rounds},
        metrics=metrics,
        baseline=baseline,
        baseline_metrics=baseline_metrics,
        importances=_importances(training.feature_names, fitted.gains),
        validation_cutoffs=split.validation_cutoffs,
    )
