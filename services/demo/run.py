"""``profilemesh demo``: the whole mesh, on generated data, end to end, with a report.

1. generate a fictional retailer's data with its ground truth (:mod:`..generator`);
2. start the five services on the embedded backend, as ``profilemesh up`` does;
3. import the events, CRM records and leads through ingestion's source connectors;
4. wait for identity, features, scoring and activation to catch up;
5. compare the profiles with the ground truth (pairwise precision and recall of merges);
6. train the churn, propensity and lead models, cluster the customers into personas;
7. create segments with a webhook (a receiver in this process) and an audience file export;
8. measure how fast a new event reaches the features, print a summary and write the report.

Everything goes through the services' public gRPC APIs, as any client would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TextIO, TypeVar

import grpc
import numpy as np
from google.protobuf import json_format
from tqdm import tqdm

from profilemesh.activation.v1 import activation_service_pb2 as activation_pb2
from profilemesh.activation.v1 import activation_service_pb2_grpc, segment_pb2
from profilemesh.common.v1 import identifier_pb2, job_pb2
from profilemesh.features.v1 import features_service_pb2, features_service_pb2_grpc
from profilemesh.identity.v1 import identity_service_pb2_grpc
from profilemesh.ingestion.v1 import (
    event_pb2,
    ingestion_service_pb2,
    ingestion_service_pb2_grpc,
)
from profilemesh.scoring.v1 import model_pb2, scoring_service_pb2_grpc
from profilemesh.scoring.v1 import scoring_service_pb2 as scoring_pb2
from profilemesh.services.demo import evaluation
from profilemesh.services.demo.pipeline import wait_until_quiet
from profilemesh.services.demo.report import render_report
from profilemesh.services.demo.results import (
    ClusterRow,
    Curve,
    DemoResults,
    IngestionResult,
    Latency,
    ModelResult,
    SegmentResult,
    StageTiming,
)
from profilemesh.services.generator import generate, load_truth
from profilemesh.services.mesh import Mesh
from profilemesh.shared.channel import channel_to
from profilemesh.shared.settings import IdentitySettings, Settings

T = TypeVar("T")
DAY = 86_400
KINDS = {"churn": "CHURN", "propensity": "PROPENSITY", "lead": "LEAD"}
WEBHOOK_SECRET = "profilemesh-demo-webhook-secret"


class Demo:
    """One run: its settings, its data folder, its timings and its results."""

    def __init__(self, settings: Settings, data_dir: Path, out: TextIO) -> None:
        self.settings = settings
        self.data_dir = data_dir
        self.out = out
        self.results = DemoResults(customers=0, seed=0)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        print(f"-- {name}", file=self.out, flush=True)
        started = time.perf_counter()
        yield
        seconds = time.perf_counter() - started
        self.results.stages.append(StageTiming(name, seconds))
        print(f"   done in {seconds:.1f}s", file=self.out, flush=True)

    def stub(self, service: str, factory: Callable[[Any], T]) -> T:
        return factory(self.channels[service])

    channels: dict[str, grpc.aio.Channel]
    pids: list[int]


async def run_demo(
    settings: Settings,
    *,
    customers: int,
    seed: int,
    data_dir: Path,
    out: TextIO,
    keep_running: bool = False,
) -> DemoResults:
    """Run the demo; its results (also written as ``report.html`` in ``data_dir``)."""
    rules = data_dir / "identity-rules.yaml"
    await asyncio.to_thread(_prepare, data_dir, rules)
    settings = settings.model_copy(
        update={
            "data_dir": data_dir / "mesh",
            "identity": IdentitySettings(
                rules_file=rules, match_min_records=max(50, min(1000, customers // 4))
            ),
        }
    )
    demo = Demo(settings, data_dir, out)
    demo.results = DemoResults(customers=customers, seed=seed)
    with demo.stage(f"generate a retailer with {customers:,} customers"):
        generated = await asyncio.to_thread(generate, data_dir / "input", customers, seed)
        print(
            f"   {generated.events:,} events, {generated.crm_records:,} CRM records,"
            f" {generated.leads:,} leads",
            file=out,
            flush=True,
        )
    mesh = Mesh(settings)
    with demo.stage("start the mesh"):
        mesh.start()
        if mesh.admin_token_file is not None:
            print(f"   admin token in {mesh.admin_token_file}", file=out, flush=True)
        await mesh.wait_until_serving(120)
        demo.pids = [child.process.pid for child in mesh.children]
    receiver = WebhookReceiver().start()
    try:
        demo.channels = {name: channel_to(name, settings) for name in _SERVICES}
        await _import(demo, generated)
        with demo.stage("resolve identities, compute features, score"):
            await wait_until_quiet(settings, demo.pids)
        with demo.stage("compare profiles with the ground truth"):
            truth = evaluation.truth_view(await asyncio.to_thread(load_truth, data_dir / "input"))
            demo.results.identity = await evaluation.identity_quality(
                demo.stub("identity", identity_service_pb2_grpc.IdentityServiceStub), truth
            )
        await _train(demo, truth)
        await _cluster(demo)
        await _activate(demo, receiver)
        await _latency(demo)
        with demo.stage("profile completeness"):
            demo.results.trait_completeness = await evaluation.trait_completeness(
                demo.stub("activation", activation_service_pb2_grpc.ActivationServiceStub), truth
            )
        demo.results.webhook_received = len(receiver.keys)
        report = render_report(demo.results, data_dir / "report.html")
        print(summary(demo.results, report), file=out, flush=True)
        if keep_running:
            print("The mesh keeps running; Ctrl-C stops it.", file=out, flush=True)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()
    finally:
        for channel in getattr(demo, "channels", {}).values():
            await channel.close()
        receiver.stop()
        mesh.stop()
    return demo.results


_SERVICES = ("ingestion", "identity", "features", "scoring", "activation")


def _prepare(data_dir: Path, rules: Path) -> None:
    """A fresh data folder, and identity rules that turn probabilistic matching of the CRM's
    records on (phones without a country code are read as US numbers, as the CRM writes
    them)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    # A demo starts from nothing: what an earlier run left of the mesh's state and exports
    # (all under the demo's own folder) would otherwise mix with this run's.
    for leftover in ("mesh", "exports"):
        shutil.rmtree(data_dir / leftover, ignore_errors=True)
    rules.write_text("default_region: US\nmatching:\n  enabled: true\n")


