"""The activation policy on hand-built users (value 10; costs rec 0.05, coupon 1, push 0.1)."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import PolicyConfig
from common.policy import choose_actions

# columns: none, recommend, coupon, push
RISK = np.array([0.9, 0.8, 0.7, 0.3, 0.6, 0.5])
ACTIVATION = np.array([
    [0.10, 0.12, 0.30, 0.15],  # gains 0.15, 1.0, 0.4 -> coupon (1.0)
    [0.10, 0.11, 0.15, 0.20],  # gains 0.05, -0.5, 0.9 -> push (0.9)
    [0.10, 0.10, 0.18, 0.105],  # gains -0.05, -0.2, -0.05 -> none: costs exceed gains
    [0.10, 0.12, 0.30, 0.15],  # like user 0 but risk under the threshold -> none
    [0.10, 0.20, 0.15, 0.10],  # gains 0.95, -0.5, -0.1 -> recommend (0.95)
    [0.10, 0.11, 0.15, 0.20],  # like user 1, risk exactly at the threshold -> push (0.9)
])
CATEGORY = np.array(["a", "b", "c", "d", "shoes", "f"])


def config(budget: int = 0) -> PolicyConfig:
    return PolicyConfig(risk_threshold=0.5, budget=budget, value=10.0,
                        cost_recommend=0.05, cost_coupon=1.0, cost_push=0.1)


def test_hand_built_choices() -> None:
    d = choose_actions(RISK, ACTIVATION, config(), fading_category=CATEGORY)
    assert d.action.tolist() == ["coupon", "push", "none", "none", "recommend", "push"]
    assert d.action_index.tolist() == [2, 3, 0, 0, 1, 3]
    assert d.uplift == pytest.approx([0.20, 0.10, 0.0, 0.0, 0.10, 0.10])
    assert d.expected_gain == pytest.approx([1.0, 0.9, 0.0, 0.0, 0.95, 0.9])
    assert d.category.tolist() == ["", "", "", "", "shoes", ""]


def test_budget_keeps_top_gain() -> None:
    d = choose_actions(RISK, ACTIVATION, config(budget=2), fading_category=CATEGORY)
    # treatable gains: user 0 1.0, user 4 0.95, users 1 and 5 0.9
    assert d.action.tolist() == ["coupon", "none", "none", "none", "recommend", "none"]
    assert d.expected_gain == pytest.approx([1.0, 0, 0, 0, 0.95, 0])


def test_budget_ties_broken_by_risk() -> None:
    # users 1 and 5 tie on gain 0.9; user 1 has the higher risk
    d = choose_actions(RISK, ACTIVATION, config(budget=3))
    assert d.action.tolist() == ["coupon", "push", "none", "none", "recommend", "none"]


def test_large_budget_never_treats_unprofitable_users() -> None:
    d = choose_actions(RISK, ACTIVATION, config(budget=100))
    assert d.action.tolist() == ["coupon", "push", "none", "none", "recommend", "push"]


def test_without_category_recommend_carries_empty_string() -> None:
    d = choose_actions(RISK, ACTIVATION, config())
    assert d.category.tolist() == [""] * 6


def test_shape_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="activation"):
        choose_actions(RISK, ACTIVATION[:, :3], config())
    with pytest.raises(ValueError, match="fading_category"):
        choose_actions(RISK, ACTIVATION, config(), fading_category=CATEGORY[:2])
