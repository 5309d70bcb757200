"""The features service over real sockets: it follows identity's resolution log, keeps streaming
state, merges and splits it with identity, and serves online, historical and new features."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pyarrow as pa
import pyarrow.compute
import pyarrow.ipc
import pytest

from profilemesh.common.v1 import identifier_pb2, job_pb2
from profilemesh.features.v1 import (
    feature_definition_pb2,
    feature_log_pb2,
    features_service_pb2_grpc,
)
from profilemesh.features.v1 import features_service_pb2 as features_pb2
from profilemesh.identity.v1 import identity_service_pb2 as identity_pb2
from profilemesh.identity.v1 import identity_service_pb2_grpc
from profilemesh.ingestion.v1 import event_pb2, ingestion_service_pb2, ingestion_service_pb2_grpc
from profilemesh.shared.channel import create_channel
from profilemesh.shared.log.client import RemoteLog
from profilemesh.shared.settings import Settings
from tests.running_service import RunningIngestion, RunningService

DAY = 86_400


class Mesh:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ingestion = RunningIngestion(settings, port=settings.services.ingestion.port)
        self.identity = RunningService(settings, "identity", settings.services.identity.port)
        self.features = RunningService(settings, "features", settings.services.features.port)


@pytest.fixture
async def mesh(mesh_settings: Settings) -> AsyncIterator[Mesh]:
    running = Mesh(mesh_settings)
    await running.ingestion.start()
    await running.identity.start()
    await running.features.start()
    yield running
    for service in (running.features, running.identity, running.ingestion):
        if service.server is not None:
            await service.stop()


def order(user: str = "", anon: str = "", revenue: float = 0.0, days_ago: float = 0.0) -> Any:
    event = event_pb2.Event(user_id=user, anonymous_id=anon)
    event.track.event = "Order Completed"
    event.track.properties.update({"revenue": revenue})
    event.timestamp.FromSeconds(int(time.time() - days_ago * DAY))
    return event


def page(anon: str, days_ago: float = 0.0, device: str = "mobile") -> Any:
    event = event_pb2.Event(anonymous_id=anon)
    event.page.name = "Home"
    event.context.device.type = device
    event.timestamp.FromSeconds(int(time.time() - days_ago * DAY))
    return event


async def send(settings: Settings, *events: Any) -> None:
    async with create_channel(settings.services.ingestion.target, settings) as channel:
        stub = ingestion_service_pb2_grpc.IngestionServiceStub(channel)
        response = await stub.SendEvents(ingestion_service_pb2.SendEventsRequest(events=events))
        assert response.accepted_count == len(events)


async def feature_changes(settings: Settings) -> list[feature_log_pb2.FeatureChangeEntry]:
    remote = RemoteLog(settings.services.features.target, "feature-changes", settings)
    entries = []
    try:
        for partition in await remote.offsets():
            for batch in await remote.read(partition.partition, partition.first, 10_000):
                entries.extend(
                    feature_log_pb2.FeatureChangeEntry.FromString(p) for p in batch.payload_list()
                )
    finally:
        await remote.close()
    return entries


def ident(kind: str, value: str) -> identifier_pb2.Identifier:
    return identifier_pb2.Identifier(type=kind, value=value)


async def features_of(
    settings: Settings, identifier: identifier_pb2.Identifier, names: list[str]
) -> tuple[str, dict[str, Any]]:
    async with create_channel(settings.services.features.target, settings) as channel:
        stub = features_service_pb2_grpc.FeaturesServiceStub(channel)
        response = await stub.GetFeatures(
            features_pb2.GetFeaturesRequest(identifier=identifier, feature_names=names)
        )
    values = {}
    for value in response.vector.values:
        kind = value.WhichOneof("value")
        values[value.name] = getattr(value, kind) if kind else None
    return response.vector.profile_id, values


async def eventually(
    settings: Settings,
    identifier: identifier_pb2.Identifier,
    names: list[str],
    expected: dict[str, Any],
    timeout: float = 15,
) -> str:
    """Wait until the features of ``identifier`` equal ``expected``; the profile id."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            profile_id, values = await features_of(settings, identifier, names)
            last = values
            if values == expected:
                return profile_id
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            last = error.details()
        await asyncio.sleep(0.05)
    raise AssertionError(f"features of {identifier.value}: {last}, expected {expected}")


