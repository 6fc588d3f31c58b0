"""The project's only training loop, plus prediction and evaluation.

``fit`` is called by the federated client, the centralised and local-only baselines
alike. Each call starts from the model's current weights with a fresh optimizer state
and a seeded shuffle, so equal inputs and seeds give equal weights, whatever ran in
the process before.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from common import keras_seam, metrics
from common.config import TrainConfig
from common.model import model_inputs, set_weights_of, targets, weights_of
from common.model import num_actions as model_actions
from common.snapshots import Snapshots

log = logging.getLogger(__name__)


EpochCallback = Callable[[int, dict[str, float]], None]


@dataclasses.dataclass
class FitResult:
    """What one call of :func:`fit` did."""

    epochs: int
    examples: int
    train_loss: float
    val_loss: float
    best_epoch: int
    seconds: float
    history: list[dict[str, float]]

    def as_metrics(self) -> dict[str, float]:
        """Train and validation loss, epochs and fit seconds as a flat dict of floats."""
        return {"train_loss": self.train_loss, "val_loss": self.val_loss,
                "epochs": float(self.epochs), "fit_seconds": self.seconds}


class _Proximal(keras.Model):
    """Trains the wrapped model's own variables with FedProx's term mu/2 * ||w - w_anchor||^2."""

    def __init__(self, inner: keras.Model, mu: float) -> None:
        super().__init__(name="proximal")
        self.inner = inner
        self.mu = float(mu)
        self.anchor = [tf.Variable(w, trainable=False) for w in inner.trainable_weights]

    def call(self, inputs, training=False):
        return self.inner(inputs, training=training)

    def set_anchor(self) -> None:
        """Copy the wrapped model's current trainable weights into the proximal anchor."""
        for a, w in zip(self.anchor, self.inner.trainable_weights, strict=True):
            a.assign(w)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = self.inner(x, training=True)
            loss = self.inner.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                                           training=True)
            prox = tf.add_n([tf.reduce_sum(tf.square(w - a)) for w, a in
                             zip(self.inner.trainable_weights, self.anchor, strict=True)])
            total = loss + 0.5 * self.mu * prox
        grads = tape.gradient(total, self.inner.trainable_weights)
        self.inner.optimizer.apply_gradients(zip(grads, self.inner.trainable_weights, strict=True))
        tracker = keras_seam.loss_tracker(self)
        tracker.update_state(loss)
        return {"loss": tracker.result()}


@functools.lru_cache(maxsize=4)
def _proximal_wrapper(model: keras.Model, mu: float) -> _Proximal:
    """One compiled FedProx wrapper per model and mu (tracing it again costs seconds)."""
    wrapper = _Proximal(model, mu)
    wrapper.compile(optimizer=model.optimizer)
    return wrapper


def _trainer(model: keras.Model, mu: float) -> keras.Model:
    """The model itself, or its FedProx wrapper anchored at the current weights."""
    if mu <= 0:
        return model
    wrapper = _proximal_wrapper(model, mu)
    wrapper.set_anchor()
    return wrapper


@functools.lru_cache(maxsize=8)
def _state_reset(model: keras.Model) -> Callable[[tf.Tensor], None]:
    """One compiled call that gives ``model`` a fresh optimizer state (moments and step
    count to zero, learning rate kept) and puts every dropout seed generator in a state
    derived from a seed. Done variable by variable in eager mode it cost ~20 ms per fit,
    as much as a small merchant's epoch."""
    opt = model.optimizer
    if not opt.built:
        opt.build(model.trainable_variables)
    zeroed = keras_seam.optimizer_state_variables(opt)
    seed_states = keras_seam.seed_states(model)

    @tf.function
    def reset(seed: tf.Tensor) -> None:
        for v in zeroed:
            v.assign(tf.zeros(v.shape, dtype=v.dtype))
        for i, state in seed_states:
            state.assign(tf.cast(tf.stack([seed, i]), state.dtype))

    return reset


def decay_sample_weights(snaps: Snapshots, balanced: bool) -> np.ndarray | None:
    """Per-row weights that balance the decay classes, or None."""
    if not balanced or len(snaps) == 0:
        return None
    pos = float(snaps.decay.mean())
    if pos in (0.0, 1.0):
        return None
    return np.where(snaps.decay > 0.5, 0.5 / pos, 0.5 / (1 - pos)).astype(np.float32)


