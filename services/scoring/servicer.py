"""gRPC adapter of the scoring service: protobuf in, protobuf out, no business logic.

RPCs not built yet are inherited from the generated base class, which answers UNIMPLEMENTED.
"""

from __future__ import annotations

from profilemesh.scoring.v1 import scoring_service_pb2_grpc
from profilemesh.services.scoring.domain import Scoring


class ScoringServicer(scoring_service_pb2_grpc.ScoringServiceServicer):
    """Serves ``profilemesh.scoring.v1.ScoringService`` over the scoring domain."""

    def __init__(self, domain: Scoring) -> None:
        self.domain = domain
