"""The one server bootstrap every service uses.

``create_server`` builds a grpc.aio server with the standard health service
(grpc.health.v1), reflection, OpenTelemetry tracing, RPC metrics (``rpc.server.duration``) and
the error interceptor, bound to a port; the services' bindings bring the access guard (tokens,
scopes, audit: ``shared/auth``).
``serve`` runs it until SIGTERM/SIGINT and shuts down gracefully: health turns NOT_SERVING first
(so load balancers and ``profilemesh up`` stop sending), then in-flight calls get ``grace``
seconds to finish.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

from profilemesh.shared.error_interceptor import ErrorInterceptor
from profilemesh.shared.metrics_interceptor import RpcMetricsInterceptor
from profilemesh.shared.settings import Settings
from profilemesh.shared.tls import server_credentials

log = logging.getLogger(__name__)

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class ListenError(RuntimeError):
    """The server could not bind its port (taken, or not allowed)."""


@dataclass(frozen=True)
class ServiceBinding:
    """One gRPC service a server hosts: its full name, the generated ``add_*_to_server``
    function and the servicer instance.

    ``interceptors`` are server interceptors the hosting server must run on every call it
    serves (the audit service brings the access guard: auth and audit for the whole server).
    """

    name: str
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    interceptors: tuple[grpc.aio.ServerInterceptor, ...] = ()


class ServiceServer:
    """A started-or-not grpc.aio server plus the health service that speaks for it."""

    def __init__(self, server: grpc.aio.Server, health_servicer: Any, names: Sequence[str]):
        self.grpc = server
        self.health = health_servicer
        self.service_names = tuple(names)

    async def start(self) -> None:
        """Start serving and report every hosted service SERVING."""
        await self.grpc.start()
        for name in ("", *self.service_names):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float) -> None:
        """Report NOT_SERVING, then give in-flight calls ``grace`` seconds to finish."""
        await self.health.enter_graceful_shutdown()
        await self.grpc.stop(grace)

    async def wait_for_termination(self) -> None:
        """Wait until the server has stopped."""
        await self.grpc.wait_for_termination()


def _traced_methods() -> Any:
    # Health and reflection are polled constantly; tracing (or timing) them would drown real
    # traces (and metrics).
    return filters.negate(
        filters.any_of(
            filters.health_check(),
            filters.service_prefix("grpc.reflection."),
        )
    )


def create_server(
    bindings: Sequence[ServiceBinding],
    settings: Settings,
    *,
    port: int,
    host: str | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> tuple[ServiceServer, int]:
    """Build a server hosting ``bindings`` and bind it; returns it (not yet started) and the
    port it is bound to (the chosen one when ``port`` is 0)."""
    max_bytes = settings.max_message_mib * 1024 * 1024
    server = grpc.aio.server(
        interceptors=[
            aio_server_interceptor(filter_=_traced_methods()),
            RpcMetricsInterceptor(measured=_traced_methods()),
            ErrorInterceptor(),
            *interceptors,
            *(interceptor for binding in bindings for interceptor in binding.interceptors),
        ],
        options=[
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes),
            # Two servers on one port would split traffic silently; fail instead.
            ("grpc.so_reuseport", 0),
        ],
    )
    for binding in bindings:
        binding.add_to_server(binding.servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [binding.name for binding in bindings]
    reflection.enable_server_reflection([*names, HEALTH_SERVICE, reflection.SERVICE_NAME], server)
    address = f"{host or settings.bind_host}:{port}"
    try:
        bound = _add_port(server, address, settings)
    except RuntimeError as error:
        raise ListenError(f"cannot listen on {address}: {error}") from error
    if bound == 0:
        raise ListenError(f"cannot listen on {address}")
    return ServiceServer(server, health_servicer, names), bound


def _add_port(server: grpc.aio.Server, address: str, settings: Settings) -> int:
    # With TLS on, a client without a certificate from the mesh CA fails the handshake.
    if settings.tls.enabled:
        return int(server.add_secure_port(address, server_credentials(settings.tls)))
    return int(server.add_insecure_port(address))


async def serve(
    server: ServiceServer,
    grace: float,
    *,
    parent_pid: int | None = None,
    on_stopping: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Run ``server`` until SIGTERM or SIGINT (or until ``parent_pid`` dies), then stop it
    gracefully and run ``on_stopping`` (flush, close stores)."""
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    watchdog = None
    if parent_pid is not None:
        watchdog = asyncio.create_task(_watch_parent(parent_pid, stop_requested))
    await server.start()
    try:
        await stop_requested.wait()
        log.info("stopping", extra={"grace_seconds": grace})
        await server.stop(grace)
        if on_stopping is not None:
            await on_stopping()
    finally:
        if watchdog is not None:
            watchdog.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


async def _watch_parent(parent_pid: int, stop_requested: asyncio.Event) -> None:
    # A supervisor killed with SIGKILL cannot stop its children; they notice the orphaning
    # (their parent changes) and stop themselves, so nothing outlives `profilemesh up`.
    while os.getppid() == parent_pid:
        await asyncio.sleep(0.5)
    log.warning("parent process %s is gone; stopping", parent_pid)
    stop_requested.set()


def bind(
    pb2: Any,
    pb2_grpc: Any,
    service: str,
    servicer: Any,
    *,
    request_views: Mapping[str, Any] | None = None,
) -> ServiceBinding:
    """The binding of ``servicer`` for ``service`` (e.g. ``"IngestionService"``), found in the
    generated modules ``pb2`` (descriptors) and ``pb2_grpc`` (registration function).

    ``request_views`` maps RPC names to wire-compatible message classes their requests are
    decoded as instead (a hot path that must not decode everything).
    """
    descriptor = pb2.DESCRIPTOR.services_by_name[service]
    if not request_views:
        return ServiceBinding(
            name=descriptor.full_name,
            add_to_server=getattr(pb2_grpc, f"add_{service}Servicer_to_server"),
            servicer=servicer,
        )
    views = dict(request_views)

    def add_to_server(servicer: Any, server: grpc.aio.Server) -> None:
        handlers = {}
        for method in descriptor.methods:
            request = views.get(method.name) or _message_class(method.input_type)
            response = _message_class(method.output_type)
            factory = _HANDLER_FACTORIES[(method.client_streaming, method.server_streaming)]
            handlers[method.name] = factory(
                getattr(servicer, method.name),
                request_deserializer=request.FromString,
                response_serializer=response.SerializeToString,
            )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(descriptor.full_name, handlers),)
        )

    return ServiceBinding(name=descriptor.full_name, add_to_server=add_to_server, servicer=servicer)


_HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _message_class(descriptor: Any) -> Any:
    return message_factory.GetMessageClass(descriptor)
