"""Deliveries: queued with the membership change that causes them, sent by activator plugins.

Queueing (:func:`queue`) runs in the transaction that records the transitions, so a delivery
exists exactly when its transition does. Its idempotency key is derived from the transition's
sequence number and the destination, so it is the same on every attempt, before or after a
crash, and a receiver that remembers keys applies it once.

Sending (:class:`DeliveryWorker`) takes due deliveries oldest first, per destination:

1. a deleted or suppressed profile receives nothing, paused destinations send nothing;
2. no consent for the destination's purpose: SKIPPED_NO_CONSENT, final;
3. the profile's deliveries to the destination today reached the cap: SKIPPED_FREQUENCY_CAP;
4. a token bucket per destination keeps within its rate limit;
5. the activator's outcome decides: DELIVERED; RETRYABLE again after an exponential backoff
   with jitter (or the destination's Retry-After); PERMANENT, or RETRYABLE once attempts are
   exhausted, goes to the dead-letter queue, from which RetryDeadLetters takes it back.

An attempt is recorded only after the activator answered: a crash in between repeats the
attempt with the same key, which is what at-least-once with idempotency keys means.

A delivery keeps the trace context of the transaction that queued it (the consumer batch or
the RPC whose transition caused it). Sending a destination's due deliveries is one span,
``deliver <activator>``, the child of the first delivery's context and linked to every one, so
that the trace of an event goes on to the destination; each settled delivery is counted in
``profilemesh.deliveries`` by activator and outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format
from opentelemetry import trace

from profilemesh.activation.v1 import activation_log_pb2, segment_pb2
from profilemesh.services.activation.profile_view import ProfileView
from profilemesh.services.activation.segments import ENTERED, Transition
from profilemesh.shared import metrics, pii
from profilemesh.shared.extension_points import Activator, Delivery, DeliveryStatus
from profilemesh.shared.log.outbox import Outbox
from profilemesh.shared.log.sqlite_store import SqliteConsumerStore
from profilemesh.shared.telemetry import batch_span, restored_trace_context, stored_trace_context

log = logging.getLogger(__name__)

PENDING = segment_pb2.DELIVERY_STATE_PENDING
DELIVERED = segment_pb2.DELIVERY_STATE_DELIVERED
RETRYING = segment_pb2.DELIVERY_STATE_RETRYING
DEAD_LETTERED = segment_pb2.DELIVERY_STATE_DEAD_LETTERED
SKIPPED_NO_CONSENT = segment_pb2.DELIVERY_STATE_SKIPPED_NO_CONSENT
SKIPPED_FREQUENCY_CAP = segment_pb2.DELIVERY_STATE_SKIPPED_FREQUENCY_CAP
ENTERED_TRIGGER = segment_pb2.DELIVERY_TRIGGER_ENTERED
EXITED_TRIGGER = segment_pb2.DELIVERY_TRIGGER_EXITED
SYNC_TRIGGER = segment_pb2.DELIVERY_TRIGGER_DAILY_SYNC
_TRANSITIONS = {ENTERED_TRIGGER: "entered", EXITED_TRIGGER: "exited", SYNC_TRIGGER: "sync"}
DAY_NS = 86_400 * 1_000_000_000
DEFAULT_RATE_PER_SECOND = 100.0
OUTCOMES: dict[int, str] = {
    DELIVERED: "delivered",
    RETRYING: "retried",
    DEAD_LETTERED: "dead_lettered",
    SKIPPED_NO_CONSENT: "skipped_no_consent",
    SKIPPED_FREQUENCY_CAP: "skipped_frequency_cap",
}
"""The ``outcome`` a settled delivery is counted under, by the state it was left in."""
INSERT = (
    "INSERT INTO deliveries (delivery_id, destination_id, profile_id, segment_id, trigger,"
    " state, idempotency_key, fields, occurred_at, created_at, trace_context)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

_tracer = trace.get_tracer(__name__)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 8
    initial_backoff_seconds: float = 1.0
    max_backoff_seconds: float = 300.0

    def backoff(self, attempts: int, retry_after: float | None) -> float:
        """Seconds before attempt ``attempts + 1``: exponential, capped, with full jitter
        over its upper half; never sooner than the destination asked."""
        ceiling = min(
            self.max_backoff_seconds, self.initial_backoff_seconds * 2.0 ** (attempts - 1)
        )
        delay = ceiling * random.uniform(0.5, 1.0)
        return max(delay, retry_after or 0.0)


def idempotency_key(seq: int, destination_id: str, trigger: int, day: int = 0) -> str:
    """Stable per (transition, destination): the same text on every attempt."""
    text = f"{seq}:{destination_id}:{trigger}:{day}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def mapped_fields(view: ProfileView | None, mappings: Sequence[Any]) -> dict[str, Any]:
    """The payload a destination's mappings pick from a profile (hashed where asked)."""
    fields: dict[str, Any] = {}
    if view is None:
        return fields
    for mapping in mappings:
        value = value_at(view, mapping.source)
        if mapping.hash and value is not None:
            value = pii.hashed(pii.kind_of(mapping.source), str(value))
        fields[mapping.target or mapping.source] = value
    return fields


