"""The Python SDK of the ingestion service, in the manner of Segment's analytics-python.

``Client.track(...)`` and its siblings build an ``Event``, check locally what is cheap to check,
queue it and return its message id at once: they never wait for the network. A background
thread takes the queue in batches (by count, size and time), sends each with
``IngestionService.SendEvents`` and retries transient failures with exponential backoff and full
jitter; retrying is safe because the service deduplicates by message id. ``flush()`` waits until
what was queued has been sent; ``shutdown()`` flushes and stops, and runs by itself when the
interpreter exits.

Outcomes are reported, never raised, from the background thread: events the service rejected go
to ``on_rejected``, events that could not be delivered (or queued) go to ``on_error``, and the
client counts both. With ``sync_mode=True`` each call sends its event in the calling thread and
raises when delivery fails, which suits scripts and tests.
"""

from __future__ import annotations

import atexit
import logging
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from enum import Enum
from importlib import metadata
from types import TracebackType
from typing import Any, Final, Literal

import grpc
from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.rpc import error_details_pb2, status_pb2

from profilemesh.common.v1 import errors_pb2
from profilemesh.ingestion.v1 import (
    event_pb2,
    ingestion_service_pb2,
    ingestion_service_pb2_grpc,
    result_pb2,
)
from profilemesh.shared.auth.outbound import with_token

__all__ = [
    "DEFAULT_TARGET",
    "LIBRARY_NAME",
    "Client",
    "ClientClosedError",
    "ClientError",
    "DeliveryAbandonedError",
    "QueueFullError",
    "RejectedEvent",
]

log = logging.getLogger(__name__)

DEFAULT_TARGET: Final = "127.0.0.1:50051"
LIBRARY_NAME: Final = "profilemesh-python"


def _library_version() -> str:
    try:
        return metadata.version("profilemesh")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


LIBRARY_VERSION: Final = _library_version()

# The service refuses a SendEvents request of more than 500 events or 4 MB as a whole; a batch
# must never come near that, or one oversized batch would fail every event in it.
SERVICE_MAX_BATCH_EVENTS: Final = 500
SERVICE_MAX_BATCH_BYTES: Final = 4 * 1024 * 1024
# What an event adds to a request beyond its own serialized size: the field tag and length
# prefix in the repeated field, and the sent_at timestamp set only when the batch is sent.
_EVENT_FRAMING_BYTES: Final = 24
# Same bound as the service's; sending a longer id only to have it rejected helps nobody.
MAX_ID_LENGTH: Final = 256
# The service rejects times outside 1970..2200 as mistakes.
_MIN_TIME: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_TIME: Final = datetime(2200, 1, 1, tzinfo=UTC)

# Codes that mean "this attempt failed, the same request may succeed later".
_RETRYABLE: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
_STATUS_DETAILS_KEY: Final = "grpc-status-details-bin"
# A server asking for a longer pause than this is misconfigured; waiting longer would only hold
# events in memory and stall flush().
_MAX_SERVER_RETRY_DELAY: Final = 60.0
# After a shutdown timeout the call in flight is cancelled; the consumer needs only a moment to
# report what was left.
_ABORT_GRACE_SECONDS: Final = 2.0

Id = str | int
"""A user, anonymous, group or message id; integers are sent as their decimal text."""

JsonMapping = Mapping[str, Any]
"""Properties, traits, context or integrations: JSON-like values, plus datetimes, dates,
decimals, UUIDs and enums, which are converted."""

ErrorCallback = Callable[[Exception, list[event_pb2.Event]], None]
"""Called with the error and the events it cost, from the background thread (or from the
calling thread when an event could not be queued)."""

RejectedCallback = Callable[[list["RejectedEvent"]], None]
"""Called from the background thread with the events of one batch the service rejected."""


class ClientError(Exception):
    """Base of the errors the client itself reports through ``on_error``."""


