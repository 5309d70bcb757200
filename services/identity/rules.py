"""Identity rules: which identifier types exist, how far each is trusted, which values never
link, and how traits survive merges. The typed equivalent of the ``IdentityRules`` message.

The defaults follow Segment's identity resolution settings: one ``user_id`` per profile (a second
one means two people, so the merge is refused), up to five emails and phones, loose limits for
device and anonymous ids, and placeholder values (``unknown``, ``null``, the zeroed advertising
id ...) that must never join two people.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import phonenumbers
import yaml
from google.protobuf import json_format

from profilemesh.identity.v1 import identity_rules_pb2, matching_pb2
from profilemesh.services.identity import identifiers as ids
from profilemesh.services.identity.identifiers import Identifier
from profilemesh.services.identity.normalizers import NORMALIZERS, Normalizer, normalizer_named
from profilemesh.shared.errors import FieldViolation, InvalidArgument

_TYPE_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
_E = TypeVar("_E", bound=StrEnum)
DEFAULT_TRAIT = "*"
"""Name of the trait rule that applies to every trait without a rule of its own."""


class LimitPolicy(StrEnum):
    """What happens when a link would give a profile more identifiers of a type than its limit."""

    REFUSE_MERGE = "refuse_merge"
    """The profiles stay apart and the refusal is recorded."""
    DROP_LOWEST_PRIORITY = "drop_lowest_priority"
    """The item's lowest-priority identifiers are left out of the link and recorded."""


class Survivorship(StrEnum):
    """How one trait's value is chosen among the values seen."""

    LATEST = "latest"
    FIRST = "first"
    MOST_FREQUENT = "most_frequent"
    SOURCE_PRIORITY = "source_priority"


_POLICY_TO_PROTO = {
    LimitPolicy.REFUSE_MERGE: identity_rules_pb2.LIMIT_POLICY_REFUSE_MERGE,
    LimitPolicy.DROP_LOWEST_PRIORITY: identity_rules_pb2.LIMIT_POLICY_DROP_LOWEST_PRIORITY,
}
_POLICY_FROM_PROTO = {
    identity_rules_pb2.LIMIT_POLICY_UNSPECIFIED: LimitPolicy.REFUSE_MERGE,
    **{number: policy for policy, number in _POLICY_TO_PROTO.items()},
}
_SURVIVORSHIP_TO_PROTO = {
    Survivorship.LATEST: identity_rules_pb2.SURVIVORSHIP_LATEST,
    Survivorship.FIRST: identity_rules_pb2.SURVIVORSHIP_FIRST,
    Survivorship.MOST_FREQUENT: identity_rules_pb2.SURVIVORSHIP_MOST_FREQUENT,
    Survivorship.SOURCE_PRIORITY: identity_rules_pb2.SURVIVORSHIP_SOURCE_PRIORITY,
}
_SURVIVORSHIP_FROM_PROTO = {
    identity_rules_pb2.SURVIVORSHIP_UNSPECIFIED: Survivorship.LATEST,
    **{number: survivorship for survivorship, number in _SURVIVORSHIP_TO_PROTO.items()},
}


@dataclass(frozen=True, slots=True)
class IdentifierRule:
    """Rule for one identifier type (see ``IdentifierRule`` in identity_rules.proto)."""

    type: str
    priority: int
    """1 is the most trusted; unique across rules."""
    limit: int = 0
    """Most distinct values of this type one profile may hold; 0 is unlimited."""
    on_limit: LimitPolicy = LimitPolicy.REFUSE_MERGE
    normalizer: str = ""
    """A name of :data:`~.normalizers.NORMALIZERS`; empty means the type's default."""
    trait_names: tuple[str, ...] = ()
    """Traits (identify, context traits, record attributes) whose values are also identifiers."""


@dataclass(frozen=True, slots=True)
class TraitRule:
    """Survivorship rule of one trait, or of every trait when ``trait`` is ``"*"``."""

    trait: str
    survivorship: Survivorship = Survivorship.LATEST
    source_priority: tuple[str, ...] = ()
    """For SOURCE_PRIORITY: sources from most to least trusted."""


