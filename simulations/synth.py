"""A synthetic federation: merchants whose customers' interest decays, revives and churns.

Every merchant is a shop with its own size (lognormal, a long tail of small shops) and
its own category mix (Dirichlet(alpha): small alpha = non-IID shards). Each user has a
latent interest that decays exponentially with a personal half-life, is pushed back up
by the user's own sessions and purchases (saturating at ``interest-cap``), and may churn.
Sessions follow the funnel view -> click -> cart / favorite -> purchase.

Merchants run randomised re-activation campaigns. For every targeted user the true
probability of a purchase within ``response-days`` is written down for *every* action
(``truth``), the outcome of the logged action is drawn from it, and the event log is
made to agree: a purchase is placed in the window when the user re-engages, and the
user's purchases in the window are suppressed when not. The observed outcome therefore
equals the drawn one and ``truth`` is exact, which lets the harness report true policy
values and regret.

The simulation loops over days only; all users and sessions of a day are one vectorised
step, and sessions are expanded into events once at the end.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from common.config import _check, from_flat, load_toml
from common.schema import DEFAULT_ACTIONS, EVENT_DTYPE, EVENT_TYPES, STRING, action_dtype

log = logging.getLogger(__name__)

PRESETS_DIR = Path(__file__).parent / "presets"

#: Actions the simulator knows a response model for; ``none`` is the control.
KNOWN_ACTIONS: tuple[str, ...] = ("none", "recommend", "coupon", "push")

_DAY_MS = 86_400_000
_MAX_VIEWS = 20  # views per session; with the gap caps below a session lasts < 2 h
_PREF_QUANTILES = 256  # resolution of the table users' categories are drawn from
_P_CART = 0.3  # a click becomes a cart with this probability, else maybe a favorite
_CAMPAIGN_HOUR = 10  # campaigns go out between 10:00 and 12:00 UTC
_WINDOW_MARGIN_MS = 2 * 3_600_000  # a forced re-engagement session starts this early
# Share of sessions starting in each UTC hour: quiet nights, a lunch bump, busy evenings.
_DIURNAL = np.array(
    [1, 0.6, 0.4, 0.3, 0.3, 0.5, 1, 2, 3, 3.5, 4, 4.5, 5, 4.5, 4, 4, 4.5, 5, 6, 7, 7.5, 6.5, 4.5, 2]
)
_DIURNAL = _DIURNAL / _DIURNAL.sum()
# Gap before an event in ms, min + Exp(mean) capped, by event type: view (after the
# previous item's funnel), click, cart, favorite, purchase (checkout ends the session).
_GAPS_MS = np.array([
    [2_000, 1_000, 1_000, 1_000, 5_000],  # min
    [40_000, 8_000, 15_000, 15_000, 60_000],  # mean of the exponential part
    [180_000, 60_000, 60_000, 60_000, 300_000],  # cap
], dtype=np.float32)


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
            _check(getattr(self, name) >= 1, key(name), f"must be >= 1, got {getattr(self, name)}")
        for name in ("alpha", "user_concentration", "price_median", "half_life_days_median",
                     "sessions_per_day", "interest_cap"):
            _check(getattr(self, name) > 0, key(name), f"must be > 0, got {getattr(self, name)}")
        for name in ("size_sigma", "price_sigma", "decay_spread", "half_life_sigma",
                     "activity_sigma", "boost_session", "boost_purchase"):
            _check(getattr(self, name) >= 0, key(name), f"must be >= 0, got {getattr(self, name)}")
        _check(self.views_per_session >= 1, key("views_per_session"), "must be >= 1")
        _check(0 <= self.arrival_share <= 1, key("arrival_share"), "must be in [0, 1]")
        _check(0 <= self.churn_rate < 1, key("churn_rate"), "must be in [0, 1)")
        _check(0 < self.campaign_share <= 1, key("campaign_share"), "must be in (0, 1]")
        try:
            start = pd.Timestamp(self.start)
        except (TypeError, ValueError):
            raise ValueError(
                f"config key 'synthetic.start': expected a date like 2025-01-01, got {self.start!r}"
            ) from None
        from common.timestamps import EARLIEST_TIME

        # The generated log must pass the loader's plausibility check it will meet next.
        _check(start.tz_localize(None) >= EARLIEST_TIME.tz_localize(None)
               and start.tz_localize(None) + pd.Timedelta(days=self.days) <= pd.Timestamp.now(),
               key("start"), f"with synthetic.days={self.days} the log must lie between "
               f"{EARLIEST_TIME:%Y-%m-%d} and today, got {self.start!r}")
        _check(len(self.actions) >= 2 and self.actions[0] == "none", key("actions"),
               f"must list 'none' first and at least one action, got {self.actions}")
        _check(len(set(self.actions)) == len(self.actions), key("actions"), "has duplicates")
        unknown = [a for a in self.actions if a not in KNOWN_ACTIONS]
        _check(not unknown, key("actions"),
               f"unknown {unknown}; the simulator models {', '.join(KNOWN_ACTIONS)}")
        _check(len(self.propensities) == len(self.actions), key("propensities"),
               f"needs one value per action ({len(self.actions)}), got {len(self.propensities)}")
        _check(all(0 < p <= 1 for p in self.propensities), key("propensities"),
               "each must be in (0, 1]")
        _check(abs(sum(self.propensities) - 1) < 1e-6, key("propensities"),
               f"must sum to 1, got {sum(self.propensities):.6g}")


@dataclass
class Federation:
    """All frames of one synthetic federation (see the module docstring)."""

    events: pd.DataFrame
    interventions: pd.DataFrame
    truth: pd.DataFrame
    users: pd.DataFrame
    merchants: pd.DataFrame

    @property
    def actions(self) -> tuple[str, ...]:
        return tuple(str(a) for a in self.interventions["action"].cat.categories)

    def summary(self) -> str:
        """A compact human-readable table of sizes, event mix and campaigns."""
        ev, iv, m = self.events, self.interventions, self.merchants
        ts = ev["timestamp"]
        span = f"{ts.min():%Y-%m-%d} .. {ts.max():%Y-%m-%d}" if len(ev) else "-"
        mix = ev["event"].value_counts(normalize=True).reindex(list(EVENT_TYPES), fill_value=0)
        lines = [
            f"merchants     {len(m):,}",
            f"users         {len(self.users):,}",
            f"events        {len(ev):,}  ({span})",
            "event mix     " + "  ".join(f"{k} {v:.1%}" for k, v in mix.items()),
        ]
        if len(iv):
            shares = iv["action"].value_counts(normalize=True).reindex(self.actions)
            rate = float(self.truth["reengaged"].mean())
            lines.append(
                f"campaigns     {iv['timestamp'].dt.floor('D').nunique()} rounds, "
                f"{len(iv):,} interventions, re-engaged {rate:.1%}"
            )
            lines.append("actions       " + "  ".join(f"{k} {v:.1%}" for k, v in shares.items()))
        else:
            lines.append("campaigns     none")
        q = [0.0, 0.25, 0.5, 0.75, 0.9, 1.0]
        uq, eq = m["users"].quantile(q), m["events"].quantile(q)
        lines.append(f"{'per merchant':<14}{'min':>9}{'p25':>9}{'median':>9}"
                     f"{'p75':>9}{'p90':>9}{'max':>10}")
        for name, qs in (("  users", uq), ("  events", eq)):
            lines.append(f"{name:<14}" + "".join(f"{v:>9,.0f}" for v in qs.iloc[:-1])
                         + f"{qs.iloc[-1]:>10,.0f}")
        return "\n".join(lines)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _logit(p: np.ndarray | float) -> np.ndarray:
    return np.log(p) - np.log1p(-np.asarray(p))


def _strings(vocab: list[str], codes: np.ndarray) -> pd.Series:
    """``vocab[codes]`` as a pyarrow-backed string column without a Python loop."""
    return pd.Series(pa.array(vocab).take(pa.array(codes)), dtype=STRING)


def _ids(prefix: str, n: int) -> list[str]:
    """Zero-padded ids, so that string order equals numeric order."""
    width = max(2, len(str(n - 1)))
    return [f"{prefix}{i:0{width}d}" for i in range(n)]


def _entropy(p: np.ndarray) -> np.ndarray:
    """Normalised entropy in [0, 1] along the last axis."""
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=-1)
    return h / math.log(p.shape[-1]) if p.shape[-1] > 1 else np.zeros(p.shape[:-1])


# --------------------------------------------------------------------------- world


def _draw_world(cfg: SynthConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Merchants, users and their latent traits."""
    M, C = cfg.num_merchants, cfg.num_categories
    sizes = np.maximum(
        cfg.min_users, np.rint(cfg.users_median * np.exp(cfg.size_sigma * rng.standard_normal(M)))
    ).astype(np.int64)
    mix = rng.dirichlet(np.full(C, cfg.alpha), size=M)
    decay_mult = np.exp(cfg.decay_spread * rng.standard_normal(M))

    N = int(sizes.sum())
    merchant = np.repeat(np.arange(M), sizes)
    z = rng.standard_normal((N, 6))
    # Users' preferences are drawn around their shop's mix; some users are focused, some browse.
    conc = cfg.user_concentration * np.exp(0.8 * z[:, 0])
    pref = rng.gamma(conc[:, None] * mix[merchant] + 0.02)
    pref /= pref.sum(axis=1, keepdims=True)
    half_life = cfg.half_life_days_median * decay_mult[merchant] * np.exp(
        cfg.half_life_sigma * z[:, 1])
    rate = cfg.sessions_per_day * np.exp(cfg.activity_sigma * z[:, 2])
    price_sens = 0.2 + 0.8 * z[:, 3]
    push_aff = z[:, 4]
    # Behaviour reveals the latent traits a little: push-responsive users click more,
    # price-sensitive ones keep favourites and abandon carts.
    p_click = _sigmoid(_logit(0.3) + 0.4 * push_aff + 0.3 * z[:, 5])
    p_fav = _sigmoid(_logit(0.25) + 0.6 * price_sens)
    p_buy = _sigmoid(_logit(0.5) - 0.6 * price_sens + 0.3 * rng.standard_normal(N))

    arrives = rng.random(N) < cfg.arrival_share
    join_day = np.where(arrives, rng.integers(0, cfg.days, N), 0)
    if cfg.churn_rate > 0:
        churn_day = join_day + rng.geometric(cfg.churn_rate, N)
    else:
        churn_day = np.full(N, np.iinfo(np.int64).max // 2)
    interest0 = np.minimum(np.exp(0.5 * rng.standard_normal(N)), cfg.interest_cap)

    cat_price = cfg.price_median * np.exp(cfg.price_sigma * rng.standard_normal(C))
    item_price = np.round(
        cat_price[:, None] * np.exp(0.4 * rng.standard_normal((C, cfg.items_per_category))), 2
    ).clip(min=0.5)
    return {
        "sizes": sizes, "mix": mix, "decay_mult": decay_mult, "merchant": merchant,
        "pref": pref, "half_life": half_life, "rate": rate, "price_sens": price_sens,
        "push_aff": push_aff, "p_click": p_click, "p_fav": p_fav, "p_buy": p_buy,
        "join_day": join_day, "churn_day": churn_day, "interest0": interest0,
        "item_price": item_price.ravel(),
    }


def _true_response(cfg: SynthConfig, w: dict[str, np.ndarray], users: np.ndarray,
                   interest: np.ndarray) -> np.ndarray:
    """P(purchase within the response window | action) for ``users``, one column per action.

    The control arm is the user's organic purchase probability at today's interest;
    every action shifts its logit by a user-specific effect, so a good policy exists
    and differs by user.
    """
    x = w["p_click"][users] * _P_CART
    m = cfg.views_per_session - 1
    p_cart_session = 1 - (1 - x) * np.exp(-m * x)  # P(>= 1 cart), views = 1 + Poisson(m)
    daily_buys = w["rate"][users] * interest * p_cart_session * w["p_buy"][users]
    p_none = np.clip(-np.expm1(-cfg.response_days * daily_buys), 0.01, 0.98)
    effects = {
        "recommend": cfg.effect_recommend * (w["pref"][users].max(axis=1) - 0.35),
        "coupon": cfg.effect_coupon * w["price_sens"][users],
        "push": cfg.effect_push * w["push_aff"][users],
    }
    base = _logit(p_none)
    cols = [p_none if a == "none" else _sigmoid(base + effects[a]) for a in cfg.actions]
    return np.column_stack(cols)


# ---------------------------------------------------------------------------- days


def _simulate(cfg: SynthConfig, w: dict[str, np.ndarray], rng: np.random.Generator
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """Run the day loop; returns sessions, interventions and the final interest."""
    N = len(w["merchant"])
    M = cfg.num_merchants
    interest = w["interest0"].copy()
    churn_day = w["churn_day"]  # postponed in place for users who re-engage
    decay = np.exp(-math.log(2) / w["half_life"])
    cum_prop = np.cumsum(cfg.propensities)
    cum_prop[-1] = 1.0
    R = cfg.response_days
    open_until = np.full(N, -1)  # last day of the user's open intervention window
    suppress_until = np.full(N, -1)  # no purchases up to and including this day
    pending: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}  # day -> forced sessions

    sess: dict[str, list[np.ndarray]] = {k: [] for k in
                                         ("user", "day", "ms", "views", "buy", "click", "cart",
                                          "fav")}
    ivs: dict[str, list[np.ndarray]] = {k: [] for k in
                                        ("user", "day", "ms", "action", "p", "y")}
    all_users = np.arange(N)
    for d in range(cfg.days):
        joined = w["join_day"] <= d
        active = joined & (churn_day > d)

        if d >= cfg.campaign_every_days and d % cfg.campaign_every_days == 0 and d + R < cfg.days:
            eligible = np.flatnonzero(active & (open_until < d))
            # Campaigns lean towards lapsing users: sample with weight 1 / (0.2 + interest).
            key = rng.exponential(size=len(eligible)) * (0.2 + interest[eligible])
            em = w["merchant"][eligible]
            order = np.lexsort((key, em))
            counts = np.bincount(em, minlength=M)
            rank = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
            take = rank < np.rint(cfg.campaign_share * counts)[em[order]]
            users = np.sort(eligible[order[take]])
            n = len(users)
            action = np.searchsorted(cum_prop, rng.random(n), side="right")
            p = _true_response(cfg, w, users, interest[users])
            y = rng.random(n) < p[np.arange(n), action]
            ms = (_CAMPAIGN_HOUR * 3_600_000 + rng.random(n) * _WINDOW_MARGIN_MS).astype(np.int64)
            open_until[users] = d + R
            suppress_until[users[~y]] = d + R
            # The re-engagement session starts in [t, t + R days - margin): inside the window.
            at = d * _DAY_MS + ms + (rng.random(n) * (R * _DAY_MS - _WINDOW_MARGIN_MS)).astype(
                np.int64)
            fu, fat = users[y], at[y]
            fday = fat // _DAY_MS
            churn_day[fu] = np.maximum(churn_day[fu], fday + 1)
            for day in np.unique(fday):
                sel = fday == day
                pending.setdefault(int(day), []).append((fu[sel], fat[sel] - day * _DAY_MS))
            for k, v in (("user", users), ("day", np.full(n, d)), ("ms", ms),
                         ("action", action), ("p", p), ("y", y)):
                ivs[k].append(v)

        # Organic sessions: Poisson in today's interest; then the forced re-engagements.
        lam = np.where(active, w["rate"] * interest, 0.0)
        n_sess = rng.poisson(lam)
        u_org = np.repeat(all_users, n_sess)
        forced = pending.pop(d, [])
        u_forced = np.concatenate([f[0] for f in forced]) if forced else np.zeros(0, np.int64)
        ms_forced = np.concatenate([f[1] for f in forced]) if forced else np.zeros(0, np.int64)
        u = np.concatenate([u_org, u_forced])
        S = len(u)
        hour = rng.choice(24, size=len(u_org), p=_DIURNAL)
        ms = np.concatenate([
            ((hour + rng.random(len(u_org))) * 3_600_000).astype(np.int64), ms_forced])
        views = np.minimum(1 + rng.poisson(cfg.views_per_session - 1, S), _MAX_VIEWS)
        v_sess = np.repeat(np.arange(S), views)
        v_user = u[v_sess]
        V = len(v_sess)
        click = rng.random(V) < w["p_click"][v_user]
        cart = click & (rng.random(V) < _P_CART)
        fav = click & ~cart & (rng.random(V) < w["p_fav"][v_user])
        is_forced = np.arange(S) >= len(u_org)
        last_view = np.cumsum(views)[is_forced] - 1
        click[last_view], cart[last_view], fav[last_view] = True, True, False
        has_cart = np.bincount(v_sess, weights=cart, minlength=S) > 0
        buy = has_cart & (rng.random(S) < w["p_buy"][u]) & (suppress_until[u] < d)
        buy |= is_forced

        n_s = np.bincount(u, minlength=N)
        n_b = np.bincount(u, weights=buy, minlength=N)
        boost = (cfg.boost_session * n_s + cfg.boost_purchase * n_b) * (
            1 - interest / cfg.interest_cap)
        interest = np.where(joined, np.clip(interest * decay + boost, 0, cfg.interest_cap),
                            interest)
        for k, v in (("user", u), ("day", np.full(S, d)), ("ms", ms), ("views", views),
                     ("buy", buy), ("click", click), ("cart", cart), ("fav", fav)):
            sess[k].append(v)

    sessions = {k: np.concatenate(v) for k, v in sess.items()}
    if ivs["user"]:
        interventions = {k: np.concatenate(v) for k, v in ivs.items()}
    else:
        interventions = {k: np.zeros(0, np.int64) for k in ivs}
        interventions["p"] = np.zeros((0, len(cfg.actions)))
        interventions["y"] = np.zeros(0, bool)
    return sessions, interventions, interest


# -------------------------------------------------------------------------- events


def _expand_events(cfg: SynthConfig, w: dict[str, np.ndarray], s: dict[str, np.ndarray],
                   rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Turn sessions into ordered funnel events with items, categories, prices and times."""
    n_views, buy = s["views"], s["buy"]
    S, V = len(n_views), len(s["click"])
    view_sess = np.repeat(np.arange(S), n_views)
    view_user = s["user"][view_sess]
    click, cart, fav = s["click"], s["cart"], s["fav"]

    # Category by the user's preference, read from a per-user table of its quantiles
    # (resolution 1 / _PREF_QUANTILES): a gather instead of a search per view.
    K = cfg.items_per_category
    N, C = w["pref"].shape
    bounds = np.rint(np.cumsum(w["pref"], axis=1) * _PREF_QUANTILES).astype(np.int64)
    bounds[:, -1] = _PREF_QUANTILES
    slots = np.diff(bounds, axis=1, prepend=0).clip(min=0)  # slots per category, sum 256
    table = np.repeat(np.tile(np.arange(C), N), slots.ravel()).reshape(N, _PREF_QUANTILES)
    cat = table[view_user, rng.integers(0, _PREF_QUANTILES, V)]
    item = cat * K + (K * rng.random(V) ** 2).astype(np.int64)  # a popular head per category

    # A session buys the last item it put in the cart.
    carted = np.flatnonzero(cart)
    cs = view_sess[carted]
    last = np.r_[cs[1:] != cs[:-1], True] if len(cs) else np.zeros(0, bool)
    buy_item = np.full(S, -1)
    buy_item[cs[last]] = item[carted[last]]

    n_funnel = 1 + click.astype(np.int64) + cart + fav
    k = n_funnel.copy()
    view_start = np.cumsum(n_views) - n_views
    k[view_start[buy] + n_views[buy] - 1] += 1  # the purchase follows the session's last view
    e_view = np.repeat(np.arange(V), k)
    block_start = np.cumsum(k) - k
    p = np.arange(len(e_view)) - block_start[e_view]
    etype = np.where(p >= n_funnel[e_view], 4, np.where(p == 2, 2 + fav[e_view], p))
    e_sess = view_sess[e_view]
    e_item = np.where(etype == 4, buy_item[e_sess], item[e_view])

    lo, mean, cap = _GAPS_MS[:, etype]
    gap = np.minimum(lo + mean * rng.standard_exponential(len(etype), dtype=np.float32), cap)
    csum = np.cumsum(gap.astype(np.int64))
    first = block_start[view_start]
    offset = csum - csum[first][e_sess]
    ts_ms = s["day"][e_sess] * _DAY_MS + s["ms"][e_sess] + offset
    value = np.zeros(len(etype))
    bought = np.flatnonzero(etype == 4)
    value[bought] = w["item_price"][e_item[bought]]
    return {
        "user": s["user"][e_sess], "ts_ms": ts_ms, "event": etype, "item": e_item,
        "cat": e_item // K,
        "value": value,
    }


def _start_ns(cfg: SynthConfig) -> int:
    start = pd.Timestamp(cfg.start)
    start = start.tz_localize("UTC") if start.tzinfo is None else start.tz_convert("UTC")
    return int(start.normalize().as_unit("ns").value)


def _timestamps(start_ns: int, ms: np.ndarray) -> pd.Series:
    ns = start_ns + ms.astype(np.int64) * 1_000_000
    return pd.Series(pd.DatetimeIndex(ns.astype("datetime64[ns]")).tz_localize("UTC"))


# --------------------------------------------------------------------------- public


def generate_federation(config: SynthConfig, seed: int) -> Federation:
    """Simulate a federation; equal ``(config, seed)`` give identical frames."""
    t0 = time.perf_counter()
    cfg = config
    rng = np.random.default_rng(seed)
    w = _draw_world(cfg, rng)
    sessions, iv, interest = _simulate(cfg, w, rng)
    ev = _expand_events(cfg, w, sessions, rng)

    N, M = len(w["merchant"]), cfg.num_merchants
    merchant_ids = _ids("m", M)
    width = len(str(max(w["sizes"]) - 1))
    local = np.arange(N) - np.repeat(np.cumsum(w["sizes"]) - w["sizes"], w["sizes"])
    user_ids = [f"{merchant_ids[m]}-u{i:0{width}d}" for m, i in zip(w["merchant"], local,
                                                                     strict=True)]
    cat_ids = _ids("c", cfg.num_categories)
    item_width = len(str(cfg.items_per_category - 1))
    item_ids = [f"{c}-i{j:0{item_width}d}" for c in cat_ids for j in range(cfg.items_per_category)]
    start_ns = _start_ns(cfg)

    # Users are numbered by (merchant, local id), so one key sorts by merchant, user, time.
    shift = max(int(ev["ts_ms"].max(initial=0)).bit_length(), 1)
    order = np.argsort((ev["user"] << shift) | ev["ts_ms"], kind="stable")
    eu = ev["user"][order]
    events = pd.DataFrame({
        "user_id": _strings(user_ids, eu),
        "timestamp": _timestamps(start_ns, ev["ts_ms"][order]),
        "event": pd.Categorical.from_codes(ev["event"][order], dtype=EVENT_DTYPE),
        "item_id": _strings(item_ids, ev["item"][order]),
        "category_id": _strings(cat_ids, ev["cat"][order]),
        "merchant_id": _strings(merchant_ids, w["merchant"][eu]),
        "value": ev["value"][order],
    })

    iorder = np.lexsort((iv["day"], iv["user"]))
    iu = iv["user"][iorder]
    its = _timestamps(start_ns, iv["day"][iorder] * _DAY_MS + iv["ms"][iorder])
    action = iv["action"][iorder]
    interventions = pd.DataFrame({
        "user_id": _strings(user_ids, iu),
        "timestamp": its,
        "action": pd.Categorical.from_codes(action, dtype=action_dtype(cfg.actions)),
        "propensity": np.asarray(cfg.propensities, dtype=float)[action],
        "merchant_id": _strings(merchant_ids, w["merchant"][iu]),
    })
    truth = pd.DataFrame({
        "merchant_id": interventions["merchant_id"],
        "user_id": interventions["user_id"],
        "timestamp": its,
        **{f"p_{a}": iv["p"][iorder, j] for j, a in enumerate(cfg.actions)},
        "reengaged": iv["y"][iorder].astype(bool),
    })

    n_events = np.bincount(ev["user"], minlength=N)
    n_buys = np.bincount(ev["user"], weights=ev["event"] == 4, minlength=N).astype(np.int64)
    pref = w["pref"]
    users = pd.DataFrame({
        "merchant_id": _strings(merchant_ids, w["merchant"]),
        "user_id": pd.Series(user_ids, dtype=STRING),
        "join_day": w["join_day"],
        "churn_day": np.minimum(w["churn_day"], np.iinfo(np.int32).max),
        "half_life_days": w["half_life"],
        "sessions_per_day": w["rate"],
        "price_sensitivity": w["price_sens"],
        "push_affinity": w["push_aff"],
        "top_category": _strings(cat_ids, pref.argmax(axis=1)),
        "top_category_share": pref.max(axis=1),
        "preference_entropy": _entropy(pref),
        "click_prob": w["p_click"],
        "buy_prob": w["p_buy"],
        "initial_interest": w["interest0"],
        "final_interest": interest,
        "events": n_events,
        "purchases": n_buys,
    })
    merchants = pd.DataFrame({
        "merchant_id": pd.Series(merchant_ids, dtype=STRING),
        "users": w["sizes"],
        "events": np.bincount(w["merchant"], weights=n_events, minlength=M).astype(np.int64),
        "purchases": np.bincount(w["merchant"], weights=n_buys, minlength=M).astype(np.int64),
        "interventions": np.bincount(w["merchant"][iv["user"]], minlength=M),
        "category_entropy": _entropy(w["mix"]),
        "top_category": _strings(cat_ids, w["mix"].argmax(axis=1)),
        "top_category_share": w["mix"].max(axis=1),
        "decay_multiplier": w["decay_mult"],
    })
    log.info("synthetic federation: %s merchants, %s users, %s events in %.2f s (seed %s)",
             M, N, len(events), time.perf_counter() - t0, seed)
    return Federation(events, interventions, truth, users, merchants)


def benchmark(config: SynthConfig, seed: int = 0, repeat: int = 3) -> dict[str, float]:
    """Best-of-``repeat`` generation time: events, seconds and events per second."""
    best, n = math.inf, 0
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fed = generate_federation(config, seed)
        best = min(best, time.perf_counter() - t0)
        n = len(fed.events)
    return {"events": n, "seconds": best, "events_per_s": n / best if best > 0 else math.inf}


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def load_preset(name_or_path: str | Path) -> dict[str, Any]:
    """Flat dotted keys of ``simulations/presets/<name>.toml``, or of a TOML file path."""
    text = str(name_or_path)
    path = Path(text)
    candidate = PRESETS_DIR / f"{text}.toml"
    if path.is_dir():
        # A folder is never a preset; one that happens to share a preset's name (a
        # "quick/" in the current folder) must not hide the built-in preset.
        if path.suffix == ".toml" or len(path.parts) > 1 or not candidate.is_file():
            raise ValueError(f"preset {path.resolve()} is a folder, not a TOML file")
        return _read_preset(candidate)
    if path.suffix == ".toml" or path.exists():
        return _read_preset(path)
    if not candidate.is_file():
        raise ValueError(
            f"unknown preset {text!r}; available presets: {', '.join(available_presets())} "
            f"(in {PRESETS_DIR}), or give the path of a .toml file"
        )
    return _read_preset(candidate)


def _read_preset(path: Path) -> dict[str, Any]:
    """:func:`load_toml`, with every ordinary failure naming the preset file."""
    path = path.resolve()
    try:
        return load_toml(path)
    except UnicodeDecodeError as err:
        raise ValueError(f"preset {path}: not UTF-8 text (byte {err.object[err.start]:#04x} "
                         f"at offset {err.start}); TOML files must be UTF-8") from None
    except IsADirectoryError:
        raise ValueError(f"preset {path} is a folder, not a TOML file") from None


def synth_config_from_preset(flat: Mapping[str, Any]) -> SynthConfig:
    """The ``[synthetic]`` section of flat preset keys as a :class:`SynthConfig`."""
    return from_flat(SynthConfig, flat, "synthetic")


_FILES = ("events", "interventions", "truth", "users", "merchants")


def write_federation(fed: Federation, out_dir: str | Path) -> dict[str, Path]:
    """Write the five frames as Parquet files into ``out_dir``; returns name -> path."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in _FILES:
        paths[name] = out / f"{name}.parquet"
        getattr(fed, name).to_parquet(paths[name], index=False)
    log.info("wrote synthetic federation to %s", out)
    return paths


def read_federation(out_dir: str | Path) -> Federation:
    """Read what :func:`write_federation` wrote, with the canonical dtypes restored."""
    out = Path(out_dir)
    frames = {}
    for name in _FILES:
        path = out / f"{name}.parquet"
        if not path.is_file():
            raise ValueError(f"synthetic federation in {out}: missing {path.name}")
        frames[name] = pd.read_parquet(path)
    actions = tuple(c[2:] for c in frames["truth"].columns if c.startswith("p_"))
    strings = {"user_id", "item_id", "category_id", "merchant_id", "top_category"}
    for frame in frames.values():
        for col in frame.columns:
            if col in strings:
                frame[col] = frame[col].astype(STRING)
            elif col == "timestamp":
                frame[col] = frame[col].astype("datetime64[ns, UTC]")
    frames["events"]["event"] = frames["events"]["event"].astype(str).astype(EVENT_DTYPE)
    frames["interventions"]["action"] = (
        frames["interventions"]["action"].astype(str).astype(action_dtype(actions)))
    return Federation(**frames)


__all__ = [
    "Federation", "SynthConfig", "available_presets", "benchmark", "generate_federation",
    "load_preset", "read_federation", "synth_config_from_preset", "write_federation",
]
