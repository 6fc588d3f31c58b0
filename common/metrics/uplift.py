"""Uplift metrics of the activation head: the Qini coefficient per action."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from common.metrics.arrays import NAN, same_length, vector
from common.schema import DEFAULT_ACTIONS


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
    s = vector("uplift_score", uplift_score)
    t = vector("treated", treated, dtype=bool)
    y = vector("outcome", outcome)
    same_length(uplift_score=s, treated=t, outcome=y)
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
    a_log = vector("action", action, dtype=int)
    y = vector("outcome", outcome)
    if sc.ndim != 2 or sc.shape[1] != len(actions):
        raise ValueError(f"scores: expected shape [N, {len(actions)}], got {sc.shape}")
    same_length(scores=sc, action=a_log, outcome=y)
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
