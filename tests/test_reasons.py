"""Reasons per customer: a hand-built customer's figures, IG completeness, determinism and
the score table's reason columns."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from client.scoring import SCORE_COLUMNS, score_events
from common.config import ModelConfig, PolicyConfig, SnapshotConfig
from common.feature_groups import FEATURE_GROUPS, GROUP_NAMES
from common.model import build_model
from common.reasons import (
    REASON_CODES,
    REASON_COLUMNS,
    CategoryNames,
    Reference,
    customer_facts,
    explain,
    integrated_gradients,
    reasons_of,
)
from common.snapshots import unlabelled_snapshots
from simulations.synth import generate_federation, load_preset, synth_config_from_preset

SNAP = SnapshotConfig(max_len=16, hash_buckets=64, observation_days=28, tau_days=7,
                      horizon_days=14)
CUTOFF = pd.Timestamp("2025-03-01", tz="UTC")


def _hand_built() -> pd.DataFrame:
    """One customer: a purchase of c17 every 2 days from 40 to 22 days before the cutoff
    (10 purchases), its last purchase 22 days ago ... then only views of c3 (6 of them,
    every 3 days from 19.5 to 4.5 days before)."""
    rows = [(40 - 2 * k, "purchase", "c17", 10.0) for k in range(10)]  # 40 .. 22 days
    rows += [(19.5 - 3 * k, "view", "c3", 0.0) for k in range(6)]  # 19.5 .. 4.5 days
    return pd.DataFrame({
        "user_id": "u1", "merchant_id": "m1",
        "timestamp": [CUTOFF - pd.Timedelta(days=d) for d, *_ in rows],
        "event": [e for _, e, _, _ in rows], "category_id": [c for *_, c, _ in rows],
        "value": [v for *_, v in rows],
    })


def _interest(days_before: np.ndarray, weight: float, at: float) -> float:
    """Sum of weight * exp(-(at - t) / tau) over events before ``at`` (days before the
    cutoff: ``at`` = 0 now, 14 at the horizon before)."""
    age = days_before - at
    return float((weight * np.exp(-age[age > 0] / SNAP.tau_days)).sum())


def test_hand_built_customer_gets_its_reasons() -> None:
    events = _hand_built()
    snaps, _ = unlabelled_snapshots(events, CUTOFF, SNAP)
    assert len(snaps) == 1 and snaps.fading_category[0] == "c17"
    facts = customer_facts(snaps, SNAP, CategoryNames(events["category_id"], SNAP.hash_buckets))
    assert facts.purchase_days[0] == pytest.approx(22.0, abs=1e-3)
    assert facts.recency_days[0] == pytest.approx(4.5, abs=1e-3)
    # Per category, by hand: purchases weigh 8, views 1.
    bought = np.array([40 - 2 * k for k in range(10)], float)
    viewed = np.array([19.5 - 3 * k for k in range(6)])
    then_17, now_17 = _interest(bought, 8.0, 14.0), _interest(bought, 8.0, 0.0)
    # Only the last 16 events are in the sequence: the 10 purchases and 6 views all are.
    assert facts.cat_name[0, 0] == "c17"
    assert facts.cat_then[0, 0] == pytest.approx(then_17, rel=1e-4)
    assert facts.cat_now[0, 0] == pytest.approx(now_17, rel=1e-4)
    assert facts.interest_then[0] == pytest.approx(then_17 + _interest(viewed, 1.0, 14.0),
                                                   rel=1e-4)
    # Attributions that put recency, categories and activity first.
    groups = np.zeros((1, len(GROUP_NAMES)), np.float32)
    for g, v in (("recency", 0.3), ("categories", 0.2), ("activity", 0.1), ("value", -0.1)):
        groups[0, GROUP_NAMES.index(g)] = v
    reasons = reasons_of(facts, groups)
    assert reasons.codes[0] == ("inactive", "category_faded", "activity_drop")
    drop = round(100 * (then_17 - now_17) / then_17)
    # 1 event in the last 7 days vs 9 in the 3 weeks before it (the window starts at 28 days
    # before the cutoff, included).
    in_7d = int((viewed < 7).sum())
    before = (int(((viewed >= 7) & (viewed <= 28)).sum()) + int((bought <= 28).sum())) / 3
    assert reasons.texts[0][0] == "no purchase for 22 days"
    assert reasons.texts[0][1] == f"interest in category c17 faded (\u2212{drop} %)"
    assert reasons.texts[0][2].startswith(
        f"activity down {round(100 * (before - in_7d) / before)} % on the previous weeks")
    assert f"{then_17:.1f}\u2192{now_17:.1f}" in reasons.fading[0].split("|")[0]
    assert reasons.fading[0].startswith("c17 ")
    # Only groups that push the risk up speak (at least one always does).
    lowering = -np.abs(groups) - 0.01
    lowering[0, GROUP_NAMES.index("value")] = -0.001
    assert reasons_of(facts, lowering).codes[0] == ("spend_drop",)  # 40.00 before, 0 now


@pytest.fixture(scope="module")
def small() -> tuple:
    cfg = dataclasses.replace(synth_config_from_preset(load_preset("quick")),
                              num_merchants=2, users_median=30, min_users=10, days=60)
    events = generate_federation(cfg, seed=3).events
    at = events["timestamp"].max() + pd.Timedelta(seconds=1)
    snap = dataclasses.replace(SNAP, max_len=8, hash_buckets=16)
    snaps, _ = unlabelled_snapshots(events, at, snap)
    return events, snap, snaps


@pytest.mark.parametrize("bidirectional", [False, True])
def test_integrated_gradients_are_complete(small, bidirectional: bool) -> None:
    _, snap, snaps = small
    model = build_model(ModelConfig(lstm_units=8, dense_units=8, bidirectional=bidirectional),
                        snap, seed=1)
    ref = Reference.mean_of(snaps)
    width = int(model.input["static"].shape[-1])
    attr = integrated_gradients(model, snaps, Reference(ref.numeric, ref.static[:width]),
                                steps=64, batch=64)
    risk = model.predict_on_batch(snaps.inputs() | {"static": snaps.static[:, :width]})["decay"]
    np.testing.assert_allclose(attr.risk, risk, atol=1e-5)
    gap = np.abs(attr.risk - attr.reference_risk)
    assert gap.mean() > 1e-3  # the test says something
    # Sum of attributions = f(x) - f(reference), up to the quadrature's error.
    assert np.abs(attr.delta).mean() < 0.05 * gap.mean() + 1e-4
    # A step's attribution is zero at padding.
    assert np.all(attr.steps[snaps.events == 0] == 0)


def test_reasons_are_deterministic_for_a_seed(small) -> None:
    events, snap, snaps = small
    names = CategoryNames(events["category_id"], snap.hash_buckets)
    ref = Reference.mean_of(snaps)
    runs = [explain(build_model(ModelConfig(lstm_units=8, dense_units=8), snap, seed=5),
                    snaps, snap, ref, names).columns() for _ in range(2)]
    assert runs[0] == runs[1]
    codes = {c for row in runs[0]["reason_codes"] for c in row.split("|")}
    assert codes and codes <= set(REASON_CODES)


def test_score_output_has_reasons_for_users_at_risk(small) -> None:
    events, snap, _ = small
    model = build_model(ModelConfig(lstm_units=8, dense_units=8), snap, seed=2)
    risk = score_events(model, events, None, snap, PolicyConfig(), reasons="none")["decay_risk"]
    threshold = float(np.median(risk))
    scores = score_events(model, events, None, snap, PolicyConfig(risk_threshold=threshold),
                          reasons="at-risk")
    assert tuple(scores.columns) == SCORE_COLUMNS and set(REASON_COLUMNS) <= set(SCORE_COLUMNS)
    at_risk = scores["decay_risk"] >= threshold
    assert 0 < at_risk.sum() < len(scores)
    assert (scores.loc[at_risk, "reason_codes"] != "").all()
    assert (scores.loc[~at_risk, ["reasons", "reason_codes", "fading_categories"]] == "").all(
        axis=None)
    for codes, text in zip(scores.loc[at_risk, "reason_codes"], scores.loc[at_risk, "reasons"],
                           strict=True):
        assert 1 <= len(codes.split("|")) == len(text.split("; ")) <= 3
        assert set(codes.split("|")) <= set(REASON_CODES)


def test_score_explains_only_targeted_users_by_default(small, monkeypatch) -> None:
    import client.scoring as scoring

    events, snap, _ = small
    # Untrained: "shared" shifts start random, so actions' gains differ between users
    # (the default "response" shifts start at zero: every gain 0, nobody targeted).
    model = build_model(ModelConfig(lstm_units=8, dense_units=8, activation_shift="shared"),
                        snap, seed=2)
    risk = score_events(model, events, None, snap, PolicyConfig(), reasons="none")["decay_risk"]
    # At risk: half the users; targeted: the budget's 5 of them with the largest gain.
    policy = PolicyConfig(risk_threshold=float(np.median(risk)), budget=5, cost_recommend=0,
                          cost_coupon=0, cost_push=0)
    calls: list[int] = []
    explain_rows = scoring.reason_columns

    def counted(model, snaps, rows, *args, **kwargs):
        calls.append(len(rows))
        return explain_rows(model, snaps, rows, *args, **kwargs)

    monkeypatch.setattr(scoring, "reason_columns", counted)
    targeted = score_events(model, events, None, snap, policy)
    at_risk = score_events(model, events, None, snap, policy, reasons="at-risk")
    chosen = targeted["action"] != "none"
    risky = targeted["decay_risk"] >= policy.risk_threshold
    assert chosen.sum() == 5 and risky.sum() > 5
    assert calls == [5, risky.sum()]  # only the targets were attributed
    assert targeted.attrs["explained"] == 5 and at_risk.attrs["explained"] == risky.sum()
    assert (targeted.loc[chosen, "reason_codes"] != "").all()
    assert (targeted.loc[~chosen, list(REASON_COLUMNS)] == "").all(axis=None)
    # The same reasons as when every user at risk is explained (same reference).
    pd.testing.assert_frame_equal(targeted.loc[chosen], at_risk.loc[chosen])


def test_score_without_reasons_attributes_nothing(small, monkeypatch) -> None:
    import client.scoring as scoring
    import common.reasons.ig as ig

    def refuse(*args, **kwargs):
        raise AssertionError("no reason may be computed")

    monkeypatch.setattr(scoring, "reason_columns", refuse)
    monkeypatch.setattr(ig, "_compiled", refuse)
    events, snap, _ = small
    model = build_model(ModelConfig(lstm_units=8, dense_units=8), snap, seed=2)
    for reasons, policy in (("none", PolicyConfig(risk_threshold=0.0)),
                            # targeted, but no action pays: nobody is targeted
                            ("targeted", PolicyConfig(risk_threshold=0.0, value=0.0))):
        scores = score_events(model, events, None, snap, policy, reasons=reasons)
        assert len(scores) and scores.attrs["explained"] == 0
        assert (scores[list(REASON_COLUMNS)] == "").all(axis=None)
    with pytest.raises(ValueError, match="reasons: expected one of targeted, at-risk, none"):
        score_events(model, events, None, snap, PolicyConfig(), reasons="everyone")


def test_tabular_models_get_reasons_by_occlusion(small) -> None:
    from sklearn.linear_model import LinearRegression, LogisticRegression

    from common.reasons import group_attributions
    from common.tabular import TabularModel

    events, snap, snaps = small
    x = snaps.static
    label = (x[:, 6] > np.median(x[:, 6])).astype(int)  # log_recency_days
    model = TabularModel("lr", LogisticRegression().fit(x, label),
                         LinearRegression().fit(x, x[:, 0]),
                         tuple(0.1 for _ in snap.actions))
    ref = Reference.mean_of(snaps)
    groups = group_attributions(model, snaps, ref)
    # By hand for one group: the risk minus the risk with its columns at the reference.
    g = GROUP_NAMES.index("recency")
    cols = list(FEATURE_GROUPS[g].aggregate_columns(x.shape[1]))
    moved = x.copy()
    moved[:, cols] = ref.static[cols]
    expected = (model.decay.predict_proba(x)[:, 1] - model.decay.predict_proba(moved)[:, 1])
    np.testing.assert_allclose(groups[:, g], expected, atol=1e-6)
    for g, group in enumerate(FEATURE_GROUPS):  # a group without aggregates moves nothing
        if not group.aggregate_columns(x.shape[1]):
            assert np.all(groups[:, g] == 0), group.name
    scores = score_events(model, events, None, snap, PolicyConfig(risk_threshold=0.5),
                          reasons="at-risk")
    at_risk = scores["decay_risk"] >= 0.5
    assert at_risk.any() and (scores.loc[at_risk, "reason_codes"] != "").all()


def test_deleting_events_shifts_the_sequence_and_mends_the_gap() -> None:
    from simulations.explain import delete_steps, rank_stability

    snaps, _ = unlabelled_snapshots(_hand_built(), CUTOFF, SNAP)
    drop = np.zeros_like(snaps.events, dtype=bool)
    drop[0, -2] = True  # the view 7.5 days before the cutoff
    out = delete_steps(snaps, drop)
    assert (out.events[0] > 0).sum() == (snaps.events[0] > 0).sum() - 1
    np.testing.assert_array_equal(out.events[0, 1:-1], snaps.events[0, :-2])
    assert out.events[0, 0] == 0 and out.events[0, -1] == snaps.events[0, -1]
    # The last view's gap is now from the view 10.5 days before: 6 days, in log1p hours.
    assert np.expm1(out.numeric[0, -1, 0]) == pytest.approx(6 * 24, rel=1e-4)
    a = np.array([[0.3, 0.1, -0.2, 0.0, 0.5, 0.2], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    same = rank_stability(a, a * 2)
    assert same["spearman_mean"] == pytest.approx(1.0) and same["top_group_agreement"] == 1.0
    assert rank_stability(a, -a)["spearman_mean"] == pytest.approx(-1.0)


def test_quadrature_agreement_against_many_points(small) -> None:
    from simulations.explain import quadrature_agreement

    events, snap, snaps = small
    model = build_model(ModelConfig(lstm_units=8, dense_units=8), snap, seed=4)
    full = Reference.mean_of(snaps)
    ref = Reference(full.numeric, full.static[:int(model.input["static"].shape[-1])])
    facts = customer_facts(snaps, snap, CategoryNames(events["category_id"], snap.hash_buckets))
    rows = quadrature_agreement(model, snaps, ref, facts, points=(1, 4), exact=16)
    assert [r["points"] for r in rows] == [1, 4, 16]
    exact = rows[-1]
    assert exact["top_reason_agreement"] == exact["top3_reasons_agreement"] == 1.0
    # By hand for the midpoint rule: its reasons against the 16-point rule's.
    one = integrated_gradients(model, snaps, ref, steps=1)
    many = integrated_gradients(model, snaps, ref, steps=16)
    top = [a[:1] == b[:1] for a, b in zip(reasons_of(facts, one.groups).codes,
                                          reasons_of(facts, many.groups).codes, strict=True)]
    assert rows[0]["top_reason_agreement"] == pytest.approx(np.mean(top))
    assert rows[0]["completeness_gap"] == pytest.approx(np.abs(one.delta).mean(), rel=1e-5)
    # More points, a smaller gap.
    assert rows[0]["completeness_gap"] > rows[1]["completeness_gap"] > exact["completeness_gap"]
    # Each rule's top group, occluded, removes at most what the best group's occlusion does.
    from common.reasons.ig import occlude_groups

    occluded = occlude_groups(model, snaps, ref)
    best = occluded.max(axis=1).mean()
    for r, attr in ((rows[0], one), (rows[-1], many)):
        top = attr.groups.argmax(axis=1)
        assert r["top_group_occlusion_drop"] == pytest.approx(
            occluded[np.arange(len(snaps)), top].mean(), rel=1e-5)
        assert r["top_group_occlusion_drop"] <= r["largest_occlusion_drop"] + 1e-9
        assert r["largest_occlusion_drop"] == pytest.approx(best, rel=1e-5)


def test_occluding_a_group_moves_exactly_its_inputs_to_the_reference(small) -> None:
    """Groups without sequence embeddings, rebuilt by hand through the model's own inputs:
    the aggregate-only groups set their columns to the reference's, ``value`` also its
    numeric channel at the real steps."""
    from common.reasons.ig import occlude_groups
    from common.training import predict

    _, snap, snaps = small
    model = build_model(ModelConfig(lstm_units=8, dense_units=8), snap, seed=5)
    width = int(model.input["static"].shape[-1])
    snaps = dataclasses.replace(snaps, static=snaps.static[:, :width])
    full = Reference.mean_of(snaps)
    occluded = occlude_groups(model, snaps, full, batch=32)
    assert occluded.shape == (len(snaps), len(GROUP_NAMES)) and np.isfinite(occluded).all()
    risk = predict(model, snaps)["decay"]
    real = snaps.events > 0
    for name in ("interest", "activity", "value", "recency"):
        group = FEATURE_GROUPS[GROUP_NAMES.index(name)]
        static = snaps.static.copy()
        cols = list(group.aggregate_columns(width))
        static[:, cols] = full.static[cols]
        numeric = snaps.numeric.copy()
        for c in group.numeric:
            numeric[..., c] = np.where(real, full.numeric[c], numeric[..., c])
        moved = predict(model, dataclasses.replace(snaps, static=static, numeric=numeric))
        np.testing.assert_allclose(occluded[:, GROUP_NAMES.index(name)],
                                   risk - moved["decay"], atol=2e-5)


def test_overdue_needs_a_usual_gap_of_a_day_at_least() -> None:
    """Items of one basket make gaps of minutes: a day's absence is then not 'overdue'."""
    from types import SimpleNamespace

    from common.reasons.text import _overdue

    facts = SimpleNamespace(overdue=np.array([28.6, 3.0, 1.5]),
                            usual_gap_days=np.array([0.01, 4.0, 4.0]),
                            recency_days=np.array([1.0, 12.0, 6.0]))
    assert _overdue(facts, 0) is None  # type: ignore[arg-type]
    assert _overdue(facts, 1) == "last visit 12 days ago, 3.0\u00d7 the usual gap of 4 days"  # type: ignore[arg-type]
    assert _overdue(facts, 2) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("bidirectional", [False, True])
