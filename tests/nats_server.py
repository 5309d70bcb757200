"""A throwaway NATS server with JetStream for tests: a free port, its storage in a temporary
directory, stopped and deleted afterwards.

The binary comes from Debian's ``nats-server`` package (``/usr/sbin/nats-server``), which
``.ci/run`` installs. Without it the tests using the server are skipped, unless
``PROFILEMESH_REQUIRE_SERVICES=1`` (as in CI) makes that a failure.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import free_port
from tests.postgres_server import skip_or_fail

START_TIMEOUT_SECONDS = 30.0
MAX_PAYLOAD_BYTES = 8 * 1024 * 1024
"""Above the default 1 MiB, so that the log contract's 1 MiB payloads fit in one message."""


class NatsServer:
    """A running server; ``url`` is what clients connect to. It can be restarted on the same
    port and storage, as after a crash or an upgrade."""

    def __init__(self, binary: Path, port: int, directory: Path) -> None:
        self.port = port
        self.directory = directory
        self.url = f"nats://127.0.0.1:{port}"
        self._command = [str(binary), "-c", str(directory / "server.conf")]
        self._log = directory / "server.log"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the server and wait until it accepts clients."""
        with self._log.open("ab") as log:
            self._process = subprocess.Popen(self._command, stdout=log, stderr=subprocess.STDOUT)
        _wait_until_accepting(self._process, self.port, self._log)

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server: SIGTERM (or SIGKILL), then wait for it to exit."""
        process, self._process = self._process, None
        if process is None:
            return
        if kill:
            process.kill()
        else:
            process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def find_binary() -> Path | None:
    """The ``nats-server`` executable; ``None`` if it is not installed."""
    on_path = shutil.which("nats-server")
    if on_path:
        return Path(on_path)
    debian = Path("/usr/sbin/nats-server")
    return debian if debian.exists() else None


@contextmanager
def running_nats() -> Iterator[NatsServer]:
    """Start a fresh server with JetStream; stop it and remove its files on exit."""
    binary = find_binary()
    if binary is None:
        skip_or_fail("nats-server is not installed: apt-get install nats-server")
    directory = Path(tempfile.mkdtemp(prefix="profilemesh-nats-"))
    port = free_port()
    (directory / "server.conf").write_text(
        f"listen: 127.0.0.1:{port}\n"
        f"max_payload: {MAX_PAYLOAD_BYTES}\n"
        "jetstream {\n"
        f'  store_dir: "{directory / "store"}"\n'
        "  max_memory_store: 256MB\n"
        "  max_file_store: 2GB\n"
        "}\n"
    )
    server = NatsServer(binary, port, directory)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _wait_until_accepting(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    """Return once the server greets a client (its ``INFO`` line), with JetStream ready."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"nats-server exited with {process.returncode}:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
                if connection.recv(4096).startswith(b"INFO"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"nats-server did not start in time:\n{log.read_text()}")
        time.sleep(0.05)