class QueueFullError(ClientError):
    """The event was dropped: the queue already held ``max_queue_events`` unsent events."""


class ClientClosedError(ClientError):
    """The event was dropped: the client had been shut down."""


class DeliveryAbandonedError(ClientError):
    """The events were not delivered: ``shutdown(timeout=...)`` ran out of time first."""


@dataclass(frozen=True)
class RejectedEvent:
    """An event the service refused, with its reasons."""

    event: event_pb2.Event
    """The event as it was queued."""
    result: result_pb2.EventResult
    """The service's verdict on it (status REJECTED)."""

    @property
    def message_id(self) -> str:
        """The rejected event's message id."""
        return self.result.message_id or self.event.message_id

    @property
    def violations(self) -> list[errors_pb2.FieldViolation]:
        """Why the event was rejected, e.g. ``events[3].track.event``: "the event name is
        required"."""
        return list(self.result.violations)


@dataclass(slots=True)
class _Queued:
    """An event waiting in the queue; ``seq`` orders events for flush()."""

    seq: int
    event: event_pb2.Event
    size: int


class _EventQueue:
    """A bounded FIFO of events that hands the consumer ready batches.

    Every queued event gets the next sequence number and batches leave in order, so "everything
    queued before flush() was called" is simply "every event up to the newest sequence number",
    which stays well defined while other threads keep tracking.
    """

    def __init__(self, max_events: int) -> None:
        self._max_events = max_events
        self._items: deque[_Queued] = deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self._last_seq = 0  # the newest queued event
        self._done_seq = 0  # every event up to here has been sent or failed
        self._flush_seq = 0  # a flush() waits for events up to here: send them without delay
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    @property
    def closed(self) -> bool:
        """Whether the queue takes no more events."""
        with self._cond:
            return self._closed

    def put(self, event: event_pb2.Event, size: int) -> bool:
        """Queue ``event``; False when the queue is full or closed."""
        with self._cond:
            if self._closed or len(self._items) >= self._max_events:
                return False
            self._last_seq += 1
            self._items.append(_Queued(self._last_seq, event, size))
            self._bytes += size
            self._cond.notify_all()
            return True

    def take_batch(self, max_events: int, max_bytes: int, interval: float) -> list[_Queued] | None:
        """The next batch, once it is full, ``interval`` seconds old, flushed or the queue is
        closed; None when the queue is closed and empty. Blocks until then."""
        with self._cond:
            while not self._items:
                if self._closed:
                    return None
                self._cond.wait()
            # The interval counts from the batch's first event, so an event waits at most that
            # long however slowly others trickle in.
            deadline = time.monotonic() + interval
            while not (
                self._closed
                or len(self._items) >= max_events
                or self._bytes >= max_bytes
                or self._items[0].seq <= self._flush_seq
            ):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch: list[_Queued] = []
            size = 0
            while self._items and len(batch) < max_events:
                item = self._items[0]
                if batch and size + item.size > max_bytes:
                    break
                self._items.popleft()
                batch.append(item)
                size += item.size
            self._bytes -= size
            return batch

    def done(self, batch: list[_Queued]) -> None:
        """Record that ``batch`` (the last one taken) has been sent or failed."""
        with self._cond:
            self._done_seq = batch[-1].seq
            self._cond.notify_all()

    def wait_flushed(self, timeout: float | None) -> bool:
        """Have every event queued so far sent at once, and wait until it is sent or failed;
        False when ``timeout`` ran out first."""
        with self._cond:
            target = self._last_seq
            self._flush_seq = max(self._flush_seq, target)
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._done_seq >= target, timeout)

    def close(self) -> None:
        """Take no more events; the consumer sends what is left without waiting, then stops."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


@dataclass
class _Counters:
    sent: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    flagged: int = 0
    failed: int = 0


class _Sender:
    """Sends one batch with SendEvents, retrying what is worth retrying."""

    def __init__(
        self,
        stub: ingestion_service_pb2_grpc.IngestionServiceStub,
        source: str,
        *,
        timeout: float,
        max_retries: int,
        backoff_initial: float,
        backoff_max: float,
        abort: threading.Event,
    ) -> None:
        self._stub = stub
        self._source = source
        self._timeout = timeout
        self._max_retries = max_retries
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._abort = abort

    def send(self, events: list[event_pb2.Event]) -> ingestion_service_pb2.SendEventsResponse:
        """The service's response to ``events``; raises the last ``grpc.RpcError`` once retries
        are exhausted, the error is not transient, or the client is shutting down."""
        request = ingestion_service_pb2.SendEventsRequest(events=events, source=self._source)
        attempt = 0
        while True:
            # sent_at is renewed on every attempt: the service corrects timestamps by
            # (received_at - sent_at), which a stale sent_at would skew by the retry delay.
            sent_at = timestamp_pb2.Timestamp()
            sent_at.GetCurrentTime()
            for event in request.events:
                event.sent_at.CopyFrom(sent_at)
            try:
                response: ingestion_service_pb2.SendEventsResponse = self._stub.SendEvents(
                    request, timeout=self._timeout
                )
                return response
            except grpc.RpcError as error:
                if (
                    error.code() not in _RETRYABLE
                    or attempt >= self._max_retries
                    or self._abort.is_set()
                ):
                    raise
                delay = self._delay(error, attempt)
                log.debug(
                    "SendEvents failed with %s; retry %d in %.2fs",
                    error.code().name,
                    attempt + 1,
                    delay,
                )
                if self._abort.wait(delay):
                    raise
                attempt += 1

    def _delay(self, error: grpc.RpcError, attempt: int) -> float:
        """How long to wait before retry ``attempt + 1``."""
        asked = _server_retry_delay(error)
        if asked is not None:
            # The server knows its own load best; a little jitter on top keeps the clients it
            # turned away at the same moment from all coming back at the same moment.
            return min(asked, _MAX_SERVER_RETRY_DELAY) * random.uniform(1.0, 1.2)
        # "Full jitter": uniform over [0, cap] spreads retries best for the least total wait.
        cap = min(self._backoff_max, self._backoff_initial * 2.0**attempt)
        return random.uniform(0.0, cap)


def _server_retry_delay(error: grpc.RpcError) -> float | None:
    """The delay of a google.rpc.RetryInfo detail in ``error``'s trailers, if any."""
    trailers = error.trailing_metadata() or ()
    for key, value in trailers:
        if key != _STATUS_DETAILS_KEY:
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except Exception:  # a malformed trailer must not break the retry loop
            return None
        for detail in status.details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                delay: float = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
                return max(delay, 0.0)
    return None


