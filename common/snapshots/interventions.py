"""The logged interventions matched to the snapshots that received them."""

from __future__ import annotations

import numpy as np
import pandas as pd

from common.config import SnapshotConfig
from common.features import DAY, SortedLog
from common.schema import EVENT_TYPES, DataError
from common.snapshots.container import Snapshots


def attach_interventions(snaps: Snapshots, user_codes: np.ndarray, lg: SortedLog,
                         interventions: pd.DataFrame, config: SnapshotConfig) -> tuple[int, int]:
    """Fill action / activation / propensity of snapshots that received an intervention.

    An intervention belongs to the same user's latest snapshot at or before it, within
    ``intervention-window-days``; the first one counts. Returns (interventions with no
    such snapshot, interventions whose response window runs past the end of the log).
    """
    merchant = (interventions["merchant_id"].astype(str).to_numpy(dtype=object)
                if "merchant_id" in interventions
                else np.full(len(interventions), "local", dtype=object))
    pair = pd.MultiIndex.from_arrays(
        [merchant, interventions["user_id"].astype(str).to_numpy(dtype=object)])
    lookup = pd.MultiIndex.from_arrays([lg.merchant_ids, lg.user_ids])
    code = lookup.get_indexer(pair).astype(np.int64)
    t_int = (pd.DatetimeIndex(interventions["timestamp"]) - lg.t0).total_seconds().to_numpy()
    action, prop = actions_and_propensities(interventions, list(config.actions))

    window = config.intervention_window_days * DAY
    response = config.response_days * DAY
    snap_sec = (snaps.cutoff - lg.t0.tz_localize(None).to_datetime64()) / np.timedelta64(1, "s")
    snap_key = user_codes * lg.span + np.round(snap_sec).astype(np.int64)
    order = np.argsort(snap_key)
    sorted_key = snap_key[order]
    # An intervention belongs to the same user's latest cutoff T <= t with t < T + window.
    known = code >= 0
    probe = code * lg.span + np.floor(t_int).astype(np.int64)
    pos = np.searchsorted(sorted_key, probe, side="right") - 1
    ok = known & (pos >= 0)
    pos = np.where(ok, pos, 0)
    ok &= (sorted_key[pos] // lg.span == code) & (probe - sorted_key[pos] < window)
    observed = t_int + response <= lg.t_end + 1
    matched = ok & observed
    # Keep the first intervention per snapshot.
    rows = order[pos[matched]]
    first_idx = np.argsort(t_int[matched], kind="stable")
    rows_sorted = rows[first_idx]
    _, keep = np.unique(rows_sorted, return_index=True)
    chosen = np.flatnonzero(matched)[first_idx][keep]
    target_rows = rows_sorted[keep]

    snaps.action[target_rows] = action[chosen]
    snaps.activation[target_rows] = _reengaged(lg, code[chosen], t_int[chosen], response,
                                               config).astype(np.float32)
    snaps.propensity[target_rows] = prop[chosen].astype(np.float32)
    snaps.intervention[target_rows] = chosen
    unobserved = int((ok & ~observed).sum())
    unmatched = int((~ok).sum())
    return unmatched, unobserved


def actions_and_propensities(interventions: pd.DataFrame, actions: list[str]
                              ) -> tuple[np.ndarray, np.ndarray]:
    """Each intervention's action index and logging propensity; a missing or invalid
    propensity is the action's share of all interventions."""
    action = pd.Index(actions).get_indexer(interventions["action"].astype(str))
    if (action < 0).any():
        bad = sorted(set(interventions["action"].astype(str)[action < 0]))[:5]
        raise DataError(f"interventions: unknown action(s) {bad}; configured actions: {actions}")
    prop = interventions["propensity"].to_numpy(dtype=np.float64, na_value=np.nan) \
        if "propensity" in interventions else np.full(len(interventions), np.nan)
    shares = np.bincount(action, minlength=len(actions)) / max(len(action), 1)
    return action, np.where(np.isfinite(prop) & (prop > 0), prop, shares[action])


def _reengaged(lg: SortedLog, code: np.ndarray, t_int: np.ndarray, response: float,
               config: SnapshotConfig) -> np.ndarray:
    """Whether each user ``code`` had a qualifying event in ``(t_int, t_int + response]``."""
    engage = lg.event == EVENT_TYPES.index("purchase") if config.reengage_event == "purchase" \
        else np.ones(len(lg.event), dtype=bool)
    ekey = lg.key[engage]
    lo = np.searchsorted(ekey, code * lg.span + np.floor(t_int).astype(np.int64), side="right")
    hi = np.searchsorted(ekey, code * lg.span + np.floor(t_int + response).astype(np.int64),
                         side="right")
    return hi > lo
