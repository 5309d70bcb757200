"""Churn on CDNOW, the full cohort: profilemesh's model next to BG/NBD, Pareto/NBD and RFM.

CDNOW_master.txt (23,570 customers who first bought at the CDNOW music store in the first 12
weeks of 1997, the last on 1997-03-25, and every purchase they made until 1998-06-30: 69,659
transactions) is loaded into the real services, as a user would: ``profilemesh serve``
ingestion, identity, features and scoring run as subprocesses on free localhost ports over a
fresh data directory; each transaction is sent through ``SendEvents`` (batches of 500) as an
``Order Completed`` track event (user_id the customer id, ``revenue`` the dollar value,
timestamp the day at noon UTC, message id the line number; ingestion takes any time from 1970
to 2200 and has no age limit, so nothing needs relaxing), and the benchmark waits until
identity has resolved every event and features counts every customer's orders. With
``--quick`` a seeded quarter of the customers (all their transactions) is loaded instead, and
the folds are not repeated.

The task. Calibration is the first 39 weeks from 1997-01-01, so the cut-off is the end of week
39 (1997-10-01T00:00Z); a customer churns (label 1) when they make no purchase in the next 39
weeks (to 1998-06-30, the end of the data). Every customer bought in the first 12 weeks, so all
of them are in the cohort.

The data set comes from the features service alone, through its point-in-time path
(``GetHistoricalFeatures`` with entity rows: every customer at every cut-off used below), as a
training run builds it (``services/scoring/labels.py``): the built-in RFM and order-history
features of ``FEATURES`` as of the cut-off, and the label from two point-in-time counts of
``Order Completed`` (``extra_definitions``), at the cut-off and one horizon (39 weeks) later.
A row is eligible, as for TrainModel's churn label, when the customer had bought by its cut-off.

Cross-validation. ``RepeatedStratifiedKFold`` (5 folds, 3 repeats, 1 with ``--quick``; seeded,
stratified by the week-39 label) splits the customers, and every model sees the same folds.
The test fold's customers are only ever scored, on their week-39 row: no model, fit,
calibration or early stopping sees any of their data. From the training fold's customers:

- profilemesh: ``services.scoring.model.train`` with its default configuration (nothing tuned
  to CDNOW), then ``TrainedModel.scorer()``, the path serving takes (calibrated
  probabilities). ``train`` validates over time: it learns from the earlier cut-offs and holds
  out the latest, here week 39 (the training customers' week-39 rows), for early stopping,
  calibration and its own metrics. So it is given the training customers' rows at weeks 13,
  26 and 39, each labelled over its own next 39 weeks, which stay inside the observed 78.
- profilemesh_monthly_cutoffs, for information: the same with week 39 and every 30 days
  before it back to 1997-02-03 (TrainModel's default spacing, ``CUTOFF_SPACING_DAYS``).
  Every training cut-off's label window then reaches into the week-39 rows' (the horizon is
  longer than the spacing), the closest nearly covers it, and early stopping and calibration
  are fitted on rows whose outcomes the booster has all but seen: compare ``train``'s own
  validation ROC-AUC (``internal_roc_auc``) with the test folds'.
- BG/NBD (``services/features/clv.py`` ``fit_bgnbd``) fitted on the calibration summary
  (repeat purchase days, recency, age, in weeks) of the training customers. Two readings of
  it: the expected purchases in the next 39 weeks E[Y] (ranked by -E[Y]; its probability from
  a logistic regression of the label on log E[Y] fitted on the training customers, a monotone
  map, so the ranking stays E[Y]'s), and P(no purchase in the next 39 weeks), derived from the
  model: a customer alive at T with rate lambda buys nothing in t with probability
  exp(-lambda t) (dropout only follows a purchase), and lambda given alive at T is
  gamma(r + x, alpha + T), so P = 1 - P(alive) (1 - ((alpha + T) / (alpha + T + t))^(r + x)).
  BG/NBD's P(alive) itself is no baseline: it is exactly 1 for every one-time buyer.
- Pareto/NBD (Schmittlein, Morrison & Colombo 1987), implemented here with scipy after
  Fader, Hardie & Lee, "A note on implementing the Pareto/NBD model in MATLAB" (2005): the
  likelihood with Gauss's hypergeometric function, maximised by Nelder-Mead over the
  logarithms of the parameters; P(churn) = 1 - P(alive at the cut-off). The implementation is
  checked against the note's r 0.55, alpha 10.58, s 0.61, beta 11.67 (log likelihood -9595.0),
  fitted on the 2,357-customer sample (cdnow_customers_summary.csv); the fit on the full
  cohort's calibration data is printed next to them.
- Logistic regression on RFM from the calibration transactions (sklearn, standardised):
  weeks since the last purchase, number of transactions, mean transaction value.

For each model: ROC-AUC, PR-AUC (average precision; churn is the positive class) and Brier
score of its probabilities on the test folds, mean and sd over the folds. Targets:
profilemesh's mean ROC-AUC and PR-AUC at least the best baseline's, and its mean Brier score at
most the best baseline's plus ``BRIER_TOLERANCE`` (0.001: about a third of the fold-to-fold sd
of every model's Brier score here, 0.003 to 0.004, and 0.6% of its value, about 0.16; a gap
that small is split noise, not a difference of calibration); and DESIGN.md's figure,
profilemesh's ROC-AUC at least BG/NBD's. Paired differences (profilemesh minus the best
baseline, fold by fold) are reported too.

The data ships in the ``lifetimes`` package, read here as plain files (never imported)::

    .venv/bin/pip install --no-deps lifetimes
    python bench/cdnow_churn.py [--quick] [--json PATH]
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
from numpy.typing import NDArray
from scipy.optimize import minimize  # type: ignore[import-untyped]
from scipy.special import gammaln, hyp2f1  # type: ignore[import-untyped]
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import RepeatedStratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from profilemesh.common.v1 import identifier_pb2, job_pb2, log_service_pb2, log_service_pb2_grpc
from profilemesh.features.v1 import features_service_pb2, features_service_pb2_grpc
from profilemesh.identity.v1 import identity_service_pb2, identity_service_pb2_grpc
from profilemesh.ingestion.v1 import event_pb2, ingestion_service_pb2, ingestion_service_pb2_grpc
from profilemesh.scoring.v1 import model_pb2, scoring_service_pb2_grpc
from profilemesh.scoring.v1 import scoring_service_pb2 as scoring_pb2
from profilemesh.services.features.clv import (
    BgNbdParams,
    expected_purchases,
    fit_bgnbd,
    probability_alive,
    rfm_summary,
)
from profilemesh.services.scoring import labels
from profilemesh.services.scoring.features_client import FeaturesClient, matrix_of, pin
from profilemesh.services.scoring.metrics import Metrics, evaluate
from profilemesh.services.scoring.model import TrainingSet, train
from profilemesh.services.scoring.training_run import BASELINE_FEATURES, CUTOFF_SPACING_DAYS
from profilemesh.shared.channel import create_blocking_channel, create_channel
from profilemesh.shared.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Report, free_port, parse_args, wait_serving

Floats = NDArray[np.float64]
Labels = NDArray[np.int8]
SEED = 19970101
MASTER = "CDNOW_master.txt"
SAMPLE_SUMMARY = "cdnow_customers_summary.csv"
SERVICES = ("ingestion", "identity", "features", "scoring")
SEND_BATCH = 500
QUICK_SHARE = 0.25
"""Share of the customers loaded with ``--quick``."""
DAY_S = 86_400
DAY_NS = DAY_S * 1_000_000_000
WEEK_DAYS = 7
WEEK_NS = WEEK_DAYS * DAY_NS
START_NS = int(np.datetime64("1997-01-01T00:00:00", "ns").astype(np.int64))
CALIBRATION_WEEKS = 39
HORIZON_WEEKS = 39
HORIZON_DAYS = HORIZON_WEEKS * WEEK_DAYS
CUTOFF_NS = START_NS + CALIBRATION_WEEKS * WEEK_NS
"""The end of week 39: 1997-10-01T00:00Z."""
FEATURES = (
    "recency_days",
    "frequency_365d",
    "monetary_365d",
    "orders_lifetime",
    "orders_90d",
    "orders_30d",
    "revenue_90d",
    "avg_order_value_lifetime",
    "first_order_days",
    "purchase_cadence_days",
    "tenure_days",
)
FOLDS = 5
PAPER_PARETO_NBD = {"r": 0.55, "alpha": 10.58, "s": 0.61, "beta": 11.67}
PAPER_PARETO_NBD_LOG_LIKELIHOOD = -9595.0
PARETO_CHECK_TOLERANCE = 0.02
BRIER_TOLERANCE = 0.001
METRICS = ("roc_auc", "pr_auc", "brier")
PROFILEMESH = "profilemesh"
MONTHLY = "profilemesh_monthly_cutoffs"
BASELINES = (
    "bgnbd_expected_purchases",
    "bgnbd_p_no_purchase",
    "pareto_nbd_p_alive",
    "rfm_logistic_regression",
)
NOTES = {
    PROFILEMESH: "model.train defaults; rows at weeks 13, 26, 39",
    MONTHLY: "the same, rows every 30 days to week 39 (information)",
    "bgnbd_expected_purchases": "ranks by -E[Y(39 weeks)]; probability: logistic on log E[Y]",
    "bgnbd_p_no_purchase": "P(no purchase in 39 weeks) from the BG/NBD posterior",
    "pareto_nbd_p_alive": "P(churn) = 1 - P(alive at week 39)",
    "rfm_logistic_regression": "weeks since last purchase, transactions, mean value",
}


def monthly_cutoffs() -> tuple[int, ...]:
    """Week 39 and every ``CUTOFF_SPACING_DAYS`` before it while at least that far after
    1997-01-01, as TrainModel spaces its default cut-offs; oldest first."""
    spacing = CUTOFF_SPACING_DAYS * DAY_NS
    count = (CUTOFF_NS - START_NS - spacing) // spacing + 1
    return tuple(CUTOFF_NS - k * spacing for k in reversed(range(count)))


SCHEMES = {
    PROFILEMESH: tuple(START_NS + w * WEEK_NS for w in (13, 26, CALIBRATION_WEEKS)),
    MONTHLY: monthly_cutoffs(),
}
"""The cut-offs of each profilemesh model's training rows."""


