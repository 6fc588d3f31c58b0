"""Evaluation metrics for the decay, interest and activation heads and the policy.

Arrays in, plain Python floats and dicts out, so every result can go straight into
``metrics.jsonl``. A metric that is undefined on the data at hand (one class only, no
control rows, an empty merchant) is ``nan``; it never raises. Shape errors do raise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    log_loss,
    mean_absolute_error,
    mean_squared_error,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
)

from common.schema import DEFAULT_ACTIONS

NAN = float("nan")


def _vector(name: str, x: Any, dtype: Any = float) -> np.ndarray:
    arr = np.asarray(x, dtype=dtype)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {arr.shape}")
    return arr


def _same_length(**arrays: np.ndarray) -> int:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"arrays must have equal length, got {lengths}")
    return next(iter(lengths.values()))


def _two_classes(y: np.ndarray) -> bool:
    return len(y) > 0 and 0 < y.sum() < len(y)


# --------------------------------------------------------------------------- decay


def choose_threshold(y_true: Any, p: Any, default: float = 0.5) -> float:
    """Threshold on ``p`` maximising F1 (predict positive when ``p >= threshold``).

    The candidates are the distinct scores; among equally good ones the highest wins.
    Returns ``default`` when ``y_true`` has no positive (F1 is undefined everywhere).
    """
    y = _vector("y_true", y_true)
    s = _vector("p", p)
    _same_length(y_true=y, p=s)
    if len(y) == 0 or y.sum() == 0:
        return float(default)
    precision, recall, thresholds = precision_recall_curve(y, s)
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = np.flatnonzero(f1 == f1.max())
    return float(thresholds[best].max())


def top_decile_lift(y_true: Any, p: Any, fraction: float = 0.1) -> float:
    """Positive rate among the top ``fraction`` of rows by ``p``, over the base rate.

    The top set holds ``ceil(fraction * n)`` rows. Scores tied at the cut count
    fractionally (the expected rate under random tie-breaking), so the result does not
    depend on row order. ``nan`` when empty or without positives.
    """
    y = _vector("y_true", y_true)
    s = _vector("p", p)
    n = _same_length(y_true=y, p=s)
    if n == 0 or y.sum() == 0:
        return NAN
    k = max(1, math.ceil(fraction * n))
    cut = np.sort(s)[::-1][k - 1]
    above, tied = s > cut, s == cut
    positives = y[above].sum() + y[tied].mean() * (k - above.sum())
    return float((positives / k) / y.mean())


def decay_metrics(y_true: Any, p: Any, threshold: float = 0.5) -> dict[str, float]:
    """Ranking, calibration and thresholded metrics of the decay head.

    Returns ``roc_auc``, ``pr_auc`` (average precision), ``log_loss``, ``precision``,
    ``recall``, ``f1`` (positive when ``p >= threshold``), ``top_decile_lift``,
    ``positive_rate`` and ``n``. AUCs are ``nan`` with one class only.
    """
    y = _vector("y_true", y_true)
    s = _vector("p", p)
    n = _same_length(y_true=y, p=s)
    out: dict[str, float] = dict.fromkeys(
        ("roc_auc", "pr_auc", "log_loss", "precision", "recall", "f1", "top_decile_lift",
         "positive_rate"), NAN,
    )
    out["n"] = n
    if n == 0:
        return out
    if _two_classes(y):
        out["roc_auc"] = float(roc_auc_score(y, s))
        out["pr_auc"] = float(average_precision_score(y, s))
    out["log_loss"] = float(log_loss(y, np.clip(s, 0.0, 1.0), labels=[0, 1]))
    precision, recall, f1, _ = precision_recall_fscore_support(
        y.astype(int), (s >= threshold).astype(int), average="binary", zero_division=np.nan,
    )
    out.update(precision=float(precision), recall=float(recall), f1=float(f1))
    out["top_decile_lift"] = top_decile_lift(y, s)
    out["positive_rate"] = float(y.mean())
    return out


# ------------------------------------------------------------------------ interest


def interest_metrics(y_true: Any, y_pred: Any) -> dict[str, float]:
    """``mae``, ``rmse`` and ``n`` of the interest head; targets are already ``log1p``."""
    y = _vector("y_true", y_true)
    f = _vector("y_pred", y_pred)
    n = _same_length(y_true=y, y_pred=f)
    if n == 0:
        return {"mae": NAN, "rmse": NAN, "n": 0}
    return {
        "mae": float(mean_absolute_error(y, f)),
        "rmse": float(np.sqrt(mean_squared_error(y, f))),
        "n": n,
    }


# ---------------------------------------------------------------------- activation


def _qini_curve(score: np.ndarray, treated: np.ndarray, outcome: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Points ``(k, Q(k))`` of the Qini curve, starting at ``(0, 0)``.

    Rows tied on the score enter together: the curve has a point only at the end of each
    tie group and is linear in between.
    """
    order = np.argsort(-score, kind="stable")
    s, t, y = score[order], treated[order], outcome[order]
    n_t, n_c = np.cumsum(t), np.cumsum(~t)
    y_t, y_c = np.cumsum(y * t), np.cumsum(y * ~t)
    ratio = np.divide(n_t, n_c, out=np.zeros(len(s)), where=n_c > 0)
    q = y_t - y_c * ratio
    group_end = np.r_[s[1:] != s[:-1], True]
    k = np.arange(1, len(s) + 1)
    return np.r_[0.0, k[group_end]], np.r_[0.0, q[group_end]]


