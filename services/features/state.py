"""The streaming state of one profile: mergeable aggregates in UTC day buckets.

For each source (see :class:`.definitions.Source`) a profile keeps a *lifetime cell* with
everything, and, when some feature of the source has a window, one *day cell* per UTC day with
events. A cell holds what every aggregation needs and nothing that depends on the order of
events: the count; the count, exact sum, min and max of the numeric values; the first and last
(timestamp, value); and a HyperLogLog sketch of the distinct values. Any two cells combine
exactly (:meth:`ProfileState.merge`), so an identity merge of two profiles gives the state their
combined events would have given, byte for byte.

Window semantics, shared by this module, :mod:`.batch` and :mod:`.reference`:

- a window of N days at ``as_of`` covers the events with ``timestamp_ns <= as_of`` whose UTC
  day is after ``day(as_of) - N``: the last N calendar days, as_of's day included;
- a lifetime feature covers the events with ``timestamp_ns <= as_of``.

The state cannot tell apart the events of one day cell, so :meth:`ProfileState.values` takes
whole cells: it leaves out the cells of days after as_of's and includes as_of's whole day, and
the lifetime cell includes everything. Online values are read as of now and assume that no event
is dated in the future; the batch queries are exact for any as_of.

Values:

- ``count``: matching events (0 when none); every other aggregation is None when nothing
  qualifies, except ``distinct_count`` (0).
- ``sum``, ``avg``, ``min``, ``max`` read the property as a number (see :mod:`.events`), skipping
  events without a numeric value. Sums are kept exact, as integers in units of 2**-1074 (the
  smallest double), so no order of events or merges changes a bit; ``avg`` is that sum over the
  numeric count, rounded once.
- ``first`` and ``last``: the property's value on the earliest and latest matching event having
  it as a scalar (ties broken by :func:`.events.order_key`), converted to the value type.
- ``distinct_count``: distinct canonical values, estimated by the sketch: exact (but for hash
  collisions) up to a few hundred values, then about 1.6% standard error. The batch queries
  count exactly.
- ``days_since`` and ``days_since_first``: ``(as_of - timestamp) / 86400e9`` of the latest and
  earliest matching event.

The sketch (HyperLogLog++'s layout): while small it is sparse, ``{index: rank}`` at 25 bits of
precision, which is exact for small counts; past :data:`SPARSE_LIMIT` entries it becomes 4096
dense one-byte registers (precision 12). Both are unions by register-wise maximum, and the dense
form of a sparse sketch is what adding the same values densely gives, so merging stays exact.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, TypeAlias

import numpy as np
import xxhash

from profilemesh.services.features.definitions import (
    Aggregation,
    FeatureDefinition,
    FeatureSet,
    Source,
    coerce,
    evaluate,
)
from profilemesh.services.features.events import (
    NS_PER_DAY,
    FeatureEvent,
    as_number,
    canonical,
    order_key,
)

PRECISION: Final = 12
"""Precision of the dense sketch: 2**12 registers."""
SPARSE_PRECISION: Final = 25
SPARSE_LIMIT: Final = 256
"""Entries of a sparse sketch beyond which it turns dense (4 KiB, smaller than such a dict)."""
_REGISTERS: Final = 1 << PRECISION
_SPARSE_REGISTERS: Final = 1 << SPARSE_PRECISION
_REST_BITS: Final = 64 - SPARSE_PRECISION
_REST_MASK: Final = (1 << _REST_BITS) - 1
_SHIFT_BITS: Final = SPARSE_PRECISION - PRECISION
_SHIFT_MASK: Final = (1 << _SHIFT_BITS) - 1
_ALPHA: Final = 0.7213 / (1 + 1.079 / _REGISTERS)
_SCALE_BITS: Final = 1074
_ONE: Final = 1 << _SCALE_BITS
"""A sum of 1.0 in the units of exact sums (2**-1074, the smallest positive double)."""
_FORMAT: Final = 1

Sketch: TypeAlias = dict[int, int] | bytearray
Observation: TypeAlias = tuple[Any, float | None, int, tuple[int, int] | None]
"""What one event contributes to a source's cells: the property value, its number, the
number in exact-sum units and the sketch entry (sparse index, rank)."""
_BARE: Final[Observation] = (None, None, 0, None)
"""The observation of a source without a property: only the event's time counts."""


