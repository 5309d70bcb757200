"""Which log each service produces, and how a service opens, serves and closes it.

On the embedded backend a service keeps its log in files and serves it over gRPC
(``LogService``), and reads the logs upstream of it from their services. On the scale-out
backend (``backend: postgres``) every log is a set of NATS JetStream streams, which a service
appends to and reads from directly: :func:`open_service_log` and :func:`remote_log` choose.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from profilemesh.shared.log import event_columns
from profilemesh.shared.log.api import Log, LogReader, type_url
from profilemesh.shared.log.archive import PayloadColumns, Retention
from profilemesh.shared.log.client import RemoteLog
from profilemesh.shared.log.embedded import MIB, EmbeddedLog
from profilemesh.shared.log.nats_log import NatsLog, NatsLogReader
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

logger = logging.getLogger(__name__)


def retention_for(settings: Settings, service: str) -> Retention:
    """The event log is the source of truth: its old segments are archived as Parquet (and stay
    replayable). The other logs are derived from it and can be rebuilt: old segments go."""
    streams = settings.streams
    if service == "ingestion":
        columns = PayloadColumns(event_columns.FIELDS, event_columns.decode_events)
        return Retention("archive", streams.archive_after_hours * 3600, columns)
    return Retention("delete", streams.delete_after_hours * 3600)


async def open_log(settings: Settings, service: str) -> EmbeddedLog:
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
        retention=retention_for(settings, service),
    )


def logs_in_nats(settings: Settings) -> bool:
    """Whether the logs are NATS JetStream streams (the scale-out backend) rather than files
    that each service hosts."""
    return settings.backend == "postgres"


async def open_service_log(settings: Settings, service: str) -> Log:
    """The log ``service`` produces, on the configured backend."""
    if logs_in_nats(settings):
        return await open_nats_log(settings, service)
    return await open_log(settings, service)


async def open_nats_log(settings: Settings, service: str, *, producer: bool = True) -> NatsLog:
    """The log ``service`` produces, in NATS JetStream, created if it does not exist yet.

    Its producer sets its retention: NATS cannot archive, so the event log (which the embedded
    backend archives as Parquet) is kept whole, and the derived logs lose records older than
    their retention age."""
    stream, payload = STREAMS[service]
    retention = retention_for(settings, service)
    return await NatsLog.open(
        settings.nats.url,
        stream,
        partitions=settings.streams.partitions,
        payload_type=type_url(payload),
        prefix=settings.nats.stream_prefix,
        replicas=settings.nats.replicas,
        max_age_seconds=retention.after_seconds if retention.mode == "delete" else 0.0,
        configure=producer,
        max_pending_bytes=settings.streams.max_pending_mib * MIB,
    )


def remote_log(settings: Settings, service: str) -> LogReader:
    """The log ``service`` produces, read from that service over gRPC, or straight from NATS
    JetStream (opened on first use) when the logs live there."""
    stream, _ = STREAMS[service]
    if logs_in_nats(settings):
        return NatsLogReader(stream, lambda: open_nats_log(settings, service, producer=False))
    return RemoteLog(settings.services.of(service).target, stream, settings)


class HostedLog:
    """The log a service produces: opened before it serves, served by ``LogService`` (when it
    is the service's own files), closed after it stops."""

    def __init__(self, settings: Settings, service: str) -> None:
        self.settings = settings
        self.service = service
        self.servicer = LogServicer(settings.streams.heartbeat_seconds)
        self._log: Log | None = None
        self._maintenance: asyncio.Task[None] | None = None

    @property
    def log(self) -> Log:
        """The open log (only between start-up and clean-up)."""
        if self._log is None:
            raise RuntimeError(f"the {self.service} log is not open")
        return self._log

    async def open(self) -> None:
        """Open the log, serve it, and start applying its retention policy periodically."""
        self._log = log = await open_service_log(self.settings, self.service)
        if isinstance(log, EmbeddedLog):  # NATS serves its streams and applies retention itself
            self.servicer.host(log)
            self._maintenance = asyncio.create_task(self._maintain(log))

    async def _maintain(self, log: EmbeddedLog) -> None:
        interval = self.settings.streams.maintenance_interval_seconds
        while True:
            await asyncio.sleep(interval)
            try:
                handled = await asyncio.to_thread(log.maintain)
            except Exception:  # retention failing must not take the service down
                logger.exception("retention of the %s log failed", self.service)
                continue
            if handled:
                logger.info("retention handled %d segments", handled, extra={"log": log.stream})

    async def close(self) -> None:
        """Stop retention and close the log."""
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
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
