"""A throwaway PostgreSQL server for tests: ``initdb`` in a temporary directory, a free port,
stopped and deleted afterwards.

The binaries come from Debian's ``postgresql`` package (``/usr/lib/postgresql/<version>/bin``),
which ``.ci/run`` installs. PostgreSQL refuses to run as root, so as root the commands run as the
``postgres`` user (``runuser``) in a directory it owns. Without the binaries the tests using the
server are skipped, unless ``PROFILEMESH_REQUIRE_SERVICES=1`` (as in CI) makes that a failure.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import psycopg
import pytest

from tests.conftest import free_port

REQUIRE_SERVICES = "PROFILEMESH_REQUIRE_SERVICES"
START_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class PostgresServer:
    """A running server; ``dsn`` connects as its superuser to the ``postgres`` database."""

    dsn: str
    port: int
    directory: Path


def find_bin_dir() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl``, newest version first; ``None`` if absent."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0,
        reverse=True,
    )
    if candidates:
        return candidates[0].parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the test, or fail it when the environment says servers are required."""
    if os.environ.get(REQUIRE_SERVICES) == "1":
        pytest.fail(f"{reason} ({REQUIRE_SERVICES}=1)", pytrace=False)
    pytest.skip(reason)


@contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """Start a fresh server; stop it and remove its files on exit."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        skip_or_fail(
            "PostgreSQL is not installed: apt-get install postgresql (initdb not found in "
            "/usr/lib/postgresql/*/bin or on PATH)"
        )
    # Not under pytest's tmp_path: its parents are private to root, and the server runs as
    # the postgres user when we are root.
    directory = Path(tempfile.mkdtemp(prefix="profilemesh-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        account = pwd.getpwnam("postgres")
        os.chown(directory, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = directory / "data", free_port()
    try:
        _run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres",
              "-A", "trust", "-E", "UTF8", "--no-sync"])  # fmt: skip
        options = (
            f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off"
        )
        _run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options,
              "-l", str(directory / "server.log"), "-w", "-t", "30", "start"])  # fmt: skip
        try:
            dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
            _wait_until_accepting(dsn)
            yield PostgresServer(dsn, port, directory)
        finally:
            subprocess.run(
                [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                 "stop"],
                capture_output=True,
                check=False,
                timeout=30,
            )  # fmt: skip
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
        )


def _wait_until_accepting(dsn: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while True:
        try:
            psycopg.connect(dsn, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
