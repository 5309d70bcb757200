"""On-disk layout of one partition: segment files of CRC-checked frames, plus derived indexes.

A partition is a folder of segments named by the offset of their first record
(``00000000000000001000.log``). A segment is a sequence of frames::

    magic "PMLF" | body length u32 | CRC-32 of body u32 | base offset u64 | count u32 |
    append time ns u64 | body (a serialized ``profilemesh.common.v1.LogBatch``)

The body is exactly what ``Subscribe`` sends, so serving copies bytes. Each segment has an
``.idx`` file of ``(base offset, file position)`` pairs, one per frame: derived data, written
without fsync and rebuilt from the segment whenever it disagrees with it. Only the last
(active) segment is ever appended to; on open its torn tail, if any, is cut off.
"""

from __future__ import annotations

import bisect
import os
import struct
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"PMLF"
HEADER = struct.Struct("<4sIIQIQ")
HEADER_SIZE = HEADER.size
INDEX_ENTRY = struct.Struct("<QQ")

SEGMENT_SUFFIX = ".log"
INDEX_SUFFIX = ".idx"


def segment_name(base_offset: int) -> str:
    """The file name of the segment whose first record has ``base_offset``."""
    return f"{base_offset:020d}{SEGMENT_SUFFIX}"


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """The fixed-size header in front of every frame."""

    body_length: int
    crc: int
    base_offset: int
    count: int
    append_time_ns: int

    @property
    def next_offset(self) -> int:
        return self.base_offset + self.count


def encode_frame(body: bytes, base_offset: int, count: int, append_time_ns: int) -> bytes:
    """A frame around ``body``."""
    header = HEADER.pack(MAGIC, len(body), zlib.crc32(body), base_offset, count, append_time_ns)
    return header + body


def decode_header(data: bytes | memoryview) -> FrameHeader | None:
    """The header at the start of ``data``, or ``None`` if it is not a frame header."""
    if len(data) < HEADER_SIZE:
        return None
    magic, length, crc, base, count, when = HEADER.unpack_from(data)
    if magic != MAGIC:
        return None
    return FrameHeader(length, crc, base, count, when)


def scan_frames(path: Path, verify: bool = True) -> Iterator[tuple[int, FrameHeader]]:
    """``(position, header)`` of every complete (and, with ``verify``, intact) frame of a
    segment, from the start, stopping at the first torn or corrupt one."""
    for position, header, _ in iter_frames(path, verify):
        yield position, header


def iter_frames(path: Path, verify: bool = True) -> Iterator[tuple[int, FrameHeader, bytes]]:
    """Like :func:`scan_frames`, with each frame's body."""
    with path.open("rb") as file:
        position = 0
        while True:
            raw = file.read(HEADER_SIZE)
            header = decode_header(raw)
            if header is None:
                return
            body = file.read(header.body_length)
            if len(body) < header.body_length:
                return
            if verify and zlib.crc32(body) != header.crc:
                return
            yield position, header, body
            position += HEADER_SIZE + header.body_length


class SegmentIndex:
    """Frame positions of one segment: parallel arrays of base offsets and file positions."""

    def __init__(self) -> None:
        self.bases = array("Q")
        self.positions = array("Q")

    def add(self, base_offset: int, position: int) -> None:
        self.bases.append(base_offset)
        self.positions.append(position)

    def locate(self, offset: int) -> int:
        """The file position of the frame holding ``offset`` (the last frame starting at or
        before it)."""
        slot = bisect.bisect_right(self.bases, offset) - 1
        return self.positions[max(slot, 0)]

    def __len__(self) -> int:
        return len(self.bases)

    def write(self, path: Path) -> None:
        """Save as an ``.idx`` file (replaced atomically)."""
        entries = array("Q")
        for base, position in zip(self.bases, self.positions, strict=True):
            entries.append(base)
            entries.append(position)
        temporary = path.with_suffix(".idx.tmp")
        temporary.write_bytes(entries.tobytes())
        temporary.replace(path)

    @classmethod
    def read(cls, path: Path) -> SegmentIndex:
        index = cls()
        entries = array("Q")
        entries.frombytes(path.read_bytes())
        index.bases = entries[0::2]
        index.positions = entries[1::2]
        return index

    @classmethod
    def scan(cls, segment: Path) -> tuple[SegmentIndex, int, int]:
        """Rebuild from the segment itself: the index, the end of its last intact frame and
        the offset after it (``-1`` for an empty segment)."""
        index = cls()
        end = 0
        next_offset = -1
        for position, header in scan_frames(segment):
            index.add(header.base_offset, position)
            end = position + HEADER_SIZE + header.body_length
            next_offset = header.next_offset
        return index, end, next_offset


