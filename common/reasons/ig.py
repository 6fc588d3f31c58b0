"""Integrated gradients of the decay head, grouped into ``FEATURE_GROUPS``.

The event and category ids are integers, so the path is taken through their embedding
outputs: the embedded steps go from zero vectors to the customer's embeddings while the
numeric steps and the aggregates go from a reference to the customer's values. Padding
stays masked all along the path (the mask comes from the ids), so the LSTM sees the same
steps at every point and the attributions of a step sum over its embedding and numeric
channels. The integral is a Gauss-Legendre rule on [0, 1]; every point of every row is one
row of a single compiled batch, so a batch of customers costs one call.

Completeness: the attributions of a row sum to ``f(x) - f(reference)`` up to the
quadrature error (``Attributions.delta`` reports it).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from common.feature_groups import FEATURE_GROUPS, GROUP_NAMES
from common.features import NUMERIC_FEATURES
from common.snapshots import Snapshots

#: Quadrature points per row; the completeness gap is reported, not assumed.
IG_STEPS = 8
#: Points when scoring (score, monitor): one, the midpoint rule. Its top group moves the
#: risk as much when occluded as the 32-point rule's (within a few thousandths, either
#: way) though it agrees with that rule's top reason less often (about 90 %), and it is
#: what reaches 20k targeted customers/s on 2 cores (docs/performance.md, measured with
#: ``fedecay explain --quadrature`` and ``fedecay bench``).
SCORE_IG_STEPS = 1
#: Rows per compiled call (rows x points go through the model at once); larger batches
#: were no faster (docs/performance.md) and pad a few targeted users to more rows.
IG_BATCH = 256


@dataclasses.dataclass(frozen=True)
class Reference:
    """The reference customer IG starts from: numeric step values (at real steps) and
    aggregates. The embedded steps start from zero vectors."""

    numeric: np.ndarray  # float32 [len(NUMERIC_FEATURES)]
    static: np.ndarray  # float32 [S]

    @classmethod
    def zeros(cls, static_width: int) -> Reference:
        return cls(np.zeros(len(NUMERIC_FEATURES), np.float32), np.zeros(static_width, np.float32))

    @classmethod
    def mean_of(cls, snaps: Snapshots) -> Reference:
        """The mean customer of ``snaps``: aggregates averaged over rows, numeric channels
        over real (non-padding) steps."""
        return cls.from_sums(*reference_sums(snaps))

    @classmethod
    def from_sums(cls, numeric_sum: np.ndarray, steps: float, static_sum: np.ndarray,
                  rows: float) -> Reference:
        """From running sums (:func:`reference_sums` added over chunks)."""
        return cls((numeric_sum / max(steps, 1.0)).astype(np.float32),
                   (static_sum / max(rows, 1.0)).astype(np.float32))


def reference_sums(snaps: Snapshots) -> tuple[np.ndarray, float, np.ndarray, float]:
    """(numeric sum over real steps, real steps, aggregate sum, rows), in float64, so
    chunks add up to the same reference whatever their sizes."""
    real = snaps.events > 0
    return (snaps.numeric[real].sum(axis=0, dtype=np.float64), float(real.sum()),
            snaps.static.sum(axis=0, dtype=np.float64), float(len(snaps)))


@dataclasses.dataclass
class Attributions:
    """Per row: attribution by group, by sequence step, the model's risk and the gap."""

    groups: np.ndarray  # float32 [N, len(GROUP_NAMES)]
    steps: np.ndarray  # float32 [N, L]; embedding + numeric channels of each step
    risk: np.ndarray  # float32 [N]; f(x)
    reference_risk: np.ndarray  # float32 [N]; f(reference) (padding as the row's)
    static: np.ndarray  # float32 [N, S]; per aggregate column

    @property
    def delta(self) -> np.ndarray:
        """Completeness gap: sum of attributions - (f(x) - f(reference))."""
        return self.groups.sum(axis=1) - (self.risk - self.reference_risk)


