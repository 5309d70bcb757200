"""Asks a service's standard health service how it is."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from profilemesh.shared.channel import create_channel
from profilemesh.shared.settings import Settings

UNREACHABLE = "UNREACHABLE"


async def check_health(target: str, settings: Settings, *, timeout: float = 1.0) -> str:
    """The serving status of the server at ``target`` (``SERVING``, ``NOT_SERVING``...), or
    ``UNREACHABLE`` when it does not answer within ``timeout`` seconds."""
    async with create_channel(target, settings, traced=False) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.aio.AioRpcError:
            return UNREACHABLE
    name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return name
