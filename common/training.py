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
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from common import keras_seam, metrics
from common.config import TrainConfig
from common.model import (
    model_inputs,
    response_shift_weights,
    set_weights_of,
    targets,
    weight_io,
)
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
    #: The weights the model holds on return (``get_weights``' list), read in the
    #: same compiled call as the last epoch.
    weights: list[np.ndarray] = dataclasses.field(default_factory=list, repr=False)

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
    initial: list[np.ndarray] | None = None,
) -> FitResult:
    """Train ``model`` in place on ``train``, early-stopping on ``val`` loss.

    The best epoch's weights (by validation loss) are kept; with
    ``config.shift_patience`` and a model with response shifts
    (:func:`common.model.response_shift_weights`) those come from the last epoch, and
    training goes on ``shift_patience`` epochs past ``patience``. Without validation rows
    every epoch runs and the last weights are kept. ``initial``: weights to start from
    (a merchant's global model), assigned in the same compiled call as the first epoch.

    Each epoch is one compiled call (:func:`_epoch_call`): the training steps, the
    validation loss and reading the weights, and in the first the starting weights and
    the fresh optimizer state. A tiny merchant's work is then one call into TensorFlow
    instead of five (~0.7 ms of dispatch each, ``docs/performance.md``).
    """
    started = time.perf_counter()
    if len(train) == 0:
        raise ValueError("fit: no training snapshots")
    io = weight_io(model)
    if initial is not None and (io is None or config.proximal_mu > 0):
        # FedProx anchors at the starting weights, which it reads before the first call.
        set_weights_of(model, initial)
        initial = None
    num_actions = model_actions(model)
    x_all, y_all = model_inputs(model, train), targets(train, num_actions)
    weights = decay_sample_weights(train, config.class_weight)
    has_val = val is not None and len(val) > 0
    checks = _validation_batches(model, val) if has_val and val is not None else None
    seed_tensor = tf.constant(seed, tf.int64)
    trainer = _trainer(model, config.proximal_mu)
    rng = np.random.default_rng(seed)
    best_loss, best_epoch = math.inf, 0
    best_flat: tf.Tensor | None = None
    flat: tf.Tensor | None = None
    history: list[dict[str, float]] = []
    stale = 0
    shifts = _shift_mask(model) if config.shift_patience > 0 else None
    patience = config.patience + (config.shift_patience if shifts is not None else 0)
    base_weights = weights if weights is not None else np.ones(len(train), np.float32)
    for epoch in range(1, config.epochs + 1):
        idx, live = _padded_order(rng.permutation(len(train)), config.batch_size, rng)
        x = {k: v[idx] for k, v in x_all.items()}
        y = {k: v[idx] for k, v in y_all.items()}
        y["activation"][~live] = -1.0
        w = np.where(live, base_weights[idx], 0.0).astype(np.float32)
        real = live.astype(np.float32)
        sw = {"decay": w, "interest": real, "activation": real}
        call = _epoch_call(model, trainer, epoch == 1, epoch == 1 and initial is not None,
                           checks is not None)
        loss, val_loss, flat = call(
            io.flatten(initial) if epoch == 1 and initial is not None and io else None,
            seed_tensor, (_pack(_batched(x, y, sw, config.batch_size), lead=2),),
            checks.packed if checks is not None else None)
        row = {"epoch": float(epoch), "loss": float(loss)}
        if checks is not None:
            row["val_loss"] = float(val_loss) * checks.scale
        history.append(row)
        if on_epoch is not None:
            on_epoch(epoch, row)
        log.debug("epoch %d: %s", epoch, row)
        if checks is None:
            best_epoch = epoch
            continue
        if row["val_loss"] < best_loss - 1e-5:
            best_loss, best_epoch, stale = row["val_loss"], epoch, 0
            best_flat = flat
        else:
            stale += 1
            if stale > patience:
                break
    if best_flat is not None and best_epoch < len(history):
        if shifts is not None and flat is not None:
            best_flat = tf.where(shifts, flat, best_flat)  # the last epoch's shifts
        if io is not None:
            io.assign(best_flat)
        flat = best_flat
    final = history[best_epoch - 1] if best_epoch else history[-1]
    return FitResult(
        epochs=len(history),
        examples=len(train),
        train_loss=final["loss"],
        val_loss=final.get("val_loss", float("nan")),
        best_epoch=best_epoch,
        seconds=time.perf_counter() - started,
        history=history,
        weights=(io.unflatten(flat.numpy()) if io is not None and flat is not None
                 else model.get_weights()),
    )


