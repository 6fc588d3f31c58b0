"""The work of one message, apart from Flower: the ClientApp and a long-running trainer
beside the SuperNode both call these functions.

Nothing here takes or returns a Flower type; TensorFlow is imported lazily, so a caller
can check its merchant's file before paying for the import. The functions return the
model's weight tensors and scalar metrics, never ids or rows.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from client.config import ClientSettings
from client.timer import HandlerTimer
from common.protocol import (
    CUSTOMER_RATE_KEY,
    GLOBAL_ROUND_KEY,
    PRE_EVALUATE_KEY,
    PRE_TRAINING_LOSSES,
    PRE_TRAINING_METRICS,
    SCORE_VALIDATION_KEY,
    VALIDATION_METRICS,
)
from common.snapshots import Snapshots

# The protocol's names are re-exported: the ClientApp imports them from here.
__all__ = ["PRE_EVALUATE_KEY", "PRE_TRAINING_METRICS", "SCORE_VALIDATION_KEY",
           "VALIDATION_METRICS", "evaluate_locally", "evaluate_reply", "fit_locally",
           "freezes_heap", "global_model", "global_round", "pre_training_metrics",
           "settle_heap", "train_reply", "warm_up"]

log = logging.getLogger(__name__)

#: Environment variable: "0" leaves Python's collector as it is (:func:`settle_heap`),
#: to pair runs with and without; "1" freezes. Processes started by a simulation (Ray's
#: actors) inherit it from the driver.
GC_FREEZE_ENV = "FEDECAY_GC_FREEZE"


def global_round(config: Mapping[str, Any]) -> int:
    """The round a train instruction belongs to; "global-round" survives a resume
    (server-round restarts at 1), and the seeds follow it."""
    return int(config.get(GLOBAL_ROUND_KEY, config.get("server-round", 0)))


def global_model(settings: ClientSettings, weights: list[np.ndarray] | None,
                 timer: HandlerTimer | None = None) -> Any:
    """The process's cached model holding ``weights`` (the server's global model);
    with None, as it is (the caller gives the weights to ``fit``)."""
    from common.model import cached_model, set_weights_of

    if timer is not None:
        timer.lap("tensorflow import")
    model = cached_model(settings.model, settings.snapshots, settings.seed)
    if weights is not None:
        set_weights_of(model, weights)
    if timer is not None:
        timer.lap("model")
    return model


def fit_locally(model: Any, settings: ClientSettings, snaps: Snapshots,
                config: Mapping[str, Any]) -> dict[str, float | int]:
    """Train ``model`` (holding the global weights) on this merchant's training rows as
    the server's ``config`` asks; the whitelisted metrics of the reply."""
    return _local_fit(model, settings, snaps, config)[1]


def _local_fit(model: Any, settings: ClientSettings, snaps: Snapshots,
               config: Mapping[str, Any], initial: list[np.ndarray] | None = None
               ) -> tuple[list[np.ndarray], dict[str, float | int]]:
    """:func:`fit_locally` starting from ``initial`` when given (assigned in the same
    compiled call as the first epoch); the trained weights and the metrics."""
    from common.training import fit

    train_rows, val_rows = snaps.split_part("train"), snaps.split_part("val")
    train_cfg = _train_config(settings, config)
    result = fit(model, train_rows, val_rows, train_cfg,
                 seed=settings.seed * 100_003 + global_round(config), initial=initial)
    metrics: dict[str, float | int] = {
        k: float(v) if np.isfinite(v) else -1.0 for k, v in result.as_metrics().items()}
    metrics["num-examples"] = int(len(train_rows))
    return result.weights, metrics


def _train_config(settings: ClientSettings, config: Mapping[str, Any]) -> Any:
    """The TrainConfig of this round's local fit: the settings' with the server's
    ``local-epochs`` and ``proximal-mu``."""
    return dataclasses.replace(
        settings.train,
        epochs=int(config.get("local-epochs", settings.train.epochs)),
        proximal_mu=float(config.get("proximal-mu", settings.train.proximal_mu)),
    )


def warm_up(settings: ClientSettings, snaps: Snapshots, config: Mapping[str, Any],
            weights: list[np.ndarray]) -> bool:
    """Compile, once per process, every validation layout this round's fit can meet
    (``common.training.warm_up``): what a simulation's actor, which serves merchants of
    every size, would otherwise compile in a steady round when it first meets one.
    Leaves the cached model's weights changed: call it before the model is given the
    global weights. False when warmed already."""
    from common.training import warm_up as warm_fit

    model = global_model(settings, None)
    initial = None if config.get(PRE_EVALUATE_KEY) else weights
    return warm_fit(model, snaps.split_part("train"), _train_config(settings, config),
                    initial=initial)


def freezes_heap() -> bool:
    """Whether :func:`settle_heap` freezes (:data:`GC_FREEZE_ENV`; off by default)."""
    value = os.environ.get(GC_FREEZE_ENV, "0").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"environment variable {GC_FREEZE_ENV} must be 0 or 1, got {value!r}")
    return value == "1"


def settle_heap() -> bool:
    """Once per process, after its first model is built and compiled: move every object
    then alive out of reach of Python's cyclic garbage collector (``gc.freeze()``,
    after a collection so that no garbage is frozen).

    A process with TensorFlow and the model tracks hundreds of thousands of objects,
    which every full (generation 2) collection walks, in whichever handler is running
    (figures in ``docs/performance.md``). They live as long as the process, so walking
    them finds nothing. Objects created later (a merchant's rows, a reply) are collected as
    before, and a frozen object is still freed when its last reference goes; only a
    reference cycle among frozen objects would stay, which is why this runs once, not
    per merchant. False when off (:func:`freezes_heap`) or done already.
    """
    if not freezes_heap():
        return False
    settled = _settled()
    if settled:  # not gc.get_freeze_count(): it walks every frozen object
        return False
    gc.collect()
    gc.freeze()
    settled.append(gc.get_freeze_count())
    log.info("froze %d objects out of the garbage collector's reach", settled[0])
    return True