def fit(
    model: keras.Model,
    train: Snapshots,
    val: Snapshots | None,
    config: TrainConfig,
    *,
    seed: int = 0,
    on_epoch: EpochCallback | None = None,
) -> FitResult:
    """Train ``model`` in place on ``train``, early-stopping on ``val`` loss.

    The best epoch's weights (by validation loss) are kept. Without validation rows
    every epoch runs and the last weights are kept.
    """
    started = time.perf_counter()
    if len(train) == 0:
        raise ValueError("fit: no training snapshots")
    num_actions = model_actions(model)
    x_all, y_all = model_inputs(model, train), targets(train, num_actions)
    weights = decay_sample_weights(train, config.class_weight)
    has_val = val is not None and len(val) > 0
    _state_reset(model)(tf.constant(seed, tf.int64))
    trainer = _trainer(model, config.proximal_mu)
    rng = np.random.default_rng(seed)
    best_loss, best_epoch, best_weights = math.inf, 0, None
    history: list[dict[str, float]] = []
    stale = 0
    base_weights = weights if weights is not None else np.ones(len(train), np.float32)
    for epoch in range(1, config.epochs + 1):
        idx, live = _padded_order(rng.permutation(len(train)), config.batch_size, rng)
        x = {k: v[idx] for k, v in x_all.items()}
        y = {k: v[idx] for k, v in y_all.items()}
        y["activation"][~live] = -1.0
        w = np.where(live, base_weights[idx], 0.0).astype(np.float32)
        real = live.astype(np.float32)
        sw = {"decay": w, "interest": real, "activation": real}
        loss = _run_steps(trainer, "train", x, y, sw, config.batch_size)
        row = {"epoch": float(epoch), "loss": loss}
        if has_val and val is not None:
            row["val_loss"] = validation_loss(model, val)
        history.append(row)
        if on_epoch is not None:
            on_epoch(epoch, row)
        log.debug("epoch %d: %s", epoch, row)
        if not has_val:
            best_epoch = epoch
            continue
        if row["val_loss"] < best_loss - 1e-5:
            best_loss, best_epoch, stale = row["val_loss"], epoch, 0
            if epoch < config.epochs:  # after the last epoch the model holds them already
                best_weights = weights_of(model)
        else:
            stale += 1
            if stale > config.patience:
                break
    if best_weights is not None and best_epoch < len(history):
        set_weights_of(model, best_weights)
    final = history[best_epoch - 1] if best_epoch else history[-1]
    return FitResult(
        epochs=len(history),
        examples=len(train),
        train_loss=final["loss"],
        val_loss=final.get("val_loss", float("nan")),
        best_epoch=best_epoch,
        seconds=time.perf_counter() - started,
        history=history,
    )


