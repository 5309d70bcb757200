"""The model registry: every trained version with what it needs to serve and to be judged.

A version is its ``ModelVersion`` message (definition, feature schema, data window, metrics,
baseline, importances) plus its artefacts: the LightGBM text model and the calibrator. Versions
are numbered per model; promotion to champion is explicit and exclusive. Clusterings are
versioned the same way. Everything lives in one SQLite file next to the service's log.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from profilemesh.scoring.v1 import clustering_pb2, model_pb2
from profilemesh.shared.errors import FailedPrecondition, InvalidArgument, NotFound

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
    """Model versions and clusterings in one SQLite file; safe to call from several threads."""

    def __init__(self, path: Path) -> None:
        self._connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.execute("PRAGMA synchronous=FULL")
        self._connection.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    # -- models -------------------------------------------------------------------------------

    def register(
        self, metadata: model_pb2.ModelVersion, booster_text: str, calibration: dict[str, Any]
    ) -> model_pb2.ModelVersion:
        """Store a new version of ``metadata.model`` (numbered here) and return it. The first
        version of a model becomes its champion; later ones wait for a promotion."""
        with self._lock:
            connection = self._connection
            connection.execute("BEGIN IMMEDIATE")
            try:
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
                    "INSERT INTO model_versions VALUES (?, ?, ?, ?, ?, ?, ?)",
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
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
        return stored

    def kind_of(self, model: str) -> int | None:
        with self._lock:
            row = self._connection.execute(
                "SELECT kind FROM model_versions WHERE model = ? LIMIT 1", (model,)
            ).fetchone()
        return None if row is None else int(row[0])

    def get(self, model: str, version: str = "") -> StoredModel:
        """A version (the champion when ``version`` is empty); NotFound otherwise."""
        with self._lock:
            if version:
                if not version.isdigit():
                    raise InvalidArgument.for_field("version", "versions are whole numbers")
                row = self._connection.execute(
                    "SELECT metadata, booster, calibration, champion FROM model_versions"
                    " WHERE model = ? AND version = ?",
                    (model, int(version)),
                ).fetchone()
            else:
                row = self._connection.execute(
                    "SELECT metadata, booster, calibration, champion FROM model_versions"
                    " WHERE model = ? AND champion = 1",
                    (model,),
                ).fetchone()
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
        with self._lock:
            rows = self._connection.execute(query, arguments).fetchall()
        found = []
        for metadata, champion in rows:
            message = model_pb2.ModelVersion.FromString(metadata)
            message.champion = bool(champion)
            found.append(message)
        return found

    def champions(self) -> list[StoredModel]:
        with self._lock:
            rows = self._connection.execute(
                "SELECT metadata, booster, calibration, champion FROM model_versions"
                " WHERE champion = 1 ORDER BY model"
            ).fetchall()
        return [_stored(row) for row in rows]

    def promote(self, model: str, version: str) -> tuple[model_pb2.ModelVersion, str]:
        """Make ``version`` the champion; the new champion and the previous one's version."""
        stored = self.get(model, version)
        if stored.metadata.state != model_pb2.MODEL_STATE_READY:
            raise FailedPrecondition(
                "only a READY version can be promoted", violations=[("version", "not ready")]
            )
        with self._lock:
            connection = self._connection
            connection.execute("BEGIN IMMEDIATE")
            try:
                row = connection.execute(
                    "SELECT version FROM model_versions WHERE model = ? AND champion = 1",
                    (model,),
                ).fetchone()
                connection.execute(
                    "UPDATE model_versions SET champion = (version = ?) WHERE model = ?",
                    (int(version), model),
                )
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
        promoted = model_pb2.ModelVersion()
        promoted.CopyFrom(stored.metadata)
        promoted.champion = True
        return promoted, "" if row is None or str(row[0]) == version else str(row[0])

    # -- clusterings ------------------------------------------------------------------------

    def register_clustering(
        self, metadata: clustering_pb2.Clustering, model: dict[str, Any]
    ) -> clustering_pb2.Clustering:
        with self._lock:
            connection = self._connection
            connection.execute("BEGIN IMMEDIATE")
            try:
                [(latest,)] = connection.execute(
                    "SELECT coalesce(max(version), 0) FROM clusterings WHERE name = ?",
                    (metadata.name,),
                ).fetchall()
                stored = clustering_pb2.Clustering()
                stored.CopyFrom(metadata)
                stored.version = str(latest + 1)
                connection.execute(
                    "INSERT INTO clusterings VALUES (?, ?, ?, ?)",
                    (stored.name, latest + 1, stored.SerializeToString(), json.dumps(model)),
                )
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
        return stored

    def clustering(self, name: str, version: str = "") -> StoredClustering:
        with self._lock:
            if version:
                if not version.isdigit():
                    raise InvalidArgument.for_field("version", "versions are whole numbers")
                row = self._connection.execute(
                    "SELECT metadata, model FROM clusterings WHERE name = ? AND version = ?",
                    (name, int(version)),
                ).fetchone()
            else:
                row = self._connection.execute(
                    "SELECT metadata, model FROM clusterings WHERE name = ?"
                    " ORDER BY version DESC LIMIT 1",
                    (name,),
                ).fetchone()
        if row is None:
            raise NotFound(f"no clustering {name!r}", violations=[("name", "unknown")])
        return StoredClustering(clustering_pb2.Clustering.FromString(row[0]), json.loads(row[1]))

    def latest_clusterings(self) -> list[StoredClustering]:
        """The latest version of every clustering (what profiles are assigned to)."""
        with self._lock:
            rows = self._connection.execute(
                "SELECT c.metadata, c.model FROM clusterings c JOIN (SELECT name,"
                " max(version) AS version FROM clusterings GROUP BY name) l"
                " ON c.name = l.name AND c.version = l.version ORDER BY c.name"
            ).fetchall()
        return [
            StoredClustering(clustering_pb2.Clustering.FromString(m), json.loads(j))
            for m, j in rows
        ]


def _stored(row: tuple[bytes, str, str, int]) -> StoredModel:
    metadata = model_pb2.ModelVersion.FromString(row[0])
    metadata.champion = bool(row[3])
    return StoredModel(metadata, row[1], json.loads(row[2]))
