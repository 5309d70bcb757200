"""Online probabilistic matching: records that share no identifier are linked as they arrive."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest

from profilemesh.identity.v1 import matching_pb2
from profilemesh.services.identity.identifiers import Identifier
from profilemesh.services.identity.matching import DEFAULT
from profilemesh.services.identity.record_matching import (
    IncomingRecord,
    RecordMatcher,
    settings_of,
)
from tests.store_backends import StoreHarness
from tests.test_matching import precision_recall, synthetic_people


def incoming(row: dict[str, Any], founded: bool = True) -> IncomingRecord:
    attributes = {k: v for k, v in row.items() if k != "id" and v is not None}
    return IncomingRecord(Identifier("crm_id", f"crm:{row['id']}"), attributes, (), founded)


@pytest.fixture
def tx(stores: StoreHarness) -> sqlite3.Connection:
    """The matcher's tables, on each store backend in turn."""
    connection: sqlite3.Connection = stores.connection(RecordMatcher.schema())
    return connection


def test_matching_is_off_unless_the_rules_enable_it() -> None:
    assert settings_of(None) is None
    assert settings_of(matching_pb2.MatchingSettings(enabled=False)) is None
    enabled = settings_of(matching_pb2.MatchingSettings(enabled=True, match_threshold=0.9))
    assert enabled is not None
    assert enabled.comparisons == DEFAULT.comparisons
    assert enabled.match_threshold == 0.9


def test_no_model_no_matches_until_enough_records(tx: sqlite3.Connection) -> None:
    rows, _ = synthetic_people(seed=3, people=30)
    matcher = RecordMatcher(min_records=1000)
    records = [incoming(row) for row in rows]
    matcher.store(tx, records, DEFAULT)
    assert matcher.refit_if_due(tx, DEFAULT) == []
    assert matcher.model is None
    assert matcher.match(tx, records, DEFAULT) == []


def test_records_arriving_after_the_fit_find_their_duplicates(tx: sqlite3.Connection) -> None:
    rows, truth = synthetic_people(seed=5, people=500)
    half = len(rows) // 2
    matcher = RecordMatcher(min_records=half)
    first = [incoming(row) for row in rows[:half]]
    matcher.store(tx, first, DEFAULT)
    initial = matcher.refit_if_due(tx, DEFAULT)
    model = matcher.model
    assert model is not None and model.records == half
    # Every level's m and u is fixed in the fitted settings, and lambda is set.
    assert all(
        level.m_probability is not None and level.u_probability is not None
        for comparison in model.settings.comparisons
        for level in comparison.levels
    )
    assert model.settings.probability_two_random_records_match is not None
    found = {frozenset((m.anchor.value[4:], m.other.value[4:])) for m in initial}

    # The rest arrive a few at a time, as log batches do.
    later = rows[half:]
    for start in range(0, len(later), 25):
        batch = [incoming(row) for row in later[start : start + 25]]
        matcher.store(tx, batch, DEFAULT)
        for match in matcher.match(tx, batch, DEFAULT):
            assert match.probability >= DEFAULT.match_threshold
            assert match.anchor in {r.anchor for r in batch}
            found.add(frozenset((match.anchor.value[4:], match.other.value[4:])))

    # Best match per record links each record to one other; the clusters are what count.
    ids = [row["id"] for row in rows]
    parent = {i: i for i in ids}

    def root(i: str) -> str:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for pair in found:
        a, b = tuple(pair)
        parent[root(a)] = root(b)
    clustered = {frozenset((a, b)) for a in ids for b in ids if a < b and root(a) == root(b)}
    precision, recall = precision_recall(clustered, truth)
    assert precision > 0.9, precision
    assert recall > 0.85, recall


def test_a_record_stored_again_replaces_its_blocking_keys(tx: sqlite3.Connection) -> None:
    matcher = RecordMatcher()
    row = {"id": "1", "first_name": "ada", "last_name": "lovelace", "dob": "1815-12-10"}
    matcher.store(tx, [incoming(row)], DEFAULT)
    before = set(tx.execute("SELECT rule, side, key FROM match_blocks"))
    matcher.store(tx, [incoming({**row, "last_name": "byron"})], DEFAULT)
    after = set(tx.execute("SELECT rule, side, key FROM match_blocks"))
    assert tx.execute("SELECT count(*) FROM match_records").fetchone()[0] == 1
    assert before != after
    assert not any("lovelace" in key or "L142" in key for _, _, key in after)


def test_the_model_survives_a_reload(tx: sqlite3.Connection) -> None:
    rows, _ = synthetic_people(seed=8, people=120)
    matcher = RecordMatcher(min_records=50)
    matcher.store(tx, [incoming(row) for row in rows], DEFAULT)
    matcher.refit_if_due(tx, DEFAULT)
    assert matcher.model is not None
    reloaded = RecordMatcher(min_records=50)
    reloaded.load(tx)
    assert reloaded.model == matcher.model
    # Not due again until the records double.
    assert reloaded.refit_if_due(tx, DEFAULT) == []
