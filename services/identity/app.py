"""Assembles the identity service: it follows ingestion's event log and hosts the resolution
log."""

from __future__ import annotations

from profilemesh.identity.v1 import identity_service_pb2, identity_service_pb2_grpc
from profilemesh.services.identity.domain import Identity
from profilemesh.services.identity.servicer import IdentityServicer
from profilemesh.services.identity.token_hosting import host_tokens
from profilemesh.shared.channel import channel_to
from profilemesh.shared.log.hosting import host_log, remote_log
from profilemesh.shared.log.stores import store_opener
from profilemesh.shared.server import bind
from profilemesh.shared.service_app import ServiceApp
from profilemesh.shared.settings import Settings


def build_app(settings: Settings) -> ServiceApp:
    """The identity service with its data under ``<data_dir>/identity``."""
    domain = Identity(
        settings.service_data_dir("identity"),
        settings.identity.rules_file,
        match_min_records=settings.identity.match_min_records,
        connect_ingestion=lambda: channel_to("ingestion", settings),
        stores=store_opener(settings, "identity"),
    )
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
    host_tokens(app, settings)
    hosted = host_log(app, settings)
    events = remote_log(settings, "ingestion")

    async def open_domain() -> None:
        await domain.open(hosted.log, events)

    async def close_events() -> None:
        await events.close()

    # Start-up hooks run in order and clean-up hooks in reverse: the domain opens after its
    # log and closes before it.
    app.startup.append(open_domain)
    app.cleanup.insert(0, close_events)
    app.cleanup.append(domain.close)
    return app
