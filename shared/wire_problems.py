"""Where serialized protobuf that the runtime refuses goes wrong, as a field violation.

The protobuf runtime only says that bytes are not a valid message ("String field had bad
UTF-8"); a caller needs the field (``records[2].attributes``) to fix its request. :func:`locate`
walks the wire format alongside the message's descriptor and names the first string that is not
UTF-8, the message nested deeper than the runtime parses, or the message whose encoding breaks.

It runs only on bytes the runtime has already refused, never on the hot path, and its work is
bounded (:data:`MAX_STEPS` fields), so that a hostile request costs little more to explain than
to refuse. A problem inside a ``google.protobuf.Struct`` (a JSON object: event properties,
record attributes) is reported at the field holding the object, not by a path into it.
"""

from __future__ import annotations

from typing import Final, NoReturn

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from profilemesh.shared.errors import FieldViolation

MAX_DEPTH: Final = 100
"""Messages nested below the outermost one that the runtime parses (upb's default limit)."""
MAX_STEPS: Final = 200_000
"""Fields looked at before giving up on naming the problem."""

_JSON_TYPES: Final = frozenset(
    {"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"}
)
_VARINT, _FIXED64, _LENGTH, _START_GROUP, _END_GROUP, _FIXED32 = range(6)


class _Found(Exception):
    def __init__(self, violation: FieldViolation) -> None:
        super().__init__(violation.description)
        self.violation = violation


class _GiveUp(Exception):
    pass


def locate(descriptor: Descriptor, data: bytes, path: str = "") -> FieldViolation:
    """The first problem of ``data``, bytes that do not parse as a ``descriptor`` message,
    with its field path under ``path`` (``event`` gives ``event.context.ip``)."""
    return find(descriptor, data, path) or FieldViolation(path, f"not a valid {descriptor.name}")


def find(descriptor: Descriptor, data: bytes, path: str = "") -> FieldViolation | None:
    """Like :func:`locate`, but ``None`` when no problem is found (or not within
    :data:`MAX_STEPS`)."""
    walk = _Walk(data)
    try:
        walk.message(descriptor, 0, len(data), path, 0, False)
    except _Found as found:
        return found.violation
    except _GiveUp:
        pass
    return None


class _Walk:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.steps = 0

    def message(
        self, descriptor: Descriptor, start: int, end: int, path: str, depth: int, in_json: bool
    ) -> None:
        """Check the fields of one message, ``data[start:end]``, at ``path``."""
        if depth > MAX_DEPTH:
            self.fail(path, f"nested more than {MAX_DEPTH} levels deep")
        in_json = in_json or descriptor.full_name in _JSON_TYPES
        broken = f"not a valid {descriptor.name}: its encoding is broken"
        seen: dict[int, int] = {}
        position = start
        while position < end:
            self.steps += 1
            if self.steps > MAX_STEPS:
                raise _GiveUp
            tag, position = self.varint(position, end, path, broken)
            number, wire_type = tag >> 3, tag & 7
            if number == 0:
                self.fail(path, broken)
            if wire_type == _VARINT:
                _, position = self.varint(position, end, path, broken)
            elif wire_type in (_FIXED64, _FIXED32):
                position += 8 if wire_type == _FIXED64 else 4
            elif wire_type == _LENGTH:
                length, position = self.varint(position, end, path, broken)
                if position + length > end:
                    self.fail(path, broken)
                field = descriptor.fields_by_number.get(number)
                if field is not None:
                    index = seen.get(number, 0)
                    seen[number] = index + 1
                    where = path if in_json else _child(path, field, index)
                    self.value(field, position, position + length, where, depth, in_json)
                position += length
            elif wire_type == _START_GROUP:
                position = self.group(number, position, end, path, depth + 1, broken)
            else:
                self.fail(path, broken)
        if position > end:
            self.fail(path, broken)

    def value(
        self, field: FieldDescriptor, start: int, end: int, path: str, depth: int, in_json: bool
    ) -> None:
        if field.type == FieldDescriptor.TYPE_STRING:
            try:
                self.data[start:end].decode("utf-8")
            except UnicodeDecodeError:
                self.fail(path, "not valid UTF-8 text")
        elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None:
            self.message(field.message_type, start, end, path, depth + 1, in_json)

    def group(
        self, number: int, position: int, end: int, path: str, depth: int, broken: str
    ) -> int:
        """Skip an unknown group; the position after its end tag."""
        if depth > MAX_DEPTH:
            self.fail(path, f"nested more than {MAX_DEPTH} levels deep")
        while position < end:
            self.steps += 1
            if self.steps > MAX_STEPS:
                raise _GiveUp
            tag, position = self.varint(position, end, path, broken)
            inner, wire_type = tag >> 3, tag & 7
            if inner == 0:
                self.fail(path, broken)
            if wire_type == _END_GROUP:
                if inner != number:
                    self.fail(path, broken)
                return position
            if wire_type == _VARINT:
                _, position = self.varint(position, end, path, broken)
            elif wire_type in (_FIXED64, _FIXED32):
                position += 8 if wire_type == _FIXED64 else 4
            elif wire_type == _LENGTH:
                length, position = self.varint(position, end, path, broken)
                position += length
            elif wire_type == _START_GROUP:
                position = self.group(inner, position, end, path, depth + 1, broken)
            else:
                self.fail(path, broken)
        self.fail(path, broken)

    def varint(self, position: int, end: int, path: str, broken: str) -> tuple[int, int]:
        value = shift = 0
        while position < end and shift < 70:
            byte = self.data[position]
            position += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value, position
            shift += 7
        self.fail(path, broken)

    @staticmethod
    def fail(path: str, description: str) -> NoReturn:
        raise _Found(FieldViolation(path, description))


def _child(path: str, field: FieldDescriptor, index: int) -> str:
    name = f"{path}.{field.name}" if path else field.name
    return f"{name}[{index}]" if field.is_repeated else name
