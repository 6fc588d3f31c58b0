"""Simulate a federation and lay it out as the five frames of :class:`Federation`."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from common.schema import EVENT_DTYPE, STRING, action_dtype
from simulations.synth.behaviour import History, simulate
from simulations.synth.clock import DAY_MS, start_ns, timestamps
from simulations.synth.config import SynthConfig
from simulations.synth.events import expand_events
from simulations.synth.federation import Federation
from simulations.synth.world import World, draw_world

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class _Ids:
    """The string ids of merchants, users, categories and items, by index."""

    merchants: list[str]
    users: list[str]
    categories: list[str]
    items: list[str]

    @classmethod
    def of(cls, cfg: SynthConfig, w: World) -> _Ids:
        merchant_ids = _ids("m", cfg.num_merchants)
        width = len(str(max(w.sizes) - 1))
        local = np.arange(len(w.merchant)) - np.repeat(np.cumsum(w.sizes) - w.sizes, w.sizes)
        user_ids = [f"{merchant_ids[m]}-u{i:0{width}d}"
                    for m, i in zip(w.merchant, local, strict=True)]
        cat_ids = _ids("c", cfg.num_categories)
        item_width = len(str(cfg.items_per_category - 1))
        item_ids = [f"{c}-i{j:0{item_width}d}"
                    for c in cat_ids for j in range(cfg.items_per_category)]
        return cls(merchant_ids, user_ids, cat_ids, item_ids)


def generate_federation(config: SynthConfig, seed: int) -> Federation:
    """Simulate a federation; equal ``(config, seed)`` give identical frames.

    Parameters
    ----------
    config : the federation to simulate.
    seed : seeds the one generator every random draw comes from, in a fixed order
        (world, day loop, events).

    Returns
    -------
    The five frames; ``truth`` holds the exact response probabilities of every action.
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    w = draw_world(config, rng)
    history = simulate(config, w, rng)
    ev = expand_events(config, w, history.sessions, rng)
    ids = _Ids.of(config, w)
    start = start_ns(config)
    users, merchants = _population_frames(config, w, history, ev, ids)
    n_events = len(ev["user"])
    events = _events_frame(ev, w, ids, start)  # takes the arrays out of ev
    interventions, truth = _intervention_frames(config, history.interventions, w, ids, start)
    log.info("synthetic federation: %s merchants, %s users, %s events in %.2f s (seed %s)",
             config.num_merchants, len(w.merchant), n_events, time.perf_counter() - t0,
             seed)
    return Federation(events, interventions, truth, users, merchants)


def _events_frame(ev: dict[str, np.ndarray], w: World, ids: _Ids, start: int) -> pd.DataFrame:
    """The event log in the loader's schema, sorted by merchant, user and time.

    Each array is taken out of ``ev`` as its column is made, so the arrays and the
    frame are not both held whole."""
    # Users are numbered by (merchant, local id), so one key sorts by merchant, user, time.
    shift = max(int(ev["ts_ms"].max(initial=0)).bit_length(), 1)
    order = np.argsort((ev["user"] << shift) | ev["ts_ms"], kind="stable")

    def take(name: str) -> np.ndarray:
        return ev.pop(name)[order]

    eu = take("user")
    columns = {
        "user_id": _strings(ids.users, eu),
        "timestamp": timestamps(start, take("ts_ms")),
        "event": pd.Categorical.from_codes(take("event"), dtype=EVENT_DTYPE),
        "item_id": _strings(ids.items, take("item")),
        "category_id": _strings(ids.categories, take("cat")),
        "merchant_id": _strings(ids.merchants, w.merchant[eu]),
    }
    del eu
    columns["value"] = take("value")
    return pd.DataFrame(columns, copy=False)


def _intervention_frames(cfg: SynthConfig, iv: dict[str, np.ndarray], w: World, ids: _Ids,
                         start: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``interventions`` and their ``truth``, row for row, by user and time."""
    iorder = np.lexsort((iv["day"], iv["user"]))
    iu = iv["user"][iorder]
    its = timestamps(start, iv["day"][iorder] * DAY_MS + iv["ms"][iorder])
    action = iv["action"][iorder]
    interventions = pd.DataFrame({
        "user_id": _strings(ids.users, iu),
        "timestamp": its,
        "action": pd.Categorical.from_codes(action, dtype=action_dtype(cfg.actions)),
        "propensity": np.asarray(cfg.propensities, dtype=float)[action],
        "merchant_id": _strings(ids.merchants, w.merchant[iu]),
    })
    truth = pd.DataFrame({
        "merchant_id": interventions["merchant_id"],
        "user_id": interventions["user_id"],
        "timestamp": its,
        **{f"p_{a}": iv["p"][iorder, j] for j, a in enumerate(cfg.actions)},
        "reengaged": iv["y"][iorder].astype(bool),
    })
    return interventions, truth


def _population_frames(cfg: SynthConfig, w: World, history: History, ev: dict[str, np.ndarray],
                       ids: _Ids) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``users`` and ``merchants`` frames: latent traits and what they did."""
    N, M = len(w.merchant), cfg.num_merchants
    n_events = np.bincount(ev["user"], minlength=N)
    n_buys = np.bincount(ev["user"], weights=ev["event"] == 4, minlength=N).astype(np.int64)
    pref = w.pref
    users = pd.DataFrame({
        "merchant_id": _strings(ids.merchants, w.merchant),
        "user_id": pd.Series(ids.users, dtype=STRING),
        "join_day": w.join_day,
        "churn_day": np.minimum(history.churn_day, np.iinfo(np.int32).max),
        "half_life_days": w.half_life,
        "sessions_per_day": w.rate,
        "price_sensitivity": w.price_sens,
        "push_affinity": w.push_aff,
        "top_category": _strings(ids.categories, pref.argmax(axis=1)),
        "top_category_share": pref.max(axis=1),
        "preference_entropy": _entropy(pref),
        "click_prob": w.p_click,
        "buy_prob": w.p_buy,
        "initial_interest": w.interest0,
        "final_interest": history.interest,
        "events": n_events,
        "purchases": n_buys,
    })
    merchants = pd.DataFrame({
        "merchant_id": pd.Series(ids.merchants, dtype=STRING),
        "users": w.sizes,
        "events": np.bincount(w.merchant, weights=n_events, minlength=M).astype(np.int64),
        "purchases": np.bincount(w.merchant, weights=n_buys, minlength=M).astype(np.int64),
        "interventions": np.bincount(w.merchant[history.interventions["user"]], minlength=M),
        "category_entropy": _entropy(w.mix),
        "top_category": _strings(ids.categories, w.mix.argmax(axis=1)),
        "top_category_share": w.mix.max(axis=1),
        "decay_multiplier": w.decay_mult,
    })
    return users, merchants


def benchmark(config: SynthConfig, seed: int = 0, repeat: int = 3) -> dict[str, float]:
    """Time :func:`generate_federation`, best of ``repeat`` runs.

    Returns
    -------
    ``events`` (generated), ``seconds`` (the best run) and ``events_per_s``.
    """
    best, n = math.inf, 0
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fed = generate_federation(config, seed)
        best = min(best, time.perf_counter() - t0)
        n = len(fed.events)
    return {"events": n, "seconds": best, "events_per_s": n / best if best > 0 else math.inf}
