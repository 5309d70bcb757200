"""The log interface every backend implements, and the values it traffics in.

A *stream* (``events``, ``resolutions``...) has a fixed number of partitions; a message goes to
the partition its key hashes to, so messages with one key stay in order. Offsets are dense per
partition (0, 1, 2, ...) and never reused. Records travel in :class:`RecordBatch` es: consecutive
records of one partition in the columnar form the wire (``profilemesh.common.v1.LogBatch``) and
the embedded backend's files both use, so no layer builds one object per record unless asked.
"""

from __future__ import annotations

import itertools
import zlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from profilemesh.common.v1 import log_service_pb2
from profilemesh.shared.errors import DomainError, ResourceExhausted

TYPE_URL_PREFIX = "type.googleapis.com/"

REDACTED_HEADER = "redacted"
DEDUP_HEADER = "dedup-id"
"""A record's own header naming it for deduplication: a backend that deduplicates appends (NATS
JetStream, within its duplicate window) stores a record only once per id, whoever appends it."""
"""Header (value ``"1"``) of a record whose key and payload were erased by :meth:`Log.redact`:
it keeps its offset, so positions stay valid, but carries nothing to apply."""


def partition_for(key: str, partitions: int) -> int:
    """The partition of ``key``: CRC-32 of its UTF-8 bytes modulo the partition count.

    Stable across processes, machines and backends (unlike ``hash()``), so a key lands in the
    same partition whoever appends it.
    """
    return zlib.crc32(key.encode()) % partitions


def type_url(full_name: str) -> str:
    """The ``google.protobuf.Any`` type URL of a message type, e.g. for ``payload_type``."""
    return TYPE_URL_PREFIX + full_name


class Position(NamedTuple):
    """Where one appended message landed."""

    partition: int
    offset: int


class LogRecord(NamedTuple):
    """One message read back from the log."""

    partition: int
    offset: int
    key: str
    payload: bytes
    headers: Mapping[str, str]
    append_time_ns: int


class PartitionRange(NamedTuple):
    """The retained offsets of one partition: ``first`` (oldest kept) to ``next`` (exclusive)."""

    partition: int
    first: int
    next: int


