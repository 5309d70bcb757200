"""The server bootstrap: health, reflection, errors as google.rpc.Status, graceful shutdown."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from profilemesh.shared.channel import create_channel
from profilemesh.shared.errors import ERROR_DOMAIN
from profilemesh.shared.server import ListenError, ServiceServer, create_server
from profilemesh.shared.settings import Settings
from tests.probe import SERVICE, Probe, probe_binding, probe_call


@pytest.fixture
async def probe_server(mesh_settings: Settings) -> AsyncIterator[tuple[ServiceServer, str]]:
    server, port = create_server([probe_binding(Probe(mesh_settings))], mesh_settings, port=0)
    await server.start()
    yield server, f"127.0.0.1:{port}"
    await server.stop(0)


def _request(**fields: str) -> struct_pb2.Struct:
    request = struct_pb2.Struct()
    request.update(fields)
    return request


async def test_domain_error_reaches_the_client_as_invalid_argument_with_bad_request(
    probe_server: tuple[ServiceServer, str], mesh_settings: Settings
) -> None:
    _, target = probe_server
    async with create_channel(target, mesh_settings) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await probe_call(channel, "Fail")(_request(kind="invalid"))
    error = raised.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = _details(error)
    bad_request = details[error_details_pb2.BadRequest]
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("events[3].track.event", "must not be empty")
    ]
    info = details[error_details_pb2.ErrorInfo]
    assert (info.reason, info.domain) == ("EVENT_INVALID", ERROR_DOMAIN)


async def test_overload_is_resource_exhausted_with_retry_info(
    probe_server: tuple[ServiceServer, str], mesh_settings: Settings
) -> None:
    _, target = probe_server
    async with create_channel(target, mesh_settings) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await probe_call(channel, "Fail")(_request(kind="overload"))
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    retry = _details(raised.value)[error_details_pb2.RetryInfo]
    assert retry.retry_delay.ToMilliseconds() == 250


async def test_unexpected_exception_is_internal_without_a_stack_trace(
    probe_server: tuple[ServiceServer, str], mesh_settings: Settings
) -> None:
    _, target = probe_server
    async with create_channel(target, mesh_settings) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await probe_call(channel, "Fail")(_request(kind="crash"))
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert "Traceback" not in (raised.value.details() or "")
    assert "KeyError" not in (raised.value.details() or "")


async def test_not_implemented_is_unimplemented(
    probe_server: tuple[ServiceServer, str], mesh_settings: Settings
) -> None:
    _, target = probe_server
    async with create_channel(target, mesh_settings) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await probe_call(channel, "Fail")(_request(kind="later"))
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_health_and_reflection_are_served(
    probe_server: tuple[ServiceServer, str], mesh_settings: Settings
) -> None:
    _, target = probe_server
    async with create_channel(target, mesh_settings) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        overall = await health.Check(health_pb2.HealthCheckRequest())
        probe = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))
        assert overall.status == probe.status == health_pb2.HealthCheckResponse.SERVING
        assert await _listed_services(channel) >= {SERVICE, "grpc.health.v1.Health"}


async def test_graceful_stop_reports_not_serving_before_stopping(
    mesh_settings: Settings,
) -> None:
    server, port = create_server([probe_binding(Probe(mesh_settings))], mesh_settings, port=0)
    await server.start()
    async with create_channel(f"127.0.0.1:{port}", mesh_settings) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        await server.stop(grace=1.0)
        seen = await watch.read()
        assert seen.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_a_taken_port_is_a_clear_listen_error(
    probe_server: tuple[ServiceServer, str], mesh_settings: Settings
) -> None:
    _, target = probe_server
    taken = int(target.rsplit(":", 1)[1])
    with pytest.raises(ListenError, match=str(taken)):
        create_server([probe_binding(Probe(mesh_settings))], mesh_settings, port=taken)


def _details(error: grpc.aio.AioRpcError) -> dict[type, object]:
    """The status details in the error's trailer, by message type."""
    from google.rpc import status_pb2

    raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    assert raw is not None, "no google.rpc.Status in the trailer"
    status = status_pb2.Status.FromString(raw)
    assert status.code == error.code().value[0]
    found: dict[type, object] = {}
    for detail in status.details:
        for kind in (
            error_details_pb2.BadRequest,
            error_details_pb2.ErrorInfo,
            error_details_pb2.RetryInfo,
        ):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found[kind] = message
    return found


async def _listed_services(channel: grpc.aio.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for response in stub.ServerReflectionInfo(requests()):
        return {service.name for service in response.list_services_response.service}
    raise AssertionError("reflection sent no answer")
