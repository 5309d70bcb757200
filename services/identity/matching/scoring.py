"""Match weights and probabilities from m, u and the prior.

A level's weight is log2(m / u) bits: how much likelier a true match is to land there than a
non-match. A pair's match weight is the prior's log2 odds plus the weights of its levels, and its
probability is 2^w / (1 + 2^w). Bits make the arithmetic readable: +10 bits is a thousand times
likelier a match.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from profilemesh.services.identity.matching.comparators import LevelVector
from profilemesh.services.identity.matching.encoding import Codes, Floats
from profilemesh.services.identity.matching.settings import Comparator, Comparison


def level_weights(m: Sequence[Floats], u: Sequence[Floats]) -> list[Floats]:
    """log2(m / u) of every level of every comparison (0 for the null level, where m = u)."""
    return [np.log2(m_values / u_values) for m_values, u_values in zip(m, u, strict=True)]


def prior_weight(probability_two_random_records_match: float) -> float:
    """The prior's log2 odds."""
    p = probability_two_random_records_match
    return math.log2(p / (1.0 - p))


def match_weights(levels: LevelVector, weights: Sequence[Floats], prior: float) -> Floats:
    """Each pair's match weight: the prior plus the weight of its level in every comparison."""
    total = np.full(len(levels), prior, dtype=np.float64)
    for column, column_weights in enumerate(weights):
        total += column_weights[levels[:, column]]
    return total


def probability(weight: Floats) -> Floats:
    """Match probability of match weights: 2^w / (1 + 2^w), without overflow."""
    return np.asarray(1.0 / (1.0 + np.exp2(-np.clip(weight, -1000.0, 1000.0))), dtype=np.float64)


def weight_for_probability(probability_threshold: float) -> float:
    """The match weight at which the probability reaches ``probability_threshold``."""
    if probability_threshold >= 1.0:
        return math.inf
    return math.log2(probability_threshold / (1.0 - probability_threshold))


def exact_level_of(comparison: Comparison) -> int | None:
    """The level term frequencies adjust: the first plain exact level, if any."""
    for position, level in enumerate(comparison.levels):
        if level.comparator is Comparator.EXACT and level.cross_attribute is None:
            return position
    return None


def term_frequencies(*codes: Codes) -> Floats:
    """Share of the records holding each value (by code), over all ``codes`` arrays.

    Indexed by code; the last entry, read for missing values (code -1), is NaN. A value held
    by one record in n has frequency 1/n, the floor of every u it replaces.
    """
    present = np.concatenate([c[c >= 0] for c in codes])
    size = int(present.max()) + 1 if len(present) else 0
    counts = np.bincount(present, minlength=size).astype(np.float64)
    return np.append(counts / max(1, len(present)), np.nan)


def term_frequency_weights(
    levels: LevelVector, exact_level: int, value_codes: Codes, frequencies: Floats, u_exact: float
) -> Floats:
    """What term frequencies add to each pair's weight: log2(u / frequency of the shared value)
    for pairs agreeing exactly, 0 for the rest. Rare values gain, common ones lose."""
    adjustment = np.zeros(len(levels))
    exact = levels == exact_level
    adjustment[exact] = np.log2(u_exact / frequencies[value_codes[exact]])
    return adjustment
