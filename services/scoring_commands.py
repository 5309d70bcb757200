"""``profilemesh train``, ``profilemesh score`` and ``profilemesh segments discover``: the
scoring service from the command line, over gRPC like any other client.

::

    profilemesh train churn --event "Order Completed" --horizon-days 90
    profilemesh train propensity --event "Order Completed" --where category=shoes --horizon-days 30
    profilemesh train lead --event "Demo Booked" --horizon-days 60 --model lead_demo
    profilemesh score churn --identifier email:ada@example.com --reasons 3
    profilemesh score churn --all --out churn.parquet
    profilemesh segments discover behaviour --features recency_days,frequency_365d,monetary_365d

Without ``--features``, a model uses every numeric feature the features service serves.
Exit status: 0 on success, 1 when the service refused or failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.ipc
import pyarrow.parquet as pq

from profilemesh.common.v1 import identifier_pb2, job_pb2
from profilemesh.features.v1 import feature_definition_pb2 as fd
from profilemesh.features.v1 import features_service_pb2, features_service_pb2_grpc
from profilemesh.scoring.v1 import model_pb2, scoring_service_pb2, scoring_service_pb2_grpc
from profilemesh.shared.channel import channel_to
from profilemesh.shared.settings import Settings

KINDS = {
    "churn": model_pb2.MODEL_KIND_CHURN,
    "propensity": model_pb2.MODEL_KIND_PROPENSITY,
    "lead": model_pb2.MODEL_KIND_LEAD,
}
DAY = 86_400


def add_scoring_parsers(commands: Any) -> None:
    train = commands.add_parser("train", help="train a churn, propensity or lead model")
    train.add_argument("kind", choices=sorted(KINDS))
    train.add_argument("--event", action="append", required=True, help="label event name")
    train.add_argument(
        "--where", action="append", default=[], metavar="PROPERTY=VALUE", help="label filter"
    )
    train.add_argument("--horizon-days", type=int, required=True)
    train.add_argument("--eligibility-days", type=int)
    train.add_argument("--features", help="comma-separated feature names (default: all numeric)")
    train.add_argument("--model", help="model name (default: the kind)")
    train.add_argument("--validation-cutoffs", type=int, default=1)
    train.add_argument("--promote", action="store_true", help="make the new version champion")

    score = commands.add_parser("score", help="score profiles with a model")
    score.add_argument("model")
    who = score.add_mutually_exclusive_group(required=True)
    who.add_argument("--profile-id")
    who.add_argument("--identifier", metavar="TYPE:VALUE")
    who.add_argument("--all", action="store_true", help="every profile (use with --out)")
    score.add_argument("--version", default="")
    score.add_argument("--reasons", type=int, default=3, help="top reasons per profile")
    score.add_argument("--out", type=Path, help="with --all: a .parquet or .csv file")

    segments = commands.add_parser("segments", help="behavioural segments by clustering")
    actions = segments.add_subparsers(dest="action", required=True)
    discover = actions.add_parser("discover", help="cluster every profile into personas")
    discover.add_argument("name")
    discover.add_argument("--features", help="comma-separated numeric features (at least two)")
    discover.add_argument("--k", type=int, default=0, help="clusters (0: chosen by silhouette)")
    discover.add_argument("--max-k", type=int, default=10)


def run_scoring_command(args: argparse.Namespace, settings: Settings) -> int:
    try:
        return asyncio.run(_run(args, settings))
    except grpc.aio.AioRpcError as error:
        print(
            f"profilemesh {args.command}: {error.code().name}: {error.details()}", file=sys.stderr
        )
        return 1
    except ValueError as error:
        print(f"profilemesh {args.command}: {error}", file=sys.stderr)
        return 2


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    async with channel_to("scoring", settings) as channel:
        stub = scoring_service_pb2_grpc.ScoringServiceStub(channel)
        if args.command == "train":
            return await _train(args, settings, stub)
        if args.command == "score":
            return await _score(args, stub)
        return await _discover(args, settings, stub)


async def _numeric_features(settings: Settings) -> list[str]:
    async with channel_to("features", settings) as channel:
        stub = features_service_pb2_grpc.FeaturesServiceStub(channel)
        listed = await stub.ListFeatureDefinitions(
            features_service_pb2.ListFeatureDefinitionsRequest(page_size=1000)
        )
    numeric = (fd.VALUE_TYPE_DOUBLE, fd.VALUE_TYPE_INT64)
    return [d.name for d in listed.definitions if d.value_type in numeric]


def _names(text: str | None) -> list[str]:
    return [name.strip() for name in (text or "").split(",") if name.strip()]


async def _train(args: argparse.Namespace, settings: Settings, stub: Any) -> int:
    label = model_pb2.LabelDefinition(kind=KINDS[args.kind], event_names=args.event)
    for condition in args.where:
        prop, separator, value = condition.partition("=")
        if not separator:
            raise ValueError(f"--where {condition!r}: expected PROPERTY=VALUE")
        label.filters.add(property=prop, operator=fd.OPERATOR_EQ).value.string_value = value
    label.horizon.FromSeconds(args.horizon_days * DAY)
    if args.eligibility_days:
        label.eligibility_window.FromSeconds(args.eligibility_days * DAY)
    features = _names(args.features) or await _numeric_features(settings)
    request = scoring_service_pb2.TrainModelRequest(
        model=args.model or args.kind,
        label=label,
        feature_names=features,
        validation_cutoffs=args.validation_cutoffs,
    )
    run = (await stub.TrainModel(request)).run
    print(f"training run {run.run_id}: {request.model} on {len(features)} features")
    while run.state not in (job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED):
        await asyncio.sleep(0.5)
        run = (
            await stub.GetTrainingRun(scoring_service_pb2.GetTrainingRunRequest(run_id=run.run_id))
        ).run
    if run.state == job_pb2.JOB_STATE_FAILED:
        print(f"training failed: {run.error}", file=sys.stderr)
        return 1
    version = (
        await stub.GetModel(
            scoring_service_pb2.GetModelRequest(model=request.model, version=run.model_version)
        )
    ).model_version
    if args.promote and not version.champion:
        await stub.PromoteModel(
            scoring_service_pb2.PromoteModelRequest(model=request.model, version=version.version)
        )
    print(model_report(version))
    return 0


def model_report(version: model_pb2.ModelVersion) -> str:
    """The metrics of a version next to its baseline's, and its top features."""
    lines = [
        f"{version.model} version {version.version}" + (" (champion)" if version.champion else ""),
        f"{'':<16}{'model':>10}{version.baseline or 'baseline':>28}",
    ]
    for name in ("roc_auc", "pr_auc", "top_decile_lift", "brier", "log_loss"):
        mine, theirs = getattr(version.metrics, name), getattr(version.baseline_metrics, name)
        lines.append(f"{name:<16}{mine:>10.4f}{theirs:>28.4f}")
    lines.append(
        f"rows: {version.metrics.training_rows:,} training, "
        f"{version.metrics.validation_rows:,} validation, "
        f"positive rate {version.metrics.positive_rate:.3f}"
    )
    lines.append(
        "top features: "
        + ", ".join(f"{i.feature} {i.gain:.0%}" for i in version.feature_importances[:5])
    )
    return "\n".join(lines)


