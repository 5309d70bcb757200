"""The log on NATS JetStream: the scale-out backend's streams, behind the same :class:`Log`.

**Layout.** Each partition of a log is a JetStream stream of its own, ``<prefix>_<log>_p<NNN>``,
holding the one subject ``<prefix>.<log>.<NNN>``. A stream numbers the messages it stores 1, 2,
3... in the order it stores them, so a partition's offset is the stream sequence minus one: dense,
ordered and never reused, as :class:`Log` requires, with no offset bookkeeping of our own. The
partition count is fixed when the log is created: the description of every partition stream
records it (JSON, with the payload type), and opening the log with another count fails as it does
on the embedded backend, since keys would move between partitions and lose their order.

**Appending.** A record is one message, a one-record ``LogBatch`` (key, payload, the append's
headers and time): the form the log already speaks, so keys and header values need no escaping to
fit NATS headers. An append publishes all its records without waiting, then awaits every
JetStream acknowledgement. A server stores one connection's messages in the order it sent them,
so records keep their order per key while an append costs one round trip, not one per record.
Each message carries a ``Nats-Msg-Id`` unique to this log instance: when acknowledgements do not
come back in time, the unacknowledged messages are published again under the same ids and the
server drops the copies of those it had stored (within the stream's duplicate window). The
``Log`` API has no key that would survive the caller's own retry, so a retried ``append_batch`` is
a new append, absorbed downstream by deduplication as on the embedded backend. Positions come from
the acknowledgements: other producers' messages may interleave with an append's.

**Reading.** A subscription creates an ephemeral pull consumer that starts at the stream sequence
``offset + 1`` (no acknowledgements, consumer state in memory) and pulls up to ``max_records``
messages at a time. The records of one append come back as one :class:`RecordBatch`, as from the
embedded log; :meth:`NatsLog.subscribe_joined` (which services read upstream logs with) joins
whatever arrived together, so that a consumer applies it in one transaction. The position is not
JetStream's to keep: a :class:`~profilemesh.shared.log.consumer.LogConsumer` commits its offset in
the same transaction as the state it derives from the records (effectively once), and no
acknowledgement to NATS can join that transaction. A durable consumer's acknowledged position
would be a second truth, which disagrees with the store after a crash between the two; so the
store is the truth and every subscription says where it starts. A consumer sequence that skips
means that delivered messages were lost on the way (a reconnect): the consumer is then created
anew where the subscription stands.

**Redaction.** JetStream cannot rewrite a message, so :meth:`NatsLog.redact` deletes the marked
ones, the server overwriting their bytes (secure erase). The stream keeps the gap and readers fill
it: a missing sequence is read as a redacted record (empty key and payload, the header
:data:`~profilemesh.shared.log.api.REDACTED_HEADER`), so offsets stay dense for consumers, which
skip such records. The headers and time of an erased message go with it. Deleting a partition's
first messages moves the stream's first sequence, which would make them look expired: the start
of such a leading redacted run (the *floor*) is recorded in the stream's description, and those
offsets stay retained until retention (``max_age`` after the redaction) would have removed them.

**Retention.** Limits-based, by age: the server removes messages older than ``max_age``.

**Failures.** A lost connection is re-established forever; meanwhile appends and reads raise
:class:`~profilemesh.shared.errors.Unavailable`, after which producers retry and consumers
resume. A message lost with a connection may be stored by the retry after the append's later
messages to the same partition were: then those records are out of order (logged as an error), a
risk the embedded log, which writes an append's records to a partition in one write, does not
have.

**Durability.** An acknowledged message is stored by JetStream: on a single server, written to its
files (which it syncs to disk every ``sync_interval``); on a cluster, on a majority of the
stream's ``replicas``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
import secrets
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, TypeVar

import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from profilemesh.common.v1 import log_service_pb2
from profilemesh.shared.errors import InvalidArgument, NotFound, Unavailable
from profilemesh.shared.log.api import (
    DEDUP_HEADER,
    REDACTED_HEADER,
    Log,
    LogClosed,
    LogError,
    LogFull,
    LogReader,
    OffsetOutOfRange,
    PartitionRange,
    Position,
    Positions,
    RecordBatch,
    Selector,
    partition_for,
)
from profilemesh.shared.telemetry import trace_headers
from profilemesh.shared.wire import length_delimited, string_field, timestamp_field, varint_field

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

API = "$JS.API"
LAYOUT_VERSION = 1
MIB = 1024 * 1024
DUPLICATE_WINDOW_SECONDS = 120.0
"""How long JetStream remembers a message id: longer than all the retries of one append."""

CONSUMER_INACTIVE_SECONDS = 60.0
"""An ephemeral consumer nobody pulls from for this long is removed by the server (a reader that
died without deleting its consumer)."""

CONNECT_ATTEMPTS = 10
"""Attempts of each server (half a second apart) before opening a log fails."""

STATE_TTL_SECONDS = 1.0
"""How old a partition's cached state may be when telling a redacted gap from an expired one."""

_ENVELOPE_OVERHEAD = 512
"""Room for the subject, reply subject and headers of a message, beyond its data."""

_NAME = re.compile(r"[A-Za-z0-9_-]+")
_STATUS = "Status"
_ACK_SEQUENCE = re.compile(rb'"seq":(\d+)')
_REDACTED = {REDACTED_HEADER: "1"}


def stream_name(prefix: str, stream: str, partition: int) -> str:
    """The JetStream stream holding one partition of a log."""
    return f"{prefix}_{stream}_p{partition:03d}"


def subject_name(prefix: str, stream: str, partition: int) -> str:
    """The subject of one partition of a log (its stream holds only this one)."""
    return f"{prefix}.{stream}.{partition:03d}"


# -- the message form ----------------------------------------------------------------------------


