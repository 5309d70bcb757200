"""``match_records``: Fellegi-Sunter matching of person records, end to end.

1. read the records and keep the comparisons and blocking rules their columns support;
2. blocking gives the candidate pairs, and a sample of random pairs stands for all pairs;
3. every pair gets its level in every comparison;
4. u comes from the random pairs; EM over the candidates estimates m and how many candidates
   match, which (over all possible pairs) is the prior, lambda;
5. each candidate's match weight and probability follow; pairs at or above the threshold match,
   and their connected components are the clusters.

Scores use population parameters (u from random pairs, lambda over all pairs), as Splink does:
a pair's probability then does not depend on which blocking rule found it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np

from profilemesh.services.identity.matching.blocking import CandidatePairs, candidate_pairs
from profilemesh.services.identity.matching.clustering import connected_clusters
from profilemesh.services.identity.matching.comparators import LevelVector, comparison_vectors
from profilemesh.services.identity.matching.defaults import DEFAULT
from profilemesh.services.identity.matching.em import (
    LevelLayout,
    expectation_maximisation,
    u_from_random_pairs,
)
from profilemesh.services.identity.matching.encoding import (
    EncodedSides,
    Floats,
    Indices,
    PairCodes,
    Vocabulary,
)
from profilemesh.services.identity.matching.explain import ComparisonExplanation, PairExplanation
from profilemesh.services.identity.matching.records import (
    RecordRef,
    Records,
    RecordSet,
    load_records,
)
from profilemesh.services.identity.matching.scoring import (
    exact_level_of,
    level_weights,
    match_weights,
    prior_weight,
    probability,
    term_frequencies,
    term_frequency_weights,
)
from profilemesh.services.identity.matching.settings import (
    BlockingRule,
    Comparison,
    MatchSettings,
)
from profilemesh.shared.errors import InvalidArgument

MatchMode = Literal["dedupe", "link"]

# Bounds of the prior: below 1e-12 no evidence could lift a pair over a threshold, and above
# one half "two random records" would mostly be one person, which no input means.
_PRIOR_BOUNDS = (1e-12, 0.5)


@dataclass(frozen=True, slots=True)
class ScoredPair:
    """A candidate pair with its match probability and weight (bits)."""

    left: RecordRef
    right: RecordRef
    match_probability: float
    match_weight: float


@dataclass(frozen=True, slots=True)
class LevelEstimate:
    """m, u and weight of one level of one comparison."""

    comparison: str
    level: str
    m_probability: float
    u_probability: float
    weight: float


@dataclass(frozen=True, slots=True)
class MatchModel:
    """What a run used and estimated, so that users can see why pairs matched."""

    probability_two_random_records_match: float
    levels: tuple[LevelEstimate, ...]
    em_iterations: int
    converged: bool
    candidate_pairs: int
    comparisons: tuple[str, ...]
    """The comparisons used, in settings order."""
    blocking_rules: tuple[str, ...]
    """The blocking rules used, in settings order."""
    skipped: tuple[str, ...] = ()
    """Comparisons and rules left out: no column provides their attribute, or a rule would
    produce too many pairs."""

    def level(self, comparison: str, level: str) -> LevelEstimate:
        """The estimate of one level, by comparison name and level label."""
        for estimate in self.levels:
            if estimate.comparison == comparison and estimate.level == level:
                return estimate
        raise KeyError(f"{comparison}/{level}")


@dataclass(slots=True)
class _Run:
    """Arrays of a finished run that the result reads lazily."""

    left: RecordSet
    right: RecordSet
    dedupe: bool
    comparisons: tuple[Comparison, ...]
    rules: tuple[BlockingRule, ...]
    sides: EncodedSides
    candidates: CandidatePairs
    levels: LevelVector
    m: list[Floats]
    u: list[Floats]
    weights: list[Floats]
    prior: float
    match_weight: Floats
    match_probability: Floats
    term_frequencies: dict[int, tuple[int, Floats]]
    """Per comparison with term frequency adjustments: its exact level and value shares."""
    refs_index: dict[tuple[int, RecordRef], int] = field(default_factory=dict)


class MatchResult:
    """The outcome of :func:`match_records`: matching pairs, clusters, the model, explanations."""

    def __init__(self, run: _Run, model: MatchModel, threshold: float, mode: MatchMode) -> None:
        self._run = run
        self.model = model
        self.threshold = threshold
        self.mode: MatchMode = mode

    @cached_property
    def _accepted(self) -> Indices:
        run = self._run
        accepted = np.flatnonzero(run.match_probability >= self.threshold)
        # Highest probability first; ties by weight then position, for a stable order.
        order = np.lexsort((accepted, -run.match_weight[accepted]))
        return accepted[order]

    def _pair(self, row: int) -> ScoredPair:
        run = self._run
        return ScoredPair(
            left=run.left.refs[int(run.candidates.left_index[row])],
            right=run.right.refs[int(run.candidates.right_index[row])],
            match_probability=float(run.match_probability[row]),
            match_weight=float(run.match_weight[row]),
        )

    @cached_property
    def pairs(self) -> list[ScoredPair]:
        """Pairs at or above the threshold, most probable first."""
        return [self._pair(int(row)) for row in self._accepted]

    def scored_candidates(self, min_probability: float = 0.0) -> list[ScoredPair]:
        """Every candidate pair with at least ``min_probability``, for threshold sweeps."""
        rows = np.flatnonzero(self._run.match_probability >= min_probability)
        return [self._pair(int(row)) for row in rows]

    @cached_property
    def _cluster_numbers(self) -> Indices:
        run = self._run
        accepted = self._accepted
        offset = 0 if run.dedupe else len(run.left)
        nodes = len(run.left) if run.dedupe else len(run.left) + len(run.right)
        return connected_clusters(
            nodes,
            run.candidates.left_index[accepted],
            run.candidates.right_index[accepted] + offset,
        )

    @cached_property
    def clusters(self) -> dict[RecordRef, int]:
        """Each record's cluster number; records of one cluster are one person."""
        run = self._run
        refs = run.left.refs if run.dedupe else [*run.left.refs, *run.right.refs]
        return dict(zip(refs, self._cluster_numbers.tolist(), strict=True))

    def cluster_list(self) -> list[list[RecordRef]]:
        """The clusters as lists of records, largest first, records in input order."""
        groups: dict[int, list[RecordRef]] = {}
        for ref, number in self.clusters.items():
            groups.setdefault(number, []).append(ref)
        return sorted(groups.values(), key=lambda members: -len(members))

    def cluster_of(self, record_id: str, source: str | None = None) -> int:
        """The cluster of a record by id (and source, needed when ids repeat across sources)."""
        found = [
            number
            for ref, number in self.clusters.items()
            if ref.record_id == record_id and (source is None or ref.source == source)
        ]
        if len(found) != 1:
            raise KeyError(record_id if not found else f"{record_id} is in several sources")
        return found[0]

    def _position(self, side: int, ref: RecordRef) -> int:
        run = self._run
        if not run.refs_index:
            for position, left_ref in enumerate(run.left.refs):
                run.refs_index[(0, left_ref)] = position
            for position, right_ref in enumerate(run.right.refs):
                run.refs_index[(1, right_ref)] = position
        try:
            return run.refs_index[(side, ref)]
        except KeyError:
            raise KeyError(f"no record {ref}") from None

    def explain(self, pair: ScoredPair | tuple[RecordRef, RecordRef]) -> PairExplanation:
        """Why two records did or did not match: every comparison's level, values, m, u, weight.

        Works for any two records of the input, candidates or not.
        """
        run = self._run
        left_ref, right_ref = (pair.left, pair.right) if isinstance(pair, ScoredPair) else pair
        i, j = self._position(0, left_ref), self._position(1, right_ref)
        if run.dedupe and i > j:
            i, j = j, i
            left_ref, right_ref = right_ref, left_ref
        width = len(run.right)
        pair_ids = run.candidates.left_index * width + run.candidates.right_index
        row = int(np.searchsorted(pair_ids, i * width + j))
        if row < len(pair_ids) and pair_ids[row] == i * width + j:
            levels = run.levels[row]
            rule = run.rules[int(run.candidates.rule[row])].name
        else:
            single = PairCodes(run.sides, np.array([i]), np.array([j]))
            levels = comparison_vectors(run.comparisons, single)[0]
            rule = ""
        explanations = []
        for k, comparison in enumerate(run.comparisons):
            level = int(levels[k])
            m, u = float(run.m[k][level]), float(run.u[k][level])
            adjusted = run.term_frequencies.get(k)
            if adjusted is not None and adjusted[0] == level:
                # The u of agreeing on this very value: how often records hold it.
                u = float(adjusted[1][run.sides.left[comparison.attribute][i]])
            explanations.append(
                ComparisonExplanation(
                    comparison=comparison.name,
                    level=comparison.levels[level].label,
                    left_value=run.left.values(comparison.attribute)[i] or "",
                    right_value=run.right.values(comparison.attribute)[j] or "",
                    m_probability=m,
                    u_probability=u,
                    weight=math.log2(m / u),
                )
            )
        weight = run.prior + sum(c.weight for c in explanations)
        return PairExplanation(
            left=left_ref,
            right=right_ref,
            match_probability=float(probability(np.array([weight]))[0]),
            match_weight=weight,
            prior_weight=run.prior,
            blocking_rule=rule,
            comparisons=tuple(explanations),
        )


