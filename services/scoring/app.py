"""Assembles the scoring service: it follows the features service's feature-change log, hosts
the score-change log, and reads features over gRPC."""

from __future__ import annotations

from profilemesh.scoring.v1 import scoring_service_pb2, scoring_service_pb2_grpc
from profilemesh.services.scoring.domain import Scoring
from profilemesh.services.scoring.features_client import FeaturesClient
from profilemesh.services.scoring.servicer import ScoringServicer
from profilemesh.shared.channel import channel_to, create_blocking_channel
from profilemesh.shared.log.hosting import host_log, remote_log
from profilemesh.shared.log.stores import store_opener
from profilemesh.shared.server import bind
from profilemesh.shared.service_app import ServiceApp
from profilemesh.shared.settings import Settings


def build_app(settings: Settings) -> ServiceApp:
    """The scoring service with its data under ``<data_dir>/scoring``."""
    target = settings.services.features.target
    # Channels are opened on first use, inside the server's event loop (or the worker thread).
    features = FeaturesClient(
        lambda: channel_to("features", settings),
        lambda: create_blocking_channel(target, settings),
        deadline_seconds=settings.client.deadline_seconds,
    )
    domain = Scoring(
        settings.service_data_dir("scoring"),
        features,
        lambda: channel_to("identity", settings),
        stores=store_opener(settings, "scoring"),
    )
    app = ServiceApp(
        name="scoring",
        bindings=[
            bind(
                scoring_service_pb2,
                scoring_service_pb2_grpc,
                "ScoringService",
                ScoringServicer(domain),
            )
        ],
    )
    hosted = host_log(app, settings)
    feature_changes = remote_log(settings, "features")

    async def open_domain() -> None:
        await domain.open(hosted.log, feature_changes)

    async def close_clients() -> None:
        await feature_changes.close()
        await features.close()

    app.startup.append(open_domain)
    app.cleanup.insert(0, close_clients)
    app.cleanup.append(domain.close)
    return app
