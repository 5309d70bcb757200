"""Customer lifetime value: how many purchases each customer will still make, and their worth.

A customer of a non-contractual business never says they are leaving; they just stop buying.
The BG/NBD model (Fader, Hardie & Lee 2005, "Counting your customers the easy way") reads that
from three figures per customer: the number of repeat purchases ``x`` (``frequency``), the time
of the last one ``t_x`` (``recency``) and the time since the first purchase ``T`` (the
customer's age), all measured from the first purchase. While alive, a customer buys at a rate
lambda (gamma distributed across customers, shape r and rate alpha); after each purchase they
drop out with probability p (beta distributed, a and b). Someone who used to buy every week and
has been silent for months has probably left; someone who buys twice a year and was seen last
month has not.

What a purchase is worth comes from the Gamma-Gamma model (Fader, Hardie & Lee 2005, "RFM and
CLV: using iso-value curves for customer base analysis"): each customer's transaction values
are gamma distributed around a mean of their own, itself drawn from a population distribution
(p, q, v), so that a customer with many repeat purchases is judged on their own average and a
customer seen twice is pulled towards everyone's. It assumes the value of a customer's
transactions is independent of how often they buy.

Both models are fitted by maximum likelihood with numpy and scipy alone: the published
likelihoods, in log space with log-sum-exp, with their analytic gradients, over the logarithms
of the parameters so that the optimiser needs no positivity constraint. Time is in any unit
(days, weeks) as long as it is the same everywhere; the fitted alpha and the horizons of the
predictions are in that unit. :func:`rfm_summary` turns a transaction list into these figures.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize  # type: ignore[import-untyped]
from scipy.special import betaln, digamma, gammaln, hyp2f1  # type: ignore[import-untyped]

Floats = npt.NDArray[np.float64]

# The optimiser works on log parameters within these bounds (e^-30 to e^30): far beyond any
# sensible value, and close enough to keep gammaln and betaln finite.
_LOG_BOUND = 30.0
# Relative change of the mean log likelihood at which the optimiser stops.
_TOLERANCE = 1e-12
# Eq. 10 of the BG/NBD paper is 0/0 at a = 1 and at a + b = 1; closer than this, it is
# interpolated between the values this far on either side (exact to about the step squared).
_A_STEP = 1e-5


# -- Validation -------------------------------------------------------------------------------


def _position(mask: npt.NDArray[np.bool_]) -> str:
    """Where the first true value of ``mask`` is, for an error message."""
    index = np.unravel_index(int(np.flatnonzero(mask)[0]), mask.shape)
    return f"position {index[0]}" if len(index) == 1 else f"position {index}"


def _require(ok: npt.NDArray[np.bool_], message: str) -> None:
    """Raise ``ValueError(message)`` with the first position where ``ok`` is false."""
    if not ok.all():
        raise ValueError(f"{message} (first at {_position(~ok)})")


def _finite(name: str, values: npt.ArrayLike) -> Floats:
    """``values`` as float64, all finite."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be numbers: {error}") from None
    _require(np.isfinite(array), f"{name} must be finite")
    return array


def _broadcast(**arrays: Floats) -> list[Floats]:
    """The arrays broadcast to one shape, or a ValueError that names them."""
    try:
        return list(np.broadcast_arrays(*arrays.values()))
    except ValueError:
        shapes = ", ".join(f"{name} {array.shape}" for name, array in arrays.items())
        raise ValueError(f"shapes do not match: {shapes}") from None


def _frequency(values: npt.ArrayLike) -> Floats:
    """Repeat purchase counts: whole numbers, at least 0."""
    x = _finite("frequency", values)
    _require(x >= 0, "frequency must be at least 0")
    _require(x == np.round(x), "frequency must be a whole number of repeat purchases")
    return x


def _customers(
    frequency: npt.ArrayLike, recency: npt.ArrayLike, T: npt.ArrayLike
) -> tuple[Floats, Floats, Floats]:
    """Validated (x, t_x, T), broadcast to one shape.

    t_x is the time of the last repeat purchase after the first purchase: 0 exactly when there
    is none, above 0 when there is, and never later than the customer's age T.
    """
    x = _frequency(frequency)
    t_x = _finite("recency", recency)
    age = _finite("T", T)
    x, t_x, age = _broadcast(frequency=x, recency=t_x, T=age)
    _require(t_x >= 0, "recency must be at least 0")
    _require(t_x <= age, "recency must not exceed T")
    _require((x == 0) | (t_x > 0), "a customer with repeat purchases must have recency > 0")
    _require((x > 0) | (t_x == 0), "a customer without repeat purchases must have recency 0")
    return x, t_x, age


