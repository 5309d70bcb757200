"""Erasing records from the embedded log's files in place, offsets kept.

A person's data must leave every file of the log, yet consumers address records by offset, so a
record cannot simply disappear: it is *redacted*, its key and payload emptied and the header
``redacted: "1"`` added, and it keeps its offset, headers and append time.

Files are never edited where they lie. A segment's redacted copy is written to a temporary file
beside it (``<segment>.log.tmp``), synced, and renamed over the segment; an archived Parquet
file is rewritten the same way, its redacted rows kept with their offsets (so the archive stays
gap-free and its reader unchanged) and their event columns null. A crash therefore leaves the
old file or the new one, never a mix, plus perhaps a temporary file that the next open deletes.
The caller (:class:`~profilemesh.shared.log.embedded.EmbeddedLog`) decides when a rewritten
file may replace the old one, under its own locks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from profilemesh.common.v1 import log_service_pb2
from profilemesh.shared.log.api import REDACTED_HEADER, RecordBatch, Selector
from profilemesh.shared.log.archive import BASE_FIELDS, ROW_GROUP_ROWS
from profilemesh.shared.log.segments import (
    HEADER_SIZE,
    FrameHeader,
    SegmentIndex,
    decode_header,
    encode_frame,
)

TEMPORARY_SUFFIX = ".tmp"
"""Suffix of a file being written; one left behind by a crash is deleted on open."""

_BASE_COLUMNS = frozenset(field.name for field in BASE_FIELDS)


def redact_batch(batch: RecordBatch, marks: Sequence[bool]) -> tuple[RecordBatch, int]:
    """``batch`` with the marked records redacted, and how many were not redacted before."""
    if len(marks) != len(batch):
        raise ValueError(f"the selector marked {len(marks)} records of a batch of {len(batch)}")
    already = batch.redacted_flags()
    chosen = [bool(mark) and not done for mark, done in zip(marks, already, strict=True)]
    count = sum(chosen)
    if not count:
        return batch, 0
    payloads = batch.payload_list()
    keys = list(batch.keys)
    headers = [dict(h) for h in batch.message_headers] or [{} for _ in range(len(batch))]
    for index, erase in enumerate(chosen):
        if erase:
            keys[index] = ""
            payloads[index] = b""
            headers[index][REDACTED_HEADER] = "1"
    redacted = RecordBatch(
        partition=batch.partition,
        base_offset=batch.base_offset,
        append_time_ns=batch.append_time_ns,
        keys=keys,
        payload_sizes=[len(payload) for payload in payloads],
        payloads=b"".join(payloads),
        headers=batch.headers,
        message_headers=headers,
        payload_type=batch.payload_type,
    )
    return redacted, count


def _frames(path: Path, start: int, end: int) -> Iterator[tuple[int, FrameHeader, bytes]]:
    """``(position, header, body)`` of the frames of a segment between two file positions."""
    with path.open("rb") as file:
        file.seek(start)
        position = start
        while position < end:
            header = decode_header(file.read(HEADER_SIZE))
            if header is None:
                raise OSError(f"{path}: no frame at position {position}")
            body = file.read(header.body_length)
            if len(body) < header.body_length:
                raise OSError(f"{path}: the frame at position {position} is cut short")
            yield position, header, body
            position += HEADER_SIZE + header.body_length


class SegmentRewrite:
    """A redacted copy of one segment file, built in a temporary file beside it.

    :meth:`scan` reads frames and re-encodes those with newly marked records; it may be called
    again to continue further (the active segment grows while its older part is examined).
    :meth:`write` copies everything scanned so far into the temporary file, the redacted frames
    in place of the originals, and can also continue where it stopped. Nothing is written while
    no frame has changed.
    """

    def __init__(self, path: Path, partition: int, select: Selector) -> None:
        self.path = path
        self.partition = partition
        self.select = select
        self.temporary = path.with_name(path.name + TEMPORARY_SUFFIX)
        self.scanned = 0
        """File position up to which frames were examined."""
        self.redacted = 0
        """Records newly redacted in the frames examined."""
        self.index = SegmentIndex()
        """Frame positions of the copy written so far."""
        self.size = 0
        """Bytes of the copy written so far."""
        self._changes: dict[int, bytes] = {}
        self._written = 0

    @property
    def changed(self) -> bool:
        """Whether some frame examined so far had a record to redact."""
        return bool(self._changes)

    def scan(self, end: int) -> None:
        """Examine the frames from where the last scan stopped up to file position ``end``."""
        for position, header, body in _frames(self.path, self.scanned, end):
            batch = RecordBatch.from_proto(log_service_pb2.LogBatch.FromString(body))
            if all(batch.redacted_flags()):
                continue
            redacted, count = redact_batch(batch, self.select(self.partition, batch))
            if count:
                new_body = redacted.to_proto().SerializeToString()
                self._changes[position] = encode_frame(
                    new_body, header.base_offset, header.count, header.append_time_ns
                )
                self.redacted += count
        self.scanned = max(self.scanned, end)

    def write(self) -> None:
        """Copy what was scanned and not copied yet into the temporary file."""
        mode = "ab" if self._written else "wb"
        with self.temporary.open(mode) as out:
            for position, header, body in _frames(self.path, self._written, self.scanned):
                frame = self._changes.get(position)
                if frame is None:
                    frame = encode_frame(
                        body, header.base_offset, header.count, header.append_time_ns
                    )
                self.index.add(header.base_offset, self.size)
                out.write(frame)
                self.size += len(frame)
        self._written = self.scanned

    def finish(self) -> None:
        """Make the temporary file durable; it is then ready to replace the segment."""
        fd = os.open(self.temporary, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def discard(self) -> None:
        """Forget the copy (the segment was replaced by other means, or nothing changed)."""
        self.temporary.unlink(missing_ok=True)


def _runs(offsets: Sequence[int]) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` row ranges of consecutive offsets, in row order."""
    start = 0
    for row in range(1, len(offsets) + 1):
        if row == len(offsets) or offsets[row] != offsets[row - 1] + 1:
            yield start, row
            start = row


