"""The demo data generator: seeded and repeatable, readable by the source connectors, and true
to its ground truth (who owns which id, who churned when, which records are whose)."""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from profilemesh.plugins.file_sources import CsvSource, JsonlSource
from profilemesh.services.cli import main
from profilemesh.services.generator import GeneratedData, Truth, generate, load_truth
from profilemesh.services.generator.crm import RATES
from profilemesh.services.generator.typos import swap_day_and_month
from profilemesh.services.ingestion.event_checks import EventChecker
from profilemesh.services.ingestion.tracking_plans import TrackingPlans
from profilemesh.shared.extension_points import JSONObject
from profilemesh.shared.record_rows import record_from_item
from profilemesh.shared.segment_json import event_from_json
from profilemesh.shared.settings import IngestionSettings

CUSTOMERS = 300
END = date(2025, 1, 1)


@dataclass(frozen=True)
class Generated:
    """One small data set, its ground truth and its events, shared by the tests."""

    data: GeneratedData
    truth: Truth
    events: list[dict[str, Any]]
    anonymous_ids: dict[str, tuple[str, ...]]

    def person_of(self, event: dict[str, Any]) -> str:
        """The person who sent ``event``: its anonymous id has one owner."""
        [person] = self.anonymous_ids[event["anonymousId"]]
        return person


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Generated:
    data = generate(tmp_path_factory.mktemp("demo"), customers=CUSTOMERS, seed=11, end=END)
    lines = data.events_path.read_text().splitlines()
    truth = load_truth(data.directory)
    events = [json.loads(line) for line in lines]
    return Generated(data, truth, events, truth.owners("anonymous_id"))


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _read(connector: CsvSource | JsonlSource) -> Iterator[JSONObject]:
    with connector:
        connector.check()
        for batch in connector.read(None):
            assert list(batch.problems) == []
            yield from batch.items


# -- determinism -----------------------------------------------------------------------------


def test_the_same_seed_size_and_end_write_the_same_files_and_another_seed_does_not(
    tmp_path: Path,
) -> None:
    first = generate(tmp_path / "a", customers=120, seed=3, end=END)
    second = generate(tmp_path / "b", customers=120, seed=3, end=END)
    other = generate(tmp_path / "c", customers=120, seed=4, end=END)

    files = _files(first.directory)
    assert set(files) == {
        "crm.csv",
        "events.jsonl",
        "leads.csv",
        "manifest.json",
        "truth/churn.parquet",
        "truth/leads.parquet",
        "truth/people.parquet",
        "truth/records.parquet",
    }
    assert files == _files(second.directory)
    assert files["events.jsonl"] != _files(other.directory)["events.jsonl"]


# -- the files read as the connectors read them ----------------------------------------------


def test_every_event_line_converts_to_an_event_that_ingestion_accepts(
    generated: Generated, tmp_path: Path
) -> None:
    items = list(_read(JsonlSource({"path": str(generated.data.events_path), "batch_size": 5000})))
    events = [event_from_json(item, correct_clock_skew=False) for item in items]
    checker = EventChecker(IngestionSettings(), TrackingPlans(tmp_path / "plans.json"))

    accepted, rejected = checker.check([e.SerializeToString() for e in events], "shop", 0)

    assert len(events) == generated.data.events == len(accepted)
    assert rejected == []
    times = [e.timestamp.ToNanoseconds() for e in events]
    assert times == sorted(times)
    start = datetime(2024, 1, 1, tzinfo=UTC).timestamp() * 1e9
    assert start <= times[0] and times[-1] < datetime(2025, 1, 1, tzinfo=UTC).timestamp() * 1e9
    kinds = Counter(e.WhichOneof("body") for e in events)
    names = Counter(e.track.event for e in events if e.HasField("track"))
    assert set(kinds) == {"identify", "page", "screen", "track"}
    assert {"Product Viewed", "Added to Cart", "Order Completed", "Survey Answered"} <= set(names)


def test_the_events_carry_what_the_built_in_features_read(generated: Generated) -> None:
    orders = [e for e in generated.events if e.get("event") == "Order Completed"]
    views = [e for e in generated.events if e.get("event") == "Product Viewed"]
    surveys = [e for e in generated.events if e.get("event") == "Survey Answered"]

    assert all(o["properties"]["revenue"] > 0 and o["properties"]["products"] for o in orders)
    for order in orders:
        lines = order["properties"]["products"]
        total = sum(line["price"] * line["quantity"] for line in lines)
        assert order["properties"]["revenue"] == pytest.approx(total)
    assert all(v["properties"]["product_id"].startswith("SKU-") for v in views)
    assert all(
        s["properties"]["survey"] == "nps" and 0 <= s["properties"]["score"] <= 10 for s in surveys
    )
    devices = Counter(e["context"]["device"]["type"] for e in generated.events)
    assert set(devices) == {"mobile", "desktop", "tablet"}
    apps = [e for e in generated.events if "app" in e["context"]]
    assert {e["context"]["os"]["name"] for e in apps} <= {"iOS", "iPadOS", "Android"}
    assert all(e["context"]["device"]["id"] for e in apps)


