"""The consumer-store backends that store tests run against: SQLite files and PostgreSQL.

A test that asks for the ``stores`` fixture runs once per backend, with a :class:`StoreHarness`
that opens its stores (``stores.open("identity")``) and closes them afterwards. PostgreSQL runs
as one throwaway server for the whole session (``tests.postgres_server``); each store gets a
schema of its own, so tests never see each other's tables. Without the PostgreSQL binaries the
``postgres`` runs are skipped, unless ``PROFILEMESH_REQUIRE_SERVICES=1``.

The fixtures are registered for every test module by ``tests/conftest.py``.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from profilemesh.shared.log.postgres_store import PostgresConnection, PostgresConsumerStore
from profilemesh.shared.log.sql_dialect import Dialect
from profilemesh.shared.log.sqlite_store import SqliteConsumerStore
from tests.postgres_server import PostgresServer, running_postgres

STORE_BACKENDS = ("sqlite", "postgres")

_schemas = itertools.count(1)


class StoreHarness:
    """Opens the stores of one test on one backend, and closes them after the test."""

    def __init__(self, backend: str, directory: Path, dsn: str | None = None) -> None:
        self.backend = backend
        self.directory = directory
        self.dsn = dsn
        self._stores: list[Any] = []
        self._connection: Any = None
        self._names: dict[str, str] = {}

    def open(self, name: str) -> Any:
        """The store ``name`` of this test; opening the same name again (in this test) opens
        the same data, as a restarted or second replica's process would."""
        if self.backend == "postgres":
            assert self.dsn is not None
            schema = self._names.setdefault(name, f"test{next(_schemas)}_{name}")
            store: Any = PostgresConsumerStore(self.dsn, schema, pool_min=1, pool_max=4)
        else:
            store = SqliteConsumerStore(self.directory / f"{name}.sqlite")
        self._stores.append(store)
        return store

    def connection(self, schema: str) -> Any:
        """A connection in autocommit mode to a fresh database holding ``schema`` (SQLite
        dialect), like ``sqlite3.connect(":memory:")`` followed by ``executescript``. It
        understands ``BEGIN``/``COMMIT``/``ROLLBACK``. Each call replaces the previous one."""
        if self.backend == "sqlite":
            connection = sqlite3.connect(":memory:", isolation_level=None)
            connection.executescript(schema)
            self._close_connection()
            self._connection = connection
            return connection
        assert self.dsn is not None
        if self._connection is None:
            self._connection = psycopg.connect(self.dsn, autocommit=True)
        raw = self._connection
        name = sql.Identifier(f"test{next(_schemas)}_connection")
        raw.execute(sql.SQL("CREATE SCHEMA {}").format(name))
        raw.execute(sql.SQL("SET search_path TO {}").format(name))
        dialect = Dialect()
        for statement in dialect.translate_script(schema):
            raw.execute(statement, ())
        return PostgresConnection(raw, dialect, transaction_control=True)

    def _close_connection(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def close(self) -> None:
        for store in reversed(self._stores):
            store.close()
        self._stores.clear()
        self._close_connection()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL server for the session's store tests."""
    with running_postgres() as server:
        yield server


@pytest.fixture(params=STORE_BACKENDS)
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreHarness]:
    """A :class:`StoreHarness` on each store backend in turn."""
    if request.param == "postgres":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        harness = StoreHarness("postgres", tmp_path, server.dsn)
    else:
        harness = StoreHarness("sqlite", tmp_path)
    try:
        yield harness
    finally:
        harness.close()