def value_at(view: ProfileView, path: str) -> Any:
    """A unified-profile path (``identifiers.email``, ``traits.address.city``, ``features.x``,
    ``scores.churn``, ``clusters.rfm``, ``consent.email``) read from a view; None if absent."""
    root, _, rest = path.partition(".")
    if root == "profile_id":
        return view.profile_id
    if root == "identifiers":
        values = view.identifiers.get(rest) or []
        return values[0] if values else None
    if root == "clusters":
        found = view.clusters.get(rest)
        return found[1] if found else None
    source: Any = {
        "traits": view.traits,
        "features": view.features,
        "scores": view.scores,
        "consent": view.consent,
    }.get(root)
    for key in rest.split(".") if rest else ():
        if not isinstance(source, Mapping):
            return None
        source = source.get(key)
    return source if rest else None


def queue(
    tx: sqlite3.Connection,
    transitions: Iterable[Transition],
    destinations: Mapping[str, list[segment_pb2.Destination]],
    views: Callable[[str], ProfileView | None],
) -> int:
    """Queue the deliveries ``transitions`` cause, in the caller's transaction; how many."""
    rows = []
    now = time.time_ns()
    context = stored_trace_context()
    for change in transitions:
        trigger = ENTERED_TRIGGER if change.transition == ENTERED else EXITED_TRIGGER
        for destination in destinations.get(change.segment_id, ()):
            if destination.paused or trigger not in destination.triggers:
                continue
            fields = mapped_fields(views(change.profile_id), destination.mappings)
            rows.append(
                (
                    uuid.uuid4().hex,
                    destination.destination_id,
                    change.profile_id,
                    change.segment_id,
                    trigger,
                    PENDING,
                    idempotency_key(change.seq, destination.destination_id, trigger),
                    json.dumps(fields, default=str),
                    change.occurred_at,
                    now,
                    context,
                )
            )
    tx.executemany(INSERT, rows)
    return len(rows)


def queue_current_members(
    tx: sqlite3.Connection,
    destination: segment_pb2.Destination,
    members: Mapping[str, int],
    views: Callable[[str], ProfileView | None],
) -> int:
    """A new destination's first delivery: every current member, as an entry (the moment
    they entered is part of the key, so a member who leaves and comes back is sent again)."""
    if destination.paused or ENTERED_TRIGGER not in destination.triggers:
        return 0
    now = time.time_ns()
    context = stored_trace_context()
    rows = [
        (
            uuid.uuid4().hex,
            destination.destination_id,
            profile_id,
            destination.segment_id,
            ENTERED_TRIGGER,
            PENDING,
            idempotency_key(
                entered_at, f"{destination.destination_id}:{profile_id}", ENTERED_TRIGGER
            ),
            json.dumps(mapped_fields(views(profile_id), destination.mappings), default=str),
            entered_at,
            now,
            context,
        )
        for profile_id, entered_at in members.items()
    ]
    tx.executemany(INSERT, rows)
    return len(rows)