DEFAULT_IDENTIFIER_RULES: tuple[IdentifierRule, ...] = (
    IdentifierRule(ids.USER_ID, priority=1, limit=1),
    IdentifierRule(ids.EMAIL, priority=2, limit=5, normalizer="email", trait_names=("email",)),
    IdentifierRule(ids.PHONE, priority=3, limit=5, normalizer="e164", trait_names=("phone",)),
    IdentifierRule(ids.CRM_ID, priority=4, limit=20),
    IdentifierRule(ids.ADVERTISING_ID, priority=5, limit=100, normalizer="lowercase"),
    IdentifierRule(ids.DEVICE_ID, priority=6, limit=100),
    IdentifierRule(ids.ANONYMOUS_ID, priority=7, limit=100),
)

DEFAULT_BLOCKED_VALUES: frozenset[str] = frozenset(
    {
        "unknown",
        "null",
        "undefined",
        "none",
        "nil",
        "n/a",
        "0",
        "anonymous",
        "test@example.com",
        # What iOS and Android report as the advertising id when ad tracking is off: shared by
        # every such device in the world.
        "00000000-0000-0000-0000-000000000000",
    }
)


@dataclass(frozen=True)
class Rules:
    """The identity rules of a deployment. Immutable: replacing rules builds a new object.

    Built directly, from YAML (:meth:`from_yaml`) or from the ``IdentityRules`` message
    (:meth:`from_proto`); every constructor validates, raising :class:`InvalidArgument` whose
    field violations name the offending fields.
    """

    identifier_rules: tuple[IdentifierRule, ...] = DEFAULT_IDENTIFIER_RULES
    blocked_values: frozenset[str] = DEFAULT_BLOCKED_VALUES
    max_profiles_per_identifier: int = 20
    """An identifier refused on more distinct profiles than this is blocked; 0 is unlimited."""
    default_region: str = ""
    """ISO 3166-1 alpha-2 region for phone numbers written without a country code."""
    trait_rules: tuple[TraitRule, ...] = ()
    matching: matching_pb2.MatchingSettings | None = field(default=None)
    """Probabilistic matching settings, kept as the message: the matching package reads them."""

    def __post_init__(self) -> None:
        violations = _violations(self)
        if violations:
            raise _invalid(violations)

    # -- lookups -----------------------------------------------------------------------------

    @cached_property
    def _by_type(self) -> dict[str, IdentifierRule]:
        return {rule.type: rule for rule in self.identifier_rules}

    @cached_property
    def _normalizers(self) -> dict[str, Normalizer]:
        return {
            rule.type: normalizer_named(rule.normalizer, rule.type)
            for rule in self.identifier_rules
        }

    @cached_property
    def _blocked(self) -> frozenset[str]:
        # Case-folded so that "NULL" and "Unknown" are blocked too whatever the type's normaliser.
        return frozenset(value.strip().casefold() for value in self.blocked_values)

    @cached_property
    def _trait_rules(self) -> dict[str, TraitRule]:
        return {rule.trait: rule for rule in self.trait_rules}

    @cached_property
    def limits(self) -> dict[str, int]:
        """Type -> per-profile limit, for the types that have one (0, unlimited, left out)."""
        return {rule.type: rule.limit for rule in self.identifier_rules if rule.limit}

    @cached_property
    def identifier_traits(self) -> dict[str, tuple[str, ...]]:
        """Trait name -> identifier types its values become, from every rule's trait_names."""
        by_trait: dict[str, list[str]] = {}
        for rule in sorted(self.identifier_rules, key=lambda r: r.priority):
            for name in rule.trait_names:
                by_trait.setdefault(name, []).append(rule.type)
        return {name: tuple(types) for name, types in by_trait.items()}

    def rule_for(self, identifier_type: str) -> IdentifierRule | None:
        """The rule of a type; None when the type has no rule (its identifiers are ignored)."""
        return self._by_type.get(identifier_type)

    def priority(self, identifier_type: str) -> int:
        """Priority of a type (1 is the most trusted). Raises KeyError without a rule."""
        return self._by_type[identifier_type].priority

    def limit(self, identifier_type: str) -> int:
        """Per-profile limit of a type; 0 is unlimited. Raises KeyError without a rule."""
        return self._by_type[identifier_type].limit

    def normalize(self, identifier_type: str, raw_value: str) -> Identifier | None:
        """The identifier as the graph stores it, or None when the type has no rule or the
        value cannot be normalised (empty, not an email address, not a phone number)."""
        normalizer = self._normalizers.get(identifier_type)
        if normalizer is None:
            return None
        value = normalizer(raw_value, self.default_region)
        return None if value is None else Identifier(identifier_type, value)

    def is_blocked(self, identifier: Identifier) -> bool:
        """Whether the (normalised) value is one of the blocked values, compared case-folded."""
        return identifier.value.casefold() in self._blocked

    def trait_rule(self, trait: str) -> TraitRule:
        """The survivorship rule of a trait: its own, else the ``*`` rule, else LATEST."""
        rules = self._trait_rules
        return rules.get(trait) or rules.get(DEFAULT_TRAIT) or _LATEST

    # -- conversions -------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: Path | str) -> Rules:
        """Rules from a YAML file whose keys are the fields of ``IdentityRules``.

        Keys left out keep their defaults; a list given replaces the default list. Enum values
        are written in lower case (``refuse_merge``, ``most_frequent``). Field violations are
        named from the document root, e.g. ``identifier_rules[1].priority``.
        """
        document = yaml.safe_load(Path(path).read_text()) or {}
        return cls.from_mapping(document)

    @classmethod
    def from_mapping(cls, document: Any, where: str = "") -> Rules:
        """Rules from a plain mapping (parsed YAML or JSON); see :meth:`from_yaml`."""
        violations: list[FieldViolation] = []
        values = _parse_mapping(document, where, violations)
        if violations:
            raise _invalid(violations)
        return _prefixed(lambda: cls(**values), where)

    @classmethod
    def from_proto(
        cls, message: identity_rules_pb2.IdentityRules, where: str = "identity_rules"
    ) -> Rules:
        """Rules from the message, validated; violations are named from ``where`` (the field of
        the request that carried the message), e.g. ``rules.identifier_rules[0].priority``."""
        values: dict[str, Any] = {
            "identifier_rules": tuple(
                IdentifierRule(
                    type=rule.type,
                    priority=rule.priority,
                    limit=rule.limit,
                    on_limit=_POLICY_FROM_PROTO.get(rule.on_limit, LimitPolicy.REFUSE_MERGE),
                    normalizer=rule.normalizer,
                    trait_names=tuple(rule.trait_names),
                )
                for rule in message.identifier_rules
            ),
            "blocked_values": frozenset(message.blocked_values),
            "max_profiles_per_identifier": message.max_profiles_per_identifier,
            "default_region": message.default_region,
            "trait_rules": tuple(
                TraitRule(
                    trait=rule.trait,
                    survivorship=_SURVIVORSHIP_FROM_PROTO.get(
                        rule.survivorship, Survivorship.LATEST
                    ),
                    source_priority=tuple(rule.source_priority),
                )
                for rule in message.trait_rules
            ),
            "matching": _copy(message.matching) if message.HasField("matching") else None,
        }
        return _prefixed(lambda: cls(**values), where)

    def to_proto(self) -> identity_rules_pb2.IdentityRules:
        """The ``IdentityRules`` message (``update_time`` is left for the caller to set)."""
        message = identity_rules_pb2.IdentityRules(
            identifier_rules=[
                identity_rules_pb2.IdentifierRule(
                    type=rule.type,
                    priority=rule.priority,
                    limit=rule.limit,
                    on_limit=_POLICY_TO_PROTO[rule.on_limit],
                    normalizer=rule.normalizer,
                    trait_names=rule.trait_names,
                )
                for rule in self.identifier_rules
            ],
            blocked_values=sorted(self.blocked_values),
            max_profiles_per_identifier=self.max_profiles_per_identifier,
            default_region=self.default_region,
            trait_rules=[
                identity_rules_pb2.TraitRule(
                    trait=rule.trait,
                    survivorship=_SURVIVORSHIP_TO_PROTO[rule.survivorship],
                    source_priority=rule.source_priority,
                )
                for rule in self.trait_rules
            ],
        )
        if self.matching is not None:
            message.matching.CopyFrom(self.matching)
        return message