def _sample(x: Floats) -> None:
    """A fit needs a one-dimensional array of at least one customer."""
    if x.ndim != 1 or not len(x):
        raise ValueError("fitting needs a one-dimensional array of at least one customer")


def _weights(weights: npt.ArrayLike | None, size: int) -> Floats:
    """Customer weights (ones when none): finite, at least 0, not all 0."""
    if weights is None:
        return np.ones(size)
    w = _finite("weights", weights)
    if w.shape != (size,):
        raise ValueError(f"weights must have one value per customer ({size}), not {w.shape}")
    _require(w >= 0, "weights must be at least 0")
    if not w.sum() > 0:
        raise ValueError("weights must not all be 0")
    return w


def _positive(owner: str, **values: float) -> None:
    """Model parameters are positive and finite."""
    for name, value in values.items():
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{owner} parameter {name} must be positive and finite, not {value}")


# -- Fitting ----------------------------------------------------------------------------------

LogLikelihood = Callable[[Floats], tuple[Floats, Floats]]
"""Each customer's log likelihood at the given parameters, and its gradient (one row per
parameter, one column per customer)."""


@dataclass(frozen=True, slots=True)
class _Optimum:
    params: Floats
    log_likelihood: float
    converged: bool


def _maximise(terms: LogLikelihood, starts: Sequence[Floats], weights: Floats) -> _Optimum:
    """The parameters of highest weighted log likelihood, searched with L-BFGS-B from each
    of ``starts``; the best end point wins.

    The objective is the weighted mean, not the sum, so that the stopping tolerance means the
    same for a hundred customers and for a million.
    """
    total = float(weights.sum())

    def objective(log_params: Floats) -> tuple[float, Floats]:
        params = np.exp(log_params)
        values, gradients = terms(params)
        mean = float(weights @ values) / total
        # d/d(log theta) = theta * d/d(theta)
        return -mean, -(gradients @ weights) / total * params

    best: _Optimum | None = None
    for start in starts:
        result = minimize(
            objective,
            np.log(start),
            jac=True,
            method="L-BFGS-B",
            bounds=[(-_LOG_BOUND, _LOG_BOUND)] * len(start),
            options={"ftol": _TOLERANCE, "gtol": 1e-9, "maxiter": 2000},
        )
        log_params = np.asarray(result.x, dtype=np.float64)
        # A parameter pinned to a bound is running away to 0 or infinity: no finite optimum.
        inside = bool(np.all(np.abs(log_params) < _LOG_BOUND - 1e-6))
        found = _Optimum(
            np.exp(log_params), -float(result.fun) * total, bool(result.success) and inside
        )
        if best is None or found.log_likelihood > best.log_likelihood:
            best = found
    assert best is not None
    return best


# -- BG/NBD -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BgNbdParams:
    """BG/NBD parameters: purchase rates are gamma(``r``, rate ``alpha``) across customers,
    dropout probabilities beta(``a``, ``b``).

    ``alpha`` is in the time unit of the data it was fitted on. ``log_likelihood`` is the total
    (weighted) log likelihood of that data and ``converged`` whether the optimiser reached an
    interior optimum; for parameters given by hand they are NaN and False.
    """

    r: float
    alpha: float
    a: float
    b: float
    log_likelihood: float = math.nan
    converged: bool = False

    def __post_init__(self) -> None:
        _positive("BG/NBD", r=self.r, alpha=self.alpha, a=self.a, b=self.b)


