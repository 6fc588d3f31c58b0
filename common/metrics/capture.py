"""Capture and the value-vs-budget curve: how much of the achievable gain a policy takes.

Both need the true value of every action for every row (``truth``, [N, A] P(re-engage |
action)), which only a synthetic log has; on a real log neither is defined and callers
leave them out (they never fall back to an off-policy estimate).

Values are *net* when ``value`` and ``costs`` are given: ``value * P(a) - cost_a`` per
row, as in :func:`common.metrics.policy.policy_report`; otherwise plain ``P(a)``.

Capture::

    capture = (V(policy) - V(best single action)) / (V(oracle) - V(best single action))

over the same rows, where a single action treats every row alike (``none`` included)
and the oracle takes each row's best action. 1 = every achievable gain, 0 = no better
than the best action for everyone, negative = worse. It is ``nan`` when the oracle is
no better than the best single action (nothing to capture: the denominator is 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from common.metrics.arrays import NAN, same_length, vector

#: Below this gap between the oracle and the best single action capture is undefined.
CAPTURE_TOLERANCE = 1e-12
NO_GAIN_NOTE = ("capture undefined: the oracle is no better than the best single action "
                "on these rows (nothing to capture)")


def capture(policy: float, best_single: float, oracle: float) -> float:
    """``(policy - best_single) / (oracle - best_single)``; ``nan`` when any is not
    finite or ``oracle - best_single <= CAPTURE_TOLERANCE``."""
    values = np.array([policy, best_single, oracle], dtype=float)
    if not np.all(np.isfinite(values)) or oracle - best_single <= CAPTURE_TOLERANCE:
        return NAN
    return float((policy - best_single) / (oracle - best_single))


def row_values(truth: Any, value: float | None = None, costs: Any | None = None) -> np.ndarray:
    """[N, A] value of each action per row: ``value * truth - costs`` or ``truth``."""
    tr = np.asarray(truth, dtype=float)
    if tr.ndim != 2:
        raise ValueError(f"truth: expected shape [N, A], got {tr.shape}")
    if (value is None) != (costs is None):
        raise ValueError("value and costs: give both for net values, or neither")
    if value is None:
        return tr
    cost = np.asarray(costs, dtype=float)
    if cost.shape != (tr.shape[1],):
        raise ValueError(f"costs: expected shape ({tr.shape[1]},), got {cost.shape}")
    return value * tr - cost


def capture_values(chosen: Any, truth: Any, actions: Sequence[str], value: float | None = None,
                   costs: Any | None = None) -> dict[str, Any]:
    """Capture of the policy ``chosen`` ([N] action indices) with what it rests on.

    Returns ``capture``, ``policy``, ``best_single`` (its value), ``best_single_action``,
    ``oracle``, ``rows`` and ``note`` ("" unless capture is undefined).
    """
    c = vector("chosen", chosen, dtype=int)
    v = row_values(truth, value, costs)
    same_length(chosen=c, truth=v)
    if v.shape[1] != len(actions):
        raise ValueError(f"truth: {v.shape[1]} columns for {len(actions)} actions")
    if np.any((c < 0) | (c >= len(actions))):
        raise ValueError(f"chosen: action index out of range for {len(actions)} actions")
    if len(c) == 0:
        return {"capture": NAN, "policy": NAN, "best_single": NAN, "best_single_action": "",
                "oracle": NAN, "rows": 0, "note": "capture undefined: no rows"}
    single = v.mean(axis=0)
    best = int(np.argmax(single))
    out: dict[str, Any] = {"policy": float(v[np.arange(len(c)), c].mean()),
                           "best_single": float(single[best]),
                           "best_single_action": actions[best],
                           "oracle": float(v.max(axis=1).mean()), "rows": len(c)}
    out["capture"] = capture(out["policy"], out["best_single"], out["oracle"])
    out["note"] = NO_GAIN_NOTE if np.isnan(out["capture"]) else ""
    return out


def budget_curve(order: Any, action: Any, truth: Any, actions: Sequence[str], *,
                 value: float | None = None, costs: Any | None = None,
                 points: int = 101) -> dict[str, Any]:
    """Value per row against the share of rows treated, for a policy and references.

    Parameters
    ----------
    order : row indices the policy would treat, best first (``common.policy.treatment_order``:
        rows with a positive expected gain by expected gain, cost-aware); at budget ``k``
        the first ``k`` get their ``action``, every other row gets ``actions[0]`` (none).
    action : [N] the action index each row gets when treated.
    truth : [N, A] true P(re-engage | action).
    points : budgets on an even grid of shares ``0 .. 1`` (``k = round(share * N)``).

    Returns
    -------
    ``share`` (treated rows / N), ``policy`` (its value per row at each budget),
    ``oracle`` (treating the rows with the largest true gain first, each with its best
    action; non-decreasing), ``single`` (random rows with the best single treatment,
    the expected value: a straight line), ``single_action``, ``treated`` (rows the policy
    would treat without a budget) and ``rows``.
    """
    v = row_values(truth, value, costs)
    n = len(v)
    a = vector("action", action, dtype=int)
    ranked = vector("order", order, dtype=int)
    same_length(action=a, truth=v)
    if v.shape[1] != len(actions) or len(actions) < 2:
        raise ValueError(f"truth: {v.shape[1]} columns for {len(actions)} actions (>= 2)")
    if np.any((ranked < 0) | (ranked >= n)) or len(np.unique(ranked)) != len(ranked):
        raise ValueError("order: expected distinct row indices in [0, N)")
    if np.any((a < 0) | (a >= len(actions))):
        raise ValueError(f"action: index out of range for {len(actions)} actions")
    if points < 2:
        raise ValueError("points: expected at least 2")
    rows = np.arange(n)
    base = v[:, 0].sum()
    gain = v[rows, a] - v[:, 0]
    policy = base + np.r_[0.0, np.cumsum(gain[ranked])]  # after k treated, k = 0..len
    best_gain = v[:, 1:].max(axis=1) - v[:, 0]
    oracle = base + np.r_[0.0, np.cumsum(np.sort(best_gain[best_gain > 0])[::-1])]
    single_action = 1 + int(np.argmax(v[:, 1:].mean(axis=0))) if n else 1
    single_gain = float((v[:, single_action] - v[:, 0]).mean()) if n else NAN
    share = np.linspace(0.0, 1.0, points)
    k = np.rint(share * n).astype(int)
    per_row = 1.0 / n if n else NAN
    return {
        "share": share.tolist(),
        "policy": (policy[np.minimum(k, len(ranked))] * per_row).tolist(),
        "oracle": (oracle[np.minimum(k, len(oracle) - 1)] * per_row).tolist(),
        "single": (base * per_row + share * single_gain).tolist(),
        "single_action": actions[single_action],
        "treated": len(ranked),
        "rows": n,
    }
