"""The segment expression language: who belongs to a segment, checked once, then fast to test.

A segment's expression (``Segment.expression`` in the contract) is a condition over a profile::

    scores.churn > 0.7 and features.orders_90d >= 1 and consent.email

Names
    ``traits.<path>``
        A trait; the path may be dotted to reach into nested objects (``traits.address.city``).
        Traits are dynamically typed, so any path is accepted. Path parts are ASCII letters,
        digits and ``_``.
    ``features.<name>``
        A feature's value: a number (``double`` or ``int64`` features) or a string.
    ``scores.<model>``
        The champion score of a model, a number from 0 to 1.
    ``clusters.<clustering>``
        The profile's cluster in a clustering, compared either with its persona label
        (``clusters.behaviour == "Lapsed customers"``) or with its integer cluster id
        (``clusters.behaviour == 3``). Cluster ids and personas have no order: only ``==``,
        ``!=`` and ``in`` apply.
    ``consent.<purpose>``
        True when the person granted the purpose, false otherwise (never missing).
    ``identifiers.<type>``
        True when the profile has at least one identifier of that type (never missing).

Values are numbers (``3``, ``-0.5``, ``1e3``), strings in single or double quotes (escapes
``\\\\``, ``\\"``, ``\\'``, ``\\n`` and ``\\t``) and ``true`` / ``false``. Operators, loosest
first: ``or``; ``and``; ``not``; then the comparisons ``==``, ``!=``, ``<``, ``<=``, ``>``,
``>=``, ``in [...]`` and ``not in [...]``; parentheses group. So ``not a or b and c`` reads
``(not a) or (b and c)``. Keywords are lower case. There is no arithmetic: a quantity worth
computing is worth a derived feature, where every engine computes it the same way.

Types are checked when the segment is created or updated, against a :class:`Catalog` of the
features, models and clusterings that exist: an unknown name, a number compared with a string,
an ordering of booleans, a bare number used as a condition, an ``in`` list mixing types, are
all refused with the column of the problem (``at column 17: unknown feature 'orderz_90d'``).
Comparing two names is allowed when their types agree (``features.orders_30d >
features.orders_prev_30d``). A bare name is a condition only when it is boolean
(``consent.email``, ``identifiers.phone``) or a trait; a bare trait is true when the trait is
present and truthy: not null, ``false``, ``0``, ``""``, ``[]`` or ``{}``.

Missing values: a comparison that reads a missing value (absent or null) is false, whatever the
operator, ``!=`` and ``not in`` included. A trait value of another type than the value it is
compared with (the string ``"30"`` against the number ``30``, a list, an object) counts as
missing too. ``and``, ``or`` and ``not`` are then ordinary two-valued logic: this is the
SQL-like simplification of three-valued logic where unknown collapses to false at the
comparison, so ``not (features.x > 1)`` is *true* for a profile without ``x``; write
``features.x <= 1`` to ask for a value that is at most 1. Numbers compare by value (an
``int64`` feature equals ``1.0``); ``true`` and ``false`` are not numbers; strings compare
exactly and case-sensitively, ``<`` and friends in code point order.

Speed: a checked expression is translated into the source of one small Python function (the
view's dictionaries bound to locals, every constant a Python literal, ``in`` lists frozensets,
``and`` and ``or`` short-circuiting as Python's own), which is compiled once: about half a
microsecond per profile for the example above. The user's text never reaches ``compile``:
only the source generated from the checked tree does, with every name and string written by
``repr``, and it runs without builtins.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final, NoReturn, TypeAlias

from profilemesh.services.activation.profile_view import ProfileView
from profilemesh.shared.errors import InvalidArgument

MAX_EXPRESSION_LENGTH: Final = 4000
MAX_DEPTH: Final = 64
"""Parentheses and ``not`` nested deeper than this are refused: no real audience needs it,
and it keeps parsing and compiling far from Python's recursion limits."""
NAMESPACES: Final = ("traits", "features", "scores", "clusters", "consent", "identifiers")
FEATURE_TYPES: Final = frozenset({"double", "int64", "string"})
KEYWORDS: Final = frozenset({"and", "or", "not", "in", "true", "false"})
ORDERINGS: Final = frozenset({"<", "<=", ">", ">="})
_MIRRORED: Final[Mapping[str, str]] = {
    "==": "==",
    "!=": "!=",
    "<": ">",
    "<=": ">=",
    ">": "<",
    ">=": "<=",
}
"""The operator that says the same with its operands swapped (``1 < x`` is ``x > 1``)."""