def _bgnbd_terms(x: Floats, t_x: Floats, age: Floats) -> LogLikelihood:
    """The BG/NBD log likelihood of each customer (eq. 6 of the paper) and its gradient.

    L = B(a, b+x)/B(a, b) * G(r+x) alpha^r / (G(r) (alpha+T)^(r+x))        alive at T
      + [x > 0] B(a+1, b+x-1)/B(a, b) * G(r+x) alpha^r / (G(r) (alpha+t_x)^(r+x))
                                                           dropped out after the last purchase
    with G the gamma function and B the beta function. The two terms are added in log space:
    either can underflow on its own.
    """
    repeat = x > 0
    x_dropped = np.where(repeat, x, 1.0)  # keeps b + x - 1 > 0 where the term is absent

    def terms(params: Floats) -> tuple[Floats, Floats]:
        r, alpha, a, b = params
        shared = gammaln(r + x) - gammaln(r) + r * math.log(alpha) - betaln(a, b)
        alive = betaln(a, b + x) - (r + x) * np.log(alpha + age)
        dropped = np.where(
            repeat, betaln(a + 1, b + x_dropped - 1) - (r + x) * np.log(alpha + t_x), -np.inf
        )
        mixed = np.logaddexp(alive, dropped)
        w_alive = np.exp(alive - mixed)
        w_dropped = np.exp(dropped - mixed)
        abx = digamma(a + b + x)
        gradient = np.stack(
            [
                digamma(r + x)
                - digamma(r)
                + math.log(alpha)
                - w_alive * np.log(alpha + age)
                - w_dropped * np.log(alpha + t_x),
                r / alpha - (r + x) * (w_alive / (alpha + age) + w_dropped / (alpha + t_x)),
                digamma(a + b)
                - digamma(a)
                + w_alive * (digamma(a) - abx)
                + w_dropped * (digamma(a + 1) - abx),
                digamma(a + b)
                - digamma(b)
                + w_alive * (digamma(b + x) - abx)
                + w_dropped * (digamma(b + x_dropped - 1) - abx),
            ]
        )
        return shared + mixed, gradient

    return terms


def _bgnbd_starts(age: Floats) -> list[Floats]:
    """Where the search starts: the paper's r = alpha = a = b = 1, and the same with alpha at
    the customers' mean age, so that the start does not depend on the time unit."""
    scale = max(float(age.mean()), 1e-6)
    return [np.ones(4), np.array([1.0, scale, 1.0, 1.0])]


def fit_bgnbd(
    frequency: npt.ArrayLike,
    recency: npt.ArrayLike,
    T: npt.ArrayLike,
    *,
    weights: npt.ArrayLike | None = None,
) -> BgNbdParams:
    """The BG/NBD parameters of highest likelihood for these customers.

    ``frequency`` is each customer's number of repeat purchases, ``recency`` the time of the
    last one after the first purchase (0 if none) and ``T`` the time from the first purchase to
    the end of observation, one value per customer. ``weights`` counts customers that share
    the same three figures, so that a large base can be fitted on its distinct rows.
    """
    x, t_x, age = _customers(frequency, recency, T)
    _sample(x)
    w = _weights(weights, len(x))
    optimum = _maximise(_bgnbd_terms(x, t_x, age), _bgnbd_starts(age), w)
    r, alpha, a, b = (float(value) for value in optimum.params)
    return BgNbdParams(r, alpha, a, b, optimum.log_likelihood, optimum.converged)


def _dropout_odds(params: BgNbdParams, x: Floats, t_x: Floats, age: Floats) -> Floats:
    """How much likelier the customer is to have dropped out after their last purchase than to
    be alive at T, given what was seen (0 for customers without repeat purchases, who have had
    no chance to drop out)."""
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    repeat = x > 0
    x_dropped = np.where(repeat, x, 1.0)
    log_odds = (
        math.log(a)
        - np.log(b + x_dropped - 1)
        + (r + x) * (np.log(alpha + age) - np.log(alpha + t_x))
    )
    # e^700 is near float64's largest: beyond it P(alive) is 0 to the precision there is.
    return np.where(repeat, np.exp(np.minimum(log_odds, 700.0)), 0.0)


def probability_alive(
    params: BgNbdParams, frequency: npt.ArrayLike, recency: npt.ArrayLike, T: npt.ArrayLike
) -> Floats:
    """The probability that each customer is still alive (has not dropped out) at ``T``.

    1 / (1 + [x > 0] a/(b+x-1) ((alpha+T)/(alpha+t_x))^(r+x)): exactly 1 for a customer
    without repeat purchases, since BG/NBD customers drop out only right after a purchase.
    """
    x, t_x, age = _customers(frequency, recency, T)
    return np.asarray(1.0 / (1.0 + _dropout_odds(params, x, t_x, age)), dtype=np.float64)