def _usable(
    settings: MatchSettings, left: RecordSet, right: RecordSet
) -> tuple[tuple[Comparison, ...], tuple[BlockingRule, ...], tuple[str, ...]]:
    """The comparisons and rules whose attributes both sides have, and the names of the rest;
    :class:`InvalidArgument` when no comparison or no rule is left."""

    def present(attribute: str) -> bool:
        return left.has_attribute(attribute) and right.has_attribute(attribute)

    comparisons = tuple(c for c in settings.comparisons if present(c.attribute))
    rules = tuple(
        rule
        for rule in settings.blocking_rules
        if all(
            left.has_attribute(k.attribute)
            and right.has_attribute(k.other_attribute or k.attribute)
            for k in rule.keys
        )
    )
    if not comparisons:
        raise InvalidArgument.for_field(
            "settings.comparisons",
            "no comparison's attribute has values in the records (columns: "
            f"{', '.join(left.columns) or 'none'})",
        )
    if not rules:
        raise InvalidArgument.for_field(
            "settings.blocking_rules", "no blocking rule's attributes have values in the records"
        )
    skipped = tuple(
        [f"comparison {c.name}" for c in settings.comparisons if c not in comparisons]
        + [f"blocking rule {r.name}" for r in settings.blocking_rules if r not in rules]
    )
    return comparisons, rules, skipped


