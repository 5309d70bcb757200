"""Lookalikes: the profiles that most resemble a seed audience.

A seed audience (the best customers, last month's converters) is a set of positives, but the
other profiles are not negatives: some of them are exactly the people the marketer is looking
for, not yet labelled. That is positive-unlabelled learning. A classifier trained to tell the
seed from the rest learns what sets the seed apart; the unlabelled profiles it still takes for
seeds are the lookalikes (Elkan & Noto 2008, "Learning classifiers from only positive and
unlabeled data"; Mordelet & Vert 2014, "A bagging SVM to learn from positive and unlabeled
examples").

Bagging keeps the classifier honest. Each of a few rounds trains a small LightGBM model on the
seed against a random sample of the unlabelled profiles (twice the seed's size, at least a
thousand), balanced by weight, and scores the profiles it did not train on: a profile's score is
the mean over the rounds that left it out, so no profile is judged by a model that was told it
is not a seed. The unlabelled profiles are dealt into one group per round, and a round never
samples its own group, so every profile is left out at least once. The seed is dealt the same
way and each seed profile is scored by the one round that trained without it. (With a single
seed profile, or a single other one, a round lacks a class and is skipped; a profile that no
round left out keeps the mean score of the rounds that trained on it.)

The similarity is the score relative to the seed's own: a profile scored like the median seed
profile (by a model that did not see it) has similarity 1, one the classifier is sure is not a
seed has 0. When some profiles score above the median seed, the scores are divided by the
highest instead, so that the best lookalike has 1 and the others keep their differences rather
than all being capped at 1. When the best lookalike is below 1, nobody outside the seed looks
quite like it. It is a ratio of probabilities, not a distance, so it is comparable within one
response only: the same profile scores differently against another seed. Missing values (NaN)
are left to LightGBM, which learns where they go.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightgbm as lgb
import numpy as np
import numpy.typing as npt

from profilemesh.shared.errors import InvalidArgument

Floats = npt.NDArray[np.float64]
Rows = npt.NDArray[np.intp]

ROUNDS = 8
UNLABELLED_PER_SEED = 2
MIN_UNLABELLED = 1000
"""Each round samples this many unlabelled profiles at least: a seed of ten says little about
who is not like it, and the rest of the base is cheap to look at."""

_TREES = 50
_PREDICT_THREADS = 2
# Training is single-threaded: a round trains on a few thousand rows, where LightGBM's OpenMP
# threads spend longer waiting for each other than working, and far longer (0.05 s against
# 7 to 28 s for a round, measured) when the other core is busy serving. Scoring every profile
# is the bulk of the work and parallelises well.
_PARAMS: dict[str, Any] = {
    "objective": "binary",
    "learning_rate": 0.1,
    "num_leaves": 15,
    "feature_fraction": 0.8,
    "lambda_l2": 1.0,
    "max_bin": 63,
    "num_threads": 1,
    "deterministic": True,
    "force_row_wise": True,
    "verbosity": -1,
}


@dataclass(frozen=True)
class Lookalikes:
    """The non-seed profiles most like the seed: ``indices`` are rows of the scored matrix,
    most similar first (ties by row), with their ``similarity`` in [0, 1] in the same order;
    ``seed_size`` is the number of seed rows."""

    indices: npt.NDArray[np.int64]
    similarity: Floats
    seed_size: int


@dataclass
class _Scores:
    """Running sums of a group's scores: those from rounds that left a profile out, and those
    from rounds that trained on it (used only for a profile no round left out)."""

    held_out: Floats
    held_out_rounds: Floats
    trained: Floats
    trained_rounds: Floats

    @classmethod
    def empty(cls, size: int) -> _Scores:
        return cls(np.zeros(size), np.zeros(size), np.zeros(size), np.zeros(size))

    def add(self, scores: Floats, trained_on: npt.NDArray[np.bool_]) -> None:
        self.held_out += np.where(trained_on, 0.0, scores)
        self.held_out_rounds += ~trained_on
        self.trained += np.where(trained_on, scores, 0.0)
        self.trained_rounds += trained_on

    def mean(self) -> Floats:
        """Each profile's mean held-out score (its mean in-training score if it has none)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            held_out = self.held_out / self.held_out_rounds
            trained = self.trained / self.trained_rounds
        return np.where(self.held_out_rounds > 0, held_out, trained)


