"""The snapshot builder on tiny logs with answers computed by hand.

The calendar of most tests: ``start = 2025-01-01``, ``end = 2025-03-12`` (70 days),
observation 28 d, horizon 14 d, stride 7 d, tau 7 d, intervention window 7 d and
response 7 d, so the label window is max(14, 7 + 7) = 14 d and

    candidate cutoffs  = day 28, 35, 42, 49, 56   (arange(28, 70 - 14, 7), end included)
    test               = [56]
    val                = [42]   (last c with c + 14 <= 56)
    train              = [28]   (every c with c + 14 <= 42)
    skipped            = [35, 49]
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.config import SnapshotConfig
from common.features import DAY, NUMERIC_FEATURES, STATIC_FEATURES, hash_categories, label_window
from common.schema import EVENT_DTYPE, EVENT_TYPES, STRING, DataError, action_dtype
from common.snapshots import SPLITS, Snapshots, build_snapshots, plan_cutoffs
from simulations.synth import generate_federation, load_preset, synth_config_from_preset

START = pd.Timestamp("2025-01-01", tz="UTC")
CFG = SnapshotConfig(
    observation_days=28, horizon_days=14, stride_days=7, tau_days=7, rho=0.5,
    max_len=6, hash_buckets=16, intervention_window_days=7, response_days=7,
    start="2025-01-01", end="2025-03-12",
)
T_TRAIN, T_VAL, T_TEST = 28.0, 42.0, 56.0  # cutoffs in days since START (see module doc)

# (merchant, user, day, event, category, value)
Row = tuple[str, str, float, str, str, float]

ANN: list[Row] = [
    ("m1", "ann", 10.0, "view", "shoes", 0.0),
    ("m1", "ann", 14.0, "purchase", "shoes", 40.0),
    ("m1", "ann", 21.0, "view", "bags", 0.0),
    ("m1", "ann", 27.0, "cart", "bags", 0.0),
]
BOB: list[Row] = [
    ("m1", "bob", 27.5, "click", "toys", float("nan")),
    ("m1", "bob", 35.0, "purchase", "toys", 20.0),
    ("m1", "bob", 40.0, "view", "toys", 0.0),
]
CY: list[Row] = [
    ("m2", "cy", 20.0, "view", "shoes", 0.0),
    ("m2", "cy", 29.0, "purchase", "shoes", 15.0),
]


def frame(rows: list[Row]) -> pd.DataFrame:
    """A canonical event frame (the dtypes of ``common.schema``)."""
    m, u, d, e, c, v = zip(*rows, strict=True)
    return pd.DataFrame({
        "user_id": pd.Series(u, dtype=STRING),
        "timestamp": pd.Series([START + pd.Timedelta(days=x) for x in d],
                               dtype="datetime64[ns, UTC]"),
        "event": pd.Series(e, dtype=EVENT_DTYPE),
        "item_id": pd.Series([f"{x}-i" for x in c], dtype=STRING),
        "category_id": pd.Series(c, dtype=STRING),
        "merchant_id": pd.Series(m, dtype=STRING),
        "value": pd.Series(v, dtype="float64"),
    })


def interventions(rows: list[tuple[str, str, float, str, float]],
                  actions: tuple[str, ...] = CFG.actions) -> pd.DataFrame:
    m, u, d, a, p = zip(*rows, strict=True)
    return pd.DataFrame({
        "user_id": pd.Series(u, dtype=STRING),
        "timestamp": pd.Series([START + pd.Timedelta(days=x) for x in d],
                               dtype="datetime64[ns, UTC]"),
        "action": pd.Series(a, dtype=action_dtype(actions)),
        "propensity": pd.Series(p, dtype="float64"),
        "merchant_id": pd.Series(m, dtype=STRING),
    })


def row_of(snaps: Snapshots, user: str, day: float) -> int:
    """Index of ``user``'s snapshot at the cutoff ``day`` days after START."""
    at = (START + pd.Timedelta(days=day)).tz_localize(None).to_datetime64()
    rows = np.flatnonzero((snaps.user_id == user) & (snaps.cutoff == at))
    assert len(rows) == 1, f"expected one snapshot of {user} at day {day}, got {len(rows)}"
    return int(rows[0])


def static(snaps: Snapshots, row: int, name: str) -> float:
    return float(snaps.static[row, STATIC_FEATURES.index(name)])