def warm_up(model: keras.Model, train: Snapshots, config: TrainConfig, *,
            initial: list[np.ndarray] | None = None) -> bool:
    """Compile every validation layout :func:`fit` can meet with ``model`` and
    ``config``, once per process: a small set in each bucket of :data:`VAL_BUCKETS`
    (XLA compiles the model's forward pass per bucket) and one of more than
    :data:`VAL_BATCH` rows (another trace of the epoch call), over two epochs when
    ``config`` asks for more than one (the later epochs' call is traced apart).

    A simulation's actor serves whichever merchants Flower hands it, so without this it
    compiles a layout the first time it meets a merchant of that size, in a steady
    round: ~1 s a bucket, ~2.7 s for the loop (``docs/performance.md``). The fits run
    on rows of ``train`` and leave the model's weights changed; a caller's next
    :func:`fit` starts from its own ``initial`` weights and a fresh optimizer state, so
    what it computes does not depend on whether this ran. ``initial``: whether the
    real fits pass starting weights (None or not) selects the traces warmed.
    Returns False when this model and configuration were warmed already.
    """
    if len(train) == 0:
        return False
    cfg = dataclasses.replace(config, epochs=min(config.epochs, 2), patience=2, verbose=0)
    done = _warmed(model)
    key = (cfg, initial is None)
    if key in done:
        return False
    done.add(key)
    rows = train.subset(np.arange(min(len(train), config.batch_size)))
    for n in (*VAL_BUCKETS, VAL_BATCH + 1):
        fit(model, rows, train.subset(np.resize(np.arange(len(train)), n)), cfg,
            initial=initial)
    return True


@functools.lru_cache(maxsize=8)
def _warmed(model: keras.Model) -> set[tuple[TrainConfig, bool]]:
    """The configurations :func:`warm_up` has compiled ``model``'s layouts for."""
    return set()


@functools.lru_cache(maxsize=8)
def _shift_mask(model: keras.Model) -> tf.Tensor | None:
    """True at the response shifts' entries of the flat weight vector; None when the
    model has none (or no flat vector). Once per model: a merchant fits every round."""
    io, positions = weight_io(model), response_shift_weights(model)
    if io is None or not positions:
        return None
    mask = np.zeros(io.bounds[-1], bool)
    for i in positions:
        mask[io.bounds[i]:io.bounds[i + 1]] = True
    return tf.constant(mask)


def _batched(x: dict[str, np.ndarray], y: dict[str, np.ndarray],
             sample_weight: dict[str, np.ndarray], batch: int
             ) -> tuple[dict[str, np.ndarray], ...]:
    """Rows already in order as ``[steps, batch, ...]`` arrays (inputs, targets, weights)."""
    steps = len(sample_weight["decay"]) // batch
    return tuple({k: v.reshape(steps, batch, *v.shape[1:]) for k, v in tree.items()}
                 for tree in (x, y, sample_weight))


@dataclasses.dataclass(frozen=True, eq=False)
class _Checks:
    """A validation set laid out once for every epoch's compiled call: ``(x, y, sw)``
    batched as ``[steps, VAL_BATCH, ...]``, or, for a set that fits one batch
    (``single``), ``(x, y, sw, rows)`` with ``x`` only the real rows (a bucket of
    :data:`VAL_BUCKETS`) and ``rows`` the padded batch's rows in ``x``."""

    arrays: tuple[Any, ...]
    scale: float  # padded rows / real rows: Keras averages over whole batches
    single: bool

    @functools.cached_property
    def packed(self) -> tuple[Packed, ...]:
        """``arrays`` packed for :func:`_epoch_call` (``x`` apart when ``single``: its
        rows are a bucket's, not the batch's)."""
        if self.single:
            return _pack(self.arrays[:1], lead=1), _pack(self.arrays[1:], lead=1)
        return (_pack(self.arrays, lead=2),)


def _validation_batches(model: keras.Model, snaps: Snapshots) -> _Checks:
    num_actions = model_actions(model)
    idx, live = _padded_order(np.arange(len(snaps)), VAL_BATCH)
    inputs = model_inputs(model, snaps)
    y = {k: v[idx] for k, v in targets(snaps, num_actions).items()}
    y["activation"][~live] = -1.0
    w = live.astype(np.float32)
    sw = {"decay": w, "interest": w, "activation": w}
    scale = len(idx) / max(len(snaps), 1)
    if len(idx) == VAL_BATCH:  # one batch: the model runs on its real rows only
        bucket = next(b for b in VAL_BUCKETS if b >= len(snaps))
        rows = np.resize(np.arange(len(snaps)), bucket)
        return _Checks(({k: v[rows] for k, v in inputs.items()}, y, sw,
                        idx.astype(np.int32)), scale, single=True)
    x = {k: v[idx] for k, v in inputs.items()}
    return _Checks(_batched(x, y, sw, VAL_BATCH), scale, single=False)


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
#: Rows the model runs on for a validation set that fits one batch (the smallest that
#: holds it; :func:`_padded_loss`).
VAL_BUCKETS: tuple[int, ...] = (16, 32, 64, VAL_BATCH)


