"""Feature definitions: what each feature computes, checked once, and the set of them in force.

A definition is data, like Feast's feature views: an *aggregated* feature combines the events of
some types and names, optionally filtered by their properties, within a window of whole UTC days
(:mod:`.state` explains the window semantics that every engine shares); a *derived* feature is
arithmetic over other features (``(first_order_days - recency_days) / (orders_lifetime - 1)``).
Definitions are frozen pydantic models, loaded from YAML or from the ``FeatureDefinition``
message, and every entry point reports problems as :class:`InvalidArgument` naming the fields,
e.g. ``definitions[2].window_days``.

A :class:`FeatureSet` is what the engines run: the latest version of every definition, derived
features in dependency order, and the distinct *sources*. Definitions that read the same events
the same way (same types, names, filters and property) share a source, so that an event updates
one aggregate per source however many features read it: ``orders_30d``, ``orders_90d`` and
``recency_days`` are three readings of one source of ``Order Completed`` events.
"""

from __future__ import annotations

import ast
import json
import math
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Any, Final, TypeAlias

import xxhash
import yaml
from google.protobuf import duration_pb2, struct_pb2
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from profilemesh.common.v1 import event_type_pb2
from profilemesh.features.v1 import feature_definition_pb2 as pb
from profilemesh.services.features.events import (
    EVENT_TYPES,
    NS_PER_DAY,
    FeatureEvent,
    PropertyPath,
    as_int64,
    as_number,
    as_text,
    parse_property_path,
)
from profilemesh.shared.errors import FieldViolation, InvalidArgument

NAME_PATTERN: Final = r"^[a-z][a-z0-9_]*$"
MAX_NAME_LENGTH: Final = 63
"""The contract's limit (feature_definition.proto)."""
MAX_EXPRESSION_LENGTH: Final = 1000
MAX_WINDOW_DAYS: Final = 3660
"""Ten years: the streaming state keeps a day cell per day of the longest window."""


class Aggregation(StrEnum):
    """How the matching events of a window become one value (see :mod:`.state` for details)."""

    COUNT = "count"
    SUM = "sum"
    AVG = "avg"
    MIN = "min"
    MAX = "max"
    FIRST = "first"
    """The property's value on the earliest matching event that has it."""
    LAST = "last"
    """The property's value on the latest matching event that has it."""
    DISTINCT_COUNT = "distinct_count"
    DAYS_SINCE = "days_since"
    """Days (fractional) from the latest matching event to as_of: recency."""
    DAYS_SINCE_FIRST = "days_since_first"
    """Days (fractional) from the earliest matching event to as_of: tenure."""


class Operator(StrEnum):
    """Comparison of a property filter. An absent property (missing or null) fails every
    operator except ``ne``, ``not_in`` and ``not_exists``."""

    EQ = "eq"
    NE = "ne"
    GT = "gt"
    GE = "ge"
    LT = "lt"
    LE = "le"
    IN = "in"
    NOT_IN = "not_in"
    EXISTS = "exists"
    NOT_EXISTS = "not_exists"


class ValueType(StrEnum):
    """Type of a feature's values."""

    DOUBLE = "double"
    INT64 = "int64"
    STRING = "string"


NEEDS_PROPERTY: Final = frozenset(
    {
        Aggregation.SUM,
        Aggregation.AVG,
        Aggregation.MIN,
        Aggregation.MAX,
        Aggregation.FIRST,
        Aggregation.LAST,
        Aggregation.DISTINCT_COUNT,
    }
)
"""Aggregations that read a property; the others ignore it."""
NUMERIC: Final = frozenset({Aggregation.SUM, Aggregation.AVG, Aggregation.MIN, Aggregation.MAX})
"""Aggregations over the property read as a number."""
_VALUE_TYPES: Final[Mapping[Aggregation, tuple[ValueType, ...]]] = {
    # The first type listed is the default.
    Aggregation.COUNT: (ValueType.INT64,),
    Aggregation.DISTINCT_COUNT: (ValueType.INT64,),
    Aggregation.FIRST: (ValueType.STRING, ValueType.DOUBLE, ValueType.INT64),
    Aggregation.LAST: (ValueType.STRING, ValueType.DOUBLE, ValueType.INT64),
    **{
        aggregation: (ValueType.DOUBLE,)
        for aggregation in (
            Aggregation.SUM,
            Aggregation.AVG,
            Aggregation.MIN,
            Aggregation.MAX,
            Aggregation.DAYS_SINCE,
            Aggregation.DAYS_SINCE_FIRST,
        )
    },
}


# -- derived feature expressions -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Number:
    """A numeric constant."""

    value: float


@dataclass(frozen=True, slots=True)
class Ref:
    """The value of another feature."""

    name: str


@dataclass(frozen=True, slots=True)
class Negate:
    """Unary minus."""

    operand: Expr


@dataclass(frozen=True, slots=True)
class Binary:
    """``+``, ``-``, ``*`` or ``/`` of two operands."""

    op: str
    left: Expr
    right: Expr


@dataclass(frozen=True, slots=True)
class Call:
    """``coalesce``, ``min`` or ``max`` of two or more operands."""

    function: str
    args: tuple[Expr, ...]


Expr: TypeAlias = Number | Ref | Negate | Binary | Call
"""A derived feature's expression, restricted to what every engine can compute the same way."""

FUNCTIONS: Final = frozenset({"coalesce", "min", "max"})
_OPERATORS: Final[Mapping[type[ast.operator], str]] = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
}
ARITHMETIC: Final[Mapping[str, Callable[[float, float], float]]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
}


