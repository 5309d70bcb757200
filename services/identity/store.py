"""SQLite persistence of the identity graph, its traits and each profile's recent events.

The graph lives in memory; the store keeps what is needed to rebuild it at start-up. Writes are
incremental: :meth:`GraphStore.save` writes one :class:`~.graph.ChangeSet` through a connection
whose transaction the caller opened and commits, so that the log consumer commits the graph
and its offset in the ``events`` log together (effectively once).

Recent events are not keyed by profile but by the item's *anchor* identifier; a profile's
recent events are those of its identifiers' anchors. A merge or an unmerge therefore moves
them without a write: they follow the identifiers.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from typing import Any

from profilemesh.identity.v1 import identity_rules_pb2
from profilemesh.services.identity.extraction import EventSummary
from profilemesh.services.identity.graph import (
    ChangeSet,
    Counters,
    Erasure,
    EvidenceRef,
    GraphSnapshot,
    IdentityGraph,
    Link,
    MergeOrigin,
    MergeRecord,
)
from profilemesh.services.identity.identifiers import Identifier
from profilemesh.services.identity.rules import Rules
from profilemesh.services.identity.traits import States, TraitState

RECENT_EVENTS = 20
"""Recent events kept per profile."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS identity_nodes (
    identifier TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    profile_id TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS identity_nodes_by_profile ON identity_nodes (profile_id);
