"""Visits to the shop: when each customer comes, on which device, and how far they get.

A customer's visits are a Poisson process over their active days whose rate follows the
season's traffic (:mod:`.seasons`): their number is drawn from the integrated rate and their
days by inverting its cumulative sum, all people at once. A visit is a funnel: some pages or
screens, some product views, sometimes a cart, and a cart sometimes an order, likelier in
November and December. Everything is counted per visit and kind of event (:class:`Kind`);
:mod:`.events` turns the counts into events.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import numpy.typing as npt

from profilemesh.services.generator.devices import Devices
from profilemesh.services.generator.lifecycles import Lifecycles
from profilemesh.services.generator.seasons import DAY_MS, YEAR_DAYS, Window

DISENGAGEMENT_DAYS = 45
"""Customers who are about to churn visit half as often in their last days as customers."""

# Visits start between midnight and 23:00 UTC, most in the evening; a visit lasts at most
# MAX_VISIT_MS, so every event of a visit falls on the visit's day.
_HOUR_WEIGHTS = np.array(
    [1, 0.6, 0.4, 0.3, 0.3, 0.5, 1, 2, 3, 3.5, 3.5, 4, 4.5, 4.5, 4, 4, 4.5, 5, 6, 7, 7.5, 6.5, 4]
)
MAX_VISIT_MS = 50 * 60 * 1000


class Kind(IntEnum):
    """The events a visit can hold, in the order they happen within it."""

    IDENTIFY = 0
    """Sign-up or sign-in: an identify with the person's traits."""
    ALT_IDENTIFY = 1
    """An identify with the person's other e-mail address (a second or a work address)."""
    PAGE = 2
    """A page view (browsers) or screen view (apps)."""
    PRICING = 3
    """A view of the business pricing page (leads)."""
    WEBINAR = 4
    """``Webinar Attended`` (leads)."""
    PRODUCT_VIEWED = 5
    ADDED_TO_CART = 6
    ORDER_COMPLETED = 7
    SURVEY_ANSWERED = 8
    DEMO_BOOKED = 9
    """``Demo Booked``: a lead converts."""


@dataclass(frozen=True, slots=True)
class Sessions:
    """The visits, ordered by person and then time, with their event counts.

    ``counts`` and ``identified`` are filled in step by step (sign-in, surveys, leads)."""

    person: npt.NDArray[np.int64]
    device: npt.NDArray[np.int64]
    """Row of :class:`~.devices.Devices` the visit is made from."""
    day: npt.NDArray[np.int64]
    """Day of the visit, from the window's start."""
    time_of_day: npt.NDArray[np.int64]
    """Milliseconds after midnight UTC at which the visit starts."""
    counts: npt.NDArray[np.int64]
    """Events per visit (rows) and :class:`Kind` (columns)."""
    identified: npt.NDArray[np.bool_]
    """Whether the visit's events carry the person's ``user_id``."""
    first: npt.NDArray[np.int64]
    """Per person, the index of their first visit (their visits are consecutive)."""
    count: npt.NDArray[np.int64]
    """Per person, their number of visits."""

    def __len__(self) -> int:
        return len(self.person)

    def start_ms(self, window: Window) -> npt.NDArray[np.int64]:
        """When each visit starts, in milliseconds since the epoch."""
        start: npt.NDArray[np.int64] = window.start_ms + self.day * DAY_MS + self.time_of_day
        return start


def draw_sessions(
    rng: np.random.Generator, life: Lifecycles, devices: Devices, window: Window
) -> Sessions:
    """Every customer's visits over the window, each with its funnel counted."""
    person, day = _visit_days(rng, life, window.traffic())
    hour = rng.choice(len(_HOUR_WEIGHTS), size=len(person), p=_HOUR_WEIGHTS / _HOUR_WEIGHTS.sum())
    time_of_day = hour * 3_600_000 + rng.integers(0, 3_600_000, len(person))
    order = np.lexsort((time_of_day, day, person))
    person, day, time_of_day = person[order], day[order], time_of_day[order]
    count = np.bincount(person, minlength=len(life)).astype(np.int64)
    counts = np.zeros((len(person), len(Kind)), dtype=np.int64)
    sessions = Sessions(
        person=person,
        device=_devices_used(rng, person, devices),
        day=day,
        time_of_day=time_of_day,
        counts=counts,
        identified=np.zeros(len(person), dtype=bool),
        first=np.concatenate(([0], np.cumsum(count)[:-1])).astype(np.int64),
        count=count,
    )
    _browse_and_buy(rng, sessions, life, window.checkout_lift())
    return sessions


