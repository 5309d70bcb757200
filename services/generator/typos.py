"""How people and clerks get data wrong: typing errors, day and month swapped, phone numbers in
every format, street types abbreviated.

Each function takes the seeded generator and a correct value and returns the value as it was
entered. Errors follow what record linkage studies find most often: a letter dropped, doubled,
swapped with its neighbour or replaced by one next to it on the keyboard.
"""

from __future__ import annotations

import numpy as np

from profilemesh.services.generator.places import STREET_SUFFIXES

_KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def _keyboard_neighbours() -> dict[str, str]:
    """Per letter, the letters around it on a QWERTY keyboard."""
    neighbours = {}
    for row_index, row in enumerate(_KEYBOARD_ROWS):
        for column, key in enumerate(row):
            near = [row[c] for c in (column - 1, column + 1) if 0 <= c < len(row)]
            # Rows are staggered: the row above is half a key to the left of this one.
            for other, columns in (
                (row_index - 1, (column, column + 1)),
                (row_index + 1, (column - 1, column)),
            ):
                if 0 <= other < len(_KEYBOARD_ROWS):
                    keys = _KEYBOARD_ROWS[other]
                    near.extend(keys[c] for c in columns if 0 <= c < len(keys))
            neighbours[key] = "".join(near)
    return neighbours


_NEIGHBOURS = _keyboard_neighbours()

PHONE_FORMATS = (
    "+1{a}{e}{l}",
    "+1 {a}-{e}-{l}",
    "({a}) {e}-{l}",
    "{a}-{e}-{l}",
    "{a}.{e}.{l}",
    "{a}{e}{l}",
)
PHONE_FORMAT_WEIGHTS = np.array([0.25, 0.15, 0.30, 0.15, 0.10, 0.05])
"""How often each of :data:`PHONE_FORMATS` is used: only the first two carry the country code
that identity needs to read a number without a default region."""
_PHONE_FORMAT_CUMULATIVE = np.cumsum(PHONE_FORMAT_WEIGHTS) / PHONE_FORMAT_WEIGHTS.sum()


def typo(rng: np.random.Generator, text: str) -> str:
    """``text`` with one typing error, never in its first letter (people check that one)."""
    if len(text) < 3:
        return text
    position = int(rng.integers(1, len(text)))
    error = int(rng.integers(0, 4))
    letter = text[position]
    if error == 0:  # dropped
        return text[:position] + text[position + 1 :]
    if error == 1:  # doubled
        return text[:position] + letter + text[position:]
    if error == 2 and position < len(text) - 1:  # swapped with the next letter
        return text[:position] + text[position + 1] + letter + text[position + 2 :]
    near = _NEIGHBOURS.get(letter.lower(), "")
    if not near:
        return text[:position] + text[position + 1 :]
    replacement = near[int(rng.integers(0, len(near)))]
    if letter.isupper():
        replacement = replacement.upper()
    return text[:position] + replacement + text[position + 1 :]


def swap_day_and_month(iso_date: str) -> str:
    """``1985-03-07`` entered as ``1985-07-03``: a clerk used the other convention."""
    year, month, day = iso_date.split("-")
    return f"{year}-{day}-{month}"


def can_swap_day_and_month(iso_date: str) -> bool:
    """Whether swapping would still look like a date and change it."""
    _, month, day = iso_date.split("-")
    return int(day) <= 12 and day != month


def mistyped_year(rng: np.random.Generator, iso_date: str) -> str:
    """The year off by one, or its last two digits swapped (``1985`` as ``1958``)."""
    year, rest = iso_date[:4], iso_date[4:]
    if rng.random() < 0.5 and year[2] != year[3]:
        return f"{year[:2]}{year[3]}{year[2]}{rest}"
    return f"{int(year) + int(rng.choice([-1, 1]))}{rest}"


def formatted_phone(rng: np.random.Generator, e164: str) -> str:
    """A US number in E.164 written in one of the usual formats."""
    digits = e164.removeprefix("+1")
    style = PHONE_FORMATS[int(np.searchsorted(_PHONE_FORMAT_CUMULATIVE, rng.random()))]
    return style.format(a=digits[:3], e=digits[3:6], l=digits[6:])


def abbreviated_street(text: str) -> str:
    """``12 Maple Avenue Apt 4`` as ``12 Maple Ave #4``."""
    for full, short in STREET_SUFFIXES:
        text = text.replace(f" {full}", f" {short}")
    return text.replace(" Apt ", " #")


def mistyped_email(rng: np.random.Generator, address: str) -> str:
    """An address with a typing error in its local part."""
    local, _, domain = address.partition("@")
    return f"{typo(rng, local)}@{domain}"