def numeric(snaps: Snapshots, row: int, name: str) -> np.ndarray:
    return snaps.numeric[row, :, NUMERIC_FEATURES.index(name)]


EV = {e: i + 1 for i, e in enumerate(EVENT_TYPES)}  # model ids: 0 pads


# ------------------------------------------------------------ interest and labels


def test_cutoffs_of_the_hand_calendar() -> None:
    snaps, report = build_snapshots(frame(ANN + BOB), CFG)
    assert report.cutoffs == {"train": ["2025-01-29"], "val": ["2025-02-12"],
                              "test": ["2025-02-26"]}
    assert report.skipped_cutoffs == ["2025-02-05", "2025-02-19"]
    # ann is active at 28 and 42 (events in [14, 42)), not at 56; bob at all three.
    assert report.snapshots == {"train": 2, "val": 2, "test": 1}
    assert sorted(zip(snaps.split.tolist(), snaps.user_id.tolist(), strict=True)) == [
        (0, "ann"), (0, "bob"), (1, "ann"), (1, "bob"), (2, "bob")]


def test_interest_and_decay_by_hand() -> None:
    snaps, _ = build_snapshots(frame(ANN + BOB), CFG)
    e = math.exp
    # ann at T = 28, tau = 7: view@10, purchase@14, view@21, cart@27 (weights 1, 8, 1, 4)
    #   I(28) = 1 e^{-18/7} + 8 e^{-14/7} + 1 e^{-7/7} + 4 e^{-1/7}
    #         = 0.07643 + 1.08268 + 0.36788 + 3.46751 = 4.99450
    # nothing in [28, 42), so I(42) = I(28) e^{-14/7} = 0.67594 < 0.5 I(28): decays.
    ann_now = e(-18 / 7) + 8 * e(-2) + e(-1) + 4 * e(-1 / 7)
    ann_future = ann_now * e(-2)
    assert ann_now == pytest.approx(4.99450, abs=1e-5)
    r = row_of(snaps, "ann", T_TRAIN)
    assert snaps.interest_now[r] == pytest.approx(ann_now, rel=1e-6)
    assert snaps.interest[r] == pytest.approx(math.log1p(ann_future), rel=1e-6)
    assert snaps.decay[r] == 1.0

    # bob at T = 28: click@27.5 (w 2); later purchase@35 (w 8), view@40 (w 1).
    #   I(28) = 2 e^{-0.5/7}                                  = 1.86213
    #   I(42) = 2 e^{-14.5/7} + 8 e^{-7/7} + 1 e^{-2/7}       = 0.25201 + 2.94304 + 0.75148
    #         = 3.94652 >= 0.5 I(28): no decay.
    bob_now = 2 * e(-0.5 / 7)
    bob_future = 2 * e(-14.5 / 7) + 8 * e(-1) + e(-2 / 7)
    assert bob_future == pytest.approx(3.94652, abs=1e-5)
    r = row_of(snaps, "bob", T_TRAIN)
    assert snaps.interest_now[r] == pytest.approx(bob_now, rel=1e-6)
    assert snaps.interest[r] == pytest.approx(math.log1p(bob_future), rel=1e-6)
    assert snaps.decay[r] == 0.0

    # bob at T = 56 (test): I(56) = 2 e^{-28.5/7} + 8 e^{-21/7} + e^{-16/7}; I(70) the same
    # decayed by e^{-2}, so the label is 1.
    bob_56 = 2 * e(-28.5 / 7) + 8 * e(-3) + e(-16 / 7)
    r = row_of(snaps, "bob", T_TEST)
    assert snaps.interest_now[r] == pytest.approx(bob_56, rel=1e-6)
    assert snaps.interest[r] == pytest.approx(math.log1p(bob_56 * e(-2)), rel=1e-6)
    assert snaps.decay[r] == 1.0
    # The static log_interest is log1p(I(T)).
    assert static(snaps, r, "log_interest") == pytest.approx(math.log1p(bob_56), rel=1e-6)


def test_rho_moves_the_decay_threshold() -> None:
    # ann's ratio I(42) / I(28) = e^{-2} = 0.1353: decays with rho 0.5, not with rho 0.1.
    snaps, _ = build_snapshots(frame(ANN), replace(CFG, rho=0.1))
    assert snaps.decay[row_of(snaps, "ann", T_TRAIN)] == 0.0
    snaps, _ = build_snapshots(frame(ANN), replace(CFG, rho=0.14))
    assert snaps.decay[row_of(snaps, "ann", T_TRAIN)] == 1.0


