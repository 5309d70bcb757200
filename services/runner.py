"""Runs one service of the mesh in this process: ``profilemesh serve <service>``."""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys

from profilemesh.shared.auth.hosting import guard_app
from profilemesh.shared.json_logging import configure_logging
from profilemesh.shared.log.postgres_store import PostgresUnreachable
from profilemesh.shared.log.stores import BackendNotConfigured
from profilemesh.shared.metrics import MetricsPortInUse, configure_metrics
from profilemesh.shared.server import ListenError, create_server, serve
from profilemesh.shared.service_app import ServiceApp
from profilemesh.shared.settings import SERVICE_NAMES, Settings
from profilemesh.shared.telemetry import configure_tracing

log = logging.getLogger(__name__)


def load_app(service: str, settings: Settings) -> ServiceApp:
    """Build the named service from its ``app`` module, guarded: every call it serves is
    checked for a token and a scope (when auth is on) and recorded in its audit log."""
    if service not in SERVICE_NAMES:
        raise ValueError(f"unknown service {service!r}; expected one of {', '.join(SERVICE_NAMES)}")
    module = importlib.import_module(f"profilemesh.services.{service}.app")
    app: ServiceApp = module.build_app(settings)
    guard_app(app, settings)
    return app


async def run_service(
    service: str,
    settings: Settings,
    *,
    port: int | None = None,
    parent_pid: int | None = None,
) -> None:
    """Serve ``service`` until SIGTERM/SIGINT, then stop gracefully."""
    app = load_app(service, settings)
    endpoint = settings.services.of(service)
    server, bound = create_server(
        app.bindings, settings, port=endpoint.port if port is None else port
    )
    await app.start()
    log.info("serving", extra={"port": bound, "services": list(server.service_names)})
    try:
        await serve(server, settings.grace_seconds, parent_pid=parent_pid)
    finally:
        await app.close()
    log.info("stopped")


GIL_SWITCH_SECONDS = 0.0005


def serve_main(
    service: str, settings: Settings, *, port: int | None = None, parent_pid: int | None = None
) -> int:
    """Entry point of ``profilemesh serve``: set up logging, tracing and metrics, serve, exit
    code."""
    configure_logging(service, settings.log_level, settings.log_format)
    configure_tracing(settings, service)
    # Consumers apply batches in a worker thread while the event loop serves calls; with the
    # default 5 ms GIL switch interval a call can wait that long per switch behind a batch.
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    try:
        configure_metrics(settings, service)
        asyncio.run(run_service(service, settings, port=port, parent_pid=parent_pid))
    except (ListenError, MetricsPortInUse, BackendNotConfigured, PostgresUnreachable) as error:
        log.error("%s", error)
        return 2
    return 0
