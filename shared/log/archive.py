"""Compacting old segments of a log into Parquet, and reading them back.

An archived segment becomes one Parquet file per day of append time, under
``archive/day=YYYY-MM-DD/`` (hive-style, so DuckDB's ``read_parquet(...,
hive_partitioning=true)`` filters by day). Every stream's archive has the same base columns
(partition, offset, key, append_time, headers as JSON, payload); the event log adds the
columns of :mod:`profilemesh.shared.log.event_columns`. Offsets and payloads are kept, so a
subscriber can still replay an archived range.

A per-partition manifest lists the archived segments. Archiving writes the files, then the
manifest (atomically), then deletes the segment; a crash in between leaves a segment that the
manifest already lists, which the next open deletes (the files are already complete).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from profilemesh.common.v1 import log_service_pb2
from profilemesh.shared.log.api import RecordBatch
from profilemesh.shared.log.segments import ClosedSegment, iter_frames

TIMESTAMP = pa.timestamp("ns", tz="UTC")
BASE_FIELDS = [
    pa.field("partition", pa.int32()),
    pa.field("offset", pa.int64()),
    pa.field("key", pa.string()),
    pa.field("append_time", TIMESTAMP),
    pa.field("headers", pa.string()),
    pa.field("payload", pa.binary()),
]
ROW_GROUP_ROWS = 4096

Decoder = Callable[[Sequence[bytes]], dict[str, list[Any]]]


@dataclass(frozen=True)
class PayloadColumns:
    """Extra columns a stream's archive carries, decoded from each payload."""

    fields: Sequence[pa.Field]
    decode: Decoder


@dataclass(frozen=True)
class Retention:
    """What happens to closed segments older than ``after_seconds``: compacted into Parquet
    (``archive``, the event log) or deleted (``delete``, the derived logs)."""

    mode: Literal["archive", "delete"]
    after_seconds: float
    columns: PayloadColumns | None = None


@dataclass(frozen=True)
class ArchivedSegment:
    """An archived segment: its offset range and Parquet files (relative to the archive)."""

    base_offset: int
    next_offset: int
    files: tuple[str, ...]


def schema(columns: PayloadColumns | None) -> pa.Schema:
    """The one schema of a stream's archive files."""
    return pa.schema([*BASE_FIELDS, *(columns.fields if columns else ())])


def manifest_path(archive: Path, partition: int) -> Path:
    return archive / f"manifest-p{partition:03d}.json"


def load_manifest(archive: Path, partition: int) -> list[ArchivedSegment]:
    """The archived segments of ``partition``, oldest first."""
    path = manifest_path(archive, partition)
    if not path.exists():
        return []
    return [
        ArchivedSegment(entry["base"], entry["next"], tuple(entry["files"]))
        for entry in json.loads(path.read_text())
    ]


def _save_manifest(archive: Path, partition: int, segments: Sequence[ArchivedSegment]) -> None:
    path = manifest_path(archive, partition)
    temporary = path.with_suffix(".tmp")
    document = [{"base": s.base_offset, "next": s.next_offset, "files": s.files} for s in segments]
    with temporary.open("w") as file:
        json.dump(document, file)
        file.flush()
        os.fsync(file.fileno())
    temporary.replace(path)
    _fsync_directory(archive)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def archive_segment(
    segment: ClosedSegment,
    partition: int,
    archive: Path,
    columns: PayloadColumns | None,
    archived: list[ArchivedSegment],
) -> ArchivedSegment:
    """Write ``segment`` as Parquet (one file per day), record it in the manifest and return
    the new entry. The caller deletes the segment afterwards."""
    rows: dict[str, list[Any]] = {field.name: [] for field in BASE_FIELDS}
    for _, header, body in iter_frames(segment.path):
        batch = RecordBatch.from_proto(log_service_pb2.LogBatch.FromString(body))
        for index, payload in enumerate(batch.payload_list()):
            rows["partition"].append(partition)
            rows["offset"].append(batch.base_offset + index)
            rows["key"].append(batch.keys[index])
            rows["append_time"].append(header.append_time_ns)
            rows["headers"].append(json.dumps(dict(batch.headers_of(index))))
            rows["payload"].append(payload)
    if columns is not None:
        rows.update(columns.decode(rows["payload"]))
    table = pa.Table.from_pydict(rows, schema=schema(columns))
    days = pc.strftime(table["append_time"], format="%Y-%m-%d").to_pylist()
    files = []
    for day in sorted(set(days)):
        mask = pa.array([d == day for d in days])
        folder = archive / f"day={day}"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"p{partition:03d}-{segment.base_offset:020d}.parquet"
        temporary = folder / (name + ".tmp")
        pq.write_table(table.filter(mask), temporary, row_group_size=ROW_GROUP_ROWS)
        with temporary.open("rb") as file:
            os.fsync(file.fileno())
        temporary.replace(folder / name)
        _fsync_directory(folder)
        files.append(f"day={day}/{name}")
    entry = ArchivedSegment(segment.base_offset, segment.next_offset, tuple(files))
    _save_manifest(archive, partition, [*archived, entry])
    return entry


def read_archived(
    archive: Path,
    segment: ArchivedSegment,
    from_offset: int,
    max_records: int,
    payload_type: str = "",
) -> tuple[list[bytes], int]:
    """Serialized ``LogBatch`` es of the archived records from ``from_offset`` (at most
    ``max_records``, within this segment), and the offset after the last one."""
    until = from_offset + max_records
    tables = [
        pq.read_table(
            archive / name,
            columns=["partition", "offset", "key", "append_time", "headers", "payload"],
            filters=[("offset", ">=", from_offset), ("offset", "<", until)],
        )
        for name in segment.files
    ]
    table = pa.concat_tables(tables).sort_by("offset")
    if table.num_rows == 0:
        return [], from_offset
    keys = table["key"].to_pylist()
    payloads = table["payload"].to_pylist()
    headers = [json.loads(h) for h in table["headers"].to_pylist()]
    times = table["append_time"].cast(pa.int64()).to_pylist()
    offsets = table["offset"].to_pylist()
    partition = table["partition"][0].as_py()
    batch = RecordBatch(
        partition=partition,
        base_offset=offsets[0],
        append_time_ns=times[0],
        keys=keys,
        payload_sizes=[len(p) for p in payloads],
        payloads=b"".join(payloads),
        message_headers=headers,
        payload_type=payload_type,
    )
    return [batch.to_proto().SerializeToString()], offsets[-1] + 1


def day_of(append_time_ns: int) -> str:
    """The archive folder day of an append time."""
    return datetime.fromtimestamp(append_time_ns / 1e9, UTC).strftime("%Y-%m-%d")
