"""The business side: customers who are also leads for business accounts, and which convert.

About one customer in ten buys for work too: they are a lead in the sales system (company, job
title, how they were found), with a work e-mail address. Their interest is latent; it shows as
visits to the business pricing page and webinars attended, and a lead converts (books a demo:
a ``Demo Booked`` event) with a probability that rises with those signals and with the lead
source (referrals convert best). Conversion is decided from what the lead actually did, so a
lead model has something real to learn; the ground truth says who converted and when.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt

from profilemesh.services.generator.catalog import (
    COMPANY_KINDS,
    COMPANY_WORDS,
    JOB_TITLES,
    LEAD_SOURCE_LIFT,
    LEAD_SOURCE_WEIGHTS,
    LEAD_SOURCES,
)
from profilemesh.services.generator.ids import unique_numbers
from profilemesh.services.generator.people import EmailBook, People, email_part
from profilemesh.services.generator.seasons import Window
from profilemesh.services.generator.sessions import Kind, Sessions
from profilemesh.services.generator.typos import formatted_phone, typo

LEAD_SHARE = 0.10
"""Share of the customers who are leads."""
_BASE_LOG_ODDS = -2.6


@dataclass(frozen=True, slots=True)
class Leads:
    """The leads, as parallel columns indexed by lead number."""

    person: npt.NDArray[np.int64]
    lead_id: list[str]
    company: list[str]
    job_title: list[str]
    source: npt.NDArray[np.int64]
    """Index into :data:`~.catalog.LEAD_SOURCES`."""
    work_email: list[str]
    intent: npt.NDArray[np.float64]
    """Latent interest in a business account, standard normal."""

    def __len__(self) -> int:
        return len(self.person)

    def source_name(self, lead: int) -> str:
        """How the lead was found, e.g. ``Webinar``."""
        return LEAD_SOURCES[int(self.source[lead])]


@dataclass(frozen=True, slots=True)
class Conversions:
    """What the leads did on the shop, and whether (on which visit) they booked a demo."""

    pricing_views: npt.NDArray[np.int64]
    webinars: npt.NDArray[np.int64]
    converted: npt.NDArray[np.bool_]
    demo_visit: npt.NDArray[np.int64]
    """The visit with the ``Demo Booked`` event; -1 when not converted."""
    first_touch: npt.NDArray[np.int64]
    """The first visit with a pricing view or webinar; -1 without."""


def choose_leads(rng: np.random.Generator, people: People, emails: EmailBook) -> Leads:
    """:data:`LEAD_SHARE` of ``people``, each with a company, a title and a work address."""
    count = round(LEAD_SHARE * len(people))
    person = np.sort(rng.choice(len(people), size=count, replace=False)).astype(np.int64)
    word = rng.integers(0, len(COMPANY_WORDS), count)
    kind = rng.integers(0, len(COMPANY_KINDS), count)
    companies = [f"{COMPANY_WORDS[w]} {COMPANY_KINDS[k]}" for w, k in zip(word, kind, strict=True)]
    titles = rng.integers(0, len(JOB_TITLES), count)
    work_emails = [
        emails.claim(
            rng,
            f"{email_part(people.goes_by[p])}.{email_part(people.last_name[p])}",
            f"{email_part(company)}.example",
        )
        for p, company in zip(person, companies, strict=True)
    ]
    numbers = unique_numbers(rng, count, 100_000, 1_000_000)
    return Leads(
        person=person,
        lead_id=[f"LD-{n}" for n in numbers],
        company=companies,
        job_title=[JOB_TITLES[t] for t in titles],
        source=rng.choice(len(LEAD_SOURCES), size=count, p=LEAD_SOURCE_WEIGHTS).astype(np.int64),
        work_email=work_emails,
        intent=rng.normal(0.0, 1.0, count),
    )


def visit_business_pages(rng: np.random.Generator, sessions: Sessions, leads: Leads) -> None:
    """Count the leads' pricing page views and webinars into ``sessions``: the more intent,
    the more of both."""
    people = len(sessions.count)
    pricing_rate = np.zeros(people)
    webinar_chance = np.zeros(people)
    pricing_rate[leads.person] = 0.15 * np.exp(0.8 * leads.intent)
    webinar_chance[leads.person] = np.minimum(0.03 * np.exp(0.8 * leads.intent), 0.3)
    visits = len(sessions)
    sessions.counts[:, Kind.PRICING] = rng.poisson(pricing_rate[sessions.person])
    sessions.counts[:, Kind.WEBINAR] = rng.random(visits) < webinar_chance[sessions.person]


def book_demos(rng: np.random.Generator, sessions: Sessions, leads: Leads) -> Conversions:
    """Decide which leads convert, from what they did; put their ``Demo Booked`` on a visit
    from their first business page view onwards (any visit when they had none)."""
    person = sessions.person
    people = len(sessions.count)
    pricing = np.bincount(person, weights=sessions.counts[:, Kind.PRICING], minlength=people)
    webinars = np.bincount(person, weights=sessions.counts[:, Kind.WEBINAR], minlength=people)
    pricing_views = pricing[leads.person].astype(np.int64)
    attended = webinars[leads.person].astype(np.int64)
    log_odds = (
        _BASE_LOG_ODDS
        + 0.45 * np.minimum(pricing_views, 8)
        + 1.2 * (attended > 0)
        + LEAD_SOURCE_LIFT[leads.source]
        + 0.5 * leads.intent
    )
    has_visits = sessions.count[leads.person] > 0
    converted = has_visits & (rng.random(len(leads)) < 1.0 / (1.0 + np.exp(-log_odds)))
    first_touch = _first_touches(sessions, leads)
    first = sessions.first[leads.person]
    last = first + sessions.count[leads.person] - 1
    begin = np.where(first_touch >= 0, first_touch, first)
    pick = begin + np.floor(rng.random(len(leads)) * (last - begin + 1)).astype(np.int64)
    demo_visit = np.where(converted, pick, -1)
    sessions.counts[demo_visit[converted], Kind.DEMO_BOOKED] = 1
    return Conversions(pricing_views, attended, converted, demo_visit, first_touch)


def _first_touches(sessions: Sessions, leads: Leads) -> npt.NDArray[np.int64]:
    touched = np.flatnonzero(
        (sessions.counts[:, Kind.PRICING] > 0) | (sessions.counts[:, Kind.WEBINAR] > 0)
    )
    first_of_person = np.full(len(sessions.count), -1, dtype=np.int64)
    # Visits are in time order, so a person's first occurrence is their earliest touch.
    touchers, earliest = np.unique(sessions.person[touched], return_index=True)
    first_of_person[touchers] = touched[earliest]
    touches: npt.NDArray[np.int64] = first_of_person[leads.person]
    return touches


LEADS_SOURCE = "leads"
LEAD_COLUMNS = (
    "lead_id",
    "first_name",
    "last_name",
    "email",
    "phone",
    "company",
    "job_title",
    "lead_source",
    "created_at",
)
"""The columns of ``leads.csv``."""


def lead_rows(
    rng: np.random.Generator,
    leads: Leads,
    people: People,
    sessions: Sessions,
    conversions: Conversions,
    window: Window,
) -> list[dict[str, str]]:
    """The sales system's export: a row per lead, mostly with the work address, created
    before the lead's first business page view."""
    starts = sessions.start_ms(window)
    start_ms, end_ms = window.start_ms, window.end_ms
    rows = []
    for lead, person in enumerate(leads.person):
        person = int(person)
        touch = int(conversions.first_touch[lead])
        latest = int(starts[touch]) if touch >= 0 else end_ms
        created = int(rng.integers(start_ms, max(latest, start_ms + 1)))
        last_name = people.last_name[person]
        if rng.random() < 0.03:
            last_name = typo(rng, last_name)
        work = rng.random() < 0.75
        rows.append(
            {
                "lead_id": leads.lead_id[lead],
                "first_name": people.goes_by[person]
                if rng.random() < 0.6
                else people.first_name[person],
                "last_name": last_name,
                "email": leads.work_email[lead] if work else people.emails[person][0],
                "phone": formatted_phone(rng, people.phone[person]) if rng.random() < 0.5 else "",
                "company": leads.company[lead],
                "job_title": leads.job_title[lead],
                "lead_source": leads.source_name(lead),
                "created_at": datetime.fromtimestamp(created / 1000, UTC).strftime(
                    "%Y-%m-%dT%H:%M:%SZ"
                ),
            }
        )
    return rows
