"""One training run, end to end: the point-in-time training set from the features service,
LightGBM with time-based validation (:mod:`.model`), and a new version in the registry.

Cut-offs default to monthly ones over the available history, the latest one horizon before
the latest event, so that every label is fully observed.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from google.protobuf import json_format, struct_pb2

from profilemesh.common.v1 import event_type_pb2, job_pb2
from profilemesh.features.v1 import feature_definition_pb2 as fd
from profilemesh.scoring.v1 import model_pb2
from profilemesh.services.scoring import labels
from profilemesh.services.scoring.features_client import FeaturesClient, matrix_of, pin
from profilemesh.services.scoring.model import TrainingSet, train
from profilemesh.services.scoring.registry import ModelRegistry
from profilemesh.shared.errors import FailedPrecondition, InvalidArgument

NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
DAY_NS = 86_400 * 1_000_000_000
CUTOFF_SPACING_DAYS = 30
MAX_DEFAULT_CUTOFFS = 12
BASELINE_FEATURES = ("recency_days", "frequency_365d", "monetary_365d")
"""The simple baseline every model is compared with: logistic regression on RFM (or on the
first feature when the schema has none of these)."""
_FIRST_SEEN = "history_first_event_days"
_LAST_SEEN = "history_last_event_days"


def new_run(model: str) -> model_pb2.TrainingRun:
    run = model_pb2.TrainingRun(
        run_id=uuid.uuid4().hex[:16], model=model, state=job_pb2.JOB_STATE_PENDING
    )
    run.created_at.GetCurrentTime()
    return run


def check_request(request: Any) -> labels.LabelPlan:
    """What can be checked before the run starts; InvalidArgument names the field."""
    if not NAME.match(request.model):
        raise InvalidArgument.for_field("model", "lower_snake_case, at most 63 characters")
    if not request.feature_names:
        raise InvalidArgument.for_field("feature_names", "name at least one feature")
    return labels.plan(request.label)


async def default_cutoffs(
    features: FeaturesClient, plan: labels.LabelPlan, now_ns: int
) -> list[int]:
    """Monthly cut-offs, the latest one horizon before the latest event, oldest first."""
    bounds = [
        fd.FeatureDefinition(
            name=_FIRST_SEEN,
            aggregation=fd.AGGREGATION_DAYS_SINCE_FIRST,
            event_types=[event_type_pb2.EVENT_TYPE_UNSPECIFIED],
        ),
        fd.FeatureDefinition(
            name=_LAST_SEEN,
            aggregation=fd.AGGREGATION_DAYS_SINCE,
            event_types=[event_type_pb2.EVENT_TYPE_UNSPECIFIED],
        ),
    ]
    table = await features.historical([_FIRST_SEEN, _LAST_SEEN], cutoffs=[now_ns], extra=bounds)
    if table.num_rows == 0:
        raise FailedPrecondition(
            "there are no events to train on yet", violations=[("cutoffs", "no history")]
        )
    first = now_ns - int(float(pc.max(table.column(_FIRST_SEEN)).as_py()) * DAY_NS)
    last = now_ns - int(float(pc.min(table.column(_LAST_SEEN)).as_py()) * DAY_NS)
    cutoff = last - plan.horizon_ns
    earliest = first + CUTOFF_SPACING_DAYS * DAY_NS
    cutoffs: list[int] = []
    while cutoff >= earliest and len(cutoffs) < MAX_DEFAULT_CUTOFFS:
        cutoffs.append(cutoff)
        cutoff -= CUTOFF_SPACING_DAYS * DAY_NS
    return sorted(cutoffs)


async def build_training_set(
    features: FeaturesClient,
    plan: labels.LabelPlan,
    names: Sequence[str],
    cutoffs: Sequence[int],
) -> TrainingSet:
    """Eligible profiles at every cut-off, their features then and their labels after."""
    counts = [d.name for d in plan.definitions]
    at_cutoff = await features.historical(
        [*names, *counts], cutoffs=cutoffs, extra=plan.definitions
    )
    stamps = at_cutoff.column("event_timestamp").cast(pa.int64())
    later = pa.table(
        {
            "profile_id": at_cutoff.column("profile_id"),
            "event_timestamp": pc.add(stamps, plan.horizon_ns).cast(pa.timestamp("ns", tz="UTC")),
        }
    )
    after = await features.historical([labels.OUTCOMES], rows=later, extra=[plan.definitions[0]])
    eligible, outcome = labels.label_rows(plan, at_cutoff, after)
    chosen = at_cutoff.filter(pa.array(eligible))
    plain = [n.partition("@")[0] for n in names]
    baseline = tuple(plain.index(n) for n in BASELINE_FEATURES if n in plain)
    return TrainingSet(
        feature_names=tuple(names),
        matrix=matrix_of(chosen, names),
        labels=outcome[eligible],
        cutoffs=np.asarray(stamps.to_numpy(zero_copy_only=False))[eligible].astype(np.int64),
        baseline_columns=baseline,
        horizon_ns=plan.horizon_ns,
    )


async def run_training(
    request: Any,
    run: model_pb2.TrainingRun,
    features: FeaturesClient,
    registry: ModelRegistry,
) -> model_pb2.ModelVersion:
    """Build, train, register; ``run`` is updated as it goes (the caller reports failures)."""
    plan = check_request(request)
    kind = registry.kind_of(request.model)
    if kind is not None and kind != plan.kind:
        raise InvalidArgument.for_field(
            "label.kind", f"model {request.model!r} is of another kind; use another name"
        )
    run.state = job_pb2.JOB_STATE_RUNNING
    run.started_at.GetCurrentTime()
    run.stage, run.progress = "building training set", 0.05
    names = pin(request.feature_names, await features.definitions())
    now = time.time_ns()
    cutoffs = sorted(c.ToNanoseconds() for c in request.cutoffs)
    if not cutoffs:
        cutoffs = await default_cutoffs(features, plan, now)
    for index, cutoff in enumerate(cutoffs):
        if cutoff + plan.horizon_ns > now:
            raise InvalidArgument.for_field(
                f"cutoffs[{index}]", "cut-off plus horizon is in the future: labels unknown"
            )
    validation = request.validation_cutoffs or 1
    if len(cutoffs) <= validation:
        raise FailedPrecondition(
            f"{len(cutoffs)} cut-off(s) of history; training needs more than {validation}",
            violations=[("cutoffs", "not enough history")],
        )
    training = await build_training_set(features, plan, names, cutoffs)
    run.stage, run.progress = "training", 0.4
    params = json_format.MessageToDict(request.params) if request.HasField("params") else None
    trained = await asyncio.to_thread(train, training, validation_cutoffs=validation, params=params)
    run.stage, run.progress = "registering", 0.9
    metadata = model_pb2.ModelVersion(
        model=request.model,
        kind=plan.kind,  # type: ignore[arg-type]
        description=request.description,
        label=request.label,
        feature_names=names,
        metrics=_metrics(trained.metrics),
        baseline_metrics=_metrics(trained.baseline_metrics),
        baseline=trained.baseline,
        feature_importances=[
            model_pb2.FeatureImportance(feature=f, gain=g) for f, g in trained.importances
        ],
    )
    metadata.params.CopyFrom(_struct(trained.params))
    for cutoff in cutoffs:
        metadata.cutoffs.add().FromNanoseconds(int(cutoff))
    if len(training.cutoffs):
        metadata.data_start.FromNanoseconds(int(training.cutoffs.min()))
    metadata.data_end.FromNanoseconds(int(max(cutoffs) + plan.horizon_ns))
    metadata.create_time.GetCurrentTime()
    return registry.register(metadata, trained.booster_text, trained.calibration)


def _metrics(metrics: Any) -> model_pb2.ModelMetrics:
    return model_pb2.ModelMetrics(
        roc_auc=metrics.roc_auc,
        pr_auc=metrics.pr_auc,
        top_decile_lift=metrics.top_decile_lift,
        brier=metrics.brier,
        log_loss=metrics.log_loss,
        training_rows=metrics.training_rows,
        validation_rows=metrics.validation_rows,
        positive_rate=metrics.positive_rate,
    )


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update({k: v for k, v in values.items() if isinstance(v, str | int | float | bool)})
    return struct
