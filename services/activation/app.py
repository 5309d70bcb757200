"""Assembles the activation service: domain, servicers and lifecycle."""

from __future__ import annotations

from profilemesh.activation.v1 import activation_service_pb2, activation_service_pb2_grpc
from profilemesh.services.activation.domain import Activation
from profilemesh.services.activation.servicer import ActivationServicer
from profilemesh.shared.log.hosting import host_log
from profilemesh.shared.server import bind
from profilemesh.shared.service_app import ServiceApp
from profilemesh.shared.settings import Settings


def build_app(settings: Settings) -> ServiceApp:
    """The activation service with its domain and log under ``<data_dir>/activation``."""
    domain = Activation(settings.service_data_dir("activation"))
    app = ServiceApp(
        name="activation",
        bindings=[
            bind(
                activation_service_pb2,
                activation_service_pb2_grpc,
                "ActivationService",
                ActivationServicer(domain),
            )
        ],
    )
    host_log(app, settings)
    return app
