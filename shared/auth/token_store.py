"""The API tokens the mesh accepts, kept by the identity service in one SQLite file.

The store keeps each token's SHA-256, never the token: a copy of the file gives no usable
token. ``secure_delete`` overwrites freed pages, so nothing of a removed row lingers on disk.
Identity verifies its callers against this file directly, so a revocation takes effect there
at once; ``profilemesh tokens --offline`` writes it before anything runs (WAL lets both use it
at the same time).
"""

from __future__ import annotations

import enum
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from profilemesh.shared.auth.caller import Caller
from profilemesh.shared.auth.scopes import ADMIN, unknown_scopes
from profilemesh.shared.auth.tokens import digests_match, generate_token, token_digest, token_id_of
from profilemesh.shared.errors import FailedPrecondition, InvalidArgument, NotFound
from profilemesh.shared.settings import Settings

BOOTSTRAP_NAME = "bootstrap"
"""Name of the token the ``auth.bootstrap_token`` setting makes identity accept."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_tokens (
    token_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    scopes TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL,
    expires_at REAL
) WITHOUT ROWID;
"""


def token_store_path(settings: Settings) -> Path:
    """Where identity keeps the tokens: ``<data_dir>/identity/tokens.sqlite``."""
    return settings.service_data_dir("identity") / "tokens.sqlite"


class TokenStatus(enum.Enum):
    """Whether a presented token may be used, or why not."""

    VALID = "valid"
    MALFORMED = "malformed"
    UNKNOWN = "unknown"
    REVOKED = "revoked"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """What the store knows about one token (never the token itself)."""

    token_id: str
    name: str
    scopes: tuple[str, ...]
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None

    def caller(self) -> Caller:
        """The caller a holder of this token is."""
        return Caller(self.token_id, self.name, frozenset(self.scopes))


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of checking a token: its status, and its record when it is known."""

    status: TokenStatus
    record: TokenRecord | None = None


class TokenStore:
    """Create, revoke, list and check API tokens. Safe to use from several threads."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def open(self) -> TokenStore:
        """Create the file and its table when missing; returns the store."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA secure_delete=ON")
        db.execute("PRAGMA busy_timeout=5000")
        db.executescript(_SCHEMA)
        self._db = db
        return self

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> TokenStore:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise FailedPrecondition("the token store is not open")
        return self._db

    def create(
        self, name: str, scopes: Sequence[str], *, ttl_seconds: float | None = None
    ) -> tuple[str, TokenRecord]:
        """A new token for ``name`` with ``scopes``; returns the token (shown only now) and
        its record."""
        _check_new(name, scopes, ttl_seconds)
        token = generate_token()
        token_id = token_id_of(token)
        assert token_id is not None
        now = self._clock()
        record = TokenRecord(
            token_id=token_id,
            name=name.strip(),
            scopes=tuple(dict.fromkeys(scopes)),
            created_at=now,
            expires_at=None if ttl_seconds is None else now + ttl_seconds,
        )
        self._insert(record, token_digest(token))
        return token, record

    def ensure(self, token: str, name: str, scopes: Sequence[str]) -> TokenRecord:
        """Make sure ``token`` (made elsewhere, e.g. a bootstrap token from a secret) is known;
        a known token keeps its record, even when revoked: a revocation is never undone."""
        token_id = token_id_of(token)
        if token_id is None:
            raise InvalidArgument("the token is not of the form pm_<token_id>_<secret>")
        _check_new(name, scopes, None)
        with self._lock:
            row = self._conn().execute(_SELECT + " WHERE token_id = ?", (token_id,)).fetchone()
        if row is not None:
            if not digests_match(row[6], token_digest(token)):
                raise FailedPrecondition(f"another token has the id {token_id}")
            return _record(row)
        record = TokenRecord(token_id, name, tuple(scopes), self._clock())
        self._insert(record, token_digest(token))
        return record

    def _insert(self, record: TokenRecord, digest: str) -> None:
        with self._lock:
            self._conn().execute(
                "INSERT INTO api_tokens (token_id, name, scopes, sha256, created_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    record.token_id,
                    record.name,
                    json.dumps(list(record.scopes)),
                    digest,
                    record.created_at,
                    record.expires_at,
                ),
            )

    def revoke(self, token_id: str) -> TokenRecord:
        """Revoke a token (again: a no-op); :class:`NotFound` for an unknown id."""
        with self._lock:
            db = self._conn()
            db.execute(
                "UPDATE api_tokens SET revoked_at = ? WHERE token_id = ? AND revoked_at IS NULL",
                (self._clock(), token_id),
            )
            row = db.execute(_SELECT + " WHERE token_id = ?", (token_id,)).fetchone()
        if row is None:
            raise NotFound(f"no token {token_id!r}", violations=[("token_id", "unknown token")])
        return _record(row)

    def tokens(self, *, include_inactive: bool = False) -> list[TokenRecord]:
        """The tokens, newest first; only usable ones unless ``include_inactive``."""
        with self._lock:
            rows = self._conn().execute(_SELECT + " ORDER BY created_at DESC").fetchall()
        records = [_record(row) for row in rows]
        if include_inactive:
            return records
        now = self._clock()
        return [r for r in records if r.revoked_at is None and not _expired(r, now)]

    def check(self, token: str) -> Verdict:
        """Whether ``token`` may be used, and whose it is."""
        token_id = token_id_of(token)
        if token_id is None:
            return Verdict(TokenStatus.MALFORMED)
        with self._lock:
            row = self._conn().execute(_SELECT + " WHERE token_id = ?", (token_id,)).fetchone()
        # The digest is computed even for an unknown id, so timing does not tell ids apart.
        digest = token_digest(token)
        if row is None or not digests_match(row[6], digest):
            return Verdict(TokenStatus.UNKNOWN)
        record = _record(row)
        if record.revoked_at is not None:
            return Verdict(TokenStatus.REVOKED, record)
        if _expired(record, self._clock()):
            return Verdict(TokenStatus.EXPIRED, record)
        return Verdict(TokenStatus.VALID, record)


_SELECT = (
    "SELECT token_id, name, scopes, created_at, expires_at, revoked_at, sha256 FROM api_tokens"
)


def _record(row: tuple[Any, ...]) -> TokenRecord:
    token_id, name, scopes, created_at, expires_at, revoked_at, _ = row
    return TokenRecord(
        token_id=str(token_id),
        name=str(name),
        scopes=tuple(json.loads(str(scopes))),
        created_at=float(created_at),
        expires_at=None if expires_at is None else float(expires_at),
        revoked_at=None if revoked_at is None else float(revoked_at),
    )


def _expired(record: TokenRecord, now: float) -> bool:
    return record.expires_at is not None and record.expires_at <= now


def _check_new(name: str, scopes: Sequence[str], ttl_seconds: float | None) -> None:
    if not name.strip():
        raise InvalidArgument.for_field("name", "a name saying who holds the token is required")
    if not scopes:
        raise InvalidArgument.for_field("scopes", f"at least one scope is required, e.g. {ADMIN}")
    unknown = unknown_scopes(scopes)
    if unknown:
        raise InvalidArgument.for_field("scopes", f"unknown scopes: {', '.join(unknown)}")
    if ttl_seconds is not None and ttl_seconds <= 0:
        raise InvalidArgument.for_field("ttl", "must be positive")
