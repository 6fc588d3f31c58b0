"""The one training loop: it learns, it is deterministic, it stops early, FedProx holds on.

One small model is built once per module; every test starts it from the same initial
weights. The data are hand-made snapshots whose decay label is the sign of one static
feature (10 % of the labels flipped), so a working loop must find it within a few epochs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf
from helpers import hand_snapshots
from sklearn.metrics import roc_auc_score

from common.config import ModelConfig, SnapshotConfig, TrainConfig
from common.features import AGGREGATE_FEATURES, NUMERIC_FEATURES, STATIC_FEATURES
from common.model import (
    build_model,
    model_inputs,
    set_weights_of,
    targets,
    weights_of,
    with_shifts_of,
)
from common.snapshots import Snapshots
from common.training import (
    VAL_BATCH,
    _batched,
    _epoch_function,
    _pack,
    _padded_order,
    _state_reset,
    _unpack,
    decay_sample_weights,
    evaluate,
    fit,
    predict,
    validation_loss,
)

SNAP = SnapshotConfig(max_len=8, hash_buckets=16)
MODEL = ModelConfig(lstm_units=8, dense_units=8, learning_rate=1e-2)
L, A = SNAP.max_len, len(SNAP.actions)
BATCH = 64
SIGNAL = STATIC_FEATURES.index("log_recency_days")


def make_snapshots(n: int, seed: int, *, noise: float = 0.1, flip: bool = False) -> Snapshots:
    """``n`` snapshots with decay = [static recency > 0], ``noise`` of the labels flipped."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, L + 1, n)
    valid = np.arange(L)[None, :] >= (L - lengths)[:, None]
    static = rng.normal(size=(n, len(AGGREGATE_FEATURES))).astype(np.float32)
    decay = (static[:, SIGNAL] > 0) ^ (rng.random(n) < noise)
    if flip:
        decay = ~decay
    return hand_snapshots(
        rng,
        events=np.where(valid, rng.integers(1, 6, (n, L)), 0).astype(np.int32),
        categories=np.where(valid, rng.integers(1, SNAP.hash_buckets + 1, (n, L)), 0)
        .astype(np.int32),
        numeric=np.where(valid[..., None], rng.normal(size=(n, L, len(NUMERIC_FEATURES))), 0)
        .astype(np.float32),
        static=static, decay=decay, interest=1.0 + 0.5 * static[:, 0], n_actions=A)


# 1500 is not a multiple of the batch: fit pads the last batch with zero-weight rows.
TRAIN = make_snapshots(1500, seed=1)
VAL = make_snapshots(500, seed=2)
TEST = make_snapshots(500, seed=3)


@pytest.fixture(scope="module")
def model_and_init():
    model = build_model(MODEL, SNAP, seed=0)
    return model, weights_of(model)


@pytest.fixture
def model(model_and_init):
    model, init = model_and_init
    model.set_weights(init)
    return model


def distance(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum((x - y) ** 2)) for x, y in zip(a, b, strict=True)))


# -------------------------------------------------------------------- learning


def test_loss_goes_down_and_decay_auc_beats_chance(model) -> None:
    before = evaluate(model, TEST)["decay_roc_auc"]
    seen: list[int] = []
    result = fit(model, TRAIN, None, TrainConfig(epochs=6, batch_size=BATCH),
                 seed=0, on_epoch=lambda epoch, row: seen.append(epoch))
    losses = [row["loss"] for row in result.history]
    assert seen == [1, 2, 3, 4, 5, 6] and result.epochs == 6 and result.best_epoch == 6
    assert losses[-1] < 0.8 * losses[0] and losses[-1] <= min(losses[:3]), losses
    assert result.train_loss == losses[-1] and math.isnan(result.val_loss)
    assert result.examples == len(TRAIN)
    after = evaluate(model, TEST)["decay_roc_auc"]
    # Labels are 90 % the sign of one feature: the Bayes AUC is about 0.9.
    assert after > 0.75 and after > before + 0.15, (before, after)


def test_same_seed_same_weights_other_seed_other_weights(model_and_init) -> None:
    model, init = model_and_init
    cfg = TrainConfig(epochs=2, batch_size=BATCH)

    def run(seed: int) -> list[np.ndarray]:
        model.set_weights(init)
        fit(model, TRAIN, None, cfg, seed=seed)
        return weights_of(model)

    first, other, again = run(0), run(1), run(0)  # a fit in between changes nothing
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert distance(first, other) > 1e-3
    assert distance(first, init) > 1e-3