def integrated_gradients(model, snaps: Snapshots, reference: Reference, *,
                         steps: int = IG_STEPS, batch: int = IG_BATCH) -> Attributions:
    """IG of the decay head for every row of ``snaps``.

    Parameters
    ----------
    model : a Keras model of ``common.model.build_model``.
    snaps : the customers; the model reads its first ``static`` columns.
    reference : where the path starts (:class:`Reference`).
    steps : Gauss-Legendre points.
    batch : rows per compiled call (the last call is padded with a repeated row).
    """
    width = _check_width(model, reference)
    length = snaps.events.shape[1]
    fn = _compiled(model, steps, batch)
    parts = [[np.asarray(o)[:m] for o in fn(*inputs)]
             for m, inputs in _batches(snaps, reference, width, batch)]
    if not parts:
        return Attributions(np.zeros((0, len(GROUP_NAMES)), np.float32),
                            np.zeros((0, length), np.float32), np.zeros(0, np.float32),
                            np.zeros(0, np.float32), np.zeros((0, width), np.float32))
    ev, cat, num, stat, risk, ref_risk = (np.concatenate(p) for p in zip(*parts, strict=True))
    return Attributions(group_sums(ev, cat, num, stat), ev + cat + num.sum(axis=2),
                        risk, ref_risk, stat)


def group_ig(model, snaps: Snapshots, reference: Reference, *, steps: int = SCORE_IG_STEPS,
             batch: int = IG_BATCH) -> np.ndarray:
    """``[N, len(GROUP_NAMES)]``: the groups of :func:`integrated_gradients` alone.

    The scorer's rule: the same path and points, but nothing else is computed (no risk
    at either end, no per-step figures), which makes it the cheaper call.
    """
    width = _check_width(model, reference)
    n_num = len(NUMERIC_FEATURES)
    fn = _compiled(model, steps, batch, groups_only=True)
    parts = [[np.asarray(o)[:m] for o in fn(*inputs)]
             for m, inputs in _batches(snaps, reference, width, batch)]
    if not parts:
        return np.zeros((0, len(GROUP_NAMES)), np.float32)
    ev, cat, num, stat = (np.concatenate(p) for p in zip(*parts, strict=True))
    # Sums over the steps, as one step each: group_sums adds steps up either way.
    return group_sums(ev[:, None], cat[:, None], num.reshape(-1, 1, n_num), stat)


def occlude_groups(model, snaps: Snapshots, reference: Reference, *,
                   batch: int = IG_BATCH) -> np.ndarray:
    """``[N, len(GROUP_NAMES)]``: per group, the decay risk minus the risk with the group's
    inputs moved to the reference (IG's start: zero embeddings of its sequence inputs, the
    reference's numeric channels at real steps and aggregate columns).

    What removing a reason does to the risk, group by group: ``fedecay explain
    --quadrature`` scores each rule's top group by it. ``1 + len(GROUP_NAMES)`` forward
    passes per row, in one compiled call per ``batch`` rows.
    """
    width = _check_width(model, reference)
    fn = _compiled_occlusion(model, batch)
    parts = [np.asarray(fn(*inputs))[:m] for m, inputs in _batches(snaps, reference, width, batch)]
    return (np.concatenate(parts) if parts
            else np.zeros((0, len(GROUP_NAMES)), np.float32))


def _check_width(model, reference: Reference) -> int:
    width = int(model.input["static"].shape[-1])
    if reference.static.shape != (width,):
        raise ValueError(f"reference has {reference.static.shape[0]} aggregate columns, "
                         f"the model reads {width}")
    return width


def _batches(snaps: Snapshots, reference: Reference, width: int, batch: int):
    """(real rows, compiled call's inputs) per ``batch`` rows; the last batch is padded
    with a repeated row."""
    n = len(snaps.events)
    for lo in range(0, n, batch):
        m = min(batch, n - lo)
        rows = np.arange(lo, lo + batch)
        rows[m:] = lo
        yield m, (snaps.events[rows], snaps.categories[rows], snaps.numeric[rows],
                  snaps.static[rows, :width], reference.numeric, reference.static[:width])


