"""The DuckDB queries: the backfill equals the streaming state and the reference, and point-in-
time values equal the reference computed from each row's past only, whatever the future holds."""

from __future__ import annotations

import random
from collections.abc import Iterator

import duckdb
import pyarrow as pa
import pytest

from profilemesh.services.features.batch import batch_values, point_in_time_values
from profilemesh.services.features.definitions import FeatureSet, load_definitions
from profilemesh.services.features.events import (
    ARROW_SCHEMA,
    NS_PER_DAY,
    FeatureEvent,
    events_to_arrow,
)
from profilemesh.services.features.reference import reference_values
from profilemesh.services.features.state import ProfileState

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
EVENTS = history(seed=42, profiles=60)
GROUPS = by_profile(EVENTS)


@pytest.fixture
def con() -> Iterator[duckdb.DuckDBPyConnection]:
    connection = duckdb.connect()
    connection.register("events", events_to_arrow(EVENTS))
    yield connection
    connection.close()


def _rows(table: pa.Table, *keys: str) -> list[tuple[tuple[object, ...], dict[str, object]]]:
    rows = []
    for row in table.to_pylist():
        rows.append((tuple(row.pop(key) for key in keys), row))
    return rows


def test_the_backfill_equals_the_streaming_state(con: duckdb.DuckDBPyConnection) -> None:
    states: dict[str, ProfileState] = {}
    for event in EVENTS:
        states.setdefault(event.profile_id, ProfileState()).apply(event, FEATURES)
    as_of = (START_DAY + SPAN_DAYS + 2) * NS_PER_DAY + 12_345
    table = batch_values(con, "events", FEATURES, as_of)
    assert table.column_names == ["profile_id", *(d.name for d in FEATURES.visible)]
    assert table.column("profile_id").to_pylist() == sorted(states)
    for (profile_id,), values in _rows(table, "profile_id"):
        expected = states[str(profile_id)].values(FEATURES, as_of)
        assert_values_match(values, expected, exact=False, where=str(profile_id))


def test_the_backfill_as_of_a_past_time_equals_the_reference(
    con: duckdb.DuckDBPyConnection,
) -> None:
    as_of = (START_DAY + 200) * NS_PER_DAY + NS_PER_DAY // 3
    table = batch_values(con, "events", FEATURES, as_of)
    present = {p for p, events in GROUPS.items() if any(e.timestamp_ns <= as_of for e in events)}
    assert set(table.column("profile_id").to_pylist()) == present
    for (profile_id,), values in _rows(table, "profile_id"):
        expected = reference_values(GROUPS[str(profile_id)], FEATURES, as_of)
        assert_values_match(values, expected, exact=False, where=str(profile_id))


def _entity_rows(seed: int, count: int) -> pa.Table:
    rng = random.Random(seed)
    profiles = [*sorted(GROUPS), "never-seen"]
    rows = [(rng.choice(profiles), random_timestamp(rng)) for _ in range(count)]
    # Rows at an event's exact timestamp: that event counts, the next nanosecond's does not.
    for event in rng.sample(EVENTS, 20):
        rows.append((event.profile_id, event.timestamp_ns))
    rng.shuffle(rows)
    return pa.table(
        {
            "label": pa.array(range(len(rows)), pa.int64()),
            "profile_id": [profile for profile, _ in rows],
            "timestamp_ns": pa.array([ts for _, ts in rows], pa.int64()),
        }
    )


def test_point_in_time_values_equal_the_reference_over_each_rows_past(
    con: duckdb.DuckDBPyConnection,
) -> None:
    entity_rows = _entity_rows(seed=1, count=250)
    table = point_in_time_values(con, "events", FEATURES, entity_rows)
    assert table.column_names[:3] == ["label", "profile_id", "timestamp_ns"]
    assert table.column("label").to_pylist() == entity_rows.column("label").to_pylist()
    for (label, profile_id, as_of), values in _rows(table, "label", "profile_id", "timestamp_ns"):
        assert isinstance(as_of, int)
        past = [e for e in GROUPS.get(str(profile_id), []) if e.timestamp_ns <= as_of]
        expected = reference_values(past, FEATURES, as_of)
        assert_values_match(values, expected, exact=False, where=f"row {label}")