def rewrite_archived_file(
    path: Path, partition: int, select: Selector, payload_type: str
) -> tuple[int, Path | None]:
    """Redact the marked rows of one archived Parquet file into a temporary file beside it.

    Returns how many rows were newly redacted and the synced temporary file that is to replace
    ``path`` (``None`` when no row changed). A redacted row keeps its partition, offset and
    append time; its key and payload become empty, its headers gain ``redacted``, and every
    column decoded from the payload becomes null.
    """
    table = pq.read_table(path)
    if table.num_rows == 0:
        return 0, None
    offsets = table["offset"].to_pylist()
    keys = table["key"].to_pylist()
    payloads = table["payload"].to_pylist()
    headers = [json.loads(text) for text in table["headers"].to_pylist()]
    times = table["append_time"].cast(pa.int64()).to_pylist()
    chosen = [False] * table.num_rows
    for start, stop in _runs(offsets):
        batch = RecordBatch(
            partition=partition,
            base_offset=offsets[start],
            append_time_ns=times[start],
            keys=keys[start:stop],
            payload_sizes=[len(payload) for payload in payloads[start:stop]],
            payloads=b"".join(payloads[start:stop]),
            message_headers=headers[start:stop],
            payload_type=payload_type,
        )
        marks = select(partition, batch)
        if len(marks) != len(batch):
            raise ValueError(f"the selector marked {len(marks)} records of {len(batch)}")
        for row, mark in enumerate(marks, start):
            if mark and REDACTED_HEADER not in headers[row]:
                chosen[row] = True
    count = sum(chosen)
    if not count:
        return 0, None
    mask = pa.array(chosen, pa.bool_())
    columns = []
    for field in table.schema:
        column = table[field.name]
        if field.name == "key":
            column = pc.if_else(mask, pa.scalar("", field.type), column)
        elif field.name == "payload":
            column = pc.if_else(mask, pa.scalar(b"", field.type), column)
        elif field.name == "headers":
            texts = [
                json.dumps({**entries, REDACTED_HEADER: "1"}) if erase else original
                for entries, erase, original in zip(
                    headers, chosen, table["headers"].to_pylist(), strict=True
                )
            ]
            column = pa.chunked_array([pa.array(texts, field.type)])
        elif field.name not in _BASE_COLUMNS:
            column = pc.if_else(mask, pa.scalar(None, field.type), column)
        columns.append(column)
    rewritten = pa.Table.from_arrays(columns, schema=table.schema)
    temporary = path.with_name(path.name + TEMPORARY_SUFFIX)
    pq.write_table(rewritten, temporary, row_group_size=ROW_GROUP_ROWS)
    with temporary.open("rb") as file:
        os.fsync(file.fileno())
    return count, temporary


def replace_file(temporary: Path, target: Path) -> None:
    """Put a finished temporary file in place of ``target`` (atomic) and make the rename
    durable."""
    temporary.replace(target)
    fsync_directory(target.parent)


def fsync_directory(directory: Path) -> None:
    """Sync a directory, so that renames and new files in it survive power loss."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
