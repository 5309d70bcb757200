"""Assembles the identity service: domain, servicers and lifecycle."""

from __future__ import annotations

from profilemesh.common.v1 import log_service_pb2, log_service_pb2_grpc
from profilemesh.identity.v1 import identity_service_pb2, identity_service_pb2_grpc
from profilemesh.services.identity.domain import Identity
from profilemesh.services.identity.servicer import IdentityServicer
from profilemesh.shared.server import bind
from profilemesh.shared.service_app import ServiceApp
from profilemesh.shared.settings import Settings


def build_app(settings: Settings) -> ServiceApp:
    """The identity service with its domain under ``<data_dir>/identity``."""
    domain = Identity(settings.service_data_dir("identity"))
    servicer = IdentityServicer(domain)
    # The log this service produces is served once the log exists; until then, UNIMPLEMENTED.
    log_servicer = log_service_pb2_grpc.LogServiceServicer()
    return ServiceApp(
        name="identity",
        bindings=[
            bind(identity_service_pb2, identity_service_pb2_grpc, "IdentityService", servicer),
            bind(log_service_pb2, log_service_pb2_grpc, "LogService", log_servicer),
        ],
    )
