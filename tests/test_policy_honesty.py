"""Off-policy values say what they rest on; the report says when there is nothing to say."""

from __future__ import annotations

import numpy as np
import pytest

from common.metrics import bootstrap_off_policy, policy_report
from simulations.baselines import policy_support
from simulations.render import to_markdown
from simulations.report import policy_caveat, report_blocks, table_rows

ACTIONS = ("none", "recommend", "coupon", "push")


def test_policy_report_counts_matched_rows() -> None:
    # Logged rows 0..2 (row 3 has no log); the policy matches rows 0 and 2.
    r = policy_report([1, 3, 2, 0], [1, 2, 2, -1], [1.0, 0.0, 1.0, 1.0],
                      [0.5, 0.25, 0.25, np.nan], actions=ACTIONS)
    assert r["policy"]["logged"] == 3 and r["policy"]["matched"] == 2
    assert r["random"]["matched"] == 3  # a stochastic policy puts weight on every row
    assert r["always_none"]["matched"] == 0 and r["always_coupon"]["matched"] == 2


def test_bootstrap_is_seeded_and_brackets_the_estimate() -> None:
    rng = np.random.default_rng(3)
    n = 400
    logged = rng.integers(0, 4, n)
    chosen = rng.integers(0, 4, n)
    outcome = (rng.random(n) < 0.3).astype(float)
    prop = np.full(n, 0.25)
    pi = (chosen == logged).astype(float)
    a = bootstrap_off_policy(pi, logged, outcome, prop, seed=7)
    assert a == bootstrap_off_policy(pi, logged, outcome, prop, seed=7)
    assert a != bootstrap_off_policy(pi, logged, outcome, prop, seed=8)
    r = policy_report(chosen, logged, outcome, prop, actions=ACTIONS, seed=7)["policy"]
    assert a["snips_low"] < r["snips"] < a["snips_high"]
    assert a["ips_low"] < r["ips"] < a["ips_high"]
    # No overlap: no interval.
    none = bootstrap_off_policy(np.zeros(n), logged, outcome, prop)
    assert all(np.isnan(v) for v in none.values())


def _method(logged: np.ndarray, chosen: np.ndarray) -> dict:
    pol = policy_report(chosen, logged, np.ones(len(logged)), np.full(len(logged), 0.5),
                        actions=ACTIONS, value=10.0, costs=[0, 0.05, 1.0, 0.1])
    return {"decay": {"roc_auc": 0.7}, "interest": {"mae": 0.5}, "seconds": 1.0,
            "policy": pol, "policy_support": policy_support(logged, ACTIONS)}


def test_a_log_without_controls_prints_a_reason_not_a_number() -> None:
    coupon_only = np.full(50, 2)  # like Complete Journey: targeted households only
    m = _method(coupon_only, np.full(50, 2))
    assert m["policy_support"] == {"logged_rows": 50, "per_action": {
        "none": 0, "recommend": 0, "coupon": 50, "push": 0}, "has_control": False}
    assert "no control (none) rows (logged: coupon 50)" in policy_caveat(m)
    results = {"experiment": {}, "calendar": {"start": "a", "end": "b"}, "budget_epochs": 1,
               "seconds": 1.0, "data": {"merchants": 1, "snapshots": {"test": 50},
                                        "decay_rate": {"test": 0.5}},
               "methods": {"gbdt": m}}
    _, rows = table_rows(results)
    assert rows[0][7] == "-"  # policy value column
    md = to_markdown(report_blocks(results, []))
    assert "No policy value: the log has no control (none) rows" in md
    assert "net_snips" not in md


def test_controls_with_overlap_print_the_value_with_its_rows() -> None:
    logged = np.array([0, 2] * 25)
    m = _method(logged, np.full(50, 2))
    assert policy_caveat(m) == ""
    assert m["policy"]["policy"]["matched"] == 25
    assert m["policy"]["policy"]["net_snips"] == pytest.approx(10.0 - 1.0)
