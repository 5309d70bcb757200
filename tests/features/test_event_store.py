"""The event store on both backends: a DuckDB file beside SQLite, a table beside PostgreSQL's
consumer store. Both keep events in log order, follow merges, unmerges and erasures, and show
them to DuckDB as the view the batch queries read; on PostgreSQL every replica sees every
replica's events, and the events commit or roll back with the consumer's transaction."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from profilemesh.services.features.domain import batch_point_in_time
from profilemesh.services.features.event_store import (
    VIEW,
    DuckDBEventStore,
    EventStore,
    PendingRows,
)
from profilemesh.services.features.events import FeatureEvent
from profilemesh.services.features.postgres_events import PostgresEventStore
from profilemesh.services.features.reference import reference_values
from tests.postgres_server import PostgresServer
from tests.store_backends import StoreHarness

from .synthetic import START_DAY, assert_values_match, by_profile, feature_set, history

NS_PER_DAY = 86_400 * 1_000_000_000


def open_events(stores: StoreHarness) -> EventStore:
    """Features' event store on the harness's backend (a second call opens the same events)."""
    if stores.backend == "postgres":
        return PostgresEventStore(stores.open("features"))
    return DuckDBEventStore(stores.directory / "events.duckdb")


@pytest.fixture
def events(stores: StoreHarness) -> Iterator[EventStore]:
    store = open_events(stores)
    yield store
    store.close()


def event(profile_id: str, at: int, name: str = "Order Completed", **properties: Any) -> Any:
    return FeatureEvent(profile_id, at, "track", name, properties, {"page": {"path": "/"}})


def append(store: EventStore, *rows: tuple[int, int, str, FeatureEvent]) -> None:
    pending = PendingRows()
    for partition, offset, anchor, item in rows:
        pending.add(partition, offset, anchor, item)
    store.append(pending)


def view(store: EventStore) -> list[tuple[Any, ...]]:
    with store.reader() as cursor:
        return cursor.execute(
            f"SELECT profile_id, timestamp_ns, type, name, properties, context FROM {VIEW}"
            " ORDER BY profile_id, timestamp_ns"
        ).fetchall()


def test_events_of_a_profile_come_back_in_log_order(events: EventStore) -> None:
    append(
        events,
        (1, 0, "user_id:a", event("p", 30, revenue=1.5)),
        (0, 5, "user_id:a", event("p", 20)),
        (0, 2, "user_id:b", event("q", 10)),
    )
    append(events, (0, 7, "user_id:a", event("p", 10, "Page Viewed")))
    found = events.events_of(["p", "q", "nobody"])
    assert [(e.timestamp_ns, e.name) for e in found["p"]] == [
        (20, "Order Completed"),
        (10, "Page Viewed"),
        (30, "Order Completed"),
    ]
    assert found["p"][2].properties == {"revenue": 1.5}
    assert found["p"][2].context == {"page": {"path": "/"}}
    assert [e.timestamp_ns for e in found["q"]] == [10]
    assert found["nobody"] == []
    assert events.count() == 4
    assert events.profile_ids() == ["p", "q"]


def test_the_view_holds_every_column_as_written_including_awkward_text(
    events: EventStore,
) -> None:
    awkward = {"note": 'a, "quoted"\nline\\two', "empty": "", "ünï": [1, None, {"x": True}]}
    home = 'Home, "sweet"\nhome, ü\\N'
    append(
        events,
        (0, 0, "user_id:a", FeatureEvent("p", -5, "track", "", awkward, {})),
        (0, 1, "user_id:a", FeatureEvent("p", 7, "page", home, {}, {"device": "mobile"})),
    )
    assert view(events) == [
        ("p", -5, "track", "", json.dumps(awkward, separators=(",", ":")), None),
        ("p", 7, "page", home, None, '{"device":"mobile"}'),
    ]
    [first, _] = events.events_of(["p"])["p"]
    assert first.properties == awkward


def test_an_empty_store_is_an_empty_view(events: EventStore) -> None:
    assert view(events) == []
    with events.reader() as cursor:
        columns = cursor.execute(f"SELECT * FROM {VIEW}").description
    assert [c[0] for c in columns or ()] == [
        "profile_id",
        "timestamp_ns",
        "type",
        "name",
        "properties",
        "context",
    ]


def test_a_merge_moves_the_merged_profiles_events_to_the_survivor(events: EventStore) -> None:
    append(
        events,
        (0, 0, "user_id:a", event("a", 1)),
        (0, 1, "anonymous_id:b", event("b", 2)),
        (0, 2, "anonymous_id:c", event("c", 3)),
    )
    events.reassign(["b", "c"], "a")
    assert [e.timestamp_ns for e in events.events_of(["a"])["a"]] == [1, 2, 3]
    assert events.profile_ids() == ["a"]
    assert {row[0] for row in view(events)} == {"a"}


def test_an_unmerge_moves_events_by_their_anchor(events: EventStore) -> None:
    append(
        events,
        (0, 0, "user_id:u1", event("a", 1)),
        (0, 1, "user_id:u2", event("a", 2)),
        (0, 2, "user_id:u2", event("z", 3)),
        (0, 3, "anonymous_id:x", event("a", 4)),
    )
    events.reassign_anchors(["a"], ["user_id:u2", "anonymous_id:x"], "b")
    found = events.events_of(["a", "b", "z"])
    assert [e.timestamp_ns for e in found["a"]] == [1]
    assert [e.timestamp_ns for e in found["b"]] == [2, 4]
    assert [e.timestamp_ns for e in found["z"]] == [3]


def test_deleting_a_profile_forgets_its_events_everywhere(events: EventStore) -> None:
    append(events, (0, 0, "user_id:a", event("a", 1)), (0, 1, "user_id:b", event("b", 2)))
    events.delete_profiles(["a"])
    assert events.events_of(["a"])["a"] == []
    assert [row[0] for row in view(events)] == ["b"]
    assert events.count() == 1
    assert events.scrub()
    assert [row[0] for row in view(events)] == ["b"]


def test_reopening_the_store_finds_its_events(stores: StoreHarness, events: EventStore) -> None:
    append(events, (0, 0, "user_id:a", event("a", 1)))
    events.close()
    again = open_events(stores)
    try:
        assert [e.timestamp_ns for e in again.events_of(["a"])["a"]] == [1]
    finally:
        again.close()


def test_the_embedded_store_discards_rows_past_the_committed_offsets(tmp_path: Any) -> None:
    store = DuckDBEventStore(tmp_path / "events.duckdb")
    append(
        store, (0, 0, "u", event("a", 1)), (0, 1, "u", event("a", 2)), (1, 0, "u", event("a", 3))
    )
    assert store.discard_uncommitted({0: 1}) == 2
    assert [e.timestamp_ns for e in store.events_of(["a"])["a"]] == [1]
    store.close()


# -- PostgreSQL: one table for every replica, in the consumer's transaction -------------------


@pytest.fixture
def postgres(postgres_server: PostgresServer, tmp_path: Path) -> Iterator[StoreHarness]:
    harness = StoreHarness("postgres", tmp_path, postgres_server.dsn)
    yield harness
    harness.close()


def test_events_commit_and_roll_back_with_the_consumers_transaction(
    postgres: StoreHarness,
) -> None:
    store = postgres.open("features")
    events = PostgresEventStore(store)
    other_replica = PostgresEventStore(postgres.open("features"))
    with store.transaction() as tx, events.within(tx):
        append(events, (0, 0, "user_id:a", event("a", 1)), (0, 1, "user_id:a", event("a", 2)))
        # Inside the transaction an unmerge reads what the batch wrote so far...
        events.reassign_anchors(["a"], ["user_id:a"], "b")
        assert [e.timestamp_ns for e in events.events_of(["b"])["b"]] == [1, 2]
        # ...which no reader sees before the commit.
        assert other_replica.count() == 0
    assert events.count() == 2

    with pytest.raises(RuntimeError), store.transaction() as tx, events.within(tx):
        append(events, (0, 2, "user_id:a", event("b", 3)))
        events.delete_profiles(["b"])
        raise RuntimeError("the batch failed")
    assert [e.timestamp_ns for e in events.events_of(["b"])["b"]] == [1, 2]
    assert events.discard_uncommitted({0: 0}) == 0
    assert events.count() == 2


def test_a_point_in_time_query_sees_the_events_every_replica_applied(
    postgres: StoreHarness,
) -> None:
    # Two replicas, each applying half of the partitions, and a third answering the query.
    replicas = [PostgresEventStore(postgres.open("features")) for _ in range(2)]
    written = history(seed=11, profiles=60)
    for offset, item in enumerate(written):
        partition = int(item.profile_id[1:]) % 4
        append(replicas[partition % 2], (partition, offset, f"user_id:{item.profile_id}", item))
    querying = PostgresEventStore(postgres.open("features"))

    groups = by_profile(written)
    as_of = (START_DAY + 150) * NS_PER_DAY
    profiles = sorted(groups)
    entity_rows = pa.table(
        {
            "profile_id": profiles,
            "event_timestamp": pa.array([as_of] * len(profiles), pa.timestamp("ns", tz="UTC")),
        }
    )
    features = feature_set()
    names = [d.name for d in features.visible]
    table = batch_point_in_time(querying, features, entity_rows, names, {})
    assert table.column("profile_id").to_pylist() == profiles
    for row in table.to_pylist():
        past = [e for e in groups[row["profile_id"]] if e.timestamp_ns <= as_of]
        expected = reference_values(past, features, as_of)
        assert_values_match(
            {name: row[name] for name in names}, expected, exact=False, where=row["profile_id"]
        )