def _purchases_if_alive(
    r: float, alpha: float, a: float, b: float, t: Floats, x: Floats, age: Floats
) -> Floats:
    """The numerator of eq. 10: expected purchases in (T, T+t] of a customer alive at T.

    The paper writes it with 2F1(r+x, b+x; a+b+x-1; t/(alpha+T+t)) times
    ((alpha+T)/(alpha+T+t))^(r+x); Pfaff's transformation turns that product into
    2F1(r+x, a-1; a+b+x-1; -t/(alpha+T)), whose second parameter stays small for customers
    with many purchases, where the paper's form multiplies a huge value by a tiny one.
    """
    c = a + b + x - 1
    return np.asarray(c / (a - 1) * (1 - hyp2f1(r + x, a - 1, c, -t / (alpha + age))))


def expected_purchases(
    params: BgNbdParams,
    t: npt.ArrayLike,
    frequency: npt.ArrayLike,
    recency: npt.ArrayLike,
    T: npt.ArrayLike,
) -> Floats:
    """The expected number of purchases of each customer in the next ``t`` periods (eq. 10 of
    the BG/NBD paper): what they would buy if alive, times the chance that they are.

    ``t`` broadcasts against the customers: an array of shape (k, 1) against n customers gives
    a (k, n) table, one row per horizon.
    """
    x, t_x, age = _customers(frequency, recency, T)
    horizon = _finite("t", t)
    _require(horizon >= 0, "t must be at least 0")
    horizon, x, t_x, age = _broadcast(t=horizon, frequency=x, recency=t_x, T=age)
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    # Eq. 10 is 0/0 at a = 1, and at a + b = 1 for customers without repeat purchases, while
    # the expectation itself is smooth in a: near those points, interpolate across them.
    near = [point for point in (1.0, 1.0 - b) if abs(a - point) < min(_A_STEP, point / 2)]
    if near:
        step = min(_A_STEP, near[0] / 2)
        below = _purchases_if_alive(r, alpha, near[0] - step, b, horizon, x, age)
        above = _purchases_if_alive(r, alpha, near[0] + step, b, horizon, x, age)
        if_alive = below + (above - below) * (a - near[0] + step) / (2 * step)
    else:
        if_alive = _purchases_if_alive(r, alpha, a, b, horizon, x, age)
    return np.asarray(if_alive / (1.0 + _dropout_odds(params, x, t_x, age)), dtype=np.float64)


# -- Gamma-Gamma ------------------------------------------------------------------------------


@dataclass(frozen=True)
class GammaGammaParams:
    """Gamma-Gamma parameters: a customer's transaction values are gamma(``p``, rate nu), and
    nu is gamma(``q``, rate ``v``) across customers.

    The population's mean transaction value is p v / (q - 1) (finite for q > 1).
    ``log_likelihood`` and ``converged`` are as for :class:`BgNbdParams`.
    """

    p: float
    q: float
    v: float
    log_likelihood: float = math.nan
    converged: bool = False

    def __post_init__(self) -> None:
        _positive("Gamma-Gamma", p=self.p, q=self.q, v=self.v)


def _spenders(frequency: npt.ArrayLike, monetary_value: npt.ArrayLike) -> tuple[Floats, Floats]:
    """Validated (x, mean value), broadcast; the value must be above 0 wherever x > 0 and is
    ignored where x = 0 (such customers have no repeat transaction to average)."""
    x = _frequency(frequency)
    value = _finite("monetary_value", monetary_value)
    x, value = _broadcast(frequency=x, monetary_value=value)
    _require((x == 0) | (value > 0), "monetary_value must be above 0 where frequency > 0")
    return x, value


def _gamma_gamma_terms(x: Floats, z: Floats) -> LogLikelihood:
    """The Gamma-Gamma log likelihood of each customer's mean value ``z`` over ``x``
    transactions, and its gradient: x z given nu is gamma(p x, nu), so that

    f(z) = G(px+q) / (G(px) G(q)) v^q x^(px) z^(px-1) / (v + x z)^(px+q).
    """
    log_x, log_z = np.log(x), np.log(z)

    def terms(params: Floats) -> tuple[Floats, Floats]:
        p, q, v = params
        px = p * x
        log_spread = np.log(v + x * z)
        values = (
            gammaln(px + q)
            - gammaln(px)
            - gammaln(q)
            + q * math.log(v)
            + px * log_x
            + (px - 1) * log_z
            - (px + q) * log_spread
        )
        both = digamma(px + q)
        gradient = np.stack(
            [
                x * (both - digamma(px) + log_x + log_z - log_spread),
                both - digamma(q) + math.log(v) - log_spread,
                q / v - (px + q) / (v + x * z),
            ]
        )
        return values, gradient

    return terms