def qini_coefficient(uplift_score: Any, treated: Any, outcome: Any) -> float:
    """Qini coefficient of an uplift ranking, normalised by the perfect ranking.

    Sort users by ``uplift_score`` (descending). After the first ``k`` users let
    ``N_t, N_c`` be the treated / control counts and ``Y_t, Y_c`` their summed
    outcomes. The Qini curve (Radcliffe 2007) is

        Q(k) = Y_t(k) - Y_c(k) * N_t(k) / N_c(k)      (the ratio is 0 while N_c(k) = 0)

    with ``Q(0) = 0``; ties in the score enter as one group. The random line joins
    ``(0, 0)`` and ``(n, Q(n))``. The perfect ranking sorts by ``outcome * (2 t - 1)``:
    treated responders first, control responders last. With areas taken by the
    trapezoidal rule over ``k = 0..n``,

        qini = (area(Q) - area(random)) / (area(Q_perfect) - area(random))

    (as ``scikit-uplift``'s ``qini_auc_score`` with ``negative_effect=True``): 1 for the
    perfect ranking, about 0 for a random one, negative when worse than random.
    ``nan`` without treated or control rows, or when the perfect area equals the random
    one (e.g. no outcome at all).
    """
    s = _vector("uplift_score", uplift_score)
    t = _vector("treated", treated, dtype=bool)
    y = _vector("outcome", outcome)
    _same_length(uplift_score=s, treated=t, outcome=y)
    if t.sum() == 0 or (~t).sum() == 0:
        return NAN
    x, q = _qini_curve(s, t, y)
    random_area = len(s) * q[-1] / 2.0
    xp, qp = _qini_curve(y * np.where(t, 1.0, -1.0), t, y)
    denom = float(np.trapezoid(qp, xp)) - random_area
    if not denom > 0:
        return NAN
    return float((np.trapezoid(q, x) - random_area) / denom)


def activation_metrics(
    scores: Any,
    action: Any,
    outcome: Any,
    actions: Sequence[str] = DEFAULT_ACTIONS,
) -> dict[str, float]:
    """Qini coefficient per non-control action of the activation head.

    Parameters
    ----------
    scores : [N, A] predicted P(re-engage | action); column 0 is the control ``none``.
    action : [N] logged action index, ``-1`` where no intervention was logged.
    outcome : [N] observed re-engagement.
    actions : action names, ``actions[0]`` the control.

    Returns
    -------
    ``qini_<a>`` and ``n_<a>`` (treated rows) per non-control action ``a``, computed on
    the rows logged with ``a`` (treated) or the control (uplift score
    ``scores[:, a] - scores[:, 0]``); ``n_control``; ``qini_mean`` over the defined ones.
    """
    sc = np.asarray(scores, dtype=float)
    a_log = _vector("action", action, dtype=int)
    y = _vector("outcome", outcome)
    if sc.ndim != 2 or sc.shape[1] != len(actions):
        raise ValueError(f"scores: expected shape [N, {len(actions)}], got {sc.shape}")
    _same_length(scores=sc, action=a_log, outcome=y)
    control = a_log == 0
    out: dict[str, float] = {"n_control": int(control.sum())}
    defined: list[float] = []
    for j, name in enumerate(actions[1:], start=1):
        rows = control | (a_log == j)
        qini = qini_coefficient(sc[rows, j] - sc[rows, 0], a_log[rows] == j, y[rows])
        out[f"qini_{name}"] = qini
        out[f"n_{name}"] = int((a_log == j).sum())
        if not math.isnan(qini):
            defined.append(qini)
    out["qini_mean"] = float(np.mean(defined)) if defined else NAN
    return out


# -------------------------------------------------------------------------- policy


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


