"""Segment-spec JSON events, as found in files and databases, turned into ``Event`` messages.

Segment's JSON uses camelCase keys (``messageId``, ``userId``, ``sentAt``); snake_case
(``message_id``) is accepted too, as written by many exporters. Only what cannot be converted is
reported here (an unknown ``type``, an unparseable time, a string where an object belongs), as
:class:`~profilemesh.shared.errors.InvalidArgument` with one violation per problem, named by the
``Event`` field path (``timestamp``, ``context.screen.width``). Whether the event is *valid* (a
user id present, a track event named) is ingestion's check, not this module's.

Keys that do not belong to the event's type, and top-level keys ingestion sets itself
(``receivedAt``) or has no use for (``version``, ``channel``, ``projectId`` in Segment archives),
are ignored. Context keys without a ``Context`` field are kept in ``context.extra``, as are
unknown keys inside a known context object (``extra.device.foo``), so nothing the sender put in
the context is lost.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from datetime import UTC, date, datetime
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from profilemesh.ingestion.v1 import event_pb2
from profilemesh.shared.errors import FieldViolation, InvalidArgument

EVENT_TYPES = ("track", "identify", "page", "screen", "group", "alias")
"""The values of ``type``; each selects the ``Event`` body of the same name."""

_STRUCT = struct_pb2.Struct.DESCRIPTOR.full_name
_INT32_RANGE = range(-(2**31), 2**31)
_LONGEST_ID_NUMBER = 10**256
"""Numeric ids are written out as text; one this long would be refused as an id anyway."""
_NOT_UNICODE = "not valid Unicode text (a lone surrogate code point)"


def event_from_json(
    data: Mapping[str, object], *, where: str = "", correct_clock_skew: bool = True
) -> event_pb2.Event:
    """The ``Event`` that the Segment-spec JSON object ``data`` describes.

    Raises :class:`InvalidArgument` naming every field that cannot be converted, each path
    prefixed by ``where`` (``events[3].timestamp``). With ``correct_clock_skew=False``, ``sentAt``
    is left out: ingestion corrects ``timestamp`` by ``sentAt`` against the time it receives the
    event, which is right for live traffic and wrong for history replayed from a file (every event
    would move to the import's time).
    """
    converter = _Converter(where)
    event = converter.event(data, correct_clock_skew)
    if converter.violations:
        raise InvalidArgument(
            "cannot convert the Segment event: "
            + "; ".join(f"{v.field}: {v.description}" for v in converter.violations),
            violations=converter.violations,
            reason="INVALID_SEGMENT_EVENT",
        )
    return event


def event_bytes(
    data: Mapping[str, object], *, where: str = "", correct_clock_skew: bool = True
) -> bytes:
    """:func:`event_from_json`, serialized: what ``Intake.send_events`` takes."""
    return event_from_json(
        data, where=where, correct_clock_skew=correct_clock_skew
    ).SerializeToString()


def parse_timestamp(value: object) -> timestamp_pb2.Timestamp:
    """An ISO 8601 / RFC 3339 time (``2024-05-01T12:00:00.123Z``) or a ``datetime`` as a
    ``Timestamp``; raises ``ValueError`` with a description otherwise.

    Times without an offset (``2024-05-01 12:00:00``, a naive ``datetime``) and dates are taken
    as UTC: that is how databases and spreadsheets usually store them.
    """
    stamp = timestamp_pb2.Timestamp()
    if isinstance(value, datetime):
        try:
            stamp.FromDatetime(value if value.tzinfo else value.replace(tzinfo=UTC))
        except OverflowError:  # 9999-12-31T23:00-02:00 is in the year 10000 in UTC
            raise ValueError(f"{value.isoformat()} is outside the years 1-9999 in UTC") from None
        return stamp
    if isinstance(value, date):
        stamp.FromDatetime(datetime(value.year, value.month, value.day, tzinfo=UTC))
        return stamp
    if not isinstance(value, str):
        raise ValueError(f"expected an ISO 8601 time as a string, got {_describe(value)}")
    try:
        # RFC 3339 first: it keeps nanoseconds, which datetime would truncate.
        stamp.FromJsonString(value)
        return stamp
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO 8601 time") from None
    return parse_timestamp(parsed)


class _Converter:
    """One event's conversion: builds the message and collects every violation on the way."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.violations: list[FieldViolation] = []

    def path(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where and name else self.where or name

    def fail(self, name: str, description: str) -> None:
        self.violations.append(FieldViolation(self.path(name), description))

    def event(self, data: Mapping[str, object], correct_clock_skew: bool) -> event_pb2.Event:
        event = event_pb2.Event()
        if not isinstance(data, Mapping):
            self.fail("", f"an event is a JSON object, not {_describe(data)}")
            return event
        event.message_id = self.text(data, "message_id", "messageId", "message_id")
        event.user_id = self.text(data, "user_id", "userId", "user_id")
        event.anonymous_id = self.text(data, "anonymous_id", "anonymousId", "anonymous_id")
        timestamp = self.value(data, "timestamp", "timestamp")
        if timestamp is None:
            # Segment archives keep the client's own time here when no corrected one exists.
            timestamp = self.value(data, "timestamp", "originalTimestamp", "original_timestamp")
        self.time(timestamp, "timestamp", event.timestamp)
        if correct_clock_skew:
            self.time(self.value(data, "sent_at", "sentAt", "sent_at"), "sent_at", event.sent_at)
        context = self.value(data, "context", "context")
        if context is not None:
            self.context(context, event.context)
        self.struct(self.value(data, "integrations", "integrations"), "integrations", event)
        self.body(data, event)
        return event

    def body(self, data: Mapping[str, object], event: event_pb2.Event) -> None:
        kind = self.value(data, "type", "type")
        if kind is None:
            self.fail("type", f"required: one of {', '.join(EVENT_TYPES)}")
            return
        if not isinstance(kind, str):
            self.fail("type", f"expected a string, got {_describe(kind)}")
            return
        if kind.lower() not in EVENT_TYPES:
            self.fail("type", f"{kind!r} is not one of {', '.join(EVENT_TYPES)}")
            return
        kind = kind.lower()
        body = getattr(event, kind)
        body.SetInParent()  # an event without properties still has its body set
        if kind == "track":
            body.event = self.text(data, "track.event", "event")
        elif kind in ("page", "screen"):
            body.name = self.text(data, f"{kind}.name", "name")
            body.category = self.text(data, f"{kind}.category", "category")
        elif kind == "group":
            body.group_id = self.text(data, "group.group_id", "groupId", "group_id")
        elif kind == "alias":
            body.previous_id = self.text(data, "alias.previous_id", "previousId", "previous_id")
        bag = "traits" if kind in ("identify", "group") else "properties"
        if kind != "alias":
            self.struct(self.value(data, f"{kind}.{bag}", bag), f"{kind}.{bag}", body)

    def value(self, data: Mapping[str, object], name: str, *keys: str) -> object:
        """The value under the first of ``keys`` present; ``None`` when absent or null.

        ``keys`` are the spellings accepted (camelCase, snake_case); two of them with different
        values is a violation of ``name``.
        """
        found = [(key, data[key]) for key in keys if data.get(key) is not None]
        if len(found) > 1 and found[0][1] != found[1][1]:
            self.fail(
                name,
                f"given twice with different values, as {found[0][0]} and {found[1][0]}",
            )
        return found[0][1] if found else None

    def text(self, data: Mapping[str, object], name: str, *keys: str) -> str:
        """An id or name: a string, or an integer (some SDKs send numeric user ids); ``""``
        when absent."""
        value = self.value(data, name, *keys)
        if value is None:
            return ""
        if isinstance(value, str):
            if _is_unicode(value):
                return value
            self.fail(name, _NOT_UNICODE)
            return ""
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) < _LONGEST_ID_NUMBER:
                return str(value)
            self.fail(name, "a number too long to be an id")
            return ""
        self.fail(name, f"expected a string, got {_describe(value)}")
        return ""

    def time(self, value: object, name: str, target: timestamp_pb2.Timestamp) -> None:
        if value is None:
            return
        try:
            target.CopyFrom(parse_timestamp(value))
        except ValueError as error:
            self.fail(name, str(error))

    def struct(self, value: object, name: str, parent: Message) -> None:
        """Set the ``Struct`` field at the end of ``name`` in ``parent`` from a JSON object."""
        if value is None:
            return
        field = name.rsplit(".", 1)[-1]
        if not isinstance(value, Mapping):
            self.fail(name, f"expected a JSON object, got {_describe(value)}")
            return
        try:
            json_format.ParseDict(dict(value), getattr(parent, field))
        except (json_format.ParseError, TypeError, ValueError, OverflowError) as error:
            self.fail(name, f"not a JSON object: {error}")

    def context(self, value: object, context: event_pb2.Context) -> None:
        if not isinstance(value, Mapping):
            self.fail("context", f"expected a JSON object, got {_describe(value)}")
            return
        leftovers = self.fill(value, context, "context")
        if leftovers:
            try:
                json_format.ParseDict(leftovers, context.extra)
            except (json_format.ParseError, TypeError, ValueError, OverflowError) as error:
                self.fail("context.extra", f"not JSON: {error}")

    def fill(self, data: Mapping[str, object], message: Message, name: str) -> dict[str, Any]:
        """Set ``message``'s fields from ``data`` by their JSON or proto names; return the keys
        that match no field (with their values), for ``context.extra``."""
        fields = _fields_by_key(message.DESCRIPTOR)
        leftovers: dict[str, Any] = {}
        seen: dict[str, str] = {}
        for key, value in data.items():
            field = fields.get(key)
            if field is None or field.name == "extra":
                leftovers[key] = value
                continue
            if value is None:
                continue
            path = f"{name}.{field.name}"
            if field.name in seen:
                self.fail(path, f"given twice, as {seen[field.name]} and {key}")
                continue
            seen[field.name] = key
            if field.message_type is None:
                self.scalar(value, field, message, path)
            elif field.message_type.full_name == _STRUCT:
                self.struct(value, path, message)
            elif field.message_type.GetOptions().map_entry:
                self.map(value, field, message, path)
            elif not isinstance(value, Mapping):
                self.fail(path, f"expected a JSON object, got {_describe(value)}")
            else:
                inner = self.fill(value, getattr(message, field.name), path)
                getattr(message, field.name).SetInParent()
                if inner:
                    leftovers[key] = inner
        return leftovers

    def scalar(self, value: object, field: FieldDescriptor, message: Message, path: str) -> None:
        if isinstance(value, str) and not _is_unicode(value):
            self.fail(path, _NOT_UNICODE)
            return
        try:
            converted = _scalar(value, field.cpp_type)
        except (ValueError, OverflowError):  # an integer past float's range or str's digits
            converted = None
        if converted is None:
            self.fail(path, f"expected {_EXPECTED[field.cpp_type]}, got {_describe(value)}")
            return
        setattr(message, field.name, converted)

    def map(self, value: object, field: FieldDescriptor, message: Message, path: str) -> None:
        if not isinstance(value, Mapping):
            self.fail(path, f"expected a JSON object, got {_describe(value)}")
            return
        entry = field.message_type
        assert entry is not None, "fill() sends only map fields here"
        value_field = entry.fields_by_name["value"]
        target = getattr(message, field.name)
        for key, item in value.items():
            if not _is_unicode(str(key)):
                self.fail(path, f"a key is {_NOT_UNICODE}")
                continue
            converted = _scalar(item, value_field.cpp_type)
            if converted is None:
                self.fail(
                    f"{path}.{key}",
                    f"expected {_EXPECTED[value_field.cpp_type]}, got {_describe(item)}",
                )
            else:
                target[str(key)] = converted


_EXPECTED = {
    FieldDescriptor.CPPTYPE_STRING: "a string",
    FieldDescriptor.CPPTYPE_BOOL: "true or false",
    FieldDescriptor.CPPTYPE_INT32: "a 32-bit integer",
    FieldDescriptor.CPPTYPE_DOUBLE: "a number",
}


def _scalar(value: object, cpp_type: int) -> str | bool | int | float | None:
    """``value`` as the field type wants it, or ``None`` when it cannot be."""
    if cpp_type == FieldDescriptor.CPPTYPE_BOOL:
        return value if isinstance(value, bool) else None
    if isinstance(value, str):
        return value if cpp_type == FieldDescriptor.CPPTYPE_STRING else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if cpp_type == FieldDescriptor.CPPTYPE_STRING:
        # Android SDKs send app.build and the like as numbers; the field is text.
        return json.dumps(value)
    if cpp_type == FieldDescriptor.CPPTYPE_INT32:
        whole = float(value).is_integer() and int(value) in _INT32_RANGE
        return int(value) if whole else None
    if cpp_type == FieldDescriptor.CPPTYPE_DOUBLE:
        return float(value)
    return None


@functools.cache
def _fields_by_key(descriptor: Descriptor) -> dict[str, FieldDescriptor]:
    """A message's fields under both their JSON (camelCase) and proto (snake_case) names."""
    fields: dict[str, FieldDescriptor] = {}
    for field in descriptor.fields:
        fields[field.name] = field
        fields[field.json_name] = field
    return fields


def _describe(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return f"{name} ({_short(value)})"
    if isinstance(value, int | float):
        return f"a number ({_short(value)})"  # repr() refuses integers of 4,300+ digits
    return type(value).__name__


def _short(value: object) -> str:
    try:
        text = json.dumps(value, default=str)
    except (ValueError, RecursionError):  # an integer past str's digits; nested too deep
        return type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _is_unicode(text: str) -> bool:
    """Whether ``text`` is Unicode that protobuf accepts: JSON's ``\\ud800`` escapes and
    ``json.loads`` on bytes let lone surrogates through."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
