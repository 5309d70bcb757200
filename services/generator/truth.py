"""The ground truth: who is who, who churned when, which leads converted, whose record is
which. Written next to the data as Parquet, read back by :func:`load_truth` for evaluations.

- ``people.parquet``: one row per person with every identifier and record id they own
  (``user_id`` only when they signed up; a family tablet's device id is owned by each member;
  ``phone`` is their mobile, ``phones`` adds the other numbers their records carry,
  ``mistyped_emails`` the addresses that exist only as typing errors in their records);
- ``churn.parquet``: ``churned`` and ``churn_date`` (the first day without activity: every
  event of the person is before it), the latent hazard and the last event's time;
- ``leads.parquet``: per lead, ``converted`` and when (the ``Demo Booked`` event);
- ``records.parquet``: per CRM and leads record, its person, whether it is a duplicate,
  whether it shares an identifier with the web data, and the errors entered in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from profilemesh.services.generator.crm import SOURCE as CRM_SOURCE
from profilemesh.services.generator.crm import shares_web_identifier
from profilemesh.services.generator.leads import LEADS_SOURCE
from profilemesh.services.generator.sessions import Kind
from profilemesh.services.generator.world import World

TRUTH_FILES = ("people", "churn", "leads", "records")
"""The tables of the ground truth, each in ``truth/<name>.parquet``."""
IDENTIFIER_COLUMNS = {
    "user_id": ("user_id",),
    "email": ("emails", "mistyped_emails"),
    "phone": ("phones",),
    "anonymous_id": ("anonymous_ids",),
    "device_id": ("device_ids",),
    "crm_id": ("crm_ids",),
}
"""Identifier type -> the ``people`` columns holding a person's values of it."""


@dataclass(frozen=True, slots=True)
class Truth:
    """The ground truth of one generated data set, as Arrow tables."""

    people: Any
    churn: Any
    leads: Any
    records: Any

    def owners(self, identifier_type: str) -> dict[str, tuple[str, ...]]:
        """Per value of an identifier type (a key of :data:`IDENTIFIER_COLUMNS`), the people
        owning it: one person, except a family tablet's device id."""
        owners: dict[str, list[str]] = {}
        people = self.people.column("person_id").to_pylist()
        for column in IDENTIFIER_COLUMNS[identifier_type]:
            values = self.people.column(column).to_pylist()
            for person, owned in zip(people, values, strict=True):
                for value in owned if isinstance(owned, list) else [owned]:
                    if value:
                        owners.setdefault(value, []).append(person)
        return {value: tuple(people) for value, people in owners.items()}

    def record_owner(self) -> dict[tuple[str, str], str]:
        """(source, record_id) of every record -> its person."""
        columns = [self.records.column(name).to_pylist() for name in ("source", "record_id")]
        people = self.records.column("person_id").to_pylist()
        return dict(zip(zip(*columns, strict=True), people, strict=True))


def load_truth(directory: Path) -> Truth:
    """The ground truth written by :func:`~.dataset.generate` into ``directory`` (the data
    set's folder, or its ``truth`` folder)."""
    folder = directory / "truth" if (directory / "truth").is_dir() else directory
    tables = {name: pq.read_table(folder / f"{name}.parquet") for name in TRUTH_FILES}
    return Truth(**tables)


