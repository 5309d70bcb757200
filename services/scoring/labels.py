"""Training labels as point-in-time counts, computed by the features service.

A label looks at what happens *after* a cut-off, which no feature may do. It is still a
difference of two features: with ``outcomes`` = the number of label events up to a time,

    events in (cut-off, cut-off + horizon] = outcomes(cut-off + horizon) - outcomes(cut-off)

so a training set needs two point-in-time reads of ``outcomes`` and nothing but the features
service's own, leak-free machinery. Eligibility is another count at the cut-off:

- churn: a label event in the eligibility window before the cut-off (active customers);
  label 1 when none follows within the horizon;
- propensity: any event in the eligibility window; label 1 when a label event follows;
- lead: as propensity, among profiles with no label event before the cut-off (not converted).

The counts are definitions sent with the request only (``extra_definitions``), never stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from google.protobuf import duration_pb2

from profilemesh.common.v1 import event_type_pb2
from profilemesh.features.v1 import feature_definition_pb2 as fd
from profilemesh.scoring.v1 import model_pb2
from profilemesh.shared.errors import InvalidArgument

OUTCOMES = "label_outcomes_to_date"
"""Label events up to the row's time (lifetime count)."""
OUTCOMES_RECENT = "label_outcomes_in_window"
"""Label events in the eligibility window before the row's time."""
ACTIVITY_RECENT = "label_activity_in_window"
"""Events of any kind in the eligibility window before the row's time."""

KINDS = {
    model_pb2.MODEL_KIND_CHURN: "churn",
    model_pb2.MODEL_KIND_PROPENSITY: "propensity",
    model_pb2.MODEL_KIND_LEAD: "lead",
}


def _days(duration: duration_pb2.Duration) -> int:
    return math.ceil((duration.seconds + duration.nanos / 1e9) / 86_400)


@dataclass(frozen=True, slots=True)
class LabelPlan:
    """A checked label definition and the counts it needs."""

    kind: int
    horizon_days: int
    window_days: int | None
    """The eligibility window; None means any time before the cut-off."""
    definitions: tuple[fd.FeatureDefinition, ...]

    @property
    def horizon_ns(self) -> int:
        return self.horizon_days * 86_400 * 1_000_000_000


def plan(label: model_pb2.LabelDefinition, field: str = "label") -> LabelPlan:
    """The counts behind ``label``; InvalidArgument names what is wrong with it."""
    if label.kind not in KINDS:
        raise InvalidArgument.for_field(f"{field}.kind", "set CHURN, PROPENSITY or LEAD")
    if not label.event_names:
        raise InvalidArgument.for_field(f"{field}.event_names", "name at least one event")
    if not label.HasField("horizon") or _days(label.horizon) < 1:
        raise InvalidArgument.for_field(f"{field}.horizon", "at least one day")
    if label.HasField("eligibility_window") and _days(label.eligibility_window) < 1:
        raise InvalidArgument.for_field(f"{field}.eligibility_window", "at least one day")
    window = _days(label.eligibility_window) if label.HasField("eligibility_window") else None

    def count(name: str, *, outcomes: bool, windowed: bool) -> fd.FeatureDefinition:
        definition = fd.FeatureDefinition(name=name, aggregation=fd.AGGREGATION_COUNT)
        if outcomes:
            definition.event_types.append(event_type_pb2.EVENT_TYPE_TRACK)
            definition.event_names.extend(label.event_names)
            definition.filters.extend(label.filters)
        else:
            definition.event_types.append(event_type_pb2.EVENT_TYPE_UNSPECIFIED)
        if windowed and window is not None:
            definition.window.FromSeconds(window * 86_400)
        return definition

    return LabelPlan(
        kind=label.kind,
        horizon_days=_days(label.horizon),
        window_days=window,
        definitions=(
            count(OUTCOMES, outcomes=True, windowed=False),
            count(OUTCOMES_RECENT, outcomes=True, windowed=True),
            count(ACTIVITY_RECENT, outcomes=False, windowed=True),
        ),
    )


def label_rows(
    plan: LabelPlan, at_cutoff: pa.Table, after_horizon: pa.Table
) -> tuple[np.ndarray, np.ndarray]:
    """Which rows of ``at_cutoff`` are eligible, and their labels (0/1), given the same rows'
    ``OUTCOMES`` one horizon later in ``after_horizon`` (same order)."""
    before = _counts(at_cutoff, OUTCOMES)
    after = _counts(after_horizon, OUTCOMES)
    recent_outcomes = _counts(at_cutoff, OUTCOMES_RECENT)
    recent_activity = _counts(at_cutoff, ACTIVITY_RECENT)
    happened = after - before > 0
    if plan.kind == model_pb2.MODEL_KIND_CHURN:
        eligible = recent_outcomes > 0
        labels = ~happened
    elif plan.kind == model_pb2.MODEL_KIND_PROPENSITY:
        eligible = recent_activity > 0
        labels = happened
    else:
        eligible = (recent_activity > 0) & (before == 0)
        labels = happened
    return eligible, labels.astype(np.int8)


def _counts(table: pa.Table, name: str) -> np.ndarray:
    column = table.column(name).cast(pa.int64()).fill_null(0)
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.int64)
