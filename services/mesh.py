"""``profilemesh up``: the whole mesh on localhost, one process per service.

The supervisor starts every service as a child process (each in its own session, so a Ctrl-C in
the terminal reaches only the supervisor, which then stops the children in order), tells each
where the others are through the settings it passes down, waits until every health check says
SERVING, and on SIGTERM/SIGINT stops them all: SIGTERM first, SIGKILL after the grace period.
If any child dies on its own, the mesh is stopped and ``up`` exits non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TextIO

from profilemesh.shared.auth.local_admin import prepare_local_admin
from profilemesh.shared.health_client import check_health
from profilemesh.shared.settings import SERVICE_NAMES, Settings

# Beyond the services' own grace period, how long to wait before SIGKILL.
KILL_AFTER_EXTRA_SECONDS = 5.0


class MeshError(RuntimeError):
    """The mesh could not be started (a service died or never became healthy)."""


@dataclass
class Child:
    """One running service process."""

    service: str
    target: str
    process: subprocess.Popen[bytes]
    log_path: Path


class Mesh:
    """Starts, watches and stops one process per service."""

    def __init__(self, settings: Settings, services: Sequence[str] = SERVICE_NAMES) -> None:
        self.settings = settings
        self.services = tuple(services)
        self.children: list[Child] = []
        self._log_files: list[IO[bytes]] = []
        self.admin_token_file: Path | None = None

    def start(self) -> None:
        """Start every service process (they become healthy asynchronously).

        With auth on and no token configured, every service gets the local admin token (see
        :mod:`profilemesh.shared.auth.local_admin`), kept in ``admin_token_file``.
        """
        self.settings, self.admin_token_file = prepare_local_admin(self.settings)
        log_dir = self.settings.data_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.settings.to_env()}
        for service in self.services:
            log_path = log_dir / f"{service}.log"
            log_file = log_path.open("ab")
            self._log_files.append(log_file)
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "profilemesh.services.cli",
                    "serve",
                    service,
                    "--parent-pid",
                    str(os.getpid()),
                ],
                env={**env, **self._metrics_port_of(service)},
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
            )
            target = self.settings.services.of(service).target
            self.children.append(Child(service, target, process, log_path))

    def _metrics_port_of(self, service: str) -> dict[str, str]:
        # The processes share one host: each gets a port of its own, the configured one plus
        # the service's place in SERVICE_NAMES.
        base = self.settings.metrics_port
        if base is None:
            return {}
        return {"PROFILEMESH_METRICS_PORT": str(base + SERVICE_NAMES.index(service))}

    def exited(self) -> list[Child]:
        """Children that are no longer running."""
        return [child for child in self.children if child.process.poll() is not None]

    async def wait_until_serving(self, timeout: float) -> None:
        """Return once every service reports SERVING; raise :class:`MeshError` if one exits
        or ``timeout`` seconds pass first."""
        deadline = time.monotonic() + timeout
        pending = {child.service: child for child in self.children}
        while pending:
            dead = self.exited()
            if dead:
                child = dead[0]
                raise MeshError(
                    f"{child.service} exited with code {child.process.returncode}; "
                    f"see {child.log_path}"
                )
            statuses = await asyncio.gather(
                *(check_health(c.target, self.settings, timeout=0.5) for c in pending.values())
            )
            for name, status in zip(list(pending), statuses, strict=True):
                if status == "SERVING":
                    del pending[name]
            if pending and time.monotonic() > deadline:
                raise MeshError(f"not serving after {timeout:.0f}s: {', '.join(pending)}")
            if pending:
                await asyncio.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM every child, wait for the grace period, SIGKILL what is left, reap all."""
        for child in self.children:
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.grace_seconds + KILL_AFTER_EXTRA_SECONDS
        for child in self.children:
            try:
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
        for log_file in self._log_files:
            log_file.close()


async def run_mesh(settings: Settings, out: TextIO, *, startup_timeout: float = 60.0) -> int:
    """Run the mesh until SIGTERM/SIGINT or until a service dies; the exit code of ``up``."""
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    mesh = Mesh(settings)
    try:
        mesh.start()
        starting = asyncio.create_task(mesh.wait_until_serving(startup_timeout))
        interrupted = asyncio.create_task(stop_requested.wait())
        done, _ = await asyncio.wait({starting, interrupted}, return_when=asyncio.FIRST_COMPLETED)
        if interrupted in done:
            starting.cancel()
            print("stopping before every service was up", file=out, flush=True)
            return 130
        interrupted.cancel()
        starting.result()  # raises MeshError
        _print_ready(mesh, settings, out)
        while not stop_requested.is_set():
            dead = mesh.exited()
            if dead:
                child = dead[0]
                print(
                    f"{child.service} exited with code {child.process.returncode}; "
                    f"stopping the mesh (see {child.log_path})",
                    file=out,
                    flush=True,
                )
                return 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_requested.wait(), timeout=0.5)
        print("stopping...", file=out, flush=True)
        return 0
    except MeshError as error:
        print(f"profilemesh up failed: {error}", file=out, flush=True)
        return 1
    finally:
        await asyncio.to_thread(mesh.stop)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        print("stopped", file=out, flush=True)


def _print_ready(mesh: Mesh, settings: Settings, out: TextIO) -> None:
    print(f"profilemesh is up (data in {settings.data_dir.resolve()}):", file=out)
    for child in mesh.children:
        print(
            f"  {child.service:<11} {child.target:<21} pid {child.process.pid:<8} "
            f"SERVING  log {child.log_path}",
            file=out,
        )
    if mesh.admin_token_file is not None:
        print(f"Admin token in {mesh.admin_token_file} (the CLI reads it there).", file=out)
    print("Press Ctrl-C to stop.", file=out, flush=True)