def _open_channel(
    target: str,
    options: list[tuple[str, Any]],
    credentials: grpc.ChannelCredentials | None,
) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, credentials, options=options)


class Client:
    """Sends events to the ingestion service in the background.

    ``track``, ``identify``, ``page``, ``screen``, ``group`` and ``alias`` queue an event and
    return its message id at once. A daemon thread sends queued events in batches of at most
    ``max_batch_events`` events and ``max_batch_bytes`` bytes, at the latest ``flush_interval``
    seconds after the first of them was queued, and retries UNAVAILABLE, RESOURCE_EXHAUSTED
    (after the server's RetryInfo delay when it gives one) and DEADLINE_EXCEEDED up to
    ``max_retries`` times with exponential backoff and full jitter.

    Events that cannot be delivered, or cannot be queued because ``max_queue_events`` are
    already waiting, are dropped and passed to ``on_error``; events the service rejects are
    passed to ``on_rejected``. Without those callbacks both are logged. The callbacks run in the
    background thread and must not call ``flush()`` or ``shutdown()``.

    Call ``shutdown()`` (or use the client as a context manager) when done; otherwise it runs
    when the interpreter exits, and until then the client is kept alive. All methods are
    thread-safe.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        source: str = "api",
        max_batch_events: int = 100,
        max_batch_bytes: int = 512 * 1024,
        flush_interval: float = 0.5,
        max_queue_events: int = 10_000,
        max_retries: int = 10,
        timeout: float = 10.0,
        on_error: ErrorCallback | None = None,
        on_rejected: RejectedCallback | None = None,
        sync_mode: bool = False,
        channel_options: list[tuple[str, Any]] | None = None,
        backoff_initial: float = 0.1,
        backoff_max: float = 10.0,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ) -> None:
        """Connect (lazily) to the ingestion service at ``target`` and start the consumer.

        ``source`` names the sender and selects the service's tracking plan. ``timeout`` bounds
        each SendEvents attempt; ``backoff_initial`` and ``backoff_max`` bound the retry delays
        (the n-th retry waits a random time up to ``min(backoff_max, backoff_initial * 2**n)``).
        ``channel_options`` are passed to the gRPC channel. ``credentials`` make it a TLS
        channel: ``grpc.ssl_channel_credentials(...)`` with a client certificate for a mesh
        that requires mutual TLS (``profilemesh.shared.tls.channel_credentials`` builds them
        from the ``tls`` settings). ``token`` is the API token sent with every call (one with
        the ``events:write`` scope, from ``profilemesh tokens create``).
        """
        if not 1 <= max_batch_events <= SERVICE_MAX_BATCH_EVENTS:
            raise ValueError(f"max_batch_events must be 1..{SERVICE_MAX_BATCH_EVENTS}")
        if not 1024 <= max_batch_bytes <= SERVICE_MAX_BATCH_BYTES // 2:
            raise ValueError(f"max_batch_bytes must be 1024..{SERVICE_MAX_BATCH_BYTES // 2}")
        if flush_interval < 0:
            raise ValueError("flush_interval must not be negative")
        if max_queue_events < 1:
            raise ValueError("max_queue_events must be at least 1")
        if max_retries < 0:
            raise ValueError("max_retries must not be negative")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if backoff_initial < 0 or backoff_max < backoff_initial:
            raise ValueError("backoff_initial must be >= 0 and backoff_max >= backoff_initial")
        self.target = target
        self.source = source
        self.sync_mode = sync_mode
        self._max_batch_events = max_batch_events
        self._max_batch_bytes = max_batch_bytes
        self._flush_interval = flush_interval
        self._on_error = on_error
        self._on_rejected = on_rejected
        self._counters = _Counters()
        self._counters_lock = threading.Lock()
        self._lifecycle_lock = threading.Lock()
        self._closed = False
        self._abort = threading.Event()
        self._channel = with_token(_open_channel(target, channel_options or [], credentials), token)
        self._sender = _Sender(
            ingestion_service_pb2_grpc.IngestionServiceStub(self._channel),
            source,
            timeout=timeout,
            max_retries=max_retries,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
            abort=self._abort,
        )
        self._queue = _EventQueue(max_queue_events)
        self._thread: threading.Thread | None = None
        if not sync_mode:
            # A daemon thread never keeps the interpreter alive; the atexit hook below is what
            # gives it the chance to send what is still queued.
            self._thread = threading.Thread(
                target=self._consume, name="profilemesh-client", daemon=True
            )
            self._thread.start()
        atexit.register(self._shutdown_at_exit)

    # -- the Segment calls ----------------------------------------------------------------

    def track(
        self,
        user_id: Id | None = None,
        event: str | None = None,
        properties: JsonMapping | None = None,
        *,
        anonymous_id: Id | None = None,
        context: event_pb2.Context | JsonMapping | None = None,
        timestamp: datetime | None = None,
        message_id: str | None = None,
        integrations: JsonMapping | None = None,
    ) -> str:
        """Queue an action the person performed, e.g. ``track("u1", "Order Completed",
        {"revenue": 42.5})``; returns the event's message id."""
        if not isinstance(event, str) or not event:
            raise ValueError("track needs an event name, e.g. 'Order Completed'")
        body = event_pb2.TrackEvent(event=event, properties=_struct("properties", properties))
        return self._submit(
            self._event(user_id, anonymous_id, context, timestamp, message_id, integrations),
            "track",
            body,
        )

    def identify(
        self,
        user_id: Id | None = None,
        traits: JsonMapping | None = None,
        *,
        anonymous_id: Id | None = None,
        context: event_pb2.Context | JsonMapping | None = None,
        timestamp: datetime | None = None,
        message_id: str | None = None,
        integrations: JsonMapping | None = None,
    ) -> str:
        """Queue who the person is, e.g. ``identify("u1", {"email": "ada@example.com"})``;
        returns the event's message id."""
        body = event_pb2.IdentifyEvent(traits=_struct("traits", traits))
        return self._submit(
            self._event(user_id, anonymous_id, context, timestamp, message_id, integrations),
            "identify",
            body,
        )

    def page(
        self,
        user_id: Id | None = None,
        name: str | None = None,
        category: str | None = None,
        properties: JsonMapping | None = None,
        *,
        anonymous_id: Id | None = None,
        context: event_pb2.Context | JsonMapping | None = None,
        timestamp: datetime | None = None,
        message_id: str | None = None,
        integrations: JsonMapping | None = None,
    ) -> str:
        """Queue a web page view, e.g. ``page("u1", "Pricing", properties={"path":
        "/pricing"})``; returns the event's message id."""
        body = event_pb2.PageEvent(
            name=_text("name", name),
            category=_text("category", category),
            properties=_struct("properties", properties),
        )
        return self._submit(
            self._event(user_id, anonymous_id, context, timestamp, message_id, integrations),
            "page",
            body,
        )

    def screen(
        self,
        user_id: Id | None = None,
        name: str | None = None,
        category: str | None = None,
        properties: JsonMapping | None = None,
        *,
        anonymous_id: Id | None = None,
        context: event_pb2.Context | JsonMapping | None = None,
        timestamp: datetime | None = None,
        message_id: str | None = None,
        integrations: JsonMapping | None = None,
    ) -> str:
        """Queue a mobile screen view, e.g. ``screen("u1", "Checkout")``; returns the event's
        message id."""
        body = event_pb2.ScreenEvent(
            name=_text("name", name),
            category=_text("category", category),
            properties=_struct("properties", properties),
        )
        return self._submit(
            self._event(user_id, anonymous_id, context, timestamp, message_id, integrations),
            "screen",
            body,
        )

    def group(
        self,
        user_id: Id | None = None,
        group_id: Id | None = None,
        traits: JsonMapping | None = None,
        *,
        anonymous_id: Id | None = None,
        context: event_pb2.Context | JsonMapping | None = None,
        timestamp: datetime | None = None,
        message_id: str | None = None,
        integrations: JsonMapping | None = None,
    ) -> str:
        """Queue the person's association with a group (account, company), e.g.
        ``group("u1", "acme", {"industry": "retail"})``; returns the event's message id."""
        group = _id("group_id", group_id)
        if not group:
            raise ValueError("group needs a group_id")
        body = event_pb2.GroupEvent(group_id=group, traits=_struct("traits", traits))
        return self._submit(
            self._event(user_id, anonymous_id, context, timestamp, message_id, integrations),
            "group",
            body,
        )

    def alias(
        self,
        previous_id: Id | None,
        user_id: Id | None,
        *,
        context: event_pb2.Context | JsonMapping | None = None,
        timestamp: datetime | None = None,
        message_id: str | None = None,
        integrations: JsonMapping | None = None,
    ) -> str:
        """Queue that the person known as ``previous_id`` (an anonymous or older user id) is
        ``user_id``; returns the event's message id."""
        previous = _id("previous_id", previous_id)
        if not previous:
            raise ValueError("alias needs the previous_id the person was known by")
        if not _id("user_id", user_id):
            raise ValueError("alias needs the new user_id")
        body = event_pb2.AliasEvent(previous_id=previous)
        return self._submit(
            self._event(user_id, None, context, timestamp, message_id, integrations),
            "alias",
            body,
        )

    # -- lifecycle ------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Send everything queued so far without waiting for the batch interval, and block
        until it is sent or failed; False when ``timeout`` seconds ran out first."""
        if self._thread is None:
            return True  # sync mode: nothing is ever queued
        if threading.current_thread() is self._thread:
            # From a callback: the consumer would wait for itself.
            log.warning("flush() called from a client callback; ignored")
            return False
        return self._queue.wait_flushed(timeout)

    def shutdown(self, timeout: float | None = None) -> bool:
        """Send what is queued, stop the background thread and close the channel.

        With a ``timeout``, gives up after that many seconds: the call in flight is cancelled
        and the events not yet delivered go to ``on_error`` as ``DeliveryAbandonedError``.
        Returns whether everything queued was sent or failed in time. Events queued after
        shutdown are dropped (``ClientClosedError``). Calling it again does nothing.
        """
        thread = self._thread
        if thread is not None and threading.current_thread() is thread:
            raise RuntimeError("shutdown() cannot be called from a client callback")
        with self._lifecycle_lock:
            if self._closed:
                return True
            self._closed = True
        atexit.unregister(self._shutdown_at_exit)
        finished = True
        if thread is not None:
            self._queue.close()
            thread.join(timeout)
            if thread.is_alive():
                finished = False
                self._abort.set()
                # Closing the channel cancels the call in flight, so the consumer reports the
                # remaining events now instead of after the call's own deadline.
                self._channel.close()
                thread.join(_ABORT_GRACE_SECONDS)
        self._channel.close()
        return finished

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.shutdown()

    def _shutdown_at_exit(self) -> None:
        try:
            self.shutdown()
        except Exception:  # an exception in an atexit hook would only be printed, unexplained
            log.exception("profilemesh client: shutdown at exit failed")

    # -- observability --------------------------------------------------------------------

    @property
    def sent(self) -> int:
        """Events the service answered for (accepted, duplicate or rejected)."""
        with self._counters_lock:
            return self._counters.sent

    @property
    def accepted(self) -> int:
        """Events the service stored, flagged ones included."""
        with self._counters_lock:
            return self._counters.accepted

    @property
    def duplicates(self) -> int:
        """Events the service had already stored (same message id)."""
        with self._counters_lock:
            return self._counters.duplicates

    @property
    def rejected(self) -> int:
        """Events the service refused (reported to ``on_rejected``)."""
        with self._counters_lock:
            return self._counters.rejected

    @property
    def flagged(self) -> int:
        """Accepted events that carry tracking-plan violations."""
        with self._counters_lock:
            return self._counters.flagged

    @property
    def failed(self) -> int:
        """Events dropped without an answer from the service (reported to ``on_error``)."""
        with self._counters_lock:
            return self._counters.failed

    @property
    def queued(self) -> int:
        """Events waiting in the queue right now."""
        return len(self._queue)

    # -- internals ------------------------------------------------------------------------

    def _event(
        self,
        user_id: Id | None,
        anonymous_id: Id | None,
        context: event_pb2.Context | JsonMapping | None,
        timestamp: datetime | None,
        message_id: str | None,
        integrations: JsonMapping | None,
    ) -> event_pb2.Event:
        """An event with the fields every kind shares; the body is set by the caller."""
        user = _id("user_id", user_id)
        anonymous = _id("anonymous_id", anonymous_id)
        if not user and not anonymous:
            raise ValueError("a user_id or an anonymous_id is required")
        if message_id is None:
            message_id = str(uuid.uuid4())
        elif not _id("message_id", message_id):
            raise ValueError("message_id must not be empty (leave it out to get a UUID)")
        event = event_pb2.Event(
            message_id=message_id,
            user_id=user,
            anonymous_id=anonymous,
            timestamp=_timestamp(timestamp),
            context=_context(context),
            integrations=_struct("integrations", integrations),
        )
        return event

    def _submit(
        self,
        event: event_pb2.Event,
        kind: Literal["track", "identify", "page", "screen", "group", "alias"],
        body: Any,
    ) -> str:
        """Set the body, then queue ``event`` (or send it, in sync mode); its message id."""
        getattr(event, kind).CopyFrom(body)
        size = event.ByteSize() + _EVENT_FRAMING_BYTES
        if size > self._max_batch_bytes:
            raise ValueError(
                f"the event is {size} bytes, more than max_batch_bytes ({self._max_batch_bytes})"
            )
        if self._thread is None:
            if self._closed:
                raise ClientClosedError("the client has been shut down")
            self._deliver([event], raise_errors=True)
        elif not self._queue.put(event, size):
            error: ClientError = (
                ClientClosedError("the client has been shut down")
                if self._queue.closed
                else QueueFullError(f"{self.queued} events already waiting; event dropped")
            )
            self._fail([event], error)
        return event.message_id

    def _consume(self) -> None:
        """The background thread: send batch after batch until the queue is closed and empty."""
        while True:
            batch = self._queue.take_batch(
                self._max_batch_events, self._max_batch_bytes, self._flush_interval
            )
            if batch is None:
                return
            try:
                self._deliver([item.event for item in batch], raise_errors=False)
            except Exception:  # the thread must outlive any bug, or flush() would hang
                log.exception("profilemesh client: unexpected error delivering a batch")
            finally:
                self._queue.done(batch)

    def _deliver(self, events: list[event_pb2.Event], *, raise_errors: bool) -> None:
        """Send ``events`` and report the outcome; errors raise only when ``raise_errors``."""
        if self._abort.is_set():
            self._fail(events, DeliveryAbandonedError("shutdown timed out before sending"))
            return
        try:
            response = self._sender.send(events)
        except Exception as error:  # grpc.RpcError, but nothing may escape the consumer
            if raise_errors:
                with self._counters_lock:
                    self._counters.failed += len(events)
                raise
            if self._abort.is_set():
                abandoned = DeliveryAbandonedError("shutdown timed out before delivery")
                abandoned.__cause__ = error
                self._fail(events, abandoned)
            else:
                self._fail(events, error)
            return
        self._record(events, response)

    def _record(
        self, events: list[event_pb2.Event], response: ingestion_service_pb2.SendEventsResponse
    ) -> None:
        """Count the service's verdicts and pass the rejected events on."""
        with self._counters_lock:
            self._counters.sent += len(events)
            self._counters.accepted += response.accepted_count
            self._counters.duplicates += response.duplicate_count
            self._counters.rejected += response.rejected_count
            self._counters.flagged += response.flagged_count
        rejected = [
            RejectedEvent(events[result.index], result)
            for result in response.results
            if result.status == result_pb2.ITEM_STATUS_REJECTED and result.index < len(events)
        ]
        if not rejected:
            return
        if self._on_rejected is None:
            first = rejected[0]
            log.warning(
                "profilemesh: %d event(s) rejected, e.g. %s: %s",
                len(rejected),
                first.message_id,
                "; ".join(f"{v.field}: {v.description}" for v in first.violations),
            )
            return
        try:
            self._on_rejected(rejected)
        except Exception:
            log.exception("profilemesh client: on_rejected callback failed")

    def _fail(self, events: list[event_pb2.Event], error: Exception) -> None:
        """Count ``events`` as failed and pass them on with ``error``."""
        with self._counters_lock:
            self._counters.failed += len(events)
        if self._on_error is None:
            log.error("profilemesh: %d event(s) not delivered: %s", len(events), error)
            return
        try:
            self._on_error(error, events)
        except Exception:
            log.exception("profilemesh client: on_error callback failed")


