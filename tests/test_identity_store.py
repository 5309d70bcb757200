"""Persistence of the identity graph in its store: what is saved change by change, inside the
consumer's transaction, loads back as the same graph, which then behaves the same. Every test
runs on each store backend (SQLite and PostgreSQL, ``tests.store_backends``)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from profilemesh.services.identity.extraction import EventSummary, Evidence
from profilemesh.services.identity.graph import IdentityGraph
from profilemesh.services.identity.identifiers import Identifier
from profilemesh.services.identity.rules import (
    IdentifierRule,
    LimitPolicy,
    Rules,
    Survivorship,
    TraitRule,
)
from profilemesh.services.identity.store import GraphStore
from profilemesh.shared.errors import DomainError, FailedPrecondition
from tests.store_backends import StoreHarness
from tests.test_identity_graph import assert_consistent

RULES = Rules(
    identifier_rules=(
        IdentifierRule("user_id", 1, limit=1),
        IdentifierRule("email", 2, limit=2, on_limit=LimitPolicy.DROP_LOWEST_PRIORITY),
        IdentifierRule("device_id", 3, limit=3),
        IdentifierRule("anonymous_id", 4),
    ),
    max_profiles_per_identifier=2,
    trait_rules=(
        TraitRule("city", Survivorship.MOST_FREQUENT),
        TraitRule("name", Survivorship.SOURCE_PRIORITY, ("crm",)),
        TraitRule("signup", Survivorship.FIRST),
    ),
)


def ev(*keys: str, at: int = 0, source: str = "web", **traits: Any) -> Evidence:
    return Evidence(
        tuple(Identifier.parse(k) for k in keys), traits, source, at, message_id=f"m{at}"
    )


@contextlib.contextmanager
def transaction(connection: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield connection
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise


def database(stores: StoreHarness) -> sqlite3.Connection:
    """A fresh database with the identity tables, on the backend of ``stores``."""
    connection: sqlite3.Connection = stores.connection(GraphStore.schema())
    return connection


def save(connection: sqlite3.Connection, graph: IdentityGraph) -> None:
    with transaction(connection):
        GraphStore.save(connection, graph.drain_changes())


def profile(graph: IdentityGraph, key: str) -> str:
    found = graph.resolve(Identifier.parse(key))
    assert found is not None
    return found


def test_the_graph_saved_in_the_consumers_transaction_loads_back_identical(
    stores: StoreHarness,
) -> None:
    store = stores.open("identity")
    store.schema(GraphStore.schema())
    graph = IdentityGraph(RULES, clock=lambda: 42)
    offset = 0

    def consume() -> None:
        """What the log consumer does after each item: state and offset in one transaction."""
        nonlocal offset
        offset += 1
        with store.transaction() as tx:
            GraphStore.save(tx, graph.drain_changes())
            store.commit_offset(tx, "identity", "events", 0, offset)

    graph.link(ev("anonymous_id:a1", at=1, city="Lyon", name="Ada", signup="ads"))
    consume()
    graph.link(ev("user_id:u1", "email:e1@x.io", at=2, city="Paris", source="crm", name="Aug"))
    consume()
    assert graph.link(ev("email:e1@x.io", "anonymous_id:a1", at=3, city="Lyon")).merged
    consume()
    assert graph.link(ev("user_id:u2", "anonymous_id:a1", at=4)).refused
    consume()
    assert graph.link(ev("user_id:u3", "anonymous_id:a1", at=5)).newly_blocked
    consume()
    assert graph.link(ev("user_id:u1", "email:e2@x.io", "email:e3@x.io", at=6)).refused  # dropped
    consume()
    with pytest.raises(FailedPrecondition):
        graph.merge([profile(graph, "user_id:u2"), profile(graph, "anonymous_id:a1")], "x")
    graph.link(ev("device_id:d1", "anonymous_id:a9", at=7, signup="seo"))
    consume()
    graph.merge([profile(graph, "device_id:d1"), profile(graph, "user_id:u3")], "ticket 7")
    consume()
    graph.unmerge(profile(graph, "user_id:u1"), [Identifier.parse("email:e1@x.io")], "wrong")
    consume()

    def load(connection: sqlite3.Connection) -> IdentityGraph:
        return GraphStore.load(connection, RULES)

    loaded = store.read(load)
    assert loaded.snapshot() == graph.snapshot()
    assert store.committed("identity", "events") == {0: offset}
    for profile_id in graph.profile_ids():
        assert loaded.traits_of(profile_id) == graph.traits_of(profile_id)
        assert loaded.merges_of(profile_id) == graph.merges_of(profile_id)
    # The loaded graph carries on exactly where the saved one stopped.
    later = [
        ev("user_id:u1", "device_id:d1", at=8, city="Nice"),
        ev("email:e1@x.io", "device_id:d2", at=9),
    ]
    for evidence in later:
        assert loaded.link(evidence) == graph.link(evidence)
    assert loaded.snapshot() == graph.snapshot()


def test_nothing_is_written_when_the_callers_transaction_rolls_back(stores: StoreHarness) -> None:
    connection = database(stores)
    graph = IdentityGraph(RULES)
    graph.link(ev("user_id:u1", "anonymous_id:a1"))
    with pytest.raises(RuntimeError), transaction(connection):
        GraphStore.save(connection, graph.drain_changes())
        raise RuntimeError("the offset commit failed")
    assert len(GraphStore.load(connection, RULES)) == 0


def test_rules_are_stored_as_the_proto(stores: StoreHarness) -> None:
    connection = database(stores)
    assert GraphStore.load_rules(connection) is None
    GraphStore.save_rules(connection, RULES)
    assert GraphStore.load_rules(connection) == RULES


def summary(n: int) -> EventSummary:
    return EventSummary(f"m{n}", "track", "Viewed", n, {"n": n})


def test_recent_events_keep_the_newest_and_follow_merges_and_unmerges(
    stores: StoreHarness,
) -> None:
    connection = database(stores)
    graph = IdentityGraph(Rules())
    anonymous = graph.link(ev("anonymous_id:a1")).profile_id or ""
    known = graph.link(ev("user_id:u1")).profile_id or ""
    save(connection, graph)
    anchors = [
        (Identifier.parse("anonymous_id:a1"), anonymous),
        (Identifier.parse("user_id:u1"), known),
    ]
    for n in range(30):
        anchor, profile_id = anchors[n % 2]
        GraphStore.append_recent_event(connection, profile_id, anchor, summary(n))
    assert len(GraphStore.recent_events(connection, anonymous)) == 15
    assert GraphStore.recent_events(connection, known, limit=2) == [summary(29), summary(27)]

    graph.link(ev("user_id:u1", "anonymous_id:a1"))
    save(connection, graph)
    merged = GraphStore.recent_events(connection, anonymous, limit=100)
    assert merged == [summary(n) for n in range(29, 9, -1)]  # the newest 20 of both

    graph.unmerge(anonymous, [Identifier.parse("user_id:u1")], reason="two people")
    save(connection, graph)
    assert GraphStore.recent_events(connection, known) == [summary(n) for n in range(29, 9, -2)]

    batch = [(anonymous, anchors[0][0], summary(30)), (anonymous, anchors[0][0], summary(31))]
    GraphStore.append_recent_events(connection, batch, keep=3)
    assert GraphStore.recent_events(connection, anonymous) == [
        summary(31),
        summary(30),
        summary(28),
    ]


# -- property: any history round-trips ----------------------------------------------------------

POOL = [
    Identifier(t, f"{t[0]}{n}")
    for t, count in (("user_id", 3), ("email", 4), ("device_id", 3), ("anonymous_id", 4))
    for n in range(count)
]
link_step = st.builds(
    lambda keys, at, city, source: (
        "link",
        Evidence(tuple(keys), {"city": city, "name": city}, source, at),
    ),
    st.lists(st.sampled_from(POOL), min_size=1, max_size=3),
    st.integers(0, 20),
    st.sampled_from(["Lyon", "Paris", None]),
    st.sampled_from(["web", "crm"]),
)
manual_step = st.tuples(
    st.sampled_from(["merge", "unmerge"]), st.sampled_from(POOL), st.sampled_from(POOL)
)


@settings(
    max_examples=150,
    deadline=None,
    # ``stores`` only picks the backend; each example gets a fresh database from it.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(steps=st.lists(st.one_of(link_step, manual_step), max_size=20), save_every=st.integers(1, 4))
def test_any_history_saved_in_batches_loads_back_identical(
    stores: StoreHarness, steps: list[tuple[Any, ...]], save_every: int
) -> None:
    connection = database(stores)
    graph = IdentityGraph(RULES, clock=lambda: 1)
    for index, step in enumerate(steps):
        if step[0] == "link":
            graph.link(step[1])
        else:
            kind, a, b = step
            with contextlib.suppress(DomainError):
                if kind == "merge":
                    graph.merge([graph.resolve(a) or "", graph.resolve(b) or ""], reason="p")
                else:
                    graph.unmerge(graph.resolve(a) or "", [a], reason="p")
        if index % save_every == 0:
            save(connection, graph)
    save(connection, graph)
    assert_consistent(graph)
    assert GraphStore.load(connection, RULES).snapshot() == graph.snapshot()
