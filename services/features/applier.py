"""Applies the resolution log to the features' streaming state and says what changed.

Runs in the consumer's SQLite transaction: the changed profiles' states, the redirects of
merged profiles and the feature-change entries (through the outbox) commit with the offset in
the ``resolutions`` log. The events themselves go to the :class:`EventStore` first (see there
for how a batch that never committed is undone).

- an event resolved to a profile updates that profile's state in O(1) per matching source;
- a merge combines the merged profiles' states into the survivor exactly (the aggregates are
  mergeable) and redirects the merged ids;
- an unmerge cannot split a state, so each resulting profile is recomputed from its events,
  which follow their anchor identifier to the profile now holding it;
- a deletion drops the state and the events.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from google.protobuf.message import DecodeError

from profilemesh.common.v1 import removal_pb2
from profilemesh.features.v1 import feature_log_pb2
from profilemesh.identity.v1 import resolution_log_pb2
from profilemesh.services.features.definitions import FeatureSet
from profilemesh.services.features.event_store import EventStore, PendingRows
from profilemesh.services.features.inputs import (
    anchor_key,
    anchor_of,
    feature_event,
    kind_and_name,
)
from profilemesh.services.features.registry import Registry
from profilemesh.services.features.state_table import StateTable, build_states
from profilemesh.services.features.values import feature_values, timestamp
from profilemesh.shared import deletion_reports
from profilemesh.shared.log.api import RecordBatch
from profilemesh.shared.log.outbox import Outbox

log = logging.getLogger(__name__)

Published = list[tuple[str, bytes]]


class Applier:
    """The resolution-log consumer's handler."""

    def __init__(
        self,
        registry: Registry,
        states: StateTable,
        events: EventStore,
        outbox: Outbox,
        lock: threading.Lock,
        writer: threading.Lock,
    ) -> None:
        self.registry = registry
        self.states = states
        self.events = events
        self.outbox = outbox
        self.lock = lock
        self.writer = writer
        self.deleted = False
        """Set when a batch erased a person: the deletion reporter has work."""

    def __call__(self, tx: sqlite3.Connection, batch: RecordBatch) -> None:
        # ``writer`` keeps backfills and definition changes out for the whole batch; ``lock``
        # is held only while a state changes, so online reads wait microseconds, not the
        # batch. Reading states without ``lock`` is safe here: only the writer changes them.
        published: Published = []
        lock = self.lock
        with self.writer:
            feature_set = self.registry.feature_set
            now = time.time_ns()
            before: dict[str, dict[str, Any]] = {}
            message_ids: dict[str, str] = {}
            rows = PendingRows()

            entries = _decode(batch)
            # Which features each profile's events can change, so that only those are compared
            # before and after (None: anything can, after a merge, unmerge or deletion).
            scope = _scopes(entries, feature_set, self.states.canonical)

            def touch(profile_id: str) -> None:
                if profile_id not in before:
                    names = scope.get(profile_id)
                    before[profile_id] = self.states.values(profile_id, feature_set, now, names)

            for index, entry in entries:
                change = entry.WhichOneof("change")
                if change == "event_resolved":
                    resolved = entry.event_resolved
                    profile_id = self.states.canonical(resolved.profile_id)
                    touch(profile_id)
                    event = feature_event(resolved, profile_id)
                    with lock:
                        self.states.apply(event, feature_set)
                    rows.add(batch.partition, batch.base_offset + index, anchor_of(resolved), event)
                    message_ids[profile_id] = resolved.item.event.message_id
                elif change == "profiles_merged":
                    # Earlier events of the batch must be in the store before it is rewritten.
                    self.events.append(rows)
                    merged = entry.profiles_merged
                    survivor = self.states.canonical(merged.surviving_profile_id)
                    others = [
                        p
                        for p in (self.states.canonical(m) for m in merged.merged_profile_ids)
                        if p != survivor
                    ]
                    touch(survivor)
                    with lock:
                        self.states.merge(survivor, others)
                    self.events.reassign(others, survivor)
                    for other in others:
                        before.pop(other, None)
                        published.append(_removed(other, survivor))
                elif change == "profile_unmerged":
                    self.events.append(rows)
                    unmerged = entry.profile_unmerged
                    # Before the split, so that what each resulting profile now has is a change.
                    touch(self.states.canonical(unmerged.original_profile_id))
                    for resulting in unmerged.resulting_profiles:
                        touch(resulting.profile_id)
                    self._unmerge(unmerged)
                elif change == "profile_deleted":
                    self.events.append(rows)
                    deleted = self.states.canonical(entry.profile_deleted.profile_id)
                    with lock:
                        self.states.delete(deleted)
                    self.events.delete_profiles([deleted])
                    before.pop(deleted, None)
                    published.append(_removed(deleted, "", entry.profile_deleted.job_id))
                    deletion_reports.owe(tx, entry.profile_deleted.job_id)
                    self.deleted = True
            self.events.append(rows)
            with lock:
                self.states.evict_changed(now)
            self.states.save(tx)
            for profile_id, old in before.items():
                if not self.states.has(profile_id):
                    continue
                new = self.states.values(profile_id, feature_set, now, scope.get(profile_id))
                changed = {name: value for name, value in new.items() if old.get(name) != value}
                if changed:
                    published.append(
                        _changed(
                            profile_id,
                            feature_values(feature_set, changed),
                            now,
                            message_ids.get(profile_id, ""),
                        )
                    )
        self.outbox.put(tx, published)

    def _unmerge(self, unmerged: resolution_log_pb2.ProfileUnmerged) -> Iterable[str]:
        """Move the events to the resulting profiles and recompute each; the profiles touched."""
        original = self.states.canonical(unmerged.original_profile_id)
        resulting = [p.profile_id for p in unmerged.resulting_profiles]
        for profile in unmerged.resulting_profiles:
            anchors = [anchor_key(i.type, i.value) for i in profile.identifiers]
            self.events.reassign_anchors([original], anchors, profile.profile_id)
        affected = list(dict.fromkeys([original, *resulting]))
        rebuilt = build_states(self.events.events_of(affected), self.registry.feature_set)
        with self.lock:
            self.states.rebuild(rebuilt)
        return affected


