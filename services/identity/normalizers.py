"""Normalisers: one spelling per identifier value, so that ``Ada@Example.com `` and
``ada@example.com`` are the same node of the graph.

A normaliser takes the raw value and the default phone region of the rules and returns the
normalised value, or None when the value cannot be an identifier (empty, not an email address,
not a phone number); such values are dropped, never linked.
"""

from __future__ import annotations

from collections.abc import Callable

import phonenumbers

from profilemesh.services.identity.identifiers import EMAIL, PHONE

Normalizer = Callable[[str, str], str | None]
"""``normalizer(raw_value, default_region) -> normalised value | None``."""


def email(value: str, default_region: str = "") -> str | None:
    """Trimmed and lower-cased; None without an ``@`` (a name or a typo, not an address)."""
    normalised = value.strip().lower()
    return normalised if "@" in normalised[1:-1] else None


def e164(value: str, default_region: str = "") -> str | None:
    """The phone number in E.164 (``+33612345678``), or None if it cannot be one.

    Numbers written without a country code are read in ``default_region`` (ISO 3166-1 alpha-2);
    with no default region they are rejected rather than guessed. "Possible" (plausible length
    for the country) rather than "valid" numbers are kept: validity tables lag new number
    ranges, and wrongly dropping a real number is worse than keeping an odd one.
    """
    text = value.strip()
    if not text:
        return None
    try:
        number = phonenumbers.parse(text, default_region.upper() or None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def trim(value: str, default_region: str = "") -> str | None:
    """Surrounding white space removed; case kept (ids are often case-sensitive)."""
    return value.strip() or None


def lowercase(value: str, default_region: str = "") -> str | None:
    """Trimmed and lower-cased."""
    return value.strip().lower() or None


def uppercase(value: str, default_region: str = "") -> str | None:
    """Trimmed and upper-cased."""
    return value.strip().upper() or None


def none(value: str, default_region: str = "") -> str | None:
    """The value as sent; only the empty value is dropped."""
    return value or None


# The names of the proto contract (IdentifierRule.normalizer) first, then accepted aliases.
NORMALIZERS: dict[str, Normalizer] = {
    "email": email,
    "e164": e164,
    "trim": trim,
    "lowercase": lowercase,
    "uppercase": uppercase,
    "none": none,
    "phone": e164,
    "strip": trim,
    "lower": lowercase,
    "upper": uppercase,
}

# Types whose values have a known shape get the matching normaliser unless a rule says other.
_TYPE_DEFAULTS: dict[str, str] = {EMAIL: "email", PHONE: "e164"}


def default_normalizer_name(identifier_type: str) -> str:
    """The normaliser a type gets when its rule names none: email, e164 or trim."""
    return _TYPE_DEFAULTS.get(identifier_type, "trim")


def normalizer_named(name: str, identifier_type: str) -> Normalizer:
    """The normaliser called ``name``; the type's default when ``name`` is empty.

    Raises KeyError for an unknown name (rules are validated before they get here).
    """
    return NORMALIZERS[name or default_normalizer_name(identifier_type)]
