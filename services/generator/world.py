"""Everything one generation made, in one place: what the writers and the ground truth read."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from profilemesh.services.generator.catalog import Catalog
from profilemesh.services.generator.crm import CrmRecord
from profilemesh.services.generator.devices import Devices
from profilemesh.services.generator.events import Events
from profilemesh.services.generator.leads import Conversions, Leads
from profilemesh.services.generator.lifecycles import Lifecycles
from profilemesh.services.generator.people import People
from profilemesh.services.generator.seasons import Window
from profilemesh.services.generator.sessions import Kind, Sessions
from profilemesh.services.generator.signin import Accounts


@dataclass(frozen=True, slots=True)
class World:
    """The retailer's customers, their behaviour and their records, before any file is written."""

    seed: int
    window: Window
    catalog: Catalog
    people: People
    devices: Devices
    life: Lifecycles
    sessions: Sessions
    accounts: Accounts
    leads: Leads
    conversions: Conversions
    events: Events
    crm: list[CrmRecord]
    lead_rows: list[dict[str, str]]
    web_emails: list[tuple[str, ...]]
    """Per person, the e-mail addresses their identify traits carry."""
    web_phone: list[str]
    """Per person, the phone number their identify traits carry, or ``""``."""


def web_identifiers(
    people: People, sessions: Sessions, accounts: Accounts
) -> tuple[list[tuple[str, ...]], list[str]]:
    """Per person, the e-mail addresses and the phone number their identify traits carry."""
    counts = sessions.counts
    identified = np.bincount(
        sessions.person, weights=counts[:, Kind.IDENTIFY], minlength=len(people)
    )
    other = np.bincount(
        sessions.person, weights=counts[:, Kind.ALT_IDENTIFY], minlength=len(people)
    )
    emails: list[tuple[str, ...]] = []
    phones: list[str] = []
    for person in range(len(people)):
        if identified[person] == 0:
            emails.append(())
            phones.append("")
            continue
        known: tuple[str, ...] = (people.emails[person][0],)
        if other[person] > 0:
            known += (accounts.other_email[person],)
        emails.append(known)
        phones.append(people.phone[person] if accounts.shares_phone[person] else "")
    return emails, phones
