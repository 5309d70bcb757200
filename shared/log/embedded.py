"""The embedded log: one folder per stream under the data directory, durable before acking.

Appends go through two threads so that durability is paid per flush, not per message (group
commit), and so that writing the next flush overlaps syncing the previous one:

- the *writer* takes every append waiting, assigns offsets, writes the frames of each touched
  partition with one ``write`` each, and hands the flush to the syncer;
- the *syncer* takes every flush written so far, ``fdatasync`` s the touched partitions (in
  parallel), then acknowledges the appends and wakes the subscribers.

An append that spans partitions writes one frame per partition; it is acknowledged once all of
them are synced. A crash before that may leave some of its frames on disk and not others:
never acknowledged, so its producer retries, and ingestion's deduplication absorbs the repeat.

Readers only ever see synced data. A failed write or sync stops the log (fail-stop): what was
acknowledged is on disk, what was not is either absent or cut off as a torn tail on the next
open, and retrying on a half-failed disk would risk acknowledging lost data.

Redaction (:meth:`EmbeddedLog.redact`, erasing a person) replaces files with redacted copies
(:mod:`.redaction`) under the read lock, so a reader sees the old file or the new one. Closed
segments and archived files change under nobody's feet but retention's, which takes turns with
it; the active segments are copied while appends go on, and the writer is paused only to copy
what arrived meanwhile and to switch to the copies.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import fcntl
import json
import os
import threading
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from profilemesh.common.v1 import log_service_pb2
from profilemesh.shared.log.api import (
    Log,
    LogClosed,
    LogError,
    LogFull,
    OffsetOutOfRange,
    PartitionRange,
    Positions,
    RecordBatch,
    Selector,
)
from profilemesh.shared.log.archive import (
    ArchivedSegment,
    Retention,
    archive_segment,
    load_manifest,
    read_archived,
)
from profilemesh.shared.log.redaction import (
    TEMPORARY_SUFFIX,
    SegmentRewrite,
    replace_file,
    rewrite_archived_file,
)
from profilemesh.shared.log.segments import (
    INDEX_SUFFIX,
    SEGMENT_SUFFIX,
    ClosedSegment,
    FileCache,
    SegmentIndex,
    encode_frame,
    load_closed_segment,
    read_frames,
    segment_name,
)
from profilemesh.shared.telemetry import trace_headers
from profilemesh.shared.wire import timestamp_field, varint_field

MIB = 1024 * 1024
LAYOUT_FILE = "stream.json"
LAYOUT_VERSION = 1


def _offset_and_time_fields(base_offset: int, append_time_ns: int) -> bytes:
    """LogBatch fields 2 (base_offset) and 3 (append_time), encoded by hand.

    Appending them to a body the producer serialized without them yields the full message
    (protobuf concatenation merges), so the writer never re-serializes a batch.
    """
    offset_field = varint_field(2, base_offset) if base_offset else b""
    return offset_field + timestamp_field(3, append_time_ns)


@dataclass
class _Part:
    """The part of one append that goes to one partition."""

    partition: int
    body: bytes
    count: int


@dataclass
class _Append:
    """One append waiting to be written and synced."""

    parts: list[_Part]
    nbytes: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[dict[int, int]]
    bases: dict[int, int] = field(default_factory=dict)


@dataclass
class _Flush:
    """What the writer wrote in one go: its appends and where each partition now ends."""

    appends: list[_Append]
    ends: dict[int, tuple[int, int]]  # partition -> (next offset, file end)


class _Partition:
    """One partition's segments and positions.

    ``next_offset``/``written_end`` belong to the writer thread; ``durable`` (next offset and
    file end of the synced prefix, published together as one tuple) is what readers use.
    """

    def __init__(self, number: int, directory: Path) -> None:
        self.number = number
        self.directory = directory
        self.archive = directory.parent / "archive"
        self.archived: list[ArchivedSegment] = []
        self.archived_bases: list[int] = []
        self.closed: list[ClosedSegment] = []
        self.closed_bases: list[int] = []
        self.active_base = 0
        self.active_path = directory / segment_name(0)
        self.active_index = SegmentIndex()
        self.fd = -1
        self.next_offset = 0
        self.written_end = 0
        self.durable = (0, 0)
        self.last_append_ns = 0

    @property
    def first_offset(self) -> int:
        """The oldest offset still readable (from the archive, a segment or the active one)."""
        if self.archived:
            return self.archived[0].base_offset
        return self.segments_start

    @property
    def segments_start(self) -> int:
        """The first offset still held in segment files."""
        return self.closed[0].base_offset if self.closed else self.active_base

    def open(self) -> None:
        """Load the segments, cut a torn tail off the active one, open it for appends."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.archived = load_manifest(self.archive, self.number)
        self.archived_bases = [segment.base_offset for segment in self.archived]
        paths = sorted(self.directory.glob(f"*{SEGMENT_SUFFIX}"))
        archived = set(self.archived_bases)
        for path in paths[:-1]:
            if int(path.stem) in archived:
                # Archived just before a crash: the Parquet files and manifest are complete.
                _remove_segment(path)
                continue
            segment, _ = load_closed_segment(path)
            self.closed.append(segment)
        self.closed_bases = [segment.base_offset for segment in self.closed]
        if paths:
            self.active_path = paths[-1]
            self.active_base = int(self.active_path.stem)
        else:
            self.active_base = self.closed[-1].next_offset if self.closed else 0
            self.active_path = self.directory / segment_name(self.active_base)
        self.fd = os.open(self.active_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        index, end, next_offset = SegmentIndex.scan(self.active_path)
        if os.fstat(self.fd).st_size != end:
            os.ftruncate(self.fd, end)  # a torn tail: never acknowledged, so cut it
            os.fsync(self.fd)
        _fsync_directory(self.directory)
        self.active_index = index
        self.next_offset = next_offset if next_offset >= 0 else self.active_base
        self.written_end = end
        self.durable = (self.next_offset, end)

    def roll(self, read_lock: threading.Lock) -> None:
        """Close the active segment (already synced) and start a new one."""
        os.fsync(self.fd)
        os.close(self.fd)
        self.active_index.write(self.active_path.with_suffix(INDEX_SUFFIX))
        segment = ClosedSegment(
            self.active_path,
            self.active_base,
            self.next_offset,
            self.written_end,
            self.last_append_ns,
        )
        new_path = self.directory / segment_name(self.next_offset)
        fd = os.open(new_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        _fsync_directory(self.directory)
        with read_lock:  # readers must see the old and new segment consistently
            self.closed.append(segment)
            self.closed_bases.append(segment.base_offset)
            self.active_base = self.next_offset
            self.active_path = new_path
            self.active_index = SegmentIndex()
            self.fd = fd
            self.written_end = 0
            self.durable = (self.next_offset, 0)


def _remove_segment(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_suffix(INDEX_SUFFIX).unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    # A new file only survives power loss once its directory entry is synced too.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class EmbeddedLog(Log):
    """A partitioned, durable, replayable stream stored in files under ``directory``."""

    def __init__(
        self,
        directory: Path,
        stream: str,
        partitions: int,
        payload_type: str,
        segment_bytes: int,
        max_pending_bytes: int,
        retention: Retention | None = None,
    ) -> None:
        self.directory = directory
        self.retention = retention
        self.stream = stream
        self.partitions = partitions
        self.payload_type = payload_type
        self.segment_bytes = segment_bytes
        self.max_pending_bytes = max_pending_bytes
        self._parts = [_Partition(p, directory / f"p{p:03d}") for p in range(partitions)]
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._queue: deque[_Append] = deque()
        self._pending_bytes = 0
        self._flushes: deque[_Flush] = deque()
        self._flush_ready = threading.Condition(self._lock)
        self._unsynced_flushes = 0
        self._closing = False
        self._failure: BaseException | None = None
        self._sync_pool = ThreadPoolExecutor(max_workers=min(partitions, 8))
        self._files = FileCache()
        self._read_lock = threading.Lock()
        # Held by whoever replaces or removes files of closed segments and the archive
        # (retention, redaction), so that they never work on the same file at once.
        self._rewrite_lock = threading.Lock()
        # A redaction pauses the writer to replace the active segments: the writer then
        # writes only the appends queued before the pause, and parks.
        self._paused = False
        self._takeable_while_paused = 0
        self._writer_parked = False
        self._waiters: dict[int, asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: list[threading.Thread] = []
        self._lock_fd = -1

    @classmethod
    async def open(
        cls,
        directory: Path,
        stream: str,
        *,
        partitions: int = 8,
        payload_type: str = "",
        segment_bytes: int = 64 * MIB,
        max_pending_bytes: int = 256 * MIB,
        retention: Retention | None = None,
    ) -> EmbeddedLog:
        """Open the stream stored in ``directory``, creating it if needed.

        The partition count is fixed at creation: reopening with another raises ``ValueError``
        (keys would move between partitions and lose their order).
        """
        log = cls(
            directory,
            stream,
            partitions,
            payload_type,
            segment_bytes,
            max_pending_bytes,
            retention,
        )
        await asyncio.to_thread(log._open)
        log._loop = asyncio.get_running_loop()
        for target, name in ((log._write_loop, "writer"), (log._sync_loop, "syncer")):
            thread = threading.Thread(target=target, name=f"log-{stream}-{name}", daemon=True)
            thread.start()
            log._threads.append(thread)
        return log

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        # One writer per stream: a second process appending to the same files would corrupt
        # them, so it is refused (the lock goes away with the process, however it ends).
        self._lock_fd = os.open(self.directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            os.close(self._lock_fd)
            raise LogError(
                f"{self.directory} is in use by another process", reason="LOG_IN_USE"
            ) from error
        layout_path = self.directory / LAYOUT_FILE
        layout = {"version": LAYOUT_VERSION, "stream": self.stream, "partitions": self.partitions}
        if layout_path.exists():
            stored = json.loads(layout_path.read_text())
            if stored.get("partitions") != self.partitions or stored.get("stream") != self.stream:
                raise ValueError(
                    f"{self.directory} holds stream {stored.get('stream')!r} with "
                    f"{stored.get('partitions')} partitions, not {self.stream!r} with "
                    f"{self.partitions}"
                )
        else:
            temporary = layout_path.with_suffix(".tmp")
            temporary.write_text(json.dumps(layout))
            temporary.replace(layout_path)
            _fsync_directory(self.directory)
        # A file still being written when a process died (an index, a manifest, an archive or
        # redacted copy) was never put in place; it may even hold data redacted since.
        for leftover in self.directory.rglob(f"*{TEMPORARY_SUFFIX}"):
            leftover.unlink()
        for part in self._parts:
            part.open()

    # -- appending -------------------------------------------------------------------------

    async def append_batch(
        self,
        entries: Sequence[tuple[str, bytes]],
        headers: Mapping[str, str] | None = None,
        *,
        message_headers: Sequence[Mapping[str, str]] | None = None,
    ) -> Positions:
        if not entries:
            return Positions([], {})
        if headers is None:
            headers = trace_headers()
        if message_headers is not None and len(message_headers) != len(entries):
            raise ValueError("message_headers must have one mapping per entry")
        partitions = self.partitions
        partition_of = [zlib.crc32(key.encode()) % partitions for key, _ in entries]
        groups: dict[int, tuple[list[str], list[bytes]]] = {}
        for partition, (key, payload) in zip(partition_of, entries, strict=True):
            group = groups.get(partition)
            if group is None:
                group = groups[partition] = ([], [])
            group[0].append(key)
            group[1].append(payload)
        own_headers: dict[int, list[Mapping[str, str]]] = {}
        if message_headers is not None:
            for partition, entry_headers in zip(partition_of, message_headers, strict=True):
                own_headers.setdefault(partition, []).append(entry_headers)
        parts = []
        nbytes = 0
        for partition, (keys, payloads) in groups.items():
            batch = log_service_pb2.LogBatch(
                partition=partition,
                payload_type=self.payload_type,
                keys=keys,
                payload_sizes=[len(payload) for payload in payloads],
                payloads=b"".join(payloads),
                headers=headers,
            )
            for entry_headers in own_headers.get(partition, ()):
                batch.message_headers.add().entries.update(entry_headers)
            body = batch.SerializeToString()
            nbytes += len(body)
            parts.append(_Part(partition, body, len(keys)))
        loop = asyncio.get_running_loop()
        append = _Append(parts, nbytes, loop, loop.create_future())
        with self._lock:
            self._check_open()
            if self._pending_bytes and self._pending_bytes + nbytes > self.max_pending_bytes:
                raise LogFull(
                    f"{self._pending_bytes // MIB} MiB of appends are waiting for the disk",
                    retry_after_seconds=0.2,
                )
            self._pending_bytes += nbytes
            self._queue.append(append)
            self._work.notify()
        bases = await append.future
        return Positions(partition_of, bases)

    def _check_open(self) -> None:
        if self._failure is not None:
            raise LogClosed(f"log {self.stream} stopped after a disk error: {self._failure}")
        if self._closing:
            raise LogClosed(f"log {self.stream} is closed")

    def _write_loop(self) -> None:
        while True:
            with self._lock:
                while not (takeable := self._takeable()):
                    if self._closing and not self._paused:
                        break
                    if self._paused and not self._writer_parked:
                        self._writer_parked = True
                        self._flush_ready.notify_all()
                    self._work.wait()
                self._writer_parked = False
                if not takeable:
                    self._flushes.append(_Flush([], {}))  # tells the syncer to stop
                    self._flush_ready.notify()
                    return
                appends = [self._queue.popleft() for _ in range(takeable)]
                if self._paused:
                    self._takeable_while_paused -= takeable
            try:
                flush = self._write(appends)
            except BaseException as error:  # any failure stops the log
                self._fail(error, appends)
                return
            with self._lock:
                self._flushes.append(flush)
                self._unsynced_flushes += 1
                self._flush_ready.notify()

    def _takeable(self) -> int:
        """How many queued appends the writer may take now (call with ``_lock`` held)."""
        if self._paused:
            return min(self._takeable_while_paused, len(self._queue))
        return len(self._queue)

    @contextlib.contextmanager
    def _writer_paused(self) -> Iterator[None]:
        """Within the block, every append queued before it is written and synced, and the
        writer writes nothing more: the active segments and their ends stay as they are."""
        with self._lock:
            self._check_open()
            self._paused = True
            self._takeable_while_paused = len(self._queue)
            self._writer_parked = False  # the writer says so again once it has parked
            self._work.notify_all()
        try:
            with self._lock:
                while not self._writer_parked or self._unsynced_flushes:
                    if self._failure is not None or not self._threads[0].is_alive():
                        raise LogClosed(f"log {self.stream} stopped during a redaction")
                    self._flush_ready.wait(timeout=0.05)
            yield
        finally:
            with self._lock:
                self._paused = False
                self._work.notify_all()

    def _write(self, appends: list[_Append]) -> _Flush:
        now = time.time_ns()
        frames: dict[int, list[bytes]] = {}
        for append in appends:
            for part in append.parts:
                partition = self._parts[part.partition]
                if partition.written_end >= self.segment_bytes and part.partition not in frames:
                    self._wait_synced()
                    partition.roll(self._read_lock)
                base = partition.next_offset
                body = part.body + _offset_and_time_fields(base, now)
                frame = encode_frame(body, base, part.count, now)
                position = partition.written_end + sum(map(len, frames.get(part.partition, ())))
                # Position first: a reader bisecting `bases` must find its position there.
                partition.active_index.positions.append(position)
                partition.active_index.bases.append(base)
                frames.setdefault(part.partition, []).append(frame)
                partition.next_offset = base + part.count
                partition.last_append_ns = now
                append.bases[part.partition] = base
        ends = {}
        for number, chunks in frames.items():
            partition = self._parts[number]
            data = b"".join(chunks)
            written = 0
            while written < len(data):
                written += os.write(partition.fd, data[written:])
            partition.written_end += len(data)
            ends[number] = (partition.next_offset, partition.written_end)
        return _Flush(appends, ends)

    def _wait_synced(self) -> None:
        with self._lock:
            while self._unsynced_flushes and self._failure is None:
                self._flush_ready.wait(timeout=0.05)

    def _sync_loop(self) -> None:
        while True:
            with self._lock:
                while not self._flushes:
                    self._flush_ready.wait()
                flushes = list(self._flushes)
                self._flushes.clear()
            stop = any(not flush.appends and not flush.ends for flush in flushes)
            ends: dict[int, tuple[int, int]] = {}
            for flush in flushes:
                ends.update(flush.ends)
            try:
                fds = [self._parts[number].fd for number in ends]
                if len(fds) == 1:
                    os.fdatasync(fds[0])
                else:
                    list(self._sync_pool.map(os.fdatasync, fds))
            except BaseException as error:  # any failure stops the log
                self._fail(error, [a for flush in flushes for a in flush.appends])
                return
            for number, durable in ends.items():
                self._parts[number].durable = durable
            acknowledged = [append for flush in flushes for append in flush.appends]
            with self._lock:
                self._pending_bytes -= sum(append.nbytes for append in acknowledged)
                self._unsynced_flushes -= len(flushes) - (1 if stop else 0)
                self._flush_ready.notify_all()
            for append in acknowledged:
                append.loop.call_soon_threadsafe(_resolve, append.future, append.bases)
            if ends and self._loop is not None:
                self._loop.call_soon_threadsafe(self._wake, list(ends))
            if stop:
                return

    def _fail(self, error: BaseException, appends: list[_Append]) -> None:
        with self._lock:
            self._failure = error
            self._closing = True
            pending = appends + list(self._queue)
            self._queue.clear()
            for flush in self._flushes:
                pending.extend(flush.appends)
            self._flushes.clear()
            self._flushes.append(_Flush([], {}))
            self._work.notify_all()
            self._flush_ready.notify_all()
        failure = LogClosed(f"log {self.stream} stopped after a disk error: {error}")
        for append in pending:
            append.loop.call_soon_threadsafe(_reject, append.future, failure)

    # -- reading ---------------------------------------------------------------------------

    async def offsets(self) -> list[PartitionRange]:
        return [PartitionRange(p.number, p.first_offset, p.durable[0]) for p in self._parts]

    def _partition(self, partition: int) -> _Partition:
        if not 0 <= partition < self.partitions:
            raise LogError(
                f"partition {partition} out of range [0, {self.partitions})",
                violations=[("partition", f"must be in [0, {self.partitions})")],
            )
        return self._parts[partition]

    def _check_offset(self, part: _Partition, offset: int) -> None:
        if offset < part.first_offset or offset > part.durable[0]:
            raise OffsetOutOfRange(
                f"offset {offset} of {self.stream}/{part.number} is outside "
                f"[{part.first_offset}, {part.durable[0]}]",
                violations=[("from_offset", "outside the retained range")],
            )

    def read_encoded(
        self, partition: int, from_offset: int, max_records: int
    ) -> tuple[list[bytes], int]:
        """Stored ``LogBatch`` bodies of ``partition`` from ``from_offset``, and the offset
        after the last one (``from_offset`` when nothing is there yet). Blocking file I/O."""
        part = self._partition(partition)
        durable_next = part.durable[0]
        self._check_offset(part, from_offset)
        if from_offset == durable_next:
            return [], from_offset
        with self._read_lock:
            if from_offset < part.segments_start:
                archived = part.archived[bisect.bisect_right(part.archived_bases, from_offset) - 1]
                return read_archived(
                    part.archive, archived, from_offset, max_records, self.payload_type
                )
            if from_offset >= part.active_base:
                # Read under the lock: a redaction may have replaced the file since.
                path, end = part.active_path, part.durable[1]
                position = part.active_index.locate(from_offset)
            else:
                segment = part.closed[bisect.bisect_right(part.closed_bases, from_offset) - 1]
                path, end = segment.path, segment.size
                position = self._files.index(path).locate(from_offset)
            fd = self._files.fd(path)
            frames, _ = read_frames(fd, position, end, max_records)
        bodies = []
        next_offset = from_offset
        for header, body in frames:
            if header.next_offset <= from_offset:
                continue
            if header.base_offset < from_offset:
                # Only the first frame can start before the requested offset.
                decoded = RecordBatch.from_proto(log_service_pb2.LogBatch.FromString(body))
                body = decoded.starting_at(from_offset).to_proto().SerializeToString()
            bodies.append(body)
            next_offset = header.next_offset
        return bodies, next_offset

    async def subscribe_encoded(
        self,
        partition: int,
        from_offset: int,
        *,
        stop_at_end: bool = False,
        max_records: int = 5000,
        heartbeat_seconds: float | None = None,
    ) -> AsyncIterator[tuple[list[bytes], int, int]]:
        """Like :meth:`subscribe`, but yields ``(stored bodies, next offset, partition's next
        durable offset)`` without decoding: what ``Subscribe`` sends as is. With
        ``heartbeat_seconds``, a caught-up subscription yields no bodies that often."""
        part = self._partition(partition)
        self._check_offset(part, from_offset)
        end_at = part.durable[0] if stop_at_end else None
        offset = from_offset
        while True:
            if end_at is not None and offset >= end_at:
                return
            bodies, next_offset = await asyncio.to_thread(
                self.read_encoded, partition, offset, max_records
            )
            if bodies:
                offset = next_offset
                yield bodies, next_offset, part.durable[0]
                continue
            try:
                await asyncio.wait_for(self._wait_for(partition, offset), heartbeat_seconds)
            except TimeoutError:
                yield [], offset, part.durable[0]

    async def subscribe(
        self,
        partition: int,
        from_offset: int,
        *,
        stop_at_end: bool = False,
        max_records: int = 5000,
    ) -> AsyncIterator[RecordBatch]:
        end_at = self._partition(partition).durable[0] if stop_at_end else None
        async for bodies, _, _ in self.subscribe_encoded(
            partition, from_offset, stop_at_end=stop_at_end, max_records=max_records
        ):
            for body in bodies:
                batch = RecordBatch.from_proto(log_service_pb2.LogBatch.FromString(body))
                if end_at is not None and batch.base_offset >= end_at:
                    return
                yield batch

    async def _wait_for(self, partition: int, offset: int) -> None:
        """Return once ``partition`` has a durable record at ``offset`` (or the log closes)."""
        part = self._parts[partition]
        while part.durable[0] <= offset:
            self._check_open()
            event = self._waiters.get(partition)
            if event is None:
                event = self._waiters[partition] = asyncio.Event()
            if part.durable[0] > offset:
                return
            await event.wait()

    def _wake(self, partitions: list[int]) -> None:
        for partition in partitions:
            event = self._waiters.pop(partition, None)
            if event is not None:
                event.set()

    # -- retention ---------------------------------------------------------------------------

    def maintain(self, now_ns: int | None = None) -> int:
        """Apply the retention policy to closed segments older than its age: archive them as
        Parquet or delete them. Blocking; returns how many segments it handled."""
        with self._rewrite_lock:
            return self._apply_retention(now_ns)

    def _apply_retention(self, now_ns: int | None) -> int:
        if self.retention is None:
            return 0
        now_ns = time.time_ns() if now_ns is None else now_ns
        cutoff = now_ns - int(self.retention.after_seconds * 1e9)
        handled = 0
        for part in self._parts:
            while part.closed and part.closed[0].last_append_ns <= cutoff and not self._closing:
                segment = part.closed[0]
                entry = None
                if self.retention.mode == "archive":
                    part.archive.mkdir(parents=True, exist_ok=True)
                    entry = archive_segment(
                        segment, part.number, part.archive, self.retention.columns, part.archived
                    )
                with self._read_lock:
                    if entry is not None:
                        part.archived.append(entry)
                        part.archived_bases.append(entry.base_offset)
                    part.closed.pop(0)
                    part.closed_bases.pop(0)
                    self._files.forget(segment.path)
                _remove_segment(segment.path)
                handled += 1
        return handled

    # -- redaction ---------------------------------------------------------------------------

    async def redact(self, select: Selector) -> int:
        self._check_open()
        return await asyncio.to_thread(self._redact, select)

    def _redact(self, select: Selector) -> int:
        """Archived files first, then closed segments, then the active segments. Appends go on
        meanwhile; the writer is paused only to examine what was appended while the rest was
        being examined, and to put the active segments' copies in place."""
        with self._rewrite_lock:
            redacted = 0
            done: set[Path] = set()
            active: list[SegmentRewrite] = []
            try:
                for part in self._parts:
                    redacted += self._redact_archive(part, select)
                    redacted += self._redact_closed(part, select, done)
                    with self._read_lock:
                        path, end = part.active_path, part.durable[1]
                    rewrite = SegmentRewrite(path, part.number, select)
                    active.append(rewrite)
                    rewrite.scan(end)
                    if rewrite.changed:
                        rewrite.write()
                with self._writer_paused():
                    for part, rewrite in zip(self._parts, list(active), strict=True):
                        # A segment closed since it was examined as the active one.
                        redacted += self._redact_closed(part, select, done)
                        if rewrite.path != part.active_path:
                            rewrite.discard()
                            rewrite = SegmentRewrite(part.active_path, part.number, select)
                            active.append(rewrite)
                        redacted += self._replace_active(part, rewrite)
            finally:
                for rewrite in active:
                    rewrite.discard()
            return redacted

    def _redact_archive(self, part: _Partition, select: Selector) -> int:
        with self._read_lock:
            entries = list(part.archived)
        redacted = 0
        for entry in entries:
            for name in entry.files:
                path = part.archive / name
                count, temporary = rewrite_archived_file(
                    path, part.number, select, self.payload_type
                )
                if temporary is None:
                    continue
                try:
                    with self._read_lock:  # read_archived opens the file by its name
                        replace_file(temporary, path)
                finally:
                    temporary.unlink(missing_ok=True)
                redacted += count
        return redacted

    def _redact_closed(self, part: _Partition, select: Selector, done: set[Path]) -> int:
        """Redact the closed segments of ``part`` not in ``done`` (then added to it)."""
        with self._read_lock:
            segments = [segment for segment in part.closed if segment.path not in done]
        redacted = 0
        for segment in segments:
            done.add(segment.path)
            rewrite = SegmentRewrite(segment.path, part.number, select)
            try:
                rewrite.scan(segment.size)
                if not rewrite.changed:
                    continue
                rewrite.write()
                rewrite.finish()
                index_path = segment.path.with_suffix(INDEX_SUFFIX)
                with self._read_lock:
                    # Without an index a crash leaves nothing stale: open rebuilds it.
                    index_path.unlink(missing_ok=True)
                    replace_file(rewrite.temporary, segment.path)
                    rewrite.index.write(index_path)
                    segment.size = rewrite.size
                    self._files.forget(segment.path)
                redacted += rewrite.redacted
            finally:
                rewrite.discard()
        return redacted

    def _replace_active(self, part: _Partition, rewrite: SegmentRewrite) -> int:
        """Finish the copy of ``part`` 's active segment and append to it from now on (with
        the writer paused: the segment ends at its durable end)."""
        rewrite.scan(part.durable[1])
        if not rewrite.changed:
            return 0
        rewrite.write()
        rewrite.finish()
        fd = os.open(rewrite.temporary, os.O_WRONLY | os.O_APPEND)
        try:
            with self._read_lock:
                replace_file(rewrite.temporary, part.active_path)
                fd, part.fd = part.fd, fd
                part.active_index = rewrite.index
                part.written_end = rewrite.size
                part.durable = (part.durable[0], rewrite.size)
                self._files.forget(part.active_path)
        finally:
            os.close(fd)  # the old file's, once replaced; else the copy's
        return rewrite.redacted

    # -- closing ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Finish what was accepted, stop the threads, close the files."""
        with self._lock:
            if self._closing and not self._threads:
                return
            self._closing = True
            self._work.notify_all()
        for thread in self._threads:
            await asyncio.to_thread(thread.join)
        self._threads.clear()
        self._sync_pool.shutdown()
        for part in self._parts:
            if part.fd >= 0:
                os.close(part.fd)
                part.fd = -1
        self._files.close()
        os.close(self._lock_fd)  # releases the flock
        for event in self._waiters.values():
            event.set()  # subscribers wake up and find the log closed
        self._waiters.clear()


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _reject(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