@pytest.mark.parametrize("name", ["crm", "leads"])
def test_the_record_files_load_through_the_csv_connector_as_customer_records(
    generated: Generated, name: str
) -> None:
    recipe = generated.data.imports[name]
    assert recipe["connector"] == "csv"

    records = [record_from_item(item) for item in _read(CsvSource(recipe["config"]))]

    owners = generated.truth.record_owner()
    assert len(records) == sum(1 for source, _ in owners if source == name)
    assert all(r.source == name and (name, r.record_id) in owners for r in records)
    assert all(r.HasField("updated_at") for r in records)
    with_email = [r for r in records if "email" in r.attributes]
    assert with_email and all(any(i.type == "email" for i in r.identifiers) for r in with_email)
    assert all("first_name" in r.attributes and "last_name" in r.attributes for r in records)


# -- the ground truth ------------------------------------------------------------------------


def test_every_user_id_and_identify_email_belongs_to_the_person_who_sent_it(
    generated: Generated,
) -> None:
    users = generated.truth.owners("user_id")
    emails = generated.truth.owners("email")
    identifies = [e for e in generated.events if e["type"] == "identify"]

    for event in generated.events:
        if "userId" in event:
            assert users[event["userId"]] == (generated.person_of(event),)
    for event in identifies:
        assert "userId" in event
        assert emails[event["traits"]["email"]] == (generated.person_of(event),)
    signed_up = {p for p in generated.truth.people.column("user_id").to_pylist() if p}
    assert len(signed_up) == len({e["userId"] for e in identifies})
    consent = [e["traits"]["consent"] for e in identifies if "consent" in e["traits"]]
    assert len(consent) > 0.6 * len(identifies)
    assert {c["email"] for c in consent} == {True, False}


def test_people_browse_anonymously_before_their_first_identify_on_a_device(
    generated: Generated,
) -> None:
    signed_in: set[str] = set()
    anonymous_before = 0
    for event in generated.events:
        if event["type"] == "identify":
            signed_in.add(event["anonymousId"])
        elif "userId" not in event and event["anonymousId"] not in signed_in:
            anonymous_before += 1
    assert anonymous_before > 0.1 * len(generated.events)


def test_churned_people_have_no_events_from_their_churn_date_on(generated: Generated) -> None:
    churn = {row["person_id"]: row for row in generated.truth.churn.to_pylist()}
    last: dict[str, str] = {}
    for event in generated.events:
        last[generated.person_of(event)] = event["timestamp"]

    churned = [p for p, row in churn.items() if row["churned"]]
    assert 0.2 < len(churned) / CUSTOMERS < 0.45
    for person in churned:
        if person in last:
            assert last[person] < churn[person]["churn_date"].isoformat()
    assert all(row["churn_date"] is None for row in churn.values() if not row["churned"])


def test_a_family_tablet_is_one_device_id_shared_by_people_of_one_household(
    generated: Generated,
) -> None:
    people = {row["person_id"]: row for row in generated.truth.people.to_pylist()}
    shared = {d: p for d, p in generated.truth.owners("device_id").items() if len(p) > 1}

    assert shared
    for owners in shared.values():
        rows = [people[p] for p in owners]
        assert len({(r["household_id"], r["street"], r["last_name"]) for r in rows}) == 1
    households = Counter(row["household_id"] for row in people.values())
    sharing = sum(n for n in households.values() if n > 1)
    assert 0.08 < sharing / CUSTOMERS < 0.22


def test_crm_records_have_duplicates_errors_and_unlinkable_records_at_the_intended_rates(
    generated: Generated,
) -> None:
    records = [r for r in generated.truth.records.to_pylist() if r["source"] == "crm"]
    customers = len({r["person_id"] for r in records})
    errors = Counter(e for r in records for e in r["errors"])
    unlinkable = sum(not r["shares_identifier"] for r in records) / len(records)

    assert customers / CUSTOMERS == pytest.approx(RATES.in_crm, abs=0.06)
    assert sum(r["duplicate"] for r in records) / customers == pytest.approx(
        RATES.duplicate, abs=0.05
    )
    assert unlinkable == pytest.approx(RATES.no_shared_identifier, abs=0.06)
    for kind in ("nickname", "first_name_typo", "last_name_typo", "dob_missing", "phone_missing"):
        assert errors[kind] > 0, kind
    assert errors["phone_missing"] / len(records) >= RATES.phone_missing * 0.6


