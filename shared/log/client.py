"""Reading another service's log over gRPC, resuming across disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator
from typing import Any

import grpc

from profilemesh.common.v1 import log_service_pb2, log_service_pb2_grpc
from profilemesh.shared.channel import create_channel
from profilemesh.shared.errors import InvalidArgument, NotFound, Unavailable
from profilemesh.shared.log.api import LogReader, OffsetOutOfRange, PartitionRange, RecordBatch
from profilemesh.shared.log.servicer import SERVICE
from profilemesh.shared.settings import Settings

log = logging.getLogger(__name__)

# Codes after which reconnecting and resuming may succeed.
_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
}


def _domain_error(error: grpc.aio.AioRpcError) -> Exception:
    details = error.details() or str(error.code())
    code = error.code()
    if code == grpc.StatusCode.OUT_OF_RANGE:
        return OffsetOutOfRange(details)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(details)
    return Unavailable(details)


class RemoteLog(LogReader):
    """A stream hosted by another service, read through its ``LogService``.

    A subscription survives the producer restarting or the connection dropping: it reconnects
    with exponential backoff (and jitter) and resumes after the last batch it delivered, so the
    consumer sees every record once and in order.
    """

    def __init__(
        self,
        target: str,
        stream: str,
        settings: Settings,
        *,
        max_backoff_seconds: float = 5.0,
    ) -> None:
        self.target = target
        self.stream = stream
        self.max_backoff_seconds = max_backoff_seconds
        self._channel = create_channel(target, settings, streaming_methods=[f"{SERVICE}/Subscribe"])
        self._stub = log_service_pb2_grpc.LogServiceStub(self._channel)

    async def offsets(self) -> list[PartitionRange]:
        try:
            response = await self._stub.GetOffsets(
                log_service_pb2.GetOffsetsRequest(stream=self.stream)
            )
        except grpc.aio.AioRpcError as error:
            raise _domain_error(error) from error
        return [
            PartitionRange(p.partition, p.first_offset, p.next_offset) for p in response.partitions
        ]

    async def subscribe(
        self,
        partition: int,
        from_offset: int,
        *,
        stop_at_end: bool = False,
        max_records: int = 5000,
    ) -> AsyncIterator[RecordBatch]:
        offset = from_offset
        failures = 0
        while True:
            request = log_service_pb2.SubscribeRequest(
                stream=self.stream,
                partition=partition,
                from_offset=offset,
                max_batch_messages=max_records,
                stop_at_end=stop_at_end,
            )
            call = self._stub.Subscribe(request)
            try:
                async for batch in _joined(call, max_records):
                    failures = 0
                    offset = batch.next_offset
                    yield batch
                if stop_at_end:
                    return
            except grpc.aio.AioRpcError as error:
                if error.code() not in _TRANSIENT:
                    raise _domain_error(error) from error
                failures += 1
                delay = min(self.max_backoff_seconds, 0.05 * 2 ** min(failures, 10))
                log.warning(
                    "subscription to %s/%s lost (%s); resuming at offset %d in %.2fs",
                    self.stream,
                    partition,
                    error.code().name,
                    offset,
                    delay,
                )
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            finally:
                call.cancel()

    async def close(self) -> None:
        await self._channel.close()


_END = object()


async def _joined(call: Any, max_records: int) -> AsyncIterator[RecordBatch]:
    """The call's batches, joined: everything that has already arrived (up to
    ``max_records``) is handed on as one batch, so a consumer that fell behind applies many
    small stored batches in one transaction instead of one each. A background task reads the
    stream; its errors surface here."""
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=256)

    async def read() -> None:
        try:
            async for response in call:
                if response.batches:
                    await queue.put([RecordBatch.from_proto(m) for m in response.batches])
        except asyncio.CancelledError:
            raise
        except Exception as error:  # handed to the consumer, which raises it
            await queue.put(error)
            return
        await queue.put(_END)

    reader = asyncio.create_task(read())
    try:
        while True:
            item = await queue.get()
            batches: list[RecordBatch] = []
            while True:
                if item is _END or isinstance(item, BaseException):
                    break
                batches.extend(item)
                if sum(len(b) for b in batches) >= max_records or queue.empty():
                    item = None
                    break
                item = queue.get_nowait()
            if batches:
                yield RecordBatch.concat(batches)
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
    finally:
        reader.cancel()
        with contextlib.suppress(BaseException):
            await reader