async def test_events_update_features_and_a_merge_combines_them_exactly(mesh: Mesh) -> None:
    settings = mesh.settings
    names = ["orders_lifetime", "revenue_90d", "orders_30d"]
    await send(
        settings,
        order(user="u-1", revenue=30, days_ago=40),
        order(user="u-1", revenue=10, days_ago=1),
        order(anon="a-1", revenue=5, days_ago=2),
        page("a-1", days_ago=1),
    )
    await eventually(
        settings,
        ident("user_id", "u-1"),
        names,
        {"orders_lifetime": 2, "revenue_90d": 40.0, "orders_30d": 1},
    )
    anonymous = await eventually(
        settings,
        ident("anonymous_id", "a-1"),
        names,
        {"orders_lifetime": 1, "revenue_90d": 5.0, "orders_30d": 1},
    )
    # An identify links the anonymous visitor to the user: identity merges, features combine.
    identify = event_pb2.Event(user_id="u-1", anonymous_id="a-1")
    identify.identify.SetInParent()
    await send(settings, identify)
    merged = await eventually(
        settings,
        ident("anonymous_id", "a-1"),
        names,
        {"orders_lifetime": 3, "revenue_90d": 45.0, "orders_30d": 2},
    )
    # The feature-change log says what changed, and that the merged profile's state is gone.
    for _ in range(200):  # the outbox publishes shortly after the commit
        changes = await feature_changes(settings)
        if any(c.HasField("removed") for c in changes):
            break
        await asyncio.sleep(0.05)
    changed = [c.changed for c in changes if c.HasField("changed")]
    assert any(
        c.profile_id == merged and {v.name for v in c.values} >= {"orders_lifetime"}
        for c in changed
    )
    removed = [c.removed for c in changes if c.HasField("removed")]
    assert [(r.profile_id, r.surviving_profile_id) for r in removed] == [(anonymous, merged)]
    # The retired id still answers, with the survivor's values.
    async with create_channel(settings.services.features.target, settings) as channel:
        stub = features_service_pb2_grpc.FeaturesServiceStub(channel)
        for retired in {anonymous, merged}:
            response = await stub.GetFeatures(
                features_pb2.GetFeaturesRequest(profile_id=retired, feature_names=names)
            )
            assert response.vector.profile_id == merged
        # Bad input names the field.
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.GetFeatures(
                features_pb2.GetFeaturesRequest(profile_id=merged, feature_names=["nope"])
            )
        assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "feature_names[0]" in str(unknown.value.debug_error_string()) or "nope" in (
            unknown.value.details() or ""
        )


async def test_an_unmerge_splits_the_state_by_identifier(mesh: Mesh) -> None:
    settings = mesh.settings
    names = ["orders_lifetime", "revenue_90d"]
    await send(
        settings,
        order(anon="d-1", revenue=7, days_ago=3),
        order(anon="d-2", revenue=11, days_ago=2),
    )
    first = await eventually(
        settings, ident("anonymous_id", "d-1"), names, {"orders_lifetime": 1, "revenue_90d": 7.0}
    )
    second = await eventually(
        settings, ident("anonymous_id", "d-2"), names, {"orders_lifetime": 1, "revenue_90d": 11.0}
    )
    async with create_channel(settings.services.identity.target, settings) as channel:
        stub = identity_service_pb2_grpc.IdentityServiceStub(channel)
        merged = await stub.MergeProfiles(
            identity_pb2.MergeProfilesRequest(profile_ids=[first, second], reason="same person")
        )
        await eventually(
            settings,
            ident("anonymous_id", "d-2"),
            names,
            {"orders_lifetime": 2, "revenue_90d": 18.0},
        )
        await stub.UnmergeProfile(
            identity_pb2.UnmergeProfileRequest(
                profile_id=merged.surviving_profile_id,
                identifiers=[ident("anonymous_id", "d-2")],
                reason="not the same",
            )
        )
    assert (
        await eventually(
            settings,
            ident("anonymous_id", "d-1"),
            names,
            {"orders_lifetime": 1, "revenue_90d": 7.0},
        )
        == first
    )
    assert (
        await eventually(
            settings,
            ident("anonymous_id", "d-2"),
            names,
            {"orders_lifetime": 1, "revenue_90d": 11.0},
        )
        == second
    )


