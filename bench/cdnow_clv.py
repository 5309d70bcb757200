"""Customer lifetime value on CDNOW: our BG/NBD and Gamma-Gamma fits next to the published ones.

CDNOW is the data set of the BG/NBD paper (Fader, Hardie & Lee 2005, "Counting your customers
the easy way"): 2,357 customers who first bought at the CDNOW music store in the first quarter
of 1997, watched for 39 weeks (calibration, to 1997-09-30), then 39 more (holdout, to
1998-06-30). Time is in weeks.

1. BG/NBD is fitted on the calibration summary (repeat purchases, recency, age) and compared
   with the paper's r 0.243, alpha 4.414, a 0.793, b 2.426 (log likelihood -9582.4). Target:
   each parameter within 2%.
2. Gamma-Gamma is fitted on the mean repeat-transaction value of the 946 customers with repeat
   purchases and compared with the published p 6.25, q 3.74, v 15.44. Target: each within 2%.
3. The calibration summary is rebuilt with ``rfm_summary`` from the transaction list (daily
   periods, in weeks as the shipped files round them) and must match the shipped summaries.
   The fitted model then forecasts each customer's purchases in the holdout weeks; the total
   is shown next to what the customers did (purchase days, as in calibration).

Fit times are the best of the rounds run (3 with ``--quick``, 20 otherwise).

The data ships in the ``lifetimes`` package, read here as plain files: it is benchmark data
only, never a dependency of profilemesh. It is installed without its dependencies and never
imported (an old package, out of step with current numpy and pandas)::

    .venv/bin/pip install --no-deps lifetimes
    python bench/cdnow_clv.py [--quick] [--json PATH]
"""

from __future__ import annotations

import importlib.metadata
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

import numpy as np
import numpy.typing as npt
from numpy.typing import NDArray

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Report, parse_args

from profilemesh.services.features.clv import (
    BgNbdParams,
    expected_purchases,
    fit_bgnbd,
    fit_gamma_gamma,
    rfm_summary,
)

T = TypeVar("T")
Floats = NDArray[np.float64]
SUMMARY = "cdnow_customers_summary.csv"
MONETARY = "cdnow_customers_summary_with_transactions.csv"
TRANSACTIONS = "CDNOW_sample.txt"
PAPER_BGNBD = {"r": 0.243, "alpha": 4.414, "a": 0.793, "b": 2.426}
PAPER_BGNBD_LOG_LIKELIHOOD = -9582.4
PAPER_GAMMA_GAMMA = {"p": 6.25, "q": 3.74, "v": 15.44}
TARGET_RELATIVE_ERROR = 0.02
DAY = 86_400
CALIBRATION_END = np.datetime64("1997-09-30")
HOLDOUT_END = np.datetime64("1998-06-30")
HOLDOUT_WEEKS = 39.0


# -- Data -------------------------------------------------------------------------------------


def dataset(name: str) -> Path | None:
    """A file of the installed ``lifetimes`` distribution's datasets folder, if there."""
    try:
        distribution = importlib.metadata.distribution("lifetimes")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(distribution.locate_file(f"lifetimes/datasets/{name}")))
    return path if path.is_file() else None


def read_csv(path: Path) -> dict[str, Floats]:
    """A numeric CSV file with a header row, as one array per column."""
    table = np.genfromtxt(path, delimiter=",", names=True)
    names = table.dtype.names or ()
    return {name: np.asarray(table[name], dtype=np.float64) for name in names}


def epoch_seconds(days: npt.ArrayLike) -> NDArray[np.int64]:
    """Dates as Unix epoch seconds, what ``rfm_summary`` takes."""
    return np.asarray(days, dtype="datetime64[s]").astype(np.int64)


def read_transactions(
    path: Path,
) -> tuple[NDArray[np.int64], NDArray[np.datetime64], Floats]:
    """CDNOW_sample.txt: master id, sample id (the summaries' ID), YYYYMMDD, CDs, dollars."""
    raw = np.loadtxt(path, dtype=str)
    dates = np.array([f"{d[:4]}-{d[4:6]}-{d[6:]}" for d in raw[:, 2]], dtype="datetime64[D]")
    return raw[:, 1].astype(np.int64), dates, raw[:, 4].astype(np.float64)


# -- The benchmark ----------------------------------------------------------------------------