def warm_up_ig(model, *, steps: int = SCORE_IG_STEPS, batch: int = IG_BATCH) -> None:
    """Compile the scorer's IG of ``model`` (:func:`group_ig`) now (XLA takes seconds),
    not at the first explanation."""
    length = int(model.input["events"].shape[1])
    width = int(model.input["static"].shape[-1])
    n_num = len(NUMERIC_FEATURES)
    _compiled(model, steps, batch, groups_only=True)(
        np.ones((batch, length), np.int32), np.ones((batch, length), np.int32),
        np.zeros((batch, length, n_num), np.float32), np.zeros((batch, width), np.float32),
        np.zeros(n_num, np.float32), np.zeros(width, np.float32))


def group_sums(ev: np.ndarray, cat: np.ndarray, num: np.ndarray,
               stat: np.ndarray) -> np.ndarray:
    """[N, G] group attributions from per-step event/category attributions [N, L], numeric
    [N, L, 3] and aggregate [N, S] ones (``FEATURE_GROUPS``)."""
    by_input = {"events": ev.sum(axis=1), "categories": cat.sum(axis=1)}
    out = np.zeros((len(ev), len(FEATURE_GROUPS)), np.float32)
    for g, group in enumerate(FEATURE_GROUPS):
        total = sum((by_input[s] for s in group.sequence), np.zeros(len(ev), np.float32))
        if group.numeric:
            total = total + num[:, :, list(group.numeric)].sum(axis=(1, 2))
        cols = group.aggregate_columns(stat.shape[1])
        if cols:
            total = total + stat[:, list(cols)].sum(axis=1)
        out[:, g] = total
    return out


@functools.lru_cache(maxsize=4)
def _compiled(model, steps: int, batch: int, jit: bool = True, groups_only: bool = False):
    """The compiled IG of ``model`` on ``batch`` rows (one trace per model and shape),
    with XLA when ``jit`` (its compile and throughput: docs/performance.md).
    ``groups_only``: per-input sums over the steps, and no risk at either end."""
    import tensorflow as tf

    nodes, weights = np.polynomial.legendre.leggauss(steps)
    alphas = tf.constant((nodes + 1.0) / 2.0, tf.float32)  # on [0, 1]
    quad = tf.constant(weights / 2.0, tf.float32)
    ev_table, cat_table, decay = _decay_head(model)

    @tf.function(input_signature=_signature(model, batch), jit_compile=jit)
    def ig(events, categories, numeric, static, ref_numeric, ref_static):
        mask = tf.not_equal(events, 0)
        real = tf.cast(mask, tf.float32)[..., None]
        x = [tf.gather(ev_table, events), tf.gather(cat_table, categories), numeric, static]
        base = [tf.zeros_like(x[0]), tf.zeros_like(x[1]), real * ref_numeric,
                tf.broadcast_to(ref_static, tf.shape(static))]
        # Every (point, row) pair is one row of one batch: points outer, rows inner.
        k = steps

        def along(x_i, b_i):
            a = tf.reshape(alphas, [k] + [1] * len(x_i.shape))
            return tf.reshape(b_i[None] + a * (x_i - b_i)[None], [k * batch, *x_i.shape[1:]])

        path = [along(x_i, b_i) for x_i, b_i in zip(x, base, strict=True)]
        mask_k = tf.tile(mask, [k, 1])
        with tf.GradientTape() as tape:
            tape.watch(path)
            out = decay(*path, mask_k)
        grads = tape.gradient(out, path)
        attr = []
        for g, x_i, b_i in zip(grads, x, base, strict=True):
            g = tf.reshape(g, [k, batch, *x_i.shape[1:]])
            w = tf.reshape(quad, [k] + [1] * len(x_i.shape))
            attr.append(tf.reduce_sum(w * g, axis=0) * (x_i - b_i))
        if groups_only:
            return (tf.reduce_sum(attr[0], axis=[1, 2]), tf.reduce_sum(attr[1], axis=[1, 2]),
                    tf.reduce_sum(attr[2], axis=1), attr[3])
        risk = decay(*x, mask)
        ref_risk = decay(*base, mask)
        return (tf.reduce_sum(attr[0], axis=-1), tf.reduce_sum(attr[1], axis=-1),
                attr[2], attr[3], risk, ref_risk)

    return ig