def test_event_weights_enter_the_interest() -> None:
    # Purchase weight 0 removes ann's 8 e^{-2} term.
    snaps, _ = build_snapshots(frame(ANN), replace(CFG, weight_purchase=0.0))
    e = math.exp
    expected = e(-18 / 7) + e(-1) + 4 * e(-1 / 7)
    assert snaps.interest_now[row_of(snaps, "ann", T_TRAIN)] == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------- sequences


def test_sequence_is_pre_padded_with_documented_features() -> None:
    snaps, _ = build_snapshots(frame(ANN + BOB), CFG)  # max_len 6
    r = row_of(snaps, "ann", T_TRAIN)
    # 4 events before 28: two pads first, latest event last.
    np.testing.assert_array_equal(
        snaps.events[r], [0, 0, EV["view"], EV["purchase"], EV["view"], EV["cart"]])
    cats = snaps.categories[r]
    assert (cats[:2] == 0).all() and ((cats[2:] >= 1) & (cats[2:] <= 16)).all()
    shoes, bags = hash_categories(np.array(["shoes", "bags"], dtype=object), 16)
    np.testing.assert_array_equal(cats[2:], [shoes, shoes, bags, bags])
    h = np.log1p
    # gap: first event of the user 0, then 4 d, 7 d, 6 d = 96 h, 168 h, 144 h.
    np.testing.assert_allclose(numeric(snaps, r, "log_gap_hours"),
                               [0, 0, 0, h(96), h(168), h(144)], rtol=1e-6)
    # hours to the cutoff: 18 d, 14 d, 7 d, 1 d.
    np.testing.assert_allclose(numeric(snaps, r, "log_hours_to_cutoff"),
                               [0, 0, h(432), h(336), h(168), h(24)], rtol=1e-6)
    np.testing.assert_allclose(numeric(snaps, r, "log_value"), [0, 0, 0, h(40), 0, 0],
                               rtol=1e-6)

    # bob at 28: one click with a missing value (read as 0).
    r = row_of(snaps, "bob", T_TRAIN)
    np.testing.assert_array_equal(snaps.events[r], [0, 0, 0, 0, 0, EV["click"]])
    np.testing.assert_allclose(snaps.numeric[r, -1], [0, h(12), 0], rtol=1e-6)
    assert (snaps.numeric[r, :-1] == 0).all()


def test_sequence_keeps_the_last_max_len_events() -> None:
    snaps, _ = build_snapshots(frame(ANN), replace(CFG, max_len=3))
    r = row_of(snaps, "ann", T_TRAIN)
    np.testing.assert_array_equal(snaps.events[r], [EV["purchase"], EV["view"], EV["cart"]])
    # The purchase's gap is to the view at day 10, which fell out of the window: 4 d, not 0.
    np.testing.assert_allclose(numeric(snaps, r, "log_gap_hours"),
                               np.log1p([96, 168, 144]), rtol=1e-6)
    np.testing.assert_allclose(numeric(snaps, r, "log_hours_to_cutoff"),
                               np.log1p([336, 168, 24]), rtol=1e-6)


def test_static_features_by_hand() -> None:
    snaps, _ = build_snapshots(frame(ANN + BOB), CFG)
    r = row_of(snaps, "ann", T_TRAIN)
    h = math.log1p
    expected = {
        "log_n_view": h(2), "log_n_click": 0.0, "log_n_cart": h(1), "log_n_favorite": 0.0,
        "log_n_purchase": h(1),
        "log_recency_days": h(1),  # cart at 27
        "log_value_sum": h(40),
        "log_n_history": h(4),
        "log_tenure_days": h(18),  # first event at 10
        "log_n_categories": h(2),  # shoes, bags
    }
    for name, value in expected.items():
        assert static(snaps, r, name) == pytest.approx(value, rel=1e-6, abs=1e-7), name

    # ann at 42: the window [14, 42) drops the view at 10, the history keeps it.
    r = row_of(snaps, "ann", T_VAL)
    assert static(snaps, r, "log_n_view") == pytest.approx(h(1), rel=1e-6)
    assert static(snaps, r, "log_n_history") == pytest.approx(h(4), rel=1e-6)
    assert static(snaps, r, "log_recency_days") == pytest.approx(h(15), rel=1e-6)
    assert static(snaps, r, "log_tenure_days") == pytest.approx(h(32), rel=1e-6)


