"""Behavioural segments: profiles clustered on their features, each cluster told as a persona.

Marketers ask "who are our customers?" long before they can say which segment they want. A
clustering answers with a handful of groups that behave alike ("recent big spenders", "lapsed
occasional customers"), each with its size, its medians and what sets it apart from the whole
base, so that a person can read the groups and turn the interesting ones into segments.

The features are put on one footing before clustering, since k-means and Gaussian mixtures
measure distance in whatever units they are given:

- missing values (and infinities) take the feature's median, so that a profile without a value
  sits in the middle of that feature rather than at an extreme;
- a non-negative feature whose distribution is strongly right-skewed (sample skewness above 1:
  order counts, revenue, days since the last visit) is taken as sign(x) log(1 + |x|). Without
  it one whale with a hundred times the usual revenue makes a cluster of their own, and
  everyone else is squeezed into the rest; on the log scale, 6 orders against 1 is as far as
  60 against 10. The sign keeps the transform defined for a negative value seen after training;
- every feature is standardised to mean 0 and standard deviation 1 over all profiles, so that
  none weighs more for being measured in cents; a constant feature keeps scale 1 (it is 0
  everywhere and pulls no cluster apart).

K-means (the default) is fitted with several seeded restarts. When the number of clusters is
not given it is chosen between 2 and ``max_k`` by the best mean silhouette: how much nearer each
profile is to its own cluster than to the next one. A Gaussian mixture (full covariances) is
chosen instead by the lowest BIC; on count features BIC tends to prefer more components than a
person would call groups, which is why k-means is the default. Both are fitted on a seeded
sample of at most ``sample_size`` profiles, where silhouettes are measured too (their cost grows
with the square of the rows), and every profile is then assigned to the nearest centre, or the
most likely component.

Clusters are numbered by size, largest first, so that the numbering of one clustering does not
depend on where the fit happened to start.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.cluster import KMeans
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

from profilemesh.shared.errors import InvalidArgument

Floats = npt.NDArray[np.float64]
Labels = npt.NDArray[np.int64]

METHODS = ("kmeans", "gaussian_mixture")
MAX_CLUSTERS = 100
"""More clusters than this are no longer personas anyone reads."""
JSON_FORMAT = 1

# A non-negative feature more skewed than this is clustered on its logarithm: Bulmer's bound
# of "moderately skewed" (a gamma of shape 16 has skewness 0.5, an exponential 2, a
# lognormal(0, 1) 6). It takes in durations such as tenure (a gamma of shape 4 has skewness 1),
# where a week against a month matters more than two years against two years and three weeks.
_LOG_SKEWNESS = 0.5
_KMEANS_RESTARTS = 4
_MIXTURE_RESTARTS = 2
# Added to the diagonal of every mixture covariance, in standardised units: a variance floor of
# 1% of the feature's variance. Without it a component collapses onto one value of a count
# feature (orders = 0), whose likelihood then grows without bound and BIC rewards it.
_MIXTURE_VARIANCE_FLOOR = 0.01
# Memory for one block of the pairwise distances when computing silhouettes. They are computed
# in float32, to about 1e-6 of the float64 value, in a third of the time.
_SILHOUETTE_BLOCK_BYTES = 32 << 20
# A feature names a persona when its centre is at least this many standard deviations from the
# base's mean; up to this many features name it, and the description lists as many.
_NOTABLE_DIFFERENCE = 0.5
_LABEL_FEATURES = 3
_DESCRIBED_FEATURES = 3


# -- The feature space ------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureTransform:
    """How raw feature values become the standardised space the clusters live in.

    ``medians`` replace missing values (they are also the base's medians, in the features' own
    units); a feature with ``log`` set is taken as sign(x) log(1 + |x|); then ``mean`` is
    subtracted and the result divided by ``scale``.
    """

    medians: tuple[float, ...]
    log: tuple[bool, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]

    def apply(self, matrix: npt.ArrayLike) -> Floats:
        """The standardised points of ``matrix`` (one row per profile, features in order)."""
        values = _as_matrix(matrix, len(self.medians))
        standardised = (self._logged(values) - np.asarray(self.mean)) / np.asarray(self.scale)
        return np.asarray(standardised, dtype=np.float64)

    def invert(self, points: Floats) -> Floats:
        """Standardised points back in the features' own units."""
        logged = points * np.asarray(self.scale) + np.asarray(self.mean)
        log = np.asarray(self.log)
        unlogged = np.sign(logged) * np.expm1(np.abs(np.where(log, logged, 0.0)))
        return np.asarray(np.where(log, unlogged, logged), dtype=np.float64)

    def _logged(self, values: Floats) -> Floats:
        return _imputed_and_logged(values, self.medians, self.log)


