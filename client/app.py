"""The merchant's ClientApp: trains the shared model on its own snapshots only.

The merchant's data comes from the node configuration (``client.shards``). Snapshots
and the compiled model are built once per process; each message only sets weights.

A reply carries the model's weight tensors and a whitelist of scalar metrics, never
ids or rows.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.config import ClientSettings, cached_settings
from client.faults import SIMULATED_DROPOUT, simulated_fault
from client.shards import ShardCache, process_shard_cache, shard_cache_bytes, shard_location
from client.timer import HandlerTimer
from common.schema import DataError
from common.snapshots import Snapshots

log = logging.getLogger(__name__)

#: Metric names a client may send; anything else is a defect (see the egress tests).
TRAIN_METRICS: tuple[str, ...] = ("num-examples", "train_loss", "val_loss", "epochs",
                                  "fit_seconds")
EVALUATE_METRICS: tuple[str, ...] = ("num-examples", "eval_loss", "decay_log_loss",
                                     "decay_accuracy", "decay_positive_rate")
#: Error code of a reply whose merchant data could not be used.
DATA_ERROR = 100
#: What reading a merchant's file may raise: the reply then names only its kind.
DATA_ERRORS = (DataError, ValueError, FileNotFoundError)
#: Where a message's merchant comes from: its settings and snapshots.
MerchantData = Callable[[Context], tuple[ClientSettings, Snapshots]]


def error_reply(msg: Message, code: int, reason: str) -> Message:
    """A reply to ``msg`` carrying only an error."""
    return Message(Error(code=code, reason=reason), reply_to=msg)


def data_error_reply(msg: Message, err: Exception) -> Message:
    """Log the full reason locally; send only its kind, never quoted rows or values."""
    log.error("merchant data rejected: %s", err)
    return error_reply(msg, DATA_ERROR, f"merchant data rejected ({type(err).__name__}); "
                       "the reason is in this merchant's SuperNode log")


def _global_model(settings: ClientSettings, arrays: ArrayRecord, timer: HandlerTimer) -> Any:
    """The process's cached model holding the weights the server sent."""
    from common.model import cached_model, set_weights_of

    timer.lap("tensorflow import")
    model = cached_model(settings.model, settings.snapshots, settings.seed)
    set_weights_of(model, arrays.to_numpy_ndarrays())
    timer.lap("model")
    return model


def global_round(config: Mapping[str, Any]) -> int:
    """The round a train instruction belongs to; "global-round" survives a resume
    (server-round restarts at 1), and the seeds follow it."""
    return int(config.get("global-round", config.get("server-round", 0)))


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


def merchant_data(
    context: Context,
    flat: Mapping[str, Any] | None,
    resolve: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None,
    shards: ShardCache,
) -> tuple[ClientSettings, Snapshots]:
    """This node's settings (``flat``, else the run config completed by ``resolve``) and
    its merchant's snapshots (through ``shards``)."""
    config = flat if flat is not None else context.run_config
    if resolve is not None:
        config = resolve(config)
    settings = cached_settings(config)
    path, fmt, inter = shard_location(context.node_config, settings.client)
    # Only the simulation's shards (files the driver wrote in its run folder) get a
    # snapshot file beside them; a merchant's own data folder is left as it is.
    return settings, shards.load(path, fmt, inter, settings.snapshots,
                                 disk_cache="data-path" not in context.node_config)


def handle_train(msg: Message, context: Context, data: MerchantData) -> Message:
    """Train the global model on this merchant's rows: its weights and metrics, or an
    error (data, simulated dropout, no training rows)."""
    timer = HandlerTimer()
    # The file is checked before TensorFlow is imported: a bad file fails fast.
    try:
        settings, snaps = data(context)
    except DATA_ERRORS as err:
        return data_error_reply(msg, err)
    timer.lap("data")
    config = msg.content.config_records["config"]
    server_round = global_round(config)
    fault = simulated_fault(settings.client, settings.seed, context.node_config, server_round)
    if fault:
        return error_reply(msg, SIMULATED_DROPOUT, fault)
    if len(snaps.split_part("train")) == 0:
        return error_reply(msg, DATA_ERROR, "no training snapshots in this merchant's data")
    model = _global_model(settings, msg.content.array_records["arrays"], timer)
    metrics = fit_locally(model, settings, snaps, config)
    timer.lap("fit")
    log.info("%s", timer.summary(f"train round {server_round}"))
    from common.model import weights_of

    reply = RecordDict({"arrays": ArrayRecord(weights_of(model)),
                        "metrics": MetricRecord(dict(metrics))})
    return Message(reply, reply_to=msg)


def handle_evaluate(msg: Message, context: Context, data: MerchantData) -> Message:
    """Evaluate the global model on this merchant's held-out rows: the metrics, or an
    error (data, no held-out rows)."""
    timer = HandlerTimer()
    try:
        settings, snaps = data(context)
    except DATA_ERRORS as err:
        return data_error_reply(msg, err)
    timer.lap("data")
    test = snaps.split_part("test")
    if len(test) == 0:
        return error_reply(msg, DATA_ERROR, "no held-out snapshots in this merchant's data")
    model = _global_model(settings, msg.content.array_records["arrays"], timer)
    metrics = evaluate_locally(model, test)
    timer.lap("evaluate")
    config = msg.content.config_records.get("config")
    server_round = config.get("server-round", "?") if config is not None else "?"
    log.info("%s", timer.summary(f"evaluate round {server_round!s}"))
    return Message(RecordDict({"metrics": MetricRecord(dict(metrics))}), reply_to=msg)


def make_client_app(
    flat: Mapping[str, Any] | None = None,
    resolve: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
) -> ClientApp:
    """A ClientApp reading its settings from ``flat`` or, if None, the run config.

    ``run_simulation`` hands apps an empty run config, so simulations driven from
    Python pass the resolved settings explicitly; ``resolve`` may complete a run
    config (``flwr run``) before it is read. The shard cache's size is read now
    (:func:`client.shards.shard_cache_bytes`); the cache itself is the process's.
    """
    app = ClientApp()
    cache_bytes = shard_cache_bytes()

    def data(context: Context) -> tuple[ClientSettings, Snapshots]:
        return merchant_data(context, flat, resolve, process_shard_cache(cache_bytes))

    @app.train(mods=train_mods(flat))
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, data)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, data)

    return app


def train_mods(flat: Mapping[str, Any] | None) -> list[Callable[..., Message]]:
    """Mods of the train handler only (on the whole app ``fixedclipping_mod`` would break
    every evaluate reply).

    With explicit settings, ``privacy.mode = client-fixed`` makes this merchant clip its
    own update and refuse a server that sends no clipping norm. From a run config the
    update is clipped whenever the server's DP wrapper sends a norm.
    """
    from flwr.clientapp.mod import fixedclipping_mod

    if flat is not None:
        return [fixedclipping_mod] if flat.get("privacy.mode") == "client-fixed" else []
    return [_clip_when_asked]


def _clip_when_asked(msg: Message, context: Context, call_next: Callable[..., Message]
                     ) -> Message:
    from flwr.clientapp.mod import fixedclipping_mod
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    config = msg.content.config_records.get("config")
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


app = make_client_app()