def _decode(batch: RecordBatch) -> list[tuple[int, resolution_log_pb2.ResolutionEntry]]:
    """The batch's entries with their positions; undecodable ones are logged and skipped."""
    entries = []
    for index, payload in enumerate(batch.payload_list()):
        try:
            entries.append((index, resolution_log_pb2.ResolutionEntry.FromString(payload)))
        except DecodeError:
            log.warning("skipped an undecodable entry at %d", batch.base_offset + index)
    return entries


def _scopes(
    entries: list[tuple[int, resolution_log_pb2.ResolutionEntry]],
    feature_set: FeatureSet,
    canonical: Callable[[str], str],
) -> dict[str, tuple[str, ...] | None]:
    """Per profile, the feature names its events in the batch can change; a batch with any
    merge, unmerge or deletion compares every feature of every profile it touches."""
    sources: dict[str, set[str]] = {}
    for _, entry in entries:
        change = entry.WhichOneof("change")
        if change in ("profiles_merged", "profile_unmerged", "profile_deleted"):
            return {}
        if change != "event_resolved":
            continue
        resolved = entry.event_resolved
        kind, name = kind_and_name(resolved.item)
        keys = sources.setdefault(canonical(resolved.profile_id), set())
        keys.update(source.key for source in feature_set.sources_for(kind, name))
    return {p: feature_set.affected_names(frozenset(k)) for p, k in sources.items()}


def _removed(profile_id: str, survivor: str, job_id: str = "") -> tuple[str, bytes]:
    reason = removal_pb2.REMOVAL_REASON_MERGED if survivor else removal_pb2.REMOVAL_REASON_DELETED
    entry = feature_log_pb2.FeatureChangeEntry(
        removed=feature_log_pb2.ProfileFeaturesRemoved(
            profile_id=profile_id,
            reason=reason,
            surviving_profile_id=survivor,
            deletion_job_id=job_id,
        ),
        occurred_at=timestamp(time.time_ns()),
    )
    return profile_id, entry.SerializeToString()


def _changed(profile_id: str, values: list[Any], as_of: int, message_id: str) -> tuple[str, bytes]:
    entry = feature_log_pb2.FeatureChangeEntry(
        changed=feature_log_pb2.FeaturesChanged(
            profile_id=profile_id,
            values=values,
            as_of=timestamp(as_of),
            message_id=message_id,
        ),
        occurred_at=timestamp(as_of),
    )
    return profile_id, entry.SerializeToString()
