"""The ``csv``, ``jsonl`` and ``parquet`` source connectors: events or customer records in a file.

With ``kind: events`` each row is a Segment-spec event; with ``kind: records`` each row is a
flat customer record turned into a ``CustomerRecord`` by the configured ``mapping``. Rows that
cannot be used (invalid JSON, a missing record id, a ragged CSV line) are reported as the
batch's problems and skipped, so one bad row never stops an import.

Checkpoints are positions: the number of data rows consumed for CSV and Parquet, the byte
offset (and line number, for messages) for JSON Lines, which resumes without re-reading what
came before. A file is expected to be complete when read (written elsewhere, then moved into
place); a file that shrank below its checkpoint fails the run rather than silently re-reading.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from profilemesh.shared.errors import FailedPrecondition, InvalidArgument
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


@dataclass(frozen=True, slots=True)
class _Read:
    """One row read from a file, or why it could not be: and where it is (``line 17``)."""

    where: str
    row: JSONObject | None = None
    problem: str = ""


EVENT_OBJECT_COLUMNS = frozenset({"properties", "traits", "context", "integrations"})
"""CSV columns holding a whole JSON object of a Segment event."""

MAX_LINE_BYTES = 1024 * 1024
"""Longest JSON Lines line read; a longer one is a problem of its row (an event is at most
``max_event_bytes``, 32 KB by default, once ingested)."""


class FileSourceConfig(BaseModel):
    """What every file connector is configured with."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    path: Path
    """The file to read."""
    kind: BatchKind = "events"
    """``events`` (Segment-spec events) or ``records`` (customer rows, with ``mapping``)."""
    mapping: RecordMapping | None = Field(default=None, validate_default=True)
    """For ``records``: which columns hold the record id, identifiers and attributes."""
    batch_size: int = Field(default=500, ge=1, le=10_000)
    """Rows per batch: each batch is stored with its checkpoint before the next is read."""

    @field_validator("mapping")
    @classmethod
    def _mapping_matches_kind(
        cls, mapping: RecordMapping | None, info: ValidationInfo
    ) -> RecordMapping | None:
        kind = info.data.get("kind")  # absent when ``kind`` itself was invalid
        if kind == "records" and mapping is None:
            raise ValueError("required when kind is 'records'")
        if kind == "events" and mapping is not None:
            raise ValueError("only used when kind is 'records'")
        return mapping


class CsvSourceConfig(FileSourceConfig):
    """A CSV file with a header line."""

    delimiter: str = Field(default=",", min_length=1, max_length=1)
    """The character between cells, e.g. ``;`` or a tab."""
    encoding: str = "utf-8"
    """The file's text encoding, e.g. ``utf-8-sig`` for a file saved by Excel."""


class _FileSource(SourceConnector):
    """What the file connectors share: the file check and turning rows into batches."""

    config: FileSourceConfig

    def check(self) -> None:
        """The file exists and can be read."""
        path = self.config.path
        if not path.is_file():
            raise FailedPrecondition(f"{path} is not a file")
        if not os.access(path, os.R_OK):
            raise FailedPrecondition(f"{path} is not readable")

    def _batches(
        self,
        reads: Iterable[_Read],
        checkpoint_after: Callable[[int], Checkpoint],
    ) -> Iterator[SourceBatch]:
        """Group ``reads`` into batches; a batch's checkpoint is ``checkpoint_after(rows read so
        far)``, called right after its last row is read."""
        consumed = 0
        batch: list[_Read] = []
        for read in reads:
            batch.append(read)
            if len(batch) == self.config.batch_size:
                consumed += len(batch)
                yield self._batch(batch, checkpoint_after(consumed))
                batch = []
        if batch:
            consumed += len(batch)
            yield self._batch(batch, checkpoint_after(consumed))

    def _batch(self, reads: list[_Read], checkpoint: Checkpoint) -> SourceBatch:
        problems: list[Problem] = [(r.where, r.problem) for r in reads if r.row is None]
        rows = [(r.where, r.row) for r in reads if r.row is not None]
        items: list[JSONObject] = [row for _, row in rows]
        if self.config.mapping is not None:
            items, unmapped = self.config.mapping.convert(rows)
            problems.extend(unmapped)
        return SourceBatch(self.config.kind, items, checkpoint, problems)