def test_each_recorded_error_is_in_the_crm_file(generated: Generated) -> None:
    people = {row["person_id"]: row for row in generated.truth.people.to_pylist()}
    truth = {r["record_id"]: r for r in generated.truth.records.to_pylist()}
    with generated.data.crm_path.open(newline="") as file:
        rows = [{k: v for k, v in row.items() if v} for row in csv.DictReader(file)]

    for row in rows:
        record = truth[row["record_id"]]
        person = people[record["person_id"]]
        errors = set(record["errors"])
        if "dob_swapped" in errors:
            assert row["dob"] == swap_day_and_month(person["dob"].isoformat())
        if not errors & {"dob_swapped", "dob_typo", "dob_missing"}:
            assert row["dob"] == person["dob"].isoformat()
        if "dob_missing" in errors:
            assert "dob" not in row
        if "email_missing" in errors:
            assert "email" not in row
        elif "email" in row and "email_typo" not in errors:
            assert row["email"].lower() in {e.lower() for e in person["emails"]}
        if not errors & {"nickname", "first_name_typo", "swapped_names", "upper_case"}:
            assert row["first_name"] == person["first_name"]


@pytest.mark.parametrize("name", ["crm", "leads"])
def test_every_email_and_phone_of_a_record_belongs_to_the_records_person(
    generated: Generated, name: str
) -> None:
    emails = generated.truth.owners("email")
    phones = generated.truth.owners("phone")
    owner = generated.truth.record_owner()

    for item in _read(CsvSource(generated.data.imports[name]["config"])):
        record = record_from_item(item)
        person = (owner[(name, record.record_id)],)
        for identifier in record.identifiers:
            if identifier.type == "email":
                assert emails[identifier.value.lower()] == person
            else:
                digits = "".join(ch for ch in identifier.value if ch.isdigit())[-10:]
                assert phones[f"+1{digits}"] == person


def test_records_said_to_share_no_identifier_share_none_with_the_events(
    generated: Generated,
) -> None:
    emails, phones = set(), set()
    for event in generated.events:
        if event["type"] == "identify":
            emails.add(event["traits"]["email"].lower())
            if "phone" in event["traits"]:
                phones.add(event["traits"]["phone"][-10:])
    truth = {r["record_id"]: r["shares_identifier"] for r in generated.truth.records.to_pylist()}

    for item in _read(CsvSource(generated.data.imports["crm"]["config"])):
        record = record_from_item(item)
        attributes = json_format.MessageToDict(record.attributes)
        digits = "".join(ch for ch in attributes.get("phone", "") if ch.isdigit())[-10:]
        shares = attributes.get("email", "").lower() in emails or digits in phones
        assert shares == truth[record.record_id], record.record_id


def test_converted_leads_booked_a_demo_at_their_conversion_time(generated: Generated) -> None:
    leads = generated.truth.leads.to_pylist()
    demos = {
        generated.person_of(e): e["timestamp"]
        for e in generated.events
        if e.get("event") == "Demo Booked"
    }

    assert len(leads) == round(0.1 * CUSTOMERS)
    assert {lead["person_id"] for lead in leads if lead["converted"]} == set(demos)
    for lead in leads:
        if lead["converted"]:
            at = lead["converted_at"].isoformat(timespec="milliseconds").replace("+00:00", "Z")
            assert demos[lead["person_id"]] == at


def test_orders_peak_in_november_and_december(generated: Generated) -> None:
    months = Counter(
        int(e["timestamp"][5:7]) for e in generated.events if e.get("event") == "Order Completed"
    )
    share = (months[11] + months[12]) / sum(months.values())

    assert share > 1.3 * 2 / 12


# -- the command -----------------------------------------------------------------------------


def test_the_generate_command_writes_the_data_set_and_prints_one_summary_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "data"

    status = main(
        ["generate", "--customers", "40", "--seed", "5", "--out", str(out), "--end", "2025-03-01"]
    )

    assert status == 0
    [line] = capsys.readouterr().out.splitlines()
    manifest = json.loads((out / "manifest.json").read_text())
    assert f"{manifest['counts']['events']:,} events" in line
    assert (manifest["customers"], manifest["seed"], manifest["end"]) == (40, 5, "2025-03-01")
    assert manifest["imports"]["events"] == {
        "source": "shop",
        "connector": "jsonl",
        "config": {"path": "events.jsonl", "kind": "events"},
    }


def test_the_generate_command_refuses_a_file_as_its_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "taken"
    file.write_text("")

    assert main(["generate", "--out", str(file)]) == 2
    assert "is a file" in capsys.readouterr().err