def test_fading_category_by_hand() -> None:
    # ann at 28, lookback 14 d (to day 14), tau 7 d:
    #   drop = w e^{-(14-t)/7} [t < 14] - w e^{-(28-t)/7}
    #   shoes: view@10  0.56472 - 0.07642;  purchase@14  0 - 1.08268   -> -0.594
    #   bags : view@21  0 - 0.36788;        cart@27      0 - 3.46751   -> -3.835
    snaps, _ = build_snapshots(frame(ANN), CFG)
    assert snaps.fading_category[row_of(snaps, "ann", T_TRAIN)] == "shoes"


# ------------------------------------------------------------------ no leakage


LATE_ANN: list[Row] = [
    ("m1", "ann", T_TRAIN - 0.5 / 86400, "favorite", "hats", 5.0),  # half a second before T
    ("m1", "ann", T_TRAIN, "purchase", "late", 99.0),  # exactly at T
    ("m1", "ann", T_TRAIN + 0.5 / 86400, "purchase", "late", 99.0),  # half a second after
    ("m1", "ann", T_TRAIN + 3, "cart", "late", 7.0),
]


def test_sequences_hold_only_events_strictly_before_the_cutoff() -> None:
    snaps, _ = build_snapshots(frame(ANN + LATE_ANN + BOB), CFG)
    r = row_of(snaps, "ann", T_TRAIN)
    # The favorite 0.5 s before T is the latest event; nothing at or after T follows.
    np.testing.assert_array_equal(
        snaps.events[r], [0, EV["view"], EV["purchase"], EV["view"], EV["cart"], EV["favorite"]])
    assert numeric(snaps, r, "log_hours_to_cutoff")[-1] == pytest.approx(np.log1p(0.5 / 3600),
                                                                         rel=1e-3)
    late = hash_categories(np.array(["late"], dtype=object), CFG.hash_buckets)[0]
    assert late not in snaps.categories[r]
    # Every valid position of every snapshot is strictly before its cutoff.
    valid = snaps.events > 0
    assert (numeric(snaps, slice(None), "log_hours_to_cutoff")[valid] > 0).all()
    assert (snaps.numeric[~valid] == 0).all() and (snaps.categories[~valid] == 0).all()
    # I(T) counts the favorite (3 e^{-0.5 s / 7 d}) but not the purchase at T.
    e = math.exp
    expected = e(-18 / 7) + 8 * e(-2) + e(-1) + 4 * e(-1 / 7) + 3 * e(-0.5 / (7 * DAY))
    assert snaps.interest_now[r] == pytest.approx(expected, rel=1e-6)


def test_events_at_or_after_the_cutoff_do_not_change_its_features() -> None:
    base, _ = build_snapshots(frame(ANN + BOB + CY), CFG)
    # Add events at and after T = 28 and rewrite bob's and cy's future events.
    future = [("m1", "bob", 35.0, "favorite", "books", 500.0),
              ("m1", "bob", 41.0, "cart", "books", 1.0),
              ("m2", "cy", 28.0, "purchase", "gifts", 30.0),
              ("m2", "cy", 33.0, "click", "gifts", 0.0)]
    changed_rows = ANN + LATE_ANN[1:] + BOB[:1] + future + CY[:1]
    changed, _ = build_snapshots(frame(changed_rows), CFG)
    b, c = base.split_part("train"), changed.split_part("train")
    assert len(b) == len(c) == 3
    for name in ("events", "categories", "numeric", "static", "interest_now",
                 "fading_category", "user_id", "merchant_id", "cutoff"):
        np.testing.assert_array_equal(getattr(b, name), getattr(c, name), err_msg=name)
    # The labels do look past T, so the edit was not a no-op.
    assert not np.array_equal(b.interest, c.interest)


# -------------------------------------------------------------------- splits