# -- exact sums --------------------------------------------------------------------------------


def _units(number: float) -> int:
    """``number`` exactly, as an integer count of 2**-1074."""
    numerator, denominator = number.as_integer_ratio()
    return numerator << (_SCALE_BITS + 1 - denominator.bit_length())


def _ratio(units: int, count: int) -> float | None:
    """``units / count`` in doubles, correctly rounded (None beyond the double range)."""
    try:
        return units / (count * _ONE)
    except OverflowError:
        return None


# -- the distinct-count sketch -----------------------------------------------------------------


def sketch_entry(value: Any) -> tuple[int, int]:
    """The sparse (index, rank) of a scalar: the top 25 bits of the xxh64 hash of its canonical
    text, and one more than the leading zeros of the other 39 bits."""
    hashed = xxhash.xxh64_intdigest(canonical(value).encode("utf-8", "surrogatepass"))
    rest = hashed & _REST_MASK
    return hashed >> _REST_BITS, _REST_BITS + 1 - rest.bit_length()


def _dense_entry(index: int, rank: int) -> tuple[int, int]:
    """The dense (register, rank) of a sparse entry: as if the hash had been read at 12 bits."""
    low = index & _SHIFT_MASK
    if low:
        return index >> _SHIFT_BITS, _SHIFT_BITS + 1 - low.bit_length()
    return index >> _SHIFT_BITS, _SHIFT_BITS + rank


def _densify(sparse: Mapping[int, int]) -> bytearray:
    registers = bytearray(_REGISTERS)
    for index, rank in sparse.items():
        register, dense_rank = _dense_entry(index, rank)
        if dense_rank > registers[register]:
            registers[register] = dense_rank
    return registers


def _sketch_add(sketch: Sketch | None, index: int, rank: int) -> Sketch:
    if sketch is None:
        return {index: rank}
    if isinstance(sketch, dict):
        if rank > sketch.get(index, 0):
            sketch[index] = rank
            if len(sketch) > SPARSE_LIMIT:
                return _densify(sketch)
        return sketch
    register, dense_rank = _dense_entry(index, rank)
    if dense_rank > sketch[register]:
        sketch[register] = dense_rank
    return sketch


def _sketch_union(into: Sketch | None, other: Sketch | None) -> Sketch | None:
    """``into`` with ``other`` added (``into`` may be updated in place; ``other`` is not)."""
    if other is None:
        return into
    if into is None:
        return dict(other) if isinstance(other, dict) else bytearray(other)
    if isinstance(into, dict) and isinstance(other, dict):
        for index, rank in other.items():
            if rank > into.get(index, 0):
                into[index] = rank
        return _densify(into) if len(into) > SPARSE_LIMIT else into
    dense = _densify(into) if isinstance(into, dict) else into
    other_dense = _densify(other) if isinstance(other, dict) else other
    np.maximum(
        np.frombuffer(dense, dtype=np.uint8),
        np.frombuffer(other_dense, dtype=np.uint8),
        out=np.frombuffer(dense, dtype=np.uint8),
    )
    return dense


def sketch_estimate(sketch: Sketch | None) -> int:
    """The estimated number of distinct values: linear counting over the 2**25 sparse
    registers (exact for small counts), HyperLogLog over the dense ones, linear counting
    again while many dense registers are empty."""
    if sketch is None:
        return 0
    if isinstance(sketch, dict):
        return round(-_SPARSE_REGISTERS * math.log1p(-len(sketch) / _SPARSE_REGISTERS))
    registers = np.frombuffer(sketch, dtype=np.uint8)
    raw = _ALPHA * _REGISTERS * _REGISTERS / float(np.ldexp(1.0, -registers.astype(np.int64)).sum())
    zeros = int(np.count_nonzero(registers == 0))
    if raw <= 2.5 * _REGISTERS and zeros:
        return round(_REGISTERS * math.log(_REGISTERS / zeros))
    return round(raw)


# -- cells -------------------------------------------------------------------------------------


