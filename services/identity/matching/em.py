"""Estimating m, u and the match rate with expectation maximisation (Fellegi-Sunter).

Each candidate pair is a vector of levels, one per comparison. The model: a pair is a match
with probability lambda; given its class, the comparisons fall in their levels independently,
with probabilities m (matches) or u (non-matches). EM alternates between the probability that
each pair is a match given the current parameters and the parameters that best explain the
pairs weighted by those probabilities.

u starts from random pairs (nearly all non-matches, so their level frequencies are u), m from a
prior that favours agreement. Pairs are folded into distinct level vectors with counts first:
a few thousand patterns stand for millions of pairs, which makes each iteration cheap.
Pseudo-counts keep every estimate above zero, so that no level carries an infinite weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from profilemesh.services.identity.matching.comparators import LevelVector
from profilemesh.services.identity.matching.encoding import Floats
from profilemesh.services.identity.matching.settings import Comparison

# Added to every level's count before normalising: half a pair, the least evidence possible.
PSEUDO_COUNT = 0.5
# Share of the true matches put in the most similar level when EM starts.
_M_START_TOP = 0.9


@dataclass(frozen=True, slots=True)
class LevelLayout:
    """What EM needs to know of one comparison: its levels, which one is the null level,
    and any m and u fixed by the settings (NaN where estimated)."""

    size: int
    null_level: int
    fixed_m: Floats
    fixed_u: Floats

    @classmethod
    def of(cls, comparison: Comparison) -> LevelLayout:
        """The layout of ``comparison``."""
        levels = comparison.levels
        null = next((i for i, level in enumerate(levels) if level.is_null), -1)
        return cls(
            size=len(levels),
            null_level=null,
            fixed_m=np.array(
                [np.nan if v.m_probability is None else v.m_probability for v in levels]
            ),
            fixed_u=np.array(
                [np.nan if v.u_probability is None else v.u_probability for v in levels]
            ),
        )

    @property
    def evidence(self) -> npt.NDArray[np.bool_]:
        """Which levels carry evidence (all but the null level)."""
        mask = np.ones(self.size, dtype=bool)
        if self.null_level >= 0:
            mask[self.null_level] = False
        return mask


def _distribution(counts: Floats, layout: LevelLayout, fixed: Floats) -> Floats:
    """Counts per level as probabilities over the evidence levels, with pseudo-counts, fixed
    values kept, and 1 at the null level (so that it contributes log 1 = 0)."""
    evidence = layout.evidence
    free = evidence & np.isnan(fixed)
    result = np.ones(layout.size)
    result[evidence & ~free] = fixed[evidence & ~free]
    if free.any():
        mass = 1.0 - float(result[evidence & ~free].sum())
        smoothed = counts[free] + PSEUDO_COUNT
        result[free] = max(mass, 1e-9) * smoothed / smoothed.sum()
    return result


def u_from_random_pairs(levels: LevelVector, layouts: Sequence[LevelLayout]) -> list[Floats]:
    """u of every level: how often random pairs (nearly all non-matches) fall in it."""
    estimates = []
    for column, layout in enumerate(layouts):
        counts = np.bincount(levels[:, column], minlength=layout.size).astype(np.float64)
        estimates.append(_distribution(counts, layout, layout.fixed_u))
    return estimates


def _initial_m(layout: LevelLayout) -> Floats:
    """Most true matches agree; the rest spread over the other levels, fewer further down."""
    evidence_levels = np.flatnonzero(layout.evidence)
    start = np.zeros(layout.size)
    rest = len(evidence_levels) - 1
    start[evidence_levels[0]] = _M_START_TOP
    if rest:
        decay = 0.5 ** np.arange(rest)
        start[evidence_levels[1:]] = (1 - _M_START_TOP) * decay / decay.sum()
    return _distribution(start * 1e6, layout, layout.fixed_m)


@dataclass(frozen=True, slots=True)
class EMResult:
    """Parameters estimated among the candidate pairs.

    ``match_rate`` is the share of candidate pairs that match, ``u`` the level frequencies of
    the non-matching candidates (which blocking makes agree more than random pairs do), and
    ``expected_matches`` the number of matching pairs the model sees among the candidates.
    """

    m: list[Floats]
    u: list[Floats]
    match_rate: float
    expected_matches: float
    iterations: int
    converged: bool
    log_likelihood: float
    """Log likelihood of the candidates' levels under the parameters of the last E step."""


