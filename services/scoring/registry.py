"""The model registry: every trained version with what it needs to serve and to be judged.

A version is its ``ModelVersion`` message (definition, feature schema, data window, metrics,
baseline, importances) plus its artefacts: the LightGBM text model and the calibrator. Versions
are numbered per model; promotion to champion is explicit and exclusive. Clusterings are
versioned the same way. Everything lives in the service's ``registry`` store: a SQLite file
next to the service's log on the embedded backend, the schema ``profilemesh_scoring_registry``
on the ``postgres`` one, where every replica (and a restarted pod) finds the same models.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from profilemesh.scoring.v1 import clustering_pb2, model_pb2
from profilemesh.shared.errors import FailedPrecondition, InvalidArgument, NotFound
from profilemesh.shared.log.sqlite_store import SqliteConsumerStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS model_versions (
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    metadata BLOB NOT NULL,
    booster TEXT NOT NULL,
    calibration TEXT NOT NULL,
    champion INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (model, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS clusterings (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    metadata BLOB NOT NULL,
    model TEXT NOT NULL,
    PRIMARY KEY (name, version)
) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class StoredModel:
    """A registered version: its metadata and its artefacts."""

    metadata: model_pb2.ModelVersion
    booster_text: str
    calibration: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StoredClustering:
    metadata: clustering_pb2.Clustering
    model: dict[str, Any]


class ModelRegistry:
    """Model versions and clusterings in a consumer store (``open_store(settings, "scoring",
    "registry")``), which it owns and closes; safe to call from several threads, and from
    several replicas on a shared store: its write transactions exclude each other."""

    def __init__(self, store: SqliteConsumerStore) -> None:
        self._store = store
        store.schema(SCHEMA)

    def close(self) -> None:
        self._store.close()

    # -- models -------------------------------------------------------------------------------

    def register(
        self, metadata: model_pb2.ModelVersion, booster_text: str, calibration: dict[str, Any]
    ) -> model_pb2.ModelVersion:
        """Store a new version of ``metadata.model`` (numbered here) and return it. The first
        version of a model becomes its champion; later ones wait for a promotion."""
        with self._store.transaction() as connection:
            kinds = {
                row[0]
                for row in connection.execute(
                    "SELECT DISTINCT kind FROM model_versions WHERE model = ?",
                    (metadata.model,),
                )
            }
            if kinds and kinds != {metadata.kind}:
                raise InvalidArgument.for_field(
                    "label.kind",
                    f"model {metadata.model!r} is of another kind; use another name",
                )
            [(latest,)] = connection.execute(
                "SELECT coalesce(max(version), 0) FROM model_versions WHERE model = ?",
                (metadata.model,),
            ).fetchall()
            stored = model_pb2.ModelVersion()
            stored.CopyFrom(metadata)
            stored.version = str(latest + 1)
            stored.champion = latest == 0
            stored.state = model_pb2.MODEL_STATE_READY
            connection.execute(
                "INSERT INTO model_versions"
                " (model, version, kind, metadata, booster, calibration, champion)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    stored.model,
                    latest + 1,
                    stored.kind,
                    stored.SerializeToString(),
                    booster_text,
                    json.dumps(calibration),
                    int(stored.champion),
                ),
            )
        return stored

    def kind_of(self, model: str) -> int | None:
        row = self._store.read(
            lambda c: c.execute(
                "SELECT kind FROM model_versions WHERE model = ? LIMIT 1", (model,)
            ).fetchone()
        )
        return None if row is None else int(row[0])

    def get(self, model: str, version: str = "") -> StoredModel:
        """A version (the champion when ``version`` is empty); NotFound otherwise."""
        if version:
            if not version.isdigit():
                raise InvalidArgument.for_field("version", "versions are whole numbers")
            query = (
                "SELECT metadata, booster, calibration, champion FROM model_versions"
                " WHERE model = ? AND version = ?"
            )
            arguments: tuple[Any, ...] = (model, int(version))
        else:
            query = (
                "SELECT metadata, booster, calibration, champion FROM model_versions"
                " WHERE model = ? AND champion = 1"
            )
            arguments = (model,)
        row = self._store.read(lambda c: c.execute(query, arguments).fetchone())
        if row is None:
            what = f"model {model!r}" + (f" version {version}" if version else "")
            raise NotFound(f"no {what}", violations=[("model", "unknown")])
        return _stored(row)

    def versions(
        self, model: str = "", kind: int = 0, champions_only: bool = False
    ) -> list[model_pb2.ModelVersion]:
        """Versions by model name, newest first."""
        query = "SELECT metadata, champion FROM model_versions WHERE 1=1"
        arguments: list[Any] = []
        if model:
            query += " AND model = ?"
            arguments.append(model)
        if kind:
            query += " AND kind = ?"
            arguments.append(kind)
        if champions_only:
            query += " AND champion = 1"
        query += " ORDER BY model, version DESC"
        rows = self._store.read(lambda c: c.execute(query, arguments).fetchall())
        found = []
        for metadata, champion in rows:
            message = model_pb2.ModelVersion.FromString(bytes(metadata))
            message.champion = bool(champion)
            found.append(message)
        return found

    def champions(self) -> list[StoredModel]:
        rows = self._store.read(
            lambda c: c.execute(
                "SELECT metadata, booster, calibration, champion FROM model_versions"
                " WHERE champion = 1 ORDER BY model"
            ).fetchall()
        )
        return [_stored(row) for row in rows]

    def promote(self, model: str, version: str) -> tuple[model_pb2.ModelVersion, str]:
        """Make ``version`` the champion; the new champion and the previous one's version."""
        stored = self.get(model, version)
        if stored.metadata.state != model_pb2.MODEL_STATE_READY:
            raise FailedPrecondition(
                "only a READY version can be promoted", violations=[("version", "not ready")]
            )
        with self._store.transaction() as connection:
            row = connection.execute(
                "SELECT version FROM model_versions WHERE model = ? AND champion = 1",
                (model,),
            ).fetchone()
            # CASE rather than a bare comparison: PostgreSQL's is a boolean, not 0 or 1.
            connection.execute(
                "UPDATE model_versions SET champion = CASE WHEN version = ? THEN 1 ELSE 0 END"
                " WHERE model = ?",
                (int(version), model),
            )
        promoted = model_pb2.ModelVersion()
        promoted.CopyFrom(stored.metadata)
        promoted.champion = True
        return promoted, "" if row is None or str(row[0]) == version else str(row[0])

    # -- clusterings ------------------------------------------------------------------------

    def register_clustering(
        self, metadata: clustering_pb2.Clustering, model: dict[str, Any]
    ) -> clustering_pb2.Clustering:
        with self._store.transaction() as connection:
            [(latest,)] = connection.execute(
                "SELECT coalesce(max(version), 0) FROM clusterings WHERE name = ?",
                (metadata.name,),
            ).fetchall()
            stored = clustering_pb2.Clustering()
            stored.CopyFrom(metadata)
            stored.version = str(latest + 1)
            connection.execute(
                "INSERT INTO clusterings (name, version, metadata, model) VALUES (?, ?, ?, ?)",
                (stored.name, latest + 1, stored.SerializeToString(), json.dumps(model)),
            )
        return stored

    def clustering(self, name: str, version: str = "") -> StoredClustering:
        if version:
            if not version.isdigit():
                raise InvalidArgument.for_field("version", "versions are whole numbers")
            query = "SELECT metadata, model FROM clusterings WHERE name = ? AND version = ?"
            arguments: tuple[Any, ...] = (name, int(version))
        else:
            query = (
                "SELECT metadata, model FROM clusterings WHERE name = ?"
                " ORDER BY version DESC LIMIT 1"
            )
            arguments = (name,)
        row = self._store.read(lambda c: c.execute(query, arguments).fetchone())
        if row is None:
            raise NotFound(f"no clustering {name!r}", violations=[("name", "unknown")])
        return StoredClustering(
            clustering_pb2.Clustering.FromString(bytes(row[0])), json.loads(row[1])
        )

    def latest_clusterings(self) -> list[StoredClustering]:
        """The latest version of every clustering (what profiles are assigned to)."""
        rows = self._store.read(
            lambda c: c.execute(
                "SELECT c.metadata, c.model FROM clusterings c JOIN (SELECT name,"
                " max(version) AS version FROM clusterings GROUP BY name) l"
                " ON c.name = l.name AND c.version = l.version ORDER BY c.name"
            ).fetchall()
        )
        return [
            StoredClustering(clustering_pb2.Clustering.FromString(bytes(m)), json.loads(j))
            for m, j in rows
        ]


def _stored(row: sqlite3.Row | tuple[Any, ...]) -> StoredModel:
    metadata = model_pb2.ModelVersion.FromString(bytes(row[0]))
    metadata.champion = bool(row[3])
    return StoredModel(metadata, str(row[1]), json.loads(row[2]))
