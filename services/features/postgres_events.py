"""The events features are computed from, in PostgreSQL: the ``postgres`` backend's event store.

On the scale-out backend every replica applies some partitions of the resolution log, and a
replica's disk does not outlive it; backfills, point-in-time queries, unmerges and the lifetime
value fit need every event. So the events are a table of features' store schema, beside the
states, shared by every replica.

Consistency. The consumer's handler runs inside :meth:`PostgresEventStore.within` its
transaction: rows are written, rewritten and deleted in the transaction that stores the states
and moves the offsets, and commit or roll back with them. Nothing is ever left from a batch that
never committed, so :meth:`~PostgresEventStore.discard_uncommitted` has nothing to do.

Reading. DuckDB stays the query engine: a reader is an in-memory DuckDB connection in which
:data:`~.event_store.VIEW` is the table's rows, copied out of one ``REPEATABLE READ`` snapshot
(``COPY ... TO STDOUT`` as CSV, parsed by Arrow's multi-threaded reader) into Arrow. Every read
copies the whole table, which the batch queries scan anyway; the writes and the lookups of
:meth:`~PostgresEventStore.events_of` go to PostgreSQL directly.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import duckdb
import psycopg
import pyarrow as pa
import pyarrow.csv as pa_csv

from profilemesh.services.features.event_store import (
    ROW_SCHEMA,
    VIEW,
    EventStore,
    PendingRows,
    stored_event,
)
from profilemesh.services.features.events import FeatureEvent
from profilemesh.shared.log.postgres_store import PostgresConnection, PostgresConsumerStore

T = TypeVar("T")

TABLE = "stored_events"

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    log_partition INTEGER NOT NULL,
    log_offset INTEGER NOT NULL,
    profile_id TEXT NOT NULL,
    anchor TEXT NOT NULL,
    timestamp_ns INTEGER NOT NULL,
    type TEXT NOT NULL,
    name TEXT NOT NULL,
    properties TEXT,
    context TEXT,
    PRIMARY KEY (log_partition, log_offset)
);
CREATE INDEX IF NOT EXISTS {TABLE}_profile ON {TABLE} (profile_id);
"""
"""The table (SQLite dialect, as every store script): the columns of the DuckDB store's."""

VIEW_COLUMNS = ("profile_id", "timestamp_ns", "type", "name", "properties", "context")
VIEW_SCHEMA = pa.schema([ROW_SCHEMA.field(name) for name in VIEW_COLUMNS])

_COPY_OUT = f"COPY (SELECT {', '.join(VIEW_COLUMNS)} FROM {TABLE}) TO STDOUT (FORMAT CSV)"
_COPY_IN = f"COPY {TABLE} ({', '.join(ROW_SCHEMA.names)}) FROM STDIN"

# CSV from COPY writes NULL unquoted and an empty string quoted (""): so only an unquoted empty
# field is null.
_CSV_PARSE = pa_csv.ParseOptions(newlines_in_values=True)
_CSV_READ = pa_csv.ReadOptions(column_names=list(VIEW_COLUMNS), block_size=8 << 20)
_CSV_CONVERT = pa_csv.ConvertOptions(
    column_types=VIEW_SCHEMA,
    null_values=[""],
    strings_can_be_null=True,
    quoted_strings_can_be_null=False,
)

_Raw = psycopg.Connection[tuple[Any, ...]]


