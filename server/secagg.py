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
  reproducible up to the quantisation error, not to the bit. The clients sampled follow
  the seed; the ring that makes their neighbours is drawn from OS entropy.

Under customer-level DP (``privacy.placement = distributed`` or ``local``) the merchants
send noised customer sums with weight 1 and the hooks in ``server.customer_secagg``
(``self.customer``) turn the unmasked mean into the global step and keep the ledger.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict
from flwr.common import (
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import strategy as legacy
from flwr.server.client_proxy import ClientProxy
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from server.config import (
    SECAGG_MODULUS,
    DPConfig,
    FederationConfig,
    check_compatible,
    shift_momentum,
)
from server.privacy import num_sampled
from server.rounds import RoundBook
from server.sampling import SortedClientManager, round_seed
from server.secagg_grid import MeteredGrid
from server.secagg_workflow import RoundCountsMissing, RoundWorkflow, keys_ahead
from server.shift_step import NO_STEP, ShiftStep

log = logging.getLogger(__name__)

_LEGACY_BASES: dict[str, type] = {
    "fedavg": legacy.FedAvg,
    "fedprox": legacy.FedAvg,  # the proximal term is the clients' business ("proximal-mu")
    "fedavgm": legacy.FedAvgM,
    "fedadam": legacy.FedAdam,
    "fedyogi": legacy.FedYogi,
}


def log_shares(sampled: int) -> int:
    """SecAgg+'s neighbourhood for ``sampled`` clients: ``2 ceil(log2 n) + 1`` (odd: the
    client and as many neighbours on each side of it), everyone when that is not fewer.

    Bell et al. (2020) give each client O(log n) neighbours instead of all n - 1: the
    key agreements, Shamir shares and the server's reconstructions then grow like
    n log n a round instead of n**2 (11 of 20, 15 of 100, 21 of 1,000)."""
    k = 2 * math.ceil(math.log2(max(sampled, 2))) + 1
    return sampled if k >= sampled else k


def effective_shares(fed: FederationConfig, sampled: int) -> tuple[int, int]:
    """(shares, threshold) for ``sampled`` clients from ``secagg-num-shares`` /
    ``secagg-reconstruction-threshold``: :func:`log_shares` for 0, else the rules of
    ``SecAggPlusWorkflow.setup_stage`` (a share of the clients is rounded and made odd,
    at least 3 or else everyone; a threshold share is rounded, at least 2), except that a
    threshold share stays above half the shares, as the key asks (0.6 of 4 shares
    rounds to 2, half of them: 3 instead). The workflow is given these counts every round
    (:meth:`SecAggMixin.configure_fit`)."""
    num_shares, threshold = fed.secagg_shares()
    if num_shares is None:
        shares = log_shares(sampled)
    elif isinstance(num_shares, float):
        shares = round(num_shares * sampled)
        if shares < sampled and shares % 2 == 0:
            shares += 1
        if shares <= 2:
            shares = sampled
    else:
        shares = num_shares
    if isinstance(threshold, float):
        return shares, max(round(threshold * shares), shares // 2 + 1, 2)
    return shares, threshold


def smallest_unmasked(fed: FederationConfig, sampled: int) -> int:
    """The fewest clients whose masked vectors SecAgg+ can unmask when ``sampled`` take
    part: ``ceil(n t / k)`` for k shares and threshold t (t when everyone shares).

    The server rebuilds every sampled client's secret from the shares its neighbours
    send at ``unmask``, and ``SecAggPlusWorkflow`` stops unless each of the n sampled
    has t live neighbours. Its neighbourhoods are windows of k on a shuffled ring, so
    each client lies in exactly k of them: a live set L meeting every window t times
    has ``|L| k >= n t``. A ring of k >= n is everyone, hence t.

    The server can also unmask the sum of each part of L that shares no pairwise mask
    with the rest (their masks cancel inside it). Two live clients share one when at
    most h = (k - 1) / 2 apart on the ring, so L splits where h clients in a row are
    gone: possible when k - t >= h (a window may hold h of them) and the ring holds two
    such gaps and two parts, n >= 2 (t + h). A part is then as small as t (a live
    client and its t - 1 live neighbours); otherwise L is whole.
    """
    shares, threshold = effective_shares(fed, sampled)
    shares = min(shares, sampled)
    half = shares // 2
    if shares < sampled and shares - threshold >= half and sampled >= 2 * (threshold + half):
        return threshold  # L may split into parts of t
    return -(-sampled * threshold // shares)


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
    if threshold > shares or 2 * threshold <= shares:
        raise ValueError(f"config key 'federation.secagg-reconstruction-threshold': "
                         f"{threshold} of the {shares} shares; it must be more than half "
                         "of them and at most all")
    if sampled * fed.secagg_quantization_range >= SECAGG_MODULUS:
        raise ValueError(f"config key 'federation.secagg-quantization-range': "
                         f"{sampled} clients x {fed.secagg_quantization_range} levels "
                         f"overflow the protocol's modulus 2**32")


class ClientSideFixedClipping(legacy.DifferentialPrivacyClientSideFixedClipping):
    """Flower's wrapper, except that a failed client does not void the round.

    The noise stays calibrated to the sampled clients; with fewer summed updates the
    round's effective noise multiplier is lower, and the privacy ledger accounts for it.
    """

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        params, metrics = super().aggregate_fit(server_round, results, [])
        # federation.shift-server-lr after the noise (post-processing).
        inner: SecAggMixin = self.strategy  # type: ignore[assignment]
        return inner.step_shifts(params), metrics


def weighted_metrics(pairs: list[tuple[int, Mapping[str, Scalar]]]) -> dict[str, Scalar]:
    """Example-weighted mean of the metrics every reply has (``num-examples`` left out)."""
    if not pairs:
        return {}
    keys = set.intersection(*(set(m) for _, m in pairs)) - {"num-examples"}
    total = float(sum(n for n, _ in pairs)) or 1.0
    return {k: sum(n * float(m[k]) for n, m in pairs) / total  # type: ignore[arg-type]
            for k in sorted(keys) if all(isinstance(m[k], (int, float)) for _, m in pairs)}


class SecAggMixin:
    """Hooks added to a legacy Flower strategy: seeded sampling, the per-round
    bookkeeping of the guarded Message API strategies (a ``server.rounds.RoundBook``),
    and ``start``."""

    #: The ``server.secagg_workflow.RoundWorkflow`` of the rounds (set by ``start``):
    #: given the round's shares and threshold (:func:`effective_shares`) once its
    #: clients are sampled; it refuses a round it was not given them for.
    workflow: Any = None
    #: ``federation.shift-server-lr`` / ``-momentum`` (inactive unless set up by
    #: ``_init_secagg``) and the shifts' velocity (checkpointed).
    shift_step: ShiftStep = NO_STEP
    shift_velocity: list[np.ndarray] | None = None

    def _init_secagg(self, fed: FederationConfig, dp: DPConfig, seed: int,
                     population: int, engine_failed: threading.Event | None = None,
                     shifts: tuple[int, ...] = ()) -> None:
        self.fed, self.dp, self.seed, self.population = fed, dp, seed, population
        self.shift_step = ShiftStep(shifts, fed.shift_server_lr, shift_momentum(fed, dp))
        self.shift_velocity = None
        self._incoming: list[np.ndarray] = []  # the weights the round started from
        self.rounds = RoundBook(engine_failed)
        self._reference: list[np.ndarray] = []
        self._train_config: dict[str, Scalar] = {}
        self._aggregated: set[int] = set()
        self._evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None
        #: Customer-level DP's hooks (``server.customer_secagg``), set by the runner.
        self.customer: Any = None
        self._metered: MeteredGrid | None = None

    @property
    def max_weight(self) -> float:
        """The ``max_weight`` the SecAgg+ workflow quantises the clients' weights with."""
        # With DP every client weighs in with 1 (the noise is calibrated to a plain mean),
        # and max-weight 1 keeps the full quantisation precision.
        # So does every merchant under customer-level DP (it sends a sum, not weights).
        return 1.0 if self.dp.enabled or self.dp.customer_level \
            else self.fed.secagg_max_weight

    def describe(self) -> dict[str, Any]:
        """The protocol's settings for ``federation.json``."""
        sampled = num_sampled(self.fed, self.population)
        shares, threshold = effective_shares(self.fed, sampled)
        return {"protocol": "secagg+", "sampled": sampled, "shares": shares,
                "threshold": threshold, "clipping_range": self.fed.secagg_clipping_range,
                "quantization_range": self.fed.secagg_quantization_range,
                "max_weight": self.max_weight,
                "stage_seconds": {g: {k: round(v, 3) for k, v in s.stage_seconds.items()}
                                  for g, s in sorted(self.rounds.stats.items())}}

    # -- legacy strategy hooks ---------------------------------------------------------

    def _fit_config(self, server_round: int) -> dict[str, Scalar]:
        # With DP the wrapper adds the clipping norm, and the clients then weigh in with 1.
        config: dict[str, Scalar] = {**self._train_config, "server-round": server_round,
                                     "global-round": self.rounds.global_round(server_round)}
        if self.fed.strategy == "fedprox":
            config["proximal-mu"] = float(self.fed.proximal_mu)
        if self.customer is not None:
            config.update(self.customer.train_config())
        return config

    def _evaluate_config(self, server_round: int) -> dict[str, Scalar]:
        return {"server-round": server_round,
                "global-round": self.rounds.global_round(server_round)}

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: Any) -> list[tuple[ClientProxy, Any]]:
        instructions = super().configure_fit(server_round, parameters,  # type: ignore[misc]
                                             client_manager)
        g = self.rounds.global_round(server_round)
        self.rounds.sampled(g, [int(proxy.cid) for proxy, _ in instructions])
        if self.shift_step.active:
            self._incoming = parameters_to_ndarrays(parameters)
        if self.workflow is not None and len(instructions) >= 2:  # its counts this round
            self.workflow.give_counts(*effective_shares(self.fed, len(instructions)))
        if self.customer is not None:
            self.customer.current = parameters_to_ndarrays(parameters)
            if not self.customer.admit(g, len(instructions)):
                return []  # SecAggPlusWorkflow cancels the round: nothing is masked
        return instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        """The SecAgg+ aggregate, through the base strategy's server optimizer if any.

        The workflow writes the unmasked weighted mean into every ``FitRes``, so one
        result stands for all: FedAvg then returns it unchanged, FedAvgM / FedAdam /
        FedYogi step from the current weights towards it. The base gets the global round
        (its bias correction and momentum must not restart on resume).
        """
        g = self.rounds.global_round(server_round)
        self.rounds.round(g).replied = len(results)
        if not results:
            return None, {}
        if self.customer is not None:  # the mean of noised sums: a step, no optimizer
            stepped = self.customer.step(g, parameters_to_ndarrays(results[0][1].parameters),
                                         [r.metrics for _, r in results])
            if stepped is None:
                return None, {}
            params = ndarrays_to_parameters(stepped)
        else:
            params, _ = super().aggregate_fit(g, results[:1], [])  # type: ignore[misc]
        if params is None:
            return None, {}
        self._aggregated.add(g)
        weights = [np.asarray(a, dtype=ref.dtype) for a, ref in
                   zip(parameters_to_ndarrays(params), self._reference, strict=True)]
        metrics = weighted_metrics([(r.num_examples, r.metrics) for _, r in results])
        self.rounds.train_metrics(g, metrics)
        if self._metered is not None:  # the unmasking (Shamir, masks), the step
            self.rounds.round(g).stage_seconds["server_unmask"] = (
                time.perf_counter() - self._metered.replied_at)
        params = ndarrays_to_parameters(weights)
        # With DP the wrapper steps them after its noise.
        return (params if self.dp.enabled else self.step_shifts(params)), metrics

    def step_shifts(self, params: Parameters | None) -> Parameters | None:
        """``params`` with the response shifts stepped from the weights the round
        started from (``federation.shift-server-lr`` / ``-momentum``,
        ``server.shift_step``); ``params`` itself at rate 1 without momentum.
        FedAvgM's / FedAdam's / FedYogi's own copy of the global weights follows, so
        their next step starts from the stepped shifts."""
        if params is None or not self.shift_step.active:
            return params
        stepped, self.shift_velocity = self.shift_step.apply(
            self._incoming, parameters_to_ndarrays(params), self.shift_velocity)
        if hasattr(self, "current_weights"):  # FedAdam / FedYogi
            self.current_weights = [a.copy() for a in stepped]
        if getattr(self, "server_opt", False):  # FedAvgM's server step
            self.initial_parameters = ndarrays_to_parameters(stepped)
        return ndarrays_to_parameters(stepped)

    def aggregate_evaluate(self, server_round: int, results: list[Any], failures: list[Any]
                           ) -> tuple[float | None, dict[str, Scalar]]:
        loss, metrics = super().aggregate_evaluate(server_round, results,  # type: ignore[misc]
                                                   failures)
        if results:
            self.rounds.client_metrics(self.rounds.global_round(server_round), metrics)
        return loss, metrics

    def _evaluate(self, server_round: int, ndarrays: list[np.ndarray],
                  config: dict[str, Scalar]) -> tuple[float, dict[str, Scalar]] | None:
        """The legacy ``evaluate_fn``: ``start``'s ``evaluate_fn`` on the global weights.

        Its exception (early stopping) stops the rounds: kept in ``rounds.stopped_by``
        and raised again once the workflow has stopped.
        """
        if self._evaluate_fn is None or self.rounds.stopped_by is not None:
            return None
        arrays = ArrayRecord([np.asarray(a, dtype=ref.dtype) for a, ref in
                              zip(ndarrays, self._reference, strict=True)])
        try:
            record = self._evaluate_fn(server_round, arrays)
        except Exception as err:  # raised again once the workflow has stopped
            self.rounds.stopped_by = err
            return None
        if record is None:
            return None
        metrics: dict[str, Any] = dict(record)
        return float(metrics.get("val_loss", math.nan)), metrics

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
        from flwr.server.workflow import DefaultWorkflow
        from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

        sampled = num_sampled(self.fed, self.population)
        check_round_size(self.fed, sampled)
        self._prepare(initial_arrays, train_config, evaluate_fn)
        self._log_protocol(sampled)
        context = self._legacy_context(num_rounds, timeout, sampled)
        fit_round = _FitRound(self, timeout)
        metered: Any = MeteredGrid(grid, self.rounds)  # a Grid by delegation
        self._metered = metered
        try:
            DefaultWorkflow(fit_workflow=fit_round, evaluate_workflow=_no_op)(metered, context)
        finally:
            fit_round.close()
        if self.rounds.stopped_by is not None:
            raise self.rounds.stopped_by
        final = context.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()
        return Result(arrays=ArrayRecord([np.asarray(a, dtype=ref.dtype) for a, ref in
                                          zip(final, self._reference, strict=True)]))

    def _prepare(self, initial_arrays: ArrayRecord,
                 train_config: Mapping[str, Scalar] | None,
                 evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None
                 ) -> None:
        """The initial weights, train config and hooks the legacy strategy reads."""
        self._reference = initial_arrays.to_numpy_ndarrays()
        self.initial_parameters = ndarrays_to_parameters(self._reference)
        if hasattr(self, "current_weights"):  # FedAdam / FedYogi keep their own copy
            self.current_weights = [a.copy() for a in self._reference]
        self._train_config = dict(train_config or {})
        self._evaluate_fn = evaluate_fn
        self.rounds.stopped_by = None
        self.evaluate_fn = self._evaluate
        self.on_fit_config_fn = self._fit_config
        self.on_evaluate_config_fn = self._evaluate_config

    def _log_protocol(self, sampled: int) -> None:
        shares, t = effective_shares(self.fed, sampled)
        log.info("secure aggregation (SecAgg+): %d clients a round, secrets split in %d "
                 "shares, %d rebuild one (up to %d dropouts among any client's "
                 "neighbours), weights clipped to +-%g and quantised to %d levels, max "
                 "weight %g", sampled, shares, t,
                 shares - t, self.fed.secagg_clipping_range,
                 self.fed.secagg_quantization_range, self.max_weight)

    def _legacy_context(self, num_rounds: int, timeout: float | None, sampled: int) -> Any:
        """The ``LegacyContext`` the workflow runs on: this strategy (inside the
        client-side DP wrapper when DP is on) and a seeded client manager."""
        from flwr.server import ServerConfig
        from flwr.server.compat.legacy_context import LegacyContext

        wrapped: Any = self
        if self.dp.enabled:
            wrapped = ClientSideFixedClipping(self, self.dp.noise_multiplier,  # type: ignore[arg-type]
                                              self.dp.clipping_norm, sampled)
        return LegacyContext(
            Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
            config=ServerConfig(num_rounds=num_rounds, round_timeout=timeout),
            strategy=wrapped, client_manager=SortedClientManager())

    def close_round(self, g: int) -> None:
        """Settle round ``g`` once its SecAgg+ stages ran: the nodes whose update was
        not summed failed; a round whose sum never came counts as empty."""
        stats = self.rounds.round(g)
        stats.failed = stats.sampled - stats.replied
        if self.customer is not None:
            self.customer.close(g, g in self._aggregated, stats.replied)
        if g not in self._aggregated:
            stats.replied = 0
            stats.failed = stats.sampled
            self.rounds.empty(g, "secure aggregation did not complete (too few clients "
                                 "stayed for the reconstruction threshold, or a failure "
                                 "above)")


class _FitRound:
    """The workflow's fit step of one round: SecAgg+ on clients sampled from the round's
    seed and shuffled into its ring from OS entropy (``server.sampling``), then the
    clients' evaluation (as ``Strategy.start`` has it).

    Keys ahead (``server.secagg_workflow.keys_ahead``): once round r's clients have
    evaluated, round r + 1's ``setup`` and ``share_keys`` run in a thread while
    ``DefaultWorkflow`` evaluates round r on the server (``evaluate_fn``: the clients sit
    idle then); round r + 1 then starts at ``collect_masked_vectors``. Nothing the
    protocol computes changes: the same sample (the round's seed), a ring from OS
    entropy, the same counts, keys and shares, and the instructions carry the weights
    the round would have had (the server's evaluation does not change them). Only
    server-side work overlaps: no client handles two messages at once. A round prepared
    but not run (the rounds stopped) leaves no record.

    Randomness across the two threads: the thread draws round r + 1's training sample
    from the client manager's generator, seeded for that round, after the main thread
    drew round r's evaluation sample from it and before it draws round r + 1's (``_take``
    waits for the thread first); the ring comes from a ``random.SystemRandom``. Nothing
    on either thread of ours reads or reseeds the ``random`` module, so the main
    thread's evaluation may use it freely.
    """

    def __init__(self, strategy: SecAggMixin, timeout: float | None, *,
                 ahead: bool = True) -> None:
        fed = strategy.fed
        self.strategy = strategy
        self.secagg = RoundWorkflow(max_weight=strategy.max_weight,
                                    clipping_range=fed.secagg_clipping_range,
                                    quantization_range=fed.secagg_quantization_range,
                                    timeout=timeout)
        strategy.workflow = self.secagg  # configure_fit gives it each round's counts
        self.ahead = ahead and keys_ahead()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="secagg-keys")
        self._pending: tuple[int, Any, Future[bool]] | None = None  # round, state, keys

    def __call__(self, grid: Any, context: Any) -> None:
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
        from flwr.server.workflow.constant import Key as WorkflowKey
        from flwr.server.workflow.default_workflows import default_evaluate_workflow

        rounds = self.strategy.rounds
        r = int(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
        g = rounds.global_round(r)
        pending = self._take(r)
        if not rounds.may_start(g):
            return  # stopped: let the workflow run out its remaining rounds idle
        try:
            if pending is None:
                state = self.secagg.new_state()
                keys = self._exchange_keys(grid, context, g, state)
            else:
                state, future = pending
                keys = future.result()  # raises what the keys' thread raised
            if keys:
                self.secagg.sum_masked(grid, context, state)
        except RoundCountsMissing:  # a defect: m_min would not hold, so stop the run
            raise
        except Exception:  # a malformed masked vector or share must not end the run
            log.exception("round %d: secure aggregation failed; the global model is "
                          "unchanged", g)
        self.strategy.close_round(g)
        default_evaluate_workflow(grid, context)  # clients' evaluation, as Strategy.start
        if self.ahead and r < context.config.num_rounds and not rounds.halted:
            self._start_next(grid, context, r + 1)

    def _exchange_keys(self, grid: Any, context: Any, g: int, state: Any) -> bool:
        """Round ``g``'s ``setup`` and ``share_keys`` (``context`` names its round)."""
        if isinstance(grid, MeteredGrid):
            grid.start_round()
        # The samples (training, then evaluation) follow the seed, from the client
        # manager's own generator; the ring comes from OS entropy
        # (``server.secagg_workflow.private_ring``). Neither touches the ``random``
        # module, which the main thread may use meanwhile (the server's evaluation).
        context.client_manager.seed_round(round_seed(self.strategy.seed, g))
        return bool(self.secagg.exchange_keys(grid, context, state))

    def _start_next(self, grid: Any, context: Any, r: int) -> None:
        """Run Flower round ``r``'s key stages in the thread, on a view of ``context``
        that names round ``r`` (``DefaultWorkflow`` still evaluates round r - 1)."""
        import copy

        from flwr.app import ConfigRecord
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
        from flwr.server.workflow.constant import Key as WorkflowKey

        view = copy.copy(context)
        config = ConfigRecord(dict(context.state.config_records[MAIN_CONFIGS_RECORD]))
        config[WorkflowKey.CURRENT_ROUND] = r
        view.state = RecordDict({MAIN_CONFIGS_RECORD: config,
                                 MAIN_PARAMS_RECORD: context.state.array_records[
                                     MAIN_PARAMS_RECORD]})
        state = self.secagg.new_state()
        g = self.strategy.rounds.global_round(r)
        self._pending = (r, state, self._pool.submit(self._exchange_keys, grid, view, g,
                                                     state))

    def _take(self, r: int) -> tuple[Any, Future[bool]] | None:
        """Round ``r``'s prepared state and key stages, waited for; None when it was not
        prepared. One prepared for a round that will not run is dropped with its record."""
        if self._pending is None:
            return None
        prepared, state, future = self._pending
        self._pending = None
        wait([future])
        rounds = self.strategy.rounds
        if prepared != r or rounds.halted:
            rounds.stats.pop(rounds.global_round(prepared), None)
            return None
        return state, future

    def close(self) -> None:
        """Wait for any key stages still running (the rounds ended) and stop the thread."""
        if self._pending is not None:
            wait([self._pending[2]])
            self.strategy.rounds.stats.pop(
                self.strategy.rounds.global_round(self._pending[0]), None)
            self._pending = None
        self._pool.shutdown()


def _no_op(grid: Any, context: Any) -> None:
    """Client-side evaluation already ran inside the fit round."""


def build_secagg_strategy(fed: FederationConfig, dp: DPConfig, seed: int, population: int,
                          *, engine_failed: threading.Event | None = None,
                          shifts: tuple[int, ...] = ()) -> Any:
    """The legacy strategy ``fed.strategy`` with the SecAgg+ hooks; run it with ``start``.

    Parameters
    ----------
    fed, dp : the federation and privacy settings (checked to be compatible).
    seed : seeds each global round's sampling (never the SecAgg+ ring: OS entropy).
    population : the clients connected, of which ``num_sampled`` take part a round.
    engine_failed : when given and set, no round starts.
    shifts : positions of the response shifts, stepped by ``federation.shift-server-lr``
        / ``-momentum``.
    """
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
        "fit_metrics_aggregation_fn": weighted_metrics,
        "evaluate_metrics_aggregation_fn": weighted_metrics,
    }
    if fed.strategy in ("fedadam", "fedyogi"):
        kwargs.update(eta=fed.server_learning_rate, tau=1e-3)  # the Message API's tau
    elif fed.strategy == "fedavgm":
        kwargs["server_momentum"] = fed.server_momentum
    strategy = cls(**kwargs)
    strategy._init_secagg(fed, dp, seed, population, engine_failed, shifts)
    return strategy
