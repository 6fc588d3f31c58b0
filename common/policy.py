"""The activation policy: which users to re-activate, and with which action.

Among users whose decay risk passes ``risk_threshold`` (and, with a budget, only the
``budget`` users with the largest expected gain) choose

    argmax_a  value * (P(a) - P(none)) - cost_a

over the non-control actions, or ``none`` when no action pays (gain <= 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.config import PolicyConfig
from common.schema import DEFAULT_ACTIONS


@dataclass
class PolicyDecision:
    """One decision per user; all arrays have length N."""

    action: np.ndarray  # str: chosen action name, "none" when nothing pays or not at risk
    action_index: np.ndarray  # int: index into the actions tuple (0 = none)
    uplift: np.ndarray  # float: P(a) - P(none) of the chosen action, 0 for none
    expected_gain: np.ndarray  # float: value * uplift - cost, 0 for none
    category: np.ndarray  # object: the fading category for "recommend", else ""


def treatment_order(best_gain: Any, decay_risk: Any, risk_threshold: float = 0.0
                    ) -> np.ndarray:
    """Rows worth treating, in the order a budget takes them.

    The rows whose risk passes ``risk_threshold`` and whose best expected gain (net of
    the action's cost) is positive, by gain (descending), then risk (descending), then
    row order. ``choose_actions`` treats the first ``budget`` of them; the value-vs-budget
    curve (``common.metrics.budget_curve``) walks the same list.
    """
    gain = np.asarray(best_gain, dtype=float)
    risk = np.asarray(decay_risk, dtype=float)
    candidates = np.flatnonzero((risk >= risk_threshold) & (gain > 0))
    # lexsort: last key is primary -> gain desc, then risk desc, then row order (stable)
    return candidates[np.lexsort((-risk[candidates], -gain[candidates]))]


def choose_actions(
    decay_risk: Any,
    activation: Any,
    config: PolicyConfig,
    actions: Sequence[str] = DEFAULT_ACTIONS,
    fading_category: Any | None = None,
) -> PolicyDecision:
    """Choose one action per user.

    Parameters
    ----------
    decay_risk : [N] predicted P(decay).
    activation : [N, A] predicted P(re-engage | action); column 0 is ``none``.
    config : threshold, budget, unit value and per-action costs (``cost_<action>``;
        actions without a cost field cost 0).
    actions : action names, ``actions[0] == "none"``.
    fading_category : [N] the category whose interest fades most, carried by
        ``recommend`` decisions.

    Notes
    -----
    With ``config.budget > 0`` the treated users are the ``budget`` users with the
    largest positive gain, ties broken by higher risk, then by row order.
    """
    risk = np.asarray(decay_risk, dtype=float)
    scores = np.asarray(activation, dtype=float)
    n_actions = len(actions)
    if n_actions < 2 or actions[0] != "none":
        raise ValueError(f"actions: expected 'none' first and at least one action, got {actions}")
    if risk.ndim != 1:
        raise ValueError(f"decay_risk: expected a 1-D array, got shape {risk.shape}")
    n = len(risk)
    if scores.shape != (n, n_actions):
        raise ValueError(f"activation: expected shape {(n, n_actions)}, got {scores.shape}")
    if fading_category is not None:
        fading_category = np.asarray(fading_category, dtype=object)
        if fading_category.shape != (n,):
            raise ValueError(
                f"fading_category: expected shape {(n,)}, got {fading_category.shape}"
            )

    costs = np.array([config.cost(a) for a in actions[1:]])
    uplifts = scores[:, 1:] - scores[:, :1]
    gains = config.value * uplifts - costs
    best = np.argmax(gains, axis=1) if n else np.zeros(0, dtype=int)
    rows = np.arange(n)
    best_gain = gains[rows, best]
    treat = np.zeros(n, dtype=bool)
    order = treatment_order(best_gain, risk, config.risk_threshold)
    treat[order[: config.budget] if config.budget > 0 else order] = True

    index = np.where(treat, best + 1, 0)
    names = np.asarray(actions, dtype=str)[index]
    category = np.full(n, "", dtype=object)
    if fading_category is not None and "recommend" in actions:
        is_rec = names == "recommend"
        category[is_rec] = [str(c) for c in fading_category[is_rec]]
    return PolicyDecision(
        action=names,
        action_index=index,
        uplift=np.where(treat, uplifts[rows, best], 0.0),
        expected_gain=np.where(treat, best_gain, 0.0),
        category=category,
    )
