"""Flower strategies with the checks a federation of merchants needs.

``build_strategy`` picks FedAvg, FedProx, FedAdam, FedYogi, FedAvgM, FedTrimmedAvg,
FedMedian or Krum from ``flwr.serverapp.strategy`` and adds, through hooks rather
than a copy of ``start``:

- seeded node sampling (``server.sampling``): node ids sorted, drawn from the strategy's
  own ``random.Random`` seeded per global round (Flower's ``sample_nodes`` draws from
  the ``random`` module);
- rejection of replies whose weights are non-finite or do not match the global
  model's dtypes and shapes, or that lack one ArrayRecord and one MetricRecord with a
  positive ``num-examples``, logged by node, before anything is averaged
  (``server.replies``);
- replies sorted by content so the float sum is the same whatever order they came in;
- ``federation.shift-server-lr`` / ``-momentum``: the response shifts stepped from the
  round's incoming weights along the aggregate's change (``server.shift_step``; under a
  DP wrapper after its noise, see :meth:`GuardedMixin.step_shifts`);
- with ``federation.pre-evaluate``, every train instruction asks the merchant to score
  the incoming global model first; the round's replies give its federated validation
  loss (``server.rounds.federated_scores``), which selects the round kept in deployment;
  the last round's model is scored by evaluate messages asking for the validation loss;
- instructions sent largest merchant first (by the rows each last reported);
- each reply's tensors read once: checked, then handed to the aggregation as read; with
  FedAvg's own averaging (FedAvg, FedProx) the replies are averaged as read, one flat
  vector a reply, to the same bits (``server.replies.fedavg``);
- per-round bookkeeping in a ``server.rounds.RoundBook``: sampled / replied / failed /
  rejected nodes, bytes each way, rounds where no client replied; a sampled node with no
  reply at all is counted as failed and timed out (Flower's ``send_and_receive`` stops
  waiting after the round timeout and never hands its late reply to a later round).
"""

from __future__ import annotations

import logging
import math
import random
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from common.protocol import GLOBAL_ROUND_KEY, PRE_EVALUATE_KEY, SCORE_VALIDATION_KEY
from server.config import DPConfig, FederationConfig, shift_momentum
from server.replies import (
    ReadReply,
    ReplyLayout,
    array_bytes,
    common_metric_keys,
    fedavg,
    read_reply,
    reply_order,
    usual_keys,
    with_unit_weight,
)
from server.rounds import RoundBook, error_summary
from server.sampling import OwnedSampling, SortedGrid, round_seed
from server.shift_step import NO_STEP, ShiftStep

log = logging.getLogger(__name__)


