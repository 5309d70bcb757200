"""Matching settings as data: comparisons of levels, blocking rules and a threshold.

The shape follows Splink's settings: a comparison is an ordered list of levels, most similar
first, and a pair falls in the first level whose test holds; blocking rules choose which pairs
are compared at all. Everything here is a frozen pydantic model, so settings load from JSON or
YAML, compare by value and cannot change under a running match.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Comparator(StrEnum):
    """The test a comparison level applies to the two values of a pair."""

    EXACT = "exact"
    """Equal after normalisation."""
    JARO_WINKLER = "jaro_winkler"
    """Jaro-Winkler similarity at least ``threshold`` (0 to 1)."""
    LEVENSHTEIN = "levenshtein"
    """At most ``threshold`` insertions, deletions or substitutions."""
    DAMERAU_LEVENSHTEIN = "damerau_levenshtein"
    """At most ``threshold`` edits, a transposition of neighbours counting as one."""
    JACCARD = "jaccard"
    """Jaccard similarity of the character 3-gram sets at least ``threshold``."""
    TOKEN_SET = "token_set"
    """Token-set similarity (rapidfuzz's ``token_set_ratio``, 0 to 1) at least ``threshold``:
    words in any order, extra words on one side forgiven; for whole addresses."""
    DATE_DIFFERENCE = "date_difference"
    """Both are dates at most ``threshold`` days apart."""
    DATE_SWAPPED_DAY_MONTH = "date_swapped_day_month"
    """Same year, and one date's day is the other's month and the other way round."""
    NUMERIC_DIFFERENCE = "numeric_difference"
    """Both are numbers at most ``threshold`` apart."""
    NICKNAME = "nickname"
    """Known variants of one given name (``bill`` and ``william``)."""
    EITHER_NULL = "either_null"
    """Either value is missing: no evidence either way (weight 0)."""
    ELSE = "else"
    """Always true: the catch-all last level."""


# Comparators whose threshold is a smallest similarity in [0, 1], and those whose threshold is a
# largest distance; settings validation checks the range that applies.
SIMILARITY_COMPARATORS = frozenset(
    {Comparator.JARO_WINKLER, Comparator.JACCARD, Comparator.TOKEN_SET}
)
DISTANCE_COMPARATORS = frozenset(
    {
        Comparator.LEVENSHTEIN,
        Comparator.DAMERAU_LEVENSHTEIN,
        Comparator.DATE_DIFFERENCE,
        Comparator.NUMERIC_DIFFERENCE,
    }
)


class BlockingTransform(StrEnum):
    """How a blocking key's value is transformed before records are joined on it."""

    EXACT = "exact"
    PREFIX = "prefix"
    SOUNDEX = "soundex"
    YEAR = "year"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ComparisonLevel(_Frozen):
    """One level of a comparison, e.g. "Jaro-Winkler similarity at least 0.92"."""

    label: str = Field(min_length=1)
    """Shown in explanations and estimates, e.g. ``jaro_winkler_0.92``."""
    comparator: Comparator
    threshold: float = 0.0
    """Smallest similarity or largest distance, per :class:`Comparator`; ignored by the rest."""
    cross_attribute: str | None = None
    """When set, the test compares this attribute crosswise: the left record's attribute with
    the right record's ``cross_attribute`` *and* the left's ``cross_attribute`` with the right's
    attribute. That is how a level recognises swapped fields (given name and surname)."""
    cross_either_way: bool = False
    """With ``cross_attribute``: one of the two crosswise tests passing is enough (a given
    name typed into the surname field of one record only), instead of both (a full swap)."""
    m_probability: float | None = Field(default=None, gt=0.0, le=1.0)
    """Fixed probability that a true match falls here; ``None`` lets EM estimate it."""
    u_probability: float | None = Field(default=None, gt=0.0, le=1.0)
    """Fixed probability that a non-match falls here; ``None`` estimates it from random pairs."""

    @model_validator(mode="after")
    def _threshold_in_range(self) -> Self:
        if self.comparator in SIMILARITY_COMPARATORS and not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"{self.comparator} threshold must be in (0, 1]")
        if self.comparator in DISTANCE_COMPARATORS and self.threshold < 0.0:
            raise ValueError(f"{self.comparator} threshold must be at least 0")
        return self

    @property
    def is_null(self) -> bool:
        """Whether this is the missing-value level, which carries no evidence."""
        return self.comparator is Comparator.EITHER_NULL