def queue_sync(
    tx: sqlite3.Connection,
    destination: segment_pb2.Destination,
    members: Iterable[str],
    views: Callable[[str], ProfileView | None],
    day: int,
) -> int:
    """The daily full sync of one destination: every current member once for ``day``."""
    now = time.time_ns()
    context = stored_trace_context()
    rows = [
        (
            uuid.uuid4().hex,
            destination.destination_id,
            profile_id,
            destination.segment_id,
            SYNC_TRIGGER,
            PENDING,
            idempotency_key(0, f"{destination.destination_id}:{profile_id}", SYNC_TRIGGER, day),
            json.dumps(mapped_fields(views(profile_id), destination.mappings), default=str),
            now,
            now,
            context,
        )
        for profile_id in members
    ]
    tx.executemany(INSERT, rows)
    return len(rows)


def forget_profile(tx: sqlite3.Connection, profile_id: str) -> int:
    """A deleted person: every delivery of theirs goes, sent or not. Their rows hold the mapped
    fields (emails, names), and what is still queued must never be sent."""
    cursor = tx.execute("DELETE FROM deliveries WHERE profile_id = ?", (profile_id,))
    return cursor.rowcount


def delivery_message(row: Mapping[str, Any]) -> segment_pb2.Delivery:
    message = segment_pb2.Delivery(
        delivery_id=row["delivery_id"],
        destination_id=row["destination_id"],
        profile_id=row["profile_id"],
        segment_id=row["segment_id"],
        trigger=row["trigger"],
        state=row["state"],
        attempts=row["attempts"],
        last_error=row["last_error"],
        idempotency_key=row["idempotency_key"],
    )
    message.created_at.FromNanoseconds(row["created_at"])
    if row["last_attempt_at"]:
        message.last_attempt_at.FromNanoseconds(row["last_attempt_at"])
    if row["state"] == RETRYING and row["next_attempt_at"]:
        message.next_attempt_at.FromNanoseconds(row["next_attempt_at"])
    return message