def write_truth(world: World, folder: Path) -> None:
    """Write the four tables of the ground truth into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    tables = {
        "people": people_table(world),
        "churn": churn_table(world),
        "leads": leads_table(world),
        "records": records_table(world),
    }
    for name, table in tables.items():
        pq.write_table(table, folder / f"{name}.parquet", compression="zstd")


def people_table(world: World) -> Any:
    """One row per person: names, contact details, and every identifier and record id they own."""
    people, devices, leads = world.people, world.devices, world.leads
    count = len(people)
    signed_up = _per_person_any(world, Kind.IDENTIFY)
    anonymous: list[list[str]] = [[] for _ in range(count)]
    device_ids: list[list[str]] = [[] for _ in range(count)]
    for row, person in enumerate(devices.person.tolist()):
        anonymous[person].append(devices.anonymous_id[row])
        if devices.device_id[row]:
            device_ids[person].append(devices.device_id[row])
    crm_ids: list[list[str]] = [[] for _ in range(count)]
    phones = [[phone] for phone in people.phone]
    mistyped: list[list[str]] = [[] for _ in range(count)]
    for record in sorted(world.crm, key=lambda r: r.record_id):
        crm_ids[record.person].append(f"{CRM_SOURCE}:{record.record_id}")
        if record.other_phone:
            phones[record.person].append(record.other_phone)
        if record.mistyped_email:
            mistyped[record.person].append(record.mistyped_email)
    lead_id: list[str | None] = [None] * count
    work_email: dict[int, str] = {}
    for lead, person in enumerate(leads.person.tolist()):
        lead_id[person] = leads.lead_id[lead]
        crm_ids[person].append(f"{LEADS_SOURCE}:{leads.lead_id[lead]}")
        work_email[person] = leads.work_email[lead]
    emails = [
        list(people.emails[p]) + ([work_email[p]] if p in work_email else []) for p in range(count)
    ]
    return pa.table(
        {
            "person_id": people.person_id,
            "household_id": [f"H{h + 1:06d}" for h in people.household.tolist()],
            "first_name": people.first_name,
            "goes_by": people.goes_by,
            "last_name": people.last_name,
            "dob": pa.array(people.dob.astype("datetime64[D]"), pa.date32()),
            "emails": pa.array(emails, pa.list_(pa.string())),
            "mistyped_emails": pa.array(mistyped, pa.list_(pa.string())),
            "phone": people.phone,
            "phones": pa.array(phones, pa.list_(pa.string())),
            "street": people.street,
            "city": people.city,
            "state": people.state,
            "zip": people.zip,
            "user_id": [
                uid if signed else None
                for uid, signed in zip(people.user_id, signed_up, strict=True)
            ],
            "anonymous_ids": pa.array(anonymous, pa.list_(pa.string())),
            "device_ids": pa.array(device_ids, pa.list_(pa.string())),
            "crm_ids": pa.array(crm_ids, pa.list_(pa.string())),
            "lead_id": pa.array(lead_id, pa.string()),
            "web_emails": pa.array([list(e) for e in world.web_emails], pa.list_(pa.string())),
        }
    )


def churn_table(world: World) -> Any:
    """One row per person: whether and when they churned, their hazard, their last event."""
    life, window = world.life, world.window
    start = np.datetime64(window.start, "D")
    churn_date = start + life.active_until.astype("timedelta64[D]")
    acquired = start + np.floor(life.acquired).astype(np.int64).astype("timedelta64[D]")
    last_event, events = _last_events(world)
    return pa.table(
        {
            "person_id": world.people.person_id,
            "churned": life.churned,
            "churn_date": pa.array(churn_date, pa.date32(), mask=~life.churned),
            "hazard": life.hazard,
            "acquired_date": pa.array(acquired, pa.date32()),
            "events": events,
            "last_event_at": pa.array(
                last_event.astype("datetime64[ms]"), pa.timestamp("ms", tz="UTC"), mask=events == 0
            ),
        }
    )


def leads_table(world: World) -> Any:
    """One row per lead: who, what they did on the shop, whether and when they converted."""
    leads, conversions = world.leads, world.conversions
    converted_at = _demo_times(world)
    return pa.table(
        {
            "person_id": [world.people.person_id[p] for p in leads.person.tolist()],
            "lead_id": leads.lead_id,
            "company": leads.company,
            "job_title": leads.job_title,
            "lead_source": [leads.source_name(lead) for lead in range(len(leads))],
            "intent": leads.intent,
            "pricing_views": conversions.pricing_views,
            "webinars": conversions.webinars,
            "converted": conversions.converted,
            "converted_at": pa.array(
                converted_at.astype("datetime64[ms]"),
                pa.timestamp("ms", tz="UTC"),
                mask=~conversions.converted,
            ),
        }
    )


def records_table(world: World) -> Any:
    """One row per CRM and leads record: its person, and what makes it hard to link."""
    people = world.people
    crm = sorted(world.crm, key=lambda r: r.record_id)
    lead_shares = _lead_rows_share(world)
    lead_people = [people.person_id[p] for p in world.leads.person.tolist()]
    return pa.table(
        {
            "source": [CRM_SOURCE] * len(crm) + [LEADS_SOURCE] * len(lead_people),
            "record_id": [r.record_id for r in crm] + world.leads.lead_id,
            "person_id": [people.person_id[r.person] for r in crm] + lead_people,
            "duplicate": [r.duplicate for r in crm] + [False] * len(lead_people),
            "shares_identifier": [r.shares_identifier for r in crm] + lead_shares,
            "errors": pa.array(
                [list(r.errors) for r in crm] + [[] for _ in lead_people], pa.list_(pa.string())
            ),
        }
    )


def _per_person_any(world: World, kind: Kind) -> list[bool]:
    sessions = world.sessions
    counts = np.bincount(
        sessions.person, weights=sessions.counts[:, kind], minlength=len(world.people)
    )
    flags: list[bool] = (counts > 0).tolist()
    return flags


def _last_events(world: World) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Per person, the time of their last event (0 without) and their number of events."""
    person = world.sessions.person[world.events.session]
    last = np.zeros(len(world.people), dtype=np.int64)
    np.maximum.at(last, person, world.events.timestamp_ms)
    return last, np.bincount(person, minlength=len(world.people)).astype(np.int64)


def _demo_times(world: World) -> npt.NDArray[np.int64]:
    """Per lead, the time of their ``Demo Booked`` event (0 without)."""
    events = world.events
    demo = np.flatnonzero(events.kind == Kind.DEMO_BOOKED)
    by_visit = dict(
        zip(events.session[demo].tolist(), events.timestamp_ms[demo].tolist(), strict=True)
    )
    return np.array([by_visit.get(int(v), 0) for v in world.conversions.demo_visit], dtype=np.int64)


def _lead_rows_share(world: World) -> list[bool]:
    """Per lead row, whether its e-mail or phone is one the web data carries."""
    seen_emails = {e.lower() for emails in world.web_emails for e in emails}
    seen_phones = {phone for phone in world.web_phone if phone}
    return [shares_web_identifier(row, seen_emails, seen_phones) for row in world.lead_rows]
