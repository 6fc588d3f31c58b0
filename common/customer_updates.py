"""Per-customer updates, each clipped, summed in one compiled step (customer-level DP).

A customer's update at global weights ``w`` is one gradient step on that customer's
snapshots alone::

    u_c = -eta * grad_w sum_{s of c} loss(w; s)

with ``loss`` the model's per-row loss (decay cross-entropy, interest Huber or squared
error, the logged action's cross-entropy, weighted as ``model.loss-weight-*``; Keras'
compiled loss averages the same terms over a batch, the activation term over the logged
rows only), the model in inference mode (no dropout, so ``u_c`` depends on ``c``'s rows
only). Each
``u_c`` is scaled to L2 norm at most ``C`` over all weights together, and the merchant
sends ``sum_c clip(u_c)``: adding, removing or changing one customer moves that sum by at
most ``C``, whatever the number of that customer's snapshots. A customer whose update
(or its norm) is not finite (an infinite or NaN feature or label) is left out of the sum
and counted: one such customer would otherwise turn the merchant's whole sum into NaN,
and the server would drop the merchant, moving the release by far more than ``C``.

Vectorised: per-row gradients by ``tf.vectorized_map`` over a twin of the model whose
recurrent layers are unrolled (pfor cannot take the gradient through the LSTM's
``while_loop``), a segment sum by customer, then the clipping, over batches of whole
customers of a fixed row count: ``rows``, raised for a customer with more rows than
that to the next multiple of ``rows``. Memory is that row count x weights floats (so a
single customer with many snapshots raises it), and the step is traced once per row
count (a few multiples of ``rows`` at most). Nothing here knows about Flower.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from common.config import ModelConfig
from common.model import model_inputs, targets
from common.model import num_actions as model_actions
from common.snapshots import Snapshots

#: Rows per compiled step (a customer with more rows raises it, to a multiple of it).
DEFAULT_ROWS = 256
_EPS = 1e-7  # Keras' probability clipping in its cross-entropy


@dataclasses.dataclass(frozen=True)
class CustomerSum:
    """The clipped sum of one merchant's sampled customers' updates."""

    update: list[np.ndarray]  # laid out like ``model.weights``
    customers: int  # customers whose updates are in the sum
    clipped: int  # of them, how many had a norm above C
    rows: int  # the training snapshots passed in
    mean_norm: float  # mean unclipped norm of those in the sum (nan without any)
    dropped: int = 0  # customers left out: their update or its norm was not finite


def customer_codes(user_id: np.ndarray) -> tuple[np.ndarray, int]:
    """Dense codes 0..n-1 of the customers in ``user_id`` (sorted ids), and n."""
    ids, codes = np.unique(np.asarray(user_id).astype(str), return_inverse=True)
    return codes.astype(np.int64), len(ids)


def pack_customers(codes: np.ndarray, rows: int) -> tuple[list[np.ndarray], int]:
    """Row indices in batches of whole customers, at most ``rows`` per batch (raised to
    the next multiple of ``rows`` at or above the largest customer's row count when one
    has more, so few distinct sizes are ever compiled); returns the batches and the row
    count every batch is padded to."""
    order = np.argsort(codes, kind="stable")
    _, starts, counts = np.unique(codes[order], return_index=True, return_counts=True)
    rows = max(int(rows), 1)
    size = rows * max(1, -(-int(counts.max(initial=1)) // rows))
    batches: list[np.ndarray] = []
    begin = end = 0
    for start, count in zip(starts, counts, strict=True):
        if end - begin + count > size:
            batches.append(order[begin:end])
            begin = start
        end = start + count
    if end > begin:
        batches.append(order[begin:end])
    return batches, size


def clipped_customer_sum(model: keras.Model, config: ModelConfig, snaps: Snapshots,
                         *, clipping_norm: float, learning_rate: float,
                         rows: int = DEFAULT_ROWS) -> CustomerSum:
    """``sum_c clip(u_c, C)`` over the customers of ``snaps`` (every row of ``snaps``
    belongs to a customer in the sum: pass the sampled customers' training rows only).

    Parameters
    ----------
    model : holds the global weights; left unchanged.
    config : the model's settings (the per-head loss weights).
    snaps : the sampled customers' training snapshots; ``user_id`` names the customer.
    clipping_norm : C, the L2 bound of one customer's update over all weights.
    learning_rate : eta in ``u_c = -eta * gradient``.
    rows : rows per compiled step (memory: rows x weights floats, or the next multiple
        of ``rows`` above the largest customer's row count).
    """
    weights = list(model.weights)
    zero = [np.zeros(tuple(v.shape), np.float32) for v in weights]
    if len(snaps) == 0:
        return CustomerSum(zero, 0, 0, 0, float("nan"))
    twin, trainable = _gradient_twin(model)
    _copy_weights(model, twin)
    codes, n = customer_codes(snaps.user_id)
    x_all = model_inputs(model, snaps)
    y_all = targets(snaps, model_actions(model))
    batches, size = pack_customers(codes, rows)
    step = _clip_step(twin, _loss_weights(config), size)
    total = np.zeros(sum(int(np.prod(v.shape)) for v in trainable), np.float64)
    norms: list[np.ndarray] = []
    dropped = 0
    for batch in batches:
        local = np.unique(codes[batch], return_inverse=True)[1].astype(np.int32)
        pad = size - len(batch)
        idx = np.concatenate([batch, np.full(pad, batch[0])])
        seg = np.concatenate([local, np.full(pad, size, np.int32)])  # padding: dropped
        summed, norm, bad = step({k: v[idx] for k, v in x_all.items()},
                            {k: v[idx] for k, v in y_all.items()}, seg,
                            tf.constant(clipping_norm / learning_rate, tf.float32))
        total += summed.numpy()
        dropped += int(bad.numpy())
        norms.append(norm.numpy()[:local.max() + 1] * learning_rate)
    every = np.concatenate(norms)
    kept = every[np.isfinite(every)]
    update = _layout(-learning_rate * total, weights, trainable)
    return CustomerSum(update, n - dropped, int((kept > clipping_norm).sum()), len(snaps),
                       float(kept.mean()) if len(kept) else float("nan"), dropped)


def _loss_weights(config: ModelConfig) -> tuple[float, float, float, bool]:
    return (config.loss_weight_decay, config.loss_weight_interest,
            config.loss_weight_activation, config.interest_loss == "huber")


def row_losses(out: dict[str, tf.Tensor], y: dict[str, tf.Tensor],
               weights: tuple[float, float, float, bool]) -> tf.Tensor:
    """The compiled loss of each row [N]: the heads' losses as ``compile_model`` sets
    them, per row instead of averaged over the batch."""
    w_decay, w_interest, w_activation, huber = weights
    p = tf.clip_by_value(out["decay"], _EPS, 1 - _EPS)
    decay = -(y["decay"] * tf.math.log(p) + (1 - y["decay"]) * tf.math.log(1 - p))
    err = out["interest"] - y["interest"]
    if huber:  # keras.losses.Huber(delta=1)
        interest = tf.where(tf.abs(err) <= 1.0, 0.5 * tf.square(err), tf.abs(err) - 0.5)
    else:
        interest = tf.square(err)
    mask = tf.cast(y["activation"] >= 0, p.dtype)
    q = tf.clip_by_value(out["activation"], _EPS, 1 - _EPS)
    target = tf.maximum(y["activation"], 0.0)
    bce = -(target * tf.math.log(q) + (1 - target) * tf.math.log(1 - q))
    activation = tf.reduce_sum(bce * mask, -1) / tf.maximum(tf.reduce_sum(mask, -1), 1.0)
    return w_decay * decay + w_interest * interest + w_activation * activation


@functools.lru_cache(maxsize=8)
def _clip_step(twin: keras.Model, loss_weights: tuple[float, float, float, bool],
               size: int) -> Callable[..., tuple[tf.Tensor, tf.Tensor, tf.Tensor]]:
    """The compiled step of one batch of ``size`` rows: the sum over its customers of
    each customer's gradient scaled to norm <= ``bound`` (C / eta), the norms, and how
    many customers were left out because their gradient or its norm was not finite."""
    trainable = twin.trainable_variables

    def row_gradient(row: tuple[dict[str, tf.Tensor], dict[str, tf.Tensor]]) -> tf.Tensor:
        x, y = row
        with tf.GradientTape() as tape:
            out = twin({k: v[None] for k, v in x.items()}, training=False)
            loss = tf.reduce_sum(row_losses(out, {k: v[None] for k, v in y.items()},
                                            loss_weights))
        grads = tape.gradient(loss, trainable,
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return tf.concat([tf.reshape(tf.convert_to_tensor(g), [-1]) for g in grads], 0)

    @tf.function(reduce_retracing=True)
    def step(x, y, seg, bound):
        per_row = tf.vectorized_map(row_gradient, (x, y))  # [size, P]
        per_customer = tf.math.unsorted_segment_sum(per_row, seg, size + 1)[:size]
        norms = tf.norm(per_customer, axis=1)
        # A NaN or infinite norm (or entry) cannot be clipped (NaN scale, 0 x inf): drop
        # that customer with tf.where (a product by 0 would keep the NaN).
        finite = tf.math.is_finite(norms) & tf.reduce_all(tf.math.is_finite(per_customer), 1)
        scale = tf.minimum(1.0, bound / tf.maximum(norms, 1e-12))
        clipped = tf.where(finite[:, None], per_customer * scale[:, None], 0.0)
        bad = tf.reduce_sum(tf.cast(~finite, tf.int32))  # empty slots hold zeros: finite
        return tf.reduce_sum(clipped, 0), norms, bad

    return step


@functools.lru_cache(maxsize=4)
def _gradient_twin(model: keras.Model) -> tuple[keras.Model, list[keras.Variable]]:
    """A copy of ``model`` with its recurrent layers unrolled (same maths, no
    ``while_loop``), and the model's trainable variables in the twin's order."""

    def unrolled(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        if isinstance(layer, keras.layers.RNN):
            config["unroll"] = True
        elif isinstance(layer, keras.layers.Bidirectional):
            for key in ("layer", "backward_layer"):
                if isinstance(config.get(key), dict):
                    config[key]["config"]["unroll"] = True
        return layer.__class__.from_config(config)

    twin = keras.models.clone_model(model, clone_function=unrolled)
    by_path = {v.path: v for v in model.trainable_variables}
    if [v.path for v in twin.trainable_variables] != list(by_path):
        raise ValueError("the model's unrolled twin orders its weights differently")
    return twin, list(model.trainable_variables)


def _copy_weights(model: keras.Model, twin: keras.Model) -> None:
    for source, target in zip(model.weights, twin.weights, strict=True):
        target.assign(source)


def _layout(flat: np.ndarray, weights: list[keras.Variable],
            trainable: list[keras.Variable]) -> list[np.ndarray]:
    """The flat update of the trainable variables laid out like ``weights`` (zeros for
    weights that do not train)."""
    parts: dict[str, np.ndarray] = {}
    start = 0
    for v in trainable:
        size = int(np.prod(v.shape))
        parts[v.path] = flat[start:start + size].reshape(tuple(v.shape)).astype(np.float32)
        start += size
    return [parts.get(v.path, np.zeros(tuple(v.shape), np.float32)) for v in weights]
