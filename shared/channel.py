"""The client side of the mesh: channels with deadlines, retries and tracing.

Deadlines and retries come from gRPC's own service config, so every stub call on a channel
gets them without wrapper code: a default timeout per call, and transparent retries of
UNAVAILABLE with exponential backoff. Client tracing interceptors start a span per call and
send the W3C trace context in the metadata, so the callee's span joins the caller's trace.
Every call also carries this process's API token when it has one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors, client_interceptor, grpcext

from profilemesh.shared.auth.outbound import client_token, token_interceptors, with_token
from profilemesh.shared.settings import ClientSettings, Settings
from profilemesh.shared.tls import channel_credentials, target_name_options


def service_config(client: ClientSettings, streaming_methods: Sequence[str] = ()) -> str:
    """The gRPC service config (JSON) applied to every method of a channel.

    ``streaming_methods`` (``package.Service/Method`` or ``package.Service``) get no default
    deadline: a subscription is meant to stay open.
    """
    retry = {
        "maxAttempts": client.max_attempts,
        "initialBackoff": f"{client.initial_backoff_seconds}s",
        "maxBackoff": f"{client.max_backoff_seconds}s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    method_configs: list[dict[str, object]] = []
    if streaming_methods:
        names = []
        for full in streaming_methods:
            service, _, method = full.partition("/")
            names.append({"service": service, "method": method} if method else {"service": service})
        method_configs.append({"name": names, "retryPolicy": retry})
    method_configs.append(
        {"name": [{}], "timeout": f"{client.deadline_seconds}s", "retryPolicy": retry}
    )
    return json.dumps({"methodConfig": method_configs})


def create_channel(
    target: str,
    settings: Settings,
    *,
    streaming_methods: Sequence[str] = (),
    traced: bool = True,
) -> grpc.aio.Channel:
    """A grpc.aio channel to ``target`` (``host:port``) with the mesh defaults, over mutual
    TLS when the settings turn it on."""
    options = _options(settings, streaming_methods)
    # The token of this process (if any) goes with every call: see shared/auth/outbound.py.
    interceptors = [*(aio_client_interceptors() if traced else ()), *token_interceptors(settings)]
    return _aio_channel(target, settings, options, interceptors or None)


def create_blocking_channel(target: str, settings: Settings) -> grpc.Channel:
    """As :func:`create_channel`, blocking: for calls made from worker threads."""
    channel = _blocking_channel(target, settings, _options(settings, ()))
    channel = with_token(channel, client_token(settings))
    # The instrumentation's own wrapper: its interceptor is not one of grpc's interceptor types.
    traced: grpc.Channel = grpcext.intercept_channel(channel, client_interceptor())
    return traced


def _options(settings: Settings, streaming_methods: Sequence[str]) -> list[tuple[str, object]]:
    max_bytes = settings.max_message_mib * 1024 * 1024
    return [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", service_config(settings.client, streaming_methods)),
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.max_send_message_length", max_bytes),
    ]


def channel_to(service: str, settings: Settings, **kwargs: object) -> grpc.aio.Channel:
    """A channel to one of the mesh's services, at the address the settings give for it."""
    return create_channel(settings.services.of(service).target, settings, **kwargs)  # type: ignore[arg-type]


def _aio_channel(
    target: str, settings: Settings, options: list[tuple[str, object]], interceptors: object
) -> grpc.aio.Channel:
    if not settings.tls.enabled:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(
        target,
        channel_credentials(settings.tls),
        options=[*options, *target_name_options(settings.tls)],
        interceptors=interceptors,
    )


def _blocking_channel(
    target: str, settings: Settings, options: list[tuple[str, object]]
) -> grpc.Channel:
    if not settings.tls.enabled:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(
        target,
        channel_credentials(settings.tls),
        options=[*options, *target_name_options(settings.tls)],
    )
