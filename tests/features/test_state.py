"""The streaming state: online values equal the reference's, merges are exact, serialisation
round-trips, eviction bounds memory without changing what windows still cover, and the
distinct-count sketch is exact while small."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from profilemesh.services.features.definitions import FeatureSet, load_definitions
from profilemesh.services.features.events import NS_PER_DAY, FeatureEvent
from profilemesh.services.features.reference import reference_values
from profilemesh.services.features.state import (
    SPARSE_LIMIT,
    ProfileState,
    Sketch,
    _sketch_add,
    _sketch_union,
    sketch_entry,
    sketch_estimate,
)

from .synthetic import (
    SPAN_DAYS,
    START_DAY,
    assert_values_match,
    by_profile,
    feature_set,
    history,
    random_timestamp,
)

FEATURES = feature_set()


def _state(events: list[FeatureEvent], features: FeatureSet = FEATURES) -> ProfileState:
    state = ProfileState()
    for event in events:
        state.apply(event, features)
    return state


def _one_person(seed: int) -> list[FeatureEvent]:
    events = history(seed, profiles=1, max_events=120)
    return [
        FeatureEvent("p", e.timestamp_ns, e.type, e.name, e.properties, e.context) for e in events
    ]


@pytest.mark.parametrize("seed", range(4))
def test_online_values_equal_the_reference_exactly(seed: int) -> None:
    """Online: the state holds the events up to now, and is read as of now."""
    rng = random.Random(seed)
    groups = by_profile(history(seed, profiles=25))
    for profile_id, events in groups.items():
        as_of = random_timestamp(rng)
        past = [e for e in events if e.timestamp_ns <= as_of]
        actual = _state(past).values(FEATURES, as_of)
        expected = reference_values(events, FEATURES, as_of)
        assert_values_match(actual, expected, exact=True, where=profile_id)


@pytest.mark.parametrize("seed", range(6))
def test_merging_two_states_equals_the_state_of_all_their_events(seed: int) -> None:
    rng = random.Random(seed)
    events = _one_person(seed)
    split = [rng.random() < 0.5 for _ in events]
    mine = [e for e, left in zip(events, split, strict=True) if left]
    theirs = [e for e, left in zip(events, split, strict=True) if not left]
    together = list(events)
    rng.shuffle(together)

    merged = _state(mine).merge(_state(theirs))
    whole = _state(together)
    assert merged.to_bytes() == whole.to_bytes()
    assert _state(theirs).merge(_state(mine)).to_bytes() == whole.to_bytes()
    as_of = (START_DAY + SPAN_DAYS) * NS_PER_DAY
    assert merged.values(FEATURES, as_of) == whole.values(FEATURES, as_of)


def test_a_merge_leaves_the_absorbed_state_unchanged() -> None:
    events = _one_person(11)
    absorbed = _state(events[:30])
    before = absorbed.to_bytes()
    survivor = _state(events[30:]).merge(absorbed)
    survivor.apply(events[0], FEATURES)
    assert absorbed.to_bytes() == before


def test_sums_are_exact_whatever_the_order() -> None:
    features = FeatureSet(
        load_definitions("[{name: total, aggregation: sum, property: x}]"), builtins=False
    )
    values = [0.1, 0.2, 0.3, 1e16, -1e16, 1e-300]
    orders = [values, list(reversed(values)), sorted(values)]
    assert len({sum(order) for order in orders}) == 3  # plain float addition depends on order
    totals = set()
    for order in orders:
        events = [FeatureEvent("p", i, "track", "e", {"x": x}, {}) for i, x in enumerate(order)]
        totals.add(_state(events, features).values(features, 10**6)["total"])
    assert totals == {math.fsum(values)}


def test_serialisation_round_trips_exactly() -> None:
    state = _state(_one_person(3))
    data = state.to_bytes()
    again = ProfileState.from_bytes(data)
    assert again.to_bytes() == data
    as_of = (START_DAY + SPAN_DAYS) * NS_PER_DAY
    assert again.values(FEATURES, as_of) == state.values(FEATURES, as_of)
    assert b"pickle" not in data and data.startswith(b"{")


def test_eviction_bounds_day_cells_and_keeps_the_windows_that_are_still_covered() -> None:
    events = sorted(_one_person(5), key=lambda e: e.timestamp_ns)
    state = ProfileState()
    longest = {s.key: s.max_window_days or 0 for s in FEATURES.sources}
    index = 0
    for today in range(START_DAY, START_DAY + SPAN_DAYS):
        while index < len(events) and events[index].timestamp_ns // NS_PER_DAY <= today:
            state.apply(events[index], FEATURES)
            index += 1
        as_of = (today + 1) * NS_PER_DAY - 1
        before = state.values(FEATURES, as_of)
        state.evict(today, FEATURES)
        assert state.values(FEATURES, as_of) == before
        assert state.day_cells <= sum(longest.values())
    assert state.values(FEATURES, as_of) == reference_values(events, FEATURES, as_of)


def test_eviction_without_a_feature_set_uses_the_windows_the_cells_were_written_with() -> None:
    events = _one_person(8)
    with_set, without = _state(events), _state(events)
    today = START_DAY + SPAN_DAYS // 2
    assert with_set.evict(today, FEATURES) == without.evict(today) > 0
    assert with_set.to_bytes() == without.to_bytes()


def test_eviction_drops_sources_no_definition_reads_any_more() -> None:
    events = _one_person(9)
    builtins_only = FeatureSet()
    state = _state(events)
    state.evict(START_DAY, builtins_only)
    assert state.to_bytes() == _state(events, builtins_only).to_bytes()


def test_unknown_profiles_have_zero_counts_and_no_other_values() -> None:
    values = ProfileState().values(FEATURES, 10**18)
    assert values["orders_30d"] == 0 and values["distinct_products_viewed_90d"] == 0
    assert values["recency_days"] is None and values["monetary_365d"] is None


# -- the sketch ------------------------------------------------------------------------------


def _sketch(values: list[Any]) -> Sketch | None:
    sketch: Sketch | None = None
    for value in values:
        sketch = _sketch_add(sketch, *sketch_entry(value))
    return sketch


def test_the_sketch_is_exact_while_sparse_and_close_once_dense() -> None:
    small = [f"sku-{i}" for i in range(SPARSE_LIMIT)]
    assert sketch_estimate(_sketch(small + small[:10])) == SPARSE_LIMIT
    large = [f"sku-{i}" for i in range(20_000)]
    estimate = sketch_estimate(_sketch(large))
    assert abs(estimate - 20_000) < 0.05 * 20_000
    middle = [f"sku-{i}" for i in range(1_000)]
    assert abs(sketch_estimate(_sketch(middle)) - 1_000) < 50


@settings(max_examples=40, deadline=None)
@given(
    left=st.lists(st.integers(0, 2_000), max_size=600),
    right=st.lists(st.integers(0, 2_000), max_size=600),
)
def test_a_sketch_union_is_the_sketch_of_the_union(left: list[int], right: list[int]) -> None:
    union = _sketch_union(_sketch(list(left)), _sketch(list(right)))
    assert union == _sketch(left + right)
