"""Meta-learners of the activation uplift on tabular features: T-learner and X-learner.

Both give the [N, A] re-engagement scores every policy reads (column 0 the control
``none``), so ``common.policy.choose_actions`` ranks their ``value * (P(a) - P(none)) -
cost_a`` like any other model's.

- **T-learner**: one classifier per action on the rows logged with it,
  ``P(a | x) = mu_a(x)``.
- **X-learner** (Künzel et al. 2019) per non-control action ``a``: the T-learner's
  ``mu_0`` and ``mu_a`` impute each row's effect, ``D = y - mu_0(x)`` on the rows treated
  with ``a`` and ``D = mu_a(x) - y`` on the control rows; a regressor per group learns
  it (``tau_1``, ``tau_0``) and ``tau_a = g * tau_0 + (1 - g) * tau_1`` with ``g`` the
  share of ``a`` among the rows logged with ``a`` or the control (the propensity of a
  randomised log; a constant, so it is stored as a number). Scores:
  ``P(none) = mu_0(x)``, ``P(a) = mu_0(x) + tau_a(x)`` (not clipped to [0, 1]: the
  policy reads only differences).

A group with fewer than ``min_rows`` rows (or a single outcome, for a classifier) gets
its mean as a plain ``float``; the stored models are scikit-learn estimators, floats and
dicts, so ``common.tabular`` saves them with skops, never pickle.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

#: Fewest rows a group needs for a fitted model rather than its mean.
MIN_ROWS = 30
#: Fewest rows of each outcome an action needs for a classifier (else its rate).
MIN_CLASS_ROWS = 2
#: The keys of one action's X-learner effect (``fit_x_learner``).
EFFECT_KEYS = ("treated", "control", "weight")


def _no_op(_: str) -> None:
    return None


def fit_t_learner(x: np.ndarray, action: np.ndarray, outcome: np.ndarray,
                  actions: Sequence[str], make_classifier: Callable[[], Any], *,
                  min_rows: int = MIN_ROWS, done: Callable[[str], None] = _no_op
                  ) -> tuple[Any, ...]:
    """One classifier (or constant rate) per action; ``action == -1`` rows are unused.

    An action with fewer than ``min_rows`` logged rows, or fewer than ``MIN_CLASS_ROWS``
    of either outcome, gets its observed rate (the overall logged rate without any row).
    ``done`` is called with each action's name.
    """
    logged = action >= 0
    overall = float(outcome[logged].mean()) if logged.any() else 0.5
    per_action: list[Any] = []
    for a, name in enumerate(actions):
        rows = action == a
        y = outcome[rows]
        # Each outcome at least twice: a classifier that early-stops on a stratified
        # validation split cannot split a class of one.
        if rows.sum() >= min_rows and min(y.sum(), len(y) - y.sum()) >= MIN_CLASS_ROWS:
            per_action.append(make_classifier().fit(x[rows], y))
        else:
            per_action.append(float(y.mean()) if rows.any() else overall)
        done(name)
    return tuple(per_action)


def predict_t_learner(per_action: Sequence[Any], x: np.ndarray) -> np.ndarray:
    """[N, A] float32 scores of a T-learner (a float is a constant rate)."""
    if len(x) == 0:  # scikit-learn refuses to predict on no rows
        return np.zeros((0, len(per_action)), np.float32)
    return np.column_stack([
        np.full(len(x), m) if isinstance(m, float) else m.predict_proba(x)[:, 1]
        for m in per_action
    ]).reshape(len(x), len(per_action)).astype(np.float32)


def _fit_or_mean(make_regressor: Callable[[], Any], x: np.ndarray, d: np.ndarray,
                 min_rows: int) -> Any:
    if len(d) >= min_rows and np.ptp(d) > 0:
        return make_regressor().fit(x, d)
    return float(d.mean()) if len(d) else 0.0


def _regress(model: Any, x: np.ndarray) -> np.ndarray:
    if isinstance(model, float) or len(x) == 0:
        return np.full(len(x), model if isinstance(model, float) else 0.0)
    return model.predict(x)


def fit_x_learner(x: np.ndarray, action: np.ndarray, outcome: np.ndarray,
                  per_action: Sequence[Any], make_regressor: Callable[[], Any], *,
                  min_rows: int = MIN_ROWS, done: Callable[[str], None] = _no_op,
                  names: Sequence[str] | None = None) -> tuple[dict[str, Any], ...]:
    """Stage two of the X-learner on top of the T-learner ``per_action``.

    Returns one dict per non-control action: ``treated`` (``tau_1``), ``control``
    (``tau_0``), each a regressor or a constant, and ``weight`` (``g``).
    """
    control = action == 0
    y = outcome.astype(float)
    mu0 = predict_t_learner(per_action[:1], x)[:, 0]
    effects: list[dict[str, Any]] = []
    for a in range(1, len(per_action)):
        treated = action == a
        mu_a = predict_t_learner(per_action[a:a + 1], x[control])[:, 0]
        tau1 = _fit_or_mean(make_regressor, x[treated], y[treated] - mu0[treated], min_rows)
        tau0 = _fit_or_mean(make_regressor, x[control], mu_a - y[control], min_rows)
        pair = int(treated.sum() + control.sum())
        weight = float(treated.sum() / pair) if pair else 0.5
        effects.append({"treated": tau1, "control": tau0, "weight": weight})
        done(names[a] if names is not None else str(a))
    return tuple(effects)


def predict_x_learner(per_action: Sequence[Any], effects: Sequence[dict[str, Any]],
                      x: np.ndarray) -> np.ndarray:
    """[N, A] float32 scores: ``mu_0(x)`` and ``mu_0(x) + tau_a(x)`` per action."""
    if len(effects) != len(per_action) - 1:
        raise ValueError(f"effects: expected {len(per_action) - 1} (one per non-control "
                         f"action), got {len(effects)}")
    mu0 = predict_t_learner(per_action[:1], x)[:, 0].astype(float)
    cols = [mu0]
    for effect in effects:
        g = float(effect["weight"])
        tau = g * _regress(effect["control"], x) + (1 - g) * _regress(effect["treated"], x)
        cols.append(mu0 + tau)
    return np.column_stack(cols).reshape(len(x), len(cols)).astype(np.float32)
