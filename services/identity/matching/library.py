"""The comparison library: small named pieces that settings are written with.

In the manner of Splink's comparison library, a level says what it tests
(``jaro_winkler_level(0.92)``), a comparison is a short list of levels
(``name_comparison("last_name")``), and a blocking rule lists the attributes it joins on
(``block_on("first_name", "last_name")``). Labels are derived from the parameters so that
explanations read ``jaro_winkler_0.92`` without anyone naming it.
"""

from __future__ import annotations

from collections.abc import Iterable

from profilemesh.services.identity.matching.settings import (
    BlockingKey,
    BlockingRule,
    BlockingTransform,
    Comparator,
    Comparison,
    ComparisonLevel,
)

# Levels -------------------------------------------------------------------------------------


def null_level() -> ComparisonLevel:
    """Either value missing: no evidence, weight 0. Put it first."""
    return ComparisonLevel(label="null", comparator=Comparator.EITHER_NULL)


def else_level() -> ComparisonLevel:
    """Everything not caught by an earlier level. Put it last."""
    return ComparisonLevel(label="else", comparator=Comparator.ELSE)


def exact_level() -> ComparisonLevel:
    """Equal after normalisation."""
    return ComparisonLevel(label="exact", comparator=Comparator.EXACT)


def jaro_winkler_level(threshold: float) -> ComparisonLevel:
    """Jaro-Winkler similarity at least ``threshold``: typos, more forgiving near the end."""
    return ComparisonLevel(
        label=f"jaro_winkler_{threshold:g}", comparator=Comparator.JARO_WINKLER, threshold=threshold
    )


def levenshtein_level(distance: int) -> ComparisonLevel:
    """At most ``distance`` single-character edits."""
    return ComparisonLevel(
        label=f"levenshtein_{distance}", comparator=Comparator.LEVENSHTEIN, threshold=distance
    )


def damerau_levenshtein_level(distance: int) -> ComparisonLevel:
    """At most ``distance`` edits, swapping two neighbours counting as one (``1234``/``1324``)."""
    return ComparisonLevel(
        label=f"damerau_levenshtein_{distance}",
        comparator=Comparator.DAMERAU_LEVENSHTEIN,
        threshold=distance,
    )


def jaccard_level(threshold: float) -> ComparisonLevel:
    """Character 3-gram Jaccard similarity at least ``threshold``: robust to reordered words."""
    return ComparisonLevel(
        label=f"jaccard_{threshold:g}", comparator=Comparator.JACCARD, threshold=threshold
    )


def token_set_level(threshold: float) -> ComparisonLevel:
    """Token-set similarity at least ``threshold``: the same words in another order, or with
    a line missing on one side, still agree."""
    return ComparisonLevel(
        label=f"token_set_{threshold:g}", comparator=Comparator.TOKEN_SET, threshold=threshold
    )


def date_within_level(days: int) -> ComparisonLevel:
    """Both valid dates, at most ``days`` apart."""
    return ComparisonLevel(
        label=f"within_{days}_days", comparator=Comparator.DATE_DIFFERENCE, threshold=days
    )


def swapped_day_month_level() -> ComparisonLevel:
    """Same year with day and month swapped: 1980-03-04 against 1980-04-03."""
    return ComparisonLevel(label="day_month_swapped", comparator=Comparator.DATE_SWAPPED_DAY_MONTH)


def numeric_within_level(tolerance: float) -> ComparisonLevel:
    """Both numbers, at most ``tolerance`` apart."""
    return ComparisonLevel(
        label=f"within_{tolerance:g}",
        comparator=Comparator.NUMERIC_DIFFERENCE,
        threshold=tolerance,
    )


def nickname_level() -> ComparisonLevel:
    """Forms of one given name (``bob`` and ``robert``)."""
    return ComparisonLevel(label="nickname", comparator=Comparator.NICKNAME)


def swapped_with_level(cross_attribute: str, similarity: float | None = None) -> ComparisonLevel:
    """Values swapped with ``cross_attribute`` (given name and surname exchanged), exactly or,
    with ``similarity``, at that Jaro-Winkler similarity both ways."""
    if similarity is None:
        return ComparisonLevel(
            label=f"swapped_with_{cross_attribute}",
            comparator=Comparator.EXACT,
            cross_attribute=cross_attribute,
        )
    return ComparisonLevel(
        label=f"swapped_with_{cross_attribute}_{similarity:g}",
        comparator=Comparator.JARO_WINKLER,
        threshold=similarity,
        cross_attribute=cross_attribute,
    )


def in_other_field_level(cross_attribute: str, similarity: float = 0.9) -> ComparisonLevel:
    """One record's value is (at that Jaro-Winkler similarity) the other's ``cross_attribute``,
    either way round: a given name typed into the surname field of one record."""
    return ComparisonLevel(
        label=f"in_other_field_{cross_attribute}",
        comparator=Comparator.JARO_WINKLER,
        threshold=similarity,
        cross_attribute=cross_attribute,
        cross_either_way=True,
    )


