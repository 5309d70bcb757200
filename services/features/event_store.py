"""The events features are computed from: what backfills, point-in-time queries and unmerges read.

The streaming state answers "now" in O(1); anything else — a feature as of a past time, a new
definition over old events, a profile split in two — needs the events themselves. Each event
resolved to a profile is kept with the identifier that anchors it (its highest-priority
identifier), so that an unmerge can tell which of the resulting profiles it belongs to.

:class:`EventStore` is the interface; DuckDB is the query engine of both implementations (a
reader is a DuckDB connection with the view :data:`VIEW`):

- :class:`DuckDBEventStore` (embedded backend): a DuckDB file beside the consumer's SQLite
  store. Rows are written before their batch's offsets commit, tagged with their log position;
  at start-up, rows past the committed offsets are from a batch that never committed (the
  consumer will apply it again), and are deleted; merges and unmerges rewrite ``profile_id``
  idempotently, so repeating them is harmless.
- :class:`~.postgres_events.PostgresEventStore` (``postgres`` backend): a table in features'
  store schema, written in the consumer's transaction, shared by every replica.
"""

from __future__ import annotations

import json
import math
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from profilemesh.services.features.events import FeatureEvent

VIEW = "feature_events"
"""The view with the columns the batch queries read (profile_id, timestamp_ns, type, name,
properties, context)."""

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS events (
    log_partition INTEGER NOT NULL,
    log_offset BIGINT NOT NULL,
    profile_id VARCHAR NOT NULL,
    anchor VARCHAR NOT NULL,
    timestamp_ns BIGINT NOT NULL,
    type VARCHAR NOT NULL,
    name VARCHAR NOT NULL,
    properties VARCHAR,
    context VARCHAR
);
CREATE OR REPLACE VIEW {VIEW} AS
    SELECT profile_id, timestamp_ns, type, name, properties, context FROM events;
