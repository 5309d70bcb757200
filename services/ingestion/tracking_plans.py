"""Tracking plans: per event name, the properties an event must carry and their types.

A plan applies to the sources it names (or, with none named, to every source without a plan of
its own). Its policy decides what a violation does: ``reject`` the event, ``flag`` it (accept,
and record the violations in the log), or ``allow`` it silently. Plans come from a YAML file at
start-up and from the RPCs; RPC changes are kept in the service's data directory.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format

from profilemesh.common.v1 import event_type_pb2
from profilemesh.ingestion.v1 import event_pb2, tracking_plan_pb2
from profilemesh.shared.errors import AlreadyExists, FieldViolation, InvalidArgument, NotFound

TrackingPlan = tracking_plan_pb2.TrackingPlan
Policy = tracking_plan_pb2.ViolationPolicy
PropertyType = tracking_plan_pb2.PropertyType

_BODY_PARTS = {  # event body -> (the field holding its properties, their name in paths)
    "track": ("properties", "track.properties"),
    "page": ("properties", "page.properties"),
    "screen": ("properties", "screen.properties"),
    "identify": ("traits", "identify.traits"),
    "group": ("traits", "group.traits"),
}
_ENUM_PREFIXES = {
    "policy": "VIOLATION_POLICY_",
    "type": "PROPERTY_TYPE_",
    "event_type": "EVENT_TYPE_",
}
_NAME = re.compile(r"^[A-Za-z0-9_.\- ]{1,128}$")
MAX_PLAN_VALUES = 100_000
"""Values (mappings, lists and scalars) in one plan's YAML/JSON form."""
MAX_PLAN_DEPTH = 16
"""Levels of nesting in one plan's YAML/JSON form (a real plan has about six)."""


def _type_ok(kind: int, value: Any) -> bool:
    if kind in (PropertyType.PROPERTY_TYPE_UNSPECIFIED, PropertyType.PROPERTY_TYPE_ANY):
        return True
    if kind == PropertyType.PROPERTY_TYPE_STRING:
        return isinstance(value, str)
    if kind == PropertyType.PROPERTY_TYPE_NUMBER:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == PropertyType.PROPERTY_TYPE_INTEGER:
        return (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and (math.isfinite(value) and float(value).is_integer())
        )
    if kind == PropertyType.PROPERTY_TYPE_BOOLEAN:
        return isinstance(value, bool)
    if kind == PropertyType.PROPERTY_TYPE_OBJECT:
        return isinstance(value, dict)
    if kind == PropertyType.PROPERTY_TYPE_ARRAY:
        return isinstance(value, list)
    if kind == PropertyType.PROPERTY_TYPE_TIMESTAMP:
        return isinstance(value, str) and _looks_like_iso_time(value)
    return False


