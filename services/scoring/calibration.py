"""Turning a booster's raw scores into probabilities that mean what they say.

The booster is trained with the positives up-weighted (so that a rare outcome still shapes the
trees), which shifts its raw log-odds away from the true ones; the segment rules downstream
(``churn.score > 0.7``) need a 0.7 to mean seven in ten. A calibrator is a monotone map from
raw score to probability, fitted on held-out rows, so it never changes the order of profiles.

Two calibrators, chosen by how many rows there are to fit them on:

- Platt scaling, ``p = 1 / (1 + exp(-(a * raw + b)))``: two parameters, stable on a few hundred
  rows, and exact when the only distortion is the shift and stretch that class weights cause.
- Isotonic regression: any monotone shape, for larger sets, where Platt's logistic form would
  be the limit. Its end values are kept half a row away from 0 and 1, so that a block of
  held-out rows that happened to be all negative does not promise certainty.

Both are plain JSON (``to_json`` / :func:`calibration_from_json`) and are applied with numpy
alone, vectorised, so that a batch costs little next to the booster itself.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from profilemesh.shared.errors import InvalidArgument

Floats = npt.NDArray[np.float64]
Labels = npt.NDArray[np.int8]

# Below this many calibration rows, Platt scaling; from it on, isotonic regression.
ISOTONIC_MIN_ROWS = 1000
# Platt's inverse regularisation: large enough that the fit is effectively unpenalised, small
# enough to stay finite when the raw scores separate the classes perfectly.
_PLATT_C = 1e4
# exp() overflows beyond about 709; a logit of 40 is already 1 - 4e-18.
_LOGIT_BOUND = 40.0

PLATT = "platt"
ISOTONIC = "isotonic"


class Calibration(ABC):
    """A fitted monotone map from raw score (log-odds) to probability."""

    @abstractmethod
    def apply(self, raw: Floats) -> Floats:
        """The probabilities of ``raw`` scores, element-wise."""

    @abstractmethod
    def to_json(self) -> dict[str, Any]:
        """The calibrator as plain JSON, ``{"method": ..., ...}``."""


@dataclass(frozen=True)
class Platt(Calibration):
    """``p = 1 / (1 + exp(-(a * raw + b)))``."""

    a: float
    b: float

    def apply(self, raw: Floats) -> Floats:
        """The probabilities of ``raw`` scores, element-wise."""
        logit = np.clip(self.a * raw + self.b, -_LOGIT_BOUND, _LOGIT_BOUND)
        return np.asarray(1.0 / (1.0 + np.exp(-logit)), dtype=np.float64)

    def to_json(self) -> dict[str, Any]:
        """``{"method": "platt", "a": ..., "b": ...}``."""
        return {"method": PLATT, "a": self.a, "b": self.b}


@dataclass(frozen=True)
class Isotonic(Calibration):
    """A non-decreasing piecewise-linear map through the points (``x``, ``y``), flat beyond
    the first and last."""

    x: Floats
    y: Floats

    def apply(self, raw: Floats) -> Floats:
        """The probabilities of ``raw`` scores, element-wise."""
        return np.asarray(np.interp(raw, self.x, self.y), dtype=np.float64)

    def to_json(self) -> dict[str, Any]:
        """``{"method": "isotonic", "x": [...], "y": [...]}``."""
        return {"method": ISOTONIC, "x": self.x.tolist(), "y": self.y.tolist()}


def fit_platt(raw: Floats, labels: Labels) -> Platt:
    """Platt scaling: a one-feature logistic regression on the raw scores."""
    regression = LogisticRegression(C=_PLATT_C, max_iter=1000)
    regression.fit(raw.reshape(-1, 1), labels)
    return Platt(a=float(regression.coef_[0, 0]), b=float(regression.intercept_[0]))


def fit_isotonic(raw: Floats, labels: Labels) -> Isotonic:
    """Isotonic regression of the labels on the raw scores, its values kept within half a row
    of 0 and 1."""
    margin = 0.5 / len(labels)
    regression = IsotonicRegression(y_min=margin, y_max=1.0 - margin, out_of_bounds="clip")
    regression.fit(raw, labels.astype(np.float64))
    return Isotonic(
        x=np.asarray(regression.X_thresholds_, dtype=np.float64),
        y=np.asarray(regression.y_thresholds_, dtype=np.float64),
    )


def fit_calibration(raw: Floats, labels: Labels) -> Calibration:
    """The calibrator for these held-out rows: Platt below ``ISOTONIC_MIN_ROWS`` rows,
    isotonic from there on. Both classes must be present."""
    if len(labels) < ISOTONIC_MIN_ROWS:
        return fit_platt(raw, labels)
    return fit_isotonic(raw, labels)


def _number(value: object, name: str) -> float:
    """A finite JSON number, or an error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidArgument.for_field("calibration", f"{name} must be a finite number")
    return float(value)


def _points(value: object, name: str) -> Floats:
    """A non-empty, non-decreasing list of finite numbers, or an error naming ``name``."""
    if not isinstance(value, list | tuple) or not value:
        raise InvalidArgument.for_field("calibration", f"{name} must be a non-empty list")
    points = np.array([_number(v, name) for v in value], dtype=np.float64)
    if np.any(np.diff(points) < 0):
        raise InvalidArgument.for_field("calibration", f"{name} must be non-decreasing")
    return points


def _isotonic_from_json(calibration: Mapping[str, Any]) -> Isotonic:
    x = _points(calibration.get("x"), "x")
    y = _points(calibration.get("y"), "y")
    if len(x) != len(y):
        raise InvalidArgument.for_field("calibration", "x and y must have the same length")
    if y[0] < 0.0 or y[-1] > 1.0:
        raise InvalidArgument.for_field("calibration", "y must lie between 0 and 1")
    return Isotonic(x=x, y=y)


def calibration_from_json(calibration: Mapping[str, Any]) -> Calibration:
    """The calibrator that ``Calibration.to_json`` wrote, checked."""
    method = calibration.get("method")
    if method == PLATT:
        return Platt(a=_number(calibration.get("a"), "a"), b=_number(calibration.get("b"), "b"))
    if method == ISOTONIC:
        return _isotonic_from_json(calibration)
    raise InvalidArgument.for_field(
        "calibration", f"method must be {PLATT!r} or {ISOTONIC!r}, not {method!r}"
    )
