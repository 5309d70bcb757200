"""Identifier fingerprints, and finding them anywhere in an ingested item."""

from __future__ import annotations

import pytest

from profilemesh.common.v1 import identifier_pb2
from profilemesh.ingestion.v1 import event_log_pb2, event_pb2, record_pb2
from profilemesh.shared.identifier_mentions import (
    hashed_fingerprints,
    identifier_fingerprints,
    item_mentions,
    item_strings,
    text_mentions,
)
from profilemesh.shared.pii import sha256_hex


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("  Jane.Doe@Example.COM ", {"jane.doe@example.com"}),
        ("+31612345678", {"+31612345678"}),
        ("+31 6 1234 5678", {"+31 6 1234 5678", "+31612345678"}),
        ("0031 (6) 1234-5678", {"0031 (6) 1234-5678", "+31612345678"}),
        ("31612345678", {"31612345678", "+31612345678"}),
        ("User-42", {"user-42"}),
        ("42", {"42"}),  # too short for a phone number
        ("+31 6 12", {"+31 6 12"}),  # not a valid number
        ("   ", set()),
    ],
)
def test_an_identifier_stands_for_its_text_and_its_normalised_email_or_phone(
    value: str, expected: set[str]
) -> None:
    assert identifier_fingerprints(value) == expected


def test_hashed_fingerprints_are_sha256_of_each_fingerprint() -> None:
    assert hashed_fingerprints("+31 6 1234 5678") == {
        sha256_hex("+31 6 1234 5678"),
        sha256_hex("+31612345678"),
    }


def test_free_text_mentions_an_identifier_as_a_word_or_a_spaced_phone_number() -> None:
    email = {"jane@example.com"}
    assert text_mentions("please erase Jane@Example.com.", email)
    assert text_mentions("https://shop.example/?email=jane@example.com&x=1", email)
    assert text_mentions('expected a string, got an object ({"email": "jane@example.com"})', email)
    assert text_mentions("call +31 6 1234 5678 today", {"+31612345678"})
    assert not text_mentions("mary-jane@example.com wrote", email)
    assert text_mentions("Jane@Example.com", hashed_fingerprints("jane@example.com"), hashed=True)


def jane_event() -> event_pb2.Event:
    event = event_pb2.Event(anonymous_id="anon-7")
    event.identify.traits.update(
        {"name": "Jane", "contacts": [{"kind": "mobile", "phone": "+31 6 1234 5678"}], "age": 41}
    )
    event.context.device.id = "device-jane"
    event.context.ip = "10.0.0.1"
    return event


@pytest.mark.parametrize(
    "identifier",
    ["anon-7", "+31612345678", "device-jane", "ANON-7", "Jane", "mobile", "contacts"],
)
def test_an_event_mentions_every_string_it_holds_at_any_depth(identifier: str) -> None:
    item = event_log_pb2.IngestedItem(event=jane_event(), source="web")
    fingerprints = identifier_fingerprints(identifier)
    assert item_mentions(item, fingerprints)
    hashed = {sha256_hex(f) for f in fingerprints}
    assert item_mentions(item, hashed, hashed=True)


def test_an_event_does_not_mention_what_it_does_not_hold() -> None:
    item = event_log_pb2.IngestedItem(event=jane_event(), source="web")
    assert not item_mentions(item, identifier_fingerprints("+31612345679"))
    assert not item_mentions(item, identifier_fingerprints("41"))  # a number, not a string
    assert not item_mentions(item, set())


def test_every_body_and_the_context_are_walked() -> None:
    track = event_pb2.Event(user_id="u-1")
    track.track.event = "Order Completed"
    track.track.properties.update({"billing": {"email": "Jane@Example.com"}})
    alias = event_pb2.Event(user_id="u-2")
    alias.alias.previous_id = "old-id-9"
    page = event_pb2.Event(anonymous_id="a-1")
    page.page.properties.update({"url": "https://x.example/?ref=jane@example.com"})
    page.context.campaign.source = "newsletter"
    page.context.extra.update({"crm": "cust-77"})
    page.context.consent.category_preferences["ads"] = True
    items = [event_log_pb2.IngestedItem(event=e) for e in (track, alias, page)]
    assert item_mentions(items[0], {"jane@example.com"})
    assert item_mentions(items[1], {"old-id-9"})
    assert item_mentions(items[2], {"cust-77"})
    assert "newsletter" in item_strings(items[2])


def test_a_mention_inside_text_counts_only_when_looking_within_text() -> None:
    event = event_pb2.Event(anonymous_id="a-1")
    event.page.properties.update(
        {"url": "https://x.example/?ref=Jane@Example.com", "note": "call +31 6 1234 5678 first"}
    )
    item = event_log_pb2.IngestedItem(event=event)
    for identifier in ("jane@example.com", "+31612345678"):
        hashed = hashed_fingerprints(identifier)
        assert not item_mentions(item, hashed, hashed=True)  # not a value of its own
        assert item_mentions(item, hashed, hashed=True, within_text=True)


def test_a_record_mentions_its_identifiers_attributes_and_crm_id() -> None:
    record = record_pb2.CustomerRecord(
        source="salesforce",
        record_id="003A1",
        identifiers=[identifier_pb2.Identifier(type="email", value="JANE@example.com")],
    )
    record.attributes.update({"phone": "0031 6 1234 5678", "city": "Utrecht"})
    item = event_log_pb2.IngestedItem(record=record, source="salesforce")
    assert item_mentions(item, {"jane@example.com"})
    assert item_mentions(item, {"+31612345678"})
    assert item_mentions(item, identifier_fingerprints("salesforce:003A1"))
    assert not item_mentions(item, identifier_fingerprints("hubspot:003A1"))
