"""Profile traits with survivorship: which value of ``first_name`` a profile shows when events,
records and merged profiles disagree.

Every trait value seen is an observation ``(occurred_at, seq, source, value)``. Observations are
summarised per *anchor* identifier (the highest-priority identifier of the item that carried
them) in a :class:`TraitState` that is mergeable: combining two states gives the state of all
their observations together, in any order. A profile's traits are the combination of the
states of the anchors among its identifiers, so a merge combines them and an unmerge splits
them without any bookkeeping: each part has the anchors it kept. The per-anchor states are the
stored observations (compacted to what survivorship needs), so nothing has to be replayed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from profilemesh.services.identity.identifiers import Identifier
from profilemesh.services.identity.rules import Rules, Survivorship, TraitRule

Observation = tuple[int, int, str, Any]
"""``(occurred_at_ns, seq, source, value)``; later is larger ``(occurred_at, seq)``."""

MAX_COUNTED_VALUES = 64
"""Distinct values counted per trait and anchor for MOST_FREQUENT. Beyond it the rarest
(oldest on ties) are forgotten: a trait with that many values has no meaningful mode, and an
unbounded count would let one noisy trait grow without limit."""


@dataclass(frozen=True, slots=True)
class TraitState:
    """Summary of the observations of one trait: enough to apply any survivorship rule.

    ``counts`` (MOST_FREQUENT) and ``by_source`` (SOURCE_PRIORITY) are kept only while the
    trait's rule needs them, so that the common LATEST rule costs two tuples. A rule changed to
    one of those later starts counting from then on, falling back to the latest value before.
    """

    latest: Observation
    first: Observation
    counts: Mapping[str, tuple[int, Observation]] | None = None
    """Canonical JSON of a value -> (times seen, latest observation of it)."""
    by_source: Mapping[str, Observation] | None = None
    """Source -> its latest observation."""

    @classmethod
    def of(cls, observation: Observation, rule: TraitRule) -> TraitState:
        """The state of a single observation, under the trait's rule."""
        counts = None
        by_source = None
        if rule.survivorship is Survivorship.MOST_FREQUENT:
            counts = {_canonical(observation[3]): (1, observation)}
        elif rule.survivorship is Survivorship.SOURCE_PRIORITY:
            by_source = {observation[2]: observation}
        return cls(observation, observation, counts, by_source)

    def combine(self, other: TraitState) -> TraitState:
        """The state of both states' observations together (commutative, associative)."""
        return TraitState(
            latest=max(self.latest, other.latest, key=_order),
            first=min(self.first, other.first, key=_order),
            counts=_combine_counts(self.counts, other.counts),
            by_source=_combine_sources(self.by_source, other.by_source),
        )

    def value(self, rule: TraitRule) -> Any:
        """The surviving value under ``rule``."""
        survivorship = rule.survivorship
        if survivorship is Survivorship.FIRST:
            return self.first[3]
        if survivorship is Survivorship.MOST_FREQUENT and self.counts:
            # Most frequent; ties go to the value seen latest.
            return max(self.counts.values(), key=lambda entry: (entry[0], _order(entry[1])))[1][3]
        if survivorship is Survivorship.SOURCE_PRIORITY and self.by_source:
            ranks = {source: rank for rank, source in enumerate(rule.source_priority)}
            unlisted = len(ranks)
            # Listed sources by trust; unlisted ones below them all; ties by recency.
            best = min(
                self.by_source.values(),
                key=lambda o: (ranks.get(o[2], unlisted), -o[0], -o[1]),
            )
            return best[3]
        return self.latest[3]

    def to_json(self) -> Any:
        """A JSON-ready form (see :meth:`from_json`)."""
        document: dict[str, Any] = {"l": list(self.latest), "f": list(self.first)}
        if self.counts is not None:
            document["c"] = [[key, count, list(o)] for key, (count, o) in self.counts.items()]
        if self.by_source is not None:
            document["s"] = [list(o) for o in self.by_source.values()]
        return document

    @classmethod
    def from_json(cls, document: Any) -> TraitState:
        """The state written by :meth:`to_json`."""
        counts = None
        by_source = None
        if "c" in document:
            counts = {key: (count, _observation(o)) for key, count, o in document["c"]}
        if "s" in document:
            by_source = {o[2]: _observation(o) for o in document["s"]}
        return cls(_observation(document["l"]), _observation(document["f"]), counts, by_source)


def _order(observation: Observation) -> tuple[int, int]:
    return observation[0], observation[1]


def _observation(values: list[Any]) -> Observation:
    return int(values[0]), int(values[1]), str(values[2]), values[3]


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _combine_counts(
    a: Mapping[str, tuple[int, Observation]] | None, b: Mapping[str, tuple[int, Observation]] | None
) -> Mapping[str, tuple[int, Observation]] | None:
    if a is None or b is None:
        return a if b is None else b
    combined = dict(a)
    for key, (count, observation) in b.items():
        seen = combined.get(key)
        if seen is None:
            combined[key] = (count, observation)
        else:
            combined[key] = (seen[0] + count, max(seen[1], observation, key=_order))
    if len(combined) > MAX_COUNTED_VALUES:
        kept = sorted(combined.items(), key=lambda kv: (kv[1][0], _order(kv[1][1])), reverse=True)
        combined = dict(kept[:MAX_COUNTED_VALUES])
    return combined