def fit_gamma_gamma(frequency: npt.ArrayLike, monetary_value: npt.ArrayLike) -> GammaGammaParams:
    """The Gamma-Gamma parameters of highest likelihood for these customers.

    ``monetary_value`` is each customer's mean value of their repeat transactions, over
    ``frequency`` of them. Customers without repeat purchases carry no information on value
    and are left out, so the whole summary can be passed.
    """
    x, value = _spenders(frequency, monetary_value)
    _sample(x)
    repeat = x > 0
    if not repeat.any():
        raise ValueError("fitting Gamma-Gamma needs at least one customer with frequency > 0")
    x, value = x[repeat], value[repeat]
    optimum = _maximise(_gamma_gamma_terms(x, value), [np.ones(3)], np.ones(len(x)))
    p, q, v = (float(param) for param in optimum.params)
    return GammaGammaParams(p, q, v, optimum.log_likelihood, optimum.converged)


def expected_average_value(
    params: GammaGammaParams, frequency: npt.ArrayLike, monetary_value: npt.ArrayLike
) -> Floats:
    """Each customer's expected transaction value: p (v + x z) / (p x + q - 1), a weighted
    mean of the population's mean p v / (q - 1) and the customer's own mean z, where x
    repeat transactions give the customer's own weight p x / (p x + q - 1).

    For a customer without repeat purchases it is the population's mean, which exists only
    when q > 1.
    """
    x, value = _spenders(frequency, monetary_value)
    p, q, v = params.p, params.q, params.v
    denominator = p * x + q - 1
    _require(denominator > 0, "the expected value is infinite where p * frequency + q <= 1")
    own = np.where(x > 0, x * value, 0.0)
    return np.asarray(p * (v + own) / denominator, dtype=np.float64)


# -- Lifetime value ---------------------------------------------------------------------------


def lifetime_value(
    bgnbd: BgNbdParams,
    gamma_gamma: GammaGammaParams,
    frequency: npt.ArrayLike,
    recency: npt.ArrayLike,
    T: npt.ArrayLike,
    monetary_value: npt.ArrayLike,
    *,
    horizon: float,
    discount_rate: float = 0.0,
    steps: int | None = None,
) -> Floats:
    """Each customer's expected value over the next ``horizon`` periods, discounted.

    The horizon is cut into ``steps`` equal intervals (one per whole period by default). The
    purchases expected in each interval are valued at the customer's expected transaction
    value (Gamma-Gamma assumes value independent of frequency) and discounted from the
    interval's end at ``discount_rate`` per period: 0.01 with weekly data is 1% a week.
    Without discounting the sum is expected_purchases(horizon) times the expected value.
    """
    if not (math.isfinite(horizon) and horizon > 0):
        raise ValueError(f"horizon must be positive and finite, not {horizon}")
    if not (math.isfinite(discount_rate) and discount_rate >= 0):
        raise ValueError(f"discount_rate must be at least 0 and finite, not {discount_rate}")
    intervals = max(1, math.ceil(horizon)) if steps is None else steps
    if intervals < 1:
        raise ValueError(f"steps must be at least 1, not {steps}")
    x, t_x, age = _customers(frequency, recency, T)
    x, value = _spenders(x, monetary_value)
    x, t_x, age, value = _broadcast(frequency=x, recency=t_x, T=age, monetary_value=value)
    ends = horizon * np.arange(1, intervals + 1) / intervals
    ends = ends.reshape((-1,) + (1,) * x.ndim)  # one row per interval, customers after
    cumulative = expected_purchases(bgnbd, ends, x, t_x, age)
    per_interval = np.diff(cumulative, axis=0, prepend=np.zeros((1, *x.shape)))
    discounted = (per_interval / (1 + discount_rate) ** ends).sum(axis=0)
    return np.asarray(discounted * expected_average_value(gamma_gamma, x, value))


# -- From transactions ------------------------------------------------------------------------


@dataclass(frozen=True)
class RfmSummary:
    """Per-customer figures the models take, in periods, one row per customer (sorted ids).

    ``monetary_value`` is the mean value of the repeat periods (0 without any): the first
    purchase is left out, as Gamma-Gamma is fitted on repeat transactions.
    """

    customer_ids: npt.NDArray[np.generic]
    frequency: npt.NDArray[np.int64]
    recency: Floats
    T: Floats
    monetary_value: Floats


