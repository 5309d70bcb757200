"""Identity's part of privacy, as units: deleting a person from the graph and its store,
consent decisions that follow identifiers, the hashed suppression list, and the deletion
job's bookkeeping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from profilemesh.common.v1 import job_pb2
from profilemesh.services.identity import consent, deletions
from profilemesh.services.identity.consent import ConsentBook
from profilemesh.services.identity.graph import IdentityGraph, MergeKind
from profilemesh.services.identity.identifiers import Identifier
from profilemesh.services.identity.store import GraphStore
from profilemesh.services.identity.suppression import SCHEMA, SuppressionList, digest
from profilemesh.shared.errors import NotFound
from profilemesh.shared.log.api import RecordBatch
from profilemesh.shared.log.sqlite_store import SqliteConsumerStore
from tests.store_backends import StoreHarness
from tests.test_identity_graph import assert_consistent
from tests.test_identity_store import RULES, ev, profile


def _history(graph: IdentityGraph) -> None:
    graph.link(ev("anonymous_id:a1", at=1, city="Lyon", name="Ada"))
    graph.link(ev("user_id:u1", "email:ada@x.io", at=2, city="Paris", source="crm"))
    graph.link(ev("email:ada@x.io", "anonymous_id:a1", at=3))  # merges the two
    graph.link(ev("user_id:u2", "anonymous_id:a1", at=4))  # refused on Ada's profile
    graph.link(ev("user_id:u9", "email:bob@x.io", at=5, city="Oslo"))


def test_deleting_a_person_removes_every_trace_from_the_graph_and_its_store(
    tmp_path: Path,
) -> None:
    store = SqliteConsumerStore(tmp_path / "identity.sqlite")
    store.schema(GraphStore.schema())
    graph = IdentityGraph(RULES, clock=lambda: 42)
    _history(graph)
    with store.transaction() as tx:
        GraphStore.save(tx, graph.drain_changes())
    ada = profile(graph, "email:ada@x.io")
    merges = [m for m in graph.merges_of(ada) if m.kind is MergeKind.MERGE]
    retired = {r for m in merges for r in m.merged_profile_ids}
    assert retired

    outcome = graph.delete(retired.pop())  # a retired id addresses the live profile too
    with store.transaction() as tx:
        GraphStore.save(tx, graph.drain_changes())

    assert outcome.profile_id == ada
    assert {i.key for i in outcome.identifiers} == {
        "anonymous_id:a1",
        "user_id:u1",
        "email:ada@x.io",
    }
    for key in ("anonymous_id:a1", "user_id:u1", "email:ada@x.io"):
        assert graph.resolve(Identifier.parse(key)) is None
    for profile_id in outcome.profile_ids:
        assert graph.canonical(profile_id) is None
    assert all(ada not in {*m.profile_ids, *m.resulting_profile_ids} for m in graph.merges())
    assert_consistent(graph)
    bob = profile(graph, "email:bob@x.io")
    assert graph.traits_of(bob) == {"city": "Oslo"}
    # What is stored is exactly what is in memory, and nothing of Ada is in the file.
    assert store.read(lambda c: GraphStore.load(c, RULES)).snapshot() == graph.snapshot()
    assert store.scrub()
    store.close()
    data = (tmp_path / "identity.sqlite").read_bytes()
    assert b"ada@x.io" not in data and b"u1" not in data and b"Paris" not in data
    assert b"bob@x.io" in data
    with pytest.raises(NotFound):
        graph.delete(ada)


def test_a_deleted_person_who_comes_back_starts_a_new_profile() -> None:
    graph = IdentityGraph(RULES)
    _history(graph)
    graph.delete(profile(graph, "user_id:u1"))
    again = graph.link(ev("user_id:u1", at=9, city="Rome"))
    assert again.created and graph.traits_of(again.profile_id or "") == {"city": "Rome"}


def _book(graph: IdentityGraph) -> ConsentBook:
    return ConsentBook(graph.identifiers_of)


def test_the_latest_consent_decision_per_purpose_wins_and_older_ones_are_ignored() -> None:
    graph = IdentityGraph(RULES)
    graph.link(ev("user_id:u1", "email:ada@x.io", at=1))
    ada = profile(graph, "user_id:u1")
    book = _book(graph)
    anchor = Identifier.parse("user_id:u1")
    assert book.observe(ada, anchor, {"email": True, "sms": False}, "web", 100) == ("email", "sms")
    assert book.observe(ada, anchor, {"email": False}, "api", 50) == ()  # older: ignored
    assert book.observe(ada, anchor, {"email": False}, "api", 200) == ("email",)
    states = {s.purpose: s for s in book.states(ada)}
    assert not states["email"].granted and states["email"].source == "api"
    assert states["email"].updated_at.ToNanoseconds() == 200
    assert not states["sms"].granted and states["sms"].source == "web"


def test_consent_follows_identifiers_through_merges_and_is_stored_by_anchor(
    stores: StoreHarness,
) -> None:
    graph = IdentityGraph(RULES)
    graph.link(ev("user_id:u1", at=1))
    graph.link(ev("anonymous_id:a1", at=2))
    book = _book(graph)
    book.observe(
        profile(graph, "user_id:u1"), Identifier.parse("user_id:u1"), {"email": True}, "web", 10
    )
    book.observe(
        profile(graph, "anonymous_id:a1"),
        Identifier.parse("anonymous_id:a1"),
        {"ads": True},
        "web",
        20,
    )
    graph.link(ev("user_id:u1", "anonymous_id:a1", at=3))
    merged = profile(graph, "user_id:u1")
    assert [s.purpose for s in book.states(merged)] == ["ads", "email"]
    connection = stores.connection(consent.SCHEMA)
    consent.save(connection, book.drain_dirty())
    reloaded = _book(graph)
    reloaded.restore(consent.load(connection))
    assert reloaded.states(merged) == book.states(merged)
    consent.erase(connection, [Identifier.parse("user_id:u1")])
    reloaded = _book(graph)
    reloaded.restore(consent.load(connection))
    assert [s.purpose for s in reloaded.states(merged)] == ["ads"]


def test_consent_decisions_come_from_the_consent_trait_only_when_boolean() -> None:
    traits: dict[str, Any] = {"consent": {"email": True, "sms": "yes", "ads": False}, "x": 1}
    assert consent.decisions_in(traits) == {"email": True, "ads": False}
    assert consent.decisions_in({"consent": "all"}) == {}


def test_the_suppression_list_keeps_digests_only(stores: StoreHarness) -> None:
    connection = stores.connection(SCHEMA)
    suppressions = SuppressionList()
    email = Identifier.parse("email:ada@x.io")
    assert not suppressions.any_suppressed([email])
    suppressions.add(connection, [email], "deleted")
    suppressions.apply(added=[email])
    assert suppressions.any_suppressed([Identifier.parse("user_id:u7"), email])
    rows = connection.execute("SELECT * FROM identity_suppressions").fetchall()
    assert rows[0][0] == digest(email) and "ada" not in repr(rows)
    reloaded = SuppressionList()
    reloaded.load(connection)
    assert reloaded.any_suppressed([email])
    assert suppressions.remove(connection, [email, Identifier.parse("email:b@x.io")]) == 1
    suppressions.apply(removed=[email])
    assert not suppressions.any_suppressed([email])


def test_a_job_succeeds_once_every_service_reported_and_repeated_reports_change_nothing(
    stores: StoreHarness,
) -> None:
    connection = stores.connection(deletions.SCHEMA)
    job = deletions.new_job("p_1", "ticket 9", suppressed=True)
    deletions.create(connection, job, [Identifier.parse("email:ada@x.io")], ["p_1"])
    for service in ("ingestion", "identity", "features", "scoring"):
        after = deletions.report(connection, job.job_id, service, deletions.SUCCEEDED)
        assert after is not None and after.state == job_pb2.JOB_STATE_RUNNING
    after = deletions.report(connection, job.job_id, "features", deletions.FAILED, "late")
    assert after is not None and after.state == job_pb2.JOB_STATE_RUNNING
    after = deletions.report(connection, job.job_id, "activation", deletions.SUCCEEDED)
    assert after is not None and after.state == job_pb2.JOB_STATE_SUCCEEDED
    assert after.HasField("finished_at") and not after.error
    assert deletions.report(connection, "del_unknown", "features", deletions.SUCCEEDED) is None


def test_redaction_selects_the_persons_entries_but_never_the_deletion_itself() -> None:
    from profilemesh.services.identity import messages
    from profilemesh.services.identity.resolver import entry_bytes

    entries = [
        ("p_ada", entry_bytes(messages.traits_entry("p_ada", {"city": "Lyon"}, ["city"], 1))),
        ("p_bob", entry_bytes(messages.traits_entry("p_bob", {"friend": "ada@x.io"}, ["x"], 1))),
        ("p_bob", entry_bytes(messages.traits_entry("p_bob", {"city": "Oslo"}, ["city"], 1))),
        ("p_ada", entry_bytes(messages.deletion_entry("p_ada", "del_1", 2))),
    ]
    batch = RecordBatch(
        partition=0,
        base_offset=0,
        append_time_ns=0,
        keys=[k for k, _ in entries],
        payload_sizes=[len(p) for _, p in entries],
        payloads=b"".join(p for _, p in entries),
    )
    select = deletions._selector({"p_ada"}, [b"ada@x.io"])
    assert select(0, batch) == [True, True, False, False]
