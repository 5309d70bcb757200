"""Signing up and signing in: when a visitor's anonymous events start carrying their user id.

Most customers create an account at some visit, at the latest when they first check out; a
few never do and stay anonymous (guest checkout). From then on, each device they sign in on
sends an ``identify`` (user id, e-mail, name, consent ...) at its first visit after the
sign-up, and the user id with every later event; before that the device's events carry only
its anonymous id. Some devices are never signed in on, and stay anonymous forever. Some
customers later add their other e-mail address (a second personal one, or a lead's work
address) in another ``identify``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from profilemesh.services.generator.devices import Devices
from profilemesh.services.generator.sessions import Kind, Sessions

SIGN_UP_SHARE = 0.82
"""Share of the customers who ever create an account."""
SIGN_IN_SHARE = 0.88
"""Share of a customer's other devices they sign in on after signing up."""
OTHER_EMAIL_SHARE = 0.45
"""Share of the customers with another e-mail address who also use it on the shop."""
SHARES_PHONE = 0.35
SHARES_ADDRESS = 0.40
SHARES_BIRTHDAY = 0.15
CONSENT_ASKED = 0.85
"""Share of the customers whose identify carries an e-mail consent decision."""
CONSENT_GIVEN = 0.70
NOT_ASKED, REFUSED, GIVEN = -1, 0, 1
_NEVER = np.iinfo(np.int64).max


@dataclass(frozen=True, slots=True)
class Accounts:
    """Per person, their account on the shop and what they told it."""

    signs_up: npt.NDArray[np.bool_]
    """Whether they ever sign up (and have visits to do it on)."""
    shares_phone: npt.NDArray[np.bool_]
    shares_address: npt.NDArray[np.bool_]
    shares_birthday: npt.NDArray[np.bool_]
    email_consent: npt.NDArray[np.int64]
    """:data:`NOT_ASKED`, :data:`REFUSED` or :data:`GIVEN`."""
    other_email: list[str]
    """The address sent in a later identify (``Kind.ALT_IDENTIFY``), or ``""``."""


def sign_in(
    rng: np.random.Generator, sessions: Sessions, devices: Devices, other_emails: list[str]
) -> Accounts:
    """Decide who signs up when and on which devices; mark the identify events and the
    identified visits in ``sessions``. ``other_emails`` has, per person, an address they may
    add later (``""`` for none)."""
    count = len(sessions.count)
    signs_up = (rng.random(count) < SIGN_UP_SHARE) & (sessions.count > 0)
    signup = _signup_visits(rng, sessions, signs_up)
    login = _first_visits_signed_in(rng, sessions, devices, signup)
    visit = np.arange(len(sessions), dtype=np.int64)
    sessions.identified[:] = visit >= login[sessions.device]
    signed_in_on = login[login != _NEVER]
    sessions.counts[signed_in_on, Kind.IDENTIFY] = 1
    other = np.array([bool(email) for email in other_emails]) & (
        rng.random(count) < OTHER_EMAIL_SHARE
    )
    sessions.counts[_one_identified_visit_each(rng, sessions, other), Kind.ALT_IDENTIFY] = 1
    asked = rng.random(count) < CONSENT_ASKED
    given = rng.random(count) < CONSENT_GIVEN
    return Accounts(
        signs_up=signs_up,
        shares_phone=rng.random(count) < SHARES_PHONE,
        shares_address=rng.random(count) < SHARES_ADDRESS,
        shares_birthday=rng.random(count) < SHARES_BIRTHDAY,
        email_consent=np.where(asked, np.where(given, GIVEN, REFUSED), NOT_ASKED).astype(np.int64),
        other_email=[email if other[i] else "" for i, email in enumerate(other_emails)],
    )


def _signup_visits(
    rng: np.random.Generator, sessions: Sessions, signs_up: npt.NDArray[np.bool_]
) -> npt.NDArray[np.int64]:
    """Per person, the visit they sign up on: a random one, or their first order's if that
    comes earlier (checkout asks for an account). ``_NEVER`` for people who do not."""
    count = len(signs_up)
    planned = sessions.first + np.floor(rng.random(count) * sessions.count).astype(np.int64)
    first_order = np.full(count, _NEVER, dtype=np.int64)
    ordering = np.flatnonzero(sessions.counts[:, Kind.ORDER_COMPLETED] > 0)
    np.minimum.at(first_order, sessions.person[ordering], ordering)
    signup: npt.NDArray[np.int64] = np.where(signs_up, np.minimum(planned, first_order), _NEVER)
    return signup


def _first_visits_signed_in(
    rng: np.random.Generator,
    sessions: Sessions,
    devices: Devices,
    signup: npt.NDArray[np.int64],
) -> npt.NDArray[np.int64]:
    """Per device row, the visit its owner first signs in on: the first visit from it at or
    after their sign-up, on the devices they sign in on at all. ``_NEVER`` for the others."""
    signs_in = rng.random(len(devices)) < SIGN_IN_SHARE
    signed_up_on = signup[signup != _NEVER]
    signs_in[sessions.device[signed_up_on]] = True  # the sign-up's own device, surely
    visit = np.arange(len(sessions), dtype=np.int64)
    eligible = np.flatnonzero(signs_in[sessions.device] & (visit >= signup[sessions.person]))
    login = np.full(len(devices), _NEVER, dtype=np.int64)
    # ``eligible`` is in visit order, which is time order within a person (a row's owner).
    rows, first = np.unique(sessions.device[eligible], return_index=True)
    login[rows] = eligible[first]
    return login


def _one_identified_visit_each(
    rng: np.random.Generator, sessions: Sessions, chosen: npt.NDArray[np.bool_]
) -> npt.NDArray[np.int64]:
    """One random identified visit of each ``chosen`` person who has any."""
    candidates = np.flatnonzero(sessions.identified & chosen[sessions.person])
    if len(candidates) == 0:
        return candidates
    # The candidate with the largest random key wins, per person.
    keys = rng.random(len(candidates))
    order = np.lexsort((keys, sessions.person[candidates]))
    ranked = candidates[order]
    last_of_person = np.r_[sessions.person[ranked][1:] != sessions.person[ranked][:-1], True]
    picked: npt.NDArray[np.int64] = ranked[last_of_person]
    return picked
