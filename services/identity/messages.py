"""Protobuf forms of the identity domain's values (merge records, entries of the resolution log,
the profile's identity part). The servicer and the resolver use these; the domain does not."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from profilemesh.common.v1 import event_type_pb2, identifier_pb2, profile_pb2
from profilemesh.identity.v1 import merge_pb2, resolution_log_pb2
from profilemesh.services.identity.extraction import EventSummary
from profilemesh.services.identity.graph import Link, MergeKind, MergeOrigin, MergeRecord
from profilemesh.services.identity.identifiers import Identifier

_KINDS = {
    MergeKind.MERGE: merge_pb2.MERGE_KIND_MERGE,
    MergeKind.UNMERGE: merge_pb2.MERGE_KIND_UNMERGE,
    MergeKind.REFUSED: merge_pb2.MERGE_KIND_REFUSED,
}
_ORIGINS = {
    MergeOrigin.DETERMINISTIC: merge_pb2.MERGE_ORIGIN_DETERMINISTIC,
    MergeOrigin.PROBABILISTIC: merge_pb2.MERGE_ORIGIN_PROBABILISTIC,
    MergeOrigin.MANUAL: merge_pb2.MERGE_ORIGIN_MANUAL,
}
KIND_FROM_PROTO = {number: kind for kind, number in _KINDS.items()}
_EVENT_TYPES = {
    "track": event_type_pb2.EVENT_TYPE_TRACK,
    "identify": event_type_pb2.EVENT_TYPE_IDENTIFY,
    "page": event_type_pb2.EVENT_TYPE_PAGE,
    "screen": event_type_pb2.EVENT_TYPE_SCREEN,
    "group": event_type_pb2.EVENT_TYPE_GROUP,
    "alias": event_type_pb2.EVENT_TYPE_ALIAS,
}


def timestamp(nanoseconds: int) -> timestamp_pb2.Timestamp:
    """A Timestamp of ``nanoseconds`` since the epoch."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(nanoseconds)
    return stamp


def identifier(value: Identifier) -> identifier_pb2.Identifier:
    """The contract's Identifier."""
    return identifier_pb2.Identifier(type=value.type, value=value.value)


def struct(values: Mapping[str, Any]) -> struct_pb2.Struct:
    """A Struct of JSON-able values."""
    message = struct_pb2.Struct()
    message.update(dict(values))
    return message


def merge_record(record: MergeRecord) -> merge_pb2.MergeRecord:
    """``MergeRecord`` of merge.proto."""
    message = merge_pb2.MergeRecord(
        merge_id=record.merge_id,
        kind=_KINDS[record.kind],
        origin=_ORIGINS[record.origin],
        profile_ids=record.profile_ids,
        surviving_profile_id=record.surviving_profile_id,
        resulting_profile_ids=record.resulting_profile_ids,
        identifiers=[identifier(i) for i in record.identifiers],
        reason=record.reason,
        occurred_at=timestamp(record.occurred_at),
    )
    if record.evidence is not None:
        evidence = record.evidence
        message.evidence.CopyFrom(
            merge_pb2.Evidence(
                source=evidence.source,
                message_id=evidence.message_id,
                record_id=evidence.record_id,
                match_probability=evidence.match_probability,
                seen_at=timestamp(evidence.seen_at),
            )
        )
    return message


def merge_entry(
    record: MergeRecord, members: Mapping[str, Iterable[Identifier]] | None = None
) -> resolution_log_pb2.ResolutionEntry:
    """The resolution log's entry for a merge or an unmerge (``members``: the identifiers of
    each profile an unmerge resulted in)."""
    entry = resolution_log_pb2.ResolutionEntry(occurred_at=timestamp(record.occurred_at))
    if record.kind == MergeKind.UNMERGE:
        members = members or {}
        entry.profile_unmerged.CopyFrom(
            resolution_log_pb2.ProfileUnmerged(
                original_profile_id=record.profile_ids[0] if record.profile_ids else "",
                resulting_profile_ids=record.resulting_profile_ids,
                reason=record.reason,
                merge_id=record.merge_id,
                resulting_profiles=[
                    resolution_log_pb2.ResultingProfile(
                        profile_id=profile_id,
                        identifiers=[identifier(i) for i in members.get(profile_id, ())],
                    )
                    for profile_id in record.resulting_profile_ids
                ],
            )
        )
    else:
        entry.profiles_merged.CopyFrom(
            resolution_log_pb2.ProfilesMerged(
                surviving_profile_id=record.surviving_profile_id,
                merged_profile_ids=record.merged_profile_ids,
                reason=record.reason,
                linking_identifiers=[identifier(i) for i in record.identifiers],
                origin=_ORIGINS[record.origin],
                merge_id=record.merge_id,
            )
        )
    return entry


def traits_entry(
    profile_id: str, traits: Mapping[str, Any], changed: Iterable[str], occurred_at: int
) -> resolution_log_pb2.ResolutionEntry:
    """The resolution log's entry for a profile whose traits changed."""
    return resolution_log_pb2.ResolutionEntry(
        traits_changed=resolution_log_pb2.TraitsChanged(
            profile_id=profile_id, traits=struct(traits), changed=sorted(changed)
        ),
        occurred_at=timestamp(occurred_at),
    )


def consent_entry(
    profile_id: str, consents: Iterable[profile_pb2.ConsentState], occurred_at: int
) -> resolution_log_pb2.ResolutionEntry:
    """A ``ConsentChanged`` entry: the decisions that changed, as they are now."""
    return resolution_log_pb2.ResolutionEntry(
        consent_changed=resolution_log_pb2.ConsentChanged(
            profile_id=profile_id, consents=list(consents)
        ),
        occurred_at=timestamp(occurred_at),
    )


def deletion_entry(
    profile_id: str, job_id: str, occurred_at: int
) -> resolution_log_pb2.ResolutionEntry:
    """A ``ProfileDeleted`` entry."""
    return resolution_log_pb2.ResolutionEntry(
        profile_deleted=resolution_log_pb2.ProfileDeleted(profile_id=profile_id, job_id=job_id),
        occurred_at=timestamp(occurred_at),
    )


def identities(links: Iterable[Link], identifiers: Iterable[Identifier]) -> list[Any]:
    """Each identifier of a profile with when it was first and last seen and where from."""
    seen: dict[Identifier, list[int]] = {}
    sources: dict[Identifier, set[str]] = {}
    for link in links:
        when = link.evidence.seen_at
        for member in link.identifiers:
            span = seen.setdefault(member, [when, when])
            span[0], span[1] = min(span[0], when), max(span[1], when)
            if link.evidence.source:
                sources.setdefault(member, set()).add(link.evidence.source)
    result = []
    for member in identifiers:
        first, last = seen.get(member, [0, 0])
        result.append(
            profile_pb2.ProfileIdentity(
                identifier=identifier(member),
                first_seen=timestamp(first),
                last_seen=timestamp(last),
                sources=sorted(sources.get(member, ())),
            )
        )
    return result


def event_summary(summary: EventSummary) -> profile_pb2.EventSummary:
    """One line of a profile's recent events."""
    return profile_pb2.EventSummary(
        message_id=summary.message_id,
        type=_EVENT_TYPES.get(summary.type, event_type_pb2.EVENT_TYPE_UNSPECIFIED),
        name=summary.name,
        timestamp=timestamp(summary.occurred_at),
        properties=struct(summary.properties),
    )