CREATE TABLE IF NOT EXISTS identity_profiles (
    profile_id TEXT PRIMARY KEY,
    founder TEXT NOT NULL,
    seq INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS identity_links (
    link_id INTEGER PRIMARY KEY,
    identifiers TEXT NOT NULL,
    origin TEXT NOT NULL,
    evidence TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS identity_merges (
    merge_id TEXT PRIMARY KEY,
    record TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS identity_blocked (
    identifier TEXT PRIMARY KEY
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS identity_refusals (
    identifier TEXT NOT NULL,
    profile_id TEXT NOT NULL,
    PRIMARY KEY (identifier, profile_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS identity_traits (
    anchor TEXT PRIMARY KEY,
    states TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS identity_counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS identity_rules (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    rules BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS identity_recent_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    anchor TEXT NOT NULL,
    message_id TEXT NOT NULL,
    type TEXT NOT NULL,
    name TEXT NOT NULL,
    occurred_at INTEGER NOT NULL,
    properties TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS identity_recent_events_by_anchor
    ON identity_recent_events (anchor, occurred_at);
"""

_COUNTERS = ("node_seq", "profile_seq", "link_id", "merge_seq", "trait_seq")

# The recent events of one profile, newest first: those of every identifier of the profile.
_RECENT_OF_PROFILE = """
SELECT e.id, e.message_id, e.type, e.name, e.occurred_at, e.properties
FROM identity_nodes AS n JOIN identity_recent_events AS e ON e.anchor = n.identifier
WHERE n.profile_id = ?
ORDER BY e.occurred_at DESC, e.id DESC
"""


class GraphStore:
    """Reads and writes the identity tables through a caller's SQLite connection.

    Stateless: every method takes the connection, so the same store serves the consumer's
    write transaction and the servicer's reads.
    """

    @staticmethod
    def schema() -> str:
        """The ``CREATE ... IF NOT EXISTS`` statements of every identity table."""
        return _SCHEMA

    @staticmethod
    def save(connection: sqlite3.Connection, changes: ChangeSet) -> None:
        """Write ``changes`` inside the caller's open transaction (the caller commits)."""
        execute = connection.executemany
        execute(
            "INSERT INTO identity_nodes (identifier, seq, profile_id) VALUES (?, ?, ?)"
            " ON CONFLICT (identifier) DO UPDATE SET profile_id = excluded.profile_id",
            [(i.key, seq, profile_id) for i, seq, profile_id in changes.nodes],
        )
        execute(
            "INSERT OR IGNORE INTO identity_profiles (profile_id, founder, seq) VALUES (?, ?, ?)",
            [(profile_id, founder.key, seq) for profile_id, founder, seq in changes.profiles],
        )
        execute(
            "INSERT OR REPLACE INTO identity_links (link_id, identifiers, origin, evidence, reason)"
            " VALUES (?, ?, ?, ?, ?)",
            [_link_row(link) for link in changes.links],
        )
        execute(
            "DELETE FROM identity_links WHERE link_id = ?",
            [(link_id,) for link_id in changes.removed_links],
        )
        execute(
            "INSERT OR IGNORE INTO identity_merges (merge_id, record) VALUES (?, ?)",
            [(r.merge_id, json.dumps(r.to_json())) for r in changes.merges],
        )
        execute(
            "INSERT OR IGNORE INTO identity_blocked (identifier) VALUES (?)",
            [(i.key,) for i in changes.blocked],
        )
        execute(
            "INSERT OR IGNORE INTO identity_refusals (identifier, profile_id) VALUES (?, ?)",
            [(i.key, profile_id) for i, profile_id in changes.refusals],
        )
        execute(
            "INSERT OR REPLACE INTO identity_traits (anchor, states) VALUES (?, ?)",
            [(anchor.key, _states_json(states)) for anchor, states in changes.traits],
        )
        if changes.erased:
            _erase(connection, changes.erased)
        counters = changes.counters
        execute(
            "INSERT OR REPLACE INTO identity_counters (name, value) VALUES (?, ?)",
            [(name, getattr(counters, name)) for name in _COUNTERS],
        )
        # A merge puts several profiles' recent events together: keep the ring bounded.
        for record in changes.merges:
            if record.surviving_profile_id:
                _trim(connection, record.surviving_profile_id, RECENT_EVENTS)

    @staticmethod
    def load(connection: sqlite3.Connection, rules: Rules) -> IdentityGraph:
        """The whole graph as saved, with its traits, ready to link more items."""
        return IdentityGraph.from_snapshot(rules, GraphStore.load_snapshot(connection))

    @staticmethod
    def load_snapshot(connection: sqlite3.Connection) -> GraphSnapshot:
        """The saved state as a :class:`~.graph.GraphSnapshot`."""
        parse = Identifier.parse
        nodes = {
            parse(key): (int(seq), str(profile_id))
            for key, seq, profile_id in connection.execute(
                "SELECT identifier, seq, profile_id FROM identity_nodes"
            )
        }
        profiles = {
            str(profile_id): (parse(founder), int(seq))
            for profile_id, founder, seq in connection.execute(
                "SELECT profile_id, founder, seq FROM identity_profiles"
            )
        }
        links = {
            int(row[0]): _link(row)
            for row in connection.execute(
                "SELECT link_id, identifiers, origin, evidence, reason FROM identity_links"
            )
        }
        merges = tuple(
            MergeRecord.from_json(json.loads(record))
            for (record,) in connection.execute(
                "SELECT record FROM identity_merges ORDER BY merge_id"
            )
        )
        blocked = frozenset(
            parse(key) for (key,) in connection.execute("SELECT identifier FROM identity_blocked")
        )
        refusals: dict[Identifier, set[str]] = {}
        for key, profile_id in connection.execute(
            "SELECT identifier, profile_id FROM identity_refusals"
        ):
            refusals.setdefault(parse(key), set()).add(str(profile_id))
        traits = {
            parse(anchor): _states(text)
            for anchor, text in connection.execute("SELECT anchor, states FROM identity_traits")
        }
        stored = dict(connection.execute("SELECT name, value FROM identity_counters").fetchall())
        counters = Counters(**{name: int(stored.get(name, 0)) for name in _COUNTERS})
        return GraphSnapshot(
            nodes=nodes,
            profiles=profiles,
            links=links,
            merges=merges,
            blocked=blocked,
            refusals={i: frozenset(p) for i, p in refusals.items()},
            traits=traits,
            counters=counters,
        )

    # -- rules -------------------------------------------------------------------------------

    @staticmethod
    def save_rules(connection: sqlite3.Connection, rules: Rules) -> None:
        """Store the rules (inside the caller's transaction)."""
        connection.execute(
            "INSERT OR REPLACE INTO identity_rules (id, rules) VALUES (1, ?)",
            (rules.to_proto().SerializeToString(),),
        )

    @staticmethod
    def load_rules(connection: sqlite3.Connection) -> Rules | None:
        """The stored rules, or None when none were ever stored."""
        row = connection.execute("SELECT rules FROM identity_rules WHERE id = 1").fetchone()
        if row is None:
            return None
        return Rules.from_proto(identity_rules_pb2.IdentityRules.FromString(row[0]))

    # -- recent events -----------------------------------------------------------------------

    @staticmethod
    def append_recent_events(
        connection: sqlite3.Connection,
        entries: Iterable[tuple[str, Identifier, EventSummary]],
        *,
        keep: int = RECENT_EVENTS,
    ) -> None:
        """Add items to their profiles' recent events, then forget each profile's oldest beyond
        ``keep`` (once per profile: a batch of a consumer's items trims each profile once).

        Each entry is ``(profile_id, anchor, summary)`` with ``anchor`` the item's anchor
        identifier (``LinkOutcome.anchor``), already saved as a node of ``profile_id``: call
        :meth:`save` first, in the same transaction.
        """
        rows: list[tuple[str, str, str, str, int, str]] = []
        profiles: dict[str, None] = {}
        for profile_id, anchor, summary in entries:
            profiles[profile_id] = None
            rows.append(
                (
                    anchor.key,
                    summary.message_id,
                    summary.type,
                    summary.name,
                    summary.occurred_at,
                    json.dumps(summary.properties, separators=(",", ":")),
                )
            )
        connection.executemany(
            "INSERT INTO identity_recent_events"
            " (anchor, message_id, type, name, occurred_at, properties)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )
        for profile_id in profiles:
            _trim(connection, profile_id, keep)

    @staticmethod
    def append_recent_event(
        connection: sqlite3.Connection,
        profile_id: str,
        anchor: Identifier,
        summary: EventSummary,
        *,
        keep: int = RECENT_EVENTS,
    ) -> None:
        """Add one item to its profile's recent events (see :meth:`append_recent_events`)."""
        GraphStore.append_recent_events(connection, [(profile_id, anchor, summary)], keep=keep)

    @staticmethod
    def recent_events(
        connection: sqlite3.Connection, profile_id: str, limit: int = RECENT_EVENTS
    ) -> list[EventSummary]:
        """The profile's most recent events, newest first. ``profile_id`` must be live (see
        ``IdentityGraph.canonical``)."""
        rows = connection.execute(f"{_RECENT_OF_PROFILE} LIMIT ?", (profile_id, limit))
        return [
            EventSummary(message_id, type_, name, int(occurred_at), json.loads(properties))
            for _, message_id, type_, name, occurred_at, properties in rows
        ]


def _erase(connection: sqlite3.Connection, erased: Erasure) -> None:
    """Remove every row of deleted people (their links went with ``removed_links``)."""
    execute = connection.executemany
    keys = [(i.key,) for i in erased.identifiers]
    ids = [(p,) for p in erased.profile_ids]
    execute("DELETE FROM identity_nodes WHERE identifier = ?", keys)
    execute("DELETE FROM identity_traits WHERE anchor = ?", keys)
    execute("DELETE FROM identity_blocked WHERE identifier = ?", keys)
    execute("DELETE FROM identity_refusals WHERE identifier = ?", keys)
    execute("DELETE FROM identity_recent_events WHERE anchor = ?", keys)
    execute("DELETE FROM identity_profiles WHERE profile_id = ?", ids)
    execute("DELETE FROM identity_refusals WHERE profile_id = ?", ids)
    execute("DELETE FROM identity_merges WHERE merge_id = ?", [(m,) for m in erased.merge_ids])


def _trim(connection: sqlite3.Connection, profile_id: str, keep: int) -> None:
    connection.execute(
        "DELETE FROM identity_recent_events WHERE id IN"
        f" (SELECT id FROM ({_RECENT_OF_PROFILE} LIMIT -1 OFFSET ?))",
        (profile_id, keep),
    )


def _link_row(link: Link) -> tuple[int, str, str, str, str]:
    evidence = link.evidence
    return (
        link.link_id,
        json.dumps([i.key for i in link.identifiers]),
        link.origin.value,
        json.dumps(
            [
                evidence.source,
                evidence.message_id,
                evidence.record_id,
                evidence.match_probability,
                evidence.seen_at,
            ]
        ),
        link.reason,
    )


def _link(row: Iterable[Any]) -> Link:
    link_id, identifiers, origin, evidence, reason = row
    source, message_id, record_id, probability, seen_at = json.loads(evidence)
    return Link(
        link_id=int(link_id),
        identifiers=tuple(Identifier.parse(key) for key in json.loads(identifiers)),
        origin=MergeOrigin(origin),
        evidence=EvidenceRef(source, message_id, record_id, float(probability), int(seen_at)),
        reason=str(reason),
    )


def _states_json(states: States) -> str:
    return json.dumps({name: state.to_json() for name, state in states.items()})


def _states(text: str) -> States:
    return {name: TraitState.from_json(document) for name, document in json.loads(text).items()}
