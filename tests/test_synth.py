"""The synthetic federation: determinism, schema, and that it models what it claims."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from common.config import from_flat
from common.schema import EVENT_TYPES, empty_events, empty_interventions
from simulations.settings import experiment_from_flat
from simulations.synth import (
    Federation,
    SynthConfig,
    available_presets,
    benchmark,
    generate_federation,
    load_preset,
    read_federation,
    synth_config_from_preset,
    write_federation,
)

# Enough users and campaigns for the statistical checks, still well under a second.
MEDIUM = SynthConfig(num_merchants=10, users_median=80, size_sigma=0.5, days=90)


@pytest.fixture(scope="module")
def quick_cfg() -> SynthConfig:
    return synth_config_from_preset(load_preset("quick"))


@pytest.fixture(scope="module")
def quick(quick_cfg: SynthConfig) -> Federation:
    return generate_federation(quick_cfg, seed=7)


@pytest.fixture(scope="module")
def medium() -> Federation:
    return generate_federation(MEDIUM, seed=3)


def _frames(fed: Federation) -> dict[str, pd.DataFrame]:
    return {n: getattr(fed, n) for n in ("events", "interventions", "truth", "users", "merchants")}


def _observed_reengagement(fed: Federation, response_days: int) -> np.ndarray:
    """Whether each intervention row is followed by a purchase within the response window."""
    iv = fed.interventions.reset_index(names="row").sort_values("timestamp")
    buys = fed.events.loc[fed.events["event"] == "purchase", ["user_id", "timestamp"]]
    buys = buys.rename(columns={"timestamp": "bought"}).sort_values("bought")
    nxt = pd.merge_asof(iv, buys, left_on="timestamp", right_on="bought", by="user_id",
                        direction="forward")
    hit = (nxt["bought"] < nxt["timestamp"] + pd.Timedelta(days=response_days)).to_numpy()
    out = np.zeros(len(iv), bool)
    out[nxt["row"].to_numpy()] = hit
    return out


def _js(p: np.ndarray, q: np.ndarray) -> float:
    m = (p + q) / 2

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        nz = a > 0
        return float((a[nz] * np.log(a[nz] / b[nz])).sum())

    return (kl(p, m) + kl(q, m)) / 2


def _merchant_category_js(fed: Federation) -> float:
    """Mean pairwise Jensen-Shannon divergence of merchants' observed category mixes."""
    tab = pd.crosstab(fed.events["merchant_id"], fed.events["category_id"]).to_numpy(float)
    tab = tab / tab.sum(axis=1, keepdims=True)
    return float(np.mean([_js(a, b) for a, b in itertools.combinations(tab, 2)]))


# ---------------------------------------------------------------- determinism, schema


def test_same_seed_same_frames_other_seed_differs(quick_cfg: SynthConfig) -> None:
    a, b = generate_federation(quick_cfg, seed=11), generate_federation(quick_cfg, seed=11)
    for name, frame in _frames(a).items():
        pd.testing.assert_frame_equal(frame, getattr(b, name), obj=name)
    c = generate_federation(quick_cfg, seed=12)
    assert not a.events.equals(c.events)
    assert not a.users["half_life_days"].equals(c.users["half_life_days"])


def test_event_and_intervention_dtypes(quick: Federation, quick_cfg: SynthConfig) -> None:
    assert dict(quick.events.dtypes) == dict(empty_events().dtypes)
    expected = dict(empty_interventions(quick_cfg.actions).dtypes)
    assert dict(quick.interventions.dtypes) == expected
    assert list(quick.truth.columns[:3]) == ["merchant_id", "user_id", "timestamp"]
    assert [c for c in quick.truth.columns if c.startswith("p_")] == [
        f"p_{a}" for a in quick_cfg.actions]


def test_events_sorted_and_consistent(quick: Federation) -> None:
    ev = quick.events
    assert ev.index.equals(pd.RangeIndex(len(ev)))
    resorted = ev.sort_values(["merchant_id", "user_id", "timestamp"], kind="stable")
    assert resorted.index.equals(ev.index)
    assert (ev["user_id"].str.split("-").str[0] == ev["merchant_id"]).all()
    is_buy = ev["event"] == "purchase"
    assert (ev.loc[is_buy, "value"] > 0).all() and (ev.loc[~is_buy, "value"] == 0).all()
    assert (ev["item_id"].str.split("-").str[0] == ev["category_id"]).all()
    start = pd.Timestamp("2025-01-01", tz="UTC")
    assert ev["timestamp"].min() >= start
    assert ev["timestamp"].max() < start + pd.Timedelta(days=91)


