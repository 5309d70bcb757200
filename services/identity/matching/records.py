"""Input records: a pyarrow Table or a list of dicts, with an id column, read into columns.

Matching works on columns of normalised values (one list per attribute), so records are
turned around once here. Nested dicts (a customer record's ``address`` object) are flattened
into dotted columns (``address.postcode``), which the synonyms of
:mod:`~profilemesh.services.identity.matching.attributes` understand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import pyarrow as pa

from profilemesh.services.identity.matching.attributes import (
    ADDRESS_PARTS,
    as_text,
    attribute_of_column,
    columns_by_attribute,
    kind_of,
    normalise,
    split_full_name,
)
from profilemesh.shared.errors import InvalidArgument

Records: TypeAlias = "pa.Table | Sequence[Mapping[str, Any]]"
"""What :func:`~profilemesh.services.identity.matching.api.match_records` accepts."""


@dataclass(frozen=True, slots=True, order=True)
class RecordRef:
    """One record: the source (file, system, or ``left``/``right``) and its id there."""

    source: str
    record_id: str

    def __str__(self) -> str:
        return f"{self.source}:{self.record_id}"


@dataclass(slots=True)
class RecordSet:
    """The records of one input, column by column, with their references."""

    refs: list[RecordRef]
    columns: dict[str, list[Any]]
    aliases: Mapping[str, str] = field(default_factory=dict)
    _attribute_columns: dict[str, list[str]] = field(default_factory=dict)
    _values: dict[str, list[str | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._attribute_columns = columns_by_attribute(self.columns, self.aliases)

    def __len__(self) -> int:
        return len(self.refs)

    def has_attribute(self, attribute: str) -> bool:
        """Whether some column provides ``attribute`` with at least one value."""
        return any(value is not None for value in self.values(attribute))

    def values(self, attribute: str) -> list[str | None]:
        """The normalised values of ``attribute``, one per record (``None`` when missing).

        When several columns hold the attribute (``email`` and ``identifiers.email``) the first
        non-missing value wins. Given and family names fall back to the words of a full name.
        """
        attribute = attribute_of_column(attribute, self.aliases)
        cached = self._values.get(attribute)
        if cached is not None:
            return cached
        kind = kind_of(attribute)
        result: list[str | None] = [None] * len(self.refs)
        # Values repeat (states, cities, common names): normalise each distinct one once.
        seen: dict[object, str | None] = {}
        for column in self._attribute_columns.get(attribute, ()):
            cells = self.columns[column]
            for position, cell in enumerate(cells):
                if result[position] is not None:
                    continue
                try:
                    result[position] = seen[cell]
                except KeyError:
                    result[position] = seen[cell] = normalise(kind, cell)
                except TypeError:  # an unhashable cell (a list): normalise it as it is
                    result[position] = normalise(kind, cell)
        if attribute == "full_address":
            # One string for the whole address, so that an address counts as one piece of
            # evidence: its parts agree together for everyone living there.
            parts = [self.values(part) for part in ADDRESS_PARTS]
            result = [
                current
                if current is not None
                else " ".join(p for p in pieces if p is not None) or None
                for current, *pieces in zip(result, *parts, strict=True)
            ]
        if attribute in ("first_name", "last_name") and "full_name" in self._attribute_columns:
            position = 0 if attribute == "first_name" else 1
            result = [
                current if current is not None else split_full_name(full)[position]
                for current, full in zip(result, self.values("full_name"), strict=True)
            ]
        self._values[attribute] = result
        return result


def _flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _columns_of(records: Records) -> dict[str, list[Any]]:
    if isinstance(records, pa.Table):
        return {name: records.column(name).to_pylist() for name in records.column_names}
    rows = [_flatten(row) for row in records]
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    return {name: [row.get(name) for row in rows] for name in names}


def load_records(
    records: Records,
    *,
    id_column: str,
    source: str,
    source_column: str | None = None,
    aliases: Mapping[str, str] | None = None,
    field: str = "records",
) -> RecordSet:
    """Read ``records`` into a :class:`RecordSet`.

    Each record is named by its ``id_column`` value and by ``source``, or by its own
    ``source_column`` value when that column is given and set. :class:`InvalidArgument` (on
    ``field``) when the id column is missing or empty, or a reference repeats.
    """
    if not isinstance(records, pa.Table | Sequence) or isinstance(records, str | bytes):
        raise InvalidArgument.for_field(field, "expected a pyarrow Table or a list of dicts")
    columns = _columns_of(records)
    if id_column not in columns:
        if not columns:
            raise InvalidArgument.for_field(field, "no records")
        known = ", ".join(list(columns)[:20])
        raise InvalidArgument.for_field(field, f"no id column {id_column!r} (columns: {known})")
    ids = columns.pop(id_column)
    sources = columns.pop(source_column, None) if source_column else None
    refs: list[RecordRef] = []
    for position, raw_id in enumerate(ids):
        record_id = as_text(raw_id)
        if record_id is None:
            raise InvalidArgument.for_field(
                f"{field}[{position}].{id_column}", "every record needs an id"
            )
        record_source = as_text(sources[position]) if sources else None
        refs.append(RecordRef(record_source or source, record_id))
    seen: set[RecordRef] = set()
    for ref in refs:
        if ref in seen:
            raise InvalidArgument.for_field(field, f"record id {ref.record_id!r} repeats")
        seen.add(ref)
    return RecordSet(refs=refs, columns=columns, aliases=dict(aliases or {}))