@dataclass
class ClosedSegment:
    """A segment no longer appended to: its file, first offset and the offset after it."""

    path: Path
    base_offset: int
    next_offset: int
    size: int
    last_append_ns: int


def load_closed_segment(path: Path) -> tuple[ClosedSegment, SegmentIndex]:
    """Open a closed segment, trusting its ``.idx`` only if it agrees with the file."""
    index_path = path.with_suffix(INDEX_SUFFIX)
    size = path.stat().st_size
    index: SegmentIndex | None = None
    if index_path.exists():
        candidate = SegmentIndex.read(index_path)
        if len(candidate) and _index_matches(path, candidate, size):
            index = candidate
    if index is None:
        index, end, _ = SegmentIndex.scan(path)
        if end != size:  # a closed segment must be whole; cut what cannot be read
            with path.open("r+b") as file:
                file.truncate(end)
            size = end
        index.write(index_path)
    with path.open("rb") as file:
        file.seek(index.positions[-1] if len(index) else 0)
        header = decode_header(file.read(HEADER_SIZE))
    base = int(path.stem)
    if header is None:
        return ClosedSegment(path, base, base, size, 0), index
    return (
        ClosedSegment(path, base, header.next_offset, size, header.append_time_ns),
        index,
    )


def _index_matches(path: Path, index: SegmentIndex, size: int) -> bool:
    with path.open("rb") as file:
        file.seek(index.positions[-1])
        header = decode_header(file.read(HEADER_SIZE))
    return (
        header is not None
        and header.base_offset == index.bases[-1]
        and index.positions[-1] + HEADER_SIZE + header.body_length == size
    )


class FileCache:
    """A bounded set of open read-only file descriptors and loaded indexes (LRU), so reading an
    old part of a long log costs neither unbounded memory nor one open() per read."""

    def __init__(self, capacity: int = 32) -> None:
        self.capacity = capacity
        self._fds: OrderedDict[Path, int] = OrderedDict()
        self._indexes: OrderedDict[Path, SegmentIndex] = OrderedDict()

    def fd(self, path: Path) -> int:
        fd = self._fds.pop(path, None)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
        self._fds[path] = fd
        while len(self._fds) > self.capacity:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def index(self, path: Path) -> SegmentIndex:
        index = self._indexes.pop(path, None)
        if index is None:
            index = SegmentIndex.read(path.with_suffix(INDEX_SUFFIX))
        self._indexes[path] = index
        while len(self._indexes) > self.capacity:
            self._indexes.popitem(last=False)
        return index

    def forget(self, path: Path) -> None:
        fd = self._fds.pop(path, None)
        if fd is not None:
            os.close(fd)
        self._indexes.pop(path, None)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._indexes.clear()


def read_frames(
    fd: int, position: int, end: int, max_records: int, chunk_bytes: int = 1 << 20
) -> tuple[list[tuple[FrameHeader, bytes]], int]:
    """Frames from ``position`` up to file position ``end``, until about ``max_records``
    records are collected: ``([(header, body)], position after the last one)``."""
    frames: list[tuple[FrameHeader, bytes]] = []
    records = 0
    while position < end and records < max_records:
        want = min(max(chunk_bytes, HEADER_SIZE), end - position)
        data = os.pread(fd, want, position)
        view = memoryview(data)
        cursor = 0
        while cursor + HEADER_SIZE <= len(data) and records < max_records:
            header = decode_header(view[cursor : cursor + HEADER_SIZE])
            if header is None:
                raise OSError(f"corrupt frame at position {position + cursor}")
            body_end = cursor + HEADER_SIZE + header.body_length
            if body_end > len(data):
                if cursor == 0:  # one frame bigger than the chunk: read it whole
                    body = os.pread(fd, header.body_length, position + HEADER_SIZE)
                    frames.append((header, body))
                    records += header.count
                    cursor = HEADER_SIZE + header.body_length
                break
            frames.append((header, bytes(view[cursor + HEADER_SIZE : body_end])))
            records += header.count
            cursor = body_end
        if cursor == 0:
            break
        position += cursor
    return frames, position
