"""One message per round: a train reply scores the incoming global model before training.

A tiny model on hand-made snapshots: the pre-training metrics of ``train_reply`` must be
what an evaluate of the same weights on the same rows gives, computed here by hand from
the model's own predictions, and asking for them must not change the trained weights.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import hand_snapshots

from client.app import EVALUATE_METRICS, TRAIN_METRICS
from client.config import ClientConfig, ClientSettings
from common.config import ModelConfig, SnapshotConfig, TrainConfig
from common.features import AGGREGATE_FEATURES, NUMERIC_FEATURES
from common.model import build_model, weights_of
from common.snapshots import Snapshots
from common.snapshots.container import SPLITS

SNAP = SnapshotConfig(max_len=4, hash_buckets=8)
SETTINGS = ClientSettings(snapshots=SNAP, model=ModelConfig(lstm_units=4, dense_units=4),
                          train=TrainConfig(epochs=1, batch_size=16),
                          client=ClientConfig(), seed=5)


def _snapshots(n: int, split: str, seed: int) -> Snapshots:
    rng = np.random.default_rng(seed)
    L = SNAP.max_len
    return hand_snapshots(
        rng,
        events=rng.integers(1, 6, (n, L)).astype(np.int32),
        categories=rng.integers(1, SNAP.hash_buckets + 1, (n, L)).astype(np.int32),
        numeric=rng.normal(size=(n, L, len(NUMERIC_FEATURES))).astype(np.float32),
        static=rng.normal(size=(n, len(AGGREGATE_FEATURES))).astype(np.float32),
        decay=rng.random(n) < 0.4, interest=rng.random(n),
        n_actions=len(SNAP.actions), split=SPLITS.index(split))


SNAPS = Snapshots.concat([_snapshots(40, "train", 1), _snapshots(13, "val", 2),
                          _snapshots(11, "test", 3)])


@pytest.fixture(scope="module")
def global_weights() -> list[np.ndarray]:
    return weights_of(build_model(SETTINGS.model, SNAP, seed=11))


def test_pre_training_metrics_are_an_evaluate_of_the_incoming_weights(
        global_weights: list[np.ndarray]) -> None:
    from client.work import evaluate_reply, train_reply
    from common.protocol import VALIDATION_METRICS
    from common.training import predict, validation_loss
    from server.rounds import federated_scores

    config = {"global-round": 3, "local-epochs": 1, "pre-evaluate": True}
    trained, metrics = train_reply(SETTINGS, SNAPS, global_weights, config)
    evaluated = evaluate_reply(SETTINGS, SNAPS.split_part("test"), global_weights)

    reference = build_model(SETTINGS.model, SNAP, seed=0)  # another model, same weights
    reference.set_weights(global_weights)
    val, test = SNAPS.split_part("val"), SNAPS.split_part("test")
    p = np.clip(predict(reference, test)["decay"], 1e-7, 1 - 1e-7)
    by_hand = -np.mean([math.log(pi) if yi else math.log(1 - pi)
                        for pi, yi in zip(p, test.decay, strict=True)])

    assert metrics["val_examples"] == 13 and metrics["test_examples"] == 11
    assert metrics["pre_val_loss"] == pytest.approx(validation_loss(reference, val), rel=1e-5)
    assert metrics["pre_eval_loss"] == pytest.approx(evaluated["eval_loss"], rel=1e-5)
    assert metrics["pre_decay_log_loss"] == pytest.approx(by_hand, rel=1e-5)
    assert metrics["pre_decay_log_loss"] == pytest.approx(evaluated["decay_log_loss"], rel=1e-5)
    # The last round's evaluate message asks for the same validation score.
    scored = evaluate_reply(SETTINGS, test, global_weights, val=val)
    assert scored["pre_val_loss"] == pytest.approx(metrics["pre_val_loss"], rel=1e-5)
    assert scored["val_examples"] == 13
    assert set(scored) - set(evaluated) == set(VALIDATION_METRICS)
    # The incoming model was scored, not the trained one: training moved the weights.
    assert not all(np.array_equal(a, b) for a, b in zip(trained, global_weights, strict=True))
    assert set(metrics) <= set(TRAIN_METRICS), set(metrics) - set(TRAIN_METRICS)
    assert set(scored) <= set(EVALUATE_METRICS), set(scored) - set(EVALUATE_METRICS)
    # What the server makes of the reply (both sides read common.protocol's table).
    assert federated_scores([metrics]) == pytest.approx({
        "val_loss": metrics["pre_val_loss"], "val_examples": 13, "merchants": 1,
        "eval_loss": metrics["pre_eval_loss"], "test_examples": 11,
        "decay_log_loss": metrics["pre_decay_log_loss"]})
    assert federated_scores([scored])["val_loss"] == pytest.approx(metrics["pre_val_loss"])


def test_asking_for_the_pre_training_metrics_leaves_the_training_as_it_was(
        global_weights: list[np.ndarray]) -> None:
    from client.work import PRE_TRAINING_METRICS, train_reply

    config = {"global-round": 2, "local-epochs": 1}
    plain_w, plain = train_reply(SETTINGS, SNAPS, global_weights, config)
    both_w, both = train_reply(SETTINGS, SNAPS, global_weights, {**config, "pre-evaluate": 1})
    assert not set(PRE_TRAINING_METRICS) & set(plain)
    assert set(both) == set(plain) | set(PRE_TRAINING_METRICS)
    for a, b in zip(plain_w, both_w, strict=True):
        np.testing.assert_array_equal(a, b)
    assert {k: both[k] for k in plain if k != "fit_seconds"} == \
        {k: v for k, v in plain.items() if k != "fit_seconds"}


def test_a_merchant_without_validation_rows_weighs_nothing(
        global_weights: list[np.ndarray]) -> None:
    from client.work import pre_training_metrics
    from common.model import cached_model, set_weights_of

    model = cached_model(SETTINGS.model, SNAP, SETTINGS.seed)
    set_weights_of(model, global_weights)
    only_train = SNAPS.split_part("train")
    metrics = pre_training_metrics(model, only_train)
    assert metrics == {"pre_val_loss": 0.0, "val_examples": 0, "pre_eval_loss": 0.0,
                       "pre_decay_log_loss": 0.0, "test_examples": 0}


def test_the_warm_up_leaves_the_reply_as_it_was(global_weights: list[np.ndarray]) -> None:
    """A simulation's process first compiles every validation layout on this merchant's
    rows (``warm=True``); the reply it then sends is the one it would have sent
    without, bit for bit. With the pre-training evaluation, where the cached model is
    given the global weights before the fit (so the warm-up must come first)."""
    from client.work import train_reply
    from common.model import cached_model
    from common.training import _warmed

    config = {"global-round": 4, "local-epochs": 1, "pre-evaluate": True}
    cold_w, cold = train_reply(SETTINGS, SNAPS, global_weights, config)
    warmed = _warmed(cached_model(SETTINGS.model, SNAP, SETTINGS.seed))
    assert not warmed
    warm_w, warm = train_reply(SETTINGS, SNAPS, global_weights, config, warm=True)
    assert len(warmed) == 1
    for a, b in zip(cold_w, warm_w, strict=True):
        np.testing.assert_array_equal(a, b)
    assert {k: v for k, v in warm.items() if k != "fit_seconds"} == \
        {k: v for k, v in cold.items() if k != "fit_seconds"}


@pytest.mark.parametrize("pre_evaluate", [False, True])
def test_the_heap_is_frozen_once_and_the_reply_stays_as_it_was(
        global_weights: list[np.ndarray], monkeypatch: pytest.MonkeyPatch,
        pre_evaluate: bool) -> None:
    """With the freeze on, a process's first train reply moves its heap (TensorFlow, the
    built model) out of the garbage collector's reach; the reply is the one it sends
    with the freeze off, bit for bit. Later replies freeze nothing more: a reference
    cycle among frozen objects is never collected, so freezing a merchant's objects
    each time would leak."""
    import gc

    from client.work import GC_FREEZE_ENV, _settled, freezes_heap, settle_heap, train_reply

    config = {"global-round": 5, "local-epochs": 1, "pre-evaluate": pre_evaluate}
    gc.unfreeze()  # whatever an earlier test of this process froze
    _settled.cache_clear()
    monkeypatch.setenv(GC_FREEZE_ENV, "0")
    assert not freezes_heap()
    plain_w, plain = train_reply(SETTINGS, SNAPS, global_weights, config)
    assert gc.get_freeze_count() == 0
    monkeypatch.setenv(GC_FREEZE_ENV, "1")
    try:
        frozen_w, frozen = train_reply(SETTINGS, SNAPS, global_weights, config)
        count = gc.get_freeze_count()
        assert count > 100_000  # TensorFlow, Keras, the model: hundreds of thousands
        again_w, again = train_reply(SETTINGS, SNAPS, global_weights, config)
        # Not one more (a frozen object still dies with its last reference: fewer).
        assert gc.get_freeze_count() <= count
        assert not settle_heap()
    finally:
        gc.unfreeze()
        _settled.cache_clear()
    for w in (frozen_w, again_w):
        for a, b in zip(plain_w, w, strict=True):
            np.testing.assert_array_equal(a, b)
    for m in (frozen, again):
        assert {k: v for k, v in m.items() if k != "fit_seconds"} == \
            {k: v for k, v in plain.items() if k != "fit_seconds"}