def day(nanoseconds: int) -> str:
    return str(np.datetime64(nanoseconds, "ns"))[:10]


# -- The data ---------------------------------------------------------------------------------


def dataset(name: str) -> Path | None:
    """A file of the installed ``lifetimes`` distribution's datasets folder, if there."""
    try:
        distribution = importlib.metadata.distribution("lifetimes")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(distribution.locate_file(f"lifetimes/datasets/{name}")))
    return path if path.is_file() else None


@dataclass(frozen=True)
class Transactions:
    """CDNOW_master.txt: one row per transaction, in file order."""

    customer_ids: NDArray[np.str_]
    days: NDArray[np.datetime64]
    cds: NDArray[np.int64]
    dollars: Floats

    @property
    def noon_seconds(self) -> NDArray[np.int64]:
        """Each transaction's day at noon UTC, in epoch seconds."""
        seconds: NDArray[np.int64] = self.days.astype("datetime64[s]").astype(np.int64)
        return seconds + DAY_S // 2

    def of(self, customers: NDArray[np.str_]) -> Transactions:
        """The transactions of ``customers`` only."""
        keep = np.isin(self.customer_ids, customers)
        return Transactions(
            self.customer_ids[keep], self.days[keep], self.cds[keep], self.dollars[keep]
        )