class CsvSource(_FileSource):
    """Rows of a CSV file with a header line; the checkpoint is the number of rows consumed.

    As events, columns name Segment fields: ``type``, ``messageId``, ``userId``, ``event``,
    ``timestamp`` ... ; a ``properties``, ``traits``, ``context`` or ``integrations`` column
    holds a JSON object, and dotted columns (``properties.plan``) set one key (as text).
    Empty cells are left out.
    """

    name = "csv"
    description = "Events or customer records from a CSV file with a header line."
    config_model = CsvSourceConfig
    config: CsvSourceConfig

    def read(self, checkpoint: Checkpoint | None) -> Iterator[SourceBatch]:
        """Yield the rows after the checkpoint's ``row`` (all of them without one)."""
        start = _position(checkpoint, "row")
        return self._batches(self._rows(start), lambda consumed: {"row": start + consumed})

    def _rows(self, start: int) -> Iterator[_Read]:
        config = self.config
        with config.path.open(newline="", encoding=config.encoding) as file:
            reader = csv.reader(file, delimiter=config.delimiter)
            try:
                yield from self._cells(reader, start)
            except UnicodeDecodeError as error:
                # Decoding is by blocks, not lines: the run stops rather than guess the row.
                raise FailedPrecondition(
                    f"{config.path} is not {config.encoding} text after line {reader.line_num}"
                    f" ({error.reason}): set the connector's encoding to the file's"
                ) from None

    def _cells(self, reader: Any, start: int) -> Iterator[_Read]:
        config = self.config
        try:
            header = next(reader, None)
        except csv.Error as error:
            raise FailedPrecondition(f"{config.path}: the header is not CSV: {error}") from None
        # Blank lines are no rows, here and when skipping to the checkpoint.
        lines = _csv_lines(reader)
        skipped = sum(1 for _ in islice(lines, start))
        if skipped < start:
            raise _shrunk(config.path, f"{skipped} rows", f"row {start}")
        width = len(header or ())
        for line, cells in lines:
            where = f"line {line}"
            if isinstance(cells, str):
                yield _Read(where, problem=cells)
                continue
            if len(cells) != width:
                yield _Read(where, problem=f"{len(cells)} cells; the header has {width}")
                continue
            row = {column: cell for column, cell in zip(header or (), cells, strict=True)}
            if config.kind == "records":
                yield _Read(where, {column: cell for column, cell in row.items() if cell})
                continue
            try:
                yield _Read(where, _csv_event(row))
            except ValueError as error:
                yield _Read(where, problem=str(error))


def _csv_lines(reader: Any) -> Iterator[tuple[int, list[str] | str]]:
    """Each row that is not blank as (line, cells), or as (line, why) when the csv module
    refuses it (a cell over its size limit): the reader then goes on with the next line."""
    refused_at = -1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            if reader.line_num == refused_at:  # refused again without reading on: give up
                raise FailedPrecondition(f"line {refused_at} is not CSV: {error}") from None
            refused_at = reader.line_num
            yield reader.line_num, f"not CSV: {error}"
            continue
        if cells:
            yield reader.line_num, cells


def _csv_event(row: Mapping[str, str]) -> dict[str, JSONValue]:
    """A Segment event from a CSV row; see :class:`CsvSource`."""
    event: dict[str, Any] = {}  # nested dicts built column by column
    for column, cell in row.items():
        if cell == "":
            continue
        if column in EVENT_OBJECT_COLUMNS:
            try:
                value = json.loads(cell)
            except json.JSONDecodeError as error:
                raise ValueError(f"column {column!r}: not JSON: {error}") from None
            except (ValueError, RecursionError) as error:
                raise ValueError(f"column {column!r}: {_unusable_json(error)}") from None
            if not isinstance(value, dict):
                raise ValueError(f"column {column!r}: expected a JSON object")
            event.setdefault(column, {}).update(value)
            continue
        *parents, leaf = column.split(".")
        target = event
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ValueError(f"column {column!r}: {parent!r} is not an object")
        target[leaf] = cell
    return event


class JsonlSource(_FileSource):
    """One JSON object per line; the checkpoint is the byte offset after the last line read."""

    name = "jsonl"
    description = "Events or customer records from a JSON Lines file (one object per line)."
    config_model = FileSourceConfig

    def read(self, checkpoint: Checkpoint | None) -> Iterator[SourceBatch]:
        """Yield the lines after the checkpoint's ``offset`` (all of them without one)."""
        position = {
            "offset": _position(checkpoint, "offset"),
            "line": _position(checkpoint, "line"),
        }
        # The rows generator keeps ``position`` just after the last row it yielded, which is
        # where a batch ends when it is complete.
        return self._batches(self._rows(position), lambda _: dict(position))

    def _rows(self, position: dict[str, int]) -> Iterator[_Read]:
        start, line = position["offset"], position["line"]
        with self.config.path.open("rb") as file:
            size = file.seek(0, os.SEEK_END)
            if start > size:
                raise _shrunk(self.config.path, f"{size} bytes", f"offset {start}")
            if start > 0:
                file.seek(start - 1)
                if file.read(1) != b"\n":
                    raise FailedPrecondition(
                        f"{self.config.path} changed: offset {start} of the checkpoint is not at "
                        "the start of a line; run with full_refresh to read it again"
                    )
            file.seek(start)
            offset = start
            for length, raw in _lines(file, MAX_LINE_BYTES):
                offset += length
                line += 1
                if raw is None:
                    position.update(offset=offset, line=line)
                    yield _Read(f"line {line}", problem=f"longer than {MAX_LINE_BYTES:,} bytes")
                    continue
                if not raw.strip():
                    continue  # blank lines hold no row; they are not problems either
                position.update(offset=offset, line=line)
                yield _json_row(f"line {line}", raw)