@dataclass(frozen=True)
class Catalog:
    """What names exist and their types, for checking expressions when they are created.

    Traits, consent purposes and identifier types are open-ended: any name is accepted
    (traits are dynamically typed; consent and identifiers are booleans).
    """

    features: Mapping[str, str] = field(default_factory=dict)
    """Feature name -> its value type: ``double``, ``int64`` or ``string``."""
    models: frozenset[str] = frozenset()
    """Models with a champion score (numbers from 0 to 1)."""
    clusterings: frozenset[str] = frozenset()
    """Clusterings whose clusters profiles are assigned to."""

    def __post_init__(self) -> None:
        for name, value_type in self.features.items():
            if value_type not in FEATURE_TYPES:
                raise ValueError(
                    f"feature {name!r} has type {value_type!r}; one of {sorted(FEATURE_TYPES)}"
                )


class Kind(StrEnum):
    """What a name or a value is, for type checking."""

    NUMBER = "number"
    STRING = "string"
    BOOLEAN = "boolean"
    CLUSTER = "cluster"
    """A cluster: compares with a whole number (its id) or a string (its persona)."""
    TRAIT = "trait"
    """Dynamically typed: compares with anything; a mismatch at run time counts as missing."""


# -- the tree --------------------------------------------------------------------------------

# ``column`` is the offset of the node's first character in the text (0-based); messages show
# it 1-based.


@dataclass(frozen=True, slots=True)
class Name:
    """A name such as ``features.orders_90d`` or ``traits.address.city``."""

    parts: tuple[str, ...]
    column: int

    @property
    def text(self) -> str:
        """The name as written."""
        return ".".join(self.parts)


@dataclass(frozen=True, slots=True)
class Literal:
    """A number (always a float), a string or a boolean, with the text it was written as."""

    value: float | str | bool
    text: str
    column: int

    @property
    def kind(self) -> Kind:
        """The literal's type."""
        if isinstance(self.value, bool):
            return Kind.BOOLEAN
        return Kind.STRING if isinstance(self.value, str) else Kind.NUMBER


@dataclass(frozen=True, slots=True)
class Compare:
    """``name <op> value`` or ``name <op> name``: a written ``value <op> name`` is stored
    mirrored, so that the left is always a name."""

    op: str
    left: Name
    right: Name | Literal
    column: int
    """Of the operator."""


@dataclass(frozen=True, slots=True)
class Member:
    """``name in [values]``, or ``not in`` when ``negated``."""

    operand: Name
    values: tuple[Literal, ...]
    negated: bool
    column: int
    """Of ``in`` (or of ``not`` in ``not in``)."""


@dataclass(frozen=True, slots=True)
class Not:
    """``not operand``."""

    operand: Condition
    column: int


@dataclass(frozen=True, slots=True)
class Logical:
    """``and`` or ``or`` of two or more conditions."""

    op: str
    operands: tuple[Condition, ...]


Condition: TypeAlias = Name | Literal | Compare | Member | Not | Logical


class _Problem(Exception):
    """What is wrong and where; :func:`parse_segment` turns it into InvalidArgument."""

    def __init__(self, column: int, message: str) -> None:
        super().__init__(message)
        self.column = column
        self.message = message


def _fail(column: int, message: str) -> NoReturn:
    raise _Problem(column, message)


