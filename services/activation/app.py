"""Assembles the activation service: it follows the logs of identity, features and scoring,
hosts the activations log, and delivers through activator plugins."""

from __future__ import annotations

from profilemesh.activation.v1 import activation_service_pb2, activation_service_pb2_grpc
from profilemesh.services.activation.deliveries import RetryPolicy
from profilemesh.services.activation.domain import Activation, Clients
from profilemesh.services.activation.servicer import ActivationServicer
from profilemesh.shared.channel import channel_to
from profilemesh.shared.identity_lookup import IdentityLookup
from profilemesh.shared.log.hosting import host_log, remote_log
from profilemesh.shared.log.stores import store_opener
from profilemesh.shared.plugin_manager import create_plugin_manager
from profilemesh.shared.server import bind
from profilemesh.shared.service_app import ServiceApp
from profilemesh.shared.settings import Settings

# The logs activation follows, by the service that hosts each.
SOURCES = {"identity": "resolutions", "features": "feature-changes", "scoring": "score-changes"}


def build_app(settings: Settings) -> ServiceApp:
    """The activation service with its data under ``<data_dir>/activation``."""
    retry = settings.activation
    domain = Activation(
        settings.service_data_dir("activation"),
        create_plugin_manager(disabled=settings.disabled_plugins),
        # Channels open on first use, inside the server's event loop.
        Clients(lambda service: channel_to(service, settings)),
        RetryPolicy(
            max_attempts=retry.max_attempts,
            initial_backoff_seconds=retry.initial_backoff_seconds,
            max_backoff_seconds=retry.max_backoff_seconds,
        ),
        stores=store_opener(settings, "activation"),
    )
    identity = IdentityLookup(lambda: channel_to("identity", settings))
    app = ServiceApp(
        name="activation",
        bindings=[
            bind(
                activation_service_pb2,
                activation_service_pb2_grpc,
                "ActivationService",
                ActivationServicer(domain, identity),
            )
        ],
    )
    hosted = host_log(app, settings)
    readers = {stream: remote_log(settings, service) for service, stream in SOURCES.items()}

    async def open_domain() -> None:
        await domain.open(hosted.log, readers)

    async def close_clients() -> None:
        for reader in readers.values():
            await reader.close()
        await identity.close()
        await domain.clients.close()

    app.startup.append(open_domain)
    app.cleanup.insert(0, close_clients)
    app.cleanup.append(domain.close)
    return app
