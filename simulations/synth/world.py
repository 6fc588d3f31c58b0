"""The world a simulation starts from: merchants, users and their latent traits.

Every merchant is a shop with its own size (lognormal, a long tail of small shops) and
its own category mix (Dirichlet(alpha): small alpha = non-IID shards). Users are drawn
around their shop's mix, each with a personal interest half-life, session rate, price
sensitivity and push affinity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulations.synth.config import SynthConfig


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def logit(p: np.ndarray | float) -> np.ndarray:
    return np.log(p) - np.log1p(-np.asarray(p))


@dataclass(frozen=True)
class World:
    """Latent state of ``M`` merchants, ``N`` users, ``C`` categories and their items.

    Users are numbered merchant by merchant: user ``i`` belongs to ``merchant[i]``.

    Attributes
    ----------
    sizes : [M] users per merchant.
    mix : [M, C] the merchant's category mix.
    decay_mult : [M] multiplier of its users' half-lives.
    merchant : [N] the user's merchant.
    pref : [N, C] the user's category preferences (rows sum to 1).
    half_life : [N] half-life of the user's interest, in days.
    rate : [N] sessions per day at interest 1.
    price_sens, push_aff : [N] latent responsiveness to coupons and pushes.
    p_click, p_fav, p_buy : [N] funnel probabilities: a view is clicked, a click not
        carted becomes a favourite, a session with a cart buys.
    join_day, churn_day : [N] first day active, first day churned.
    interest0 : [N] interest on the first day.
    item_price : [C * items_per_category] price of each item, category-major.
    """

    sizes: np.ndarray
    mix: np.ndarray
    decay_mult: np.ndarray
    merchant: np.ndarray
    pref: np.ndarray
    half_life: np.ndarray
    rate: np.ndarray
    price_sens: np.ndarray
    push_aff: np.ndarray
    p_click: np.ndarray
    p_fav: np.ndarray
    p_buy: np.ndarray
    join_day: np.ndarray
    churn_day: np.ndarray
    interest0: np.ndarray
    item_price: np.ndarray


def draw_world(cfg: SynthConfig, rng: np.random.Generator) -> World:
    """Draw merchants, users and their latent traits; the first draws from ``rng``."""
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
    p_click = sigmoid(logit(0.3) + 0.4 * push_aff + 0.3 * z[:, 5])
    p_fav = sigmoid(logit(0.25) + 0.6 * price_sens)
    p_buy = sigmoid(logit(0.5) - 0.6 * price_sens + 0.3 * rng.standard_normal(N))

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
    return World(
        sizes=sizes, mix=mix, decay_mult=decay_mult, merchant=merchant, pref=pref,
        half_life=half_life, rate=rate, price_sens=price_sens, push_aff=push_aff,
        p_click=p_click, p_fav=p_fav, p_buy=p_buy, join_day=join_day, churn_day=churn_day,
        interest0=interest0, item_price=item_price.ravel(),
    )
