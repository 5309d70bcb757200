"""Assembles the activation service: domain, servicers and lifecycle."""

from __future__ import annotations

from profilemesh.activation.v1 import activation_service_pb2, activation_service_pb2_grpc
from profilemesh.common.v1 import log_service_pb2, log_service_pb2_grpc
from profilemesh.services.activation.domain import Activation
from profilemesh.services.activation.servicer import ActivationServicer
from profilemesh.shared.server import bind
from profilemesh.shared.service_app import ServiceApp
from profilemesh.shared.settings import Settings


def build_app(settings: Settings) -> ServiceApp:
    """The activation service with its domain under ``<data_dir>/activation``."""
    domain = Activation(settings.service_data_dir("activation"))
    servicer = ActivationServicer(domain)
    # The log this service produces is served once the log exists; until then, UNIMPLEMENTED.
    log_servicer = log_service_pb2_grpc.LogServiceServicer()
    return ServiceApp(
        name="activation",
        bindings=[
            bind(
                activation_service_pb2, activation_service_pb2_grpc, "ActivationService", servicer
            ),
            bind(log_service_pb2, log_service_pb2_grpc, "LogService", log_servicer),
        ],
    )
