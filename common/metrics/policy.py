"""Policy values: off-policy estimates (IPS, SNIPS) from the log, and the true value.

An off-policy estimate is only as good as the log's overlap with the policy: every
estimate comes with the rows it rests on (``logged``, ``matched``) and a seeded
bootstrap interval over the logged rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from common.metrics.arrays import NAN, same_length, vector
from common.metrics.capture import capture
from common.schema import DEFAULT_ACTIONS


def _off_policy(pi_logged: np.ndarray, logged: np.ndarray, outcome: np.ndarray,
                propensity: np.ndarray) -> tuple[float, float]:
    """IPS and SNIPS with weights ``pi(logged | x) / propensity`` on rows with a log."""
    rows = logged >= 0
    if not rows.any():
        return NAN, NAN
    p = propensity[rows]
    if not np.all((p > 0) & (p <= 1)):
        raise ValueError("propensity: expected values in (0, 1] on every logged row")
    w = pi_logged[rows] / p
    wy = w * outcome[rows]
    ips = float(wy.mean())
    snips = float(wy.sum() / w.sum()) if w.sum() > 0 else NAN
    return ips, snips


def bootstrap_off_policy(pi_logged: np.ndarray, logged: np.ndarray, outcome: np.ndarray,
                         propensity: np.ndarray, *, seed: int = 0, draws: int = 200,
                         level: float = 0.95) -> dict[str, float]:
    """Percentile bootstrap interval of IPS and SNIPS, resampling the logged rows.

    Returns ``ips_low``, ``ips_high``, ``snips_low``, ``snips_high`` (``nan`` without a
    logged row a policy agrees with). The same ``seed`` draws the same resamples for
    every policy, so the intervals of two policies are paired.
    """
    rows = np.flatnonzero(logged >= 0)
    w = pi_logged[rows] / propensity[rows]
    if len(rows) == 0 or not np.any(w > 0):
        return {"ips_low": NAN, "ips_high": NAN, "snips_low": NAN, "snips_high": NAN}
    wy = w * outcome[rows]
    n = len(rows)
    rng = np.random.default_rng(seed)
    ips, snips = np.empty(draws), np.full(draws, np.nan)
    for b in range(draws):
        pick = rng.integers(0, n, n)
        total = w[pick].sum()
        ips[b] = wy[pick].sum() / n
        if total > 0:
            snips[b] = wy[pick].sum() / total
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(ips, [tail, 100 - tail])
    s_low, s_high = (np.nanpercentile(snips, [tail, 100 - tail]) if np.isfinite(snips).any()
                     else (NAN, NAN))
    return {"ips_low": float(low), "ips_high": float(high), "snips_low": float(s_low),
            "snips_high": float(s_high)}


def _logged_arrays(chosen: Any, logged: Any, outcome: Any, propensity: Any
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    c = vector("chosen", chosen, dtype=int)
    lg = vector("logged", logged, dtype=int)
    y = vector("outcome", outcome)
    p = vector("propensity", propensity)
    same_length(chosen=c, logged=lg, outcome=y, propensity=p)
    return c, lg, y, p


def ips_value(chosen: Any, logged: Any, outcome: Any, propensity: Any) -> float:
    """Inverse-propensity estimate ``mean(1[chosen == logged] * outcome / propensity)``.

    Rows with ``logged == -1`` (no intervention logged) carry no evidence and are left
    out. ``nan`` when no row is logged.
    """
    c, lg, y, p = _logged_arrays(chosen, logged, outcome, propensity)
    return _off_policy((c == lg).astype(float), lg, y, p)[0]


def snips_value(chosen: Any, logged: Any, outcome: Any, propensity: Any) -> float:
    """Self-normalised IPS: ``sum(w * outcome) / sum(w)``, ``w = 1[chosen == logged] / p``.

    ``nan`` when the policy never agrees with the log.
    """
    c, lg, y, p = _logged_arrays(chosen, logged, outcome, propensity)
    return _off_policy((c == lg).astype(float), lg, y, p)[1]


def policy_value_truth(chosen: Any, truth: Any) -> float:
    """True value ``mean(truth[i, chosen[i]])`` given synthetic P(re-engage | action)."""
    c = vector("chosen", chosen, dtype=int)
    tr = np.asarray(truth, dtype=float)
    if tr.ndim != 2:
        raise ValueError(f"truth: expected shape [N, A], got {tr.shape}")
    same_length(chosen=c, truth=tr)
    if len(c) == 0:
        return NAN
    return float(tr[np.arange(len(c)), c].mean())


def policy_report(
    chosen: Any,
    logged: Any,
    outcome: Any,
    propensity: Any,
    truth: Any | None = None,
    actions: Sequence[str] = DEFAULT_ACTIONS,
    value: float | None = None,
    costs: Any | None = None,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Value of a policy and of the comparison policies, in re-engagement probability.

    Policies: ``policy`` (``chosen``), ``random`` (uniform over the actions; its value
    is the exact expectation, both for the truth and for IPS/SNIPS with weights
    ``(1/A) / propensity``) and ``always_<a>`` for every action; with ``truth`` also
    ``oracle`` (row-wise best action).

    Each entry holds ``ips`` and ``snips`` (rows with ``logged == -1`` left out) and,
    with ``truth``, ``truth``, ``regret`` (oracle minus this policy) and ``capture``
    (:mod:`common.metrics.capture`, on the net true values when they are given: 0 for
    the best ``always_<a>``, 1 for the oracle, ``nan`` when the two are equal). When ``value``
    and ``costs`` ([A], cost per action; both or neither) are given, ``net_ips``,
    ``net_snips`` and, with truth, ``net_truth`` and ``net_regret`` are added, where
    net = ``value * P - mean cost of the actions taken`` (over the rows the estimate
    uses). The oracle's net value is that of the row-wise best *net* action, so it
    can differ from the action maximising P. The oracle has no IPS/SNIPS (``nan``).

    Each entry also says what its estimates rest on: ``logged`` (rows with a logged
    action), ``matched`` (logged rows the policy could have chosen the logged action
    on; 0 = no overlap, the estimates mean nothing) and a 95 % bootstrap interval
    (``ips_low`` ... ``snips_high``, and ``net_*`` ones with net values; ``seed``).
    """
    c, lg, y, p = _logged_arrays(chosen, logged, outcome, propensity)
    n_actions = len(actions)
    tr = None
    if truth is not None:
        tr = np.asarray(truth, dtype=float)
        if tr.shape != (len(c), n_actions):
            raise ValueError(f"truth: expected shape {(len(c), n_actions)}, got {tr.shape}")
    if (value is None) != (costs is None):
        raise ValueError("value and costs: give both for net values, or neither")
    net = value is not None
    worth = 0.0 if value is None else value  # of one re-engagement, for the net values
    cost = np.zeros(n_actions)
    if net:
        cost = np.asarray(costs, dtype=float)
        if cost.shape != (n_actions,):
            raise ValueError(f"costs: expected shape ({n_actions},), got {cost.shape}")
    for name, arr in (("chosen", c), ("logged", lg)):
        if np.any(arr >= n_actions) or np.any(arr < (0 if name == "chosen" else -1)):
            raise ValueError(f"{name}: action index out of range for {n_actions} actions")
    has_log = lg >= 0
    rows = np.arange(len(c))

    def entry(pi_logged: np.ndarray, mean_cost_log: float, true_value: float,
              mean_cost_all: float) -> dict[str, float]:
        ips, snips = _off_policy(pi_logged, lg, y, p)
        out = {"ips": ips, "snips": snips, "logged": int(has_log.sum()),
               "matched": int(np.count_nonzero(pi_logged[has_log] > 0))}
        interval = bootstrap_off_policy(pi_logged, lg, y, p, seed=seed)
        out.update(interval)
        if tr is not None:
            out["truth"] = true_value
        if net:
            out["net_ips"] = worth * ips - mean_cost_log
            out["net_snips"] = worth * snips - mean_cost_log
            for key, bound in interval.items():
                out[f"net_{key}"] = worth * bound - mean_cost_log
            if tr is not None:
                out["net_truth"] = worth * true_value - mean_cost_all
        return out

    def mean(x: np.ndarray) -> float:
        return float(x.mean()) if len(x) else NAN

    def deterministic(choice: np.ndarray) -> dict[str, float]:
        true_value = mean(tr[rows, choice]) if tr is not None else NAN
        return entry((choice == lg).astype(float), mean(cost[choice][has_log]), true_value,
                     mean(cost[choice]))

    report: dict[str, dict[str, float]] = {"policy": deterministic(c)}
    report["random"] = entry(
        np.full(len(c), 1.0 / n_actions), float(cost.mean()),
        mean(tr.mean(axis=1)) if tr is not None else NAN, float(cost.mean()),
    )
    for j, name in enumerate(actions):
        report[f"always_{name}"] = deterministic(np.full(len(c), j))
    if tr is not None:
        oracle = {"ips": NAN, "snips": NAN, "truth": mean(tr.max(axis=1)),
                  "logged": int(has_log.sum()), "matched": 0}
        if net:
            oracle["net_ips"] = oracle["net_snips"] = NAN
            oracle["net_truth"] = mean((worth * tr - cost).max(axis=1))
        for entry_ in report.values():
            entry_["regret"] = oracle["truth"] - entry_["truth"]
            if net:
                entry_["net_regret"] = oracle["net_truth"] - entry_["net_truth"]
        oracle["regret"] = 0.0
        if net:
            oracle["net_regret"] = 0.0
        report["oracle"] = oracle
        _add_capture(report, actions, "net_truth" if net else "truth")
    return report


def _add_capture(report: dict[str, dict[str, float]], actions: Sequence[str], key: str
                 ) -> None:
    """``capture`` of every entry on ``key`` (:func:`common.metrics.capture.capture`),
    against the best ``always_<a>`` and the oracle."""
    best = max(report[f"always_{a}"][key] for a in actions)
    for entry_ in report.values():
        entry_["capture"] = capture(entry_[key], best, report["oracle"][key])
