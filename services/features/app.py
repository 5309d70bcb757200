"""Assembles the features service: domain, servicers and lifecycle."""

from __future__ import annotations

from profilemesh.common.v1 import log_service_pb2, log_service_pb2_grpc
from profilemesh.features.v1 import features_service_pb2, features_service_pb2_grpc
from profilemesh.services.features.domain import Features
from profilemesh.services.features.servicer import FeaturesServicer
from profilemesh.shared.server import bind
from profilemesh.shared.service_app import ServiceApp
from profilemesh.shared.settings import Settings


def build_app(settings: Settings) -> ServiceApp:
    """The features service with its domain under ``<data_dir>/features``."""
    domain = Features(settings.service_data_dir("features"))
    servicer = FeaturesServicer(domain)
    # The log this service produces is served once the log exists; until then, UNIMPLEMENTED.
    log_servicer = log_service_pb2_grpc.LogServiceServicer()
    return ServiceApp(
        name="features",
        bindings=[
            bind(features_service_pb2, features_service_pb2_grpc, "FeaturesService", servicer),
            bind(log_service_pb2, log_service_pb2_grpc, "LogService", log_servicer),
        ],
    )