def test_the_scorers_attributions_are_the_full_ones(small, bidirectional: bool) -> None:
    from common.reasons.ig import group_ig

    _, snap, snaps = small
    model = build_model(ModelConfig(lstm_units=8, dense_units=8, bidirectional=bidirectional),
                        snap, seed=4)
    width = int(model.input["static"].shape[-1])
    ref = Reference.mean_of(snaps)
    ref = Reference(ref.numeric, ref.static[:width])
    for steps in (1, 4):
        full = integrated_gradients(model, snaps, ref, steps=steps, batch=32).groups
        fast = group_ig(model, snaps, ref, steps=steps, batch=32)
        assert np.abs(full).max() > 1e-4  # the test says something
        np.testing.assert_allclose(fast, full, rtol=1e-4, atol=1e-6)


def test_reasons_in_chunks_are_the_reasons_at_once(small) -> None:
    from common.reasons import reason_columns

    events, snap, snaps = small
    model = build_model(ModelConfig(lstm_units=8, dense_units=8), snap, seed=6)
    names = CategoryNames(events["category_id"], snap.hash_buckets)
    ref = Reference.mean_of(snaps)
    rows = np.arange(1, len(snaps), 2)
    whole = reason_columns(model, snaps, rows, snap, ref, names, chunk=len(snaps))
    parts = reason_columns(model, snaps, rows, snap, ref, names, chunk=3)
    for column in REASON_COLUMNS:
        assert (whole[column][rows] != "").all() and (whole[column][::2] == "").all() \
            or column == "fading_categories"
        np.testing.assert_array_equal(parts[column], whole[column])
    with pytest.raises(ValueError, match="reason points"):
        score_events(model, events, None, snap, PolicyConfig(), reason_points=3)


