"""Assembles the scoring service: domain, servicers and lifecycle."""

from __future__ import annotations

from profilemesh.scoring.v1 import scoring_service_pb2, scoring_service_pb2_grpc
from profilemesh.services.scoring.domain import Scoring
from profilemesh.services.scoring.servicer import ScoringServicer
from profilemesh.shared.log.hosting import host_log
from profilemesh.shared.server import bind
from profilemesh.shared.service_app import ServiceApp
from profilemesh.shared.settings import Settings


def build_app(settings: Settings) -> ServiceApp:
    """The scoring service with its domain and log under ``<data_dir>/scoring``."""
    domain = Scoring(settings.service_data_dir("scoring"))
    app = ServiceApp(
        name="scoring",
        bindings=[
            bind(
                scoring_service_pb2,
                scoring_service_pb2_grpc,
                "ScoringService",
                ScoringServicer(domain),
            )
        ],
    )
    host_log(app, settings)
    return app