def _decay_head(model):
    """(event embedding table, category embedding table, decay) of ``model``: ``decay``
    maps the embedded steps, numeric steps, aggregates and mask to the decay risk, so a
    path or an occlusion can run through the embeddings' outputs."""
    names = {layer.name for layer in model.layers}
    recurrent = model.get_layer("bilstm" if "bilstm" in names else "lstm")
    layer = model.get_layer

    def decay(ev_emb, cat_emb, numeric, static, mask):
        seq = recurrent(layer("steps")([ev_emb, cat_emb, numeric]), mask=mask, training=False)
        agg = layer("static_dense")(static)
        trunk = layer("trunk")(layer("trunk_in")([seq, agg]))
        return layer("decay_dense")(trunk)[:, 0]  # dropout is the identity at inference

    return (model.get_layer("event_embedding").embeddings,
            model.get_layer("category_embedding").embeddings, decay)


def _signature(model, batch: int) -> list:
    """The compiled calls' inputs: events, categories, numeric, static, reference numeric,
    reference static (:func:`_batches`)."""
    import tensorflow as tf

    length = int(model.input["events"].shape[1])
    width = int(model.input["static"].shape[-1])
    n_num = len(NUMERIC_FEATURES)
    return [tf.TensorSpec([batch, length], tf.int32), tf.TensorSpec([batch, length], tf.int32),
            tf.TensorSpec([batch, length, n_num], tf.float32),
            tf.TensorSpec([batch, width], tf.float32), tf.TensorSpec([n_num], tf.float32),
            tf.TensorSpec([width], tf.float32)]


@functools.lru_cache(maxsize=2)
def _compiled_occlusion(model, batch: int):
    import tensorflow as tf

    ev_table, cat_table, decay = _decay_head(model)
    width = int(model.input["static"].shape[-1])
    n_num = len(NUMERIC_FEATURES)
    # One row per group: which inputs it moves (events, categories, numeric channels,
    # aggregate columns), 1 where the group owns the input.
    owns = np.zeros((len(FEATURE_GROUPS), 2 + n_num + width), np.float32)
    for g, group in enumerate(FEATURE_GROUPS):
        owns[g, 0] = "events" in group.sequence
        owns[g, 1] = "categories" in group.sequence
        owns[g, [2 + i for i in group.numeric]] = 1.0
        owns[g, [2 + n_num + c for c in group.aggregate_columns(width)]] = 1.0
    owned = tf.constant(owns)

    @tf.function(input_signature=_signature(model, batch), jit_compile=True)
    def occlude(events, categories, numeric, static, ref_numeric, ref_static):
        mask = tf.not_equal(events, 0)
        real = tf.cast(mask, tf.float32)[..., None]
        ev_emb, cat_emb = tf.gather(ev_table, events), tf.gather(cat_table, categories)
        risk = decay(ev_emb, cat_emb, numeric, static, mask)
        out = []
        for g in range(len(FEATURE_GROUPS)):
            keep = 1.0 - owned[g]
            moved_num = numeric * keep[2:2 + n_num] + (1.0 - keep[2:2 + n_num]) * real * ref_numeric
            moved_static = static * keep[2 + n_num:] + (1.0 - keep[2 + n_num:]) * ref_static
            out.append(risk - decay(ev_emb * keep[0], cat_emb * keep[1], moved_num, moved_static,
                                    mask))
        return tf.stack(out, axis=1)

    return occlude
