"""The one Keras model: event sequences in, decay / interest / activation out.

``build_model`` is a pure seeded function used by clients, the server's evaluation,
the baselines and the scorer alike; equal seeds give equal initial weights.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import itertools
import os
import warnings
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
from keras import layers, ops

from common import atomic
from common.config import ModelConfig, SnapshotConfig
from common.features import (
    AGGREGATE_FEATURES,
    CADENCE_FEATURES,
    NUMERIC_FEATURES,
    RESPONSE_FEATURES,
    STATIC_FEATURES,
)
from common.schema import EVENT_TYPES
from common.snapshots import Snapshots

HEADS: tuple[str, ...] = ("decay", "interest", "activation")


def _per_row(loss: Callable[[Any, Any], Any], y_true, y_pred):
    """``loss`` of each row of ``[N]`` targets: Keras' element losses average over the
    last axis, which for ``[N]`` would be the whole batch before sample weights apply
    (class weights would then scale batch means and zero-weight padding rows count)."""
    y_true = ops.cast(y_true, y_pred.dtype)
    return loss(ops.expand_dims(y_true, -1), ops.expand_dims(y_pred, -1))


@keras.saving.register_keras_serializable(package="fedecay")
def decay_loss(y_true, y_pred):
    """Binary cross-entropy of each row (``[N]``), so sample weights weight rows."""
    return _per_row(keras.losses.binary_crossentropy, y_true, y_pred)


@keras.saving.register_keras_serializable(package="fedecay")
def interest_mse(y_true, y_pred):
    """Squared error of each row (``[N]``)."""
    return _per_row(keras.losses.mean_squared_error, y_true, y_pred)


@keras.saving.register_keras_serializable(package="fedecay")
def interest_huber(y_true, y_pred):
    """Huber loss (delta 1) of each row (``[N]``)."""
    return _per_row(keras.losses.huber, y_true, y_pred)


@keras.saving.register_keras_serializable(package="fedecay")
def masked_activation_loss(y_true, y_pred):
    """Binary cross-entropy on the logged action only.

    ``y_true`` is ``[N, A]`` with the outcome at the logged action's column and -1
    elsewhere; rows without an intervention are all -1 and add nothing. The loss is the
    mean over logged entries of the batch (0 when the batch has none).
    """
    y_true = ops.cast(y_true, y_pred.dtype)
    mask = ops.cast(y_true >= 0, y_pred.dtype)
    p = ops.clip(y_pred, 1e-7, 1 - 1e-7)
    target = ops.maximum(y_true, 0.0)
    bce = -(target * ops.log(p) + (1 - target) * ops.log(1 - p))
    return ops.sum(bce * mask) / ops.maximum(ops.sum(mask), 1.0) * ops.ones_like(y_pred[:, 0])


@keras.saving.register_keras_serializable(package="fedecay")
class StepMask(layers.Layer):
    """True at real steps (event id > 0), False at padding.

    Concatenating the embeddings with the unmasked numeric input drops Keras' implicit
    mask, so the LSTM gets this one explicitly.
    """

    def call(self, event_ids):
        return ops.not_equal(event_ids, 0)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="fedecay")
class ContrastActivation(layers.Layer):
    """P(re-engage | action) from a control logit and each action's shift from it.

    Inputs ``[base [N, 1], shift [N, A - 1]]``; output ``sigmoid([base, base + shift])``.
    Under the masked loss every campaign row trains ``base`` (the control's logit and
    the common part of every action's), and an action's rows train its shift: the
    uplift on the logit scale, what the policy ranks by.
    """

    def call(self, inputs):
        base, shift = inputs
        return ops.sigmoid(ops.concatenate([base, base + shift], axis=-1))

    def compute_output_shape(self, input_shapes):
        base, shift = input_shapes
        return (base[0], base[1] + shift[1])


@keras.saving.register_keras_serializable(package="fedecay")
class StopGradient(layers.Layer):
    """The input unchanged, with no gradient flowing back through it."""

    def call(self, inputs):
        return ops.stop_gradient(inputs)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="fedecay")
class Standardised(layers.Layer):
    """Columns ``start:stop`` of a ``[N, F]`` input, ``(x - centre) / scale``.

    The response shifts read the response aggregates through it, with the fixed
    ``model.response-centre`` / ``model.response-scale`` (by default the mean and standard
    deviation over the training campaign rows of ``default``, seed 0, rounded; ``quick``'s
    are within 0.06). Fixed rather than adapted to the data a process sees: every
    merchant must build the same model before anything is pooled, and agreeing on
    federated statistics first would cost a round. It is only conditioning (the shifts
    represent the same functions either way), but on the raw columns (means near -1,
    spreads near 0.4) Adam took over ten epochs to fit them (capture 0.05 at the kept
    epoch against 0.40); a log whose response aggregates sit elsewhere should set its own.
    """

    def __init__(self, start: int, stop: int, centre: Sequence[float],
                 scale: Sequence[float], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        width = stop - start
        if not 0 <= start < stop or len(centre) != width or len(scale) != width:
            raise ValueError(f"Standardised: columns {start}:{stop} need {max(width, 0)} "
                             f"centres and scales, got {len(centre)} and {len(scale)}")
        if min(scale) <= 0:
            raise ValueError(f"Standardised: scales must be > 0, got {list(scale)}")
        self.start, self.stop = int(start), int(stop)
        self.centre = [float(c) for c in centre]
        self.scale = [float(c) for c in scale]

    def call(self, inputs):
        x = inputs[:, self.start:self.stop]
        return (x - ops.convert_to_tensor(self.centre, x.dtype)) / ops.convert_to_tensor(
            self.scale, x.dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.stop - self.start)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "start": self.start, "stop": self.stop,
                "centre": self.centre, "scale": self.scale}


#: Widths of ``Snapshots.static`` prefixes a model may read: before the response
#: features (older models), with them, and with the cadence features too.
STATIC_LAYOUTS: tuple[int, ...] = (
    len(STATIC_FEATURES), len(STATIC_FEATURES) + len(RESPONSE_FEATURES), len(AGGREGATE_FEATURES))


def static_width(config: ModelConfig) -> int:
    """Aggregate columns the model reads (the first columns of ``Snapshots.static``):
    ``STATIC_FEATURES`` and ``RESPONSE_FEATURES``, and the cadence features after them
    with ``model.cadence-features``."""
    return (len(STATIC_FEATURES) + len(RESPONSE_FEATURES)
            + (len(CADENCE_FEATURES) if config.cadence_features else 0))


def _activation_head(config: ModelConfig, trunk, static_in, num_actions: int, glorot):
    """The activation output: ``config.activation_head`` over the trunk (and, with
    ``config.activation_wide``, the aggregates themselves); with
    ``config.activation_shift == "response"`` the contrast head's shifts are linear in
    the standardised response aggregates alone; without
    ``config.activation_trunk_gradient`` its loss does not train the trunk."""
    if not config.activation_trunk_gradient:
        trunk = StopGradient(name="activation_trunk")(trunk)
    h = (layers.Concatenate(name="activation_in")([trunk, static_in])
         if config.activation_wide else trunk)
    if config.activation_head == "separate":
        return layers.Dense(num_actions, activation="sigmoid", name="activation",
                            kernel_initializer=glorot())(h)
    base = layers.Dense(1, name="activation_base", kernel_initializer=glorot())(h)
    if config.activation_shift == "shared":
        shift = layers.Dense(num_actions - 1, name="activation_shift",
                             kernel_initializer=glorot())(h)
    else:
        # What moves a customer (a trait per action) shows only in how the customer
        # answers: an action's few campaign rows fit a handful of weights on those
        # columns rather than the trunk's features. A zero kernel starts every customer
        # at the same shift (the policy starts as a single action, not at random).
        first = len(STATIC_FEATURES)
        response = Standardised(first, first + len(RESPONSE_FEATURES), config.response_centre,
                                config.response_scale, name="activation_response")(static_in)
        shift = layers.Dense(num_actions - 1, name="activation_shift",
                             kernel_initializer="zeros")(response)
        if config.activation_shift_gain != 1.0:
            shift = layers.Rescaling(config.activation_shift_gain,
                                     name="activation_shift_gain")(shift)
    return ContrastActivation(name="activation")([base, shift])


def build_model(config: ModelConfig, snapshots: SnapshotConfig, seed: int = 0) -> keras.Model:
    """Build and compile the decay/activation LSTM.

    Parameters
    ----------
    config : layer sizes, dropout, learning rate and per-head loss weights.
    snapshots : gives the sequence length, hash buckets and the actions.
    seed : every initialiser and dropout layer takes a seed derived from it.
    """
    seeds = itertools.count(seed * 1000 + 1)
    glorot = lambda: keras.initializers.GlorotUniform(seed=next(seeds))  # noqa: E731
    length = snapshots.max_len
    events_in = keras.Input((length,), dtype="int32", name="events")
    categories_in = keras.Input((length,), dtype="int32", name="categories")
    numeric_in = keras.Input((length, len(NUMERIC_FEATURES)), dtype="float32", name="numeric")
    static_in = keras.Input((static_width(config),), dtype="float32", name="static")

    ev = layers.Embedding(
        len(EVENT_TYPES) + 1, config.event_embedding, mask_zero=True, name="event_embedding",
        embeddings_initializer=keras.initializers.RandomUniform(-0.05, 0.05, seed=next(seeds)),
    )(events_in)
    cat = layers.Embedding(
        snapshots.hash_buckets + 1, config.category_embedding, mask_zero=True,
        name="category_embedding",
        embeddings_initializer=keras.initializers.RandomUniform(-0.05, 0.05, seed=next(seeds)),
    )(categories_in)
    steps = layers.Concatenate(name="steps")([ev, cat, numeric_in])
    lstm = layers.LSTM(
        config.lstm_units, name="lstm", kernel_initializer=glorot(),
        recurrent_initializer=keras.initializers.Orthogonal(seed=next(seeds)),
    )
    mask = StepMask(name="step_mask")(events_in)
    seq = (layers.Bidirectional(lstm, name="bilstm")(steps, mask=mask) if config.bidirectional
           else lstm(steps, mask=mask))
    agg = layers.Dense(config.dense_units // 2 or 1, activation="relu", name="static_dense",
                       kernel_initializer=glorot())(static_in)
    trunk = layers.Concatenate(name="trunk_in")([seq, agg])
    trunk = layers.Dense(config.dense_units, activation="relu", name="trunk",
                         kernel_initializer=glorot())(trunk)
    trunk = layers.Dropout(config.dropout, seed=next(seeds), name="dropout")(trunk)
    # Scalar heads are reshaped to [N] so targets are plain vectors.
    outputs = {
        "decay": layers.Reshape((), name="decay")(
            layers.Dense(1, activation="sigmoid", name="decay_dense",
                         kernel_initializer=glorot())(trunk)),
        "interest": layers.Reshape((), name="interest")(
            layers.Dense(1, name="interest_dense", kernel_initializer=glorot())(trunk)),
        "activation": _activation_head(config, trunk, static_in, len(snapshots.actions),
                                       glorot),
    }
    model = keras.Model(
        inputs={"events": events_in, "categories": categories_in, "numeric": numeric_in,
                "static": static_in},
        outputs=outputs, name="fedecay_lstm",
    )
    compile_model(model, config)
    return model


def compile_model(model: keras.Model, config: ModelConfig) -> None:
    """Compile with the per-head losses and weights of ``config``."""
    interest_loss = interest_huber if config.interest_loss == "huber" else interest_mse
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss={"decay": decay_loss, "interest": interest_loss,
              "activation": masked_activation_loss},
        loss_weights={"decay": config.loss_weight_decay,
                      "interest": config.loss_weight_interest,
                      "activation": config.loss_weight_activation},
        # XLA roughly doubles LSTM training throughput on CPU here (measured: 7.5k -> 15k
        # samples/s at batch 256).
        jit_compile=config.jit_compile,
    )


@functools.lru_cache(maxsize=4)
def cached_model(config: ModelConfig, snapshots: SnapshotConfig, seed: int = 0) -> keras.Model:
    """One compiled model per process and configuration; callers only set weights.

    Building a Keras model costs seconds (tracing); a client that receives new weights
    every round reuses this one.
    """
    return build_model(config, snapshots, seed)


def targets(snaps: Snapshots, num_actions: int) -> dict[str, np.ndarray]:
    """Keras targets by head; activation holds -1 except at the logged action."""
    act = np.full((len(snaps), num_actions), -1.0, dtype=np.float32)
    logged = snaps.action >= 0
    act[np.flatnonzero(logged), snaps.action[logged]] = snaps.activation[logged]
    return {"decay": snaps.decay, "interest": snaps.interest, "activation": act}


def weights_of(model: keras.Model) -> list[np.ndarray]:
    """The model's weights (as ``get_weights``) read in one compiled call."""
    io = weight_io(model)
    if io is None:
        return model.get_weights()
    return io.unflatten(io.read().numpy())


def set_weights_of(model: keras.Model, arrays: list[np.ndarray]) -> None:
    """Assign ``arrays`` to the model's weights (as ``set_weights``) in one compiled call.

    Keras assigns variable by variable in eager mode, which a client would pay twice a
    message (the global weights in, its own out; figures in ``docs/performance.md``).
    A wrong count or shape raises ValueError, as Keras' ``set_weights`` does.
    """
    io = weight_io(model)
    if io is None:
        model.set_weights(arrays)
        return
    io.assign(io.flatten(arrays))


@dataclasses.dataclass(frozen=True)
class WeightIO:
    """A model's weights as one flat vector: the compiled ``assign(flat)`` and
    ``read() -> flat`` (callable from other compiled functions too, so training can
    take its starting weights and give its result in the same call), and the
    conversions between the flat vector and ``get_weights``' list of arrays.

    One flat tensor crosses into the compiled functions: a tensor per weight costs
    more in argument conversion than the assignments themselves.
    """

    assign: Callable[..., Any]
    read: Callable[[], Any]
    shapes: tuple[tuple[int, ...], ...]
    dtype: np.dtype
    bounds: tuple[int, ...]
    names: tuple[str, ...]

    def flatten(self, arrays: list[np.ndarray]) -> np.ndarray:
        """``arrays`` (as ``get_weights`` lists them) as one flat vector; a wrong count
        or shape raises ValueError naming the weight."""
        if len(arrays) != len(self.shapes):
            raise ValueError(f"{len(arrays)} weight arrays for a model with "
                             f"{len(self.shapes)} weights")
        for name, x, shape in zip(self.names, arrays, self.shapes, strict=True):
            if np.shape(x) != shape:
                raise ValueError(f"weight {name} has shape {shape}, "
                                 f"got an array of shape {np.shape(x)}")
        return np.concatenate([np.ravel(x) for x in arrays]).astype(self.dtype, copy=False)

    def unflatten(self, flat: np.ndarray) -> list[np.ndarray]:
        """The flat vector as ``get_weights``' list (views into ``flat``)."""
        return [flat[a:b].reshape(shape) for a, b, shape in
                zip(self.bounds[:-1], self.bounds[1:], self.shapes, strict=True)]


@functools.lru_cache(maxsize=8)
def weight_io(model: keras.Model) -> WeightIO | None:
    """``model``'s :class:`WeightIO`; None when its weights differ in dtype (not this
    project's model: Keras' own ``get_weights`` / ``set_weights`` then)."""
    import tensorflow as tf

    variables = list(model.weights)
    shapes = tuple(tuple(int(n) for n in v.shape) for v in variables)
    sizes = [int(np.prod(s)) for s in shapes]
    dtype = np.dtype(variables[0].dtype)
    if any(np.dtype(v.dtype) != dtype for v in variables):
        return None

    @tf.function(input_signature=[tf.TensorSpec([sum(sizes)], dtype)])
    def assign(flat):
        for v, part, shape in zip(variables, tf.split(flat, sizes), shapes, strict=True):
            v.assign(tf.reshape(part, shape))

    @tf.function(input_signature=[])
    def read():
        return tf.concat([tf.reshape(v, [-1]) for v in variables], axis=0)

    return WeightIO(assign=assign, read=read, shapes=shapes, dtype=dtype,
                    bounds=tuple(int(b) for b in np.cumsum([0, *sizes])),
                    names=tuple(str(v.path) for v in variables))


def save_model(model: keras.Model, path) -> None:
    """Save as ``.keras`` atomically (write a temp file, then rename)."""
    with atomic.replacing(path) as tmp, warnings.catch_warnings():
        # Keras converts its variables with np.array(v); under numpy 2 that warns that
        # their __array__ takes no copy keyword (harmless).
        warnings.filterwarnings("ignore", message="__array__ implementation",
                                category=DeprecationWarning)
        model.save(tmp)


def load_model(path) -> keras.Model:
    """Load a saved ``.keras`` model (custom loss registered above).

    Raises ``FileNotFoundError`` for a missing file, ``IsADirectoryError`` for a folder
    and ``ValueError`` ("… is not a readable Keras model (…)") for anything else that
    is not a model: Keras itself calls a truncated or foreign file "not found".
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model file not found: {path}")
    if os.path.isdir(path):
        inside = os.path.join(path, "model.keras")
        hint = f" (did you mean {inside}?)" if os.path.isfile(inside) else ""
        raise IsADirectoryError(f"{path} is a folder, not a model file{hint}")
    with open(path, "rb"):  # a permission problem stays an OSError naming the file
        pass
    if path.endswith(".keras") and not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a readable Keras model (not a zip archive: "
                         "truncated, or not a .keras file)")
    try:
        with warnings.catch_warnings():
            # The optimizer's slots are not restored until it has stepped once; a loaded
            # model is for prediction, or is trained with a fresh optimizer state anyway.
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            return keras.saving.load_model(path, compile=True)
    except OSError as err:
        if err.errno in _ENVIRONMENT_ERRNOS:
            raise  # a full disk or a permission problem is not the file's fault
        raise _unreadable(path, err) from err
    except (ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as err:
        raise _unreadable(path, err) from err


def _unreadable(path: str, err: BaseException) -> ValueError:
    detail = (str(err).strip().splitlines() or [""])[0][:200]
    return ValueError(f"{path} is not a readable Keras model "
                      f"({type(err).__name__}{': ' + detail if detail else ''})")


# Errors of the machine, not of the model file: let them through as they are.
_ENVIRONMENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS,
                                 errno.EMFILE, errno.ENOMEM})


def response_shift_weights(model: keras.Model) -> tuple[int, ...]:
    """Positions in ``model.weights`` (and ``get_weights``' list) of the response shifts'
    kernel and bias; empty for a model without them (``model.activation-shift`` other
    than ``response``, or the ``separate`` head). They read only the standardised
    response aggregates, nothing another weight computes, so they can be kept from
    another epoch or round than the rest (``train.shift-patience``)."""
    if "activation_response" not in {layer.name for layer in model.layers}:
        return ()
    return tuple(i for i, v in enumerate(model.weights)
                 if str(v.path).startswith("activation_shift/"))


def with_shifts_of(model: keras.Model, weights: list[np.ndarray],
                   source: list[np.ndarray]) -> list[np.ndarray]:
    """``weights`` with the response shifts (:func:`response_shift_weights`) of
    ``source``; ``weights`` itself when ``model`` has none."""
    positions = set(response_shift_weights(model))
    return [source[i] if i in positions else w for i, w in enumerate(weights)]


def num_actions(model: keras.Model) -> int:
    """How many actions the activation head scores."""
    return int(model.get_layer("activation").output.shape[-1])


def model_inputs(model: keras.Model, snaps: Snapshots) -> dict[str, np.ndarray]:
    """``snaps.inputs()`` with as many aggregate columns as ``model`` reads (the cadence
    features only with ``model.cadence-features``; older models read the first ones)."""
    x = snaps.inputs()
    width = int(model.input["static"].shape[-1])
    if width not in STATIC_LAYOUTS:
        raise ValueError(f"the model reads {width} aggregate columns; this version lays "
                         f"them out as {len(STATIC_FEATURES)}, {STATIC_LAYOUTS[1]} or "
                         f"{STATIC_LAYOUTS[2]} (AGGREGATE_FEATURES): train it again")
    return {**x, "static": x["static"][:, :width]}