def _shared_fields(headers: Mapping[str, str], append_time_ns: int) -> bytes:
    """The LogBatch fields every record of one append has in common: time and headers."""
    parts = [timestamp_field(3, append_time_ns)]
    for name, value in headers.items():
        parts.append(length_delimited(8, string_field(1, name) + string_field(2, value)))
    return b"".join(parts)


def _message_data(shared: bytes, key: str, payload: bytes) -> bytes:
    """A one-record ``LogBatch``: the shared fields, the key, the payload's size and itself."""
    return (
        shared + string_field(5, key) + varint_field(6, len(payload)) + length_delimited(7, payload)
    )


class _Record(NamedTuple):
    """One stored message, decoded."""

    key: str
    payload: bytes
    headers: dict[str, str]
    append_time_ns: int


def _decode(data: bytes) -> _Record:
    message = log_service_pb2.LogBatch.FromString(data)
    key = message.keys[0] if message.keys else ""
    return _Record(
        key, message.payloads, dict(message.headers), message.append_time.ToNanoseconds()
    )


def _sequences(reply: str) -> tuple[int, int]:
    """(stream sequence, consumer sequence) of a delivered message, from its reply subject:
    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<time>.<pending>``, or the longer
    form with a domain and an account hash after ``ACK``."""
    tokens = reply.split(".")
    first = 5 if len(tokens) == 9 else 7
    return int(tokens[first]), int(tokens[first + 1])


# -- layout and state --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """What a partition stream's description records about its log."""

    stream: str
    partition: int
    partitions: int
    payload_type: str
    floor: int = 0
    """The first sequence of a leading run of redacted messages (0: none)."""
    floor_time_ns: int = 0
    """When that run was (last) redacted: it counts as retained for ``max_age`` after."""

    def describe(self) -> str:
        return json.dumps(
            {
                "profilemesh_log": LAYOUT_VERSION,
                "stream": self.stream,
                "partition": self.partition,
                "partitions": self.partitions,
                "payload_type": self.payload_type,
                "floor": self.floor,
                "floor_time_ns": self.floor_time_ns,
            },
            separators=(",", ":"),
        )

    @classmethod
    def parse(cls, description: str | None) -> _Layout | None:
        try:
            fields = json.loads(description or "")
        except ValueError:
            return None
        if not isinstance(fields, dict) or "profilemesh_log" not in fields:
            return None
        return cls(
            stream=str(fields.get("stream", "")),
            partition=int(fields.get("partition", 0)),
            partitions=int(fields["partitions"]),
            payload_type=str(fields.get("payload_type", "")),
            floor=int(fields.get("floor", 0)),
            floor_time_ns=int(fields.get("floor_time_ns", 0)),
        )


class _State(NamedTuple):
    """A partition stream's sequences and layout, as last fetched."""

    first_seq: int
    """The first stored sequence (the last one + 1 when none is stored)."""
    last_seq: int
    layout: _Layout
    config: dict[str, Any]
    fetched: float
    """``time.monotonic()`` when fetched."""

    def first_offset(self, max_age_ns: int) -> int:
        """The partition's first retained offset: the first stored message's, or the floor's
        while its redacted run would still be retained."""
        first = max(self.first_seq, 1)
        floor = self.layout.floor
        if 0 < floor < first and (
            max_age_ns == 0 or self.layout.floor_time_ns >= time.time_ns() - max_age_ns
        ):
            first = floor
        return first - 1


class _JetStreamError(LogError):
    """An error answered by the JetStream API."""

    def __init__(self, error: Mapping[str, Any]) -> None:
        self.status = int(error.get("code", 0))
        self.err_code = int(error.get("err_code", 0))
        super().__init__(f"JetStream: {error.get('description', error)}")


_STREAM_NOT_FOUND = 10059
_CONSUMER_NOT_FOUND = 10014
_STREAM_NAME_IN_USE = 10058
_MESSAGE_NOT_FOUND = 10037
# Storage exhausted or a stream limit reached: back off and retry, as with a full embedded log.
_FULL = {10047, 10077, 10078, 10023}


class _PendingAppend:
    """The acknowledgements one append awaits: the stream sequence of each record (0 until
    acknowledged), and a future settled when all have come or one failed."""

    def __init__(self, count: int) -> None:
        self.sequences = [0] * count
        self.error: BaseException | None = None
        self.settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._missing = 0

    def expect(self, count: int) -> None:
        """An attempt publishes ``count`` records not acknowledged yet."""
        self._missing = count
        if self.settled.done():
            self.settled = asyncio.get_running_loop().create_future()

    def acknowledge(self, index: int, sequence: int) -> None:
        if self.sequences[index]:
            return  # acknowledged by an earlier attempt
        self.sequences[index] = sequence
        self._missing -= 1
        if self._missing <= 0 and not self.settled.done():
            self.settled.set_result(None)

    def interrupt(self) -> None:
        """Stop waiting for this attempt's acknowledgements."""
        if not self.settled.done():
            self.settled.set_result(None)

    def fail(self, error: BaseException) -> None:
        self.error = self.error or error
        if not self.settled.done():
            self.settled.set_result(None)


class _AckedPositions(Positions):
    """Positions read from the acknowledgements (an append's records need not be adjacent)."""

    def __init__(self, partition_of: Sequence[int], offsets: Sequence[int]) -> None:
        super().__init__(partition_of, {})
        self._offsets = offsets

    def _all(self) -> list[Position]:
        if self._resolved is None:
            self._resolved = [
                Position(partition, offset)
                for partition, offset in zip(self._partition_of, self._offsets, strict=True)
            ]
        return self._resolved