def _random_pairs(
    left_size: int, right_size: int, dedupe: bool, wanted: int, seed: int
) -> tuple[Indices, Indices]:
    """Pairs standing for all pairs: every pair when there are few, else a uniform sample."""
    total = left_size * (left_size - 1) // 2 if dedupe else left_size * right_size
    if total <= wanted:
        if dedupe:
            i, j = np.triu_indices(left_size, 1)
        else:
            i, j = (a.ravel() for a in np.meshgrid(np.arange(left_size), np.arange(right_size)))
        return i.astype(np.int64), j.astype(np.int64)
    rng = np.random.default_rng(seed)
    if dedupe:
        i = rng.integers(0, left_size, wanted)
        j = rng.integers(0, left_size - 1, wanted)
        j = j + (j >= i)  # any record but i itself, uniformly
        return np.minimum(i, j), np.maximum(i, j)
    return rng.integers(0, left_size, wanted), rng.integers(0, right_size, wanted)


def _encode(
    comparisons: tuple[Comparison, ...], left: RecordSet, right: RecordSet, dedupe: bool
) -> EncodedSides:
    """The codes of every attribute the comparisons read, cross attributes included."""
    sides = EncodedSides(Vocabulary())
    attributes = {c.attribute for c in comparisons} | {
        level.cross_attribute for c in comparisons for level in c.levels if level.cross_attribute
    }
    for attribute in sorted(attributes):
        sides.left[attribute] = sides.vocabulary.encode(left.values(attribute))
        sides.right[attribute] = (
            sides.left[attribute] if dedupe else sides.vocabulary.encode(right.values(attribute))
        )
    return sides


def _term_frequency_weights(
    comparisons: tuple[Comparison, ...],
    sides: EncodedSides,
    candidates: CandidatePairs,
    levels: LevelVector,
    u: list[Floats],
    dedupe: bool,
) -> tuple[Floats, dict[int, tuple[int, Floats]]]:
    """What term frequencies add to each candidate's weight, and the tables behind it."""
    total = np.zeros(len(candidates))
    tables: dict[int, tuple[int, Floats]] = {}
    for k, comparison in enumerate(comparisons):
        exact = exact_level_of(comparison)
        if not comparison.term_frequency_adjustments or exact is None:
            continue
        left_codes = sides.left[comparison.attribute]
        others = () if dedupe else (sides.right[comparison.attribute],)
        shares = term_frequencies(left_codes, *others)
        tables[k] = (exact, shares)
        total += term_frequency_weights(
            levels[:, k], exact, left_codes[candidates.left_index], shares, float(u[k][exact])
        )
    return total, tables