def test_events_after_a_rows_timestamp_never_change_its_values() -> None:
    # One row per profile, so that every appended event is after the only row it could reach.
    rng = random.Random(3)
    rows = [(profile_id, random_timestamp(rng)) for profile_id in sorted(GROUPS)]
    entity_rows = pa.table(
        {
            "profile_id": [profile_id for profile_id, _ in rows],
            "timestamp_ns": pa.array([as_of for _, as_of in rows], pa.int64()),
        }
    )
    future = []
    for profile_id, as_of in rows:
        for later in (as_of + 1, as_of + NS_PER_DAY, as_of + rng.randrange(1, 50 * NS_PER_DAY)):
            properties = {"revenue": 1_000, "product_id": f"new-{later}", "score": 0}
            for name in ("Order Completed", "Product Viewed", "Survey Answered"):
                future.append(FeatureEvent(profile_id, later, "track", name, properties, {}))
    before, after = duckdb.connect(), duckdb.connect()
    before.register("events", events_to_arrow(EVENTS))
    after.register("events", events_to_arrow(EVENTS + future))
    unchanged = point_in_time_values(before, "events", FEATURES, entity_rows)
    assert point_in_time_values(after, "events", FEATURES, entity_rows).equals(unchanged)
    # ... while the same events, dated at the rows' timestamps, do count.
    now = [
        FeatureEvent(e.profile_id, e.timestamp_ns - 1, e.type, e.name, e.properties, e.context)
        for e in future
        if e.timestamp_ns == dict(rows)[e.profile_id] + 1
    ]
    after.register("events", events_to_arrow(EVENTS + now))
    assert not point_in_time_values(after, "events", FEATURES, entity_rows).equals(unchanged)


def test_point_in_time_selects_named_features_and_computes_what_they_need(
    con: duckdb.DuckDBPyConnection,
) -> None:
    entity_rows = _entity_rows(seed=4, count=30).select(["profile_id", "timestamp_ns"])
    names = ["purchase_cadence_days", "mobile_events_90d", "first_product"]
    table = point_in_time_values(con, "events", FEATURES, entity_rows, names=names)
    assert table.column_names == ["profile_id", "timestamp_ns", *names]
    assert table.schema.field("first_product").type == pa.string()
    assert table.schema.field("mobile_events_90d").type == pa.int64()
    unseen = point_in_time_values(
        con,
        "events",
        FEATURES,
        pa.table({"profile_id": ["never-seen"], "timestamp_ns": pa.array([0], pa.int64())}),
        names=["orders_30d", "recency_days"],
    )
    assert unseen.to_pylist() == [
        {"profile_id": "never-seen", "timestamp_ns": 0, "orders_30d": 0, "recency_days": None}
    ]


def test_windows_count_utc_days_before_the_epoch_too() -> None:
    features = FeatureSet(
        load_definitions(
            """
            - {name: today, aggregation: count, window_days: 1}
            - {name: two_days, aggregation: count, window_days: 2}
            - {name: ever, aggregation: count}
            - {name: since, aggregation: days_since}
            """
        ),
        builtins=False,
    )
    stamps = [-NS_PER_DAY - 1, -NS_PER_DAY, -1, 0, NS_PER_DAY - 1, NS_PER_DAY]
    events = [FeatureEvent("p", ts, "track", "e", {}, {}) for ts in stamps]
    con = duckdb.connect()
    con.register("events", events_to_arrow(events))
    rows = pa.table(
        {"profile_id": ["p"] * len(stamps), "timestamp_ns": pa.array(stamps, pa.int64())}
    )
    table = point_in_time_values(con, "events", features, rows)
    for (_, as_of), values in _rows(table, "profile_id", "timestamp_ns"):
        assert isinstance(as_of, int)
        expected = reference_values(events, features, as_of)
        assert_values_match(values, expected, exact=False, where=str(as_of))
    state = ProfileState()
    for event in events:
        state.apply(event, features)
    assert state.values(features, NS_PER_DAY) == {
        "today": 1,
        "two_days": 3,
        "ever": 6,
        "since": 0.0,
    }


def test_an_empty_event_table_gives_no_rows() -> None:
    con = duckdb.connect()
    con.register("events", ARROW_SCHEMA.empty_table())
    table = batch_values(con, "events", FEATURES, 10**18)
    assert table.num_rows == 0
    assert table.column_names == ["profile_id", *(d.name for d in FEATURES.visible)]
