"""The retailer's customers as people: names, birth dates, e-mail addresses, phones, homes.

About one person in seven lives with others who are customers too (a household shares its
address and family name, and later a tablet), which is what makes addresses and surnames weak
evidence on their own. A third of the people whose given name has a short form go by it online
(``Bob`` on the web shop, ``Robert`` in the CRM). A quarter have a second personal e-mail
address. Every e-mail address and phone number belongs to one person only: the ground truth
would be ambiguous otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

import numpy as np
import numpy.typing as npt

from profilemesh.services.generator.ids import unique_numbers
from profilemesh.services.generator.names import FEMALE, MALE, SURNAMES, GivenName, popularity
from profilemesh.services.generator.places import (
    CITIES,
    EMAIL_DOMAINS,
    STREET_SUFFIXES,
    STREETS,
)

HOUSEHOLD_SHARE = 0.15
"""Share of the people who live with another customer."""
SECOND_EMAIL_SHARE = 0.25
GOES_BY_NICKNAME = 0.35
"""Share of the people with a short form of their name who use it online."""

_HOUSEHOLD_SIZES = np.array([2, 3, 4])
_HOUSEHOLD_SIZE_WEIGHTS = np.array([0.62, 0.28, 0.10])
_EMAIL_DOMAIN_WEIGHTS = popularity(len(EMAIL_DOMAINS), 1.0)
_CITY_WEIGHTS = popularity(len(CITIES), 0.6)


@dataclass(frozen=True, slots=True)
class People:
    """The customers, as parallel columns indexed by person number."""

    person_id: list[str]
    household: npt.NDArray[np.int64]
    """Household number; people who live alone have one of their own."""
    first_name: list[str]
    """The formal given name (``Robert``)."""
    nicknames: list[tuple[str, ...]]
    """The short forms of the given name (``Bob``, ``Rob``), possibly none."""
    goes_by: list[str]
    """The given name the person types into forms online: a short form or the formal one."""
    last_name: list[str]
    dob: npt.NDArray[np.datetime64]
    emails: list[tuple[str, ...]]
    """Personal e-mail addresses, the main one first."""
    phone: list[str]
    """Mobile number in E.164 (``+12065550123``)."""
    street: list[str]
    """Street address with the street type in full (``12 Maple Avenue``), maybe an apartment."""
    city: list[str]
    state: list[str]
    zip: list[str]
    user_id: list[str]
    """The account number the web shop gives the person if they sign up."""

    def __len__(self) -> int:
        return len(self.person_id)


class EmailBook:
    """The e-mail addresses handed out so far, so that no address is given to two people."""

    def __init__(self) -> None:
        self._taken: set[str] = set()

    def __contains__(self, address: object) -> bool:
        return isinstance(address, str) and address.lower() in self._taken

    def claim(self, rng: np.random.Generator, local: str, domain: str) -> str:
        """``local@domain``, with digits added to ``local`` while the address is taken."""
        address = f"{local}@{domain}"
        while address in self:
            address = f"{local}{int(rng.integers(1, 1000))}@{domain}"
        self._taken.add(address.lower())
        return address

    def reserve(self, address: str) -> bool:
        """Take ``address`` as it is; False when somebody has it already."""
        if address in self:
            return False
        self._taken.add(address.lower())
        return True


def build_people(
    rng: np.random.Generator, count: int, today: date, emails: EmailBook, phones: PhoneBook
) -> People:
    """``count`` people, aged 18 or more on ``today``, in households of one to four."""
    household = _households(rng, count)
    heads = _household_heads(household)
    female = rng.random(count) < 0.52
    first, nicknames = _given_names(rng, female)
    goes_by = [
        str(rng.choice(short)) if short and rng.random() < GOES_BY_NICKNAME else formal
        for formal, short in zip(first, nicknames, strict=True)
    ]
    family = rng.choice(len(SURNAMES), size=count, p=popularity(len(SURNAMES)))
    last = [SURNAMES[family[heads[h]]] for h in household]
    street, city, state, zip_code, area = _addresses(rng, household, heads)
    dob = _birth_dates(rng, household, heads, today)
    second = rng.random(count) < SECOND_EMAIL_SHARE
    patterns = rng.choice(len(_PATTERN_WEIGHTS), size=(count, 2), p=_PATTERN_WEIGHTS)
    domains = rng.choice(len(EMAIL_DOMAINS), size=(count, 2), p=_EMAIL_DOMAIN_WEIGHTS)
    addresses = [
        tuple(
            _personal_email(
                rng,
                emails,
                goes_by[i],
                last[i],
                int(str(dob[i])[:4]),
                patterns[i, k],
                domains[i, k],
            )
            for k in range(2 if second[i] else 1)
        )
        for i in range(count)
    ]
    numbers = unique_numbers(rng, count, 1_000_000, 10_000_000)
    return People(
        person_id=[f"P{i + 1:06d}" for i in range(count)],
        household=household,
        first_name=first,
        nicknames=nicknames,
        goes_by=goes_by,
        last_name=last,
        dob=dob,
        emails=addresses,
        phone=[phones.draw(rng, code) for code in area],
        street=street,
        city=city,
        state=state,
        zip=zip_code,
        user_id=[str(n) for n in numbers],
    )


def _households(rng: np.random.Generator, count: int) -> npt.NDArray[np.int64]:
    """Household number of each person: :data:`HOUSEHOLD_SHARE` of them share one."""
    sizes: list[int] = []
    shared = 0
    while count - shared >= 2 and shared < HOUSEHOLD_SHARE * count:
        size = int(min(rng.choice(_HOUSEHOLD_SIZES, p=_HOUSEHOLD_SIZE_WEIGHTS), count - shared))
        sizes.append(size)
        shared += size
    sizes.extend([1] * (count - shared))
    ordered = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
    # Shuffled, so that person numbers say nothing about who lives together.
    household: npt.NDArray[np.int64] = ordered[rng.permutation(count)]
    return household


def _household_heads(household: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Per household number, its first member (the person its name and address come from)."""
    # Household numbers run from 0 without gaps; ``unique`` gives each one's first occurrence.
    _, heads = np.unique(household, return_index=True)
    result: npt.NDArray[np.int64] = heads.astype(np.int64)
    return result


