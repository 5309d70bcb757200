"""The twelve months the data covers, and how busy each of their days is.

Retail is seasonal: November and December carry the year (Black Friday to Cyber Monday most of
all), January and February are quiet, weekends a little busier than weekdays. Two day tables
say so: how many sessions a day gets relative to an average day (:meth:`Window.traffic`) and how
much likelier a visit is to end in an order (:meth:`Window.checkout_lift`). Times are integer
milliseconds since the epoch, UTC, everywhere in the generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import numpy as np
import numpy.typing as npt

DAY_MS = 86_400_000
YEAR_DAYS = 365

_MONTH_TRAFFIC = np.array([0.9, 0.85, 0.95, 0.95, 1.0, 0.95, 0.95, 1.0, 0.95, 1.0, 1.35, 1.55])
"""Relative sessions per day in January .. December."""
_MONTH_CHECKOUT = np.array([0.9, 0.95, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.25, 1.35])
"""Relative chance that a session ends in an order, January .. December (gift shopping)."""
_WEEKEND_TRAFFIC = 1.1
_CYBER_WEEKEND_TRAFFIC = 1.8
_CYBER_WEEKEND_CHECKOUT = 1.3


@dataclass(frozen=True, slots=True)
class Window:
    """The days covered: the :data:`YEAR_DAYS` days before ``end`` (``end`` itself excluded)."""

    end: date

    @property
    def start(self) -> date:
        """The first day covered."""
        return self.end - timedelta(days=YEAR_DAYS)

    @property
    def start_ms(self) -> int:
        """Midnight UTC at the start of the first day."""
        return int(datetime(*self.start.timetuple()[:3], tzinfo=UTC).timestamp() * 1000)

    @property
    def end_ms(self) -> int:
        """Midnight UTC at the end of the last day: every event is before it."""
        return self.start_ms + YEAR_DAYS * DAY_MS

    def days(self) -> npt.NDArray[np.datetime64]:
        """Every day covered, as ``datetime64[D]``."""
        return np.arange(
            np.datetime64(self.start, "D"), np.datetime64(self.end, "D"), dtype="datetime64[D]"
        )

    def traffic(self) -> npt.NDArray[np.float64]:
        """Relative number of sessions on each day, scaled to a mean of 1."""
        days = self.days()
        weights = _MONTH_TRAFFIC[_months(days)]
        weights = weights * np.where(_weekdays(days) >= 5, _WEEKEND_TRAFFIC, 1.0)
        weights = weights * np.where(_cyber_weekend(days), _CYBER_WEEKEND_TRAFFIC, 1.0)
        weights = weights * np.where(_christmas_day(days), 0.5, 1.0)
        result: npt.NDArray[np.float64] = weights / weights.mean()
        return result

    def checkout_lift(self) -> npt.NDArray[np.float64]:
        """How much likelier than usual a session on each day is to end in an order."""
        days = self.days()
        lift = _MONTH_CHECKOUT[_months(days)]
        result: npt.NDArray[np.float64] = lift * np.where(
            _cyber_weekend(days), _CYBER_WEEKEND_CHECKOUT, 1.0
        )
        return result

    def month_of_day(self) -> npt.NDArray[np.int64]:
        """The month (1 .. 12) of each day covered."""
        return _months(self.days()) + 1


def _months(days: npt.NDArray[np.datetime64]) -> npt.NDArray[np.int64]:
    """Month index 0 .. 11 of each day."""
    months: npt.NDArray[np.int64] = days.astype("datetime64[M]").astype(np.int64) % 12
    return months


def _weekdays(days: npt.NDArray[np.datetime64]) -> npt.NDArray[np.int64]:
    """Monday 0 .. Sunday 6 (1970-01-01 was a Thursday)."""
    weekdays: npt.NDArray[np.int64] = (days.astype(np.int64) + 3) % 7
    return weekdays


def _cyber_weekend(days: npt.NDArray[np.datetime64]) -> npt.NDArray[np.bool_]:
    """Black Friday (the day after the fourth Thursday of November) to Cyber Monday."""
    years = {int(str(day)[:4]) for day in (days[0], days[-1])}
    marked = np.zeros(len(days), dtype=bool)
    for year in sorted(years):
        november_first = date(year, 11, 1)
        first_thursday = november_first + timedelta(days=(3 - november_first.weekday()) % 7)
        black_friday = np.datetime64(first_thursday + timedelta(days=22), "D")
        marked |= (days >= black_friday) & (days <= black_friday + np.timedelta64(3, "D"))
    return marked


def _christmas_day(days: npt.NDArray[np.datetime64]) -> npt.NDArray[np.bool_]:
    month_start = days.astype("datetime64[M]").astype("datetime64[D]")
    day_of_month = (days - month_start).astype(np.int64) + 1
    christmas: npt.NDArray[np.bool_] = (_months(days) == 11) & (day_of_month == 25)
    return christmas
