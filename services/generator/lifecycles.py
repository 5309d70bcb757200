"""Each customer's hidden story: when they arrived, how likely they are to leave, and how much
they browse, buy and like the shop.

Churn is a hazard process: every customer has a latent yearly hazard (gamma-distributed, so a
few are flighty and most are loyal) and leaves after an exponential time with that rate from
their arrival. A churned customer does nothing from their churn day on, and visits less in the
weeks before it, as people drifting away do. The hazard leaks into what can be observed, and
nowhere else: the riskier a customer, the fewer their visits and the lower their NPS answers.
That is the signal a churn model has to find; the hazard itself is only in the ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from profilemesh.services.generator.catalog import CATEGORIES
from profilemesh.services.generator.seasons import YEAR_DAYS

EXISTING_SHARE = 0.65
"""Share of the customers who were customers before the window starts; the others arrive
during it, at a uniformly random time."""
SESSIONS_PER_YEAR = 13.0
"""Mean visits per year of a customer on an average day's traffic."""
SURVEY_RESPONDERS = 0.35
"""Share of the customers who answer NPS surveys when asked."""


@dataclass(frozen=True, slots=True)
class Lifecycles:
    """Per person, the latent parameters of their behaviour."""

    acquired: npt.NDArray[np.float64]
    """Day (from the window's start, fractional) they became a customer; 0 for existing ones."""
    hazard: npt.NDArray[np.float64]
    """Yearly churn hazard."""
    churned: npt.NDArray[np.bool_]
    """Whether they churn before the window ends."""
    active_until: npt.NDArray[np.int64]
    """The first day with no activity: the churn day, or :data:`YEAR_DAYS` when not churned."""
    sessions_per_year: npt.NDArray[np.float64]
    browse_depth: npt.NDArray[np.float64]
    """Mean product views per visit."""
    cart_rate: npt.NDArray[np.float64]
    """Chance that a visit puts something in the cart."""
    checkout_rate: npt.NDArray[np.float64]
    """Chance that a cart becomes an order, on an ordinary day."""
    taste: npt.NDArray[np.float64]
    """Per person and category, the share of their product views in it (rows sum to 1)."""
    satisfaction: npt.NDArray[np.float64]
    """Standardised; higher is happier. Drives NPS scores."""
    survey_responder: npt.NDArray[np.bool_]

    def __len__(self) -> int:
        return len(self.hazard)


def build_lifecycles(rng: np.random.Generator, count: int) -> Lifecycles:
    """The latent story of ``count`` customers."""
    existing = rng.random(count) < EXISTING_SHARE
    acquired = np.where(existing, 0.0, rng.uniform(0.0, YEAR_DAYS - 1, count))
    hazard = rng.gamma(1.3, 0.45, count)
    leaves_at = acquired + rng.exponential(1.0, count) / hazard * YEAR_DAYS
    churned = leaves_at < YEAR_DAYS
    churn_day = np.maximum(np.floor(leaves_at), np.floor(acquired) + 1)
    active_until = np.where(churned, churn_day, YEAR_DAYS).astype(np.int64)
    risk = _standardised(np.log(hazard))
    return Lifecycles(
        acquired=acquired,
        hazard=hazard,
        churned=churned,
        active_until=active_until,
        sessions_per_year=rng.gamma(2.0, SESSIONS_PER_YEAR / 2.0, count) * np.exp(-0.3 * risk),
        browse_depth=rng.gamma(2.0, 0.9, count),
        cart_rate=rng.beta(2.2, 6.0, count),
        checkout_rate=np.clip(rng.beta(3.0, 3.5, count) * np.exp(-0.15 * risk), 0.0, 0.95),
        taste=rng.dirichlet(np.full(len(CATEGORIES), 0.7), size=count),
        satisfaction=_standardised(-0.75 * risk + rng.normal(0.0, 0.66, count)),
        survey_responder=rng.random(count) < SURVEY_RESPONDERS,
    )


def _standardised(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    spread = values.std()
    result: npt.NDArray[np.float64] = (values - values.mean()) / (spread if spread > 0 else 1.0)
    return result