class TokenBucket:
    """At most ``rate`` sends per second on average, bursts up to one second's worth."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.at = time.monotonic()

    def take(self, wanted: int) -> int:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        granted = min(wanted, int(self.tokens))
        self.tokens -= granted
        return granted


class DeliveryWorker:
    """Sends due deliveries through their destinations' activators, forever."""

    def __init__(
        self,
        store: SqliteConsumerStore,
        outbox: Outbox,
        destinations: Callable[[], Mapping[str, segment_pb2.Destination]],
        activator: Callable[[segment_pb2.Destination], Activator],
        views: Callable[[str], ProfileView | None],
        policy: RetryPolicy,
        *,
        batch_size: int = 100,
        idle_seconds: float = 0.25,
    ) -> None:
        self.store = store
        self.outbox = outbox
        self.destinations = destinations
        self.activator = activator
        self.views = views
        self.policy = policy
        self.batch_size = batch_size
        self.idle_seconds = idle_seconds
        self._wakeup = asyncio.Event()
        self._buckets: dict[str, TokenBucket] = {}

    def notify(self) -> None:
        """Something was queued: look now instead of at the next tick."""
        self._wakeup.set()

    async def run(self) -> None:
        while True:
            # Cleared before looking, so that a delivery queued while we look is not missed.
            self._wakeup.clear()
            sent = await self.run_once()
            if not sent:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), self.idle_seconds)

    async def run_once(self) -> int:
        """One pass over the due deliveries; how many were settled (sent, skipped, failed)."""
        due = await asyncio.to_thread(self._due)
        if not due:
            return 0
        destinations = self.destinations()
        by_destination: dict[str, list[dict[str, Any]]] = {}
        for row in due:
            by_destination.setdefault(row["destination_id"], []).append(row)
        settled = 0
        for destination_id, rows in by_destination.items():
            destination = destinations.get(destination_id)
            settled += await self._send(destination, rows)
        return settled

    def _due(self) -> list[dict[str, Any]]:
        now = time.time_ns()

        def query(connection: sqlite3.Connection) -> list[dict[str, Any]]:
            connection.row_factory = sqlite3.Row
            try:
                rows = connection.execute(
                    "SELECT * FROM deliveries WHERE state IN (?, ?) AND next_attempt_at <= ?"
                    " ORDER BY created_at LIMIT ?",
                    (PENDING, RETRYING, now, self.batch_size),
                ).fetchall()
            finally:
                connection.row_factory = None
            return [dict(row) for row in rows]

        return self.store.read(query)

    async def _send(
        self, destination: segment_pb2.Destination | None, rows: list[dict[str, Any]]
    ) -> int:
        if destination is not None and destination.paused:
            return 0
        activator = destination.activator if destination is not None else ""
        with batch_span(
            _tracer,
            f"deliver {activator or 'to a deleted destination'}",
            (restored_trace_context(row["trace_context"]) for row in rows),
            kind=trace.SpanKind.CLIENT,
            attributes={
                "profilemesh.activator": activator,
                "profilemesh.destination.id": rows[0]["destination_id"],
                "messaging.batch.message_count": len(rows),
            },
        ):
            settled = await self._settle_due(destination, rows)
        for state, count in Counter(state for _, state, _, _ in settled).items():
            metrics.deliveries.add(count, {"activator": activator, "outcome": OUTCOMES[state]})
        return len(settled)

    async def _settle_due(
        self, destination: segment_pb2.Destination | None, rows: list[dict[str, Any]]
    ) -> list[tuple[dict[str, Any], int, str, float]]:
        """Send what may be sent of one destination's due ``rows`` and record every outcome;
        the deliveries settled (sent, skipped or failed)."""
        settled: list[tuple[dict[str, Any], int, str, float]] = []
        if destination is None:
            # The destination was deleted: its queued deliveries have nowhere to go.
            settled = [(r, DEAD_LETTERED, "destination deleted", 0.0) for r in rows]
            await asyncio.to_thread(self._settle, settled)
            self.outbox.notify()
            return settled
        sendable = []
        today = datetime.now(UTC).date()
        start_of_day = int(
            datetime(today.year, today.month, today.day, tzinfo=UTC).timestamp() * 1e9
        )
        counts = await asyncio.to_thread(self._sent_today, destination.destination_id, start_of_day)
        for row in rows:
            view = self.views(row["profile_id"])
            if view is None and row["trigger"] != EXITED_TRIGGER:
                settled.append((row, SKIPPED_NO_CONSENT, "the profile no longer exists", 0))
                continue
            purpose = destination.consent_purpose
            if view is None or not view.consent.get(purpose, False):
                settled.append((row, SKIPPED_NO_CONSENT, f"no consent for {purpose!r}", 0))
                continue
            cap = destination.frequency_cap_per_day
            if cap and counts.get(row["profile_id"], 0) >= cap:
                settled.append((row, SKIPPED_FREQUENCY_CAP, f"{cap} deliveries today", 0))
                continue
            counts[row["profile_id"]] = counts.get(row["profile_id"], 0) + 1
            sendable.append(row)
        bucket = self._buckets.get(destination.destination_id)
        rate = float(destination.rate_limit_per_second or DEFAULT_RATE_PER_SECOND)
        if bucket is None or bucket.rate != rate:
            bucket = self._buckets[destination.destination_id] = TokenBucket(rate)
        sendable = sendable[: bucket.take(len(sendable))]
        if sendable:
            settled += await self._attempt(destination, sendable)
        if settled:
            await asyncio.to_thread(self._settle, settled)
            self.outbox.notify()
        return settled

    async def _attempt(
        self, destination: segment_pb2.Destination, rows: list[dict[str, Any]]
    ) -> list[tuple[dict[str, Any], int, str, float]]:
        deliveries = [
            Delivery(
                idempotency_key=row["idempotency_key"],
                profile_id=row["profile_id"],
                segment_id=row["segment_id"],
                transition=_TRANSITIONS[row["trigger"]],  # type: ignore[arg-type]
                fields=json.loads(row["fields"]),
                occurred_at=datetime.fromtimestamp(row["occurred_at"] / 1e9, UTC),
            )
            for row in rows
        ]
        try:
            activator = self.activator(destination)
            outcomes = await activator.deliver(deliveries)
            if len(outcomes) != len(deliveries):
                raise RuntimeError(
                    f"activator {destination.activator!r} returned {len(outcomes)} outcomes"
                    f" for {len(deliveries)} deliveries"
                )
        except Exception as error:  # a plugin's failure is isolated: the batch is retried
            log.warning("activator %s failed: %s", destination.activator, error)
            return [self._failed(row, f"activator failed: {error}", None) for row in rows]
        settled: list[tuple[dict[str, Any], int, str, float]] = []
        for row, outcome in zip(rows, outcomes, strict=True):
            if outcome.status is DeliveryStatus.DELIVERED:
                settled.append((row, DELIVERED, "", 0.0))
            elif outcome.status is DeliveryStatus.RETRYABLE:
                settled.append(self._failed(row, outcome.error or "", outcome.retry_after_seconds))
            else:
                settled.append((row, DEAD_LETTERED, outcome.error or "", 0.0))
        return settled

    def _failed(
        self, row: dict[str, Any], error: str, retry_after: float | None
    ) -> tuple[dict[str, Any], int, str, float]:
        attempts = row["attempts"] + 1
        if attempts >= self.policy.max_attempts:
            return row, DEAD_LETTERED, f"{error} (after {attempts} attempts)", 0.0
        return row, RETRYING, error, self.policy.backoff(attempts, retry_after)

    def _sent_today(self, destination_id: str, start_of_day: int) -> dict[str, int]:
        def query(connection: sqlite3.Connection) -> dict[str, int]:
            return dict(
                connection.execute(
                    "SELECT profile_id, count(*) FROM deliveries WHERE destination_id = ?"
                    " AND state = ? AND last_attempt_at >= ? GROUP BY profile_id",
                    (destination_id, DELIVERED, start_of_day),
                ).fetchall()
            )

        return self.store.read(query)

    def _settle(self, settled: Sequence[tuple[dict[str, Any], int, str, float]]) -> None:
        now = time.time_ns()
        entries = []
        with self.store.transaction() as tx:
            for row, state, error, delay in settled:
                attempted = state in (DELIVERED, RETRYING, DEAD_LETTERED)
                attempts = row["attempts"] + (1 if attempted else 0)
                tx.execute(
                    "UPDATE deliveries SET state = ?, attempts = ?, last_error = ?,"
                    " last_attempt_at = ?, next_attempt_at = ? WHERE delivery_id = ?",
                    (
                        state,
                        attempts,
                        error,
                        now if attempted else row["last_attempt_at"],
                        now + int(delay * 1e9) if state == RETRYING else 0,
                        row["delivery_id"],
                    ),
                )
                entry = activation_log_pb2.ActivationEntry(
                    delivery_attempted=activation_log_pb2.DeliveryAttempted(
                        delivery_id=row["delivery_id"],
                        destination_id=row["destination_id"],
                        profile_id=row["profile_id"],
                        segment_id=row["segment_id"],
                        trigger=row["trigger"],
                        state=state,  # type: ignore[arg-type]
                        attempt=attempts if attempted else 0,
                        error=error,
                    )
                )
                entry.delivery_attempted.occurred_at.FromNanoseconds(now)
                entries.append((row["profile_id"], entry.SerializeToString()))
            self.outbox.put(tx, entries)


def destination_from_json(data: dict[str, Any]) -> segment_pb2.Destination:
    return json_format.ParseDict(data, segment_pb2.Destination())