def validation_loss(model: keras.Model, snaps: Snapshots) -> float:
    """The compiled total loss on ``snaps`` (what early stopping watches).

    Padding rows have zero weight; Keras divides by whole batches, so the value is
    scaled by padded rows / real rows: the mean over the real rows.
    """
    checks = _validation_batches(model, snaps)
    if checks.single:
        return float(_padded_loss(model)(*checks.arrays)) * checks.scale
    logs = _epoch_function(model, "test")(*checks.arrays)
    return float(logs["loss"]) * checks.scale


@functools.lru_cache(maxsize=8)
def _padded_loss(model: keras.Model) -> Callable[..., tf.Tensor]:
    """``test_step``'s loss on one padded batch ``(y, sw)``, the model run on the real
    rows ``x`` only and its outputs laid out as the batch (``rows``).

    The same loss on the same batch, padding rows weighted 0 (every head's loss is per
    row, ``common.model.decay_loss``); only the model's work on them is saved (a
    merchant's ~12 validation rows run as 16 rather than 128). Equal to the padded
    ``test_step`` up to float rounding (XLA compiles another shape).
    """

    @tf.function(jit_compile=bool(model.jit_compile), reduce_retracing=True)
    def loss(x, y, sw, rows):
        out = model(x, training=False)
        padded = {k: tf.gather(v, rows) for k, v in out.items()}
        return model.compute_loss(x=x, y=y, y_pred=padded, sample_weight=sw, training=False)

    return loss


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
        for i in tf.range(tf.shape(sw["decay"])[0]):
            step((pick(x, i), pick(y, i), pick(sw, i)))
        return {"loss": keras_seam.loss_tracker(model).result()}

    return loop


@functools.lru_cache(maxsize=16)
def _epoch_call(model: keras.Model, trainer: keras.Model, first: bool, assign: bool,
                validate: bool) -> Callable[..., tuple[tf.Tensor, tf.Tensor, tf.Tensor]]:
    """One epoch of :func:`fit` as one compiled call:
    ``(flat weights | None, seed, (x, y, sw) packed, validation arrays packed | None)
    -> (train loss, validation loss, the weights after, flat)``; the arrays come as
    :func:`_pack` laid them out (a few tensors, not one per input, target and weight)
    and are unpacked in the graph.

    The first epoch (``first``) gives the optimizer a fresh state from the seed
    (:func:`_state_reset`) and, with ``assign``, the starting weights first. The steps
    are the same compiled ``train_step`` / ``test_step`` loops :func:`validation_loss`
    runs (:func:`_epoch_function`), so the numbers are theirs; stateful calls run in
    program order inside a ``tf.function``, so each loss is read before the next loop
    resets the metrics.
    """
    io = weight_io(model)
    reset = _state_reset(model) if first else None
    train_loop = _epoch_function(trainer, "train")
    val_loop = _epoch_function(model, "test") if validate else None
    padded = _padded_loss(model) if validate else None

    def epoch(flat, seed, batches, checks, packings):
        batch_packings, check_packings = packings
        batches = _unpack(batch_packings, batches)
        checks = None if checks is None else _unpack(check_packings, checks)
        if assign and io is not None:
            io.assign(flat)
        if reset is not None:
            reset(seed)
        loss = train_loop(*batches)["loss"]
        if checks is None or val_loop is None or padded is None:
            val_loss = tf.constant(float("nan"))
        elif len(checks) == 4:  # one batch (_Checks.single)
            val_loss = padded(*checks)
        else:
            val_loss = val_loop(*checks)["loss"]
        weights = io.read() if io is not None else tf.zeros([0])
        return loss, val_loss, weights

    # One trace per layout of the arrays, with any number of steps: a
    # tf.function left to relax shapes by itself compared the call with its traces on
    # every call (in a profile, more than the rest of its dispatch).
    traced: dict[tuple[Any, ...], Callable[..., Any]] = {}

    def call(flat, seed, batches: tuple[Packed, ...], checks: tuple[Packed, ...] | None):
        packings = (tuple(p.packing for p in batches),
                    None if checks is None else tuple(p.packing for p in checks))
        batch_arrays = tuple(p.arrays for p in batches)
        check_arrays = None if checks is None else tuple(p.arrays for p in checks)
        specs = (None if flat is None else tf.TensorSpec([None], flat.dtype),
                 tf.TensorSpec([], tf.int64), _specs(batch_arrays),
                 None if check_arrays is None else _specs(check_arrays))
        key = (packings, *tf.nest.flatten(specs))
        if key not in traced:
            traced[key] = tf.function(_bound(epoch, packings)).get_concrete_function(*specs)
        return traced[key](flat, seed, batch_arrays, check_arrays)

    return call