# -- tokens ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Token:
    """One lexical unit: ``kind`` is name, keyword, number, string, operator, punctuation or
    end; ``value`` is the decoded number or string."""

    kind: str
    text: str
    column: int
    value: float | str | None = None


_LEXEME: Final = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<number>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)
    | (?P<operator>==|!=|<=|>=|<|>)
    | (?P<punctuation>[()\[\],-])
    """,
    re.VERBOSE | re.ASCII,
)
_ESCAPES: Final[Mapping[str, str]] = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t"}
_HINTS: Final[Mapping[str, str]] = {
    "=": "use == to compare",
    "&": "use and",
    "|": "use or",
    "!": "use not (or != to compare)",
    ".": "a name needs a part after each dot",
}


def tokenize(text: str) -> list[Token]:
    """The tokens of ``text``, ending with an ``end`` token; a problem names its column."""
    tokens: list[Token] = []
    position = 0
    while position < len(text):
        if text[position] in "\"'":
            value, end = _read_string(text, position)
            tokens.append(Token("string", text[position:end], position, value))
            position = end
            continue
        match = _LEXEME.match(text, position)
        if match is None:
            _unexpected_character(text, position)
        kind = match.lastgroup
        lexeme = match.group()
        if kind == "number":
            tokens.append(_number(text, match))
        elif kind == "name":
            if text.startswith(".", match.end()):
                _fail(match.end(), f"expected a name part after {lexeme + '.'!r}")
            tokens.append(Token("keyword" if lexeme in KEYWORDS else "name", lexeme, position))
        elif kind != "space":
            tokens.append(Token(kind or "", lexeme, position))
        position = match.end()
    tokens.append(Token("end", "", len(text)))
    return tokens


def _unexpected_character(text: str, position: int) -> NoReturn:
    character = text[position]
    if text.startswith("&&", position) or text.startswith("||", position):
        character = text[position : position + 2]
    hint = _HINTS.get(character[0])
    _fail(position, f"unexpected {character!r}" + (f": {hint}" if hint else ""))


def _number(text: str, match: re.Match[str]) -> Token:
    lexeme = match.group()
    if match.end() < len(text) and (text[match.end()].isalnum() or text[match.end()] in "._"):
        _fail(match.start(), f"malformed number {lexeme + text[match.end()]!r}")
    value = float(lexeme)
    if value == float("inf"):
        _fail(match.start(), f"number {lexeme} is too large")
    return Token("number", lexeme, match.start(), value)


def _read_string(text: str, start: int) -> tuple[str, int]:
    """The decoded string literal opening at ``start`` and the offset after its closing
    quote."""
    quote = text[start]
    characters: list[str] = []
    position = start + 1
    while position < len(text):
        character = text[position]
        if character == quote:
            return "".join(characters), position + 1
        if character == "\n":
            break
        if character == "\\":
            escaped = _ESCAPES.get(text[position + 1 : position + 2])
            if escaped is None:
                _fail(position, f"unknown escape {text[position : position + 2]} in a string")
            characters.append(escaped)
            position += 2
            continue
        characters.append(character)
        position += 1
    _fail(start, "string not closed on its line")


# -- syntax ----------------------------------------------------------------------------------


class _Parser:
    """Recursive descent over the tokens, one method per precedence level:
    or < and < not < comparison < operand."""

    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens
        self.index = 0
        self.depth = 0

    def parse(self) -> Condition:
        if self.peek().kind == "end":
            _fail(0, "the expression is empty")
        condition = self.disjunction()
        token = self.peek()
        if token.kind != "end":
            if token.text == ")":
                _fail(token.column, "')' without a matching '('")
            _fail(token.column, f"expected and, or or the end, found {_describe(token)}")
        return condition

    def peek(self, ahead: int = 0) -> Token:
        return self.tokens[min(self.index + ahead, len(self.tokens) - 1)]

    def advance(self) -> Token:
        token = self.tokens[self.index]
        if token.kind != "end":
            self.index += 1
        return token

    def at_keyword(self, word: str, ahead: int = 0) -> bool:
        token = self.peek(ahead)
        return token.kind == "keyword" and token.text == word

    def enter(self, token: Token) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            _fail(token.column, f"nested more than {MAX_DEPTH} levels deep")

    def disjunction(self) -> Condition:
        operands = [self.conjunction()]
        while self.at_keyword("or"):
            self.advance()
            operands.append(self.conjunction())
        return operands[0] if len(operands) == 1 else Logical("or", tuple(operands))

    def conjunction(self) -> Condition:
        operands = [self.negation()]
        while self.at_keyword("and"):
            self.advance()
            operands.append(self.negation())
        return operands[0] if len(operands) == 1 else Logical("and", tuple(operands))

    def negation(self) -> Condition:
        if not self.at_keyword("not"):
            return self.comparison()
        token = self.advance()
        self.enter(token)
        operand = self.negation()
        self.depth -= 1
        return Not(operand, token.column)

    def comparison(self) -> Condition:
        start = self.peek()
        left = self.operand()
        token = self.peek()
        negated = self.at_keyword("not") and self.at_keyword("in", 1)
        if token.kind != "operator" and not negated and not self.at_keyword("in"):
            return left
        if not isinstance(left, Name | Literal):
            _fail(token.column, f"{token.text!r} compares names and values, not conditions")
        self.advance()
        if negated:
            self.advance()
            return Member(_named(left, "in"), self.values(), True, token.column)
        if token.text == "in":
            return Member(_named(left, "in"), self.values(), False, token.column)
        right_start = self.peek()
        right = self.operand()
        if not isinstance(right, Name | Literal):
            _fail(right_start.column, f"{token.text!r} compares names and values, not conditions")
        following = self.peek()
        if following.kind == "operator":
            _fail(following.column, "comparisons cannot be chained: join them with and")
        return _comparison(token, left, right, start)

    def operand(self) -> Condition:
        token = self.advance()
        if token.text == "(":
            self.enter(token)
            inner = self.disjunction()
            closing = self.advance()
            if closing.text != ")":
                _fail(closing.column, f"expected ')' or an operator, found {_describe(closing)}")
            self.depth -= 1
            return inner
        if token.kind == "name":
            return Name(tuple(token.text.split(".")), token.column)
        return self.literal(token)

    def literal(self, token: Token, expected: str = "a name, a value or '('") -> Literal:
        if token.kind in ("number", "string"):
            assert token.value is not None
            return Literal(token.value, token.text, token.column)
        if token.kind == "keyword" and token.text in ("true", "false"):
            return Literal(token.text == "true", token.text, token.column)
        if token.text == "-":
            number = self.advance()
            if number.kind == "number" and isinstance(number.value, float):
                return Literal(-number.value, "-" + number.text, token.column)
            _fail(number.column, f"expected a number after '-', found {_describe(number)}")
        _fail(token.column, f"expected {expected}, found {_describe(token)}")

    def values(self) -> tuple[Literal, ...]:
        """A ``[...]`` list of one or more literals (a trailing comma is allowed)."""
        opening = self.advance()
        if opening.text != "[":
            _fail(opening.column, f"'in' needs a list such as [1, 2], found {_describe(opening)}")
        values: list[Literal] = []
        while self.peek().text != "]":
            token = self.advance()
            if token.kind == "end":
                _fail(opening.column, "'[' without a matching ']'")
            if token.kind == "name":
                _fail(token.column, f"a list holds values, not names like {token.text!r}")
            values.append(self.literal(token, "a value"))
            separator = self.peek()
            if separator.text == ",":
                self.advance()
            elif separator.text != "]":
                _fail(separator.column, f"expected ',' or ']', found {_describe(separator)}")
        self.advance()
        if not values:
            _fail(opening.column, "an 'in' list needs at least one value")
        return tuple(values)


def _describe(token: Token) -> str:
    if token.kind == "end":
        return "the end"
    if token.kind == "name" and token.text.lower() in KEYWORDS:
        return f"{token.text!r} (keywords are lower case)"
    return repr(token.text)


def _named(operand: Name | Literal, operator: str) -> Name:
    if isinstance(operand, Literal):
        _fail(
            operand.column, f"the left of {operator!r} must be a name, not the value {operand.text}"
        )
    return operand


def _comparison(token: Token, left: Name | Literal, right: Name | Literal, start: Token) -> Compare:
    if isinstance(left, Name):
        return Compare(token.text, left, right, token.column)
    if isinstance(right, Name):
        return Compare(_MIRRORED[token.text], right, left, token.column)
    _fail(
        start.column,
        f"compares two values ({left.text} {token.text} {right.text}): one side must be a name",
    )


def parse_tree(text: str) -> Condition:
    """The syntax tree of ``text``, not yet checked against a catalog."""
    if len(text) > MAX_EXPRESSION_LENGTH:
        _fail(
            MAX_EXPRESSION_LENGTH,
            f"the expression is {len(text):,} characters long; at most "
            f"{MAX_EXPRESSION_LENGTH:,} are allowed",
        )
    return _Parser(tokenize(text)).parse()


# -- types -----------------------------------------------------------------------------------


def kind_of(name: Name, catalog: Catalog) -> Kind:
    """The type of ``name``; a problem when it names nothing the catalog knows."""
    namespace, *path = name.parts
    if namespace not in NAMESPACES:
        _unknown_namespace(name)
    if not path:
        _fail(name.column, f"{namespace!r} needs a name after it: {namespace}.<name>")
    if namespace == "traits":
        return Kind.TRAIT
    key = ".".join(path)
    if len(path) > 1:
        _fail(name.column, f"{namespace} names have one part, not {key!r}")
    if namespace == "features":
        value_type = catalog.features.get(key)
        if value_type is None:
            _fail(name.column, f"unknown feature {key!r}{_suggestion(key, catalog.features)}")
        return Kind.STRING if value_type == "string" else Kind.NUMBER
    if namespace == "scores":
        if key not in catalog.models:
            _fail(name.column, f"unknown model {key!r}{_suggestion(key, catalog.models)}")
        return Kind.NUMBER
    if namespace == "clusters":
        if key not in catalog.clusterings:
            _fail(name.column, f"unknown clustering {key!r}{_suggestion(key, catalog.clusterings)}")
        return Kind.CLUSTER
    return Kind.BOOLEAN


def _unknown_namespace(name: Name) -> NoReturn:
    word = name.parts[0]
    if len(name.parts) == 1 and word.lower() in KEYWORDS:
        _fail(name.column, f"unknown name {word!r}: write {word.lower()} in lower case")
    _fail(
        name.column,
        f"unknown name {name.text!r}{_suggestion(word, NAMESPACES)}: names start with "
        + ", ".join(f"{namespace}." for namespace in NAMESPACES),
    )


def _suggestion(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check(tree: Condition, catalog: Catalog) -> None:
    """Refuses, naming the column, anything in ``tree`` that is not a well-typed condition over
    the names of ``catalog``."""
    if isinstance(tree, Logical):
        for operand in tree.operands:
            check(operand, catalog)
    elif isinstance(tree, Not):
        check(tree.operand, catalog)
    elif isinstance(tree, Name):
        _check_bare_name(tree, kind_of(tree, catalog))
    elif isinstance(tree, Literal):
        if tree.kind is not Kind.BOOLEAN:
            _fail(tree.column, f"the {tree.kind} {tree.text} is not a condition")
    elif isinstance(tree, Compare):
        _check_compare(tree, catalog)
    else:
        _check_member(tree, catalog)


_EXAMPLES: Final[Mapping[Kind, str]] = {
    Kind.NUMBER: "> 0",
    Kind.STRING: '== "..."',
    Kind.CLUSTER: "== 1",
}


def _check_bare_name(name: Name, kind: Kind) -> None:
    if kind in (Kind.BOOLEAN, Kind.TRAIT):
        return
    _fail(
        name.column,
        f"{name.text} is a {kind}, not a condition: compare it, e.g. {name.text} {_EXAMPLES[kind]}",
    )


def _check_compare(compare: Compare, catalog: Catalog) -> None:
    left = kind_of(compare.left, catalog)
    if isinstance(compare.right, Literal):
        _check_against_value(compare.left, left, compare.op, compare.right, compare.column)
        return
    right = kind_of(compare.right, catalog)
    for name, kind in ((compare.left, left), (compare.right, right)):
        if kind is Kind.CLUSTER:
            _fail(name.column, f"{name.text} compares with a cluster id or a persona, not a name")
    if compare.op in ORDERINGS and Kind.BOOLEAN in (left, right):
        _fail(compare.column, f"true and false have no order: {compare.op!r} does not apply")
    if Kind.TRAIT not in (left, right) and left is not right:
        _fail(
            compare.right.column,
            f"{compare.left.text} is a {left} and {compare.right.text} is a {right}: "
            "they cannot be compared",
        )


def _check_against_value(name: Name, kind: Kind, op: str, value: Literal, column: int) -> None:
    if kind is Kind.CLUSTER:
        if op in ORDERINGS:
            _fail(
                column,
                f"{name.text} is a cluster, whose id and persona have no order: use ==, != or in",
            )
        if value.kind is Kind.BOOLEAN:
            _fail(
                value.column,
                f"{name.text} compares with a cluster id or a persona, not {value.text}",
            )
        if isinstance(value.value, float) and not value.value.is_integer():
            _fail(value.column, f"cluster ids are whole numbers, not {value.text}")
        return
    if op in ORDERINGS and Kind.BOOLEAN in (kind, value.kind):
        _fail(column, f"true and false have no order: {op!r} does not apply")
    if kind is not Kind.TRAIT and kind is not value.kind:
        _fail(
            value.column,
            f"{name.text} is a {kind} and cannot be compared with the {value.kind} {value.text}",
        )


def _check_member(member: Member, catalog: Catalog) -> None:
    kind = kind_of(member.operand, catalog)
    first = member.values[0]
    for value in member.values:
        if value.kind is not first.kind:
            _fail(
                value.column,
                f"an 'in' list holds values of one type: {first.text} is a {first.kind}, "
                f"{value.text} is a {value.kind}",
            )
        _check_against_value(member.operand, kind, "==", value, member.column)


def names(tree: Condition) -> Iterator[Name]:
    """Every name ``tree`` reads, in order of appearance."""
    if isinstance(tree, Name):
        yield tree
    elif isinstance(tree, Logical):
        for operand in tree.operands:
            yield from names(operand)
    elif isinstance(tree, Not):
        yield from names(tree.operand)
    elif isinstance(tree, Compare):
        yield tree.left
        if isinstance(tree.right, Name):
            yield tree.right
    elif isinstance(tree, Member):
        yield tree.operand


# -- compilation -----------------------------------------------------------------------------

_NUMBER: Final = frozenset({int, float})
"""Classes of the values that are numbers: exact classes, so that ``True`` is not one."""
_GUARDS: Final[Mapping[Kind, str]] = {
    Kind.NUMBER: ".__class__ in _NUMBER",
    Kind.STRING: ".__class__ is str",
    Kind.BOOLEAN: ".__class__ is bool",
}
"""The test, appended to a value, that it is of a kind (and therefore not missing)."""
_KINDS: Final[Mapping[type, Kind]] = {
    int: Kind.NUMBER,
    float: Kind.NUMBER,
    str: Kind.STRING,
    bool: Kind.BOOLEAN,
}


def _lookup(value: Any, keys: tuple[str, ...]) -> Any:
    """The value at a nested trait path, or None when some step is absent or not an object."""
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _equatable(left: Any, right: Any) -> bool:
    """Whether two trait values are present and of one kind (number, string or boolean)."""
    kind = _KINDS.get(left.__class__)
    return kind is not None and kind is _KINDS.get(right.__class__)


def _orderable(left: Any, right: Any) -> bool:
    """Whether two trait values are both numbers or both strings."""
    kind = _KINDS.get(left.__class__)
    return kind is not None and kind is not Kind.BOOLEAN and kind is _KINDS.get(right.__class__)


_HELPERS: Final[Mapping[str, object]] = {
    "_NUMBER": _NUMBER,
    "_lookup": _lookup,
    "_equatable": _equatable,
    "_orderable": _orderable,
    "bool": bool,
    "str": str,
}
"""What generated code may use besides the view: passed in as closure variables, which read
faster than globals; the generated module has no builtins at all."""


class _Compiler:
    """Writes the Python source of a checked tree's predicate: one expression whose ``and``,
    ``or`` and ``not`` are Python's own, so that it short-circuits like the language reads."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.temporaries = 0
        self.namespaces: dict[str, None] = {}

    def function(self, tree: Condition) -> str:
        """The source of ``_build(helpers...)``, which returns the predicate."""
        body = self.condition(tree)
        lines = [
            f"def _build({', '.join(_HELPERS)}):",
            "    def segment(view):",
            *(f"        {namespace} = view.{namespace}" for namespace in self.namespaces),
            f"        return {body}",
            "    return segment",
        ]
        return "\n".join(lines) + "\n"

    def condition(self, node: Condition) -> str:
        if isinstance(node, Logical):
            return "(" + f" {node.op} ".join(self.condition(o) for o in node.operands) + ")"
        if isinstance(node, Not):
            return f"(not {self.condition(node.operand)})"
        if isinstance(node, Literal):
            return repr(node.value)
        if isinstance(node, Name):
            read = self.read(node)
            return read if self.kind(node) is Kind.BOOLEAN else f"bool({read})"
        if isinstance(node, Compare):
            if isinstance(node.right, Name):
                return self.compare_names(node.op, node.left, node.right)
            return self.compare_value(node.left, node.op, node.right)
        values = "{" + ", ".join(dict.fromkeys(_constant(v) for v in node.values)) + "}"
        return self.compare_value(
            node.operand, "not in" if node.negated else "in", node.values[0], values
        )

    def compare_value(
        self, name: Name, op: str, value: Literal, constant: str | None = None
    ) -> str:
        """``name <op> value``; ``constant`` replaces the value's source (an ``in`` list)."""
        kind = self.kind(name)
        constant = constant or _constant(value)
        if kind is Kind.CLUSTER:
            # (cluster id, persona): a string is compared with the persona, a number with the id.
            cluster = self.temporary()
            part = f"{cluster}[{1 if value.kind is Kind.STRING else 0}]"
            return f"(({cluster} := {self.read(name)}) is not None and {part} {op} {constant})"
        if kind is Kind.BOOLEAN:
            return f"({self.read(name)} {op} {constant})"
        value_of = self.temporary()
        return f"({self.guard(value_of, name, value.kind)} and {value_of} {op} {constant})"

    def compare_names(self, op: str, left: Name, right: Name) -> str:
        kinds = (self.kind(left), self.kind(right))
        first, second = self.temporary(), self.temporary()
        if kinds == (Kind.TRAIT, Kind.TRAIT):
            test = "_orderable" if op in ORDERINGS else "_equatable"
            operands = f"({first} := {self.read(left)}), ({second} := {self.read(right)})"
            return f"({test}({operands}) and {first} {op} {second})"
        if kinds == (Kind.BOOLEAN, Kind.BOOLEAN):
            return f"({self.read(left)} {op} {self.read(right)})"
        kind = kinds[0] if kinds[0] is not Kind.TRAIT else kinds[1]
        guards = f"{self.guard(first, left, kind)} and {self.guard(second, right, kind)}"
        return f"({guards} and {first} {op} {second})"

    def guard(self, temporary: str, name: Name, kind: Kind) -> str:
        """Reads ``name`` into ``temporary`` and tests that it is present and of ``kind``."""
        return f"({temporary} := {self.read(name)}){_GUARDS[kind]}"

    def read(self, name: Name) -> str:
        """The value of ``name``, or None when missing; a boolean for consent and
        identifiers, which are never missing."""
        namespace, *path = name.parts
        self.namespaces[namespace] = None
        if namespace == "traits" and len(path) > 1:
            return f"_lookup(traits, {tuple(path)!r})"
        if namespace == "consent":
            return f"(consent.get({path[0]!r}) is True)"
        if namespace == "identifiers":
            return f"bool(identifiers.get({path[0]!r}))"
        return f"{namespace}.get({path[0]!r})"

    def kind(self, name: Name) -> Kind:
        return kind_of(name, self.catalog)

    def temporary(self) -> str:
        self.temporaries += 1
        return f"v{self.temporaries}"


