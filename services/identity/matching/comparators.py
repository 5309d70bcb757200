"""The tests of comparison levels, applied to many pairs at once.

A comparison sorts every pair into its first level whose test holds. Tests work on the code
arrays of :mod:`~profilemesh.services.identity.matching.encoding`: equality compares integers,
and string similarities (rapidfuzz's Jaro-Winkler, Levenshtein and Damerau-Levenshtein through
the vectorised ``process.cpdist``) are computed once per distinct pair of strings. Pairs that an
earlier level already took are not tested again, so the costly tests see few pairs.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from rapidfuzz import fuzz, process
from rapidfuzz.distance import DamerauLevenshtein, JaroWinkler, Levenshtein

from profilemesh.services.identity.matching.encoding import (
    Codes,
    Floats,
    Indices,
    Mask,
    PairCodes,
    Vocabulary,
)
from profilemesh.services.identity.matching.nicknames import NICKNAME_GROUPS, same_name
from profilemesh.services.identity.matching.settings import (
    SIMILARITY_COMPARATORS,
    Comparator,
    Comparison,
    ComparisonLevel,
)

LevelVector = npt.NDArray[np.int8]
"""The level of each pair in one comparison (an index into its levels)."""

_StringScorer = Callable[[Sequence[str], Sequence[str], float | None], Floats]
"""Scores string pairs; a cutoff lets rapidfuzz stop early on pairs that cannot pass."""

# Below this many string pairs, one worker thread is faster than starting several.
_PARALLEL_FROM = 200_000


def _cpdist(scorer: Any, scale: float = 1.0) -> _StringScorer:
    """A rapidfuzz scorer over many pairs at once; ``scale`` maps its range onto 0 to 1."""

    def score(left: Sequence[str], right: Sequence[str], cutoff: float | None) -> Floats:
        workers = -1 if len(left) >= _PARALLEL_FROM else 1
        result = process.cpdist(
            left,
            right,
            scorer=scorer,
            score_cutoff=None if cutoff is None else cutoff * scale,
            workers=workers,
        )
        return np.asarray(result, dtype=np.float64) / scale

    return score


def _pairwise(function: Callable[[str, str], float]) -> _StringScorer:
    def score(left: Sequence[str], right: Sequence[str], cutoff: float | None) -> Floats:
        return np.fromiter(
            (function(a, b) for a, b in zip(left, right, strict=True)),
            dtype=np.float64,
            count=len(left),
        )

    return score


@functools.lru_cache(maxsize=100_000)
def _trigrams(text: str) -> frozenset[str]:
    # Cached: one address meets thousands of others, its 3-grams are cut once.
    padded = f"  {text} "
    return frozenset(padded[i : i + 3] for i in range(len(padded) - 2))


def jaccard_similarity(left: str, right: str) -> float:
    """Jaccard similarity of the character 3-gram sets of two strings."""
    a, b = _trigrams(left), _trigrams(right)
    return len(a & b) / len(a | b)


# Scorers of string pairs, by the name a level's cache keys them under.
_SCORERS: dict[Comparator, _StringScorer] = {
    Comparator.JARO_WINKLER: _cpdist(JaroWinkler.normalized_similarity),
    Comparator.LEVENSHTEIN: _cpdist(Levenshtein.distance),
    Comparator.DAMERAU_LEVENSHTEIN: _cpdist(DamerauLevenshtein.distance),
    Comparator.JACCARD: _pairwise(jaccard_similarity),
    Comparator.TOKEN_SET: _cpdist(fuzz.token_set_ratio, scale=100.0),
    Comparator.NICKNAME: _pairwise(lambda a, b: float(same_name(a, b))),
}

_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")


def _date_parts(text: str) -> tuple[int, int, int] | None:
    """(year, month, day) of a normalised date, valid or not (month 13 stays 13)."""
    match = _DATE.match(text)
    if match:
        year, month, day = (int(part) for part in match.groups())
        return year, month, day
    return None


def date_ordinal(text: str) -> float:
    """Days since year 1 of a normalised date, NaN when it is no valid date."""
    parts = _date_parts(text)
    if parts is None:
        return float("nan")
    try:
        return float(dt.date(*parts).toordinal())
    except ValueError:
        return float("nan")


def _has_nickname(text: str) -> float:
    return float(text in NICKNAME_GROUPS)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


def _part(position: int) -> Callable[[str], float]:
    def part(text: str) -> float:
        parts = _date_parts(text)
        return float("nan") if parts is None else float(parts[position])

    return part


class ScoreCache:
    """Similarities of string pairs already computed while sorting pairs into levels.

    Keyed by scorer and the two code arrays' attributes; one array per key over all pairs,
    NaN where not computed yet, so that the second Jaro-Winkler level reuses the first's work.
    """

    def __init__(self, vocabulary: Vocabulary, size: int) -> None:
        self.vocabulary = vocabulary
        self.size = size
        self._scores: dict[tuple[Comparator, float | None, str, str], Floats] = {}
        self._strings: npt.NDArray[np.object_] = np.empty(0, dtype=object)

    def _string_array(self) -> npt.NDArray[np.object_]:
        if len(self._strings) != len(self.vocabulary):
            self._strings = np.asarray(self.vocabulary.strings, dtype=object)
        return self._strings

    def scores(
        self,
        comparator: Comparator,
        cutoff: float | None,
        key: tuple[str, str],
        left: Codes,
        right: Codes,
        index: Indices,
    ) -> Floats:
        """Similarity (or distance) of the pairs at ``index``, both codes known to be valid.

        Scores beyond ``cutoff`` (below a similarity, above a distance) are not exact, only
        known to fail it.
        """
        cache_key = (comparator, cutoff, *key)
        column = self._scores.get(cache_key)
        if column is None:
            column = self._scores[cache_key] = np.full(self.size, np.nan)
        todo = index[np.isnan(column[index])]
        if len(todo):
            width = len(self.vocabulary) + 1
            pair_keys = left[todo] * width + right[todo]
            distinct, inverse = np.unique(pair_keys, return_inverse=True)
            strings = self._string_array()
            scored = _SCORERS[comparator](
                strings[distinct // width].tolist(), strings[distinct % width].tolist(), cutoff
            )
            column[todo] = scored[inverse.reshape(-1)]
        return column[index]


def _test(
    level: ComparisonLevel,
    cutoffs: dict[Comparator, float],
    cache: ScoreCache,
    key: tuple[str, str],
    left: Codes,
    right: Codes,
    index: Indices,
) -> Mask:
    """Whether each pair at ``index`` passes ``level``; both codes are known to be valid."""
    comparator, threshold = level.comparator, level.threshold
    a, b = left[index], right[index]
    if comparator is Comparator.EXACT:
        return np.asarray(a == b)
    if comparator in SIMILARITY_COMPARATORS:
        return np.asarray(
            cache.scores(comparator, cutoffs.get(comparator), key, left, right, index) >= threshold
        )
    if comparator in (Comparator.LEVENSHTEIN, Comparator.DAMERAU_LEVENSHTEIN):
        return np.asarray(
            cache.scores(comparator, cutoffs.get(comparator), key, left, right, index) <= threshold
        )
    vocabulary = cache.vocabulary
    if comparator is Comparator.NICKNAME:
        # Only names in the table can be nicknames of each other: look up just those pairs.
        known = (vocabulary.derived("has_nickname", _has_nickname, a) > 0) & (
            vocabulary.derived("has_nickname", _has_nickname, b) > 0
        )
        hit = np.zeros(len(index), dtype=bool)
        if known.any():
            hit[known] = cache.scores(comparator, None, key, left, right, index[known]) > 0
        return hit
    if comparator is Comparator.DATE_DIFFERENCE:
        days_a = vocabulary.derived("date_ordinal", date_ordinal, a)
        days_b = vocabulary.derived("date_ordinal", date_ordinal, b)
        return np.asarray(np.abs(days_a - days_b) <= threshold)
    if comparator is Comparator.DATE_SWAPPED_DAY_MONTH:
        year_a, month_a, day_a = (
            vocabulary.derived(f"date_part_{p}", _part(p), a) for p in range(3)
        )
        year_b, month_b, day_b = (
            vocabulary.derived(f"date_part_{p}", _part(p), b) for p in range(3)
        )
        return np.asarray(
            (year_a == year_b) & (month_a == day_b) & (day_a == month_b) & (month_a != day_a)
        )
    if comparator is Comparator.NUMERIC_DIFFERENCE:
        number_a = vocabulary.derived("number", _number, a)
        number_b = vocabulary.derived("number", _number, b)
        return np.asarray(np.abs(number_a - number_b) <= threshold)
    raise ValueError(f"comparator {comparator} has no pairwise test")


def _cutoffs(comparison: Comparison) -> dict[Comparator, float]:
    """The loosest threshold of each string comparator among the comparison's levels: a
    score that fails it fails every level, so rapidfuzz need not finish computing it."""
    cutoffs: dict[Comparator, float] = {}
    for level in comparison.levels:
        comparator, threshold = level.comparator, level.threshold
        if comparator in SIMILARITY_COMPARATORS:
            cutoffs[comparator] = min(threshold, cutoffs.get(comparator, threshold))
        elif comparator in (Comparator.LEVENSHTEIN, Comparator.DAMERAU_LEVENSHTEIN):
            cutoffs[comparator] = max(threshold, cutoffs.get(comparator, threshold))
    cutoffs.pop(Comparator.JACCARD, None)  # computed in Python: no early exit to gain
    return cutoffs


def _crosswise(
    level: ComparisonLevel,
    pairs: PairCodes,
    cutoffs: dict[Comparator, float],
    cache: ScoreCache,
    attribute: str,
    remaining: Indices,
) -> Indices:
    """The pairs at ``remaining`` whose fields pass ``level`` crosswise: this attribute against
    the other record's cross attribute, and the cross attribute against this one; both must
    pass (a swap) or, with ``cross_either_way``, one."""
    cross = level.cross_attribute
    assert cross is not None
    left, right = pairs.left(attribute), pairs.right(attribute)
    cross_left, cross_right = pairs.left(cross), pairs.right(cross)
    one_way = remaining[(left[remaining] >= 0) & (cross_right[remaining] >= 0)]
    one_way = one_way[_test(level, cutoffs, cache, (attribute, cross), left, cross_right, one_way)]
    other_way = remaining[(cross_left[remaining] >= 0) & (right[remaining] >= 0)]
    if not level.cross_either_way:
        other_way = np.intersect1d(other_way, one_way, assume_unique=True)
    other_way = other_way[
        _test(level, cutoffs, cache, (cross, attribute), cross_left, right, other_way)
    ]
    if level.cross_either_way:
        return np.union1d(one_way, other_way)
    return other_way


def comparison_levels(comparison: Comparison, pairs: PairCodes, cache: ScoreCache) -> LevelVector:
    """The level of every pair in ``comparison``: the first level whose test holds."""
    attribute = comparison.attribute
    left, right = pairs.left(attribute), pairs.right(attribute)
    null = (left < 0) | (right < 0)
    result = np.full(len(pairs), -1, dtype=np.int8)
    cutoffs = _cutoffs(comparison)
    remaining = np.arange(len(pairs), dtype=np.int64)
    for position, level in enumerate(comparison.levels):
        if not len(remaining):
            break
        if level.comparator is Comparator.ELSE:
            hit = remaining
        elif level.is_null:
            hit = remaining[null[remaining]]
        elif level.cross_attribute is None:
            valid = remaining[~null[remaining]]
            hit = valid[_test(level, cutoffs, cache, (attribute, attribute), left, right, valid)]
        else:
            hit = _crosswise(level, pairs, cutoffs, cache, attribute, remaining)
        result[hit] = position
        remaining = remaining[result[remaining] < 0]
    return result


def comparison_vectors(comparisons: Sequence[Comparison], pairs: PairCodes) -> LevelVector:
    """The level of every pair in every comparison: shape (pairs, comparisons)."""
    cache = ScoreCache(pairs.sides.vocabulary, len(pairs))
    matrix = np.empty((len(pairs), len(comparisons)), dtype=np.int8)
    for column, comparison in enumerate(comparisons):
        matrix[:, column] = comparison_levels(comparison, pairs, cache)
    return matrix
