"""What an item of the event log tells identity: which identifiers it links and which traits it
observes, as :class:`Evidence`.

Identifiers come from the Segment common fields (``user_id``, ``anonymous_id``, the device and
advertising ids of ``context.device``), from traits named in the rules' ``trait_names`` (``email``,
``phone``), from an alias's ``previous_id``, and from a customer record's typed identifiers and
``crm_id``. Each is normalised by its type's rule; types without a rule are ignored and blocked
values dropped (and reported), so the graph never sees them.

Person traits come from identify traits, ``context.traits`` and record attributes. A group
event's traits describe the group, not the person: they are kept apart in
:class:`GroupObservation` and never reach the profile.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from profilemesh.ingestion.v1 import event_log_pb2, event_pb2, record_pb2
from profilemesh.services.identity import identifiers as ids
from profilemesh.services.identity.identifiers import Identifier
from profilemesh.services.identity.rules import Rules

RECORD = "record"
"""``Evidence.kind`` of a customer record (events use their body's name: ``track``, ...)."""


@dataclass(frozen=True, slots=True)
class GroupObservation:
    """The group a group event is about, with the group's traits (not the person's)."""

    group_id: str
    traits: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Evidence:
    """One item's contribution to the identity graph."""

    identifiers: tuple[Identifier, ...]
    """Normalised, without duplicates or blocked values, in the order found."""
    traits: dict[str, Any] = field(default_factory=dict)
    """Person traits observed (top-level name -> JSON value)."""
    source: str = ""
    """Where the item came from: the record's source system, else the ingestion source."""
    occurred_at: int = 0
    """Event timestamp or record ``updated_at``, in nanoseconds since the epoch."""
    message_id: str = ""
    record_id: str = ""
    kind: str = ""
    """The event type (``identify``, ``track`` ...) or ``record``."""
    blocked: tuple[Identifier, ...] = ()
    """Identifiers the item carried whose value the rules block."""
    group: GroupObservation | None = None
    match_probability: float = 0.0
    """Above 0 when probabilistic matching, not a shared identifier, links the item."""


@dataclass(frozen=True, slots=True)
class EventSummary:
    """What a profile's "recent events" list shows of one item."""

    message_id: str
    type: str
    name: str
    occurred_at: int
    properties: dict[str, Any]


Known = Callable[[Identifier], bool]
"""Whether the graph already has a node for an identifier (see alias handling)."""


def extract(item: event_log_pb2.IngestedItem, rules: Rules, known: Known | None = None) -> Evidence:
    """The evidence of one item of the ``events`` log.

    ``known`` decides what an alias's ``previous_id`` was: Segment's ``previous_id`` is either
    an older ``user_id`` or an ``anonymous_id`` without saying which, so it is read as a
    ``user_id`` when the graph has that node already, and as an ``anonymous_id`` otherwise.
    """
    if item.WhichOneof("item") == "record":
        return _from_record(item, rules)
    return _from_event(item, rules, known)


def summarize(item: event_log_pb2.IngestedItem) -> EventSummary:
    """The recent-events line of an item: message id, type, name, time and properties."""
    if item.WhichOneof("item") == "record":
        record = item.record
        return EventSummary(
            message_id=f"{record.source or item.source}:{record.record_id}",
            type=RECORD,
            name=record.source or item.source,
            occurred_at=_nanos(record.updated_at) or _nanos(item.received_at),
            properties=_struct(record.attributes),
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
    elif kind == "group":
        name = event.group.group_id
    elif kind == "alias":
        name = event.alias.previous_id
    return EventSummary(event.message_id, kind, name, _event_time(item), properties)


class _Identifiers:
    """Collects an item's identifiers: normalised, deduplicated, blocked ones set aside."""

    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self.found: dict[Identifier, None] = {}
        self.blocked: dict[Identifier, None] = {}

    def add(self, identifier_type: str, raw: str) -> None:
        if not raw:
            return
        identifier = self.rules.normalize(identifier_type, raw)
        if identifier is None:
            return
        if self.rules.is_blocked(identifier):
            self.blocked[identifier] = None
        else:
            self.found[identifier] = None

    def add_from_traits(self, traits: Mapping[str, Any]) -> None:
        """Identifiers carried in traits named by the rules (``email``, ``phone`` ...)."""
        for name, types in self.rules.identifier_traits.items():
            text = _identifier_text(traits.get(name))
            if text:
                for identifier_type in types:
                    self.add(identifier_type, text)


def _from_event(item: event_log_pb2.IngestedItem, rules: Rules, known: Known | None) -> Evidence:
    event = item.event
    kind = event.WhichOneof("body") or ""
    found = _Identifiers(rules)
    found.add(ids.USER_ID, event.user_id)
    found.add(ids.ANONYMOUS_ID, event.anonymous_id)
    device = event.context.device
    found.add(ids.DEVICE_ID, device.id)
    found.add(ids.ADVERTISING_ID, device.advertising_id)
    # Identify traits win over the context traits sent along with them.
    traits = _struct(event.context.traits)
    group = None
    if kind == "identify":
        traits.update(_struct(event.identify.traits))
    elif kind == "group":
        group = GroupObservation(event.group.group_id, _struct(event.group.traits))
    elif kind == "alias" and event.alias.previous_id:
        _add_previous_id(found, event.alias.previous_id, rules, known)
    found.add_from_traits(traits)
    return Evidence(
        identifiers=tuple(found.found),
        traits=traits,
        source=sys.intern(item.source),
        occurred_at=_event_time(item),
        message_id=event.message_id,
        kind=kind,
        blocked=tuple(found.blocked),
        group=group,
    )


def _add_previous_id(
    found: _Identifiers, previous_id: str, rules: Rules, known: Known | None
) -> None:
    as_user = rules.normalize(ids.USER_ID, previous_id)
    if as_user is not None and known is not None and known(as_user):
        found.add(ids.USER_ID, previous_id)
    elif rules.rule_for(ids.ANONYMOUS_ID) is not None:
        found.add(ids.ANONYMOUS_ID, previous_id)
    else:
        found.add(ids.USER_ID, previous_id)


def _from_record(item: event_log_pb2.IngestedItem, rules: Rules) -> Evidence:
    record: record_pb2.CustomerRecord = item.record
    # Interned: a handful of sources are referenced by millions of links and trait values.
    source = sys.intern(record.source or item.source)
    found = _Identifiers(rules)
    if record.record_id:
        found.add(ids.CRM_ID, f"{source}:{record.record_id}")
    for identifier in record.identifiers:
        found.add(identifier.type, identifier.value)
    attributes = _struct(record.attributes)
    found.add_from_traits(attributes)
    return Evidence(
        identifiers=tuple(found.found),
        traits=attributes,
        source=source,
        occurred_at=_nanos(record.updated_at) or _nanos(item.received_at),
        record_id=record.record_id,
        kind=RECORD,
        blocked=tuple(found.blocked),
    )


def _identifier_text(value: Any) -> str:
    """A trait value as identifier text: strings as they are, whole numbers (a phone number
    stored as a number) in decimal; anything else is not an identifier."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer():
        return str(int(value))
    return ""


def _struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    if not struct.fields:
        return {}
    converted: dict[str, Any] = json_format.MessageToDict(struct)
    return converted


def _nanos(timestamp: timestamp_pb2.Timestamp) -> int:
    return timestamp.seconds * 1_000_000_000 + timestamp.nanos


def _event_time(item: event_log_pb2.IngestedItem) -> int:
    event: event_pb2.Event = item.event
    return _nanos(event.timestamp) or _nanos(event.received_at) or _nanos(item.received_at)