def _visit_days(
    rng: np.random.Generator, life: Lifecycles, traffic: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Person and day of every visit, a Poisson process following ``traffic``."""
    cumulative = np.concatenate(([0.0], np.cumsum(traffic)))
    grid = np.arange(YEAR_DAYS + 1, dtype=np.float64)
    begin = np.interp(life.acquired, grid, cumulative)
    end = np.interp(life.active_until.astype(np.float64), grid, cumulative)
    expected = life.sessions_per_year * (end - begin) / YEAR_DAYS
    visits = rng.poisson(expected)
    # A customer who arrives during the window does so on a visit.
    visits = np.where(life.acquired > 0, np.maximum(visits, 1), visits)
    person = np.repeat(np.arange(len(life), dtype=np.int64), visits)
    position = begin[person] + rng.random(len(person)) * (end - begin)[person]
    day = np.floor(np.interp(position, cumulative, grid)).astype(np.int64)
    day = np.clip(
        day, np.floor(life.acquired[person]).astype(np.int64), life.active_until[person] - 1
    )
    # Drifting away: half of the visits in the weeks before churning do not happen.
    fading = life.churned[person] & (day >= life.active_until[person] - DISENGAGEMENT_DAYS)
    kept = ~fading | (rng.random(len(person)) < 0.5)
    return person[kept], day[kept]


def _devices_used(
    rng: np.random.Generator, person: npt.NDArray[np.int64], devices: Devices
) -> npt.NDArray[np.int64]:
    """The device row of each visit, drawn by the person's device shares.

    A person's shares sum to 1, so over all rows the running sum reaches ``p`` at the end of
    person ``p - 1``'s rows: ``p + u`` falls within person ``p``'s."""
    running = np.cumsum(devices.share)
    row = np.searchsorted(running, person + rng.random(len(person)), side="right")
    first = devices.first_row[person]
    device: npt.NDArray[np.int64] = np.clip(
        row, first, first + devices.row_count[person] - 1
    ).astype(np.int64)
    return device


def _browse_and_buy(
    rng: np.random.Generator,
    sessions: Sessions,
    life: Lifecycles,
    checkout_lift: npt.NDArray[np.float64],
) -> None:
    """Pages, product views, carts and orders of each visit."""
    person, size = sessions.person, len(sessions)
    counts = sessions.counts
    counts[:, Kind.PAGE] = 1 + rng.poisson(1.4, size)
    views = rng.poisson(life.browse_depth[person])
    carts = rng.random(size) < life.cart_rate[person]
    counts[:, Kind.PRODUCT_VIEWED] = np.where(carts, np.maximum(views, 1), views)
    counts[:, Kind.ADDED_TO_CART] = np.where(carts, 1 + rng.poisson(0.35, size), 0)
    checkout = np.minimum(life.checkout_rate[person] * checkout_lift[sessions.day], 0.95)
    counts[:, Kind.ORDER_COMPLETED] = carts & (rng.random(size) < checkout)


SURVEY_CHANCE = 0.12
"""Chance that a signed-in visit of a survey responder includes an NPS answer."""


def ask_for_feedback(rng: np.random.Generator, sessions: Sessions, life: Lifecycles) -> None:
    """Count NPS answers into ``sessions``: responders answer on some signed-in visits (the
    survey is shown to known customers only)."""
    asked = sessions.identified & life.survey_responder[sessions.person]
    sessions.counts[:, Kind.SURVEY_ANSWERED] = asked & (rng.random(len(sessions)) < SURVEY_CHANCE)