_LATEST = TraitRule(DEFAULT_TRAIT)


def _copy(message: matching_pb2.MatchingSettings) -> matching_pb2.MatchingSettings:
    # The rules must not change when the caller later mutates its request message.
    copy = matching_pb2.MatchingSettings()
    copy.CopyFrom(message)
    return copy


def _invalid(violations: list[FieldViolation]) -> InvalidArgument:
    summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
    return InvalidArgument(f"invalid identity rules: {summary}", violations=violations)


def _prefixed(build: Callable[[], Rules], where: str) -> Rules:
    """Run ``build`` and name its violations from ``where``."""
    try:
        rules = build()
    except InvalidArgument as error:
        if not where:
            raise
        violations = [FieldViolation(f"{where}.{v.field}", v.description) for v in error.violations]
        raise _invalid(violations) from None
    return rules


def _violations(rules: Rules) -> list[FieldViolation]:
    """Every problem of ``rules``, named by the field paths of ``IdentityRules``."""
    problems: list[FieldViolation] = []

    def bad(path: str, description: str) -> None:
        problems.append(FieldViolation(path, description))

    if not rules.identifier_rules:
        bad("identifier_rules", "at least one identifier rule is required")
    types: dict[str, int] = {}
    priorities: dict[int, int] = {}
    for index, rule in enumerate(rules.identifier_rules):
        path = f"identifier_rules[{index}]"
        if not _TYPE_PATTERN.match(rule.type):
            bad(f"{path}.type", f"must be lower_snake_case, got {rule.type!r}")
        elif rule.type in types:
            bad(
                f"{path}.type",
                f"{rule.type!r} already has a rule (identifier_rules[{types[rule.type]}])",
            )
        else:
            types[rule.type] = index
        if rule.priority < 1:
            bad(f"{path}.priority", "must be at least 1 (1 is the most trusted)")
        elif rule.priority in priorities:
            bad(
                f"{path}.priority",
                f"already used by identifier_rules[{priorities[rule.priority]}]",
            )
        else:
            priorities[rule.priority] = index
        if rule.limit < 0:
            bad(f"{path}.limit", "must be 0 (unlimited) or more")
        if rule.normalizer and rule.normalizer not in NORMALIZERS:
            bad(
                f"{path}.normalizer",
                f"unknown normaliser {rule.normalizer!r}; one of {sorted(NORMALIZERS)}",
            )
        for position, name in enumerate(rule.trait_names):
            if not name:
                bad(f"{path}.trait_names[{position}]", "must not be empty")
    if rules.max_profiles_per_identifier < 0:
        bad("max_profiles_per_identifier", "must be 0 (unlimited) or more")
    if rules.default_region and rules.default_region.upper() not in phonenumbers.SUPPORTED_REGIONS:
        bad("default_region", f"unknown ISO 3166-1 alpha-2 region {rules.default_region!r}")
    traits: dict[str, int] = {}
    for index, trait_rule in enumerate(rules.trait_rules):
        path = f"trait_rules[{index}]"
        if not trait_rule.trait:
            bad(f"{path}.trait", 'must name a trait, or be "*" for the default rule')
        elif trait_rule.trait in traits:
            bad(
                f"{path}.trait",
                f"already has a rule (trait_rules[{traits[trait_rule.trait]}])",
            )
        else:
            traits[trait_rule.trait] = index
        if (
            trait_rule.survivorship is Survivorship.SOURCE_PRIORITY
            and not trait_rule.source_priority
        ):
            bad(f"{path}.source_priority", "SOURCE_PRIORITY needs at least one source")
    return problems