def test_early_stopping_keeps_the_best_epoch(model) -> None:
    # Validation labels are the opposite of the training labels: the more the model learns,
    # the worse the validation loss, so with patience 0 it stops at epoch 2 and keeps epoch 1.
    anti = make_snapshots(len(VAL), seed=2, flip=True)
    cfg = TrainConfig(epochs=10, batch_size=BATCH, patience=0, shift_patience=0)
    result = fit(model, TRAIN, anti, cfg, seed=0)
    val = [row["val_loss"] for row in result.history]
    assert result.epochs < cfg.epochs, val
    assert result.epochs == result.best_epoch + 1  # patience 0: the first bad epoch stops it
    assert result.best_epoch == int(np.argmin(val)) + 1
    assert result.val_loss == min(val)
    assert result.train_loss == result.history[result.best_epoch - 1]["loss"]
    # The weights left in the model are those of the best epoch.
    assert validation_loss(model, anti) == pytest.approx(min(val), rel=1e-5)


def test_patience_waits_for_improvement(model) -> None:
    anti = make_snapshots(len(VAL), seed=2, flip=True)
    result = fit(model, TRAIN, anti, TrainConfig(epochs=10, batch_size=BATCH, patience=2,
                                                 shift_patience=0),
                 seed=0)
    assert result.epochs == min(result.best_epoch + 3, 10)


def test_proximal_term_keeps_weights_near_the_start(model_and_init) -> None:
    model, init = model_and_init
    moved = {}
    for mu in (0.0, 0.3, 10.0):
        model.set_weights(init)
        fit(model, TRAIN, None, TrainConfig(epochs=3, batch_size=BATCH, proximal_mu=mu), seed=0)
        moved[mu] = distance(weights_of(model), init)
    assert moved[0.0] > 1.0
    assert moved[10.0] < moved[0.3] < moved[0.0], moved
    assert moved[10.0] < 0.1 * moved[0.0], moved


# ------------------------------------------------------------------ evaluation


DECAY_KEYS = {f"decay_{k}" for k in ("roc_auc", "pr_auc", "log_loss", "precision", "recall",
                                     "f1", "top_decile_lift", "positive_rate", "n")}
INTEREST_KEYS = {"interest_mae", "interest_rmse", "interest_n"}


def test_evaluate_returns_the_documented_metrics(model) -> None:
    out = evaluate(model, TEST)
    assert set(out) == DECAY_KEYS | INTEREST_KEYS
    pred = predict(model, TEST)
    assert out["decay_n"] == len(TEST)
    assert out["decay_positive_rate"] == pytest.approx(TEST.decay.mean())
    assert out["decay_roc_auc"] == pytest.approx(roc_auc_score(TEST.decay, pred["decay"]))
    assert out["interest_mae"] == pytest.approx(
        np.mean(np.abs(TEST.interest - pred["interest"])), rel=1e-5)

    with_actions = evaluate(model, TEST, actions=SNAP.actions)
    extra = set(with_actions) - set(out)
    assert extra == {"activation_n_control", "activation_qini_mean",
                     *(f"activation_{k}_{a}" for a in SNAP.actions[1:] for k in ("qini", "n"))}
    assert with_actions["activation_n_coupon"] == int((TEST.action == 2).sum())


def test_predict_and_fit_edge_cases(model) -> None:
    empty = TEST.subset(np.zeros(len(TEST), bool))
    out = predict(model, empty)
    assert out["decay"].shape == (0,) and out["activation"].shape == (0, A)
    with pytest.raises(ValueError, match="no training snapshots"):
        fit(model, empty, None, TrainConfig())


def test_decay_sample_weights_by_hand() -> None:
    snaps = TEST.subset(np.arange(4))
    snaps.decay = np.array([1, 0, 0, 0], np.float32)
    # positive rate 1/4: positives weigh 0.5 / 0.25 = 2, negatives 0.5 / 0.75 = 2/3.
    np.testing.assert_allclose(decay_sample_weights(snaps, True), [2, 2 / 3, 2 / 3, 2 / 3],
                               rtol=1e-6)
    assert decay_sample_weights(snaps, False) is None
    snaps.decay = np.zeros(4, np.float32)
    assert decay_sample_weights(snaps, True) is None


# ------------------------------------------- one compiled call an epoch (a tiny shard)
# fit runs each epoch as one compiled call (starting weights, fresh optimizer state, the
# training steps, the validation loss, the weights read back): it must give what the
# separate calls give, step for step.

