"""The scoring service over real sockets, on top of ingestion, identity and features: trains a
churn model from point-in-time features, serves scores with reasons, rescores as events arrive,
refuses a changed feature schema, clusters profiles and finds lookalikes."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pyarrow as pa
import pyarrow.ipc
import pytest

from profilemesh.common.v1 import identifier_pb2, job_pb2
from profilemesh.features.v1 import feature_definition_pb2, features_service_pb2_grpc
from profilemesh.features.v1 import features_service_pb2 as features_pb2
from profilemesh.ingestion.v1 import event_pb2, ingestion_service_pb2, ingestion_service_pb2_grpc
from profilemesh.scoring.v1 import model_pb2, score_log_pb2, scoring_service_pb2_grpc
from profilemesh.scoring.v1 import scoring_service_pb2 as scoring_pb2
from profilemesh.shared.channel import create_channel
from profilemesh.shared.log.client import RemoteLog
from profilemesh.shared.settings import Settings
from tests.running_service import RunningIngestion, RunningService

DAY = 86_400
CUSTOMERS = 300
FEATURES = ["recency_days", "frequency_365d", "monetary_365d", "orders_90d", "tenure_days"]


class Mesh:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.services = [
            RunningIngestion(settings, port=settings.services.ingestion.port),
            *(
                RunningService(settings, name, settings.services.of(name).port)
                for name in ("identity", "features", "scoring")
            ),
        ]


def customer_events(rng: random.Random, customer: int) -> list[Any]:
    """A customer who orders every few weeks from their first day until they churn (or not)."""
    start = rng.uniform(200, 360)
    churn_after = rng.choice([None, rng.uniform(20, start)])  # days before now they stop
    stop = churn_after if churn_after is not None else 0
    gap = rng.uniform(8, 30)
    events = []
    day = start
    while day > stop:
        event = event_pb2.Event(user_id=f"c-{customer}")
        event.track.event = "Order Completed"
        event.track.properties.update({"revenue": round(rng.uniform(10, 120), 2)})
        event.timestamp.FromSeconds(int(time.time() - day * DAY))
        events.append(event)
        day -= rng.expovariate(1 / gap)
    return events


@pytest.fixture(scope="module")
def history() -> list[Any]:
    rng = random.Random(5)
    return [e for customer in range(CUSTOMERS) for e in customer_events(rng, customer)]


@pytest.fixture
async def mesh(mesh_settings: Settings, history: list[Any]) -> AsyncIterator[Mesh]:
    running = Mesh(mesh_settings)
    for service in running.services:
        await service.start()
    settings = mesh_settings
    async with create_channel(settings.services.ingestion.target, settings) as channel:
        stub = ingestion_service_pb2_grpc.IngestionServiceStub(channel)
        for start in range(0, len(history), 500):
            await stub.SendEvents(
                ingestion_service_pb2.SendEventsRequest(events=history[start : start + 500])
            )
    await caught_up(settings, history)
    yield running
    for service in reversed(running.services):
        if service.server is not None:
            await service.stop()


async def caught_up(settings: Settings, history: list[Any], timeout: float = 60) -> None:
    """Until features counts every order of the last customer of each partition."""
    expected: dict[str, int] = {}
    for event in history:
        expected[event.user_id] = expected.get(event.user_id, 0) + 1
    deadline = time.monotonic() + timeout
    async with create_channel(settings.services.features.target, settings) as channel:
        stub = features_service_pb2_grpc.FeaturesServiceStub(channel)
        pending = dict(expected)
        while pending:
            assert time.monotonic() < deadline, f"{len(pending)} customers not caught up"
            for user, count in list(pending.items()):
                try:
                    response = await stub.GetFeatures(
                        features_pb2.GetFeaturesRequest(
                            identifier=identifier_pb2.Identifier(type="user_id", value=user),
                            feature_names=["orders_lifetime"],
                        )
                    )
                except grpc.aio.AioRpcError:
                    continue
                if response.vector.values[0].int64_value == count:
                    del pending[user]
            await asyncio.sleep(0.05)


def churn_request(model: str = "churn") -> scoring_pb2.TrainModelRequest:
    label = model_pb2.LabelDefinition(
        kind=model_pb2.MODEL_KIND_CHURN, event_names=["Order Completed"]
    )
    label.horizon.FromSeconds(60 * DAY)
    label.eligibility_window.FromSeconds(120 * DAY)
    return scoring_pb2.TrainModelRequest(model=model, label=label, feature_names=FEATURES)


async def trained(stub: Any, request: scoring_pb2.TrainModelRequest) -> model_pb2.TrainingRun:
    run = (await stub.TrainModel(request)).run
    assert run.state == job_pb2.JOB_STATE_PENDING
    for _ in range(600):
        run = (await stub.GetTrainingRun(scoring_pb2.GetTrainingRunRequest(run_id=run.run_id))).run
        if run.state in (job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED):
            return run
        await asyncio.sleep(0.1)
    raise AssertionError("training did not finish")


async def score_changes(settings: Settings) -> list[score_log_pb2.ScoreChangeEntry]:
    remote = RemoteLog(settings.services.scoring.target, "score-changes", settings)
    entries = []
    try:
        for partition in await remote.offsets():
            for batch in await remote.read(partition.partition, partition.first, 100_000):
                entries.extend(
                    score_log_pb2.ScoreChangeEntry.FromString(p) for p in batch.payload_list()
                )
    finally:
        await remote.close()
    return entries


async def test_churn_is_trained_served_and_rescored(mesh: Mesh) -> None:
    settings = mesh.settings
    async with create_channel(settings.services.scoring.target, settings) as channel:
        stub = scoring_service_pb2_grpc.ScoringServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.TrainModel(
                scoring_pb2.TrainModelRequest(model="churn", feature_names=FEATURES)
            )
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        run = await trained(stub, churn_request())
        assert run.state == job_pb2.JOB_STATE_SUCCEEDED, run.error
        model = (await stub.GetModel(scoring_pb2.GetModelRequest(model="churn"))).model_version
        assert model.champion and model.version == run.model_version == "1"
        assert list(model.feature_names) == [f"{name}@1" for name in FEATURES]
        assert len(model.cutoffs) >= 3
        assert model.metrics.roc_auc > 0.7, model.metrics
        assert model.metrics.training_rows > 0 and model.metrics.validation_rows > 0
        assert model.baseline and model.baseline_metrics.roc_auc > 0
        assert model.feature_importances[0].feature in model.feature_names

        scored = await stub.Score(
            scoring_pb2.ScoreRequest(
                identifier=identifier_pb2.Identifier(type="user_id", value="c-1"),
                model="churn",
                top_reasons=3,
            )
        )
        assert 0.0 <= scored.score.score <= 1.0
        assert scored.score.model_version == "1"
        assert len(scored.score.reasons) == 3
        assert {r.feature for r in scored.score.reasons} <= set(model.feature_names)

        chunks = [
            pa.ipc.open_stream(c.arrow_ipc).read_all()
            async for c in stub.ScoreBatch(
                scoring_pb2.ScoreBatchRequest(model="churn", top_reasons=2, max_rows_per_chunk=100)
            )
        ]
        table = pa.concat_tables(chunks)
        assert table.num_rows == CUSTOMERS
        assert set(table.column_names) == {"profile_id", "score", "model_version", "reasons"}
        online = {scored.profile_id: scored.score.score}
        batch = dict(
            zip(
                table.column("profile_id").to_pylist(),
                table.column("score").to_pylist(),
                strict=True,
            )
        )
        assert batch[scored.profile_id] == pytest.approx(online[scored.profile_id], abs=1e-9)

    # A new order changes c-1's features; scoring rescores it and says so.
    order = event_pb2.Event(user_id="c-1")
    order.track.event = "Order Completed"
    order.track.properties.update({"revenue": 50})
    async with create_channel(settings.services.ingestion.target, settings) as channel:
        await ingestion_service_pb2_grpc.IngestionServiceStub(channel).SendEvent(
            ingestion_service_pb2.SendEventRequest(event=order)
        )
    for _ in range(200):
        changes = [
            e.score_changed
            for e in await score_changes(settings)
            if e.HasField("score_changed") and e.score_changed.profile_id == scored.profile_id
        ]
        if any(c.message_id for c in changes):
            break
        await asyncio.sleep(0.05)
    assert any(c.message_id for c in changes), changes
    assert all(c.score.model == "churn" for c in changes)


async def test_a_changed_feature_schema_is_refused(mesh: Mesh) -> None:
    settings = mesh.settings
    async with create_channel(settings.services.scoring.target, settings) as channel:
        stub = scoring_service_pb2_grpc.ScoringServiceStub(channel)
        run = await trained(stub, churn_request("churn_schema"))
        assert run.state == job_pb2.JOB_STATE_SUCCEEDED, run.error
        # A new version of a feature the model reads: the model's schema no longer matches.
        async with create_channel(settings.services.features.target, settings) as features:
            definition = feature_definition_pb2.FeatureDefinition(
                name="tenure_days", aggregation=feature_definition_pb2.AGGREGATION_DAYS_SINCE_FIRST
            )
            definition.event_types.append(0)
            await features_service_pb2_grpc.FeaturesServiceStub(features).CreateFeatureDefinition(
                features_pb2.CreateFeatureDefinitionRequest(definition=definition)
            )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Score(
                scoring_pb2.ScoreRequest(
                    identifier=identifier_pb2.Identifier(type="user_id", value="c-2"),
                    model="churn_schema",
                )
            )
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "tenure_days" in (refused.value.details() or "")


async def test_clusters_and_lookalikes(mesh: Mesh) -> None:
    settings = mesh.settings
    async with create_channel(settings.services.scoring.target, settings) as channel:
        stub = scoring_service_pb2_grpc.ScoringServiceStub(channel)
        discovered = (
            await stub.DiscoverClusters(
                scoring_pb2.DiscoverClustersRequest(
                    name="rfm_personas",
                    feature_names=["recency_days", "frequency_365d", "monetary_365d"],
                    max_k=5,
                )
            )
        ).clustering
        assert discovered.version == "1"
        assert 2 <= len(discovered.clusters) <= 5
        assert sum(c.size for c in discovered.clusters) == discovered.profile_count == CUSTOMERS
        assert all(c.persona and c.description for c in discovered.clusters)
        assert len(discovered.clusters[0].centroid) == 3
        fetched = (
            await stub.GetClustering(scoring_pb2.GetClusteringRequest(name="rfm_personas"))
        ).clustering
        assert fetched == discovered

        seeds = [f"c-{i}" for i in range(10)]
        async with create_channel(settings.services.features.target, settings) as features:
            fstub = features_service_pb2_grpc.FeaturesServiceStub(features)
            ids = [
                (
                    await fstub.GetFeatures(
                        features_pb2.GetFeaturesRequest(
                            identifier=identifier_pb2.Identifier(type="user_id", value=s),
                            feature_names=["orders_lifetime"],
                        )
                    )
                ).vector.profile_id
                for s in seeds
            ]
        found = await stub.ScoreLookalikes(
            scoring_pb2.ScoreLookalikesRequest(seed_profile_ids=ids, top_n=20)
        )
        assert found.seed_size == 10
        assert len(found.lookalikes) == 20
        assert not {lookalike.profile_id for lookalike in found.lookalikes} & set(ids)
        similarities = [lookalike.similarity for lookalike in found.lookalikes]
        assert similarities == sorted(similarities, reverse=True)
        with pytest.raises(grpc.aio.AioRpcError) as empty:
            await stub.ScoreLookalikes(scoring_pb2.ScoreLookalikesRequest())
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_the_command_line_trains_scores_and_discovers(mesh: Mesh, tmp_path: Any) -> None:
    import os
    import subprocess
    import sys

    import pyarrow.parquet as pq

    env = {**os.environ, **mesh.settings.to_env()}

    def profilemesh(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "profilemesh.services.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    trained_run = await asyncio.to_thread(
        profilemesh,
        "train", "churn", "--event", "Order Completed", "--horizon-days", "60",
        "--eligibility-days", "120", "--features", ",".join(FEATURES),
    )  # fmt: skip
    assert trained_run.returncode == 0, trained_run.stderr
    assert "roc_auc" in trained_run.stdout
    out = tmp_path / "scores.parquet"
    scored = await asyncio.to_thread(profilemesh, "score", "churn", "--all", "--out", str(out))
    assert scored.returncode == 0, scored.stderr
    assert pq.read_table(out).num_rows == CUSTOMERS
    one = await asyncio.to_thread(profilemesh, "score", "churn", "--identifier", "user_id:c-3")
    assert one.returncode == 0 and "score" in one.stdout, one.stderr
    clusters = await asyncio.to_thread(
        profilemesh, "segments", "discover", "rfm",
        "--features", "recency_days,frequency_365d,monetary_365d", "--max-k", "4",
    )  # fmt: skip
    assert clusters.returncode == 0, clusters.stderr
    assert "clusters of 300 profiles" in clusters.stdout
    missing = await asyncio.to_thread(profilemesh, "score", "nope", "--identifier", "user_id:c-3")
    assert missing.returncode == 1