def _lines(file: BinaryIO, limit: int) -> Iterator[tuple[int, bytes | None]]:
    """(length, line) for each line of ``file``; a line longer than ``limit`` bytes is read
    past in pieces and comes as (length, None), so that no line is ever held whole (a file
    without line breaks would otherwise be read into memory at once)."""
    while raw := file.readline(limit + 1):
        if len(raw) <= limit or raw.endswith(b"\n"):
            yield len(raw), raw
            continue
        length = len(raw)
        while raw and not raw.endswith(b"\n"):
            raw = file.readline(1 << 20)
            length += len(raw)
        yield length, None


def _json_row(where: str, raw: bytes) -> _Read:
    try:
        value = json.loads(raw)
    except UnicodeDecodeError as error:
        return _Read(where, problem=f"not UTF-8 text: {error.reason}")
    except json.JSONDecodeError as error:
        return _Read(where, problem=f"not JSON: {error.msg} at column {error.colno}")
    except (ValueError, RecursionError) as error:
        return _Read(where, problem=_unusable_json(error))
    if not isinstance(value, dict):
        return _Read(where, problem=f"expected a JSON object, got {type(value).__name__}")
    return _Read(where, value)


def _unusable_json(error: ValueError | RecursionError) -> str:
    """Why JSON that parses could not be read: ``json.loads`` refuses nesting past Python's
    recursion limit and integers past its digit limit."""
    if isinstance(error, RecursionError):
        return "not usable JSON: nested too deeply"
    return f"not usable JSON: a number has more than {sys.get_int_max_str_digits():,} digits"


class ParquetSource(_FileSource):
    """Rows of a Parquet file; the checkpoint is the number of rows consumed.

    Column values become JSON (times as ISO 8601 text, structs as objects), so nested Segment
    events stored with struct columns for ``context`` and ``properties`` read naturally.
    """

    name = "parquet"
    description = "Events or customer records from a Parquet file."
    config_model = FileSourceConfig

    def check(self) -> None:
        """The file exists and is Parquet."""
        super().check()
        try:
            pq.ParquetFile(self.config.path).close()
        except Exception as error:  # pyarrow raises several types for a file it cannot read
            raise FailedPrecondition(f"{self.config.path} is not a Parquet file: {error}") from None

    def read(self, checkpoint: Checkpoint | None) -> Iterator[SourceBatch]:
        """Yield the rows after the checkpoint's ``row`` (all of them without one)."""
        start = _position(checkpoint, "row")
        return self._batches(self._rows(start), lambda consumed: {"row": start + consumed})

    def _rows(self, start: int) -> Iterator[_Read]:
        with pq.ParquetFile(self.config.path) as file:
            total = file.metadata.num_rows
            if start > total:
                raise _shrunk(self.config.path, f"{total} rows", f"row {start}")
            # Skip whole row groups before the checkpoint without decoding them.
            group, group_start = 0, 0
            while group < file.num_row_groups:
                rows_in_group = file.metadata.row_group(group).num_rows
                if group_start + rows_in_group > start:
                    break
                group, group_start = group + 1, group_start + rows_in_group
            number = group_start
            groups = list(range(group, file.num_row_groups))
            if not groups:
                return
            for batch in file.iter_batches(batch_size=self.config.batch_size, row_groups=groups):
                for row in batch.to_pylist():
                    number += 1
                    if number > start:
                        value = json_value(row)
                        assert isinstance(value, dict)  # a table row is a mapping of columns
                        yield _Read(f"row {number}", value)


def _position(checkpoint: Checkpoint | None, key: str) -> int:
    """A non-negative integer from the checkpoint; 0 without one."""
    if checkpoint is None:
        return 0
    value = checkpoint.get(key, 0)
    # bool is an int in Python; a checkpoint of ``True`` is corrupt, not row 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument.for_field(
            f"checkpoint.{key}", f"must be a non-negative integer, not {value!r}"
        )
    return value


def _shrunk(path: Path, has: str, wanted: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"{path} has only {has}, fewer than the checkpoint's {wanted}: the file was replaced or "
        "truncated; run with full_refresh to read it again"
    )


@hookimpl
def register_sources(register: Callable[[type[SourceConnector]], None]) -> None:
    """Register the ``csv``, ``jsonl`` and ``parquet`` connectors."""
    register(CsvSource)
    register(JsonlSource)
    register(ParquetSource)
