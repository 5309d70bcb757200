"""Turns exceptions raised by servicers into gRPC statuses, in one place.

- :class:`DomainError` -> its status code, with a ``google.rpc.Status`` in the
  ``grpc-status-details-bin`` trailer carrying ``BadRequest`` field violations, ``ErrorInfo``
  (reason, domain, metadata) and, for overload, ``RetryInfo``.
- ``NotImplementedError`` -> UNIMPLEMENTED (the generated servicer bases raise it).
- a request whose bytes do not parse as its message (invalid UTF-8 in a string, messages
  nested too deep, a broken encoding) -> INVALID_ARGUMENT naming the field, instead of the
  UNKNOWN that gRPC answers when a deserializer raises.
- anything else -> INTERNAL with the trace id, so the caller can find the stack trace in the
  service's log; the stack trace itself never leaves the process.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2

from profilemesh.shared.errors import ERROR_DOMAIN, DomainError, InvalidArgument, ResourceExhausted
from profilemesh.shared.method_wrapping import rewrap
from profilemesh.shared.telemetry import current_trace_id
from profilemesh.shared.wire_problems import locate

log = logging.getLogger(__name__)

STATUS_DETAILS_KEY = "grpc-status-details-bin"


def status_for(error: DomainError) -> status_pb2.Status:
    """The ``google.rpc.Status`` a caller receives for ``error``."""
    status = status_pb2.Status(code=getattr(code_pb2, error.code), message=error.message)
    if error.violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in error.violations
            ]
        )
        status.details.append(_pack(bad_request))
    info = error_details_pb2.ErrorInfo(
        reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata
    )
    status.details.append(_pack(info))
    if isinstance(error, ResourceExhausted):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_seconds * 1e9))
        status.details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return status


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


async def _abort_for(error: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
    """Abort the call with the status ``error`` maps to (never returns)."""
    if isinstance(error, DomainError):
        status = status_for(error)
        await context.abort(
            grpc.StatusCode[error.code],
            error.message,
            trailing_metadata=((STATUS_DETAILS_KEY, status.SerializeToString()),),
        )
    if isinstance(error, NotImplementedError):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented")
    trace_id = current_trace_id()
    log.error("unhandled error in %s", method, exc_info=error, extra={"method": method})
    where = f" (trace {trace_id})" if trace_id else ""
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}{where}")


def _is_abort(error: BaseException) -> bool:
    # context.abort() raises AbortError; it must pass through untouched.
    return isinstance(error, grpc.aio.AbortError)


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Maps every servicer exception to a status; see the module docstring."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return wrap_handler(handler, handler_call_details.method)


class UndecodableRequest:
    """A request whose bytes do not parse as its message: the call fails with ``error``."""

    __slots__ = ("error",)

    def __init__(self, error: InvalidArgument) -> None:
        self.error = error


def request_decoder(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserializer`` returning an :class:`UndecodableRequest` instead of raising: gRPC
    would answer UNKNOWN, and only the handler can answer INVALID_ARGUMENT."""
    if deserializer is None:
        return None
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            if descriptor is None:
                return UndecodableRequest(InvalidArgument("the request is not a valid message"))
            violation = locate(descriptor, data)
            return UndecodableRequest(
                InvalidArgument(
                    f"the request is not a valid {descriptor.name}: "
                    + (f"{violation.field}: " if violation.field else "")
                    + violation.description,
                    violations=[violation] if violation.field else [],
                    reason="MALFORMED_REQUEST",
                )
            )

    return decode


def _decoded(request: Any) -> Any:
    if isinstance(request, UndecodableRequest):
        raise request.error
    return request


async def _decoded_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _decoded(request)


def wrap_handler(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """A copy of ``handler`` whose behaviour turns exceptions into statuses."""

    @contextlib.asynccontextmanager
    async def statuses(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        try:
            yield
        except Exception as error:
            if _is_abort(error):
                raise
            await _abort_for(error, context, method)

    return rewrap(
        handler,
        statuses,
        prepare=_decoded_stream if handler.request_streaming else _decoded,
        request_deserializer=request_decoder(handler.request_deserializer),
    )
