"""Fixtures shared by the test suite: free ports, settings for a throwaway mesh, span capture."""

from __future__ import annotations

import os
import random
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from profilemesh.shared.settings import SERVICE_NAMES, Endpoint, Endpoints, Settings

# Most tests run a local development mesh, where auth is off; the auth tests switch it on
# explicitly. Set in the environment so that service subprocesses inherit it too.
os.environ.setdefault("PROFILEMESH_AUTH__ENABLED", "false")

_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port nobody listens on right now, for a server a test starts later.

    Chosen below Linux's ephemeral range (32768+), where the kernel picks ports for outgoing
    connections and for ``bind(0)``: a port from there could be taken again before the server
    binds it. Never the same port twice in one test run.
    """
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 32000)
        if port not in _handed_out and port_is_free(port):
            _handed_out.add(port)
            return port


def port_is_free(port: int) -> bool:
    """Whether nothing listens on ``port`` any more.

    SO_REUSEADDR lets the bind ignore connections of a stopped server still in TIME_WAIT (they
    hold no process); a listening socket still makes it fail.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.fixture
def mesh_settings(tmp_path: Path) -> Settings:
    """Settings for a mesh on free ports with its data in a temporary directory."""
    return Settings(
        data_dir=tmp_path / "data",
        grace_seconds=2.0,
        services=Endpoints(**{name: Endpoint(port=free_port()) for name in SERVICE_NAMES}),
    )


@pytest.fixture
def mesh_env(mesh_settings: Settings) -> dict[str, str]:
    """The environment a ``profilemesh`` subprocess needs to use ``mesh_settings``."""
    return {**os.environ, **mesh_settings.to_env()}


_SPANS = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Every span finished during the test, kept in memory.

    OpenTelemetry allows one global tracer provider per process, so it is installed once and
    the exporter is cleared around each test that asks for it.
    """
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_SPANS))
        trace.set_tracer_provider(provider)
    _SPANS.clear()
    yield _SPANS
    _SPANS.clear()


@pytest.fixture
async def mesh(mesh_settings: Settings) -> AsyncIterator[Mesh]:
    """The five services running in this process (a module may define its own ``mesh``)."""
    running = await Mesh(mesh_settings).start()
    yield running
    await running.stop()


# The store-backend fixtures (``stores``, ``postgres_server``), for any test module. Imported last:
# tests.store_backends imports free_port from here.
from tests.running_service import Mesh  # noqa: E402
from tests.store_backends import postgres_server, stores  # noqa: E402, F401
