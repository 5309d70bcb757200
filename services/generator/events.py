"""Visits' event counts expanded into events: their times, products, pages, orders and scores.

Everything stays columnar: one array per attribute, one element per event, built with
``repeat`` and ``cumsum`` over the visits rather than a loop over events. Within a visit the
events follow the order of :class:`~.sessions.Kind` (identify, pages, product views, cart,
order ...), some seconds apart. A cart holds products viewed in the same visit and an order
the products carted in it, so that revenue adds up across events.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from profilemesh.services.generator.catalog import (
    CATEGORIES,
    PAGE_WEIGHTS,
    PAGES,
    PRODUCTS_PER_CATEGORY,
    WEBINARS,
    Catalog,
)
from profilemesh.services.generator.ids import unique_numbers
from profilemesh.services.generator.lifecycles import Lifecycles
from profilemesh.services.generator.seasons import Window
from profilemesh.services.generator.sessions import MAX_VISIT_MS, Kind, Sessions

MEAN_GAP_MS = 40_000
"""Mean time between two events of a visit."""
GIFT_SHARE = 0.2
"""Share of the product views in November and December that are gift shopping (toys and
electronics) whatever the person's own taste."""
_GIFT_CATEGORIES = np.array(
    [i for i, c in enumerate(CATEGORIES) if c.name in ("Toys & Games", "Electronics")]
)
_QUANTITIES = np.array([1, 2, 3])
_QUANTITY_WEIGHTS = np.array([0.85, 0.12, 0.03])


@dataclass(frozen=True, slots=True)
class Orders:
    """The orders, in visit order; an order's products are the carts of its visit."""

    order_id: list[str]
    products: list[list[tuple[int, int]]]
    """(product number, quantity) of each line."""
    revenue: npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Events:
    """The events, in visit order, as parallel columns."""

    session: npt.NDArray[np.int64]
    kind: npt.NDArray[np.int64]
    """A :class:`~.sessions.Kind`."""
    timestamp_ms: npt.NDArray[np.int64]
    detail: npt.NDArray[np.int64]
    """Per kind: the product (views, carts), the page (pages), the order (orders), the score
    (surveys), the webinar (webinars); -1 for the others."""
    quantity: npt.NDArray[np.int64]
    """Units added, for carts; 0 for the others."""
    orders: Orders

    def __len__(self) -> int:
        return len(self.session)


def expand(
    rng: np.random.Generator,
    sessions: Sessions,
    life: Lifecycles,
    catalog: Catalog,
    window: Window,
) -> Events:
    """The events of every visit."""
    counts = sessions.counts
    per_visit = counts.sum(axis=1)
    session = np.repeat(np.arange(len(sessions), dtype=np.int64), per_visit)
    kind = np.repeat(np.tile(np.arange(len(Kind), dtype=np.int64), len(sessions)), counts.ravel())
    first_event = np.cumsum(per_visit) - per_visit
    # Offsets of each kind's first event within its visit: the counts of the kinds before it.
    kind_start = first_event[:, None] + np.cumsum(counts, axis=1) - counts
    timestamp = _timestamps(rng, sessions, session, per_visit, window)
    detail = np.full(len(session), -1, dtype=np.int64)
    quantity = np.zeros(len(session), dtype=np.int64)
    views = np.flatnonzero(kind == Kind.PRODUCT_VIEWED)
    detail[views] = _viewed_products(rng, sessions, life, catalog, session[views], window)
    carts = np.flatnonzero(kind == Kind.ADDED_TO_CART)
    detail[carts] = _carted_products(rng, counts, kind_start, session[carts], detail)
    quantity[carts] = rng.choice(_QUANTITIES, size=len(carts), p=_QUANTITY_WEIGHTS)
    pages = np.flatnonzero(kind == Kind.PAGE)
    detail[pages] = rng.choice(len(PAGES), size=len(pages), p=PAGE_WEIGHTS)
    webinars = np.flatnonzero(kind == Kind.WEBINAR)
    detail[webinars] = rng.integers(0, len(WEBINARS), len(webinars))
    surveys = np.flatnonzero(kind == Kind.SURVEY_ANSWERED)
    detail[surveys] = _nps_scores(rng, life, sessions.person[session[surveys]])
    order_events = np.flatnonzero(kind == Kind.ORDER_COMPLETED)
    detail[order_events] = np.arange(len(order_events))
    orders = _orders(rng, catalog, counts, kind_start, session[order_events], detail, quantity)
    return Events(session, kind, timestamp, detail, quantity, orders)