class Comparison(_Frozen):
    """How one attribute of a pair is compared: levels from most to least similar."""

    name: str = Field(min_length=1)
    attribute: str = Field(min_length=1)
    """A canonical attribute (``first_name``, ``dob``...) or a column name."""
    levels: tuple[ComparisonLevel, ...] = Field(min_length=2)
    term_frequency_adjustments: bool = False
    """Weigh exact agreement by how common the value is: two records sharing a rare surname
    are stronger evidence than two Smiths (Splink's term frequency adjustment)."""

    @model_validator(mode="after")
    def _levels_are_well_formed(self) -> Self:
        labels = [level.label for level in self.levels]
        if len(set(labels)) != len(labels):
            raise ValueError(f"comparison {self.name!r} has duplicate level labels")
        if self.levels[-1].comparator is not Comparator.ELSE:
            raise ValueError(f"comparison {self.name!r} must end with an ELSE level")
        if sum(level.is_null for level in self.levels) > 1:
            raise ValueError(f"comparison {self.name!r} has more than one EITHER_NULL level")
        return self


class BlockingKey(_Frozen):
    """One key of a blocking rule: an attribute, optionally transformed."""

    attribute: str = Field(min_length=1)
    transform: BlockingTransform = BlockingTransform.EXACT
    prefix_length: int = Field(default=0, ge=0)
    """Characters kept by ``PREFIX``; ignored by other transforms."""
    other_attribute: str | None = None
    """Attribute read on the right-hand record instead of ``attribute``: a rule whose keys pair
    ``first_name`` with ``last_name`` and back finds records with swapped names."""

    @model_validator(mode="after")
    def _prefix_has_length(self) -> Self:
        if self.transform is BlockingTransform.PREFIX and self.prefix_length < 1:
            raise ValueError("a PREFIX blocking key needs prefix_length >= 1")
        return self


class BlockingRule(_Frozen):
    """Two records are a candidate pair when they agree on every key of a rule."""

    name: str = Field(min_length=1)
    keys: tuple[BlockingKey, ...] = Field(min_length=1)


class MatchSettings(_Frozen):
    """Everything a matching run needs besides the records.

    Comparisons and blocking rules whose attributes no input column provides are skipped, so
    one configuration serves files with different columns.
    """

    blocking_rules: tuple[BlockingRule, ...] = Field(min_length=1)
    comparisons: tuple[Comparison, ...] = Field(min_length=1)
    match_threshold: float = Field(default=0.95, gt=0.0, le=1.0)
    """Smallest match probability for a pair to count as a match."""
    probability_two_random_records_match: float | None = Field(default=None, gt=0.0, lt=1.0)
    """The prior (Splink's lambda); ``None`` estimates it with m and u."""
    max_em_iterations: int = Field(default=25, ge=1)
    em_tolerance: float = Field(default=1e-4, gt=0.0)
    """EM stops when no m, u or lambda moves by more than this in one iteration."""
    u_sample_pairs: int = Field(default=300_000, ge=1000)
    """Random pairs drawn to estimate u; more is steadier and slower."""
    max_candidate_pairs: int = Field(default=50_000_000, ge=1)
    """Refuse blocking rules that would produce more candidate pairs than this."""
    aliases: dict[str, str] = Field(default_factory=dict)
    """Extra column-to-attribute mappings (``{"cust_zip": "postcode"}``) on top of the built-in
    synonyms."""
    seed: int = 0
    """Seed of the random pairs, so that a run can be repeated exactly."""

    @model_validator(mode="after")
    def _names_unique(self) -> Self:
        names = [comparison.name for comparison in self.comparisons]
        if len(set(names)) != len(names):
            raise ValueError("comparison names must be unique")
        rules = [rule.name for rule in self.blocking_rules]
        if len(set(rules)) != len(rules):
            raise ValueError("blocking rule names must be unique")
        return self

    def with_threshold(self, threshold: float) -> MatchSettings:
        """These settings with another match threshold."""
        return MatchSettings.model_validate({**self.model_dump(), "match_threshold": threshold})
