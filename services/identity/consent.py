"""Consent per purpose, a first-class part of the profile: who may be contacted for what.

A decision is ``(purpose, granted, updated_at, source)``; the latest decision per purpose wins,
and a decision older than the one stored is ignored (a replayed or late event cannot undo a
withdrawal). Decisions arrive from ``UpdateConsent`` and from items whose traits carry a
``consent`` object (``{"email": true, "sms": false}``), dated by the item.

They are kept like traits (see :mod:`.traits`): per anchor identifier, in mergeable states,
so that a merge combines two people's decisions and an unmerge gives each part the decisions
made through its own identifiers, without bookkeeping.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from google.protobuf import timestamp_pb2

from profilemesh.common.v1 import profile_pb2
from profilemesh.services.identity.identifiers import Identifier
from profilemesh.services.identity.rules import Rules
from profilemesh.services.identity.traits import States, TraitBook, TraitState, changed_names

SCHEMA = """
CREATE TABLE IF NOT EXISTS identity_consent (
    anchor TEXT PRIMARY KEY,
    decisions TEXT NOT NULL
) WITHOUT ROWID;
"""

CONSENT_TRAIT = "consent"
"""The trait that carries consent decisions in events and records."""


class ConsentBook:
    """The consent decisions of every anchor identifier; a profile's combine its members'."""

    def __init__(self, members_of: Callable[[str], Iterable[Identifier]]) -> None:
        # Default rules: every purpose is LATEST, whatever the trait rules say of a trait
        # that happens to share a purpose's name.
        self._book = TraitBook(Rules(), members_of)

    def observe(
        self,
        profile_id: str,
        anchor: Identifier,
        decisions: Mapping[str, bool],
        source: str,
        occurred_at: int,
    ) -> tuple[str, ...]:
        """Record decisions made through ``anchor``; the purposes whose decision changed."""
        if not decisions:
            return ()
        before = self._decisions(profile_id, decisions)
        self._book.observe(profile_id, anchor, decisions, source, occurred_at)
        return changed_names(before, self._decisions(profile_id, decisions))

    def states(
        self, profile_id: str, purposes: Iterable[str] | None = None
    ) -> list[profile_pb2.ConsentState]:
        """The profile's decisions (all, or those about ``purposes``), ordered by purpose."""
        combined = self._book.combined(profile_id, purposes)
        return [_state(purpose, combined[purpose]) for purpose in sorted(combined)]

    def forget(self, anchors: Iterable[Identifier]) -> None:
        """Drop a deleted person's decisions."""
        self._book.forget(anchors)

    def drain_dirty(self) -> list[tuple[Identifier, States]]:
        """The anchors whose decisions changed since the last call (what to persist)."""
        return self._book.drain_dirty()

    def restore(self, anchors: Mapping[Identifier, States]) -> None:
        """Load the stored decisions."""
        self._book.restore(anchors, 0)

    def _decisions(self, profile_id: str, purposes: Iterable[str]) -> dict[str, Any]:
        return {
            purpose: (state.latest[3], state.latest[0])
            for purpose, state in self._book.combined(profile_id, purposes).items()
        }


def decisions_in(traits: Mapping[str, Any]) -> dict[str, bool]:
    """The consent decisions an item's traits carry: ``consent.<purpose>`` booleans."""
    consent = traits.get(CONSENT_TRAIT)
    if not isinstance(consent, Mapping):
        return {}
    return {
        str(purpose): granted
        for purpose, granted in consent.items()
        if isinstance(granted, bool) and str(purpose)
    }


def _state(purpose: str, state: Any) -> profile_pb2.ConsentState:
    occurred_at, _, source, granted = state.latest
    updated_at = timestamp_pb2.Timestamp()
    updated_at.FromNanoseconds(int(occurred_at))
    return profile_pb2.ConsentState(
        purpose=purpose, granted=bool(granted), updated_at=updated_at, source=source
    )


def save(tx: sqlite3.Connection, dirty: Iterable[tuple[Identifier, States]]) -> None:
    """Write changed anchors' decisions (inside the caller's transaction)."""
    tx.executemany(
        "INSERT OR REPLACE INTO identity_consent (anchor, decisions) VALUES (?, ?)",
        [
            (anchor.key, json.dumps({p: state.to_json() for p, state in states.items()}))
            for anchor, states in dirty
        ],
    )


def erase(tx: sqlite3.Connection, anchors: Iterable[Identifier]) -> None:
    """Remove a deleted person's decisions."""
    tx.executemany("DELETE FROM identity_consent WHERE anchor = ?", [(a.key,) for a in anchors])


def load(connection: sqlite3.Connection) -> dict[Identifier, States]:
    """Every stored decision, by anchor."""
    return {
        Identifier.parse(anchor): {
            purpose: TraitState.from_json(document)
            for purpose, document in json.loads(text).items()
        }
        for anchor, text in connection.execute("SELECT anchor, decisions FROM identity_consent")
    }
