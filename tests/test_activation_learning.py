"""How activation is learned: the response features by hand, the contrast head's output
and loss on a hand-built batch, and an end-to-end check that the heads rank a planted
uplift above chance."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from helpers import hand_snapshots

from common.config import ModelConfig, SnapshotConfig, TrainConfig, from_flat
from common.features import (
    AGGREGATE_FEATURES,
    DAY,
    NUMERIC_FEATURES,
    RESPONSE_FEATURES,
    SortedLog,
    features_at,
)
from common.model import build_model, masked_activation_loss, model_inputs, num_actions
from common.training import fit, predict

CFG = SnapshotConfig(observation_days=7, max_len=8, hash_buckets=16, start="2025-01-01",
                     end="2025-03-01")


def _response(rows: list[tuple[str, str]], at_day: float = 10) -> dict[str, float]:
    """The response features at ``at_day`` of one user whose events (type, category)
    happen an hour apart on day 5."""
    ts = pd.Timestamp("2025-01-06", tz="UTC") + pd.to_timedelta(np.arange(len(rows)), "h")
    events = pd.DataFrame({"user_id": "u", "timestamp": ts, "merchant_id": "m",
                           "event": [e for e, _ in rows], "category_id": [c for _, c in rows],
                           "value": 0.0})
    feats = features_at(SortedLog.from_events(events, CFG), at_day * DAY, CFG)
    first = AGGREGATE_FEATURES.index(RESPONSE_FEATURES[0])
    return dict(zip(RESPONSE_FEATURES, feats.static[0, first:first + len(RESPONSE_FEATURES)],
                    strict=True))


def test_response_features_by_hand() -> None:
    # 6 views, 3 clicks (1 carted, 1 favourite), 1 purchase; categories a x5, b x4, c x2.
    rows = [("view", "a"), ("click", "a"), ("cart", "a"), ("purchase", "a"), ("view", "a"),
            ("view", "b"), ("click", "b"), ("favorite", "b"), ("view", "b"),
            ("view", "c"), ("click", "c"), ("view", "b")]
    r = _response(rows)
    assert r["top_category_share"] == pytest.approx(5 / 12)
    assert r["log_click_per_view"] == pytest.approx(math.log(4 / 8))
    assert r["log_favorite_per_click"] == pytest.approx(math.log(2 / 4))  # 3 - 1 carted
    assert r["log_purchase_per_cart"] == pytest.approx(math.log(2 / 3))


def test_response_features_of_a_purchase_only_log_are_constant_rates() -> None:
    r = _response([("purchase", "a"), ("purchase", "a"), ("purchase", "b")])
    assert r["top_category_share"] == pytest.approx(2 / 3)
    assert r["log_click_per_view"] == pytest.approx(math.log(1 / 2))
    assert r["log_favorite_per_click"] == pytest.approx(math.log(1 / 2))
    assert r["log_purchase_per_cart"] == pytest.approx(math.log(4 / 2))


SNAP = SnapshotConfig(max_len=4, hash_buckets=8)
A = len(SNAP.actions)


def _inputs(n: int, width: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"events": rng.integers(1, 6, (n, SNAP.max_len)).astype(np.int32),
            "categories": rng.integers(1, 9, (n, SNAP.max_len)).astype(np.int32),
            "numeric": rng.normal(size=(n, SNAP.max_len, len(NUMERIC_FEATURES))).astype(
                np.float32),
            "static": rng.normal(size=(n, width)).astype(np.float32)}


def test_contrast_head_output_and_loss_by_hand() -> None:
    model = build_model(ModelConfig(lstm_units=4, dense_units=4, activation_head="contrast"),
                        SNAP, seed=0)
    assert num_actions(model) == A
    base, shift = model.get_layer("activation_base"), model.get_layer("activation_shift")
    # Zero kernels: every row's control logit is the bias b, action a's is b + s_a.
    b, s = -1.0, np.array([0.5, -0.5, 2.0], np.float32)
    base.set_weights([np.zeros_like(base.kernel), np.array([b], np.float32)])
    shift.set_weights([np.zeros_like(shift.kernel), s])
    x = _inputs(3, int(model.input["static"].shape[-1]), np.random.default_rng(0))
    p = np.asarray(model.predict(x, verbose=0)["activation"])
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    expected = [sig(b), *(sig(b + v) for v in s)]
    np.testing.assert_allclose(p, np.tile(expected, (3, 1)), rtol=1e-5)
    # Rows logged with none (re-engaged), push (not) and nothing: the masked loss is the
    # mean cross-entropy over the two logged entries.
    y = np.array([[1, -1, -1, -1], [-1, -1, -1, 0], [-1, -1, -1, -1]], np.float32)
    by_hand = (-math.log(expected[0]) - math.log(1 - expected[3])) / 2
    loss = np.asarray(masked_activation_loss(y, p.astype(np.float32)))
    assert loss[0] == pytest.approx(by_hand, rel=1e-5)


def _planted(n: int, seed: int, split: int) -> tuple:
    """Snapshots whose push uplift is planted in the first response feature: push raises
    the re-engagement logit by 3 * x, every other action does nothing."""
    rng = np.random.default_rng(seed)
    L = SNAP.max_len
    static = rng.normal(size=(n, len(AGGREGATE_FEATURES))).astype(np.float32)
    snaps = hand_snapshots(
        rng, events=rng.integers(1, 6, (n, L)).astype(np.int32),
        categories=rng.integers(1, 9, (n, L)).astype(np.int32),
        numeric=rng.normal(size=(n, L, len(NUMERIC_FEATURES))).astype(np.float32),
        static=static, decay=rng.random(n) < 0.4, interest=rng.random(n), n_actions=A,
        split=split)
    x = static[:, AGGREGATE_FEATURES.index(RESPONSE_FEATURES[0])]
    snaps.action[:] = rng.integers(0, A, n)  # every row is a campaign row
    logit = -0.5 + np.where(snaps.action == SNAP.actions.index("push"), 3.0 * x, 0.0)
    snaps.activation[:] = rng.random(n) < 1 / (1 + np.exp(-logit))
    snaps.propensity[:] = 1 / A
    return snaps, x


@pytest.mark.slow
@pytest.mark.parametrize("head", ["contrast", "separate"])
def test_heads_rank_a_planted_uplift_above_chance(head: str) -> None:
    from sklearn.metrics import roc_auc_score

    train, _ = _planted(4000, 1, 0)
    val, _ = _planted(500, 2, 1)
    test, x = _planted(1000, 3, 2)
    model = build_model(ModelConfig(lstm_units=8, dense_units=8, learning_rate=1e-2,
                                    activation_head=head, jit_compile=False), SNAP, seed=0)
    assert model_inputs(model, test)["static"].shape[1] == model.input["static"].shape[-1]
    fit(model, train, val, TrainConfig(epochs=6, batch_size=128, patience=6), seed=0)
    p = predict(model, test)["activation"]
    uplift = p[:, SNAP.actions.index("push")] - p[:, 0]
    # The true push uplift is increasing in x: rank users by predicted uplift.
    auc = roc_auc_score(x > 0, uplift)
    assert auc > 0.75, auc


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


def test_response_shift_is_linear_in_the_standardised_response_columns() -> None:
    from common.features import STATIC_FEATURES

    # Not the defaults: the model standardises by the configured numbers.
    centre, scale = (0.5, -1.0, -1.2, -0.8), (0.25, 0.5, 0.4, 0.3)
    model = build_model(ModelConfig(lstm_units=4, dense_units=4, activation_shift="response",
                                    response_centre=centre, response_scale=scale,
                                    jit_compile=False), SNAP, seed=0)
    width = int(model.input["static"].shape[-1])
    rng = np.random.default_rng(1)
    x = _inputs(5, width, rng)
    # Built with a zero kernel: every row has the same shift per action.
    p = np.asarray(model.predict(x, verbose=0)["activation"], dtype=np.float64)
    shifts = _logit(p[:, 1:]) - _logit(p[:, :1])
    np.testing.assert_allclose(shifts, np.tile(shifts[:1], (5, 1)), atol=1e-4)
    # Small weights: the probabilities stay far from 0 and 1, where float32 loses the logit.
    kernel = (0.05 * rng.normal(size=(len(RESPONSE_FEATURES), A - 1))).astype(np.float32)
    bias = np.array([0.2, -0.1, 0.3], np.float32)
    model.get_layer("activation_shift").set_weights([kernel, bias])
    first = len(STATIC_FEATURES)
    z = (x["static"][:, first:first + len(RESPONSE_FEATURES)] - np.array(centre)) \
        / np.array(scale)
    p = np.asarray(model.predict(x, verbose=0)["activation"], dtype=np.float64)
    np.testing.assert_allclose(_logit(p[:, 1:]) - _logit(p[:, :1]), z @ kernel + bias,
                               rtol=1e-3, atol=1e-3)
    # Other aggregates and the sequence move the control logit, never the shifts.
    moved = {**x, "events": rng.integers(1, 6, x["events"].shape).astype(np.int32),
             "static": x["static"].copy()}
    moved["static"][:, :first] += 3.0
    q = np.asarray(model.predict(moved, verbose=0)["activation"], dtype=np.float64)
    assert np.abs(_logit(q[:, 0]) - _logit(p[:, 0])).max() > 1e-3
    np.testing.assert_allclose(_logit(q[:, 1:]) - _logit(q[:, :1]),
                               _logit(p[:, 1:]) - _logit(p[:, :1]), rtol=1e-3, atol=1e-3)


def test_activation_shift_is_checked() -> None:
    with pytest.raises(ValueError, match="model.activation-shift"):
        ModelConfig(activation_shift="trunk")


def test_response_standardisation_is_checked() -> None:
    from common.config import RESPONSE_WIDTH

    assert RESPONSE_WIDTH == len(RESPONSE_FEATURES)
    assert len(ModelConfig().response_centre) == len(ModelConfig().response_scale) == RESPONSE_WIDTH
    with pytest.raises(ValueError, match="model.response-centre.*expected 4 numbers"):
        ModelConfig(response_centre=(0.0, 1.0))
    with pytest.raises(ValueError, match="model.response-scale.*must be > 0"):
        ModelConfig(response_scale=(0.2, 0.0, 0.4, 0.3))
    with pytest.raises(ValueError, match="model.response-scale.*finite"):
        ModelConfig(response_scale=(0.2, float("inf"), 0.4, 0.3))
    flat = {"model.response-centre": "0.5,-1,-1.2,-0.8"}
    assert from_flat(ModelConfig, flat, "model").response_centre == (0.5, -1.0, -1.2, -0.8)
    # The separate head has no shifts: the key does not stop it from building.
    assert build_model(ModelConfig(lstm_units=4, dense_units=4, activation_head="separate",
                                   jit_compile=False), SNAP, seed=0)


def test_standardised_layer_refuses_mismatched_constants() -> None:
    from common.model import Standardised

    with pytest.raises(ValueError, match="columns 2:4 need 2"):
        Standardised(2, 4, [0.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="scales must be > 0"):
        Standardised(0, 2, [0.0, 0.0], [1.0, 0.0])


@pytest.mark.parametrize("through", [True, False])
def test_activation_loss_trains_the_trunk_only_when_asked(through: bool, tmp_path) -> None:
    import tensorflow as tf

    from common.model import load_model, save_model

    model = build_model(ModelConfig(lstm_units=4, dense_units=4, jit_compile=False,
                                    activation_trunk_gradient=through), SNAP, seed=0)
    x = _inputs(8, int(model.input["static"].shape[-1]), np.random.default_rng(2))
    y = np.full((8, A), -1.0, np.float32)
    y[np.arange(8), np.arange(8) % A] = np.arange(8) % 2
    trunk = model.get_layer("trunk").kernel
    head = model.get_layer("activation_base").kernel
    with tf.GradientTape(persistent=True) as tape:
        out = model(x, training=False)
        act = tf.reduce_mean(masked_activation_loss(y, out["activation"]))
        decay = tf.reduce_mean(out["decay"])
    assert float(tf.norm(tape.gradient(act, head))) > 0
    assert float(tf.norm(tape.gradient(decay, trunk))) > 0
    moved = tape.gradient(act, trunk)
    assert (moved is not None and float(tf.norm(moved)) > 0) == through
    save_model(model, tmp_path / "m.keras")  # the extra layers save and load
    again = load_model(tmp_path / "m.keras").predict(x, verbose=0)["activation"]
    np.testing.assert_allclose(again, np.asarray(out["activation"]), rtol=1e-5)


@pytest.mark.parametrize(("shift", "shift_patience"), [("response", 2), ("response", 0),
                                                       ("shared", 2)])
def test_fit_keeps_the_response_shifts_of_the_last_epoch(shift: str,
                                                         shift_patience: int) -> None:
    from common.model import response_shift_weights, weights_of

    train, _ = _planted(256, 1, 0)
    val, _ = _planted(64, 2, 1)
    # A large step on a tiny set: the validation loss is lowest early, then rises.
    model = build_model(ModelConfig(lstm_units=4, dense_units=4, learning_rate=0.05,
                                    activation_shift=shift, jit_compile=False), SNAP, seed=0)
    shifts = response_shift_weights(model)
    assert len(shifts) == (2 if shift == "response" else 0)
    seen: list[list[np.ndarray]] = []
    cfg = TrainConfig(epochs=12, batch_size=32, patience=1, shift_patience=shift_patience)
    res = fit(model, train, val, cfg, seed=0,
              on_epoch=lambda e, row: seen.append([w.copy() for w in weights_of(model)]))
    assert res.best_epoch < res.epochs  # otherwise nothing here could fail
    extra = shift_patience if shifts else 0
    assert res.epochs == 12 or res.epochs - res.best_epoch == 1 + 1 + extra
    kept = weights_of(model)
    for i, w in enumerate(kept):
        source = res.epochs if i in shifts and shift_patience else res.best_epoch
        np.testing.assert_array_equal(w, seen[source - 1][i], err_msg=f"weight {i}")
        np.testing.assert_array_equal(res.weights[i], w)
    if shifts and shift_patience:
        assert not np.array_equal(kept[shifts[0]], seen[res.best_epoch - 1][shifts[0]])


def test_shift_gain_multiplies_the_response_shifts(tmp_path) -> None:
    from common.model import load_model, save_model

    x = _inputs(4, int(build_model(ModelConfig(lstm_units=4, dense_units=4), SNAP)
                       .input["static"].shape[-1]), np.random.default_rng(3))
    kernel = np.full((len(RESPONSE_FEATURES), A - 1), 0.02, np.float32)
    bias = np.array([0.1, -0.2, 0.15], np.float32)
    shifts = {}
    for gain in (1.0, 3.0):
        model = build_model(ModelConfig(lstm_units=4, dense_units=4, jit_compile=False,
                                        activation_shift_gain=gain), SNAP, seed=0)
        model.get_layer("activation_shift").set_weights([kernel, bias])
        p = np.asarray(model.predict(x, verbose=0)["activation"], np.float64)
        shifts[gain] = _logit(p[:, 1:]) - _logit(p[:, :1])
    np.testing.assert_allclose(shifts[3.0], 3 * shifts[1.0], rtol=2e-3, atol=2e-4)
    save_model(model, tmp_path / "m.keras")
    again = load_model(tmp_path / "m.keras").predict(x, verbose=0)["activation"]
    np.testing.assert_allclose(again, p, rtol=1e-5)
    with pytest.raises(ValueError, match="model.activation-shift-gain"):
        ModelConfig(activation_shift_gain=0.0)
