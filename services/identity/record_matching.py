"""Probabilistic matching of customer records as they arrive on the event log.

A record that shares no identifier with any profile (it founded a new one) is compared with the
stored records that agree with it on a blocking key. Its best candidate at or above the match
threshold links the two records' ``crm_id`` nodes, with the match probability as the link's
evidence, so the graph's limits, merge records and unmerge apply to it like to any link.

Scoring needs a fitted model: m and u of every comparison level and the prior (lambda). EM
estimates them over the stored records once ``min_records`` exist, again each time their number
doubles, and whenever the matching settings change. The first fit also links the accepted pairs
among the records stored until then, so records that arrived before the model are not left out.

Everything lives in the identity store and is written in the consumer's transaction, so the
records, the blocking index, the model and the links they make commit with the log offset:

- ``match_records``: each record's anchor (its ``crm_id``) and its attributes, as JSON;
- ``match_blocks``: the blocking index, (rule, side, key) -> record. ``side`` is 1 for the
  right-hand keys of rules that compare different attributes (swapped names), else 0;
- ``match_model``: the fitted settings (m and u fixed, lambda set) and what they were fitted on.

Term frequency adjustments are left out online: they need the share of every value over all
records, which a single new record cannot give; the offline matcher keeps them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from profilemesh.identity.v1 import matching_pb2
from profilemesh.services.identity.identifiers import CRM_ID, Identifier
from profilemesh.services.identity.matching.api import LevelEstimate, MatchModel, match_records
from profilemesh.services.identity.matching.blocking import rule_keys
from profilemesh.services.identity.matching.defaults import DEFAULT
from profilemesh.services.identity.matching.proto import settings_from_proto
from profilemesh.services.identity.matching.records import load_records
from profilemesh.services.identity.matching.settings import BlockingRule, MatchSettings
from profilemesh.shared.errors import InvalidArgument

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS match_records (
    record INTEGER PRIMARY KEY,
    anchor TEXT NOT NULL UNIQUE,
    row TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS match_blocks (
    rule TEXT NOT NULL,
    side INTEGER NOT NULL,
    key TEXT NOT NULL,
    record INTEGER NOT NULL,
    PRIMARY KEY (rule, side, key, record)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS match_blocks_by_record ON match_blocks (record);
CREATE TABLE IF NOT EXISTS match_model (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    fingerprint TEXT NOT NULL,
    settings TEXT NOT NULL,
    records INTEGER NOT NULL,
    summary TEXT NOT NULL
);
"""

_ID = "anchor"
"""The id column of the rows given to :func:`match_records`: the record's crm_id."""

CANDIDATES_PER_KEY = 50
"""Most recent records read per blocking key: a key shared by more is too common to tell
people apart, and reading all of them would make one record's cost grow with the data."""


def settings_of(matching: matching_pb2.MatchingSettings | None) -> MatchSettings | None:
    """The settings online matching runs with, or ``None`` when it is off.

    Enabled settings without comparisons mean the built-in defaults with their threshold.
    """
    if matching is None or not matching.enabled:
        return None
    if not matching.comparisons:
        return DEFAULT.with_threshold(matching.match_threshold or DEFAULT.match_threshold)
    return settings_from_proto(matching, field="rules.matching")


