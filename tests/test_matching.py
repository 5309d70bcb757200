"""Probabilistic record matching: comparators, blocking, EM, accuracy on noisy data, linking,
explanations, proto converters and the ``records match`` command."""

from __future__ import annotations

import argparse
import csv
import random
import string
from collections.abc import Iterator
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from profilemesh.identity.v1 import matching_pb2
from profilemesh.ingestion.v1 import record_pb2
from profilemesh.services.identity.matching import (
    DEFAULT,
    Comparator,
    MatchSettings,
    RecordRef,
    match_records,
)
from profilemesh.services.identity.matching import proto as convert
from profilemesh.services.identity.matching.attributes import AttributeKind as Kind
from profilemesh.services.identity.matching.attributes import attribute_of_column, normalise
from profilemesh.services.identity.matching.blocking import candidate_pairs, soundex
from profilemesh.services.identity.matching.comparators import ScoreCache, comparison_levels
from profilemesh.services.identity.matching.em import (
    LevelLayout,
    expectation_maximisation,
    u_from_random_pairs,
)
from profilemesh.services.identity.matching.encoding import EncodedSides, PairCodes, Vocabulary
from profilemesh.services.identity.matching.library import (
    block_on,
    block_on_swapped,
    damerau_levenshtein_level,
    date_within_level,
    else_level,
    exact_level,
    exact_match,
    jaccard_level,
    jaro_winkler_level,
    levenshtein_level,
    name_comparison,
    nickname_level,
    null_level,
    numeric_within_level,
    swapped_day_month_level,
    token_set_level,
)
from profilemesh.services.identity.matching.records import load_records
from profilemesh.services.identity.matching.settings import Comparison, ComparisonLevel
from profilemesh.services.records_command import add_records_parser, run_records
from profilemesh.shared.errors import InvalidArgument

# Comparators and levels ---------------------------------------------------------------------


def level_of(
    level: ComparisonLevel, left: str | None, right: str | None, attribute: str = "value"
) -> str:
    """The label a pair of values gets in a comparison of null, ``level`` and else."""
    comparison = Comparison(
        name="c", attribute=attribute, levels=(null_level(), level, else_level())
    )
    return labels_of(comparison, [(left, right)])[0]


def labels_of(
    comparison: Comparison,
    pairs: list[tuple[str | None, str | None]],
    cross: dict[str, list[tuple[str | None, str | None]]] | None = None,
) -> list[str]:
    """The level labels of value pairs (already normalised), one pair per left/right record."""
    vocabulary = Vocabulary()
    sides = EncodedSides(vocabulary)
    for attribute, values in {comparison.attribute: pairs, **(cross or {})}.items():
        sides.left[attribute] = vocabulary.encode(a for a, _ in values)
        sides.right[attribute] = vocabulary.encode(b for _, b in values)
    positions = np.arange(len(pairs))
    codes = PairCodes(sides, positions, positions)
    levels = comparison_levels(comparison, codes, ScoreCache(vocabulary, len(pairs)))
    return [comparison.levels[level].label for level in levels]


def test_exact_level_needs_equal_values() -> None:
    assert level_of(exact_level(), "smith", "smith") == "exact"
    assert level_of(exact_level(), "smith", "smyth") == "else"


def test_missing_values_fall_in_the_null_level_whatever_else_holds() -> None:
    assert level_of(exact_level(), None, "smith") == "null"
    assert level_of(exact_level(), "smith", None) == "null"


def test_jaro_winkler_level_passes_typos_at_its_threshold_only() -> None:
    assert level_of(jaro_winkler_level(0.9), "martha", "marhta") == "jaro_winkler_0.9"
    assert level_of(jaro_winkler_level(0.9), "martha", "jones") == "else"
    assert level_of(jaro_winkler_level(0.99), "martha", "marhta") == "else"


def test_damerau_levenshtein_counts_a_transposition_as_one_edit() -> None:
    assert level_of(damerau_levenshtein_level(1), "1234567", "1243567") == "damerau_levenshtein_1"
    assert level_of(levenshtein_level(1), "1234567", "1243567") == "else"
    assert level_of(levenshtein_level(2), "1234567", "1243567") == "levenshtein_2"


def test_jaccard_level_tolerates_reordered_words() -> None:
    assert level_of(jaccard_level(0.5), "flat 2 high street", "high street flat 2") == (
        "jaccard_0.5"
    )
    assert level_of(jaccard_level(0.5), "high street", "low road") == "else"


