"""Assembles the ingestion service: domain, servicers and lifecycle."""

from __future__ import annotations

from profilemesh.common.v1 import log_service_pb2, log_service_pb2_grpc
from profilemesh.ingestion.v1 import ingestion_service_pb2, ingestion_service_pb2_grpc
from profilemesh.services.ingestion.domain import Ingestion
from profilemesh.services.ingestion.servicer import IngestionServicer
from profilemesh.shared.server import bind
from profilemesh.shared.service_app import ServiceApp
from profilemesh.shared.settings import Settings


def build_app(settings: Settings) -> ServiceApp:
    """The ingestion service with its domain under ``<data_dir>/ingestion``."""
    domain = Ingestion(settings.service_data_dir("ingestion"))
    servicer = IngestionServicer(domain)
    # The log this service produces is served once the log exists; until then, UNIMPLEMENTED.
    log_servicer = log_service_pb2_grpc.LogServiceServicer()
    return ServiceApp(
        name="ingestion",
        bindings=[
            bind(ingestion_service_pb2, ingestion_service_pb2_grpc, "IngestionService", servicer),
            bind(log_service_pb2, log_service_pb2_grpc, "LogService", log_servicer),
        ],
    )
