"""Assembles the identity service: domain, servicers and lifecycle."""

from __future__ import annotations

from profilemesh.identity.v1 import identity_service_pb2, identity_service_pb2_grpc
from profilemesh.services.identity.domain import Identity
from profilemesh.services.identity.servicer import IdentityServicer
from profilemesh.shared.log.hosting import host_log
from profilemesh.shared.server import bind
from profilemesh.shared.service_app import ServiceApp
from profilemesh.shared.settings import Settings


def build_app(settings: Settings) -> ServiceApp:
    """The identity service with its domain and log under ``<data_dir>/identity``."""
    domain = Identity(settings.service_data_dir("identity"))
    app = ServiceApp(
        name="identity",
        bindings=[
            bind(
                identity_service_pb2,
                identity_service_pb2_grpc,
                "IdentityService",
                IdentityServicer(domain),
            )
        ],
    )
    host_log(app, settings)
    return app
