"""Assembles the features service: domain, servicers and lifecycle."""

from __future__ import annotations

from profilemesh.features.v1 import features_service_pb2, features_service_pb2_grpc
from profilemesh.services.features.domain import Features
from profilemesh.services.features.servicer import FeaturesServicer
from profilemesh.shared.log.hosting import host_log
from profilemesh.shared.server import bind
from profilemesh.shared.service_app import ServiceApp
from profilemesh.shared.settings import Settings


def build_app(settings: Settings) -> ServiceApp:
    """The features service with its domain and log under ``<data_dir>/features``."""
    domain = Features(settings.service_data_dir("features"))
    app = ServiceApp(
        name="features",
        bindings=[
            bind(
                features_service_pb2,
                features_service_pb2_grpc,
                "FeaturesService",
                FeaturesServicer(domain),
            )
        ],
    )
    host_log(app, settings)
    return app