# -- parsing plain mappings (YAML) ---------------------------------------------------------

_TOP_LEVEL = {
    "identifier_rules",
    "blocked_values",
    "max_profiles_per_identifier",
    "default_region",
    "trait_rules",
    "matching",
}


def _path(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _parse_mapping(document: Any, where: str, violations: list[FieldViolation]) -> dict[str, Any]:
    """The keyword arguments of :class:`Rules` read from ``document``; problems appended."""
    if not isinstance(document, Mapping):
        violations.append(FieldViolation(where, "expected a mapping of IdentityRules fields"))
        return {}
    values: dict[str, Any] = {}
    for key in sorted(set(document) - _TOP_LEVEL, key=str):
        violations.append(FieldViolation(_path(where, str(key)), "unknown field"))
    reader = _Reader(violations)
    if "identifier_rules" in document:
        path = _path(where, "identifier_rules")
        values["identifier_rules"] = tuple(
            IdentifierRule(
                type=reader.text(item, "type", f"{path}[{index}]", required=True),
                priority=reader.integer(item, "priority", f"{path}[{index}]", required=True),
                limit=reader.integer(item, "limit", f"{path}[{index}]"),
                on_limit=reader.choice(
                    item, "on_limit", f"{path}[{index}]", LimitPolicy, LimitPolicy.REFUSE_MERGE
                ),
                normalizer=reader.text(item, "normalizer", f"{path}[{index}]"),
                trait_names=reader.texts(item, "trait_names", f"{path}[{index}]"),
            )
            for index, item in enumerate(reader.items(document["identifier_rules"], path))
        )
    if "blocked_values" in document:
        values["blocked_values"] = frozenset(reader.texts(document, "blocked_values", where))
    if "max_profiles_per_identifier" in document:
        values["max_profiles_per_identifier"] = reader.integer(
            document, "max_profiles_per_identifier", where
        )
    if "default_region" in document:
        values["default_region"] = reader.text(document, "default_region", where)
    if "trait_rules" in document:
        path = _path(where, "trait_rules")
        values["trait_rules"] = tuple(
            TraitRule(
                trait=reader.text(item, "trait", f"{path}[{index}]", required=True),
                survivorship=reader.choice(
                    item, "survivorship", f"{path}[{index}]", Survivorship, Survivorship.LATEST
                ),
                source_priority=reader.texts(item, "source_priority", f"{path}[{index}]"),
            )
            for index, item in enumerate(reader.items(document["trait_rules"], path))
        )
    if document.get("matching") is not None:
        try:
            values["matching"] = json_format.ParseDict(
                document["matching"], matching_pb2.MatchingSettings()
            )
        except json_format.ParseError as error:
            violations.append(FieldViolation(_path(where, "matching"), str(error)))
    return values


class _Reader:
    """Reads typed fields out of parsed YAML, recording a violation (and a neutral value) for
    each field of the wrong type, so that one pass reports every problem."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = violations

    def items(self, value: Any, path: str) -> list[Mapping[str, Any]]:
        if not isinstance(value, list):
            self.violations.append(FieldViolation(path, "expected a list"))
            return []
        good: list[Mapping[str, Any]] = []
        for index, item in enumerate(value):
            if isinstance(item, Mapping):
                good.append(item)
            else:
                self.violations.append(FieldViolation(f"{path}[{index}]", "expected a mapping"))
                good.append({})
        return good

    def text(
        self, item: Mapping[str, Any], name: str, where: str, *, required: bool = False
    ) -> str:
        value = item.get(name)
        if value is None:
            if required:
                self.violations.append(FieldViolation(_path(where, name), "required"))
            return ""
        if not isinstance(value, str | int) or isinstance(value, bool):
            self.violations.append(FieldViolation(_path(where, name), "expected a string"))
            return ""
        return str(value)

    def texts(self, item: Mapping[str, Any], name: str, where: str) -> tuple[str, ...]:
        value = item.get(name)
        if value is None:
            return ()
        if not isinstance(value, list):
            self.violations.append(FieldViolation(_path(where, name), "expected a list of strings"))
            return ()
        path = _path(where, name)
        texts: list[str] = []
        for index, element in enumerate(value):
            if isinstance(element, str | int) and not isinstance(element, bool):
                texts.append(str(element))
            else:
                self.violations.append(FieldViolation(f"{path}[{index}]", "expected a string"))
        return tuple(texts)

    def integer(
        self, item: Mapping[str, Any], name: str, where: str, *, required: bool = False
    ) -> int:
        value = item.get(name)
        if value is None:
            if required:
                self.violations.append(FieldViolation(_path(where, name), "required"))
            return 0
        if not isinstance(value, int) or isinstance(value, bool):
            self.violations.append(FieldViolation(_path(where, name), "expected an integer"))
            return 0
        return value

    def choice(
        self, item: Mapping[str, Any], name: str, where: str, enum: type[_E], default: _E
    ) -> _E:
        value = item.get(name)
        if value is None:
            return default
        text = str(value).lower()
        for member in enum:
            # Accept the proto spelling too (LIMIT_POLICY_REFUSE_MERGE, SURVIVORSHIP_FIRST).
            if text == member.value or text.endswith("_" + member.value):
                return member
        self.violations.append(
            FieldViolation(
                _path(where, name), f"one of {[member.value for member in enum]}, got {value!r}"
            )
        )
        return default
