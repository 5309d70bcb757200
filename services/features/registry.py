"""The feature definitions in force: built-ins, the definitions file, and those created by RPC.

Definitions are versioned: creating a definition under an existing name adds the next version,
which replaces the previous one for computing (the streaming state keeps one aggregate per
source, so only the latest version of a name is computed). A new version is BACKFILLING until
its backfill has recomputed every profile from the event store; online reads leave it out
until then, so nobody reads a half-computed value.

Stored in the consumer's SQLite store as the model's JSON (the message has no field for
``hidden``).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from profilemesh.features.v1 import feature_definition_pb2 as pb
from profilemesh.services.features.definitions import (
    BUILTINS,
    FeatureDefinition,
    FeatureSet,
    definition_to_proto,
    load_definitions,
)
from profilemesh.shared.errors import FailedPrecondition, InvalidArgument, NotFound

SCHEMA = """
CREATE TABLE IF NOT EXISTS feature_definitions (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    definition TEXT NOT NULL,
    state TEXT NOT NULL,
    create_time INTEGER NOT NULL,
    PRIMARY KEY (name, version)
) WITHOUT ROWID;
"""

ACTIVE = "ACTIVE"
BACKFILLING = "BACKFILLING"
_STATES = {ACTIVE: pb.FEATURE_STATE_ACTIVE, BACKFILLING: pb.FEATURE_STATE_BACKFILLING}


class _Stored:
    __slots__ = ("create_time", "definition", "state")

    def __init__(self, definition: FeatureDefinition, state: str, create_time: int) -> None:
        self.definition = definition
        self.state = state
        self.create_time = create_time


class Registry:
    """Definitions by (name, version), and the :class:`FeatureSet` they make."""

    def __init__(self) -> None:
        self._stored: dict[tuple[str, int], _Stored] = {}
        self.feature_set = FeatureSet()

    @staticmethod
    def schema() -> str:
        return SCHEMA

    def load(self, connection: sqlite3.Connection, definitions_file: Path | None) -> None:
        """Read the stored definitions; at the very first start, those of ``definitions_file``
        (active at once: there are no events yet to backfill)."""
        rows = connection.execute(
            "SELECT definition, state, create_time FROM feature_definitions"
        ).fetchall()
        if not rows and definitions_file is not None:
            now = time.time_ns()
            for definition in load_definitions(definitions_file):
                self._stored[(definition.name, definition.version)] = _Stored(
                    definition, ACTIVE, now
                )
                self._insert(connection, self._stored[(definition.name, definition.version)])
        for text, state, create_time in rows:
            definition = FeatureDefinition.model_validate_json(text)
            self._stored[(definition.name, definition.version)] = _Stored(
                definition, state, create_time
            )
        self.feature_set = FeatureSet(s.definition for s in self._stored.values())

    @staticmethod
    def _insert(tx: sqlite3.Connection, stored: _Stored) -> None:
        definition = stored.definition
        tx.execute(
            "INSERT OR REPLACE INTO feature_definitions VALUES (?, ?, ?, ?, ?)",
            (
                definition.name,
                definition.version,
                definition.model_dump_json(),
                stored.state,
                stored.create_time,
            ),
        )

    # -- reading ------------------------------------------------------------------------------

    def _latest_version(self, name: str) -> int:
        versions = [v for (n, v) in self._stored if n == name]
        versions += [d.version for d in BUILTINS if d.name == name]
        return max(versions, default=0)

    def _state(self, definition: FeatureDefinition) -> str:
        stored = self._stored.get((definition.name, definition.version))
        return ACTIVE if stored is None else stored.state

    def stored_definitions(self) -> list[FeatureDefinition]:
        """The definitions created by RPC or file (every version), besides the built-ins."""
        return [s.definition for s in self._stored.values()]

    def backfilling(self) -> list[str]:
        """Names whose latest version waits for its backfill."""
        return [d.name for d in self.feature_set if self._state(d) == BACKFILLING]

    def served_names(self, names: Sequence[str], *, at_least_one: bool = False) -> list[str]:
        """The features a read asks for (``name`` or ``name@version``, every served one when
        empty), checked: :class:`InvalidArgument` naming ``feature_names[i]``."""
        if not names:
            if at_least_one:
                raise InvalidArgument.for_field("feature_names", "name at least one feature")
            return [d.name for d in self.feature_set.visible if self._state(d) == ACTIVE]
        served = []
        for index, requested in enumerate(names):
            name, _, version = requested.partition("@")
            field = f"feature_names[{index}]"
            if name not in self.feature_set:
                raise InvalidArgument.for_field(field, f"no feature named {name!r}")
            definition = self.feature_set[name]
            if version and version != str(definition.version):
                raise InvalidArgument.for_field(
                    field,
                    f"only the latest version of {name!r} ({definition.version}) is computed",
                )
            if self._state(definition) != ACTIVE:
                raise FailedPrecondition(
                    f"{name!r} is being backfilled; it is served once the backfill ends",
                    violations=[(field, "backfilling")],
                )
            served.append(name)
        return served

    def to_proto(self, definition: FeatureDefinition) -> pb.FeatureDefinition:
        message = definition_to_proto(definition)
        stored = self._stored.get((definition.name, definition.version))
        message.state = _STATES[stored.state if stored else ACTIVE]
        if stored is not None:
            message.create_time.FromNanoseconds(stored.create_time)
        return message

    def get(self, name: str, version: int = 0) -> FeatureDefinition:
        """A definition by name (latest version when ``version`` is 0)."""
        if version:
            stored = self._stored.get((name, version))
            if stored is not None:
                return stored.definition
            builtin = next((d for d in BUILTINS if d.name == name and d.version == version), None)
            if builtin is not None:
                return builtin
        elif name in self.feature_set:
            return self.feature_set[name]
        raise NotFound(
            f"no feature definition {name!r}" + (f" version {version}" if version else ""),
            violations=[("name", "unknown")],
        )

    def all_definitions(self, all_versions: bool) -> list[FeatureDefinition]:
        """Every definition, by name then version (only the latest ones unless asked)."""
        if not all_versions:
            return sorted(self.feature_set.definitions, key=lambda d: d.name)
        every = {(d.name, d.version): d for d in BUILTINS}
        every.update({key: s.definition for key, s in self._stored.items()})
        return [every[key] for key in sorted(every)]

    # -- changing, under the domain's lock and in a store transaction ----------------------------

    def create(self, tx: sqlite3.Connection, definition: FeatureDefinition) -> FeatureDefinition:
        """Store ``definition`` as the next version of its name, BACKFILLING."""
        version = self._latest_version(definition.name) + 1
        created = definition.model_copy(update={"version": version, "builtin": False})
        stored = _Stored(created, BACKFILLING, time.time_ns())
        candidates = {**self._stored, (created.name, version): stored}
        # Checks the definitions as a whole: unknown or cyclic references fail here.
        feature_set = FeatureSet(s.definition for s in candidates.values())
        self._insert(tx, stored)
        self._stored[(created.name, version)] = stored
        self.feature_set = feature_set
        return created

    def delete(self, tx: sqlite3.Connection, name: str, version: int) -> None:
        """Remove one version (or all with 0) of a definition created by RPC or file."""
        if any(d.name == name for d in BUILTINS) and not any(n == name for n, _ in self._stored):
            raise FailedPrecondition(
                f"{name!r} is built in and cannot be deleted", violations=[("name", "built in")]
            )
        keys = [k for k in self._stored if k[0] == name and (not version or k[1] == version)]
        if not keys:
            raise NotFound(f"no feature definition {name!r}", violations=[("name", "unknown")])
        remaining = {k: s for k, s in self._stored.items() if k not in keys}
        feature_set = FeatureSet(s.definition for s in remaining.values())  # still consistent?
        for key in keys:
            tx.execute("DELETE FROM feature_definitions WHERE name = ? AND version = ?", key)
        self._stored = remaining
        self.feature_set = feature_set

    def activate(self, tx: sqlite3.Connection, names: Sequence[str]) -> None:
        """The backfill of ``names`` finished: serve their latest versions."""
        for name in names:
            if name not in self.feature_set:
                continue
            definition = self.feature_set[name]
            stored = self._stored.get((name, definition.version))
            if stored is not None and stored.state != ACTIVE:
                stored.state = ACTIVE
                self._insert(tx, stored)
