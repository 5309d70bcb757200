"""The ``audience_export`` activator: an add/remove audience file for ad platforms' uploads.

Each delivery becomes one row: ``action`` (``add`` for ``entered`` and ``sync``, ``remove`` for
``exited``), ``segment_id``, ``occurred_at``, then one column per ``hash_fields`` entry holding
the lowercase hex SHA-256 of the normalised value, then the ``fields`` copied as they are
(``country``, ``zip``: identifiers the platforms take in clear). With ``format: csv`` the rows
are appended to the CSV file ``path`` (with a header line); with ``format: parquet`` ``path`` is
a folder and each batch adds one Parquet file to it (``part-*.parquet``, all columns strings),
which pyarrow, DuckDB and Spark read as one table.

Normalisation before hashing, per the upload rules Google (Customer Match, enhanced
conversions) and Meta (custom audiences) publish:

- ``email``: leading and trailing whitespace removed, lower-cased. With
  ``gmail_remove_dots``, the dots of the part before the ``@`` are also removed for
  ``gmail.com`` and ``googlemail.com`` addresses, as Google's enhanced-conversions and Campaign
  Manager 360 guides ask (``j.doe@gmail.com`` -> ``jdoe@gmail.com``); Meta does not, so it is
  off by default. ``+tag`` suffixes are kept: no platform publishes a rule removing them.
- ``phone``: parsed with ``phonenumbers`` (``phone_region`` for numbers written without a
  country code), refused unless it is a valid number, then formatted as E.164
  (``+31612345678``, Google) or, with ``phone_format: digits``, as E.164 without the ``+``
  (``31612345678``, Meta's digits-only form with the country code).
- ``other``: whitespace trimmed and lower-cased (first and last names, for instance).

A value that is absent, null or cannot be normalised leaves its cell empty (and is logged, by
field name only); a delivery left with no hashed identifier at all is permanent, since it could
never be matched. Idempotent: the keys of the deliveries written are kept in a sidecar file
(``<path>.keys`` for CSV, ``<path>/_keys.txt`` for Parquet), written after the rows, so a
delivery already there is reported delivered without another row. A crash between the two
writes can leave a row that a retry writes once more: harmless for add and remove lists.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal, Self, TypeAlias

import phonenumbers
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from profilemesh.shared.extension_points import (
    Activator,
    Delivery,
    DeliveryOutcome,
    JSONValue,
)
from profilemesh.shared.hookspecs import hookimpl
from profilemesh.shared.pii import (
    PhoneFormat,
    normalise_email,
    normalise_other,
    normalise_phone,
    sha256_hex,
)

logger = logging.getLogger(__name__)

HashKind: TypeAlias = Literal["email", "phone", "other"]
"""How a hashed field is normalised before hashing."""

"""``e164`` (``+31612345678``, Google) or E.164 digits without the ``+`` (Meta)."""

FIXED_COLUMNS = ("action", "segment_id", "occurred_at")
"""The columns every row starts with, before the hashed and plain fields."""

Row: TypeAlias = dict[str, str | None]


class AudienceExportConfig(BaseModel):
    """Where the audience goes, in which format, and which fields it holds, hashed or not."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    path: Path
    """The CSV file, or the folder of Parquet files; missing parent folders are created."""
    format: Literal["csv", "parquet"] = "csv"
    """``csv`` (one file, appended) or ``parquet`` (one file per batch in the folder)."""
    hash_fields: dict[str, HashKind] = Field(min_length=1)
    """Delivery fields to hash, each with its kind: ``{"email": "email", "mobile": "phone"}``."""
    fields: list[str] = Field(default_factory=list)
    """Delivery fields copied unhashed (``country``, ``zip``)."""
    phone_region: str | None = Field(default=None, pattern=r"^[A-Z]{2}$")
    """ISO 3166 country (``NL``) of phone numbers written without a country code."""
    phone_format: PhoneFormat = "e164"
    """``e164`` for Google (``+31612345678``); ``digits`` for Meta (``31612345678``)."""
    gmail_remove_dots: bool = False
    """Drop the dots before ``@gmail.com`` and ``@googlemail.com`` (Google's rule, not Meta's)."""

    @field_validator("phone_region")
    @classmethod
    def _known_region(cls, region: str | None) -> str | None:
        if region is not None and region not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"{region} is not a region phonenumbers knows")
        return region

    @model_validator(mode="after")
    def _distinct_columns(self) -> Self:
        names = [*FIXED_COLUMNS, *self.hash_fields, *self.fields]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(
                f"column names must be distinct (the first three are {', '.join(FIXED_COLUMNS)}); "
                f"repeated: {', '.join(repeated)}"
            )
        return self

    @property
    def columns(self) -> list[str]:
        """The header: the fixed columns, the hashed fields, the plain fields."""
        return [*FIXED_COLUMNS, *self.hash_fields, *self.fields]