@functools.cache
def _settled() -> list[int]:
    """How many objects :func:`settle_heap` froze in this process (empty: not yet)."""
    return []


def evaluate_locally(model: Any, test: Snapshots) -> dict[str, float | int]:
    """The whitelisted metrics of ``model`` on this merchant's held-out rows."""
    from common.metrics import binary_log_loss
    from common.training import predict, validation_loss

    p = predict(model, test)["decay"]
    y = test.decay
    return {
        "num-examples": int(len(test)),
        "eval_loss": validation_loss(model, test),
        "decay_log_loss": binary_log_loss(y, p),
        "decay_accuracy": float(np.mean((p >= 0.5) == (y > 0.5))),
        "decay_positive_rate": float(y.mean()),
    }


def pre_training_metrics(model: Any, snaps: Snapshots) -> dict[str, float | int]:
    """The loss of ``model`` (the incoming global model) on this merchant's validation
    and test rows, and how many there are.

    Named as ``common.protocol.PRE_TRAINING_LOSSES`` says, the table the server reads
    them by: it weighs ``pre_val_loss`` by ``val_examples`` to select a round in
    deployment. A part without rows gives loss 0.0 and count 0 (weight 0), so every
    reply has the same keys.
    """
    from common.metrics import binary_log_loss
    from common.training import predict, validation_loss

    val, test = snaps.split_part("val"), snaps.split_part("test")

    def decay_log_loss(m: Any, part: Snapshots) -> float:
        return binary_log_loss(part.decay, predict(m, part)["decay"])

    scored: dict[str, tuple[Snapshots, Callable[[Any, Snapshots], float]]] = {
        "val_loss": (val, validation_loss), "eval_loss": (test, validation_loss),
        "decay_log_loss": (test, decay_log_loss)}
    metrics: dict[str, float | int] = {}
    for name, (loss_key, rows_key) in PRE_TRAINING_LOSSES.items():
        part, loss = scored[name]
        value = loss(model, part) if len(part) else 0.0
        metrics[loss_key] = value if np.isfinite(value) else -1.0
        metrics[rows_key] = int(len(part))
    return metrics


def train_reply(settings: ClientSettings, snaps: Snapshots, weights: list[np.ndarray],
                config: Mapping[str, Any], timer: HandlerTimer | None = None, *,
                warm: bool = False) -> tuple[list[np.ndarray], dict[str, float | int]]:
    """Train the global model ``weights`` on this merchant's training rows.

    The caller has checked the merchant's data, simulated faults and that there are
    training rows. When ``config`` holds a true :data:`PRE_EVALUATE_KEY`, the incoming
    model is first scored on the validation and test rows (:func:`pre_training_metrics`),
    so one message a round serves both training and model selection. ``warm`` (a
    simulation's process, which serves merchants of every size): first compile every
    validation layout the fit can meet (:func:`warm_up`, once per process). The
    process's first call then freezes its heap (:func:`settle_heap`). Returns the
    locally trained weights and the reply's whitelisted metrics.
    """
    if CUSTOMER_RATE_KEY in config:  # customer-level DP: clipped per-customer updates
        from client.customer_dp import customer_train_reply

        return customer_train_reply(settings, snaps, weights, config, timer)
    if warm and warm_up(settings, snaps, config, weights) and timer is not None:
        timer.lap("warm-up")
    pre: dict[str, float | int] = {}
    # The global weights go in now to be scored, else with the first epoch's compiled call.
    model = global_model(settings, weights if config.get(PRE_EVALUATE_KEY) else None, timer)
    if settle_heap() and timer is not None:  # the model is built (and warmed): once
        timer.lap("heap frozen")
    if config.get(PRE_EVALUATE_KEY):
        pre = pre_training_metrics(model, snaps)
        if timer is not None:
            timer.lap("pre-training evaluation")
        trained, metrics = _local_fit(model, settings, snaps, config)
    else:
        trained, metrics = _local_fit(model, settings, snaps, config, initial=weights)
    if timer is not None:
        timer.lap("fit")
    return trained, {**metrics, **pre}


def evaluate_reply(settings: ClientSettings, test: Snapshots, weights: list[np.ndarray],
                   timer: HandlerTimer | None = None, *, val: Snapshots | None = None
                   ) -> dict[str, float | int]:
    """The whitelisted metrics of the global model ``weights`` on the held-out rows
    ``test`` (the caller has checked there are some).

    With ``val`` (what the caller passes when the evaluate config holds a true
    :data:`SCORE_VALIDATION_KEY`: the server's last round, whose model no later train
    reply scores), also the model's loss on those validation rows and their count,
    named as in a train reply's pre-training metrics.
    """
    model = global_model(settings, weights, timer)
    metrics = evaluate_locally(model, test)
    if val is not None:
        from common.training import validation_loss

        loss_key, rows_key = VALIDATION_METRICS
        loss = validation_loss(model, val) if len(val) else 0.0
        metrics[loss_key] = loss if np.isfinite(loss) else -1.0
        metrics[rows_key] = int(len(val))
    if timer is not None:
        timer.lap("evaluate")
    return metrics
