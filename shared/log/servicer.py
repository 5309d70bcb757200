"""``profilemesh.common.v1.LogService``: a service's logs served over gRPC.

``Subscribe`` sends the stored ``LogBatch`` bodies as they are: its response is assembled from
bytes (field 1 once per stored batch, then field 2), so serving costs no per-record work. The
handler is an async generator, so gRPC's flow control paces it: a consumer that reads slowly
makes the generator wait at ``yield`` instead of making anything buffer without bound.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from profilemesh.common.v1 import log_service_pb2
from profilemesh.shared.errors import InvalidArgument, NotFound
from profilemesh.shared.log.api import Log
from profilemesh.shared.log.embedded import EmbeddedLog
from profilemesh.shared.server import ServiceBinding
from profilemesh.shared.wire import varint

SERVICE = log_service_pb2.DESCRIPTOR.services_by_name["LogService"].full_name
DEFAULT_BATCH_RECORDS = 5000


def encode_subscribe_response(bodies: list[bytes], partition_next_offset: int) -> bytes:
    """A serialized ``SubscribeResponse`` around already-serialized ``LogBatch`` bodies."""
    parts = []
    for body in bodies:
        parts.append(b"\x0a" + varint(len(body)))
        parts.append(body)
    if partition_next_offset:
        parts.append(b"\x10" + varint(partition_next_offset))
    return b"".join(parts)


class LogServicer:
    """Serves the logs a service hosts, by stream name."""

    def __init__(self, heartbeat_seconds: float = 5.0) -> None:
        self.logs: dict[str, EmbeddedLog] = {}
        self.heartbeat_seconds = heartbeat_seconds

    def host(self, log: Log) -> None:
        """Serve ``log`` under its stream name."""
        if not isinstance(log, EmbeddedLog):
            raise TypeError("LogService serves embedded logs; other backends have their own")
        self.logs[log.stream] = log

    def _log(self, stream: str) -> EmbeddedLog:
        log = self.logs.get(stream)
        if log is None:
            raise NotFound(
                f"no stream {stream!r} here; this service has {sorted(self.logs) or 'none yet'}",
                violations=[("stream", "unknown stream")],
            )
        return log

    async def subscribe(
        self, request: log_service_pb2.SubscribeRequest, context: Any
    ) -> AsyncIterator[bytes]:
        log = self._log(request.stream)
        if request.partition >= log.partitions:
            raise InvalidArgument.for_field(
                "partition", f"must be below the partition count {log.partitions}"
            )
        async for bodies, _, durable_next in log.subscribe_encoded(
            request.partition,
            request.from_offset,
            stop_at_end=request.stop_at_end,
            max_records=request.max_batch_messages or DEFAULT_BATCH_RECORDS,
            heartbeat_seconds=self.heartbeat_seconds,
        ):
            yield encode_subscribe_response(bodies, durable_next)

    async def get_offsets(
        self, request: log_service_pb2.GetOffsetsRequest, context: Any
    ) -> log_service_pb2.GetOffsetsResponse:
        log = self._log(request.stream)
        ranges = await log.offsets()
        return log_service_pb2.GetOffsetsResponse(
            stream=log.stream,
            partition_count=log.partitions,
            partitions=[
                log_service_pb2.PartitionOffsets(
                    partition=r.partition, first_offset=r.first, next_offset=r.next
                )
                for r in ranges
            ],
        )


def log_service_binding(servicer: LogServicer) -> ServiceBinding:
    """The binding that hosts ``servicer`` as ``profilemesh.common.v1.LogService``.

    Registered by hand rather than through the generated ``add_LogServiceServicer_to_server``
    because ``Subscribe`` answers with pre-serialized bytes.
    """

    def add_to_server(servicer: LogServicer, server: grpc.aio.Server) -> None:
        handlers = {
            "Subscribe": grpc.unary_stream_rpc_method_handler(
                servicer.subscribe,
                request_deserializer=log_service_pb2.SubscribeRequest.FromString,
                response_serializer=None,  # the handler yields serialized responses
            ),
            "GetOffsets": grpc.unary_unary_rpc_method_handler(
                servicer.get_offsets,
                request_deserializer=log_service_pb2.GetOffsetsRequest.FromString,
                response_serializer=log_service_pb2.GetOffsetsResponse.SerializeToString,
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

    return ServiceBinding(name=SERVICE, add_to_server=add_to_server, servicer=servicer)
