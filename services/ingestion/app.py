"""Assembles the ingestion service: its event log, domain and servicers."""

from __future__ import annotations

from profilemesh.ingestion.v1 import ingestion_service_pb2, ingestion_service_pb2_grpc
from profilemesh.services.ingestion.domain import Ingestion
from profilemesh.services.ingestion.servicer import REQUEST_VIEWS, IngestionServicer
from profilemesh.shared.log.hosting import host_log
from profilemesh.shared.log.stores import store_opener
from profilemesh.shared.plugin_manager import create_plugin_manager
from profilemesh.shared.server import bind
from profilemesh.shared.service_app import ServiceApp
from profilemesh.shared.settings import Settings


def build_app(settings: Settings) -> ServiceApp:
    """The ingestion service with its data under ``<data_dir>/ingestion`` and, on the
    ``postgres`` backend, its suppression list and source runs in PostgreSQL."""
    plugins = create_plugin_manager(disabled=settings.disabled_plugins)
    domain = Ingestion(
        settings.service_data_dir("ingestion"),
        settings.ingestion,
        plugins,
        stores=store_opener(settings, "ingestion"),
    )
    servicer = IngestionServicer(domain)
    app = ServiceApp(
        name="ingestion",
        bindings=[
            bind(
                ingestion_service_pb2,
                ingestion_service_pb2_grpc,
                "IngestionService",
                servicer,
                request_views=REQUEST_VIEWS,
            )
        ],
    )
    hosted = host_log(app, settings)

    async def open_domain() -> None:
        await domain.open(hosted.log)

    # Start-up hooks run in order and clean-up hooks in reverse: the domain opens after the
    # log and closes before it.
    app.startup.append(open_domain)
    app.cleanup.append(domain.close)
    return app
