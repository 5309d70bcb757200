"""The suppression list: identifiers whose items identity drops, stored only as hashes.

A suppressed identifier never creates or updates a profile again: an item carrying one is
dropped whole, whatever else it carries (an event with a deleted person's email and a fresh
device id is still that person's event). Ingestion drops such events before they are stored
(it keeps its own hashed list, filled by identity); this list catches what was already in the
event log when the suppression was made. Only SHA-256 digests of the normalised ``type:value``
are kept, so the list of people who asked to be forgotten names nobody.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable

from profilemesh.services.identity.identifiers import Identifier
from profilemesh.shared.pii import sha256_hex

SCHEMA = """
CREATE TABLE IF NOT EXISTS identity_suppressions (
    digest TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;
"""


def digest(identifier: Identifier) -> str:
    """How a suppressed identifier is stored: the SHA-256 of its normalised ``type:value``."""
    return sha256_hex(identifier.key)


class SuppressionList:
    """The digests in memory (checked for every item), the rows in identity's store."""

    def __init__(self) -> None:
        self._digests: set[str] = set()
        self.dropped = 0
        """Items dropped since start-up because they carried a suppressed identifier."""

    def __len__(self) -> int:
        return len(self._digests)

    def load(self, connection: sqlite3.Connection) -> None:
        self._digests = {
            d for (d,) in connection.execute("SELECT digest FROM identity_suppressions")
        }

    def any_suppressed(self, identifiers: Iterable[Identifier]) -> bool:
        """Whether any of ``identifiers`` is suppressed (free while the list is empty)."""
        if not self._digests:
            return False
        return any(digest(i) in self._digests for i in identifiers)

    def add(self, tx: sqlite3.Connection, identifiers: Iterable[Identifier], reason: str) -> None:
        """Suppress ``identifiers`` (inside the caller's transaction; see :meth:`apply`)."""
        now = time.time_ns()
        tx.executemany(
            "INSERT OR IGNORE INTO identity_suppressions (digest, reason, created_at)"
            " VALUES (?, ?, ?)",
            [(digest(i), reason, now) for i in identifiers],
        )

    def remove(self, tx: sqlite3.Connection, identifiers: Iterable[Identifier]) -> int:
        """Lift the suppression of ``identifiers``; how many were suppressed."""
        removed = 0
        for identifier in identifiers:
            cursor = tx.execute(
                "DELETE FROM identity_suppressions WHERE digest = ?", (digest(identifier),)
            )
            removed += cursor.rowcount
        return removed

    def apply(self, added: Iterable[Identifier] = (), removed: Iterable[Identifier] = ()) -> None:
        """Bring the in-memory set in line once the transaction committed."""
        self._digests |= {digest(i) for i in added}
        self._digests -= {digest(i) for i in removed}