async def connect(
    servers: str, name: str, reconnected: Callable[[], None] = lambda: None
) -> Client:
    """A connection to the NATS servers (comma-separated URLs) that reconnects forever, calling
    ``reconnected`` each time it has."""

    async def report(error: Exception) -> None:
        logger.warning("NATS connection %s: %s", name, error)

    async def on_reconnect() -> None:
        logger.info("NATS connection %s re-established", name)
        reconnected()

    try:
        connection = await nats.connect(
            servers=[url.strip() for url in servers.split(",") if url.strip()],
            name=name,
            allow_reconnect=True,
            # A first connection gives up after a few seconds, so that a wrong address or a
            # server that is down is reported; an established one is re-established forever.
            max_reconnect_attempts=CONNECT_ATTEMPTS,
            reconnect_time_wait=0.5,
            connect_timeout=5,
            error_cb=report,
            reconnected_cb=on_reconnect,
        )
    except (OSError, TimeoutError, nats.errors.Error) as error:
        raise Unavailable(f"cannot reach NATS at {servers}: {error!r}") from error
    connection.options["max_reconnect_attempts"] = -1
    return connection


# -- the log -----------------------------------------------------------------------------------


class NatsLog(Log):
    """A partitioned, durable, replayable stream kept in NATS JetStream (one stream per
    partition). Open with :meth:`open`; any number of processes may append and read at once."""

    messaging_system = "nats"

    def __init__(
        self,
        connection: Client,
        stream: str,
        *,
        prefix: str,
        ack_timeout_seconds: float,
        publish_attempts: int,
        max_pending_bytes: int,
        idle_seconds: float,
    ) -> None:
        for what, name in (("stream", stream), ("prefix", prefix)):
            if not _NAME.fullmatch(name):
                raise InvalidArgument(
                    f"{what} {name!r} cannot name a JetStream stream",
                    violations=[(what, "letters, digits, '-' and '_' only")],
                )
        self.stream = stream
        self.prefix = prefix
        self.partitions = 0
        self.payload_type = ""
        self.ack_timeout_seconds = ack_timeout_seconds
        self.publish_attempts = publish_attempts
        self.max_pending_bytes = max_pending_bytes
        self.idle_seconds = idle_seconds
        self.max_age_ns = 0
        self._nc = connection
        self._streams: list[str] = []
        self._subjects: list[str] = []
        self._states: list[_State | None] = []
        self._producer = secrets.token_hex(6)
        self._message_ids = itertools.count()
        self._ack_prefix = ""
        self._ack_tokens = itertools.count()
        self._acks: dict[str, tuple[_PendingAppend, int]] = {}
        self._pending_bytes = 0
        self._cursors: set[_Cursor] = set()
        self._redacting = asyncio.Lock()
        self._closed = False

    @classmethod
    async def open(
        cls,
        servers: str,
        stream: str,
        *,
        partitions: int | None = None,
        payload_type: str = "",
        prefix: str = "profilemesh",
        replicas: int = 1,
        max_age_seconds: float = 0.0,
        configure: bool = True,
        ack_timeout_seconds: float = 10.0,
        publish_attempts: int = 3,
        max_pending_bytes: int = 256 * MIB,
        idle_seconds: float = 5.0,
    ) -> NatsLog:
        """Connect to ``servers`` and open the log ``stream``, creating its streams if needed.

        ``partitions`` is fixed at creation: reopening with another count raises ``ValueError``;
        ``None`` takes the count of the existing log (``NotFound`` when there is none).
        ``configure`` makes the streams' retention (``max_age_seconds``, 0: keep everything) and
        ``replicas`` what is asked for, also on existing streams: the producer's job, so readers
        leave it off. ``idle_seconds`` is how long a caught-up subscription waits for a record
        before checking whether the last records were redacted.
        """
        opened: list[NatsLog] = []

        def reconnected() -> None:
            for log in opened:
                log._reconnected()

        connection = await connect(servers, f"profilemesh-log-{stream}", reconnected)
        log = cls(
            connection,
            stream,
            prefix=prefix,
            ack_timeout_seconds=ack_timeout_seconds,
            publish_attempts=publish_attempts,
            max_pending_bytes=max_pending_bytes,
            idle_seconds=idle_seconds,
        )
        opened.append(log)
        try:
            await log._open(partitions, payload_type, replicas, max_age_seconds, configure)
        except BaseException:
            await connection.close()
            raise
        return log

    async def _open(
        self,
        partitions: int | None,
        payload_type: str,
        replicas: int,
        max_age_seconds: float,
        configure: bool,
    ) -> None:
        first_name = stream_name(self.prefix, self.stream, 0)
        first = await self._stream_info(first_name)
        if first is not None:
            layout = _Layout.parse(first["config"].get("description"))
            if layout is None:
                raise LogError(f"JetStream stream {first_name} does not hold a profilemesh log")
            if partitions is not None and layout.partitions != partitions:
                raise ValueError(
                    f"NATS holds stream {self.stream!r} with {layout.partitions} partitions, "
                    f"not {partitions}"
                )
            partitions = layout.partitions
            payload_type = payload_type or layout.payload_type
        elif partitions is None:
            raise NotFound(f"no log {self.stream!r} in NATS (no JetStream stream {first_name})")
        self.partitions = partitions
        self.payload_type = payload_type
        self._streams = [stream_name(self.prefix, self.stream, p) for p in range(partitions)]
        self._subjects = [subject_name(self.prefix, self.stream, p) for p in range(partitions)]
        self._states = [None] * partitions
        max_age_ns = int(max_age_seconds * 1e9)
        await asyncio.gather(
            *(
                self._open_partition(p, payload_type, replicas, max_age_ns, configure)
                for p in range(partitions)
            )
        )
        self.max_age_ns = int(self._cached(0).config.get("max_age", 0))
        self._ack_prefix = self._nc.new_inbox()
        await self._nc.subscribe(f"{self._ack_prefix}.*", cb=self._on_ack)

    async def _open_partition(
        self, partition: int, payload_type: str, replicas: int, max_age_ns: int, configure: bool
    ) -> None:
        name = self._streams[partition]
        info = await self._stream_info(name)
        if info is None:
            layout = _Layout(self.stream, partition, self.partitions, payload_type)
            config = {
                "name": name,
                "description": layout.describe(),
                "subjects": [self._subjects[partition]],
                "retention": "limits",
                "storage": "file",
                "discard": "old",
                "num_replicas": replicas,
                "max_age": max_age_ns,
                "duplicate_window": _duplicate_window(max_age_ns),
                "max_msgs": -1,
                "max_bytes": -1,
                "max_msg_size": -1,
                "max_consumers": -1,
            }
            try:
                info = await self._api(f"STREAM.CREATE.{name}", config)
            except _JetStreamError as error:
                if error.err_code != _STREAM_NAME_IN_USE:
                    raise
                info = await self._stream_info(name)  # created meanwhile by another process
                if info is None:
                    raise
        state = self._store_state(partition, info)
        if state.layout.partitions != self.partitions:
            raise ValueError(
                f"JetStream stream {name} belongs to a log of {state.layout.partitions} "
                f"partitions, not {self.partitions}"
            )
        wanted = {"max_age": max_age_ns, "num_replicas": replicas}
        if configure and any(state.config.get(field) != value for field, value in wanted.items()):
            config = {**state.config, **wanted}
            config["duplicate_window"] = _duplicate_window(max_age_ns)
            self._store_state(partition, await self._api(f"STREAM.UPDATE.{name}", config))

    # -- JetStream API -----------------------------------------------------------------------

    async def _api(self, call: str, request: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """One JetStream API request; its answer, or :class:`_JetStreamError`."""
        body = json.dumps(request).encode() if request is not None else b""
        try:
            message = await self._nc.request(
                f"{API}.{call}", body, timeout=self.ack_timeout_seconds
            )
        except nats.errors.NoRespondersError as error:
            raise Unavailable(f"JetStream is not available on {self._server()}") from error
        except (TimeoutError, nats.errors.Error, OSError) as error:
            self._check_open()
            raise Unavailable(f"JetStream did not answer {call}: {error!r}") from error
        answer: dict[str, Any] = json.loads(message.data)
        if "error" in answer:
            raise _JetStreamError(answer["error"])
        return answer

    def _server(self) -> str:
        url = self._nc.connected_url
        return url.netloc if url is not None else "the NATS servers"

    async def _stream_info(self, name: str) -> dict[str, Any] | None:
        try:
            return await self._api(f"STREAM.INFO.{name}")
        except _JetStreamError as error:
            if error.err_code == _STREAM_NOT_FOUND:
                return None
            raise

    def _store_state(self, partition: int, info: Mapping[str, Any]) -> _State:
        config = info["config"]
        layout = _Layout.parse(config.get("description"))
        if layout is None:
            raise LogError(f"JetStream stream {config['name']} does not hold a profilemesh log")
        state = info.get("state", {})
        last = int(state.get("last_seq", 0))
        first = int(state.get("first_seq", 0)) or last + 1
        stored = _State(first, last, layout, config, time.monotonic())
        self._states[partition] = stored
        return stored

    def _cached(self, partition: int) -> _State:
        state = self._states[partition]
        assert state is not None, "every partition's state is fetched when the log opens"
        return state

    async def _state(self, partition: int) -> _State:
        """The partition's current sequences and layout, fetched now."""
        info = await self._stream_info(self._streams[partition])
        if info is None:
            raise LogError(f"JetStream stream {self._streams[partition]} was deleted")
        return self._store_state(partition, info)

    # -- appending ---------------------------------------------------------------------------

    async def append_batch(
        self,
        entries: Sequence[tuple[str, bytes]],
        headers: Mapping[str, str] | None = None,
        *,
        message_headers: Sequence[Mapping[str, str]] | None = None,
    ) -> Positions:
        if not entries:
            return Positions([], {})
        self._check_open()
        if headers is None:
            headers = trace_headers()
        if message_headers is not None and len(message_headers) != len(entries):
            raise ValueError("message_headers must have one mapping per entry")
        partitions = self.partitions
        partition_of = [partition_for(key, partitions) for key, _ in entries]
        now = time.time_ns()
        shared = _shared_fields(headers, now)
        if message_headers is None:
            bodies = [_message_data(shared, key, payload) for key, payload in entries]
        else:
            own_fields: dict[tuple[tuple[str, str], ...], bytes] = {}
            bodies = []
            for (key, payload), own in zip(entries, message_headers, strict=True):
                items = tuple(own.items())
                fields = own_fields.get(items)
                if fields is None:
                    fields = own_fields[items] = _shared_fields({**headers, **own}, now)
                bodies.append(_message_data(fields, key, payload))
        nbytes = sum(len(body) for body in bodies)
        largest = max(len(body) for body in bodies)
        limit = self._nc.max_payload - _ENVELOPE_OVERHEAD
        if largest > limit:
            raise InvalidArgument(
                f"a record of {largest} bytes exceeds what the NATS servers accept ({limit}; "
                "raise max_payload in their configuration)",
                violations=[("payload", f"at most {limit} bytes with its key and headers")],
            )
        if self._pending_bytes and self._pending_bytes + nbytes > self.max_pending_bytes:
            raise LogFull(
                f"{self._pending_bytes // MIB} MiB of appends to {self.stream} await JetStream",
                retry_after_seconds=0.2,
            )
        self._pending_bytes += nbytes
        try:
            ids = [f"{self._producer}.{next(self._message_ids)}" for _ in bodies]
            if message_headers is not None:
                # A record that names itself keeps its name whoever appends it (an outbox
                # published again by another replica): JetStream stores it once.
                ids = [
                    own.get(DEDUP_HEADER) or generated
                    for own, generated in zip(message_headers, ids, strict=True)
                ]
            sequences = await self._publish_all(partition_of, bodies, ids)
        finally:
            self._pending_bytes -= nbytes
        self._check_order(partition_of, sequences)
        return _AckedPositions(partition_of, [sequence - 1 for sequence in sequences])

    async def _publish_all(
        self, partition_of: Sequence[int], bodies: Sequence[bytes], ids: Sequence[str]
    ) -> list[int]:
        """Publish every body, await every acknowledgement; the stream sequence of each.

        Unacknowledged bodies are published again, under the same message ids, up to
        ``publish_attempts`` times in all (a late acknowledgement of an earlier attempt counts).
        """
        append = _PendingAppend(len(bodies))
        tokens: list[str] = []
        try:
            waiting: Sequence[int] = range(len(bodies))
            for attempt in range(1, self.publish_attempts + 1):
                append.expect(len(waiting))
                for index in waiting:
                    token = str(next(self._ack_tokens))
                    tokens.append(token)
                    self._acks[token] = (append, index)
                    await self._publish(
                        self._subjects[partition_of[index]], bodies[index], ids[index], token
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(append.settled), self.ack_timeout_seconds)
                if append.error is not None:
                    raise append.error
                waiting = [index for index, sequence in enumerate(append.sequences) if not sequence]
                if not waiting:
                    return append.sequences
                self._check_open()
                logger.warning(
                    "JetStream acknowledged %d of %d records of %s (attempt %d): publishing "
                    "the others again",
                    len(bodies) - len(waiting),
                    len(bodies),
                    self.stream,
                    attempt,
                )
        finally:
            for token in tokens:
                self._acks.pop(token, None)
        raise Unavailable(
            f"JetStream did not acknowledge {len(waiting)} of {len(bodies)} records of "
            f"{self.stream} after {self.publish_attempts} attempts"
        )

    async def _publish(self, subject: str, body: bytes, message_id: str, token: str) -> None:
        """Publish one message, its acknowledgement to come to the reply subject ``token``."""
        try:
            await self._nc.publish(
                subject,
                body,
                reply=f"{self._ack_prefix}.{token}",
                headers={"Nats-Msg-Id": message_id},
            )
        except (nats.errors.Error, OSError) as error:
            self._check_open()
            raise Unavailable(f"cannot publish to NATS: {error!r}") from error

    async def _on_ack(self, message: Msg) -> None:
        waiting = self._acks.get(message.subject[len(self._ack_prefix) + 1 :])
        if waiting is None:
            return  # its append is over
        append, index = waiting
        data = message.data
        if not data:
            status = (message.headers or {}).get(_STATUS, "")
            append.fail(
                Unavailable(f"JetStream did not take a record of {self.stream} (status {status})")
            )
            return
        if b'"error"' not in data and (found := _ACK_SEQUENCE.search(data)) is not None:
            append.acknowledge(index, int(found[1]))  # the common case, without a JSON parser
            return
        answer = json.loads(data)
        error = answer.get("error")
        if error is None:
            append.acknowledge(index, int(answer["seq"]))
        elif int(error.get("err_code", 0)) in _FULL:
            append.fail(
                LogFull(f"JetStream refused a record of {self.stream}: {error.get('description')}")
            )
        else:
            append.fail(_JetStreamError(error))

    def _check_order(self, partition_of: Sequence[int], sequences: Sequence[int]) -> None:
        """Warn if a partition stored an append's records out of order: possible only when a
        record lost in a reconnect was stored by a retry after later ones."""
        last: dict[int, int] = {}
        for partition, sequence in zip(partition_of, sequences, strict=True):
            if sequence <= last.get(partition, 0):
                logger.error(
                    "records of %s/%d were stored out of order after a reconnect",
                    self.stream,
                    partition,
                )
                return
            last[partition] = sequence

    def _reconnected(self) -> None:
        """What was in flight on the lost connection may be lost: publish the unacknowledged
        messages again and create the subscriptions' consumers anew, without waiting for
        timeouts to tell."""
        for append in {append for append, _ in self._acks.values()}:
            append.interrupt()
        for cursor in self._cursors:
            cursor.reconnected = True
            cursor.wake()

    def _check_open(self) -> None:
        if self._closed:
            raise LogClosed(f"log {self.stream} is closed")

    # -- reading -----------------------------------------------------------------------------

    async def offsets(self) -> list[PartitionRange]:
        self._check_open()
        states = await asyncio.gather(*(self._state(p) for p in range(self.partitions)))
        return [
            PartitionRange(p, state.first_offset(self.max_age_ns), state.last_seq)
            for p, state in enumerate(states)
        ]

    def _check_partition(self, partition: int) -> None:
        if not 0 <= partition < self.partitions:
            raise LogError(
                f"partition {partition} out of range [0, {self.partitions})",
                violations=[("partition", f"must be in [0, {self.partitions})")],
            )

    async def subscribe(
        self,
        partition: int,
        from_offset: int,
        *,
        stop_at_end: bool = False,
        max_records: int = 5000,
    ) -> AsyncGenerator[RecordBatch, None]:
        batches = self.subscribe_arrivals(
            partition, from_offset, stop_at_end=stop_at_end, max_records=max_records
        )
        async with contextlib.aclosing(batches):
            async for arrived in batches:
                for batch in arrived:
                    yield batch

    async def subscribe_joined(
        self,
        partition: int,
        from_offset: int,
        *,
        stop_at_end: bool = False,
        max_records: int = 5000,
    ) -> AsyncGenerator[RecordBatch, None]:
        """Like :meth:`subscribe`, but what arrived together (at most about ``max_records``
        records) comes as one batch, so that a consumer applies it in one transaction, not one
        per append (as :class:`~profilemesh.shared.log.client.RemoteLog` does)."""
        batches = self.subscribe_arrivals(
            partition, from_offset, stop_at_end=stop_at_end, max_records=max_records
        )
        async with contextlib.aclosing(batches):
            async for arrived in batches:
                yield RecordBatch.concat(arrived)

    async def subscribe_arrivals(
        self,
        partition: int,
        from_offset: int,
        *,
        stop_at_end: bool = False,
        max_records: int = 5000,
    ) -> AsyncGenerator[list[RecordBatch], None]:
        """The batches of :meth:`subscribe`, in the groups they arrived in (never empty)."""
        self._check_open()
        self._check_partition(partition)
        state = await self._state(partition)
        first = state.first_offset(self.max_age_ns)
        if not first <= from_offset <= state.last_seq:
            raise OffsetOutOfRange(
                f"offset {from_offset} of {self.stream}/{partition} is outside "
                f"[{first}, {state.last_seq}]",
                violations=[("from_offset", "outside the retained range")],
            )
        end = state.last_seq if stop_at_end else None
        if end is not None and from_offset >= end:
            return
        cursor = _Cursor(self, partition, from_offset + 1)
        self._cursors.add(cursor)
        try:
            await self._reading(cursor.start())
            while end is None or cursor.next_seq <= end:
                limit = max_records if end is None else min(max_records, end - cursor.next_seq + 1)
                batches = await self._reading(cursor.next_batches(limit, end))
                if batches:
                    yield batches
        finally:
            self._cursors.discard(cursor)
            await cursor.stop()

    async def read(
        self, partition: int, from_offset: int, max_records: int = 5000
    ) -> list[RecordBatch]:
        batches: list[RecordBatch] = []
        count = 0
        subscription = self.subscribe(
            partition, from_offset, stop_at_end=True, max_records=max_records
        )
        async with contextlib.aclosing(subscription):  # its consumer is deleted now, not later
            async for batch in subscription:
                batches.append(batch)
                count += len(batch)
                if count >= max_records:
                    break
        return batches

    async def _reading(self, step: Awaitable[_T]) -> _T:
        """Await one step of a subscription, a lost connection raised as :class:`Unavailable`
        (which consumers resume after)."""
        try:
            return await step
        except (nats.errors.Error, OSError) as error:
            self._check_open()
            raise Unavailable(f"reading {self.stream} from NATS failed: {error!r}") from error

    async def _check_gap(self, partition: int, first_missing: int) -> None:
        """Make sure the messages from ``first_missing`` on that a reader found missing were
        redacted, not removed by retention (which is :class:`OffsetOutOfRange`)."""
        state = self._cached(partition)
        if self.max_age_ns and time.monotonic() - state.fetched > STATE_TTL_SECONDS:
            state = await self._state(partition)
        for fresh in (False, True):
            if fresh:
                state = await self._state(partition)
            if first_missing >= state.first_seq:
                return  # inside the stored range: deleted, which only redaction does
            if first_missing > state.first_offset(self.max_age_ns):
                return  # in the leading run of redacted messages
        raise OffsetOutOfRange(
            f"records of {self.stream}/{partition} from offset {first_missing - 1} expired "
            "before they could be read",
            violations=[("from_offset", "outside the retained range")],
        )

    # -- redaction ---------------------------------------------------------------------------

    async def redact(self, select: Selector) -> int:
        self._check_open()
        async with self._redacting:
            erased = 0
            for partition in range(self.partitions):
                erased += await self._redact_partition(partition, select)
            return erased

    async def _redact_partition(self, partition: int, select: Selector) -> int:
        state = await self._state(partition)
        start = state.first_offset(self.max_age_ns)
        chosen: list[int] = []
        async with contextlib.aclosing(self.subscribe(partition, start, stop_at_end=True)) as read:
            async for batch in read:
                marks = await asyncio.to_thread(select, partition, batch)
                if len(marks) != len(batch):
                    raise ValueError(
                        f"the selector marked {len(marks)} records of a batch of {len(batch)}"
                    )
                already = batch.redacted_flags()
                chosen.extend(
                    batch.base_offset + index + 1
                    for index, (mark, done) in enumerate(zip(marks, already, strict=True))
                    if mark and not done
                )
        if not chosen:
            return 0
        erased = 0
        stream = self._streams[partition]
        for at in range(0, len(chosen), 256):  # bounded, so as not to flood the API
            answers = await asyncio.gather(
                *(self._erase(stream, sequence) for sequence in chosen[at : at + 256])
            )
            erased += sum(answers)
        await self._keep_floor(partition, start + 1)
        return erased

    async def _erase(self, stream: str, sequence: int) -> bool:
        """Delete one message, its bytes overwritten; whether it was there to delete."""
        try:
            await self._api(f"STREAM.MSG.DELETE.{stream}", {"seq": sequence, "no_erase": False})
        except _JetStreamError as error:
            if error.err_code == _MESSAGE_NOT_FOUND:
                return False  # expired or deleted meanwhile
            raise
        return True

    async def _keep_floor(self, partition: int, scan_start: int) -> None:
        """If redaction removed the partition's first messages (from ``scan_start``), record
        the run in the description, so that its offsets stay retained."""
        state = await self._state(partition)
        if state.first_seq <= scan_start:
            return
        layout = replace(state.layout, floor=scan_start, floor_time_ns=time.time_ns())
        config = {**state.config, "description": layout.describe()}
        self._store_state(
            partition, await self._api(f"STREAM.UPDATE.{self._streams[partition]}", config)
        )

    # -- closing -----------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop reading and appending, and close the connection."""
        if self._closed:
            return
        self._closed = True
        for cursor in list(self._cursors):
            cursor.wake()
        for append, _ in list(self._acks.values()):
            append.fail(LogClosed(f"log {self.stream} is closed"))
        # Subscriptions still open delete their consumers as they wind down; give them a turn.
        await asyncio.sleep(0)
        with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
            await self._nc.flush(timeout=1)
        await self._nc.close()


def _duplicate_window(max_age_ns: int) -> int:
    window = int(DUPLICATE_WINDOW_SECONDS * 1e9)
    return min(window, max_age_ns) if max_age_ns else window


class _Cursor:
    """What one subscription reads through: an ephemeral pull consumer of a partition stream,
    the messages it delivered, and the next stream sequence the subscription expects."""

    def __init__(self, log: NatsLog, partition: int, next_seq: int) -> None:
        self.log = log
        self.partition = partition
        self.stream = log._streams[partition]
        self.next_seq = next_seq
        self.consumer = ""
        self.inbox = ""
        self.subscription: Subscription | None = None
        self.last_cseq = 0
        self.owed = 0
        """Messages the open pull request may still deliver (0: none is open)."""
        self.received: deque[Msg] = deque()
        self.statuses = 0
        """Status messages among ``received``."""
        self.reconnected = False
        """Whether the connection was lost (and re-established) since the consumer started."""
        self.arrived = asyncio.Event()

    async def start(self) -> None:
        """Create the consumer at ``next_seq`` and listen on a fresh inbox."""
        info = await self.log._api(
            f"CONSUMER.CREATE.{self.stream}",
            {
                "stream_name": self.stream,
                "config": {
                    "deliver_policy": "by_start_sequence",
                    "opt_start_seq": self.next_seq,
                    "ack_policy": "none",
                    "replay_policy": "instant",
                    "inactive_threshold": int(CONSUMER_INACTIVE_SECONDS * 1e9),
                    "mem_storage": True,
                    "num_replicas": 1,
                },
            },
        )
        self.consumer = info["name"]
        self.last_cseq = 0
        self.owed = 0
        self.received.clear()
        self.statuses = 0
        self.reconnected = False
        self.inbox = self.log._nc.new_inbox()
        consumer = self.consumer

        async def receive(message: Msg) -> None:
            if consumer == self.consumer:  # not a straggler for an earlier consumer
                self.received.append(message)
                if not message.reply:  # messages have one to acknowledge to, statuses none
                    self.statuses += 1
                self.arrived.set()

        self.subscription = await self.log._nc.subscribe(self.inbox, cb=receive)

    async def stop(self) -> None:
        """Stop listening and delete the consumer (without waiting for the answer: the server
        removes a forgotten consumer after a while anyway)."""
        subscription, self.subscription = self.subscription, None
        with contextlib.suppress(nats.errors.Error, OSError):
            if subscription is not None:
                await subscription.unsubscribe()
            if self.consumer:
                await self.log._nc.publish(f"{API}.CONSUMER.DELETE.{self.stream}.{self.consumer}")
        self.consumer = ""

    async def restart(self, why: str) -> None:
        logger.info(
            "reading %s/%d again from sequence %d: %s",
            self.log.stream,
            self.partition,
            self.next_seq,
            why,
        )
        await self.stop()
        await self.start()

    def wake(self) -> None:
        self.arrived.set()

    def _answered(self) -> bool:
        """Whether everything the open pull request will bring has arrived."""
        return self.statuses > 0 or len(self.received) >= self.owed

    async def _wait_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Wait for messages until ``done()``; whether it is, after at most ``timeout``."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not done():
            self.arrived.clear()
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), remaining)
            self.log._check_open()
        return True

    async def pull(self, count: int, *, wait: bool) -> None:
        """Ask for up to ``count`` messages: those stored now, or (``wait``) also those stored
        within the idle time."""
        request: dict[str, Any] = {"batch": count}
        if wait:
            request["expires"] = int(self.log.idle_seconds * 1e9)
        else:
            request["no_wait"] = True
        await self.log._nc.publish(
            f"{API}.CONSUMER.MSG.NEXT.{self.stream}.{self.consumer}",
            json.dumps(request).encode(),
            reply=self.inbox,
        )
        self.owed = count

    async def next_batches(self, limit: int, end: int | None) -> list[RecordBatch]:
        """The next records from ``next_seq`` (at most ``limit`` stored ones, and up to
        sequence ``end``): what has arrived, or, after waiting, what arrives first; none when
        nothing did (the caller asks again)."""
        log = self.log
        live = end is None
        if not self.owed:
            await self.pull(limit, wait=live)

        def answered() -> bool:
            # A reader of what is stored takes whole answers (an append comes as one batch);
            # a follower takes what has arrived, once messages stop coming in.
            if self.reconnected:
                return True
            return bool(self.received) if live else self._answered()

        waited = await self._wait_until(answered, log.idle_seconds + 2.0)
        if not waited and not self.received:
            await self.restart("no answer to a pull request")  # both it and its expiry lost
            return []
        if self.reconnected:
            await self.restart("the connection was re-established")
            return []
        while live and not self._answered():
            arrived = len(self.received)
            for _ in range(3):  # a few turns of the event loop: reading, parsing, dispatching
                await asyncio.sleep(0)
            if len(self.received) == arrived:
                break
        builder = _BatchBuilder(self.partition, self.next_seq - 1, log.payload_type)
        status = ""
        while self.received and len(builder) < limit:
            message = self.received.popleft()
            if not message.reply:  # a status: the request is over
                self.statuses -= 1
                status = (message.headers or {}).get(_STATUS, "")
                self.owed = 0
                break
            sequence, consumer_sequence = _sequences(message.reply)
            if consumer_sequence != self.last_cseq + 1:
                await self.restart("messages were lost in transit")
                return builder.build()
            self.last_cseq = consumer_sequence
            self.owed -= 1
            if end is not None and sequence > end:
                # Stored after the subscription started, so everything up to its end that is
                # still missing was redacted.
                if self.next_seq <= end:
                    await log._check_gap(self.partition, self.next_seq)
                    builder.add_redacted(end - self.next_seq + 1)
                    self.next_seq = end + 1
                break
            if sequence > self.next_seq:
                await log._check_gap(self.partition, self.next_seq)
                builder.add_redacted(sequence - self.next_seq)
            builder.add(_decode(message.data))
            self.next_seq = sequence + 1
        if status not in ("", "404", "408"):
            await self.restart(f"status {status} from JetStream")  # e.g. the consumer is gone
        if len(builder):
            return builder.build()
        if status in ("404", "408"):
            # Nothing more is stored now; the last stored records may have been redacted.
            return await self._missing_tail(end)
        return []

    async def _missing_tail(self, end: int | None) -> list[RecordBatch]:
        """Redacted records for the messages from ``next_seq`` up to the partition's last that
        the consumer has nothing of: no consumer will ever deliver them."""
        log = self.log
        last = end if end is not None else (await log._state(self.partition)).last_seq
        if last < self.next_seq:
            return []
        try:
            info = await log._api(f"CONSUMER.INFO.{self.stream}.{self.consumer}")
        except _JetStreamError as error:
            if error.err_code != _CONSUMER_NOT_FOUND:
                raise
            await self.restart("the consumer was removed")
            return []
        if int(info["delivered"]["consumer_seq"]) != self.last_cseq:
            await self.restart("messages were lost in transit")
            return []
        if info.get("num_pending"):
            return []  # stored meanwhile: the next pull gets them
        await log._check_gap(self.partition, self.next_seq)
        builder = _BatchBuilder(self.partition, self.next_seq - 1, log.payload_type)
        builder.add_redacted(last - self.next_seq + 1)
        self.next_seq = last + 1
        return builder.build()


