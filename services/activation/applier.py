"""Applies the logs activation follows to its profile views, then evaluates the segments of
every profile that changed and queues the deliveries the transitions call for.

One handler per log: identity's ``resolutions`` (identifiers, traits, consent, merges,
deletions), features' ``feature-changes`` (values) and scoring's ``score-changes`` (scores,
clusters). Each runs in its consumer's transaction, so a view change, the transitions it
causes, the membership history, the queued deliveries and the activation-log entries commit
together with the offset.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Mapping

from google.protobuf.message import DecodeError

from profilemesh.activation.v1 import activation_log_pb2, segment_pb2
from profilemesh.features.v1 import feature_log_pb2
from profilemesh.identity.v1 import resolution_log_pb2
from profilemesh.scoring.v1 import score_log_pb2
from profilemesh.services.activation import deliveries
from profilemesh.services.activation.segments import SegmentBook
from profilemesh.services.activation.views import ViewTable, traits_of
from profilemesh.shared import deletion_reports
from profilemesh.shared.log.api import RecordBatch
from profilemesh.shared.log.outbox import Outbox

log = logging.getLogger(__name__)


class Changes:
    """What one batch touched: profiles to evaluate (with the event that changed them) and
    profiles that are gone (merged away or deleted)."""

    def __init__(self) -> None:
        self.touched: dict[str, str] = {}
        self.gone: list[str] = []
        self.erased: list[tuple[str, str]] = []
        """(profile id, deletion job id) of the people deleted."""

    def touch(self, profile_id: str, message_id: str = "") -> None:
        if message_id or profile_id not in self.touched:
            self.touched[profile_id] = message_id


class ActivationApplier:
    """The handler of one of the three logs."""

    def __init__(
        self,
        stream: str,
        views: ViewTable,
        book: SegmentBook,
        destinations: Callable[[], Mapping[str, list[segment_pb2.Destination]]],
        lock: threading.Lock,
        outbox: Outbox,
    ) -> None:
        self.apply_entry: Callable[[bytes, Changes], None] = {
            "resolutions": self._resolution,
            "feature-changes": self._feature_change,
            "score-changes": self._score_change,
        }[stream]
        self.views = views
        self.book = book
        self.destinations = destinations
        self.lock = lock
        self.outbox = outbox
        self.deleted = False
        """Set when a batch erased a person: the deletion reporter has work."""

    def __call__(self, tx: sqlite3.Connection, batch: RecordBatch) -> None:
        changes = Changes()
        with self.lock:
            for payload in batch.payload_list():
                try:
                    self.apply_entry(payload, changes)
                except DecodeError:
                    log.warning("skipped an undecodable entry")
            for profile_id in changes.gone:
                self.book.forget(tx, profile_id)
                changes.touched.pop(profile_id, None)
            for profile_id, job_id in changes.erased:
                self.book.erase(tx, profile_id)
                deliveries.forget_profile(tx, profile_id)
                deletion_reports.owe(tx, job_id)
                self.deleted = True
            live = {self.views.canonical(p): m for p, m in changes.touched.items()}
            transitions = self.book.evaluate(
                tx, [(p, self.views.get(p)) for p in live], message_ids=live
            )
            deliveries.queue(tx, transitions, self.destinations(), self.views.get)
            self.views.save(tx)
        entries = []
        for change in transitions:
            entry = activation_log_pb2.ActivationEntry(membership_changed=change.to_proto())
            entries.append((change.profile_id, entry.SerializeToString()))
        self.outbox.put(tx, entries)

    # -- identity -----------------------------------------------------------------------------

    def _resolution(self, payload: bytes, changes: Changes) -> None:
        entry = resolution_log_pb2.ResolutionEntry.FromString(payload)
        views = self.views
        kind = entry.WhichOneof("change")
        if kind == "event_resolved":
            resolved = entry.event_resolved
            if resolved.profile_created:
                views.revive(resolved.profile_id)
            views.add_identifiers(
                resolved.profile_id, [(i.type, i.value) for i in resolved.identifiers]
            )
            message_id = resolved.item.event.message_id if resolved.item.HasField("event") else ""
            changes.touch(views.canonical(resolved.profile_id), message_id)
        elif kind == "profiles_merged":
            merged = entry.profiles_merged
            for absorbed in views.merge(merged.surviving_profile_id, merged.merged_profile_ids):
                changes.gone.append(absorbed)
            changes.touch(views.canonical(merged.surviving_profile_id))
        elif kind == "profile_unmerged":
            unmerged = entry.profile_unmerged
            resulting = {
                p.profile_id: [(i.type, i.value) for i in p.identifiers]
                for p in unmerged.resulting_profiles
            }
            views.split(unmerged.original_profile_id, resulting)
            for profile_id in resulting:
                changes.touch(profile_id)
        elif kind == "traits_changed":
            changed = entry.traits_changed
            views.set_traits(changed.profile_id, traits_of(changed.traits))
            changes.touch(views.canonical(changed.profile_id))
        elif kind == "consent_changed":
            consent = entry.consent_changed
            views.set_consent(consent.profile_id, consent.consents)
            changes.touch(views.canonical(consent.profile_id))
        elif kind == "profile_deleted":
            deleted = entry.profile_deleted
            erased = views.erase(deleted.profile_id)
            changes.gone.append(erased)
            changes.erased.append((erased, deleted.job_id))

    # -- features and scoring -------------------------------------------------------------------

    def _feature_change(self, payload: bytes, changes: Changes) -> None:
        entry = feature_log_pb2.FeatureChangeEntry.FromString(payload)
        if entry.HasField("changed"):
            changed = entry.changed
            self.views.set_features(changed.profile_id, changed.values)
            changes.touch(self.views.canonical(changed.profile_id), changed.message_id)
        elif entry.HasField("removed"):
            self.views.clear_features(entry.removed.profile_id)

    def _score_change(self, payload: bytes, changes: Changes) -> None:
        entry = score_log_pb2.ScoreChangeEntry.FromString(payload)
        if entry.HasField("score_changed"):
            changed = entry.score_changed
            self.views.set_score(changed.profile_id, changed.score)
            changes.touch(self.views.canonical(changed.profile_id), changed.message_id)
        elif entry.HasField("cluster_changed"):
            assigned = entry.cluster_changed
            self.views.set_cluster(assigned.profile_id, assigned.assignment)
            changes.touch(self.views.canonical(assigned.profile_id))
        elif entry.HasField("removed"):
            self.views.clear_scores(entry.removed.profile_id)
