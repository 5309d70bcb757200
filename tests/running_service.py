"""A service of the mesh run in this process on a real socket, for integration tests."""

from __future__ import annotations

from profilemesh.services.runner import load_app
from profilemesh.shared.log.embedded import EmbeddedLog
from profilemesh.shared.log.hosting import STREAMS
from profilemesh.shared.log.servicer import LogServicer
from profilemesh.shared.server import ServiceServer, create_server
from profilemesh.shared.service_app import ServiceApp
from profilemesh.shared.settings import Settings


class RunningService:
    """``profilemesh serve <service>`` in this process: start, stop, restart on one port."""

    def __init__(self, settings: Settings, service: str, port: int = 0) -> None:
        self.settings = settings
        self.service = service
        self.port = port
        self.app: ServiceApp | None = None
        self.server: ServiceServer | None = None

    async def start(self) -> RunningService:
        self.app = load_app(self.service, self.settings)
        self.server, self.port = create_server(self.app.bindings, self.settings, port=self.port)
        await self.app.start()
        await self.server.start()
        return self

    @property
    def log(self) -> EmbeddedLog:
        """The log the service produces (``events`` for ingestion ...)."""
        assert self.app is not None
        servicer = next(
            b.servicer for b in self.app.bindings if isinstance(b.servicer, LogServicer)
        )
        stream, _ = STREAMS[self.service]
        return servicer.logs[stream]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        assert self.server is not None and self.app is not None
        await self.server.stop(0)
        await self.app.close()
        self.server = self.app = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()


class RunningIngestion(RunningService):
    """The ingestion service (its ``log`` is the event log)."""

    def __init__(self, settings: Settings, port: int = 0) -> None:
        super().__init__(settings, "ingestion", port)

    async def start(self) -> RunningIngestion:
        await super().start()
        return self


class Mesh:
    """The five services in this process, each on the port the settings give it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.services = [
            RunningIngestion(settings, port=settings.services.ingestion.port),
            *(
                RunningService(settings, name, settings.services.of(name).port)
                for name in ("identity", "features", "scoring", "activation")
            ),
        ]

    async def start(self) -> Mesh:
        for service in self.services:
            await service.start()
        return self

    async def stop(self) -> None:
        for service in reversed(self.services):
            if service.server is not None:
                await service.stop()