@pytest.mark.parametrize("cfg,days", [
    (CFG, 70.0),
    (CFG, 365.0),
    (replace(CFG, horizon_days=21, stride_days=3, val_cutoffs=3, test_cutoffs=2), 180.0),
    (replace(CFG, horizon_days=7, intervention_window_days=10, response_days=10), 120.0),
    (replace(CFG, observation_days=7, horizon_days=2, stride_days=1, tau_days=2,
             intervention_window_days=1, response_days=1), 40.0),
])
def test_split_label_windows_are_disjoint(cfg: SnapshotConfig, days: float) -> None:
    plan, skipped = plan_cutoffs(days * DAY, cfg)
    label = label_window(cfg)
    assert label == max(cfg.horizon_days,
                        cfg.intervention_window_days + cfg.response_days) * DAY
    assert len(plan["val"]) == cfg.val_cutoffs and len(plan["test"]) == cfg.test_cutoffs
    assert plan["train"]
    assert max(plan["train"]) + label <= min(plan["val"]) + 1e-6
    assert max(plan["val"]) + label <= min(plan["test"]) + 1e-6
    assert max(plan["test"]) + label <= days * DAY + 1e-6
    every = sorted(plan["train"] + plan["val"] + plan["test"] + skipped)
    np.testing.assert_allclose(np.diff(every), cfg.stride_days * DAY)
    assert every[0] == pytest.approx(cfg.observation_days * DAY)


def test_built_splits_respect_the_label_windows() -> None:
    snaps, _ = build_snapshots(frame(ANN + BOB + CY), CFG)
    label = np.timedelta64(int(label_window(CFG)), "s")
    cut = {s: snaps.split_part(s).cutoff for s in SPLITS}
    assert cut["train"].max() + label <= cut["val"].min()
    assert cut["val"].max() + label <= cut["test"].min()


def test_too_short_log_raises_data_error_naming_days() -> None:
    with pytest.raises(DataError, match=r"spans 40\.0 days.*days are needed"):
        plan_cutoffs(40 * DAY, CFG)
    short = replace(CFG, end="2025-02-15")  # 45 days: cutoffs 28 only
    with pytest.raises(DataError, match="days"):
        build_snapshots(frame(ANN + BOB), short)


# ------------------------------------------------------------- interventions


def test_interventions_attach_to_the_active_snapshot() -> None:
    iv = interventions([
        ("m1", "bob", 28.0, "coupon", 0.3),     # at T: train snapshot; purchase@35 = t + 7 d
        ("m1", "ann", 30.0, "push", 0.2),       # train snapshot; no purchase after -> 0
        ("m1", "ann", 31.0, "recommend", 0.6),  # same snapshot, later: the first one is kept
        ("m2", "cy", 29.0, "recommend", 0.4),   # purchase exactly at t is not a response
        ("m1", "bob", 42.0, "none", 0.25),      # val snapshot; nothing in (42, 49] -> 0
        ("m1", "bob", 36.0, "coupon", 0.3),     # latest cutoff 28 (35 skipped): 8 d > window
        ("m1", "ann", 56.0, "push", 0.2),       # ann has no snapshot at 56
        ("m1", "zed", 29.0, "push", 0.2),       # unknown user
        ("m2", "bob", 29.0, "push", 0.2),       # bob is a user of m1, not m2
    ])
    snaps, report = build_snapshots(frame(ANN + BOB + CY), CFG, iv)
    actions = list(CFG.actions)

    r = row_of(snaps, "bob", T_TRAIN)
    assert (snaps.action[r], snaps.activation[r]) == (actions.index("coupon"), 1.0)
    assert snaps.propensity[r] == pytest.approx(0.3)
    assert snaps.intervention[r] == 0

    r = row_of(snaps, "ann", T_TRAIN)
    assert (snaps.action[r], snaps.activation[r]) == (actions.index("push"), 0.0)
    assert snaps.propensity[r] == pytest.approx(0.2)
    assert snaps.intervention[r] == 1

    r = row_of(snaps, "cy", T_TRAIN)
    assert (snaps.action[r], snaps.activation[r]) == (actions.index("recommend"), 0.0)

    r = row_of(snaps, "bob", T_VAL)
    assert (snaps.action[r], snaps.activation[r], snaps.intervention[r]) == (0, 0.0, 4)

    # Rows without an intervention keep the defaults.
    for user, day in (("ann", T_VAL), ("bob", T_TEST)):
        r = row_of(snaps, user, day)
        assert (snaps.action[r], snaps.activation[r], snaps.propensity[r],
                snaps.intervention[r]) == (-1, 0.0, 1.0, -1)
    np.testing.assert_array_equal(snaps.activation_mask, snaps.action >= 0)

    assert report.interventions_unmatched == 4
    assert report.interventions_unobserved == 0
    assert report.activation_rows == {"train": 3, "val": 1, "test": 0}