async def _import(demo: Demo, generated: Any) -> None:
    stub = demo.stub("ingestion", ingestion_service_pb2_grpc.IngestionServiceStub)
    started = time.perf_counter()
    totals = {"events": 0, "records": 0}
    rejected: dict[str, int] = {}
    with demo.stage("import events, CRM records and leads through the connectors"):
        for name, spec in generated.imports.items():
            kind = "events" if name == "events" else "records"
            source = spec["source"]
            request = ingestion_service_pb2.StartSourceRunRequest(
                connector=spec["connector"], source=source, full_refresh=True
            )
            json_format.ParseDict({**spec["config"], "batch_size": 5000}, request.config)
            run = (await stub.StartSourceRun(request)).run
            with tqdm(desc=f"   {source}", unit=" items", file=demo.out, disable=None) as bar:
                while run.state not in (
                    job_pb2.JOB_STATE_SUCCEEDED,
                    job_pb2.JOB_STATE_FAILED,
                    job_pb2.JOB_STATE_CANCELLED,
                ):
                    await asyncio.sleep(0.25)
                    run = (
                        await stub.GetSourceRun(
                            ingestion_service_pb2.GetSourceRunRequest(run_id=run.run_id)
                        )
                    ).run
                    bar.update(run.items_read - bar.n)
            if run.state != job_pb2.JOB_STATE_SUCCEEDED:
                raise RuntimeError(f"importing {source} failed: {run.error}")
            totals[kind] += run.items_accepted
            for rejection in run.rejections:
                rejected[rejection.reason] = rejected.get(rejection.reason, 0) + 1
    demo.results.ingestion = IngestionResult(
        events=totals["events"],
        records=totals["records"],
        seconds=time.perf_counter() - started,
        rejected_by_reason=rejected,
    )


