"""Ingestion through real sockets: events of every type, batches, streams, plans, dedup."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from profilemesh.common.v1 import identifier_pb2
from profilemesh.ingestion.v1 import (
    event_log_pb2,
    event_pb2,
    ingestion_service_pb2,
    ingestion_service_pb2_grpc,
    record_pb2,
    result_pb2,
    tracking_plan_pb2,
)
from profilemesh.shared.channel import create_channel
from profilemesh.shared.settings import IngestionSettings, Settings, StreamSettings
from tests.running_service import RunningIngestion

ACCEPTED = result_pb2.ITEM_STATUS_ACCEPTED
DUPLICATE = result_pb2.ITEM_STATUS_DUPLICATE
REJECTED = result_pb2.ITEM_STATUS_REJECTED


@pytest.fixture
async def service(mesh_settings: Settings) -> AsyncIterator[RunningIngestion]:
    running = await RunningIngestion(mesh_settings).start()
    yield running
    if running.server is not None:
        await running.stop()


@pytest.fixture
async def stub(
    service: RunningIngestion, mesh_settings: Settings
) -> AsyncIterator[ingestion_service_pb2_grpc.IngestionServiceStub]:
    async with create_channel(service.target, mesh_settings) as channel:
        yield ingestion_service_pb2_grpc.IngestionServiceStub(channel)


def track(user: str = "u1", name: str = "Order Completed", **properties: object) -> event_pb2.Event:
    event = event_pb2.Event(user_id=user)
    event.track.event = name
    event.track.properties.update(properties or {"revenue": 10})
    return event


def every_type() -> list[event_pb2.Event]:
    identify = event_pb2.Event(anonymous_id="anon-1")
    identify.identify.traits.update({"email": "Ada@Example.com"})
    page = event_pb2.Event(anonymous_id="anon-1")
    page.page.name = "Pricing"
    page.page.properties.update({"path": "/pricing"})
    screen = event_pb2.Event(user_id="u1")
    screen.screen.name = "Home"
    group = event_pb2.Event(user_id="u1")
    group.group.group_id = "acme"
    group.group.traits.update({"plan": "enterprise"})
    alias = event_pb2.Event(user_id="u1")
    alias.alias.previous_id = "anon-1"
    return [track(), identify, page, screen, group, alias]


async def stored_items(service: RunningIngestion) -> list[event_log_pb2.IngestedItem]:
    items = []
    for partition in await service.log.offsets():
        async for batch in service.log.subscribe(partition.partition, 0, stop_at_end=True):
            items.extend(event_log_pb2.IngestedItem.FromString(p) for p in batch.payload_list())
    return items


def bad_request(error: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    raw = dict(error.trailing_metadata() or ())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(raw)
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            found = error_details_pb2.BadRequest()
            detail.Unpack(found)
            return [(v.field, v.description) for v in found.field_violations]
    raise AssertionError("no BadRequest detail")


async def test_every_event_type_is_accepted_and_stored_as_sent(
    stub: ingestion_service_pb2_grpc.IngestionServiceStub, service: RunningIngestion
) -> None:
    events = every_type()
    response = await stub.SendEvents(ingestion_service_pb2.SendEventsRequest(events=events))
    assert [r.status for r in response.results] == [ACCEPTED] * 6
    assert response.accepted_count == 6
    stored = {item.event.message_id: item for item in await stored_items(service)}
    assert set(stored) == {r.message_id for r in response.results}
    bodies = sorted(item.event.WhichOneof("body") for item in stored.values())
    assert bodies == sorted(["track", "identify", "page", "screen", "group", "alias"])
    for item in stored.values():
        assert item.source == "api"
        assert item.received_at.seconds > 0
        assert item.event.received_at == item.received_at
    [identify] = [i.event for i in stored.values() if i.event.HasField("identify")]
    assert identify.identify.traits["email"] == "Ada@Example.com"
    assert identify.anonymous_id == "anon-1"


async def test_clock_skew_is_corrected_as_segment_does(
    stub: ingestion_service_pb2_grpc.IngestionServiceStub, service: RunningIngestion
) -> None:
    event = track()
    event.timestamp.FromSeconds(1_000_000_000)  # the client's clock is far behind...
    event.sent_at.FromSeconds(1_000_000_060)  # ...and it sent the event a minute later
    await stub.SendEvent(ingestion_service_pb2.SendEventRequest(event=event))
    [item] = await stored_items(service)
    received = item.received_at.ToNanoseconds()
    assert item.event.timestamp.ToNanoseconds() == received - 60 * 10**9
    assert item.event.original_timestamp.ToSeconds() == 1_000_000_000


async def test_a_bad_single_event_is_invalid_argument_naming_the_field(
    stub: ingestion_service_pb2_grpc.IngestionServiceStub, service: RunningIngestion
) -> None:
    nameless = event_pb2.Event(user_id="u1")
    nameless.track.SetInParent()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.SendEvent(ingestion_service_pb2.SendEventRequest(event=nameless))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(raised.value) == [("event.track.event", "the event name is required")]
    assert await stored_items(service) == []


async def test_bad_events_in_a_batch_never_block_the_good_ones(
    service: RunningIngestion, mesh_settings: Settings
) -> None:
    good = [track(f"u{i}").SerializeToString() for i in range(3)]
    anonymous = event_pb2.Event()
    anonymous.track.event = "x"
    huge = track(blob="x" * 40_000)
    batch = [good[0], b"\xff\xfe garbage", good[1], anonymous.SerializeToString()]
    batch += [huge.SerializeToString(), good[2]]
    request = b"".join(b"\x0a" + _varint(len(e)) + e for e in batch)
    async with create_channel(service.target, mesh_settings) as channel:
        send = channel.unary_unary(
            "/profilemesh.ingestion.v1.IngestionService/SendEvents",
            request_serializer=None,
            response_deserializer=ingestion_service_pb2.SendEventsResponse.FromString,
        )
        response = await send(request)
    statuses = [r.status for r in response.results]
    assert statuses == [ACCEPTED, REJECTED, ACCEPTED, REJECTED, REJECTED, ACCEPTED]
    assert [r.index for r in response.results] == list(range(6))
    assert response.results[1].violations[0].field == "events[1]"
    assert response.results[3].violations[0].field == "events[3].user_id"
    assert "limit is 32768" in response.results[4].violations[0].description
    assert len(await stored_items(service)) == 3


async def test_a_batch_over_the_limit_is_refused_whole(
    stub: ingestion_service_pb2_grpc.IngestionServiceStub, service: RunningIngestion
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.SendEvents(
            ingestion_service_pb2.SendEventsRequest(events=[track(f"u{i}") for i in range(501)])
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(raised.value)[0][0] == "events"
    assert await stored_items(service) == []


async def test_a_client_stream_counts_across_messages(
    stub: ingestion_service_pb2_grpc.IngestionServiceStub, service: RunningIngestion
) -> None:
    async def messages() -> AsyncIterator[ingestion_service_pb2.StreamEventsRequest]:
        for chunk in range(4):
            events = [track(f"u{chunk}-{i}") for i in range(50)]
            if chunk == 2:
                events[7] = event_pb2.Event(user_id="u")  # no body
            yield ingestion_service_pb2.StreamEventsRequest(events=events)

    response = await stub.StreamEvents(messages())
    assert (response.accepted_count, response.rejected_count) == (199, 1)
    [rejected] = response.rejected
    assert rejected.index == 107
    assert rejected.violations[0].field == "events[107].body"
    assert len(await stored_items(service)) == 199


async def test_duplicates_are_answered_as_such_within_and_across_batches(
    stub: ingestion_service_pb2_grpc.IngestionServiceStub, service: RunningIngestion
) -> None:
    first = track()
    first.message_id = "m-1"
    response = await stub.SendEvents(ingestion_service_pb2.SendEventsRequest(events=[first, first]))
    assert [r.status for r in response.results] == [ACCEPTED, DUPLICATE]
    again = await stub.SendEvent(ingestion_service_pb2.SendEventRequest(event=first))
    assert again.result.status == DUPLICATE
    assert len(await stored_items(service)) == 1


@pytest.mark.parametrize("lose_snapshot", [False, True])
async def test_duplicates_are_recognised_after_a_restart(
    service: RunningIngestion, mesh_settings: Settings, lose_snapshot: bool
) -> None:
    events = [track(f"u{i}") for i in range(20)]
    for i, event in enumerate(events):
        event.message_id = f"restart-{i}"
    async with create_channel(service.target, mesh_settings) as channel:
        stub = ingestion_service_pb2_grpc.IngestionServiceStub(channel)
        await stub.SendEvents(ingestion_service_pb2.SendEventsRequest(events=events[:10]))
    await service.stop()
    if lose_snapshot:
        (mesh_settings.service_data_dir("ingestion") / "dedup.snapshot").unlink()
    await service.start()
    async with create_channel(service.target, mesh_settings) as channel:
        stub = ingestion_service_pb2_grpc.IngestionServiceStub(channel)
        response = await stub.SendEvents(ingestion_service_pb2.SendEventsRequest(events=events))
    assert [r.status for r in response.results] == [DUPLICATE] * 10 + [ACCEPTED] * 10
    assert len(await stored_items(service)) == 20


def _plan(policy: int, **extra: object) -> tracking_plan_pb2.TrackingPlan:
    plan = tracking_plan_pb2.TrackingPlan(name="web", policy=policy, **extra)  # type: ignore[arg-type]
    rule = plan.events.add(event_name="Order Completed")
    rule.properties.add(name="revenue", type=tracking_plan_pb2.PROPERTY_TYPE_NUMBER, required=True)
    rule.properties.add(name="currency", allowed_values=["EUR", "USD"])
    return plan


async def test_tracking_plan_policies_reject_flag_or_allow(
    stub: ingestion_service_pb2_grpc.IngestionServiceStub, service: RunningIngestion
) -> None:
    violating = track(revenue="lots", currency="GBP")
    await stub.CreateTrackingPlan(
        ingestion_service_pb2.CreateTrackingPlanRequest(
            tracking_plan=_plan(tracking_plan_pb2.VIOLATION_POLICY_REJECT)
        )
    )
    response = await stub.SendEvents(
        ingestion_service_pb2.SendEventsRequest(events=[violating, track(revenue=5)])
    )
    assert [r.status for r in response.results] == [REJECTED, ACCEPTED]
    assert sorted(v.field for v in response.results[0].violations) == [
        "events[0].track.properties.currency",
        "events[0].track.properties.revenue",
    ]

    flag = _plan(tracking_plan_pb2.VIOLATION_POLICY_FLAG)
    await stub.UpdateTrackingPlan(
        ingestion_service_pb2.UpdateTrackingPlanRequest(tracking_plan=flag)
    )
    flagged = await stub.SendEvent(ingestion_service_pb2.SendEventRequest(event=violating))
    assert flagged.result.status == ACCEPTED
    assert len(flagged.result.violations) == 2
    stored = {i.event.message_id: i for i in await stored_items(service)}
    assert len(stored[flagged.result.message_id].violations) == 2
    assert stored[flagged.result.message_id].tracking_plan == "web"

    allow = _plan(tracking_plan_pb2.VIOLATION_POLICY_ALLOW)
    await stub.UpdateTrackingPlan(
        ingestion_service_pb2.UpdateTrackingPlanRequest(tracking_plan=allow)
    )
    allowed = await stub.SendEvent(ingestion_service_pb2.SendEventRequest(event=violating))
    assert allowed.result.status == ACCEPTED and not allowed.result.violations


async def test_unplanned_events_can_be_refused(
    stub: ingestion_service_pb2_grpc.IngestionServiceStub,
) -> None:
    plan = _plan(tracking_plan_pb2.VIOLATION_POLICY_REJECT, reject_unplanned_events=True)
    await stub.CreateTrackingPlan(
        ingestion_service_pb2.CreateTrackingPlanRequest(tracking_plan=plan)
    )
    response = await stub.SendEvents(
        ingestion_service_pb2.SendEventsRequest(events=[track(name="Mystery"), track(revenue=1)])
    )
    assert [r.status for r in response.results] == [REJECTED, ACCEPTED]
    assert response.results[0].violations[0].field == "events[0].track.event"


async def test_an_invalid_plan_is_refused_naming_the_field(
    stub: ingestion_service_pb2_grpc.IngestionServiceStub,
) -> None:
    plan = tracking_plan_pb2.TrackingPlan(name="bad plan!")
    plan.events.add(event_name="")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.CreateTrackingPlan(
            ingestion_service_pb2.CreateTrackingPlanRequest(tracking_plan=plan)
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = {field for field, _ in bad_request(raised.value)}
    assert fields == {"tracking_plan.name", "tracking_plan.events[0].event_name"}


async def test_plans_load_from_a_yaml_file(tmp_path: Path, mesh_settings: Settings) -> None:
    plans_file = tmp_path / "plans.yaml"
    plans_file.write_text(
        "plans:\n"
        "  - name: checkout\n"
        "    policy: reject\n"
        "    events:\n"
        "      - event_name: Order Completed\n"
        "        properties:\n"
        "          - {name: revenue, type: number, required: true}\n"
    )
    settings = mesh_settings.model_copy(
        update={"ingestion": IngestionSettings(tracking_plans_file=plans_file)}
    )
    service = await RunningIngestion(settings).start()
    try:
        async with create_channel(service.target, settings) as channel:
            stub = ingestion_service_pb2_grpc.IngestionServiceStub(channel)
            response = await stub.SendEvents(
                ingestion_service_pb2.SendEventsRequest(events=[track(revenue="x"), track()])
            )
            listed = await stub.ListTrackingPlans(ingestion_service_pb2.ListTrackingPlansRequest())
    finally:
        await service.stop()
    assert [r.status for r in response.results] == [REJECTED, ACCEPTED]
    assert [p.name for p in listed.tracking_plans] == ["checkout"]


async def test_records_are_imported_once_and_changes_are_new_evidence(
    stub: ingestion_service_pb2_grpc.IngestionServiceStub, service: RunningIngestion
) -> None:
    record = record_pb2.CustomerRecord(source="crm", record_id="c-1")
    record.identifiers.add(type="email", value="ada@example.com")
    record.attributes.update({"first_name": "Ada", "last_name": "Lovelace"})
    nameless = record_pb2.CustomerRecord(source="crm")
    nameless.identifiers.append(identifier_pb2.Identifier(type="email", value="x@example.com"))
    first = await stub.ImportRecords(
        ingestion_service_pb2.ImportRecordsRequest(records=[record, nameless])
    )
    assert [r.status for r in first.results] == [ACCEPTED, REJECTED]
    assert first.results[1].violations[0].field == "records[1].record_id"
    again = await stub.ImportRecords(ingestion_service_pb2.ImportRecordsRequest(records=[record]))
    assert again.results[0].status == DUPLICATE
    record.attributes.update({"phone": "+44 20 7946 0000"})
    changed = await stub.ImportRecords(ingestion_service_pb2.ImportRecordsRequest(records=[record]))
    assert changed.results[0].status == ACCEPTED
    stored = [i for i in await stored_items(service) if i.HasField("record")]
    assert [i.record.attributes["first_name"] for i in stored] == ["Ada", "Ada"]


async def test_validate_only_checks_without_storing(
    stub: ingestion_service_pb2_grpc.IngestionServiceStub, service: RunningIngestion
) -> None:
    response = await stub.SendEvents(
        ingestion_service_pb2.SendEventsRequest(
            events=[track(), event_pb2.Event(user_id="x")], validate_only=True
        )
    )
    assert [r.status for r in response.results] == [ACCEPTED, REJECTED]
    assert await stored_items(service) == []


async def test_overload_is_resource_exhausted_with_retry_info_and_nothing_half_stored(
    mesh_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fdatasync = os.fdatasync

    def slow_disk(fd: int) -> None:  # a disk slower than the clients: appends pile up
        time.sleep(0.02)
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", slow_disk)
    settings = mesh_settings.model_copy(update={"streams": StreamSettings(max_pending_mib=1)})
    service = await RunningIngestion(settings).start()
    payload = "x" * 900
    batches = [[track(f"u{b}-{i}", blob=payload) for i in range(400)] for b in range(24)]
    accepted = 0
    refusals = 0
    try:
        async with create_channel(service.target, settings) as channel:
            stub = ingestion_service_pb2_grpc.IngestionServiceStub(channel)

            async def send(events: list[event_pb2.Event]) -> None:
                nonlocal accepted, refusals
                while True:
                    try:
                        response = await stub.SendEvents(
                            ingestion_service_pb2.SendEventsRequest(events=events)
                        )
                    except grpc.aio.AioRpcError as error:
                        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                        raw = dict(error.trailing_metadata() or ())["grpc-status-details-bin"]
                        status = status_pb2.Status.FromString(raw)
                        assert any(
                            d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details
                        )
                        refusals += 1
                        await asyncio.sleep(0.05)
                        continue
                    accepted += response.accepted_count
                    return

            await asyncio.gather(*(send(batch) for batch in batches))
        stored = await stored_items(service)
    finally:
        await service.stop()
    assert refusals > 0, "the tiny pending bound never pushed back"
    assert accepted == len(stored) == 24 * 400


def _varint(value: int) -> bytes:
    from profilemesh.shared.wire import varint

    return varint(value)
