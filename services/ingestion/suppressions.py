"""The suppression list: identifiers whose items ingestion drops, kept only as hashes.

A deleted person must not come back with their next event. Once their identifiers are
suppressed, an event or record that mentions one of them (in any string, compared by
fingerprint: see :mod:`profilemesh.shared.identifier_mentions`) is acknowledged to its sender
like any other, so that the sender learns nothing, but never reaches the event log; operators
see how many items were dropped.

The list is ingestion's consumer store ``suppressions`` (:mod:`profilemesh.shared.log.stores`).
On the embedded backend that is a SQLite file under ingestion's data directory (WAL,
``synchronous=FULL``, ``secure_delete``): a suppression is durable before the call returns,
and a removed one is overwritten, not left in a free page or the WAL. On the ``postgres``
backend it is a schema of the shared database, so it survives a pod's restart and every
replica of ingestion enforces the same list. It holds SHA-256 digests of fingerprints, never
identifiers.

The digests are also kept in memory; with none, intake does no work at all. Each change of
the list bumps a version counter in the same transaction; :meth:`SuppressionList.refresh` reads
that one row and reloads the digests only when it moved. The replica that made a change
enforces it at once; on a shared store the others call ``refresh`` every
:data:`REFRESH_SECONDS` (see :mod:`.domain`), so they enforce it within about a second. The
dropped counter is a row of the same store: every replica adds to it and reads the total.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from profilemesh.ingestion.v1 import event_log_pb2
from profilemesh.shared.errors import InvalidArgument
from profilemesh.shared.identifier_mentions import hashed_fingerprints, item_mentions, text_mentions
from profilemesh.shared.log.sqlite_store import SqliteConsumerStore
from profilemesh.shared.log.stores import StoreOpener

MAX_IDENTIFIERS = 1000
"""Identifiers per request, as identity's own suppression RPCs allow."""

WITHHELD = "[withheld: it mentioned a suppressed identifier]"
"""What is stored instead of a text that mentions a suppressed identifier."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS suppressed (
    fingerprint_sha256 TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    suppressed_at_ns INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
"""
_DROPPED = "dropped"
_VERSION = "version"
"""Bumped by every change of ``suppressed``: what :meth:`SuppressionList.refresh` watches."""

STORE_NAME = "suppressions"
"""The consumer store the list lives in (``suppressions.sqlite`` on the embedded backend)."""

REFRESH_SECONDS = 1.0
"""How often a replica sharing the list with others looks for their changes."""


class _Item(Protocol):
    """An accepted event or record: its ``IngestedItem`` payload is what would be stored."""

    @property
    def payload(self) -> bytes: ...


_I = TypeVar("_I", bound=_Item)


@dataclass(frozen=True, slots=True)
class SuppressionStats:
    """How many fingerprints are suppressed, and how many items they made intake drop."""

    suppressed: int
    dropped: int


def fingerprints_of(values: Sequence[str], field: str = "identifiers") -> list[set[str]]:
    """The hashed fingerprints of each identifier value of a request; ``InvalidArgument``
    naming ``identifiers[i].value`` for a blank one, or ``identifiers`` for too few or many."""
    if not values:
        raise InvalidArgument.for_field(field, "at least one identifier is required")
    if len(values) > MAX_IDENTIFIERS:
        raise InvalidArgument.for_field(
            field, f"{len(values)} identifiers; at most {MAX_IDENTIFIERS} per request"
        )
    found = []
    for index, value in enumerate(values):
        hashes = hashed_fingerprints(value)
        if not hashes:
            raise InvalidArgument.for_field(f"{field}[{index}].value", "required")
        found.append(hashes)
    return found