def _fingerprint(settings: MatchSettings) -> str:
    """What identifies the settings a model was fitted for."""
    text = json.dumps(settings.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class IncomingRecord:
    """A record the resolver has linked deterministically, for the matcher to store."""

    anchor: Identifier
    """Its crm_id node."""
    attributes: Mapping[str, Any]
    identifiers: tuple[Identifier, ...]
    founded_profile: bool
    """Whether it shared no identifier with an existing profile (only those are matched)."""


@dataclass(frozen=True, slots=True)
class RecordMatch:
    """Two records the model says are one person."""

    anchor: Identifier
    other: Identifier
    probability: float


@dataclass(frozen=True, slots=True)
class FittedModel:
    """Settings with every level's m and u fixed and lambda set, and what they came from."""

    settings: MatchSettings
    fingerprint: str
    records: int
    """How many records were stored when it was fitted."""
    summary: MatchModel


def anchor_of(identifiers: Iterable[Identifier]) -> Identifier | None:
    """The crm_id among a record's identifiers: what probabilistic links attach to."""
    return next((i for i in identifiers if i.type == CRM_ID), None)


def _row(record: IncomingRecord) -> dict[str, Any]:
    identifiers: dict[str, str] = {}
    for identifier in record.identifiers:
        if identifier.type != CRM_ID:
            identifiers.setdefault(identifier.type, identifier.value)
    return {"attributes": dict(record.attributes), "identifiers": identifiers}


def _fitted(settings: MatchSettings, model: MatchModel) -> MatchSettings:
    """``settings`` with the model's estimates fixed, keeping only the comparisons it fitted."""
    comparisons = []
    for comparison in settings.comparisons:
        if comparison.name not in model.comparisons:
            continue
        levels = [
            level.model_copy(
                update={
                    "m_probability": model.level(comparison.name, level.label).m_probability,
                    "u_probability": model.level(comparison.name, level.label).u_probability,
                }
            )
            for level in comparison.levels
        ]
        comparisons.append(
            comparison.model_copy(
                update={"levels": tuple(levels), "term_frequency_adjustments": False}
            )
        )
    return MatchSettings.model_validate(
        {
            **settings.model_dump(),
            "comparisons": [c.model_dump() for c in comparisons],
            "probability_two_random_records_match": min(
                0.5, model.probability_two_random_records_match
            ),
        }
    )


class RecordMatcher:
    """Stores incoming records, fits the model, and finds each new record's best match."""

    def __init__(self, min_records: int = 1000) -> None:
        self.min_records = min_records
        self._model: FittedModel | None = None
        self._count = 0

    @staticmethod
    def schema() -> str:
        return SCHEMA

    def load(self, connection: sqlite3.Connection) -> None:
        """Read the record count and the fitted model (at start-up)."""
        self._count = int(connection.execute("SELECT count(*) FROM match_records").fetchone()[0])
        row = connection.execute(
            "SELECT fingerprint, settings, records, summary FROM match_model WHERE id = 1"
        ).fetchone()
        if row is not None:
            fingerprint, settings, records, summary = row
            self._model = FittedModel(
                MatchSettings.model_validate_json(settings),
                fingerprint,
                records,
                _summary_from_json(summary),
            )

    @property
    def model(self) -> FittedModel | None:
        """The model in use, if one was fitted."""
        return self._model

    def store(
        self, tx: sqlite3.Connection, records: Sequence[IncomingRecord], settings: MatchSettings
    ) -> None:
        """Keep ``records`` (replacing earlier versions of the same record) and index them."""
        if not records:
            return
        rows = [_row(r) for r in records]
        keys = _blocking_keys(settings.blocking_rules, rows, settings)
        for record, row, record_keys in zip(records, rows, keys, strict=True):
            anchor = record.anchor.key
            existing = tx.execute(
                "SELECT record FROM match_records WHERE anchor = ?", (anchor,)
            ).fetchone()
            if existing is None:
                cursor = tx.execute(
                    "INSERT INTO match_records (anchor, row) VALUES (?, ?)",
                    (anchor, json.dumps(row, separators=(",", ":"), default=str)),
                )
                number = cursor.lastrowid
                self._count += 1
            else:
                number = existing[0]
                tx.execute(
                    "UPDATE match_records SET row = ? WHERE record = ?",
                    (json.dumps(row, separators=(",", ":"), default=str), number),
                )
                tx.execute("DELETE FROM match_blocks WHERE record = ?", (number,))
            tx.executemany(
                "INSERT OR IGNORE INTO match_blocks (rule, side, key, record) VALUES (?, ?, ?, ?)",
                [(rule, side, key, number) for rule, side, key in record_keys],
            )

    def match(
        self, tx: sqlite3.Connection, records: Sequence[IncomingRecord], settings: MatchSettings
    ) -> list[RecordMatch]:
        """Each founding record's best stored match at or above the threshold, best first.

        ``records`` must be stored already (so that records of one batch find each other).
        """
        model = self._model
        founders = [r for r in records if r.founded_profile]
        if model is None or not founders or model.fingerprint != _fingerprint(settings):
            return []
        rows = [_row(r) for r in founders]
        keys = _blocking_keys(model.settings.blocking_rules, rows, model.settings)
        crossed = {rule.name for rule in model.settings.blocking_rules if _is_crossed(rule)}
        candidates: dict[str, dict[str, Any]] = {}
        for record, row, record_keys in zip(founders, rows, keys, strict=True):
            candidates[record.anchor.key] = row
            for rule, side, key in record_keys:
                # A crossed rule pairs one record's left keys with the other's right keys.
                wanted = 1 - side if rule in crossed else side
                for anchor, text in tx.execute(
                    "SELECT r.anchor, r.row FROM match_blocks b JOIN match_records r"
                    " ON r.record = b.record WHERE b.rule = ? AND b.side = ? AND b.key = ?"
                    " ORDER BY b.record DESC LIMIT ?",
                    (rule, wanted, key, CANDIDATES_PER_KEY),
                ):
                    candidates.setdefault(anchor, json.loads(text))
        if len(candidates) < 2:
            return []
        table = [{_ID: anchor, **row} for anchor, row in candidates.items()]
        try:
            result = match_records(table, settings=model.settings, id_column=_ID)
        except InvalidArgument:
            return []  # the records lack every compared attribute or blocking key
        founding = {r.anchor.key for r in founders}
        best: dict[str, RecordMatch] = {}
        for pair in result.pairs:  # most probable first
            for mine, other in (
                (pair.left.record_id, pair.right.record_id),
                (pair.right.record_id, pair.left.record_id),
            ):
                if mine in founding and mine not in best:
                    best[mine] = RecordMatch(
                        Identifier.parse(mine), Identifier.parse(other), pair.match_probability
                    )
        return sorted(best.values(), key=lambda m: -m.probability)

    @staticmethod
    def forget(tx: sqlite3.Connection, anchors: Iterable[Identifier]) -> None:
        """Remove a deleted person's records and their blocking keys (names, emails...)."""
        keys = [(anchor.key,) for anchor in anchors]
        tx.executemany(
            "DELETE FROM match_blocks WHERE record IN"
            " (SELECT record FROM match_records WHERE anchor = ?)",
            keys,
        )
        tx.executemany("DELETE FROM match_records WHERE anchor = ?", keys)

    def refit_if_due(self, tx: sqlite3.Connection, settings: MatchSettings) -> list[RecordMatch]:
        """Fit the model when it is due; on the first fit (or after the settings changed),
        the accepted pairs among all stored records, for the caller to link."""
        model = self._model
        fingerprint = _fingerprint(settings)
        stale = model is None or model.fingerprint != fingerprint
        if self._count < self.min_records or not (stale or self._count >= 2 * model.records):  # type: ignore[union-attr]
            return []
        rows = [
            {_ID: anchor, **json.loads(text)}
            for anchor, text in tx.execute("SELECT anchor, row FROM match_records")
        ]
        try:
            result = match_records(rows, settings=settings, id_column=_ID)
        except InvalidArgument as error:
            log.warning("record matching model not fitted: %s", error)
            return []
        fitted = FittedModel(_fitted(settings, result.model), fingerprint, len(rows), result.model)
        tx.execute(
            "INSERT OR REPLACE INTO match_model (id, fingerprint, settings, records, summary)"
            " VALUES (1, ?, ?, ?, ?)",
            (
                fingerprint,
                fitted.settings.model_dump_json(),
                fitted.records,
                _summary_to_json(result.model),
            ),
        )
        self._model = fitted
        log.info(
            "record matching model fitted on %d records (%d EM iterations, lambda %.3g)",
            len(rows),
            result.model.em_iterations,
            result.model.probability_two_random_records_match,
        )
        if not stale:
            return []
        return [
            RecordMatch(
                Identifier.parse(pair.left.record_id),
                Identifier.parse(pair.right.record_id),
                pair.match_probability,
            )
            for pair in result.pairs
        ]


def _is_crossed(rule: BlockingRule) -> bool:
    return any(key.other_attribute for key in rule.keys)


def _blocking_keys(
    rules: Sequence[BlockingRule], rows: list[dict[str, Any]], settings: MatchSettings
) -> list[list[tuple[str, int, str]]]:
    """Per row, its (rule, side, key) entries of the blocking index."""
    table = [{_ID: str(position), **row} for position, row in enumerate(rows)]
    records = load_records(table, id_column=_ID, source="records", aliases=settings.aliases)
    found: list[list[tuple[str, int, str]]] = [[] for _ in rows]
    for rule in rules:
        sides = (0, 1) if _is_crossed(rule) else (0,)
        for side in sides:
            for position, key in enumerate(rule_keys(rule, records, right_side=side == 1)):
                if key is not None:
                    found[position].append((rule.name, side, key))
    return found


def _summary_to_json(model: MatchModel) -> str:
    return json.dumps(asdict(model))


def _summary_from_json(text: str) -> MatchModel:
    document = json.loads(text)
    document["levels"] = tuple(LevelEstimate(**level) for level in document["levels"])
    for name in ("comparisons", "blocking_rules", "skipped"):
        document[name] = tuple(document[name])
    return MatchModel(**document)
