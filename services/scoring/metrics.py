"""How good a model's probabilities are on rows it never learnt from (ModelMetrics).

Ranking and probability quality are reported side by side because they answer different
questions: ROC-AUC, PR-AUC and top-decile lift say whether the right profiles come first (what
a campaign aimed at the top of the list cares about), the Brier score and log loss whether a
score of 0.3 really means three in ten (what a segment rule such as ``churn.score > 0.7`` relies
on). The caller checks that both classes are present; here that is a precondition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    log_loss,
    roc_auc_score,
)

Floats = npt.NDArray[np.float64]
Labels = npt.NDArray[np.int8]

# The share of the highest-scored rows whose positive rate the lift compares.
TOP_SHARE = 0.1


@dataclass(frozen=True)
class Metrics:
    """Quality of calibrated probabilities on the metric rows, as ``ModelMetrics`` in the
    proto: ``positive_rate`` is the share of positives among the ``validation_rows`` measured,
    ``training_rows`` the number of rows the model learnt from."""

    roc_auc: float
    pr_auc: float
    top_decile_lift: float
    brier: float
    log_loss: float
    training_rows: int
    validation_rows: int
    positive_rate: float


def top_decile_lift(labels: Labels, scores: Floats) -> float:
    """The positive rate among the 10% highest-scored rows divided by the overall rate.

    Rows tied with the last one of the top tenth share its places: each tied row counts with
    the fraction of the remaining places it would get on average, so that a model that gives
    everyone the same score has a lift of exactly 1 rather than one that depends on row order.
    """
    rate = float(labels.mean())
    if rate == 0.0:
        return math.nan
    top = max(1, math.ceil(TOP_SHARE * len(scores)))
    threshold = np.partition(scores, len(scores) - top)[len(scores) - top]
    above = scores > threshold
    tied = scores == threshold
    places_left = top - int(above.sum())
    positives = float(labels[above].sum())
    positives += places_left * float(labels[tied].mean())
    return positives / top / rate


def evaluate(labels: Labels, probabilities: Floats, *, training_rows: int) -> Metrics:
    """The metrics of ``probabilities`` against 0/1 ``labels`` (both classes present)."""
    y = labels.astype(np.int64)
    return Metrics(
        roc_auc=float(roc_auc_score(y, probabilities)),
        pr_auc=float(average_precision_score(y, probabilities)),
        top_decile_lift=top_decile_lift(labels, probabilities),
        brier=float(brier_score_loss(y, probabilities)),
        log_loss=float(log_loss(y, probabilities, labels=[0, 1])),
        training_rows=training_rows,
        validation_rows=len(y),
        positive_rate=float(y.mean()),
    )
