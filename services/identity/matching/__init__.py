"""Probabilistic record matching for identity: Fellegi-Sunter with EM-estimated weights.

::

    from profilemesh.services.identity.matching import DEFAULT, match_records

    result = match_records(rows, id_column="customer_id")      # deduplicate
    result = match_records(crm, billing, id_column="id")       # link two inputs
    result.pairs, result.clusters, result.model, result.explain(result.pairs[0])

Settings are data (:mod:`.settings`), written with the comparison library (:mod:`.library`);
:mod:`.proto` converts to and from the ``profilemesh.identity.v1`` messages.
"""

from profilemesh.services.identity.matching.api import (
    LevelEstimate,
    MatchModel,
    MatchResult,
    ScoredPair,
    match_records,
)
from profilemesh.services.identity.matching.defaults import DEFAULT
from profilemesh.services.identity.matching.explain import ComparisonExplanation, PairExplanation
from profilemesh.services.identity.matching.records import RecordRef, Records
from profilemesh.services.identity.matching.settings import (
    BlockingKey,
    BlockingRule,
    BlockingTransform,
    Comparator,
    Comparison,
    ComparisonLevel,
    MatchSettings,
)

__all__ = [
    "DEFAULT",
    "BlockingKey",
    "BlockingRule",
    "BlockingTransform",
    "Comparator",
    "Comparison",
    "ComparisonExplanation",
    "ComparisonLevel",
    "LevelEstimate",
    "MatchModel",
    "MatchResult",
    "MatchSettings",
    "PairExplanation",
    "RecordRef",
    "Records",
    "ScoredPair",
    "match_records",
]