def _bound(epoch: Callable[..., Any], packings: Any) -> Callable[..., Any]:
    """``epoch`` with its last argument bound (a tf.function's signature would list a
    ``functools.partial``'s bound keywords as arguments)."""
    def packed_epoch(flat, seed, batches, checks):
        return epoch(flat, seed, batches, checks, packings)

    return packed_epoch


def _specs(tree: tuple[Any, ...]) -> tuple[Any, ...]:
    """TensorSpecs of arrays (or tuples of them) with their first dimension (steps, or a
    bucket's rows) left open; the rows a step stay fixed, as the separate loop had them."""
    def spec(a: np.ndarray) -> tf.TensorSpec:
        return tf.TensorSpec([None, *a.shape[1:]], tf.as_dtype(a.dtype))

    return tuple(_specs(part) if isinstance(part, tuple) else spec(part) for part in tree)


@dataclasses.dataclass(frozen=True)
class Packing:
    """How :func:`_pack` laid a tuple of arrays and dicts of arrays (their first ``lead``
    dimensions shared) into one array per dtype: each leaf's other dimensions flattened
    into columns, side by side. The compiled epoch call takes these few arrays instead
    of one per leaf: binding each argument was a fifth of a tiny merchant's call
    (``docs/performance.md``)."""

    keys: tuple[tuple[str, ...] | None, ...]  # per part: its dict's keys, None: an array
    lead: int
    dtypes: tuple[str, ...]
    #: Per leaf, in order: (its array in the pack, first column, end column, its shape
    #: after the lead dimensions).
    leaves: tuple[tuple[int, int, int, tuple[int, ...]], ...]


@dataclasses.dataclass(frozen=True, eq=False)
class Packed:
    """Arrays packed by :func:`_pack`, and how."""

    packing: Packing
    arrays: tuple[np.ndarray, ...]


def _leaves(parts: tuple[Any, ...]) -> list[Any]:
    return [leaf for part in parts for leaf in
            ([part[k] for k in sorted(part)] if isinstance(part, dict) else [part])]


def _pack(parts: tuple[Any, ...], *, lead: int) -> Packed:
    """``parts`` (arrays, or dicts of them, sharing their first ``lead`` dimensions) as
    one array per dtype; :func:`_unpack` gives them back (the same values and shapes)."""
    dtypes: list[str] = []
    groups: list[list[np.ndarray]] = []
    widths: list[int] = []
    leaves = []
    for leaf in _leaves(parts):
        dtype = leaf.dtype.str
        if dtype not in dtypes:
            dtypes.append(dtype)
            groups.append([])
            widths.append(0)
        g = dtypes.index(dtype)
        tail = tuple(int(n) for n in leaf.shape[lead:])
        width = math.prod(tail)
        groups[g].append(leaf.reshape(*leaf.shape[:lead], width))
        leaves.append((g, widths[g], widths[g] + width, tail))
        widths[g] += width
    keys = tuple(tuple(sorted(p)) if isinstance(p, dict) else None for p in parts)
    arrays = tuple(np.concatenate(g, axis=lead) if len(g) > 1 else g[0] for g in groups)
    return Packed(Packing(keys, lead, tuple(dtypes), tuple(leaves)), arrays)


def _unpack(packings: tuple[Packing, ...], packed: tuple[Any, ...]) -> tuple[Any, ...]:
    """The parts of every packing, in order, from their packed tensors (in a graph:
    column slices and reshapes; the first dimension may be open)."""
    parts: list[Any] = []
    for packing, tensors in zip(packings, packed, strict=True):
        leaves = []
        for g, start, stop, tail in packing.leaves:
            column = tensors[g][..., start:stop]
            lead = [-1 if i == 0 and n is None else tf.shape(column)[i] if n is None else n
                    for i, n in enumerate(column.shape[:packing.lead])]
            leaves.append(tf.reshape(column, [*lead, *tail]))
        at = iter(leaves)
        parts.extend({k: next(at) for k in keys} if keys is not None else next(at)
                     for keys in packing.keys)
    return tuple(parts)


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
