"""Seeded synthetic histories and a feature set that exercises every aggregation, operator and
value kind, for the tests that compare the streaming state, the batch queries and the
reference."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any

from profilemesh.services.features.definitions import FeatureSet, load_definitions
from profilemesh.services.features.events import NS_PER_DAY, FeatureEvent

START_DAY = 19_723
"""2024-01-01, UTC."""
SPAN_DAYS = 400

# Every aggregation over a windowed and a lifetime variant, every operator, and property values
# of every kind (numbers, numeric strings, booleans, nested objects), on top of the built-ins.
EXTRA_DEFINITIONS = """
features:
  - name: revenue_min_7d
    aggregation: min
    event_names: [Order Completed]
    property: revenue
    window_days: 7
  - name: revenue_max_lifetime
    aggregation: max
    event_names: [Order Completed]
    property: properties.revenue
  - name: revenue_avg_30d
    aggregation: avg
    event_names: [Order Completed]
    property: revenue
    window_days: 30
  - name: big_usd_revenue_60d
    aggregation: sum
    event_types: [track]
    event_names: [Order Completed]
    property: revenue
    window_days: 60
    filters:
      - {property: currency, operator: eq, value: USD}
      - {property: revenue, operator: ge, value: 20}
  - name: first_product
    aggregation: first
    event_names: [Product Viewed]
    property: product_id
  - name: last_product_30d
    aggregation: last
    event_names: [Product Viewed]
    property: product_id
    window_days: 30
  - name: last_product_number
    aggregation: last
    event_names: [Product Viewed]
    property: product_id
    value_type: double
  - name: first_product_int_1d
    aggregation: first
    event_names: [Product Viewed]
    property: product_id
    value_type: int64
    window_days: 1
  - name: distinct_products_lifetime
    aggregation: distinct_count
    event_names: [Product Viewed]
    property: product_id
  - name: distinct_currencies_30d
    aggregation: distinct_count
    property: currency
    window_days: 30
  - name: days_since_view_14d
    aggregation: days_since
    event_names: [Product Viewed]
    window_days: 14
  - name: first_view_days
    aggregation: days_since_first
    event_names: [Product Viewed]
  - name: non_usd_orders
    aggregation: count
    event_names: [Order Completed]
    filters: [{property: currency, operator: ne, value: USD}]
  - name: gift_orders_90d
    aggregation: count
    event_names: [Order Completed]
    window_days: 90
    filters: [{property: gift, operator: eq, value: true}]
  - name: small_orders
    aggregation: count
    event_names: [Order Completed]
    filters: [{property: revenue, operator: lt, value: 10.5}]
  - name: late_alphabet_currency
    aggregation: count
    filters: [{property: currency, operator: gt, value: EUR}]
  - name: listed_currency_orders
    aggregation: count
    filters: [{property: currency, operator: in, value: [USD, GBP, 7]}]
  - name: unlisted_device_events_30d
    aggregation: count
    window_days: 30
    filters: [{property: context.device.type, operator: not_in, value: [mobile, tablet]}]
  - name: coupon_orders
    aggregation: count
    event_names: [Order Completed]
    filters: [{property: coupon, operator: exists}]
  - name: no_coupon_orders_le
    aggregation: count
    event_names: [Order Completed]
    filters:
      - {property: coupon, operator: not_exists}
      - {property: revenue, operator: le, value: 50}
  - name: nested_count
    aggregation: sum
    property: cart.items
  - name: identify_plan
    aggregation: last
    event_types: [identify]
    property: traits.plan
  - name: revenue_ratio
    expression: revenue_90d / monetary_365d
  - name: cadence_or_tenure
    expression: coalesce(purchase_cadence_days, -tenure_days, 0)
  - name: bounded_revenue
    expression: max(min(revenue_max_lifetime, 100), 1) * 2 - (orders_30d + 0.5)