async def test_historical_features_never_see_later_events(mesh: Mesh) -> None:
    settings = mesh.settings
    await send(
        settings,
        order(user="h-1", revenue=10, days_ago=20),
        order(user="h-1", revenue=20, days_ago=10),
        order(user="h-1", revenue=40, days_ago=1),
    )
    profile_id = await eventually(
        settings, ident("user_id", "h-1"), ["orders_lifetime"], {"orders_lifetime": 3}
    )
    now = time.time()
    stamps = [now - 30 * DAY, now - 15 * DAY, now - 5 * DAY, now]
    rows = pa.table(
        {
            "profile_id": [profile_id] * 4,
            "event_timestamp": pa.array(
                [int(s * 1e9) for s in stamps], pa.timestamp("ns", tz="UTC")
            ),
            "label": [0, 1, 0, 1],
        }
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rows.schema) as writer:
        writer.write_table(rows)
    async with create_channel(settings.services.features.target, settings) as channel:
        stub = features_service_pb2_grpc.FeaturesServiceStub(channel)
        chunks = [
            pa.ipc.open_stream(chunk.arrow_ipc).read_all()
            async for chunk in stub.GetHistoricalFeatures(
                features_pb2.GetHistoricalFeaturesRequest(
                    entity_rows_arrow=sink.getvalue().to_pybytes(),
                    feature_names=["orders_lifetime", "monetary_365d"],
                    max_rows_per_chunk=3,
                )
            )
        ]
        assert [len(c) for c in chunks] == [3, 1]
        table = pa.concat_tables(chunks)
        assert table.column("label").to_pylist() == [0, 1, 0, 1]
        assert table.column("orders_lifetime").to_pylist() == [0, 1, 2, 3]
        assert table.column("monetary_365d").to_pylist()[1:] == [10.0, 30.0, 70.0]
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.GetHistoricalFeatures(
                features_pb2.GetHistoricalFeaturesRequest(
                    entity_rows_arrow=b"not arrow", feature_names=["orders_lifetime"]
                )
            ).read()
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # A spine of cut-offs and a definition computed for this request only.
        big = feature_definition_pb2.FeatureDefinition(
            name="big_orders", aggregation=feature_definition_pb2.AGGREGATION_COUNT
        )
        big.event_names.append("Order Completed")
        big.filters.add(
            property="revenue", operator=feature_definition_pb2.OPERATOR_GE
        ).value.number_value = 20
        request = features_pb2.GetHistoricalFeaturesRequest(
            feature_names=["orders_lifetime", "big_orders"], extra_definitions=[big]
        )
        for stamp in stamps[1:]:
            request.cutoffs.add().FromNanoseconds(int(stamp * 1e9))
        spine = pa.concat_tables(
            [
                pa.ipc.open_stream(c.arrow_ipc).read_all()
                async for c in stub.GetHistoricalFeatures(request)
            ]
        )
        mine = spine.filter(pa.compute.equal(spine.column("profile_id"), profile_id))
        assert mine.column("orders_lifetime").to_pylist() == [1, 2, 3]
        assert mine.column("big_orders").to_pylist() == [0, 1, 2]
        listed = await stub.ListFeatureDefinitions(features_pb2.ListFeatureDefinitionsRequest())
        assert "big_orders" not in {d.name for d in listed.definitions}