def _padded_order(order: np.ndarray, batch: int, rng: np.random.Generator | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Row order padded to a whole number of batches, and which rows are real.

    Every batch then has the same shape, so the XLA-compiled step is compiled once per
    process instead of once per remainder size (seconds each). Padding rows repeat real
    rows and get zero weight.
    """
    pad = (-len(order)) % batch
    if pad == 0:
        return order, np.ones(len(order), dtype=bool)
    extra = rng.choice(order, pad) if rng is not None else np.resize(order, pad)
    live = np.concatenate([np.ones(len(order), bool), np.zeros(pad, bool)])
    return np.concatenate([order, extra]), live


EVAL_BATCH = 1024
#: Batch of the validation loss: a merchant holds tens of validation rows, and a
#: 1024-row batch of padding cost 5x a 128-row one here (21 vs 4 ms).
VAL_BATCH = 128


def validation_loss(model: keras.Model, snaps: Snapshots) -> float:
    """The compiled total loss on ``snaps`` (what early stopping watches).

    Padding rows have zero weight; Keras averages over whole batches, so the value is
    scaled by the real share of rows, a constant for a given set.
    """
    num_actions = model_actions(model)
    idx, live = _padded_order(np.arange(len(snaps)), VAL_BATCH)
    x = {k: v[idx] for k, v in model_inputs(model, snaps).items()}
    y = {k: v[idx] for k, v in targets(snaps, num_actions).items()}
    y["activation"][~live] = -1.0
    w = live.astype(np.float32)
    loss = _run_steps(model, "test", x, y, {"decay": w, "interest": w, "activation": w},
                      VAL_BATCH)
    return loss * len(idx) / max(len(snaps), 1)


def _run_steps(model: keras.Model, kind: str, x: dict[str, np.ndarray],
               y: dict[str, np.ndarray], sample_weight: dict[str, np.ndarray],
               batch: int) -> float:
    """Run ``model``'s train or test step over consecutive batches of rows already in
    order; the mean loss over the batches.

    One compiled call does every batch: Keras' ``fit`` and ``evaluate`` build a data
    pipeline and callbacks per call, which costs more than a small merchant's whole
    epoch of compute (``docs/performance.md``), and ``fit`` adds time per step on top.
    """
    steps = len(sample_weight["decay"]) // batch

    def batched(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v.reshape(steps, batch, *v.shape[1:]) for k, v in arrays.items()}

    logs = _epoch_function(model, kind)(batched(x), batched(y), batched(sample_weight))
    return float(logs["loss"])


@functools.lru_cache(maxsize=8)
def _epoch_function(model: keras.Model, kind: str) -> Callable[..., dict[str, tf.Tensor]]:
    """A compiled loop of ``model.train_step`` (``kind`` "train") or ``test_step`` over
    the first axis of pre-batched inputs; the step is XLA-compiled when the model is."""
    step = tf.function(model.train_step if kind == "train" else model.test_step,
                       jit_compile=bool(model.jit_compile), reduce_retracing=True)

    def pick(tree: dict[str, tf.Tensor], i: tf.Tensor) -> dict[str, tf.Tensor]:
        return {k: v[i] for k, v in tree.items()}

    @tf.function(reduce_retracing=True)
    def loop(x, y, sw):
        model.reset_metrics()
        logs = step((pick(x, 0), pick(y, 0), pick(sw, 0)))
        for i in tf.range(1, tf.shape(sw["decay"])[0]):
            logs = step((pick(x, i), pick(y, i), pick(sw, i)))
        return logs

    return loop


def predict(model: keras.Model, snaps: Snapshots, batch: int = EVAL_BATCH,
            buckets: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    """Head outputs: ``decay`` [N], ``interest`` [N], ``activation`` [N, A].

    Runs ``predict_on_batch`` on fixed batch shapes: ``model.predict`` sets up a data
    pipeline per call, which the server would pay every round and a client every
    evaluate message (``docs/performance.md``). Rows are padded up to ``batch`` or the smallest of
    ``buckets`` that holds them (padding repeats a real row and is dropped), so XLA
    compiles once per shape.
    """
    n = len(snaps)
    if n == 0:
        num_actions = model_actions(model)
        return {"decay": np.zeros(0, np.float32), "interest": np.zeros(0, np.float32),
                "activation": np.zeros((0, num_actions), np.float32)}
    sizes = sorted({int(b) for b in buckets if 0 < b < batch} | {batch})
    x_all = model_inputs(model, snaps)
    parts: list[dict[str, np.ndarray]] = []
    for lo in range(0, n, batch):
        m = min(batch, n - lo)
        size = next(s for s in sizes if s >= m)
        rows = np.arange(lo, lo + size)
        rows[m:] = lo
        out = model.predict_on_batch({k: v[rows] for k, v in x_all.items()})
        parts.append({k: np.asarray(v)[:m] for k, v in out.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

def evaluate(
    model: keras.Model,
    snaps: Snapshots,
    *,
    threshold: float = 0.5,
    actions: tuple[str, ...] | None = None,
) -> dict[str, float]:
    """Decay, interest and activation metrics of ``model`` on ``snaps``."""
    pred = predict(model, snaps)
    return score_predictions(pred, snaps, threshold=threshold, actions=actions)


def score_predictions(
    pred: dict[str, np.ndarray],
    snaps: Snapshots,
    *,
    threshold: float = 0.5,
    actions: tuple[str, ...] | None = None,
) -> dict[str, float]:
    """Metrics from predictions already made (shared by every method compared)."""
    out: dict[str, float] = {}
    out.update({f"decay_{k}": v for k, v in
                metrics.decay_metrics(snaps.decay, pred["decay"], threshold=threshold).items()})
    out.update({f"interest_{k}": v for k, v in
                metrics.interest_metrics(snaps.interest, pred["interest"]).items()})
    if actions is not None and (snaps.action >= 0).any():
        out.update({f"activation_{k}": v for k, v in metrics.activation_metrics(
            pred["activation"], snaps.action, snaps.activation, actions).items()})
    return out