async def _score(args: argparse.Namespace, stub: Any) -> int:
    if args.all:
        chunks = [
            pa.ipc.open_stream(chunk.arrow_ipc).read_all()
            async for chunk in stub.ScoreBatch(
                scoring_service_pb2.ScoreBatchRequest(
                    model=args.model, version=args.version, top_reasons=args.reasons
                )
            )
        ]
        table = pa.concat_tables(chunks)
        if args.out is None:
            print(table.drop_columns(["reasons"]) if "reasons" in table.column_names else table)
        elif args.out.suffix == ".csv":
            flat = table.drop_columns(["reasons"]) if "reasons" in table.column_names else table
            pa_csv.write_csv(flat, args.out)
        else:
            pq.write_table(table, args.out)
        if args.out is not None:
            print(f"{table.num_rows:,} scores written to {args.out}")
        return 0
    request = scoring_service_pb2.ScoreRequest(
        model=args.model, version=args.version, top_reasons=args.reasons
    )
    if args.identifier:
        kind, separator, value = args.identifier.partition(":")
        if not separator:
            raise ValueError("--identifier: expected TYPE:VALUE, e.g. email:ada@example.com")
        request.identifier.CopyFrom(identifier_pb2.Identifier(type=kind, value=value))
    else:
        request.profile_id = args.profile_id
    response = await stub.Score(request)
    score = response.score
    print(f"{response.profile_id}  {score.model}@{score.model_version}  score {score.score:.4f}")
    for reason in score.reasons:
        print(f"  {reason.feature:<32} {reason.contribution:+.4f}")
    return 0


async def _discover(args: argparse.Namespace, settings: Settings, stub: Any) -> int:
    features = _names(args.features)
    clustering = (
        await stub.DiscoverClusters(
            scoring_service_pb2.DiscoverClustersRequest(
                name=args.name, feature_names=features, k=args.k, max_k=args.max_k
            )
        )
    ).clustering
    print(
        f"{clustering.name} version {clustering.version}: {len(clustering.clusters)} clusters "
        f"of {clustering.profile_count:,} profiles, silhouette {clustering.silhouette:.3f}"
    )
    for cluster in clustering.clusters:
        share = cluster.size / max(1, clustering.profile_count)
        print(f"  [{cluster.cluster_id}] {cluster.persona} - {cluster.size:,} ({share:.0%})")
        print(f"      {cluster.description}")
    return 0
