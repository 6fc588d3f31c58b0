"""The head refit: the activation head's last layer fitted again on pooled statistics.

The contrast head's logit for a campaign row is ``base + shift[action]``: ``base`` a
dense layer over the trunk (and the aggregates), each action's shift a dense layer over
the standardised response aggregates (``common.model._activation_head``). With every
other weight fixed that is a logistic regression in those weights alone (the *head*:
``activation_base/`` and ``activation_shift/``, 63 numbers in the default model). Its
gradient and Hessian are sums over campaign rows, so a federation can fit it exactly as pooled
training would: each merchant sends the sums over its own training campaign rows, the
server adds them up and takes a Newton step.

FedAvg over merchants whose campaign rows differ converges to another head than pooled
training would; centralised and local-only training do not take these steps (README,
*How the LSTM learns activation*, has the measurements).

A merchant's sums are second-order statistics of its campaign rows, with neither noise
nor masking: with few rows against the head's size they would give the rows away, so a
merchant answers only with enough rows (:func:`least_rows`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.snapshots import Snapshots

#: The head's weights: their paths in ``model.weights`` start with one of these.
HEAD_LAYERS = ("activation_base/", "activation_shift/")
#: Ridge added to the summed Hessian, pulling towards the head the refit started from:
#: keeps the step finite, and a direction no answering row informs (an action without
#: rows there) stays where the rounds left it.
RIDGE = 1e-3
#: Rows per probe call (padded up to it, so the probe compiles once).
PROBE_BATCH = 256


@dataclass(frozen=True)
class HeadStatistics:
    """Sums over campaign rows at one head: the log-loss, its gradient and Hessian."""

    rows: int
    loss: float
    gradient: np.ndarray  # [P]
    hessian: np.ndarray  # [P, P]

    def __add__(self, other: HeadStatistics) -> HeadStatistics:
        return HeadStatistics(self.rows + other.rows, self.loss + other.loss,
                              self.gradient + other.gradient, self.hessian + other.hessian)

    @classmethod
    def zero(cls, size: int) -> HeadStatistics:
        return cls(0, 0.0, np.zeros(size), np.zeros((size, size)))


def head_positions(model: Any) -> tuple[int, ...]:
    """Positions in ``model.weights`` of the head: base kernel, base bias, shift kernel,
    shift bias, in that order whatever the model's (the design's columns follow it);
    empty for a model without a contrast head whose shifts read the response aggregates
    (``model.activation-shift = response``)."""
    names = {layer.name for layer in model.layers}
    if not {"activation_base", "activation_response"} <= names:
        return ()
    return tuple(i for prefix in HEAD_LAYERS for i, v in enumerate(model.weights)
                 if str(v.path).startswith(prefix))


def head_vector(model: Any, weights: list[np.ndarray]) -> np.ndarray:
    """The head's weights out of ``weights``, flat, in :func:`head_positions`' order."""
    return np.concatenate([np.ravel(weights[i]).astype(float) for i in head_positions(model)])


def with_head(model: Any, weights: list[np.ndarray], theta: np.ndarray) -> list[np.ndarray]:
    """``weights`` with the head replaced by ``theta`` (in each weight's shape and dtype)."""
    out = list(weights)
    start = 0
    for i in head_positions(model):
        size = int(np.size(weights[i]))
        out[i] = np.asarray(theta[start:start + size], dtype=weights[i].dtype
                            ).reshape(np.shape(weights[i]))
        start += size
    if start != len(theta):
        raise ValueError(f"head refit: {len(theta)} head weights given, the model has {start}")
    return out


def head_statistics(model: Any, snaps: Snapshots) -> HeadStatistics:
    """The sums of ``snaps``' campaign rows (a logged action) at ``model``'s head."""
    rows = np.flatnonzero(snaps.action >= 0)
    size = sum(int(np.size(model.weights[i])) for i in head_positions(model))
    if len(rows) == 0:
        return HeadStatistics.zero(size)
    campaign = snaps.subset(rows)
    trunk, response = _probe(model)(campaign)
    design = _design(model, trunk, response, campaign.action)
    y = campaign.activation.astype(float)
    z = design @ head_vector(model, [np.asarray(v) for v in model.weights])
    p = 1.0 / (1.0 + np.exp(-z))
    # log(1 + e^z) - y z, written to stay finite for large |z|
    loss = float(np.sum(np.logaddexp(0.0, z) - y * z))
    curvature = p * (1.0 - p)
    return HeadStatistics(len(rows), loss, design.T @ (p - y),
                          (design * curvature[:, None]).T @ design)


def least_rows(head_size: int, shift_inputs: int, steps: int) -> tuple[int, int]:
    """The fewest campaign rows a merchant answers with, in all and in each action's
    group (control included), for a refit of ``steps`` steps.

    Each step's Hessian gives the server ``P (P + 1) / 2`` numbers (``P`` the head's
    size) and each row holds about ``P`` unknowns (its design row): with fewer unknowns
    in all than numbers received the sums can determine the rows themselves (with two
    steps and fewer than ``P`` rows, exactly, labels included). ``steps * P`` rows keep
    the unknowns about twice the numbers sent; an action's shift block (``k + 1`` columns,
    ``k`` the response inputs) needs ``steps * (k + 1)`` rows of that action the same
    way. A counting bound, not a proof: the sums are not differentially private.
    """
    return steps * head_size, steps * (shift_inputs + 1)


def campaign_refusal(snaps: Snapshots, model: Any, steps: int) -> str | None:
    """Why a merchant with training rows ``snaps`` does not answer a refit of ``steps``
    steps (:func:`least_rows`), or None when it does."""
    campaign = snaps.action[snaps.action >= 0]
    size = sum(int(np.size(model.weights[i])) for i in head_positions(model))
    layer = model.get_layer("activation_shift")
    total, per_group = least_rows(size, int(layer.kernel.shape[0]), steps)
    if len(campaign) < total:
        return (f"{len(campaign)} training campaign snapshots, fewer than the {total} a "
                f"{steps}-step refit of a {size}-weight head needs so that its sums do not "
                "determine the rows")
    groups = np.bincount(campaign, minlength=int(layer.units) + 1)
    if groups.min() < per_group:
        return (f"action {int(groups.argmin())} has {int(groups.min())} training campaign "
                f"snapshots, fewer than the {per_group} each action needs")
    return None


def newton_step(theta: np.ndarray, stats: HeadStatistics, anchor: np.ndarray) -> np.ndarray:
    """One Newton step from ``theta`` of the log-loss plus ``RIDGE / 2 |θ - anchor|²``.
    The summed Hessian's eigenvalues are clipped at 0 first (a sum of ``p (1 - p) x xᵀ``
    has none below; rounding or a bad reply could)."""
    values, vectors = np.linalg.eigh((stats.hessian + stats.hessian.T) / 2)
    hessian = (vectors * np.maximum(values, 0.0)) @ vectors.T + RIDGE * np.eye(len(theta))
    gradient = stats.gradient + RIDGE * (theta - anchor)
    return theta - np.linalg.solve(hessian, gradient)


@dataclass
class RefitOutcome:
    """The head kept and what each step saw (``losses[k]``: the summed log-loss at the
    head of step ``k``, ``rows[k]``: the campaign rows summed; ``kept``: the step whose
    head is kept, 0 = the one the refit started from)."""

    theta: np.ndarray
    losses: list[float]
    rows: list[int]
    kept: int = 0
    note: str = ""

    def summary(self) -> dict[str, Any]:
        """What a results file says: the steps, the mean log-loss at each step's head,
        the step kept, the campaign rows summed and why it stopped early, if it did."""
        return {"steps": len(self.losses), "rows": self.rows[-1] if self.rows else 0,
                "mean_loss": [loss / max(n, 1) for loss, n in
                              zip(self.losses, self.rows, strict=True)],
                "kept_step": self.kept, "note": self.note}


def refit(theta: np.ndarray, statistics: Callable[[np.ndarray], HeadStatistics | None],
          steps: int) -> RefitOutcome:
    """The best of ``steps`` heads: ``theta``, then damped Newton steps;
    ``statistics(head)`` sums the rows at a head (None when nothing could be summed: the
    refit stops).

    Every head kept has had its loss summed: the lowest mean loss wins. After a head
    whose loss is above the best one's, the next is halfway back towards the best.
    """
    anchor = best = current = theta
    best_stats: HeadStatistics | None = None
    losses: list[float] = []
    rows: list[int] = []
    kept = 0
    for step in range(steps):
        stats = statistics(current)
        if stats is None or stats.rows == 0:
            return RefitOutcome(best, losses, rows, kept, "no campaign rows were summed")
        losses.append(stats.loss)
        rows.append(stats.rows)
        if best_stats is None or stats.loss / stats.rows <= best_stats.loss / best_stats.rows:
            best, best_stats, kept = current, stats, step
            current = newton_step(best, best_stats, anchor)
        else:
            current = best + 0.5 * (current - best)
        if not np.all(np.isfinite(current)):
            return RefitOutcome(best, losses, rows, kept, "a step was not finite")
    return RefitOutcome(best, losses, rows, kept)


def refit_locally(model: Any, snaps: Snapshots, steps: int) -> RefitOutcome | None:
    """:func:`refit` on ``snaps``' own campaign rows, all of them: the pooled refit a
    federation's equals over the same rows (the tests' reference; no method of the
    comparison takes it). The model keeps the result. None (nothing changed) for a model
    without the head, no steps or no campaign rows."""
    if steps <= 0 or not head_positions(model) or not np.any(snaps.action >= 0):
        return None
    weights = [np.asarray(v) for v in model.get_weights()]

    def statistics(theta: np.ndarray) -> HeadStatistics:
        model.set_weights(with_head(model, weights, theta))
        return head_statistics(model, snaps)

    outcome = refit(head_vector(model, weights), statistics, steps)
    model.set_weights(with_head(model, weights, outcome.theta))
    return outcome


def _design(model: Any, trunk: np.ndarray, response: np.ndarray, action: np.ndarray
            ) -> np.ndarray:
    """Rows of the logistic regression: the base's inputs and 1, then for the logged
    action only its shift's inputs (times the shift gain) and the gain, at that action's
    columns of the shift kernel (``[inputs, actions - 1]``, row-major) and bias."""
    n, width = trunk.shape
    treated = model.get_layer("activation_shift").units
    gain = _shift_gain(model)
    k = response.shape[1]
    design = np.zeros((n, width + 1 + k * treated + treated))
    design[:, :width] = trunk
    design[:, width] = 1.0
    start = width + 1
    for column in range(treated):
        rows = np.flatnonzero(action == column + 1)
        design[np.ix_(rows, start + column + treated * np.arange(k))] = gain * response[rows]
        design[rows, start + k * treated + column] = gain
    return design


def _shift_gain(model: Any) -> float:
    names = {layer.name for layer in model.layers}
    if "activation_shift_gain" not in names:
        return 1.0
    return float(model.get_layer("activation_shift_gain").scale)


@functools.lru_cache(maxsize=4)
def _probe(model: Any) -> Callable[[Snapshots], tuple[np.ndarray, np.ndarray]]:
    """A function giving the head's inputs (the base layer's and the standardised
    response aggregates) of some rows, run as :func:`common.training.predict` runs."""
    import keras

    from common.training import predict

    probe = keras.Model(model.input, {
        "trunk": model.get_layer("activation_base").input,
        "response": model.get_layer("activation_response").output})

    def run(snaps: Snapshots) -> tuple[np.ndarray, np.ndarray]:
        out = predict(probe, snaps, batch=PROBE_BATCH)
        return out["trunk"].astype(float), out["response"].astype(float)

    return run