class Cell:
    """The aggregates of one source over one day, a window or the lifetime."""

    __slots__ = (
        "count",
        "first_ts",
        "first_value",
        "high",
        "last_ts",
        "last_value",
        "low",
        "numbers",
        "sketch",
        "units",
    )

    def __init__(self) -> None:
        self.count = 0
        self.numbers = 0
        """How many events had a numeric value."""
        self.units = 0
        """Exact sum of the numeric values, in units of 2**-1074."""
        self.low: float | None = None
        self.high: float | None = None
        self.first_ts: int | None = None
        self.first_value: Any = None
        self.last_ts: int | None = None
        self.last_value: Any = None
        self.sketch: Sketch | None = None

    def add(self, timestamp_ns: int, observation: Observation | None) -> None:
        """Count one event; ``observation`` is None when it lacks the source's property."""
        self.count += 1
        if observation is None:
            return
        value, number, units, entry = observation
        # _take_first and _take_last, inlined: this runs twice per matching source per event.
        first = self.first_ts
        if first is None or timestamp_ns < first:
            self.first_ts, self.first_value = timestamp_ns, value
        elif timestamp_ns == first and order_key(value) < order_key(self.first_value):
            self.first_value = value
        last = self.last_ts
        if last is None or timestamp_ns > last:
            self.last_ts, self.last_value = timestamp_ns, value
        elif timestamp_ns == last and order_key(value) > order_key(self.last_value):
            self.last_value = value
        if number is not None:
            self.numbers += 1
            self.units += units
            if self.low is None or number < self.low:
                self.low = number
            if self.high is None or number > self.high:
                self.high = number
        if entry is not None:
            self.sketch = _sketch_add(self.sketch, *entry)

    def _take_first(self, timestamp_ns: int, value: Any) -> None:
        first = self.first_ts
        if (
            first is None
            or timestamp_ns < first
            or (timestamp_ns == first and order_key(value) < order_key(self.first_value))
        ):
            self.first_ts, self.first_value = timestamp_ns, value

    def _take_last(self, timestamp_ns: int, value: Any) -> None:
        last = self.last_ts
        if (
            last is None
            or timestamp_ns > last
            or (timestamp_ns == last and order_key(value) > order_key(self.last_value))
        ):
            self.last_ts, self.last_value = timestamp_ns, value

    def absorb(self, other: Cell, *, sketch: bool = True) -> None:
        """Add ``other``'s events to this cell (``other`` is left as it is)."""
        self.count += other.count
        self.numbers += other.numbers
        self.units += other.units
        if other.low is not None and (self.low is None or other.low < self.low):
            self.low = other.low
        if other.high is not None and (self.high is None or other.high > self.high):
            self.high = other.high
        if other.first_ts is not None:
            self._take_first(other.first_ts, other.first_value)
        if other.last_ts is not None:
            self._take_last(other.last_ts, other.last_value)
        if sketch:
            self.sketch = _sketch_union(self.sketch, other.sketch)

    def copy(self) -> Cell:
        """An independent copy."""
        cell = Cell()
        cell.absorb(self)
        return cell

    def to_json(self) -> list[Any]:
        """The cell as plain JSON values."""
        sketch: Any = None
        if isinstance(self.sketch, dict):
            sketch = sorted(self.sketch.items())
        elif self.sketch is not None:
            sketch = base64.b64encode(self.sketch).decode()
        return [
            self.count,
            self.numbers,
            format(self.units, "x"),
            self.low,
            self.high,
            None if self.first_ts is None else [self.first_ts, self.first_value],
            None if self.last_ts is None else [self.last_ts, self.last_value],
            sketch,
        ]

    @classmethod
    def from_json(cls, data: list[Any]) -> Cell:
        """The cell :meth:`to_json` gave."""
        cell = cls()
        count, numbers, units, low, high, first, last, sketch = data
        cell.count, cell.numbers, cell.units = count, numbers, int(units, 16)
        cell.low, cell.high = low, high
        if first is not None:
            cell.first_ts, cell.first_value = first
        if last is not None:
            cell.last_ts, cell.last_value = last
        if isinstance(sketch, list):
            cell.sketch = {index: rank for index, rank in sketch}
        elif sketch is not None:
            cell.sketch = bytearray(base64.b64decode(sketch))
        return cell

    def value(self, definition: FeatureDefinition, as_of_ns: int) -> Any:
        """The value of an aggregated feature over exactly this cell's events."""
        aggregation = definition.aggregation
        if aggregation is Aggregation.COUNT:
            return self.count
        if aggregation is Aggregation.DISTINCT_COUNT:
            return sketch_estimate(self.sketch)
        if aggregation is Aggregation.SUM:
            return _ratio(self.units, 1) if self.numbers else None
        if aggregation is Aggregation.AVG:
            return _ratio(self.units, self.numbers) if self.numbers else None
        if aggregation is Aggregation.MIN:
            return self.low
        if aggregation is Aggregation.MAX:
            return self.high
        if aggregation is Aggregation.FIRST:
            return (
                None if self.first_ts is None else coerce(self.first_value, definition.result_type)
            )
        if aggregation is Aggregation.LAST:
            return None if self.last_ts is None else coerce(self.last_value, definition.result_type)
        if aggregation is Aggregation.DAYS_SINCE:
            return None if self.last_ts is None else (as_of_ns - self.last_ts) / NS_PER_DAY
        if aggregation is Aggregation.DAYS_SINCE_FIRST:
            return None if self.first_ts is None else (as_of_ns - self.first_ts) / NS_PER_DAY
        raise ValueError(f"{definition.name} is not an aggregated feature")


