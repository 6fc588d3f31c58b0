"""Global attributions: how much each feature group matters to a model's decay risk.

Computed on one set of snapshots (a merchant's validation period in the federation, the
pooled validation period in ``fedecay compare``) for the LSTM (``common.model``) and the
tabular models (``common.tabular.TabularModel``) alike:

- **permutation importance** of each group of ``common.feature_groups.FEATURE_GROUPS``:
  the group's inputs (its sequence inputs, numeric channels and aggregate columns) are
  moved together to another row by one seeded permutation of the rows, and the decay
  log-loss rises (``log_loss_rise``) and the decay ROC-AUC falls (``auc_drop``) by as
  much as the model relied on them; the mean over ``repeats`` permutations. Every
  permuted copy is predicted in a few large batches, never row by row. A group whose
  inputs the model does not read (the sequence-only ``event_mix`` for GBDT and LR; the
  cadence aggregates of an LSTM without them) is 0 without predicting;
- **mean |gradient x input|** (LSTM only): the decay probability's gradient with respect
  to the float inputs times those inputs, summed over a group's numeric channels (real
  steps) and aggregate columns and averaged over rows. Event types and categories enter
  through embeddings of ids, so ``event_mix`` has no value and ``categories`` counts only
  its aggregate.

:meth:`Attributions.as_metrics` gives the scalars a merchant sends
(:data:`ATTRIBUTION_METRICS`, the whitelist) and :func:`aggregate_metrics` combines
several merchants' scalars, weighted by their rows.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from common.feature_groups import FEATURE_GROUPS, GROUP_NAMES, FeatureGroup
from common.features import AGGREGATE_FEATURES
from common.snapshots import Snapshots

#: Rows predicted per call: permuted copies are stacked up to this many rows.
STACK_ROWS = 16_384
DEFAULT_REPEATS = 3

#: Scalars of a merchant's reply: the rows used, the rows whose AUC counts (0 when its
#: validation period holds one class only), the base log-loss and AUC, and per group the
#: log-loss rise, the AUC drop and mean |gradient x input|.
ROW_METRICS: tuple[str, ...] = ("attr_n", "attr_auc_n", "attr_base_log_loss", "attr_base_auc")
#: The row counts :func:`aggregate_metrics` weights by: every usable reply holds both.
WEIGHT_METRICS: tuple[str, ...] = ("attr_n", "attr_auc_n")
ATTRIBUTION_METRICS: tuple[str, ...] = (
    *ROW_METRICS,
    *(f"attr_perm_{g}" for g in GROUP_NAMES),
    *(f"attr_auc_{g}" for g in GROUP_NAMES),
    *(f"attr_grad_{g}" for g in GROUP_NAMES),
)

DecayPredictor = Callable[[Snapshots], np.ndarray]


@dataclasses.dataclass(frozen=True)
class InputsRead:
    """Which inputs a model reads: the sequences, and the aggregate columns of
    ``Snapshots.static``: ``static_columns`` (a tabular model's, by name) or else the
    first ``static_width`` (the LSTM's ``static`` input)."""

    sequences: bool
    static_width: int
    static_columns: tuple[int, ...] | None = None

    def columns(self, group: FeatureGroup) -> tuple[int, ...]:
        """The columns of ``Snapshots.static`` in ``group`` that the model reads."""
        if self.static_columns is None:
            return group.aggregate_columns(self.static_width)
        return tuple(c for c in group.aggregate_columns() if c in self.static_columns)

    def reads(self, group: FeatureGroup) -> bool:
        """Whether the model reads any input of ``group``."""
        return bool((self.sequences and (group.sequence or group.numeric))
                    or self.columns(group))


@dataclasses.dataclass(frozen=True)
class GroupImportance:
    """One group's global importance (``grad_input`` None where it has no float input
    or the model gives no gradients)."""

    log_loss_rise: float
    log_loss_rise_std: float
    auc_drop: float
    auc_drop_std: float
    grad_input: float | None
    reads: bool


@dataclasses.dataclass(frozen=True)
class Attributions:
    """Per-group importances of one model on ``rows`` snapshots."""

    rows: int
    auc_rows: int  # rows when both classes are present, else 0 (no AUC)
    base_log_loss: float
    base_auc: float
    repeats: int
    seed: int
    groups: dict[str, GroupImportance]

    def as_metrics(self) -> dict[str, float | int]:
        """The whitelisted scalars of a merchant's reply (names in ATTRIBUTION_METRICS);
        an undefined AUC is sent as 0 with ``attr_auc_n`` 0, so it weighs nothing."""
        auc_ok = self.auc_rows > 0
        out: dict[str, float | int] = {
            "attr_n": int(self.rows), "attr_auc_n": int(self.auc_rows),
            "attr_base_log_loss": float(self.base_log_loss),
            "attr_base_auc": float(self.base_auc) if auc_ok else 0.0}
        for name, g in self.groups.items():
            out[f"attr_perm_{name}"] = float(g.log_loss_rise)
            out[f"attr_auc_{name}"] = float(g.auc_drop) if auc_ok else 0.0
            if g.grad_input is not None:
                out[f"attr_grad_{name}"] = float(g.grad_input)
        return out

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary (NaN as None)."""
        return {"rows": self.rows, "auc_rows": self.auc_rows,
                "base_log_loss": _num(self.base_log_loss), "base_auc": _num(self.base_auc),
                "repeats": self.repeats, "seed": self.seed,
                "groups": {n: {k: _num(v) if isinstance(v, float) else v
                               for k, v in dataclasses.asdict(g).items()}
                           for n, g in self.groups.items()}}


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


# ---------------------------------------------------------------------------- models

def inputs_read(model: Any) -> InputsRead:
    """What ``model`` reads: a ``TabularModel`` its aggregates only, the LSTM the
    sequences and the aggregate columns its ``static`` input is wide."""
    from common.tabular import TabularModel

    if isinstance(model, TabularModel):
        columns = tabular_columns(model)
        return InputsRead(sequences=False, static_width=max(columns, default=-1) + 1,
                          static_columns=columns)
    return InputsRead(sequences=True, static_width=int(model.input["static"].shape[-1]))


def tabular_columns(model: Any) -> tuple[int, ...]:
    """The columns of ``Snapshots.static`` a ``TabularModel`` reads, in its order: its
    features by name (a model file stores their names, as ``TabularModel.predict`` reads
    them), not the first ``len(features)`` columns. ``ValueError`` naming the model file
    and the feature when it reads an aggregate this version does not compute."""
    from common.tabular import MODEL_FILE

    unknown = [name for name in model.features if name not in AGGREGATE_FEATURES]
    if unknown:
        raise ValueError(f"{MODEL_FILE} ({model.kind}): reads aggregate feature(s) "
                         f"{', '.join(map(repr, unknown))} that this version does not "
                         "compute; retrain the model with this version")
    return tuple(AGGREGATE_FEATURES.index(name) for name in model.features)


def decay_predictor(model: Any) -> DecayPredictor:
    """The decay risk of ``model`` on snapshots, in batches (``common.training.predict``
    for the LSTM, the decay classifier of a ``TabularModel``)."""
    from common.tabular import TabularModel, aggregate_features

    if isinstance(model, TabularModel):  # the decay classifier only, not every head
        columns = list(tabular_columns(model))
        return lambda snaps: (model.decay.predict_proba(
            aggregate_features(snaps)[:, columns])[:, 1] if len(snaps)
            else np.zeros(0, np.float32))
    from common.training import predict

    return lambda snaps: predict(model, snaps)["decay"]


def global_attributions(model: Any, snaps: Snapshots, *, repeats: int = DEFAULT_REPEATS,
                        seed: int = 0, gradients: bool = True,
                        groups: Sequence[FeatureGroup] = FEATURE_GROUPS) -> Attributions:
    """Permutation importance (and, for the LSTM, mean |gradient x input|) of every
    feature group of ``model`` on ``snaps``.

    Parameters
    ----------
    model : the LSTM (a Keras model built by ``common.model``) or a ``TabularModel``.
    snaps : the rows to explain (labelled: the decay label is the target).
    repeats : permutations per group; importances are their mean.
    seed : seeds the permutations.
    gradients : also compute |gradient x input| (ignored for tabular models).
    """
    reads = inputs_read(model)
    perm = permutation_importance(decay_predictor(model), snaps, reads, repeats=repeats,
                                  seed=seed, groups=groups)
    grads: dict[str, float] = {}
    if gradients and reads.sequences and len(snaps):
        grads = gradient_times_input(model, snaps, groups=groups)
    from common.metrics.arrays import two_classes

    y = snaps.decay
    auc_rows = len(y) if two_classes(y) else 0
    return Attributions(
        rows=len(snaps), auc_rows=auc_rows, base_log_loss=perm.base_log_loss,
        base_auc=perm.base_auc, repeats=repeats, seed=seed,
        groups={g.name: GroupImportance(
            log_loss_rise=perm.rise[g.name][0], log_loss_rise_std=perm.rise[g.name][1],
            auc_drop=perm.drop[g.name][0], auc_drop_std=perm.drop[g.name][1],
            grad_input=grads.get(g.name), reads=reads.reads(g)) for g in groups})


# ---------------------------------------------------------------- permutation importance

@dataclasses.dataclass(frozen=True)
class PermutationResult:
    """Base scores and per group (mean, std over repeats) of the rise and drop."""

    base_log_loss: float
    base_auc: float
    rise: dict[str, tuple[float, float]]
    drop: dict[str, tuple[float, float]]


def permute_group(snaps: Snapshots, group: FeatureGroup, order: np.ndarray,
                  reads: InputsRead) -> Snapshots:
    """A copy of ``snaps`` whose inputs of ``group`` (those the model reads) come from
    rows ``order``; every other input and the labels stay in place."""
    events, categories, numeric, static = snaps.events, snaps.categories, snaps.numeric, \
        snaps.static
    if reads.sequences:
        if "events" in group.sequence:
            events = events[order]
        if "categories" in group.sequence:
            categories = categories[order]
        if group.numeric:
            numeric = numeric.copy()
            channels = list(group.numeric)
            numeric[:, :, channels] = snaps.numeric[order][:, :, channels]
    cols = list(reads.columns(group))
    if cols:
        static = static.copy()
        static[:, cols] = snaps.static[order][:, cols]
    return dataclasses.replace(snaps, events=events, categories=categories, numeric=numeric,
                               static=static)


def permutation_importance(predict: DecayPredictor, snaps: Snapshots, reads: InputsRead, *,
                           repeats: int = DEFAULT_REPEATS, seed: int = 0,
                           groups: Sequence[FeatureGroup] = FEATURE_GROUPS,
                           stack_rows: int = STACK_ROWS) -> PermutationResult:
    """The rise in decay log-loss and the fall in decay AUC when each group's inputs are
    permuted across rows (see the module docstring); 0 for a group the model does not
    read. Permuted copies are stacked and predicted ``stack_rows`` rows at a time."""
    if repeats < 1:
        raise ValueError(f"attribution repeats must be >= 1, got {repeats}")
    n, y = len(snaps), np.asarray(snaps.decay, np.float64)
    read = [g for g in groups if reads.reads(g)]
    rng = np.random.default_rng(seed)
    # One permutation per (repeat, group), drawn in a fixed order whatever is read.
    orders = {(r, g.name): rng.permutation(n) for r in range(repeats) for g in groups}
    # Row 0 of ``probs``: the snapshots as they are; then one per (repeat, group read).
    variants: list[tuple[int, FeatureGroup] | None] = [None]
    variants += [(r, g) for r in range(repeats) for g in read]
    probs = np.empty((len(variants), n), np.float64)
    per_stack = max(1, stack_rows // max(n, 1))
    for lo in range(0, len(variants), per_stack):
        chunk = variants[lo:lo + per_stack]
        parts = [snaps if v is None else permute_group(snaps, v[1], orders[(v[0], v[1].name)],
                                                        reads) for v in chunk]
        stacked = parts[0] if len(parts) == 1 else Snapshots.concat(parts)
        probs[lo:lo + len(chunk)] = np.asarray(predict(stacked), np.float64).reshape(
            len(chunk), n)
    losses = _log_loss_rows(y, probs)
    aucs = _auc_rows(y, probs)
    rise: dict[str, tuple[float, float]] = {}
    drop: dict[str, tuple[float, float]] = {}
    for g in groups:
        if g not in read:
            rise[g.name] = drop[g.name] = (0.0, 0.0)
            continue
        idx = [i for i, v in enumerate(variants) if v is not None and v[1] is g]
        rise[g.name] = _mean_std(losses[idx] - losses[0])
        drop[g.name] = _mean_std(aucs[0] - aucs[idx])
    return PermutationResult(float(losses[0]), float(aucs[0]), rise, drop)


def _mean_std(x: np.ndarray) -> tuple[float, float]:
    return float(np.mean(x)), float(np.std(x))


def _log_loss_rows(y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Decay log-loss of each row of ``probs`` [V, N] against labels ``y`` [N]."""
    from common.metrics import log_losses

    if probs.shape[1] == 0:
        return np.full(len(probs), np.nan)
    return log_losses(y, probs).mean(axis=1)


def _auc_rows(y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """ROC-AUC of each row of ``probs`` [V, N] (ties count half); NaN without both
    classes. Mann-Whitney on average ranks, all rows at once."""
    pos = y > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return np.full(len(probs), np.nan)
    ranks = _average_ranks(probs)
    return (ranks[:, pos].sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks along axis 1, tied values sharing their average rank."""
    order = np.argsort(x, axis=1, kind="stable")
    s = np.take_along_axis(x, order, axis=1)
    n = s.shape[1]
    pos = np.broadcast_to(np.arange(n), s.shape)
    starts = np.ones(s.shape, bool)
    starts[:, 1:] = s[:, 1:] != s[:, :-1]
    ends = np.ones(s.shape, bool)
    ends[:, :-1] = starts[:, 1:]
    first = np.maximum.accumulate(np.where(starts, pos, 0), axis=1)
    last = np.minimum.accumulate(np.where(ends, pos, n)[:, ::-1], axis=1)[:, ::-1]
    ranks = np.empty(s.shape, np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2 + 1, axis=1)
    return ranks


# ---------------------------------------------------------------- gradient x input

def gradient_times_input(model: Any, snaps: Snapshots, *,
                         groups: Sequence[FeatureGroup] = FEATURE_GROUPS,
                         batch: int = 1024) -> dict[str, float]:
    """Mean over rows of sum |d decay / d x * x| over each group's float inputs: its
    numeric channels at real steps and its aggregate columns the model reads. Groups
    without a float input are left out."""
    from common.model import model_inputs

    x_all = model_inputs(model, snaps)
    width = x_all["static"].shape[1]
    n = len(snaps)
    numeric_sum = np.zeros(x_all["numeric"].shape[2], np.float64)
    static_sum = np.zeros(width, np.float64)
    step = _gradient_step(model)
    for lo in range(0, n, batch):
        m = min(batch, n - lo)
        rows = np.arange(lo, lo + batch)
        rows[m:] = lo  # fixed shapes: padding repeats a row and is dropped
        x = {k: v[rows] for k, v in x_all.items()}
        g_num, g_sta = (np.asarray(t) for t in step(x))
        real = (x["events"][:m] > 0)[:, :, None]
        numeric_sum += np.abs(g_num[:m] * x["numeric"][:m] * real).sum(axis=(0, 1))
        static_sum += np.abs(g_sta[:m] * x["static"][:m]).sum(axis=0)
    out: dict[str, float] = {}
    for g in groups:
        cols = list(g.aggregate_columns(width))
        if not g.numeric and not cols:
            continue
        total = numeric_sum[list(g.numeric)].sum() + static_sum[cols].sum()
        out[g.name] = float(total / max(n, 1))
    return out


@functools.lru_cache(maxsize=4)
def _gradient_step(model: Any) -> Callable[[dict[str, np.ndarray]], tuple[Any, Any]]:
    """One compiled call: the decay head's gradient with respect to the numeric and
    static inputs of a batch."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def step(x: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        numeric, static = tf.cast(x["numeric"], tf.float32), tf.cast(x["static"], tf.float32)
        with tf.GradientTape() as tape:
            tape.watch([numeric, static])
            out = model({**x, "numeric": numeric, "static": static}, training=False)
            decay = tf.reduce_sum(out["decay"])
        g_num, g_sta = tape.gradient(decay, [numeric, static])
        return g_num, g_sta

    return step


# ---------------------------------------------------------------- merchants' aggregate

def aggregate_metrics(replies: Sequence[Mapping[str, float | int]]) -> dict[str, Any]:
    """Combine merchants' :meth:`Attributions.as_metrics` scalars: log-loss rises,
    gradients and base log-loss weighted by ``attr_n``; AUC drops and base AUC weighted
    by ``attr_auc_n`` (merchants without both classes weigh nothing there).

    Returns ``{"rows", "auc_rows", "merchants", "base_log_loss", "base_auc", "groups":
    {group: {"log_loss_rise", "auc_drop", "grad_input"}}}``; a value no merchant gave
    (or all with weight 0) is None.
    """
    def weighted(key: str, weight: str) -> float | None:
        # A reply without the weight weighs nothing (server.attribution rejects such).
        pairs = [(float(r.get(weight, 0)), float(r[key])) for r in replies
                 if key in r and float(r.get(weight, 0)) > 0]
        total = sum(w for w, _ in pairs)
        return sum(w * v for w, v in pairs) / total if total > 0 else None

    return {
        "rows": int(sum(int(r.get("attr_n", 0)) for r in replies)),
        "auc_rows": int(sum(int(r.get("attr_auc_n", 0)) for r in replies)),
        "merchants": len(replies),
        "base_log_loss": weighted("attr_base_log_loss", "attr_n"),
        "base_auc": weighted("attr_base_auc", "attr_auc_n"),
        "groups": {g: {"log_loss_rise": weighted(f"attr_perm_{g}", "attr_n"),
                       "auc_drop": weighted(f"attr_auc_{g}", "attr_auc_n"),
                       "grad_input": weighted(f"attr_grad_{g}", "attr_n")}
                   for g in GROUP_NAMES},
    }
