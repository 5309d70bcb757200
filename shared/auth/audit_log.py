"""The audit log of one service: every call it served, append-only and hash-chained.

It lives in the service's ``audit`` store: ``<data_dir>/<service>/audit.sqlite`` on the
embedded backend, the schema ``profilemesh_<service>_audit`` on the ``postgres`` one, where the
service's replicas append to one chain (each batch numbers its entries after the last committed
one, under the store's write lock) and a restarted pod loses nothing.

Append-only: triggers abort every UPDATE and DELETE of an entry (and, in PostgreSQL, a
TRUNCATE). Hash-chained: each entry stores the SHA-256 of the previous entry's hash and its own
fields, so an entry changed or removed by going around the triggers (editing the file, dropping
a trigger) breaks the chain, which :meth:`AuditLog.verify_chain` finds. Removing the newest
entries leaves a valid, shorter chain: compare ``entries_checked`` with an earlier check to
notice that.

Calls never wait on the disk: :meth:`AuditLog.record` queues the entry and a background thread
writes the queue in batches, every ``flush_interval`` seconds or sooner when it grows. The cost
is that a crash loses what was queued: at most the last fraction of a second. When the writer
falls behind by ``max_pending`` entries, new ones are dropped and a marker entry saying how many
takes their place in the chain, so the gap shows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any, LiteralString, TypeVar

from profilemesh.shared.log.postgres_store import PostgresConsumerStore
from profilemesh.shared.log.sqlite_store import SqliteConsumerStore

T = TypeVar("T")

log = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
"""What the first entry's hash chains from."""

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_BATCH = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_entries (
    sequence INTEGER PRIMARY KEY,
    time_us INTEGER NOT NULL,
    service TEXT NOT NULL,
    method TEXT NOT NULL,
    token_id TEXT NOT NULL,
    token_name TEXT NOT NULL,
    peer TEXT NOT NULL,
    status_code TEXT NOT NULL,
    duration_us INTEGER NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_entries_by_time ON audit_entries (time_us);
CREATE INDEX IF NOT EXISTS audit_entries_by_token ON audit_entries (token_id, sequence);
"""
_SQLITE_APPEND_ONLY = """
CREATE TRIGGER IF NOT EXISTS audit_entries_no_update BEFORE UPDATE ON audit_entries
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END;
CREATE TRIGGER IF NOT EXISTS audit_entries_no_delete BEFORE DELETE ON audit_entries
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END;
"""
# PL/pgSQL, which the SQLite dialect cannot express: run as it is, in the store's schema (its
# connections' search_path), on every open, so a dropped trigger comes back.
_POSTGRES_APPEND_ONLY: tuple[LiteralString, ...] = (
    """CREATE OR REPLACE FUNCTION audit_entries_append_only() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'the audit log is append-only';
    END
    $$""",
    # Dropped and made again in one transaction (CREATE OR REPLACE TRIGGER needs PostgreSQL 14).
    "DROP TRIGGER IF EXISTS audit_entries_no_change ON audit_entries",
    """CREATE TRIGGER audit_entries_no_change BEFORE UPDATE OR DELETE
    ON audit_entries FOR EACH ROW EXECUTE FUNCTION audit_entries_append_only()""",
    "DROP TRIGGER IF EXISTS audit_entries_no_truncate ON audit_entries",
    """CREATE TRIGGER audit_entries_no_truncate BEFORE TRUNCATE
    ON audit_entries FOR EACH STATEMENT EXECUTE FUNCTION audit_entries_append_only()""",
)
_LAST = "SELECT sequence, hash FROM audit_entries ORDER BY sequence DESC LIMIT 1"
_COLUMNS = (
    "sequence, time_us, service, method, token_id, token_name, peer, status_code, duration_us, hash"
)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One call, as the access guard saw it end."""

    time_us: int
    service: str
    method: str
    token_id: str
    token_name: str
    peer: str
    status_code: str
    duration_us: int


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """A stored record: its place in the log and its link in the chain."""

    sequence: int
    record: AuditRecord
    hash: str


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Which entries to list, newest first; ``before_sequence`` pages."""

    since_us: int | None = None
    until_us: int | None = None
    token_id: str = ""
    method_prefix: str = ""
    page_size: int = DEFAULT_PAGE_SIZE
    before_sequence: int | None = None


@dataclass(frozen=True, slots=True)
class ChainCheck:
    """The outcome of recomputing the chain."""

    valid: bool
    entries_checked: int
    first_invalid_sequence: int = 0


def chain_hash(previous: str, sequence: int, record: AuditRecord) -> str:
    """The hash an entry stores: SHA-256 of the previous hash and the entry's fields."""
    fields = json.dumps([sequence, *astuple(record)], separators=(",", ":"))
    return hashlib.sha256(f"{previous}\n{fields}".encode()).hexdigest()


class AuditLog:
    """The audit log in the store ``source`` opens (or in a SQLite file); see the module
    docstring. The store is opened by :meth:`open` and closed by :meth:`close`."""

    def __init__(
        self,
        source: Path | Callable[[], SqliteConsumerStore],
        service: str,
        *,
        flush_interval: float = 0.2,
        max_pending: int = 100_000,
    ) -> None:
        self.source = source
        self.service = service
        self.flush_interval = flush_interval
        self.max_pending = max_pending
        self._pending: deque[AuditRecord] = deque()
        self._cond = threading.Condition()
        self._queued = 0
        self._written = 0
        self._dropped = 0
        self._stopping = False
        self._flush_requested = False
        self._thread: threading.Thread | None = None
        self._store: SqliteConsumerStore | None = None

    def open(self) -> None:
        """Open the store, create its table and triggers when missing, and start the writer."""
        self._store = self._open_store()
        self._stopping = False
        self._thread = threading.Thread(
            target=self._write_loop, name=f"audit-{self.service}", daemon=True
        )
        self._thread.start()

    def record(self, record: AuditRecord) -> None:
        """Queue ``record`` for the writer; never blocks on the disk."""
        with self._cond:
            if len(self._pending) >= self.max_pending:
                self._dropped += 1
                return
            self._pending.append(record)
            self._queued += 1
            if len(self._pending) == _BATCH:
                self._cond.notify_all()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far is written; False when ``timeout`` ran out (or
        the writer is not running)."""
        with self._cond:
            if self._thread is None:
                return not self._pending
            target = self._queued
            self._flush_requested = True
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._written >= target, timeout)

    def close(self) -> None:
        """Write what is queued, stop the writer and close the file."""
        thread = self._thread
        if thread is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        thread.join()
        self._thread = None
        store, self._store = self._store, None
        if store is not None:
            store.close()

    def _open_store(self) -> SqliteConsumerStore:
        source = self.source
        if isinstance(source, Path):
            source.parent.mkdir(parents=True, exist_ok=True)
            store = SqliteConsumerStore(source)
        else:
            store = source()
        try:
            _prepare(store)
        except BaseException:
            store.close()
            raise
        return store

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: self._stopping or self._flush_requested or len(self._pending) >= _BATCH,
                    self.flush_interval,
                )
                batch = list(self._pending)
                self._pending.clear()
                dropped, self._dropped = self._dropped, 0
                stopping, self._flush_requested = self._stopping, False
            if batch or dropped:
                self._write(batch, dropped)
            with self._cond:
                self._written += len(batch)
                self._cond.notify_all()
            if stopping:
                return

    def _write(self, batch: list[AuditRecord], dropped: int) -> None:
        if dropped:
            log.error("the audit writer fell behind; %d entries were dropped", dropped)
            batch = [self._gap_marker(dropped), *batch]
        assert self._store is not None
        try:
            # The chain continues from the last committed entry, read under the store's write
            # lock: replicas sharing the store append to one chain.
            with self._store.transaction() as tx:
                last = tx.execute(_LAST).fetchone()
                sequence, previous = (0, GENESIS_HASH) if last is None else (last[0], last[1])
                sequence, previous = int(sequence), str(previous)
                rows = []
                for record in batch:
                    sequence += 1
                    previous = chain_hash(previous, sequence, record)
                    rows.append((sequence, *astuple(record), previous))
                tx.executemany(
                    f"INSERT INTO audit_entries ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
        except Exception:  # whichever backend's error: the writer must keep going
            log.exception("writing %d audit entries failed", len(batch))
            with self._cond:
                # Counted as dropped, so the next write marks the gap.
                self._dropped += len(batch) - (1 if dropped else 0) + dropped

    def _gap_marker(self, dropped: int) -> AuditRecord:
        return AuditRecord(
            time_us=time.time_ns() // 1000,
            service=self.service,
            method=f"(audit log: {dropped} entries dropped)",
            token_id="",
            token_name="",
            peer="",
            status_code="DATA_LOSS",
            duration_us=0,
        )

    def _read(self, query: Callable[[sqlite3.Connection], T], empty: T) -> T:
        """``query`` in a read transaction of the store (reads never wait for the writer);
        a log that is not open is opened for it, ``empty`` when its file does not exist."""
        store = self._store
        if store is not None:
            return store.read(query)
        if isinstance(self.source, Path) and not self.source.exists():
            return empty
        store = self._open_store()
        try:
            return store.read(query)
        finally:
            store.close()

    def query(self, query: AuditQuery) -> list[AuditEntry]:
        """The entries ``query`` selects, newest first (at most ``query.page_size``)."""
        where, params = _conditions(query)
        sql = f"SELECT {_COLUMNS} FROM audit_entries{where} ORDER BY sequence DESC LIMIT ?"
        empty: list[Any] = []
        rows = self._read(lambda db: db.execute(sql, [*params, query.page_size]).fetchall(), empty)
        return [_entry(row) for row in rows]

    def verify_chain(self) -> ChainCheck:
        """Recompute every entry's hash from the one before it."""
        return self._read(
            lambda db: _check(_entries(db)), ChainCheck(valid=True, entries_checked=0)
        )


def _prepare(store: SqliteConsumerStore | PostgresConsumerStore) -> None:
    """Create the table, its indexes and the triggers keeping it append-only."""
    if isinstance(store, PostgresConsumerStore):
        store.schema(_SCHEMA)
        with store.transaction() as tx:
            for statement in _POSTGRES_APPEND_ONLY:
                tx.connection.execute(statement)
    else:
        store.schema(_SCHEMA + _SQLITE_APPEND_ONLY)


def _conditions(query: AuditQuery) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if query.before_sequence is not None:
        clauses.append("sequence < ?")
        params.append(query.before_sequence)
    if query.since_us is not None:
        clauses.append("time_us >= ?")
        params.append(query.since_us)
    if query.until_us is not None:
        clauses.append("time_us < ?")
        params.append(query.until_us)
    if query.token_id:
        clauses.append("token_id = ?")
        params.append(query.token_id)
    if query.method_prefix:
        clauses.append("substr(method, 1, ?) = ?")
        params.extend([len(query.method_prefix), query.method_prefix])
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def _entries(db: sqlite3.Connection) -> Iterator[AuditEntry]:
    for row in db.execute(f"SELECT {_COLUMNS} FROM audit_entries ORDER BY sequence"):
        yield _entry(row)


def _check(entries: Iterator[AuditEntry]) -> ChainCheck:
    previous, expected, checked = GENESIS_HASH, 1, 0
    for entry in entries:
        checked += 1
        if entry.sequence != expected or entry.hash != chain_hash(
            previous, entry.sequence, entry.record
        ):
            return ChainCheck(valid=False, entries_checked=checked, first_invalid_sequence=expected)
        previous, expected = entry.hash, expected + 1
    return ChainCheck(valid=True, entries_checked=checked)


def _entry(row: Any) -> AuditEntry:
    sequence, *fields, digest = row
    return AuditEntry(int(sequence), AuditRecord(*fields), str(digest))