def _imputed_and_logged(values: Floats, medians: Sequence[float], log: Sequence[bool]) -> Floats:
    """Values with missing ones imputed and the skewed features on the log scale."""
    filled = np.where(np.isnan(values), np.asarray(medians), values)
    if not any(log):
        return filled
    logged = np.sign(filled) * np.log1p(np.abs(np.where(log, filled, 0.0)))
    return np.where(log, logged, filled)


def _as_matrix(matrix: npt.ArrayLike, features: int) -> Floats:
    """``matrix`` as a float64 copy of shape (profiles, features), non-finite values as NaN."""
    values = np.array(matrix, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != features:
        raise ValueError(f"expected a matrix of {features} feature columns, not {values.shape}")
    values[~np.isfinite(values)] = np.nan
    return values


def _skewness(values: Floats) -> float:
    """Sample skewness of ``values``; 0 for a constant."""
    centred = values - values.mean()
    variance = float(np.mean(centred**2))
    return float(np.mean(centred**3)) / variance**1.5 if variance > 0 else 0.0


def _fit_transform(values: Floats) -> FeatureTransform:
    """The transform of these profiles: their medians, their skewed features, their scale."""
    medians: list[float] = []
    log: list[bool] = []
    for column in values.T:
        seen = column[~np.isnan(column)]
        medians.append(float(np.median(seen)))
        log.append(bool(seen.min() >= 0 and _skewness(seen) > _LOG_SKEWNESS))
    logged = _imputed_and_logged(values, medians, log)
    mean = logged.mean(axis=0)
    scale = logged.std(axis=0)
    # Constant up to rounding: scale 1 leaves it 0 everywhere instead of amplifying the noise.
    scale[scale <= 1e-12 * np.maximum(1.0, np.abs(mean))] = 1.0
    return FeatureTransform(
        tuple(medians), tuple(log), tuple(map(float, mean)), tuple(map(float, scale))
    )


# -- Assignment -------------------------------------------------------------------------------


def _nearest(points: Floats, centers: Floats) -> Labels:
    """The index of each point's nearest centre (Euclidean; the lowest index on a tie)."""
    distance = (centers**2).sum(axis=1) - 2.0 * points @ centers.T
    return np.asarray(np.argmin(distance, axis=1), dtype=np.int64)


def _gaussian_log_density(points: Floats, mean: Floats, covariance: Floats) -> Floats:
    """log N(point; mean, covariance) of each point."""
    cholesky = np.linalg.cholesky(covariance)
    whitened = np.linalg.solve(cholesky, (points - mean).T)
    log_determinant = 2.0 * float(np.log(np.diag(cholesky)).sum())
    dimensions = len(mean)
    return np.asarray(
        -0.5 * ((whitened**2).sum(axis=0) + log_determinant + dimensions * math.log(2 * math.pi))
    )


def _most_likely(points: Floats, means: Floats, covariances: Floats, weights: Floats) -> Labels:
    """The mixture component of highest posterior probability for each point."""
    log_posterior = np.stack(
        [
            math.log(weight) + _gaussian_log_density(points, mean, covariance)
            for mean, covariance, weight in zip(means, covariances, weights, strict=True)
        ],
        axis=1,
    )
    return np.asarray(np.argmax(log_posterior, axis=1), dtype=np.int64)


@dataclass(frozen=True)
class _Fit:
    """Cluster centres (standardised space) and, for a mixture, the rest of its parameters."""

    centers: Floats
    covariances: Floats | None = None
    weights: Floats | None = None
    bic: float | None = None

    def assign(self, points: Floats) -> Labels:
        if self.covariances is None or self.weights is None:
            return _nearest(points, self.centers)
        return _most_likely(points, self.centers, self.covariances, self.weights)


# -- The model --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Persona:
    """One cluster, told for people.

    ``medians`` and ``centroid`` are in the features' own units. The centroid is the cluster's
    centre in the standardised space mapped back, so for a log-scaled feature it is nearer the
    median than the mean. ``distinguishing`` gives every feature's standardised difference from
    the base (the centre's distance from the mean of all profiles, in standard deviations of
    the transformed feature), largest first in absolute value: what is high and what is low.
    """

    cluster_id: int
    label: str
    description: str
    size: int
    share: float
    medians: tuple[float, ...]
    centroid: tuple[float, ...]
    distinguishing: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class ClusterModel:
    """A clustering of profiles: its personas and what it needs to assign new profiles.

    ``centers`` are in the standardised space of ``transform``, one per cluster in cluster id
    order. A Gaussian mixture also keeps its components' ``covariances`` and ``weights``;
    k-means leaves them None. ``silhouette`` is measured on the sample the model was fitted
    on, ``bic`` (mixtures only) too.
    """

    feature_names: tuple[str, ...]
    k: int
    method: str
    silhouette: float
    bic: float | None
    personas: tuple[Persona, ...]
    profile_count: int
    transform: FeatureTransform
    centers: tuple[tuple[float, ...], ...]
    covariances: tuple[tuple[tuple[float, ...], ...], ...] | None = None
    weights: tuple[float, ...] | None = None

    def assign(self, matrix: npt.ArrayLike) -> Labels:
        """The cluster id of each row of ``matrix`` (features in ``feature_names`` order;
        missing values are treated as in training: they take the base's median)."""
        fit = _Fit(
            centers=np.asarray(self.centers, dtype=np.float64),
            covariances=None if self.covariances is None else np.asarray(self.covariances),
            weights=None if self.weights is None else np.asarray(self.weights),
        )
        return fit.assign(self.transform.apply(matrix))

    def to_json(self) -> dict[str, Any]:
        """The model as plain JSON values (missing medians as null); :meth:`from_json` gives
        back an equal model."""
        covariances = self.covariances
        return {
            "format": JSON_FORMAT,
            "feature_names": list(self.feature_names),
            "k": self.k,
            "method": self.method,
            "silhouette": self.silhouette,
            "bic": self.bic,
            "profile_count": self.profile_count,
            "transform": {
                "medians": list(self.transform.medians),
                "log": list(self.transform.log),
                "mean": list(self.transform.mean),
                "scale": list(self.transform.scale),
            },
            "centers": [list(center) for center in self.centers],
            "covariances": None
            if covariances is None
            else [[list(row) for row in covariance] for covariance in covariances],
            "weights": None if self.weights is None else list(self.weights),
            "personas": [_persona_json(persona) for persona in self.personas],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ClusterModel:
        """The model :meth:`to_json` wrote."""
        if data.get("format") != JSON_FORMAT:
            raise ValueError(f"unknown clustering format {data.get('format')!r}")
        transform = data["transform"]
        covariances = data["covariances"]
        weights = data["weights"]
        bic = data["bic"]
        return cls(
            feature_names=tuple(str(name) for name in data["feature_names"]),
            k=int(data["k"]),
            method=str(data["method"]),
            silhouette=float(data["silhouette"]),
            bic=None if bic is None else float(bic),
            personas=tuple(_persona_from_json(persona) for persona in data["personas"]),
            profile_count=int(data["profile_count"]),
            transform=FeatureTransform(
                medians=_floats(transform["medians"]),
                log=tuple(bool(flag) for flag in transform["log"]),
                mean=_floats(transform["mean"]),
                scale=_floats(transform["scale"]),
            ),
            centers=tuple(_floats(center) for center in data["centers"]),
            covariances=None
            if covariances is None
            else tuple(tuple(_floats(row) for row in covariance) for covariance in covariances),
            weights=None if weights is None else _floats(weights),
        )


def _floats(values: Iterable[Any]) -> tuple[float, ...]:
    """JSON numbers as floats, null as NaN."""
    return tuple(math.nan if value is None else float(value) for value in values)


def _nullable(values: Iterable[float]) -> list[float | None]:
    """Floats for JSON, NaN as null (JSON has no NaN)."""
    return [None if math.isnan(value) else value for value in values]


def _persona_json(persona: Persona) -> dict[str, Any]:
    return {
        "cluster_id": persona.cluster_id,
        "label": persona.label,
        "description": persona.description,
        "size": persona.size,
        "share": persona.share,
        "medians": _nullable(persona.medians),
        "centroid": list(persona.centroid),
        "distinguishing": [[name, difference] for name, difference in persona.distinguishing],
    }


def _persona_from_json(data: Mapping[str, Any]) -> Persona:
    return Persona(
        cluster_id=int(data["cluster_id"]),
        label=str(data["label"]),
        description=str(data["description"]),
        size=int(data["size"]),
        share=float(data["share"]),
        medians=_floats(data["medians"]),
        centroid=_floats(data["centroid"]),
        distinguishing=tuple((str(name), float(value)) for name, value in data["distinguishing"]),
    )


# -- Validation -------------------------------------------------------------------------------


def _check_settings(k: int, max_k: int, method: str, rows: int) -> None:
    """The number of clusters and the method make sense for this many profiles."""
    if method not in METHODS:
        raise InvalidArgument.for_field("method", f"must be one of {', '.join(METHODS)}")
    if k == 1 or k < 0 or k > MAX_CLUSTERS:
        raise InvalidArgument.for_field(
            "k", f"must be 0 (chosen automatically) or from 2 to {MAX_CLUSTERS}, not {k}"
        )
    if k == 0 and not 2 <= max_k <= MAX_CLUSTERS:
        raise InvalidArgument.for_field("max_k", f"must be from 2 to {MAX_CLUSTERS}, not {max_k}")
    if k and rows < k:
        raise InvalidArgument.for_field(
            "k", f"{k} clusters need at least {k} profiles, and there are {rows}"
        )
    if not k and rows < 3:
        raise InvalidArgument.for_field(
            "k", f"choosing the number of clusters needs at least 3 profiles, not {rows}"
        )


def _check_features(names: Sequence[str], values: Floats) -> None:
    """At least two distinct features, each with a value somewhere."""
    if len(names) < 2:
        raise InvalidArgument.for_field(
            "feature_names", f"clustering needs at least two features, not {len(names)}"
        )
    seen: set[str] = set()
    for index, name in enumerate(names):
        if name in seen:
            raise InvalidArgument.for_field(f"feature_names[{index}]", f"{name} is repeated")
        seen.add(name)
        if np.isnan(values[:, index]).all():
            raise InvalidArgument.for_field(
                f"feature_names[{index}]", f"{name} has no value in any profile"
            )


# -- Fitting ----------------------------------------------------------------------------------


def _sample_rows(rows: int, size: int, seed: int) -> npt.NDArray[np.intp]:
    """A seeded sample of at most ``size`` row indices, in order (all rows when few)."""
    if rows <= size:
        return np.arange(rows)
    return np.sort(np.random.default_rng(seed).choice(rows, size, replace=False))


def _fit_kmeans(points: Floats, k: int, seed: int) -> _Fit:
    model = KMeans(n_clusters=k, n_init=_KMEANS_RESTARTS, random_state=seed).fit(points)
    return _Fit(np.asarray(model.cluster_centers_, dtype=np.float64))


def _fit_mixture(points: Floats, k: int, seed: int) -> _Fit:
    model = GaussianMixture(
        n_components=k,
        covariance_type="full",
        n_init=_MIXTURE_RESTARTS,
        reg_covar=_MIXTURE_VARIANCE_FLOOR,
        random_state=seed,
    ).fit(points)
    return _Fit(
        centers=np.asarray(model.means_, dtype=np.float64),
        covariances=np.asarray(model.covariances_, dtype=np.float64),
        weights=np.asarray(model.weights_, dtype=np.float64),
        bic=float(model.bic(points)),
    )


def _silhouettes(points: Floats, labellings: Sequence[Labels]) -> list[float]:
    """The mean silhouette coefficient of each labelling of the same points (Euclidean).

    A point's silhouette is (b - a) / max(a, b), with a its mean distance to the rest of its
    cluster and b the smallest mean distance to another cluster; 0 for a point alone in its
    cluster. The pairwise distances, which dominate the cost, are computed once, a block of
    rows at a time, and shared by all labellings: with the cluster memberships of every
    labelling side by side as one 0/1 matrix, one product gives each point's distance sums to
    every cluster of every labelling.
    """
    rows = len(points)
    sizes = [int(labels.max()) + 1 for labels in labellings]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    membership = np.zeros((rows, int(offsets[-1])), dtype=np.float32)
    for offset, labels in zip(offsets, labellings, strict=False):
        membership[np.arange(rows), offset + labels] = 1.0
    counts = membership.sum(axis=0, dtype=np.float64)
    compact = points.astype(np.float32)
    norms = (compact**2).sum(axis=1)
    totals = np.zeros(len(labellings))
    block = max(1, _SILHOUETTE_BLOCK_BYTES // (4 * rows))
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        sums = (_distances(compact, norms, start, stop) @ membership).astype(np.float64)
        for index, labels in enumerate(labellings):
            columns = slice(offsets[index], offsets[index + 1])
            totals[index] += _silhouette_sum(sums[:, columns], counts[columns], labels[start:stop])
    return [float(total / rows) for total in totals]


def _distances(
    points: npt.NDArray[np.float32], norms: npt.NDArray[np.float32], start: int, stop: int
) -> npt.NDArray[np.float32]:
    """Euclidean distances from rows ``start:stop`` to every row, as |x|^2 + |y|^2 - 2 x.y
    computed in place (the block is the largest array of the computation)."""
    distances = points[start:stop] @ points.T
    distances *= -2.0
    distances += norms[None, :]
    distances += norms[start:stop, None]
    np.maximum(distances, 0.0, out=distances)
    np.sqrt(distances, out=distances)
    distances[np.arange(stop - start), np.arange(start, stop)] = 0.0
    return distances


def _silhouette_sum(sums: Floats, counts: Floats, own: Labels) -> float:
    """The sum of the silhouettes of a block of points, from their distance sums to each
    cluster, the cluster sizes and their own clusters."""
    block = np.arange(len(own))
    own_count = counts[own]
    within = sums[block, own] / np.maximum(own_count - 1.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = np.where(counts > 0, sums / counts, np.inf)
    between[block, own] = np.inf
    nearest_other = between.min(axis=1)
    spread = np.maximum(within, nearest_other)
    defined = (own_count > 1) & np.isfinite(nearest_other) & (spread > 0)
    values = np.zeros(len(own))
    values[defined] = (nearest_other[defined] - within[defined]) / spread[defined]
    return float(values.sum())


def _chosen_fit(
    points: Floats, candidates: Sequence[int], method: str, seed: int
) -> tuple[_Fit, float]:
    """The fit of the best number of clusters among ``candidates``, and its silhouette:
    k-means by the best silhouette, a mixture by the lowest BIC."""
    if method == "kmeans":
        fits = [_fit_kmeans(points, k, seed) for k in candidates]
        scores = _silhouettes(points, [fit.assign(points) for fit in fits])
        best = int(np.argmax(scores))
        return fits[best], scores[best]
    fits = [_fit_mixture(points, k, seed) for k in candidates]
    best = int(np.argmin([math.inf if fit.bic is None else fit.bic for fit in fits]))
    return fits[best], _silhouettes(points, [fits[best].assign(points)])[0]


def _by_size(fit: _Fit, labels: Labels) -> tuple[_Fit, Labels]:
    """The fit and labels with clusters renumbered by size, largest first."""
    sizes = np.bincount(labels, minlength=len(fit.centers))
    order = np.argsort(-sizes, kind="stable")
    renumber = np.empty_like(order)
    renumber[order] = np.arange(len(order))
    reordered = _Fit(
        centers=fit.centers[order],
        covariances=None if fit.covariances is None else fit.covariances[order],
        weights=None if fit.weights is None else fit.weights[order],
        bic=fit.bic,
    )
    return reordered, renumber[labels].astype(np.int64)


def discover(
    matrix: npt.ArrayLike,
    feature_names: Sequence[str],
    *,
    k: int = 0,
    max_k: int = 10,
    method: str = "kmeans",
    seed: int = 0,
    sample_size: int = 20_000,
) -> ClusterModel:
    """Clusters the profiles (rows of ``matrix``, one column per feature of ``feature_names``)
    and describes each cluster as a persona.

    ``k`` = 0 chooses the number of clusters between 2 and ``max_k``. Missing values are
    allowed (NaN, or infinite); a feature missing everywhere is not. The same ``seed`` on the
    same data gives the same model.
    """
    names = tuple(feature_names)
    values = _as_matrix(matrix, len(names))
    _check_features(names, values)
    _check_settings(k, max_k, method, len(values))
    if sample_size < max(k, 3):
        raise ValueError(f"sample_size must be at least max(k, 3), not {sample_size}")
    transform = _fit_transform(values)
    points = transform.apply(values)
    sample = points[_sample_rows(len(points), sample_size, seed)]
    candidates = [k] if k else list(range(2, min(max_k, len(sample) - 1) + 1))
    # One thread for the fits and the distances: OpenMP and BLAS threads that spin-wait for a
    # core the service's other threads are using slow k-means tenfold, and the sample keeps
    # the single-threaded work to seconds.
    with threadpool_limits(limits=1):
        fit, silhouette = _chosen_fit(sample, candidates, method, seed)
    fit, labels = _by_size(fit, fit.assign(points))
    return ClusterModel(
        feature_names=names,
        k=len(fit.centers),
        method=method,
        silhouette=silhouette,
        bic=fit.bic,
        personas=_personas(names, values, labels, fit.centers, transform),
        profile_count=len(values),
        transform=transform,
        centers=tuple(tuple(map(float, center)) for center in fit.centers),
        covariances=None
        if fit.covariances is None
        else tuple(tuple(tuple(map(float, row)) for row in cov) for cov in fit.covariances),
        weights=None if fit.weights is None else tuple(map(float, fit.weights)),
    )


# -- Personas ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Words:
    """How a persona label speaks of a feature whose name matches ``pattern``: ``high`` and
    ``low`` describe customers with high or low values. ``noun`` words name the customers
    ("big spenders") rather than describe them; ``none`` replaces ``low`` when the cluster's
    median is 0 ("non-buying")."""

    pattern: re.Pattern[str]
    high: str
    low: str
    noun: bool = False
    none: str | None = None


# First match wins, so the more specific patterns come first: days_since_last_order is about
# recency, not about orders. Features matched by none are named as they are: "high noise_a".
VOCABULARY = (
    _Words(
        re.compile(r"recency|since_last|last_(seen|order|purchase|visit|active)|inactive|dormant"),
        high="lapsed",
        low="recent",
    ),
    _Words(
        re.compile(r"tenure|since_first|first_seen|signup|sign_up|account_age|customer_age"),
        high="long-standing",
        low="new",
    ),
    _Words(re.compile(r"discount|coupon|promo|voucher"), high="deal-seeking", low="full-price"),
    _Words(
        re.compile(r"revenue|spend|monetary|amount|value|sales|ltv|clv|aov|basket"),
        high="big spenders",
        low="low spenders",
        noun=True,
        none="non-buying",
    ),
    _Words(
        re.compile(r"order|purchase|transaction|frequency|buy"),
        high="frequent",
        low="occasional",
        none="non-buying",
    ),
    _Words(
        re.compile(r"view|session|visit|click|brows|open|engage"),
        high="highly engaged",
        low="disengaged",
    ),
)


def _words_for(name: str) -> _Words | None:
    return next((words for words in VOCABULARY if words.pattern.search(name.lower())), None)


def _label(notable: Sequence[tuple[str, float, float]]) -> str:
    """A persona's label from its notable features, most distinguishing first, each as
    (name, standardised difference from the base, the cluster's median).

    Known kinds of feature (see :data:`VOCABULARY`) become words: adjectives first, in order
    of strength, then the customers' noun ("Recent frequent big spenders"); the others are
    named with their direction ("High noise_a, low noise_b").
    """
    adjectives: list[str] = []
    noun: str | None = None
    plain: list[str] = []
    for name, difference, median in notable:
        words = _words_for(name)
        direction = "high" if difference > 0 else "low"
        if words is None:
            plain.append(f"{direction} {name}")
            continue
        text = words.high if difference > 0 else words.low
        is_noun = words.noun
        if difference < 0 and words.none is not None and median == 0:
            text, is_noun = words.none, False
        if text in adjectives or text == noun:
            continue
        if not is_noun:
            adjectives.append(text)
        elif noun is None:
            noun = text
        else:
            plain.append(f"{direction} {name}")
    if not adjectives and noun is None:
        text = ", ".join(plain) if plain else "typical customers"
    else:
        text = ", ".join([" ".join([*adjectives, noun or "customers"]), *plain])
    return text[:1].upper() + text[1:]


def _number(value: float) -> str:
    """A median or centroid for people: 12,345 / 42.5 / 0.37."""
    if math.isnan(value):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    text = f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _description(
    distinguishing: Sequence[tuple[str, float]],
    medians: Mapping[str, float],
    base: Mapping[str, float],
) -> str:
    """The features where the cluster differs most, with its median and the base's."""
    return ", ".join(
        f"{name} {_number(medians[name])} (base {_number(base[name])})"
        for name, _ in distinguishing[:_DESCRIBED_FEATURES]
    )


def _cluster_medians(values: Floats, labels: Labels, k: int) -> list[Floats]:
    """Each cluster's median of each feature over its profiles with a value (NaN if none)."""
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(k + 1))
    medians = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-missing or empty: NaN
        for cluster in range(k):
            rows = values[order[bounds[cluster] : bounds[cluster + 1]]]
            medians.append(
                np.nanmedian(rows, axis=0) if len(rows) else np.full(values.shape[1], np.nan)
            )
    return medians


def _personas(
    names: tuple[str, ...],
    values: Floats,
    labels: Labels,
    centers: Floats,
    transform: FeatureTransform,
) -> tuple[Persona, ...]:
    k = len(centers)
    sizes = np.bincount(labels, minlength=k)
    centroids = transform.invert(centers)
    base = dict(zip(names, transform.medians, strict=True))
    personas: list[Persona] = []
    labels_seen: set[str] = set()
    for cluster, medians in enumerate(_cluster_medians(values, labels, k)):
        # The base's standardised mean is 0: the centre is the difference.
        differences = sorted(
            zip(names, map(float, centers[cluster]), strict=True), key=lambda item: -abs(item[1])
        )
        own = dict(zip(names, map(float, medians), strict=True))
        notable = [
            (name, difference, own[name])
            for name, difference in differences[:_LABEL_FEATURES]
            if abs(difference) >= _NOTABLE_DIFFERENCE
        ]
        text = _label(notable)
        if text in labels_seen:
            text = f"{text} (cluster {cluster})"
        labels_seen.add(text)
        personas.append(
            Persona(
                cluster_id=cluster,
                label=text,
                description=_description(differences, own, base),
                size=int(sizes[cluster]),
                share=float(sizes[cluster] / len(values)),
                medians=tuple(map(float, medians)),
                centroid=tuple(map(float, centroids[cluster])),
                distinguishing=tuple(differences),
            )
        )
    return tuple(personas)


# -- The persona table ------------------------------------------------------------------------


def _aligned(rows: Sequence[Sequence[str]], right: Sequence[bool]) -> list[str]:
    """Rows of cells as lines of aligned columns (numbers right-aligned)."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(right))]
    return [
        "  ".join(
            cell.rjust(width) if flush else cell.ljust(width)
            for cell, width, flush in zip(row, widths, right, strict=True)
        ).rstrip()
        for row in rows
    ]


def _high_and_low(persona: Persona) -> str:
    """The features that set a persona apart most, with their standardised differences."""
    shown = [
        f"{'high' if difference > 0 else 'low'} {name} ({difference:+.1f})"
        for name, difference in persona.distinguishing[:_LABEL_FEATURES]
        if round(difference, 1) != 0
    ]
    return ", ".join(shown) if shown else "close to all profiles on every feature"


def persona_table(model: ClusterModel) -> str:
    """The personas as plain text for a terminal: one line per cluster with its size, share
    and medians, the base's medians below, then what is high and low in each cluster."""
    method = "k-means" if model.method == "kmeans" else "Gaussian mixture"
    heading = (
        f"{model.k} clusters of {model.profile_count:,} profiles ({method}, "
        f"silhouette {model.silhouette:.2f}"
        + ("" if model.bic is None else f", BIC {model.bic:,.0f}")
        + ")"
    )
    header = ["id", "persona", "size", "share", *model.feature_names]
    rows = [header] + [
        [
            str(persona.cluster_id),
            persona.label,
            f"{persona.size:,}",
            f"{persona.share:.1%}",
            *map(_number, persona.medians),
        ]
        for persona in model.personas
    ]
    rows.append(
        ["", "all profiles", f"{model.profile_count:,}", "100.0%"]
        + [_number(median) for median in model.transform.medians]
    )
    right = [True, False, True, True] + [True] * len(model.feature_names)
    apart = [f"{persona.cluster_id:>2}  {_high_and_low(persona)}" for persona in model.personas]
    return "\n".join(
        [
            heading,
            "",
            "Medians:",
            *_aligned(rows, right),
            "",
            "What sets each cluster apart (standard deviations from all profiles):",
            *apart,
        ]
    )
