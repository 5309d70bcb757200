"""Every profile's streaming state, in memory, persisted in the consumer's SQLite store.

Reads (online features) come from memory; the consumer changes states under the domain's lock
and :meth:`StateTable.save` writes only the profiles it changed, in the consumer's transaction.
Merged profile ids redirect to the survivor forever, as in identity, so a lookup by an old id
still finds the person.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from profilemesh.services.features.definitions import FeatureSet
from profilemesh.services.features.events import FeatureEvent
from profilemesh.services.features.state import ProfileState

SCHEMA = """
CREATE TABLE IF NOT EXISTS feature_states (
    profile_id TEXT PRIMARY KEY,
    state BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS feature_redirects (
    profile_id TEXT PRIMARY KEY,
    surviving_id TEXT NOT NULL
) WITHOUT ROWID;
"""

DAY_NS = 86_400 * 1_000_000_000


def build_states(
    events_by_profile: Mapping[str, Iterable[FeatureEvent]],
    feature_set: FeatureSet,
    now_ns: int | None = None,
) -> dict[str, ProfileState]:
    """States computed from scratch from each profile's events, day cells no window needs any
    more dropped."""
    today = (time.time_ns() if now_ns is None else now_ns) // DAY_NS
    built = {}
    for profile_id, events in events_by_profile.items():
        state = ProfileState()
        for event in events:
            state.apply(event, feature_set)
        state.evict(today, feature_set)
        built[profile_id] = state
    return built


class StateTable:
    """Profile id -> :class:`ProfileState`, with redirects and a record of what changed."""

    def __init__(self) -> None:
        self._states: dict[str, ProfileState] = {}
        self._redirects: dict[str, str] = {}
        self._dirty: set[str] = set()
        self._deleted: set[str] = set()
        self._redirected: set[str] = set()
        self._unredirected: set[str] = set()

    @staticmethod
    def schema() -> str:
        return SCHEMA

    def load(self, connection: sqlite3.Connection) -> None:
        self._states = {
            profile_id: ProfileState.from_bytes(blob)
            for profile_id, blob in connection.execute(
                "SELECT profile_id, state FROM feature_states"
            )
        }
        self._redirects = dict(
            connection.execute("SELECT profile_id, surviving_id FROM feature_redirects")
        )

    def __len__(self) -> int:
        return len(self._states)

    def canonical(self, profile_id: str) -> str:
        """The live id of ``profile_id`` (itself unless it was merged away)."""
        seen = 0
        while profile_id in self._redirects and seen < 1000:
            profile_id = self._redirects[profile_id]
            seen += 1
        return profile_id

    def has(self, profile_id: str) -> bool:
        return profile_id in self._states

    def known(self, profile_id: str) -> bool:
        """Whether the profile, or the profile it was merged into, has state."""
        return self.canonical(profile_id) in self._states

    def values(
        self,
        profile_id: str,
        feature_set: FeatureSet,
        as_of_ns: int,
        names: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """The profile's features (every visible one, or ``names``) as of ``as_of_ns``; an
        unknown profile has no events."""
        state = self._states.get(profile_id)
        if state is None:
            state = ProfileState()
        return state.values(feature_set, as_of_ns, names)

    def state(self, profile_id: str) -> ProfileState | None:
        return self._states.get(profile_id)

    # -- changes, under the domain's lock ----------------------------------------------------

    def apply(self, event: FeatureEvent, feature_set: FeatureSet) -> None:
        state = self._states.get(event.profile_id)
        if state is None:
            state = self._states[event.profile_id] = ProfileState()
        state.apply(event, feature_set)
        self._dirty.add(event.profile_id)

    def merge(self, survivor: str, others: Sequence[str]) -> None:
        """Combine ``others``' states into ``survivor``'s and redirect their ids."""
        state = self._states.get(survivor)
        if state is None:
            state = self._states[survivor] = ProfileState()
        for other in others:
            absorbed = self._states.pop(other, None)
            if absorbed is not None:
                state.merge(absorbed)
            self._deleted.add(other)
            self._dirty.discard(other)
            self._redirects[other] = survivor
            self._redirected.add(other)
            self._unredirected.discard(other)
        self._dirty.add(survivor)

    def rebuild(self, states: Mapping[str, ProfileState]) -> None:
        """Replace the states of these profiles by states recomputed from their events (an
        unmerge), reviving ids an earlier merge had retired."""
        for profile_id, state in states.items():
            self._states[profile_id] = state
            self._dirty.add(profile_id)
            self._deleted.discard(profile_id)
            if self._redirects.pop(profile_id, None) is not None:  # an unmerge revived it
                self._unredirected.add(profile_id)
                self._redirected.discard(profile_id)

    def replace(self, states: Mapping[str, ProfileState]) -> None:
        """Swap in states computed elsewhere (a backfill)."""
        for profile_id, state in states.items():
            if self.canonical(profile_id) != profile_id:
                continue  # merged away while the backfill ran: the survivor holds its events
            self._states[profile_id] = state
            self._dirty.add(profile_id)

    def delete(self, profile_id: str) -> None:
        self._states.pop(profile_id, None)
        self._dirty.discard(profile_id)
        self._deleted.add(profile_id)

    def evict_changed(self, now_ns: int) -> None:
        """Drop day cells no window needs any more, on the profiles just changed."""
        today = now_ns // DAY_NS
        for profile_id in self._dirty:
            state = self._states.get(profile_id)
            if state is not None:
                state.evict(today)

    def save(self, tx: sqlite3.Connection) -> None:
        """Write what changed since the last save through the caller's transaction."""
        tx.executemany(
            "INSERT OR REPLACE INTO feature_states (profile_id, state) VALUES (?, ?)",
            [(p, self._states[p].to_bytes()) for p in self._dirty if p in self._states],
        )
        tx.executemany(
            "DELETE FROM feature_states WHERE profile_id = ?", [(p,) for p in self._deleted]
        )
        tx.executemany(
            "INSERT OR REPLACE INTO feature_redirects (profile_id, surviving_id) VALUES (?, ?)",
            [(p, self._redirects[p]) for p in self._redirected if p in self._redirects],
        )
        tx.executemany(
            "DELETE FROM feature_redirects WHERE profile_id = ?",
            [(p,) for p in self._unredirected],
        )
        self._dirty.clear()
        self._deleted.clear()
        self._redirected.clear()
        self._unredirected.clear()
