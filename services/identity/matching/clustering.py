"""Clusters: records connected, directly or through others, by accepted pairs.

Matching decides pairs; a person with three records may have only two of the three pairs
above the threshold, and still all three are one person. Connected components of the graph of
accepted pairs (scipy's sparse graph routine) make that call.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy.sparse import coo_matrix  # type: ignore[import-untyped]
from scipy.sparse.csgraph import connected_components  # type: ignore[import-untyped]

from profilemesh.services.identity.matching.encoding import Indices


def connected_clusters(nodes: int, first: Indices, second: Indices) -> npt.NDArray[np.int64]:
    """The cluster number of each of ``nodes`` nodes joined by edges (first[k], second[k]).

    Clusters are numbered 0, 1, ... in the order of their first node, so that the numbering is
    stable for the same input whatever order the edges come in.
    """
    graph = coo_matrix((np.ones(len(first), dtype=np.int8), (first, second)), shape=(nodes, nodes))
    _, labels = connected_components(graph, directed=False)
    _, first_node = np.unique(labels, return_index=True)
    renumber = np.argsort(np.argsort(first_node))  # rank of each cluster's first node
    return np.asarray(renumber[labels], dtype=np.int64)
