"""The day loop: interest decays, sessions happen, campaigns go out and get answered.

A user's latent interest decays exponentially with a personal half-life, is pushed back
up by the user's own sessions and purchases (saturating at ``interest-cap``), and the
user may churn. Sessions follow the funnel view -> click -> cart / favorite -> purchase.

Merchants run randomised re-activation campaigns. For every targeted user the true
probability of a purchase within ``response-days`` is written down for *every* action
(:func:`true_response`), the outcome of the logged action is drawn from it, and the
sessions are made to agree: a purchase is placed in the window when the user re-engages,
and the user's purchases in the window are suppressed when not.

Each day is one vectorised step over all users and sessions; the sessions are turned
into events afterwards (:mod:`simulations.synth.events`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from simulations.synth.clock import DAY_MS
from simulations.synth.config import SynthConfig
from simulations.synth.world import World, logit, sigmoid

_MAX_VIEWS = 20  # views per session; with the caps of events._GAPS_MS a session lasts < 2 h
_P_CART = 0.3  # a click becomes a cart with this probability, else maybe a favorite
_CAMPAIGN_HOUR = 10  # campaigns go out between 10:00 and 12:00 UTC
_WINDOW_MARGIN_MS = 2 * 3_600_000  # a forced re-engagement session starts this early
# Share of sessions starting in each UTC hour: quiet nights, a lunch bump, busy evenings.
_DIURNAL = np.array(
    [1, 0.6, 0.4, 0.3, 0.3, 0.5, 1, 2, 3, 3.5, 4, 4.5, 5, 4.5, 4, 4, 4.5, 5, 6, 7, 7.5, 6.5, 4.5, 2]
)
_DIURNAL = _DIURNAL / _DIURNAL.sum()

_SESSION_KEYS = ("user", "day", "ms", "views", "buy", "click", "cart", "fav")
_INTERVENTION_KEYS = ("user", "day", "ms", "action", "p", "y")


def true_response(cfg: SynthConfig, w: World, users: np.ndarray,
                  interest: np.ndarray) -> np.ndarray:
    """P(purchase within the response window | action) for ``users``, one column per action.

    The control arm is the user's organic purchase probability at today's interest;
    every action shifts its logit by a user-specific effect, so a good policy exists
    and differs by user.
    """
    x = w.p_click[users] * _P_CART
    m = cfg.views_per_session - 1
    p_cart_session = 1 - (1 - x) * np.exp(-m * x)  # P(>= 1 cart), views = 1 + Poisson(m)
    daily_buys = w.rate[users] * interest * p_cart_session * w.p_buy[users]
    p_none = np.clip(-np.expm1(-cfg.response_days * daily_buys), 0.01, 0.98)
    effects = {
        "recommend": cfg.effect_recommend * (w.pref[users].max(axis=1) - 0.35),
        "coupon": cfg.effect_coupon * w.price_sens[users],
        "push": cfg.effect_push * w.push_aff[users],
    }
    base = logit(p_none)
    cols = [p_none if a == "none" else sigmoid(base + effects[a]) for a in cfg.actions]
    return np.column_stack(cols)


@dataclass
class History:
    """What the day loop produced.

    Attributes
    ----------
    sessions : per session ``user``, ``day``, ``ms`` (start, since midnight), ``views``
        and ``buy``; per view ``click``, ``cart`` and ``fav``.
    interventions : per targeted user ``user``, ``day``, ``ms``, ``action`` (index),
        ``p`` ([n, A], :func:`true_response`) and ``y`` (re-engaged).
    interest : [N] interest after the last day.
    churn_day : [N] churn day, postponed for users who re-engaged.
    """

    sessions: dict[str, np.ndarray]
    interventions: dict[str, np.ndarray]
    interest: np.ndarray
    churn_day: np.ndarray


@dataclass
class _State:
    """The loop's per-user state and what it has logged so far."""

    interest: np.ndarray
    churn_day: np.ndarray
    open_until: np.ndarray  # last day of the user's open intervention window
    suppress_until: np.ndarray  # no purchases up to and including this day
    pending: dict[int, list[tuple[np.ndarray, np.ndarray]]] = field(
        default_factory=dict)  # day -> forced sessions (users, ms since midnight)
    sessions: dict[str, list[np.ndarray]] = field(
        default_factory=lambda: {k: [] for k in _SESSION_KEYS})
    interventions: dict[str, list[np.ndarray]] = field(
        default_factory=lambda: {k: [] for k in _INTERVENTION_KEYS})