class GuardedMixin:
    """Hooks added in front of a Flower strategy (see the module docstring)."""

    seed: int = 0
    #: Differential privacy: every update counts the same (the noise assumes a plain mean).
    uniform_weights: bool = False
    #: What ``start`` gets as ``timeout``; named in the reason of a missing reply.
    round_timeout: float | None = None
    #: The FedAvg metric replies are weighted by (set by Flower's FedAvg).
    weighted_by_key: str
    #: ``federation.shift-server-lr`` / ``-momentum`` (inactive by default) and the
    #: shifts' velocity (checkpointed).
    shift_step: ShiftStep = NO_STEP
    shift_velocity: list[np.ndarray] | None = None

    def _init_guard(self, seed: int, round_timeout: float | None = None,
                    engine_failed: threading.Event | None = None, *,
                    pre_evaluate: bool = False, final_round: int = 0,
                    shift_step: ShiftStep = NO_STEP) -> None:
        self.seed = seed
        self.shift_step = shift_step
        self.round_timeout = round_timeout
        #: Ask every train reply to score the incoming global model before training
        #: (``client.work.pre_training_metrics``); kept per round in ``rounds``.
        self.pre_evaluate = pre_evaluate
        #: The run's last global round: with ``pre_evaluate`` its model, which no later
        #: train reply scores, is scored by evaluate messages (see ``configure_evaluate``).
        self.final_round = final_round
        self.rounds = RoundBook(engine_failed)
        self._screened_round: int | None = None
        self._examples: dict[int, float] = {}  # training rows each node last reported
        self._layout = ReplyLayout([])
        #: Train replies read as they came (``_read_early``): id -> (reply, its reading).
        self._early: dict[int, tuple[Message, ReadReply | str]] = {}
        self.round_rng = random.Random(seed)  # replaced at the start of every round

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        g = self.rounds.global_round(server_round)
        if not self.rounds.may_start(g):
            return []
        config[GLOBAL_ROUND_KEY] = g
        if self.pre_evaluate:
            config[PRE_EVALUATE_KEY] = True
        self._layout = ReplyLayout(arrays.to_numpy_ndarrays())
        self._early = {}
        listen = getattr(grid, "listen", None)  # server.merchant_grid.MerchantGrid's
        if callable(listen):
            listen(self._read_early)
        self.round_rng = random.Random(round_seed(self.seed, g))
        messages = list(super().configure_train(server_round, arrays, config,  # type: ignore[misc]
                                                SortedGrid(grid)))
        # Largest merchants first (by the rows they reported, new ones before all): the
        # simulation's workers take messages in this order, and a big merchant left for
        # last keeps the round waiting on one worker while the others idle.
        messages.sort(key=lambda m: -self._examples.get(m.metadata.dst_node_id, math.inf))
        self.rounds.sampled(g, [m.metadata.dst_node_id for m in messages],
                            array_bytes(arrays))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        g = self.rounds.global_round(server_round)
        read: list[ReadReply] | None = None
        # A wrapper that screened the replies (DP) steps the shifts once it is done.
        wrapped = self._screened_round == g
        if wrapped:  # a DP wrapper screened them before clipping
            good = list(replies)
            good.sort(key=reply_order)
        else:
            read = self._screen(g, replies)
            read.sort(key=lambda r: r.order)
            good = [r.msg for r in read]
        self._screened_round = None
        if not good:
            return None, None
        if self.pre_evaluate:
            self.rounds.pre_training(g, [next(iter(m.content.metric_records.values()))
                                         for m in good])
        averaged = (fedavg(read, self.weighted_by_key)
                    if read is not None and self._averages_as_fedavg() else None)
        if averaged is not None:
            log.info("aggregate_train: Received %s results and 0 failures", len(read or ()))
            arrays, metrics = averaged
        else:
            for r in read or ():
                r.checked()
            if self.uniform_weights:
                good = [with_unit_weight(m, self.weighted_by_key) for m in good]
            arrays, metrics = super().aggregate_train(server_round, good)  # type: ignore[misc]
        if metrics is not None:
            self.rounds.train_metrics(g, metrics)
        return (arrays if wrapped else self.step_shifts(arrays)), metrics

    def step_shifts(self, arrays: ArrayRecord | None) -> ArrayRecord | None:
        """The round's aggregate with the response shifts stepped from the weights the
        round started from (``federation.shift-server-lr`` / ``-momentum``); ``arrays``
        itself at rate 1 without momentum.

        The guard calls it on its own aggregate; a wrapper that screens the replies
        (the DP wrappers, customer-level DP) calls it on what it releases, after its
        noise: a step there is post-processing, while a step before the noise would
        scale the shifts' sensitivity by the rate.
        """
        if arrays is None or not self.shift_step.active:
            return arrays
        new, self.shift_velocity = self.shift_step.apply(
            self._layout.reference, arrays.to_numpy_ndarrays(), self.shift_velocity)
        stepped = ArrayRecord(new)
        if getattr(self, "current_arrays", None) is arrays:  # FedAvgM's own copy
            self.current_arrays = stepped
        return stepped

    def _averages_as_fedavg(self) -> bool:
        """Whether the strategy behind the guard averages with FedAvg's own
        ``aggregate_train`` and metric function, unweighted replies aside (then
        ``server.replies.fedavg`` gives the same bits)."""
        if self.uniform_weights or getattr(self, "train_metrics_aggr_fn",
                                           None) is not aggregate_metricrecords:
            return False
        mro = type(self).__mro__
        after = mro[mro.index(GuardedMixin) + 1:]
        owner = next((c for c in after if "aggregate_train" in vars(c)), None)
        return owner is flwr_strategy.FedAvg

    def _read_early(self, replies: list[Message]) -> None:
        """Read train replies as they come (:func:`read_reply`, no bookkeeping), so that
        little is left to do once the last one is in: the round's tail, when the
        clients wait for the next round, shrinks."""
        for msg in replies:
            if msg.metadata.message_type == MessageType.TRAIN and not msg.has_error():
                self._early[id(msg)] = (msg, read_reply(msg, self._layout,
                                                        self.weighted_by_key))

    def screen_train_replies(self, server_round: int, replies: Iterable[Message]
                             ) -> list[Message]:
        """The replies that can be aggregated; the others are counted and logged by node.

        Parameters
        ----------
        server_round : Flower's round number (the global round less the resume offset).
        replies : the round's train replies, errors included.

        Returns
        -------
        The usable replies, each holding its tensors as read and checked; an empty list
        when none is (the round is then counted as empty).
        """
        g = self.rounds.global_round(server_round)
        self._screened_round = g
        read = self._screen(g, replies)
        for r in read:
            r.checked()
        return [r.msg for r in read]

    def _screen(self, g: int, replies: Iterable[Message]) -> list[ReadReply]:
        """:meth:`screen_train_replies` for global round ``g``, the replies as read."""
        good: list[ReadReply] = []
        answered: set[int] = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            answered.add(node)
            if msg.has_error():
                self.rounds.failed(g, node, error_summary(msg.error.reason))
                continue
            early = self._early.pop(id(msg), None)
            read = (early[1] if early is not None and early[0] is msg
                    else read_reply(msg, self._layout, self.weighted_by_key))
            if isinstance(read, str):
                self.rounds.rejected(g, node, read)
                continue
            self.rounds.round(g).bytes_up += array_bytes(read.record)
            weight = read.metrics[self.weighted_by_key]
            self._examples[node] = float(weight)  # type: ignore[arg-type]
            good.append(read)
        self._early = {}
        limit = f"{self.round_timeout:g} s" if self.round_timeout else "the round timeout"
        self.rounds.missing(g, answered, limit)
        if not good:
            self.rounds.empty(g, "no client replied with usable weights")
            return []
        usual = usual_keys([r.metrics for r in good])
        for r, ok in zip(good, usual, strict=True):
            if not ok:
                self.rounds.rejected(g, r.msg.metadata.src_node_id,
                                     "metric names differ from the other replies'")
        good = [r for r, ok in zip(good, usual, strict=True) if ok]
        self.rounds.round(g).replied = len(good)
        return good

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Flower's client-side evaluation (``fraction-evaluate``); with ``pre_evaluate``
        the last round's evaluate messages also ask for the validation loss, and go to
        the nodes that trained in it when ``fraction-evaluate`` sends none."""
        g = self.rounds.global_round(server_round)
        # Not may_start: configure_train already logged a halted round and opened its stats.
        final = self.pre_evaluate and g == self.final_round and not self.rounds.halted
        if final:
            config[SCORE_VALIDATION_KEY] = True
        messages = list(super().configure_evaluate(server_round, arrays, config,  # type: ignore[misc]
                                                   grid))
        if final and not messages:
            nodes = self.rounds.round(g).awaited
            log.info("round %d: the last round's model goes to the %d nodes that trained "
                     "in it to be scored on their validation rows", g, len(nodes))
            messages = self._messages(server_round, arrays, config, nodes,  # type: ignore[attr-defined]
                                      MessageType.EVALUATE)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        replies = [m for m in replies if not m.has_error()
                   and len(m.content.metric_records) == 1]
        if self.pre_evaluate:
            self.rounds.final_scores(self.rounds.global_round(server_round),
                                     [next(iter(m.content.metric_records.values()))
                                      for m in replies])
        replies, _ = common_metric_keys(replies)
        metrics = super().aggregate_evaluate(server_round, replies)  # type: ignore[misc]
        if metrics is not None:
            self.rounds.client_metrics(self.rounds.global_round(server_round), metrics)
        return metrics


_BASES: dict[str, type] = {
    "fedavg": flwr_strategy.FedAvg,
    "fedprox": flwr_strategy.FedProx,
    "fedadam": flwr_strategy.FedAdam,
    "fedyogi": flwr_strategy.FedYogi,
    "fedavgm": flwr_strategy.FedAvgM,
    "fedtrimmedavg": flwr_strategy.FedTrimmedAvg,
    "fedmedian": flwr_strategy.FedMedian,
    "krum": flwr_strategy.Krum,
}


def build_strategy(config: FederationConfig, seed: int, *,
                   engine_failed: threading.Event | None = None,
                   shifts: tuple[int, ...] = (), privacy: DPConfig | None = None) -> Any:
    """The configured Flower strategy with the guard hooks in front of it.

    Parameters
    ----------
    config : the federation settings (strategy, sampling, round timeout).
    seed : seeds each global round's sampling.
    engine_failed : when given and set, no round starts (see
        ``server.app.make_server_app``).
    shifts : positions of the response shifts in the weight list
        (``common.model.response_shift_weights``), stepped by
        ``federation.shift-server-lr`` / ``-momentum``.
    privacy : the run's DP settings, which decide whether the shifts' momentum applies
        (``server.config.shift_momentum``); None: no DP.
    """
    base = _BASES[config.strategy]
    sampling = (OwnedSampling,) if base is flwr_strategy.FedAvg else (base, OwnedSampling)
    cls = type(f"Guarded{base.__name__}", (GuardedMixin, *sampling), {})
    kwargs: dict[str, Any] = {
        "fraction_train": config.fraction_train,
        "fraction_evaluate": config.fraction_evaluate,
        "min_train_nodes": config.min_train_nodes,
        "min_evaluate_nodes": min(config.min_train_nodes, 2) if config.fraction_evaluate else 0,
        "min_available_nodes": config.min_available_nodes,
    }
    if config.strategy == "fedprox":
        kwargs["proximal_mu"] = config.proximal_mu
    elif config.strategy in ("fedadam", "fedyogi"):
        kwargs["eta"] = config.server_learning_rate
    elif config.strategy == "fedavgm":
        kwargs["server_momentum"] = config.server_momentum
    elif config.strategy == "fedtrimmedavg":
        kwargs["beta"] = config.trim_beta
    elif config.strategy == "krum":
        kwargs["num_malicious_nodes"] = config.num_malicious
    strategy = cls(**kwargs)
    strategy._init_guard(seed, config.round_timeout, engine_failed,
                         pre_evaluate=config.pre_evaluates, final_round=config.num_rounds,
                         shift_step=ShiftStep(shifts, config.shift_server_lr,
                                              shift_momentum(config, privacy or DPConfig())))
    return strategy
