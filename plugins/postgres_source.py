"""The ``postgres`` source connector: rows of a table or query, read incrementally by a cursor.

Each batch is one keyset-paginated query::

    SELECT * FROM (<table or query>) AS source
    WHERE (cursor, key) > (<last cursor>, <last key>)
    ORDER BY cursor, key LIMIT <batch_size>

The checkpoint is the last row's cursor and key, with their types, so a timestamp stays a
timestamp (and a naive one naive) after the JSON round trip. A cursor that grows with every
change (``updated_at``, a serial id) makes the next run read exactly the rows added or changed
since. ``key`` (a unique column, e.g. the primary key) breaks ties between rows with the same
cursor; without one the cursor must be unique itself. Rows whose cursor or key is NULL are never
read. Rows committed late with a cursor below the checkpoint (a long transaction that took its
``updated_at`` before a faster one) are missed: use a cursor assigned at commit, or re-run with
``full_refresh``.

With ``kind: events`` the ``json_column`` holds each Segment event (json, jsonb or text); with
``kind: records`` each row goes through the ``mapping``. Values are bound as SQL literals, so a
query may contain ``%`` freely. Credentials can stay out of the configuration (which is stored
with the run): libpq reads ``PGPASSWORD`` and ``~/.pgpass`` of the ingestion process.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from profilemesh.shared.errors import FailedPrecondition, InvalidArgument, Unavailable
from profilemesh.shared.extension_points import (
    BatchKind,
    Checkpoint,
    JSONObject,
    JSONValue,
    SourceBatch,
    SourceConnector,
)
from profilemesh.shared.hookspecs import hookimpl
from profilemesh.shared.record_rows import Problem, RecordMapping, json_value


class PostgresSourceConfig(BaseModel):
    """Where to read, in what order, and what the rows are."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    dsn: str = Field(min_length=1)
    """libpq connection string or URI, e.g. ``postgresql://reader@db:5432/crm``."""
    table: str | None = Field(default=None, min_length=1)
    """The table (or view) to read, optionally schema-qualified (``crm.customers``)."""
    query: str | None = Field(default=None, min_length=1, validate_default=True)
    """A SELECT to read instead of a table; its columns include the cursor and key."""
    cursor_column: str = Field(min_length=1)
    """The column rows are read in order of, and resumed after."""
    key_column: str | None = Field(default=None, min_length=1)
    """A unique column breaking ties between equal cursors; unset when the cursor is unique."""
    kind: BatchKind = "events"
    """``events`` (Segment-spec events, with ``json_column``) or ``records`` (with ``mapping``)."""
    json_column: str | None = Field(default=None, min_length=1, validate_default=True)
    """For ``events``: the column holding each Segment event as JSON."""
    mapping: RecordMapping | None = Field(default=None, validate_default=True)
    """For ``records``: which columns hold the record id, identifiers and attributes."""
    batch_size: int = Field(default=500, ge=1, le=10_000)
    """Rows per query: each batch is stored with its checkpoint before the next is read."""
    connect_timeout_seconds: int = Field(default=10, ge=1, le=300)
    """How long connecting may take before the run fails as unavailable."""

    @field_validator("query")
    @classmethod
    def _table_or_query(cls, query: str | None, info: ValidationInfo) -> str | None:
        if (query is None) == (info.data.get("table") is None):
            raise ValueError("give exactly one of table and query")
        return query

    @field_validator("json_column")
    @classmethod
    def _json_column_for_events(cls, column: str | None, info: ValidationInfo) -> str | None:
        kind = info.data.get("kind")  # absent when ``kind`` itself was invalid
        if kind == "events" and column is None:
            raise ValueError("required when kind is 'events'")
        if kind == "records" and column is not None:
            raise ValueError("only used when kind is 'events'")
        return column

    @field_validator("mapping")
    @classmethod
    def _mapping_for_records(
        cls, mapping: RecordMapping | None, info: ValidationInfo
    ) -> RecordMapping | None:
        kind = info.data.get("kind")
        if kind == "records" and mapping is None:
            raise ValueError("required when kind is 'records'")
        if kind == "events" and mapping is not None:
            raise ValueError("only used when kind is 'records'")
        return mapping


