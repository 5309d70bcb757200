"""The suppression list: identifiers whose items ingestion drops, kept only as hashes.

A deleted person must not come back with their next event. Once their identifiers are
suppressed, an event or record that mentions one of them (in any string, compared by
fingerprint: see :mod:`profilemesh.shared.identifier_mentions`) is acknowledged to its sender
like any other, so that the sender learns nothing, but never reaches the event log; operators
see how many items were dropped.

The list is a SQLite file under ingestion's data directory (WAL, ``synchronous=FULL``,
``secure_delete``): a suppression is durable before the call returns, and a removed one is
overwritten, not left in a free page or the WAL. It holds SHA-256 digests of fingerprints,
never identifiers. The digests are also kept in memory; with none, intake does no work at all.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from profilemesh.ingestion.v1 import event_log_pb2
from profilemesh.shared.errors import InvalidArgument
from profilemesh.shared.identifier_mentions import hashed_fingerprints, item_mentions, text_mentions

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
    """The suppressed fingerprints (in ``database`` and in memory) and the dropped count.

    Blocking methods (``open``, ``suppress``, ``unsuppress``, ``count_dropped``, ``stats``) are
    meant for a worker thread; :meth:`split` is the intake's, on its event loop.
    """

    def __init__(self, database: Path | None) -> None:
        """A list stored in ``database``; ``None`` for one that stays empty and is never
        opened (an intake used on its own)."""
        self.database = database
        self.hashes: frozenset[str] = frozenset()
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def open(self) -> None:
        """Create or open the file and load the digests."""
        if self.database is None:
            raise RuntimeError("this suppression list has no file")
        self.database.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.database, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA secure_delete=ON")
        db.executescript(_SCHEMA)
        self._db = db
        rows = db.execute("SELECT fingerprint_sha256 FROM suppressed").fetchall()
        self.hashes = frozenset(row[0] for row in rows)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

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
        with self._transaction() as tx:
            for hashes in per_value:
                new = 0
                for digest in hashes:
                    new += tx.execute(
                        "INSERT OR IGNORE INTO suppressed (fingerprint_sha256, reason, "
                        "suppressed_at_ns) VALUES (?, ?, ?)",
                        (digest, reason, now),
                    ).rowcount
                added += bool(new)
        self.hashes = self.hashes | every
        return added

    def unsuppress(self, values: Sequence[str]) -> int:
        """Stop suppressing identifier ``values``; how many of them were suppressed."""
        per_value = fingerprints_of(values)
        removed = 0
        with self._transaction() as tx:
            for hashes in per_value:
                gone = 0
                for digest in hashes:
                    gone += tx.execute(
                        "DELETE FROM suppressed WHERE fingerprint_sha256 = ?", (digest,)
                    ).rowcount
                removed += bool(gone)
        self.hashes = self.hashes.difference(*per_value)
        self._checkpoint()
        return removed

    def count_dropped(self, count: int) -> None:
        """Add ``count`` items to the dropped counter, durably."""
        with self._transaction() as tx:
            tx.execute(
                "INSERT INTO counters (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                (_DROPPED, count),
            )

    def stats(self) -> SuppressionStats:
        """The number of suppressed fingerprints and of dropped items, as committed."""
        with self._lock:
            db = self._connection()
            [(suppressed,)] = db.execute("SELECT count(*) FROM suppressed").fetchall()
            row = db.execute("SELECT value FROM counters WHERE name = ?", (_DROPPED,)).fetchone()
        return SuppressionStats(suppressed, row[0] if row else 0)

    def _checkpoint(self) -> None:
        # Copies the WAL into the file and empties it: no page image of a removed row is left.
        with self._lock:
            self._connection().execute("PRAGMA wal_checkpoint(TRUNCATE)")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the suppression list is not open")
        return self._db
