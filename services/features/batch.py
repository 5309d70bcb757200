"""Features over a table of events in DuckDB: the backfill and point-in-time queries.

The SQL is generated from the feature set and computes what :mod:`.state` computes, with the
same window semantics (see there) and the same reading of properties (see :mod:`.events`): the
generated expressions mirror :func:`.events.as_number`, :func:`.events.canonical` and the
filters' Python predicates one for one. It is shaped for tens of millions of events:

1. one scan of the events extracts each JSON path once (only on rows whose type and name some
   source using the path admits), decides which sources each event matches, and drops events
   that match none;
2. one ``GROUP BY`` computes every aggregate of every source and window at once, each as an
   aggregate with a ``FILTER`` clause (the *parts*: a count, a sum, a min timestamp ...), never
   a query per feature;
3. features are assembled from the parts in Arrow and numpy (an average is a sum over a count,
   ``days_since`` is as_of minus a timestamp), and derived features are evaluated over whole
   columns with the rules of :func:`.definitions.evaluate`: None propagates, division by zero
   and non-finite steps give None.

Differences from the streaming state, by design: distinct counts are exact here (the state's
sketch estimates them); sums are DuckDB's ``fsum`` (compensated) rather than exact, and
``days_since`` is computed in doubles, so both can differ from the state in the last bits; and
as_of is exact to the nanosecond, where the state reads whole day cells.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import duckdb
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from profilemesh.services.features.definitions import (
    Aggregation,
    Binary,
    Call,
    Expr,
    FeatureDefinition,
    FeatureSet,
    Negate,
    Number,
    Operator,
    PropertyFilter,
    Ref,
    Source,
    ValueType,
)
from profilemesh.services.features.events import (
    CONTEXT,
    NS_PER_DAY,
    NUMBER_PATTERN,
    PropertyPath,
)

Floats = npt.NDArray[np.float64]

_NUMERIC_JSON: Final = "('BIGINT', 'UBIGINT', 'DOUBLE', 'HUGEINT', 'UHUGEINT')"
_INTEGER_JSON: Final = "('BIGINT', 'UBIGINT')"
_COMPARISONS: Final = {Operator.GT: ">", Operator.GE: ">=", Operator.LT: "<", Operator.LE: "<="}
_NUMPY_ARITHMETIC: Final = {"+": np.add, "-": np.subtract, "*": np.multiply, "/": np.divide}
"""The numpy ufuncs of :data:`.definitions.ARITHMETIC`."""
_ARROW_TYPES: Final = {
    ValueType.DOUBLE: pa.float64(),
    ValueType.INT64: pa.int64(),
    ValueType.STRING: pa.string(),
}


def batch_values(
    con: duckdb.DuckDBPyConnection,
    events: str,
    feature_set: FeatureSet,
    as_of_ns: int,
    names: Iterable[str] | None = None,
) -> pa.Table:
    """Every visible feature (or those of ``names``) of every profile with an event at or
    before ``as_of_ns``, one row per profile ordered by ``profile_id``: the backfill.

    ``events`` is a table, view or table function in ``con`` (``read_parquet('log/*.parquet')``)
    with the columns of :data:`.events.ARROW_SCHEMA`.
    """
    query = _Query(feature_set, names)
    sql = query.sql(
        events,
        as_of_day="$as_of_day",
        group="e.profile_id",
        key="profile_id",
        source_rows=f"{query.events_name} e",
        latest="$as_of",
    )
    params = {**query.params, "as_of": as_of_ns, "as_of_day": as_of_ns // NS_PER_DAY}
    parts = _fetch(con, sql, params)
    as_of = np.full(parts.num_rows, as_of_ns, dtype=np.int64)
    columns = query.assemble(parts, as_of)
    return pa.table({"profile_id": parts.column("profile_id"), **columns})


def point_in_time_values(
    con: duckdb.DuckDBPyConnection,
    events: str,
    feature_set: FeatureSet,
    entity_rows: pa.Table,
    names: Iterable[str] | None = None,
) -> pa.Table:
    """For each row of ``entity_rows`` (``profile_id`` string, ``timestamp_ns`` int64, and any
    other columns, such as labels), every visible feature (or those of ``names``) of that
    profile as of that row's timestamp, computed from events at or before it only: no leakage
    from the future into a training example. The rows keep their order and their columns,
    which come first."""
    query = _Query(feature_set, names)
    entity = f"__pm_entity_{uuid.uuid4().hex}"
    keys = pa.table(
        {
            "rid": pa.array(np.arange(entity_rows.num_rows, dtype=np.int64)),
            "profile_id": entity_rows.column("profile_id").cast(pa.string()),
            "timestamp_ns": entity_rows.column("timestamp_ns").cast(pa.int64()),
        }
    )
    con.register(entity, keys)
    try:
        sql = query.sql(
            events,
            as_of_day="r.as_of_day",
            group="r.rid",
            key="rid",
            source_rows=(
                f"(SELECT rid, profile_id AS row_profile_id, timestamp_ns AS as_of, "
                f"{_day('timestamp_ns')} AS as_of_day FROM {entity}) r "
                f"LEFT JOIN {query.events_name} e "
                "ON e.profile_id = r.row_profile_id AND e.ts <= r.as_of"
            ),
            latest=f"(SELECT max(timestamp_ns) FROM {entity})",
        )
        parts = _fetch(con, sql, query.params)
    finally:
        con.unregister(entity)
    as_of = keys.column("timestamp_ns").to_numpy()
    columns = query.assemble(parts, as_of)
    table = entity_rows
    for name, column in columns.items():
        table = table.append_column(name, column)
    return table


def _fetch(con: duckdb.DuckDBPyConnection, sql: str, params: Mapping[str, Any]) -> pa.Table:
    table = con.sql(sql, params=dict(params)).to_arrow_table()
    if table is None:
        raise RuntimeError("the features query returned no result")
    return table


def _day(column: str) -> str:
    """The UTC day number of a nanosecond timestamp, rounding down before 1970 too (DuckDB's
    integer division truncates)."""
    return (
        f"(CASE WHEN {column} >= 0 THEN {column} // {NS_PER_DAY} "
        f"ELSE ({column} + 1) // {NS_PER_DAY} - 1 END)"
    )


@dataclass(frozen=True, slots=True)
class _Part:
    """One aggregate of one source over one window."""

    source: Source
    window_days: int | None
    kind: str
    """count, numbers, sum, min, max, min_ts, max_ts, distinct, first:<type>, last:<type>."""


_PARTS: Final[Mapping[Aggregation, tuple[str, ...]]] = {
    Aggregation.COUNT: ("count",),
    Aggregation.SUM: ("sum",),
    Aggregation.AVG: ("sum", "numbers"),
    Aggregation.MIN: ("min",),
    Aggregation.MAX: ("max",),
    Aggregation.DISTINCT_COUNT: ("distinct",),
    Aggregation.DAYS_SINCE: ("max_ts",),
    Aggregation.DAYS_SINCE_FIRST: ("min_ts",),
}


def _parts_of(definition: FeatureDefinition) -> tuple[str, ...]:
    aggregation = definition.aggregation
    if aggregation is Aggregation.FIRST or aggregation is Aggregation.LAST:
        return (f"{aggregation.value}:{definition.result_type.value}",)
    if aggregation is None:
        raise ValueError(f"{definition.name} is derived: it has no parts")
    return _PARTS[aggregation]


class _Query:
    """The SQL of one feature set and selection of features, and the assembly of its result."""

    def __init__(self, feature_set: FeatureSet, names: Iterable[str] | None) -> None:
        self.targets = feature_set.resolve(names)
        self.needed = feature_set.closure(names)
        self.feature_set = feature_set
        self.params: dict[str, Any] = {}
        self._param_names: dict[tuple[str, Any], str] = {}
        self.events_name = "__pm_events"
        self.parts: dict[_Part, str] = {}
        self.sources: dict[str, Source] = {}
        for definition in self.needed:
            if definition.derived:
                continue
            source = feature_set.source_of(definition.name)
            self.sources[source.key] = source
            for kind in _parts_of(definition):
                part = _Part(source, definition.window_days, kind)
                self.parts.setdefault(part, f"p{len(self.parts)}")
        self.source_ids = {key: f"s{i}" for i, key in enumerate(self.sources)}
        self.paths: dict[PropertyPath, str] = {}
        for source in self.sources.values():
            for path in self._paths_of(source):
                self.paths.setdefault(path, f"v{len(self.paths)}")

    @staticmethod
    def _paths_of(source: Source) -> list[PropertyPath]:
        paths = [f.path for f in source.filters]
        if source.path is not None:
            paths.append(source.path)
        return paths

    def _param(self, value: Any) -> str:
        """A parameter holding ``value`` (one per distinct value: DuckDB refuses unused ones)."""
        key = (type(value).__name__, value)
        name = self._param_names.get(key)
        if name is None:
            name = self._param_names[key] = f"q{len(self.params)}"
            self.params[name] = value
        return f"${name}"

    # -- the events CTE ------------------------------------------------------------------------

    def _admits(self, source: Source) -> str:
        """SQL: the event's type and name are among the source's."""
        terms = []
        if source.event_types:
            terms.append(f"type IN ({', '.join(_literal(t) for t in source.event_types)})")
        if source.event_names:
            terms.append(f"name IN ({', '.join(self._param(n) for n in source.event_names)})")
        return " AND ".join(terms) or "TRUE"

    def _extracted(self, events: str, latest: str) -> str:
        """Scan 1: each path's JSON type and text, on the rows some source of the path admits."""
        columns = ["profile_id", "timestamp_ns AS ts", f"{_day('timestamp_ns')} AS day"]
        columns += ["type", "name"]
        for path, column in self.paths.items():
            guards = {self._admits(s) for s in self.sources.values() if path in self._paths_of(s)}
            guard = "TRUE" if "TRUE" in guards else " OR ".join(f"({g})" for g in sorted(guards))
            root = "context" if path.root == CONTEXT else "properties"
            json_path = _literal(path.json_path)
            columns.append(
                f"CASE WHEN {guard} THEN json_type({root}, {json_path}) END AS {column}_t"
            )
            columns.append(
                f"CASE WHEN {guard} THEN json_extract_string({root}, {json_path}) END AS {column}_s"
            )
        return f"SELECT {', '.join(columns)} FROM {events} WHERE timestamp_ns <= {latest}"

    def _typed(self) -> str:
        """Each path's value as a number, canonical text, text form and typed outputs."""
        columns = ["profile_id", "ts", "day", "type", "name"]
        for column in self.paths.values():
            t, s = f"{column}_t", f"{column}_s"
            raw = (
                f"CASE WHEN {t} IN {_NUMERIC_JSON} OR ({t} = 'VARCHAR' AND "
                f"regexp_full_match({s}, {_literal(NUMBER_PATTERN)})) "
                f"THEN TRY_CAST({s} AS DOUBLE) END"
            )
            number = f"CASE WHEN isfinite({raw}) THEN ({raw}) + 0.0 END"
            canonical = (
                f"CASE WHEN {t} = 'VARCHAR' THEN 's:' || {s} WHEN {t} = 'BOOLEAN' THEN 'b:' || {s} "
                f"WHEN {t} IN {_NUMERIC_JSON} THEN 'n:' || CAST(TRY_CAST({s} AS DOUBLE) + 0.0 "
                "AS VARCHAR) END"
            )
            text = (
                f"CASE WHEN {t} IN ('VARCHAR', 'BOOLEAN') OR {t} IN {_INTEGER_JSON} THEN {s} "
                f"WHEN {t} IN {_NUMERIC_JSON} THEN CAST(TRY_CAST({s} AS DOUBLE) AS VARCHAR) END"
            )
            columns += [t, s, f"{number} AS {column}_n", f"{canonical} AS {column}_c"]
            columns.append(f"{text} AS {column}_x")
        return f"SELECT {', '.join(columns)} FROM __pm_extracted"

    def _matched(self) -> str:
        """Which sources each event matches; events matching none are dropped."""
        columns = ["profile_id", "ts", "day"]
        for column in self.paths.values():
            columns += [f"{column}_n", f"{column}_c", f"{column}_x"]
            columns.append(_int64(f"{column}_n") + f" AS {column}_i")
        matches = []
        for key, source in self.sources.items():
            terms = [self._admits(source)]
            terms += [self._filter(f) for f in source.filters]
            match = " AND ".join(f"({term})" for term in terms)
            columns.append(f"{match} AS {self.source_ids[key]}")
            matches.append(self.source_ids[key])
        keep = " OR ".join(matches) or "FALSE"
        return f"SELECT {', '.join(columns)} FROM __pm_typed WHERE {keep}"

    def _filter(self, feature_filter: PropertyFilter) -> str:
        """SQL of :meth:`PropertyFilter.holds_for`, never NULL."""
        column = self.paths[feature_filter.path]
        t, s, n = f"{column}_t", f"{column}_s", f"{column}_n"
        op = feature_filter.operator
        if op is Operator.EXISTS:
            return f"coalesce({t} <> 'NULL', FALSE)"
        if op is Operator.NOT_EXISTS:
            return f"NOT coalesce({t} <> 'NULL', FALSE)"
        if op in _COMPARISONS:
            value = feature_filter.value
            if isinstance(value, str):
                test = f"{t} = 'VARCHAR' AND {s} {_COMPARISONS[op]} {self._param(value)}"
            else:
                test = f"{n} {_COMPARISONS[op]} {self._param(float(value))}"
            return f"coalesce({test}, FALSE)"
        listed = op in (Operator.IN, Operator.NOT_IN)
        operands = feature_filter.value if listed else (feature_filter.value,)
        equal = " OR ".join(f"({self._equals(value, t, s, n)})" for value in operands)
        test = f"coalesce({equal}, FALSE)"
        return test if op in (Operator.EQ, Operator.IN) else f"NOT {test}"

    def _equals(self, value: Any, t: str, s: str, n: str) -> str:
        if isinstance(value, bool):
            return f"{t} = 'BOOLEAN' AND {s} = {_literal('true' if value else 'false')}"
        if isinstance(value, str):
            return f"{t} = 'VARCHAR' AND {s} = {self._param(value)}"
        return f"{n} = {self._param(float(value))}"

    # -- the aggregation -----------------------------------------------------------------------

    def _aggregate(self, part: _Part, as_of_day: str) -> str:
        match = f"e.{self.source_ids[part.source.key]}"
        if part.window_days is not None:
            match += f" AND e.day > {as_of_day} - {part.window_days}"
        column = "" if part.source.path is None else self.paths[part.source.path]
        kind, _, value_type = part.kind.partition(":")
        number = f"e.{column}_n"
        if kind == "count":
            return f"count(*) FILTER (WHERE {match})"
        if kind == "numbers":
            return f"count({number}) FILTER (WHERE {match})"
        if kind == "sum":
            return f"fsum({number}) FILTER (WHERE {match})"
        if kind in ("min", "max"):
            return f"{kind}({number}) FILTER (WHERE {match})"
        if kind in ("min_ts", "max_ts"):
            return f"{kind[:3]}(e.ts) FILTER (WHERE {match})"
        canonical = f"e.{column}_c"
        if kind == "distinct":
            return f"count(DISTINCT {canonical}) FILTER (WHERE {match})"
        output = {"string": "x", "double": "n", "int64": "i"}[value_type]
        pick = "min" if kind == "first" else "max"
        key = (
            f"struct_pack(t := e.ts, c := {canonical}, x := e.{column}_x, v := e.{column}_{output})"
        )
        return (
            f"struct_extract({pick}({key}) FILTER (WHERE {match} AND {canonical} IS NOT NULL), 'v')"
        )

    def sql(
        self, events: str, *, as_of_day: str, group: str, key: str, source_rows: str, latest: str
    ) -> str:
        """The whole query: the events CTEs, then one GROUP BY ``group`` (named ``key`` in the
        result) over ``source_rows``, which reads the matched events as ``e`` and holds no
        event later than ``latest``, computing every part."""
        aggregates = [
            f"{self._aggregate(part, as_of_day)} AS {name}" for part, name in self.parts.items()
        ]
        return (
            f"WITH __pm_extracted AS ({self._extracted(events, latest)}), "
            f"__pm_typed AS ({self._typed()}), "
            f"{self.events_name} AS ({self._matched()}) "
            f"SELECT {group} AS {key}{''.join(', ' + a for a in aggregates)} "
            f"FROM {source_rows} GROUP BY {group} ORDER BY {group}"
        )

    # -- assembly ------------------------------------------------------------------------------

    def assemble(self, parts: pa.Table, as_of: npt.NDArray[np.int64]) -> dict[str, pa.Array]:
        """The features' columns from the parts' columns (aligned with ``as_of``)."""
        values: dict[str, pa.Array] = {}
        floats: dict[str, Floats] = {}
        for definition in self.needed:
            if definition.derived:
                result = _evaluate_columns(definition.tree, floats, len(as_of))
                values[definition.name] = pa.array(result, mask=np.isnan(result))
            else:
                values[definition.name] = self._feature(definition, parts, as_of)
            floats[definition.name] = _as_floats(values[definition.name])
        return {d.name: values[d.name] for d in self.targets}

    def _feature(
        self, definition: FeatureDefinition, parts: pa.Table, as_of: npt.NDArray[np.int64]
    ) -> pa.Array:
        source = self.feature_set.source_of(definition.name)

        def part(kind: str) -> pa.Array:
            name = self.parts[_Part(source, definition.window_days, kind)]
            return parts.column(name).combine_chunks()

        aggregation = definition.aggregation
        kinds = _parts_of(definition)
        if aggregation is Aggregation.AVG:
            return pc.divide(part("sum"), pc.cast(part("numbers"), pa.float64()))
        if aggregation in (Aggregation.DAYS_SINCE, Aggregation.DAYS_SINCE_FIRST):
            timestamps = part(kinds[0])
            elapsed = pc.subtract(pa.array(as_of), timestamps)
            return pc.divide(pc.cast(elapsed, pa.float64(), safe=False), float(NS_PER_DAY))
        return part(kinds[0]).cast(_ARROW_TYPES[definition.result_type])


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _int64(number: str) -> str:
    """SQL of :func:`.events.as_int64` over a column of numbers."""
    return (
        f"CASE WHEN {number} = trunc({number}) AND {number} >= -9223372036854775808.0 "
        f"AND {number} < 9223372036854775808.0 THEN CAST({number} AS BIGINT) END"
    )


