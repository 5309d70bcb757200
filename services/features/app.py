"""Assembles the features service: it follows identity's resolution log, hosts the
feature-change log, and resolves identifiers through identity."""

from __future__ import annotations

from profilemesh.features.v1 import features_service_pb2, features_service_pb2_grpc
from profilemesh.services.features.domain import Features
from profilemesh.services.features.servicer import FeaturesServicer
from profilemesh.shared.channel import channel_to
from profilemesh.shared.identity_lookup import IdentityLookup
from profilemesh.shared.log.hosting import host_log, remote_log
from profilemesh.shared.log.stores import store_opener
from profilemesh.shared.server import bind
from profilemesh.shared.service_app import ServiceApp
from profilemesh.shared.settings import Settings


def build_app(settings: Settings) -> ServiceApp:
    """The features service with its data under ``<data_dir>/features``."""
    domain = Features(
        settings.service_data_dir("features"),
        settings.features.definitions_file,
        lambda: channel_to("identity", settings),
        stores=store_opener(settings, "features"),
    )
    # Created on first use, inside the server's event loop.
    identity = IdentityLookup(lambda: channel_to("identity", settings))
    app = ServiceApp(
        name="features",
        bindings=[
            bind(
                features_service_pb2,
                features_service_pb2_grpc,
                "FeaturesService",
                FeaturesServicer(domain, identity),
            )
        ],
    )
    hosted = host_log(app, settings)
    resolutions = remote_log(settings, "identity")

    async def open_domain() -> None:
        await domain.open(hosted.log, resolutions)

    async def close_clients() -> None:
        await resolutions.close()
        await identity.close()

    # Start-up hooks run in order and clean-up hooks in reverse: the domain opens after its
    # log and closes before it.
    app.startup.append(open_domain)
    app.cleanup.insert(0, close_clients)
    app.cleanup.append(domain.close)
    return app