# 45 training rows (two batches of 32, the second padded) and 13 validation rows: a
# tiny merchant's shard.
SHARD = make_snapshots(45, seed=11)
SHARD_VAL = make_snapshots(13, seed=12)
SHARD_CFG = TrainConfig(epochs=3, batch_size=32, patience=5)


@pytest.fixture
def model_and_start(model_and_init):
    model, init = model_and_init
    return model, [w + np.float32(0.01) for w in init]  # not the model's own


def separate_calls(model, start: list[np.ndarray], seed: int
                   ) -> tuple[list[dict[str, float]], list[list[np.ndarray]]]:
    """The loop fit ran before the fusion: one compiled call per step kind; the losses
    and the weights after each epoch."""
    set_weights_of(model, start)
    _state_reset(model)(tf.constant(seed, tf.int64))
    rng = np.random.default_rng(seed)
    x_all, y_all = model_inputs(model, SHARD), targets(SHARD, len(SNAP.actions))
    history, weights = [], []
    for _ in range(SHARD_CFG.epochs):
        idx, live = _padded_order(rng.permutation(len(SHARD)), SHARD_CFG.batch_size, rng)
        x = {k: v[idx] for k, v in x_all.items()}
        y = {k: v[idx] for k, v in y_all.items()}
        y["activation"][~live] = -1.0
        real = live.astype(np.float32)
        sw = {"decay": real, "interest": real, "activation": real}
        logs = _epoch_function(model, "train")(*_batched(x, y, sw, SHARD_CFG.batch_size))
        history.append({"loss": float(logs["loss"]), "val_loss": validation_loss(model, SHARD_VAL)})
        weights.append(weights_of(model))
    return history, weights