def test_date_levels_accept_near_dates_and_swapped_day_and_month() -> None:
    assert level_of(date_within_level(31), "1980-03-04", "1980-03-20") == "within_31_days"
    assert level_of(date_within_level(31), "1980-03-04", "1981-03-04") == "else"
    assert level_of(swapped_day_month_level(), "1980-03-04", "1980-04-03") == "day_month_swapped"
    assert level_of(swapped_day_month_level(), "1980-03-04", "1981-04-03") == "else"
    # An impossible date is no date: no day difference, but its digits can still be compared.
    assert level_of(date_within_level(31), "1980-13-04", "1980-12-04") == "else"


def test_numeric_level_compares_within_tolerance() -> None:
    assert level_of(numeric_within_level(2), "10", "11.5") == "within_2"
    assert level_of(numeric_within_level(2), "10", "13") == "else"
    assert level_of(numeric_within_level(2), "10", "ten") == "else"


def test_nickname_level_knows_forms_of_a_given_name() -> None:
    assert level_of(nickname_level(), "bill", "william") == "nickname"
    assert level_of(nickname_level(), "peggy", "margaret") == "nickname"
    assert level_of(nickname_level(), "bill", "robert") == "else"


def test_swapped_level_recognises_given_name_and_surname_exchanged() -> None:
    comparison = name_comparison("first_name", swapped_with="last_name")
    labels = labels_of(
        comparison,
        [("john", "smith"), ("john", "john")],
        cross={"last_name": [("smith", "john"), ("smith", "smith")]},
    )
    assert labels == ["swapped_with_last_name_0.9", "exact"]


def test_in_other_field_level_finds_a_name_typed_into_the_other_field_either_way() -> None:
    comparison = name_comparison("first_name", in_other_field="last_name")
    labels = labels_of(
        comparison,
        [("james", "howie"), ("gillian", "lodge"), ("anna", "zoe")],
        cross={"last_name": [("coleman", "james"), ("lodge", "adele"), ("lee", "ray")]},
    )
    assert labels == ["in_other_field_last_name", "in_other_field_last_name", "else"]


def test_token_set_level_ignores_word_order_and_a_missing_line() -> None:
    level = token_set_level(0.8)
    assert level_of(level, "12 high street flat 2 oxford", "flat 2 12 high street oxford") == (
        "token_set_0.8"
    )
    assert level_of(level, "12 high street oxford", "12 high street oxford ox1 4aa") == (
        "token_set_0.8"
    )
    assert level_of(level, "12 high street oxford", "7 mill lane leeds") == "else"


def test_levels_are_tried_in_order_and_the_first_that_holds_wins() -> None:
    comparison = name_comparison("name", thresholds=(0.9, 0.7))
    labels = labels_of(
        comparison, [("smith", "smith"), ("smith", "smiht"), ("smith", "smithers"), (None, "x")]
    )
    assert labels == ["exact", "jaro_winkler_0.9", "jaro_winkler_0.9", "null"]
    assert labels_of(comparison, [("anna", "zoe")]) == ["else"]


def test_settings_reject_malformed_comparisons() -> None:
    with pytest.raises(ValueError, match="ELSE"):
        Comparison(name="c", attribute="a", levels=(null_level(), exact_level()))
    with pytest.raises(ValueError, match="threshold"):
        jaro_winkler_level(1.5)


# Attributes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("column", "attribute"),
    [
        ("given_name", "first_name"),
        ("surname", "last_name"),
        ("soc_sec_id", "national_id"),
        ("date_of_birth", "dob"),
        ("address_1", "street"),
        ("suburb", "city"),
        ("postcode", "postcode"),
        ("First Name", "first_name"),
        ("LastName", "last_name"),
        ("zip", "postcode"),
        ("Email Address", "email"),
        ("attributes.address.postcode", "postcode"),
        ("identifiers.email", "email"),
        ("attributes.loyalty_tier", "loyalty_tier"),
    ],
)
def test_febrl_and_crm_columns_map_onto_canonical_attributes(column: str, attribute: str) -> None:
    assert attribute_of_column(column) == attribute


def test_values_are_normalised_by_kind() -> None:
    assert normalise(Kind.NAME, "  O'Brien-Smith ") == "obrien smith"
    assert normalise(Kind.NAME, "Zoë") == "zoe"
    assert normalise(Kind.DATE, "19560409") == "1956-04-09"
    assert normalise(Kind.DATE, "1956-04-09T00:00:00Z") == "1956-04-09"
    assert normalise(Kind.DATE, "09/04/1956") == "1956-04-09"
    assert normalise(Kind.PHONE, "+44 7700 900123") == normalise(Kind.PHONE, "07700 900123")
    assert normalise(Kind.EMAIL, " Ann@Example.COM ") == "ann@example.com"
    assert normalise(Kind.POSTCODE, "SW1A 1AA") == "sw1a1aa"
    assert normalise(Kind.TEXT, "nan") is None
    assert normalise(Kind.TEXT, float("nan")) is None


