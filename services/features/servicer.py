"""gRPC adapter of the features service: protobuf in, protobuf out, no business logic.

RPCs not built yet are inherited from the generated base class, which answers UNIMPLEMENTED.
"""

from __future__ import annotations

from profilemesh.features.v1 import features_service_pb2_grpc
from profilemesh.services.features.domain import Features


class FeaturesServicer(features_service_pb2_grpc.FeaturesServiceServicer):
    """Serves ``profilemesh.features.v1.FeaturesService`` over the features domain."""

    def __init__(self, domain: Features) -> None:
        self.domain = domain