def read_master(path: Path) -> Transactions:
    """A header line (``customer_id date number_of_cds dollar_value``), then one transaction
    per line, whitespace-separated: a zero-padded customer id, the day as YYYYMMDD, the number
    of CDs and the dollar value."""
    raw = np.loadtxt(path, dtype=str, skiprows=1)
    days = np.array([f"{d[:4]}-{d[4:6]}-{d[6:]}" for d in raw[:, 1]], dtype="datetime64[D]")
    return Transactions(raw[:, 0], days, raw[:, 2].astype(np.int64), raw[:, 3].astype(np.float64))


def order_events(transactions: Transactions) -> list[event_pb2.Event]:
    """Each transaction as an ``Order Completed`` track event."""
    events = []
    for index, (customer, seconds, dollars) in enumerate(
        zip(
            transactions.customer_ids.tolist(),
            transactions.noon_seconds.tolist(),
            transactions.dollars.tolist(),
            strict=True,
        )
    ):
        event = event_pb2.Event(user_id=customer, message_id=f"cdnow-{index}")
        event.track.event = "Order Completed"
        event.track.properties.update({"revenue": dollars})
        event.timestamp.FromSeconds(seconds)
        events.append(event)
    return events


# -- The services -----------------------------------------------------------------------------


class Services:
    """The mesh's services as subprocesses, on free ports, over one data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.ports = {name: free_port() for name in SERVICES}
        self.env = {
            **os.environ,
            "PROFILEMESH_DATA_DIR": str(data_dir),
            "PROFILEMESH_LOG_LEVEL": "WARNING",
            **{f"PROFILEMESH_SERVICES__{n.upper()}__PORT": str(p) for n, p in self.ports.items()},
        }
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def target(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    async def start_all(self) -> None:
        for name in SERVICES:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "profilemesh.services.cli", "serve", name], env=self.env
            )
        for name in SERVICES:
            await wait_serving(self.target(name), self.processes[name])

    def check_running(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}")

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def _logged(channel: grpc.aio.Channel, stream: str) -> int:
    stub = log_service_pb2_grpc.LogServiceStub(channel)
    answer = await stub.GetOffsets(log_service_pb2.GetOffsetsRequest(stream=stream), timeout=10)
    return sum(p.next_offset - p.first_offset for p in answer.partitions)


async def _profile_ids(channel: grpc.aio.Channel, user_ids: Sequence[str]) -> list[str]:
    """Each user id's profile id, from identity (empty while not resolved)."""
    stub = identity_service_pb2_grpc.IdentityServiceStub(channel)
    found: list[str] = []
    for start in range(0, len(user_ids), 1000):
        request = identity_service_pb2.ResolveIdentifiersRequest(
            identifiers=[
                identifier_pb2.Identifier(type="user_id", value=u)
                for u in user_ids[start : start + 1000]
            ]
        )
        answer = await stub.ResolveIdentifiers(request, timeout=30)
        found += [r.profile_id for r in answer.resolutions]
    return found


async def _orders_seen(channel: grpc.aio.Channel, profile_ids: Sequence[str]) -> list[int]:
    """Each profile's ``orders_lifetime`` as features serves it (-1 when it has none yet)."""
    stub = features_service_pb2_grpc.FeaturesServiceStub(channel)
    seen: list[int] = []
    for start in range(0, len(profile_ids), 1000):
        answer = await stub.BatchGetFeatures(
            features_service_pb2.BatchGetFeaturesRequest(
                profile_ids=profile_ids[start : start + 1000], feature_names=["orders_lifetime"]
            ),
            timeout=30,
        )
        for vector in answer.vectors:
            values = [v for v in vector.values if v.WhichOneof("value") == "int64_value"]
            seen.append(values[0].int64_value if values else -1)
    return seen


async def _until(
    services: Services, ready: Callable[[], Awaitable[bool]], what: str, timeout: float = 900
) -> None:
    """Poll ``ready`` until it says yes."""
    deadline = time.monotonic() + timeout
    while not await ready():
        services.check_running()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not done after {timeout:.0f}s")
        await asyncio.sleep(0.2)


async def load(
    services: Services, transactions: Transactions, report: Report
) -> tuple[list[str], list[str]]:
    """Every transaction sent through ingestion; returns (customer ids, their profile ids)
    once features counts every customer's orders."""
    events = order_events(transactions)
    customers, counts = np.unique(transactions.customer_ids, return_counts=True)
    ingestion = create_channel(services.target("ingestion"), Settings(), traced=False)
    identity = create_channel(services.target("identity"), Settings(), traced=False)
    features = create_channel(services.target("features"), Settings(), traced=False)
    try:
        send = ingestion_service_pb2_grpc.IngestionServiceStub(ingestion).SendEvents
        started = time.perf_counter()
        for start in range(0, len(events), SEND_BATCH):
            chunk = events[start : start + SEND_BATCH]
            answer = await send(
                ingestion_service_pb2.SendEventsRequest(events=chunk, source="cdnow"), timeout=60
            )
            if answer.accepted_count != len(chunk):
                raise RuntimeError(
                    f"ingestion accepted {answer.accepted_count} of {len(chunk)} events: "
                    f"{list(answer.rejected)[:3]}"
                )
        sent = time.perf_counter()

        async def resolved() -> bool:
            return await _logged(identity, "resolutions") >= len(events)

        await _until(services, resolved, "identity's resolution log")
        identity_done = time.perf_counter()
        profile_ids = await _profile_ids(identity, customers.tolist())
        if not all(profile_ids) or len(set(profile_ids)) != len(customers):
            raise RuntimeError("identity did not give every customer a profile of their own")
        # The customers of the last request first (cheap to poll), then everyone: polling
        # everyone often would slow features down.
        index = {c: i for i, c in enumerate(customers.tolist())}
        last = sorted({index[e.user_id] for e in events[-SEND_BATCH:]})
        last_ids = [profile_ids[i] for i in last]
        last_counts = [int(counts[i]) for i in last]

        async def counted() -> bool:
            return await _orders_seen(features, last_ids) == last_counts and (
                await _orders_seen(features, profile_ids) == counts.tolist()
            )

        await _until(services, counted, "features' order counts")
        done = time.perf_counter()
    finally:
        for channel in (ingestion, identity, features):
            await channel.close()
    figures = report.figures
    figures["transactions_loaded"] = len(events)
    figures["customers_loaded"] = len(customers)
    figures["ingest_send_events_per_s"] = len(events) / (sent - started)
    figures["ingest_to_identity_resolved_s"] = identity_done - started
    figures["ingest_to_features_caught_up_s"] = done - started
    figures["ingest_to_features_caught_up_events_per_s"] = len(events) / (done - started)
    print(
        f"loaded {len(events):,} transactions of {len(customers):,} customers: sent in "
        f"{sent - started:.1f} s, resolved by identity after {identity_done - started:.1f} s, "
        f"counted by features after {done - started:.1f} s"
    )
    return customers.tolist(), profile_ids


