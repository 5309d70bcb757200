"""One generation, from a seed to a folder of files: :func:`generate`.

Each part of the world (people, devices, behaviour, records ...) draws from its own generator
spawned from the seed, so that the same seed, size and end date give byte-identical files, and
changing how one part is drawn leaves the others as they were.

The folder holds ``events.jsonl``, ``crm.csv``, ``leads.csv``, ``truth/*.parquet`` and
``manifest.json``; the manifest records the seed, the sizes, the counts and how to import each
file (connector and configuration, paths relative to the folder).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np

from profilemesh.services.generator.catalog import build_catalog
from profilemesh.services.generator.crm import COLUMNS as CRM_COLUMNS
from profilemesh.services.generator.crm import SOURCE as CRM_SOURCE
from profilemesh.services.generator.crm import build_crm
from profilemesh.services.generator.devices import build_devices
from profilemesh.services.generator.events import expand
from profilemesh.services.generator.leads import (
    LEAD_COLUMNS,
    LEADS_SOURCE,
    book_demos,
    choose_leads,
    lead_rows,
    visit_business_pages,
)
from profilemesh.services.generator.lifecycles import build_lifecycles
from profilemesh.services.generator.people import EmailBook, PhoneBook, build_people
from profilemesh.services.generator.seasons import Window
from profilemesh.services.generator.sessions import ask_for_feedback, draw_sessions
from profilemesh.services.generator.signin import sign_in
from profilemesh.services.generator.truth import TRUTH_FILES, write_truth
from profilemesh.services.generator.world import World, web_identifiers
from profilemesh.services.generator.writer import write_csv, write_events

EVENTS_FILE = "events.jsonl"
CRM_FILE = "crm.csv"
LEADS_FILE = "leads.csv"
TRUTH_DIR = "truth"
MANIFEST_FILE = "manifest.json"
EVENTS_SOURCE = "shop"
"""The source name the demo imports the events under."""
STEPS = ("people", "behaviour", "records", "events", "truth")
"""The steps :func:`generate` reports to its ``progress`` callback, in order."""
_PARTS = (
    "catalog",
    "people",
    "devices",
    "lifecycles",
    "leads",
    "sessions",
    "signin",
    "events",
    "crm",
    "lead_rows",
    "message_ids",
)
"""The parts of a world, each drawn from its own generator spawned from the seed."""

Progress = Callable[[str], None]
"""Called with the name of each step of :data:`STEPS` when it is done."""


@dataclass(frozen=True, slots=True)
class GeneratedData:
    """Where a generation wrote its files, and how much it wrote."""

    directory: Path
    customers: int
    seed: int
    end: date
    events: int
    crm_records: int
    leads: int
    orders: int
    seconds: float
    imports: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per file, the ``profilemesh import`` source, connector and configuration (absolute
    paths): ``events``, ``crm`` and ``leads``."""

    @property
    def events_path(self) -> Path:
        """The Segment events, one JSON object a line, in time order."""
        return self.directory / EVENTS_FILE

    @property
    def crm_path(self) -> Path:
        """The CRM's customer records."""
        return self.directory / CRM_FILE

    @property
    def leads_path(self) -> Path:
        """The sales system's leads."""
        return self.directory / LEADS_FILE

    @property
    def truth_dir(self) -> Path:
        """The ground truth's Parquet tables (see :func:`~.truth.load_truth`)."""
        return self.directory / TRUTH_DIR

    @property
    def manifest_path(self) -> Path:
        """Seed, sizes, counts and import recipes, as JSON."""
        return self.directory / MANIFEST_FILE


def default_end() -> date:
    """Today (UTC): the data ends at midnight this morning, so features' windows see it."""
    return datetime.now(UTC).date()


def generate(
    out_dir: Path,
    customers: int = 20_000,
    seed: int = 7,
    end: date | None = None,
    progress: Progress | None = None,
) -> GeneratedData:
    """Generate ``customers`` customers' year up to ``end`` (default :func:`default_end`) into
    ``out_dir``, created if needed; existing files of the same names are replaced."""
    if customers < 1:
        raise ValueError(f"customers must be at least 1, got {customers}")
    started = time.perf_counter()
    report = progress or (lambda step: None)
    window = Window(end or default_end())
    world = build_world(customers, seed, window, report)
    rng = _generators(seed)["message_ids"]
    out_dir.mkdir(parents=True, exist_ok=True)
    by_name = write_events(rng, world, out_dir / EVENTS_FILE)
    report("events")
    crm_rows = write_csv(out_dir / CRM_FILE, CRM_COLUMNS, (r.row for r in world.crm))
    lead_count = write_csv(out_dir / LEADS_FILE, LEAD_COLUMNS, world.lead_rows)
    write_truth(world, out_dir / TRUTH_DIR)
    manifest = _manifest(world, customers, by_name)
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    report("truth")
    return GeneratedData(
        directory=out_dir,
        customers=customers,
        seed=seed,
        end=window.end,
        events=len(world.events),
        crm_records=crm_rows,
        leads=lead_count,
        orders=len(world.events.orders.order_id),
        seconds=time.perf_counter() - started,
        imports=_absolute(import_recipes(), out_dir),
    )


