"""gRPC adapter of the ingestion service: protobuf in, protobuf out, no business logic.

RPCs not built yet are inherited from the generated base class, which answers UNIMPLEMENTED.
"""

from __future__ import annotations

from profilemesh.ingestion.v1 import ingestion_service_pb2_grpc
from profilemesh.services.ingestion.domain import Ingestion


class IngestionServicer(ingestion_service_pb2_grpc.IngestionServiceServicer):
    """Serves ``profilemesh.ingestion.v1.IngestionService`` over the ingestion domain."""

    def __init__(self, domain: Ingestion) -> None:
        self.domain = domain