def test_a_category_drop_too_small_to_show_is_no_reason() -> None:
    """The category reason and the fading list agree: interest 0.04 -> 0.01 rounds to
    0.0 -> 0.0, so neither names the category; 2.0 -> 0.3 is named by both."""
    from types import SimpleNamespace

    from common.reasons.text import _category, fading_lists

    facts = SimpleNamespace(cat_bucket=[[5], [5]], cat_then=[[0.04], [2.0]],
                            cat_now=[[0.006], [0.3]], cat_name=[["DOG FOODS"], ["c17"]])
    assert _category(facts, 0) is None  # type: ignore[arg-type]
    assert _category(facts, 1) == "interest in category c17 faded (\u221285 %)"  # type: ignore[arg-type]
    assert fading_lists(facts) == ["", "c17 2.0\u21920.3"]  # type: ignore[arg-type]


@pytest.mark.slow
def test_explain_command_writes_its_figures_for_five_different_customers(tmp_path) -> None:
    """``fedecay explain`` end to end on a trained run: the deletion curve, the stability
    against a second model and five examples, each a different customer (a customer has
    a snapshot at each test cutoff)."""
    import json

    from simulations.cli import main

    runs = tmp_path / "runs"
    sets = ["--set", "synthetic.num-merchants=2", "--set", "synthetic.users-median=60",
            "--set", "train.epochs=1", "--set", f"experiment.output-dir={runs}"]
    assert main(["train", "--preset", "quick", *sets]) == 0
    [run] = runs.iterdir()
    assert main(["explain", str(run), "--second", str(run), "--users", "60"]) == 0
    result = json.loads((run / "explanations.json").read_text())  # beside model.keras
    assert [r["k"] for r in result["faithfulness"]["curve"]] == [1, 2, 3, 4, 5]
    assert result["stability"]["spearman_mean"] == pytest.approx(1.0)  # the same model
    who = [(e["merchant_id"], e["user_id"]) for e in result["examples"]]
    assert len(who) == 5 and len(set(who)) == 5
    assert all(e["reason_codes"] and e["reasons"] for e in result["examples"])


def test_activity_down_needs_a_usual_week_of_one_event_at_least() -> None:
    """0 events in the last 7 days against 0.1 a week before is the customer's habit, not
    a drop; against 3 a week it is."""
    from types import SimpleNamespace

    from common.reasons.text import _activity_drop

    facts = SimpleNamespace(weekly_before=np.array([0.1, 3.0]), events_7d=np.array([0.0, 0.0]))
    assert _activity_drop(facts, 0) is None  # type: ignore[arg-type]
    assert _activity_drop(facts, 1) == ("activity down 100 % on the previous weeks "  # type: ignore[arg-type]
                                        "(0 events in the last 7 days vs 3 a week before)")
