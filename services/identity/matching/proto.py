"""Converters between the matching domain and the ``profilemesh.identity.v1`` messages.

The servicer of ``MatchRecords`` (and identity rules that store ``MatchingSettings``) call
these; the domain itself never sees a protobuf. Protobuf's zero values mean "default" here as
the contract says: a threshold of 0 is 0.95, 0 EM iterations is 25, a prior of 0 is estimated.

Settings beyond the contract (EM tolerance, sample size, aliases, seed) are not carried.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf import json_format
from pydantic import ValidationError

from profilemesh.identity.v1 import identity_service_pb2, matching_pb2
from profilemesh.ingestion.v1 import record_pb2
from profilemesh.services.identity.matching.api import MatchModel, MatchResult
from profilemesh.services.identity.matching.explain import PairExplanation
from profilemesh.services.identity.matching.records import RecordRef
from profilemesh.services.identity.matching.settings import (
    BlockingKey,
    BlockingTransform,
    Comparator,
    ComparisonLevel,
    MatchSettings,
)
from profilemesh.shared.errors import FieldViolation, InvalidArgument

RECORD_ID_COLUMN = "record_id"
"""Column of :func:`records_from_proto` rows holding ``CustomerRecord.record_id``."""
SOURCE_COLUMN = "source"
"""Column of :func:`records_from_proto` rows holding ``CustomerRecord.source``."""

_COMPARATORS: dict[Comparator, matching_pb2.Comparator.ValueType] = {
    Comparator.EXACT: matching_pb2.COMPARATOR_EXACT,
    Comparator.JARO_WINKLER: matching_pb2.COMPARATOR_JARO_WINKLER,
    Comparator.LEVENSHTEIN: matching_pb2.COMPARATOR_LEVENSHTEIN,
    Comparator.JACCARD: matching_pb2.COMPARATOR_JACCARD,
    Comparator.DATE_DIFFERENCE: matching_pb2.COMPARATOR_DATE_DIFFERENCE,
    Comparator.NUMERIC_DIFFERENCE: matching_pb2.COMPARATOR_NUMERIC_DIFFERENCE,
    Comparator.EITHER_NULL: matching_pb2.COMPARATOR_EITHER_NULL,
    Comparator.ELSE: matching_pb2.COMPARATOR_ELSE,
    Comparator.DAMERAU_LEVENSHTEIN: matching_pb2.COMPARATOR_DAMERAU_LEVENSHTEIN,
    Comparator.DATE_SWAPPED_DAY_MONTH: matching_pb2.COMPARATOR_DATE_SWAPPED_DAY_MONTH,
    Comparator.NICKNAME: matching_pb2.COMPARATOR_NICKNAME,
    Comparator.TOKEN_SET: matching_pb2.COMPARATOR_TOKEN_SET,
}
_COMPARATORS_BACK = {number: comparator for comparator, number in _COMPARATORS.items()}

_TRANSFORMS: dict[BlockingTransform, matching_pb2.BlockingTransform.ValueType] = {
    BlockingTransform.EXACT: matching_pb2.BLOCKING_TRANSFORM_EXACT,
    BlockingTransform.PREFIX: matching_pb2.BLOCKING_TRANSFORM_PREFIX,
    BlockingTransform.SOUNDEX: matching_pb2.BLOCKING_TRANSFORM_SOUNDEX,
    BlockingTransform.YEAR: matching_pb2.BLOCKING_TRANSFORM_YEAR,
}
_TRANSFORMS_BACK = {number: transform for transform, number in _TRANSFORMS.items()}

_DEFAULT_THRESHOLD = 0.95
_DEFAULT_EM_ITERATIONS = 25


# Settings -----------------------------------------------------------------------------------


def _level_to_proto(level: ComparisonLevel, where: str) -> matching_pb2.ComparisonLevel:
    message = matching_pb2.ComparisonLevel(
        label=level.label,
        comparator=_COMPARATORS[level.comparator],
        threshold=level.threshold,
        cross_attribute=level.cross_attribute or "",
        cross_either_way=level.cross_either_way,
    )
    if level.m_probability is not None:
        message.m_probability = level.m_probability
    if level.u_probability is not None:
        message.u_probability = level.u_probability
    return message


def _key_to_proto(key: BlockingKey, where: str) -> matching_pb2.BlockingKey:
    return matching_pb2.BlockingKey(
        attribute=key.attribute,
        transform=_TRANSFORMS[key.transform],
        prefix_length=key.prefix_length,
        other_attribute=key.other_attribute or "",
    )


def settings_to_proto(
    settings: MatchSettings, *, enabled: bool = False
) -> matching_pb2.MatchingSettings:
    """``settings`` as a ``MatchingSettings`` message."""
    return matching_pb2.MatchingSettings(
        enabled=enabled,
        blocking_rules=[
            matching_pb2.BlockingRule(
                name=rule.name,
                keys=[
                    _key_to_proto(key, f"blocking_rules[{r}].keys[{k}]")
                    for k, key in enumerate(rule.keys)
                ],
            )
            for r, rule in enumerate(settings.blocking_rules)
        ],
        comparisons=[
            matching_pb2.Comparison(
                name=comparison.name,
                attribute=comparison.attribute,
                term_frequency_adjustments=comparison.term_frequency_adjustments,
                levels=[
                    _level_to_proto(level, f"comparisons[{c}].levels[{v}]")
                    for v, level in enumerate(comparison.levels)
                ],
            )
            for c, comparison in enumerate(settings.comparisons)
        ],
        match_threshold=settings.match_threshold,
        probability_two_random_records_match=settings.probability_two_random_records_match or 0.0,
        max_em_iterations=settings.max_em_iterations,
    )


def _violations(error: ValidationError, field: str) -> list[FieldViolation]:
    violations = []
    for problem in error.errors():
        path = field
        for part in problem["loc"]:
            path += f"[{part}]" if isinstance(part, int) else f".{part}"
        violations.append(FieldViolation(path, problem["msg"]))
    return violations


def settings_from_proto(
    message: matching_pb2.MatchingSettings, *, field: str = "settings"
) -> MatchSettings:
    """The settings a ``MatchingSettings`` message describes.

    :class:`InvalidArgument` names each offending field (``settings.comparisons[1].levels[0]
    .comparator``), as the error interceptor reports them.
    """
    violations: list[FieldViolation] = []
    comparisons: list[dict[str, Any]] = []
    for c, comparison in enumerate(message.comparisons):
        levels = []
        for v, level in enumerate(comparison.levels):
            comparator = _COMPARATORS_BACK.get(level.comparator)
            if comparator is None:
                violations.append(
                    FieldViolation(
                        f"{field}.comparisons[{c}].levels[{v}].comparator", "must be set"
                    )
                )
                continue
            levels.append(
                {
                    "label": level.label,
                    "comparator": comparator,
                    "threshold": level.threshold,
                    "m_probability": (
                        level.m_probability if level.HasField("m_probability") else None
                    ),
                    "u_probability": (
                        level.u_probability if level.HasField("u_probability") else None
                    ),
                    "cross_attribute": level.cross_attribute or None,
                    "cross_either_way": level.cross_either_way,
                }
            )
        comparisons.append(
            {
                "name": comparison.name,
                "attribute": comparison.attribute,
                "levels": levels,
                "term_frequency_adjustments": comparison.term_frequency_adjustments,
            }
        )
    if violations:
        raise InvalidArgument("invalid matching settings", violations=violations)
    document = {
        "blocking_rules": [
            {
                "name": rule.name,
                "keys": [
                    {
                        "attribute": key.attribute,
                        "transform": _TRANSFORMS_BACK.get(key.transform, BlockingTransform.EXACT),
                        "prefix_length": key.prefix_length,
                        "other_attribute": key.other_attribute or None,
                    }
                    for key in rule.keys
                ],
            }
            for rule in message.blocking_rules
        ],
        "comparisons": comparisons,
        "match_threshold": message.match_threshold or _DEFAULT_THRESHOLD,
        "probability_two_random_records_match": (
            message.probability_two_random_records_match or None
        ),
        "max_em_iterations": message.max_em_iterations or _DEFAULT_EM_ITERATIONS,
    }
    try:
        return MatchSettings.model_validate(document)
    except ValidationError as error:
        raise InvalidArgument(
            "invalid matching settings", violations=_violations(error, field)
        ) from None


# Records ------------------------------------------------------------------------------------


def records_from_proto(records: Iterable[record_pb2.CustomerRecord]) -> list[dict[str, Any]]:
    """Customer records as rows for ``match_records(rows, id_column=RECORD_ID_COLUMN,
    source_column=SOURCE_COLUMN)``.

    Attributes keep their nesting (``attributes.address.postcode``) and each identifier type
    becomes ``identifiers.<type>`` (the first value of that type), which the attribute
    synonyms resolve (``identifiers.email`` is ``email``).
    """
    rows = []
    for record in records:
        identifiers: dict[str, str] = {}
        for identifier in record.identifiers:
            identifiers.setdefault(identifier.type, identifier.value)
        rows.append(
            {
                RECORD_ID_COLUMN: record.record_id,
                SOURCE_COLUMN: record.source,
                "attributes": json_format.MessageToDict(record.attributes),
                "identifiers": identifiers,
            }
        )
    return rows


def record_ref_to_proto(ref: RecordRef) -> matching_pb2.RecordRef:
    """A :class:`RecordRef` as a message."""
    return matching_pb2.RecordRef(source=ref.source, record_id=ref.record_id)


# Results ------------------------------------------------------------------------------------


def explanation_to_proto(explanation: PairExplanation) -> matching_pb2.RecordMatch:
    """A pair and its reasons as a ``RecordMatch``."""
    return matching_pb2.RecordMatch(
        left=record_ref_to_proto(explanation.left),
        right=record_ref_to_proto(explanation.right),
        match_probability=explanation.match_probability,
        match_weight=explanation.match_weight,
        comparisons=[
            matching_pb2.ComparisonExplanation(
                comparison=c.comparison,
                level=c.level,
                left_value=c.left_value,
                right_value=c.right_value,
                m_probability=c.m_probability,
                u_probability=c.u_probability,
                weight=c.weight,
            )
            for c in explanation.comparisons
        ],
    )


def model_to_proto(model: MatchModel) -> matching_pb2.MatchingModel:
    """The estimated parameters as a ``MatchingModel``."""
    return matching_pb2.MatchingModel(
        probability_two_random_records_match=model.probability_two_random_records_match,
        levels=[
            matching_pb2.LevelEstimate(
                comparison=level.comparison,
                level=level.level,
                m_probability=level.m_probability,
                u_probability=level.u_probability,
                weight=level.weight,
            )
            for level in model.levels
        ],
        em_iterations=model.em_iterations,
        converged=model.converged,
        candidate_pairs=model.candidate_pairs,
    )


def clusters_to_proto(clusters: Sequence[Sequence[RecordRef]]) -> list[matching_pb2.RecordCluster]:
    """Clusters (as from :meth:`MatchResult.cluster_list`) as messages, in the order given."""
    return [
        matching_pb2.RecordCluster(records=[record_ref_to_proto(ref) for ref in members])
        for members in clusters
    ]


def result_to_proto(result: MatchResult) -> identity_service_pb2.MatchRecordsResponse:
    """The whole answer of ``MatchRecords``: clusters (largest first), every accepted pair
    with its explanation (most probable first), and the model."""
    return identity_service_pb2.MatchRecordsResponse(
        clusters=clusters_to_proto(result.cluster_list()),
        matches=[explanation_to_proto(result.explain(pair)) for pair in result.pairs],
        model=model_to_proto(result.model),
    )