def rfm_summary(
    customer_ids: npt.ArrayLike,
    timestamps: npt.ArrayLike,
    values: npt.ArrayLike,
    *,
    observation_end: float,
    period_seconds: float,
) -> RfmSummary:
    """Frequency, recency, age and mean repeat value of each customer from a transaction list.

    ``timestamps`` and ``observation_end`` are Unix epoch seconds (UTC); a numpy datetime64
    array converts with ``.astype("datetime64[s]").astype(np.int64)``. Time is cut into
    periods of ``period_seconds`` counted from the epoch (86400: UTC days); all purchases of
    a customer in one period count as one purchase worth their sum, since the models see a
    period at a time. Frequency counts the periods with a purchase after the first one,
    recency is the last such period minus the first and T the period of ``observation_end``
    minus the first. Transactions after ``observation_end`` are left out, so that one list
    serves a calibration period and the holdout after it.
    """
    ids, seconds, amounts = _transactions(customer_ids, timestamps, values)
    if not (math.isfinite(period_seconds) and period_seconds > 0):
        raise ValueError(f"period_seconds must be positive and finite, not {period_seconds}")
    if not math.isfinite(observation_end):
        raise ValueError(f"observation_end must be finite, not {observation_end}")
    seen = seconds <= observation_end
    unique_ids, customer = np.unique(ids[seen], return_inverse=True)
    customer = customer.reshape(-1)  # numpy 2 keeps the input's shape here
    periods = np.floor(seconds[seen] / period_seconds).astype(np.int64)
    buyer, period, period_value = _purchase_periods(customer, periods, amounts[seen])

    # Rows are ordered by customer then period: each customer's first and last are at the
    # ends of their run of rows.
    count = np.bincount(buyer, minlength=len(unique_ids))
    first_row = np.cumsum(count) - count
    first, last = period[first_row], period[first_row + count - 1]
    frequency = count - 1
    total = np.bincount(buyer, period_value, minlength=len(unique_ids))
    repeat_value = total - period_value[first_row]
    monetary = np.divide(
        repeat_value, frequency, out=np.zeros(len(unique_ids)), where=frequency > 0
    )
    return RfmSummary(
        customer_ids=unique_ids,
        frequency=frequency.astype(np.int64),
        recency=(last - first).astype(np.float64),
        T=(math.floor(observation_end / period_seconds) - first).astype(np.float64),
        monetary_value=monetary,
    )


def _transactions(
    customer_ids: npt.ArrayLike, timestamps: npt.ArrayLike, values: npt.ArrayLike
) -> tuple[npt.NDArray[np.generic], Floats, Floats]:
    """Validated transaction columns: one-dimensional, of equal length."""
    ids = np.asarray(customer_ids)
    seconds = _timestamps(timestamps)
    amounts = _finite("values", values)
    if not (ids.ndim == seconds.ndim == amounts.ndim == 1) or not (
        len(ids) == len(seconds) == len(amounts)
    ):
        raise ValueError(
            "customer_ids, timestamps and values must be one-dimensional and of equal length,"
            f" not {ids.shape}, {seconds.shape} and {amounts.shape}"
        )
    return ids, seconds, amounts


def _purchase_periods(
    customer: npt.NDArray[np.intp], periods: npt.NDArray[np.int64], amounts: Floats
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.int64], Floats]:
    """One row per (customer, period) with a purchase, ordered by customer then period, with
    the period's total value."""
    order = np.lexsort((periods, customer))
    customer, periods, amounts = customer[order], periods[order], amounts[order]
    starts_row = np.ones(len(customer), dtype=bool)
    starts_row[1:] = (customer[1:] != customer[:-1]) | (periods[1:] != periods[:-1])
    starts = np.flatnonzero(starts_row)
    totals = np.add.reduceat(amounts, starts) if len(starts) else amounts
    return customer[starts], periods[starts], totals


def _timestamps(values: npt.ArrayLike) -> Floats:
    """Epoch seconds as float64 (exact for whole seconds until the year 285 million)."""
    array = np.asarray(values)
    if array.size and array.dtype.kind not in "iuf":
        raise ValueError(f"timestamps must be epoch seconds (numbers), not {array.dtype}")
    return _finite("timestamps", array)