class PostgresEventStore(EventStore):
    """The events in a table of the PostgreSQL consumer ``store`` (features' own), which it
    creates; closing it leaves the store open (the domain closes that)."""

    def __init__(self, store: PostgresConsumerStore) -> None:
        self.store = store
        store.schema(SCHEMA)
        self._joined = threading.local()

    @contextmanager
    def within(self, tx: object) -> Iterator[None]:
        if not isinstance(tx, PostgresConnection):
            raise TypeError(f"a transaction of the PostgreSQL store, not {type(tx).__name__}")
        previous = getattr(self._joined, "tx", None)
        self._joined.tx = tx
        try:
            yield
        finally:
            self._joined.tx = previous

    def _write(self, statement: Callable[[_Raw], T]) -> T:
        """Run ``statement`` in the joined transaction, or in a transaction of its own."""
        joined: PostgresConnection | None = getattr(self._joined, "tx", None)
        if joined is not None:
            return statement(joined.connection)
        with self.store.transaction() as tx:
            return statement(tx.connection)

    def _read(self, query: Callable[[_Raw], T]) -> T:
        """Run ``query`` in the joined transaction (which sees its own writes), or in a
        read-only snapshot of what was committed."""
        joined: PostgresConnection | None = getattr(self._joined, "tx", None)
        if joined is not None:
            return query(joined.connection)
        return self.store.read(lambda tx: query(tx.connection))

    def close(self) -> None:
        """Nothing of its own to release: the table lives in the store."""

    @contextmanager
    def reader(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """An in-memory DuckDB connection whose :data:`VIEW` is one snapshot of the table."""
        table = self._read(_snapshot)
        connection = duckdb.connect()
        try:
            connection.register(VIEW, table)
            yield connection
        finally:
            connection.close()

    def discard_uncommitted(self, committed: dict[int, int]) -> int:
        """Nothing to discard: rows commit or roll back with their batch's offsets."""
        return 0

    def count(self) -> int:
        [(rows,)] = self._read(lambda c: c.execute(f"SELECT count(*) FROM {TABLE}").fetchall())
        return int(rows)

    def append(self, rows: PendingRows) -> None:
        if not len(rows):
            return
        table = rows.take()

        def copy(connection: _Raw) -> None:
            with connection.cursor() as cursor, cursor.copy(_COPY_IN) as out:
                for row in zip(*(column.to_pylist() for column in table.columns), strict=True):
                    out.write_row(row)

        self._write(copy)

    def reassign(self, profile_ids: Sequence[str], to: str) -> None:
        self._write(
            lambda c: c.execute(
                f"UPDATE {TABLE} SET profile_id = %s WHERE profile_id = ANY(%s)",
                (to, list(profile_ids)),
            )
        )

    def reassign_anchors(self, of: Sequence[str], anchors: Iterable[str], to: str) -> None:
        self._write(
            lambda c: c.execute(
                f"UPDATE {TABLE} SET profile_id = %s"
                " WHERE profile_id = ANY(%s) AND anchor = ANY(%s)",
                (to, list(of), list(anchors)),
            )
        )

    def delete_profiles(self, profile_ids: Sequence[str]) -> None:
        self._write(
            lambda c: c.execute(
                f"DELETE FROM {TABLE} WHERE profile_id = ANY(%s)", (list(profile_ids),)
            )
        )

    def scrub(self) -> bool:
        """Nothing to rewrite: a deleted row is unreachable through SQL once its transaction
        commits, and (auto)vacuum reclaims its space; rewriting the data files at once
        (``VACUUM FULL``, ``pg_repack``) is the operator's tool, as for the consumer store
        (:meth:`.PostgresConsumerStore.scrub`). Always True."""
        return True

    def events_of(self, profile_ids: Sequence[str]) -> dict[str, list[FeatureEvent]]:
        found: dict[str, list[FeatureEvent]] = {p: [] for p in profile_ids}
        rows = self._read(
            lambda c: c.execute(
                f"SELECT {', '.join(VIEW_COLUMNS)} FROM {TABLE}"
                " WHERE profile_id = ANY(%s) ORDER BY log_partition, log_offset",
                (list(profile_ids),),
            ).fetchall()
        )
        for row in rows:
            found[row[0]].append(stored_event(*row))
        return found

    def profile_ids(self) -> list[str]:
        rows = self._read(
            lambda c: c.execute(
                f'SELECT DISTINCT profile_id COLLATE "C" FROM {TABLE} ORDER BY 1'
            ).fetchall()
        )
        return [row[0] for row in rows]

    def __repr__(self) -> str:
        return f"PostgresEventStore(schema={self.store.schema_name!r})"


def _snapshot(connection: _Raw) -> pa.Table:
    """The view's columns of every row, as Arrow, copied out in one statement."""
    buffer = io.BytesIO()
    with connection.cursor() as cursor, cursor.copy(_COPY_OUT) as copied:
        for chunk in copied:
            buffer.write(chunk)
    if not buffer.tell():
        return VIEW_SCHEMA.empty_table()
    buffer.seek(0)
    return pa_csv.read_csv(
        buffer, read_options=_CSV_READ, parse_options=_CSV_PARSE, convert_options=_CSV_CONVERT
    )