def _logged_arrays(chosen: Any, logged: Any, outcome: Any, propensity: Any
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    c = _vector("chosen", chosen, dtype=int)
    lg = _vector("logged", logged, dtype=int)
    y = _vector("outcome", outcome)
    p = _vector("propensity", propensity)
    _same_length(chosen=c, logged=lg, outcome=y, propensity=p)
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
    c = _vector("chosen", chosen, dtype=int)
    tr = np.asarray(truth, dtype=float)
    if tr.ndim != 2:
        raise ValueError(f"truth: expected shape [N, A], got {tr.shape}")
    _same_length(chosen=c, truth=tr)
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
) -> dict[str, dict[str, float]]:
    """Value of a policy and of the comparison policies, in re-engagement probability.

    Policies: ``policy`` (``chosen``), ``random`` (uniform over the actions; its value
    is the exact expectation, both for the truth and for IPS/SNIPS with weights
    ``(1/A) / propensity``) and ``always_<a>`` for every action; with ``truth`` also
    ``oracle`` (row-wise best action).

    Each entry holds ``ips`` and ``snips`` (rows with ``logged == -1`` left out) and,
    with ``truth``, ``truth`` and ``regret`` (oracle minus this policy). When ``value``
    and ``costs`` ([A], cost per action; both or neither) are given, ``net_ips``,
    ``net_snips`` and, with truth, ``net_truth`` and ``net_regret`` are added, where
    net = ``value * P - mean cost of the actions taken`` (over the rows the estimate
    uses). The oracle's net value is that of the row-wise best *net* action, so it
    can differ from the action maximising P. The oracle has no IPS/SNIPS (``nan``).
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
        out = {"ips": ips, "snips": snips}
        if tr is not None:
            out["truth"] = true_value
        if net:
            out["net_ips"] = value * ips - mean_cost_log
            out["net_snips"] = value * snips - mean_cost_log
            if tr is not None:
                out["net_truth"] = value * true_value - mean_cost_all
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
        oracle = {"ips": NAN, "snips": NAN, "truth": mean(tr.max(axis=1))}
        if net:
            oracle["net_ips"] = oracle["net_snips"] = NAN
            oracle["net_truth"] = mean((value * tr - cost).max(axis=1))
        for entry_ in report.values():
            entry_["regret"] = oracle["truth"] - entry_["truth"]
            if net:
                entry_["net_regret"] = oracle["net_truth"] - entry_["net_truth"]
        oracle["regret"] = 0.0
        if net:
            oracle["net_regret"] = 0.0
        report["oracle"] = oracle
    return report


# ---------------------------------------------------------------------- federation


def per_merchant(
    merchant_ids: Any,
    fn: Callable[..., Mapping[str, float] | float],
    *arrays: Any,
    min_rows: int = 20,
    **kwargs: Any,
) -> dict[str, dict[str, float]]:
    """Apply ``fn(*arrays_of_group, **kwargs)`` to each merchant's rows.

    Each array is indexed along its first axis. A ``fn`` returning a float is stored
    as ``{"value": x}``. Every entry gets ``n``, the merchant's row count. Merchants
    with fewer than ``min_rows`` rows are not evaluated: their entry has the keys of
    the evaluated merchants set to ``nan``. Keys are the merchant ids as strings,
    sorted.
    """
    ids = np.asarray(merchant_ids, dtype=object).astype(str)
    if ids.ndim != 1:
        raise ValueError(f"merchant_ids: expected a 1-D array, got shape {ids.shape}")
    arrs = [np.asarray(a) for a in arrays]
    for i, a in enumerate(arrs):
        if len(a) != len(ids):
            raise ValueError(
                f"array {i}: expected {len(ids)} rows like merchant_ids, got {len(a)}"
            )
    results: dict[str, dict[str, float]] = {}
    keys: list[str] = []
    skipped: list[str] = []
    for merchant in sorted(set(ids.tolist())):
        mask = ids == merchant
        n = int(mask.sum())
        if n < min_rows:
            results[merchant] = {"n": n}
            skipped.append(merchant)
            continue
        res = fn(*(a[mask] for a in arrs), **kwargs)
        entry = dict(res) if isinstance(res, Mapping) else {"value": float(res)}
        entry["n"] = n
        keys.extend(k for k in entry if k not in keys)
        results[merchant] = entry
    for merchant in skipped:
        results[merchant] = {**dict.fromkeys(keys, NAN), "n": results[merchant]["n"]}
    return results


def spread(values: Mapping[str, float], higher_is_better: bool = True) -> dict[str, float]:
    """Spread of a metric over merchants, ignoring ``nan``.

    Returns ``min``, ``max``, ``worst_decile`` (10th percentile, or the 90th when
    ``higher_is_better`` is false, e.g. for MAE), ``median``, ``mean`` and
    ``n_merchants`` (merchants with a defined value).
    """
    v = np.asarray([float(x) for x in values.values()], dtype=float)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return {"min": NAN, "max": NAN, "worst_decile": NAN, "median": NAN, "mean": NAN,
                "n_merchants": 0}
    return {
        "min": float(v.min()),
        "max": float(v.max()),
        "worst_decile": float(np.percentile(v, 10 if higher_is_better else 90)),
        "median": float(np.median(v)),
        "mean": float(v.mean()),
        "n_merchants": len(v),
    }
