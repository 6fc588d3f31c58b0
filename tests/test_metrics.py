"""Metrics on tiny arrays with answers computed by hand."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from common.metrics import (
    activation_metrics,
    binary_log_loss,
    choose_threshold,
    decay_metrics,
    expected_calibration_error,
    interest_metrics,
    ips_value,
    log_losses,
    per_merchant,
    policy_report,
    policy_value_truth,
    qini_coefficient,
    snips_value,
    spread,
    top_decile_lift,
)

# ------------------------------------------------------------------------- decay


def test_decay_metrics_four_points() -> None:
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8])
    m = decay_metrics(y, p, threshold=0.5)
    # AUC: positive/negative pairs (0.35>0.1 yes, 0.35>0.4 no, 0.8>both yes) -> 3/4
    assert m["roc_auc"] == pytest.approx(0.75)
    # AP: ranks 0.8(+) 0.4(-) 0.35(+): 0.5 * 1 + 0.5 * 2/3
    assert m["pr_auc"] == pytest.approx(0.5 + 1 / 3)
    assert m["log_loss"] == pytest.approx(
        -np.mean(np.log([0.9, 0.6, 0.35, 0.8]))
    )
    # only 0.8 >= 0.5: precision 1, recall 1/2, f1 2/3
    assert m["precision"] == pytest.approx(1.0)
    assert m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(2 / 3)
    # top 10% of 4 rows = 1 row (0.8, positive): rate 1 over base rate 0.5
    assert m["top_decile_lift"] == pytest.approx(2.0)
    assert m["positive_rate"] == pytest.approx(0.5)
    assert m["n"] == 4
    json.dumps(m)  # plain Python types
    assert all(type(v) in (float, int) for v in m.values())


def test_top_decile_lift_constructed() -> None:
    # 20 rows, 5 positives (base rate 0.25); the top 2 scores are both positive -> 1/0.25
    y = np.zeros(20)
    y[[0, 1, 7, 12, 15]] = 1
    p = np.linspace(0.0, 0.5, 20)
    p[[0, 1]] = [0.9, 0.95]
    assert top_decile_lift(y, p) == pytest.approx(4.0)


def test_top_decile_lift_ties_do_not_depend_on_order() -> None:
    # k = 1 but two rows tie at the top (one positive): expected rate 0.5; base 2/10
    y = np.array([1, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    p = np.array([0.9, 0.9, 0.1, 0.2, 0.3, 0.1, 0.2, 0.3, 0.1, 0.2])
    assert top_decile_lift(y, p) == pytest.approx(2.5)
    assert top_decile_lift(y[::-1], p[::-1]) == pytest.approx(2.5)


def test_choose_threshold_maximises_f1() -> None:
    y = np.array([0, 1, 0, 1, 1])
    p = np.array([0.2, 0.3, 0.5, 0.7, 0.9])
    # F1 at t = 0.2: 0.75, 0.3: 6/7, 0.5: 2/3, 0.7: 0.8, 0.9: 0.5
    t = choose_threshold(y, p)
    assert t == pytest.approx(0.3)
    assert decay_metrics(y, p, threshold=t)["f1"] == pytest.approx(6 / 7)


def test_choose_threshold_ties_take_the_highest() -> None:
    # y 1,0,0,1 / p 0.1,0.2,0.3,0.9: F1 = 2TP / (2TP + FP + FN)
    # t=0.1: 4/6, t=0.2: 2/5, t=0.3: 2/4, t=0.9: 2/3 -> 0.1 and 0.9 tie, take 0.9
    assert choose_threshold([1, 0, 0, 1], [0.1, 0.2, 0.3, 0.9]) == pytest.approx(0.9)


def test_choose_threshold_without_positives_returns_default() -> None:
    assert choose_threshold([0, 0, 0], [0.1, 0.2, 0.3]) == 0.5


def test_log_loss_by_hand_clipped_and_row_wise() -> None:
    p, y = np.array([0.8, 0.25, 1.0]), np.array([1.0, 0.0, 0.0])
    # A certain wrong prediction is clipped to 1 - 1e-7: it costs -log(1e-7), not inf.
    expected = -(math.log(0.8) + math.log(0.75) + math.log(1e-7)) / 3
    assert binary_log_loss(y, p) == pytest.approx(expected, rel=1e-6)
    assert log_losses(np.array([1.0, 0.0]), np.array([0.5, 0.5])) == \
        pytest.approx([math.log(2)] * 2)
    # Several rows of predictions of the same labels at once: one loss per element.
    rows = log_losses(y, np.stack([p, np.full(3, 0.5)]))
    assert rows.shape == (2, 3)
    assert rows.mean(axis=1) == pytest.approx([expected, math.log(2)], rel=1e-6)
    assert math.isnan(binary_log_loss([], []))
    with pytest.raises(ValueError, match="last axis"):
        log_losses([0, 1], [0.5])


def test_ece_by_hand() -> None:
    # one row in each of bins 0, 1, 8, 9: (0.05 + 0.85 + 0.15 + 0.05) / 4
    assert expected_calibration_error([0, 1, 1, 1], [0.05, 0.15, 0.85, 0.95]) == \
        pytest.approx(0.275)
    # two rows in bin 1: rate 0.5, mean risk 0.15
    assert expected_calibration_error([0, 1], [0.12, 0.18]) == pytest.approx(0.35)
    # calibrated within its bin; p == 1 falls into the last bin
    assert expected_calibration_error([1, 0, 0, 0], [0.25] * 4) == pytest.approx(0.0)
    assert expected_calibration_error([1], [1.0]) == pytest.approx(0.0)
    assert math.isnan(expected_calibration_error([], []))
    with pytest.raises(ValueError, match="equal length"):
        expected_calibration_error([0, 1], [0.5])


def test_one_class_gives_nan_not_error() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = decay_metrics(np.zeros(3), np.array([0.1, 0.2, 0.7]))
    assert math.isnan(m["roc_auc"]) and math.isnan(m["pr_auc"])
    assert math.isnan(m["precision"]) or m["precision"] == 0.0
    assert math.isnan(m["top_decile_lift"])
    assert m["log_loss"] == pytest.approx(-np.mean(np.log([0.9, 0.8, 0.3])))
    assert m["positive_rate"] == 0.0 and m["n"] == 3
    empty = decay_metrics(np.array([]), np.array([]))
    assert empty["n"] == 0 and math.isnan(empty["roc_auc"])


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="equal length"):
        decay_metrics([0, 1], [0.5])


# ---------------------------------------------------------------------- interest


def test_interest_metrics() -> None:
    m = interest_metrics([0.0, 1.0, 2.0], [1.0, 1.0, 0.0])
    # errors 1, 0, 2
    assert m == pytest.approx({"mae": 1.0, "rmse": math.sqrt(5 / 3), "n": 3})


# -------------------------------------------------------------------------- qini

# Six users sorted by score; t = treated, y = outcome.
QINI_SCORE = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
QINI_T = np.array([1, 0, 1, 1, 0, 0], dtype=bool)
QINI_Y = np.array([1, 0, 1, 0, 1, 0])
# Q(k) = Y_t(k) - Y_c(k) * N_t(k) / N_c(k):
#   k=1: 1 - 0 = 1;  k=2: 1 - 0*1/1 = 1;  k=3: 2;  k=4: 2;
#   k=5: 2 - 1*3/2 = 0.5;  k=6: 2 - 1*3/3 = 1
# area (trapezoids over k=0..6): 0.5 + 1 + 1.5 + 2 + 1.25 + 0.75 = 7
# random line (0,0)-(6,1): area 3
# perfect order by y*(2t-1): the two treated responders (1), the three zeros tied,
# the control responder (-1): points (0,0) (2,2) (5,2) (6,1), area 2 + 6 + 1.5 = 9.5
# qini = (7 - 3) / (9.5 - 3) = 4 / 6.5
QINI_EXPECTED = 4 / 6.5


def test_qini_hand_computed() -> None:
    assert qini_coefficient(QINI_SCORE, QINI_T, QINI_Y) == pytest.approx(QINI_EXPECTED)


def test_qini_reversed_ranking_is_negative() -> None:
    # reversed order (t = 0,0,1,1,0,1; y = 0,1,0,1,0,1): Q = 0, 0, -0.5, 0, 1/3, 1
    # area = 0 + 0 - 0.25 - 0.25 + 1/6 + 2/3 = 1/3; qini = (1/3 - 3) / 6.5
    assert qini_coefficient(-QINI_SCORE, QINI_T, QINI_Y) == pytest.approx((1 / 3 - 3) / 6.5)


def test_qini_perfect_is_one_and_ties_are_random() -> None:
    perfect = QINI_Y * np.where(QINI_T, 1.0, -1.0)
    assert qini_coefficient(perfect, QINI_T, QINI_Y) == pytest.approx(1.0)
    # one tie group: the curve is the random line itself
    assert qini_coefficient(np.zeros(6), QINI_T, QINI_Y) == pytest.approx(0.0)


def test_qini_undefined_is_nan() -> None:
    assert math.isnan(qini_coefficient(QINI_SCORE, np.ones(6, bool), QINI_Y))
    assert math.isnan(qini_coefficient(QINI_SCORE, QINI_T, np.zeros(6)))


def test_activation_metrics_per_action() -> None:
    # columns: none, recommend, coupon, push; uplift = column - column 0 (0 here)
    rows = [
        # action, y, recommend, coupon
        (0, 0, 0.5, 0.8),  # control rows shared by every action
        (0, 1, 0.1, 0.5),
        (0, 0, 0.4, 0.4),
        (2, 1, 0.0, 0.9),  # coupon rows: with the control, QINI_* above
        (2, 1, 0.0, 0.7),
        (2, 0, 0.0, 0.6),
        (1, 1, 0.9, 0.0),  # recommend rows: with the control, the perfect order
        (1, 0, 0.3, 0.0),
        (-1, 1, 1.0, 1.0),  # no intervention logged: ignored
    ]
    action = np.array([r[0] for r in rows])
    y = np.array([r[1] for r in rows])
    scores = np.zeros((len(rows), 4))
    scores[:, 1] = [r[2] for r in rows]
    scores[:, 2] = [r[3] for r in rows]
    m = activation_metrics(scores, action, y)
    assert m["qini_coupon"] == pytest.approx(QINI_EXPECTED)
    assert m["qini_recommend"] == pytest.approx(1.0)
    assert math.isnan(m["qini_push"])
    assert (m["n_control"], m["n_recommend"], m["n_coupon"], m["n_push"]) == (3, 2, 3, 0)
    assert m["qini_mean"] == pytest.approx((1.0 + QINI_EXPECTED) / 2)


# ------------------------------------------------------------------------ policy

CHOSEN = np.array([1, 2, 0, 1, 3])
LOGGED = np.array([1, 1, 0, 1, -1])
OUTCOME = np.array([1.0, 0.0, 1.0, 0.0, 1.0])
PROPENSITY = np.array([0.5, 0.25, 0.25, 0.5, np.nan])


def test_ips_and_snips_by_hand() -> None:
    # logged rows 0-3; matches: row 0 (w=2, y=1), row 2 (w=4, y=1), row 3 (w=2, y=0)
    assert ips_value(CHOSEN, LOGGED, OUTCOME, PROPENSITY) == pytest.approx((2 + 4) / 4)
    assert snips_value(CHOSEN, LOGGED, OUTCOME, PROPENSITY) == pytest.approx(6 / 8)


def test_ips_rejects_bad_propensity_and_snips_nan_without_match() -> None:
    with pytest.raises(ValueError, match="propensity"):
        ips_value([1], [1], [1.0], [0.0])
    assert math.isnan(snips_value([2, 2], [1, 0], [1.0, 0.0], [0.5, 0.5]))


TRUTH = np.array([[0.1, 0.3, 0.2, 0.2], [0.5, 0.4, 0.9, 0.6]])


def test_policy_value_truth() -> None:
    assert policy_value_truth([1, 3], TRUTH) == pytest.approx((0.3 + 0.6) / 2)


def test_policy_report_by_hand() -> None:
    costs = [0.0, 0.05, 1.0, 0.1]
    r = policy_report([1, 3], [1, 2], [1.0, 0.0], [0.5, 0.25], truth=TRUTH,
                      value=10.0, costs=costs)
    json.dumps(r)
    pol = r["policy"]
    assert pol["truth"] == pytest.approx(0.45)
    assert r["oracle"]["truth"] == pytest.approx((0.3 + 0.9) / 2)
    assert pol["regret"] == pytest.approx(0.15)
    # IPS: row 0 matches (w=2, y=1) -> 2/2 = 1; SNIPS 2/2
    assert pol["ips"] == pytest.approx(1.0) and pol["snips"] == pytest.approx(1.0)
    # random: truth = mean of row means (0.2, 0.6); weights 0.25/0.5, 0.25/0.25
    assert r["random"]["truth"] == pytest.approx(0.4)
    assert r["random"]["ips"] == pytest.approx(0.5 / 2)
    assert r["random"]["snips"] == pytest.approx(0.5 / 1.5)
    assert r["always_none"]["truth"] == pytest.approx(0.3)
    assert r["always_none"]["ips"] == 0.0 and math.isnan(r["always_none"]["snips"])
    assert r["always_coupon"]["truth"] == pytest.approx(0.55)
    assert r["always_coupon"]["regret"] == pytest.approx(0.05)
    # net: 10 * 0.45 - mean(0.05, 0.1); oracle rows: max(1, 2.95, 1, 1.9), max(5, 3.95, 8, 5.9)
    assert pol["net_truth"] == pytest.approx(4.425)
    assert r["oracle"]["net_truth"] == pytest.approx((2.95 + 8.0) / 2)
    assert pol["net_regret"] == pytest.approx(5.475 - 4.425)
    assert pol["net_ips"] == pytest.approx(10.0 - 0.075)
    assert set(r) == {"policy", "random", "oracle", "always_none", "always_recommend",
                      "always_coupon", "always_push"}


def test_policy_report_without_truth_has_no_oracle() -> None:
    r = policy_report(CHOSEN, LOGGED, OUTCOME, PROPENSITY)
    assert "oracle" not in r and "truth" not in r["policy"]
    assert r["policy"]["ips"] == pytest.approx(1.5)
    with pytest.raises(ValueError, match="value and costs"):
        policy_report(CHOSEN, LOGGED, OUTCOME, PROPENSITY, value=1.0)


# -------------------------------------------------------------------- federation


def test_per_merchant_groups_and_skips_small() -> None:
    ids = np.array(["b", "a", "b", "a", "c"])
    y = np.array([1, 0, 0, 1, 1])
    p = np.array([0.3, 0.2, 0.7, 0.6, 0.5])
    out = per_merchant(ids, decay_metrics, y, p, min_rows=2)
    assert list(out) == ["a", "b", "c"]
    assert out["a"]["roc_auc"] == pytest.approx(1.0)  # a: y 0,1 / p 0.2,0.6
    assert out["b"]["roc_auc"] == pytest.approx(0.0)  # b: y 1,0 / p 0.3,0.7
    assert out["a"]["n"] == 2 and out["c"]["n"] == 1
    assert set(out["c"]) == set(out["a"])
    assert all(math.isnan(v) for k, v in out["c"].items() if k != "n")


def test_per_merchant_float_fn() -> None:
    out = per_merchant([1, 1, 2], lambda x: float(np.mean(x)), [1.0, 3.0, 5.0], min_rows=1)
    assert out == {"1": {"value": 2.0, "n": 2}, "2": {"value": 5.0, "n": 1}}


def test_spread_ignores_nan() -> None:
    values = {"a": 1.0, "b": 0.0, "c": float("nan"), "d": 0.5}
    s = spread(values)
    # sorted 0, 0.5, 1: 10th percentile at position 0.2 -> 0.1
    assert s == pytest.approx({"min": 0.0, "max": 1.0, "worst_decile": 0.1, "median": 0.5,
                               "mean": 0.5, "n_merchants": 3})
    assert spread(values, higher_is_better=False)["worst_decile"] == pytest.approx(0.9)
    assert math.isnan(spread({"a": float("nan")})["min"])
