"""The Keras model: names and shapes, seeded weights, the masked loss, padding, saving."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from common.config import ModelConfig, SnapshotConfig
from common.features import NUMERIC_FEATURES
from common.model import (
    HEADS,
    build_model,
    cached_model,
    load_model,
    masked_activation_loss,
    num_actions,
    save_model,
    set_weights_of,
    static_width,
    targets,
    weights_of,
)
from common.snapshots import Snapshots

MODEL = ModelConfig(lstm_units=8, dense_units=8)
SNAP = SnapshotConfig(max_len=8, hash_buckets=16)
L, A = SNAP.max_len, len(SNAP.actions)


@pytest.fixture(scope="module")
def model():
    return build_model(MODEL, SNAP, seed=0)


def random_inputs(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Pre-padded sequences of lengths 0..L (row i has min(i, L) events)."""
    rng = np.random.default_rng(seed)
    lengths = np.minimum(np.arange(n), L)
    valid = np.arange(L)[None, :] >= (L - lengths)[:, None]
    events = np.where(valid, rng.integers(1, 6, (n, L)), 0).astype(np.int32)
    cats = np.where(valid, rng.integers(1, SNAP.hash_buckets + 1, (n, L)), 0).astype(np.int32)
    numeric = np.where(valid[..., None], rng.normal(size=(n, L, len(NUMERIC_FEATURES))), 0.0)
    return {"events": events, "categories": cats, "numeric": numeric.astype(np.float32),
            "static": rng.normal(size=(n, static_width(MODEL))).astype(np.float32)}


def predict(model, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in model.predict(x, verbose=0).items()}


# ----------------------------------------------------------------- structure


def test_input_and_head_names_and_shapes(model) -> None:
    assert sorted(t.name for t in model.inputs) == ["categories", "events", "numeric", "static"]
    assert sorted(model.output_names) == sorted(HEADS)
    assert num_actions(model) == A
    out = predict(model, random_inputs(5))
    assert set(out) == set(HEADS)
    assert out["decay"].shape == (5,) and out["interest"].shape == (5,)
    assert out["activation"].shape == (5, A)
    for head in ("decay", "activation"):  # sigmoid heads
        assert ((out[head] > 0) & (out[head] < 1)).all()