def match_records(
    left: Records,
    right: Records | None = None,
    settings: MatchSettings = DEFAULT,
    *,
    id_column: str = "id",
    left_source: str | None = None,
    right_source: str = "right",
    source_column: str | None = None,
) -> MatchResult:
    """Match person records: deduplicate ``left``, or link ``left`` to ``right``.

    Records are a pyarrow Table or a list of dicts; ``id_column`` names each record. A record's
    :class:`RecordRef` source is ``left_source`` (default ``records`` when deduplicating,
    ``left`` when linking) or ``right_source``, or its own ``source_column`` value if given.
    Raises :class:`InvalidArgument` for unusable input or settings.
    """
    dedupe = right is None
    left_set = load_records(
        left,
        id_column=id_column,
        source=left_source or ("records" if dedupe else "left"),
        source_column=source_column,
        aliases=settings.aliases,
        field="left",
    )
    right_set = left_set
    if right is not None:
        right_set = load_records(
            right,
            id_column=id_column,
            source=right_source,
            source_column=source_column,
            aliases=settings.aliases,
            field="right",
        )
    comparisons, rules, skipped = _usable(settings, left_set, right_set)
    sides = _encode(comparisons, left_set, right_set, dedupe)
    candidates = candidate_pairs(
        rules, left_set, None if dedupe else right_set, max_pairs=settings.max_candidate_pairs
    )
    sample_left, sample_right = _random_pairs(
        len(left_set), len(right_set), dedupe, settings.u_sample_pairs, settings.seed
    )
    # One pass over candidates and random pairs together shares the similarity caches.
    all_levels = comparison_vectors(
        comparisons,
        PairCodes(
            sides,
            np.concatenate([candidates.left_index, sample_left]),
            np.concatenate([candidates.right_index, sample_right]),
        ),
    )
    levels, random_levels = all_levels[: len(candidates)], all_levels[len(candidates) :]

    layouts = [LevelLayout.of(c) for c in comparisons]
    u = u_from_random_pairs(random_levels, layouts)
    # A record has about one duplicate or none, so candidates match at about records/pairs at
    # most; lower starts let EM find the matches among households and namesakes (see em).
    rate_start = min(0.5, len(left_set) / max(1, len(candidates)))
    estimate = expectation_maximisation(
        levels,
        layouts,
        u,
        max_iterations=settings.max_em_iterations,
        tolerance=settings.em_tolerance,
        match_rate_starts=[rate_start * 10.0**-k for k in range(4)],
    )
    total_pairs = (
        len(left_set) * (len(left_set) - 1) // 2 if dedupe else len(left_set) * len(right_set)
    )
    prior = settings.probability_two_random_records_match or float(
        np.clip(estimate.expected_matches / max(1, total_pairs), *_PRIOR_BOUNDS)
    )
    weights = level_weights(estimate.m, u)
    adjustments, frequencies = _term_frequency_weights(
        comparisons, sides, candidates, levels, u, dedupe
    )
    pair_weights = match_weights(levels, weights, prior_weight(prior)) + adjustments
    run = _Run(
        left=left_set,
        right=right_set,
        dedupe=dedupe,
        comparisons=comparisons,
        rules=rules,
        sides=sides,
        candidates=candidates,
        levels=levels,
        m=estimate.m,
        u=u,
        weights=weights,
        prior=prior_weight(prior),
        match_weight=pair_weights,
        match_probability=probability(pair_weights),
        term_frequencies=frequencies,
    )
    model = MatchModel(
        probability_two_random_records_match=prior,
        levels=tuple(
            LevelEstimate(c.name, level.label, float(m[k]), float(u_k[k]), float(w[k]))
            for c, m, u_k, w in zip(comparisons, estimate.m, u, weights, strict=True)
            for k, level in enumerate(c.levels)
        ),
        em_iterations=estimate.iterations,
        converged=estimate.converged,
        candidate_pairs=len(candidates),
        comparisons=tuple(c.name for c in comparisons),
        blocking_rules=tuple(r.name for r in rules),
        skipped=skipped + candidates.oversized,
    )
    return MatchResult(run, model, settings.match_threshold, "dedupe" if dedupe else "link")
