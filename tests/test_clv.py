"""Customer lifetime value: BG/NBD and Gamma-Gamma fitted on data drawn from their own
generative processes, predictions checked against direct integration and against simulated
futures, the transaction summary on a hand-built list, and the refusal of impossible input."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from scipy import integrate, special  # type: ignore[import-untyped]

from profilemesh.services.features.clv import (
    BgNbdParams,
    GammaGammaParams,
    expected_average_value,
    expected_purchases,
    fit_bgnbd,
    fit_gamma_gamma,
    lifetime_value,
    probability_alive,
    rfm_summary,
)

Floats = npt.NDArray[np.float64]

# Published CDNOW estimates (weeks), for the worked example of the BG/NBD paper.
CDNOW = BgNbdParams(r=0.243, alpha=4.414, a=0.793, b=2.426)
# Simulated customers buy often enough and are watched long enough for all four parameters
# to be well determined by 5,000 of them (standard errors of 3 to 7%).
TRUE = BgNbdParams(r=0.8, alpha=4.0, a=0.8, b=3.0)
TRUE_VALUE = GammaGammaParams(p=6.0, q=4.0, v=15.0)
CUSTOMERS = 5000
DAY = 86_400


# -- Simulation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Simulated:
    """Customers drawn from the BG/NBD process, and what they do after T."""

    frequency: Floats
    recency: Floats
    T: Floats
    alive: npt.NDArray[np.bool_]
    holdout: Floats
    """Purchases in (T, T + holdout_length]."""


def simulate_bgnbd(
    params: BgNbdParams, T: Floats, holdout_length: float, rng: np.random.Generator
) -> Simulated:
    """The BG/NBD story, drawn without a loop: a customer's purchases form a Poisson process
    of rate lambda; after each repeat purchase they drop out with probability p, so that the
    last one they ever make is the N-th, N geometric(p). Of the K purchases the process puts
    in (0, T], the customer makes min(K, N), and the x-th of K uniform points on (0, T] is
    T times a beta(x, K - x + 1) draw."""
    n = len(T)
    rate = rng.gamma(params.r, 1 / params.alpha, n)
    dropout = rng.beta(params.a, params.b, n)
    last = rng.geometric(dropout)
    in_window = rng.poisson(rate * T)
    x = np.minimum(in_window, last)
    t_x = np.where(x > 0, T * rng.beta(np.maximum(x, 1), in_window - x + 1), 0.0)
    alive = in_window < last
    later = np.minimum(rng.poisson(rate * holdout_length), last - x)
    return Simulated(x.astype(np.float64), t_x, T, alive, np.where(alive, later, 0.0))


def simulate_values(
    params: GammaGammaParams, frequency: Floats, rng: np.random.Generator
) -> Floats:
    """Mean transaction values from the Gamma-Gamma story: each customer's rate nu is
    gamma(q, v); the sum of x transactions, each gamma(p, nu), is gamma(p x, nu)."""
    nu = rng.gamma(params.q, 1 / params.v, len(frequency))
    return np.asarray(rng.gamma(params.p * frequency, 1 / nu) / frequency)


@pytest.fixture(scope="module")
def customers() -> Simulated:
    rng = np.random.default_rng(20240501)
    return simulate_bgnbd(TRUE, rng.uniform(52, 104, CUSTOMERS), 52.0, rng)


@pytest.fixture(scope="module")
def fitted(customers: Simulated) -> BgNbdParams:
    return fit_bgnbd(customers.frequency, customers.recency, customers.T)


def relative_errors(found: Any, truth: Any, names: str) -> dict[str, float]:
    return {name: getattr(found, name) / getattr(truth, name) - 1 for name in names.split()}


# -- Direct integration of the model, to check the closed forms against ----------------------


def integrate_over_dropout(
    params: BgNbdParams, x: int, t_x: float, T: float, integrand: Callable[[float], float]
) -> float:
    """The posterior mean of ``integrand(p)`` times the chance of being alive, by quadrature
    over p; the purchase rate is integrated in closed form inside ``integrand``."""
    r, alpha, a, b = params.r, params.alpha, params.a, params.b

    def weighted(p: float) -> float:
        return (1 - p) ** x * integrand(p)

    # quad's algebraic weight takes the beta prior's p^(a-1) (1-p)^(b-1), singular at 0 or 1.
    numerator = integrate.quad(weighted, 0, 1, weight="alg", wvar=(a - 1, b - 1))[0]
    numerator /= special.beta(a, b)
    # The likelihood, relative to the alive term's rate integral (alpha + T)^-(r + x).
    evidence = math.exp(special.betaln(a, b + x) - special.betaln(a, b))
    if x > 0:
        evidence += math.exp(
            special.betaln(a + 1, b + x - 1)
            - special.betaln(a, b)
            + (r + x) * (math.log(alpha + T) - math.log(alpha + t_x))
        )
    return float(numerator / evidence)


def integrated_expectation(params: BgNbdParams, t: float, x: int, t_x: float, T: float) -> float:
    """E[purchases in (T, T+t]]: an alive customer with rates lambda and p buys
    (1 - exp(-lambda p t)) / p in expectation; lambda's posterior given alive is
    gamma(r + x, alpha + T)."""
    r, alpha = params.r, params.alpha

    def future(p: float) -> float:
        if p == 0:  # the limit: a customer who never drops out buys lambda t
            return (r + x) * t / (alpha + T)
        return -math.expm1(-(r + x) * math.log1p(p * t / (alpha + T))) / p

    return integrate_over_dropout(params, x, t_x, T, future)


# -- BG/NBD -----------------------------------------------------------------------------------


def test_bgnbd_recovers_the_parameters_of_simulated_customers(
    customers: Simulated, fitted: BgNbdParams
) -> None:
    assert fitted.converged
    errors = relative_errors(fitted, TRUE, "r alpha a b")
    # About four standard errors each.
    tolerance = {"r": 0.10, "alpha": 0.15, "a": 0.20, "b": 0.25}
    assert all(abs(errors[name]) < tolerance[name] for name in tolerance), errors


def test_bgnbd_fit_is_at_least_as_likely_as_the_true_parameters(
    customers: Simulated, fitted: BgNbdParams
) -> None:
    assert fitted.log_likelihood == pytest.approx(log_likelihood_at(fitted, customers), rel=1e-12)
    true_log_likelihood = log_likelihood_at(TRUE, customers)
    assert fitted.log_likelihood >= true_log_likelihood
    # ...and not by more than chance allows: twice the difference is about chi-squared(4).
    assert 2 * (fitted.log_likelihood - true_log_likelihood) < 30


def log_likelihood_at(params: BgNbdParams, customers: Simulated) -> float:
    """Eq. 6 of the paper summed over the customers, written out plainly."""
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    x, t_x, T = customers.frequency, customers.recency, customers.T
    log_b = special.betaln
    shared = special.gammaln(r + x) - special.gammaln(r) + r * np.log(alpha) - log_b(a, b)
    alive = np.exp(log_b(a, b + x) - (r + x) * np.log(alpha + T))
    dropped = np.where(
        x > 0, np.exp(log_b(a + 1, b + np.maximum(x, 1) - 1) - (r + x) * np.log(alpha + t_x)), 0
    )
    return float((shared + np.log(alive + dropped)).sum())


def test_bgnbd_fit_does_not_depend_on_the_time_unit(customers: Simulated) -> None:
    in_weeks = fit_bgnbd(customers.frequency, customers.recency, customers.T)
    in_days = fit_bgnbd(customers.frequency, customers.recency * 7, customers.T * 7)
    assert in_days.alpha / 7 == pytest.approx(in_weeks.alpha, rel=1e-4)
    for name in ("r", "a", "b"):
        assert getattr(in_days, name) == pytest.approx(getattr(in_weeks, name), rel=1e-4)


def test_weights_stand_for_repeated_customers(customers: Simulated) -> None:
    rows = np.column_stack([customers.frequency, np.round(customers.recency), np.ceil(customers.T)])
    rows[:, 1] = np.where(rows[:, 0] > 0, np.maximum(rows[:, 1], 1), 0)
    distinct, counts = np.unique(rows, axis=0, return_counts=True)
    assert len(distinct) < CUSTOMERS
    everyone = fit_bgnbd(rows[:, 0], rows[:, 1], rows[:, 2])
    weighted = fit_bgnbd(distinct[:, 0], distinct[:, 1], distinct[:, 2], weights=counts)
    assert weighted.log_likelihood == pytest.approx(everyone.log_likelihood, rel=1e-9)
    for name in ("r", "alpha", "a", "b"):
        assert getattr(weighted, name) == pytest.approx(getattr(everyone, name), rel=1e-4)


def test_expected_purchases_reproduce_the_papers_worked_example() -> None:
    # FHL 2005, section 5: 2 repeat purchases, the last at week 30.43, observed for 38.86.
    assert float(expected_purchases(CDNOW, 39, 2, 30.43, 38.86)) == pytest.approx(1.226, abs=5e-4)


@pytest.mark.parametrize(
    ("params", "t", "x", "t_x", "T"),
    [
        (CDNOW, 39.0, 2, 30.43, 38.86),
        (CDNOW, 39.0, 0, 0.0, 38.86),
        (CDNOW, 0.5, 7, 3.0, 38.0),
        (CDNOW, 52.0, 60, 51.0, 52.0),
        (TRUE, 104.0, 20, 80.0, 90.0),
        (BgNbdParams(r=2.0, alpha=10.0, a=3.0, b=0.5), 26.0, 1, 5.0, 40.0),
        (BgNbdParams(r=0.5, alpha=3.0, a=1.0, b=2.0), 39.0, 3, 20.0, 39.0),
        (BgNbdParams(r=0.5, alpha=3.0, a=0.3, b=0.7), 39.0, 0, 0.0, 39.0),
    ],
)
def test_expected_purchases_match_direct_integration_of_the_model(
    params: BgNbdParams, t: float, x: int, t_x: float, T: float
) -> None:
    # The last two cases are the 0/0 points of the closed form: a = 1, and a + b = 1 at x = 0.
    closed = float(expected_purchases(params, t, x, t_x, T))
    assert closed == pytest.approx(integrated_expectation(params, t, x, t_x, T), rel=1e-6)


def test_probability_alive_matches_direct_integration_of_the_model() -> None:
    for x, t_x, T in [(2, 30.43, 38.86), (10, 5.0, 38.0), (1, 38.0, 38.5)]:
        closed = float(probability_alive(CDNOW, x, t_x, T))
        integrated = integrate_over_dropout(CDNOW, x, t_x, T, lambda p: 1.0)
        assert closed == pytest.approx(integrated, rel=1e-7)


def test_probability_alive_is_one_without_repeat_purchases_and_falls_with_silence() -> None:
    assert np.all(probability_alive(CDNOW, [0, 0, 0], [0, 0, 0], [0.0, 1.0, 500.0]) == 1.0)
    quieter = probability_alive(CDNOW, 5, [38.0, 30.0, 20.0, 10.0, 1.0], 38.0)
    assert np.all((quieter > 0) & (quieter <= 1))
    assert np.all(np.diff(quieter) < 0)


def test_predictions_match_the_future_of_simulated_customers(customers: Simulated) -> None:
    alive = probability_alive(TRUE, customers.frequency, customers.recency, customers.T)
    assert np.all((alive >= 0) & (alive <= 1))
    assert alive.sum() == pytest.approx(customers.alive.sum(), rel=0.03)
    expected = expected_purchases(TRUE, 52.0, customers.frequency, customers.recency, customers.T)
    assert expected.sum() == pytest.approx(customers.holdout.sum(), rel=0.05)
    # Customers the model ranks higher do buy more.
    top = expected > np.quantile(expected, 0.8)
    assert customers.holdout[top].mean() > 3 * customers.holdout[~top].mean()


def test_expected_purchases_grow_with_the_horizon_and_broadcast() -> None:
    horizons = np.array([0.0, 1.0, 4.0, 13.0, 52.0, 520.0])[:, None]
    table = expected_purchases(CDNOW, horizons, [0, 2, 9], [0.0, 30.43, 37.0], [38.86] * 3)
    assert table.shape == (6, 3)
    assert np.all(table[0] == 0)
    assert np.all(np.diff(table, axis=0) > 0)


# -- Gamma-Gamma ------------------------------------------------------------------------------


def test_gamma_gamma_recovers_the_parameters_of_simulated_customers() -> None:
    rng = np.random.default_rng(7)
    frequency = (rng.poisson(3, CUSTOMERS) + 1).astype(np.float64)
    values = simulate_values(TRUE_VALUE, frequency, rng)
    fitted = fit_gamma_gamma(frequency, values)
    assert fitted.converged
    # p and v trade off against each other (their product sets the mean) and are loosely
    # determined on their own; q and the population's mean value are sharp.
    errors = relative_errors(fitted, TRUE_VALUE, "p q v")
    tolerance = {"p": 0.40, "q": 0.10, "v": 0.50}
    assert all(abs(errors[name]) < tolerance[name] for name in tolerance), errors
    population_mean = fitted.p * fitted.v / (fitted.q - 1)
    assert population_mean == pytest.approx(TRUE_VALUE.p * TRUE_VALUE.v / 3.0, rel=0.05)


def test_gamma_gamma_ignores_customers_without_repeat_purchases() -> None:
    rng = np.random.default_rng(11)
    frequency = (rng.poisson(2, 500) + 1).astype(np.float64)
    values = simulate_values(TRUE_VALUE, frequency, rng)
    alone = fit_gamma_gamma(frequency, values)
    padded = fit_gamma_gamma(np.r_[frequency, 0, 0], np.r_[values, 0.0, 123.0])
    assert (padded.p, padded.q, padded.v) == (alone.p, alone.q, alone.v)


def test_expected_average_value_shrinks_towards_the_population_mean() -> None:
    params = GammaGammaParams(p=6.25, q=3.74, v=15.44)
    population = params.p * params.v / (params.q - 1)
    values = expected_average_value(params, [0, 1, 10, 1000], [0.0, 100.0, 100.0, 100.0])
    assert values[0] == pytest.approx(population)
    assert population < values[1] < values[2] < values[3] < 100.0
    assert values[3] == pytest.approx(100.0, rel=1e-3)


# -- Lifetime value ---------------------------------------------------------------------------


def test_undiscounted_lifetime_value_is_expected_purchases_times_expected_value() -> None:
    value = GammaGammaParams(p=6.25, q=3.74, v=15.44)
    x, t_x, T, spend = [0, 2, 9], [0.0, 30.43, 37.0], [38.86] * 3, [0.0, 20.0, 55.0]
    expected = expected_purchases(CDNOW, 52, x, t_x, T) * expected_average_value(value, x, spend)
    for steps in (None, 1, 7):
        clv = lifetime_value(CDNOW, value, x, t_x, T, spend, horizon=52, steps=steps)
        np.testing.assert_allclose(clv, expected, rtol=1e-10)


def test_discounting_lowers_lifetime_value_by_when_purchases_happen() -> None:
    value = GammaGammaParams(p=6.25, q=3.74, v=15.44)
    x, t_x, T, spend = [2, 9], [30.43, 37.0], [38.86, 38.86], [20.0, 55.0]
    flat = lifetime_value(CDNOW, value, x, t_x, T, spend, horizon=52)
    once = lifetime_value(CDNOW, value, x, t_x, T, spend, horizon=52, discount_rate=0.01, steps=1)
    weekly = lifetime_value(CDNOW, value, x, t_x, T, spend, horizon=52, discount_rate=0.01)
    # One interval: everything is discounted from the horizon's end.
    np.testing.assert_allclose(once, flat / 1.01**52, rtol=1e-12)
    # Weekly intervals: purchases come earlier on average, so they lose less.
    assert np.all((once < weekly) & (weekly < flat))


# -- Transactions to summary ------------------------------------------------------------------


def test_rfm_summary_of_a_hand_built_transaction_list() -> None:
    start = 19_675 * DAY  # midnight UTC, 2023-11-14
    transactions = [
        # ann: two purchases on day 0 are one; two on day 3 are one worth 22; one on day 10.
        ("ann", start + 3_600, 10.0),
        ("ann", start + 7_200, 5.0),
        ("ann", start + 3 * DAY + 60, 20.0),
        ("ann", start + 3 * DAY + 120, 2.0),
        ("ann", start + 10 * DAY, 30.0),
        # bob: one purchase on day 5.
        ("bob", start + 5 * DAY + 10, 7.0),
        # cid: a purchase on day 2, and one on day 20, after the end of observation.
        ("cid", start + 2 * DAY, 1.0),
        ("cid", start + 20 * DAY, 4.0),
        # dee: a second apart, on either side of midnight: two periods.
        ("dee", start + DAY - 1, 3.0),
        ("dee", start + DAY, 9.0),
        # eve: only after the end of observation.
        ("eve", start + 16 * DAY, 8.0),
    ]
    order = np.random.default_rng(3).permutation(len(transactions))
    ids, seconds, values = zip(*(transactions[i] for i in order), strict=True)
    summary = rfm_summary(
        list(ids),
        list(seconds),
        list(values),
        observation_end=start + 15 * DAY + 3_600,
        period_seconds=DAY,
    )
    assert summary.customer_ids.tolist() == ["ann", "bob", "cid", "dee"]
    assert summary.frequency.tolist() == [2, 0, 0, 1]
    assert summary.recency.tolist() == [10.0, 0.0, 0.0, 1.0]
    assert summary.T.tolist() == [15.0, 10.0, 13.0, 15.0]
    assert summary.monetary_value.tolist() == [26.0, 0.0, 0.0, 9.0]


def test_rfm_summary_feeds_the_models() -> None:
    summary = rfm_summary(
        np.array([1, 1, 2, 2, 2]),
        np.array([0, 7, 0, 14, 21]) * DAY,
        np.array([5.0, 6.0, 7.0, 8.0, 9.0]),
        observation_end=28 * DAY,
        period_seconds=7 * DAY,
    )
    assert summary.frequency.tolist() == [1, 2]
    assert summary.recency.tolist() == [1.0, 3.0]
    assert summary.T.tolist() == [4.0, 4.0]
    assert summary.monetary_value.tolist() == [6.0, 8.5]
    alive = probability_alive(CDNOW, summary.frequency, summary.recency, summary.T)
    assert np.all((alive > 0) & (alive <= 1))


def test_rfm_summary_of_no_transactions_is_empty() -> None:
    summary = rfm_summary([], [], [], observation_end=0.0, period_seconds=DAY)
    assert len(summary.customer_ids) == len(summary.frequency) == len(summary.T) == 0


# -- Impossible input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: fit_bgnbd([-1, 0], [1.0, 0.0], [2.0, 2.0]), "frequency must be at least 0"),
        (lambda: fit_bgnbd([1.5], [1.0], [2.0]), "whole number"),
        (lambda: fit_bgnbd([1, 2], [1.0, 3.0], [2.0, 2.0]), r"recency must not exceed T"),
        (lambda: fit_bgnbd([1], [0.0], [2.0]), "repeat purchases must have recency > 0"),
        (lambda: fit_bgnbd([0], [1.0], [2.0]), "without repeat purchases must have recency 0"),
        (lambda: fit_bgnbd([1], [-1.0], [2.0]), "recency must be at least 0"),
        (lambda: fit_bgnbd([1, 1], [1.0, np.nan], [2.0, 2.0]), "recency must be finite"),
        (lambda: fit_bgnbd([1, 1], [1.0, 1.0], [2.0, 2.0, 2.0]), "shapes do not match"),
        (lambda: fit_bgnbd([], [], []), "at least one customer"),
        (lambda: fit_bgnbd([1], [1.0], [2.0], weights=[-1.0]), "weights must be at least 0"),
        (lambda: fit_bgnbd([1], [1.0], [2.0], weights=[1.0, 1.0]), "one value per customer"),
        (lambda: fit_bgnbd([1], [1.0], [2.0], weights=[0.0]), "must not all be 0"),
        (lambda: fit_bgnbd(["x"], [1.0], [2.0]), "frequency must be numbers"),
        (lambda: BgNbdParams(r=0.0, alpha=1.0, a=1.0, b=1.0), "parameter r must be positive"),
        (lambda: expected_purchases(CDNOW, -1.0, 1, 1.0, 2.0), "t must be at least 0"),
        (lambda: probability_alive(CDNOW, 1, 3.0, 2.0), "recency must not exceed T"),
        (lambda: GammaGammaParams(p=1.0, q=math.inf, v=1.0), "parameter q must be positive"),
        (lambda: fit_gamma_gamma([1, 2], [10.0, 0.0]), "monetary_value must be above 0"),
        (lambda: fit_gamma_gamma([0, 0], [0.0, 0.0]), "at least one customer with frequency"),
        (
            lambda: expected_average_value(GammaGammaParams(1.0, 0.5, 1.0), [0], [0.0]),
            "expected value is infinite",
        ),
        (lambda: _lifetime_value(horizon=0.0), "horizon must be positive"),
        (lambda: _lifetime_value(discount_rate=-0.1), "discount_rate must be at least 0"),
        (lambda: _lifetime_value(steps=0), "steps must be at least 1"),
        (
            lambda: rfm_summary([1], [0.0], [1.0], observation_end=1.0, period_seconds=0.0),
            "period_seconds must be positive",
        ),
        (
            lambda: rfm_summary([1, 2], [0.0], [1.0], observation_end=1.0, period_seconds=1.0),
            "equal length",
        ),
        (
            lambda: rfm_summary(
                [1],
                np.array(["2024-01-01"], dtype="datetime64[s]"),
                [1.0],
                observation_end=1.0,
                period_seconds=1.0,
            ),
            "epoch seconds",
        ),
    ],
)
def test_impossible_input_is_refused_with_a_clear_message(
    call: Callable[[], object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def _lifetime_value(
    horizon: float = 52.0, discount_rate: float = 0.0, steps: int | None = None
) -> Floats:
    return lifetime_value(
        CDNOW,
        GammaGammaParams(p=6.25, q=3.74, v=15.44),
        [1],
        [1.0],
        [2.0],
        [10.0],
        horizon=horizon,
        discount_rate=discount_rate,
        steps=steps,
    )