class _BatchBuilder:
    """Consecutive records of one partition, gathered into batches as the embedded log stores
    them: one per append (the records stored with one append time), one per run of redacted
    records."""

    def __init__(self, partition: int, base_offset: int, payload_type: str) -> None:
        self.partition = partition
        self.next_offset = base_offset
        self.payload_type = payload_type
        self.batches: list[RecordBatch] = []
        self.keys: list[str] = []
        self.payloads: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        self.append_time_ns = -1
        self.redacted = False
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def add(self, record: _Record) -> None:
        if self.redacted or record.append_time_ns != self.append_time_ns:
            self._close_batch()
            self.append_time_ns = record.append_time_ns
        self.keys.append(record.key)
        self.payloads.append(record.payload)
        self.headers.append(record.headers)
        self.count += 1

    def add_redacted(self, count: int) -> None:
        if not self.redacted:
            self._close_batch()
            self.redacted = True
        self.keys.extend([""] * count)
        self.count += count

    def _close_batch(self) -> None:
        count = len(self.keys)
        if count and self.redacted:
            batch = RecordBatch(
                partition=self.partition,
                base_offset=self.next_offset,
                append_time_ns=0,  # erased with the message
                keys=self.keys,
                payload_sizes=[0] * count,
                payloads=b"",
                message_headers=[_REDACTED] * count,
                payload_type=self.payload_type,
            )
            self.batches.append(batch)
        elif count:
            shared, own = _split_headers(self.headers)
            self.batches.append(
                RecordBatch(
                    partition=self.partition,
                    base_offset=self.next_offset,
                    append_time_ns=self.append_time_ns,
                    keys=self.keys,
                    payload_sizes=[len(payload) for payload in self.payloads],
                    payloads=b"".join(self.payloads),
                    headers=shared,
                    message_headers=own,
                    payload_type=self.payload_type,
                )
            )
        self.next_offset += count
        self.keys, self.payloads, self.headers = [], [], []
        self.redacted = False
        self.append_time_ns = -1

    def build(self) -> list[RecordBatch]:
        """The batches gathered (none when nothing was)."""
        self._close_batch()
        return self.batches