class SourceState:
    """One source's cells: the lifetime cell and the day cells (UTC day number -> cell)."""

    __slots__ = ("days", "horizon", "lifetime")

    def __init__(self, horizon: int | None = None) -> None:
        self.lifetime = Cell()
        self.days: dict[int, Cell] = {}
        self.horizon = horizon
        """The source's longest window in days when the cells were written (what
        :meth:`ProfileState.evict` keeps without a feature set); None keeps no day cells."""


def observe(source: Source, value: Any) -> Observation | None:
    """What an event (already known to match ``source``) whose property value is ``value``
    contributes to the source's cells; None when that is not a scalar."""
    if value is None or not isinstance(value, str | int | float):
        return None
    number = as_number(value) if source.keeps_numbers else None
    return (
        value,
        number,
        0 if number is None else _units(number),
        sketch_entry(value) if source.keeps_sketch else None,
    )


# -- the profile's state -----------------------------------------------------------------------


class ProfileState:
    """Every source's cells for one profile.

    Cells are keyed by the sources' stable keys, so a state outlives a change of feature set:
    sources no definition reads any more are dropped by :meth:`evict`, and new ones start
    empty (a backfill fills their history).
    """

    __slots__ = ("_sources",)

    def __init__(self) -> None:
        self._sources: dict[str, SourceState] = {}

    def apply(self, event: FeatureEvent, feature_set: FeatureSet) -> None:
        """Add ``event`` to the cells of every source it matches: O(matching sources)."""
        timestamp_ns = event.timestamp_ns
        day = timestamp_ns // NS_PER_DAY
        plan = feature_set.plan_for(event.type, event.name)
        read = [path.read(event) for path in plan.paths]
        for source, tests, at in plan.steps:
            # An explicit loop rather than all(): this is the hot path, and most sources have
            # no filters at all.
            for position, test in tests:
                if not test(read[position]):
                    break
            else:
                observation = _BARE if at < 0 else observe(source, read[at])
                self._add(source, day, timestamp_ns, observation)

    def _add(
        self, source: Source, day: int, timestamp_ns: int, observation: Observation | None
    ) -> None:
        entry = self._sources.get(source.key)
        if entry is None:
            entry = self._sources[source.key] = SourceState(source.max_window_days)
        elif entry.horizon != source.max_window_days:  # the feature set changed
            entry.horizon = source.max_window_days
        entry.lifetime.add(timestamp_ns, observation)
        if source.max_window_days is not None:
            cell = entry.days.get(day)
            if cell is None:
                cell = entry.days[day] = Cell()
            cell.add(timestamp_ns, observation)

    def merge(self, other: ProfileState) -> ProfileState:
        """Absorb ``other`` (left unchanged), cell by cell; returns this state.

        Exact: the result equals, to the byte, the state of both profiles' events applied in
        any order (with the same evictions).
        """
        for key, theirs in other._sources.items():
            mine = self._sources.get(key)
            if mine is None:
                mine = self._sources[key] = SourceState(theirs.horizon)
            elif theirs.horizon is not None:
                mine.horizon = max(mine.horizon or 0, theirs.horizon)
            mine.lifetime.absorb(theirs.lifetime)
            for day, cell in theirs.days.items():
                own = mine.days.get(day)
                if own is None:
                    mine.days[day] = cell.copy()
                else:
                    own.absorb(cell)
        return self

    def values(
        self, feature_set: FeatureSet, as_of_ns: int, names: Iterable[str] | None = None
    ) -> dict[str, Any]:
        """Every visible feature (or those of ``names``) as of ``as_of_ns``, derived features
        evaluated after their inputs; see the module docstring for what whole cells imply."""
        plan = feature_set.value_plan(names)
        as_of_day = as_of_ns // NS_PER_DAY
        results: dict[str, Any] = {}
        for source, definitions in plan.sources:
            results.update(self._source_values(source, definitions, as_of_ns, as_of_day))
        for definition in plan.derived:
            results[definition.name] = evaluate(definition.tree, results)
        return {name: results[name] for name in plan.names}

    def _source_values(
        self,
        source: Source,
        definitions: Sequence[FeatureDefinition],
        as_of_ns: int,
        as_of_day: int,
    ) -> dict[str, Any]:
        entry = self._sources.get(source.key) or SourceState()
        results = {
            d.name: entry.lifetime.value(d, as_of_ns) for d in definitions if d.window_days is None
        }
        windowed = sorted(
            (d for d in definitions if d.window_days is not None),
            key=lambda d: d.window_days or 0,
        )
        if not windowed:
            return results
        # One pass from as_of's day backwards, reading each window's value when the pass has
        # taken in all of its days: O(cells), however many windows.
        days = sorted((day for day in entry.days if day <= as_of_day), reverse=True)
        window = Cell()
        taken = 0
        for definition in windowed:
            first_day = as_of_day - (definition.window_days or 0)
            while taken < len(days) and days[taken] > first_day:
                window.absorb(entry.days[days[taken]], sketch=source.keeps_sketch)
                taken += 1
            results[definition.name] = window.value(definition, as_of_ns)
        return results

    def evict(self, today: int, feature_set: FeatureSet | None = None) -> int:
        """Drop the day cells no window can read as of UTC day ``today`` (days since the
        epoch, ``now_ns // NS_PER_DAY``) or later: those older than their source's longest
        window. With ``feature_set``, the windows are its sources' and the sources it no longer
        reads are dropped whole; without, the windows are those the cells were written with.
        Returns the number of day cells dropped."""
        sources = None if feature_set is None else {s.key: s for s in feature_set.sources}
        dropped = 0
        for key in list(self._sources):
            entry = self._sources[key]
            if sources is not None:
                source = sources.get(key)
                if source is None:
                    dropped += len(entry.days)
                    del self._sources[key]
                    continue
                entry.horizon = source.max_window_days
            if entry.horizon is None:
                dropped += len(entry.days)
                entry.days.clear()
                continue
            oldest = today - entry.horizon
            stale = [day for day in entry.days if day <= oldest]
            for day in stale:
                del entry.days[day]
            dropped += len(stale)
        return dropped

    @property
    def day_cells(self) -> int:
        """How many day cells the state holds, over all sources."""
        return sum(len(entry.days) for entry in self._sources.values())

    def to_bytes(self) -> bytes:
        """Compact, deterministic JSON: equal states give equal bytes."""
        document = {
            "format": _FORMAT,
            "sources": {
                key: {
                    "horizon": entry.horizon,
                    "lifetime": entry.lifetime.to_json(),
                    "days": [[day, entry.days[day].to_json()] for day in sorted(entry.days)],
                }
                for key, entry in self._sources.items()
            },
        }
        return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ProfileState:
        """The state :meth:`to_bytes` gave."""
        document = json.loads(data)
        if document.get("format") != _FORMAT:
            raise ValueError(f"unknown profile state format {document.get('format')!r}")
        state = cls()
        for key, entry_data in document["sources"].items():
            entry = state._sources[key] = SourceState(entry_data["horizon"])
            entry.lifetime = Cell.from_json(entry_data["lifetime"])
            entry.days = {day: Cell.from_json(cell) for day, cell in entry_data["days"]}
        return state
