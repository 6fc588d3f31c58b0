"""The merchant's ClientApp: trains the shared model on its own snapshots only.

The merchant's data comes from the node configuration (``client.shards``). Snapshots
and the compiled model are built once per process; each message only sets weights.

A reply carries the model's weight tensors and a whitelist of scalar metrics, never
ids or rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.arrays import array_record
from client.attribution import attribution_reply, wants_attributions
from client.channel import SOCKET_KEY
from client.config import ClientSettings, NodeConfigError, cached_settings, check_node_config
from client.customer_dp import SEEDED_REFUSED, seeded_refusal
from client.faults import SIMULATED_DROPOUT, simulated_fault
from client.handoff import ChannelError, ask_trainer, trainer_socket
from client.head_refit import head_refit_reply, wants_head_refit
from client.hosted import serve, warms_up
from client.shards import ShardCache, process_shard_cache, shard_cache_bytes, shard_location
from client.timer import HandlerTimer
from client.work import (
    PRE_TRAINING_METRICS,
    SCORE_VALIDATION_KEY,
    VALIDATION_METRICS,
    evaluate_reply,
    global_round,
    train_reply,
)
from common.attribution import ATTRIBUTION_METRICS
from common.protocol import CUSTOMER_METRICS, HEAD_REFIT_METRICS
from common.schema import DataError
from common.snapshots import Snapshots

log = logging.getLogger(__name__)

#: Metric names a client may send; anything else is a defect (see the egress tests).
TRAIN_METRICS: tuple[str, ...] = ("num-examples", "train_loss", "val_loss", "epochs",
                                  "fit_seconds", *PRE_TRAINING_METRICS, *CUSTOMER_METRICS)
EVALUATE_METRICS: tuple[str, ...] = ("num-examples", "eval_loss", "decay_log_loss",
                                     "decay_accuracy", "decay_positive_rate",
                                     *VALIDATION_METRICS,
                                     *ATTRIBUTION_METRICS, *HEAD_REFIT_METRICS)
#: Error code of a reply whose merchant data could not be used.
DATA_ERROR = 100
#: What reading a merchant's file may raise: the reply then names only its kind.
DATA_ERRORS = (DataError, ValueError, FileNotFoundError)
#: Where a message's merchant comes from: its settings and snapshots.
MerchantData = Callable[[Context], tuple[ClientSettings, Snapshots]]
#: The warm trainer's reply to a message ("train" or "evaluate"), None to work here.
WarmTrainer = Callable[[Message, Context, str, HandlerTimer], "Message | None"]
#: Texts of the errors a warm trainer may reply with (it sends only their kind).
_TRAINER_ERRORS = {"no-train-rows": "no training snapshots in this merchant's data",
                   "no-test-rows": "no held-out snapshots in this merchant's data"}


def error_reply(msg: Message, code: int, reason: str) -> Message:
    """A reply to ``msg`` carrying only an error."""
    return Message(Error(code=code, reason=reason), reply_to=msg)


def data_error_reply(msg: Message, err: Exception) -> Message:
    """Log the full reason locally; send only its kind, never quoted rows or values."""
    log.error("merchant data rejected: %s", err)
    return error_reply(msg, DATA_ERROR, f"merchant data rejected ({type(err).__name__}); "
                       "the reason is in this merchant's SuperNode log")


def node_config_reply(msg: Message, context: Context) -> Message | None:
    """An error reply when this node's ``--node-config`` cannot be used
    (:func:`client.config.check_node_config`), else None. The full reason is logged
    here; the server hears only the key."""
    try:
        check_node_config(context.node_config)
    except NodeConfigError as err:
        log.error("%s", err)
        return error_reply(msg, DATA_ERROR, f"merchant node config rejected (key {err.key!r});"
                           " the reason is in this merchant's SuperNode log")
    return None


def merchant_data(
    context: Context,
    flat: Mapping[str, Any] | None,
    resolve: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None,
    shards: ShardCache,
) -> tuple[ClientSettings, Snapshots]:
    """This node's settings (``flat``, else the run config completed by ``resolve``) and
    its merchant's snapshots (through ``shards``)."""
    settings = cached_settings(resolved_config(context, flat, resolve))
    path, fmt, inter = shard_location(context.node_config, settings.client)
    # Only the simulation's shards (files the driver wrote in its run folder) get a
    # snapshot file beside them; a merchant's own data folder is left as it is.
    return settings, shards.load(path, fmt, inter, settings.snapshots,
                                 disk_cache="data-path" not in context.node_config)


def resolved_config(context: Context, flat: Mapping[str, Any] | None,
                    resolve: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None
                    ) -> Mapping[str, Any]:
    """The run's flat settings: ``flat``, else the run config completed by ``resolve``."""
    config = flat if flat is not None else context.run_config
    return resolve(config) if resolve is not None else config