def _generators(seed: int) -> dict[str, np.random.Generator]:
    children = np.random.SeedSequence(seed).spawn(len(_PARTS))
    return {
        part: np.random.default_rng(child) for part, child in zip(_PARTS, children, strict=True)
    }


def build_world(customers: int, seed: int, window: Window, report: Progress) -> World:
    """Everything :func:`generate` writes, in memory."""
    rng = _generators(seed)
    emails, phones = EmailBook(), PhoneBook()
    catalog = build_catalog(rng["catalog"])
    people = build_people(rng["people"], customers, window.end, emails, phones)
    devices = build_devices(rng["devices"], people.household)
    life = build_lifecycles(rng["lifecycles"], customers)
    leads = choose_leads(rng["leads"], people, emails)
    report("people")
    sessions = draw_sessions(rng["sessions"], life, devices, window)
    visit_business_pages(rng["leads"], sessions, leads)
    other_emails = [addresses[1] if len(addresses) > 1 else "" for addresses in people.emails]
    for lead, person in enumerate(leads.person.tolist()):
        other_emails[person] = leads.work_email[lead]
    accounts = sign_in(rng["signin"], sessions, devices, other_emails)
    ask_for_feedback(rng["sessions"], sessions, life)
    conversions = book_demos(rng["leads"], sessions, leads)
    events = expand(rng["events"], sessions, life, catalog, window)
    report("behaviour")
    web_emails, web_phone = web_identifiers(people, sessions, accounts)
    crm = build_crm(rng["crm"], people, web_emails, web_phone, emails, phones, window)
    rows = lead_rows(rng["lead_rows"], leads, people, sessions, conversions, window)
    report("records")
    return World(
        seed=seed,
        window=window,
        catalog=catalog,
        people=people,
        devices=devices,
        life=life,
        sessions=sessions,
        accounts=accounts,
        leads=leads,
        conversions=conversions,
        events=events,
        crm=crm,
        lead_rows=rows,
        web_emails=web_emails,
        web_phone=web_phone,
    )


def import_recipes() -> dict[str, dict[str, Any]]:
    """How to import each file with ``profilemesh import``, paths relative to the folder.

    Events are a history: the jsonl connector replays them with their own timestamps. Both CSV
    files are customer records; their ``email`` and ``phone`` columns are identifiers (phones
    without a country code need identity's ``default_region: US`` to become one)."""
    return {
        "events": {
            "source": EVENTS_SOURCE,
            "connector": "jsonl",
            "config": {"path": EVENTS_FILE, "kind": "events"},
        },
        "crm": {
            "source": CRM_SOURCE,
            "connector": "csv",
            "config": {
                "path": CRM_FILE,
                "kind": "records",
                "mapping": {
                    "record_id": "record_id",
                    "source": CRM_SOURCE,
                    "identifiers": {"email": "email", "phone": "phone"},
                    "updated_at": "updated_at",
                },
            },
        },
        "leads": {
            "source": LEADS_SOURCE,
            "connector": "csv",
            "config": {
                "path": LEADS_FILE,
                "kind": "records",
                "mapping": {
                    "record_id": "lead_id",
                    "source": LEADS_SOURCE,
                    "identifiers": {"email": "email", "phone": "phone"},
                    "updated_at": "created_at",
                },
            },
        },
    }


def _absolute(recipes: dict[str, dict[str, Any]], folder: Path) -> dict[str, dict[str, Any]]:
    return {
        name: {
            **recipe,
            "config": {
                **recipe["config"],
                "path": str((folder / recipe["config"]["path"]).resolve()),
            },
        }
        for name, recipe in recipes.items()
    }


def _manifest(world: World, customers: int, by_name: dict[str, int]) -> dict[str, Any]:
    """What was generated, for people and for evaluations; no times or paths, so that the
    same seed writes the same manifest."""
    crm, leads, life = world.crm, world.leads, world.life
    household_sizes = np.bincount(world.people.household)
    return {
        "generator": "profilemesh generate",
        "seed": world.seed,
        "customers": customers,
        "start": world.window.start.isoformat(),
        "end": world.window.end.isoformat(),
        "files": {
            "events": EVENTS_FILE,
            "crm": CRM_FILE,
            "leads": LEADS_FILE,
            "truth": {name: f"{TRUTH_DIR}/{name}.parquet" for name in TRUTH_FILES},
        },
        "counts": {
            "events": len(world.events),
            "events_by_name": by_name,
            "orders": len(world.events.orders.order_id),
            "revenue": round(float(world.events.orders.revenue.sum()), 2),
            "visits": len(world.sessions),
            "devices": len(set(world.devices.device_id) - {""})
            + sum(1 for d in world.devices.device_id if not d),
            "signed_up": int(world.accounts.signs_up.sum()),
            "households_shared": int((household_sizes >= 2).sum()),
            "family_tablets": len(
                {
                    d
                    for d, f in zip(
                        world.devices.device_id, world.devices.family_tablet, strict=True
                    )
                    if f
                }
            ),
            "churned": int(life.churned.sum()),
            "crm_records": len(crm),
            "crm_duplicates": sum(1 for r in crm if r.duplicate),
            "crm_without_shared_identifier": sum(1 for r in crm if not r.shares_identifier),
            "leads": len(leads),
            "leads_converted": int(world.conversions.converted.sum()),
        },
        "imports": import_recipes(),
    }
