"""Secure aggregation: rounds of SecAgg+ through Flower's legacy workflow API.

With ``federation.secure-aggregation = true`` the server never sees a merchant's
update: every client quantises its example-weighted weights, masks them with pairwise
and private masks, and the server learns only the sum (Bell et al., 2020, SecAgg+).
Flower 1.42 offers the protocol only as a legacy workflow
(``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` on a ``LegacyContext``
driving a legacy ``flwr.server.strategy`` strategy), so ``build_secagg_strategy``
returns a legacy strategy with a ``start`` of the same shape as the Message API
strategies' ``start``. ``server.app.run_federation`` runs it like any other strategy:
the same ``evaluate_fn`` (metrics.jsonl, checkpoints, model selection, privacy
ledger), the same ``federation.json`` and ``model.keras``.

What differs from the plain path, by construction:

- The aggregate carries a quantisation error: each client's weighted weights are
  clipped to ``[-c, c]`` (``secagg-clipping-range``) and stochastically rounded to
  ``secagg-quantization-range`` (T) levels, so each entry of the aggregate is off by
  less than ``2 c n / Q`` for ``n`` clients, where ``Q = sum_i round(w_i T / max-weight)``
  is the quantised total weight; the weights themselves are quantised the same way.
- Replies cannot be screened one by one (NaN, wrong shapes): a malformed masked vector
  breaks the sum, and the round is then logged and counted as empty.
- Client-side evaluation metrics and the train metrics (``train_loss``, ...) still
  travel in clear, as they do without secure aggregation; only the weights are masked.
- The rounding is random and the masks come from ``os.urandom``: a run is
  reproducible up to the quantisation error, not to the bit.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import (
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server import strategy as legacy
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from server.config import SECAGG_MODULUS, DPConfig, FederationConfig, check_compatible
from server.privacy import num_sampled
from server.strategy import RoundStats, error_summary

log = logging.getLogger(__name__)

_LEGACY_BASES: dict[str, type] = {
    "fedavg": legacy.FedAvg,
    "fedprox": legacy.FedAvg,  # the proximal term is the clients' business ("proximal-mu")
    "fedavgm": legacy.FedAvgM,
    "fedadam": legacy.FedAdam,
    "fedyogi": legacy.FedYogi,
}


def effective_shares(fed: FederationConfig, sampled: int) -> tuple[int, int]:
    """(shares, threshold) that ``SecAggPlusWorkflow.setup_stage`` derives for ``sampled``
    clients from ``secagg-num-shares`` / ``secagg-reconstruction-threshold`` (its rules:
    a share of the clients is rounded and made odd, at least 3 or else everyone; a
    threshold share is rounded, at least 2)."""
    num_shares, threshold = fed.secagg_shares()
    if isinstance(num_shares, float):
        shares = round(num_shares * sampled)
        if shares < sampled and shares % 2 == 0:
            shares += 1
        if shares <= 2:
            shares = sampled
    else:
        shares = num_shares
    if isinstance(threshold, float):
        return shares, max(round(threshold * shares), 2)
    return shares, threshold


def check_round_size(fed: FederationConfig, sampled: int) -> None:
    """Raise ``ValueError`` naming the key when SecAgg+ cannot work for ``sampled``
    clients a round."""
    shares, threshold = effective_shares(fed, sampled)
    if sampled < 2:
        raise ValueError(f"federation.secure-aggregation needs at least 2 clients a round, "
                         f"{sampled} are sampled (federation.min-train-nodes, "
                         "federation.fraction-train)")
    if shares > sampled:
        raise ValueError(f"config key 'federation.secagg-num-shares': {shares} shares for "
                         f"the {sampled} clients sampled per round")
    if threshold > shares:
        raise ValueError(f"config key 'federation.secagg-reconstruction-threshold': "
                         f"{threshold} is more than the {shares} shares")
    if sampled * fed.secagg_quantization_range >= SECAGG_MODULUS:
        raise ValueError(f"config key 'federation.secagg-quantization-range': "
                         f"{sampled} clients x {fed.secagg_quantization_range} levels "
                         f"overflow the protocol's modulus 2**32")


def payload_bytes(content: RecordDict) -> int:
    """Bytes of tensors and byte strings in a message (weights, masked vectors, keys)."""
    total = sum(len(a.data) for rec in content.array_records.values() for a in rec.values())
    for rec in content.config_records.values():
        for value in rec.values():
            if isinstance(value, bytes):
                total += len(value)
            elif isinstance(value, list):
                total += sum(len(v) for v in value if isinstance(v, bytes))
    return total


class _RoundMeter:
    """What one round's SecAgg+ messages carried and which nodes failed at which stage."""

    def __init__(self) -> None:
        self.down = 0
        self.up = 0
        self.timed_out = 0
        self.failures: list[str] = []
        self.seconds: dict[str, float] = {}  # wall time of each stage's send and receive


