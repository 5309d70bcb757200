"""A service's log over gRPC: Subscribe, GetOffsets, errors, resuming across restarts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from profilemesh.common.v1 import log_service_pb2, log_service_pb2_grpc
from profilemesh.shared.channel import create_channel
from profilemesh.shared.log.api import OffsetOutOfRange
from profilemesh.shared.log.client import RemoteLog
from profilemesh.shared.log.hosting import HostedLog
from profilemesh.shared.settings import Settings
from tests.running_service import RunningIngestion


@pytest.fixture
async def ingestion(mesh_settings: Settings) -> AsyncIterator[RunningIngestion]:
    service = RunningIngestion(mesh_settings)
    await service.start()
    yield service
    await service.stop()


async def _collect(remote: RemoteLog, partition: int, count: int, start: int = 0) -> list[bytes]:
    payloads: list[bytes] = []
    async for batch in remote.subscribe(partition, start):
        payloads.extend(batch.payload_list())
        if len(payloads) >= count:
            break
    return payloads


async def test_subscribe_streams_what_was_appended_then_follows_the_tail(
    ingestion: RunningIngestion, mesh_settings: Settings
) -> None:
    log = ingestion.log
    await log.append_batch([("alice", f"m{i}".encode()) for i in range(1000)])
    partition = (await log.append("alice", b"m1000")).partition
    remote = RemoteLog(ingestion.target, "events", mesh_settings)
    try:
        reading = asyncio.create_task(_collect(remote, partition, 1500))
        await asyncio.sleep(0.1)
        await log.append_batch([("alice", f"m{i}".encode()) for i in range(1001, 1500)])
        payloads = await asyncio.wait_for(reading, 10)
        assert payloads == [f"m{i}".encode() for i in range(1500)]
        ranges = await remote.offsets()
        assert len(ranges) == mesh_settings.streams.partitions
        assert ranges[partition].next == 1500
    finally:
        await remote.close()


async def test_subscribe_from_the_middle_of_a_stored_batch(
    ingestion: RunningIngestion, mesh_settings: Settings
) -> None:
    positions = await ingestion.log.append_batch([("bob", str(i).encode()) for i in range(10)])
    partition = positions[0].partition
    remote = RemoteLog(ingestion.target, "events", mesh_settings)
    try:
        batches = await remote.read(partition, 7)
        assert [b for batch in batches for b in batch.payload_list()] == [b"7", b"8", b"9"]
        assert batches[0].base_offset == 7
    finally:
        await remote.close()


async def test_errors_name_the_problem(
    ingestion: RunningIngestion, mesh_settings: Settings
) -> None:
    async with create_channel(ingestion.target, mesh_settings) as channel:
        stub = log_service_pb2_grpc.LogServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.GetOffsets(log_service_pb2.GetOffsetsRequest(stream="nope"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        request = log_service_pb2.SubscribeRequest(stream="events", partition=999)
        with pytest.raises(grpc.aio.AioRpcError) as bad_partition:
            async for _ in stub.Subscribe(request):
                pass
        assert bad_partition.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    remote = RemoteLog(ingestion.target, "events", mesh_settings)
    try:
        with pytest.raises(OffsetOutOfRange):
            await remote.read(0, 10_000)
    finally:
        await remote.close()


async def test_a_subscription_resumes_after_the_producer_restarts(
    mesh_settings: Settings,
) -> None:
    first = RunningIngestion(mesh_settings)
    await first.start()
    partition = (await first.log.append("carol", b"before")).partition
    remote = RemoteLog(first.target, "events", mesh_settings, max_backoff_seconds=0.2)
    received: list[bytes] = []

    async def follow() -> None:
        async for batch in remote.subscribe(partition, 0):
            received.extend(batch.payload_list())
            if len(received) == 2:
                return

    following = asyncio.create_task(follow())
    try:
        await asyncio.sleep(0.2)
        assert received == [b"before"]
        await first.stop()
        second = RunningIngestion(mesh_settings, port=first.port)
        await second.start()
        try:
            await second.log.append("carol", b"after")
            await asyncio.wait_for(following, 15)
        finally:
            await second.stop()
    finally:
        following.cancel()
        await remote.close()
    assert received == [b"before", b"after"]


async def test_a_stalled_subscriber_does_not_hold_up_appends(
    ingestion: RunningIngestion, mesh_settings: Settings
) -> None:
    log = ingestion.log
    payload = b"x" * 4096
    partition = (await log.append("dave", payload)).partition
    async with create_channel(ingestion.target, mesh_settings) as channel:
        stub = log_service_pb2_grpc.LogServiceStub(channel)
        call = stub.Subscribe(
            log_service_pb2.SubscribeRequest(stream="events", partition=partition)
        )
        first = await call.read()  # then stop reading
        assert len(first.batches) == 1
        for _ in range(40):  # ~80 MB while the subscriber reads nothing
            await asyncio.wait_for(log.append_batch([("dave", payload)] * 500), 10)
        call.cancel()
    assert (await log.offsets())[partition].next == 1 + 40 * 500


def test_hosted_log_is_not_available_before_start(mesh_settings: Settings) -> None:
    with pytest.raises(RuntimeError, match="not open"):
        _ = HostedLog(mesh_settings, "identity").log
