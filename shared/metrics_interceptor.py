"""Rate, errors and duration of every served call: ``rpc.server.duration``, in one interceptor.

The gRPC instrumentation traces calls but records no metrics, so this server interceptor times
each call and records it with the status the caller received (the count of the histogram is
the rate; its ``rpc.grpc.status_code`` attribute tells the errors). It runs outside the error
interceptor, so a domain error is counted with the status it became.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from profilemesh.shared.method_wrapping import rewrap
from profilemesh.shared.metrics import rpc_server_duration


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Records ``rpc.server.duration`` for the calls ``measured`` selects (all by default)."""

    def __init__(self, measured: Callable[[grpc.HandlerCallDetails], bool] | None = None) -> None:
        self._measured = measured

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or (
            self._measured is not None and not self._measured(handler_call_details)
        ):
            return handler
        service, _, method = handler_call_details.method.lstrip("/").partition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
        return _timed(handler, attributes)


def _record(
    started: float, context: Any, error: BaseException | None, attributes: dict[str, str]
) -> None:
    if error is None:
        code = context.code() or grpc.StatusCode.OK
    elif isinstance(error, asyncio.CancelledError | GeneratorExit):  # the caller went away
        code = grpc.StatusCode.CANCELLED
    else:  # an abort (the error interceptor's, or a guard's) set the code first
        code = context.code() or grpc.StatusCode.UNKNOWN
    status = code.value[0] if isinstance(code, grpc.StatusCode) else int(code)
    elapsed_ms = (time.perf_counter() - started) * 1000.0
    rpc_server_duration.record(elapsed_ms, {**attributes, "rpc.grpc.status_code": status})


def _timed(handler: grpc.RpcMethodHandler, attributes: dict[str, str]) -> grpc.RpcMethodHandler:
    @contextlib.asynccontextmanager
    async def timer(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        started, error = time.perf_counter(), None
        try:
            yield
        except BaseException as raised:
            error = raised
            raise
        finally:
            _record(started, context, error, attributes)

    return rewrap(handler, timer)