@dataclass(frozen=True, slots=True)
class RecordBatch:
    """Consecutive records of one partition, stored column by column.

    Record ``i`` has offset ``base_offset + i``, key ``keys[i]`` and payload
    ``payloads[starts[i]:starts[i + 1]]``.
    """

    partition: int
    base_offset: int
    append_time_ns: int
    keys: Sequence[str]
    payload_sizes: Sequence[int]
    payloads: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    message_headers: Sequence[Mapping[str, str]] = ()
    payload_type: str = ""

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def next_offset(self) -> int:
        """The offset after this batch's last record."""
        return self.base_offset + len(self.keys)

    @property
    def last_offset(self) -> int:
        """The offset of this batch's last record."""
        return self.base_offset + len(self.keys) - 1

    def payload_list(self) -> list[bytes]:
        """Every payload, in order (one slice each)."""
        data = self.payloads
        starts = itertools.accumulate(self.payload_sizes, initial=0)
        bounds = list(starts)
        return [data[bounds[i] : bounds[i + 1]] for i in range(len(self.payload_sizes))]

    def headers_of(self, index: int) -> Mapping[str, str]:
        """The headers of record ``index``: the batch's, overridden by the record's own."""
        if not self.message_headers:
            return self.headers
        return {**self.headers, **self.message_headers[index]}

    def __iter__(self) -> Iterator[LogRecord]:
        base, partition, when = self.base_offset, self.partition, self.append_time_ns
        for index, (key, payload) in enumerate(zip(self.keys, self.payload_list(), strict=True)):
            yield LogRecord(partition, base + index, key, payload, self.headers_of(index), when)

    def redacted_flags(self) -> list[bool]:
        """Whether each record was redacted (:data:`REDACTED_HEADER`)."""
        if REDACTED_HEADER in self.headers:
            return [True] * len(self)
        if not self.message_headers:
            return [False] * len(self)
        return [REDACTED_HEADER in headers for headers in self.message_headers]

    def without_redacted(self) -> list[RecordBatch]:
        """The runs of consecutive records that were not redacted, each with its true offsets:
        the batch itself when none was (the common case costs no scan)."""
        if REDACTED_HEADER not in self.headers and not self.message_headers:
            return [self]
        flags = self.redacted_flags()
        if not any(flags):
            return [self]
        runs = []
        start = None
        for index, redacted in enumerate([*flags, True]):
            if not redacted and start is None:
                start = index
            elif redacted and start is not None:
                runs.append(self.between(start, index))
                start = None
        return runs

    def between(self, start: int, stop: int) -> RecordBatch:
        """Records ``start`` (inclusive) to ``stop`` (exclusive) of this batch, by position."""
        sizes = self.payload_sizes
        first_byte = sum(sizes[:start])
        last_byte = first_byte + sum(sizes[start:stop])
        return RecordBatch(
            partition=self.partition,
            base_offset=self.base_offset + start,
            append_time_ns=self.append_time_ns,
            keys=self.keys[start:stop],
            payload_sizes=sizes[start:stop],
            payloads=self.payloads[first_byte:last_byte],
            headers=self.headers,
            message_headers=self.message_headers[start:stop] if self.message_headers else (),
            payload_type=self.payload_type,
        )

    def starting_at(self, offset: int) -> RecordBatch:
        """The records of this batch from ``offset`` on (the batch itself if it starts there)."""
        skip = offset - self.base_offset
        if skip <= 0:
            return self
        skipped_bytes = sum(self.payload_sizes[:skip])
        return RecordBatch(
            partition=self.partition,
            base_offset=offset,
            append_time_ns=self.append_time_ns,
            keys=self.keys[skip:],
            payload_sizes=self.payload_sizes[skip:],
            payloads=self.payloads[skipped_bytes:],
            headers=self.headers,
            message_headers=self.message_headers[skip:] if self.message_headers else (),
            payload_type=self.payload_type,
        )

    @classmethod
    def concat(cls, batches: Sequence[RecordBatch]) -> RecordBatch:
        """Consecutive batches of one partition as one, so that a consumer applies them in one
        transaction. The first batch's headers become the batch's (they carry the trace
        context a consumer links to); every record keeps the headers it had."""
        if len(batches) == 1:
            return batches[0]
        first = batches[0]
        for before, after in itertools.pairwise(batches):
            if after.partition != first.partition or after.base_offset != before.next_offset:
                raise ValueError("only consecutive batches of one partition can be joined")
        keeps_headers = all(b.headers == first.headers for b in batches)
        message_headers: list[Mapping[str, str]] = []
        if keeps_headers and not any(b.message_headers for b in batches):
            message_headers = []
        else:
            for batch in batches:
                for index in range(len(batch)):
                    message_headers.append(dict(batch.headers_of(index)))
        return cls(
            partition=first.partition,
            base_offset=first.base_offset,
            append_time_ns=batches[-1].append_time_ns,
            keys=[key for batch in batches for key in batch.keys],
            payload_sizes=[size for batch in batches for size in batch.payload_sizes],
            payloads=b"".join(batch.payloads for batch in batches),
            headers=first.headers,
            message_headers=message_headers,
            payload_type=first.payload_type,
        )

    @classmethod
    def from_proto(cls, message: log_service_pb2.LogBatch) -> RecordBatch:
        """Decode the wire/disk form."""
        return cls(
            partition=message.partition,
            base_offset=message.base_offset,
            append_time_ns=message.append_time.ToNanoseconds(),
            keys=list(message.keys),
            payload_sizes=list(message.payload_sizes),
            payloads=message.payloads,
            headers=dict(message.headers),
            message_headers=[dict(h.entries) for h in message.message_headers],
            payload_type=message.payload_type,
        )

    def to_proto(self) -> log_service_pb2.LogBatch:
        """Encode to the wire/disk form."""
        message = log_service_pb2.LogBatch(
            partition=self.partition,
            base_offset=self.base_offset,
            payload_type=self.payload_type,
            keys=self.keys,
            payload_sizes=self.payload_sizes,
            payloads=self.payloads,
            headers=self.headers,
        )
        message.append_time.FromNanoseconds(self.append_time_ns)
        for entries in self.message_headers:
            message.message_headers.add().entries.update(entries)
        return message


class Positions(Sequence[Position]):
    """Where each message of one ``append_batch`` call landed, in the order given.

    Computed on demand: most producers only need to know the append is durable, and building
    one tuple per message would cost more than the append itself.
    """

    def __init__(self, partition_of: Sequence[int], bases: Mapping[int, int]) -> None:
        self._partition_of = partition_of
        self._bases = bases
        self._resolved: list[Position] | None = None

    def _all(self) -> list[Position]:
        if self._resolved is None:
            next_in = dict(self._bases)
            resolved = []
            for partition in self._partition_of:
                resolved.append(Position(partition, next_in[partition]))
                next_in[partition] += 1
            self._resolved = resolved
        return self._resolved

    def __len__(self) -> int:
        return len(self._partition_of)

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        return self._all()[index]


