"""The identity graph as a specification: normalisers, rules, what each item type contributes,
limits, blocked values, stable ids, manual merge and unmerge, trait survivorship, and the
properties that must hold for any sequence of items."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import json_format, timestamp_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from profilemesh.identity.v1 import identity_rules_pb2
from profilemesh.ingestion.v1 import event_log_pb2
from profilemesh.services.identity.extraction import Evidence, extract, summarize
from profilemesh.services.identity.graph import (
    IdentityGraph,
    MergeKind,
    MergeOrigin,
    profile_id_for,
)
from profilemesh.services.identity.identifiers import Identifier
from profilemesh.services.identity.normalizers import e164, email, lowercase, none, trim, uppercase
from profilemesh.services.identity.rebuild import (
    Numbering,
    connected_components,
    edges_of_links,
    rebuild,
)
from profilemesh.services.identity.rules import (
    IdentifierRule,
    LimitPolicy,
    Rules,
    Survivorship,
    TraitRule,
)
from profilemesh.shared.errors import FailedPrecondition, InvalidArgument, NotFound

SECOND = 1_000_000_000


def ident(key: str) -> Identifier:
    return Identifier.parse(key)


def ev(*keys: str, at: int = 0, source: str = "web", **traits: Any) -> Evidence:
    """Evidence carrying the identifiers ``keys`` (``type:value``) and ``traits``."""
    return Evidence(
        identifiers=tuple(ident(k) for k in keys), traits=traits, source=source, occurred_at=at
    )


def no_limits(**overrides: Any) -> Rules:
    """The default identifier types, with every limit lifted."""
    rules = tuple(
        IdentifierRule(r.type, r.priority, 0, r.on_limit, r.normalizer, r.trait_names)
        for r in Rules().identifier_rules
    )
    return Rules(identifier_rules=rules, **overrides)


def item(document: dict[str, Any], source: str = "web") -> event_log_pb2.IngestedItem:
    """An item of the events log from its JSON form (an event, or a record under "record")."""
    message = event_log_pb2.IngestedItem(source=source)
    if "record" in document:
        json_format.ParseDict(document["record"], message.record)
    else:
        json_format.ParseDict(document, message.event)
    return message


def partition(graph: IdentityGraph) -> set[frozenset[Identifier]]:
    return {frozenset(graph.identifiers_of(p)) for p in graph.profile_ids()}


# -- normalisers ------------------------------------------------------------------------------


def test_email_is_trimmed_and_lower_cased_and_a_non_address_is_dropped() -> None:
    assert email("  Ada.Lovelace@Example.COM ") == "ada.lovelace@example.com"
    assert email("Ada Lovelace") is None
    assert email("@example.com") is None


def test_phone_becomes_e164_using_the_default_region_for_national_numbers() -> None:
    assert e164("06 12 34 56 78", "FR") == "+33612345678"
    assert e164("+1 (415) 555-2671") == "+14155552671"
    assert e164("06 12 34 56 78") is None  # no country code and no default region
    assert e164("call me maybe", "FR") is None
    assert e164("12", "FR") is None


def test_simple_normalisers_and_empty_values() -> None:
    assert trim("  AbC ") == "AbC"
    assert lowercase(" AbC ") == "abc"
    assert uppercase(" AbC ") == "ABC"
    assert none(" AbC ") == " AbC "
    assert trim("   ") is None
    assert none("") is None


def test_each_type_gets_its_default_normaliser_unless_its_rule_names_one() -> None:
    rules = Rules(
        identifier_rules=(
            IdentifierRule("user_id", 1, normalizer="lowercase"),
            IdentifierRule("email", 2),
            IdentifierRule("phone", 3),
            IdentifierRule("loyalty_card", 4),
        ),
        default_region="GB",
    )
    assert rules.normalize("user_id", " ABC ") == ident("user_id:abc")
    assert rules.normalize("email", " A@B.Example ") == ident("email:a@b.example")
    assert rules.normalize("phone", "020 7946 0018") == ident("phone:+442079460018")
    assert rules.normalize("loyalty_card", " X-1 ") == ident("loyalty_card:X-1")
    assert rules.normalize("crm_id", "nope") is None  # no rule: ignored


# -- rules ------------------------------------------------------------------------------------


def test_default_rules_follow_segment_identity_resolution() -> None:
    rules = Rules()
    assert [r.type for r in sorted(rules.identifier_rules, key=lambda r: r.priority)][:3] == [
        "user_id",
        "email",
        "phone",
    ]
    assert rules.rule_for("user_id") == IdentifierRule("user_id", 1, 1, LimitPolicy.REFUSE_MERGE)
    assert rules.limit("email") == 5
    assert rules.limit("anonymous_id") == 100
    assert rules.max_profiles_per_identifier == 20
    for value in ("unknown", "NULL", "undefined", "0", "test@example.com", "anonymous"):
        assert rules.is_blocked(Identifier("user_id", value))


def test_rules_load_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(
        """
