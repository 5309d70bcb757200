"""Running code around a served method, for server interceptors: written once for gRPC's four
kinds of method handler.

The error, access and metrics interceptors each need the same thing: the servicer's behaviour,
whatever its kind (unary or streaming responses, a coroutine, an async or plain generator),
run inside a scope of their own that sees how the call ends. :func:`rewrap` builds the new
handler; an interceptor supplies only its scope.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc

Scope = Callable[[grpc.aio.ServicerContext], AbstractAsyncContextManager[object]]
"""What runs around one call: entered before the behaviour, exited with how it ended (an
exception raised in it reaches ``__aexit__``; raising on entry refuses the call)."""

_SAME = object()


def rewrap(
    handler: grpc.RpcMethodHandler,
    scope: Scope,
    *,
    prepare: Callable[[Any], Any] | None = None,
    request_deserializer: Any = _SAME,
) -> grpc.RpcMethodHandler:
    """A copy of ``handler`` whose behaviour runs inside ``scope(context)``; ``prepare`` maps
    the request (or the request iterator) before the behaviour gets it, inside the scope."""
    deserializer = (
        handler.request_deserializer if request_deserializer is _SAME else request_deserializer
    )
    if handler.response_streaming:
        behavior = handler.unary_stream or handler.stream_stream

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with scope(context):
                result = behavior(prepare(request) if prepare else request, context)
                if hasattr(result, "__aiter__"):
                    async for response in result:
                        yield response
                elif inspect.isawaitable(result):  # a coroutine that writes with context.write()
                    await result
                else:
                    for response in result:
                        yield response

        streaming_factory = (
            grpc.unary_stream_rpc_method_handler
            if handler.unary_stream
            else grpc.stream_stream_rpc_method_handler
        )
        return streaming_factory(
            streaming,
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )

    unary_behavior = handler.unary_unary or handler.stream_unary

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with scope(context):
            result = unary_behavior(prepare(request) if prepare else request, context)
            return await result if inspect.isawaitable(result) else result

    unary_factory = (
        grpc.unary_unary_rpc_method_handler
        if handler.unary_unary
        else grpc.stream_unary_rpc_method_handler
    )
    return unary_factory(
        unary,
        request_deserializer=deserializer,
        response_serializer=handler.response_serializer,
    )
