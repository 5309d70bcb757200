"""The log backends the contract and crash suites run against.

A backend is a way to provide a *location* for the logs of one test (a directory for the
embedded log; a throwaway server for NATS JetStream) and a factory that opens a stream there.
Adding a backend to :data:`BACKENDS` runs every contract and crash test against it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from profilemesh.shared.log.api import Log, LogRecord, RecordBatch
from profilemesh.shared.log.embedded import EmbeddedLog
from profilemesh.shared.log.nats_log import NatsLog
from profilemesh.shared.log.sqlite_store import SqliteConsumerStore
from tests.nats_server import running_nats


@dataclass(frozen=True)
class LogBackend:
    """One log implementation under test."""

    name: str
    location: Callable[[Path], AbstractAsyncContextManager[str]]
    """Given a scratch directory, where this test's logs live (a string the child process of
    the crash test can receive on its command line); torn down after the test."""
    open_log: Callable[[str, str, int], Awaitable[Log]]
    """``open_log(location, stream, partitions)``: create or reopen a stream at a location."""


@asynccontextmanager
async def _directory(scratch: Path) -> AsyncIterator[str]:
    directory = scratch / "logs"
    directory.mkdir(exist_ok=True)
    yield str(directory)


async def _open_embedded(location: str, stream: str, partitions: int) -> Log:
    # Small segments so that the suites cross segment boundaries, not just append to one file.
    return await EmbeddedLog.open(
        Path(location) / stream, stream, partitions=partitions, segment_bytes=64 * 1024
    )


@asynccontextmanager
async def _nats_server(scratch: Path) -> AsyncIterator[str]:
    with running_nats() as server:
        yield server.url


async def _open_nats(location: str, stream: str, partitions: int) -> Log:
    # A short idle time, so that reading past redacted last records does not wait long.
    return await NatsLog.open(
        location, stream, partitions=partitions, prefix="test", idle_seconds=0.5
    )


BACKENDS = [
    LogBackend("embedded", _directory, _open_embedded),
    LogBackend("nats", _nats_server, _open_nats),
]

BACKENDS_BY_NAME = {backend.name: backend for backend in BACKENDS}


class LogHarness:
    """Opens, restarts and finally closes the logs of one test on one backend."""

    def __init__(self, backend: LogBackend, location: str) -> None:
        self.backend = backend
        self.location = location
        self._open: list[Log] = []

    async def open(self, stream: str = "events", partitions: int = 4) -> Log:
        """Create (or reopen) ``stream`` at this test's location."""
        log = await self.backend.open_log(self.location, stream, partitions)
        self._open.append(log)
        return log

    async def restart(self, log: Log) -> Log:
        """Close ``log`` and open it again at the same location, as after a process restart."""
        await log.close()
        self._open.remove(log)
        return await self.open(log.stream, log.partitions)

    async def close(self) -> None:
        """Close every log still open."""
        for log in reversed(self._open):
            await log.close()
        self._open.clear()


# -- consumer state shared by the suites ------------------------------------------------------

APPLIED_SCHEMA = """
CREATE TABLE IF NOT EXISTS applied (
    partition INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    payload BLOB NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (partition, offset)
)
"""
"""One row per record a consumer applied, counting how many times it was applied."""


def count_records(tx: sqlite3.Connection, records: Iterable[LogRecord]) -> None:
    """Record each of ``records`` in ``applied``, counting repeats."""
    tx.executemany(
        "INSERT INTO applied (partition, offset, payload, count) VALUES (?, ?, ?, 1)"
        " ON CONFLICT (partition, offset) DO UPDATE SET count = count + 1",
        [(record.partition, record.offset, record.payload) for record in records],
    )


def count_applied(tx: sqlite3.Connection, batch: RecordBatch) -> None:
    """A consumer handler that records every record of ``batch`` in ``applied``."""
    count_records(tx, batch)


def applied_counts(store: SqliteConsumerStore) -> dict[tuple[int, int], int]:
    """(partition, offset) -> how many times it was applied, for every applied record."""
    return store.read(
        lambda connection: {
            (partition, offset): count
            for partition, offset, count in connection.execute(
                "SELECT partition, offset, count FROM applied"
            )
        }
    )
