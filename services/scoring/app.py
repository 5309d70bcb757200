"""Assembles the scoring service: domain, servicers and lifecycle."""

from __future__ import annotations

from profilemesh.common.v1 import log_service_pb2, log_service_pb2_grpc
from profilemesh.scoring.v1 import scoring_service_pb2, scoring_service_pb2_grpc
from profilemesh.services.scoring.domain import Scoring
from profilemesh.services.scoring.servicer import ScoringServicer
from profilemesh.shared.server import bind
from profilemesh.shared.service_app import ServiceApp
from profilemesh.shared.settings import Settings


def build_app(settings: Settings) -> ServiceApp:
    """The scoring service with its domain under ``<data_dir>/scoring``."""
    domain = Scoring(settings.service_data_dir("scoring"))
    servicer = ScoringServicer(domain)
    # The log this service produces is served once the log exists; until then, UNIMPLEMENTED.
    log_servicer = log_service_pb2_grpc.LogServiceServicer()
    return ServiceApp(
        name="scoring",
        bindings=[
            bind(scoring_service_pb2, scoring_service_pb2_grpc, "ScoringService", servicer),
            bind(log_service_pb2, log_service_pb2_grpc, "LogService", log_servicer),
        ],
    )