def _as_floats(column: pa.Array) -> Floats:
    if pa.types.is_string(column.type):
        return np.full(len(column), np.nan)
    floats: Floats = pc.cast(column, pa.float64(), safe=False).to_numpy(zero_copy_only=False)
    return floats


def _evaluate_columns(expression: Expr, columns: Mapping[str, Floats], length: int) -> Floats:
    """:func:`.definitions.evaluate` over whole columns, NaN standing for None (a non-finite
    step gives None there, so the two never differ)."""
    if isinstance(expression, Number):
        return np.full(length, expression.value)
    if isinstance(expression, Ref):
        return columns[expression.name]
    if isinstance(expression, Negate):
        return -_evaluate_columns(expression.operand, columns, length)
    if isinstance(expression, Binary):
        left = _evaluate_columns(expression.left, columns, length)
        right = _evaluate_columns(expression.right, columns, length)
        with np.errstate(all="ignore"):
            result: Floats = _NUMPY_ARITHMETIC[expression.op](left, right)
        return np.where(np.isfinite(result), result, np.nan)
    return _call(expression, [_evaluate_columns(arg, columns, length) for arg in expression.args])


def _call(call: Call, args: list[Floats]) -> Floats:
    if call.function == "coalesce":
        return functools.reduce(lambda a, b: np.where(np.isnan(a), b, a), args)
    combine = np.minimum if call.function == "min" else np.maximum
    return functools.reduce(combine, args)