def _label(kind: str, events: list[str], horizon_days: int, window_days: int) -> Any:
    label = model_pb2.LabelDefinition(
        kind=getattr(model_pb2, f"MODEL_KIND_{KINDS[kind]}"), event_names=events
    )
    label.horizon.FromSeconds(horizon_days * DAY)
    label.eligibility_window.FromSeconds(window_days * DAY)
    return label


MODELS = (
    ("churn", _label("churn", ["Order Completed"], 60, 120)),
    ("propensity", _label("propensity", ["Order Completed"], 30, 90)),
    ("lead", _label("lead", ["Demo Booked"], 60, 120)),
)
FEATURES = (
    "recency_days",
    "frequency_365d",
    "monetary_365d",
    "orders_30d",
    "orders_90d",
    "revenue_90d",
    "avg_order_value_lifetime",
    "tenure_days",
    "events_30d",
    "page_views_30d",
    "distinct_products_viewed_90d",
    "mobile_event_share_90d",
    "nps_latest",
)


async def _train(demo: Demo, truth: evaluation.TruthView) -> None:
    scoring = demo.stub("scoring", scoring_service_pb2_grpc.ScoringServiceStub)
    with demo.stage("train the churn, propensity and lead models"):
        for name, label in MODELS:
            run = (
                await scoring.TrainModel(
                    scoring_pb2.TrainModelRequest(
                        model=name, label=label, feature_names=list(FEATURES)
                    )
                )
            ).run
            while run.state not in (job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED):
                await asyncio.sleep(0.25)
                request = scoring_pb2.GetTrainingRunRequest(run_id=run.run_id)
                run = (await scoring.GetTrainingRun(request)).run
            if run.state == job_pb2.JOB_STATE_FAILED:
                print(f"   {name}: not trained ({run.error})", file=demo.out, flush=True)
                continue
            version = (
                await scoring.GetModel(scoring_pb2.GetModelRequest(model=name))
            ).model_version
            demo.results.models.append(await _model_result(demo, version, truth))
            print(
                f"   {name}: ROC-AUC {version.metrics.roc_auc:.3f}"
                f" (baseline {version.baseline_metrics.roc_auc:.3f})",
                file=demo.out,
                flush=True,
            )
        await wait_until_quiet(demo.settings, demo.pids)


