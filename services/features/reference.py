"""The naive reference: every feature of one profile computed straight from its events.

No buckets, no sketches, no SQL: each feature filters the event list and aggregates what is
left, following the semantics written down in :mod:`.state` and :mod:`.events`. It is slow and
obviously right, which is what the streaming state and the batch queries are tested against.
Distinct counts are exact here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fractions import Fraction
from typing import Any

from profilemesh.services.features.definitions import (
    Aggregation,
    FeatureDefinition,
    FeatureSet,
    coerce,
    evaluate,
)
from profilemesh.services.features.events import (
    NS_PER_DAY,
    FeatureEvent,
    as_number,
    canonical,
    is_scalar,
    order_key,
)


def reference_values(
    events: Iterable[FeatureEvent],
    feature_set: FeatureSet,
    as_of_ns: int,
    names: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Every visible feature (or those of ``names``) of the profile whose events these are,
    as of ``as_of_ns``."""
    history = [event for event in events if event.timestamp_ns <= as_of_ns]
    results: dict[str, Any] = {}
    for definition in feature_set.closure(names):
        if definition.derived:
            results[definition.name] = evaluate(definition.tree, results)
        else:
            matching = [e for e in history if _matches(definition, e, as_of_ns)]
            results[definition.name] = _aggregate(definition, matching, as_of_ns)
    return {d.name: results[d.name] for d in feature_set.resolve(names)}


def _matches(definition: FeatureDefinition, event: FeatureEvent, as_of_ns: int) -> bool:
    if definition.event_types and event.type not in definition.event_types:
        return False
    if definition.event_names and event.name not in definition.event_names:
        return False
    if not all(feature_filter.matches(event) for feature_filter in definition.filters):
        return False
    window = definition.window_days
    return window is None or event.timestamp_ns // NS_PER_DAY > as_of_ns // NS_PER_DAY - window


def _aggregate(definition: FeatureDefinition, events: Sequence[FeatureEvent], as_of_ns: int) -> Any:
    aggregation = definition.aggregation
    if aggregation is Aggregation.COUNT:
        return len(events)
    if aggregation is Aggregation.DAYS_SINCE:
        return (as_of_ns - max(e.timestamp_ns for e in events)) / NS_PER_DAY if events else None
    if aggregation is Aggregation.DAYS_SINCE_FIRST:
        return (as_of_ns - min(e.timestamp_ns for e in events)) / NS_PER_DAY if events else None
    path = definition.path
    if path is None:
        raise ValueError(f"{definition.name}: {aggregation} needs a property")
    having = [(e.timestamp_ns, path.read(e)) for e in events]
    having = [(timestamp, value) for timestamp, value in having if is_scalar(value)]
    if aggregation is Aggregation.DISTINCT_COUNT:
        return len({canonical(value) for _, value in having})
    if aggregation is Aggregation.FIRST or aggregation is Aggregation.LAST:
        if not having:
            return None
        ordered = sorted(having, key=lambda item: (item[0], order_key(item[1])))
        chosen = ordered[0] if aggregation is Aggregation.FIRST else ordered[-1]
        return coerce(chosen[1], definition.result_type)
    numbers = [n for n in (as_number(value) for _, value in having) if n is not None]
    if not numbers:
        return None
    if aggregation is Aggregation.MIN:
        return min(numbers)
    if aggregation is Aggregation.MAX:
        return max(numbers)
    total = sum((Fraction(n) for n in numbers), Fraction(0))
    if aggregation is Aggregation.SUM:
        return _rounded(total)
    return _rounded(total / len(numbers))


def _rounded(exact: Fraction) -> float | None:
    try:
        return float(exact)
    except OverflowError:
        return None
