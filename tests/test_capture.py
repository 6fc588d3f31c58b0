"""Capture, the value-vs-budget curve and its ranking (the one policy.budget uses)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from common.config import PolicyConfig
from common.metrics import budget_curve, capture, capture_values, policy_report
from common.policy import choose_actions, treatment_order
from simulations.capture import policy_capture, seed_summary

ACTIONS = ("none", "recommend", "coupon", "push")
# True P(re-engage | action), 3 rows: row 0 is best with recommend, row 1 with coupon,
# row 2 with none.
TRUTH = np.array([[0.1, 0.5, 0.2, 0.1],
                  [0.2, 0.2, 0.8, 0.3],
                  [0.6, 0.3, 0.3, 0.4]])


def test_capture_by_hand() -> None:
    # plain P: singles none .3, recommend .333.., coupon .4333.., push .2667 -> coupon best;
    # oracle (.5 + .8 + .6) / 3 = .6333..; policy recommend, coupon, coupon = (.5+.8+.3)/3
    out = capture_values([1, 2, 2], TRUTH, ACTIONS)
    assert out["best_single_action"] == "coupon"
    assert out["best_single"] == pytest.approx(1.3 / 3)
    assert out["oracle"] == pytest.approx(1.9 / 3)
    assert out["policy"] == pytest.approx(1.6 / 3)
    assert out["capture"] == pytest.approx((1.6 - 1.3) / (1.9 - 1.3))
    assert out["note"] == ""
    # net: value 10, costs 0 / 0.05 / 1 / 0.1 -> the oracle pays recommend's cost on row 0
    net = capture_values([1, 2, 0], TRUTH, ACTIONS, value=10.0, costs=[0, 0.05, 1, 0.1])
    # rows' net values: [1, 4.95, 1, 0.9], [2, 1.95, 7, 2.9], [6, 2.95, 2, 3.9]
    assert net["oracle"] == pytest.approx((4.95 + 7 + 6) / 3)
    assert net["policy"] == pytest.approx((4.95 + 7 + 6) / 3)
    # singles: none 3, recommend 9.85 / 3, coupon 10 / 3, push 7.7 / 3
    assert net["best_single_action"] == "coupon"
    assert net["best_single"] == pytest.approx(10 / 3)
    assert net["capture"] == pytest.approx(1.0)


def test_capture_is_nan_when_nothing_can_be_captured() -> None:
    # push is every row's best action: the oracle is the best single action
    truth = np.array([[0.1, 0.2, 0.2, 0.9], [0.3, 0.3, 0.3, 0.5]])
    out = capture_values([3, 3], truth, ACTIONS)
    assert math.isnan(out["capture"]) and "undefined" in out["note"]
    assert math.isnan(capture(0.5, 0.7, 0.7))  # no division error
    assert math.isnan(capture(float("nan"), 0.1, 0.2))
    assert capture(0.15, 0.1, 0.2) == pytest.approx(0.5)
    assert capture_values([], np.zeros((0, 4)), ACTIONS)["rows"] == 0


def test_policy_report_carries_capture_for_every_policy() -> None:
    report = policy_report([1, 2, 0], [1, 2, 0], [1.0, 1.0, 1.0], [0.25] * 3, truth=TRUTH,
                           actions=ACTIONS, value=10.0, costs=[0, 0.05, 1, 0.1])
    assert report["oracle"]["capture"] == pytest.approx(1.0)
    singles = {a: report[f"always_{a}"]["capture"] for a in ACTIONS}
    assert max(singles.values()) == pytest.approx(0.0)  # the best single action is 0
    assert report["policy"]["capture"] == pytest.approx(1.0)  # this policy is the oracle
    without_truth = policy_report([1, 2, 0], [1, 2, 0], [1.0, 1.0, 1.0], [0.25] * 3)
    assert "capture" not in without_truth["policy"]


def _net(truth: np.ndarray, value: float, costs: np.ndarray) -> np.ndarray:
    return value * truth - costs


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 40), st.just(4)),
              elements=st.floats(0, 1)),
       st.floats(0.5, 20))
def test_oracle_curve_is_non_decreasing_and_ends_at_the_oracle(truth: np.ndarray,
                                                                value: float) -> None:
    costs = np.array([0.0, 0.05, 1.0, 0.1])
    n = len(truth)
    curve = budget_curve(np.arange(0), np.zeros(n, int), truth, ACTIONS, value=value,
                         costs=costs, points=11)
    oracle = np.asarray(curve["oracle"])
    assert np.all(np.diff(oracle) >= -1e-12)
    net = _net(truth, value, costs)
    assert oracle[-1] == pytest.approx(net.max(axis=1).mean())
    assert oracle[0] == pytest.approx(net[:, 0].mean())
    assert np.allclose(curve["policy"], net[:, 0].mean())  # nobody treated: all none


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 30), st.just(4)),
              elements=st.floats(0, 1)),
       arrays(np.float64, st.integers(1, 30), elements=st.floats(0, 1)),
       st.integers(0, 35))
def test_curve_at_a_budget_is_the_budgeted_policy(scores: np.ndarray, risk_: np.ndarray,
                                                  budget: int) -> None:
    n = len(scores)
    risk = np.resize(risk_, n)
    truth = np.clip(scores[::-1] + 0.1, 0, 1)  # any truth: the curve only reads it
    config = PolicyConfig(risk_threshold=0.3, budget=0)
    unlimited = choose_actions(risk, scores, config, ACTIONS)
    order = treatment_order(unlimited.expected_gain, risk, config.risk_threshold)
    costs = np.array([config.cost(a) for a in ACTIONS])
    curve = budget_curve(order, unlimited.action_index, truth, ACTIONS, value=config.value,
                         costs=costs, points=n + 1)  # one grid point per k
    k = min(budget, n)
    net = _net(truth, config.value, costs)
    if k == 0:  # budget 0 means no limit in the config: the curve's 0 treats nobody
        expected = net[:, 0].mean()
    else:
        budgeted = choose_actions(risk, scores, PolicyConfig(risk_threshold=0.3, budget=k),
                                  ACTIONS)
        expected = net[np.arange(n), budgeted.action_index].mean()
    assert curve["policy"][k] == pytest.approx(expected)
    # the predicted value of the ranking never falls as the budget grows
    predicted = np.r_[0, np.cumsum(unlimited.expected_gain[order])]
    assert np.all(np.diff(predicted) > 0)


def test_policy_capture_ranks_by_expected_gain_and_respects_the_budget() -> None:
    truth = np.array([[0.1, 0.6, 0.1, 0.1], [0.1, 0.3, 0.1, 0.1], [0.5, 0.5, 0.5, 0.5]])
    perfect = truth.copy()  # a model that knows the truth
    out = policy_capture(np.ones(3), perfect, truth, PolicyConfig(budget=1), ACTIONS)
    curve = out["budget_curve"]
    assert curve["treated"] == 2 and curve["rows"] == 3
    # budget 1 treats row 0 only (gain 10 * .5 - .05 beats row 1's 10 * .2 - .05)
    assert out["capture"]["policy"] == pytest.approx((5.95 + 1.0 + 5.0) / 3)
    assert curve["policy"][-1] == pytest.approx((5.95 + 2.95 + 5.0) / 3)
    assert out["capture"]["capture"] == pytest.approx(
        (out["capture"]["policy"] - out["capture"]["best_single"])
        / (out["capture"]["oracle"] - out["capture"]["best_single"]))


def test_curve_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="order"):
        budget_curve([0, 0], [1, 1], TRUTH[:2], ACTIONS)
    with pytest.raises(ValueError, match="costs"):
        budget_curve([0], [1, 1, 1], TRUTH, ACTIONS, value=1.0, costs=[0, 1])


def test_seed_summary_mean_and_spread() -> None:
    def results(cap: float) -> dict:
        return {"methods": {"gbdt": {"capture": {"capture": cap, "policy": 3.0 + cap}},
                            "lr": {}}}

    out = seed_summary({0: results(0.1), 1: results(0.3), 2: results(float("nan"))})
    assert set(out) == {"gbdt"}
    assert out["gbdt"]["seeds"] == 3
    assert out["gbdt"]["capture_mean"] == pytest.approx(0.2)
    assert out["gbdt"]["capture_std"] == pytest.approx(np.std([0.1, 0.3], ddof=1))


@pytest.mark.slow
def test_compare_over_seeds_reports_capture_per_seed_and_summary(tmp_path, capsys) -> None:
    import json

    from simulations.cli import main

    runs = tmp_path / "runs"
    sets = ["--set", "synthetic.num-merchants=2", "--set", "synthetic.users-median=60",
            "--set", f"experiment.output-dir={runs}"]
    assert main(["compare", "--preset", "quick", *sets, "--seed", "1", "--seeds", "0,1"]) == 2
    assert "--seed and --seeds" in capsys.readouterr().err
    assert main(["compare", "--preset", "quick", *sets, "--methods", "gbdt,x-learner",
                 "--seeds", "0,1"]) == 0
    [run] = runs.iterdir()
    summary = json.loads((run / "seeds.json").read_text())
    assert summary["seeds"] == [0, 1] and set(summary["methods"]) == {"gbdt", "x-learner"}
    for seed in (0, 1):
        folder = run / f"seed-{seed}"
        results = json.loads((folder / "results.json").read_text())
        assert results["experiment"]["experiment.seed"] == seed
        for name in ("gbdt", "x-learner"):
            m = results["methods"][name]
            assert m["capture"]["capture"] == pytest.approx(m["policy"]["policy"]["capture"])
            assert summary["methods"][name]["capture"][seed] == pytest.approx(
                m["capture"]["capture"])
            assert len(m["budget_curve"]["policy"]) == len(m["budget_curve"]["share"])
        assert (folder / "value_vs_budget.png").stat().st_size > 0
        assert "## Capture" in (folder / "report.md").read_text()
        assert (folder / "x-learner" / "model.skops").is_file()
    assert "Capture over seeds" in (run / "seeds.md").read_text()
    assert "capture mean" in capsys.readouterr().out
