"""Sessions to events: the funnel of each view, items, prices and millisecond times."""

from __future__ import annotations

import numpy as np

from simulations.synth.clock import DAY_MS
from simulations.synth.config import SynthConfig
from simulations.synth.world import World

_PREF_QUANTILES = 256  # resolution of the table users' categories are drawn from
# Gap before an event in ms, min + Exp(mean) capped, by event type: view (after the
# previous item's funnel), click, cart, favorite, purchase (checkout ends the session).
_GAPS_MS = np.array([
    [2_000, 1_000, 1_000, 1_000, 5_000],  # min
    [40_000, 8_000, 15_000, 15_000, 60_000],  # mean of the exponential part
    [180_000, 60_000, 60_000, 60_000, 300_000],  # cap
], dtype=np.float32)


def expand_events(cfg: SynthConfig, w: World, s: dict[str, np.ndarray],
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Turn sessions into ordered funnel events with items, categories, prices and times.

    Parameters
    ----------
    cfg, w : the configuration and the world the sessions were simulated in.
    s : :attr:`History.sessions <simulations.synth.behaviour.History>`.
    rng : drawn from after the day loop.

    Returns
    -------
    Per event, in session order: ``user``, ``ts_ms`` (since the start), ``event`` (code
    in ``EVENT_TYPES``), ``item`` and ``cat`` (indices), ``value`` (price of a purchase,
    else 0).
    """
    n_views, buy = s["views"], s["buy"]
    S, V = len(n_views), len(s["click"])
    view_sess = np.repeat(np.arange(S), n_views)
    view_user = s["user"][view_sess]
    click, cart, fav = s["click"], s["cart"], s["fav"]

    # Category by the user's preference, read from a per-user table of its quantiles
    # (resolution 1 / _PREF_QUANTILES): a gather instead of a search per view.
    K = cfg.items_per_category
    N, C = w.pref.shape
    bounds = np.rint(np.cumsum(w.pref, axis=1) * _PREF_QUANTILES).astype(np.int64)
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
    del p, block_start  # the peak is a few arrays an event: free each once used
    e_sess = view_sess[e_view]
    e_item = np.where(etype == 4, buy_item[e_sess], item[e_view])
    del e_view, item, cat, buy_item

    first = np.cumsum(k) - k  # each view's first event
    first = first[view_start]
    lo, mean, cap = _GAPS_MS[:, etype]
    gap = np.minimum(lo + mean * rng.standard_exponential(len(etype), dtype=np.float32), cap)
    del lo, mean, cap
    csum = np.cumsum(gap.astype(np.int64))
    del gap
    offset = csum - csum[first][e_sess]
    del csum
    ts_ms = s["day"][e_sess] * DAY_MS + s["ms"][e_sess] + offset
    value = np.zeros(len(etype))
    bought = np.flatnonzero(etype == 4)
    value[bought] = w.item_price[e_item[bought]]
    return {
        "user": s["user"][e_sess], "ts_ms": ts_ms, "event": etype, "item": e_item,
        "cat": e_item // K,
        "value": value,
    }