# Blocking -----------------------------------------------------------------------------------


def records(rows: list[dict[str, Any]], source: str = "s") -> Any:
    return load_records(rows, id_column="id", source=source)


def pairs_of(found: Any, left: Any, right: Any = None) -> set[tuple[str, str]]:
    other = right or left
    return {
        (left.refs[i].record_id, other.refs[j].record_id)
        for i, j in zip(found.left_index.tolist(), found.right_index.tolist(), strict=True)
    }


PEOPLE: list[dict[str, Any]] = [
    {"id": "1", "first_name": "Ann", "last_name": "Lee", "dob": "1980-01-02"},
    {"id": "2", "first_name": "ann", "last_name": "LEE", "dob": "1990-05-06"},
    {"id": "3", "first_name": "Lee", "last_name": "Ann", "dob": "1970-01-01"},
    {"id": "4", "first_name": "Bob", "last_name": "Ray", "dob": "1980-01-02"},
    {"id": "5", "first_name": "Cy", "last_name": None, "dob": None},
]


def test_blocking_pairs_records_that_agree_on_every_key_once_without_self_pairs() -> None:
    people = records(PEOPLE)
    found = candidate_pairs([block_on("first_name", "last_name")], people, max_pairs=1000)
    assert pairs_of(found, people) == {("1", "2")}
    found = candidate_pairs([block_on("dob")], people, max_pairs=1000)
    assert pairs_of(found, people) == {("1", "4")}


def test_swapped_names_rule_finds_given_name_and_surname_exchanged() -> None:
    people = records(PEOPLE)
    found = candidate_pairs([block_on_swapped("first_name", "last_name")], people, max_pairs=1000)
    assert pairs_of(found, people) == {("1", "3"), ("2", "3")}


def test_blocking_union_keeps_the_first_rule_that_found_each_pair() -> None:
    people = records(PEOPLE)
    rules = [block_on("dob"), block_on("first_name", "last_name"), block_on("last_name")]
    found = candidate_pairs(rules, people, max_pairs=1000)
    assert pairs_of(found, people) == {("1", "2"), ("1", "4")}
    by_pair = dict(zip(sorted(pairs_of(found, people)), found.rule.tolist(), strict=True))
    assert by_pair == {("1", "2"): 1, ("1", "4"): 0}


def test_link_mode_pairs_only_across_the_two_inputs() -> None:
    left = records(PEOPLE[:2], "crm")
    right = records([{**PEOPLE[0], "id": "a"}, {**PEOPLE[3], "id": "b"}], "billing")
    found = candidate_pairs([block_on("first_name", "last_name")], left, right, max_pairs=1000)
    assert pairs_of(found, left, right) == {("1", "a"), ("2", "a")}


def test_a_rule_too_broad_for_the_input_is_skipped_and_reported() -> None:
    people = records([{"id": str(i), "state": "nsw", "dob": f"19{i:02d}"} for i in range(50)])
    found = candidate_pairs([block_on("state"), block_on("dob")], people, max_pairs=100)
    assert len(found) == 0
    assert found.oversized and "state" in found.oversized[0]
    with pytest.raises(InvalidArgument):
        candidate_pairs([block_on("state")], people, max_pairs=100)


def test_soundex_codes_names_that_sound_alike() -> None:
    assert soundex("robert") == soundex("rupert") == "r163"
    assert soundex("ashcraft") == "a261"
    assert soundex("tymczak") == "t522"


# EM -----------------------------------------------------------------------------------------


def test_em_recovers_known_m_u_and_match_rate() -> None:
    rng = np.random.default_rng(7)
    true_m = [np.array([0.85, 0.1, 0.05]), np.array([0.9, 0.1]), np.array([0.7, 0.2, 0.1])]
    true_u = [np.array([0.01, 0.04, 0.95]), np.array([0.1, 0.9]), np.array([0.05, 0.15, 0.8])]
    rate, size = 0.1, 40_000
    matches = rng.random(size) < rate
    levels = np.empty((size, 3), dtype=np.int8)
    for column, (m, u) in enumerate(zip(true_m, true_u, strict=True)):
        levels[matches, column] = rng.choice(len(m), matches.sum(), p=m)
        levels[~matches, column] = rng.choice(len(u), (~matches).sum(), p=u)
    layouts = [
        LevelLayout.of(
            Comparison(
                name=f"c{k}",
                attribute=f"a{k}",
                levels=(
                    *(
                        exact_level().model_copy(update={"label": f"l{i}"})
                        for i in range(len(m) - 1)
                    ),
                    else_level(),
                ),
            )
        )
        for k, m in enumerate(true_m)
    ]
    # u starts from a rough guess, as random pairs would give, not from the truth.
    u_start = [np.full(len(u), 1 / len(u)) for u in true_u]
    result = expectation_maximisation(
        levels, layouts, u_start, max_iterations=200, tolerance=1e-6, match_rate_starts=[0.3]
    )
    assert result.converged
    assert result.match_rate == pytest.approx(rate, rel=0.1)
    for estimated, truth in zip(result.m, true_m, strict=True):
        np.testing.assert_allclose(estimated, truth, atol=0.03)
    for estimated, truth in zip(result.u, true_u, strict=True):
        np.testing.assert_allclose(estimated, truth, atol=0.03)


