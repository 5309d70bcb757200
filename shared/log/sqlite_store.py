"""A consumer store in one SQLite file: the consumer's tables and its offsets side by side."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from profilemesh.shared.log.consumer import ConsumerStore

T = TypeVar("T")

_OFFSETS_TABLE = """
CREATE TABLE IF NOT EXISTS consumer_offsets (
    consumer TEXT NOT NULL,
    stream TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (consumer, stream, partition)
)
"""


class SqliteConsumerStore(ConsumerStore[sqlite3.Connection]):
    """A :class:`ConsumerStore` over one SQLite database file.

    The consumer's own tables live in the same database as ``consumer_offsets``, so a handler
    writes its state through the connection it is given and that state commits together with
    the offset. WAL mode with ``synchronous=FULL``: a commit is on disk when it returns.

    One connection, shared by the worker threads that call in and serialised by a lock, so
    at most one transaction runs at a time.
    """

    concurrency = 1

    def __init__(self, path: Path | str, *, busy_timeout_seconds: float = 30.0) -> None:
        self.path = Path(path)
        # isolation_level=None: the sqlite3 module opens no transactions of its own; every
        # transaction here is an explicit BEGIN ... COMMIT/ROLLBACK.
        self._connection = sqlite3.connect(
            self.path,
            isolation_level=None,
            check_same_thread=False,
            timeout=busy_timeout_seconds,
        )
        self._lock = threading.Lock()
        self._timeout = busy_timeout_seconds
        # Reads get a connection per thread: in WAL mode they see the last committed state
        # without waiting for a write transaction (and its fsync) on the writer's connection.
        self._readers = threading.local()
        self._reader_connections: list[sqlite3.Connection] = []
        with self._lock:
            self._connection.execute("PRAGMA journal_mode=WAL")
            self._connection.execute("PRAGMA synchronous=FULL")
            # Deleted rows are overwritten with zeros, not left in free pages: an erased person
            # must not be readable from the file (see :meth:`scrub` for the WAL's copies).
            self._connection.execute("PRAGMA secure_delete=ON")
            self._connection.execute(_OFFSETS_TABLE)

    def schema(self, sql: str) -> None:
        """Run ``sql`` (one or more statements, e.g. ``CREATE TABLE IF NOT EXISTS``) in one
        transaction: how a consumer creates its tables at start-up."""
        with self._lock:
            # executescript commits any open transaction first, so the script brings its own.
            try:
                self._connection.executescript(f"BEGIN IMMEDIATE;\n{sql}\n;\nCOMMIT;")
            except BaseException:
                if self._connection.in_transaction:
                    self._connection.execute("ROLLBACK")
                raise

    def ensure_column(self, table: str, column: str, declaration: str) -> None:
        """Add ``column`` to ``table`` unless it has it: a store written by an earlier version
        (``CREATE TABLE IF NOT EXISTS`` keeps its old columns) gains a column added since.
        ``declaration`` must allow existing rows, e.g. ``TEXT`` (nullable)."""
        with self._lock:
            columns = {row[1] for row in self._connection.execute(f"PRAGMA table_info({table})")}
            if column not in columns:
                self._connection.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    def read(self, query: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``query`` in a read transaction (one consistent snapshot of what was committed),
        on this thread's own connection, so it never waits for a write in progress."""
        connection = self._reader()
        connection.execute("BEGIN")
        try:
            return query(connection)
        finally:
            if connection.in_transaction:
                connection.execute("ROLLBACK")

    def _reader(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._readers, "connection", None)
        if connection is None:
            connection = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=self._timeout
            )
            self._readers.connection = connection
            with self._lock:
                self._reader_connections.append(connection)
        return connection

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction on the connection: committed on normal exit, else rolled back.

        ``BEGIN IMMEDIATE`` takes the write lock up front, so another process applying to the
        same file waits instead of failing half-way with ``SQLITE_BUSY``.
        """
        connection = self._connection
        with self._lock:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
                connection.execute("COMMIT")
            except BaseException:
                # A failed COMMIT may leave the transaction open (SQLITE_BUSY): end it too.
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise

    def committed(self, consumer: str, stream: str) -> dict[int, int]:
        def query(connection: sqlite3.Connection) -> dict[int, int]:
            rows = connection.execute(
                "SELECT partition, next_offset FROM consumer_offsets"
                " WHERE consumer = ? AND stream = ?",
                (consumer, stream),
            )
            return {int(partition): int(offset) for partition, offset in rows}

        return self.read(query)

    def committed_offset(
        self, tx: sqlite3.Connection, consumer: str, stream: str, partition: int
    ) -> int | None:
        row = tx.execute(
            "SELECT next_offset FROM consumer_offsets"
            " WHERE consumer = ? AND stream = ? AND partition = ?",
            (consumer, stream, partition),
        ).fetchone()
        return None if row is None else int(row[0])

    def commit_offset(
        self, tx: sqlite3.Connection, consumer: str, stream: str, partition: int, next_offset: int
    ) -> None:
        tx.execute(
            "INSERT INTO consumer_offsets (consumer, stream, partition, next_offset)"
            " VALUES (?, ?, ?, ?)"
            " ON CONFLICT (consumer, stream, partition)"
            " DO UPDATE SET next_offset = excluded.next_offset",
            (consumer, stream, partition, next_offset),
        )

    def scrub(self) -> bool:
        """Copy the WAL into the database file and truncate it, so that page images written
        before a deletion survive nowhere. False when a reader kept part of the WAL alive (try
        again later)."""
        with self._lock:
            busy, _, _ = self._connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return int(busy) == 0

    def close(self) -> None:
        """Close the connections (waiting for a transaction in progress to finish)."""
        with self._lock:
            self._connection.close()
            for reader in self._reader_connections:
                reader.close()
            self._reader_connections.clear()
