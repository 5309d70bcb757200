"""The identity graph: identifiers are nodes, evidence links them, and each connected set of
identifiers is one profile.

**Links.** An item that carries several identifiers links them all: the graph keeps it as one
:class:`Link` (a hyperedge over the item's identifiers, with its provenance) rather than as
pairwise edges, so that an unmerge can cut exactly the links that join some identifiers to the
rest of the profile. Items carrying the same identifier set again add no new link.

**Limits.** ``link`` walks an item's identifiers in priority order (user_id before email before
anonymous_id ...) and joins each one's profile to the item's unless that would give the joined
profile more identifiers of some type than the rules allow. Then, per the type's policy, the
identifier keeps (or, if new, starts) its own profile and the refusal is recorded
(REFUSE_MERGE), or the identifier is left out of the item (DROP_LOWEST_PRIORITY): the walk
order makes it the lowest-priority one. Limits are invariants: a profile never gets more
identifiers of a type than its limit through a link or a manual merge. An identifier refused on
more distinct profiles than ``max_profiles_per_identifier`` (a shared device) is blocked.

**Stable ids.** A profile's id is derived from its founding identifier (``p_`` + 16 hex digits
of xxHash64 of ``type:value``), so replaying the same log gives the same ids. On a merge the
oldest profile (by creation sequence) survives; a retired id keeps resolving to whichever
profile now holds its founder, which is how redirects last forever and survive unmerges
without chains to maintain. An unmerge gives each resulting part the id its oldest former
founder had (the original id for the part holding the original founder), so unmerging a merge
restores both ids.

The graph is in memory and single-threaded; :meth:`IdentityGraph.drain_changes` hands the rows
changed since the last call to :mod:`.store`, which persists them in the consumer's
transaction.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import xxhash

from profilemesh.services.identity.extraction import Evidence
from profilemesh.services.identity.identifiers import Identifier
from profilemesh.services.identity.rules import LimitPolicy, Rules
from profilemesh.services.identity.traits import (
    States,
    TraitBook,
    TraitChange,
    changed_names,
)
from profilemesh.shared.errors import FailedPrecondition, InvalidArgument, NotFound

# Priority given to identifiers whose type lost its rule (rules changed): after every ruled one.
_UNRULED_PRIORITY = 1 << 30


class MergeKind(StrEnum):
    """Kind of graph change (``MergeKind`` in merge.proto)."""

    MERGE = "merge"
    UNMERGE = "unmerge"
    REFUSED = "refused"


class MergeOrigin(StrEnum):
    """What caused a graph change or a link (``MergeOrigin`` in merge.proto)."""

    DETERMINISTIC = "deterministic"
    PROBABILISTIC = "probabilistic"
    MANUAL = "manual"


@dataclass(frozen=True, slots=True)
class EvidenceRef:
    """The item that provided a link (``Evidence`` in merge.proto); empty for manual links."""

    source: str = ""
    message_id: str = ""
    record_id: str = ""
    match_probability: float = 0.0
    seen_at: int = 0
    """Time of the event or record, in nanoseconds since the epoch."""


@dataclass(frozen=True, slots=True)
class MergeRecord:
    """One merge, unmerge or refused merge: the audit trail entry of ``ListMerges`` and the
    payload of ``ProfilesMerged`` / ``ProfileUnmerged`` (``MergeRecord`` in merge.proto)."""

    merge_id: str
    kind: MergeKind
    origin: MergeOrigin
    profile_ids: tuple[str, ...]
    """MERGE and REFUSED: the profiles involved (survivor or item's profile first); UNMERGE:
    the split profile."""
    surviving_profile_id: str = ""
    resulting_profile_ids: tuple[str, ...] = ()
    """UNMERGE: the profiles after the split, the original id first."""
    identifiers: tuple[Identifier, ...] = ()
    """The identifiers that linked the profiles (MERGE, REFUSED) or whose links were cut."""
    evidence: EvidenceRef | None = None
    reason: str = ""
    occurred_at: int = 0
    """Nanoseconds since the epoch: the item's time, or the clock's for manual changes."""

    @property
    def merged_profile_ids(self) -> tuple[str, ...]:
        """MERGE: the retired ids (every profile id but the survivor's)."""
        return tuple(p for p in self.profile_ids if p != self.surviving_profile_id)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form (see :meth:`from_json`)."""
        document: dict[str, Any] = {
            "merge_id": self.merge_id,
            "kind": self.kind.value,
            "origin": self.origin.value,
            "profile_ids": list(self.profile_ids),
            "surviving_profile_id": self.surviving_profile_id,
            "resulting_profile_ids": list(self.resulting_profile_ids),
            "identifiers": [i.key for i in self.identifiers],
            "reason": self.reason,
            "occurred_at": self.occurred_at,
        }
        if self.evidence is not None:
            document["evidence"] = _evidence_json(self.evidence)
        return document

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> MergeRecord:
        """The record written by :meth:`to_json`."""
        evidence = document.get("evidence")
        return cls(
            merge_id=document["merge_id"],
            kind=MergeKind(document["kind"]),
            origin=MergeOrigin(document["origin"]),
            profile_ids=tuple(document["profile_ids"]),
            surviving_profile_id=document["surviving_profile_id"],
            resulting_profile_ids=tuple(document["resulting_profile_ids"]),
            identifiers=tuple(Identifier.parse(key) for key in document["identifiers"]),
            evidence=None if evidence is None else EvidenceRef(**evidence),
            reason=document["reason"],
            occurred_at=document["occurred_at"],
        )


@dataclass(frozen=True, slots=True)
class Link:
    """Evidence that some identifiers belong to one person: a hyperedge of the graph."""

    link_id: int
    identifiers: tuple[Identifier, ...]
    origin: MergeOrigin
    evidence: EvidenceRef
    reason: str = ""
    """For manual links, the caller's reason."""


@dataclass(frozen=True, slots=True)
class LinkOutcome:
    """What :meth:`IdentityGraph.link` did with one item."""

    profile_id: str | None
    """The profile the item belongs to; None when it carried no usable identifier."""
    created: bool = False
    """Whether the item created that profile."""
    identifiers: tuple[Identifier, ...] = ()
    """The item's identifiers now on the profile (refused, dropped and blocked ones left out)."""
    new_identifiers: tuple[Identifier, ...] = ()
    """Identifiers the graph had never seen that joined the profile."""
    merged: tuple[MergeRecord, ...] = ()
    """The merge the item caused (at most one: every profile it joined merges at once)."""
    refused: tuple[MergeRecord, ...] = ()
    """One REFUSED record per identifier kept apart or dropped because of a limit."""
    created_profiles: tuple[str, ...] = ()
    """Every profile the item created, including those of refused new identifiers."""
    newly_blocked: tuple[Identifier, ...] = ()
    """Identifiers blocked by this item for being refused on too many profiles."""
    traits: TraitChange | None = None
    """The profile's traits, when the item (or its merge) changed them."""
    anchor: Identifier | None = None
    """The item's highest-priority identifier on the profile, which owns its trait values."""


@dataclass(frozen=True, slots=True)
class MergeOutcome:
    """What a manual :meth:`IdentityGraph.merge` did."""

    record: MergeRecord
    traits: TraitChange | None


@dataclass(frozen=True, slots=True)
class UnmergeOutcome:
    """What :meth:`IdentityGraph.unmerge` did: the record lists the resulting profiles."""

    record: MergeRecord
    traits: tuple[TraitChange, ...]


@dataclass(frozen=True, slots=True)
class Counters:
    """The graph's sequence counters: persisted so that a reloaded graph continues them."""

    node_seq: int = 0
    profile_seq: int = 0
    link_id: int = 0
    merge_seq: int = 0
    trait_seq: int = 0


@dataclass(frozen=True, slots=True)
class ChangeSet:
    """Rows changed since the last :meth:`IdentityGraph.drain_changes`, ready to persist."""

    nodes: list[tuple[Identifier, int, str]] = field(default_factory=list)
    """(identifier, first-seen sequence, profile id) of new or moved nodes."""
    profiles: list[tuple[str, Identifier, int]] = field(default_factory=list)
    """(profile id, founder, creation sequence) of profile ids created."""
    links: list[Link] = field(default_factory=list)
    """Links added or changed."""
    removed_links: list[int] = field(default_factory=list)
    merges: list[MergeRecord] = field(default_factory=list)
    blocked: list[Identifier] = field(default_factory=list)
    refusals: list[tuple[Identifier, str]] = field(default_factory=list)
    """(identifier, profile id it was refused on)."""
    traits: list[tuple[Identifier, States]] = field(default_factory=list)
    """(anchor, every trait state of the anchor)."""
    counters: Counters = field(default_factory=Counters)
    erased: Erasure | None = None
    """What deleted people left behind, to remove from the store."""

    def __bool__(self) -> bool:
        return bool(
            self.erased
            or self.nodes
            or self.profiles
            or self.links
            or self.removed_links
            or self.merges
            or self.blocked
            or self.refusals
            or self.traits
        )


@dataclass(slots=True)
class Erasure:
    """Everything of deleted people the store must remove (collected until drained)."""

    identifiers: set[Identifier] = field(default_factory=set)
    """Their nodes, trait anchors, blocked entries and refusals."""
    profile_ids: set[str] = field(default_factory=set)
    """Their live and retired profile ids."""
    merge_ids: set[str] = field(default_factory=set)
    """Merge records naming any of those profiles."""

    def __bool__(self) -> bool:
        return bool(self.identifiers or self.profile_ids)


@dataclass(frozen=True, slots=True)
class DeletionOutcome:
    """What :meth:`IdentityGraph.delete` removed."""

    profile_id: str
    """The live profile that was deleted."""
    profile_ids: tuple[str, ...]
    """It and every id it retired by merging: the keys of its entries in the resolution log."""
    identifiers: tuple[Identifier, ...]
    """Every identifier the person had."""


@dataclass(frozen=True)
class GraphSnapshot:
    """The whole persistent state of a graph: what :mod:`.store` loads, and what tests compare."""

    nodes: dict[Identifier, tuple[int, str]]
    """Identifier -> (first-seen sequence, profile id)."""
    profiles: dict[str, tuple[Identifier, int]]
    """Every profile id ever created, live or retired -> (founder, creation sequence)."""
    links: dict[int, Link]
    merges: tuple[MergeRecord, ...]
    blocked: frozenset[Identifier]
    refusals: dict[Identifier, frozenset[str]]
    traits: dict[Identifier, States]
    counters: Counters


def profile_id_for(founder: Identifier, attempt: int = 0) -> str:
    """The id of a profile founded by ``founder``: ``p_`` + 16 hex digits of xxHash64.

    ``attempt`` > 0 derives the alternatives used in the unlikely case of a hash collision.
    """
    return "p_" + xxhash.xxh64_hexdigest(founder.key.encode(), seed=attempt)


class _Node:
    """One identifier of the graph: its profile, when it was first seen, and the profile id it
    founded, if any (an identifier founds at most one: ids derive from their founder)."""

    __slots__ = ("founded", "founded_seq", "identifier", "profile", "seq")

    def __init__(self, identifier: Identifier, profile: str, seq: int) -> None:
        self.identifier = identifier
        self.profile = profile
        self.seq = seq
        self.founded = ""
        self.founded_seq = 0


class _Profile:
    """A live profile: its members, their count per type, and the links between them."""

    __slots__ = ("founder", "id", "links", "members", "seq")

    def __init__(self, profile_id: str, founder: Identifier, seq: int) -> None:
        self.id = profile_id
        self.founder = founder
        self.seq = seq
        self.members: set[Identifier] = set()
        # A list, not a set: profiles hold a few links and a list takes a third of the memory.
        self.links: list[int] = []

    def add(self, identifier: Identifier) -> None:
        self.members.add(identifier)

    def counts(self) -> dict[str, int]:
        """Number of identifiers per type. Counted when needed rather than kept: profiles are
        small, and a dictionary per profile would cost more memory than the count costs time."""
        counts: dict[str, int] = {}
        for member in self.members:
            counts[member.type] = counts.get(member.type, 0) + 1
        return counts


@dataclass
class _Plan:
    """What :meth:`IdentityGraph.link` decided for an item's identifiers."""

    accepted: list[Identifier] = field(default_factory=list)
    """The identifiers joining the item's profile, by priority."""
    new: list[Identifier] = field(default_factory=list)
    """Accepted identifiers the graph has never seen."""
    joined: list[_Profile] = field(default_factory=list)
    """Existing profiles joining (merging into one when more than one)."""
    touching: dict[str, list[Identifier]] = field(default_factory=dict)
    """Joined profile id -> the item's identifiers in it."""
    conflicts: list[tuple[list[Identifier], _Profile | None, list[str]]] = field(
        default_factory=list
    )
    """(identifiers kept apart, their profile or None when new, the limits they would break)."""


class IdentityGraph:
    """Profiles as connected components of identifiers, under the identity rules."""

    def __init__(self, rules: Rules, *, clock: Callable[[], int] = time.time_ns) -> None:
        self._rules = rules
        self._clock = clock
        self.traits = TraitBook(rules, self._members_of)
        """The profiles' traits, kept in step with merges and unmerges."""
        self._nodes: dict[Identifier, _Node] = {}
        self._profiles: dict[str, _Profile] = {}
        self._founders: dict[str, _Node] = {}
        """Every profile id ever created, live or retired -> its founder's node."""
        self._links: dict[int, Link] = {}
        self._link_of_set: dict[tuple[Identifier, ...], int] = {}
        self._merges: list[MergeRecord] = []
        self._merges_by_profile: dict[str, list[MergeRecord]] = {}
        self._blocked: set[Identifier] = set()
        self._refused_on: dict[Identifier, set[str]] = {}
        self._next_node = 0
        self._next_profile = 0
        self._next_link = 0
        self._next_merge = 0
        self._reset_changes()

    # -- rules -------------------------------------------------------------------------------

    @property
    def rules(self) -> Rules:
        """The rules applied to items linked from now on."""
        return self._rules

    @rules.setter
    def rules(self, rules: Rules) -> None:
        # Existing profiles are not re-resolved (see UpdateIdentityRules): a profile over a new
        # limit keeps its identifiers but cannot grow further in that type.
        self._rules = rules
        self.traits.rules = rules

    # -- reads -------------------------------------------------------------------------------

    def resolve(self, identifier: Identifier) -> str | None:
        """The profile of a (normalised) identifier, or None if the graph has never seen it."""
        node = self._nodes.get(identifier)
        return None if node is None else node.profile

    def knows(self, identifier: Identifier) -> bool:
        """Whether the identifier is a node of the graph."""
        return identifier in self._nodes

    def canonical(self, profile_id: str) -> str | None:
        """The live profile an id designates: itself, or for a retired id the profile that now
        holds its founder. None for an id the graph never created."""
        founder = self._founders.get(profile_id)
        return None if founder is None else founder.profile

    def identifiers_of(self, profile_id: str) -> list[Identifier]:
        """The identifiers of a profile (live or retired id), by priority then value; empty
        for an unknown id."""
        live = self.canonical(profile_id)
        if live is None:
            return []
        return sorted(self._profiles[live].members, key=self._priority_key)

    def traits_of(self, profile_id: str) -> dict[str, Any]:
        """The surviving traits of a profile (live or retired id)."""
        live = self.canonical(profile_id)
        return {} if live is None else self.traits.traits_of(live)

    def is_blocked(self, identifier: Identifier) -> bool:
        """Whether the identifier never links: a blocked value, or refused on too many
        profiles."""
        return identifier in self._blocked or self._rules.is_blocked(identifier)

    def profile_ids(self) -> list[str]:
        """The live profile ids, oldest first."""
        return sorted(self._profiles, key=lambda p: self._profiles[p].seq)

    def links_of(self, profile_id: str) -> list[Link]:
        """The links holding a profile (live or retired id) together, oldest first."""
        live = self.canonical(profile_id)
        if live is None:
            return []
        return [self._links[i] for i in sorted(self._profiles[live].links)]

    def merges_of(self, profile_id: str) -> list[MergeRecord]:
        """The history of a profile (live or retired id), newest first: merges, unmerges and
        refusals involving it or any profile it absorbed."""
        live = self.canonical(profile_id)
        if live is None:
            return []
        nodes = self._nodes
        ids = {live} | {
            founded for m in self._profiles[live].members if (founded := nodes[m].founded)
        }
        seen: dict[str, MergeRecord] = {}
        for pid in ids:
            for record in self._merges_by_profile.get(pid, ()):
                seen[record.merge_id] = record
        return sorted(seen.values(), key=lambda r: r.merge_id, reverse=True)

    def merges(self) -> list[MergeRecord]:
        """Every merge, unmerge and refusal, newest first."""
        return self._merges[::-1]

    def __len__(self) -> int:
        """Number of live profiles."""
        return len(self._profiles)

    # -- linking -----------------------------------------------------------------------------

    def link(self, evidence: Evidence) -> LinkOutcome:
        """Attribute one item to a profile, creating, growing or merging profiles as its
        identifiers require and the limits allow."""
        candidates = self._usable(evidence.identifiers)
        if not candidates:
            return LinkOutcome(profile_id=None)
        plan = self._plan(candidates)
        ref = EvidenceRef(
            source=evidence.source,
            message_id=evidence.message_id,
            record_id=evidence.record_id,
            match_probability=evidence.match_probability,
            seen_at=evidence.occurred_at,
        )
        probabilistic = evidence.match_probability > 0
        origin = MergeOrigin.PROBABILISTIC if probabilistic else MergeOrigin.DETERMINISTIC

        created: list[str] = []
        if plan.joined:
            survivor = min(plan.joined, key=lambda p: p.seq)
        else:
            survivor = self._create(plan.new[0])
            created.append(survivor.id)
        for identifier in plan.new:
            if identifier not in survivor.members:
                self._add_node(survivor, identifier)
        merged: list[MergeRecord] = []
        changed: tuple[str, ...] = ()
        if len(plan.joined) > 1:
            others = [p for p in plan.joined if p is not survivor]
            linking = [i for p in [survivor, *others] for i in plan.touching[p.id]]
            merged.append(
                self._record(
                    kind=MergeKind.MERGE,
                    origin=origin,
                    profile_ids=(survivor.id, *(p.id for p in others)),
                    surviving_profile_id=survivor.id,
                    identifiers=tuple(linking),
                    evidence=ref,
                    reason=_merge_reason(linking, origin, evidence.match_probability),
                    occurred_at=evidence.occurred_at,
                )
            )
            changed = self._absorb(survivor, others)
        if len(plan.accepted) > 1:
            self._add_link(survivor, tuple(plan.accepted), origin, ref)
        refused, blocked = self._refuse(plan, survivor, origin, ref, created)

        anchor = plan.accepted[0]
        observed = self.traits.observe(
            survivor.id, anchor, evidence.traits, evidence.source, evidence.occurred_at
        )
        changed = tuple(sorted(set(changed) | set(observed)))
        return LinkOutcome(
            profile_id=survivor.id,
            created=bool(created) and created[0] == survivor.id,
            identifiers=tuple(plan.accepted),
            new_identifiers=tuple(plan.new),
            merged=tuple(merged),
            refused=tuple(refused),
            created_profiles=tuple(created),
            newly_blocked=tuple(blocked),
            traits=self.traits.change_of(survivor.id, changed),
            anchor=anchor,
        )

    def _plan(self, candidates: list[Identifier]) -> _Plan:
        """Walk an item's identifiers by priority and decide which join the item's profile:
        each one's profile (or the new identifier) joins unless the union would break a
        limit. The first identifier always joins: it is the item's own profile."""
        limits = self._rules.limits
        plan = _Plan()
        counts: dict[str, int] = {}
        kept_apart: dict[str, list[Identifier]] = {}
        for identifier in candidates:
            node = self._nodes.get(identifier)
            profile_id = None if node is None else node.profile
            if profile_id is not None and profile_id in plan.touching:
                plan.accepted.append(identifier)
                plan.touching[profile_id].append(identifier)
                continue
            if profile_id is not None and profile_id in kept_apart:
                # Another identifier of this profile was refused already; counts only grew.
                kept_apart[profile_id].append(identifier)
                continue
            profile = None if profile_id is None else self._profiles[profile_id]
            adds = {identifier.type: 1} if profile is None else profile.counts()
            broken = _broken(counts, adds, limits) if plan.accepted else []
            if broken:
                plan.conflicts.append(([identifier], profile, broken))
                if profile is not None:
                    kept_apart[profile.id] = plan.conflicts[-1][0]
                continue
            plan.accepted.append(identifier)
            for identifier_type, count in adds.items():
                counts[identifier_type] = counts.get(identifier_type, 0) + count
            if profile is None:
                plan.new.append(identifier)
            else:
                plan.joined.append(profile)
                plan.touching[profile.id] = [identifier]
        return plan

    def _refuse(
        self,
        plan: _Plan,
        survivor: _Profile,
        origin: MergeOrigin,
        ref: EvidenceRef,
        created: list[str],
    ) -> tuple[list[MergeRecord], list[Identifier]]:
        """Record the plan's conflicts; returns the refusal records and the identifiers that
        became blocked. Appends the profiles of refused new identifiers to ``created``."""
        limits = self._rules.limits
        refused: list[MergeRecord] = []
        blocked: list[Identifier] = []
        for apart, profile, broken in plan.conflicts:
            drop = all(self._policy(t) is LimitPolicy.DROP_LOWEST_PRIORITY for t in broken)
            if profile is None and not drop:
                # REFUSE_MERGE: a new identifier that cannot join starts its own profile.
                profile = self._create(apart[0])
                created.append(profile.id)
            refused.append(
                self._record(
                    kind=MergeKind.REFUSED,
                    origin=origin,
                    profile_ids=(survivor.id,) if profile is None else (survivor.id, profile.id),
                    identifiers=(plan.accepted[0], *apart),
                    evidence=ref,
                    reason=_refusal_reason(apart, broken, limits, drop),
                    occurred_at=ref.seen_at,
                )
            )
            blocked.extend(i for i in apart if self._note_refusal(i, survivor.id))
        return refused, blocked

    # -- manual changes ----------------------------------------------------------------------

    def merge(
        self, profile_ids: Sequence[str], reason: str, *, occurred_at: int | None = None
    ) -> MergeOutcome:
        """Merge profiles by hand; the oldest survives. Retired ids are resolved first.

        Raises InvalidArgument (fewer than two distinct profiles, no reason), NotFound (an
        unknown id) or FailedPrecondition naming the limit the merge would break.
        """
        if not reason.strip():
            raise InvalidArgument.for_field("reason", "a reason is required")
        live: list[_Profile] = []
        for index, profile_id in enumerate(profile_ids):
            canonical = self.canonical(profile_id)
            if canonical is None:
                raise NotFound(
                    f"no profile {profile_id!r}",
                    violations=[(f"profile_ids[{index}]", "no such profile")],
                )
            if all(p.id != canonical for p in live):
                live.append(self._profiles[canonical])
        if len(live) < 2:
            raise InvalidArgument.for_field(
                "profile_ids", "at least two distinct profiles are required"
            )
        limits = self._rules.limits
        counts: dict[str, int] = {}
        for profile in live:
            for identifier_type, count in profile.counts().items():
                counts[identifier_type] = counts.get(identifier_type, 0) + count
        for identifier_type, count in sorted(counts.items(), key=lambda tc: self._type_rank(tc[0])):
            limit = limits.get(identifier_type, 0)
            if limit and count > limit:
                raise FailedPrecondition(
                    f"merging would give the profile {count} {identifier_type} identifiers; the "
                    f"limit is {limit} {identifier_type} per profile",
                    reason="IDENTIFIER_LIMIT",
                    metadata={"identifier_type": identifier_type, "limit": str(limit)},
                )
        survivor = min(live, key=lambda p: p.seq)
        others = [p for p in live if p is not survivor]
        founders = (survivor.founder, *(p.founder for p in others))
        record = self._record(
            kind=MergeKind.MERGE,
            origin=MergeOrigin.MANUAL,
            profile_ids=(survivor.id, *(p.id for p in others)),
            surviving_profile_id=survivor.id,
            identifiers=founders,
            reason=reason,
            occurred_at=self._clock() if occurred_at is None else occurred_at,
        )
        changed = self._absorb(survivor, others)
        # The merge itself is evidence: without a link the profiles would split again on the
        # next recomputation (unmerge, rebuild).
        self._add_link(survivor, founders, MergeOrigin.MANUAL, EvidenceRef(), reason=reason)
        return MergeOutcome(record, self.traits.change_of(survivor.id, changed))

    def unmerge(
        self,
        profile_id: str,
        identifiers: Sequence[Identifier],
        reason: str,
        *,
        occurred_at: int | None = None,
    ) -> UnmergeOutcome:
        """Take ``identifiers`` out of their profile, with whatever only they linked to it.

        The rest of the profile keeps its part that holds the oldest founder; the links between
        that part and everything else are cut, and the profile splits into its connected
        parts. The part holding the profile's founder keeps its id; every other part takes the
        id of the oldest profile a member of it founded (a new id if none did), so unmerging a
        merge restores both ids. Raises NotFound, InvalidArgument (identifiers not on the
        profile, or all of them; no reason).
        """
        if not reason.strip():
            raise InvalidArgument.for_field("reason", "a reason is required")
        live = self.canonical(profile_id)
        if live is None:
            raise NotFound(
                f"no profile {profile_id!r}", violations=[("profile_id", "no such profile")]
            )
        profile = self._profiles[live]
        cut = set(identifiers)
        for index, identifier in enumerate(identifiers):
            if identifier not in profile.members:
                raise InvalidArgument.for_field(
                    f"identifiers[{index}]", f"{identifier.key} is not an identifier of {live}"
                )
        if not cut or cut >= profile.members:
            raise InvalidArgument.for_field(
                "identifiers", "name some, but not all, of the profile's identifiers"
            )
        # The profile keeps the part of the rest that holds its oldest founder; the named
        # identifiers leave with whatever only they linked to it.
        core = self._core(profile, cut)
        before = self.traits.values(live)
        self._cut(profile, profile.members - core)
        parts = self._split(profile)
        record = self._record(
            kind=MergeKind.UNMERGE,
            origin=MergeOrigin.MANUAL,
            profile_ids=(live,),
            resulting_profile_ids=tuple(p.id for p in parts),
            identifiers=tuple(sorted(cut, key=self._priority_key)),
            reason=reason,
            occurred_at=self._clock() if occurred_at is None else occurred_at,
        )
        changes: list[TraitChange] = []
        for part in parts:
            after = self.traits.values(part.id)
            # A part that keeps the original id changes from it; any other part is new.
            changed = changed_names(before if part.id == live else {}, after)
            if changed:
                changes.append(TraitChange(part.id, _present(after), changed))
        return UnmergeOutcome(record, tuple(changes))

    # -- deletion ----------------------------------------------------------------------------

    def delete(self, profile_id: str) -> DeletionOutcome:
        """Remove a person: their profile (live or retired id), identifiers, links, traits and
        every merge record naming them. Unlike an unmerge nothing is kept for history: the
        records hold the person's identifiers. Raises NotFound for an unknown id."""
        live = self.canonical(profile_id)
        if live is None:
            raise NotFound(
                f"no profile {profile_id!r}", violations=[("profile_id", "no such profile")]
            )
        profile = self._profiles.pop(live)
        members = set(profile.members)
        ids = {live} | {founded for m in members if (founded := self._nodes[m].founded)}
        for link_id in profile.links:
            link = self._links.pop(link_id, None)
            if link is not None:
                self._link_of_set.pop(link.identifiers, None)
                self._removed_links.add(link_id)
                self._dirty_links.discard(link_id)
        for member in members:
            del self._nodes[member]
            self._dirty_nodes.discard(member)
            self._blocked.discard(member)
            self._refused_on.pop(member, None)
        for refused_on in self._refused_on.values():
            refused_on -= ids
        for pid in ids:
            self._founders.pop(pid, None)
        doomed = {r.merge_id for pid in ids for r in self._merges_by_profile.pop(pid, ())}
        if doomed:
            self._merges = [r for r in self._merges if r.merge_id not in doomed]
            for pid, records in list(self._merges_by_profile.items()):
                kept = [r for r in records if r.merge_id not in doomed]
                if kept:
                    self._merges_by_profile[pid] = kept
                else:
                    del self._merges_by_profile[pid]
            self._new_merges[:] = [r for r in self._new_merges if r.merge_id not in doomed]
        self._new_profiles[:] = [p for p in self._new_profiles if p not in ids]
        self._new_blocked[:] = [i for i in self._new_blocked if i not in members]
        self._new_refusals[:] = [
            (i, p) for i, p in self._new_refusals if i not in members and p not in ids
        ]
        self.traits.forget(members)
        self._erasure.identifiers |= members
        self._erasure.profile_ids |= ids
        self._erasure.merge_ids |= doomed
        return DeletionOutcome(
            profile_id=live,
            profile_ids=tuple(sorted(ids)),
            identifiers=tuple(sorted(members, key=self._priority_key)),
        )

    # -- persistence -------------------------------------------------------------------------

    def drain_changes(self) -> ChangeSet:
        """The rows changed since the last call (see :mod:`.store`), then forget them."""
        changes = ChangeSet(
            nodes=[(i, self._nodes[i].seq, self._nodes[i].profile) for i in self._dirty_nodes],
            profiles=[
                (p, self._founders[p].identifier, self._founders[p].founded_seq)
                for p in self._new_profiles
            ],
            links=[self._links[i] for i in sorted(self._dirty_links) if i in self._links],
            removed_links=sorted(self._removed_links),
            merges=self._new_merges,
            blocked=self._new_blocked,
            refusals=self._new_refusals,
            traits=self.traits.drain_dirty(),
            counters=self._counters(),
            erased=self._erasure if self._erasure else None,
        )
        self._reset_changes()
        return changes

    def snapshot(self) -> GraphSnapshot:
        """The whole persistent state (a copy)."""
        return GraphSnapshot(
            nodes={i: (n.seq, n.profile) for i, n in self._nodes.items()},
            profiles={p: (n.identifier, n.founded_seq) for p, n in self._founders.items()},
            links=dict(self._links),
            merges=tuple(self._merges),
            blocked=frozenset(self._blocked),
            refusals={i: frozenset(p) for i, p in self._refused_on.items()},
            traits=self.traits.anchor_states(),
            counters=self._counters(),
        )

    @classmethod
    def from_snapshot(cls, rules: Rules, snapshot: GraphSnapshot) -> IdentityGraph:
        """A graph with the state of ``snapshot`` and no pending changes."""
        graph = cls(rules)
        nodes = graph._nodes
        for identifier, (seq, profile_id) in snapshot.nodes.items():
            nodes[identifier] = _Node(identifier, profile_id, seq)
        for profile_id, (founder, seq) in snapshot.profiles.items():
            node = nodes[founder]
            node.founded, node.founded_seq = profile_id, seq
            graph._founders[profile_id] = node
            if node.profile == profile_id:
                graph._profiles[profile_id] = _Profile(profile_id, node.identifier, seq)
        for identifier, node in nodes.items():
            graph._profiles[node.profile].add(identifier)
        for link in snapshot.links.values():
            # One object per identifier, shared by nodes, links and traits, saves memory.
            link = replace(link, identifiers=tuple(nodes[i].identifier for i in link.identifiers))
            graph._links[link.link_id] = link
            graph._link_of_set.setdefault(link.identifiers, link.link_id)
            graph._profiles[nodes[link.identifiers[0]].profile].links.append(link.link_id)
        for record in snapshot.merges:
            graph._remember(record)
        graph._blocked = set(snapshot.blocked)
        graph._refused_on = {i: set(p) for i, p in snapshot.refusals.items()}
        counters = snapshot.counters
        graph._next_node, graph._next_profile = counters.node_seq, counters.profile_seq
        graph._next_link, graph._next_merge = counters.link_id, counters.merge_seq
        anchors = {nodes[a].identifier: states for a, states in snapshot.traits.items()}
        graph.traits.restore(anchors, counters.trait_seq)
        graph._reset_changes()
        return graph

    # -- internals: nodes, profiles, links ---------------------------------------------------

    def _reset_changes(self) -> None:
        self._dirty_nodes: set[Identifier] = set()
        self._new_profiles: list[str] = []
        self._dirty_links: set[int] = set()
        self._removed_links: set[int] = set()
        self._new_merges: list[MergeRecord] = []
        self._new_blocked: list[Identifier] = []
        self._new_refusals: list[tuple[Identifier, str]] = []
        self._erasure = Erasure()

    def _usable(self, identifiers: Iterable[Identifier]) -> list[Identifier]:
        """The identifiers that may link, without duplicates, by priority then value."""
        rules = self._rules
        nodes = self._nodes
        usable = {
            # Known identifiers are replaced by the graph's own object, so that links and
            # traits share it instead of keeping a copy per item.
            node.identifier if (node := nodes.get(i)) is not None else i
            for i in identifiers
            if rules.rule_for(i.type) is not None
            and i not in self._blocked
            and not rules.is_blocked(i)
        }
        return sorted(usable, key=self._priority_key)

    def _members_of(self, profile_id: str) -> set[Identifier]:
        profile = self._profiles.get(profile_id)
        return set() if profile is None else profile.members

    def _counters(self) -> Counters:
        return Counters(
            node_seq=self._next_node,
            profile_seq=self._next_profile,
            link_id=self._next_link,
            merge_seq=self._next_merge,
            trait_seq=self.traits.seq,
        )

    def _priority_key(self, identifier: Identifier) -> tuple[int, str, str]:
        return self._type_rank(identifier.type), identifier.type, identifier.value

    def _type_rank(self, identifier_type: str) -> int:
        rule = self._rules.rule_for(identifier_type)
        return _UNRULED_PRIORITY if rule is None else rule.priority

    def _policy(self, identifier_type: str) -> LimitPolicy:
        rule = self._rules.rule_for(identifier_type)
        return LimitPolicy.REFUSE_MERGE if rule is None else rule.on_limit

    def _create(self, founder: Identifier) -> _Profile:
        """A new profile founded by ``founder`` (a new node, or one that founded nothing)."""
        attempt = 0
        profile_id = profile_id_for(founder, attempt)
        while profile_id in self._founders:
            attempt += 1
            profile_id = profile_id_for(founder, attempt)
        seq = self._next_profile
        self._next_profile += 1
        profile = _Profile(profile_id, founder, seq)
        self._profiles[profile_id] = profile
        self._new_profiles.append(profile_id)
        node = self._nodes.get(founder)
        if node is None:
            node = self._add_node(profile, founder)
        else:
            self._move(node, profile)
        node.founded, node.founded_seq = profile_id, seq
        self._founders[profile_id] = node
        return profile

    def _add_node(self, profile: _Profile, identifier: Identifier) -> _Node:
        node = self._nodes[identifier] = _Node(identifier, profile.id, self._next_node)
        self._next_node += 1
        profile.add(identifier)
        self._dirty_nodes.add(identifier)
        return node

    def _move(self, node: _Node, profile: _Profile) -> None:
        node.profile = profile.id
        profile.add(node.identifier)
        self._dirty_nodes.add(node.identifier)

    def _add_link(
        self,
        profile: _Profile,
        identifiers: tuple[Identifier, ...],
        origin: MergeOrigin,
        evidence: EvidenceRef,
        reason: str = "",
    ) -> None:
        if identifiers in self._link_of_set:
            return
        link_id = self._next_link
        self._next_link += 1
        self._store_link(profile, Link(link_id, identifiers, origin, evidence, reason))

    def _store_link(self, profile: _Profile, link: Link) -> None:
        self._links[link.link_id] = link
        self._link_of_set.setdefault(link.identifiers, link.link_id)
        profile.links.append(link.link_id)
        self._dirty_links.add(link.link_id)

    def _drop_link(self, profile: _Profile, link_id: int) -> None:
        link = self._links.pop(link_id)
        if self._link_of_set.get(link.identifiers) == link_id:
            del self._link_of_set[link.identifiers]
        profile.links.remove(link_id)
        self._dirty_links.discard(link_id)
        self._removed_links.add(link_id)

    def _absorb(self, survivor: _Profile, others: Iterable[_Profile]) -> tuple[str, ...]:
        """Move every member and link of ``others`` into ``survivor``; retire their ids.

        Returns the traits whose surviving value changed on the survivor.
        """
        before = self.traits.values(survivor.id)
        for other in others:
            for member in other.members:
                self._nodes[member].profile = survivor.id
            self._dirty_nodes.update(other.members)
            survivor.members |= other.members
            survivor.links.extend(other.links)
            del self._profiles[other.id]
        return changed_names(before, self.traits.values(survivor.id))

    def _core(self, profile: _Profile, leaving: set[Identifier]) -> set[Identifier]:
        """What stays together when ``leaving`` is taken out of ``profile``: the connected part
        of the other identifiers that holds the oldest founder (the profile's own founder when
        it stays)."""
        rest = profile.members - leaving
        links = (
            [i for i in self._links[link_id].identifiers if i not in leaving]
            for link_id in profile.links
        )
        oldest: list[Identifier] = min(_components(rest, links), key=self._part_age)
        return set(oldest)

    def _cut(self, profile: _Profile, side: set[Identifier]) -> None:
        """Split every link of ``profile`` that joins identifiers of ``side`` to others."""
        for link_id in sorted(profile.links):
            link = self._links[link_id]
            inside = tuple(i for i in link.identifiers if i in side)
            if not inside or len(inside) == len(link.identifiers):
                continue
            outside = tuple(i for i in link.identifiers if i not in side)
            self._drop_link(profile, link_id)
            # Each side keeps what the evidence said about it alone.
            for part in (outside, inside):
                if len(part) > 1:
                    self._add_link(profile, part, link.origin, link.evidence, link.reason)

    def _split(self, profile: _Profile) -> list[_Profile]:
        """Recompute the connected parts of ``profile`` from its links; the founder's part keeps
        the profile, other parts become (or resurrect) profiles. Original first."""
        links = {link_id: self._links[link_id].identifiers for link_id in profile.links}
        groups = _components(profile.members, links.values())
        part_of = {member: index for index, group in enumerate(groups) for member in group}
        links_of_part: dict[int, list[int]] = {}
        for link_id, identifiers in links.items():
            links_of_part.setdefault(part_of[identifiers[0]], []).append(link_id)

        kept = part_of[profile.founder]
        profile.members = set(groups[kept])
        profile.links = links_of_part.get(kept, [])
        parts = [profile]
        others = sorted(
            (i for i in range(len(groups)) if i != kept), key=lambda i: self._part_age(groups[i])
        )
        for index in others:
            members = groups[index]
            part = self._part_profile(members)
            for member in members:
                if member != part.founder:
                    self._move(self._nodes[member], part)
            part.links = links_of_part.get(index, [])
            parts.append(part)
        return parts

    def _part_age(self, members: list[Identifier]) -> tuple[int, int]:
        """Sort key of a split part: the oldest profile a member founded, else its oldest node."""
        nodes = [self._nodes[m] for m in members]
        founded = [n.founded_seq for n in nodes if n.founded]
        if founded:
            return 0, min(founded)
        return 1, min(n.seq for n in nodes)

    def _part_profile(self, members: list[Identifier]) -> _Profile:
        """The profile of a split part: the oldest profile one of its members founded, back
        from retirement, or a new one founded by its oldest member."""
        nodes = [self._nodes[m] for m in members]
        founders = [n for n in nodes if n.founded]
        if not founders:
            return self._create(min(nodes, key=lambda n: n.seq).identifier)
        founder = min(founders, key=lambda n: n.founded_seq)
        profile = _Profile(founder.founded, founder.identifier, founder.founded_seq)
        self._profiles[profile.id] = profile
        self._move(founder, profile)
        return profile

    # -- internals: history, blocking --------------------------------------------------------

    def _record(self, **fields: Any) -> MergeRecord:
        seq = self._next_merge
        self._next_merge += 1
        record = MergeRecord(merge_id=f"m_{seq:016x}", **fields)
        self._remember(record)
        self._new_merges.append(record)
        return record

    def _remember(self, record: MergeRecord) -> None:
        self._merges.append(record)
        for profile_id in {*record.profile_ids, *record.resulting_profile_ids}:
            self._merges_by_profile.setdefault(profile_id, []).append(record)

    def _note_refusal(self, identifier: Identifier, profile_id: str) -> bool:
        """Count a refusal of ``identifier`` on ``profile_id``; True if that blocks it now."""
        maximum = self._rules.max_profiles_per_identifier
        refused_on = self._refused_on.setdefault(identifier, set())
        if profile_id in refused_on:
            return False
        refused_on.add(profile_id)
        self._new_refusals.append((identifier, profile_id))
        if not maximum or identifier in self._blocked:
            return False
        # Distinct live profiles: ids refused earlier may have merged since.
        profiles = {self.canonical(p) for p in refused_on}
        profiles.add(self.resolve(identifier))
        profiles.discard(None)
        if len(profiles) <= maximum:
            return False
        self._blocked.add(identifier)
        self._new_blocked.append(identifier)
        return True


def _present(values: Mapping[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in values.items() if value is not None}


def _components(
    members: Iterable[Identifier], links: Iterable[Sequence[Identifier]]
) -> list[list[Identifier]]:
    """The connected groups of ``members`` through ``links`` (union-find, path halving)."""
    parent = {m: m for m in members}

    def root(node: Identifier) -> Identifier:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for link in links:
        if not link:
            continue
        first = root(link[0])
        for identifier in link[1:]:
            other = root(identifier)
            if other != first:
                parent[other] = first
    groups: dict[Identifier, list[Identifier]] = {}
    for member in parent:
        groups.setdefault(root(member), []).append(member)
    return list(groups.values())


def _broken(
    counts: Mapping[str, int], adds: Mapping[str, int], limits: Mapping[str, int]
) -> list[str]:
    """The types whose limit ``counts + adds`` would exceed."""
    return [
        t for t, n in adds.items() if (limit := limits.get(t, 0)) and counts.get(t, 0) + n > limit
    ]


def _merge_reason(linking: Sequence[Identifier], origin: MergeOrigin, probability: float) -> str:
    shared = ", ".join(i.key for i in linking)
    if origin is MergeOrigin.PROBABILISTIC:
        return f"probabilistic match (probability {probability:.3f}) via {shared}"
    return f"an item carried {shared}"


def _refusal_reason(
    apart: Sequence[Identifier], broken: Sequence[str], limits: Mapping[str, int], dropped: bool
) -> str:
    rules = "; ".join(f"limit of {limits[t]} {t} per profile" for t in sorted(broken))
    keys = ", ".join(i.key for i in apart)
    if dropped:
        return f"{rules}: {keys} dropped (lowest priority)"
    return f"{rules}: {keys} kept apart"


def _evidence_json(evidence: EvidenceRef) -> dict[str, Any]:
    return {
        "source": evidence.source,
        "message_id": evidence.message_id,
        "record_id": evidence.record_id,
        "match_probability": evidence.match_probability,
        "seen_at": evidence.seen_at,
    }
