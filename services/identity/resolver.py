"""Applies the event log to the identity graph and says what changed on the resolution log.

Runs inside the consumer's transaction (see :class:`profilemesh.shared.log.consumer`): the
graph's changes, the recent events and the resolution entries (through the outbox) are
committed with the input offset, so a crash neither loses nor repeats a resolution. The graph
lives in memory; if a transaction fails after the graph changed, the consumer stops and the
service exits, and the next start reloads the graph from what was committed.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from typing import Any

from google.protobuf.message import DecodeError

from profilemesh.identity.v1 import resolution_log_pb2
from profilemesh.ingestion.v1 import event_log_pb2
from profilemesh.services.identity import consent, messages
from profilemesh.services.identity.consent import ConsentBook
from profilemesh.services.identity.extraction import RECORD, Evidence, extract, summarize
from profilemesh.services.identity.graph import IdentityGraph, LinkOutcome
from profilemesh.services.identity.identifiers import Identifier
from profilemesh.services.identity.matching.settings import MatchSettings
from profilemesh.services.identity.record_matching import (
    IncomingRecord,
    RecordMatch,
    RecordMatcher,
    anchor_of,
    settings_of,
)
from profilemesh.services.identity.store import GraphStore
from profilemesh.services.identity.suppression import SuppressionList
from profilemesh.shared.log.api import RecordBatch
from profilemesh.shared.log.outbox import Outbox

log = logging.getLogger(__name__)


def entry_bytes(entry: resolution_log_pb2.ResolutionEntry) -> bytes:
    """A resolution entry as a log payload."""
    payload: bytes = entry.SerializeToString()
    return payload


class Resolver:
    """The event-log consumer's handler: link, persist, publish."""

    def __init__(
        self,
        graph: IdentityGraph,
        lock: threading.Lock,
        outbox: Outbox,
        matcher: RecordMatcher | None = None,
        suppressions: SuppressionList | None = None,
        consent: ConsentBook | None = None,
    ) -> None:
        self.graph = graph
        self.lock = lock
        self.outbox = outbox
        self.matcher = matcher or RecordMatcher()
        self.suppressions = suppressions or SuppressionList()
        self.consent = consent or ConsentBook(graph.identifiers_of)
        self._settings_for: object = None
        self._settings: MatchSettings | None = None

    def match_settings(self) -> MatchSettings | None:
        """The online matching settings of the rules in force (``None``: matching is off)."""
        matching = self.graph.rules.matching
        if matching is not self._settings_for:
            self._settings, self._settings_for = settings_of(matching), matching
        return self._settings

    def __call__(self, tx: sqlite3.Connection, batch: RecordBatch) -> None:
        published: list[tuple[str, bytes]] = []
        recent: list[tuple[str, Identifier, Any]] = []
        records: list[IncomingRecord] = []
        with self.lock:
            for index, payload in enumerate(batch.payload_list()):
                try:
                    item = event_log_pb2.IngestedItem.FromString(payload)
                except DecodeError:
                    log.warning(
                        "skipped an undecodable item at offset %d", batch.base_offset + index
                    )
                    continue
                self._resolve(
                    item, batch.partition, batch.base_offset + index, published, recent, records
                )
            self._match(tx, records, published)
            GraphStore.save(tx, self.graph.drain_changes())
            GraphStore.append_recent_events(tx, recent)
            consent.save(tx, self.consent.drain_dirty())
        self.outbox.put(tx, published)

    def _resolve(
        self,
        item: event_log_pb2.IngestedItem,
        partition: int,
        offset: int,
        published: list[tuple[str, bytes]],
        recent: list[tuple[str, Identifier, Any]],
        records: list[IncomingRecord],
    ) -> None:
        graph = self.graph
        evidence = extract(item, graph.rules, graph.knows)
        if self.suppressions.any_suppressed(evidence.identifiers):
            self.suppressions.dropped += 1
            return
        outcome = graph.link(evidence)
        when = evidence.occurred_at
        self._publish_merges(outcome, published)
        if outcome.profile_id is None:
            return  # nothing identifies the person (all identifiers blocked or none)
        if evidence.kind == RECORD and self.match_settings() is not None:
            anchor = anchor_of(outcome.identifiers)
            if anchor is not None:
                records.append(
                    IncomingRecord(anchor, evidence.traits, evidence.identifiers, outcome.created)
                )
        entry = resolution_log_pb2.ResolutionEntry(
            event_resolved=resolution_log_pb2.EventResolved(
                profile_id=outcome.profile_id,
                item=item,
                event_offset=offset,
                event_partition=partition,
                profile_created=outcome.created,
                identifiers=[messages.identifier(i) for i in outcome.identifiers],
            ),
            occurred_at=messages.timestamp(when),
        )
        published.append((outcome.profile_id, entry_bytes(entry)))
        self._publish_traits(outcome, when, published)
        if outcome.anchor is not None:
            recent.append((outcome.profile_id, outcome.anchor, summarize(item)))
            self._observe_consent(outcome.profile_id, outcome.anchor, evidence, published)

    def _observe_consent(
        self,
        profile_id: str,
        anchor: Identifier,
        evidence: Evidence,
        published: list[tuple[str, bytes]],
    ) -> None:
        """Consent decisions carried in the item's traits, dated by the item."""
        decisions = consent.decisions_in(evidence.traits)
        if not decisions:
            return
        changed = self.consent.observe(
            profile_id, anchor, decisions, evidence.source, evidence.occurred_at
        )
        if changed:
            entry = messages.consent_entry(
                profile_id, self.consent.states(profile_id, changed), evidence.occurred_at
            )
            published.append((profile_id, entry_bytes(entry)))

    def _match(
        self,
        tx: sqlite3.Connection,
        records: list[IncomingRecord],
        published: list[tuple[str, bytes]],
    ) -> None:
        """Store the batch's records for matching, refit when due, and link what matches."""
        settings = self.match_settings()
        if settings is None or not records:
            return
        matcher = self.matcher
        matcher.store(tx, records, settings)
        for match in [*matcher.refit_if_due(tx, settings), *matcher.match(tx, records, settings)]:
            self._link_match(match, published)

    def _link_match(self, match: RecordMatch, published: list[tuple[str, bytes]]) -> None:
        """Link two records the model matched, unless they are one profile already."""
        graph = self.graph
        mine, other = graph.resolve(match.anchor), graph.resolve(match.other)
        if mine is None or other is None or mine == other:
            return
        when = time.time_ns()
        outcome = graph.link(
            Evidence(
                identifiers=(match.anchor, match.other),
                source="record_matching",
                occurred_at=when,
                record_id=match.anchor.value,
                kind=RECORD,
                match_probability=match.probability,
            )
        )
        self._publish_merges(outcome, published)
        self._publish_traits(outcome, when, published)

    @staticmethod
    def _publish_merges(outcome: LinkOutcome, published: list[tuple[str, bytes]]) -> None:
        # Refusals are in ListMerges; nothing downstream changes.
        for record in outcome.merged:
            published.append(
                (record.surviving_profile_id, entry_bytes(messages.merge_entry(record)))
            )

    @staticmethod
    def _publish_traits(
        outcome: LinkOutcome, when: int, published: list[tuple[str, bytes]]
    ) -> None:
        change = outcome.traits
        if change is not None and change.changed:
            entry = messages.traits_entry(change.profile_id, change.traits, change.changed, when)
            published.append((change.profile_id, entry_bytes(entry)))