def parse_expression(text: str) -> Expr:
    """The tree of a derived feature's expression; ValueError saying what is not allowed.

    Python's own parser reads the text; only numbers, feature names, ``+ - * /``, parentheses
    and calls of :data:`FUNCTIONS` with two or more positional arguments are accepted.
    """
    if len(text) > MAX_EXPRESSION_LENGTH:
        raise ValueError(f"longer than {MAX_EXPRESSION_LENGTH} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as error:
        raise ValueError(f"not a valid expression: {error.msg}") from None
    return _convert(tree.body)


def _convert(node: ast.expr) -> Expr:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise ValueError(f"only numbers are allowed as constants, got {node.value!r}")
        if not math.isfinite(node.value):
            raise ValueError(f"constant {node.value!r} is not finite")
        return Number(float(node.value))
    if isinstance(node, ast.Name):
        return Ref(node.id)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        operand = _convert(node.operand)
        return Negate(operand) if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return Binary(_OPERATORS[type(node.op)], _convert(node.left), _convert(node.right))
    if isinstance(node, ast.Call):
        return _convert_call(node)
    raise ValueError(
        f"{ast.unparse(node)!r} is not allowed: use numbers, feature names, + - * /, "
        f"parentheses and {', '.join(sorted(FUNCTIONS))}"
    )


def _convert_call(node: ast.Call) -> Expr:
    if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
        raise ValueError(f"unknown function {ast.unparse(node.func)!r}; one of {sorted(FUNCTIONS)}")
    if node.keywords or any(isinstance(arg, ast.Starred) for arg in node.args):
        raise ValueError(f"{node.func.id}() takes positional arguments only")
    if len(node.args) < 2:
        raise ValueError(f"{node.func.id}() takes two or more arguments")
    return Call(node.func.id, tuple(_convert(arg) for arg in node.args))


def references(expression: Expr) -> tuple[str, ...]:
    """Names of the features ``expression`` reads, each once, in order of appearance."""
    names: dict[str, None] = {}

    def visit(node: Expr) -> None:
        if isinstance(node, Ref):
            names[node.name] = None
        elif isinstance(node, Negate):
            visit(node.operand)
        elif isinstance(node, Binary):
            visit(node.left)
            visit(node.right)
        elif isinstance(node, Call):
            for arg in node.args:
                visit(arg)

    visit(expression)
    return tuple(names)


def evaluate(expression: Expr, values: Mapping[str, Any]) -> float | None:
    """The value of ``expression`` given the values of the features it reads.

    None propagates through arithmetic, ``min`` and ``max``; ``coalesce`` returns its first
    non-None argument. Division by zero, and any step whose result is not a finite double, give
    None. The batch engine evaluates the same tree over whole columns with the same rules.
    """
    if isinstance(expression, Number):
        return expression.value
    if isinstance(expression, Ref):
        value = values.get(expression.name)
        return None if value is None else _finite(float(value))
    if isinstance(expression, Negate):
        operand = evaluate(expression.operand, values)
        return None if operand is None else -operand
    if isinstance(expression, Binary):
        left = evaluate(expression.left, values)
        right = evaluate(expression.right, values)
        if left is None or right is None or (expression.op == "/" and right == 0.0):
            return None
        return _finite(ARITHMETIC[expression.op](left, right))
    args = [evaluate(arg, values) for arg in expression.args]
    if expression.function == "coalesce":
        return next((arg for arg in args if arg is not None), None)
    present = [arg for arg in args if arg is not None]
    if len(present) < len(args):
        return None
    return min(present) if expression.function == "min" else max(present)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


# -- the definition model --------------------------------------------------------------------

Scalar: TypeAlias = str | bool | int | float


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PropertyFilter(_Frozen):
    """A condition on one property of an event; a definition's filters must all hold.

    Numbers compare numerically (a numeric string property compares as its number), strings
    exactly and case-sensitively (``gt`` and friends in code point order), booleans only with
    booleans.
    """

    property: str
    """A property path (``currency``, ``context.device.type``)."""
    operator: Operator
    value: Any = Field(default=None, validate_default=True)
    """A scalar for ``eq`` to ``le``, a non-empty list of scalars for ``in`` and ``not_in``,
    nothing for ``exists`` and ``not_exists``."""

    @field_validator("property")
    @classmethod
    def _path_is_valid(cls, text: str) -> str:
        parse_property_path(text)
        return text

    @field_validator("value")
    @classmethod
    def _value_suits_operator(cls, value: Any, info: ValidationInfo) -> Any:
        operator_ = info.data.get("operator")
        if operator_ is None:
            return value
        if operator_ in (Operator.EXISTS, Operator.NOT_EXISTS):
            if value is not None:
                raise ValueError(f"{operator_} takes no value")
            return None
        if operator_ in (Operator.IN, Operator.NOT_IN):
            if not isinstance(value, list | tuple) or not value:
                raise ValueError(f"{operator_} needs a non-empty list of values")
            for element in value:
                _check_operand(element, operator_)
            return tuple(value)
        _check_operand(value, operator_)
        return value

    @cached_property
    def path(self) -> PropertyPath:
        """The parsed property path."""
        return parse_property_path(self.property)

    def holds_for(self, value: Any) -> bool:
        """Whether the condition holds for a property value (None when absent)."""
        op = self.operator
        if op is Operator.EXISTS:
            return value is not None
        if op is Operator.NOT_EXISTS:
            return value is None
        if op is Operator.EQ:
            return _equals(value, self.value)
        if op is Operator.NE:
            return not _equals(value, self.value)
        if op is Operator.IN:
            return any(_equals(value, operand) for operand in self.value)
        if op is Operator.NOT_IN:
            return not any(_equals(value, operand) for operand in self.value)
        return _compares(value, op, self.value)

    def matches(self, event: FeatureEvent) -> bool:
        """Whether the condition holds for ``event``."""
        return self.holds_for(self.path.read(event))

    @cached_property
    def predicate(self) -> Callable[[Any], bool]:
        """:meth:`holds_for` compiled for the streaming hot path: equality and membership
        become set lookups."""
        op = self.operator
        if op is Operator.EXISTS:
            return _present
        if op is Operator.NOT_EXISTS:
            return _absent
        if op in _ORDERINGS:
            return self.holds_for
        listed = op in (Operator.IN, Operator.NOT_IN)
        member = _membership(self.value if listed else (self.value,))
        if op in (Operator.EQ, Operator.IN):
            return member
        return lambda value: not member(value)


_ORDERINGS: Final[Mapping[Operator, Callable[[Any, Any], bool]]] = {
    Operator.GT: operator.gt,
    Operator.GE: operator.ge,
    Operator.LT: operator.lt,
    Operator.LE: operator.le,
}


def _present(value: Any) -> bool:
    return value is not None


def _absent(value: Any) -> bool:
    return value is None


def _membership(operands: Iterable[Scalar]) -> Callable[[Any], bool]:
    """Whether a value equals one of ``operands`` (as :func:`_equals` decides)."""
    strings = frozenset(x for x in operands if isinstance(x, str))
    flags = frozenset(x for x in operands if isinstance(x, bool))
    numbers = frozenset(
        float(x) for x in operands if isinstance(x, int | float) and not isinstance(x, bool)
    )

    def member(value: Any) -> bool:
        if isinstance(value, str):
            if value in strings:
                return True
            if not numbers:
                return False
        elif isinstance(value, bool):
            return value in flags
        number = as_number(value)
        return number is not None and number in numbers

    return member


def _check_operand(value: Any, op: Operator) -> None:
    ordered = op in _ORDERINGS
    if (
        value is None
        or not isinstance(value, str | int | float)
        or (ordered and isinstance(value, bool))
    ):
        kinds = "a number or a string" if ordered else "a string, a number or a boolean"
        raise ValueError(f"{op} compares with {kinds}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value!r} is not a finite number")


def _equals(value: Any, operand: Scalar) -> bool:
    if isinstance(operand, bool):
        return isinstance(value, bool) and value is operand
    if isinstance(operand, str):
        return isinstance(value, str) and value == operand
    number = as_number(value)
    return number is not None and number == float(operand)


def _compares(value: Any, op: Operator, operand: Scalar) -> bool:
    compare = _ORDERINGS[op]
    if isinstance(operand, str):
        return isinstance(value, str) and compare(value, operand)
    number = as_number(value)
    return number is not None and compare(number, float(operand))


class FeatureDefinition(_Frozen):
    """One version of one feature: aggregated (``aggregation`` set) or derived (``expression``
    set), never both. See feature_definition.proto for the meaning of each field."""

    name: str = Field(min_length=1, max_length=MAX_NAME_LENGTH, pattern=NAME_PATTERN)
    version: int = Field(default=1, ge=1, strict=True)
    description: str = ""
    aggregation: Aggregation | None = None
    expression: str | None = Field(default=None, validate_default=True)
    """Arithmetic over other features' names (a derived feature); see :func:`parse_expression`."""
    event_types: tuple[str, ...] = ()
    """Types of the events that count; empty means every type."""
    event_names: tuple[str, ...] = ()
    """Names of the events that count; empty means every name."""
    filters: tuple[PropertyFilter, ...] = ()
    property: str | None = Field(default=None, validate_default=True)
    """The property aggregated: required by sum, avg, min, max, first, last, distinct_count."""
    window_days: int | None = Field(default=None, ge=1, le=MAX_WINDOW_DAYS, strict=True)
    """The last N UTC calendar days up to as_of; None for the profile's lifetime."""
    value_type: ValueType | None = Field(default=None, validate_default=True)
    """Defaults to what the aggregation gives (int64 for counts, string for first and last,
    double otherwise); derived features are double."""
    hidden: bool = False
    """A helper that other features read but that is not served on its own (the device-mix
    counts behind the shares). The contract has no field for it: hidden definitions stay
    inside the service."""
    builtin: bool = False
    """Provided by profilemesh (see :data:`BUILTINS`)."""

    @field_validator("expression")
    @classmethod
    def _aggregated_or_derived(cls, expression: str | None, info: ValidationInfo) -> str | None:
        if "aggregation" not in info.data:
            return expression  # the aggregation is invalid; reported on its own
        aggregation = info.data["aggregation"]
        if expression is None and aggregation is None:
            raise ValueError("a feature needs an aggregation, or an expression if derived")
        if expression is not None and aggregation is not None:
            raise ValueError("a derived feature has an expression and no aggregation")
        if expression is not None:
            parse_expression(expression)
        return expression

    @field_validator("event_types")
    @classmethod
    def _known_types(cls, types: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        _not_for_derived(types, info)
        for event_type in types:
            if event_type not in EVENT_TYPES:
                raise ValueError(f"unknown event type {event_type!r}; one of {list(EVENT_TYPES)}")
        if len(set(types)) != len(types):
            raise ValueError("lists a type twice")
        return types

    @field_validator("event_names")
    @classmethod
    def _names_listed_once(cls, names: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        _not_for_derived(names, info)
        if len(set(names)) != len(names):
            raise ValueError("lists a name twice")
        return names

    @field_validator("filters")
    @classmethod
    def _filters_aggregated(
        cls, filters: tuple[PropertyFilter, ...], info: ValidationInfo
    ) -> tuple[PropertyFilter, ...]:
        _not_for_derived(filters, info)
        return filters

    @field_validator("property")
    @classmethod
    def _property_when_needed(cls, text: str | None, info: ValidationInfo) -> str | None:
        _not_for_derived(text, info)
        aggregation = info.data.get("aggregation")
        if text is None:
            if aggregation in NEEDS_PROPERTY:
                raise ValueError(f"{aggregation} needs the property it aggregates")
            return None
        parse_property_path(text)
        return text

    @field_validator("window_days")
    @classmethod
    def _window_aggregated(cls, days: int | None, info: ValidationInfo) -> int | None:
        _not_for_derived(days, info)
        return days

    @field_validator("value_type")
    @classmethod
    def _type_suits_aggregation(
        cls, value_type: ValueType | None, info: ValidationInfo
    ) -> ValueType | None:
        if "aggregation" not in info.data or "expression" not in info.data:
            return value_type
        aggregation = info.data["aggregation"]
        allowed = (ValueType.DOUBLE,) if aggregation is None else _VALUE_TYPES[aggregation]
        if value_type is None:
            return allowed[0]
        if value_type not in allowed:
            kind = "a derived feature" if aggregation is None else aggregation.value
            raise ValueError(f"{kind} gives {' or '.join(allowed)} values, not {value_type}")
        return value_type

    @cached_property
    def derived(self) -> bool:
        """Whether this is a derived feature (computed from other features)."""
        return self.expression is not None

    @cached_property
    def tree(self) -> Expr:
        """The parsed expression of a derived feature (ValueError for an aggregated one)."""
        if self.expression is None:
            raise ValueError(f"{self.name} is not a derived feature")
        return parse_expression(self.expression)

    @cached_property
    def path(self) -> PropertyPath | None:
        """The aggregated property's path, when the aggregation reads one."""
        if self.property is None or self.aggregation not in NEEDS_PROPERTY:
            return None
        return parse_property_path(self.property)

    @cached_property
    def result_type(self) -> ValueType:
        """The type of the values (``value_type`` with its default filled in)."""
        return self.value_type or ValueType.DOUBLE


def coerce(value: Any, value_type: ValueType) -> Any:
    """A property value as a feature value of ``value_type`` (first and last): None when it
    does not convert (a non-numeric string as a double, 2.5 as an int64)."""
    if value_type is ValueType.STRING:
        return as_text(value)
    if value_type is ValueType.DOUBLE:
        return as_number(value)
    return as_int64(value)


def _not_for_derived(value: Any, info: ValidationInfo) -> None:
    if info.data.get("expression") is not None and value:
        raise ValueError("not used by derived features")


# -- parsing, with violations named by field -------------------------------------------------


def _field_path(where: str, location: Sequence[int | str]) -> str:
    path = where
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path = f"{path}.{part}" if path else part
    return path


def _violations_of(error: ValidationError, where: str) -> list[FieldViolation]:
    violations = []
    for detail in error.errors():
        message = detail["msg"].removeprefix("Value error, ")
        if detail["type"] == "extra_forbidden":
            message = "unknown field"
        violations.append(FieldViolation(_field_path(where, detail["loc"]), message))
    return violations


def invalid(violations: Sequence[FieldViolation]) -> InvalidArgument:
    """The error for ``violations``, its message summing them up."""
    summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
    return InvalidArgument(f"invalid feature definitions: {summary}", violations=violations)


def parse_definition(data: Any, where: str = "definition") -> FeatureDefinition:
    """A definition from a plain mapping (parsed YAML or JSON), violations named from
    ``where``, e.g. ``definitions[2].window_days``."""
    try:
        return FeatureDefinition.model_validate(data)
    except ValidationError as error:
        raise invalid(_violations_of(error, where)) from None


def load_definitions(source: Path | str) -> tuple[FeatureDefinition, ...]:
    """The definitions of a YAML document: a list of definitions, or ``{features: [...]}``.

    ``source`` is a file when it is a :class:`Path` or a string naming an existing file, and
    YAML text otherwise. Enum values are written in lower case (``count``, ``not_in``). Every
    problem is reported at once, named ``definitions[i].<field>`` (``i`` counting from 0 in the
    list, whichever form the document takes).
    """
    text = source.read_text() if isinstance(source, Path) else _text_of(source)
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise InvalidArgument.for_field("definitions", f"not valid YAML: {error}") from None
    if isinstance(document, Mapping) and set(document) <= {"features"}:
        document = document.get("features")
    if document is None:
        return ()
    if not isinstance(document, list):
        raise InvalidArgument.for_field(
            "definitions", "expected a list of feature definitions, or {features: [...]}"
        )
    definitions: list[FeatureDefinition] = []
    violations: list[FieldViolation] = []
    for index, item in enumerate(document):
        where = f"definitions[{index}]"
        if isinstance(item, Mapping) and "builtin" in item:
            violations.append(FieldViolation(f"{where}.builtin", "set by profilemesh only"))
            continue
        try:
            definitions.append(parse_definition(item, where))
        except InvalidArgument as error:
            violations.extend(error.violations)
    if violations:
        raise invalid(violations)
    return tuple(definitions)


def _text_of(source: str) -> str:
    if "\n" not in source and len(source) < 4096:
        path = Path(source)
        if path.is_file():
            return path.read_text()
    return source


# -- protobuf conversion ---------------------------------------------------------------------

_AGGREGATION_TO_PROTO: Final = {
    Aggregation.COUNT: pb.AGGREGATION_COUNT,
    Aggregation.SUM: pb.AGGREGATION_SUM,
    Aggregation.AVG: pb.AGGREGATION_AVG,
    Aggregation.MIN: pb.AGGREGATION_MIN,
    Aggregation.MAX: pb.AGGREGATION_MAX,
    Aggregation.FIRST: pb.AGGREGATION_FIRST,
    Aggregation.LAST: pb.AGGREGATION_LAST,
    Aggregation.DISTINCT_COUNT: pb.AGGREGATION_DISTINCT_COUNT,
    Aggregation.DAYS_SINCE: pb.AGGREGATION_DAYS_SINCE,
    Aggregation.DAYS_SINCE_FIRST: pb.AGGREGATION_DAYS_SINCE_FIRST,
}
_AGGREGATION_FROM_PROTO: Final = {number: name for name, number in _AGGREGATION_TO_PROTO.items()}
_OPERATOR_TO_PROTO: Final = {
    Operator.EQ: pb.OPERATOR_EQ,
    Operator.NE: pb.OPERATOR_NE,
    Operator.GT: pb.OPERATOR_GT,
    Operator.GE: pb.OPERATOR_GE,
    Operator.LT: pb.OPERATOR_LT,
    Operator.LE: pb.OPERATOR_LE,
    Operator.IN: pb.OPERATOR_IN,
    Operator.NOT_IN: pb.OPERATOR_NOT_IN,
    Operator.EXISTS: pb.OPERATOR_EXISTS,
    Operator.NOT_EXISTS: pb.OPERATOR_NOT_EXISTS,
}
_OPERATOR_FROM_PROTO: Final = {number: name for name, number in _OPERATOR_TO_PROTO.items()}
_VALUE_TYPE_TO_PROTO: Final = {
    ValueType.DOUBLE: pb.VALUE_TYPE_DOUBLE,
    ValueType.INT64: pb.VALUE_TYPE_INT64,
    ValueType.STRING: pb.VALUE_TYPE_STRING,
}
_VALUE_TYPE_FROM_PROTO: Final = {number: name for name, number in _VALUE_TYPE_TO_PROTO.items()}
_EVENT_TYPE_TO_PROTO: Final = {
    "track": event_type_pb2.EVENT_TYPE_TRACK,
    "identify": event_type_pb2.EVENT_TYPE_IDENTIFY,
    "page": event_type_pb2.EVENT_TYPE_PAGE,
    "screen": event_type_pb2.EVENT_TYPE_SCREEN,
    "group": event_type_pb2.EVENT_TYPE_GROUP,
    "alias": event_type_pb2.EVENT_TYPE_ALIAS,
}
_EVENT_TYPE_FROM_PROTO: Final = {number: name for name, number in _EVENT_TYPE_TO_PROTO.items()}
_SECONDS_PER_DAY: Final = NS_PER_DAY // 1_000_000_000


def definition_to_proto(definition: FeatureDefinition) -> pb.FeatureDefinition:
    """The ``FeatureDefinition`` message (``state`` and ``create_time`` are the caller's).

    How the model maps onto the contract where the two differ:

    - every event type (an empty ``event_types``) is sent as ``[EVENT_TYPE_UNSPECIFIED]``,
      which the contract reads as "any type" in filters; ``record`` has no EventType, so a
      definition naming it cannot be sent (InvalidArgument on ``event_types``);
    - a derived feature is sent as ``AGGREGATION_BUILTIN`` with its expression in ``property``
      (the field AGGREGATION_BUILTIN otherwise leaves empty), so that ``description`` stays
      free for humans;
    - the window is a whole number of days; ``hidden`` has no field and is not sent.
    """
    message = pb.FeatureDefinition(
        name=definition.name,
        version=definition.version,
        description=definition.description,
        event_names=definition.event_names,
        value_type=_VALUE_TYPE_TO_PROTO[definition.result_type],
        builtin=definition.builtin,
    )
    if definition.aggregation is None:
        message.aggregation = pb.AGGREGATION_BUILTIN
        message.property = definition.expression or ""
        return message
    message.aggregation = _AGGREGATION_TO_PROTO[definition.aggregation]
    message.property = definition.property or ""
    if not definition.event_types:
        message.event_types.append(event_type_pb2.EVENT_TYPE_UNSPECIFIED)
    for index, event_type in enumerate(definition.event_types):
        if event_type not in _EVENT_TYPE_TO_PROTO:
            raise InvalidArgument.for_field(
                f"event_types[{index}]", f"{event_type!r} has no EventType in the contract"
            )
        message.event_types.append(_EVENT_TYPE_TO_PROTO[event_type])
    for feature_filter in definition.filters:
        proto_filter = message.filters.add(
            property=feature_filter.property, operator=_OPERATOR_TO_PROTO[feature_filter.operator]
        )
        if feature_filter.value is not None:
            proto_filter.value.CopyFrom(_to_value(feature_filter.value))
    if definition.window_days is not None:
        message.window.CopyFrom(duration_pb2.Duration(seconds=definition.window_days * 86_400))
    return message


def definition_from_proto(
    message: pb.FeatureDefinition, where: str = "definition"
) -> FeatureDefinition:
    """The definition a message describes (see :func:`definition_to_proto` for the mapping;
    an empty ``event_types`` means track events, as the contract says), validated, with
    violations named from ``where``, e.g. ``definition.window``."""
    violations: list[FieldViolation] = []

    def bad(field: str, description: str) -> None:
        violations.append(FieldViolation(_field_path(where, [field]), description))

    data: dict[str, Any] = {
        "name": message.name,
        "version": message.version or 1,
        "description": message.description,
        "builtin": message.builtin,
    }
    if message.value_type != pb.VALUE_TYPE_UNSPECIFIED:
        if message.value_type in _VALUE_TYPE_FROM_PROTO:
            data["value_type"] = _VALUE_TYPE_FROM_PROTO[message.value_type]
        else:
            bad("value_type", f"{pb.ValueType.Name(message.value_type)} is not supported")
    if message.aggregation == pb.AGGREGATION_BUILTIN:
        data["expression"] = message.property
    elif message.aggregation in _AGGREGATION_FROM_PROTO:
        data.update(_aggregated_fields(message, bad))
    else:
        bad("aggregation", "required")
    if violations:
        raise invalid(violations)
    return parse_definition(data, where)


def _aggregated_fields(
    message: pb.FeatureDefinition, bad: Callable[[str, str], None]
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "aggregation": _AGGREGATION_FROM_PROTO[message.aggregation],
        "event_names": tuple(message.event_names),
        "property": message.property or None,
    }
    numbers = list(message.event_types)
    if not numbers:
        data["event_types"] = ("track",)
    elif event_type_pb2.EVENT_TYPE_UNSPECIFIED not in numbers:
        data["event_types"] = tuple(_EVENT_TYPE_FROM_PROTO.get(n, str(n)) for n in numbers)
    filters = []
    for index, proto_filter in enumerate(message.filters):
        if proto_filter.operator not in _OPERATOR_FROM_PROTO:
            bad(f"filters[{index}].operator", "required")
            continue
        filters.append(
            {
                "property": proto_filter.property,
                "operator": _OPERATOR_FROM_PROTO[proto_filter.operator],
                "value": _from_value(proto_filter.value)
                if proto_filter.HasField("value")
                else None,
            }
        )
    data["filters"] = filters
    if message.HasField("window"):
        window = message.window
        if window.nanos or window.seconds % _SECONDS_PER_DAY or window.seconds <= 0:
            bad("window", "must be a positive whole number of days")
        else:
            data["window_days"] = window.seconds // _SECONDS_PER_DAY
    return data


def _to_value(value: Any) -> struct_pb2.Value:
    if isinstance(value, tuple):
        return struct_pb2.Value(
            list_value=struct_pb2.ListValue(values=[_to_value(element) for element in value])
        )
    if isinstance(value, bool):
        return struct_pb2.Value(bool_value=value)
    if isinstance(value, str):
        return struct_pb2.Value(string_value=value)
    return struct_pb2.Value(number_value=float(value))


def _from_value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "list_value":
        return [_from_value(element) for element in value.list_value.values]
    if kind == "number_value":
        number = value.number_value
        # Value carries doubles only: a whole number comes back as the int it was written as.
        return int(number) if number.is_integer() and abs(number) < 2**53 else number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None


# -- built-in features -----------------------------------------------------------------------

_ORDER = {"event_types": ("track",), "event_names": ("Order Completed",)}
_BEHAVIOUR = {"event_types": ("track", "page", "screen")}
# Segment recommends "Object Action" names ("Survey Answered"); snake_case is common too.
_SURVEY = {"event_types": ("track",), "event_names": ("Survey Answered", "survey_answered")}
# context.device.type: Segment's mobile libraries send "ios"/"android"; server-side sources
# usually send a category as Google Analytics' deviceCategory does.
_MOBILE_DEVICES = ("mobile", "phone", "smartphone", "ios", "android")
_TABLET_DEVICES = ("tablet",)
_DESKTOP_DEVICES = ("desktop", "computer")
# context.os.name as Segment's iOS and Android libraries report it; web events come from
# analytics.js (analytics-next reports that name too), which sends no os.
_IOS_NAMES = ("iOS", "iPadOS", "iPhone OS")
_ANDROID_NAMES = ("Android",)
_WEB_LIBRARIES = ("analytics.js", "analytics-next")


def _builtin(name: str, description: str, **fields: Any) -> FeatureDefinition:
    return FeatureDefinition.model_validate(
        {"name": name, "description": description, "builtin": True, **fields}
    )


def _among(path: str, values: tuple[str, ...]) -> dict[str, Any]:
    return {"property": path, "operator": Operator.IN, "value": values}


def _share(
    kind: str, description: str, helper: str, match: dict[str, Any]
) -> tuple[FeatureDefinition, FeatureDefinition]:
    """A hidden count of the behavioural events matching ``match`` over 90 days, and its share
    of all of them (``events_90d``)."""
    return (
        _builtin(
            helper,
            f"Behavioural events from {description} in the last 90 days (helper).",
            aggregation=Aggregation.COUNT,
            **_BEHAVIOUR,
            filters=(match,),
            window_days=90,
            hidden=True,
        ),
        _builtin(
            f"{kind}_event_share_90d",
            f"Share of the last 90 days' behavioural events that came from {description}; "
            "null without events.",
            expression=f"{helper} / events_90d",
        ),
    )


BUILTINS: Final[tuple[FeatureDefinition, ...]] = (
    # RFM: recency, frequency and monetary value of Segment e-commerce orders.
    _builtin(
        "recency_days",
        "Days since the latest completed order (RFM recency); null before the first order.",
        aggregation=Aggregation.DAYS_SINCE,
        **_ORDER,
    ),
    _builtin(
        "frequency_365d",
        "Completed orders in the last 365 days (RFM frequency).",
        aggregation=Aggregation.COUNT,
        **_ORDER,
        window_days=365,
    ),
    _builtin(
        "monetary_365d",
        "Sum of the orders' revenue in the last 365 days (RFM monetary value); null without "
        "an order carrying a numeric revenue.",
        aggregation=Aggregation.SUM,
        **_ORDER,
        property="revenue",
        window_days=365,
    ),
    _builtin(
        "orders_30d",
        "Completed orders in the last 30 days.",
        aggregation=Aggregation.COUNT,
        **_ORDER,
        window_days=30,
    ),
    _builtin(
        "orders_90d",
        "Completed orders in the last 90 days.",
        aggregation=Aggregation.COUNT,
        **_ORDER,
        window_days=90,
    ),
    _builtin(
        "revenue_90d",
        "Sum of the orders' revenue in the last 90 days.",
        aggregation=Aggregation.SUM,
        **_ORDER,
        property="revenue",
        window_days=90,
    ),
    _builtin(
        "avg_order_value_lifetime",
        "Mean revenue of the completed orders carrying a numeric revenue, lifetime.",
        aggregation=Aggregation.AVG,
        **_ORDER,
        property="revenue",
    ),
    _builtin(
        "orders_lifetime",
        "Completed orders, lifetime.",
        aggregation=Aggregation.COUNT,
        **_ORDER,
    ),
    _builtin(
        "first_order_days",
        "Days since the first completed order; null before it.",
        aggregation=Aggregation.DAYS_SINCE_FIRST,
        **_ORDER,
    ),
    _builtin(
        "purchase_cadence_days",
        "Mean days between consecutive orders: the span from the first to the latest order "
        "over the number of gaps; null with fewer than two orders.",
        expression="(first_order_days - recency_days) / (orders_lifetime - 1)",
    ),
    # Engagement.
    _builtin(
        "tenure_days",
        "Days since the profile's earliest event of any kind (records included).",
        aggregation=Aggregation.DAYS_SINCE_FIRST,
    ),
    _builtin(
        "events_30d",
        "Behavioural events (track, page, screen) in the last 30 days.",
        aggregation=Aggregation.COUNT,
        **_BEHAVIOUR,
        window_days=30,
    ),
    _builtin(
        "events_90d",
        "Behavioural events (track, page, screen) in the last 90 days.",
        aggregation=Aggregation.COUNT,
        **_BEHAVIOUR,
        window_days=90,
    ),
    _builtin(
        "page_views_30d",
        "Page views in the last 30 days.",
        aggregation=Aggregation.COUNT,
        event_types=("page",),
        window_days=30,
    ),
    _builtin(
        "distinct_products_viewed_90d",
        "Distinct product_id values of Product Viewed events in the last 90 days.",
        aggregation=Aggregation.DISTINCT_COUNT,
        event_types=("track",),
        event_names=("Product Viewed",),
        property="product_id",
        window_days=90,
    ),
    # Device mix, from context.device.type.
    *_share(
        "mobile",
        "phones",
        "mobile_events_90d",
        _among("context.device.type", _MOBILE_DEVICES),
    ),
    *_share(
        "tablet", "tablets", "tablet_events_90d", _among("context.device.type", _TABLET_DEVICES)
    ),
    *_share(
        "desktop",
        "desktop computers",
        "desktop_events_90d",
        _among("context.device.type", _DESKTOP_DEVICES),
    ),
    # Platform mix, from context.os.name (apps) and context.library.name (web).
    *_share("ios", "iOS apps", "ios_events_90d", _among("context.os.name", _IOS_NAMES)),
    *_share(
        "android",
        "Android apps",
        "android_events_90d",
        _among("context.os.name", _ANDROID_NAMES),
    ),
    *_share(
        "web",
        "the web (analytics.js)",
        "web_events_90d",
        _among("context.library.name", _WEB_LIBRARIES),
    ),
    # Satisfaction surveys: Survey Answered events with a `survey` kind and a numeric `score`.
    _builtin(
        "nps_latest",
        "Score (0 to 10) of the latest NPS survey answer.",
        aggregation=Aggregation.LAST,
        **_SURVEY,
        filters=({"property": "survey", "operator": Operator.EQ, "value": "nps"},),
        property="score",
        value_type=ValueType.DOUBLE,
    ),
    _builtin(
        "nps_avg_lifetime",
        "Mean score of the NPS survey answers, lifetime (helper).",
        aggregation=Aggregation.AVG,
        **_SURVEY,
        filters=({"property": "survey", "operator": Operator.EQ, "value": "nps"},),
        property="score",
        hidden=True,
    ),
    _builtin(
        "nps_answers_lifetime",
        "NPS survey answers carrying a score, lifetime (helper).",
        aggregation=Aggregation.COUNT,
        **_SURVEY,
        filters=(
            {"property": "survey", "operator": Operator.EQ, "value": "nps"},
            {"property": "score", "operator": Operator.EXISTS},
        ),
        hidden=True,
    ),
    _builtin(
        "nps_trend",
        "The latest NPS score minus the mean of the person's earlier NPS scores: positive when "
        "they are warming up; null until they have answered twice. Computed as (latest - mean "
        "of all) * n / (n - 1), which equals it.",
        expression="(nps_latest - nps_avg_lifetime) * nps_answers_lifetime"
        " / (nps_answers_lifetime - 1)",
    ),
    _builtin(
        "csat_latest",
        "Score of the latest CSAT survey answer.",
        aggregation=Aggregation.LAST,
        **_SURVEY,
        filters=({"property": "survey", "operator": Operator.EQ, "value": "csat"},),
        property="score",
        value_type=ValueType.DOUBLE,
    ),
)
"""The features every deployment has: RFM and order history for a retailer following
Segment's e-commerce spec (``Order Completed`` with ``revenue``), engagement, device and
platform mix, and NPS/CSAT from ``Survey Answered`` events. Lifetime value (BG/NBD and
Gamma-Gamma) is computed by :mod:`.clv`, not by these aggregations."""


# -- sources and the feature set -------------------------------------------------------------

Predicate: TypeAlias = Callable[[Any], bool]


class Source:
    """One aggregate input: the events of some types and names passing some filters, with the
    property read from them (None for counts and recency). Every definition with the same
    inputs reads the same source, so an event updates it once."""

    __slots__ = (
        "_tests",
        "definitions",
        "event_names",
        "event_types",
        "filters",
        "keeps_numbers",
        "keeps_sketch",
        "key",
        "max_window_days",
        "path",
    )

    def __init__(
        self,
        key: str,
        event_types: tuple[str, ...],
        event_names: tuple[str, ...],
        filters: tuple[PropertyFilter, ...],
        path: PropertyPath | None,
        definitions: tuple[FeatureDefinition, ...],
    ) -> None:
        self.key = key
        """Stable id of the inputs (the same in every feature set and process)."""
        self.event_types = event_types
        self.event_names = event_names
        self.filters = filters
        self.path = path
        self.definitions = definitions
        """The definitions that read this source."""
        windows = [d.window_days for d in definitions if d.window_days is not None]
        self.max_window_days: int | None = max(windows) if windows else None
        """The longest window read; None when only lifetime values are read (no day cells)."""
        self.keeps_numbers = any(d.aggregation in NUMERIC for d in definitions)
        """Whether some definition reads the property as a number (sum, avg, min, max)."""
        self.keeps_sketch = any(d.aggregation is Aggregation.DISTINCT_COUNT for d in definitions)
        """Whether some definition counts distinct values."""
        self._tests: tuple[tuple[PropertyPath, Predicate], ...] = tuple(
            (f.path, f.predicate) for f in filters
        )

    def accepts(self, event: FeatureEvent) -> bool:
        """Whether ``event`` passes the filters (its type and name are checked by the index
        of :meth:`FeatureSet.sources_for`, or by :meth:`matches`)."""
        return all(test(path.read(event)) for path, test in self._tests)

    def matches(self, event: FeatureEvent) -> bool:
        """Whether ``event`` is one of this source's events."""
        return (
            (not self.event_types or event.type in self.event_types)
            and (not self.event_names or event.name in self.event_names)
            and self.accepts(event)
        )

    def __repr__(self) -> str:
        return f"Source({self.key}, {[d.name for d in self.definitions]})"


@dataclass(frozen=True, slots=True)
class ReadingPlan:
    """The sources that admit events of one type and name, with each distinct property path
    they test or aggregate read once per event: the streaming state's hot path."""

    sources: tuple[Source, ...]
    paths: tuple[PropertyPath, ...]
    """The paths to read, each once."""
    steps: tuple[tuple[Source, tuple[tuple[int, Predicate], ...], int], ...]
    """Per source: its filters as (index in ``paths``, predicate), and the index of the
    aggregated property's path (-1 without one)."""

    @classmethod
    def of(cls, sources: tuple[Source, ...]) -> ReadingPlan:
        """The plan of ``sources``."""
        index: dict[PropertyPath, int] = {}

        def position(path: PropertyPath) -> int:
            return index.setdefault(path, len(index))

        steps = tuple(
            (
                source,
                tuple((position(f.path), f.predicate) for f in source.filters),
                -1 if source.path is None else position(source.path),
            )
            for source in sources
        )
        return cls(sources, tuple(index), steps)


def source_spec(definition: FeatureDefinition) -> str:
    """Canonical JSON of the inputs of an aggregated definition: equal for definitions that
    must share a source, whatever the order of their types, names and filters."""
    filters = sorted(
        json.dumps([f.path.text, f.operator.value, f.value], sort_keys=True, separators=(",", ":"))
        for f in definition.filters
    )
    path = definition.path
    return json.dumps(
        {
            "types": sorted(definition.event_types),
            "names": sorted(definition.event_names),
            "filters": filters,
            "property": None if path is None else path.text,
        },
        sort_keys=True,
        separators=(",", ":"),
    )


@dataclass(frozen=True, slots=True)
class ValuePlan:
    """What :meth:`FeatureSet.value_plan` returns."""

    sources: tuple[tuple[Source, tuple[FeatureDefinition, ...]], ...]
    derived: tuple[FeatureDefinition, ...]
    names: tuple[str, ...]


class FeatureSet:
    """The definitions in force: the built-ins and the given ones, the latest version of each
    name, checked as a whole (unknown or cyclic references of derived features, two different
    definitions of one version), in evaluation order, with their sources.

    Violations name the given definitions as ``definitions[i]``, in the order given.
    """

    def __init__(
        self, definitions: Iterable[FeatureDefinition] = (), *, builtins: bool = True
    ) -> None:
        given = list(definitions)
        candidates = [(f"builtins[{i}]", d) for i, d in enumerate(BUILTINS if builtins else ())]
        candidates += [(f"definitions[{i}]", d) for i, d in enumerate(given)]
        latest, where = _latest_versions(candidates)
        self._where = where
        self.definitions: tuple[FeatureDefinition, ...] = _evaluation_order(latest, where)
        """Every definition in force: aggregated ones first, derived ones after their inputs."""
        self._by_name = {d.name: d for d in self.definitions}
        self.visible: tuple[FeatureDefinition, ...] = tuple(
            d for d in self.definitions if not d.hidden
        )
        """The definitions served by default (not hidden)."""
        self.sources: tuple[Source, ...] = _sources(self.definitions)
        self._source_of = {d.name: s for s in self.sources for d in s.definitions}
        self._plans: dict[tuple[str, str], ReadingPlan] = {}
        self._value_plans: dict[tuple[str, ...] | None, ValuePlan] = {}
        self._affected: dict[frozenset[str], tuple[str, ...]] = {}

    def __iter__(self) -> Iterator[FeatureDefinition]:
        return iter(self.definitions)

    def __len__(self) -> int:
        return len(self.definitions)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> FeatureDefinition:
        return self._by_name[name]

    def get(self, name: str, default: FeatureDefinition | None = None) -> FeatureDefinition | None:
        """The definition in force named ``name``, or ``default``."""
        return self._by_name.get(name, default)

    def source_of(self, name: str) -> Source:
        """The source an aggregated feature reads (KeyError for a derived one)."""
        return self._source_of[name]

    def sources_for(self, event_type: str, event_name: str) -> tuple[Source, ...]:
        """The sources whose types and names admit an event of this type and name; their
        filters still have to be checked (:meth:`Source.accepts`)."""
        return self.plan_for(event_type, event_name).sources

    def plan_for(self, event_type: str, event_name: str) -> ReadingPlan:
        """How to read an event of this type and name for every source that admits it, built
        on first use and kept."""
        key = (event_type, event_name)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = ReadingPlan.of(
                tuple(
                    s
                    for s in self.sources
                    if (not s.event_types or event_type in s.event_types)
                    and (not s.event_names or event_name in s.event_names)
                )
            )
        return plan

    def value_plan(self, names: Iterable[str] | None = None) -> ValuePlan:
        """How to compute ``names`` (the visible features when None): the sources to read
        with their aggregated definitions, the derived ones in order, and the names asked
        for. Built once per set of names and kept: reads ask for the same sets again and
        again."""
        key = None if names is None else tuple(names)
        plan = self._value_plans.get(key)
        if plan is None:
            needed = self.closure(key)
            grouped: dict[str, tuple[Source, list[FeatureDefinition]]] = {}
            for definition in needed:
                if not definition.derived:
                    source = self.source_of(definition.name)
                    grouped.setdefault(source.key, (source, []))[1].append(definition)
            plan = ValuePlan(
                sources=tuple((source, tuple(defs)) for source, defs in grouped.values()),
                derived=tuple(d for d in needed if d.derived),
                names=tuple(d.name for d in self.resolve(key)),
            )
            if len(self._value_plans) < 1024:  # bounded: callers could ask for any subset
                self._value_plans[key] = plan
        return plan

    def affected_names(self, source_keys: frozenset[str]) -> tuple[str, ...]:
        """The visible features an event read by these sources can change: their own, and the
        derived ones that read them (directly or not). Kept per set of sources."""
        found = self._affected.get(source_keys)
        if found is None:
            changed = {
                d.name
                for d in self.definitions
                if not d.derived and self._source_of[d.name].key in source_keys
            }
            for definition in self.definitions:  # evaluation order: inputs come first
                if definition.derived and changed & set(references(definition.tree)):
                    changed.add(definition.name)
            found = tuple(d.name for d in self.visible if d.name in changed)
            if len(self._affected) < 4096:
                self._affected[source_keys] = found
        return found

    def closure(self, names: Iterable[str] | None = None) -> tuple[FeatureDefinition, ...]:
        """The definitions needed to compute ``names`` (the visible features when None): those
        features and, recursively, what their expressions read, in evaluation order."""
        targets = self.resolve(names)
        needed = {d.name for d in targets}
        pending = [d for d in targets if d.derived]
        while pending:
            for name in references(pending.pop().tree):
                if name not in needed:
                    needed.add(name)
                    if self._by_name[name].derived:
                        pending.append(self._by_name[name])
        return tuple(d for d in self.definitions if d.name in needed)

    def resolve(self, names: Iterable[str] | None = None) -> tuple[FeatureDefinition, ...]:
        """The definitions of ``names`` in the order given (the visible ones when None);
        InvalidArgument naming ``names[i]`` for an unknown name."""
        if names is None:
            return self.visible
        wanted = list(names)
        unknown = [
            FieldViolation(f"names[{i}]", f"no feature named {name!r}")
            for i, name in enumerate(wanted)
            if name not in self._by_name
        ]
        if unknown:
            raise invalid(unknown)
        return tuple(self._by_name[name] for name in wanted)


def _latest_versions(
    candidates: list[tuple[str, FeatureDefinition]],
) -> tuple[list[FeatureDefinition], dict[str, str]]:
    """The latest version of each name (in order of first appearance) and where each came
    from; two different definitions of one name and version are a violation."""
    chosen: dict[str, tuple[str, FeatureDefinition]] = {}
    violations: list[FieldViolation] = []
    for where, definition in candidates:
        current = chosen.get(definition.name)
        if current is None or definition.version > current[1].version:
            chosen[definition.name] = (where, definition)
        elif definition.version == current[1].version and definition != current[1]:
            violations.append(
                FieldViolation(
                    f"{where}.version",
                    f"{definition.name} version {definition.version} is already defined "
                    f"differently ({current[0]}); a change needs a new version",
                )
            )
    if violations:
        raise invalid(violations)
    return [d for _, d in chosen.values()], {d.name: w for w, d in chosen.values()}


def _evaluation_order(
    definitions: list[FeatureDefinition], where: dict[str, str]
) -> tuple[FeatureDefinition, ...]:
    """Aggregated definitions, then derived ones each after everything it reads; violations
    for references to unknown or string-valued features and for cycles."""
    by_name = {d.name: d for d in definitions}
    violations: list[FieldViolation] = []
    for definition in definitions:
        if not definition.derived:
            continue
        for name in references(definition.tree):
            target = by_name.get(name)
            if target is None:
                problem = f"unknown feature {name!r}"
            elif target.result_type is ValueType.STRING:
                problem = f"{name!r} has string values; expressions need numbers"
            else:
                continue
            violations.append(FieldViolation(f"{where[definition.name]}.expression", problem))
    if violations:
        raise invalid(violations)
    ordered = [d for d in definitions if not d.derived]
    state: dict[str, str] = {}  # name -> "visiting" | "done"

    def visit(definition: FeatureDefinition, trail: list[str]) -> None:
        mark = state.get(definition.name)
        if mark == "done":
            return
        if mark == "visiting":
            cycle = [*trail[trail.index(definition.name) :], definition.name]
            for name in dict.fromkeys(cycle[:-1]):
                violations.append(
                    FieldViolation(
                        f"{where[name]}.expression", f"depends on itself: {' -> '.join(cycle)}"
                    )
                )
            return
        state[definition.name] = "visiting"
        for name in references(definition.tree):
            if by_name[name].derived:
                visit(by_name[name], [*trail, definition.name])
        state[definition.name] = "done"
        ordered.append(definition)

    for definition in definitions:
        if definition.derived:
            visit(definition, [])
    if violations:
        raise invalid(_unique(violations))
    return tuple(ordered)


def _unique(violations: list[FieldViolation]) -> list[FieldViolation]:
    return list(dict.fromkeys(violations))


def _sources(definitions: Iterable[FeatureDefinition]) -> tuple[Source, ...]:
    grouped: dict[str, list[FeatureDefinition]] = {}
    for definition in definitions:
        if not definition.derived:
            grouped.setdefault(source_spec(definition), []).append(definition)
    sources = []
    for spec, members in grouped.items():
        first = members[0]
        sources.append(
            Source(
                key=xxhash.xxh64_hexdigest(spec.encode()),
                event_types=tuple(sorted(first.event_types)),
                event_names=tuple(sorted(first.event_names)),
                filters=first.filters,
                path=first.path,
                definitions=tuple(members),
            )
        )
    return tuple(sources)