"""


def feature_set() -> FeatureSet:
    """The built-ins and :data:`EXTRA_DEFINITIONS`."""
    return FeatureSet(load_definitions(EXTRA_DEFINITIONS))


def _revenue(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.5:
        return round(rng.uniform(0, 200), 2)
    if roll < 0.65:
        return rng.randint(0, 100)
    if roll < 0.72:
        return f"{rng.uniform(0, 80):.2f}"
    if roll < 0.75:
        return rng.choice(["n/a", "", " 12", "1e3", "-0", "1_000", "inf", True])
    if roll < 0.78:
        return {"amount": 5}
    return rng.choice([None, 0.1, 0.2, 0.3, 1e-7, -0.0, 10.5, 20])


def _product(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.6:
        return f"sku-{rng.randint(1, 12)}"
    if roll < 0.8:
        return rng.choice([1, 1.0, 2, 2.5, -0.0, 0, "1", "2.5", True, False])
    return rng.choice([None, [1, 2], "é☃", "sku-1"])


def _context(rng: random.Random) -> dict[str, Any]:
    device = rng.choice(["mobile", "tablet", "desktop", "ios", "android", None, 3])
    context: dict[str, Any] = {}
    if device is not None:
        context["device"] = {"type": device}
    platform = rng.random()
    if platform < 0.3:
        context["os"] = {"name": rng.choice(["iOS", "Android", "iPadOS"])}
    elif platform < 0.6:
        context["library"] = {"name": "analytics.js"}
    return context


def _event(rng: random.Random, profile_id: str, timestamp_ns: int) -> FeatureEvent:
    kind = rng.random()
    properties: dict[str, Any] = {}
    if kind < 0.3:
        event_type, name = "track", "Order Completed"
        properties["revenue"] = _revenue(rng)
        properties["currency"] = rng.choice(["USD", "EUR", "GBP", 7, "usd"])
        if rng.random() < 0.3:
            properties["coupon"] = rng.choice(["SPRING", None, ""])
        if rng.random() < 0.3:
            properties["gift"] = rng.choice([True, False, "true", 1])
        if rng.random() < 0.3:
            properties["cart"] = rng.choice([{"items": rng.randint(1, 5)}, {"items": "2"}, 3])
    elif kind < 0.55:
        event_type, name = "track", "Product Viewed"
        product = _product(rng)
        if product is not None:
            properties["product_id"] = product
    elif kind < 0.65:
        event_type, name = "track", rng.choice(["Survey Answered", "survey_answered"])
        properties["survey"] = rng.choice(["nps", "nps", "csat", "other"])
        properties["score"] = rng.choice([rng.randint(0, 10), rng.randint(0, 10), "7", "x", 8.5])
    elif kind < 0.8:
        event_type, name = "page", rng.choice(["Home", "Cart", ""])
    elif kind < 0.88:
        event_type, name = "screen", "Feed"
    elif kind < 0.95:
        event_type, name = "identify", ""
        properties["plan"] = rng.choice(["free", "pro", 3, None])
    else:
        event_type, name = rng.choice([("alias", ""), ("group", "acme"), ("record", "crm")])
    return FeatureEvent(
        profile_id=profile_id,
        timestamp_ns=timestamp_ns,
        type=event_type,
        name=name,
        properties=properties,
        context=_context(rng),
    )


def random_timestamp(rng: random.Random) -> int:
    """A time within the span, often exactly at or next to midnight or on a round second (so
    that windows' edges and ties between events are exercised)."""
    day = START_DAY + rng.randrange(SPAN_DAYS)
    roll = rng.random()
    if roll < 0.1:
        offset = 0
    elif roll < 0.2:
        offset = NS_PER_DAY - 1
    elif roll < 0.5:
        offset = rng.randrange(24) * 3_600_000_000_000
    else:
        offset = rng.randrange(NS_PER_DAY)
    return day * NS_PER_DAY + offset


def history(seed: int, profiles: int, max_events: int = 40) -> list[FeatureEvent]:
    """Random events of ``profiles`` profiles over :data:`SPAN_DAYS` days, in no order."""
    rng = random.Random(seed)
    events = []
    for index in range(profiles):
        profile_id = f"p{index:04d}"
        times: list[int] = []
        for _ in range(rng.randint(0, max_events)):
            # Some events share a timestamp, so that first and last need their tie-break.
            reuse = times and rng.random() < 0.15
            times.append(rng.choice(times) if reuse else random_timestamp(rng))
            events.append(_event(rng, profile_id, times[-1]))
    rng.shuffle(events)
    return events


def by_profile(events: list[FeatureEvent]) -> dict[str, list[FeatureEvent]]:
    """Events grouped by profile id."""
    grouped: dict[str, list[FeatureEvent]] = {}
    for event in events:
        grouped.setdefault(event.profile_id, []).append(event)
    return grouped


def assert_values_match(
    actual: Mapping[str, Any], expected: Mapping[str, Any], *, exact: bool, where: str = ""
) -> None:
    """Same features with the same values: floats to 1e-9 (relative or absolute) unless
    ``exact``, everything else exactly."""
    assert list(actual) == list(expected), where
    for name, value in expected.items():
        got = actual[name]
        if isinstance(value, float) and isinstance(got, float) and not exact:
            assert math.isclose(got, value, rel_tol=1e-9, abs_tol=1e-9), (where, name, got, value)
        else:
            assert got == value and type(got) is type(value), (where, name, got, value)