def best_of(rounds: int, run: Callable[[], T]) -> tuple[float, T]:
    """(best seconds, last result) of ``rounds`` calls of ``run``."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - started)
    return best, result


def compare(report: Report, model: str, fitted: dict[str, float], paper: dict[str, float]) -> None:
    """Each parameter next to the paper's, its relative error and the 2% target."""
    for name, published in paper.items():
        error = fitted[name] / published - 1
        report.figures[f"{model}_{name}"] = fitted[name]
        report.references[f"paper_{model}_{name}"] = published
        report.ratios[f"{model}_{name}_relative_error"] = error
        report.target(
            f"{model}_{name}_within_2pct",
            f"|{name} / paper - 1| <= {TARGET_RELATIVE_ERROR:.0%}",
            abs(error) <= TARGET_RELATIVE_ERROR,
        )
        print(
            f"  {model:<12} {name:<6} {fitted[name]:>9.4f}  paper {published:>7.3f}  {error:+.2%}"
        )


def bench_fits(
    customers: dict[str, Floats], values: dict[str, Floats], rounds: int, report: Report
) -> BgNbdParams:
    """1 and 2: both models fitted and compared with the published parameters."""
    x, t_x, age = customers["frequency"], customers["recency"], customers["T"]
    seconds, bgnbd = best_of(rounds, lambda: fit_bgnbd(x, t_x, age))
    gg_seconds, gamma_gamma = best_of(rounds, lambda: fit_gamma_gamma(values["x"], values["zbar"]))
    print(f"CDNOW: {len(x):,} customers, {int((values['x'] > 0).sum()):,} with repeat purchases")
    compare(report, "bgnbd", asdict(bgnbd), PAPER_BGNBD)
    compare(report, "gamma_gamma", asdict(gamma_gamma), PAPER_GAMMA_GAMMA)
    report.figures["bgnbd_log_likelihood"] = bgnbd.log_likelihood
    report.references["paper_bgnbd_log_likelihood"] = PAPER_BGNBD_LOG_LIKELIHOOD
    report.figures["bgnbd_fit_ms"] = seconds * 1000
    report.figures["gamma_gamma_fit_ms"] = gg_seconds * 1000
    report.target("bgnbd_converged", "optimiser converged", bgnbd.converged)
    report.target("gamma_gamma_converged", "optimiser converged", gamma_gamma.converged)
    return bgnbd


def bench_transactions(
    path: Path,
    customers: dict[str, Floats],
    values: dict[str, Floats],
    bgnbd: BgNbdParams,
    rounds: int,
    report: Report,
) -> None:
    """3: the shipped summaries rebuilt from the transactions, and the holdout forecast."""
    ids, dates, dollars = read_transactions(path)
    x, t_x, age = customers["frequency"], customers["recency"], customers["T"]
    seconds, rebuilt = best_of(
        rounds,
        lambda: rfm_summary(
            ids,
            epoch_seconds(dates),
            dollars,
            observation_end=float(epoch_seconds(CALIBRATION_END)),
            period_seconds=DAY,
        ),
    )
    # Days to weeks; the shipped files round to two decimals.
    rounding = 0.005 + 1e-9
    mismatches = (
        (rebuilt.customer_ids != customers["ID"])
        | (rebuilt.frequency != x)
        | (np.abs(rebuilt.recency / 7 - t_x) > rounding)
        | (np.abs(rebuilt.T / 7 - age) > rounding)
        | (np.abs(rebuilt.monetary_value - values["zbar"]) > rounding)
    )
    report.figures["rfm_summary_ms"] = seconds * 1000
    report.figures["rfm_summary_mismatched_customers"] = int(mismatches.sum())
    report.target("rfm_summary_matches_shipped", "rebuilt summary = shipped", not mismatches.any())

    in_holdout = (dates > CALIBRATION_END) & (dates <= HOLDOUT_END)
    purchase_days = np.unique(
        np.stack([ids[in_holdout], dates[in_holdout].astype(np.int64)]), axis=1
    )
    actual = purchase_days.shape[1]
    predicted = float(expected_purchases(bgnbd, HOLDOUT_WEEKS, x, t_x, age).sum())
    report.figures["holdout_predicted_purchases"] = predicted
    report.figures["holdout_actual_purchases"] = actual
    report.ratios["holdout_predicted_vs_actual"] = predicted / actual


def main() -> int:
    args = parse_args(__doc__.splitlines()[0])
    summary, monetary = dataset(SUMMARY), dataset(MONETARY)
    if summary is None or monetary is None:
        print(
            "cdnow_clv needs the CDNOW files of the lifetimes package (benchmark data only; "
            "installed without its dependencies, never imported):\n"
            f"    {sys.executable} -m pip install --no-deps lifetimes",
            file=sys.stderr,
        )
        return 2
    rounds = 3 if args.quick else 20
    report = Report("cdnow_clv")
    customers, values = read_csv(summary), read_csv(monetary)
    bgnbd = bench_fits(customers, values, rounds, report)
    transactions = dataset(TRANSACTIONS)
    if transactions is not None:
        bench_transactions(transactions, customers, values, bgnbd, rounds, report)
    report.print()
    report.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
