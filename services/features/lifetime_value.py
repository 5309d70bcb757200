"""Customer lifetime value as built-in features: BG/NBD and Gamma-Gamma fitted on the event store.

The models (:mod:`.clv`) are fitted on every profile's purchases (``Order Completed`` events
and their ``revenue``) summarised per UTC day, and refitted when the data has grown. A
profile's predictions need only its purchase count, the days since its first and last order
and its average order value, which the streaming state already serves
(``orders_lifetime``, ``first_order_days``, ``recency_days``, ``avg_order_value_lifetime``),
so the predictions are as fresh as those features:

- ``clv_probability_alive``: the probability the customer has not dropped out;
- ``clv_expected_orders_365d``: purchases expected in the next 365 days;
- ``clv_value_365d``: their expected value (undiscounted).

Online, purchases are counted as events while the fit counts days with a purchase; two orders
on one day are one repeat purchase to the fit and two online. It matters only for customers who
often order twice a day, and keeps the online path O(1).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from profilemesh.features.v1 import features_service_pb2 as service_pb2
from profilemesh.services.features import clv
from profilemesh.services.features.event_store import VIEW, EventStore
from profilemesh.services.features.events import NS_PER_DAY

PURCHASE_EVENT = "Order Completed"
MONETARY_PROPERTY = "revenue"
HORIZON_DAYS = 365
MIN_CUSTOMERS = 50
"""Fewer purchasers than this cannot identify four BG/NBD parameters."""
MIN_REPEAT_BUYERS = 20

INPUTS = ("orders_lifetime", "first_order_days", "recency_days", "avg_order_value_lifetime")
OUTPUTS = ("clv_probability_alive", "clv_expected_orders_365d", "clv_value_365d")


@dataclass(frozen=True, slots=True)
class LifetimeValueModel:
    bg_nbd: clv.BgNbdParams
    gamma_gamma: clv.GammaGammaParams | None
    sample_size: int
    data_end_ns: int
    fit_time_ns: int
    purchases: int
    """Purchase events the fit saw: a refit is due when there are many more."""

    def to_proto(self) -> service_pb2.LifetimeValueModel:
        message = service_pb2.LifetimeValueModel(
            bg_nbd=service_pb2.BgNbdParameters(
                r=self.bg_nbd.r,
                alpha=self.bg_nbd.alpha,
                a=self.bg_nbd.a,
                b=self.bg_nbd.b,
                log_likelihood=self.bg_nbd.log_likelihood,
            ),
            purchase_event=PURCHASE_EVENT,
            monetary_property=MONETARY_PROPERTY,
            sample_size=self.sample_size,
        )
        if self.gamma_gamma is not None:
            message.gamma_gamma.CopyFrom(
                service_pb2.GammaGammaParameters(
                    p=self.gamma_gamma.p,
                    q=self.gamma_gamma.q,
                    gamma=self.gamma_gamma.v,
                    log_likelihood=self.gamma_gamma.log_likelihood,
                )
            )
        message.data_end.FromNanoseconds(self.data_end_ns)
        message.fit_time.FromNanoseconds(self.fit_time_ns)
        return message

    def predict(self, inputs: dict[str, Any]) -> dict[str, float | None]:
        """The three outputs for one profile from its :data:`INPUTS` values."""
        orders = inputs.get("orders_lifetime") or 0
        age, since_last = inputs.get("first_order_days"), inputs.get("recency_days")
        if not orders or age is None or since_last is None:
            return dict.fromkeys(OUTPUTS)
        T = max(0.0, float(age))
        recency = min(T, max(0.0, T - float(since_last)))
        # Repeat purchases on the same day as the first are not repeats to the model.
        frequency = int(orders) - 1 if recency > 0 else 0
        alive = float(clv.probability_alive(self.bg_nbd, frequency, recency, T))
        expected = float(clv.expected_purchases(self.bg_nbd, HORIZON_DAYS, frequency, recency, T))
        value: float | None = None
        average = inputs.get("avg_order_value_lifetime")
        if self.gamma_gamma is not None and average is not None and average > 0:
            spend = float(
                clv.expected_average_value(self.gamma_gamma, max(frequency, 1), float(average))
            )
            value = expected * spend
        return {
            "clv_probability_alive": alive,
            "clv_expected_orders_365d": expected,
            "clv_value_365d": value,
        }


def fit(events: EventStore, as_of_ns: int | None = None) -> LifetimeValueModel | None:
    """Fit both models on the purchases up to ``as_of_ns`` (now); ``None`` with too few."""
    end = time.time_ns() if as_of_ns is None else as_of_ns
    with events.reader() as cursor:
        rows = cursor.execute(
            f"SELECT profile_id, timestamp_ns,"
            f" coalesce(TRY_CAST(json_extract_string(properties, '$.{MONETARY_PROPERTY}')"
            f" AS DOUBLE), 0)"
            f" FROM {VIEW} WHERE type = 'track' AND name = ? AND timestamp_ns <= ?",
            [PURCHASE_EVENT, end],
        ).fetchnumpy()
    ids = rows["profile_id"]
    if len(np.unique(ids)) < MIN_CUSTOMERS:
        return None
    seconds = rows["timestamp_ns"].astype(np.float64) / 1e9
    values = np.maximum(np.asarray(rows[list(rows)[2]], dtype=np.float64), 0.0)
    summary = clv.rfm_summary(
        ids, seconds, values, observation_end=end / 1e9, period_seconds=NS_PER_DAY / 1e9
    )
    bg_nbd = clv.fit_bgnbd(summary.frequency, summary.recency, summary.T)
    repeat = (summary.frequency > 0) & (summary.monetary_value > 0)
    gamma_gamma = None
    if int(repeat.sum()) >= MIN_REPEAT_BUYERS:
        gamma_gamma = clv.fit_gamma_gamma(summary.frequency[repeat], summary.monetary_value[repeat])
    return LifetimeValueModel(
        bg_nbd, gamma_gamma, len(summary.frequency), end, time.time_ns(), len(ids)
    )


def purchases(events: EventStore) -> int:
    """How many purchase events the store holds (to tell whether a refit is due)."""
    with events.reader() as cursor:
        [(count,)] = cursor.execute(
            f"SELECT count(*) FROM {VIEW} WHERE type = 'track' AND name = ?", [PURCHASE_EVENT]
        ).fetchall()
    return int(count)
