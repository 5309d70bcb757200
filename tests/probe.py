"""A tiny servicer for testing the server bootstrap itself (not a stand-in for any service).

``profilemesh.test.Probe`` has three unary methods on ``google.protobuf.Struct`` messages:
``Echo`` returns its request, ``Fail`` raises the domain error the request describes, and
``Forward`` calls ``Echo`` on another server through the mesh's channel helper.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import struct_pb2

from profilemesh.shared.channel import create_channel
from profilemesh.shared.errors import InvalidArgument, ResourceExhausted
from profilemesh.shared.server import ServiceBinding
from profilemesh.shared.settings import Settings

SERVICE = "profilemesh.test.Probe"


class Probe:
    """Handlers of the probe service."""

    def __init__(self, settings: Settings, forward_to: str | None = None) -> None:
        self.settings = settings
        self.forward_to = forward_to

    async def echo(self, request: struct_pb2.Struct, context: Any) -> struct_pb2.Struct:
        return request

    async def fail(self, request: struct_pb2.Struct, context: Any) -> struct_pb2.Struct:
        kind = request.fields["kind"].string_value
        if kind == "invalid":
            raise InvalidArgument(
                "event is not valid",
                violations=[("events[3].track.event", "must not be empty")],
                reason="EVENT_INVALID",
            )
        if kind == "overload":
            raise ResourceExhausted("log is full", retry_after_seconds=0.25)
        if kind == "crash":
            raise KeyError("a bug")
        raise NotImplementedError

    async def forward(self, request: struct_pb2.Struct, context: Any) -> struct_pb2.Struct:
        assert self.forward_to is not None
        async with create_channel(self.forward_to, self.settings) as channel:
            echo = channel.unary_unary(
                f"/{SERVICE}/Echo",
                request_serializer=struct_pb2.Struct.SerializeToString,
                response_deserializer=struct_pb2.Struct.FromString,
            )
            response: struct_pb2.Struct = await echo(request)
            return response


def probe_binding(probe: Probe) -> ServiceBinding:
    """A binding that hosts ``probe`` on a server built by ``create_server``."""

    def add_to_server(servicer: Probe, server: grpc.aio.Server) -> None:
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                method,
                request_deserializer=struct_pb2.Struct.FromString,
                response_serializer=struct_pb2.Struct.SerializeToString,
            )
            for name, method in (
                ("Echo", servicer.echo),
                ("Fail", servicer.fail),
                ("Forward", servicer.forward),
            )
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

    return ServiceBinding(name=SERVICE, add_to_server=add_to_server, servicer=probe)


def probe_call(channel: grpc.aio.Channel, method: str) -> Any:
    """A callable for ``method`` of the probe service on ``channel``."""
    return channel.unary_unary(
        f"/{SERVICE}/{method}",
        request_serializer=struct_pb2.Struct.SerializeToString,
        response_deserializer=struct_pb2.Struct.FromString,
    )
