"""The CRM export: customer records as a store clerk or a loyalty sign-up form entered them.

Most customers have a record, some two (signed up in a store and again online): duplicates
that only matching can join. Records are messy the way real ones are (nicknames, typing
errors, first and last name swapped, day and month swapped, values missing, phone numbers in
every format, a previous address on the older duplicate), at the rates of :class:`CrmRates`.

About 30 % of the records share no identifier with the web data: no e-mail address, or one the
person never used on the shop, and no phone number the shop saw. Identity can link those only
through probabilistic matching. Which records are which, and which errors each carries, is in
the ground truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt

from profilemesh.services.generator.ids import unique_numbers
from profilemesh.services.generator.people import EmailBook, People, PhoneBook
from profilemesh.services.generator.places import CITIES, STREET_SUFFIXES, STREETS
from profilemesh.services.generator.seasons import Window
from profilemesh.services.generator.typos import (
    abbreviated_street,
    can_swap_day_and_month,
    formatted_phone,
    mistyped_email,
    mistyped_year,
    swap_day_and_month,
    typo,
)

SOURCE = "crm"
COLUMNS = (
    "record_id",
    "first_name",
    "last_name",
    "email",
    "phone",
    "dob",
    "address",
    "city",
    "state",
    "zip",
    "loyalty_tier",
    "updated_at",
)
"""The columns of ``crm.csv``."""
LOYALTY_TIERS = ("bronze", "silver", "gold", "platinum")
_LOYALTY_WEIGHTS = np.array([0.55, 0.28, 0.13, 0.04])


@dataclass(frozen=True, slots=True)
class CrmRates:
    """How often each kind of record and error occurs."""

    in_crm: float = 0.88
    """Share of the customers with a record."""
    duplicate: float = 0.09
    """Share of the customers with a record who have a second one."""
    no_shared_identifier: float = 0.30
    """Target share of the records with no e-mail or phone that the web data has."""
    nickname: float = 0.12
    """Share of the records, among people whose name has short forms, entered with one."""
    first_name_typo: float = 0.05
    last_name_typo: float = 0.05
    swapped_names: float = 0.03
    upper_case: float = 0.05
    """Names entered in capitals."""
    dob_swapped: float = 0.05
    """Among records whose birth date could be swapped (day 12 or less, not equal to month)."""
    dob_typo: float = 0.02
    dob_missing: float = 0.07
    phone_missing: float = 0.15
    email_case: float = 0.10
    """E-mail addresses entered with capitals (the same address to identity)."""
    abbreviated_address: float = 0.30
    address_typo: float = 0.04
    address_missing: float = 0.05
    zip_missing: float = 0.03
    moved: float = 0.40
    """Share of the duplicates that carry a previous address."""


RATES = CrmRates()


@dataclass(frozen=True, slots=True)
class CrmRecord:
    """One row of ``crm.csv`` and what the ground truth knows about it."""

    record_id: str
    person: int
    duplicate: bool
    """The second record of its person."""
    row: dict[str, str]
    errors: tuple[str, ...]
    """The kinds of error entered in it, e.g. ``nickname``, ``dob_swapped``."""
    shares_identifier: bool = False
    """Whether its e-mail or phone appears in the web data."""
    mistyped_email: str = ""
    """The address in the row when it is a typing error (nobody's real address)."""
    other_phone: str = ""
    """The number in the row (E.164) when it is not the person's mobile."""


@dataclass(slots=True)
class _Entry:
    """A record while it is being written: its row and its errors so far."""

    row: dict[str, str]
    errors: list[str] = field(default_factory=list)
    mistyped_email: str = ""
    other_phone: str = ""


def build_crm(
    rng: np.random.Generator,
    people: People,
    web_emails: Sequence[Sequence[str]],
    web_phone: Sequence[str],
    emails: EmailBook,
    phones: PhoneBook,
    window: Window,
    rates: CrmRates = RATES,
) -> list[CrmRecord]:
    """The CRM's records, in the export's (random) order.

    ``web_emails`` and ``web_phone`` are, per person, the addresses and the number the web
    data carries (in identify traits); they decide which records can share an identifier."""
    owners = _owners(rng, len(people), rates)
    duplicate = np.r_[False, owners[1:] == owners[:-1]]
    on_web = np.array([bool(web_emails[p]) for p in owners])
    hidden = ~on_web | (rng.random(len(owners)) < _hidden_share(on_web, rates))
    numbers = unique_numbers(rng, len(owners), 1_000_000, 10_000_000)
    seen_emails = {e.lower() for addresses in web_emails for e in addresses}
    seen_phones = {p for p in web_phone if p}
    tiers = rng.choice(len(LOYALTY_TIERS), size=len(owners), p=_LOYALTY_WEIGHTS)
    start_ms, end_ms = window.start_ms, window.end_ms
    records = []
    for index, person in enumerate(owners):
        person = int(person)
        entry = _Entry(_true_row(people, person))
        if bool(duplicate[index]) and rng.random() < rates.moved:
            _previous_address(rng, entry)
        keep_apart = bool(hidden[index])
        _contact(rng, entry, people, person, web_emails[person], keep_apart, emails, rates)
        mobile = people.phone[person]
        web_knows_it = keep_apart and mobile in seen_phones
        _phone(rng, entry, mobile, web_knows_it, phones, rates)
        _names(rng, entry, people.nicknames[person], rates)
        _birth_date(rng, entry, rates)
        _address(rng, entry, rates)
        entry.row["loyalty_tier"] = LOYALTY_TIERS[tiers[index]]
        entry.row["updated_at"] = _updated_at(rng, start_ms, end_ms, older=bool(duplicate[index]))
        entry.row["record_id"] = f"C{numbers[index]}"
        records.append(
            CrmRecord(
                record_id=entry.row["record_id"],
                person=person,
                duplicate=bool(duplicate[index]),
                row={column: entry.row.get(column, "") for column in COLUMNS},
                errors=tuple(entry.errors),
                shares_identifier=shares_web_identifier(entry.row, seen_emails, seen_phones),
                mistyped_email=entry.mistyped_email,
                other_phone=entry.other_phone,
            )
        )
    order = rng.permutation(len(records))
    return [records[i] for i in order]


def _owners(rng: np.random.Generator, count: int, rates: CrmRates) -> npt.NDArray[np.int64]:
    """The person of each record, sorted; a duplicated person appears twice in a row."""
    in_crm = np.flatnonzero(rng.random(count) < rates.in_crm)
    twice = in_crm[rng.random(len(in_crm)) < rates.duplicate]
    owners: npt.NDArray[np.int64] = np.sort(np.concatenate((in_crm, twice))).astype(np.int64)
    return owners


def _hidden_share(on_web: npt.NDArray[np.bool_], rates: CrmRates) -> float:
    """Share of the records of people known on the web to keep apart from it, so that
    :attr:`CrmRates.no_shared_identifier` of all records share nothing with the web data
    (the records of people never identified on the web share nothing anyway)."""
    if not on_web.any():
        return 0.0
    wanted = rates.no_shared_identifier * len(on_web) - (~on_web).sum()
    return float(np.clip(wanted / on_web.sum(), 0.0, 1.0))


def _true_row(people: People, person: int) -> dict[str, str]:
    return {
        "first_name": people.first_name[person],
        "last_name": people.last_name[person],
        "dob": str(people.dob[person]),
        "address": people.street[person],
        "city": people.city[person],
        "state": people.state[person],
        "zip": people.zip[person],
    }


def _previous_address(rng: np.random.Generator, entry: _Entry) -> None:
    city = CITIES[int(rng.integers(0, len(CITIES)))]
    street = STREETS[int(rng.integers(0, len(STREETS)))]
    suffix = STREET_SUFFIXES[int(rng.integers(0, len(STREET_SUFFIXES)))][0]
    entry.row["address"] = f"{int(rng.integers(1, 3000))} {street} {suffix}"
    entry.row["city"], entry.row["state"] = city.name, city.state
    entry.row["zip"] = f"{city.zip_prefix}{int(rng.integers(1, 30)):02d}"
    entry.errors.append("previous_address")


def _contact(
    rng: np.random.Generator,
    entry: _Entry,
    people: People,
    person: int,
    web_emails: Sequence[str],
    hidden: bool,
    emails: EmailBook,
    rates: CrmRates,
) -> None:
    """The e-mail column: one the web knows, unless the record is to share nothing with it;
    then none, another of the person's addresses, or a mistyped one."""
    own = people.emails[person]
    choice = rng.random()
    if not hidden:
        email = web_emails[0]
        if choice < rates.email_case:
            email = email.capitalize()
            entry.errors.append("email_case")
        entry.row["email"] = email
        return
    unseen = [address for address in own if address not in web_emails]
    if web_emails:
        missing, mistyped = choice < 0.45, choice >= 0.7 or not unseen
    else:
        missing, mistyped = choice < 0.2, choice >= 0.97
    if missing:
        entry.errors.append("email_missing")
    elif not mistyped:
        entry.row["email"] = unseen[0] if rng.random() < 0.8 else unseen[-1]
    else:
        email = mistyped_email(rng, own[0])
        # A typing error can make somebody else's address: that one is left out instead.
        if emails.reserve(email):
            entry.row["email"] = entry.mistyped_email = email
            entry.errors.append("email_typo")
        else:
            entry.errors.append("email_missing")


def _phone(
    rng: np.random.Generator,
    entry: _Entry,
    mobile: str,
    web_knows_it: bool,
    phones: PhoneBook,
    rates: CrmRates,
) -> None:
    """The phone column in some format. A record kept apart from the web gets no number or
    another one (an old landline) when ``web_knows_it`` (the mobile)."""
    if rng.random() < rates.phone_missing or (web_knows_it and rng.random() < 0.6):
        entry.errors.append("phone_missing")
        return
    number = mobile
    if web_knows_it:
        number = entry.other_phone = phones.draw(rng, mobile[2:5])
        entry.errors.append("other_phone")
    entry.row["phone"] = formatted_phone(rng, number)


def _names(
    rng: np.random.Generator, entry: _Entry, nicknames: tuple[str, ...], rates: CrmRates
) -> None:
    row = entry.row
    if nicknames and rng.random() < rates.nickname:
        row["first_name"] = nicknames[int(rng.integers(0, len(nicknames)))]
        entry.errors.append("nickname")
    if rng.random() < rates.first_name_typo:
        row["first_name"] = typo(rng, row["first_name"])
        entry.errors.append("first_name_typo")
    if rng.random() < rates.last_name_typo:
        row["last_name"] = typo(rng, row["last_name"])
        entry.errors.append("last_name_typo")
    if rng.random() < rates.swapped_names:
        row["first_name"], row["last_name"] = row["last_name"], row["first_name"]
        entry.errors.append("swapped_names")
    if rng.random() < rates.upper_case:
        row["first_name"], row["last_name"] = row["first_name"].upper(), row["last_name"].upper()
        entry.errors.append("upper_case")


def _birth_date(rng: np.random.Generator, entry: _Entry, rates: CrmRates) -> None:
    row = entry.row
    draw = rng.random()
    if draw < rates.dob_missing:
        del row["dob"]
        entry.errors.append("dob_missing")
    elif draw < rates.dob_missing + rates.dob_typo:
        row["dob"] = mistyped_year(rng, row["dob"])
        entry.errors.append("dob_typo")
    elif can_swap_day_and_month(row["dob"]) and rng.random() < rates.dob_swapped:
        row["dob"] = swap_day_and_month(row["dob"])
        entry.errors.append("dob_swapped")


def _address(rng: np.random.Generator, entry: _Entry, rates: CrmRates) -> None:
    row = entry.row
    if rng.random() < rates.address_missing:
        del row["address"]
        entry.errors.append("address_missing")
    else:
        if rng.random() < rates.abbreviated_address:
            row["address"] = abbreviated_street(row["address"])
        if rng.random() < rates.address_typo:
            row["address"] = typo(rng, row["address"])
            entry.errors.append("address_typo")
    if rng.random() < rates.zip_missing:
        del row["zip"]
        entry.errors.append("zip_missing")


def _updated_at(rng: np.random.Generator, start_ms: int, end_ms: int, *, older: bool) -> str:
    """When the record last changed: any time in the window, the first half for the older
    of two duplicates."""
    span = end_ms - start_ms
    offset = int(rng.integers(0, span // 2 if older else span))
    moment = datetime.fromtimestamp((start_ms + offset) / 1000, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def shares_web_identifier(
    row: dict[str, str], seen_emails: set[str], seen_phones: set[str]
) -> bool:
    """Whether the row's e-mail or phone (read as a US number) is one the web data carries."""
    digits = "".join(ch for ch in row.get("phone", "") if ch.isdigit())
    phone = "+" + digits if len(digits) == 11 else "+1" + digits
    return row.get("email", "").lower() in seen_emails or phone in seen_phones