# -- building events ------------------------------------------------------------------------


def _id(name: str, value: Id | None) -> str:
    """``value`` as id text ("" when absent), or ValueError."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"{name} must be a str or an int, got {type(value).__name__}")
    text = str(value)
    if len(text) > MAX_ID_LENGTH:
        raise ValueError(f"{name} is longer than {MAX_ID_LENGTH} characters")
    return text


def _text(name: str, value: str | None) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a str, got {type(value).__name__}")
    return value


def _timestamp(value: datetime | None) -> timestamp_pb2.Timestamp:
    """``value`` (now when None) as a protobuf timestamp, or ValueError."""
    if value is None:
        value = datetime.now(UTC)
    elif not isinstance(value, datetime):
        raise ValueError(f"timestamp must be a datetime, got {type(value).__name__}")
    elif value.utcoffset() is None:
        # A naive datetime may be local time or UTC; guessing wrong shifts the event by hours.
        raise ValueError(
            "timestamp must be timezone-aware, e.g. datetime.now(timezone.utc) or "
            "dt.replace(tzinfo=timezone.utc)"
        )
    if not _MIN_TIME <= value < _MAX_TIME:
        raise ValueError(f"timestamp {value.isoformat()} is not between 1970 and 2200")
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _struct(name: str, value: JsonMapping | None) -> struct_pb2.Struct | None:
    """``value`` as a protobuf Struct (None when absent), or ValueError."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a mapping, got {type(value).__name__}")
    struct = struct_pb2.Struct()
    # Numbers become doubles: integers beyond 2**53 lose precision, as in JSON.
    struct.update(_jsonable(value, name))
    return struct