def _timestamps(
    rng: np.random.Generator,
    sessions: Sessions,
    session: npt.NDArray[np.int64],
    per_visit: npt.NDArray[np.int64],
    window: Window,
) -> npt.NDArray[np.int64]:
    """Each event's time: its visit's start plus exponential gaps, a visit squeezed into
    :data:`~.sessions.MAX_VISIT_MS` when longer. Every visit has an event (a page at least)."""
    first_event = np.cumsum(per_visit) - per_visit
    running = np.cumsum(rng.exponential(MEAN_GAP_MS, len(session)))
    # The first event of a visit is at the visit's start.
    offset = running - running[first_event[session]]
    duration = offset[first_event + per_visit - 1]
    squeeze = np.minimum(1.0, MAX_VISIT_MS / np.maximum(duration, 1.0))
    start = sessions.start_ms(window)
    timestamps: npt.NDArray[np.int64] = start[session] + (offset * squeeze[session]).astype(
        np.int64
    )
    return timestamps


def _viewed_products(
    rng: np.random.Generator,
    sessions: Sessions,
    life: Lifecycles,
    catalog: Catalog,
    visit: npt.NDArray[np.int64],
    window: Window,
) -> npt.NDArray[np.int64]:
    """Products viewed: a category by the person's taste (or a gift category in the holiday
    season), then a product by the category's sales ranks."""
    person = sessions.person[visit]
    taste = np.cumsum(life.taste, axis=1)
    draws = rng.random(len(visit))
    category = np.minimum((draws[:, None] > taste[person]).sum(axis=1), len(CATEGORIES) - 1)
    holiday = np.isin(window.month_of_day()[sessions.day[visit]], (11, 12))
    gift = holiday & (rng.random(len(visit)) < GIFT_SHARE)
    category = np.where(gift, rng.choice(_GIFT_CATEGORIES, size=len(visit)), category)
    rank = rng.choice(PRODUCTS_PER_CATEGORY, size=len(visit), p=catalog.popularity)
    return catalog.product_numbers(category.astype(np.int64), rank.astype(np.int64))


def _carted_products(
    rng: np.random.Generator,
    counts: npt.NDArray[np.int64],
    kind_start: npt.NDArray[np.int64],
    visit: npt.NDArray[np.int64],
    detail: npt.NDArray[np.int64],
) -> npt.NDArray[np.int64]:
    """Each cart's product: one of the products viewed in the same visit."""
    viewed = counts[visit, Kind.PRODUCT_VIEWED]
    which = kind_start[visit, Kind.PRODUCT_VIEWED] + np.floor(
        rng.random(len(visit)) * viewed
    ).astype(np.int64)
    products: npt.NDArray[np.int64] = detail[which]
    return products


def _nps_scores(
    rng: np.random.Generator, life: Lifecycles, person: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """NPS answers, 0 to 10: happier people score higher, and happiness is what churn risk
    takes away (see :mod:`.lifecycles`)."""
    raw = 7.4 + 1.7 * life.satisfaction[person] + rng.normal(0.0, 1.2, len(person))
    scores: npt.NDArray[np.int64] = np.clip(np.round(raw), 0, 10).astype(np.int64)
    return scores


def _orders(
    rng: np.random.Generator,
    catalog: Catalog,
    counts: npt.NDArray[np.int64],
    kind_start: npt.NDArray[np.int64],
    visit: npt.NDArray[np.int64],
    detail: npt.NDArray[np.int64],
    quantity: npt.NDArray[np.int64],
) -> Orders:
    """One order per ordering visit: its carts, merged by product, and what they cost."""
    numbers = unique_numbers(rng, len(visit), 1_000_000, 10_000_000)
    products: list[list[tuple[int, int]]] = []
    revenue = np.zeros(len(visit))
    first_cart = kind_start[visit, Kind.ADDED_TO_CART]
    carts = counts[visit, Kind.ADDED_TO_CART]
    for index in range(len(visit)):
        lines: dict[int, int] = {}
        for event in range(int(first_cart[index]), int(first_cart[index] + carts[index])):
            product = int(detail[event])
            lines[product] = lines.get(product, 0) + int(quantity[event])
        products.append(list(lines.items()))
        revenue[index] = round(sum(float(catalog.price[p]) * q for p, q in lines.items()), 2)
    return Orders([f"NW-{n}" for n in numbers], products, revenue)