def simulate(cfg: SynthConfig, w: World, rng: np.random.Generator) -> History:
    """Run the day loop over ``cfg.days`` days, drawing from ``rng`` after the world."""
    N = len(w.merchant)
    st = _State(interest=w.interest0.copy(), churn_day=w.churn_day.copy(),
                open_until=np.full(N, -1), suppress_until=np.full(N, -1))
    decay = np.exp(-math.log(2) / w.half_life)
    for d in range(cfg.days):
        joined = w.join_day <= d
        active = joined & (st.churn_day > d)
        if (d >= cfg.campaign_every_days and d % cfg.campaign_every_days == 0
                and d + cfg.response_days < cfg.days):
            _campaign(cfg, w, st, d, active, rng)
        u, buy = _sessions(cfg, w, st, d, active, rng)
        n_s = np.bincount(u, minlength=N)
        n_b = np.bincount(u, weights=buy, minlength=N)
        boost = (cfg.boost_session * n_s + cfg.boost_purchase * n_b) * (
            1 - st.interest / cfg.interest_cap)
        st.interest = np.where(
            joined, np.clip(st.interest * decay + boost, 0, cfg.interest_cap), st.interest)

    sessions = {k: np.concatenate(v) for k, v in st.sessions.items()}
    if st.interventions["user"]:
        interventions = {k: np.concatenate(v) for k, v in st.interventions.items()}
    else:
        interventions = {k: np.zeros(0, np.int64) for k in _INTERVENTION_KEYS}
        interventions["p"] = np.zeros((0, len(cfg.actions)))
        interventions["y"] = np.zeros(0, bool)
    return History(sessions, interventions, st.interest, st.churn_day)


def _campaign(cfg: SynthConfig, w: World, st: _State, d: int, active: np.ndarray,
              rng: np.random.Generator) -> None:
    """Day ``d``'s campaign: target, randomise the action, draw and schedule the answer."""
    R = cfg.response_days
    eligible = np.flatnonzero(active & (st.open_until < d))
    # Campaigns lean towards lapsing users: sample with weight 1 / (0.2 + interest).
    key = rng.exponential(size=len(eligible)) * (0.2 + st.interest[eligible])
    em = w.merchant[eligible]
    order = np.lexsort((key, em))
    counts = np.bincount(em, minlength=cfg.num_merchants)
    rank = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
    take = rank < np.rint(cfg.campaign_share * counts)[em[order]]
    users = np.sort(eligible[order[take]])
    n = len(users)
    cum_prop = np.cumsum(cfg.propensities)
    cum_prop[-1] = 1.0
    action = np.searchsorted(cum_prop, rng.random(n), side="right")
    p = true_response(cfg, w, users, st.interest[users])
    y = rng.random(n) < p[np.arange(n), action]
    ms = (_CAMPAIGN_HOUR * 3_600_000 + rng.random(n) * _WINDOW_MARGIN_MS).astype(np.int64)
    st.open_until[users] = d + R
    st.suppress_until[users[~y]] = d + R
    # The re-engagement session starts in [t, t + R days - margin): inside the window.
    at = d * DAY_MS + ms + (rng.random(n) * (R * DAY_MS - _WINDOW_MARGIN_MS)).astype(np.int64)
    fu, fat = users[y], at[y]
    fday = fat // DAY_MS
    st.churn_day[fu] = np.maximum(st.churn_day[fu], fday + 1)
    for day in np.unique(fday):
        sel = fday == day
        st.pending.setdefault(int(day), []).append((fu[sel], fat[sel] - day * DAY_MS))
    for k, v in (("user", users), ("day", np.full(n, d)), ("ms", ms),
                 ("action", action), ("p", p), ("y", y)):
        st.interventions[k].append(v)


def _sessions(cfg: SynthConfig, w: World, st: _State, d: int, active: np.ndarray,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Log day ``d``'s sessions; returns each session's user and whether it bought.

    Organic sessions are Poisson in today's interest, then come the forced
    re-engagements; each session walks the funnel view by view.
    """
    lam = np.where(active, w.rate * st.interest, 0.0)
    n_sess = rng.poisson(lam)
    u_org = np.repeat(np.arange(len(w.merchant)), n_sess)
    forced = st.pending.pop(d, [])
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
    click = rng.random(V) < w.p_click[v_user]
    cart = click & (rng.random(V) < _P_CART)
    fav = click & ~cart & (rng.random(V) < w.p_fav[v_user])
    is_forced = np.arange(S) >= len(u_org)
    last_view = np.cumsum(views)[is_forced] - 1
    click[last_view], cart[last_view], fav[last_view] = True, True, False
    has_cart = np.bincount(v_sess, weights=cart, minlength=S) > 0
    buy = has_cart & (rng.random(S) < w.p_buy[u]) & (st.suppress_until[u] < d)
    buy |= is_forced
    for k, v in (("user", u), ("day", np.full(S, d)), ("ms", ms), ("views", views),
                 ("buy", buy), ("click", click), ("cart", cart), ("fav", fav)):
        st.sessions[k].append(v)
    return u, buy
