"""Canonical person attributes, the column names that mean them, and value normalisation.

FEBRL calls a surname ``surname``, a CRM export ``last_name`` or ``LastName``, a customer
record ``attributes.last_name``; all of them are the attribute ``last_name`` here, so that one
configuration compares them all. A column whose name is not a known synonym is still usable by
its own name. Values are normalised by the attribute's kind before anything compares them.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum


class AttributeKind(StrEnum):
    """How values of an attribute are normalised."""

    NAME = "name"
    DATE = "date"
    EMAIL = "email"
    PHONE = "phone"
    IDENTIFIER = "identifier"
    POSTCODE = "postcode"
    TEXT = "text"


@dataclass(frozen=True, slots=True)
class Attribute:
    """A canonical attribute: its name, its kind and the column names that mean it."""

    name: str
    kind: AttributeKind
    synonyms: tuple[str, ...] = ()


_ATTRIBUTES = (
    Attribute(
        "first_name",
        AttributeKind.NAME,
        ("given_name", "givenname", "firstname", "forename", "first", "fname", "given"),
    ),
    Attribute(
        "last_name",
        AttributeKind.NAME,
        ("surname", "lastname", "family_name", "familyname", "last", "lname"),
    ),
    Attribute("full_name", AttributeKind.NAME, ("name", "fullname", "customer_name")),
    Attribute(
        "dob",
        AttributeKind.DATE,
        ("date_of_birth", "dateofbirth", "birth_date", "birthdate", "birthday", "born"),
    ),
    Attribute(
        "national_id",
        AttributeKind.IDENTIFIER,
        ("soc_sec_id", "ssn", "social_security_number", "nin", "national_insurance_number"),
    ),
    Attribute("email", AttributeKind.EMAIL, ("email_address", "e_mail", "mail", "emailaddress")),
    Attribute(
        "phone",
        AttributeKind.PHONE,
        ("phone_number", "phonenumber", "telephone", "tel", "mobile", "mobile_phone", "cell"),
    ),
    Attribute(
        "street_number",
        AttributeKind.TEXT,
        ("house_number", "housenumber", "street_no", "building_number", "street_num"),
    ),
    Attribute(
        "street",
        AttributeKind.TEXT,
        (
            "address_1",
            "address1",
            "address_line_1",
            "address_line1",
            "addressline1",
            "line1",
            "street_address",
            "streetaddress",
            "address",
        ),
    ),
    Attribute(
        "address_2",
        AttributeKind.TEXT,
        ("address2", "address_line_2", "address_line2", "addressline2", "line2"),
    ),
    Attribute("city", AttributeKind.TEXT, ("suburb", "town", "locality", "city_name")),
    Attribute(
        "postcode",
        AttributeKind.POSTCODE,
        ("post_code", "postal_code", "postalcode", "zip", "zipcode", "zip_code"),
    ),
    Attribute("state", AttributeKind.TEXT, ("province", "region", "state_code")),
    Attribute("full_address", AttributeKind.TEXT, ("address_full", "complete_address")),
)

ADDRESS_PARTS = ("street_number", "street", "address_2", "city", "postcode")
"""The parts ``full_address`` is assembled from when no column holds it whole."""

CANONICAL_ATTRIBUTES: Mapping[str, Attribute] = {a.name: a for a in _ATTRIBUTES}
"""Every canonical attribute by name."""

SYNONYMS: Mapping[str, str] = {
    **{synonym: a.name for a in _ATTRIBUTES for synonym in a.synonyms},
    **{a.name: a.name for a in _ATTRIBUTES},
}
"""Column key (see :func:`column_key`) to canonical attribute."""

# Cells that mean "no value" in exported files.
_NULL_TOKENS = frozenset({"", "nan", "none", "null", "n/a", "na", "-", "?"})


def column_key(column: str) -> str:
    """A column name in the form synonyms are written in: lower snake case, dots kept.

    ``"Last Name"`` -> ``last_name``, ``"attributes.Zip-Code"`` -> ``attributes.zip_code``.
    """
    parts = (
        re.sub(r"[^0-9a-z]+", "_", part.strip().lower()).strip("_") for part in column.split(".")
    )
    return ".".join(parts)


def attribute_of_column(column: str, aliases: Mapping[str, str] | None = None) -> str:
    """The attribute a column (or a settings attribute path) holds: an alias, a synonym, or
    else the column's own key.

    Nested columns (``attributes.address.postcode``, ``identifiers.email``, from flattened
    customer records) are tried whole, then by their last segment, which also names an
    attribute no synonym knows (``attributes.loyalty_tier`` holds ``loyalty_tier``).
    """
    key = column_key(column)
    if aliases:
        for alias_column, attribute in aliases.items():
            if column_key(alias_column) == key:
                return attribute
    last = key.rsplit(".", 1)[-1]
    for candidate in (key.replace(".", "_"), last):
        if candidate in SYNONYMS:
            return SYNONYMS[candidate]
    return last


def columns_by_attribute(
    columns: Iterable[str], aliases: Mapping[str, str] | None = None
) -> dict[str, list[str]]:
    """Group ``columns`` by the attribute each holds, in column order."""
    grouped: dict[str, list[str]] = {}
    for column in columns:
        grouped.setdefault(attribute_of_column(column, aliases), []).append(column)
    return grouped


def kind_of(attribute: str) -> AttributeKind:
    """The kind of an attribute; unknown attributes are plain text."""
    known = CANONICAL_ATTRIBUTES.get(attribute)
    return known.kind if known else AttributeKind.TEXT


def as_text(value: object) -> str | None:
    """A cell as text, or ``None`` when it is missing (None, NaN, empty, ``"null"``...)."""
    if value is None:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            value = int(value)  # 12.0 read from a numeric column is the street number 12
    text = str(value).strip()
    return None if text.lower() in _NULL_TOKENS else text


def _fold(text: str) -> str:
    """Lower-case without accents: ``Zoë`` and ``zoe`` are the same name when typed."""
    decomposed = unicodedata.normalize("NFKD", text.lower())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def _normalise_date(text: str) -> str | None:
    """``YYYY-MM-DD`` for the date forms people export; the digits alone when unrecognised.

    Components are kept even when they do not make a valid date (month 13), so that a
    day/month swap or a typo can still be recognised by the comparators.
    """
    text = text.strip()
    match = re.match(r"^(\d{4})[-/.]?(\d{2})[-/.]?(\d{2})(?:$|[T ])", text)
    if match:
        return "-".join(match.groups())
    match = re.match(r"^(\d{1,2})[-/.](\d{1,2})[-/.](\d{4})$", text)
    if match:
        day, month, year = match.groups()
        if int(month) > 12 >= int(day):  # unambiguous US order
            day, month = month, day
        return f"{year}-{int(month):02d}-{int(day):02d}"
    digits = re.sub(r"\D", "", text)
    return digits or None


def _normalise_phone(text: str) -> str | None:
    """The last nine digits: ``+44 7700 900123`` and ``07700 900123`` are one number.

    Country codes and trunk prefixes vary with how a number was typed, and nine digits still
    identify a subscriber within a country; E.164 would need a default region we do not know.
    """
    digits = re.sub(r"\D", "", text)
    return digits[-9:] if len(digits) >= 6 else None


def normalise(kind: AttributeKind, value: object) -> str | None:
    """The form of ``value`` that comparators and blocking keys see, or ``None`` if missing."""
    text = as_text(value)
    if text is None:
        return None
    if kind is AttributeKind.NAME:
        folded = re.sub(r"[^a-z\s'-]", "", _fold(text))
        cleaned = re.sub(r"\s+", " ", folded.replace("'", "").replace("-", " ")).strip()
    elif kind is AttributeKind.DATE:
        return _normalise_date(text)
    elif kind is AttributeKind.EMAIL:
        cleaned = text.lower().replace(" ", "")
    elif kind is AttributeKind.PHONE:
        return _normalise_phone(text)
    elif kind in (AttributeKind.IDENTIFIER, AttributeKind.POSTCODE):
        cleaned = re.sub(r"[^0-9a-z]", "", _fold(text))
    else:
        cleaned = re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", _fold(text))).strip()
    return cleaned or None


def split_full_name(full_name: str | None) -> tuple[str | None, str | None]:
    """Given and family name of a normalised full name: the first and the last word."""
    if not full_name:
        return None, None
    words = full_name.split()
    if len(words) == 1:
        return None, words[0]
    return words[0], words[-1]