def test_u_from_random_pairs_never_reaches_zero_and_ignores_the_null_level() -> None:
    comparison = exact_match("x")
    levels = np.array([[1], [2], [2], [0]], dtype=np.int8)  # exact, else, else, null
    (u,) = u_from_random_pairs(levels, [LevelLayout.of(comparison)])
    assert u[0] == 1.0  # the null level carries no evidence
    assert u[1] > 0 and u[2] > u[1]
    assert u[1] + u[2] == pytest.approx(1.0)


# Synthetic person records -------------------------------------------------------------------

FIRST_NAMES = [
    "william",
    "robert",
    "margaret",
    "elizabeth",
    "james",
    "thomas",
    "catherine",
    "michael",
    "jennifer",
    "richard",
    "patricia",
    "susan",
    "daniel",
    "joseph",
    "matthew",
    "anthony",
    "christopher",
    "deborah",
    "samuel",
    "rebecca",
    "olivia",
    "liam",
    "noah",
    "emma",
    "ava",
    "sophia",
    "isabella",
    "mia",
    "amelia",
    "harper",
    "evelyn",
    "abigail",
    "ella",
    "lucas",
    "mason",
    "logan",
    "ethan",
    "jacob",
    "jackson",
    "aiden",
    "grace",
    "chloe",
    "zoe",
    "nora",
    "lily",
    "hannah",
    "leah",
    "aria",
    "riley",
    "layla",
    "scarlett",
    "victoria",
    "madison",
    "luna",
    "penelope",
    "stella",
    "hazel",
    "violet",
]
NICKNAMES = {
    "william": "bill",
    "robert": "bob",
    "margaret": "peggy",
    "elizabeth": "liz",
    "james": "jim",
    "thomas": "tom",
    "catherine": "kate",
    "michael": "mike",
    "jennifer": "jenny",
    "richard": "dick",
    "patricia": "trish",
    "daniel": "dan",
    "joseph": "joe",
    "matthew": "matt",
    "anthony": "tony",
    "christopher": "chris",
    "samuel": "sam",
    "rebecca": "becky",
}
LAST_NAMES = [
    "smith",
    "johnson",
    "williams",
    "brown",
    "jones",
    "garcia",
    "miller",
    "davis",
    "rodriguez",
    "martinez",
    "hernandez",
    "lopez",
    "gonzalez",
    "wilson",
    "anderson",
    "thomas",
    "taylor",
    "moore",
    "jackson",
    "martin",
    "lee",
    "perez",
    "thompson",
    "white",
    "harris",
    "sanchez",
    "clark",
    "ramirez",
    "lewis",
    "robinson",
    "walker",
    "young",
    "allen",
    "king",
    "wright",
    "scott",
    "torres",
    "nguyen",
    "hill",
    "flores",
    "green",
    "adams",
    "nelson",
    "baker",
    "hall",
    "rivera",
    "campbell",
    "mitchell",
    "carter",
    "roberts",
    "gomez",
    "phillips",
    "evans",
    "turner",
    "diaz",
    "parker",
    "cruz",
    "edwards",
    "collins",
    "reyes",
    "stewart",
    "morris",
    "morales",
    "murphy",
    "cook",
    "rogers",
    "gutierrez",
    "ortiz",
    "morgan",
    "cooper",
    "peterson",
    "bailey",
    "reed",
]
CITIES = [
    "springfield",
    "riverside",
    "franklin",
    "greenville",
    "bristol",
    "clinton",
    "fairview",
    "salem",
    "madison",
    "georgetown",
    "arlington",
    "ashland",
    "dover",
    "oxford",
    "jackson",
    "burlington",
    "manchester",
    "milton",
]
STREETS = [
    "oak",
    "maple",
    "cedar",
    "pine",
    "elm",
    "washington",
    "lake",
    "hill",
    "park",
    "main",
    "church",
    "mill",
    "river",
]


