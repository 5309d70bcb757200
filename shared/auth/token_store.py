"""The API tokens the mesh accepts, kept by the identity service in its ``tokens`` store.

On the embedded backend that is one SQLite file (``<data_dir>/identity/tokens.sqlite``); on the
``postgres`` backend the schema ``profilemesh_identity_tokens``, shared by identity's replicas
and outliving its pods. The store keeps each token's SHA-256, never the token: a copy of the
data gives no usable token. SQLite's ``secure_delete`` overwrites freed pages, so nothing of a
removed row lingers in the file. Identity verifies its callers against the store directly, so a
revocation takes effect there at once (in every replica); ``profilemesh tokens --offline``
writes it before anything runs (WAL lets both use the file at the same time).
"""

from __future__ import annotations

import enum
import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from profilemesh.shared.auth.caller import Caller
from profilemesh.shared.auth.scopes import ADMIN, unknown_scopes
from profilemesh.shared.auth.tokens import digests_match, generate_token, token_digest, token_id_of
from profilemesh.shared.errors import FailedPrecondition, InvalidArgument, NotFound
from profilemesh.shared.log import stores
from profilemesh.shared.log.sqlite_store import SqliteConsumerStore
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
    """Where identity keeps the tokens on the embedded backend:
    ``<data_dir>/identity/tokens.sqlite``."""
    return settings.service_data_dir("identity") / "tokens.sqlite"


def token_store(settings: Settings, *, clock: Callable[[], float] = time.time) -> TokenStore:
    """Identity's token store on the backend ``settings`` choose (not opened yet)."""
    return TokenStore(lambda: stores.open_store(settings, "identity", "tokens"), clock=clock)


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
    """Create, revoke, list and check API tokens. Safe to use from several threads, and from
    several processes sharing the backing store.

    ``source`` is a SQLite file, or how to open the backing consumer store
    (:func:`token_store` opens the one the settings choose); it is opened by :meth:`open`.
    """

    def __init__(
        self,
        source: Path | Callable[[], SqliteConsumerStore],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._source = source
        self._clock = clock
        self._store: SqliteConsumerStore | None = None

    def open(self) -> TokenStore:
        """Open the backing store and create the table when missing; returns the store."""
        source = self._source
        if isinstance(source, Path):
            source.parent.mkdir(parents=True, exist_ok=True)
            store = SqliteConsumerStore(source)
        else:
            store = source()
        try:
            store.schema(_SCHEMA)
        except BaseException:
            store.close()
            raise
        self._store = store
        return self

    def close(self) -> None:
        """Close the backing store."""
        store, self._store = self._store, None
        if store is not None:
            store.close()

    def __enter__(self) -> TokenStore:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _backing(self) -> SqliteConsumerStore:
        if self._store is None:
            raise FailedPrecondition("the token store is not open")
        return self._store

    def _row(self, token_id: str) -> Any:
        return self._backing().read(
            lambda c: c.execute(_SELECT + " WHERE token_id = ?", (token_id,)).fetchone()
        )

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
        # One transaction: replicas starting together with the same token add it once.
        with self._backing().transaction() as tx:
            row = tx.execute(_SELECT + " WHERE token_id = ?", (token_id,)).fetchone()
            if row is not None:
                if not digests_match(row[6], token_digest(token)):
                    raise FailedPrecondition(f"another token has the id {token_id}")
                return _record(row)
            record = TokenRecord(token_id, name, tuple(scopes), self._clock())
            _insert(tx, record, token_digest(token))
        return record

    def _insert(self, record: TokenRecord, digest: str) -> None:
        with self._backing().transaction() as tx:
            _insert(tx, record, digest)

    def revoke(self, token_id: str) -> TokenRecord:
        """Revoke a token (again: a no-op); :class:`NotFound` for an unknown id."""
        with self._backing().transaction() as tx:
            tx.execute(
                "UPDATE api_tokens SET revoked_at = ? WHERE token_id = ? AND revoked_at IS NULL",
                (self._clock(), token_id),
            )
            row = tx.execute(_SELECT + " WHERE token_id = ?", (token_id,)).fetchone()
        if row is None:
            raise NotFound(f"no token {token_id!r}", violations=[("token_id", "unknown token")])
        return _record(row)

    def tokens(self, *, include_inactive: bool = False) -> list[TokenRecord]:
        """The tokens, newest first; only usable ones unless ``include_inactive``."""
        rows = self._backing().read(
            lambda c: c.execute(_SELECT + " ORDER BY created_at DESC").fetchall()
        )
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
        row = self._row(token_id)
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


def _insert(tx: sqlite3.Connection, record: TokenRecord, digest: str) -> None:
    tx.execute(
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


def _record(row: Any) -> TokenRecord:
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