"""

ROW_SCHEMA = pa.schema(
    [
        pa.field("log_partition", pa.int32()),
        pa.field("log_offset", pa.int64()),
        pa.field("profile_id", pa.string()),
        pa.field("anchor", pa.string()),
        pa.field("timestamp_ns", pa.int64()),
        pa.field("type", pa.string()),
        pa.field("name", pa.string()),
        pa.field("properties", pa.string()),
        pa.field("context", pa.string()),
    ]
)


def _json(value: Any) -> str | None:
    """JSON text of a mapping; NaN and infinities (which JSON cannot hold, and which every
    aggregation skips as non-numeric anyway) become null."""
    if not value:
        return None
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False, default=str)
    except ValueError:
        return json.dumps(_finite(value), separators=(",", ":"), default=str)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


class PendingRows:
    """Rows of one batch, gathered column by column before one insert."""

    def __init__(self) -> None:
        self.columns: dict[str, list[Any]] = {field.name: [] for field in ROW_SCHEMA}

    def add(self, partition: int, offset: int, anchor: str, event: FeatureEvent) -> None:
        columns = self.columns
        columns["log_partition"].append(partition)
        columns["log_offset"].append(offset)
        columns["profile_id"].append(event.profile_id)
        columns["anchor"].append(anchor)
        columns["timestamp_ns"].append(event.timestamp_ns)
        columns["type"].append(event.type)
        columns["name"].append(event.name)
        columns["properties"].append(_json(event.properties))
        columns["context"].append(_json(event.context))

    def __len__(self) -> int:
        return len(self.columns["log_offset"])

    def take(self) -> pa.Table:
        table = pa.table(self.columns, schema=ROW_SCHEMA)
        self.columns = {field.name: [] for field in ROW_SCHEMA}
        return table


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class EventStore(ABC):
    """Where the events are kept, written by the consumer's handler and read by queries.

    Writes happen inside the consumer's transaction (see :meth:`within`); reads see a
    consistent snapshot of what was written.
    """

    def within(self, tx: object) -> AbstractContextManager[None]:
        """While the block runs, this thread's writes and :meth:`events_of` go through the
        consumer's transaction ``tx``, where the store can (so they commit or roll back with
        the offsets). The embedded store writes its own file and ignores it."""
        return nullcontext()

    @abstractmethod
    def close(self) -> None:
        """Release the store's resources."""

    @abstractmethod
    def reader(self) -> AbstractContextManager[duckdb.DuckDBPyConnection]:
        """A DuckDB connection of its own in which :data:`VIEW` holds the stored events, for a
        query running beside the consumer's writes."""

    @abstractmethod
    def discard_uncommitted(self, committed: dict[int, int]) -> int:
        """Delete rows written by a batch that never committed (past the ``committed``
        offsets); how many there were."""

    @abstractmethod
    def count(self) -> int:
        """How many events are stored."""

    @abstractmethod
    def append(self, rows: PendingRows) -> None:
        """Store ``rows`` (and empty them)."""

    @abstractmethod
    def reassign(self, profile_ids: Sequence[str], to: str) -> None:
        """Events of ``profile_ids`` now belong to ``to`` (a merge)."""

    @abstractmethod
    def reassign_anchors(self, of: Sequence[str], anchors: Iterable[str], to: str) -> None:
        """Events of profiles ``of`` anchored on ``anchors`` now belong to ``to`` (an unmerge)."""

    @abstractmethod
    def delete_profiles(self, profile_ids: Sequence[str]) -> None:
        """Forget every event of ``profile_ids`` (an erasure)."""

    @abstractmethod
    def scrub(self) -> bool:
        """Make deleted rows unrecoverable from the store's files, as far as the store can;
        True when done (a deletion reporter's scrubber)."""

    @abstractmethod
    def events_of(self, profile_ids: Sequence[str]) -> dict[str, list[FeatureEvent]]:
        """Every stored event of ``profile_ids``, in log order per profile."""

    @abstractmethod
    def profile_ids(self) -> list[str]:
        """Every profile with a stored event, sorted."""


def stored_event(
    profile_id: str,
    timestamp_ns: int,
    kind: str,
    name: str,
    properties: str | None,
    context: str | None,
) -> FeatureEvent:
    """The event of a stored row (properties and context as JSON text)."""
    return FeatureEvent(
        profile_id=profile_id,
        timestamp_ns=timestamp_ns,
        type=kind,
        name=name,
        properties=json.loads(properties) if properties else {},
        context=json.loads(context) if context else {},
    )