class SuppressionList:
    """The suppressed fingerprints (in the store and in memory) and the dropped count.

    Blocking methods (``open``, ``refresh``, ``suppress``, ``unsuppress``, ``count_dropped``,
    ``stats``) are meant for a worker thread; :meth:`split` is the intake's, on its event loop.
    """

    def __init__(self, stores: StoreOpener | None) -> None:
        """A list kept in the store ``suppressions`` that ``stores`` opens; ``None`` for one
        that stays empty and is never opened (an intake used on its own)."""
        self.stores = stores
        self.hashes: frozenset[str] = frozenset()
        self._store: SqliteConsumerStore | None = None
        self._version = -1
        # Held while the in-memory digests are replaced, so that a refresh reading an older
        # snapshot never overwrites what a suppression of this replica has just added.
        self._memory = threading.Lock()

    def open(self) -> None:
        """Open (or create) the store and load the digests."""
        if self.stores is None:
            raise RuntimeError("this suppression list has no store")
        store = self.stores(STORE_NAME)
        try:
            store.schema(_SCHEMA)
        except BaseException:
            store.close()
            raise
        self._store = store
        self.refresh()

    @property
    def shared(self) -> bool:
        """Whether other replicas change the same list (then :meth:`refresh` is needed)."""
        return bool(getattr(self._store, "shared", False))

    def refresh(self) -> bool:
        """Reload the digests if the list changed since they were loaded (by another replica
        sharing the store); whether it had. One small read when nothing changed."""
        store = self._open_store()
        with self._memory:
            version = store.read(_version)
            if version == self._version:
                return False
            version, hashes = store.read(_digests)
            self.hashes, self._version = hashes, version
        return True

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    # -- intake ------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether anything is suppressed (when not, items need no look at all)."""
        return bool(self.hashes)

    def mentioned_in(self, payload: bytes) -> bool:
        """Whether the ``IngestedItem`` ``payload`` mentions a suppressed identifier."""
        hashes = self.hashes
        if not hashes:
            return False
        return item_mentions(event_log_pb2.IngestedItem.FromString(payload), hashes, hashed=True)

    def split(self, items: Sequence[_I]) -> tuple[Sequence[_I], list[_I]]:
        """``items`` to store, and those to drop because they mention a suppressed identifier
        (the first is ``items`` itself when nothing is suppressed)."""
        if not self.hashes:
            return items, []
        kept: list[_I] = []
        dropped: list[_I] = []
        for item in items:
            (dropped if self.mentioned_in(item.payload) else kept).append(item)
        return kept, dropped

    def mentions(self, text: str) -> bool:
        """Whether ``text`` (or one of its words) mentions a suppressed identifier."""
        return text_mentions(text, self.hashes, hashed=True)

    def withheld(self, text: str) -> str:
        """``text``, or :data:`WITHHELD` when it mentions a suppressed identifier (for what
        ingestion keeps about items it did not store, such as a source run's rejections)."""
        return WITHHELD if self.mentions(text) else text

    # -- the list ----------------------------------------------------------------------------

    def suppress(self, values: Sequence[str], reason: str) -> int:
        """Suppress identifier ``values``; how many of them were not suppressed before."""
        per_value = fingerprints_of(values)
        every = frozenset().union(*per_value)
        if text_mentions(reason, every, hashed=True):
            reason = WITHHELD
        now = time.time_ns()
        added = 0
        with self._open_store().transaction() as tx:
            for hashes in per_value:
                new = 0
                for digest in hashes:
                    new += tx.execute(
                        "INSERT OR IGNORE INTO suppressed (fingerprint_sha256, reason, "
                        "suppressed_at_ns) VALUES (?, ?, ?)",
                        (digest, reason, now),
                    ).rowcount
                added += bool(new)
            if added:
                _bump_version(tx)
        with self._memory:
            self.hashes = self.hashes | every
        return added

    def unsuppress(self, values: Sequence[str]) -> int:
        """Stop suppressing identifier ``values``; how many of them were suppressed."""
        per_value = fingerprints_of(values)
        removed = 0
        store = self._open_store()
        with store.transaction() as tx:
            for hashes in per_value:
                gone = 0
                for digest in hashes:
                    gone += tx.execute(
                        "DELETE FROM suppressed WHERE fingerprint_sha256 = ?", (digest,)
                    ).rowcount
                removed += bool(gone)
            if removed:
                _bump_version(tx)
        with self._memory:
            self.hashes = self.hashes.difference(*per_value)
        # On SQLite: copies the WAL into the file and empties it, so no page image of a removed
        # row is left (deleted rows are overwritten: ``secure_delete``).
        store.scrub()
        return removed

    def count_dropped(self, count: int) -> None:
        """Add ``count`` items to the dropped counter, durably."""
        with self._open_store().transaction() as tx:
            tx.execute(
                "INSERT INTO counters (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                (_DROPPED, count),
            )

    def stats(self) -> SuppressionStats:
        """The number of suppressed fingerprints and of dropped items, as committed (by every
        replica sharing the store)."""

        def query(db: sqlite3.Connection) -> SuppressionStats:
            [(suppressed,)] = db.execute("SELECT count(*) FROM suppressed").fetchall()
            row = db.execute("SELECT value FROM counters WHERE name = ?", (_DROPPED,)).fetchone()
            return SuppressionStats(int(suppressed), int(row[0]) if row else 0)

        return self._open_store().read(query)

    def _open_store(self) -> SqliteConsumerStore:
        if self._store is None:
            raise RuntimeError("the suppression list is not open")
        return self._store


def _bump_version(tx: sqlite3.Connection) -> None:
    tx.execute(
        "INSERT INTO counters (name, value) VALUES (?, 1) "
        "ON CONFLICT (name) DO UPDATE SET value = value + 1",
        (_VERSION,),
    )


def _version(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT value FROM counters WHERE name = ?", (_VERSION,)).fetchone()
    return int(row[0]) if row else 0


def _digests(db: sqlite3.Connection) -> tuple[int, frozenset[str]]:
    """The version and the digests, read in one snapshot (the caller's read transaction)."""
    rows = db.execute("SELECT fingerprint_sha256 FROM suppressed").fetchall()
    return _version(db), frozenset(row[0] for row in rows)