def warm_reply(msg: Message, context: Context, kind: str, run_config: Mapping[str, Any],
               timer: HandlerTimer) -> Message | None:
    """The reply of this merchant's warm trainer (:mod:`client.trainer`), checked
    against the whitelists; None when no trainer listens or the hand-off failed (both
    logged): the caller then does the work in this process."""
    sock = trainer_socket(context.node_config)
    if sock is None:
        if context.node_config.get(SOCKET_KEY):  # asked for: stopped, or its socket removed
            log.warning("no warm trainer listens at %s=%s: %s in this process", SOCKET_KEY,
                        context.node_config[SOCKET_KEY], kind)
        elif "data-path" in context.node_config:
            log.info("no warm trainer listening for this node: %s in this process", kind)
        return None
    config: Mapping[str, Any] = msg.content.config_records.get("config") or {}
    if kind == "train":
        settings = cached_settings(run_config)
        fault = simulated_fault(settings.client, settings.seed, context.node_config,
                                global_round(config))
        if fault:
            return error_reply(msg, SIMULATED_DROPOUT, fault)
    weights = msg.content.array_records["arrays"].to_numpy_ndarrays()
    try:
        got = ask_trainer(sock, kind, context.node_config, run_config, config, weights,
                          TRAIN_METRICS if kind == "train" else EVALUATE_METRICS)
    except (ChannelError, OSError) as err:
        log.warning("warm trainer at %s not used (%s): %s in this process", sock, err, kind)
        return None
    timer.lap("hand-off")
    trainer = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in got.laps)
    what = (f"train round {global_round(config)}" if kind == "train"
            else f"evaluate round {config.get('server-round', '?')!s}")
    log.info("%s (trainer: %s)", timer.summary(what), trainer)
    if got.error is not None:
        text = _TRAINER_ERRORS.get(got.error)
        return error_reply(msg, DATA_ERROR, text or f"merchant data rejected ({got.error}); "
                           "the reason is in this merchant's trainer log")
    records: dict[str, Any] = {"metrics": MetricRecord(dict(got.metrics))}
    if got.weights is not None:
        records = {"arrays": ArrayRecord(got.weights), **records}
    return Message(RecordDict(records), reply_to=msg)


def handle_train(msg: Message, context: Context, data: MerchantData,
                 warm: WarmTrainer | None = None, *,
                 weights: list[Any] | None = None) -> Message:
    """Train the global model on this merchant's rows: its weights and metrics, or an
    error (data, simulated dropout, no training rows). ``warm`` hands the work to the
    merchant's warm trainer when one listens; ``weights``, the message's tensors when
    the caller read them already (a node serving several merchants)."""
    timer = HandlerTimer()
    if (refused := node_config_reply(msg, context)) is not None:
        return refused
    refusal = seeded_refusal(msg.content.config_records.get("config") or {},
                             context.node_config)
    if refusal is not None:  # before any hand-off: the warm trainer never sees it
        log.error("%s", refusal)
        return error_reply(msg, SEEDED_REFUSED, refusal)
    if warm is not None and (handed := warm(msg, context, "train", timer)) is not None:
        return handed
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
    if weights is None:
        weights = msg.content.array_records["arrays"].to_numpy_ndarrays()
    # A large simulation's process serves merchants of every size: it compiles their
    # validation layouts at its first message rather than in a later round.
    trained, metrics = train_reply(settings, snaps, weights, config, timer,
                                   warm=warms_up(msg, context))
    log.info("%s", timer.summary(f"train round {server_round}"))
    reply = RecordDict({"arrays": array_record(trained),
                        "metrics": MetricRecord(dict(metrics))})
    return Message(reply, reply_to=msg)


def handle_evaluate(msg: Message, context: Context, data: MerchantData,
                    warm: WarmTrainer | None = None, *,
                    weights: list[Any] | None = None) -> Message:
    """Evaluate the global model on this merchant's held-out rows: the metrics, or an
    error (data, no held-out rows); through the warm trainer when one listens;
    ``weights`` as in :func:`handle_train`."""
    timer = HandlerTimer()
    if (refused := node_config_reply(msg, context)) is not None:
        return refused
    # Attributions (client.attribution) and the head refit's sums (client.head_refit)
    # are computed here, never by the warm trainer.
    asked = msg.content.config_records.get("config")
    explain, refit = wants_attributions(asked), wants_head_refit(asked)
    if warm is not None and not (explain or refit) \
            and (handed := warm(msg, context, "evaluate", timer)) is not None:
        return handed
    try:
        settings, snaps = data(context)
    except DATA_ERRORS as err:
        return data_error_reply(msg, err)
    timer.lap("data")
    if explain:
        return attribution_reply(msg, settings, snaps)
    if refit:
        return head_refit_reply(msg, settings, snaps, weights, context.node_config)
    test = snaps.split_part("test")
    if len(test) == 0:
        return error_reply(msg, DATA_ERROR, "no held-out snapshots in this merchant's data")
    config = msg.content.config_records.get("config")
    # The server's last round: its model is scored on the validation rows too.
    val = snaps.split_part("val") if config and config.get(SCORE_VALIDATION_KEY) else None
    if weights is None:
        weights = msg.content.array_records["arrays"].to_numpy_ndarrays()
    metrics = evaluate_reply(settings, test, weights, timer, val=val)
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

    def warm(msg: Message, context: Context, kind: str, timer: HandlerTimer
             ) -> Message | None:
        return warm_reply(msg, context, kind, resolved_config(context, flat, resolve), timer)

    @app.train(mods=train_mods(flat))
    def train(msg: Message, context: Context) -> Message:
        # serve: a simulated node hosting several merchants serves each (client.hosted)
        return serve(msg, context,
                     lambda m, c, w: handle_train(m, c, data, warm, weights=w))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return serve(msg, context,
                     lambda m, c, w: handle_evaluate(m, c, data, warm, weights=w))

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