def _split_headers(
    headers: Sequence[dict[str, str]],
) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The headers every record has, and what each has of its own (nothing when they all
    have the same)."""
    first = headers[0]
    if all(record == first for record in headers):
        return first, []
    shared = {
        name: value
        for name, value in first.items()
        if all(record.get(name) == value for record in headers)
    }
    return shared, [
        {name: value for name, value in record.items() if name not in shared} for record in headers
    ]


class NatsLogReader(LogReader):
    """A log in NATS, opened on first use: for readers made before the event loop runs (a
    service's upstream logs are built with the service, and opened by its first read)."""

    messaging_system = "nats"

    def __init__(self, stream: str, opener: Callable[[], Awaitable[NatsLog]]) -> None:
        self.stream = stream
        self._opener = opener
        self._log: NatsLog | None = None
        self._opening = asyncio.Lock()

    async def opened(self) -> NatsLog:
        """The log, opened now if it was not yet."""
        async with self._opening:
            if self._log is None:
                self._log = await self._opener()
            return self._log

    async def offsets(self) -> list[PartitionRange]:
        return await (await self.opened()).offsets()

    async def subscribe(
        self,
        partition: int,
        from_offset: int,
        *,
        stop_at_end: bool = False,
        max_records: int = 5000,
    ) -> AsyncGenerator[RecordBatch, None]:
        log = await self.opened()
        batches = log.subscribe_joined(
            partition, from_offset, stop_at_end=stop_at_end, max_records=max_records
        )
        async with contextlib.aclosing(batches):
            async for batch in batches:
                yield batch

    async def close(self) -> None:
        if self._log is not None:
            await self._log.close()
            self._log = None