def test_activation_window_is_right_closed_and_event_kind_matters() -> None:
    # bob's purchase is at day 35 = t + 7 d for an intervention at t = 28: inside (t, t + 7 d].
    iv = interventions([("m1", "bob", 28.0, "coupon", 0.3)])
    snaps, _ = build_snapshots(frame(ANN + BOB), CFG, iv)
    assert snaps.activation[row_of(snaps, "bob", T_TRAIN)] == 1.0
    # A response window of 6.99 d ends before the purchase.
    snaps, _ = build_snapshots(frame(ANN + BOB), replace(CFG, response_days=6.99), iv)
    assert snaps.action[row_of(snaps, "bob", T_TRAIN)] == CFG.actions.index("coupon")
    assert snaps.activation[row_of(snaps, "bob", T_TRAIN)] == 0.0
    # (29.5, 36.5] holds only cy's view at 31: a response for "any" event, not "purchase".
    cy_late = CY + [("m2", "cy", 31.0, "view", "shoes", 0.0)]
    iv = interventions([("m2", "cy", 29.5, "push", 0.2)])
    snaps, _ = build_snapshots(frame(ANN + cy_late), CFG, iv)
    assert snaps.activation[row_of(snaps, "cy", T_TRAIN)] == 0.0
    snaps, _ = build_snapshots(frame(ANN + cy_late), replace(CFG, reengage_event="any"), iv)
    assert snaps.activation[row_of(snaps, "cy", T_TRAIN)] == 1.0


def test_missing_propensity_falls_back_to_the_action_share() -> None:
    iv = interventions([("m1", "ann", 29.0, "push", float("nan")),
                        ("m1", "bob", 29.0, "coupon", 0.5),
                        ("m2", "cy", 29.0, "push", 0.0)])
    snaps, _ = build_snapshots(frame(ANN + BOB + CY), CFG, iv)
    # push is 2 of the 3 logged interventions.
    assert snaps.propensity[row_of(snaps, "ann", T_TRAIN)] == pytest.approx(2 / 3)
    assert snaps.propensity[row_of(snaps, "bob", T_TRAIN)] == pytest.approx(0.5)
    assert snaps.propensity[row_of(snaps, "cy", T_TRAIN)] == pytest.approx(2 / 3)


def test_unknown_action_raises() -> None:
    iv = interventions([("m1", "ann", 29.0, "sms", 0.5)], actions=(*CFG.actions, "sms"))
    with pytest.raises(DataError, match="sms"):
        build_snapshots(frame(ANN), CFG, iv)


# ------------------------------------------------------------ hashing, merchants


def test_hash_categories_is_stable_and_in_range() -> None:
    names = np.array(["shoes", "bags", "toys", "shoes", None, "c-017"], dtype=object)
    ids = hash_categories(names, 16)
    assert ids.dtype == np.int32 and ((ids >= 1) & (ids <= 16)).all()
    assert ids[0] == ids[3]
    # Independent of the other values and of their order; None is the default category.
    np.testing.assert_array_equal(hash_categories(names[::-1], 16), ids[::-1])
    assert hash_categories(np.array(["toys"], dtype=object), 16)[0] == ids[2]
    assert ids[4] == hash_categories(np.array(["all"], dtype=object), 16)[0]
    np.testing.assert_array_equal(hash_categories(pd.Series(names, dtype=STRING), 16), ids)
    assert (hash_categories(names, 1) == 1).all()
    # Spread: 200 names into 16 buckets use most buckets.
    many = hash_categories(np.array([f"c{i}" for i in range(200)], dtype=object), 16)
    assert len(np.unique(many)) >= 14