def test_compiled_weight_io_matches_keras_and_checks_shapes() -> None:
    model = build_model(MODEL, SNAP, seed=5)
    keras_view = model.get_weights()
    ours = weights_of(model)
    assert [w.shape for w in ours] == [w.shape for w in keras_view]
    for a, b in zip(ours, keras_view, strict=True):
        np.testing.assert_array_equal(a, b)
    # Setting moves the model's weights and leaves arrays read before untouched.
    moved = [w + np.float32(0.5) for w in keras_view]
    set_weights_of(model, [w.astype(np.float64) for w in moved])  # cast to the model's dtype
    for a, b in zip(model.get_weights(), moved, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(ours, keras_view, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="weight arrays for a model with"):
        set_weights_of(model, moved[:-1])
    bad = list(moved)
    bad[0] = bad[0].T if bad[0].ndim == 2 and bad[0].shape[0] != bad[0].shape[1] \
        else np.zeros(bad[0].shape + (2,), np.float32)
    with pytest.raises(ValueError, match="has shape"):
        set_weights_of(model, bad)
    for a, b in zip(model.get_weights(), moved, strict=True):  # a refused set changes nothing
        np.testing.assert_array_equal(a, b)


def test_equal_seeds_give_equal_weights() -> None:
    first = weights_of(build_model(MODEL, SNAP, seed=3))
    build_model(MODEL, SNAP, seed=4)  # building another model in between changes nothing
    again = weights_of(build_model(MODEL, SNAP, seed=3))
    other = weights_of(build_model(MODEL, SNAP, seed=4))
    assert len(first) == len(again) == len(other)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    # Every randomly initialised array differs with another seed (biases start at 0 or 1).
    random = [i for i, w in enumerate(first) if len(np.unique(w)) > 2]
    assert len(random) >= 8
    for i in random:
        assert not np.array_equal(first[i], other[i]), i


def test_cached_model_is_built_once() -> None:
    assert cached_model(MODEL, SNAP, 0) is cached_model(MODEL, SNAP, 0)
    assert cached_model(MODEL, SNAP, 0) is not cached_model(MODEL, SNAP, 1)


# -------------------------------------------------------------------- losses


def test_targets_put_the_outcome_at_the_logged_action() -> None:
    n = 3
    snaps = Snapshots(
        events=np.zeros((n, L), np.int32), categories=np.zeros((n, L), np.int32),
        numeric=np.zeros((n, L, 3), np.float32), static=np.zeros((n, 11), np.float32),
        decay=np.array([1, 0, 1], np.float32), interest=np.array([0.5, 1, 2], np.float32),
        interest_now=np.ones(n, np.float32), action=np.array([-1, 2, 0], np.int32),
        activation=np.array([0, 1, 0], np.float32), propensity=np.ones(n, np.float32),
        intervention=np.full(n, -1, np.int64), user_id=np.array(list("abc"), object),
        merchant_id=np.array(["m"] * n, object),
        cutoff=np.zeros(n, "datetime64[ns]"), split=np.zeros(n, np.int8),
        fading_category=np.array([""] * n, object),
    )
    y = targets(snaps, A)
    np.testing.assert_array_equal(y["activation"], [[-1, -1, -1, -1],
                                                    [-1, -1, 1, -1],
                                                    [0, -1, -1, -1]])
    np.testing.assert_array_equal(y["decay"], snaps.decay)
    np.testing.assert_array_equal(y["interest"], snaps.interest)


Y_TRUE = np.array([[-1, 1, -1, -1],
                   [-1, -1, -1, -1],   # no intervention: adds nothing
                   [0, -1, -1, -1],
                   [-1, -1, -1, 1]], np.float32)
Y_PRED = np.array([[0.1, 0.8, 0.2, 0.9],
                   [0.4, 0.4, 0.4, 0.4],
                   [0.3, 0.6, 0.7, 0.2],
                   [0.9, 0.1, 0.3, 0.5]], np.float32)


def masked_loss(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    return np.asarray(masked_activation_loss(y_true, y_pred))


def test_masked_activation_loss_by_hand() -> None:
    # Logged: (row 0, col 1) y=1 p=0.8; (row 2, col 0) y=0 p=0.3; (row 3, col 3) y=1 p=0.5.
    #   BCE = -ln 0.8, -ln 0.7, -ln 0.5 = 0.22314, 0.35667, 0.69315; mean 0.42432
    expected = (-math.log(0.8) - math.log(0.7) - math.log(0.5)) / 3
    assert expected == pytest.approx(0.42432, abs=1e-5)
    loss = masked_loss(Y_TRUE, Y_PRED)
    assert loss.shape == (4,)  # one value per row (the batch mean), as Keras expects
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_masked_activation_loss_ignores_unlogged_actions() -> None:
    rng = np.random.default_rng(1)
    shuffled = np.where(Y_TRUE >= 0, Y_PRED, rng.uniform(0.01, 0.99, Y_PRED.shape))
    np.testing.assert_allclose(masked_loss(Y_TRUE, shuffled.astype(np.float32)),
                               masked_loss(Y_TRUE, Y_PRED), rtol=1e-6)
    # A logged prediction does move it.
    moved = Y_PRED.copy()
    moved[0, 1] = 0.2
    assert masked_loss(Y_TRUE, moved)[0] > masked_loss(Y_TRUE, Y_PRED)[0] + 0.1
    # A batch without any intervention has zero loss.
    np.testing.assert_array_equal(masked_loss(np.full((3, A), -1, np.float32), Y_PRED[:3]), 0.0)


def test_compiled_model_uses_the_masked_activation_loss(model) -> None:
    x = random_inputs(4, seed=2)
    act = np.full((4, A), -1.0, np.float32)
    act[1, 2] = 1.0  # one logged outcome in the batch
    y = {"decay": np.array([0, 1, 0, 1], np.float32), "interest": np.zeros(4, np.float32),
         "activation": act}
    p = predict(model, x)["activation"]
    out = model.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)
    assert out["activation_loss"] == pytest.approx(-math.log(p[1, 2]), rel=1e-4)
    weighted = (MODEL.loss_weight_decay * out["decay_loss"]
                + MODEL.loss_weight_interest * out["interest_loss"]
                + MODEL.loss_weight_activation * out["activation_loss"])
    assert out["loss"] == pytest.approx(weighted, rel=1e-4)


def _compiled_loss(model, decay_true, decay_pred, interest_true, interest_pred, sw) -> float:
    """The compiled total loss of hand-made outputs (no logged action: activation adds 0)."""
    n = len(decay_true)
    as32 = lambda v: np.asarray(v, np.float32)  # noqa: E731
    y = {"decay": as32(decay_true), "interest": as32(interest_true),
         "activation": np.full((n, A), -1.0, np.float32)}
    y_pred = {"decay": as32(decay_pred), "interest": as32(interest_pred),
              "activation": np.full((n, A), 0.5, np.float32)}
    weights = {k: as32(sw) for k in HEADS}
    return float(model.compute_loss(x=None, y=y, y_pred=y_pred, sample_weight=weights))


def test_scalar_heads_weight_each_row(model) -> None:
    """Sample weights weight rows of the decay and interest losses (Keras' own losses on
    [N] outputs averaged the batch first, so a weight only scaled the batch mean)."""
    y, p, sw = [1, 0, 0, 0], [0.9, 0.2, 0.3, 0.1], [3, 1, 1, 1]
    bce = [-math.log(0.9), -math.log(0.8), -math.log(0.7), -math.log(0.9)]
    expected = sum(w * b for w, b in zip(sw, bce, strict=True)) / 4
    assert expected == pytest.approx(0.2503, abs=1e-4)
    got = _compiled_loss(model, y, p, [0] * 4, [0] * 4, sw)
    assert got == pytest.approx(MODEL.loss_weight_decay * expected, rel=1e-4)
    # The interest head likewise (Huber by default): errors 0.5, 3, 0, 0 give 0.125, 2.5.
    got = _compiled_loss(model, y, y, [0, 0, 0, 0], [0.5, 3, 0, 0], sw)
    assert got == pytest.approx(MODEL.loss_weight_interest * (3 * 0.125 + 2.5) / 4, rel=1e-4)


def test_zero_weight_rows_do_not_enter_the_loss(model) -> None:
    """Padding rows (weight 0) change the scalar heads' loss only by the batch size it is
    averaged over: whatever their targets and predictions."""
    rng = np.random.default_rng(5)
    y, p = rng.integers(0, 2, 6), rng.uniform(0.05, 0.95, 6)
    it, ip = rng.normal(size=6), rng.normal(size=6)
    real = _compiled_loss(model, y[:4], p[:4], it[:4], ip[:4], [1, 1, 1, 1]) * 4
    for seed in (6, 7):
        other = np.random.default_rng(seed)
        y[4:], p[4:] = other.integers(0, 2, 2), other.uniform(0.05, 0.95, 2)
        it[4:], ip[4:] = other.normal(size=2) * 5, other.normal(size=2) * 5
        padded = _compiled_loss(model, y, p, it, ip, [1, 1, 1, 1, 0, 0]) * 6
        assert padded == pytest.approx(real, rel=1e-5)


def test_squared_error_interest_loss_is_per_row_too() -> None:
    mse = build_model(dataclasses.replace(MODEL, interest_loss="mse"), SNAP, seed=0)
    # squared errors 0.25 and 9, weighted 2 and 1.
    got = _compiled_loss(mse, [0, 0], [0, 0], [0, 0], [0.5, 3.0], [2, 1])
    assert got == pytest.approx(MODEL.loss_weight_interest * (2 * 0.25 + 9) / 2, rel=1e-4)


# ------------------------------------------------------------------- padding


def test_padding_is_masked(model) -> None:
    x = random_inputs(12, seed=3)
    pad = x["events"] == 0
    assert pad.any() and (~pad).any()
    base = predict(model, x)

    rng = np.random.default_rng(4)
    noisy = {k: v.copy() for k, v in x.items()}
    noisy["numeric"][pad] = rng.normal(0, 5, (pad.sum(), len(NUMERIC_FEATURES)))
    noisy["categories"][pad] = rng.integers(1, SNAP.hash_buckets + 1, pad.sum())
    out = predict(model, noisy)
    for head in HEADS:
        np.testing.assert_allclose(out[head], base[head], rtol=1e-5, atol=1e-6, err_msg=head)


def test_valid_positions_change_only_their_row(model) -> None:
    x = random_inputs(12, seed=3)
    base = predict(model, x)
    touched = {k: v.copy() for k, v in x.items()}
    touched["numeric"][5, -1] += 3.0
    touched["categories"][5, -1] = touched["categories"][5, -1] % SNAP.hash_buckets + 1
    out = predict(model, touched)
    assert abs(out["decay"][5] - base["decay"][5]) > 1e-6
    np.testing.assert_allclose(np.delete(out["decay"], 5), np.delete(base["decay"], 5),
                               rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------- saving


def test_save_load_round_trip(model, tmp_path: Path) -> None:
    x = random_inputs(6, seed=5)
    path = tmp_path / "model.keras"
    save_model(model, path)
    assert path.exists() and [p.name for p in tmp_path.iterdir()] == ["model.keras"]
    back = load_model(path)
    assert num_actions(back) == A
    before, after = predict(model, x), predict(back, x)
    for head in HEADS:
        np.testing.assert_array_equal(after[head], before[head], err_msg=head)
    for a, b in zip(weights_of(model), weights_of(back), strict=True):
        np.testing.assert_array_equal(a, b)
    assert back.loss["activation"] is masked_activation_loss


def test_load_model_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.keras"):
        load_model(tmp_path / "nothing.keras")