identifier_rules:
  - {type: user_id, priority: 1, limit: 1}
  - {type: email, priority: 2, limit: 3, on_limit: drop_lowest_priority, trait_names: [email]}
  - {type: anonymous_id, priority: 3}
blocked_values: [nobody@example.com]
max_profiles_per_identifier: 5
default_region: FR
trait_rules:
  - {trait: first_name, survivorship: SURVIVORSHIP_SOURCE_PRIORITY, source_priority: [crm, web]}
"""
    )
    rules = Rules.from_yaml(path)
    assert rules.rule_for("email") == IdentifierRule(
        "email", 2, 3, LimitPolicy.DROP_LOWEST_PRIORITY, "", ("email",)
    )
    assert rules.is_blocked(ident("email:nobody@example.com"))
    assert not rules.is_blocked(ident("user_id:unknown"))  # the list replaces the defaults
    assert rules.trait_rule("first_name").survivorship is Survivorship.SOURCE_PRIORITY
    assert rules.trait_rule("plan").survivorship is Survivorship.LATEST
    assert rules.max_profiles_per_identifier == 5


def test_yaml_rules_report_every_bad_field_by_its_path(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(
        """
identifier_rules:
  - {type: user_id, priority: high}
  - {type: email, priority: 2, on_limit: sometimes}
