"""Segments and their members: which profiles belong, since when, and what changed.

Each segment's expression is compiled once (:mod:`.segment_expressions`); membership is kept
in memory (segment -> profile -> entry time) and in the store, with a history row per
transition. :meth:`SegmentBook.evaluate` compares what the expressions say now with what the
members are, and records the difference as transitions, in the caller's transaction.

The catalog an expression was checked against at creation (feature types, model and
clustering names) is stored with it, so that a restart compiles it again without asking the
other services.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from profilemesh.activation.v1 import activation_log_pb2, segment_pb2
from profilemesh.services.activation.profile_view import ProfileView
from profilemesh.services.activation.segment_expressions import (
    Catalog,
    SegmentExpression,
    parse_segment,
)
from profilemesh.shared.errors import NotFound

ENTERED = activation_log_pb2.TRANSITION_ENTERED
EXITED = activation_log_pb2.TRANSITION_EXITED


@dataclass(frozen=True, slots=True)
class Transition:
    """A profile entered or left a segment; ``seq`` numbers it in the membership history."""

    seq: int
    profile_id: str
    segment_id: str
    transition: int
    occurred_at: int
    message_id: str = ""

    def to_proto(self) -> activation_log_pb2.MembershipChanged:
        message = activation_log_pb2.MembershipChanged(
            profile_id=self.profile_id,
            segment_id=self.segment_id,
            transition=self.transition,  # type: ignore[arg-type]
            message_id=self.message_id,
        )
        message.occurred_at.FromNanoseconds(self.occurred_at)
        return message


def catalog_to_json(catalog: Catalog) -> str:
    return json.dumps(
        {
            "features": dict(catalog.features),
            "models": sorted(catalog.models),
            "clusterings": sorted(catalog.clusterings),
        }
    )


def catalog_from_json(text: str) -> Catalog:
    data = json.loads(text)
    return Catalog(
        features=data["features"],
        models=frozenset(data["models"]),
        clusterings=frozenset(data["clusterings"]),
    )


class SegmentBook:
    """Segments with compiled expressions and their current members."""

    def __init__(self) -> None:
        self.segments: dict[str, segment_pb2.Segment] = {}
        self.expressions: dict[str, SegmentExpression] = {}
        self.catalogs: dict[str, Catalog] = {}
        self.members: dict[str, dict[str, int]] = {}
        self._seq = 0

    def load(self, connection: sqlite3.Connection) -> None:
        for blob, catalog in connection.execute("SELECT segment, catalog FROM segments"):
            segment = segment_pb2.Segment.FromString(blob)
            known = catalog_from_json(catalog)
            self._install(segment, parse_segment(segment.expression, known), known)
        for segment_id, profile_id, entered_at in connection.execute(
            "SELECT segment_id, profile_id, entered_at FROM memberships"
        ):
            self.members.setdefault(segment_id, {})[profile_id] = entered_at
        [(seq,)] = connection.execute(
            "SELECT coalesce(max(seq), 0) FROM membership_history"
        ).fetchall()
        self._seq = int(seq)

    def _install(
        self, segment: segment_pb2.Segment, expression: SegmentExpression, catalog: Catalog
    ) -> None:
        self.segments[segment.segment_id] = segment
        self.expressions[segment.segment_id] = expression
        self.catalogs[segment.segment_id] = catalog
        self.members.setdefault(segment.segment_id, {})

    def get(self, segment_id: str) -> segment_pb2.Segment:
        segment = self.segments.get(segment_id)
        if segment is None:
            raise NotFound(f"no segment {segment_id!r}", violations=[("segment_id", "unknown")])
        copy = segment_pb2.Segment()
        copy.CopyFrom(segment)
        copy.member_count = len(self.members.get(segment_id, {}))
        return copy

    def save(
        self,
        tx: sqlite3.Connection,
        segment: segment_pb2.Segment,
        expression: SegmentExpression,
        catalog: Catalog,
    ) -> None:
        """Store a new or changed segment (its members are reconciled by an evaluation)."""
        tx.execute(
            "INSERT OR REPLACE INTO segments (segment_id, segment, catalog) VALUES (?, ?, ?)",
            (segment.segment_id, segment.SerializeToString(), catalog_to_json(catalog)),
        )
        self._install(segment, expression, catalog)

    def delete(self, tx: sqlite3.Connection, segment_id: str) -> None:
        self.get(segment_id)
        tx.execute("DELETE FROM segments WHERE segment_id = ?", (segment_id,))
        tx.execute("DELETE FROM memberships WHERE segment_id = ?", (segment_id,))
        del self.segments[segment_id], self.expressions[segment_id], self.catalogs[segment_id]
        self.members.pop(segment_id, None)

    # -- membership ---------------------------------------------------------------------------

    def memberships_of(self, profile_id: str) -> list[tuple[str, int]]:
        """(segment id, entry time) of every segment the profile is in, oldest entry first."""
        found = [
            (segment_id, members[profile_id])
            for segment_id, members in self.members.items()
            if profile_id in members
        ]
        return sorted(found, key=lambda item: item[1])

    def evaluate(
        self,
        tx: sqlite3.Connection,
        profiles: Iterable[tuple[str, ProfileView | None]],
        *,
        segment_ids: Sequence[str] | None = None,
        message_ids: dict[str, str] | None = None,
        now_ns: int | None = None,
    ) -> list[Transition]:
        """Evaluate ``profiles`` (a view of None: the profile is gone) against the segments
        and record every change of membership; the transitions, in order."""
        now = time.time_ns() if now_ns is None else now_ns
        ids = list(self.expressions) if segment_ids is None else list(segment_ids)
        message_ids = message_ids or {}
        transitions: list[Transition] = []
        for profile_id, view in profiles:
            for segment_id in ids:
                members = self.members[segment_id]
                member = view is not None and self.expressions[segment_id].matches(view)
                was = profile_id in members
                if member == was:
                    continue
                self._seq += 1
                change = Transition(
                    self._seq,
                    profile_id,
                    segment_id,
                    ENTERED if member else EXITED,
                    now,
                    message_ids.get(profile_id, ""),
                )
                transitions.append(change)
                if member:
                    members[profile_id] = now
                else:
                    del members[profile_id]
        self._record(tx, transitions)
        return transitions

    def forget(self, tx: sqlite3.Connection, profile_id: str) -> None:
        """Drop a profile's memberships without transitions (merged away or deleted: it never
        left, and a deleted person must not be messaged about leaving)."""
        for members in self.members.values():
            members.pop(profile_id, None)
        tx.execute("DELETE FROM memberships WHERE profile_id = ?", (profile_id,))

    def erase(self, tx: sqlite3.Connection, profile_id: str) -> None:
        """A deleted person: their memberships and their membership history go."""
        self.forget(tx, profile_id)
        tx.execute("DELETE FROM membership_history WHERE profile_id = ?", (profile_id,))

    def _record(self, tx: sqlite3.Connection, transitions: Sequence[Transition]) -> None:
        tx.executemany(
            "INSERT INTO membership_history"
            " (seq, profile_id, segment_id, transition, occurred_at, message_id)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [
                (t.seq, t.profile_id, t.segment_id, t.transition, t.occurred_at, t.message_id)
                for t in transitions
            ],
        )
        for t in transitions:
            if t.transition == ENTERED:
                tx.execute(
                    "INSERT OR REPLACE INTO memberships VALUES (?, ?, ?)",
                    (t.segment_id, t.profile_id, t.occurred_at),
                )
            else:
                tx.execute(
                    "DELETE FROM memberships WHERE segment_id = ? AND profile_id = ?",
                    (t.segment_id, t.profile_id),
                )


def history(
    connection: sqlite3.Connection,
    *,
    profile_id: str = "",
    segment_id: str = "",
    start_ns: int = 0,
    end_ns: int = 0,
    after_seq: int = 0,
    limit: int = 100,
) -> list[tuple[Any, ...]]:
    """Rows of the membership history, oldest first, after ``after_seq``."""
    query = (
        "SELECT seq, profile_id, segment_id, transition, occurred_at, message_id"
        " FROM membership_history WHERE seq > ?"
    )
    arguments: list[Any] = [after_seq]
    for column, value in (("profile_id", profile_id), ("segment_id", segment_id)):
        if value:
            query += f" AND {column} = ?"
            arguments.append(value)
    if start_ns:
        query += " AND occurred_at >= ?"
        arguments.append(start_ns)
    if end_ns:
        query += " AND occurred_at < ?"
        arguments.append(end_ns)
    query += " ORDER BY seq LIMIT ?"
    arguments.append(limit)
    return connection.execute(query, arguments).fetchall()
