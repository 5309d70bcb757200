"""The token this process sends on its outbound calls, and the client interceptors that send it.

The token is ``auth.token``, or else the contents of ``<data_dir>/admin.token`` (where
``profilemesh up`` leaves the local mesh's admin token), so the CLI works against a local mesh
without configuration. It travels as ``authorization: Bearer <token>`` metadata added by client
interceptors, which work on insecure and TLS channels alike (call credentials would need TLS).
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterable, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:  # the event client uses this module without the settings machinery
    from profilemesh.shared.settings import Settings

ADMIN_TOKEN_FILE = "admin.token"
AUTHORIZATION = "authorization"


def admin_token_path(settings: Settings) -> Path:
    """Where a local mesh keeps its admin token: ``<data_dir>/admin.token``."""
    return settings.data_dir / ADMIN_TOKEN_FILE


def client_token(settings: Settings) -> str | None:
    """The token outbound calls carry: ``auth.token``, else ``<data_dir>/admin.token`` when it
    exists, else none."""
    if settings.auth.token:
        return settings.auth.token
    try:
        token = admin_token_path(settings).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return token or None


def bearer_metadata(token: str) -> tuple[str, str]:
    """The metadata entry that carries ``token``."""
    return (AUTHORIZATION, f"Bearer {token}")


def token_interceptors(settings: Settings) -> list[Any]:
    """grpc.aio client interceptors that send this process's token (none without one)."""
    token = client_token(settings)
    if token is None:
        return []
    entry = bearer_metadata(token)
    return [
        _UnaryUnary(entry),
        _UnaryStream(entry),
        _StreamUnary(entry),
        _StreamStream(entry),
    ]


def with_token(channel: grpc.Channel, token: str | None) -> grpc.Channel:
    """``channel`` (blocking) sending ``token`` on every call; unchanged without a token."""
    if token is None:
        return channel
    intercepted: grpc.Channel = grpc.intercept_channel(channel, _Blocking(bearer_metadata(token)))
    return intercepted


def _aio_details(details: Any, entry: tuple[str, str]) -> Any:
    metadata = grpc.aio.Metadata(*tuple(details.metadata or ()), entry)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


# grpc.aio files an interceptor under the first of the four kinds it is: one class per kind.
class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, entry: tuple[str, str]) -> None:
        self.entry = entry

    async def intercept_unary_unary(
        self, continuation: Callable[..., Awaitable[Any]], details: Any, request: Any
    ) -> Any:
        return await continuation(_aio_details(details, self.entry), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, entry: tuple[str, str]) -> None:
        self.entry = entry

    async def intercept_unary_stream(
        self, continuation: Callable[..., Awaitable[Any]], details: Any, request: Any
    ) -> Any:
        return await continuation(_aio_details(details, self.entry), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, entry: tuple[str, str]) -> None:
        self.entry = entry

    async def intercept_stream_unary(
        self,
        continuation: Callable[..., Awaitable[Any]],
        details: Any,
        request_iterator: AsyncIterable[Any] | Iterator[Any],
    ) -> Any:
        return await continuation(_aio_details(details, self.entry), request_iterator)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, entry: tuple[str, str]) -> None:
        self.entry = entry

    async def intercept_stream_stream(
        self,
        continuation: Callable[..., Awaitable[Any]],
        details: Any,
        request_iterator: AsyncIterable[Any] | Iterator[Any],
    ) -> Any:
        return await continuation(_aio_details(details, self.entry), request_iterator)


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,  # type: ignore[misc]
):
    """Call details of the blocking API (grpc offers only the abstract class)."""


class _Blocking(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """The same for blocking channels, whose interceptor may be all four kinds at once."""

    def __init__(self, entry: tuple[str, str]) -> None:
        self.entry = entry

    def _details(self, details: Any) -> _CallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), self.entry],
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)