def test_one_call_an_epoch_equals_the_separate_calls(model_and_start) -> None:
    model, start = model_and_start
    expected, after = separate_calls(model, start, seed=7)
    set_weights_of(model, [np.zeros_like(w) for w in start])  # fit must assign the start
    result = fit(model, SHARD, SHARD_VAL, SHARD_CFG, seed=7, initial=start)
    assert result.epochs == 3 and [r["epoch"] for r in result.history] == [1.0, 2.0, 3.0]
    for got, want in zip(result.history, expected, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-6)
    # fit keeps the best epoch's weights (by validation loss), not always the last's,
    # with the response shifts of the last epoch (train.shift-patience).
    best = min(range(3), key=lambda e: expected[e]["val_loss"])
    assert result.best_epoch == best + 1
    weights = with_shifts_of(model, after[best], after[-1])
    assert len(result.weights) == len(weights)
    for a, b in zip(result.weights, weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(weights_of(model), result.weights, strict=True):  # what the model holds
        np.testing.assert_array_equal(a, b)
    # The losses moved: the epochs trained (a check that cannot pass by doing nothing).
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_initial_weights_equal_setting_them_first(model_and_start) -> None:
    """With and without FedProx (whose anchor is the starting weights)."""
    model, start = model_and_start
    for mu in (0.0, 0.5):
        cfg = TrainConfig(epochs=2, batch_size=32, proximal_mu=mu)
        set_weights_of(model, start)
        first = fit(model, SHARD, SHARD_VAL, cfg, seed=3)
        set_weights_of(model, [w * 0 for w in start])
        given = fit(model, SHARD, SHARD_VAL, cfg, seed=3, initial=start)
        assert given.history == first.history, mu
        for a, b in zip(given.weights, first.weights, strict=True):
            np.testing.assert_array_equal(a, b)


def test_early_stopping_returns_and_keeps_the_best_weights(model_and_start) -> None:
    model, start = model_and_start
    anti = make_snapshots(len(SHARD_VAL), seed=12, flip=True)
    # The validation labels are the training labels flipped: the loss rises at once.
    cfg = TrainConfig(epochs=6, batch_size=32, patience=0, shift_patience=0)
    result = fit(model, make_snapshots(300, seed=13), anti, cfg, seed=0, initial=start)
    assert result.best_epoch < result.epochs
    for a, b in zip(weights_of(model), result.weights, strict=True):
        np.testing.assert_array_equal(a, b)
    assert validation_loss(model, anti) == pytest.approx(result.val_loss, rel=1e-5)


def test_a_small_validation_set_runs_on_its_real_rows_with_the_padded_loss(model) -> None:
    """13 rows: the model runs on a bucket of 16, the loss is the 128-row padded batch's;
    padding rows have zero weight in every head, so a 16-row batch gives the same mean
    over the real rows."""
    idx, live = _padded_order(np.arange(len(SHARD_VAL)), VAL_BATCH)
    x = {k: v[idx] for k, v in model_inputs(model, SHARD_VAL).items()}
    y = {k: v[idx] for k, v in targets(SHARD_VAL, len(SNAP.actions)).items()}
    y["activation"][~live] = -1.0
    w = live.astype(np.float32)
    logs = _epoch_function(model, "test")(
        *_batched(x, y, {"decay": w, "interest": w, "activation": w}, VAL_BATCH))
    padded = float(logs["loss"]) * VAL_BATCH / len(SHARD_VAL)
    assert validation_loss(model, SHARD_VAL) == pytest.approx(padded, rel=1e-5)
    sixteen = np.resize(np.arange(len(SHARD_VAL)), 16)
    x16 = {k: v[sixteen][None] for k, v in model_inputs(model, SHARD_VAL).items()}
    y16 = {k: v[sixteen][None] for k, v in targets(SHARD_VAL, len(SNAP.actions)).items()}
    w16 = (np.arange(16) < len(SHARD_VAL)).astype(np.float32)[None]
    y16["activation"][~w16.astype(bool)] = -1.0
    other = float(_epoch_function(model, "test")(
        x16, y16, {"decay": w16, "interest": w16, "activation": w16})["loss"]) * 16 / 13
    assert other == pytest.approx(padded, rel=1e-5)  # the padding is out of the loss


def test_packed_arrays_unpack_to_the_same_values_and_shapes() -> None:
    """The compiled epoch call takes one array per dtype (``_pack``) and unpacks it in
    its graph, the first dimension left open as in the call's trace."""
    rng = np.random.default_rng(5)
    x = {"events": rng.integers(0, 9, (3, 4, L)).astype(np.int32),
         "numeric": rng.normal(size=(3, 4, L, 2)).astype(np.float32),
         "static": rng.normal(size=(3, 4, 5)).astype(np.float32)}
    y = {"decay": rng.random((3, 4)).astype(np.float32),
         "activation": rng.random((3, 4, A)).astype(np.float32)}
    rows = np.arange(12, dtype=np.int32).reshape(3, 4)
    packed = _pack((x, y, rows), lead=2)
    assert [a.dtype for a in packed.arrays] == [np.int32, np.float32]
    assert [a.shape for a in packed.arrays] == [(3, 4, L + 1), (3, 4, 2 * L + 5 + 1 + A)]
    specs = tuple(tf.TensorSpec([None, *a.shape[1:]], a.dtype) for a in packed.arrays)
    unpack = tf.function(lambda *t: _unpack((packed.packing,), (t,)), input_signature=specs)
    got_x, got_y, got_rows = unpack(*packed.arrays)
    assert got_x["numeric"].shape == (3, 4, L, 2) and got_rows.dtype == tf.int32
    for got, want in [*((got_x[k], x[k]) for k in x), *((got_y[k], y[k]) for k in y),
                      (got_rows, rows)]:
        np.testing.assert_array_equal(got.numpy(), want)
    # The traced shapes: open steps, fixed rows a step (what the XLA step compiles for).
    graph = unpack.get_concrete_function().structured_outputs
    assert graph[0]["numeric"].shape.as_list() == [None, 4, L, 2]


def test_warm_up_fits_every_validation_layout_once(model_and_start, monkeypatch) -> None:
    """One fit per bucket of the single-batch validation and one of more than a batch
    (the fits themselves are recorded here, not run: ``test_work`` checks that a reply
    after a real warm-up is the same bits), over two epochs when more are asked (the
    later epochs' call is traced apart); once per model and configuration."""
    import common.training as training

    model, start = model_and_start
    sizes: list[tuple[int, int, int, bool]] = []

    def recorded(m, train, val, config, *, initial=None):
        assert m is model
        sizes.append((len(train), len(val), config.epochs, initial is start))

    monkeypatch.setattr(training, "fit", recorded)
    cfg = TrainConfig(epochs=3, batch_size=32, patience=1)
    assert training.warm_up(model, SHARD, cfg, initial=start)
    assert sizes == [(32, n, 2, True) for n in (16, 32, 64, 128, 129)]
    assert not training.warm_up(model, SHARD, cfg, initial=start)  # once
    assert training.warm_up(model, SHARD, cfg, initial=None)  # other traces
    assert sizes[5:] == [(32, n, 2, False) for n in (16, 32, 64, 128, 129)]
    one = TrainConfig(epochs=1, batch_size=16)
    assert training.warm_up(model, SHARD, one, initial=start)
    assert sizes[10:] == [(16, n, 1, True) for n in (16, 32, 64, 128, 129)]
