"""Opening a service's consumer store on the backend the settings choose.

The embedded backend keeps each store in a SQLite file under the service's data directory; the
``postgres`` backend in a schema of its own (``profilemesh_<service>``) of the database
``settings.postgres.dsn`` names, shared by every replica of the service.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import cast

from profilemesh.shared.log.postgres_store import PostgresConsumerStore
from profilemesh.shared.log.sqlite_store import SqliteConsumerStore
from profilemesh.shared.settings import Settings

StoreOpener = Callable[[str], SqliteConsumerStore]
"""Opens a service's store by name (``"identity"``); what a domain is given."""


class BackendNotConfigured(ValueError):
    """The settings choose a backend without saying where its servers are."""


def open_store(settings: Settings, service: str, name: str) -> SqliteConsumerStore:
    """The consumer store ``name`` of ``service`` on the configured backend.

    Typed as the SQLite store because domain code is written against its surface, with
    ``sqlite3.Connection`` transactions: the PostgreSQL store has the same surface (``schema``,
    ``ensure_column``, ``transaction``, ``read``, ``scrub``, ``close``, the offsets) and hands
    out a connection that reads the same dialect; one test suite runs the domains' SQL on both.
    """
    if settings.backend == "postgres":
        postgres = settings.postgres
        if not postgres.dsn:
            raise BackendNotConfigured(
                "the postgres backend needs postgres.dsn (PROFILEMESH_POSTGRES__DSN)"
            )
        store = PostgresConsumerStore(
            postgres.dsn,
            postgres_schema(service, name),
            pool_min=postgres.pool_min,
            pool_max=postgres.pool_max,
        )
        return cast(SqliteConsumerStore, store)
    directory = settings.service_data_dir(service)
    directory.mkdir(parents=True, exist_ok=True)
    return SqliteConsumerStore(directory / f"{name}.sqlite")


def postgres_schema(service: str, name: str) -> str:
    """The PostgreSQL schema of a service's store: ``profilemesh_identity`` for the store
    named after its service, ``profilemesh_<service>_<name>`` for any other."""
    parts = ["profilemesh", service] + ([] if name == service else [name])
    return re.sub(r"[^a-z0-9_]", "_", "_".join(parts).lower())[:63]


def store_opener(settings: Settings, service: str) -> StoreOpener:
    """How ``service`` opens its stores on the configured backend."""
    return partial(open_store, settings, service)


def files_under(data_dir: Path) -> StoreOpener:
    """SQLite files under ``data_dir`` (``identity.sqlite``...): a domain's default."""

    def open_file(name: str) -> SqliteConsumerStore:
        return SqliteConsumerStore(data_dir / f"{name}.sqlite")

    return open_file