def _patterns(levels: LevelVector, layouts: Sequence[LevelLayout]) -> tuple[LevelVector, Floats]:
    """Distinct level vectors and how many pairs have each."""
    keys = np.zeros(len(levels), dtype=np.int64)
    for column, layout in enumerate(layouts):
        keys = keys * layout.size + levels[:, column]
    _, first, counts = np.unique(keys, return_index=True, return_counts=True)
    return levels[first], counts.astype(np.float64)


def _log_likelihood(patterns: LevelVector, parameters: Sequence[Floats]) -> Floats:
    total = np.zeros(len(patterns))
    for column, values in enumerate(parameters):
        total += np.log(values)[patterns[:, column]]
    return total


def _fit(
    patterns: LevelVector,
    counts: Floats,
    layouts: Sequence[LevelLayout],
    u_start: Sequence[Floats],
    rate: float,
    max_iterations: int,
    tolerance: float,
) -> EMResult:
    """One EM run from the given start."""
    m = [_initial_m(layout) for layout in layouts]
    u = [np.asarray(values, dtype=np.float64) for values in u_start]
    rate = float(np.clip(rate, 1e-9, 0.5))
    converged = False
    iterations = 0
    log_likelihood = -np.inf
    while iterations < max_iterations:
        iterations += 1
        # E step: each pattern's probability of being a match, in log space for stability.
        log_match = np.log(rate) + _log_likelihood(patterns, m)
        log_other = np.log1p(-rate) + _log_likelihood(patterns, u)
        log_likelihood = float((counts * np.logaddexp(log_match, log_other)).sum())
        posterior = 1.0 / (1.0 + np.exp(np.clip(log_other - log_match, -700, 700)))
        match_weight, other_weight = counts * posterior, counts * (1.0 - posterior)
        # M step.
        new_rate = float(np.clip(match_weight.sum() / counts.sum(), 1e-9, 1 - 1e-9))
        new_m, new_u = [], []
        for column, layout in enumerate(layouts):
            column_levels = patterns[:, column]
            matched = np.bincount(column_levels, match_weight, layout.size).astype(np.float64)
            other = np.bincount(column_levels, other_weight, layout.size).astype(np.float64)
            new_m.append(_distribution(matched, layout, layout.fixed_m))
            new_u.append(_distribution(other, layout, layout.fixed_u))
        change = max(
            abs(new_rate - rate),
            *(float(np.max(np.abs(a - b))) for a, b in zip(new_m, m, strict=True)),
            *(float(np.max(np.abs(a - b))) for a, b in zip(new_u, u, strict=True)),
        )
        m, u, rate = new_m, new_u, new_rate
        if change < tolerance:
            converged = True
            break
    expected = rate * float(counts.sum())
    return EMResult(m, u, rate, expected, iterations, converged, log_likelihood)


def expectation_maximisation(
    levels: LevelVector,
    layouts: Sequence[LevelLayout],
    u_start: Sequence[Floats],
    *,
    max_iterations: int,
    tolerance: float,
    match_rate_starts: Sequence[float],
) -> EMResult:
    """Estimate m, u and the match rate among the candidate pairs whose levels are given.

    EM finds a local optimum. Candidate pairs hold more than matches and strangers: people of
    one household agree on surname, address and often phone, and a start that expects many
    matches can settle on "same household" as the matching class. So EM runs from each of
    ``match_rate_starts`` and the fit with the highest likelihood wins; in the household case
    that is the one whose matches agree on the personal fields too.
    """
    if not len(levels):  # nothing to learn from: keep the starting values
        m = [_initial_m(layout) for layout in layouts]
        u = [np.asarray(values, dtype=np.float64) for values in u_start]
        return EMResult(m, u, 0.0, 0.0, 0, True, 0.0)
    patterns, counts = _patterns(levels, layouts)
    fits = [
        _fit(patterns, counts, layouts, u_start, rate, max_iterations, tolerance)
        for rate in match_rate_starts
    ]
    return max(fits, key=lambda fit: fit.log_likelihood)