class _Unusable(Exception):
    """The export file cannot be appended to as it is; an operator has to look."""


class AudienceExportActivator(Activator):
    """Appends add/remove rows with hashed identifiers, each idempotency key at most once."""

    name = "audience_export"
    description = (
        "Appends add/remove rows with normalised, SHA-256-hashed emails and phones to a CSV or "
        "Parquet audience file for ad platforms."
    )
    config_model = AudienceExportConfig
    config: AudienceExportConfig

    def __init__(self, config: Mapping[str, object] | BaseModel) -> None:
        """Validate the configuration; the files are read on the first delivery."""
        super().__init__(config)
        self._written: set[str] | None = None
        # Concurrent deliver() calls must not interleave their appends or their key checks.
        self._lock = asyncio.Lock()

    async def deliver(self, deliveries: Sequence[Delivery]) -> list[DeliveryOutcome]:
        """Append a row for each delivery whose key is not in the sidecar yet; fsync both."""
        if not deliveries:
            return []
        async with self._lock:
            return await asyncio.to_thread(self._append, deliveries)

    def _append(self, deliveries: Sequence[Delivery]) -> list[DeliveryOutcome]:
        try:
            written = self._written_keys()
        except (OSError, _Unusable) as error:
            return [self._unwritable(error)] * len(deliveries)
        outcomes: dict[str, DeliveryOutcome] = {}
        rows: dict[str, Row] = {}  # By key: a key twice in one batch is one row.
        for delivery in deliveries:
            key = delivery.idempotency_key
            if key in written:
                outcomes[key] = DeliveryOutcome.delivered()
            elif key not in rows and key not in outcomes:
                row = self._row(delivery)
                if isinstance(row, DeliveryOutcome):
                    outcomes[key] = row
                else:
                    rows[key] = row
        if rows:
            try:
                self._write(list(rows.values()))
                _append_lines(self._sidecar(), list(rows))
            except OSError as error:
                failed = self._unwritable(error)
                outcomes.update(dict.fromkeys(rows, failed))
                return [outcomes[d.idempotency_key] for d in deliveries]
            written.update(rows)
            outcomes.update(dict.fromkeys(rows, DeliveryOutcome.delivered()))
        return [outcomes[d.idempotency_key] for d in deliveries]

    def _row(self, delivery: Delivery) -> Row | DeliveryOutcome:
        """The row for ``delivery``, or why it has none."""
        config = self.config
        row: Row = {
            "action": "remove" if delivery.transition == "exited" else "add",
            "segment_id": delivery.segment_id,
            "occurred_at": delivery.occurred_at.isoformat(),
        }
        unusable: list[str] = []
        for field, kind in config.hash_fields.items():
            value = delivery.fields.get(field)
            try:
                row[field] = None if value is None else self._hash(value, kind)
            except ValueError as error:
                row[field] = None
                unusable.append(f"{field} ({error})")
        if unusable:
            # Field names only: the values are personal data.
            logger.warning(
                "audience_export: %s: left empty: %s", delivery.idempotency_key, "; ".join(unusable)
            )
        if all(row[field] is None for field in config.hash_fields):
            absent = [f for f in config.hash_fields if delivery.fields.get(f) is None]
            reasons = unusable + [f"{field} (absent)" for field in absent]
            return DeliveryOutcome.permanent(
                "no identifier to match on: " + "; ".join(reasons or ["no hash_fields"])
            )
        try:
            for field in config.fields:
                row[field] = _text(delivery.fields.get(field))
        except (TypeError, ValueError) as error:
            return DeliveryOutcome.permanent(f"fields are not JSON: {error}")
        return row

    def _hash(self, value: JSONValue, kind: HashKind) -> str:
        config = self.config
        if kind == "email":
            if not isinstance(value, str):
                raise ValueError("not a string")
            return sha256_hex(normalise_email(value, gmail_remove_dots=config.gmail_remove_dots))
        if kind == "phone":
            if isinstance(value, bool) or not isinstance(value, str | int):
                raise ValueError("not a string or an integer")
            return sha256_hex(normalise_phone(str(value), config.phone_region, config.phone_format))
        if isinstance(value, Mapping) or (
            isinstance(value, Sequence) and not isinstance(value, str)
        ):
            raise ValueError("not a single value")
        text = normalise_other(_text(value) or "")
        if not text:
            raise ValueError("blank")
        return sha256_hex(text)

    def _written_keys(self) -> set[str]:
        if self._written is None:
            self._check_target()
            sidecar = self._sidecar()
            _drop_torn_tail(sidecar)
            keys: set[str] = set()
            if sidecar.exists():
                with sidecar.open(encoding="utf-8") as file:
                    keys.update(line.rstrip("\n") for line in file if line.strip())
            self._written = keys
        return self._written

    def _check_target(self) -> None:
        """Create the folders; refuse a CSV file whose header is not ours."""
        path = self.config.path
        if self.config.format == "parquet":
            path.mkdir(parents=True, exist_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(path)
        if not path.exists() or path.stat().st_size == 0:
            return
        with path.open(newline="", encoding="utf-8") as file:
            header = next(csv.reader(file), [])
        if header != self.config.columns:
            raise _Unusable(
                f"{path} has the columns {header}, not the configured {self.config.columns}: "
                "move it away or configure another path"
            )

    def _write(self, rows: list[Row]) -> None:
        if self.config.format == "csv":
            _append_csv(self.config.path, self.config.columns, rows)
        else:
            _write_parquet_part(self.config.path, self.config.columns, rows)

    def _sidecar(self) -> Path:
        path = self.config.path
        return (
            path / "_keys.txt"
            if self.config.format == "parquet"
            else path.with_name(path.name + ".keys")
        )

    def _unwritable(self, error: Exception) -> DeliveryOutcome:
        # A full disk, a permission or a foreign file fixed by an operator: retry, not dead-letter.
        return DeliveryOutcome.retryable(f"cannot append to {self.config.path}: {error}")


def _append_csv(path: Path, columns: list[str], rows: list[Row]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    with path.open("a+b") as file:
        if file.seek(0, os.SEEK_END) == 0:
            writer.writeheader()
        writer.writerows(rows)
        file.write(buffer.getvalue().encode("utf-8"))
        file.flush()
        os.fsync(file.fileno())


def _write_parquet_part(folder: Path, columns: list[str], rows: list[Row]) -> None:
    table = pa.table({name: pa.array([row[name] for row in rows], pa.string()) for name in columns})
    name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
    # Written under a dot name, which readers skip, then renamed: never a half file to read.
    temporary = folder / f".{name}.tmp"
    try:
        with temporary.open("wb") as file:
            pq.write_table(table, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, folder / name)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_folder(folder)


def _append_lines(path: Path, lines: list[str]) -> None:
    with path.open("a", encoding="utf-8") as file:
        file.write("".join(f"{line}\n" for line in lines))
        file.flush()
        os.fsync(file.fileno())


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line a crash left without its newline: it was never reported written."""
    if not path.exists():
        return
    with path.open("r+b") as file:
        size = file.seek(0, os.SEEK_END)
        if size == 0:
            return
        file.seek(-1, os.SEEK_END)
        if file.read(1) == b"\n":
            return
        file.seek(0)
        data = file.read()
        file.truncate(data.rfind(b"\n") + 1)
        file.flush()
        os.fsync(file.fileno())


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _text(value: JSONValue) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, allow_nan=False, default=_plain)


def _plain(value: object) -> object:
    # JSONValue allows any Mapping or Sequence; json only knows dict, list and tuple.
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return list(value)
    raise TypeError(f"{type(value).__name__} {value!r} is not JSON-serialisable")


@hookimpl
def register_activators(register: Callable[[type[Activator]], None]) -> None:
    """Register the ``audience_export`` activator."""
    register(AudienceExportActivator)