colour: blue
"""
    )
    with pytest.raises(InvalidArgument) as raised:
        Rules.from_yaml(path)
    fields = {v.field for v in raised.value.violations}
    assert fields == {"identifier_rules[0].priority", "identifier_rules[1].on_limit", "colour"}


def test_proto_rules_round_trip_and_violations_name_the_request_field() -> None:
    rules = Rules(trait_rules=(TraitRule("*", Survivorship.MOST_FREQUENT),), default_region="FR")
    assert Rules.from_proto(rules.to_proto()) == rules

    message = Rules().to_proto()
    message.identifier_rules[1].priority = 1
    message.identifier_rules[2].normalizer = "soundex"
    message.default_region = "XX"
    message.trait_rules.add(
        trait="first_name", survivorship=identity_rules_pb2.SURVIVORSHIP_SOURCE_PRIORITY
    )
    with pytest.raises(InvalidArgument) as raised:
        Rules.from_proto(message, where="rules")
    assert {v.field for v in raised.value.violations} == {
        "rules.identifier_rules[1].priority",
        "rules.identifier_rules[2].normalizer",
        "rules.default_region",
        "rules.trait_rules[0].source_priority",
    }


# -- extraction -------------------------------------------------------------------------------


def test_identify_links_ids_and_identifier_traits_and_observes_person_traits() -> None:
    rules = Rules(default_region="FR")
    evidence = extract(
        item(
            {
                "messageId": "m1",
                "userId": " u1 ",
                "anonymousId": "a1",
                "timestamp": "2024-05-01T10:00:00Z",
                "context": {"traits": {"plan": "free", "company": "Acme"}},
                "identify": {
                    "traits": {"email": "Ada@Example.com", "phone": "06 12 34 56 78", "plan": "pro"}
                },
            }
        ),
        rules,
    )
    assert evidence.identifiers == (
        ident("user_id:u1"),
        ident("anonymous_id:a1"),
        ident("email:ada@example.com"),
        ident("phone:+33612345678"),
    )
    assert evidence.traits == {
        "email": "Ada@Example.com",
        "phone": "06 12 34 56 78",
        "plan": "pro",  # identify traits win over context traits
        "company": "Acme",
    }
    assert evidence.kind == "identify" and evidence.message_id == "m1" and evidence.source == "web"
    stamp = timestamp_pb2.Timestamp()
    stamp.FromJsonString("2024-05-01T10:00:00Z")
    assert evidence.occurred_at == stamp.ToNanoseconds()


def test_track_links_device_and_advertising_ids_and_context_traits() -> None:
    evidence = extract(
        item(
            {
                "anonymousId": "a1",
                "context": {
                    "device": {"id": "D-1", "advertisingId": "AB-CD"},
                    "traits": {"email": "ada@example.com"},
                },
                "track": {"event": "Order Completed", "properties": {"revenue": 42}},
            }
        ),
        Rules(),
    )
    assert set(evidence.identifiers) == {
        ident("anonymous_id:a1"),
        ident("device_id:D-1"),
        ident("advertising_id:ab-cd"),
        ident("email:ada@example.com"),
    }
    assert evidence.traits == {"email": "ada@example.com"}  # properties are not traits


def test_page_and_screen_link_their_ids_only() -> None:
    for body in ({"page": {"name": "Pricing"}}, {"screen": {"name": "Cart"}}):
        evidence = extract(item({"anonymousId": "a1", **body}), Rules())
        assert evidence.identifiers == (ident("anonymous_id:a1"),)
        assert evidence.traits == {}


def test_group_traits_describe_the_group_and_never_reach_the_person() -> None:
    evidence = extract(
        item(
            {
                "userId": "u1",
                "group": {
                    "groupId": "acme",
                    "traits": {"email": "billing@acme.com", "plan": "b2b"},
                },
            }
        ),
        Rules(),
    )
    assert evidence.identifiers == (ident("user_id:u1"),)
    assert evidence.traits == {}
    assert evidence.group is not None
    assert evidence.group.group_id == "acme"
    assert evidence.group.traits == {"email": "billing@acme.com", "plan": "b2b"}


def test_alias_previous_id_is_a_user_id_when_the_graph_knows_one_else_an_anonymous_id() -> None:
    alias = item({"userId": "u2", "alias": {"previousId": "old"}})
    assert extract(alias, Rules()).identifiers == (ident("user_id:u2"), ident("anonymous_id:old"))
    known = {ident("user_id:old")}
    assert extract(alias, Rules(), known.__contains__).identifiers == (
        ident("user_id:u2"),
        ident("user_id:old"),
    )


def test_record_links_its_crm_id_typed_identifiers_and_attribute_identifiers() -> None:
    evidence = extract(
        item(
            {
                "record": {
                    "source": "salesforce",
                    "recordId": "0031",
                    "identifiers": [
                        {"type": "user_id", "value": "u1"},
                        {"type": "loyalty_card", "value": "L1"},  # no rule: ignored
                    ],
                    "attributes": {
                        "first_name": "Ada",
                        "last_name": "Lovelace",
                        "email": " ADA@example.com",
                        "phone": 612345678,  # a spreadsheet's number, not text
                    },
                    "updatedAt": "2024-01-01T00:00:00Z",
                }
            },
            source="import",
        ),
        Rules(default_region="FR"),
    )
    assert evidence.identifiers == (
        ident("crm_id:salesforce:0031"),
        ident("user_id:u1"),
        ident("email:ada@example.com"),
        ident("phone:+33612345678"),
    )
    assert evidence.traits["first_name"] == "Ada"
    assert evidence.source == "salesforce" and evidence.record_id == "0031"
    assert evidence.kind == "record"
    assert evidence.occurred_at == 1_704_067_200 * SECOND


def test_blocked_values_are_dropped_and_reported() -> None:
    evidence = extract(
        item(
            {
                "userId": "Unknown",
                "anonymousId": "a1",
                "context": {"device": {"advertisingId": "00000000-0000-0000-0000-000000000000"}},
                "identify": {"traits": {"email": "test@example.com"}},
            }
        ),
        Rules(),
    )
    assert evidence.identifiers == (ident("anonymous_id:a1"),)
    assert set(evidence.blocked) == {
        ident("user_id:Unknown"),
        ident("advertising_id:00000000-0000-0000-0000-000000000000"),
        ident("email:test@example.com"),
    }


def test_summary_of_a_track_event() -> None:
    summary = summarize(
        item(
            {
                "messageId": "m9",
                "anonymousId": "a1",
                "timestamp": "2024-05-01T10:00:00Z",
                "track": {"event": "Order Completed", "properties": {"revenue": 42.5}},
            }
        )
    )
    assert (summary.message_id, summary.type, summary.name) == ("m9", "track", "Order Completed")
    assert summary.properties == {"revenue": 42.5}


# -- profiles, merges, stable ids -------------------------------------------------------------


def test_a_new_identifier_founds_a_profile_whose_id_derives_from_it() -> None:
    graph = IdentityGraph(Rules())
    outcome = graph.link(ev("anonymous_id:a1"))
    assert outcome.created and outcome.profile_id == profile_id_for(ident("anonymous_id:a1"))
    assert outcome.profile_id.startswith("p_") and len(outcome.profile_id) == 18
    again = graph.link(ev("anonymous_id:a1"))
    assert again.profile_id == outcome.profile_id and not again.created
    assert IdentityGraph(Rules()).link(ev("anonymous_id:a1")).profile_id == outcome.profile_id


def test_an_item_with_no_usable_identifier_has_no_profile() -> None:
    graph = IdentityGraph(Rules())
    assert graph.link(ev("user_id:null", "loyalty_card:L1")).profile_id is None
    assert len(graph) == 0


def test_an_item_joining_two_profiles_merges_them_into_the_oldest() -> None:
    graph = IdentityGraph(Rules())
    anonymous = graph.link(ev("anonymous_id:a1")).profile_id
    known = graph.link(ev("user_id:u1", "email:ada@example.com")).profile_id
    assert anonymous and known and anonymous != known

    outcome = graph.link(ev("email:ada@example.com", "anonymous_id:a1", at=5))
    assert outcome.profile_id == anonymous  # created first, so it survives
    (record,) = outcome.merged
    assert record.kind is MergeKind.MERGE and record.origin is MergeOrigin.DETERMINISTIC
    assert record.surviving_profile_id == anonymous
    assert record.merged_profile_ids == (known,)
    assert set(record.identifiers) == {ident("email:ada@example.com"), ident("anonymous_id:a1")}
    # The retired id redirects, for every lookup.
    assert graph.canonical(known) == anonymous
    assert graph.resolve(ident("user_id:u1")) == anonymous
    assert set(graph.identifiers_of(known)) == {
        ident("user_id:u1"),
        ident("email:ada@example.com"),
        ident("anonymous_id:a1"),
    }
    assert graph.merges_of(known) == [record]
    assert graph.canonical("p_0000000000000000") is None


def test_a_second_user_id_is_refused_and_the_shared_identifier_stays_with_its_profile() -> None:
    graph = IdentityGraph(Rules())
    first = graph.link(ev("user_id:u1", "anonymous_id:shared")).profile_id
    outcome = graph.link(ev("user_id:u2", "anonymous_id:shared"))
    assert outcome.profile_id != first and outcome.created
    assert outcome.identifiers == (ident("user_id:u2"),)
    (refusal,) = outcome.refused
    assert refusal.kind is MergeKind.REFUSED
    assert refusal.profile_ids == (outcome.profile_id, first)
    assert "limit of 1 user_id per profile" in refusal.reason
    assert graph.resolve(ident("anonymous_id:shared")) == first
    assert first and outcome.profile_id
    assert refusal in graph.merges_of(first) and refusal in graph.merges_of(outcome.profile_id)


def test_identifiers_of_one_refused_profile_are_refused_together() -> None:
    graph = IdentityGraph(Rules())
    first = graph.link(ev("user_id:u1", "anonymous_id:a1", "device_id:d1")).profile_id
    outcome = graph.link(ev("user_id:u2", "anonymous_id:a1", "device_id:d1"))
    (refusal,) = outcome.refused
    assert refusal.profile_ids == (outcome.profile_id, first)
    assert refusal.identifiers == (
        ident("user_id:u2"),
        ident("device_id:d1"),
        ident("anonymous_id:a1"),
    )
    assert "device_id:d1, anonymous_id:a1 kept apart" in refusal.reason


def test_a_new_identifier_over_a_refuse_limit_starts_its_own_profile() -> None:
    graph = IdentityGraph(Rules())
    first = graph.link(ev("user_id:u1")).profile_id
    outcome = graph.link(ev("user_id:u1", "user_id:u9"))
    assert outcome.profile_id == first
    assert outcome.created_profiles == (profile_id_for(ident("user_id:u9")),)
    assert graph.resolve(ident("user_id:u9")) == profile_id_for(ident("user_id:u9"))


def test_drop_lowest_priority_leaves_the_extra_identifier_out() -> None:
    rules = Rules(
        identifier_rules=(
            IdentifierRule("user_id", 1, limit=1),
            IdentifierRule("email", 2, limit=2, on_limit=LimitPolicy.DROP_LOWEST_PRIORITY),
        )
    )
    graph = IdentityGraph(rules)
    profile = graph.link(ev("user_id:u1", "email:a@x.io", "email:b@x.io")).profile_id
    outcome = graph.link(ev("user_id:u1", "email:c@x.io"))
    assert outcome.profile_id == profile
    assert outcome.identifiers == (ident("user_id:u1"),)
    assert not graph.knows(ident("email:c@x.io"))
    (dropped,) = outcome.refused
    assert "limit of 2 email per profile" in dropped.reason and "dropped" in dropped.reason


def test_blocked_values_never_join_two_people() -> None:
    graph = IdentityGraph(Rules())
    first = graph.link(ev("user_id:u1", "email:test@example.com")).profile_id
    second = graph.link(ev("user_id:u2", "email:test@example.com")).profile_id
    assert first != second and not graph.knows(ident("email:test@example.com"))
    assert graph.is_blocked(ident("email:test@example.com"))


def test_an_identifier_refused_on_too_many_profiles_gets_blocked() -> None:
    graph = IdentityGraph(Rules(max_profiles_per_identifier=3))
    owner = graph.link(ev("device_id:kiosk", "user_id:u0")).profile_id
    blocked_by = []
    for n in range(1, 5):
        outcome = graph.link(ev(f"user_id:u{n}", "device_id:kiosk"))
        blocked_by.append(outcome.newly_blocked)
    # Seen on u0's profile and refused on u1's and u2's: three. The fourth profile blocks it.
    assert blocked_by == [(), (), (ident("device_id:kiosk"),), ()]
    assert graph.is_blocked(ident("device_id:kiosk"))
    assert graph.resolve(ident("device_id:kiosk")) == owner  # it stays where it was
    assert graph.link(ev("device_id:kiosk")).profile_id is None  # but attributes nothing now
    later = graph.link(ev("user_id:u9", "device_id:kiosk"))
    assert later.refused == () and later.identifiers == (ident("user_id:u9"),)


def test_manual_merge_keeps_the_oldest_id_and_is_refused_when_it_breaks_a_limit() -> None:
    graph = IdentityGraph(Rules(), clock=lambda: 7)
    u1 = graph.link(ev("user_id:u1")).profile_id
    u2 = graph.link(ev("user_id:u2")).profile_id
    anon = graph.link(ev("anonymous_id:a1")).profile_id
    assert u1 and u2 and anon
    with pytest.raises(FailedPrecondition, match="limit is 1 user_id per profile") as raised:
        graph.merge([u1, u2], reason="same person")
    assert raised.value.metadata == {"identifier_type": "user_id", "limit": "1"}
    with pytest.raises(InvalidArgument):
        graph.merge([u1, u1], reason="same person")
    with pytest.raises(InvalidArgument):
        graph.merge([u1, anon], reason=" ")
    with pytest.raises(NotFound):
        graph.merge([u1, "p_nope"], reason="same person")

    outcome = graph.merge([anon, u1], reason="support ticket 12")
    assert outcome.record.surviving_profile_id == u1
    assert outcome.record.origin is MergeOrigin.MANUAL and outcome.record.occurred_at == 7
    assert graph.resolve(ident("anonymous_id:a1")) == u1 and graph.canonical(anon) == u1


def test_unmerge_splits_off_the_identifiers_and_what_only_they_link() -> None:
    graph = IdentityGraph(Rules())
    profile = graph.link(ev("user_id:u1", "anonymous_id:a1")).profile_id
    graph.link(ev("anonymous_id:a1", "email:wrong@x.io"))
    graph.link(ev("email:wrong@x.io", "phone:+33612345678"))
    assert profile and len(graph.identifiers_of(profile)) == 4

    outcome = graph.unmerge(profile, [ident("email:wrong@x.io")], reason="bad import")
    record = outcome.record
    assert record.kind is MergeKind.UNMERGE and record.profile_ids == (profile,)
    original, split_off = record.resulting_profile_ids
    assert original == profile
    assert set(graph.identifiers_of(profile)) == {ident("user_id:u1"), ident("anonymous_id:a1")}
    assert set(graph.identifiers_of(split_off)) == {
        ident("email:wrong@x.io"),
        ident("phone:+33612345678"),
    }
    assert split_off == profile_id_for(ident("email:wrong@x.io"))  # its oldest identifier
    with pytest.raises(InvalidArgument):
        graph.unmerge(profile, [ident("email:wrong@x.io")], reason="again")
    with pytest.raises(InvalidArgument):
        graph.unmerge(profile, graph.identifiers_of(profile), reason="all")


def test_unmerge_after_a_merge_restores_both_ids() -> None:
    graph = IdentityGraph(Rules())
    anonymous = graph.link(ev("anonymous_id:a1", "device_id:d1")).profile_id
    known = graph.link(ev("user_id:u1", "email:e@x.io")).profile_id
    assert anonymous and known
    graph.link(ev("email:e@x.io", "anonymous_id:a1"))
    assert graph.canonical(known) == anonymous

    outcome = graph.unmerge(
        anonymous, [ident("user_id:u1"), ident("email:e@x.io")], reason="shared laptop"
    )
    assert outcome.record.resulting_profile_ids == (anonymous, known)
    assert graph.resolve(ident("user_id:u1")) == known
    assert graph.resolve(ident("device_id:d1")) == anonymous


# -- traits -----------------------------------------------------------------------------------


def test_latest_trait_value_is_by_event_time_not_arrival() -> None:
    graph = IdentityGraph(Rules())
    profile = graph.link(ev("user_id:u1", at=10 * SECOND, plan="pro")).profile_id
    late_arrival = graph.link(ev("user_id:u1", at=5 * SECOND, plan="free"))
    assert late_arrival.traits is None  # an older value changes nothing
    assert profile and graph.traits_of(profile) == {"plan": "pro"}


def test_survivorship_rules_first_most_frequent_and_source_priority() -> None:
    rules = Rules(
        trait_rules=(
            TraitRule("signup_source", Survivorship.FIRST),
            TraitRule("city", Survivorship.MOST_FREQUENT),
            TraitRule("first_name", Survivorship.SOURCE_PRIORITY, ("crm", "web")),
        )
    )
    graph = IdentityGraph(rules)
    observations = [
        ev("user_id:u1", at=1, signup_source="ads", city="Lyon", first_name="Ada", source="web"),
        ev(
            "user_id:u1",
            at=2,
            signup_source="seo",
            city="Paris",
            first_name="Augusta",
            source="crm",
        ),
        ev("user_id:u1", at=3, city="Lyon", first_name="A.", source="web"),
        ev("user_id:u1", at=4, city="Paris", first_name="Ada L.", source="app"),
    ]
    for observation in observations:
        profile = graph.link(observation).profile_id
    assert profile and graph.traits_of(profile) == {
        "signup_source": "ads",
        "city": "Paris",  # two each: the latest seen wins the tie
        "first_name": "Augusta",
    }


def test_traits_combine_on_merge_and_are_recomputed_on_unmerge() -> None:
    graph = IdentityGraph(Rules())
    anonymous = graph.link(ev("anonymous_id:a1", at=1, plan="free", theme="dark")).profile_id
    known = graph.link(ev("user_id:u1", at=2, plan="pro")).profile_id
    assert anonymous and known
    merged = graph.merge([anonymous, known], reason="same person")
    assert merged.traits is not None and merged.traits.changed == ("plan",)
    assert graph.traits_of(anonymous) == {"plan": "pro", "theme": "dark"}

    split = graph.unmerge(anonymous, [ident("user_id:u1")], reason="not the same")
    assert graph.traits_of(anonymous) == {"plan": "free", "theme": "dark"}
    assert graph.traits_of(known) == {"plan": "pro"}
    assert {(c.profile_id, c.changed) for c in split.traits} == {
        (anonymous, ("plan",)),
        (known, ("plan",)),
    }


def test_changes_are_drained_once() -> None:
    graph = IdentityGraph(Rules())
    graph.link(ev("user_id:u1", "anonymous_id:a1", plan="pro"))
    changes = graph.drain_changes()
    assert len(changes.nodes) == 2 and len(changes.profiles) == 1 and len(changes.links) == 1
    assert changes.traits and changes.counters.node_seq == 2
    assert not graph.drain_changes()


# -- rebuild ----------------------------------------------------------------------------------


def test_rebuild_labels_components_by_their_smallest_node() -> None:
    sources = np.array([5, 1, 7, 2])
    targets = np.array([3, 5, 8, 8])
    labels = connected_components(sources, targets, 9)
    assert labels.tolist() == [0, 1, 2, 1, 4, 1, 6, 2, 2]


@settings(max_examples=200, deadline=None)
@given(
    nodes=st.integers(1, 400),
    edges=st.lists(st.tuples(st.integers(0, 399), st.integers(0, 399)), max_size=120),
)
def test_rebuild_labels_equal_a_plain_union_find(nodes: int, edges: list[tuple[int, int]]) -> None:
    # Sparse graphs (few edges per node) take the chain-walking path, dense ones the flattening.
    edges = [(a % nodes, b % nodes) for a, b in edges]
    parent = list(range(nodes))

    def root(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = root(a), root(b)
        parent[max(ra, rb)] = min(ra, rb)
    sources = np.array([a for a, _ in edges], dtype=np.int64)
    targets = np.array([b for _, b in edges], dtype=np.int64)
    labels = connected_components(sources, targets, nodes)
    assert labels.tolist() == [root(x) for x in range(nodes)]


def test_over_limit_components_are_found() -> None:
    links = [
        (ident("user_id:u1"), ident("anonymous_id:a1")),
        (ident("user_id:u2"), ident("anonymous_id:a1")),  # two user ids in one component
        (ident("user_id:u3"), ident("email:e3")),
    ]
    rebuilt = rebuild(links, limits={"user_id": 1, "email": 0})
    assert rebuilt.over_limit.tolist() == [rebuilt.numbering.numbers[ident("user_id:u1")]]
    assert sorted(map(len, rebuilt.groups())) == [2, 3]


# -- properties -------------------------------------------------------------------------------

POOLS = {
    "user_id": [f"u{n}" for n in range(4)],
    "email": [f"e{n}@x.io" for n in range(5)],
    "phone": ["+33600000001", "+33600000002"],
    "anonymous_id": [f"a{n}" for n in range(6)],
    "device_id": ["d0", "d1", "unknown"],
}
identifiers = st.sampled_from([Identifier(t, v) for t, values in POOLS.items() for v in values])
items = st.lists(
    st.builds(
        lambda keys, at, plan: Evidence(tuple(keys), {"plan": plan}, "web", at),
        st.lists(identifiers, min_size=1, max_size=4),
        st.integers(0, 50),
        st.sampled_from(["free", "pro", None]),
    ),
    max_size=25,
)
limited_rules = st.builds(
    lambda user, email_, anonymous, policy, maximum: Rules(
        identifier_rules=(
            IdentifierRule("user_id", 1, limit=user),
            IdentifierRule("email", 2, limit=email_, on_limit=policy),
            IdentifierRule("phone", 3, limit=1, on_limit=policy),
            IdentifierRule("device_id", 4, limit=2),
            IdentifierRule("anonymous_id", 5, limit=anonymous, on_limit=policy),
        ),
        max_profiles_per_identifier=maximum,
    ),
    st.integers(1, 2),
    st.integers(1, 3),
    st.integers(0, 3),
    st.sampled_from(LimitPolicy),
    st.integers(0, 3),
)
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_consistent(graph: IdentityGraph) -> None:
    """Every identifier in exactly one profile, every limit kept, every profile connected."""
    rules = graph.rules
    seen: set[Identifier] = set()
    for profile_id in graph.profile_ids():
        members = graph.identifiers_of(profile_id)
        assert members and not seen & set(members)
        seen |= set(members)
        assert all(graph.resolve(m) == profile_id for m in members)
        for identifier_type, group in itertools.groupby(members, key=lambda i: i.type):
            limit = rules.limit(identifier_type)
            assert not limit or len(list(group)) <= limit, (profile_id, identifier_type)
        connected = _components(members, (link.identifiers for link in graph.links_of(profile_id)))
        assert len(connected) == 1, f"{profile_id} is not connected: {connected}"
    assert seen == set(graph.snapshot().nodes)


def _components(
    members: list[Identifier], links: Iterable[tuple[Identifier, ...]]
) -> set[frozenset[Identifier]]:
    numbering = Numbering()
    for member in members:
        numbering.number(member)
    sources, targets = edges_of_links([[numbering.number(i) for i in link] for link in links])
    labels = connected_components(sources, targets, len(members))
    groups: dict[int, set[Identifier]] = {}
    for number, label in enumerate(labels.tolist()):
        groups.setdefault(label, set()).add(numbering.identifiers[number])
    return {frozenset(g) for g in groups.values()}


@PROPERTY
@given(
    rules=limited_rules,
    evidence=items,
    merges=st.lists(st.tuples(identifiers, identifiers), max_size=4),
)
def test_limits_are_never_exceeded_and_each_identifier_is_in_one_profile(
    rules: Rules, evidence: list[Evidence], merges: list[tuple[Identifier, Identifier]]
) -> None:
    graph = IdentityGraph(rules)
    for one in evidence:
        outcome = graph.link(one)
        if outcome.profile_id is not None:
            assert set(outcome.identifiers) <= set(graph.identifiers_of(outcome.profile_id))
    for a, b in merges:
        profiles = [graph.resolve(a), graph.resolve(b)]
        if None in profiles or profiles[0] == profiles[1]:
            continue
        with contextlib.suppress(FailedPrecondition):
            graph.merge([p for p in profiles if p], reason="property")
    assert_consistent(graph)


@PROPERTY
@given(evidence=items, seed=st.randoms(use_true_random=False))
def test_without_limits_item_order_never_changes_the_partition_and_rebuild_agrees(
    evidence: list[Evidence], seed: Any
) -> None:
    rules = no_limits(max_profiles_per_identifier=0)
    in_order = IdentityGraph(rules)
    for one in evidence:
        in_order.link(one)
    shuffled = list(evidence)
    seed.shuffle(shuffled)
    reordered = IdentityGraph(rules)
    for one in shuffled:
        reordered.link(one)
    assert partition(in_order) == partition(reordered)
    assert_consistent(in_order)

    links = [[i for i in one.identifiers if not rules.is_blocked(i)] for one in evidence]
    rebuilt = rebuild([link for link in links if link], limits={})
    assert {frozenset(group) for group in rebuilt.groups()} == partition(in_order)
    assert not len(rebuilt.over_limit)


side_items = st.lists(
    st.lists(st.sampled_from(range(6)), min_size=1, max_size=3).map(sorted), min_size=1, max_size=6
)


@PROPERTY
@given(
    left=side_items,
    right=side_items,
    manual=st.booleans(),
    right_first=st.booleans(),
    bridge=st.tuples(st.integers(0, 20), st.integers(0, 20)),
)
def test_unmerge_after_merge_restores_both_profiles_their_ids_and_traits(
    left: list[list[int]],
    right: list[list[int]],
    manual: bool,
    right_first: bool,
    bridge: tuple[int, int],
) -> None:
    graph = IdentityGraph(no_limits())
    types = ["user_id", "email", "anonymous_id", "device_id", "phone", "crm_id"]

    def side(prefix: str, keys: list[list[int]]) -> str:
        profile = None
        for at, numbers in enumerate(keys):
            found = tuple(Identifier(types[n], f"{prefix}{n}") for n in numbers)
            # Chain each item to the previous one so that the side is one profile.
            chained = found if profile is None else (*found, graph.identifiers_of(profile)[0])
            profile = graph.link(Evidence(chained, {"name": f"{prefix}{at}"}, "web", at)).profile_id
        assert profile is not None
        return profile

    order = [("r", right), ("l", left)] if right_first else [("l", left), ("r", right)]
    first, second = (side(prefix, keys) for prefix, keys in order)
    before = {
        p: (graph.identifiers_of(p), graph.traits_of(p), graph.links_of(p)) for p in (first, second)
    }
    if manual:
        survivor = graph.merge([second, first], reason="property").record.surviving_profile_id
    else:
        a, b = before[first][0], before[second][0]
        survivor = (
            graph.link(
                Evidence((a[bridge[0] % len(a)], b[bridge[1] % len(b)]), {}, "web", 99)
            ).profile_id
            or ""
        )
    assert survivor == first and graph.canonical(second) == first

    graph.unmerge(survivor, before[second][0], reason="property")
    for profile_id, (members, traits, links) in before.items():
        assert graph.identifiers_of(profile_id) == members
        assert graph.links_of(profile_id) == links
        assert graph.canonical(profile_id) == profile_id
        assert graph.traits_of(profile_id) == traits
        assert all(graph.resolve(m) == profile_id for m in members)
    assert len(graph) == 2
    assert_consistent(graph)
