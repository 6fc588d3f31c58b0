"""The work of one message, apart from Flower: the ClientApp and a long-running trainer
beside the SuperNode both call these functions.

Nothing here takes or returns a Flower type; TensorFlow is imported lazily, so a caller
can check its merchant's file before paying for the import. The functions return the
model's weight tensors and scalar metrics, never ids or rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from client.config import ClientSettings
from client.timer import HandlerTimer
from common.snapshots import Snapshots


def global_round(config: Mapping[str, Any]) -> int:
    """The round a train instruction belongs to; "global-round" survives a resume
    (server-round restarts at 1), and the seeds follow it."""
    return int(config.get("global-round", config.get("server-round", 0)))


def global_model(settings: ClientSettings, weights: list[np.ndarray],
                 timer: HandlerTimer | None = None) -> Any:
    """The process's cached model holding ``weights`` (the server's global model)."""
    from common.model import cached_model, set_weights_of

    if timer is not None:
        timer.lap("tensorflow import")
    model = cached_model(settings.model, settings.snapshots, settings.seed)
    set_weights_of(model, weights)
    if timer is not None:
        timer.lap("model")
    return model


def fit_locally(model: Any, settings: ClientSettings, snaps: Snapshots,
                config: Mapping[str, Any]) -> dict[str, float | int]:
    """Train ``model`` (holding the global weights) on this merchant's training rows as
    the server's ``config`` asks; the whitelisted metrics of the reply."""
    from common.training import fit

    train_rows, val_rows = snaps.split_part("train"), snaps.split_part("val")
    train_cfg = dataclasses.replace(
        settings.train,
        epochs=int(config.get("local-epochs", settings.train.epochs)),
        proximal_mu=float(config.get("proximal-mu", settings.train.proximal_mu)),
    )
    result = fit(model, train_rows, val_rows, train_cfg,
                 seed=settings.seed * 100_003 + global_round(config))
    metrics: dict[str, float | int] = {
        k: float(v) if np.isfinite(v) else -1.0 for k, v in result.as_metrics().items()}
    metrics["num-examples"] = int(len(train_rows))
    return metrics


def evaluate_locally(model: Any, test: Snapshots) -> dict[str, float | int]:
    """The whitelisted metrics of ``model`` on this merchant's held-out rows."""
    from common.training import predict, validation_loss

    p = np.clip(predict(model, test)["decay"], 1e-7, 1 - 1e-7)
    y = test.decay
    return {
        "num-examples": int(len(test)),
        "eval_loss": validation_loss(model, test),
        "decay_log_loss": float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))),
        "decay_accuracy": float(np.mean((p >= 0.5) == (y > 0.5))),
        "decay_positive_rate": float(y.mean()),
    }


def train_reply(settings: ClientSettings, snaps: Snapshots, weights: list[np.ndarray],
                config: Mapping[str, Any], timer: HandlerTimer | None = None
                ) -> tuple[list[np.ndarray], dict[str, float | int]]:
    """Train the global model ``weights`` on this merchant's training rows.

    The caller has checked the merchant's data, simulated faults and that there are
    training rows. Returns the locally trained weights and the reply's whitelisted
    metrics.
    """
    from common.model import weights_of

    model = global_model(settings, weights, timer)
    metrics = fit_locally(model, settings, snaps, config)
    if timer is not None:
        timer.lap("fit")
    return weights_of(model), metrics


def evaluate_reply(settings: ClientSettings, test: Snapshots, weights: list[np.ndarray],
                   timer: HandlerTimer | None = None) -> dict[str, float | int]:
    """The whitelisted metrics of the global model ``weights`` on the held-out rows
    ``test`` (the caller has checked there are some)."""
    model = global_model(settings, weights, timer)
    metrics = evaluate_locally(model, test)
    if timer is not None:
        timer.lap("evaluate")
    return metrics