def _combine_sources(
    a: Mapping[str, Observation] | None, b: Mapping[str, Observation] | None
) -> Mapping[str, Observation] | None:
    if a is None or b is None:
        return a if b is None else b
    combined = dict(a)
    for source, observation in b.items():
        seen = combined.get(source)
        combined[source] = observation if seen is None else max(seen, observation, key=_order)
    return combined


States = dict[str, TraitState]
"""Trait name -> state."""


@dataclass(frozen=True, slots=True)
class TraitChange:
    """A profile's traits after a change: what ``TraitsChanged`` on the resolution log carries."""

    profile_id: str
    traits: dict[str, Any]
    """Every trait of the profile after the change."""
    changed: tuple[str, ...]
    """Names of the traits added, changed or removed, sorted."""


class TraitBook:
    """The trait states of every anchor identifier; a profile's traits combine its members'.

    Profiles' states are not stored: they are combined from the anchors among the profile's
    identifiers when needed (``members_of`` tells which identifiers a profile has), so a merge
    or an unmerge changes nothing here, and memory holds each observation's summary once. The
    identity graph calls :meth:`observe` for each item and compares :meth:`values` around merges
    and unmerges. It tracks which anchors changed since the last :meth:`drain_dirty`.
    """

    def __init__(self, rules: Rules, members_of: Callable[[str], Iterable[Identifier]]) -> None:
        self.rules = rules
        self._members_of = members_of
        self._anchors: dict[Identifier, States] = {}
        self._dirty: set[Identifier] = set()
        self.seq = 0
        """Sequence number of the next observation: orders observations with equal times."""

    def observe(
        self,
        profile_id: str,
        anchor: Identifier,
        traits: Mapping[str, Any],
        source: str,
        occurred_at: int,
    ) -> tuple[str, ...]:
        """Record the ``traits`` an item carried; returns the names whose surviving value
        changed. The item belongs to ``profile_id`` (which holds ``anchor``) through ``anchor``."""
        if not traits:
            return ()
        before = self.values(profile_id, traits)
        states = self._anchors.setdefault(anchor, {})
        for name, value in traits.items():
            state = TraitState.of(
                (occurred_at, self.seq, source, value), self.rules.trait_rule(name)
            )
            self.seq += 1
            seen = states.get(name)
            states[name] = state if seen is None else seen.combine(state)
        self._dirty.add(anchor)
        return changed_names(before, self.values(profile_id, traits))

    def values(self, profile_id: str, names: Iterable[str] | None = None) -> dict[str, Any]:
        """The surviving value of the profile's traits (all, or those in ``names``), nulls
        included."""
        combined = self.combined(profile_id, names)
        return {name: state.value(self.rules.trait_rule(name)) for name, state in combined.items()}

    def combined(self, profile_id: str, names: Iterable[str] | None = None) -> States:
        """The profile's state of each trait (all, or those in ``names``): its anchors'
        states combined."""
        wanted = None if names is None else set(names)
        combined: States = {}
        for member in self._members_of(profile_id):
            states = self._anchors.get(member)
            if not states:
                continue
            for name, state in states.items():
                if wanted is not None and name not in wanted:
                    continue
                seen = combined.get(name)
                combined[name] = state if seen is None else seen.combine(state)
        return combined

    def traits_of(self, profile_id: str) -> dict[str, Any]:
        """The surviving value of every trait of a profile (traits whose value is null left
        out: an identify with ``"plan": null`` removes the trait)."""
        return _present(self.values(profile_id))

    def change_of(self, profile_id: str, changed: tuple[str, ...]) -> TraitChange | None:
        """The :class:`TraitChange` of a profile whose ``changed`` traits changed, if any."""
        return TraitChange(profile_id, self.traits_of(profile_id), changed) if changed else None

    def anchor_states(self) -> dict[Identifier, States]:
        """Every anchor's states (what is persisted)."""
        return {anchor: dict(states) for anchor, states in self._anchors.items()}

    def drain_dirty(self) -> list[tuple[Identifier, States]]:
        """The anchors whose states changed since the last call, with their states."""
        dirty = [(anchor, dict(self._anchors[anchor])) for anchor in self._dirty]
        self._dirty.clear()
        return dirty

    def forget(self, anchors: Iterable[Identifier]) -> None:
        """Drop the states of ``anchors`` (a deleted person's identifiers); the store removes
        their rows itself."""
        for anchor in anchors:
            self._anchors.pop(anchor, None)
            self._dirty.discard(anchor)

    def restore(self, anchors: Mapping[Identifier, States], seq: int) -> None:
        """Load stored anchor states."""
        self._anchors = {anchor: dict(states) for anchor, states in anchors.items()}
        self._dirty.clear()
        self.seq = seq


def _present(values: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in values.items() if value is not None}


def changed_names(before: Mapping[str, Any], after: Mapping[str, Any]) -> tuple[str, ...]:
    """The trait names whose value differs between two :meth:`TraitBook.values` results."""
    names = before.keys() | after.keys()
    return tuple(sorted(name for name in names if before.get(name) != after.get(name)))