def test_every_purchase_follows_a_cart_of_the_same_item(quick: Federation) -> None:
    ev = quick.events
    buys = ev.loc[ev["event"] == "purchase", ["user_id", "item_id", "timestamp"]]
    carts = ev.loc[ev["event"] == "cart", ["user_id", "item_id", "timestamp"]]
    pairs = buys.reset_index().merge(carts, on=["user_id", "item_id"], suffixes=("", "_cart"))
    pairs = pairs[pairs["timestamp_cart"] < pairs["timestamp"]]
    assert pairs["index"].nunique() == len(buys)


def test_event_mix_is_a_funnel(medium: Federation) -> None:
    mix = medium.events["event"].value_counts(normalize=True)
    assert mix["view"] > 0.5
    assert mix["view"] > mix["click"] > mix["cart"] > mix["purchase"]
    assert 0.01 < mix["purchase"] < 0.08
    assert set(mix.index) == set(EVENT_TYPES)


# --------------------------------------------------------------- federation structure


def test_alpha_controls_how_different_merchants_category_mixes_are() -> None:
    base = SynthConfig(num_merchants=8, users_median=30, size_sigma=0.3, days=40)
    skewed = generate_federation(replace(base, alpha=0.1), seed=0)
    iid = generate_federation(replace(base, alpha=10.0), seed=0)
    assert _merchant_category_js(skewed) > 2 * _merchant_category_js(iid)
    assert skewed.merchants["category_entropy"].mean() < iid.merchants["category_entropy"].mean()


def test_size_sigma_controls_the_spread_of_merchant_sizes() -> None:
    base = SynthConfig(num_merchants=40, users_median=40, min_users=5, days=10)
    wide = generate_federation(replace(base, size_sigma=1.5), seed=0).merchants["users"]
    narrow = generate_federation(replace(base, size_sigma=0.1), seed=0).merchants["users"]
    assert np.log(wide).std() > 5 * np.log(narrow).std()
    assert wide.max() / wide.median() > 3  # a long tail of big shops, many small ones


def test_decay_spread_gives_merchants_different_decay_speeds() -> None:
    base = SynthConfig(num_merchants=6, users_median=20, days=10)
    same = generate_federation(base, seed=0).merchants["decay_multiplier"]
    spread = generate_federation(replace(base, decay_spread=0.5), seed=0).merchants
    assert np.allclose(same, 1.0)
    assert spread["decay_multiplier"].std() > 0.1


def test_interest_decays_faster_for_short_half_lives() -> None:
    # No campaigns and no churn: what is left is decay against self-reinforcement.
    cfg = replace(MEDIUM, campaign_every_days=1000, churn_rate=0.0)
    fed = generate_federation(cfg, seed=3)
    u, ev = fed.users, fed.events
    assert len(fed.interventions) == 0
    day = (ev["timestamp"] - pd.Timestamp("2025-01-01", tz="UTC")).dt.days
    first = ev[day < 45].groupby("user_id").size().reindex(u["user_id"], fill_value=0)
    second = ev[day >= 45].groupby("user_id").size().reindex(u["user_id"], fill_value=0)
    first, second = first.to_numpy(), second.to_numpy()
    keep = (u["join_day"] == 0).to_numpy()
    hl = u["half_life_days"].to_numpy()
    short = keep & (hl < np.quantile(hl[keep], 0.25))
    long = keep & (hl > np.quantile(hl[keep], 0.75))
    silent_short, silent_long = (second[short] == 0).mean(), (second[long] == 0).mean()
    assert silent_short > 0.4 and silent_short > silent_long + 0.3
    ratio = second / np.maximum(first, 1)
    assert np.median(ratio[short]) < 0.5 * np.median(ratio[long])
    # ... and yet a healthy share of users keeps its interest up by coming back.
    assert 0.2 < (second[keep] >= first[keep]).mean() < 0.8