async def test_a_new_definition_is_backfilled_then_served(mesh: Mesh) -> None:
    settings = mesh.settings
    await send(
        settings,
        order(user="n-1", revenue=100, days_ago=3),
        order(user="n-1", revenue=300, days_ago=2),
    )
    await eventually(settings, ident("user_id", "n-1"), ["orders_lifetime"], {"orders_lifetime": 2})
    definition = feature_definition_pb2.FeatureDefinition(
        name="big_orders_lifetime",
        aggregation=feature_definition_pb2.AGGREGATION_COUNT,
        event_names=["Order Completed"],
    )
    definition.filters.add(
        property="revenue", operator=feature_definition_pb2.OPERATOR_GE
    ).value.number_value = 200
    async with create_channel(settings.services.features.target, settings) as channel:
        stub = features_service_pb2_grpc.FeaturesServiceStub(channel)
        created = await stub.CreateFeatureDefinition(
            features_pb2.CreateFeatureDefinitionRequest(definition=definition)
        )
        assert created.definition.version == 1
        job_id = created.backfill.job_id
        for _ in range(200):
            job = (await stub.GetBackfill(features_pb2.GetBackfillRequest(job_id=job_id))).job
            if job.state in (job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED):
                break
            await asyncio.sleep(0.05)
        assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.error
        assert job.profiles_updated >= 1
        listed = await stub.ListFeatureDefinitions(features_pb2.ListFeatureDefinitionsRequest())
        assert "big_orders_lifetime" in {d.name for d in listed.definitions}
        bad = feature_definition_pb2.FeatureDefinition(
            name="broken", aggregation=feature_definition_pb2.AGGREGATION_SUM
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateFeatureDefinition(
                features_pb2.CreateFeatureDefinitionRequest(definition=bad)
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await eventually(
        settings, ident("user_id", "n-1"), ["big_orders_lifetime"], {"big_orders_lifetime": 1}
    )
    # New events keep it up to date.
    await send(settings, order(user="n-1", revenue=250, days_ago=0))
    await eventually(
        settings, ident("user_id", "n-1"), ["big_orders_lifetime"], {"big_orders_lifetime": 2}
    )


async def test_state_survives_a_restart(mesh: Mesh) -> None:
    settings = mesh.settings
    await send(settings, order(user="r-1", revenue=9, days_ago=1))
    await eventually(settings, ident("user_id", "r-1"), ["orders_lifetime"], {"orders_lifetime": 1})
    await mesh.features.restart()
    await send(settings, order(user="r-1", revenue=9, days_ago=0))
    await eventually(settings, ident("user_id", "r-1"), ["orders_lifetime"], {"orders_lifetime": 2})


async def test_lifetime_value_is_fitted_on_purchases_and_served(mesh: Mesh) -> None:
    settings = mesh.settings
    rng = __import__("random").Random(7)
    events = []
    for customer in range(120):
        first = rng.uniform(60, 300)
        events.append(order(user=f"c-{customer}", revenue=rng.uniform(10, 90), days_ago=first))
        for _ in range(rng.choice([0, 0, 1, 2, 4])):
            events.append(
                order(
                    user=f"c-{customer}",
                    revenue=rng.uniform(10, 90),
                    days_ago=rng.uniform(0, first - 1),
                )
            )
    for start in range(0, len(events), 200):
        await send(settings, *events[start : start + 200])
    for customer in range(120):  # every partition caught up
        user = f"c-{customer}"
        expected = sum(1 for e in events if e.user_id == user)
        await eventually(
            settings, ident("user_id", user), ["orders_lifetime"], {"orders_lifetime": expected}
        )
    async with create_channel(settings.services.features.target, settings) as channel:
        stub = features_service_pb2_grpc.FeaturesServiceStub(channel)
        request = features_pb2.GetLifetimeValueModelRequest()
        model = (await stub.GetLifetimeValueModel(request)).model
        assert model.sample_size == 120
        assert model.bg_nbd.r > 0 and model.bg_nbd.alpha > 0
        assert model.gamma_gamma.p > 0
    _, values = await features_of(
        settings,
        ident("user_id", "c-0"),
        ["clv_probability_alive", "clv_expected_orders_365d", "clv_value_365d", "orders_lifetime"],
    )
    assert 0 < values["clv_probability_alive"] <= 1
    assert values["clv_expected_orders_365d"] > 0
    assert values["clv_value_365d"] > 0


def test_the_event_store_keeps_non_finite_numbers_as_null(tmp_path: Any) -> None:
    from profilemesh.services.features.event_store import DuckDBEventStore, PendingRows
    from profilemesh.services.features.events import FeatureEvent

    store = DuckDBEventStore(tmp_path / "events.duckdb")
    rows = PendingRows()
    event = FeatureEvent(
        "p", 1, "track", "Order Completed", {"revenue": float("nan"), "n": {"x": 1.5}}, {}
    )
    rows.add(0, 0, "user_id:u", event)
    store.append(rows)
    [stored] = store.events_of(["p"])["p"]
    assert stored.properties == {"revenue": None, "n": {"x": 1.5}}
    store.close()
