"""gRPC adapter of the identity service: protobuf in, protobuf out, no business logic.

RPCs not built yet are inherited from the generated base class, which answers UNIMPLEMENTED.
"""

from __future__ import annotations

from profilemesh.identity.v1 import identity_service_pb2_grpc
from profilemesh.services.identity.domain import Identity


class IdentityServicer(identity_service_pb2_grpc.IdentityServiceServicer):
    """Serves ``profilemesh.identity.v1.IdentityService`` over the identity domain."""

    def __init__(self, domain: Identity) -> None:
        self.domain = domain
