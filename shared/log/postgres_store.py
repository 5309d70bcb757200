"""A consumer store in PostgreSQL: the scale-out backend's counterpart of the SQLite store.

Every service keeps its tables in a schema of its own (``profilemesh_identity``...) of one
database, beside ``consumer_offsets`` and ``schema_migrations``; pooled connections have their
``search_path`` set to it. Domain code is the same on both backends: it writes the SQLite
dialect through the connection its handlers and readers are handed, and
:class:`PostgresConnection` translates each distinct statement once (:mod:`.sql_dialect`),
failing with the statement when it has no faithful translation.

Start-up, with several replicas at once. Each :meth:`PostgresConsumerStore.schema` script runs
inside a transaction holding the store's advisory lock (``pg_advisory_xact_lock`` of a hash of
the schema name) and is recorded by its SHA-256 in ``schema_migrations``: replicas starting
together wait for each other, and a script runs once, ever. A script that changes therefore runs
again as a new one, and its ``CREATE TABLE IF NOT EXISTS`` leaves an existing table as it was.

Adding a column later: add it to the ``CREATE TABLE`` of the script (new stores get it), and
after ``schema()`` call ``store.ensure_column(table, column, declaration)`` with a declaration
that existing rows satisfy (``TEXT``, ``INTEGER NOT NULL DEFAULT 0``): stores made earlier gain
it, under the same lock, on either backend. Other changes (a new index, a rewrite of a table's
rows) are a new script of their own, which runs once.

Transactions. :meth:`~PostgresConsumerStore.transaction` takes the store's advisory lock first,
so write transactions of a store never overlap, whichever replica runs them: reading the
committed offset and moving it cannot interleave with another apply (the
:class:`~.consumer.ConsumerStore` contract), and every writer sees the last commit, as with
SQLite's ``BEGIN IMMEDIATE``. Within a process they are also serialised by a lock, so only one
pooled connection waits for the advisory lock and readers are never starved of connections.
Reads (:meth:`~PostgresConsumerStore.read`) run in a read-only ``REPEATABLE READ`` transaction
on a pooled connection of their own: one snapshot, no waiting for a writer.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, LiteralString, TypeVar

import psycopg
from psycopg import sql as pgsql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from profilemesh.shared.log.consumer import ConsumerStore
from profilemesh.shared.log.sql_dialect import Dialect, Translation, UntranslatableSql

T = TypeVar("T")

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")

_BOOTSTRAP: tuple[LiteralString, ...] = (
    "CREATE SCHEMA IF NOT EXISTS {schema}",
    """CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
        digest TEXT PRIMARY KEY,
        applied_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        script TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS {schema}.consumer_offsets (
        consumer TEXT NOT NULL,
        stream TEXT NOT NULL,
        partition INTEGER NOT NULL,
        next_offset BIGINT NOT NULL,
        PRIMARY KEY (consumer, stream, partition)
    )""",
)

_Connection = psycopg.Connection[tuple[Any, ...]]


class Row(Sequence[Any]):
    """A row read with ``row_factory = sqlite3.Row``: by index or by column name, and
    ``dict(row)`` maps names to values."""

    __slots__ = ("_names", "_values")

    def __init__(self, names: Sequence[str], values: Sequence[Any]) -> None:
        self._names = tuple(names)
        self._values = tuple(values)

    def keys(self) -> list[str]:
        return list(self._names)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            try:
                return self._values[self._names.index(key)]
            except ValueError:
                raise IndexError(f"no column {key}") from None
        return self._values[key]

    def __len__(self) -> int:
        return len(self._values)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Row):
            return self._names == other._names and self._values == other._values
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self._names, self._values))

    def __repr__(self) -> str:
        return f"Row({dict(zip(self._names, self._values, strict=True))!r})"


class PostgresCursor:
    """The result of one statement, read like a ``sqlite3.Cursor``: ``fetchone``,
    ``fetchall``, ``fetchmany``, iteration, ``rowcount``, ``lastrowid``, ``description``."""

    arraysize = 1

    def __init__(
        self,
        connection: PostgresConnection,
        cursor: psycopg.Cursor[tuple[Any, ...]] | None = None,
        *,
        rowcount: int = -1,
        lastrowid: int | None = None,
    ) -> None:
        self.connection = connection
        self._cursor = cursor if cursor is not None and cursor.description is not None else None
        self.rowcount = cursor.rowcount if cursor is not None else rowcount
        self.lastrowid = lastrowid
        self.row_factory: Any = connection.row_factory
        self.description = (
            tuple(
                (column.name, None, None, None, None, None, None)
                for column in self._cursor.description
            )
            if self._cursor is not None and self._cursor.description is not None
            else None
        )

    def _row(self, values: tuple[Any, ...]) -> Any:
        factory = self.row_factory
        if factory is None:
            return values
        if factory is sqlite3.Row:
            return Row([d[0] for d in self.description or ()], values)
        return factory(self, values)

    def fetchone(self) -> Any:
        if self._cursor is None:
            return None
        values = self._cursor.fetchone()
        return None if values is None else self._row(values)

    def fetchmany(self, size: int | None = None) -> list[Any]:
        if self._cursor is None:
            return []
        return [self._row(v) for v in self._cursor.fetchmany(size or self.arraysize)]

    def fetchall(self) -> list[Any]:
        if self._cursor is None:
            return []
        return [self._row(v) for v in self._cursor.fetchall()]

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        row = self.fetchone()
        if row is None:
            raise StopIteration
        return row

    def close(self) -> None:
        if self._cursor is not None:
            self._cursor.close()
            self._cursor = None


class PostgresConnection:
    """What a handler or reader of a :class:`PostgresConsumerStore` is handed: a connection
    inside the store's transaction that reads the SQLite dialect (``?`` placeholders,
    ``INSERT OR REPLACE``...) and answers like ``sqlite3.Connection``: ``execute`` and
    ``executemany`` return cursors, ``row_factory = sqlite3.Row`` gives rows by name.

    ``transaction_control`` lets ``BEGIN``/``COMMIT``/``ROLLBACK`` through, for a connection
    in autocommit mode that manages its own transactions (tools and tests); inside a store's
    transaction they are refused, as they would end it behind the store's back.
    """

    def __init__(
        self, connection: _Connection, dialect: Dialect, *, transaction_control: bool = False
    ) -> None:
        self.connection = connection
        """The psycopg connection, for PostgreSQL's own dialect (``%s`` placeholders)."""
        self.dialect = dialect
        self.row_factory: Any = None
        """None (tuples), ``sqlite3.Row``, or a callable ``(cursor, values) -> row``."""
        self._transaction_control = transaction_control

    def execute(self, statement: str, parameters: Sequence[Any] = ()) -> PostgresCursor:
        translation = self._translated(statement)
        if translation.sql is None:
            return PostgresCursor(self)
        cursor = self.connection.cursor()
        if translation.rowid_sql is not None:
            # An INSERT returns the rowid it assigned, as SQLite's lastrowid does.
            cursor.execute(translation.rowid_sql, _parameters(parameters))
            returned = cursor.fetchall()
            lastrowid = int(returned[-1][0]) if returned else None
            return PostgresCursor(self, rowcount=cursor.rowcount, lastrowid=lastrowid)
        cursor.execute(translation.sql, _parameters(parameters))
        return PostgresCursor(self, cursor)

    def executemany(self, statement: str, parameters: Iterable[Sequence[Any]]) -> PostgresCursor:
        translation = self._translated(statement)
        if translation.sql is None:
            return PostgresCursor(self)
        cursor = self.connection.cursor()
        cursor.executemany(translation.sql, (_parameters(p) for p in parameters))
        return PostgresCursor(self, rowcount=cursor.rowcount)

    def _translated(self, statement: str) -> Translation:
        translation = self.dialect.translate(statement)
        if translation.control is not None and not self._transaction_control:
            raise UntranslatableSql(
                f"{translation.control} inside the store's transaction (the store commits)",
                statement,
            )
        return translation