def test_decay_labels_are_mixed(quick: Federation) -> None:
    """The downstream label I(T + 14 d) < 0.5 I(T) (tau 7 d) is neither rare nor universal."""
    w = {"view": 1.0, "click": 2.0, "cart": 4.0, "favorite": 3.0, "purchase": 8.0}
    ev = quick.events
    t = ((ev["timestamp"] - pd.Timestamp("2025-01-01", tz="UTC")).dt.total_seconds()
         / 86_400).to_numpy()
    wt = ev["event"].astype(str).map(w).to_numpy(float)
    uid = ev["user_id"].astype("category").cat.codes.to_numpy()
    n = uid.max() + 1

    def interest(at: float) -> np.ndarray:
        m = t < at
        return np.bincount(uid[m], wt[m] * np.exp(-(at - t[m]) / 7), minlength=n)

    labels = []
    for cut in (35, 49, 63):
        seen = np.bincount(uid[(t >= cut - 28) & (t < cut)], minlength=n) > 0
        labels.append((interest(cut + 14) < 0.5 * interest(cut))[seen])
    rate = np.concatenate(labels).mean()
    assert 0.15 < rate < 0.85


# ---------------------------------------------------------------- campaigns and truth


def test_campaigns_are_randomised_with_the_configured_propensities(
        medium: Federation) -> None:
    iv = medium.interventions
    props = dict(zip(MEDIUM.actions, MEDIUM.propensities, strict=True))
    assert (iv["propensity"] == iv["action"].astype(str).map(props)).all()
    shares = iv["action"].value_counts(normalize=True)
    for action, p in props.items():
        assert abs(shares[action] - p) < 4 * np.sqrt(p * (1 - p) / len(iv))
    # Campaign days only, and a user's response windows never overlap.
    days = (iv["timestamp"] - pd.Timestamp("2025-01-01", tz="UTC")).dt.days
    assert (days % MEDIUM.campaign_every_days == 0).all()
    gaps = iv.groupby("user_id")["timestamp"].diff().dropna()
    assert (gaps > pd.Timedelta(days=MEDIUM.response_days)).all()
    # Targeted users had joined and not churned.
    u = medium.users.set_index("user_id").loc[iv["user_id"]]
    assert (u["join_day"].to_numpy() <= days.to_numpy()).all()
    assert (u["churn_day"].to_numpy() > days.to_numpy()).all()


def test_observed_outcome_equals_the_drawn_one(medium: Federation) -> None:
    observed = _observed_reengagement(medium, MEDIUM.response_days)
    np.testing.assert_array_equal(observed, medium.truth["reengaged"].to_numpy())
    assert 0.05 < observed.mean() < 0.6


def test_truth_is_calibrated_against_the_logged_outcomes(medium: Federation) -> None:
    iv, truth = medium.interventions, medium.truth
    observed = _observed_reengagement(medium, MEDIUM.response_days)
    for action in MEDIUM.actions:
        rows = (iv["action"] == action).to_numpy()
        p = truth.loc[rows, f"p_{action}"].to_numpy()
        se = np.sqrt((p * (1 - p)).sum()) / rows.sum()
        assert abs(observed[rows].mean() - p.mean()) < 4 * se + 0.01, action
    # Higher true probability, more re-engagement: compare the extreme quartiles.
    logged = truth.filter(like="p_").to_numpy()[np.arange(len(iv)), iv["action"].cat.codes]
    low, high = logged < np.quantile(logged, 0.25), logged > np.quantile(logged, 0.75)
    assert observed[high].mean() > observed[low].mean() + 0.2


def test_best_action_differs_by_user_and_follows_the_traits(medium: Federation) -> None:
    truth = medium.truth
    p = truth[[f"p_{a}" for a in MEDIUM.actions]].to_numpy()
    best = np.bincount(p.argmax(axis=1), minlength=len(MEDIUM.actions)) / len(p)
    assert (best > 0.05).sum() >= 3, best
    assert best.max() < 0.8, best
    traits = medium.users.set_index("user_id").loc[truth["user_id"]]
    lift = {a: p[:, i] - p[:, 0] for i, a in enumerate(MEDIUM.actions)}
    assert np.corrcoef(lift["coupon"], traits["price_sensitivity"])[0, 1] > 0.3
    assert np.corrcoef(lift["push"], traits["push_affinity"])[0, 1] > 0.3
    assert np.corrcoef(lift["recommend"], traits["top_category_share"])[0, 1] > 0.3
    assert (lift["push"] < 0).mean() > 0.2  # pushing annoys a good share of users


