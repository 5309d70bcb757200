"""API tokens: their format, how they are made and how they are compared.

A token is ``pm_<token_id>_<secret>``. The id (16 hex digits) names the token in the store, in
audit entries and on the command line without giving anything away; the secret is 32 random
bytes in urlsafe base64. Only the SHA-256 of the whole token is stored, so a copy of the store
holds no usable token, and digests are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

PREFIX = "pm"
SECRET_BYTES = 32
_ID_LENGTH = 16
_HEX = frozenset("0123456789abcdef")


def generate_token() -> str:
    """A new random token, ``pm_<token_id>_<secret>``."""
    token_id = secrets.token_hex(_ID_LENGTH // 2)
    return f"{PREFIX}_{token_id}_{secrets.token_urlsafe(SECRET_BYTES)}"


def token_id_of(token: str) -> str | None:
    """The id part of ``token``, or None when it is not of the form ``pm_<id>_<secret>``."""
    # The secret is urlsafe base64, which may itself contain "_": split twice only.
    parts = token.split("_", 2)
    if len(parts) != 3:
        return None
    prefix, token_id, secret = parts
    if prefix != PREFIX or len(token_id) != _ID_LENGTH or not set(token_id) <= _HEX:
        return None
    if len(secret) < SECRET_BYTES:
        return None
    return token_id


def token_digest(token: str) -> str:
    """The hex SHA-256 of the whole token: what the store keeps, and the key caches use."""
    return hashlib.sha256(token.encode()).hexdigest()


def digests_match(expected: str, actual: str) -> bool:
    """Whether two digests are equal, in time that does not depend on where they differ."""
    return hmac.compare_digest(expected.encode(), actual.encode())
