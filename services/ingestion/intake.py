"""Ingestion's domain: checks, deduplication and the durable append, in that order.

An event is acknowledged only once it is durably in the event log. A batch is checked event by
event (one bad event never blocks the good ones), duplicates are answered as such, and the
accepted events of a batch are appended together: all of them durable, or none and the caller
gets the error (their ids are released, so the retry is not taken for a duplicate).

Items that mention a suppressed identifier (a deleted person) are acknowledged like the others
but dropped before the append, and counted (:mod:`.suppressions`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.message import DecodeError

from profilemesh.ingestion.v1 import event_log_pb2, record_pb2
from profilemesh.services.ingestion.dedup import Deduplicator, fingerprint
from profilemesh.services.ingestion.event_checks import CheckedEvent, EventChecker, RejectedEvent
from profilemesh.services.ingestion.records import (
    CheckedRecord,
    RejectedRecord,
    check_records,
    record_dedup_id,
)
from profilemesh.services.ingestion.suppressions import SuppressionList
from profilemesh.services.ingestion.tracking_plans import TrackingPlans
from profilemesh.shared.log.api import Log
from profilemesh.shared.settings import IngestionSettings

log = logging.getLogger(__name__)


@dataclass
class EventsOutcome:
    """What became of each event of a batch.

    ``accepted`` is what the sender is told was accepted; it includes ``suppressed``, the
    events dropped instead of stored because they mention a suppressed identifier (a sender
    must not learn that a person was suppressed).
    """

    accepted: list[CheckedEvent] = field(default_factory=list)
    duplicates: list[CheckedEvent] = field(default_factory=list)
    rejected: list[RejectedEvent] = field(default_factory=list)
    suppressed: list[CheckedEvent] = field(default_factory=list)


@dataclass
class RecordsOutcome:
    """What became of each record of a batch (``accepted`` includes ``suppressed``, as for
    events)."""

    accepted: list[CheckedRecord] = field(default_factory=list)
    duplicates: list[CheckedRecord] = field(default_factory=list)
    rejected: list[RejectedRecord] = field(default_factory=list)
    suppressed: list[CheckedRecord] = field(default_factory=list)


class Intake:
    """Checks, deduplicates and durably appends events and records to the event log."""

    def __init__(
        self,
        log: Log,
        settings: IngestionSettings,
        plans: TrackingPlans,
        dedup_snapshot: Path,
        suppressions: SuppressionList | None = None,
    ) -> None:
        self.log = log
        self.settings = settings
        self.plans = plans
        # Without a list (an intake used on its own), nothing is suppressed.
        self.suppressions = suppressions if suppressions is not None else SuppressionList(None)
        self.checker = EventChecker(settings, plans)
        self.dedup = Deduplicator(settings.dedup_window_hours * 3600, settings.dedup_max_ids)
        self.dedup_snapshot = dedup_snapshot

    async def send_events(
        self,
        events: Sequence[bytes],
        source: str = "api",
        *,
        validate_only: bool = False,
        path: str = "events",
        first_index: int = 0,
        indexed: bool = True,
    ) -> EventsOutcome:
        """Check, deduplicate and append serialized ``Event`` s; what became of each."""
        accepted, rejected = self.checker.check(
            events,
            source or "api",
            time.time_ns(),
            path=path,
            first_index=first_index,
            indexed=indexed,
        )
        outcome = EventsOutcome(rejected=rejected)
        if validate_only:
            for event in accepted:
                seen = self.dedup.seen(fingerprint(event.message_id))
                (outcome.duplicates if seen else outcome.accepted).append(event)
            return outcome
        if not accepted:
            return outcome
        fresh, claimed = self.dedup.claim([event.message_id for event in accepted])
        for event, new in zip(accepted, fresh, strict=True):
            (outcome.accepted if new else outcome.duplicates).append(event)
        if outcome.accepted:
            stored, outcome.suppressed = self.suppressions.split(outcome.accepted)
            try:
                if stored:
                    await self.log.append_batch([(e.key, e.payload) for e in stored])
            except BaseException:
                self.dedup.release(claimed)
                raise
        # A suppressed event's id is remembered too: its retry is a duplicate, as for any other.
        self.dedup.commit(claimed)
        await self._count_suppressed(outcome.suppressed)
        return outcome

    async def import_records(
        self,
        records: Sequence[record_pb2.CustomerRecord],
        *,
        validate_only: bool = False,
        path: str = "records",
    ) -> RecordsOutcome:
        """Check, deduplicate (unchanged re-imports) and append customer records."""
        accepted, rejected = check_records(
            records, time.time_ns(), self.settings.max_event_bytes, path
        )
        outcome = RecordsOutcome(rejected=rejected)
        if validate_only:
            for record in accepted:
                seen = self.dedup.seen(fingerprint(record.dedup_id))
                (outcome.duplicates if seen else outcome.accepted).append(record)
            return outcome
        if not accepted:
            return outcome
        fresh, claimed = self.dedup.claim([record.dedup_id for record in accepted])
        for record, new in zip(accepted, fresh, strict=True):
            (outcome.accepted if new else outcome.duplicates).append(record)
        if outcome.accepted:
            stored, outcome.suppressed = self.suppressions.split(outcome.accepted)
            try:
                if stored:
                    await self.log.append_batch([(r.key, r.payload) for r in stored])
            except BaseException:
                self.dedup.release(claimed)
                raise
        self.dedup.commit(claimed)
        await self._count_suppressed(outcome.suppressed)
        return outcome

    async def _count_suppressed(self, dropped: Sequence[object]) -> None:
        if dropped:
            await asyncio.to_thread(self.suppressions.count_dropped, len(dropped))

    # -- dedup persistence -----------------------------------------------------------------

    async def recover(self) -> None:
        """Load the dedup snapshot and replay the log written since (start-up)."""
        offsets = self.dedup.load(self.dedup_snapshot)
        ranges = await self.log.offsets()
        replayed = 0
        for partition in ranges:
            start = partition.first if offsets is None else offsets.get(partition.partition, 0)
            start = max(start, partition.first)
            async for batch in self.log.subscribe(partition.partition, start, stop_at_end=True):
                for run in batch.without_redacted():  # a redacted record has no id left
                    ids = [dedup_id(payload) for payload in run.payload_list()]
                    self.dedup.observe(i for i in ids if i)
                    replayed += len(ids)
        log.info("dedup recovered", extra={"replayed": replayed, "snapshot": offsets is not None})

    async def save_snapshot(self) -> None:
        """Save the remembered ids with the offsets they cover."""
        offsets = {r.partition: r.next for r in await self.log.offsets()}
        self.dedup.save(self.dedup_snapshot, offsets)


def dedup_id(payload: bytes) -> str:
    """The id an ``IngestedItem`` payload was deduplicated by (as ``Intake`` computed it);
    empty for a payload that is not one (nothing to remember, and no reason to stop)."""
    try:
        item = event_log_pb2.IngestedItem.FromString(payload)
    except DecodeError:
        log.warning("an undecodable payload in the event log was skipped")
        return ""
    if item.HasField("event"):
        return item.event.message_id
    if item.HasField("record"):
        return record_dedup_id(item.record)
    return ""