async def _model_result(demo: Demo, version: Any, truth: evaluation.TruthView) -> ModelResult:
    scoring = demo.stub("scoring", scoring_service_pb2_grpc.ScoringServiceStub)
    table = await evaluation.score_table(scoring, version.model)
    scores = table.column("score").to_numpy()
    result = ModelResult(
        name=version.model,
        kind=model_pb2.ModelKind.Name(version.kind).removeprefix("MODEL_KIND_").lower(),
        version=version.version,
        roc_auc=version.metrics.roc_auc,
        pr_auc=version.metrics.pr_auc,
        top_decile_lift=version.metrics.top_decile_lift,
        brier=version.metrics.brier,
        baseline=version.baseline,
        baseline_roc_auc=version.baseline_metrics.roc_auc,
        baseline_pr_auc=version.baseline_metrics.pr_auc,
        importances=[(i.feature.partition("@")[0], i.gain) for i in version.feature_importances],
        scores=[float(s) for s in scores[:: max(1, len(scores) // 5000)]],
    )
    truth_labels = await evaluation.truth_labels(
        demo.stub("identity", identity_service_pb2_grpc.IdentityServiceStub),
        truth,
        version.model,
        table.column("profile_id").to_pylist(),
    )
    if truth_labels is not None:
        known = ~np.isnan(truth_labels)
        labels = truth_labels[known]
        if 0 < labels.sum() < len(labels):
            result.truth_roc_auc, roc, lift = evaluation.curves(labels, scores[known])
            result.roc, result.lift = Curve(*roc), Curve(*lift)
    return result


async def _cluster(demo: Demo) -> None:
    scoring = demo.stub("scoring", scoring_service_pb2_grpc.ScoringServiceStub)
    with demo.stage("discover behavioural clusters"):
        clustering = (
            await scoring.DiscoverClusters(
                scoring_pb2.DiscoverClustersRequest(
                    name="behaviour",
                    feature_names=[
                        "recency_days",
                        "frequency_365d",
                        "monetary_365d",
                        "events_30d",
                        "tenure_days",
                    ],
                    max_k=6,
                ),
                timeout=600,
            )
        ).clustering
        demo.results.clusters = [
            ClusterRow(c.cluster_id, c.persona, c.size, c.description) for c in clustering.clusters
        ]
        await wait_until_quiet(demo.settings, demo.pids)


SEGMENTS = (
    (
        "churn-risk",
        "Churn risk, recent buyers",
        "scores.churn > 0.6 and features.orders_90d >= 1 and consent.email",
    ),
    (
        "vip",
        "Most valuable customers",
        "features.monetary_365d >= 500 and features.recency_days <= 60",
    ),
    ("hot-leads", "Leads likely to convert", "scores.lead > 0.5 and consent.email"),
)


async def _activate(demo: Demo, receiver: WebhookReceiver) -> None:
    activation = demo.stub("activation", activation_service_pb2_grpc.ActivationServiceStub)
    exports = demo.data_dir / "exports"
    with demo.stage("create segments with a webhook and an audience export"):
        for segment_id, name, expression in SEGMENTS:
            try:
                await activation.CreateSegment(
                    activation_pb2.CreateSegmentRequest(
                        segment=segment_pb2.Segment(
                            segment_id=segment_id, name=name, expression=expression
                        )
                    )
                )
            except grpc.aio.AioRpcError as error:  # a model that could not be trained
                print(f"   {segment_id}: {error.details()}", file=demo.out, flush=True)
                continue
            hook = segment_pb2.Destination(
                name=f"{name} webhook",
                activator="webhook",
                segment_id=segment_id,
                triggers=[
                    segment_pb2.DELIVERY_TRIGGER_ENTERED,
                    segment_pb2.DELIVERY_TRIGGER_EXITED,
                ],
                consent_purpose="email",
                rate_limit_per_second=2000,
                mappings=[
                    segment_pb2.FieldMapping(source="identifiers.email", target="email"),
                    segment_pb2.FieldMapping(source="traits.first_name", target="first_name"),
                ],
            )
            hook.config.update({"url": receiver.url, "secret": WEBHOOK_SECRET})
            export = segment_pb2.Destination(
                name=f"{name} audience",
                activator="audience_export",
                segment_id=segment_id,
                triggers=[segment_pb2.DELIVERY_TRIGGER_ENTERED],
                consent_purpose="email",
                rate_limit_per_second=5000,
                mappings=[segment_pb2.FieldMapping(source="identifiers.email", target="email")],
            )
            export.config.update(
                {
                    "path": str(exports / f"{segment_id}.csv"),
                    "format": "csv",
                    "hash_fields": {"email": "email"},
                }
            )
            for destination in (hook, export):
                await activation.CreateDestination(
                    activation_pb2.CreateDestinationRequest(destination=destination)
                )
        await wait_until_quiet(demo.settings, demo.pids, quiet_seconds=4.0)
        for segment_id, name, expression in SEGMENTS:
            with contextlib.suppress(grpc.aio.AioRpcError):
                segment = (
                    await activation.GetSegment(
                        activation_pb2.GetSegmentRequest(segment_id=segment_id)
                    )
                ).segment
                audience = exports / f"{segment_id}.csv"
                exported = (
                    max(0, len(audience.read_text().splitlines()) - 1) if audience.exists() else 0
                )
                demo.results.segments.append(
                    SegmentResult(
                        segment_id,
                        name,
                        expression,
                        segment.member_count,
                        deliveries={
                            "webhook": {"delivered": receiver.by_segment.get(segment_id, 0)},
                            "audience export": {"delivered": exported},
                        },
                    )
                )
        demo.results.export_rows = sum(
            max(0, len(path.read_text().splitlines()) - 1) for path in exports.glob("*.csv")
        )


async def _latency(demo: Demo, samples: int = 30) -> None:
    """From a new order's ingestion ack to the features service counting it."""
    ingestion = demo.stub("ingestion", ingestion_service_pb2_grpc.IngestionServiceStub)
    features = demo.stub("features", features_service_pb2_grpc.FeaturesServiceStub)
    with demo.stage("measure event-to-features latency"):
        durations = []
        rng = random.Random(1)
        for number in range(samples):
            user = f"latency-probe-{rng.randrange(10**9)}-{number}"
            identifier = identifier_pb2.Identifier(type="user_id", value=user)
            order = event_pb2.Event(user_id=user)
            order.track.event = "Order Completed"
            order.track.properties.update({"revenue": 10})
            started = time.perf_counter()
            await ingestion.SendEvent(ingestion_service_pb2.SendEventRequest(event=order))
            while True:
                try:
                    answer = await features.GetFeatures(
                        features_service_pb2.GetFeaturesRequest(
                            identifier=identifier, feature_names=["orders_lifetime"]
                        )
                    )
                    if answer.vector.values[0].int64_value == 1:
                        break
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.002)
            durations.append((time.perf_counter() - started) * 1000)
        durations.sort()
        demo.results.latencies.append(
            Latency(
                "event -> features (ack to value)",
                float(np.percentile(durations, 50)),
                float(np.percentile(durations, 99)),
                len(durations),
            )
        )


class WebhookReceiver:
    """The demo's own webhook endpoint: counts distinct idempotency keys."""

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self.by_segment: dict[str, int] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                key = self.headers.get("Idempotency-Key", "")
                if key not in receiver.keys:
                    receiver.keys.add(key)
                    with contextlib.suppress(ValueError, AttributeError):
                        segment = json.loads(body).get("segment_id", "")
                        receiver.by_segment[segment] = receiver.by_segment.get(segment, 0) + 1
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/demo"

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def summary(results: DemoResults, report: Path) -> str:
    """The lines printed at the end of the demo."""
    lines = ["", f"profilemesh demo: {results.customers:,} customers, seed {results.seed}"]
    ingestion = results.ingestion
    if ingestion is not None:
        lines.append(
            f"  ingested       {ingestion.events:,} events and {ingestion.records:,} records"
            f" in {ingestion.seconds:.1f}s ({ingestion.events_per_second:,.0f} events/s)"
        )
    identity = results.identity
    if identity is not None:
        lines.append(
            f"  profiles       {identity.profiles:,} for {identity.people:,} people;"
            f" merges: precision {identity.precision:.3f}, recall {identity.recall:.3f},"
            f" F1 {identity.f1:.3f}"
        )
    for model in results.models:
        truth = f", vs ground truth {model.truth_roc_auc:.3f}" if model.truth_roc_auc else ""
        lines.append(
            f"  model {model.name:<9} ROC-AUC {model.roc_auc:.3f} (baseline"
            f" {model.baseline_roc_auc:.3f}), PR-AUC {model.pr_auc:.3f}{truth}"
        )
    for cluster in results.clusters:
        lines.append(f"  cluster {cluster.cluster_id}      {cluster.persona} ({cluster.size:,})")
    for segment in results.segments:
        lines.append(f"  segment        {segment.name}: {segment.members:,} members")
    lines.append(
        f"  deliveries     {results.webhook_received:,} webhook calls received,"
        f" {results.export_rows:,} audience rows exported"
    )
    for latency in results.latencies:
        lines.append(
            f"  latency        {latency.name}: p50 {latency.p50_ms:.1f} ms,"
            f" p99 {latency.p99_ms:.1f} ms"
        )
    lines.append(f"  total          {results.total_seconds:.0f}s")
    lines.append(f"  report         {report}")
    return "\n".join(lines)


def run_demo_command(settings: Settings, args: Any, out: TextIO) -> int:
    results = asyncio.run(
        run_demo(
            settings,
            customers=args.customers,
            seed=args.seed,
            data_dir=args.data_dir,
            out=out,
            keep_running=args.keep_running,
        )
    )
    (args.data_dir / "summary.json").write_text(json.dumps(_plain(results), indent=2, default=str))
    return 0


def _plain(value: Any) -> Any:
    from dataclasses import asdict, is_dataclass

    return asdict(value) if is_dataclass(value) and not isinstance(value, type) else value
