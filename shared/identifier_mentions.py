"""Whether an ingested item mentions a person: identifier text reduced to fingerprints, and
every string of an item compared by them.

Erasing a person must find their identifiers wherever a sender put them (a trait, a property,
a record's attributes, the device id in the context), and a suppression must recognise them in
later items however they are written: ``" Jane@Example.com"`` for ``jane@example.com``,
``"+31 6 1234 5678"`` for ``+31612345678``. Both compare *fingerprints*, the normalised forms a
piece of text stands for. Ingestion and identity use this one rule, so that an identifier
suppressed or purged means the same thing to both. Stored suppressions hold fingerprints hashed
(:func:`profilemesh.shared.pii.sha256_hex`), never the values themselves.

A string is compared as a whole value, as identity reads identifiers; a purge, which must leave
no mention behind, also compares its words (split at spaces, quotes, brackets and URL
punctuation) and the phone numbers written inside it, so that an address in a note or a query
string is found too.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
from collections.abc import Set

from google.protobuf import struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from profilemesh.ingestion.v1 import event_log_pb2
from profilemesh.shared import pii

_PHONE_CHARACTERS = frozenset("0123456789-.()/ ")
_NATIONAL_CHARACTERS = frozenset("0123456789-() ")
"""Without a leading ``+``, dots and slashes mark versions, addresses and dates far more often
than phone numbers (and each candidate costs a full parse)."""
_MIN_PHONE_DIGITS = 7
_WORD_SEPARATORS = re.compile(r"[\s\"'<>()\[\]{},;:=&?/\\|]+")
_SPACED_PHONE = re.compile(r"(?<![\w+])\+?\d[\d .()/-]{5,}\d(?!\w)")
"""A phone number written with spaces or punctuation inside longer text."""
_CACHE_SIZE = 1 << 14
"""Distinct strings whose fingerprints are remembered: event names, user agents and the like
repeat in every event, and their fingerprints are then free."""


def identifier_fingerprints(value: str) -> set[str]:
    """The forms ``value`` stands for as an identifier: the trimmed lower-cased text, the
    normalised email when it is one, and the E.164 phone number when it reads as one (written
    with a leading ``+``, or as digits and phone punctuation with the country code first,
    with or without ``00``). Empty for blank text."""
    text = value.strip().lower()
    if not text:
        return set()
    found = {text}
    if "@" in text:
        with contextlib.suppress(ValueError):
            found.add(pii.normalise_email(text))
    phone = _phone(text)
    if phone is not None:
        found.add(phone)
    return found


def _phone(text: str) -> str | None:
    if text.startswith("+"):
        if not _PHONE_CHARACTERS.issuperset(text[1:]):
            return None
    elif not _NATIONAL_CHARACTERS.issuperset(text):
        return None
    digits = "".join(c for c in text if c.isdigit())
    if len(digits) < _MIN_PHONE_DIGITS:
        return None
    if text.startswith("+"):
        candidate = text
    else:  # the country code first, as in Meta's digits-only format, or after 00
        candidate = "+" + (digits[2:] if digits.startswith("00") else digits)
    try:
        return pii.normalise_phone(candidate)
    except ValueError:
        return None


def text_fingerprints(text: str) -> set[str]:
    """The fingerprints of ``text`` as a whole, of each of its words, and of each phone number
    written with spaces inside it."""
    found = identifier_fingerprints(text)
    words = _WORD_SEPARATORS.split(text)
    if len(words) > 1:
        for word in words:
            word = word.strip(".!")
            if word:
                found |= identifier_fingerprints(word)
        for phone in _SPACED_PHONE.findall(text):
            found |= identifier_fingerprints(phone)
    return found


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _fingerprints(text: str, within_text: bool, hashed: bool) -> tuple[str, ...]:
    found = text_fingerprints(text) if within_text else identifier_fingerprints(text)
    if hashed:
        return tuple(hashlib.sha256(f.encode()).hexdigest() for f in found)
    return tuple(found)


def hashed_fingerprints(value: str) -> set[str]:
    """The SHA-256 hex digests of :func:`identifier_fingerprints` (what suppressions store)."""
    return {pii.sha256_hex(fingerprint) for fingerprint in identifier_fingerprints(value)}


def text_mentions(text: str, fingerprints: Set[str], *, hashed: bool = False) -> bool:
    """Whether ``text``, one of its words or a phone number inside it has one of
    ``fingerprints`` (SHA-256 digests of them with ``hashed``)."""
    if not fingerprints or not text:
        return False
    found = text_fingerprints(text)  # not cached: such texts are long and seldom repeat
    if hashed:
        found = {pii.sha256_hex(fingerprint) for fingerprint in found}
    return not fingerprints.isdisjoint(found)


def item_mentions(
    item: event_log_pb2.IngestedItem,
    fingerprints: Set[str],
    *,
    hashed: bool = False,
    within_text: bool = False,
) -> bool:
    """Whether a string of ``item`` (see :func:`item_strings`) has one of ``fingerprints``
    (SHA-256 digests of them with ``hashed``).

    A string is compared as a whole value, as identity reads identifiers: what suppression
    needs, and cheap. With ``within_text``, also by its words and the phone numbers inside it,
    so that a purge finds a person mentioned in a note or a URL too.
    """
    if not fingerprints:
        return False
    isdisjoint = fingerprints.isdisjoint
    return any(
        not isdisjoint(_fingerprints(text, within_text, hashed))
        for text in item_strings(item)
        if text
    )


def item_strings(item: event_log_pb2.IngestedItem) -> list[str]:
    """Every string of ``item`` at any depth: string fields, map keys and values, the keys and
    string values of ``google.protobuf.Struct`` s (properties, traits, context, attributes);
    and for a customer record, its ``crm_id`` identifier value ``source:record_id``."""
    found: list[str] = []
    _collect(item, found)
    if item.HasField("record"):
        found.append(f"{item.record.source}:{item.record.record_id}")
    return found


# How a field is walked. Structs get a path of their own: they hold most of an item's strings,
# and the generic walk through their Value messages costs twice as much.
_SKIP, _TEXT, _TEXTS, _MESSAGE, _MESSAGES, _MAP, _STRUCT = range(7)
_STRUCT_NAME = struct_pb2.Struct.DESCRIPTOR.full_name


@functools.cache
def _shape(field: FieldDescriptor) -> int:
    if field.type == FieldDescriptor.TYPE_STRING:
        return _TEXTS if field.is_repeated else _TEXT
    message = field.message_type
    if field.type != FieldDescriptor.TYPE_MESSAGE or message is None:
        return _SKIP
    if message.full_name == _STRUCT_NAME and not field.is_repeated:
        return _STRUCT
    if not _holds_text(message):  # timestamps, screens...: nothing to look at
        return _SKIP
    if message.GetOptions().map_entry:
        return _MAP
    return _MESSAGES if field.is_repeated else _MESSAGE


def _holds_text(message: Descriptor, seen: frozenset[str] = frozenset()) -> bool:
    """Whether a message of this type can hold a string at any depth."""
    if message.full_name in seen:
        return False  # a cycle adds nothing the other fields do not
    inner = seen | {message.full_name}
    return any(
        field.type == FieldDescriptor.TYPE_STRING
        or (field.message_type is not None and _holds_text(field.message_type, inner))
        for field in message.fields
    )


def _collect(message: Message, found: list[str]) -> None:
    for field, value in message.ListFields():
        kind = _shape(field)
        if kind == _TEXT:
            found.append(value)
        elif kind == _STRUCT:
            _collect_struct(value, found)
        elif kind == _MESSAGE:
            _collect(value, found)
        elif kind == _TEXTS:
            found.extend(value)
        elif kind == _MESSAGES:
            for element in value:
                _collect(element, found)
        elif kind == _MAP:
            for key, entry in value.items():
                if isinstance(key, str):
                    found.append(key)
                if isinstance(entry, str):
                    found.append(entry)
                elif isinstance(entry, Message):
                    _collect(entry, found)


def _collect_struct(struct: struct_pb2.Struct, found: list[str]) -> None:
    for key, value in struct.fields.items():
        found.append(key)
        _collect_value(value, found)


def _collect_value(value: struct_pb2.Value, found: list[str]) -> None:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        found.append(value.string_value)
    elif kind == "struct_value":
        _collect_struct(value.struct_value, found)
    elif kind == "list_value":
        for element in value.list_value.values:
            _collect_value(element, found)
