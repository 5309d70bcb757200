"""Which log each service produces, and how a service opens, serves and closes it."""

from __future__ import annotations

from profilemesh.shared.log.api import Log, type_url
from profilemesh.shared.log.client import RemoteLog
from profilemesh.shared.log.embedded import MIB, EmbeddedLog
from profilemesh.shared.log.servicer import LogServicer, log_service_binding
from profilemesh.shared.service_app import ServiceApp
from profilemesh.shared.settings import Settings

STREAMS = {
    "ingestion": ("events", "profilemesh.ingestion.v1.IngestedItem"),
    "identity": ("resolutions", "profilemesh.identity.v1.ResolutionEntry"),
    "features": ("feature-changes", "profilemesh.features.v1.FeatureChangeEntry"),
    "scoring": ("score-changes", "profilemesh.scoring.v1.ScoreChangeEntry"),
    "activation": ("activations", "profilemesh.activation.v1.ActivationEntry"),
}
"""service -> (the stream it produces, the payload message type of that stream)."""


async def open_log(settings: Settings, service: str) -> Log:
    """The log ``service`` produces, opened under its data directory."""
    stream, payload = STREAMS[service]
    streams = settings.streams
    return await EmbeddedLog.open(
        settings.service_data_dir(service) / "log" / stream,
        stream,
        partitions=streams.partitions,
        payload_type=type_url(payload),
        segment_bytes=streams.segment_mib * MIB,
        max_pending_bytes=streams.max_pending_mib * MIB,
    )


def remote_log(settings: Settings, service: str) -> RemoteLog:
    """The log ``service`` produces, read from that service over gRPC."""
    stream, _ = STREAMS[service]
    return RemoteLog(settings.services.of(service).target, stream, settings)


class HostedLog:
    """The log a service produces: opened before it serves, served by ``LogService``, closed
    after it stops."""

    def __init__(self, settings: Settings, service: str) -> None:
        self.settings = settings
        self.service = service
        self.servicer = LogServicer(settings.streams.heartbeat_seconds)
        self._log: Log | None = None

    @property
    def log(self) -> Log:
        """The open log (only between start-up and clean-up)."""
        if self._log is None:
            raise RuntimeError(f"the {self.service} log is not open")
        return self._log

    async def open(self) -> None:
        self._log = await open_log(self.settings, self.service)
        self.servicer.host(self._log)

    async def close(self) -> None:
        if self._log is not None:
            await self._log.close()
            self._log = None


def host_log(app: ServiceApp, settings: Settings) -> HostedLog:
    """Give ``app`` its log: opened at start-up, served, closed at clean-up."""
    hosted = HostedLog(settings, app.name)
    app.bindings.append(log_service_binding(hosted.servicer))
    app.startup.append(hosted.open)
    app.cleanup.append(hosted.close)
    return hosted