# Comparisons --------------------------------------------------------------------------------


def _comparison(attribute: str, name: str | None, levels: Iterable[ComparisonLevel]) -> Comparison:
    return Comparison(
        name=name or attribute, attribute=attribute, levels=(null_level(), *levels, else_level())
    )


def exact_match(attribute: str, *, name: str | None = None) -> Comparison:
    """Missing, equal, or not."""
    return _comparison(attribute, name, [exact_level()])


def jaro_winkler_at_thresholds(
    attribute: str, thresholds: Iterable[float] = (0.9, 0.7), *, name: str | None = None
) -> Comparison:
    """Missing, equal, then one level per Jaro-Winkler threshold (highest first)."""
    levels = [jaro_winkler_level(t) for t in sorted(thresholds, reverse=True)]
    return _comparison(attribute, name, [exact_level(), *levels])


def damerau_levenshtein_at_thresholds(
    attribute: str, distances: Iterable[int] = (1, 2), *, name: str | None = None
) -> Comparison:
    """Missing, equal, then one level per edit distance (smallest first)."""
    levels = [damerau_levenshtein_level(d) for d in sorted(distances)]
    return _comparison(attribute, name, [exact_level(), *levels])


def name_comparison(
    attribute: str,
    *,
    swapped_with: str | None = None,
    nicknames: bool = False,
    thresholds: Iterable[float] = (0.92, 0.8),
    in_other_field: str | None = None,
    term_frequency_adjustments: bool = False,
    name: str | None = None,
) -> Comparison:
    """A person's name: equal, swapped with another name field, a nickname, then similar.

    The swapped level catches given name and surname entered the wrong way round; the
    nickname level catches ``bill``/``william``, which string similarity scores as different.
    ``in_other_field`` adds a last level for a name found in the other record's
    ``in_other_field`` (put it in one of the two name comparisons, so the fact counts once).
    With ``term_frequency_adjustments`` a shared rare name weighs more than a shared common one.
    """
    levels = [exact_level()]
    if swapped_with:
        levels.append(swapped_with_level(swapped_with, similarity=0.9))
    if nicknames:
        levels.append(nickname_level())
    levels.extend(jaro_winkler_level(t) for t in sorted(thresholds, reverse=True))
    if in_other_field:
        levels.append(in_other_field_level(in_other_field))
    comparison = _comparison(attribute, name, levels)
    if term_frequency_adjustments:
        return comparison.model_copy(update={"term_frequency_adjustments": True})
    return comparison


def address_comparison(
    attribute: str = "full_address",
    thresholds: Iterable[float] = (0.8, 0.6),
    *,
    name: str = "address",
) -> Comparison:
    """A whole address as one comparison: equal, then by token-set similarity.

    People at one address share all its parts, so street, city and postcode compared
    separately would count one fact (same home) three times and merge households.
    """
    levels = [token_set_level(t) for t in sorted(thresholds, reverse=True)]
    return _comparison(attribute, name, [exact_level(), *levels])


def date_comparison(
    attribute: str, *, within_days: Iterable[int] = (31, 366), name: str | None = None
) -> Comparison:
    """A date such as a birth date: equal, day and month swapped, one typo, then near.

    A typo (one edit of the digits) is a likelier error for a typed date than a date a few
    days off, so it comes before the day-difference levels.
    """
    levels = [exact_level(), swapped_day_month_level(), damerau_levenshtein_level(1)]
    levels.extend(date_within_level(days) for days in sorted(within_days))
    return _comparison(attribute, name, levels)


def identifier_comparison(
    attribute: str, distances: Iterable[int] = (1, 2), *, name: str | None = None
) -> Comparison:
    """An identifier typed by people (social security, customer number): equal or a few edits."""
    return damerau_levenshtein_at_thresholds(attribute, distances, name=name)


# Blocking -----------------------------------------------------------------------------------


def key(
    attribute: str,
    transform: BlockingTransform = BlockingTransform.EXACT,
    *,
    prefix_length: int = 0,
    other_attribute: str | None = None,
) -> BlockingKey:
    """One blocking key."""
    return BlockingKey(
        attribute=attribute,
        transform=transform,
        prefix_length=prefix_length,
        other_attribute=other_attribute,
    )


def block_on(*keys: str | BlockingKey, name: str | None = None) -> BlockingRule:
    """Pairs that agree on every key; a string key means the attribute's exact value."""
    parsed = tuple(key(k) if isinstance(k, str) else k for k in keys)
    default_name = "_and_".join(
        k.attribute if k.transform is BlockingTransform.EXACT else f"{k.attribute}_{k.transform}"
        for k in parsed
    )
    return BlockingRule(name=name or default_name, keys=parsed)


def block_on_swapped(first: str, second: str, *, name: str | None = None) -> BlockingRule:
    """Pairs whose ``first`` is the other's ``second`` and the other way round."""
    return BlockingRule(
        name=name or f"{first}_and_{second}_swapped",
        keys=(key(first, other_attribute=second), key(second, other_attribute=first)),
    )
