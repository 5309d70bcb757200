"""gRPC adapter of the activation service: protobuf in, protobuf out, no business logic.

RPCs not built yet are inherited from the generated base class, which answers UNIMPLEMENTED.
"""

from __future__ import annotations

from profilemesh.activation.v1 import activation_service_pb2_grpc
from profilemesh.services.activation.domain import Activation


class ActivationServicer(activation_service_pb2_grpc.ActivationServiceServicer):
    """Serves ``profilemesh.activation.v1.ActivationService`` over the activation domain."""

    def __init__(self, domain: Activation) -> None:
        self.domain = domain
