"""The simple model a new version has to beat: logistic regression on a few columns.

A gradient-boosted model over dozens of features is only worth its opacity if it ranks and
calibrates better than what a marketer would build by hand from recency, frequency and monetary
value. The baseline is that hand-built model, fitted the same way every time so that versions
can be compared: the chosen columns, missing values replaced by the training median, each
column standardised, and an L2-penalised logistic regression. It learns from exactly the rows
the booster learns from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

Floats = npt.NDArray[np.float64]
Labels = npt.NDArray[np.int8]


def baseline_name(feature_names: Sequence[str]) -> str:
    """How a baseline on these features is recorded, e.g.
    ``logistic_regression[recency_days@1,orders_90d@1]``."""
    return f"logistic_regression[{','.join(feature_names)}]"


@dataclass(frozen=True)
class Baseline:
    """A fitted baseline: the name it is recorded under, the columns it reads."""

    name: str
    columns: tuple[int, ...]
    pipeline: Any

    def raw_scores(self, matrix: Floats) -> Floats:
        """The baseline's log-odds for each row of the full feature matrix."""
        return np.asarray(
            self.pipeline.decision_function(matrix[:, self.columns]), dtype=np.float64
        )


def fit_baseline(
    matrix: Floats, labels: Labels, columns: tuple[int, ...], feature_names: Sequence[str]
) -> Baseline:
    """The baseline on ``columns`` of ``matrix`` (training rows only), both classes present."""
    pipeline = make_pipeline(
        # A column that is missing everywhere stays in, as zeros, so that the column count
        # does not depend on the data.
        SimpleImputer(strategy="median", keep_empty_features=True),
        StandardScaler(),
        LogisticRegression(max_iter=1000),
    )
    pipeline.fit(matrix[:, columns], labels)
    name = baseline_name([feature_names[c] for c in columns])
    return Baseline(name=name, columns=columns, pipeline=pipeline)