def _parameters(values: Sequence[Any]) -> tuple[Any, ...]:
    """Parameters as SQLite sees them: it has no booleans, True is stored as 1."""
    if isinstance(values, dict):
        raise TypeError("named parameters are not supported; use ? placeholders")
    return tuple(int(v) if isinstance(v, bool) else v for v in values)


def advisory_key(schema: str) -> int:
    """The advisory lock of a store: a signed 64-bit hash of its schema's name."""
    digest = hashlib.sha256(f"profilemesh:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class PostgresUnreachable(RuntimeError):
    """The store could not reach its PostgreSQL server when it opened."""


def _where(dsn: str) -> str:
    """Host, port and database of ``dsn``, without its password."""
    parts = conninfo_to_dict(dsn)
    return ", ".join(f"{k}={parts[k]}" for k in ("host", "port", "dbname") if parts.get(k))


class PostgresConsumerStore(ConsumerStore[PostgresConnection]):
    """A :class:`ConsumerStore` in one schema of a PostgreSQL database, with the same public
    surface as the SQLite store: ``schema``, ``ensure_column``, ``transaction``, ``read``,
    ``scrub``, ``close`` and the offsets (see the module's description).

    ``pool_max`` must be at least 2: a transaction holds one connection and may read through
    another.
    """

    concurrency = 1
    shared: ClassVar[bool] = True
    """Every replica of the service opens the same store: consumers share the partitions."""

    def __init__(
        self,
        dsn: str,
        schema: str,
        *,
        pool_min: int = 1,
        pool_max: int = 8,
        lock_timeout_seconds: float = 30.0,
        connect_timeout_seconds: float = 30.0,
    ) -> None:
        if not _SCHEMA_NAME.fullmatch(schema):
            raise ValueError(f"schema name {schema!r}: lower-case letters, digits, underscores")
        if pool_max < 2:
            raise ValueError("pool_max must be at least 2 (a transaction may also read)")
        self.schema_name = schema
        self.dialect = Dialect()
        self._lock = threading.Lock()
        self._key = advisory_key(schema)
        self._lock_timeout_ms = int(lock_timeout_seconds * 1000)
        options: dict[str, Any] = {"autocommit": True}
        if "application_name" not in conninfo_to_dict(dsn):
            options["application_name"] = f"profilemesh {schema}"
        self._pool: ConnectionPool[_Connection] = ConnectionPool(
            dsn,
            min_size=min(pool_min, pool_max),
            max_size=pool_max,
            kwargs=options,
            configure=self._configure,
            check=ConnectionPool.check_connection,
            timeout=connect_timeout_seconds,
            name=f"profilemesh-{schema}",
            open=False,
        )
        try:
            self._pool.open(wait=pool_min > 0, timeout=connect_timeout_seconds)
            self._bootstrap()
        except PoolTimeout:
            self._pool.close()
            raise PostgresUnreachable(
                f"PostgreSQL did not accept connections within {connect_timeout_seconds:g} s"
                f" ({_where(dsn)}): check PROFILEMESH_POSTGRES__DSN and the server"
            ) from None
        except BaseException:
            self._pool.close()
            raise

    def _configure(self, connection: _Connection) -> None:
        """Every pooled connection works in the store's schema, and gives up on a lock after
        the timeout (like SQLite's busy timeout) instead of waiting forever."""
        connection.execute(
            pgsql.SQL("SET search_path TO {}").format(pgsql.Identifier(self.schema_name))
        )
        connection.execute(
            pgsql.SQL("SET lock_timeout = {}").format(pgsql.Literal(f"{self._lock_timeout_ms}ms"))
        )

    def _bootstrap(self) -> None:
        with self._pool.connection() as connection, connection.transaction():
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (self._key,))
            for statement in _BOOTSTRAP:
                connection.execute(
                    pgsql.SQL(statement).format(schema=pgsql.Identifier(self.schema_name))
                )

    # -- schema ---------------------------------------------------------------------------------

    def schema(self, sql: str) -> None:
        """Apply ``sql`` (SQLite dialect, e.g. ``CREATE TABLE IF NOT EXISTS``) once: in
        one transaction under the store's lock, recorded by its hash (see the module).

        Its tables are learned whether it runs or was applied before: the translation of later
        statements depends on them. Raises :class:`.UntranslatableSql` before running anything
        if a statement cannot be translated.
        """
        statements = self.dialect.translate_script(sql)
        digest = hashlib.sha256(sql.encode()).hexdigest()
        with self._locked() as connection:
            applied = connection.execute(
                "SELECT 1 FROM schema_migrations WHERE digest = %s", (digest,)
            ).fetchone()
            if applied is None:
                for statement in statements:
                    connection.execute(statement, ())  # () so that %% reads as %
                connection.execute(
                    "INSERT INTO schema_migrations (digest, script) VALUES (%s, %s)",
                    (digest, sql),
                )

    def ensure_column(self, table: str, column: str, declaration: str) -> None:
        """Add ``column`` (declared in SQLite's dialect, e.g. ``TEXT``) to ``table`` unless it
        has it: how a store made by an earlier version gains a column added since.
        ``declaration`` must allow the existing rows (nullable, or with a default)."""
        [statement] = self.dialect.translate_script(
            f"ALTER TABLE {table} ADD COLUMN {column} {declaration}"
        )
        with self._locked() as connection:
            exists = connection.execute(
                "SELECT 1 FROM information_schema.columns"
                " WHERE table_schema = %s AND table_name = %s AND column_name = %s",
                (self.schema_name, table, column),
            ).fetchone()
            if exists is None:
                connection.execute(statement, ())

    # -- transactions ---------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[_Connection]:
        """A transaction holding the store's advisory lock (and, in this process, its lock)."""
        with self._lock, self._pool.connection() as connection, connection.transaction():
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (self._key,))
            yield connection

    @contextmanager
    def transaction(self) -> Iterator[PostgresConnection]:
        """A write transaction: committed on normal exit, else rolled back. It holds the
        store's advisory lock from its start, so write transactions of the store, in any
        replica, run one after the other."""
        with self._locked() as connection:
            yield PostgresConnection(connection, self.dialect)

    def read(self, query: Callable[[PostgresConnection], T]) -> T:
        """Run ``query`` in a read-only ``REPEATABLE READ`` transaction (one snapshot of what
        was committed) on a pooled connection, without waiting for a writer."""
        with self._pool.connection() as connection, connection.transaction():
            connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            return query(PostgresConnection(connection, self.dialect))

    # -- offsets --------------------------------------------------------------------------------

    def committed(self, consumer: str, stream: str) -> dict[int, int]:
        with self._pool.connection() as connection:
            rows = connection.execute(
                "SELECT partition, next_offset FROM consumer_offsets"
                " WHERE consumer = %s AND stream = %s",
                (consumer, stream),
            ).fetchall()
        return {int(partition): int(offset) for partition, offset in rows}

    def committed_offset(
        self, tx: PostgresConnection, consumer: str, stream: str, partition: int
    ) -> int | None:
        row = tx.connection.execute(
            "SELECT next_offset FROM consumer_offsets"
            " WHERE consumer = %s AND stream = %s AND partition = %s",
            (consumer, stream, partition),
        ).fetchone()
        return None if row is None else int(row[0])

    def commit_offset(
        self, tx: PostgresConnection, consumer: str, stream: str, partition: int, next_offset: int
    ) -> None:
        tx.connection.execute(
            "INSERT INTO consumer_offsets (consumer, stream, partition, next_offset)"
            " VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (consumer, stream, partition)"
            " DO UPDATE SET next_offset = excluded.next_offset",
            (consumer, stream, partition, next_offset),
        )

    # -- erasure and shutdown -------------------------------------------------------------------

    def scrub(self) -> bool:
        """Nothing to do here: a deleted row is unreachable through SQL as soon as the deleting
        transaction commits, and VACUUM (autovacuum) reclaims its space. Its bytes may linger
        in data files and WAL until then; rewriting the files at once (``VACUUM FULL``,
        ``pg_repack``) is the operator's tool, not a service's. Always True."""
        return True

    def close(self) -> None:
        """Close the pool (waiting for a transaction in progress in this process to end)."""
        with self._lock:
            self._pool.close()

    def __repr__(self) -> str:
        return f"PostgresConsumerStore(schema={self.schema_name!r})"


__all__ = [
    "PostgresConnection",
    "PostgresConsumerStore",
    "PostgresCursor",
    "Row",
    "UntranslatableSql",
    "advisory_key",
]