class DuckDBEventStore(EventStore):
    """One DuckDB database file; the consumer writes, queries read through their own cursors."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._connection = duckdb.connect(str(path))
        self._connection.execute(_SCHEMA)
        self._write_lock = threading.Lock()
        # Readers run beside writes, but not beside :meth:`scrub`, which replaces the file.
        self._readers = threading.Condition()
        self._active_readers = 0
        self._replacing = False

    def close(self) -> None:
        self._connection.close()

    @contextmanager
    def reader(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor of its own, for a query running beside the consumer's writes."""
        with self._readers:
            self._readers.wait_for(lambda: not self._replacing)
            self._active_readers += 1
        try:
            cursor = self._connection.cursor()
            try:
                yield cursor
            finally:
                cursor.close()
        finally:
            with self._readers:
                self._active_readers -= 1
                self._readers.notify_all()

    def discard_uncommitted(self, committed: dict[int, int]) -> int:
        """Delete rows at or past the committed offsets (their batch never committed)."""
        with self._write_lock:
            before = self.count()
            partitions = sorted(committed)
            condition = " AND ".join(
                f"NOT (log_partition = {p} AND log_offset < {committed[p]})" for p in partitions
            )
            self._connection.execute(f"DELETE FROM events WHERE {condition or 'TRUE'}")
            return before - self.count()

    def count(self) -> int:
        [(rows,)] = self._connection.execute("SELECT count(*) FROM events").fetchall()
        return int(rows)

    def append(self, rows: PendingRows) -> None:
        if not len(rows):
            return
        table = rows.take()
        with self._write_lock:
            self._connection.register("incoming_rows", table)
            try:
                self._connection.execute("INSERT INTO events SELECT * FROM incoming_rows")
            finally:
                self._connection.unregister("incoming_rows")

    def reassign(self, profile_ids: Sequence[str], to: str) -> None:
        """Events of ``profile_ids`` now belong to ``to`` (a merge)."""
        with self._write_lock:
            self._connection.execute(
                "UPDATE events SET profile_id = ? WHERE list_contains(?, profile_id)",
                [to, list(profile_ids)],
            )

    def reassign_anchors(self, of: Sequence[str], anchors: Iterable[str], to: str) -> None:
        """Events of profiles ``of`` anchored on ``anchors`` now belong to ``to`` (an unmerge)."""
        with self._write_lock:
            self._connection.execute(
                "UPDATE events SET profile_id = ?"
                " WHERE list_contains(?, profile_id) AND list_contains(?, anchor)",
                [to, list(of), list(anchors)],
            )

    def delete_profiles(self, profile_ids: Sequence[str]) -> None:
        with self._write_lock:
            self._connection.execute(
                "DELETE FROM events WHERE list_contains(?, profile_id)", [list(profile_ids)]
            )

    def scrub(self) -> bool:
        """Write the database afresh, so that rows deleted for an erasure are gone from the
        file: DuckDB leaves a deleted row's bytes in the blocks it frees until they happen to
        be reused. The live rows are copied into a new file that replaces the old one; reads
        wait for the swap. Costs a copy of the store, so the deletion reporter calls it once
        for all the deletions it reports at a time. Always True."""
        fresh = self.path.with_name(f"{self.path.stem}.scrub{self.path.suffix}")
        with self._write_lock:
            with self._readers:
                self._replacing = True
                self._readers.wait_for(lambda: self._active_readers == 0)
            try:
                for leftover in (fresh, fresh.with_name(fresh.name + ".wal")):
                    leftover.unlink(missing_ok=True)
                [(current,)] = self._connection.execute("SELECT current_database()").fetchall()
                self._connection.execute(f"ATTACH '{fresh}' AS scrubbed")
                self._connection.execute(f'COPY FROM DATABASE "{current}" TO scrubbed')
                # Everything in the new file itself, none of it in a WAL left behind.
                self._connection.execute("CHECKPOINT scrubbed")
                self._connection.execute("DETACH scrubbed")
                self._connection.close()
                os.replace(fresh, self.path)
                self.path.with_name(self.path.name + ".wal").unlink(missing_ok=True)
                _fsync_directory(self.path.parent)
                self._connection = duckdb.connect(str(self.path))
                self._connection.execute(_SCHEMA)
            finally:
                with self._readers:
                    self._replacing = False
                    self._readers.notify_all()
        return True

    def events_of(self, profile_ids: Sequence[str]) -> dict[str, list[FeatureEvent]]:
        """Every stored event of ``profile_ids``, in log order per profile."""
        found: dict[str, list[FeatureEvent]] = {p: [] for p in profile_ids}
        with self.reader() as cursor:
            rows = cursor.execute(
                "SELECT profile_id, timestamp_ns, type, name, properties, context FROM events"
                " WHERE list_contains(?, profile_id) ORDER BY log_partition, log_offset",
                [list(profile_ids)],
            ).fetchall()
        for row in rows:
            found[row[0]].append(stored_event(*row))
        return found

    def profile_ids(self) -> list[str]:
        with self.reader() as cursor:
            rows = cursor.execute(
                "SELECT DISTINCT profile_id FROM events ORDER BY profile_id"
            ).fetchall()
        return [row[0] for row in rows]