# -- The point-in-time data set ---------------------------------------------------------------


def churn_label() -> model_pb2.LabelDefinition:
    """Churn: no ``Order Completed`` within 39 weeks; eligible once a customer has bought."""
    label = model_pb2.LabelDefinition(
        kind=model_pb2.MODEL_KIND_CHURN, event_names=["Order Completed"]
    )
    label.horizon.FromSeconds(HORIZON_DAYS * DAY_S)
    return label


@dataclass(frozen=True)
class PointInTime:
    """Rows (customer, cut-off) from the features service: features, eligibility, label.

    Rows are cut-off major: row ``k * customers + i`` is customer ``i`` at ``cutoffs[k]``.
    """

    feature_names: tuple[str, ...]
    cutoffs: tuple[int, ...]
    matrix: Floats
    eligible: NDArray[np.bool_]
    labels: Labels
    customers: int

    def at(self, cutoff: int) -> slice:
        k = self.cutoffs.index(cutoff)
        return slice(k * self.customers, (k + 1) * self.customers)

    @property
    def row_cutoffs(self) -> NDArray[np.int64]:
        return np.repeat(np.asarray(self.cutoffs, dtype=np.int64), self.customers)


def _entity_rows(profile_ids: Sequence[str], stamps: NDArray[np.int64]) -> pa.Table:
    return pa.table(
        {
            "profile_id": pa.array(list(profile_ids) * (len(stamps) // len(profile_ids))),
            "event_timestamp": pa.array(stamps, pa.int64()).cast(pa.timestamp("ns", tz="UTC")),
        }
    )


async def point_in_time(
    client: FeaturesClient, profile_ids: Sequence[str], report: Report
) -> PointInTime:
    """Every customer at every cut-off of every scheme, with features and label, as a
    training run reads them: features and the label's counts at the cut-off, the outcome
    count one horizon later."""
    plan = labels.plan(churn_label())
    names = pin(FEATURES, await client.definitions())
    stamps = tuple(sorted({c for scheme in SCHEMES.values() for c in scheme}))
    row_stamps = np.repeat(np.asarray(stamps, dtype=np.int64), len(profile_ids))
    rows = _entity_rows(profile_ids, row_stamps)
    counts = [d.name for d in plan.definitions]
    started = time.perf_counter()
    at_cutoff = await client.historical([*names, *counts], rows=rows, extra=plan.definitions)
    after = await client.historical(
        [labels.OUTCOMES],
        rows=_entity_rows(profile_ids, row_stamps + plan.horizon_ns),
        extra=[plan.definitions[0]],
    )
    seconds = time.perf_counter() - started
    if at_cutoff.column("profile_id").to_pylist() != rows.column("profile_id").to_pylist():
        raise RuntimeError("GetHistoricalFeatures did not keep the entity rows' order")
    eligible, outcome = labels.label_rows(plan, at_cutoff, after)
    report.figures["point_in_time_entity_rows"] = rows.num_rows
    report.figures["point_in_time_s"] = seconds
    report.figures["point_in_time_rows_per_s"] = 2 * rows.num_rows / seconds
    return PointInTime(
        feature_names=tuple(names),
        cutoffs=stamps,
        matrix=matrix_of(at_cutoff, names),
        eligible=np.asarray(eligible, dtype=bool),
        labels=np.asarray(outcome, dtype=np.int8),
        customers=len(profile_ids),
    )


async def train_through_service(target: str, report: Report) -> None:
    """For information: profilemesh's model trained by the TrainModel RPC on every loaded
    customer at the same cut-offs; its metrics are the service's own (half of the week-39
    rows)."""
    async with create_channel(target, Settings(), traced=False) as channel:
        stub = scoring_service_pb2_grpc.ScoringServiceStub(channel)
        request = scoring_pb2.TrainModelRequest(
            model="cdnow_churn", label=churn_label(), feature_names=list(FEATURES)
        )
        for cutoff in SCHEMES[PROFILEMESH]:
            request.cutoffs.add().FromNanoseconds(cutoff)
        started = time.perf_counter()
        run = (await stub.TrainModel(request, timeout=30)).run
        while run.state not in (job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED):
            if time.perf_counter() - started > 600:
                raise RuntimeError("TrainModel did not finish in 600 s")
            await asyncio.sleep(0.2)
            asked = scoring_pb2.GetTrainingRunRequest(run_id=run.run_id)
            run = (await stub.GetTrainingRun(asked, timeout=10)).run
        if run.state != job_pb2.JOB_STATE_SUCCEEDED:
            raise RuntimeError(f"TrainModel failed: {run.error}")
        seconds = time.perf_counter() - started
        asked_model = scoring_pb2.GetModelRequest(model="cdnow_churn")
        model = (await stub.GetModel(asked_model, timeout=10)).model_version
    figures = report.figures
    figures["train_model_rpc_s"] = seconds
    figures["train_model_rpc_training_rows"] = model.metrics.training_rows
    figures["train_model_rpc_validation_rows"] = model.metrics.validation_rows
    rounds = model.params.fields["num_boost_round"].number_value
    figures["train_model_rpc_boosting_rounds"] = rounds
    figures["train_model_rpc_validation_roc_auc"] = model.metrics.roc_auc
    figures["train_model_rpc_validation_pr_auc"] = model.metrics.pr_auc
    figures["train_model_rpc_validation_brier"] = model.metrics.brier
    figures["train_model_rpc_baseline_validation_roc_auc"] = model.baseline_metrics.roc_auc
    print(
        f"TrainModel over gRPC (every loaded customer, weeks 13/26/39): {seconds:.1f} s, "
        f"{rounds:.0f} rounds, validation ROC-AUC "
        f"{model.metrics.roc_auc:.4f} (its baseline {model.baseline_metrics.roc_auc:.4f})"
    )


async def build(transactions: Transactions, report: Report) -> tuple[list[str], PointInTime]:
    """Load CDNOW into the services and read the data set back from features."""
    with tempfile.TemporaryDirectory(prefix="bench-cdnow-churn-") as data_dir:
        services = Services(Path(data_dir))
        try:
            started = time.perf_counter()
            await services.start_all()
            report.figures["services_start_s"] = time.perf_counter() - started
            customers, profile_ids = await load(services, transactions, report)
            settings = Settings()
            target = services.target("features")
            client = FeaturesClient(
                lambda: create_channel(target, settings, traced=False),
                lambda: create_blocking_channel(target, settings),
                deadline_seconds=60,
            )
            try:
                data = await point_in_time(client, profile_ids, report)
            finally:
                await client.close()
            await train_through_service(services.target("scoring"), report)
        finally:
            services.stop()
    return customers, data


# -- Pareto/NBD -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParetoNbdParams:
    """Purchase rates gamma(``r``, rate ``alpha``), dropout rates gamma(``s``, rate ``beta``),
    rates per the time unit of the data (weeks here)."""

    r: float
    alpha: float
    s: float
    beta: float
    log_likelihood: float = math.nan
    converged: bool = False


def _pareto_terms(
    params: Sequence[float], x: Floats, t_x: Floats, age: Floats
) -> tuple[Floats, Floats, Floats]:
    """Per customer, the logarithms of the likelihood's shared factor, of its alive-at-T term
    and of its dropped-out-in-(t_x, T] term (Fader, Hardie & Lee 2005, eq. 2-3):

    L = G(r+x) alpha^r beta^s / G(r) * [1 / ((alpha+T)^(r+x) (beta+T)^s) + s/(r+s+x) A0]

    with, for alpha >= beta, A0 = 2F1(r+s+x, s+1; r+s+x+1; (alpha-beta)/(alpha+t_x)) /
    (alpha+t_x)^(r+s+x) minus the same at T; for alpha < beta the second parameter is r+x and
    beta takes alpha's place. The difference is taken in log space.
    """
    r, alpha, s, beta = params
    rsx = r + s + x
    second, big = (s + 1.0, alpha) if alpha >= beta else (r + x, beta)
    gap = abs(alpha - beta)

    def log_term(end: Floats) -> Floats:
        value = np.log(hyp2f1(rsx, second, rsx + 1.0, gap / (big + end)))
        return np.asarray(value - rsx * np.log(big + end), dtype=np.float64)

    first, last = log_term(t_x), log_term(age)
    with np.errstate(divide="ignore"):  # t_x = T: no time to drop out in, A0 = 0
        log_a0 = first + np.log(-np.expm1(np.minimum(last - first, 0.0)))
    shared = gammaln(r + x) - gammaln(r) + r * math.log(alpha) + s * math.log(beta)
    alive = -(r + x) * np.log(alpha + age) - s * np.log(beta + age)
    dropped = math.log(s) - np.log(rsx) + log_a0
    return shared, alive, dropped


def fit_pareto_nbd(x: Floats, t_x: Floats, age: Floats) -> ParetoNbdParams:
    """Maximum likelihood over the distinct (x, t_x, T) rows, weighted by their counts."""
    rows, weights = np.unique(np.stack([x, t_x, age], axis=1), axis=0, return_counts=True)
    ux, ut, ua = rows[:, 0], rows[:, 1], rows[:, 2]
    total = float(weights.sum())

    def objective(log_params: Floats) -> float:
        shared, alive, dropped = _pareto_terms(np.exp(log_params).tolist(), ux, ut, ua)
        return -float(weights @ (shared + np.logaddexp(alive, dropped))) / total

    scale = float(age.mean())
    result = minimize(
        objective,
        np.log([1.0, scale, 1.0, scale]),
        method="Nelder-Mead",
        options={"xatol": 1e-8, "fatol": 1e-12, "maxiter": 4000, "maxfev": 8000},
    )
    r, alpha, s, beta = (float(v) for v in np.exp(result.x))
    return ParetoNbdParams(r, alpha, s, beta, -float(result.fun) * total, bool(result.success))


def pareto_probability_alive(
    params: ParetoNbdParams, x: Floats, t_x: Floats, age: Floats
) -> Floats:
    """P(alive at T): the alive term's share of the likelihood."""
    _, alive, dropped = _pareto_terms((params.r, params.alpha, params.s, params.beta), x, t_x, age)
    return np.asarray(np.exp(alive - np.logaddexp(alive, dropped)), dtype=np.float64)


# -- The baselines' inputs --------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """Per customer (sorted by id), from the calibration transactions: BG/NBD's summary in
    weeks (repeat purchase days, time of the last one after the first, age) and RFM."""

    x: Floats
    t_x: Floats
    age: Floats
    rfm: Floats
    """Weeks since the last purchase, transactions, mean transaction value."""


def calibration_summary(transactions: Transactions, customers: Sequence[str]) -> Calibration:
    seconds = transactions.noon_seconds
    end = CUTOFF_NS // 1_000_000_000 - 1  # 1997-09-30T23:59:59: age counts to Sep 30
    summary = rfm_summary(
        transactions.customer_ids,
        seconds,
        transactions.dollars,
        observation_end=float(end),
        period_seconds=DAY_S,
    )
    if summary.customer_ids.tolist() != list(customers):
        raise RuntimeError("the calibration summary does not cover every customer")
    seen = seconds <= end
    position = {c: i for i, c in enumerate(customers)}
    index = np.array([position[c] for c in transactions.customer_ids[seen].tolist()])
    count = np.bincount(index, minlength=len(customers)).astype(np.float64)
    spent = np.bincount(index, transactions.dollars[seen], minlength=len(customers))
    last = np.full(len(customers), -np.inf)
    np.maximum.at(last, index, seconds[seen].astype(np.float64))
    weeks_since = (CUTOFF_NS / 1e9 - last) / (WEEK_DAYS * DAY_S)
    return Calibration(
        x=summary.frequency.astype(np.float64),
        t_x=summary.recency / WEEK_DAYS,
        age=summary.T / WEEK_DAYS,
        rfm=np.column_stack([weeks_since, count, spent / count]),
    )


def bgnbd_p_no_purchase(
    params: BgNbdParams, t: float, x: Floats, t_x: Floats, age: Floats
) -> Floats:
    """P(no purchase in (T, T + t]) under BG/NBD (see the module docstring)."""
    alive = probability_alive(params, x, t_x, age)
    log_ratio = np.log(params.alpha + age) - np.log(params.alpha + age + t)
    silent_if_alive = np.exp((params.r + x) * log_ratio)
    return np.asarray(1.0 - alive * (1.0 - silent_if_alive), dtype=np.float64)


# -- Cross-validation -------------------------------------------------------------------------


@dataclass
class Outcome:
    """One model on one fold."""

    metrics: Metrics
    seconds: float
    internal_roc_auc: float = math.nan
    """For profilemesh: ``train``'s own metric (half of the training customers' week-39
    rows)."""
    rounds: float = math.nan


def _logistic_probabilities(train_x: Floats, train_y: Labels, test_x: Floats) -> Floats:
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    model.fit(train_x, train_y)
    return np.asarray(model.predict_proba(test_x)[:, 1], dtype=np.float64)


def _profilemesh(
    data: PointInTime,
    scheme: Sequence[int],
    train_ids: NDArray[np.intp],
    test_ids: NDArray[np.intp],
) -> Outcome:
    """``model.train`` on the training customers' rows at ``scheme``'s cut-offs, scored on
    the test customers' week-39 rows."""
    started = time.perf_counter()
    in_train = np.zeros(data.customers, dtype=bool)
    in_train[train_ids] = True
    stamps = data.row_cutoffs
    rows = data.eligible & np.tile(in_train, len(data.cutoffs)) & np.isin(stamps, scheme)
    plain = [n.partition("@")[0] for n in data.feature_names]
    training = TrainingSet(
        feature_names=data.feature_names,
        matrix=data.matrix[rows],
        labels=data.labels[rows],
        cutoffs=stamps[rows],
        baseline_columns=tuple(plain.index(n) for n in BASELINE_FEATURES if n in plain),
    )
    trained = train(training)
    week39 = data.at(CUTOFF_NS)
    scores = trained.scorer().score(data.matrix[week39][test_ids])
    metrics = evaluate(data.labels[week39][test_ids], scores, training_rows=int(rows.sum()))
    return Outcome(
        metrics,
        time.perf_counter() - started,
        internal_roc_auc=trained.metrics.roc_auc,
        rounds=float(trained.params["num_boost_round"]),
    )


def one_fold(
    data: PointInTime,
    calibration: Calibration,
    train_ids: NDArray[np.intp],
    test_ids: NDArray[np.intp],
) -> dict[str, Outcome]:
    """Every model fitted on the ``train_ids`` customers and measured on the ``test_ids``
    customers' week-39 rows."""
    week39 = data.at(CUTOFF_NS)
    y_train, y_test = data.labels[week39][train_ids], data.labels[week39][test_ids]
    outcomes = {
        name: _profilemesh(data, scheme, train_ids, test_ids) for name, scheme in SCHEMES.items()
    }

    def measured(probabilities: Floats, seconds: float) -> Outcome:
        return Outcome(evaluate(y_test, probabilities, training_rows=len(train_ids)), seconds)

    c = calibration
    train_summary = (c.x[train_ids], c.t_x[train_ids], c.age[train_ids])
    test_summary = (c.x[test_ids], c.t_x[test_ids], c.age[test_ids])
    started = time.perf_counter()
    bgnbd = fit_bgnbd(*train_summary)
    fitted = time.perf_counter() - started
    horizon = float(HORIZON_WEEKS)
    log_expected_train = np.log(expected_purchases(bgnbd, horizon, *train_summary))
    log_expected_test = np.log(expected_purchases(bgnbd, horizon, *test_summary))
    probabilities = _logistic_probabilities(
        log_expected_train.reshape(-1, 1), y_train, log_expected_test.reshape(-1, 1)
    )
    outcomes["bgnbd_expected_purchases"] = measured(probabilities, time.perf_counter() - started)
    started = time.perf_counter()
    silent = bgnbd_p_no_purchase(bgnbd, horizon, *test_summary)
    outcomes["bgnbd_p_no_purchase"] = measured(silent, fitted + time.perf_counter() - started)

    started = time.perf_counter()
    pareto = fit_pareto_nbd(*train_summary)
    alive = pareto_probability_alive(pareto, *test_summary)
    outcomes["pareto_nbd_p_alive"] = measured(1.0 - alive, time.perf_counter() - started)

    started = time.perf_counter()
    probabilities = _logistic_probabilities(c.rfm[train_ids], y_train, c.rfm[test_ids])
    outcomes["rfm_logistic_regression"] = measured(probabilities, time.perf_counter() - started)
    return outcomes


Collected = dict[str, dict[str, Floats]]


def cross_validate(data: PointInTime, calibration: Calibration, repeats: int) -> Collected:
    """Every model on the same repeated stratified folds: per model, per figure, per fold."""
    y = data.labels[data.at(CUTOFF_NS)]
    folds = RepeatedStratifiedKFold(n_splits=FOLDS, n_repeats=repeats, random_state=SEED)
    collected: dict[str, dict[str, list[float]]] = {}
    for number, (train_ids, test_ids) in enumerate(folds.split(np.zeros(len(y)), y)):
        outcomes = one_fold(data, calibration, train_ids, test_ids)
        for model, outcome in outcomes.items():
            into = collected.setdefault(model, {})
            figures = {
                "roc_auc": outcome.metrics.roc_auc,
                "pr_auc": outcome.metrics.pr_auc,
                "brier": outcome.metrics.brier,
                "fit_score_s": outcome.seconds,
                "internal_roc_auc": outcome.internal_roc_auc,
                "rounds": outcome.rounds,
            }
            for key, value in figures.items():
                into.setdefault(key, []).append(value)
        print(
            f"  fold {number + 1:>2} ROC-AUC: "
            + ", ".join(f"{m} {o.metrics.roc_auc:.4f}" for m, o in outcomes.items())
        )
    return {m: {k: np.asarray(v) for k, v in d.items()} for m, d in collected.items()}


# -- The benchmark ----------------------------------------------------------------------------


def fit_full_cohort(calibration: Calibration, report: Report) -> None:
    """Pareto/NBD on the 2,357-customer sample (the note's data) and on the whole cohort's
    calibration data, next to the published parameters; BG/NBD on the whole cohort."""
    sample = dataset(SAMPLE_SUMMARY)
    fits: dict[str, ParetoNbdParams] = {}
    if sample is not None:
        table = np.genfromtxt(sample, delimiter=",", names=True)
        started = time.perf_counter()
        fits["sample"] = fit_pareto_nbd(table["frequency"], table["recency"], table["T"])
        report.figures["pareto_nbd_sample_fit_ms"] = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    fits["full"] = fit_pareto_nbd(calibration.x, calibration.t_x, calibration.age)
    report.figures["pareto_nbd_full_fit_ms"] = (time.perf_counter() - started) * 1000
    print(
        "Pareto/NBD (weeks) next to Fader, Hardie & Lee (2005), whose fit is of the 2,357-"
        "customer sample:"
    )
    for name, published in PAPER_PARETO_NBD.items():
        report.references[f"paper_pareto_nbd_{name}"] = published
        line = f"  {name:<6} paper {published:>6.2f}"
        for data, fitted in fits.items():
            value = getattr(fitted, name)
            report.figures[f"pareto_nbd_{data}_{name}"] = value
            line += f"   {data} {value:>8.4f} ({value / published - 1:+.1%})"
        print(line)
    report.references["paper_pareto_nbd_log_likelihood"] = PAPER_PARETO_NBD_LOG_LIKELIHOOD
    for data, fitted in fits.items():
        report.figures[f"pareto_nbd_{data}_log_likelihood"] = fitted.log_likelihood
        report.target(f"pareto_nbd_{data}_converged", "optimiser converged", fitted.converged)
    print(
        f"  log likelihood: paper {PAPER_PARETO_NBD_LOG_LIKELIHOOD}, "
        + ", ".join(f"{d} {f.log_likelihood:.1f}" for d, f in fits.items())
    )
    if "sample" in fits:
        worst = max(abs(getattr(fits["sample"], n) / p - 1) for n, p in PAPER_PARETO_NBD.items())
        report.ratios["pareto_nbd_sample_worst_relative_error"] = worst
        report.target(
            "pareto_nbd_sample_matches_paper",
            f"each parameter within {PARETO_CHECK_TOLERANCE:.0%}",
            worst <= PARETO_CHECK_TOLERANCE,
        )
    bgnbd = fit_bgnbd(calibration.x, calibration.t_x, calibration.age)
    for name in ("r", "alpha", "a", "b", "log_likelihood"):
        report.figures[f"bgnbd_full_{name}"] = getattr(bgnbd, name)
    certain = probability_alive(bgnbd, calibration.x, calibration.t_x, calibration.age) == 1.0
    report.figures["bgnbd_p_alive_exactly_1_customers"] = int(certain.sum())
    report.figures["one_time_buyers_week_39"] = int((calibration.x == 0).sum())
    print(
        f"BG/NBD on the whole cohort: r {bgnbd.r:.4f}, alpha {bgnbd.alpha:.4f}, a {bgnbd.a:.4f}, "
        f"b {bgnbd.b:.4f}; its P(alive) is exactly 1 for {int(certain.sum()):,} customers, "
        f"the {int((calibration.x == 0).sum()):,} one-time buyers: no baseline"
    )


def summarise(results: Collected, report: Report) -> None:
    folds = len(results[PROFILEMESH]["roc_auc"])
    print(f"\nchurn at week 39 on {folds} test folds, mean ± sd:")
    print(f"  {'model':<28} {'ROC-AUC':>16} {'PR-AUC':>16} {'Brier':>16} {'fit+score s':>12}")
    for model, values in results.items():
        where = report.figures if model.startswith(PROFILEMESH) else report.references
        cells = []
        for metric in METRICS:
            mean, sd = float(values[metric].mean()), float(values[metric].std(ddof=1))
            where[f"{model}_{metric}_mean"] = mean
            where[f"{model}_{metric}_sd"] = sd
            cells.append(f"{mean:.4f} ± {sd:.4f}")
        where[f"{model}_fit_score_s_mean"] = float(values["fit_score_s"].mean())
        print(
            f"  {model:<28} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16} "
            f"{values['fit_score_s'].mean():>12.2f}"
        )
        print(f"  {'':<28} {NOTES[model]}")
        if model.startswith(PROFILEMESH):
            internal = float(values["internal_roc_auc"].mean())
            where[f"{model}_internal_roc_auc_mean"] = internal
            where[f"{model}_boosting_rounds_mean"] = float(values["rounds"].mean())
            where[f"{model}_internal_minus_test_roc_auc"] = internal - float(
                values["roc_auc"].mean()
            )
            print(
                f"  {'':<28} train's own validation ROC-AUC {internal:.4f}, "
                f"{values['rounds'].mean():.0f} boosting rounds on average"
            )
    print("  BG/NBD's P(alive) is no baseline: exactly 1 for every one-time buyer.")
    ours = results[PROFILEMESH]
    best = {
        "roc_auc": max(BASELINES, key=lambda b: float(results[b]["roc_auc"].mean())),
        "pr_auc": max(BASELINES, key=lambda b: float(results[b]["pr_auc"].mean())),
        "brier": min(BASELINES, key=lambda b: float(results[b]["brier"].mean())),
    }
    for metric, model in best.items():
        value = float(results[model][metric].mean())
        difference = ours[metric] - results[model][metric]
        report.references[f"best_baseline_{metric}"] = value
        report.ratios[f"{metric}_vs_best_baseline"] = float(ours[metric].mean()) / value
        report.ratios[f"{metric}_paired_difference_mean"] = float(difference.mean())
        report.ratios[f"{metric}_paired_difference_sd"] = float(difference.std(ddof=1))
        print(
            f"  best baseline by {metric}: {model} {value:.4f}; profilemesh "
            f"{ours[metric].mean():.4f}, paired difference {difference.mean():+.4f} "
            f"± {difference.std(ddof=1):.4f}"
        )
    report.target(
        "roc_auc_at_least_best_baseline",
        ">= best baseline ROC-AUC",
        float(ours["roc_auc"].mean()) >= report.references["best_baseline_roc_auc"],
    )
    report.target(
        "pr_auc_at_least_best_baseline",
        ">= best baseline PR-AUC",
        float(ours["pr_auc"].mean()) >= report.references["best_baseline_pr_auc"],
    )
    bgnbd = max(float(results[b]["roc_auc"].mean()) for b in BASELINES if "bgnbd" in b)
    report.references["best_bgnbd_roc_auc"] = bgnbd
    report.target(
        "roc_auc_at_least_bgnbd",
        ">= BG/NBD's ROC-AUC (DESIGN.md)",
        float(ours["roc_auc"].mean()) >= bgnbd,
    )
    report.target(
        "brier_within_best_baseline",
        f"<= best baseline + {BRIER_TOLERANCE}",
        float(ours["brier"].mean()) <= report.references["best_baseline_brier"] + BRIER_TOLERANCE,
    )


def main() -> int:
    args = parse_args(__doc__.splitlines()[0])
    master = dataset(MASTER)
    if master is None:
        print(
            "cdnow_churn needs CDNOW_master.txt of the lifetimes package (benchmark data only; "
            "installed without its dependencies, never imported):\n"
            f"    {sys.executable} -m pip install --no-deps lifetimes",
            file=sys.stderr,
        )
        return 2
    report = Report("cdnow_churn")
    everything = read_master(master)
    customers = np.unique(everything.customer_ids)
    report.figures["cdnow_transactions"] = len(everything.customer_ids)
    report.figures["cdnow_customers"] = len(customers)
    fit_full_cohort(calibration_summary(everything, customers.tolist()), report)
    transactions = everything
    if args.quick:
        chosen = np.random.default_rng(SEED).random(len(customers)) < QUICK_SHARE
        transactions = everything.of(customers[chosen])
    loaded, data = asyncio.run(build(transactions, report))
    calibration = calibration_summary(transactions, loaded)
    week39 = data.at(CUTOFF_NS)
    if not data.eligible[week39].all():
        raise RuntimeError("every CDNOW customer has bought by week 39, so all are eligible")
    figures = report.figures
    figures["cohort_customers"] = int(data.eligible[week39].sum())
    figures["churn_rate_week_39"] = float(data.labels[week39].mean())
    for name, scheme in SCHEMES.items():
        figures[f"{name}_cutoffs"] = len(scheme)
        figures[f"{name}_eligible_rows_all_customers"] = int(
            (data.eligible & np.isin(data.row_cutoffs, scheme)).sum()
        )
        print(f"{name} cut-offs: {', '.join(day(c) for c in scheme)}")
    print(
        f"cohort: {figures['cohort_customers']:,} customers, churn rate at week 39 "
        f"{figures['churn_rate_week_39']:.3f}"
    )
    repeats = 1 if args.quick else 3
    started = time.perf_counter()
    results = cross_validate(data, calibration, repeats)
    figures["cross_validation_s"] = time.perf_counter() - started
    figures["folds"] = len(results[PROFILEMESH]["roc_auc"])
    summarise(results, report)
    report.print()
    report.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
