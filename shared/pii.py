"""Personal data prepared for ad platforms and exports: normalised, then SHA-256 hashed.

The platforms' matching rules (Google Customer Match, Meta custom audiences) agree on the
basics: an email is trimmed and lower-cased; a phone is in E.164 (``+`` country code and
number, no spaces or punctuation); anything else is trimmed and lower-cased. The digest is the
lowercase hex SHA-256 of the UTF-8 normalised text. One module, so that destinations' hashed
mappings and the audience export activator hash identically.
"""

from __future__ import annotations

import hashlib
from typing import Literal, TypeAlias

import phonenumbers

Kind: TypeAlias = Literal["email", "phone", "other"]
PhoneFormat: TypeAlias = Literal["e164", "digits"]
"""``e164`` (``+31612345678``, Google) or the digits alone (``31612345678``, Meta)."""

_GMAIL_DOMAINS = frozenset({"gmail.com", "googlemail.com"})


def kind_of(name: str) -> Kind:
    """What a field holds, from its name or path (``identifiers.email``, ``traits.phone``)."""
    last = name.rsplit(".", 1)[-1].lower()
    if "email" in last or "e_mail" in last:
        return "email"
    if "phone" in last or "mobile" in last:
        return "phone"
    return "other"


def normalise_email(value: str, *, gmail_remove_dots: bool = False) -> str:
    """``value`` trimmed and lower-cased; with ``gmail_remove_dots``, Google's Gmail rule too.

    Raises ``ValueError`` for a value that is not a single address.
    """
    address = value.strip().lower()
    local, at, domain = address.rpartition("@")
    if not (local and at and domain) or any(c.isspace() for c in address):
        raise ValueError("not an email address")
    if gmail_remove_dots and domain in _GMAIL_DOMAINS:
        local = local.replace(".", "")
        if not local:
            raise ValueError("not an email address")
    return f"{local}@{domain}"


def normalise_phone(
    value: str, region: str | None = None, phone_format: PhoneFormat = "e164"
) -> str:
    """``value`` as E.164 (``+31612345678``), or its digits alone with ``phone_format="digits"``.

    ``region`` is the country of a number written without a country code. Raises ``ValueError``
    for a value that is not a valid phone number.
    """
    try:
        number = phonenumbers.parse(value, region)
    except phonenumbers.NumberParseException as error:
        raise ValueError(f"not a phone number: {error}") from None
    if not phonenumbers.is_valid_number(number):
        raise ValueError("not a valid phone number")
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return e164 if phone_format == "e164" else e164.removeprefix("+")


def normalise_other(value: str) -> str:
    """``value`` trimmed and lower-cased, as the platforms ask for names."""
    return value.strip().lower()


def sha256_hex(text: str) -> str:
    """The lowercase hex SHA-256 of ``text`` in UTF-8."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hashed(kind: Kind, value: str, region: str | None = None) -> str | None:
    """The digest of the normalised value; None when it does not normalise (not an email or
    a phone number)."""
    try:
        if kind == "email":
            text = normalise_email(value)
        elif kind == "phone":
            text = normalise_phone(value, region)
        else:
            text = normalise_other(value)
    except ValueError:
        return None
    return sha256_hex(text) if text else None
