"""Vectorised connected components of a whole identity graph, and the components that break
identifier limits.

Linking items one at a time (:mod:`.graph`) is what the service does as events arrive. A full
rebuild (new rules, a replay, the benchmark) works on the edge list at once: identifiers are
numbered ``0..n-1`` and every link is a pair of numbers. Components are found with numpy by
hooking and pointer jumping (Shiloach-Vishkin style):

1. every edge hooks the root of its larger endpoint under the smallest root it meets
   (roots only ever point to smaller numbers, so no cycle can form);
2. pointer jumping (``parent = parent[parent]``) flattens the trees until every node points
   at its root, or, once few edges remain, only those edges' chains are followed;
3. edges whose endpoints now share a root are dropped and the rest go round again.

Each round touches only the edges still joining two components, and identity graphs have a
small diameter (people have a handful of identifiers), so a few rounds suffice. The label of a
component is its smallest node number, which makes the result canonical: equal partitions give
equal label arrays.

Without limits the result equals linking the same items one at a time in any order. With
limits, components found here that break one (:func:`over_limit_components`) are the ones the
sequential algorithm would have kept apart: those are re-linked one item at a time, the rest
can be taken as they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from profilemesh.services.identity.identifiers import Identifier

Labels = NDArray[np.int64]


def connected_components(
    sources: NDArray[np.integer], targets: NDArray[np.integer], node_count: int
) -> Labels:
    """``labels[i]``: the smallest node number of node ``i``'s component.

    ``sources[k]`` and ``targets[k]`` are the two ends of edge ``k``, numbers in
    ``0..node_count-1``; isolated nodes are their own component.
    """
    if len(sources) != len(targets):
        raise ValueError("sources and targets must have the same length")
    # int32 halves the memory traffic of every gather, which is what the time goes to.
    index = np.int32 if node_count < 2**31 else np.int64
    parent = np.arange(node_count, dtype=index)
    u = np.asarray(sources, dtype=index)
    v = np.asarray(targets, dtype=index)
    flat = True
    while len(u):
        if flat:
            ru, rv = parent[u], parent[v]
        else:
            ru, rv = _roots(parent, u), _roots(parent, v)
        active = ru != rv
        if not active.all():
            u, v, ru, rv = u[active], v[active], ru[active], rv[active]
            if not len(u):
                break
        # ru and rv are roots, so parent[high] == high > low: hooking only lowers pointers,
        # and hooking each root under the smallest root it meets keeps the trees shallow.
        np.minimum.at(parent, np.maximum(ru, rv), np.minimum(ru, rv))
        # While many edges remain, flattening every pointer once is cheaper than walking
        # each edge's deep chains; once few remain, walking just their chains is cheaper.
        flat = len(u) * 4 > node_count
        if flat:
            _flatten(parent)
    _flatten(parent)
    return parent.astype(np.int64, copy=False)


def _roots(parent: NDArray[Any], nodes: NDArray[Any]) -> NDArray[Any]:
    """The root of each of ``nodes``, by following pointers (``parent`` unchanged)."""
    roots: NDArray[Any] = parent[nodes]
    while True:
        up: NDArray[Any] = parent[roots]
        if np.array_equal(up, roots):
            return roots
        roots = up


def _flatten(parent: NDArray[Any]) -> None:
    """Pointer jumping until every node points at its root (in place)."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return
        parent[:] = grand


def edges_of_links(links: Iterable[Sequence[int]]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """The edge list of links over numbered identifiers: each link becomes a star from its
    first identifier, which connects the same nodes with the fewest edges."""
    sources: list[int] = []
    targets: list[int] = []
    for link in links:
        first = link[0]
        for other in link[1:]:
            sources.append(first)
            targets.append(other)
    return np.asarray(sources, dtype=np.int64), np.asarray(targets, dtype=np.int64)


class Numbering:
    """Numbers identifiers ``0..n-1`` in first-seen order, and their types ``0..t-1``."""

    def __init__(self) -> None:
        self.identifiers: list[Identifier] = []
        self.numbers: dict[Identifier, int] = {}
        self.types: dict[str, int] = {}
        self._type_of: list[int] = []

    def number(self, identifier: Identifier) -> int:
        """The number of ``identifier``, given on first sight."""
        number = self.numbers.get(identifier)
        if number is None:
            number = self.numbers[identifier] = len(self.identifiers)
            self.identifiers.append(identifier)
            self._type_of.append(self.types.setdefault(identifier.type, len(self.types)))
        return number

    def node_types(self) -> NDArray[np.int64]:
        """Type number of every identifier, by identifier number."""
        return np.asarray(self._type_of, dtype=np.int64)


def over_limit_components(
    labels: Labels, node_types: NDArray[np.integer], limits: Sequence[int]
) -> NDArray[np.int64]:
    """The labels of components holding more identifiers of some type than its limit.

    ``node_types[i]`` is the type number of node ``i`` and ``limits[t]`` the limit of type
    ``t`` (0 is unlimited). Sorted, without duplicates.
    """
    over = np.zeros(len(labels), dtype=bool)
    for type_number, limit in enumerate(limits):
        if not limit:
            continue
        of_type = labels[node_types == type_number]
        if not len(of_type):
            continue
        counts = np.bincount(of_type, minlength=len(labels))
        over |= counts > limit
    return np.flatnonzero(over).astype(np.int64)


def limits_by_number(numbering: Numbering, limits: Mapping[str, int]) -> list[int]:
    """The limit of each type number of ``numbering`` (0 for types without one)."""
    by_number = [0] * len(numbering.types)
    for identifier_type, number in numbering.types.items():
        by_number[number] = limits.get(identifier_type, 0)
    return by_number


@dataclass(frozen=True)
class Rebuild:
    """The partition of a whole graph: identifiers numbered, each one's component label, and
    the labels of the components that break a limit."""

    numbering: Numbering
    labels: Labels
    over_limit: NDArray[np.int64]

    def groups(self) -> list[list[Identifier]]:
        """The identifiers of every component, each component in numbering order."""
        members: dict[int, list[Identifier]] = {}
        for number, label in enumerate(self.labels.tolist()):
            members.setdefault(label, []).append(self.numbering.identifiers[number])
        return list(members.values())


def rebuild(links: Iterable[Sequence[Identifier]], limits: Mapping[str, int]) -> Rebuild:
    """Components of the identifiers joined by ``links`` (e.g. every stored link of the graph,
    or every item's identifiers under new rules), and those breaking ``limits`` (type -> most
    identifiers of the type per profile, 0 or missing for unlimited)."""
    numbering = Numbering()
    numbered = [[numbering.number(identifier) for identifier in link] for link in links]
    sources, targets = edges_of_links(numbered)
    labels = connected_components(sources, targets, len(numbering.identifiers))
    over = over_limit_components(
        labels, numbering.node_types(), limits_by_number(numbering, limits)
    )
    return Rebuild(numbering, labels, over)


def component_sizes(labels: Labels) -> NDArray[np.int64]:
    """Size of every component, indexed by label (0 for numbers that are not labels)."""
    return np.bincount(labels, minlength=len(labels)).astype(np.int64)
