"""The synthetic federation's settings: :class:`SynthConfig`, validated on construction."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from common.config import check_key
from common.vocabulary import DEFAULT_ACTIONS

#: Actions the simulator knows a response model for; ``none`` is the control.
KNOWN_ACTIONS: tuple[str, ...] = ("none", "recommend", "coupon", "push")

#: Generated events per user-day at one session of ``views-per-session`` views, and the
#: generator's peak bytes per event and per user: fitted on 50 merchants of the quick
#: preset at users-median 40 and 160 (0.56M and 2.24M events: 237 and 517 MB peak).
EVENTS_PER_VIEW = 1.8
BYTES_PER_EVENT = 170
BYTES_PER_USER = 1_000


@dataclass(frozen=True)
class SynthConfig:
    """The synthetic federation (section ``synthetic``, kebab-case keys in presets)."""

    num_merchants: int = 20
    users_median: int = 200  # median users per merchant
    size_sigma: float = 1.0  # lognormal spread of merchant sizes: long tail of small shops
    min_users: int = 20
    num_categories: int = 30
    alpha: float = 0.3  # Dirichlet concentration of merchant category mixes (small = non-IID)
    user_concentration: float = 5.0  # median Dirichlet concentration of users around their shop
    items_per_category: int = 200
    price_median: float = 30.0
    price_sigma: float = 0.8  # lognormal spread of category price levels
    decay_spread: float = 0.0  # merchant-level spread of half-lives (0 = same decay speed)
    days: int = 120
    start: str = "2025-01-01"
    arrival_share: float = 0.4  # share of users who first arrive during the period
    half_life_days_median: float = 10.0
    half_life_sigma: float = 0.6  # lognormal spread of users' half-lives
    sessions_per_day: float = 0.4  # median session rate of a user at interest 1
    activity_sigma: float = 0.7  # lognormal spread of users' session rates
    views_per_session: float = 3.0
    interest_cap: float = 3.0
    boost_session: float = 0.15  # interest gained per session (scaled by 1 - I / cap)
    boost_purchase: float = 0.5  # extra interest gained per purchase
    churn_rate: float = 0.004  # daily churn hazard
    campaign_every_days: int = 7
    campaign_share: float = 0.3  # share of eligible users targeted per campaign
    actions: tuple[str, ...] = DEFAULT_ACTIONS
    propensities: tuple[float, ...] = (0.25, 0.25, 0.25, 0.25)  # randomised; must sum to 1
    response_days: int = 7
    effect_recommend: float = 3.0  # logit effect per unit of (top-category share - 0.35)
    effect_coupon: float = 1.2  # logit effect per unit of price sensitivity
    effect_push: float = 1.0  # logit effect per unit of push affinity (negative = annoyance)

    def __post_init__(self) -> None:
        def key(name: str) -> str:
            return f"synthetic.{name.replace('_', '-')}"

        for name in ("num_merchants", "users_median", "min_users", "num_categories",
                     "items_per_category", "days", "campaign_every_days", "response_days"):
            value = getattr(self, name)
            check_key(value >= 1, key(name), f"must be >= 1, got {value}")
        for name in ("alpha", "user_concentration", "price_median", "half_life_days_median",
                     "sessions_per_day", "interest_cap"):
            value = getattr(self, name)
            check_key(value > 0, key(name), f"must be > 0, got {value}")
        for name in ("size_sigma", "price_sigma", "decay_spread", "half_life_sigma",
                     "activity_sigma", "boost_session", "boost_purchase"):
            value = getattr(self, name)
            check_key(value >= 0, key(name), f"must be >= 0, got {value}")
        # A day's sessions are a Poisson draw: past ~1e18 numpy refuses the rate; past
        # 100 a day the log is tens of thousands of events per user and month.
        check_key(self.sessions_per_day <= 100, key("sessions_per_day"),
                  f"must be <= 100, got {self.sessions_per_day}")
        check_key(self.views_per_session >= 1, key("views_per_session"), "must be >= 1")
        check_key(0 <= self.arrival_share <= 1, key("arrival_share"), "must be in [0, 1]")
        check_key(0 <= self.churn_rate < 1, key("churn_rate"), "must be in [0, 1)")
        check_key(0 < self.campaign_share <= 1, key("campaign_share"), "must be in (0, 1]")
        import pandas as pd  # here, not at import: unknown keys are found without it

        from common.timestamps import EARLIEST_TIME

        try:
            start = pd.Timestamp(self.start)
        except (TypeError, ValueError):
            raise ValueError(
                f"config key 'synthetic.start': expected a date like 2025-01-01, got {self.start!r}"
            ) from None

        # The generated log must pass the loader's plausibility check it will meet next.
        check_key(start.tz_localize(None) >= EARLIEST_TIME.tz_localize(None)
               and start.tz_localize(None) + pd.Timedelta(days=self.days) <= pd.Timestamp.now(),
               key("start"), f"with synthetic.days={self.days} the log must lie between "
               f"{EARLIEST_TIME:%Y-%m-%d} and today, got {self.start!r}")
        check_key(len(self.actions) >= 2 and self.actions[0] == "none", key("actions"),
               f"must list 'none' first and at least one action, got {self.actions}")
        check_key(len(set(self.actions)) == len(self.actions), key("actions"), "has duplicates")
        unknown = [a for a in self.actions if a not in KNOWN_ACTIONS]
        check_key(not unknown, key("actions"),
               f"unknown {unknown}; the simulator models {', '.join(KNOWN_ACTIONS)}")
        check_key(len(self.propensities) == len(self.actions), key("propensities"),
               f"needs one value per action ({len(self.actions)}), got {len(self.propensities)}")
        check_key(all(0 < p <= 1 for p in self.propensities), key("propensities"),
               "each must be in (0, 1]")
        check_key(abs(sum(self.propensities) - 1) < 1e-6, key("propensities"),
               f"must sum to 1, got {sum(self.propensities):.6g}")
        self._check_fits_in_memory()

    def expected_size(self) -> tuple[float, float]:
        """The expected users and events of the federation (lognormal merchant sizes)."""
        per_merchant = max(self.min_users,
                           self.users_median * math.exp(self.size_sigma ** 2 / 2))
        users = self.num_merchants * per_merchant
        events = (users * self.days * self.sessions_per_day * self.views_per_session
                  * EVENTS_PER_VIEW)
        return users, events

    def _check_fits_in_memory(self) -> None:
        """Refuse a federation the generator cannot hold: it builds every user and event
        in memory, and would otherwise fail after tens of seconds of allocating."""
        users, events = self.expected_size()
        need = BYTES_PER_EVENT * events + BYTES_PER_USER * users
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        check_key(need <= have, "synthetic.users-median",
                  f"with synthetic.num-merchants={self.num_merchants}, days={self.days} and "
                  f"sessions-per-day={self.sessions_per_day:g} the federation would hold about "
                  f"{users:,.0f} users and {events:,.0f} events, {need / 2**30:,.0f} GiB to "
                  f"generate; this machine has {have / 2**30:,.0f} GiB")