def typo(rng: random.Random, text: str) -> str:
    """One keyboard error: a substitution, a deletion, an insertion or two letters swapped."""
    if len(text) < 3:
        return text
    i = rng.randrange(1, len(text) - 1)
    kind = rng.randrange(4)
    if kind == 0:
        return text[:i] + rng.choice(string.ascii_lowercase) + text[i + 1 :]
    if kind == 1:
        return text[:i] + text[i + 1 :]
    if kind == 2:
        return text[:i] + rng.choice(string.ascii_lowercase) + text[i:]
    return text[: i - 1] + text[i] + text[i - 1] + text[i + 1 :]


def person(rng: random.Random, number: int) -> dict[str, Any]:
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    return {
        "first_name": first,
        "last_name": last,
        "dob": f"{rng.randint(1940, 2002)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        "email": f"{first}.{last}{rng.randint(1, 99)}@{rng.choice(['mail.com', 'post.net'])}",
        "phone": f"555{rng.randint(1000000, 9999999)}",
        "address": f"{rng.randint(1, 300)} {rng.choice(STREETS)} street",
        "city": rng.choice(CITIES),
        "zip": f"{rng.randint(10000, 99999)}",
    }


def household_member(rng: random.Random, of: dict[str, Any]) -> dict[str, Any]:
    """Someone else at the same address with the same surname: not a duplicate."""
    other = person(rng, 0)
    return {**other, **{k: of[k] for k in ("last_name", "address", "city", "zip")}}


def noisy_copy(rng: random.Random, original: dict[str, Any]) -> dict[str, Any]:
    """The same person typed again: typos, nicknames, swapped names and dates, missing values,
    another phone format."""
    copy = dict(original)
    for name in ("first_name", "last_name"):
        if rng.random() < 0.25:
            copy[name] = typo(rng, copy[name])
    if rng.random() < 0.2 and original["first_name"] in NICKNAMES:
        copy["first_name"] = NICKNAMES[original["first_name"]]
    if rng.random() < 0.08:
        copy["first_name"], copy["last_name"] = copy["last_name"], copy["first_name"]
    if rng.random() < 0.1:
        year, month, day = copy["dob"].split("-")
        if int(day) <= 12:
            copy["dob"] = f"{year}-{day}-{month}"
        else:
            copy["dob"] = typo(rng, copy["dob"])
    if rng.random() < 0.15:
        copy["email"] = typo(rng, copy["email"]).upper()
    if rng.random() < 0.3:
        phone = copy["phone"]
        copy["phone"] = f"+1 ({phone[:3]}) {phone[3:6]}-{phone[6:]}"
    if rng.random() < 0.15:
        copy["address"] = typo(rng, copy["address"])
    if rng.random() < 0.1:
        copy["zip"] = typo(rng, copy["zip"])
    for field in ("dob", "email", "phone", "address", "city", "zip"):
        if rng.random() < 0.12:
            copy[field] = None
    return copy