# -------------------------------------------------------------------- config, presets


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"num_merchants": 0}, "synthetic.num-merchants"),
        ({"alpha": 0.0}, "synthetic.alpha"),
        ({"size_sigma": -1.0}, "synthetic.size-sigma"),
        ({"campaign_share": 1.5}, "synthetic.campaign-share"),
        ({"churn_rate": 1.0}, "synthetic.churn-rate"),
        ({"start": "yesterday-ish"}, "synthetic.start"),
        ({"actions": ("recommend", "none")}, "synthetic.actions"),
        ({"actions": ("none", "teleport"), "propensities": (0.5, 0.5)}, "synthetic.actions"),
        ({"propensities": (0.5, 0.5, 0.5, 0.5)}, "synthetic.propensities"),
        ({"propensities": (0.5, 0.5)}, "synthetic.propensities"),
        ({"users_median": 10**8}, "synthetic.users-median.*GiB to generate"),
        ({"num_merchants": 10**6, "days": 365}, "synthetic.users-median.*num-merchants=1000000"),
    ],
)
def test_invalid_config_names_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        SynthConfig(**overrides)


def test_expected_size_is_near_what_the_generator_makes() -> None:
    cfg = SynthConfig(num_merchants=8, users_median=60, days=60)
    fed = generate_federation(cfg, seed=0)
    users, events = cfg.expected_size()
    assert 0.5 < len(fed.users) / users < 2 and 0.5 < len(fed.events) / events < 2


def test_config_from_flat_keys() -> None:
    cfg = from_flat(SynthConfig, {"synthetic.num-merchants": 3, "synthetic.actions": "none,push",
                                  "synthetic.propensities": "0.5,0.5", "model.x": 1}, "synthetic")
    assert (cfg.num_merchants, cfg.actions, cfg.propensities) == (3, ("none", "push"), (0.5, 0.5))
    with pytest.raises(ValueError, match="synthetic.bogus"):
        synth_config_from_preset({"synthetic.bogus": 1})


def test_presets_load_and_build_configs(tmp_path) -> None:
    assert {"quick", "default", "large"} <= set(available_presets())
    sizes = {}
    for name in ("quick", "default", "large"):
        flat = load_preset(name)
        assert any(k.startswith("synthetic.") for k in flat)
        experiment_from_flat(flat)  # every section of the preset validates
        sizes[name] = synth_config_from_preset(flat).num_merchants
    assert sizes["quick"] < sizes["default"] < sizes["large"]
    path = tmp_path / "mine.toml"
    path.write_text("[synthetic]\nnum-merchants = 4\n")
    assert synth_config_from_preset(load_preset(str(path))).num_merchants == 4


def test_unknown_preset_lists_the_available_ones() -> None:
    with pytest.raises(ValueError, match="nope") as err:
        load_preset("nope")
    for name in ("quick", "default", "large"):
        assert name in str(err.value)


# ------------------------------------------------------------------------------- I/O


def test_write_read_round_trip(quick: Federation, tmp_path) -> None:
    paths = write_federation(quick, tmp_path / "fed")
    assert set(paths) == {"events", "interventions", "truth", "users", "merchants"}
    assert all(p.is_file() and p.is_absolute() for p in paths.values())
    back = read_federation(tmp_path / "fed")
    for name, frame in _frames(quick).items():
        pd.testing.assert_frame_equal(getattr(back, name), frame, obj=name)


def test_read_missing_file_names_it(tmp_path) -> None:
    with pytest.raises(ValueError, match="events.parquet"):
        read_federation(tmp_path)


def test_summary_and_benchmark(quick: Federation) -> None:
    text = quick.summary()
    for word in ("merchants", "users", "events", "event mix", "purchase", "campaigns",
                 "median"):
        assert word in text
    assert f"{len(quick.events):,}" in text
    tiny = SynthConfig(num_merchants=2, users_median=10, min_users=5, days=15)
    result = benchmark(tiny, seed=0, repeat=1)
    assert result["events"] == len(generate_federation(tiny, 0).events)
    assert result["seconds"] > 0 and result["events_per_s"] > 0
