"""What the features engine reads of a resolved item: a :class:`FeatureEvent`.

Events carry their body's properties (identify: traits) and the Segment context; customer
records count as events of type ``record`` named after their source, with their attributes as
properties, so a definition can aggregate CRM data too.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from profilemesh.identity.v1 import resolution_log_pb2
from profilemesh.ingestion.v1 import event_log_pb2
from profilemesh.services.features.events import FeatureEvent
from profilemesh.shared.pii import sha256_hex

RECORD = "record"


def _nanos(timestamp: timestamp_pb2.Timestamp) -> int:
    return timestamp.seconds * 1_000_000_000 + timestamp.nanos


def _struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    if not struct.fields:
        return {}
    converted: dict[str, Any] = json_format.MessageToDict(struct)
    return converted


def feature_event(resolved: resolution_log_pb2.EventResolved, profile_id: str) -> FeatureEvent:
    """The event of ``resolved``, attributed to ``profile_id`` (its current id)."""
    item = resolved.item
    if item.HasField("record"):
        record = item.record
        return FeatureEvent(
            profile_id=profile_id,
            timestamp_ns=_nanos(record.updated_at) or _nanos(item.received_at),
            type=RECORD,
            name=record.source or item.source,
            properties=_struct(record.attributes),
            context={},
        )
    event = item.event
    kind = event.WhichOneof("body") or ""
    name = ""
    properties: dict[str, Any] = {}
    if kind == "track":
        name, properties = event.track.event, _struct(event.track.properties)
    elif kind == "page":
        name, properties = event.page.name, _struct(event.page.properties)
    elif kind == "screen":
        name, properties = event.screen.name, _struct(event.screen.properties)
    elif kind == "identify":
        properties = _struct(event.identify.traits)
    elif kind == "group":
        name, properties = event.group.group_id, _struct(event.group.traits)
    context: dict[str, Any] = (
        json_format.MessageToDict(event.context, preserving_proto_field_name=True)
        if event.HasField("context")
        else {}
    )
    return FeatureEvent(
        profile_id=profile_id,
        timestamp_ns=(
            _nanos(event.timestamp) or _nanos(event.received_at) or _nanos(item.received_at)
        ),
        type=kind,
        name=name,
        properties=properties,
        context=context,
    )


def kind_and_name(item: event_log_pb2.IngestedItem) -> tuple[str, str]:
    """An item's event type and name as definitions match them (without decoding properties)."""
    if item.HasField("record"):
        return RECORD, item.record.source or item.source
    event = item.event
    kind = event.WhichOneof("body") or ""
    if kind == "track":
        return kind, event.track.event
    if kind == "page":
        return kind, event.page.name
    if kind == "screen":
        return kind, event.screen.name
    if kind == "group":
        return kind, event.group.group_id
    return kind, ""


def anchor_of(resolved: resolution_log_pb2.EventResolved) -> str:
    """The identifier that anchors the item (identity lists it first), as :func:`anchor_key`."""
    if not resolved.identifiers:
        return ""
    first = resolved.identifiers[0]
    return anchor_key(first.type, first.value)


def anchor_key(identifier_type: str, value: str) -> str:
    """How an anchor identifier is stored: the SHA-256 of ``type:value``. An unmerge only
    needs to tell anchors apart, and a hash keeps personal data out of the event store."""
    return sha256_hex(f"{identifier_type}:{value}")