def _given_names(
    rng: np.random.Generator, female: npt.NDArray[np.bool_]
) -> tuple[list[str], list[tuple[str, ...]]]:
    male_pick = rng.choice(len(MALE), size=len(female), p=popularity(len(MALE)))
    female_pick = rng.choice(len(FEMALE), size=len(female), p=popularity(len(FEMALE)))
    chosen: list[GivenName] = [
        FEMALE[f] if is_female else MALE[m]
        for is_female, m, f in zip(female, male_pick, female_pick, strict=True)
    ]
    return [name.name for name in chosen], [name.nicknames for name in chosen]


def _birth_dates(
    rng: np.random.Generator,
    household: npt.NDArray[np.int64],
    heads: npt.NDArray[np.int64],
    today: date,
) -> npt.NDArray[np.datetime64]:
    """Adults of plausible ages; a household's other members are partners or grown children."""
    count = len(household)
    # Adults from 18, most between 25 and 60; no clipping, which would pile people up on one
    # birth date.
    age = np.minimum(18.0 + rng.gamma(2.6, 9.5, count), 99.0)
    head_age = age[heads[household]]
    partner = head_age + rng.normal(0.0, 4.0, count)
    partner = np.where(partner < 18.0, 18.0 + rng.uniform(0.0, 4.0, count), partner)
    child = head_age - rng.uniform(22.0, 34.0, count)
    member_age = np.where((rng.random(count) < 0.5) & (child >= 18.0), child, partner)
    is_head = heads[household] == np.arange(count)
    age = np.where(is_head, age, member_age)
    days = np.round(age * 365.25).astype(np.int64)
    dob: npt.NDArray[np.datetime64] = np.datetime64(today, "D") - days.astype("timedelta64[D]")
    return dob


def _addresses(
    rng: np.random.Generator, household: npt.NDArray[np.int64], heads: npt.NDArray[np.int64]
) -> tuple[list[str], list[str], list[str], list[str], list[str]]:
    """Street, city, state, ZIP code and the phone area code of each person's home."""
    homes = len(heads)
    city = rng.choice(len(CITIES), size=homes, p=_CITY_WEIGHTS)
    number = np.where(
        rng.random(homes) < 0.7, rng.integers(1, 2000, homes), rng.integers(2000, 19999, homes)
    )
    street = rng.integers(0, len(STREETS), homes)
    suffix = rng.integers(0, len(STREET_SUFFIXES), homes)
    apartment = np.where(rng.random(homes) < 0.15, rng.integers(1, 40, homes), 0)
    zip_tail = rng.integers(1, 30, homes)
    lines = [
        f"{number[h]} {STREETS[street[h]]} {STREET_SUFFIXES[suffix[h]][0]}"
        + (f" Apt {apartment[h]}" if apartment[h] else "")
        for h in range(homes)
    ]
    # Most people's mobile numbers are local; some kept the number of a city they left.
    moved = rng.random(len(household)) < 0.2
    elsewhere = rng.choice(len(CITIES), size=len(household), p=_CITY_WEIGHTS)
    return (
        [lines[h] for h in household],
        [CITIES[city[h]].name for h in household],
        [CITIES[city[h]].state for h in household],
        [f"{CITIES[city[h]].zip_prefix}{zip_tail[h]:02d}" for h in household],
        [CITIES[elsewhere[i] if moved[i] else city[h]].area_code for i, h in enumerate(household)],
    )


def email_part(name: str) -> str:
    """A name as it appears in an e-mail address: lower case letters and digits only."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _personal_email(
    rng: np.random.Generator,
    book: EmailBook,
    first: str,
    last: str,
    birth_year: int,
    pattern: int,
    domain: int,
) -> str:
    """An address built from the name by one of the usual patterns (``ada.lovelace``,
    ``alovelace``, ``ada.lovelace1815`` ...)."""
    f, la = email_part(first), email_part(last)
    patterns = (
        f"{f}.{la}",
        f"{f}{la}",
        f"{f[0]}{la}",
        f"{f}_{la}",
        f"{f}{la}{birth_year % 100:02d}",
        f"{f}{int(rng.integers(1, 100))}",
        f"{la}.{f}",
        f"{f}.{la}{birth_year}",
    )
    return book.claim(rng, patterns[pattern], EMAIL_DOMAINS[domain])


_PATTERN_WEIGHTS = np.array([0.3, 0.15, 0.12, 0.06, 0.12, 0.1, 0.05, 0.1])


class PhoneBook:
    """The phone numbers handed out so far, so that no number is given to two people."""

    def __init__(self) -> None:
        self._taken: set[str] = set()

    def draw(self, rng: np.random.Generator, area_code: str) -> str:
        """A new US number in E.164 in ``area_code``; exchanges avoid N11 and the fictional
        555, which a validating form would refuse."""
        while True:
            exchange = int(rng.integers(200, 1000))
            if exchange % 100 == 11 or exchange == 555:
                continue
            number = f"+1{area_code}{exchange}{int(rng.integers(0, 10_000)):04d}"
            if number not in self._taken:
                self._taken.add(number)
                return number
