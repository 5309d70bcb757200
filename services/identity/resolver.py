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
from typing import Any

from google.protobuf.message import DecodeError

from profilemesh.identity.v1 import resolution_log_pb2
from profilemesh.ingestion.v1 import event_log_pb2
from profilemesh.services.identity import messages
from profilemesh.services.identity.extraction import extract, summarize
from profilemesh.services.identity.graph import IdentityGraph
from profilemesh.services.identity.identifiers import Identifier
from profilemesh.services.identity.store import GraphStore
from profilemesh.shared.log.api import RecordBatch
from profilemesh.shared.log.outbox import Outbox

log = logging.getLogger(__name__)


def entry_bytes(entry: resolution_log_pb2.ResolutionEntry) -> bytes:
    """A resolution entry as a log payload."""
    payload: bytes = entry.SerializeToString()
    return payload


class Resolver:
    """The event-log consumer's handler: link, persist, publish."""

    def __init__(self, graph: IdentityGraph, lock: threading.Lock, outbox: Outbox) -> None:
        self.graph = graph
        self.lock = lock
        self.outbox = outbox

    def __call__(self, tx: sqlite3.Connection, batch: RecordBatch) -> None:
        published: list[tuple[str, bytes]] = []
        recent: list[tuple[str, Identifier, Any]] = []
        with self.lock:
            for index, payload in enumerate(batch.payload_list()):
                try:
                    item = event_log_pb2.IngestedItem.FromString(payload)
                except DecodeError:
                    log.warning(
                        "skipped an undecodable item at offset %d", batch.base_offset + index
                    )
                    continue
                self._resolve(item, batch.partition, batch.base_offset + index, published, recent)
            GraphStore.save(tx, self.graph.drain_changes())
            GraphStore.append_recent_events(tx, recent)
        self.outbox.put(tx, published)

    def _resolve(
        self,
        item: event_log_pb2.IngestedItem,
        partition: int,
        offset: int,
        published: list[tuple[str, bytes]],
        recent: list[tuple[str, Identifier, Any]],
    ) -> None:
        graph = self.graph
        evidence = extract(item, graph.rules, graph.knows)
        outcome = graph.link(evidence)
        when = evidence.occurred_at
        for record in (*outcome.merged, *outcome.refused):
            if record in outcome.refused:
                continue  # refusals are in ListMerges; nothing downstream changes
            published.append(
                (record.surviving_profile_id, entry_bytes(messages.merge_entry(record)))
            )
        if outcome.profile_id is None:
            return  # nothing identifies the person (all identifiers blocked or none)
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
        if outcome.traits is not None and outcome.traits.changed:
            change = outcome.traits
            published.append(
                (
                    change.profile_id,
                    entry_bytes(
                        messages.traits_entry(
                            change.profile_id, change.traits, change.changed, when
                        )
                    ),
                )
            )
        if outcome.anchor is not None:
            recent.append((outcome.profile_id, outcome.anchor, summarize(item)))