def _check(values: Floats, seed: npt.NDArray[np.bool_], top_n: int) -> None:
    if values.shape[1] == 0:
        raise InvalidArgument.for_field("feature_names", "at least one feature is needed")
    if not seed.any():
        raise InvalidArgument.for_field("seed_profile_ids", "the seed audience is empty")
    if seed.all():
        raise InvalidArgument.for_field(
            "seed_profile_ids", "the seed audience covers every profile: there is no one to rank"
        )
    if top_n < 1:
        raise InvalidArgument.for_field("top_n", f"must be at least 1, not {top_n}")


def _train(values: Floats, positives: Rows, negatives: Rows, seed: int) -> lgb.Booster:
    """A small classifier of positives against negatives, the two classes of equal weight."""
    rows = np.concatenate([positives, negatives])
    labels = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
    weights = np.concatenate(
        [np.full(len(positives), len(negatives) / len(positives)), np.ones(len(negatives))]
    )
    # A leaf needs enough profiles to mean something, but a small seed must still fill one.
    min_leaf = int(np.clip(len(positives) // 5, 2, 20))
    params = {**_PARAMS, "seed": seed, "min_data_in_leaf": min_leaf}
    data = lgb.Dataset(values[rows], labels, weight=weights, params={"verbosity": -1})
    return lgb.train(params, data, num_boost_round=_TREES)


def _predict(model: lgb.Booster, values: Floats) -> Floats:
    return np.asarray(model.predict(values, num_threads=_PREDICT_THREADS), dtype=np.float64)


def _groups(size: int, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """Each of ``size`` profiles dealt at random into one of the rounds' groups."""
    return (rng.permutation(size) % ROUNDS).astype(np.int64)


def _bagged_scores(
    values: Floats, positives: Rows, unlabelled: Rows, seed: int
) -> tuple[Floats, Floats]:
    """The mean held-out score of every seed profile and of every unlabelled profile."""
    rng = np.random.default_rng(seed)
    positive_group, unlabelled_group = _groups(len(positives), rng), _groups(len(unlabelled), rng)
    seed_scores, other_scores = _Scores.empty(len(positives)), _Scores.empty(len(unlabelled))
    for round_ in range(ROUNDS):
        trained_positive = positive_group != round_
        candidates = np.flatnonzero(unlabelled_group != round_)
        size = min(
            len(candidates), max(UNLABELLED_PER_SEED * int(trained_positive.sum()), MIN_UNLABELLED)
        )
        if not trained_positive.any() or size == 0:
            continue  # one class only: nothing to learn this round
        sampled = np.sort(rng.choice(candidates, size, replace=False))
        trained_unlabelled = np.zeros(len(unlabelled), dtype=bool)
        trained_unlabelled[sampled] = True
        model = _train(values, positives[trained_positive], unlabelled[sampled], seed + round_)
        seed_scores.add(_predict(model, values[positives]), trained_positive)
        other_scores.add(_predict(model, values[unlabelled]), trained_unlabelled)
    return seed_scores.mean(), other_scores.mean()


def score_lookalikes(
    matrix: npt.ArrayLike, seed_mask: npt.ArrayLike, *, top_n: int = 100, seed: int = 0
) -> Lookalikes:
    """The ``top_n`` profiles outside the seed most like it.

    ``matrix`` has one row per profile and one column per feature (NaN where missing);
    ``seed_mask`` is true for the rows of the seed audience. The same ``seed`` on the same
    data gives the same answer.
    """
    values = np.array(matrix, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"expected a matrix of profiles by features, not shape {values.shape}")
    values[~np.isfinite(values)] = np.nan
    in_seed = np.asarray(seed_mask, dtype=bool)
    if in_seed.shape != (len(values),):
        raise ValueError(
            f"seed_mask must have one flag per row ({len(values)}), not {in_seed.shape}"
        )
    _check(values, in_seed, top_n)
    positives, unlabelled = np.flatnonzero(in_seed), np.flatnonzero(~in_seed)
    seed_scores, scores = _bagged_scores(values, positives, unlabelled, seed)
    order = np.lexsort((unlabelled, -scores))[:top_n]
    scale = max(float(np.median(seed_scores)), float(scores[order[0]]), 1e-12)
    return Lookalikes(
        indices=unlabelled[order].astype(np.int64),
        similarity=np.minimum(scores[order] / scale, 1.0),
        seed_size=len(positives),
    )