def _constant(value: Literal) -> str:
    """Python source of a literal's value (a number is a float, which equals an int cluster id
    or ``int64`` feature of the same value)."""
    return repr(value.value)


def compile_predicate(
    tree: Condition, catalog: Catalog
) -> tuple[Callable[[ProfileView], bool], str]:
    """The predicate of a checked tree, and the Python source it was compiled from."""
    source = _Compiler(catalog).function(tree)
    namespace: dict[str, Any] = {"__builtins__": {}}
    exec(compile(source, "<segment expression>", "exec"), namespace)
    predicate: Callable[[ProfileView], bool] = namespace["_build"](*_HELPERS.values())
    return predicate, source


# -- the public face -------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentExpression:
    """A checked, compiled segment expression. Made by :func:`parse_segment`."""

    text: str
    references: frozenset[str]
    """The names the expression reads (``scores.churn``, ``traits.address.city``): what a
    change must touch to possibly change membership (see :meth:`affected_by`)."""
    predicate: Callable[[ProfileView], bool] = field(repr=False, compare=False)
    """Whether a profile belongs; the same as :meth:`matches` without a method call, for hot
    loops."""
    source: str = field(repr=False, compare=False)
    """The generated Python source, for debugging."""

    def matches(self, profile: ProfileView) -> bool:
        """Whether ``profile`` belongs to the segment."""
        return self.predicate(profile)

    def affected_by(self, changed: Iterable[str]) -> bool:
        """Whether a change to the names ``changed`` (written like :attr:`references`) can
        change membership. A trait path also affects the paths inside it and around it:
        replacing ``traits.address`` changes ``traits.address.city``, and the reverse."""
        for name in changed:
            if name in self.references:
                return True
            if name.startswith("traits.") and any(
                reference.startswith(name + ".") or name.startswith(reference + ".")
                for reference in self.references
            ):
                return True
        return False


def parse_segment(
    text: str, catalog: Catalog, *, field: str = "segment.expression"
) -> SegmentExpression:
    """``text`` checked against ``catalog`` and compiled; InvalidArgument on ``field`` whose
    description starts with the position of the problem (``at column 17: ...``)."""
    try:
        tree = parse_tree(text)
        check(tree, catalog)
    except _Problem as problem:
        description = f"{_position(text, problem.column)}: {problem.message}"
        raise InvalidArgument.for_field(field, description) from None
    predicate, source = compile_predicate(tree, catalog)
    return SegmentExpression(
        text=text,
        references=frozenset(name.text for name in names(tree)),
        predicate=predicate,
        source=source,
    )


def _position(text: str, offset: int) -> str:
    """``at column C`` (1-based), with the line when the text has several."""
    line_start = text.rfind("\n", 0, offset) + 1
    column = offset - line_start + 1
    if "\n" not in text:
        return f"at column {column}"
    return f"at line {text.count(chr(10), 0, offset) + 1}, column {column}"


def evaluate_batch(expression: SegmentExpression, views: Iterable[ProfileView]) -> list[bool]:
    """Whether each of ``views`` belongs, in order."""
    return list(map(expression.predicate, views))