def _looks_like_iso_time(text: str) -> bool:
    from datetime import datetime

    try:
        datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _is_unicode(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _lookup(properties: Mapping[str, Any], path: str) -> tuple[bool, Any]:
    value: Any = properties
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


@dataclass(frozen=True)
class _CompiledRule:
    rule: tracking_plan_pb2.EventRule
    patterns: Mapping[str, re.Pattern[str]]


class CompiledPlan:
    """A plan indexed by (event type, event name) for checking events quickly."""

    def __init__(self, plan: TrackingPlan) -> None:
        self.name = plan.name
        self.plan = plan
        self.policy = plan.policy or Policy.VIOLATION_POLICY_FLAG
        self.rules: dict[tuple[str, str], _CompiledRule] = {}
        for rule in plan.events:
            kind = rule.event_type or event_type_pb2.EVENT_TYPE_TRACK
            body = event_type_pb2.EventType.Name(kind).removeprefix("EVENT_TYPE_")
            patterns = {p.name: re.compile(p.pattern) for p in rule.properties if p.pattern}
            self.rules[(body.lower(), rule.event_name)] = _CompiledRule(rule, patterns)

    def check(
        self, view: event_pb2.Event, body: str, where: str
    ) -> tuple[list[FieldViolation], bool]:
        """The event's violations of this plan, and whether they reject it."""
        if self.policy == Policy.VIOLATION_POLICY_ALLOW:
            return [], False
        detail = getattr(view, body)
        name = detail.event if body == "track" else getattr(detail, "name", "")
        compiled = self.rules.get((body, name)) or self.rules.get((body, ""))
        if compiled is None:
            if body == "track" and self.plan.reject_unplanned_events:
                violation = FieldViolation(
                    f"{where}.track.event", f"{name!r} is not in tracking plan {self.name!r}"
                )
                return [violation], self.policy == Policy.VIOLATION_POLICY_REJECT
            return [], False
        part, path = _BODY_PARTS.get(body, ("", ""))
        properties: dict[str, Any] = {}
        if part:
            properties = json_format.MessageToDict(getattr(detail, part))
        violations = self._property_problems(compiled, properties, f"{where}.{path}")
        return violations, bool(violations) and self.policy == Policy.VIOLATION_POLICY_REJECT

    @staticmethod
    def _property_problems(
        compiled: _CompiledRule, properties: Mapping[str, Any], where: str
    ) -> list[FieldViolation]:
        problems = []
        rule = compiled.rule
        for prop in rule.properties:
            present, value = _lookup(properties, prop.name)
            field = f"{where}.{prop.name}"
            if not present or value is None:
                if prop.required:
                    problems.append(FieldViolation(field, "required by the tracking plan"))
                continue
            if not _type_ok(prop.type, value):
                expected = PropertyType.Name(prop.type).removeprefix("PROPERTY_TYPE_").lower()
                problems.append(FieldViolation(field, f"must be of type {expected}"))
                continue
            if prop.allowed_values and str(value) not in prop.allowed_values:
                problems.append(
                    FieldViolation(field, f"must be one of {', '.join(prop.allowed_values)}")
                )
            pattern = compiled.patterns.get(prop.name)
            if pattern is not None and not (isinstance(value, str) and pattern.fullmatch(value)):
                problems.append(FieldViolation(field, f"must match {prop.pattern}"))
            if isinstance(value, int | float) and not isinstance(value, bool):
                if prop.HasField("minimum") and value < prop.minimum:
                    problems.append(FieldViolation(field, f"must be at least {prop.minimum:g}"))
                if prop.HasField("maximum") and value > prop.maximum:
                    problems.append(FieldViolation(field, f"must be at most {prop.maximum:g}"))
        if rule.reject_unplanned_properties:
            planned = {p.name.split(".")[0] for p in rule.properties}
            for name in properties:
                if name not in planned:
                    problems.append(FieldViolation(f"{where}.{name}", "not in the tracking plan"))
        return problems


def validate_plan(plan: TrackingPlan, where: str = "tracking_plan") -> None:
    """Raise InvalidArgument naming every problem of ``plan``."""
    problems = []
    if not _NAME.match(plan.name):
        problems.append((f"{where}.name", "1-128 letters, digits, spaces, '.', '_' or '-'"))
    # Enums are open: any number parses, and an unknown one would fail later, when compiled.
    if plan.policy not in Policy.values():
        problems.append((f"{where}.policy", f"{plan.policy} is not a violation policy"))
    seen = set()
    for i, rule in enumerate(plan.events):
        key = (rule.event_type, rule.event_name)
        if key in seen:
            problems.append((f"{where}.events[{i}]", "the same event is planned twice"))
        seen.add(key)
        if rule.event_type not in event_type_pb2.EventType.values():
            problems.append((f"{where}.events[{i}].event_type", "not an event type"))
        if rule.event_type in (0, event_type_pb2.EVENT_TYPE_TRACK) and not rule.event_name:
            problems.append((f"{where}.events[{i}].event_name", "a track event needs its name"))
        for j, prop in enumerate(rule.properties):
            if not prop.name:
                problems.append((f"{where}.events[{i}].properties[{j}].name", "required"))
            if prop.type not in PropertyType.values():
                problems.append((f"{where}.events[{i}].properties[{j}].type", "not a type"))
            if prop.pattern:
                try:
                    re.compile(prop.pattern)
                except (re.error, OverflowError) as error:  # OverflowError: a{99999999999}
                    problems.append(
                        (f"{where}.events[{i}].properties[{j}].pattern", f"invalid: {error}")
                    )
                except RecursionError:
                    problems.append(
                        (f"{where}.events[{i}].properties[{j}].pattern", "groups nested too deep")
                    )
    if problems:
        raise InvalidArgument(f"invalid tracking plan {plan.name!r}", violations=problems)


def plan_from_dict(document: Mapping[str, Any], where: str) -> TrackingPlan:
    """A plan from its YAML/JSON form; enum values may be short (``reject``, ``number``)."""
    if not isinstance(document, Mapping):
        raise InvalidArgument.for_field(where, "a tracking plan is a mapping of its fields")
    size = 0

    def expand(value: Any, depth: int) -> Any:
        # YAML aliases make a document a graph: bound the tree it unfolds to, so that a few
        # anchors (or one that contains itself) cannot stand for billions of values.
        nonlocal size
        size += 1
        if size > MAX_PLAN_VALUES or depth > MAX_PLAN_DEPTH:
            raise InvalidArgument.for_field(
                where,
                f"more than {MAX_PLAN_VALUES:,} values or {MAX_PLAN_DEPTH} levels of nesting, "
                "with YAML aliases expanded",
            )
        if isinstance(value, str) and not _is_unicode(value):
            # YAML's "\ud800" escape; protobuf's enum lookup fails on it with a SystemError.
            raise InvalidArgument.for_field(where, "a string has a lone surrogate code point")
        if isinstance(value, dict):
            out = {}
            for key, item in value.items():
                expand(key, depth + 1)
                prefix = _ENUM_PREFIXES.get(key)
                if prefix and isinstance(item, str) and not item.upper().startswith(prefix):
                    item = prefix + item.upper()
                out[key] = expand(item, depth + 1)
            return out
        if isinstance(value, list):
            return [expand(item, depth + 1) for item in value]
        return value

    try:
        plan = json_format.ParseDict(expand(dict(document), 0), TrackingPlan())
    except (json_format.ParseError, OverflowError) as error:  # OverflowError: policy: .inf
        raise InvalidArgument.for_field(where, str(error)) from error
    validate_plan(plan, where)
    return plan


class TrackingPlans:
    """The plans in force, kept in ``path`` (JSON) so RPC changes survive restarts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._plans: dict[str, TrackingPlan] = {}
        self._compiled: dict[str, CompiledPlan] = {}
        if path.exists():
            for entry in json.loads(path.read_text()):
                plan = json_format.ParseDict(entry, TrackingPlan())
                self._plans[plan.name] = plan
        self._recompile()

    def load_yaml(self, file: Path) -> None:
        """Add or replace the plans of a YAML file (``plans: [...]``)."""
        try:
            document = yaml.safe_load(file.read_text()) or {}
        except RecursionError:
            raise InvalidArgument.for_field(file.name, "not YAML: nested too deeply") from None
        except yaml.YAMLError as error:
            raise InvalidArgument.for_field(file.name, f"not YAML: {error}") from None
        except Exception as error:  # not UTF-8; PyYAML's own errors on tags like !!timestamp 'x'
            raise InvalidArgument.for_field(file.name, f"not YAML: {error!r}") from None
        entries = document.get("plans", []) if isinstance(document, dict) else []
        if not isinstance(entries, list):
            raise InvalidArgument.for_field(f"{file.name}: plans", "a list of tracking plans")
        plans = [
            plan_from_dict(entry, f"{file.name}: plans[{i}]") for i, entry in enumerate(entries)
        ]
        with self._lock:
            for plan in plans:
                self._plans[plan.name] = plan
            self._save_and_recompile()

    def plan_for(self, source: str) -> CompiledPlan | None:
        """The plan that applies to events from ``source``, if any."""
        return self._compiled.get(source) or self._compiled.get("")

    def list(self) -> list[TrackingPlan]:
        return [self._plans[name] for name in sorted(self._plans)]

    def get(self, name: str) -> TrackingPlan:
        plan = self._plans.get(name)
        if plan is None:
            raise NotFound(f"no tracking plan {name!r}", violations=[("name", "unknown plan")])
        return plan

    def create(self, plan: TrackingPlan, now: Any) -> TrackingPlan:
        validate_plan(plan)
        with self._lock:
            if plan.name in self._plans:
                raise AlreadyExists(f"tracking plan {plan.name!r} exists")
            stored = TrackingPlan()
            stored.CopyFrom(plan)
            stored.create_time.CopyFrom(now)
            stored.update_time.CopyFrom(now)
            self._plans[plan.name] = stored
            self._save_and_recompile()
            return stored

    def update(self, plan: TrackingPlan, paths: Iterable[str], now: Any) -> TrackingPlan:
        with self._lock:
            current = self.get(plan.name)
            updated = TrackingPlan()
            updated.CopyFrom(current)
            paths = list(paths)
            if paths:
                for path in paths:
                    if path not in TrackingPlan.DESCRIPTOR.fields_by_name:
                        raise InvalidArgument.for_field("update_mask", f"unknown field {path!r}")
                    updated.ClearField(path)  # type: ignore[arg-type]
                    field = TrackingPlan.DESCRIPTOR.fields_by_name[path]
                    if field.is_repeated:
                        getattr(updated, path).extend(getattr(plan, path))
                    elif field.message_type is not None:
                        getattr(updated, path).CopyFrom(getattr(plan, path))
                    else:
                        setattr(updated, path, getattr(plan, path))
            else:
                updated.CopyFrom(plan)
                updated.create_time.CopyFrom(current.create_time)
            updated.update_time.CopyFrom(now)
            validate_plan(updated)
            self._plans[plan.name] = updated
            self._save_and_recompile()
            return updated

    def delete(self, name: str) -> None:
        with self._lock:
            self.get(name)
            del self._plans[name]
            self._save_and_recompile()

    def _save_and_recompile(self) -> None:
        document = [json_format.MessageToDict(plan) for plan in self._plans.values()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        with temporary.open("w") as file:
            json.dump(document, file)
            file.flush()
            os.fsync(file.fileno())
        temporary.replace(self.path)
        self._recompile()

    def _recompile(self) -> None:
        compiled: dict[str, CompiledPlan] = {}
        for plan in self._plans.values():
            for source in plan.sources or [""]:
                compiled[source] = CompiledPlan(plan)
        self._compiled = compiled
