"""Flat rows (a CSV line, a database row) turned into ``CustomerRecord`` s by a mapping.

A source connector of kind ``records`` yields each record as a batch item in the protobuf JSON
form of ``CustomerRecord`` (``source``, ``record_id``, ``identifiers``, ``attributes``,
``updated_at``). :class:`RecordMapping` says which column holds what, and builds that form from a
row; :func:`record_from_item` turns an item back into the message ingestion stores.
"""

from __future__ import annotations

import base64
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Annotated

from google.protobuf import json_format
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from profilemesh.common.v1 import identifier_pb2
from profilemesh.ingestion.v1 import record_pb2
from profilemesh.shared.errors import FieldViolation, InvalidArgument
from profilemesh.shared.extension_points import JSONObject, JSONValue
from profilemesh.shared.segment_json import parse_timestamp

IdentifierType = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)]
"""An identifier type as identity names them: ``email``, ``phone``, ``crm_id``, ``loyalty_card``."""

Problem = tuple[str, str]
"""A row that could not be used: where it is (``line 17``) and why."""

MAX_JSON_DEPTH = 100
"""Levels of nesting a value may have: protobuf's JSON parser refuses deeper ones anyway."""
_UNUSABLE = "not text an id can be (a lone surrogate, or a number of 4,300+ digits)"


class RecordMapping(BaseModel):
    """Which column of a row holds the record's id, its identifiers and its attributes.

    ``identifiers`` maps a column to the identifier type its values are
    (``{"email": "email", "customer_id": "crm_id"}``); a list value gives one identifier per
    element, an empty cell none. ``attributes`` lists the columns kept as attributes; ``None``
    keeps every column except ``record_id`` and ``updated_at``, identifier columns included,
    because probabilistic matching compares attributes such as email and phone by name.
    ``source`` names the system of record; unset, the import's source name is used.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    record_id: str = Field(min_length=1)
    """The column holding the record's id, unique within the source."""
    source: str | None = None
    """The system of record the rows come from; unset, the import's source name."""
    identifiers: dict[str, IdentifierType] = Field(default_factory=dict)
    """Column -> identifier type of its values, e.g. ``{"email": "email"}``."""
    attributes: list[str] | None = None
    """The columns kept as attributes; unset, all but ``record_id`` and ``updated_at``."""
    updated_at: str | None = None
    """The column holding when the row last changed (a time, or ISO 8601 text)."""

    def to_record(self, row: Mapping[str, object]) -> record_pb2.CustomerRecord:
        """The record ``row`` describes; :class:`InvalidArgument` names the unusable columns."""
        violations: list[FieldViolation] = []
        record = record_pb2.CustomerRecord(source=self.source or "")
        try:
            record.record_id = record_id = _text(row.get(self.record_id))
        except ValueError:
            violations.append(
                FieldViolation("record_id", f"column {self.record_id!r} is {_UNUSABLE}")
            )
        else:
            if not record_id:
                violations.append(
                    FieldViolation("record_id", f"column {self.record_id!r} is missing or empty")
                )
        for column, kind in self.identifiers.items():
            value = row.get(column)
            values = value if isinstance(value, list | tuple) else [value]
            try:
                record.identifiers.extend(
                    identifier_pb2.Identifier(type=kind, value=text)
                    for text in map(_text, values)
                    if text
                )
            except ValueError:
                violations.append(
                    FieldViolation("identifiers", f"column {column!r} is {_UNUSABLE}")
                )
        if self.updated_at is not None and not _empty(row.get(self.updated_at)):
            try:
                record.updated_at.CopyFrom(parse_timestamp(row[self.updated_at]))
            except ValueError as error:
                violations.append(
                    FieldViolation("updated_at", f"column {self.updated_at!r}: {error}")
                )
        try:
            attributes = {
                column: json_value(row[column])
                for column in self._attribute_columns(row)
                if column in row and not _empty(row[column])
            }
            json_format.ParseDict(attributes, record.attributes)
        except (json_format.ParseError, TypeError, ValueError, OverflowError) as error:
            violations.append(FieldViolation("attributes", str(error)))
        if violations:
            raise InvalidArgument(
                "; ".join(f"{v.field}: {v.description}" for v in violations),
                violations=violations,
            )
        return record

    def to_item(self, row: Mapping[str, object]) -> dict[str, JSONValue]:
        """:meth:`to_record` in the JSON form a ``records`` batch item takes."""
        item: dict[str, JSONValue] = json_format.MessageToDict(
            self.to_record(row), preserving_proto_field_name=True
        )
        return item

    def convert(
        self, rows: Iterable[tuple[str, Mapping[str, object]]]
    ) -> tuple[list[JSONObject], list[Problem]]:
        """Batch items for the usable rows, and a problem for each unusable one.

        ``rows`` pairs each row with where it is (``line 17``), for the problem's location.
        """
        items: list[JSONObject] = []
        problems: list[Problem] = []
        for location, row in rows:
            try:
                items.append(self.to_item(row))
            except InvalidArgument as error:
                problems.append((location, error.message))
        return items, problems

    def _attribute_columns(self, row: Mapping[str, object]) -> Sequence[str]:
        if self.attributes is not None:
            return self.attributes
        return [column for column in row if column not in (self.record_id, self.updated_at)]


def record_from_item(item: JSONObject, where: str = "record") -> record_pb2.CustomerRecord:
    """The ``CustomerRecord`` a ``records`` batch item describes (its protobuf JSON form);
    :class:`InvalidArgument` at ``where`` when it is not one."""
    record = record_pb2.CustomerRecord()
    try:
        plain = json_value(item)  # ParseDict wants dicts and lists all the way down
    except ValueError as error:
        raise InvalidArgument.for_field(where, f"not a CustomerRecord: {error}") from None
    if not isinstance(plain, dict):
        raise InvalidArgument.for_field(where, "a record is a JSON object")
    try:
        json_format.ParseDict(plain, record)
    except (json_format.ParseError, TypeError, ValueError, OverflowError) as error:
        raise InvalidArgument.for_field(where, f"not a CustomerRecord: {error}") from None
    return record


def json_value(value: object, depth: int = 0) -> JSONValue:
    """``value`` (from a database driver, Arrow or CSV) as a JSON value.

    Times and dates become ISO 8601 text, decimals numbers, bytes base64 text, UUIDs text;
    non-finite floats (not JSON) become ``None``; anything else unknown its ``str``. A value
    nested deeper than :data:`MAX_JSON_DEPTH` (``depth`` counts the levels above it) is a
    ``ValueError``.
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Decimal):
        if not value.is_finite():
            return None
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Mapping | list | tuple | set | frozenset) and depth >= MAX_JSON_DEPTH:
        raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep")
    if isinstance(value, Mapping):
        return {str(key): json_value(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_value(item, depth + 1) for item in value]
    return str(value)


def _text(value: object) -> str:
    """An id or identifier as text; ``""`` for an empty cell. A whole float or decimal
    (``123.0``, how Arrow and spreadsheets often hold integer ids) loses its ``.0``."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, Decimal) and value.is_finite() and value == value.to_integral_value():
        return str(int(value))
    return str(value).strip()


def _empty(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())