def synthetic_people(
    seed: int, people: int = 700
) -> tuple[list[dict[str, Any]], set[frozenset[str]]]:
    """Person records, ~40% with one or two noisy duplicates, some with household members,
    shuffled; and the true duplicate pairs."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    truth: set[frozenset[str]] = set()
    for number in range(people):
        original = person(rng, number)
        group = [{"id": f"p{number}", **original}]
        for copy in range(rng.choice([0, 0, 0, 1, 1, 2])):
            group.append({"id": f"p{number}-d{copy}", **noisy_copy(rng, original)})
        if rng.random() < 0.1:
            rows.append({"id": f"h{number}", **household_member(rng, original)})
        truth.update(frozenset(pair) for pair in combinations([r["id"] for r in group], 2))
        rows.extend(group)
    rng.shuffle(rows)
    return rows, truth


def precision_recall(found: set[frozenset[str]], truth: set[frozenset[str]]) -> tuple[float, float]:
    correct = len(found & truth)
    return correct / max(1, len(found)), correct / len(truth)


@pytest.fixture(scope="module")
def people() -> tuple[list[dict[str, Any]], set[frozenset[str]]]:
    return synthetic_people(seed=11)


@pytest.fixture(scope="module")
def deduplicated(people: tuple[list[dict[str, Any]], set[frozenset[str]]]) -> Any:
    return match_records(people[0])


def test_noisy_duplicates_are_found_with_high_precision_and_recall(
    people: tuple[list[dict[str, Any]], set[frozenset[str]]], deduplicated: Any
) -> None:
    _, truth = people
    found = {frozenset((p.left.record_id, p.right.record_id)) for p in deduplicated.pairs}
    precision, recall = precision_recall(found, truth)
    assert precision > 0.95, precision
    assert recall > 0.9, recall
    assert deduplicated.model.converged
    assert all(p.match_probability >= DEFAULT.match_threshold for p in deduplicated.pairs)


def test_clusters_group_duplicates_and_keep_household_members_apart(
    deduplicated: Any,
) -> None:
    clusters = deduplicated.clusters
    with_copies = [ref for ref in clusters if ref.record_id.endswith("-d0")]
    together = sum(
        clusters[ref] == clusters[RecordRef(ref.source, ref.record_id.split("-")[0])]
        for ref in with_copies
    )
    assert together / len(with_copies) > 0.9
    households = [ref for ref in clusters if ref.record_id.startswith("h")]
    apart = sum(
        clusters[ref] != clusters[RecordRef(ref.source, "p" + ref.record_id[1:])]
        for ref in households
    )
    assert apart / len(households) > 0.9
    sizes = [len(members) for members in deduplicated.cluster_list()]
    assert sizes == sorted(sizes, reverse=True) and sum(sizes) == len(clusters)


def test_estimates_say_agreement_is_evidence_for_a_match(deduplicated: Any) -> None:
    model = deduplicated.model
    assert 0 < model.probability_two_random_records_match < 0.01
    for comparison in model.comparisons:
        exact = model.level(comparison, "exact")
        assert exact.m_probability > exact.u_probability, comparison
        assert model.level(comparison, "else").weight < 0, comparison
    assert model.level("first_name", "nickname").weight > 0
    assert model.level("dob", "day_month_swapped").weight > 0


def test_explanation_lists_every_comparison_and_its_weights_add_up(deduplicated: Any) -> None:
    pair = deduplicated.pairs[0]
    explanation = deduplicated.explain(pair)
    assert [c.comparison for c in explanation.comparisons] == list(deduplicated.model.comparisons)
    for c in explanation.comparisons:
        assert 0 < c.m_probability <= 1 and 0 < c.u_probability <= 1
        assert c.weight == pytest.approx(np.log2(c.m_probability / c.u_probability))
    total = explanation.prior_weight + sum(c.weight for c in explanation.comparisons)
    assert total == pytest.approx(pair.match_weight)
    assert explanation.match_probability == pytest.approx(pair.match_probability)
    assert explanation.blocking_rule in deduplicated.model.blocking_rules
    assert any("first_name" in line for line in explanation.lines())


def test_a_shared_rare_name_weighs_more_than_a_shared_common_one(deduplicated: Any) -> None:
    exact_pairs = []
    for pair in deduplicated.scored_candidates():
        surname = next(
            c for c in deduplicated.explain(pair).comparisons if c.comparison == "last_name"
        )
        if surname.level == "exact":
            exact_pairs.append(surname)
        if len(exact_pairs) == 200:
            break
    by_frequency = sorted(exact_pairs, key=lambda c: c.u_probability)
    assert by_frequency[0].u_probability < by_frequency[-1].u_probability
    assert by_frequency[0].weight > by_frequency[-1].weight


def test_explain_works_for_records_no_rule_paired(deduplicated: Any) -> None:
    refs = list(deduplicated.clusters)
    candidates = {(p.left, p.right) for p in deduplicated.scored_candidates()}
    a, b = next(
        (x, y)
        for x, y in combinations(refs[:50], 2)
        if (x, y) not in candidates and (y, x) not in candidates
    )
    explanation = deduplicated.explain((a, b))
    assert explanation.blocking_rule == ""
    assert explanation.match_probability < 0.5


def test_matching_breaks_when_comparisons_carry_no_information(
    people: tuple[list[dict[str, Any]], set[frozenset[str]]],
) -> None:
    """A guard on the guard: a model that ignores names and dates must do visibly worse."""
    rows, truth = people
    weak = MatchSettings(blocking_rules=DEFAULT.blocking_rules, comparisons=(exact_match("city"),))
    found = {
        frozenset((p.left.record_id, p.right.record_id))
        for p in match_records(rows, settings=weak).pairs
    }
    precision, recall = precision_recall(found, truth)
    assert precision < 0.95 or recall < 0.9


def test_linking_two_inputs_finds_the_shared_people() -> None:
    rng = random.Random(5)
    crm, billing, truth = [], [], set()
    for number in range(500):
        original = person(rng, number)
        if rng.random() < 0.7:
            crm.append({"id": f"c{number}", **original})
        if rng.random() < 0.7:
            billing.append({"id": f"b{number}", **noisy_copy(rng, original)})
        if crm and billing and crm[-1]["id"][1:] == billing[-1]["id"][1:] == str(number):
            truth.add((f"c{number}", f"b{number}"))
    result = match_records(crm, billing, left_source="crm", right_source="billing")
    assert result.mode == "link"
    assert {p.left.source for p in result.pairs} == {"crm"}
    assert {p.right.source for p in result.pairs} == {"billing"}
    found = {(p.left.record_id, p.right.record_id) for p in result.pairs}
    precision, recall = precision_recall(
        {frozenset(f) for f in found}, {frozenset(t) for t in truth}
    )
    assert precision > 0.95 and recall > 0.9, (precision, recall)
    assert len(result.clusters) == len(crm) + len(billing)


def test_pyarrow_tables_and_lists_of_dicts_give_the_same_result() -> None:
    rows, _ = synthetic_people(seed=3, people=150)
    columns = {key: [row.get(key) for row in rows] for key in rows[0]}
    from_rows = match_records(rows)
    from_table = match_records(pa.table(columns))
    assert from_rows.pairs == from_table.pairs


def test_input_problems_are_invalid_arguments_naming_the_field() -> None:
    with pytest.raises(InvalidArgument, match="no id column 'id'"):
        match_records([{"key": "1", "first_name": "ann"}])
    with pytest.raises(InvalidArgument, match="repeats"):
        match_records([{"id": "1", "first_name": "a"}, {"id": "1", "first_name": "b"}])
    with pytest.raises(InvalidArgument) as raised:
        match_records([{"id": "1", "colour": "red"}, {"id": "2", "colour": "blue"}])
    assert raised.value.violations[0].field == "settings.comparisons"


# Proto converters ---------------------------------------------------------------------------


def proto_expressible_settings() -> MatchSettings:
    return MatchSettings(
        blocking_rules=(block_on("last_name", "dob"), block_on("email")),
        comparisons=(
            Comparison(
                name="last_name",
                attribute="last_name",
                levels=(
                    null_level(),
                    exact_level(),
                    jaro_winkler_level(0.9),
                    ComparisonLevel(label="else", comparator=Comparator.ELSE, m_probability=0.1),
                ),
            ),
            exact_match("email"),
        ),
        match_threshold=0.9,
        max_em_iterations=10,
    )


def test_settings_survive_a_round_trip_through_the_proto() -> None:
    settings = proto_expressible_settings()
    assert convert.settings_from_proto(convert.settings_to_proto(settings)) == settings


def test_proto_zero_values_mean_the_contract_defaults() -> None:
    message = convert.settings_to_proto(proto_expressible_settings())
    message.match_threshold = 0
    message.max_em_iterations = 0
    settings = convert.settings_from_proto(message)
    assert settings.match_threshold == 0.95
    assert settings.max_em_iterations == 25
    assert settings.probability_two_random_records_match is None


def test_the_default_settings_survive_a_round_trip_through_the_proto() -> None:
    # Swapped-name blocking, cross-attribute levels, nicknames and term frequencies included.
    assert convert.settings_from_proto(convert.settings_to_proto(DEFAULT)) == DEFAULT


def test_invalid_proto_settings_name_the_offending_field() -> None:
    message = convert.settings_to_proto(proto_expressible_settings())
    message.comparisons[0].levels[2].comparator = matching_pb2.COMPARATOR_UNSPECIFIED
    with pytest.raises(InvalidArgument) as raised:
        convert.settings_from_proto(message)
    assert raised.value.violations[0].field == "settings.comparisons[0].levels[2].comparator"
    message = convert.settings_to_proto(proto_expressible_settings())
    message.comparisons[0].levels[2].threshold = 3
    with pytest.raises(InvalidArgument) as raised:
        convert.settings_from_proto(message)
    assert raised.value.violations[0].field.startswith("settings.comparisons[0].levels[2]")


def test_customer_records_from_proto_match_and_answer_as_a_response() -> None:
    rows, _ = synthetic_people(seed=4, people=120)
    messages = []
    for row in rows:
        message = record_pb2.CustomerRecord(source="crm", record_id=row["id"])
        message.attributes.update(
            {
                "first_name": row["first_name"],
                "last_name": row["last_name"],
                "dob": row["dob"] or "",
                "address": {"city": row["city"] or "", "postcode": row["zip"] or ""},
            }
        )
        if row["email"]:
            message.identifiers.add(type="email", value=row["email"])
        messages.append(message)
    result = match_records(
        convert.records_from_proto(messages),
        id_column=convert.RECORD_ID_COLUMN,
        source_column=convert.SOURCE_COLUMN,
    )
    assert {"first_name", "email", "address"} <= set(result.model.comparisons)
    response = convert.result_to_proto(result)
    address = next(c for c in response.matches[0].comparisons if c.comparison == "address")
    assert address.left_value  # assembled from attributes.address.city and .postcode
    assert len(response.matches) == len(result.pairs) > 0
    assert len(response.matches[0].comparisons) == len(result.model.comparisons)
    assert response.matches[0].left.source == "crm"
    assert sum(len(c.records) for c in response.clusters) == len(rows)
    assert response.model.candidate_pairs == result.model.candidate_pairs
    assert len(response.model.levels) == len(result.model.levels)


# The records command ------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="profilemesh")
    add_records_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(list(argv))


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    fields = list(rows[0])
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fields)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_records_match_writes_clusters_and_explanations(tmp_path: Path) -> None:
    rows, truth = synthetic_people(seed=8, people=200)
    source = write_csv(tmp_path / "people.csv", [{"customer_id": r.pop("id"), **r} for r in rows])
    out, pairs = tmp_path / "clusters.csv", tmp_path / "pairs.csv"
    args = parse(
        "records",
        "match",
        str(source),
        "--id-column",
        "customer_id",
        "--out",
        str(out),
        "--threshold",
        "0.9",
        "--explain",
        str(pairs),
    )
    assert run_records(args) == 0
    clusters = read_csv(out)
    assert list(clusters[0]) == ["record_id", "cluster_id"]
    assert len(clusters) == len(rows)
    cluster_of = {row["record_id"]: row["cluster_id"] for row in clusters}
    joined = sum(cluster_of[a] == cluster_of[b] for a, b in map(tuple, truth))
    assert joined / len(truth) > 0.9
    explained = read_csv(pairs)
    assert {"comparison", "level", "m_probability", "u_probability", "weight"} <= set(explained[0])
    assert all(float(row["match_probability"]) >= 0.9 for row in explained)


def test_records_match_links_two_files_with_their_names_as_sources(tmp_path: Path) -> None:
    rows, _ = synthetic_people(seed=9, people=100)
    first = write_csv(tmp_path / "crm.csv", rows[: len(rows) // 2])
    second = write_csv(tmp_path / "shop.csv", rows[len(rows) // 2 :])
    out = tmp_path / "links.csv"
    args = parse(
        "records", "match", str(first), str(second), "--id-column", "id", "--out", str(out)
    )
    assert run_records(args) == 0
    linked = read_csv(out)
    assert list(linked[0]) == ["source", "record_id", "cluster_id"]
    assert {row["source"] for row in linked} == {"crm.csv", "shop.csv"}
    assert len(linked) == len(rows)


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("missing_file", "cannot read"),
        ("missing_column", "no column 'customer_id'"),
        ("empty_file", "empty"),
        ("duplicate_ids", "repeats"),
        ("bad_settings", "--settings"),
    ],
)
def test_records_match_reports_bad_input_in_one_line_with_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], problem: str, message: str
) -> None:
    good = write_csv(tmp_path / "good.csv", [{"customer_id": "1", "first_name": "ann"}])
    files: dict[str, list[str]] = {
        "missing_file": [str(tmp_path / "nope.csv")],
        "missing_column": [str(write_csv(tmp_path / "x.csv", [{"id": "1", "name": "a"}]))],
        "empty_file": [str(tmp_path / "empty.csv")],
        "duplicate_ids": [
            str(write_csv(tmp_path / "d.csv", [{"customer_id": "1"}, {"customer_id": "1"}]))
        ],
        "bad_settings": [str(good), "--settings", str(tmp_path / "settings.yaml")],
    }
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "settings.yaml").write_text("match_threshold: 7\n")
    args = parse(
        "records",
        "match",
        *files[problem],
        "--id-column",
        "customer_id",
        "--out",
        str(tmp_path / "out.csv"),
    )
    assert run_records(args) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert "Traceback" not in captured.err


def test_records_match_refuses_a_threshold_outside_zero_to_one() -> None:
    with pytest.raises(SystemExit) as raised:
        parse(
            "records", "match", "f.csv", "--id-column", "id", "--out", "o.csv", "--threshold", "1.5"
        )
    assert raised.value.code == 2


def iter_levels(settings: MatchSettings) -> Iterator[ComparisonLevel]:
    for comparison in settings.comparisons:
        yield from comparison.levels


def test_default_settings_end_every_comparison_with_else_and_start_with_null() -> None:
    for comparison in DEFAULT.comparisons:
        assert comparison.levels[0].comparator is Comparator.EITHER_NULL
        assert comparison.levels[-1].comparator is Comparator.ELSE
    assert any(level.cross_attribute for level in iter_levels(DEFAULT))
