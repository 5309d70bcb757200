"""Personal data prepared for ad platforms and exports: normalised, then SHA-256 hashed.

The platforms' matching rules (Google Customer Match, Meta custom audiences) agree on the
basics: an email is trimmed and lower-cased; a phone is in E.164 (``+`` country code and
number, no spaces or punctuation); anything else is trimmed and lower-cased. The digest is the
lowercase hex SHA-256 of the UTF-8 normalised text. One module, so that destinations and
export activators hash identically.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import phonenumbers

Kind = Literal["email", "phone", "other"]


def kind_of(name: str) -> Kind:
    """What a field holds, from its name or path (``identifiers.email``, ``traits.phone``)."""
    last = name.rsplit(".", 1)[-1].lower()
    if "email" in last or "e_mail" in last:
        return "email"
    if "phone" in last or "mobile" in last:
        return "phone"
    return "other"


def normalize_email(value: str) -> str:
    return value.strip().lower()


def normalize_phone(value: str, default_region: str | None = None) -> str | None:
    """E.164, or None when the text is not a possible phone number."""
    try:
        number = phonenumbers.parse(value.strip(), default_region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def normalized(kind: Kind, value: str, default_region: str | None = None) -> str | None:
    if kind == "email":
        return normalize_email(value) or None
    if kind == "phone":
        return normalize_phone(value, default_region)
    return value.strip().lower() or None


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hashed(kind: Kind, value: str, default_region: str | None = None) -> str | None:
    """The digest of the normalised value; None when it does not normalise (not a phone)."""
    text = normalized(kind, value, default_region)
    return None if text is None else sha256_hex(text)
