"""Assembles the ingestion service: domain, servicers and lifecycle."""

from __future__ import annotations

from profilemesh.ingestion.v1 import ingestion_service_pb2, ingestion_service_pb2_grpc
from profilemesh.services.ingestion.domain import Ingestion
from profilemesh.services.ingestion.servicer import IngestionServicer
from profilemesh.shared.log.hosting import host_log
from profilemesh.shared.server import bind
from profilemesh.shared.service_app import ServiceApp
from profilemesh.shared.settings import Settings


def build_app(settings: Settings) -> ServiceApp:
    """The ingestion service with its domain and log under ``<data_dir>/ingestion``."""
    domain = Ingestion(settings.service_data_dir("ingestion"))
    app = ServiceApp(
        name="ingestion",
        bindings=[
            bind(
                ingestion_service_pb2,
                ingestion_service_pb2_grpc,
                "IngestionService",
                IngestionServicer(domain),
            )
        ],
    )
    host_log(app, settings)
    return app