class _MeteredGrid:
    """A Grid that meters the SecAgg+ train messages of each round (by ``group_id``).

    Every error or missing reply is listed with its stage; one at the ``unmask`` stage
    does not drop the node's update (it was summed already), so only the earlier stages
    count towards ``timed_out``.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.rounds: dict[str, _RoundMeter] = {}

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        train = [m for m in messages if m.metadata.message_type == MessageType.TRAIN]
        if not train:
            return self._grid.send_and_receive(messages, timeout=timeout)
        meter = self.rounds.setdefault(train[0].metadata.group_id, _RoundMeter())
        stages = {m.metadata.dst_node_id: _stage(m.content) for m in train}
        meter.down += sum(payload_bytes(m.content) for m in train)
        started = time.perf_counter()
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        step = _stage(train[0].content)  # one stage per call
        meter.seconds[step] = meter.seconds.get(step, 0.0) + time.perf_counter() - started
        for reply in replies:
            node = reply.metadata.src_node_id
            stage = stages.pop(node, "?")
            if reply.has_error():
                reason = error_summary(reply.error.reason)
                meter.failures.append(f"node {node}: {reason} (secagg stage {stage})")
                log.warning("secure aggregation: node %s failed at stage %s: %s", node,
                            stage, reason)
            else:
                meter.up += payload_bytes(reply.content)
        limit = f"{timeout:g} s" if timeout else "the timeout"
        for node, stage in stages.items():  # sent, never answered
            if stage != Stage.UNMASK:
                meter.timed_out += 1
            meter.failures.append(f"node {node}: no reply within {limit} (secagg stage {stage})")
            log.warning("secure aggregation: node %s did not reply at stage %s", node, stage)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _stage(content: RecordDict) -> str:
    configs = content.config_records.get(RECORD_KEY_CONFIGS)
    return str(configs.get(Key.STAGE, "?")) if configs is not None else "?"


class _SortedClientManager(SimpleClientManager):
    """Samples from the node ids in sorted order, so seeded sampling ignores arrival order.

    It draws from the ``random`` module, as the SecAgg+ workflow does, and is called
    only inside :func:`_seeded_module_random`.
    """

    def sample(self, num_clients: int, min_num_clients: int | None = None,
               criterion: Any = None) -> list[ClientProxy]:
        if min_num_clients is None:
            min_num_clients = num_clients
        self.wait_for(min_num_clients)
        cids = sorted(self.clients, key=int)
        if criterion is not None:
            cids = [c for c in cids if criterion.select(self.clients[c])]
        if num_clients > len(cids):
            log.info("sampling failed: %d clients available, %d requested", len(cids),
                     num_clients)
            return []
        return [self.clients[c] for c in random.sample(cids, num_clients)]


@contextlib.contextmanager
def _seeded_module_random(seed: int) -> Iterator[None]:
    """The ``random`` module seeded with ``seed`` inside the block; its earlier state is
    put back on leaving.

    Flower 1.42's SecAgg+ workflow takes no RNG: right after the strategy samples the
    round's clients it shuffles them with the ``random`` module, and that shuffle decides
    which neighbours hold shares of each other's secrets, and so whether a round with
    dropouts can still be unmasked. Seeding the module for the length of one round keeps
    a run's rounds reproducible (sample, shuffle, evaluation sample, in that order)
    without leaving the process's RNG changed.
    """
    saved = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(saved)


class _ClientSideFixedClipping(legacy.DifferentialPrivacyClientSideFixedClipping):
    """Flower's wrapper, except that a failed client does not void the round.

    The noise stays calibrated to the sampled clients; with fewer summed updates the
    round's effective noise multiplier is lower, and the privacy ledger accounts for it.
    """

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        return super().aggregate_fit(server_round, results, [])


def _weighted_metrics(pairs: list[tuple[int, Mapping[str, Scalar]]]) -> dict[str, Scalar]:
    """Example-weighted mean of the metrics every reply has (``num-examples`` left out)."""
    if not pairs:
        return {}
    keys = set.intersection(*(set(m) for _, m in pairs)) - {"num-examples"}
    total = float(sum(n for n, _ in pairs)) or 1.0
    return {k: sum(n * float(m[k]) for n, m in pairs) / total for k in sorted(keys)
            if all(isinstance(m[k], (int, float)) for _, m in pairs)}


class SecAggMixin:
    """Hooks added to a legacy Flower strategy: seeded sampling, per-round stats as the
    guarded Message API strategies keep them, and ``start``."""

    def _init_secagg(self, fed: FederationConfig, dp: DPConfig, seed: int,
                     population: int) -> None:
        self.fed, self.dp, self.seed, self.population = fed, dp, seed, population
        self.round_offset = 0
        self.stats: dict[int, RoundStats] = {}
        self.empty_rounds = 0
        self._reference: list[np.ndarray] = []
        self._train_config: dict[str, Scalar] = {}
        self._aggregated: set[int] = set()
        self.stage_seconds: dict[int, dict[str, float]] = {}
        self._deferred: BaseException | None = None

    def global_round(self, server_round: int) -> int:
        return server_round + self.round_offset

    @property
    def max_weight(self) -> float:
        # With DP every client weighs in with 1 (the noise is calibrated to a plain mean),
        # and max-weight 1 keeps the full quantisation precision.
        return 1.0 if self.dp.enabled else self.fed.secagg_max_weight

    def describe(self) -> dict[str, Any]:
        """The protocol's settings for ``federation.json``."""
        sampled = num_sampled(self.fed, self.population)
        shares, threshold = effective_shares(self.fed, sampled)
        return {"protocol": "secagg+", "sampled": sampled, "shares": shares,
                "threshold": threshold, "clipping_range": self.fed.secagg_clipping_range,
                "quantization_range": self.fed.secagg_quantization_range,
                "max_weight": self.max_weight,
                "stage_seconds": {g: {k: round(v, 3) for k, v in s.items()}
                                  for g, s in sorted(self.stage_seconds.items())}}

    # -- legacy strategy hooks ---------------------------------------------------------

    def _fit_config(self, server_round: int) -> dict[str, Scalar]:
        # With DP the wrapper adds the clipping norm, and the clients then weigh in with 1.
        config: dict[str, Scalar] = {**self._train_config, "server-round": server_round,
                                     "global-round": self.global_round(server_round)}
        if self.fed.strategy == "fedprox":
            config["proximal-mu"] = float(self.fed.proximal_mu)
        return config

    def _evaluate_config(self, server_round: int) -> dict[str, Scalar]:
        return {"server-round": server_round, "global-round": self.global_round(server_round)}

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: Any) -> list[tuple[ClientProxy, Any]]:
        g = self.global_round(server_round)
        instructions = super().configure_fit(server_round, parameters,  # type: ignore[misc]
                                             client_manager)
        self.stats.setdefault(g, RoundStats()).sampled = len(instructions)
        return instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        """The SecAgg+ aggregate, through the base strategy's server optimizer if any.

        The workflow writes the unmasked weighted mean into every ``FitRes``, so one
        result stands for all: FedAvg then returns it unchanged, FedAvgM / FedAdam /
        FedYogi step from the current weights towards it. The base gets the global round
        (its bias correction and momentum must not restart on resume).
        """
        g = self.global_round(server_round)
        stats = self.stats.setdefault(g, RoundStats())
        stats.replied = len(results)
        if not results:
            return None, {}
        params, _ = super().aggregate_fit(g, results[:1], [])  # type: ignore[misc]
        if params is None:
            return None, {}
        self._aggregated.add(g)
        weights = [np.asarray(a, dtype=ref.dtype) for a, ref in
                   zip(parameters_to_ndarrays(params), self._reference, strict=True)]
        metrics = _weighted_metrics([(r.num_examples, r.metrics) for _, r in results])
        stats.train = {k: float(v) for k, v in metrics.items()}
        return ndarrays_to_parameters(weights), metrics

    def aggregate_evaluate(self, server_round: int, results: list[Any], failures: list[Any]
                           ) -> tuple[float | None, dict[str, Scalar]]:
        loss, metrics = super().aggregate_evaluate(server_round, results,  # type: ignore[misc]
                                                   failures)
        if results:
            stats = self.stats.setdefault(self.global_round(server_round), RoundStats())
            stats.client_eval = {k: float(v) for k, v in metrics.items()}
        return loss, metrics

    # -- the rounds --------------------------------------------------------------------

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float | None = 3600, train_config: Mapping[str, Scalar] | None = None,
              evaluate_config: Mapping[str, Scalar] | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None
              ) -> Result:
        """Run ``num_rounds`` SecAgg+ rounds (the Message API strategies' ``start``).

        Per round, as in ``Strategy.start``: training (SecAgg+), client-side evaluation,
        then ``evaluate_fn`` on the new global weights. An exception in ``evaluate_fn``
        (early stopping) ends the rounds and is raised once the workflow has stopped.
        """
        from flwr.server import ServerConfig
        from flwr.server.compat.legacy_context import LegacyContext
        from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
        from flwr.server.workflow.constant import Key as WorkflowKey
        from flwr.server.workflow.default_workflows import default_evaluate_workflow

        sampled = num_sampled(self.fed, self.population)
        check_round_size(self.fed, sampled)
        num_shares, threshold = self.fed.secagg_shares()
        self._reference = initial_arrays.to_numpy_ndarrays()
        self.initial_parameters = ndarrays_to_parameters(self._reference)
        if hasattr(self, "current_weights"):  # FedAdam / FedYogi keep their own copy
            self.current_weights = [a.copy() for a in self._reference]
        self._train_config = dict(train_config or {})
        self._deferred = None
        shares, t = effective_shares(self.fed, sampled)
        log.info("secure aggregation (SecAgg+): %d clients a round, secrets split in %d "
                 "shares, %d rebuild one (up to %d dropouts among any client's "
                 "neighbours), weights clipped to +-%g and quantised to %d levels, max "
                 "weight %g", sampled, shares, t,
                 shares - t, self.fed.secagg_clipping_range,
                 self.fed.secagg_quantization_range, self.max_weight)

        def evaluate(server_round: int, ndarrays: list[np.ndarray],
                     config: dict[str, Scalar]) -> tuple[float, dict[str, Scalar]] | None:
            if evaluate_fn is None or self._deferred is not None:
                return None
            arrays = ArrayRecord([np.asarray(a, dtype=ref.dtype) for a, ref in
                                  zip(ndarrays, self._reference, strict=True)])
            try:
                record = evaluate_fn(server_round, arrays)
            except Exception as err:  # raised again once the workflow has stopped
                self._deferred = err
                return None
            if record is None:
                return None
            metrics = dict(record)
            return float(metrics.get("val_loss", math.nan)), metrics  # type: ignore[arg-type]

        self.evaluate_fn = evaluate
        self.on_fit_config_fn = self._fit_config
        self.on_evaluate_config_fn = self._evaluate_config
        secagg = SecAggPlusWorkflow(
            num_shares, threshold, max_weight=self.max_weight,
            clipping_range=self.fed.secagg_clipping_range,
            quantization_range=self.fed.secagg_quantization_range, timeout=timeout)
        metered = _MeteredGrid(grid)

        def fit_round(grid: Any, context: Any) -> None:
            if self._deferred is not None:
                return  # stopped: let the workflow run out its remaining rounds idle
            r = int(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
            g = self.global_round(r)
            with _seeded_module_random(self.seed * 1_000_003 + g):
                try:
                    secagg(grid, context)
                except Exception:  # a malformed masked vector or share must not end the run
                    log.exception("round %d: secure aggregation failed; the global model is "
                                  "unchanged", g)
                self._close_round(g, metered.rounds.pop(str(r), _RoundMeter()))
                default_evaluate_workflow(grid, context)  # clients' evaluation, as Strategy.start

        wrapped: Any = self
        if self.dp.enabled:
            wrapped = _ClientSideFixedClipping(self, self.dp.noise_multiplier,
                                               self.dp.clipping_norm, sampled)
        context = LegacyContext(
            Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
            config=ServerConfig(num_rounds=num_rounds, round_timeout=timeout),
            strategy=wrapped, client_manager=_SortedClientManager())
        DefaultWorkflow(fit_workflow=fit_round, evaluate_workflow=_no_op)(metered, context)
        if self._deferred is not None:
            raise self._deferred
        final = context.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()
        return Result(arrays=ArrayRecord([np.asarray(a, dtype=ref.dtype) for a, ref in
                                          zip(final, self._reference, strict=True)]))

    def _close_round(self, g: int, meter: _RoundMeter) -> None:
        stats = self.stats.setdefault(g, RoundStats())
        stats.failed = stats.sampled - stats.replied
        stats.timed_out = meter.timed_out
        stats.bytes_down, stats.bytes_up = meter.down, meter.up
        stats.failures = meter.failures
        self.stage_seconds[g] = meter.seconds
        if g not in self._aggregated:
            stats.replied = 0
            stats.failed = stats.sampled
            self.empty_rounds += 1
            log.warning("round %d: secure aggregation did not complete (too few clients "
                        "stayed for the reconstruction threshold, or a failure above); the "
                        "global model is unchanged (%d such rounds so far)", g,
                        self.empty_rounds)


def _no_op(grid: Any, context: Any) -> None:
    """Client-side evaluation already ran inside the fit round."""


def build_secagg_strategy(fed: FederationConfig, dp: DPConfig, seed: int,
                          population: int) -> Any:
    """The legacy strategy ``fed.strategy`` with the SecAgg+ hooks; run it with ``start``."""
    check_compatible(fed, dp)
    if not fed.secure_aggregation:
        raise ValueError("build_secagg_strategy needs federation.secure-aggregation = true")
    base = _LEGACY_BASES[fed.strategy]
    cls = type(f"SecAgg{base.__name__}", (SecAggMixin, base), {})
    kwargs: dict[str, Any] = {
        "fraction_fit": fed.fraction_train,
        "fraction_evaluate": fed.fraction_evaluate,
        "min_fit_clients": fed.min_train_nodes,
        "min_evaluate_clients": min(fed.min_train_nodes, 2) if fed.fraction_evaluate else 0,
        "min_available_clients": fed.min_available_nodes,
        "initial_parameters": Parameters(tensors=[], tensor_type="numpy.ndarray"),
        "fit_metrics_aggregation_fn": _weighted_metrics,
        "evaluate_metrics_aggregation_fn": _weighted_metrics,
    }
    if fed.strategy in ("fedadam", "fedyogi"):
        kwargs.update(eta=fed.server_learning_rate, tau=1e-3)  # the Message API's tau
    elif fed.strategy == "fedavgm":
        kwargs["server_momentum"] = fed.server_momentum
    strategy = cls(**kwargs)
    strategy._init_secagg(fed, dp, seed, population)
    return strategy
