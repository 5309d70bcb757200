"""Why a pair matched: each comparison's level, the values compared, m, u and the weight.

A match probability alone cannot be argued with; a list that says "surname: exact, +9.1 bits;
date of birth: day and month swapped, +4.2 bits; postcode: else, -5.3 bits" can. The weights
of the explanation add up, with the prior, to the pair's match weight.
"""

from __future__ import annotations

from dataclasses import dataclass

from profilemesh.services.identity.matching.records import RecordRef


@dataclass(frozen=True, slots=True)
class ComparisonExplanation:
    """How one comparison scored one pair."""

    comparison: str
    level: str
    left_value: str
    right_value: str
    m_probability: float
    u_probability: float
    weight: float
    """log2(m / u) in bits: positive is evidence for a match."""


@dataclass(frozen=True, slots=True)
class PairExplanation:
    """A pair's score and its reasons, in settings order."""

    left: RecordRef
    right: RecordRef
    match_probability: float
    match_weight: float
    prior_weight: float
    """log2 odds of the prior: the weight before any comparison is looked at."""
    blocking_rule: str
    """The first blocking rule that made the records a candidate pair."""
    comparisons: tuple[ComparisonExplanation, ...]

    def lines(self) -> list[str]:
        """The explanation as text, one line per comparison, for logs and terminals."""
        head = (
            f"{self.left} ~ {self.right}: p={self.match_probability:.4f} "
            f"w={self.match_weight:+.2f} (prior {self.prior_weight:+.2f}, "
            f"blocked by {self.blocking_rule})"
        )
        rows = [
            f"  {c.comparison:<14} {c.level:<26} {c.weight:+7.2f}  "
            f"m={c.m_probability:.4g} u={c.u_probability:.4g}  "
            f"{c.left_value!r} / {c.right_value!r}"
            for c in self.comparisons
        ]
        return [head, *rows]