def test_hash_categories_is_the_same_in_another_process() -> None:
    names = ["shoes", "bags", "toys", "c-017"]
    here = hash_categories(np.array(names, dtype=object), 64).tolist()
    code = ("import numpy as np; from common.features import hash_categories; "
            f"print(hash_categories(np.array({names!r}, dtype=object), 64).tolist())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env, cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == str(here)


def test_per_merchant_build_equals_the_pooled_build() -> None:
    pooled, _ = build_snapshots(frame(ANN + BOB + CY), CFG)
    for merchant, rows in (("m1", ANN + BOB), ("m2", CY)):
        alone, _ = build_snapshots(frame(rows), CFG)
        part = pooled.merchant(merchant)
        assert len(alone) == len(part) > 0
        for f in dataclasses.fields(Snapshots):
            np.testing.assert_array_equal(getattr(alone, f.name), getattr(part, f.name),
                                          err_msg=f"{merchant}: {f.name}")


def test_per_merchant_build_equals_the_pooled_build_on_the_quick_federation() -> None:
    fed = generate_federation(synth_config_from_preset(load_preset("quick")), seed=1)
    days = int(load_preset("quick")["synthetic.days"])
    start = pd.Timestamp(load_preset("quick")["synthetic.start"])
    cfg = SnapshotConfig(start=str(start.date()), end=str((start + pd.Timedelta(days=days)).date()))
    pooled, report = build_snapshots(fed.events, cfg, fed.interventions)
    assert report.activation_rows["train"] > 0
    for merchant in fed.merchants["merchant_id"]:
        ev = fed.events[fed.events["merchant_id"] == merchant]
        iv = fed.interventions[fed.interventions["merchant_id"] == merchant]
        alone, _ = build_snapshots(ev, cfg, iv)
        part = pooled.merchant(merchant)
        assert len(alone) == len(part) > 0, merchant
        for f in dataclasses.fields(Snapshots):
            if f.name != "intervention":
                np.testing.assert_array_equal(getattr(alone, f.name), getattr(part, f.name),
                                              err_msg=f"{merchant}: {f.name}")
        # ``intervention`` is a row position in the frame passed in: the same rows by label.
        hit = alone.intervention >= 0
        np.testing.assert_array_equal(hit, part.intervention >= 0)
        np.testing.assert_array_equal(iv.index[alone.intervention[hit]],
                                      fed.interventions.index[part.intervention[hit]])


def test_events_outside_the_calendar_are_left_out() -> None:
    inside, _ = build_snapshots(frame(ANN + BOB), CFG)
    outside = [("m1", "ann", -3.0, "purchase", "old", 10.0),   # before start
               ("m1", "old", -5.0, "view", "old", 0.0),         # a user seen only before
               ("m1", "bob", 75.0, "purchase", "new", 10.0)]    # after end
    snaps, _ = build_snapshots(frame(outside + ANN + BOB), CFG)
    assert_same(snaps, inside)


def test_same_user_id_at_two_merchants_is_two_users() -> None:
    rows = ANN + [("m2", "ann", 26.0, "view", "shoes", 0.0)]
    snaps, _ = build_snapshots(frame(rows), CFG)
    train = snaps.split_part("train")
    assert sorted(zip(train.merchant_id, train.user_id, strict=True)) == [
        ("m1", "ann"), ("m2", "ann")]
    m2 = np.flatnonzero(train.merchant_id == "m2")[0]
    assert train.interest_now[m2] == pytest.approx(math.exp(-2 / 7), rel=1e-6)


# -------------------------------------------------------------- containers


def assert_same(a: Snapshots, b: Snapshots) -> None:
    for f in dataclasses.fields(Snapshots):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert x.dtype == y.dtype, f.name
        np.testing.assert_array_equal(x, y, err_msg=f.name)


def test_save_load_round_trip(tmp_path: Path) -> None:
    iv = interventions([("m1", "bob", 29.0, "coupon", 0.3)])
    snaps, _ = build_snapshots(frame(ANN + BOB + CY), CFG, iv)
    path = tmp_path / "snaps.npz"
    snaps.save(path)
    back = Snapshots.load(path)
    assert_same(snaps, back)
    assert all(isinstance(u, str) for u in back.user_id)


def test_subset_and_concat() -> None:
    snaps, _ = build_snapshots(frame(ANN + BOB + CY), CFG)
    # The builder emits rows split by split, so the parts concatenate back to the whole.
    assert_same(Snapshots.concat([snaps.split_part(s) for s in SPLITS]), snaps)
    mask = snaps.user_id == "bob"
    by_mask, by_index = snaps.subset(mask), snaps.subset(np.flatnonzero(mask))
    assert_same(by_mask, by_index)
    assert len(by_mask) == 3 and set(by_mask.user_id) == {"bob"}
    rev = snaps.subset(np.arange(len(snaps))[::-1])
    np.testing.assert_array_equal(rev.static, snaps.static[::-1])
    assert rev.inputs()["events"].shape == (len(snaps), CFG.max_len)