class PostgresSource(SourceConnector):
    """Rows of a PostgreSQL table or query after the checkpoint's cursor; see the module."""

    name = "postgres"
    description = "Events or customer records from a PostgreSQL table or query, incrementally."
    config_model = PostgresSourceConfig
    config: PostgresSourceConfig

    def __init__(self, config: Mapping[str, object] | BaseModel) -> None:
        super().__init__(config)
        self._connection: psycopg.Connection[dict[str, Any]] | None = None

    def check(self) -> None:
        """The database answers, the table or query runs, and has the configured columns."""
        try:
            with self._connect() as connection:
                cursor = connection.execute(
                    sql.SQL("SELECT * FROM {} LIMIT 0").format(self._source())
                )
                columns = {column.name for column in cursor.description or ()}
        except psycopg.OperationalError as error:
            raise Unavailable(f"cannot reach PostgreSQL: {_first_line(error)}") from None
        except psycopg.Error as error:
            raise FailedPrecondition(f"PostgreSQL refused the read: {_first_line(error)}") from None
        missing = sorted(set(self._required_columns()) - columns)
        if missing:
            raise FailedPrecondition(
                f"the rows have no column {', '.join(map(repr, missing))}; they have "
                f"{', '.join(sorted(columns)) or 'none'}"
            )

    def read(self, checkpoint: Checkpoint | None) -> Iterator[SourceBatch]:
        """Yield batches of rows after the checkpoint (all rows without one), in cursor order."""
        after = _decode_checkpoint(checkpoint, self.config.key_column is not None)
        while True:
            rows = self._fetch(after)
            if not rows:
                return
            last = rows[-1]
            after = (last[self.config.cursor_column], *self._key_of(last))
            items, problems = self._convert(rows)
            yield SourceBatch(self.config.kind, items, _encode_checkpoint(after), problems)
            if len(rows) < self.config.batch_size:
                return

    def close(self) -> None:
        """Close the connection ``read`` opened."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _fetch(self, after: tuple[object, ...] | None) -> list[dict[str, Any]]:
        config = self.config
        order = [sql.Identifier(config.cursor_column)]
        if config.key_column is not None:
            order.append(sql.Identifier(config.key_column))
        conditions = [sql.SQL("{} IS NOT NULL").format(column) for column in order]
        if after is not None:
            conditions.append(
                sql.SQL("({}) > ({})").format(
                    sql.SQL(", ").join(order), sql.SQL(", ").join(map(sql.Literal, after))
                )
            )
        query = sql.SQL("SELECT * FROM {} WHERE {} ORDER BY {} LIMIT {}").format(
            self._source(),
            sql.SQL(" AND ").join(conditions),
            sql.SQL(", ").join(order),
            sql.Literal(config.batch_size),
        )
        try:
            if self._connection is None:
                self._connection = self._connect()
            return self._connection.execute(query).fetchall()
        except psycopg.OperationalError as error:
            self.close()  # a broken connection is not reused; the run is retried from here
            raise Unavailable(f"PostgreSQL failed mid-read: {_first_line(error)}") from None
        except psycopg.Error as error:
            raise FailedPrecondition(f"PostgreSQL refused the read: {_first_line(error)}") from None

    def _convert(self, rows: list[dict[str, Any]]) -> tuple[list[JSONObject], list[Problem]]:
        located = [(self._location(row), row) for row in rows]
        if self.config.mapping is not None:
            return self.config.mapping.convert(located)
        items: list[JSONObject] = []
        problems: list[Problem] = []
        column = self.config.json_column
        assert column is not None  # the config requires one for events
        for where, row in located:
            value: object = row.get(column)
            if isinstance(value, str):  # a text column: psycopg decodes json and jsonb itself
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as error:
                    problems.append((where, f"{column}: not JSON: {error.msg}"))
                    continue
            plain = json_value(value)
            if isinstance(plain, dict):
                items.append(plain)
            else:
                problems.append((where, f"{column}: expected a JSON object, got {value!r:.40}"))
        return items, problems

    def _location(self, row: Mapping[str, object]) -> str:
        parts = [f"{self.config.cursor_column}={row[self.config.cursor_column]}"]
        if self.config.key_column is not None:
            parts.append(f"{self.config.key_column}={row[self.config.key_column]}")
        return "row " + ", ".join(parts)

    def _key_of(self, row: Mapping[str, object]) -> tuple[object, ...]:
        return () if self.config.key_column is None else (row[self.config.key_column],)

    def _source(self) -> sql.Composable:
        if self.config.table is not None:
            table = sql.Identifier(*self.config.table.split("."))
            return sql.SQL("{} AS source").format(table)
        assert self.config.query is not None  # the config requires a table or a query
        return sql.SQL("({}) AS source").format(sql.SQL(self.config.query))

    def _required_columns(self) -> list[str]:
        config = self.config
        columns = [config.cursor_column, config.key_column, config.json_column]
        if config.mapping is not None:
            columns.append(config.mapping.record_id)
        return [column for column in columns if column is not None]

    def _connect(self) -> psycopg.Connection[dict[str, Any]]:
        try:
            return psycopg.connect(
                self.config.dsn,
                autocommit=True,  # each batch is its own snapshot; nothing to keep open
                row_factory=dict_row,
                connect_timeout=self.config.connect_timeout_seconds,
            )
        except psycopg.OperationalError as error:
            raise Unavailable(f"cannot connect to PostgreSQL: {_first_line(error)}") from None


# -- typed checkpoint values -------------------------------------------------------------------

_DECODERS: dict[str, Callable[[Any], object]] = {
    "int": int,
    "float": float,
    "decimal": Decimal,
    "text": str,
    "uuid": uuid.UUID,
    "date": date.fromisoformat,
    "timestamp": datetime.fromisoformat,
    "timestamptz": datetime.fromisoformat,
}


def _encode(value: object) -> dict[str, JSONValue]:
    """A cursor or key value as ``{"type": ..., "value": ...}`` that survives JSON."""
    kind: str
    encoded: JSONValue
    if isinstance(value, bool):
        kind, encoded = "bool", value
    elif isinstance(value, int):
        kind, encoded = "int", value
    elif isinstance(value, float):
        kind, encoded = "float", value
    elif isinstance(value, Decimal):
        kind, encoded = "decimal", str(value)
    elif isinstance(value, str):
        kind, encoded = "text", value
    elif isinstance(value, uuid.UUID):
        kind, encoded = "uuid", str(value)
    elif isinstance(value, datetime):
        kind, encoded = ("timestamptz" if value.tzinfo else "timestamp"), value.isoformat()
    elif isinstance(value, date):
        kind, encoded = "date", value.isoformat()
    else:
        raise FailedPrecondition(
            f"a cursor or key of type {type(value).__name__} cannot be checkpointed; use a "
            "number, text, uuid, date or timestamp column"
        )
    return {"type": kind, "value": encoded}


def _decode(field: str, encoded: object) -> object:
    if not isinstance(encoded, Mapping) or set(encoded) != {"type", "value"}:
        raise InvalidArgument.for_field(field, "expected {'type': ..., 'value': ...}")
    kind, value = encoded["type"], encoded["value"]
    if kind == "bool" and isinstance(value, bool):
        return value
    decoder = _DECODERS.get(kind) if isinstance(kind, str) else None
    try:
        if decoder is None:
            raise ValueError(f"unknown type {kind!r}")
        return decoder(value)
    except (ValueError, TypeError, ArithmeticError) as error:
        raise InvalidArgument.for_field(field, f"cannot read {value!r}: {error}") from None


def _encode_checkpoint(after: tuple[object, ...]) -> Checkpoint:
    checkpoint = {"cursor": _encode(after[0])}
    if len(after) > 1:
        checkpoint["key"] = _encode(after[1])
    return checkpoint


def _decode_checkpoint(checkpoint: Checkpoint | None, keyed: bool) -> tuple[object, ...] | None:
    if checkpoint is None:
        return None
    if "cursor" not in checkpoint or keyed != ("key" in checkpoint):
        wanted = "cursor and key" if keyed else "cursor"
        raise InvalidArgument.for_field(
            "checkpoint", f"expected {wanted}, got {sorted(checkpoint)}"
        )
    after = [_decode("checkpoint.cursor", checkpoint["cursor"])]
    if keyed:
        after.append(_decode("checkpoint.key", checkpoint["key"]))
    return tuple(after)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


@hookimpl
def register_sources(register: Callable[[type[SourceConnector]], None]) -> None:
    """Register the ``postgres`` connector."""
    register(PostgresSource)