def _jsonable(value: Any, path: str) -> Any:
    """``value`` with the common non-JSON types converted, or ValueError naming the path."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Enum):
        return _jsonable(value.value, path)
    if isinstance(value, Mapping):
        converted: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{path}: keys must be str, got {key!r}")
            converted[key] = _jsonable(item, f"{path}.{key}")
        return converted
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(item, f"{path}[{index}]") for index, item in enumerate(value)]
    raise ValueError(
        f"{path}: cannot send a {type(value).__name__}; use str, numbers, bool, None, "
        "dicts, lists, datetimes, dates, decimals or UUIDs"
    )


# Keys of a context mapping that are fields of Context, by proto name or by the JSON name
# Segment's libraries use (userAgent, groupId ...); any other key goes to Context.extra.
_CONTEXT_KEYS: Final = frozenset(
    name for field in event_pb2.Context.DESCRIPTOR.fields for name in (field.name, field.json_name)
)


def _context(value: event_pb2.Context | JsonMapping | None) -> event_pb2.Context:
    """The event's context with this library named in it, or ValueError."""
    context = event_pb2.Context()
    if isinstance(value, event_pb2.Context):
        context.CopyFrom(value)
    elif isinstance(value, Mapping):
        converted = _jsonable(value, "context")
        known = {key: item for key, item in converted.items() if key in _CONTEXT_KEYS}
        extra = {key: item for key, item in converted.items() if key not in _CONTEXT_KEYS}
        try:
            json_format.ParseDict(known, context)
        except json_format.ParseError as error:
            raise ValueError(f"context: {error}") from None
        if extra:
            context.extra.update(extra)
    elif value is not None:
        raise ValueError(f"context must be a Context or a mapping, got {type(value).__name__}")
    # A wrapping SDK may name itself; otherwise the service learns it is us.
    if not context.library.name:
        context.library.name = LIBRARY_NAME
        context.library.version = LIBRARY_VERSION
    return context