class LogReader(ABC):
    """Reading one stream: offsets and subscriptions (implemented locally and over gRPC)."""

    stream: str
    messaging_system: str = "profilemesh"
    """What consumers' spans and metrics name as ``messaging.system`` (the backend's name)."""

    @abstractmethod
    async def offsets(self) -> list[PartitionRange]:
        """The retained offset range of every partition, by partition number."""

    @abstractmethod
    def subscribe(
        self,
        partition: int,
        from_offset: int,
        *,
        stop_at_end: bool = False,
        max_records: int = 5000,
    ) -> AsyncIterator[RecordBatch]:
        """Batches of ``partition`` from ``from_offset`` on, in order, as they become durable.

        Waits for new records once caught up, unless ``stop_at_end``: then it ends after the
        records that existed when it started. Raises :class:`OffsetOutOfRange` when
        ``from_offset`` is below the first retained offset or beyond the next one.
        """

    async def partition_count(self) -> int:
        """How many partitions the stream has."""
        return len(await self.offsets())

    async def read(
        self, partition: int, from_offset: int, max_records: int = 5000
    ) -> list[RecordBatch]:
        """The durable batches of ``partition`` from ``from_offset`` (at most about
        ``max_records`` records), without waiting for more."""
        batches = []
        count = 0
        async for batch in self.subscribe(
            partition, from_offset, stop_at_end=True, max_records=max_records
        ):
            batches.append(batch)
            count += len(batch)
            if count >= max_records:
                break
        return batches

    async def close(self) -> None:  # noqa: B027 - most readers hold nothing to release
        """Release what the reader holds."""


Selector = Callable[[int, RecordBatch], Sequence[bool]]
"""Given a partition and a batch of its records, which records to redact (one flag each)."""


class Log(LogReader):
    """A stream that can be appended to: durable before ``append_batch`` returns."""

    partitions: int
    payload_type: str

    @abstractmethod
    async def append_batch(
        self,
        entries: Sequence[tuple[str, bytes]],
        headers: Mapping[str, str] | None = None,
        *,
        message_headers: Sequence[Mapping[str, str]] | None = None,
    ) -> Positions:
        """Append ``(key, payload)`` entries durably and return once all of them are.

        On an error nothing is acknowledged; entries bound for different partitions may still
        be partly stored (a retry then repeats them, which deduplication absorbs).

        ``headers`` apply to every entry; when not given, they carry the current trace context
        so that consumers can link their spans to the producer's. ``message_headers``, one
        mapping per entry, add to (and override) them for that entry alone: entries queued by
        different producers (an outbox) keep each their own trace context. Entries with the
        same key keep their order. Raises :class:`LogFull` when the backend cannot keep up.
        """

    @abstractmethod
    async def redact(self, select: Selector) -> int:
        """Erase the records ``select`` marks, wherever the log keeps them; how many it erased.

        Every retained record is shown to ``select`` (in batches, possibly from a worker
        thread). A marked record keeps its offset, headers and append time, but its key becomes
        ``""``, its payload ``b""`` and it gains the header :data:`REDACTED_HEADER`, so that
        consumers' positions stay valid and :class:`~profilemesh.shared.log.consumer.LogConsumer`
        skips it. Records redacted before are never counted again. Once it returns, the erased
        bytes are in no file of the log; appends and reads may go on meanwhile.
        """

    async def append(
        self, key: str, payload: bytes, headers: Mapping[str, str] | None = None
    ) -> Position:
        """Append one message durably; where it landed."""
        positions = await self.append_batch([(key, payload)], headers)
        position: Position = positions[0]
        return position


class LogError(DomainError):
    """Base class of the log's errors (domain errors, so callers get a proper status)."""


class OffsetOutOfRange(LogError):
    """The requested offset is not retained (too old) or does not exist yet (too new)."""

    code = "OUT_OF_RANGE"
    default_reason = "OFFSET_OUT_OF_RANGE"


class LogFull(ResourceExhausted):
    """Appends are waiting for the disk beyond the configured bound: back off and retry."""

    default_reason = "LOG_FULL"


class LogClosed(LogError):
    """The log was closed."""

    code = "UNAVAILABLE"
    default_reason = "LOG_CLOSED"
