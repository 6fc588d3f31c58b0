"""Client-level differential privacy: Flower's DP wrappers and a per-round RDP ledger.

``wrap_strategy`` puts one of Flower's central-DP wrappers
(``DifferentialPrivacy{Server,Client}SideFixedClipping``,
``DifferentialPrivacyServerSideAdaptiveClipping``) around the guarded strategy. The
guard's reply checks run *before* the wrapper clips and adds noise, so a NaN or
mis-shaped reply is rejected by node instead of breaking the clipping, and a failed
client does not void the round (Flower's wrapper skips any round with an error reply).
In DP mode the guard weights every clipped update equally: the noise
``z * C / m`` is calibrated to a plain mean, not to a ``num-examples`` weighting.

Accounting. Flower's accountant attached to a wrapper accepts only
``no-amplification`` sampling, an unmodified ``FedAvg.aggregate_train`` and equal
``num-examples`` in every reply; the guarded strategy overrides ``aggregate_train``
and merchants differ in size, so that path is refused. ``PrivacyLedger`` instead
composes, in Flower's ``RdpAccountant`` used stand-alone, one Poisson-subsampled
Gaussian event per released round with ``q = sampled / population`` (the standard
DP-FedAvg accounting). When fewer replies than the ``m`` the noise was calibrated for
are averaged, the round's effective noise multiplier is ``z * aggregated / m``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp import strategy as flwr_strategy
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from common import atomic, jsonl
from server.config import DP_STRATEGIES, DPConfig, FederationConfig
from server.dp_accounting import CHECKPOINT_KEY, check_checkpoint, quiet_rdp

log = logging.getLogger(__name__)

WHY_NOT_ATTACHED = (
    "Flower's accountant attached to a DP wrapper needs 'no-amplification' sampling, an "
    "unmodified FedAvg.aggregate_train and equal num-examples in every reply; this server "
    "screens replies in aggregate_train and merchants differ in size, so the ledger "
    "composes the same Gaussian events in Flower's RdpAccountant stand-alone with Poisson "
    "sampling q = sampled / population (client-level DP-FedAvg accounting)"
)


def num_sampled(fed: FederationConfig, population: int) -> int:
    """Clients FedAvg samples per round out of ``population`` (its own formula)."""
    return max(int(population * fed.fraction_train), fed.min_train_nodes)


def _screened(base: Any) -> type:
    """``base`` (a Flower DP wrapper) with the guard's reply checks run before clipping."""

    def aggregate_train(self: Any, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        good = self.strategy.screen_train_replies(server_round, replies)
        if not good:
            return None, None
        arrays, metrics = base.aggregate_train(self, server_round, good)
        # federation.shift-server-lr after the noise (post-processing).
        return self.strategy.step_shifts(arrays), metrics

    return type(f"Screened{base.__name__}", (base,), {"aggregate_train": aggregate_train})


_WRAPPERS: dict[str, type] = {
    "server-fixed": _screened(flwr_strategy.DifferentialPrivacyServerSideFixedClipping),
    "client-fixed": _screened(flwr_strategy.DifferentialPrivacyClientSideFixedClipping),
    "adaptive": _screened(flwr_strategy.DifferentialPrivacyServerSideAdaptiveClipping),
}


def wrap_strategy(strategy: Any, dp: DPConfig, fed: FederationConfig, population: int) -> Any:
    """The guarded ``strategy`` inside the DP wrapper ``dp.mode`` asks for (or itself)."""
    if not dp.enabled:
        return strategy
    if fed.strategy not in DP_STRATEGIES:
        raise ValueError(
            f"config key 'privacy.mode': {dp.mode!r} needs a strategy that averages the "
            f"clipped updates ({', '.join(DP_STRATEGIES)}); federation.strategy is "
            f"{fed.strategy!r}, whose aggregate has a different sensitivity")
    m = num_sampled(fed, population)
    strategy.uniform_weights = True
    cls = _WRAPPERS[dp.mode]
    if dp.mode == "adaptive":
        try:
            wrapped = cls(strategy, dp.noise_multiplier, m,
                          initial_clipping_norm=dp.clipping_norm,
                          clipped_count_stddev=dp.clipped_count_stddev or None)
        except ValueError as err:
            raise ValueError(f"config key 'privacy.noise-multiplier' (with "
                             f"privacy.clipped-count-stddev): {err}") from None
    else:
        wrapped = cls(strategy, dp.noise_multiplier, dp.clipping_norm, m)
    log.info("differential privacy %s: z = %g, clip %g, %d of %d clients per round; %s",
             dp.mode, dp.noise_multiplier, dp.clipping_norm, m, population, WHY_NOT_ATTACHED)
    return wrapped


class PrivacyLedger:
    """Merchant-level ε spent so far at δ = :attr:`delta`; a line per released round (JSONL)."""

    def __init__(self, dp: DPConfig, population: int, calibrated_for: int,
                 path: Path | None = None) -> None:
        self.dp = dp
        self.population = population
        self.calibrated_for = calibrated_for  # m in the noise std z * C / m
        self.path = path
        self.accountant = RdpAccountant(PrivacyConfig(
            target_delta=dp.delta(), population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.POISSON))
        self.epsilon = 0.0

    @property
    def delta(self) -> float:
        """The δ at which ε is stated (``privacy.target-delta``, 1e-5 by default)."""
        return self.dp.delta()

    def summary_fields(self) -> dict[str, Any]:
        """What ``federation.json`` adds about the unit (merchant level here)."""
        return {"unit": "merchant", "unit_text": "one merchant: its whole update in a round"}

    def event(self, sampled: int, aggregated: int) -> GaussianPrivacyEvent:
        """The Gaussian event of one released round.

        Parameters
        ----------
        sampled
            Clients sampled in the round; clamped to [1, population].
        aggregated
            Clients whose updates were averaged: the noise was calibrated for
            ``calibrated_for``, so the effective noise multiplier is
            ``noise-multiplier * aggregated / calibrated_for``.
        """
        sampled = min(max(sampled, 1), self.population)
        z = self.dp.noise_multiplier * aggregated / self.calibrated_for
        return GaussianPrivacyEvent(noise_multiplier=z, sample_size=sampled,
                                    population_size=self.population)

    def record(self, server_round: int, sampled: int, aggregated: int,
               clipping_norm: float) -> dict[str, Any]:
        """Compose one released round and append its line."""
        event = self.event(sampled, aggregated)
        with quiet_rdp():  # dp-accounting computes the orders as it composes
            self.accountant.compose(event)
        self.epsilon = self.spent()
        line = {
            "round": server_round, "participants": aggregated, "sampled": sampled,
            "population": self.population,
            "sampling_rate": event.sample_size / self.population,
            "noise_multiplier": event.noise_multiplier,
            "configured_noise_multiplier": self.dp.noise_multiplier,
            "clipping_norm": float(clipping_norm), "epsilon": self.epsilon,
            "delta": self.dp.delta(), "mode": self.dp.mode,
            "accounting": "rdp, poisson q = sampled / population (flwr RdpAccountant)",
        }
        if self.path is not None:
            jsonl.append(self.path, line)
        return line

    def next_round_exceeds(self) -> bool:
        """True when a budget (``target-epsilon``) is set and one more round with every
        sampled client replying would take ε past it (checked without changing the ledger)."""
        if self.dp.target_epsilon <= 0:
            return False
        m = self.calibrated_for
        with quiet_rdp():
            return self.accountant.would_exceed(self.event(m, m),
                                                max_epsilon=self.dp.target_epsilon)

    def spent(self) -> float:
        """ε of the rounds composed so far, at :attr:`delta`."""
        with quiet_rdp():
            return float(self.accountant.get_epsilon(self.dp.delta()))

    def checkpoint_fields(self) -> dict[str, Any]:
        """What a checkpoint keeps of the ledger (:data:`CHECKPOINT_KEY`): the released
        rounds composed so far and the settings they were accounted with."""
        return {"unit": "merchant", "mode": self.dp.mode,
                "noise_multiplier": self.dp.noise_multiplier,
                "clipping_norm": self.dp.clipping_norm, "population": self.population,
                "sampling_rate": self.calibrated_for / self.population,
                "released_rounds": self.accountant.num_releases}

    def replay(self, upto: int, checkpoint: dict[str, Any] | None = None) -> int:
        """Recompose the rounds <= ``upto`` already in the file (resume), each with the
        noise and at (at least) the sampling rate its line records, whatever this run's
        settings and population; drop later ones (the server adds the noise: it is
        trusted, and what it saw past the checkpoint is gone with it).

        ``checkpoint``, the state of round ``upto``'s checkpoint: when it holds
        :data:`CHECKPOINT_KEY` (checkpoints of older versions do not), the ledger must
        hold at least the released rounds it counted, else (the file deleted or cut
        short, or DP newly enabled: ε would cover only the rounds after the resume) this
        raises, naming the file and both counts, before anything is rewritten. A None
        there passes: the version before this check recorded None, with DP or without
        (a run without DP records ``NO_LEDGER`` now). A ledger of customer-level lines is
        refused (``privacy.unit`` differs)."""
        if self.path is None:
            return 0
        if not self.path.exists():
            self._check_checkpoint(checkpoint, upto, 0)
            return 0
        kept = jsonl.read(self.path)  # a line cut by a kill: its round was not checkpointed
        for line in kept:
            if "sampled" not in line or line.get("unit") == "customer":
                raise ValueError(
                    f"{self.path}: round {line.get('round')} was accounted at the "
                    f"{line.get('unit', 'customer')} level, not per merchant (privacy.unit "
                    "differs): resume with the same privacy settings")
        kept = [line for line in kept if line["round"] <= upto]
        self._check_checkpoint(checkpoint, upto, len(kept))
        moved = [line for line in kept if line.get("population", self.population)
                 != self.population]
        if moved:
            log.warning("%s: %d rounds were sampled from a population of %s merchants and "
                        "this run's is %d: each is accounted at its own sampling rate "
                        "(rounded up where this population cannot give it exactly)",
                        self.path, len(moved), moved[0]["population"], self.population)
        with quiet_rdp():
            for line in kept:
                self.accountant.compose(GaussianPrivacyEvent(
                    noise_multiplier=line["noise_multiplier"],
                    sample_size=self._sample_size(line), population_size=self.population))
        self.epsilon = self.spent() if kept else 0.0
        atomic.write_text(self.path, "".join(json.dumps(line) + "\n" for line in kept))
        return len(kept)

    def _sample_size(self, line: dict[str, Any]) -> int:
        """The sample out of this run's population that gives ``line``'s round at least
        the rate it was released at (``sampled / population`` of its line: merchants may
        have joined or left before a resume, and a lower rate would under-count ε)."""
        theirs = int(line.get("population", self.population))
        return min(max(-(-int(line["sampled"]) * self.population // theirs), 1),
                   self.population)

    def _check_checkpoint(self, checkpoint: dict[str, Any] | None, upto: int,
                          found: int) -> None:
        if checkpoint is not None and checkpoint.get(CHECKPOINT_KEY, {}) is None:
            return  # a checkpoint of the version that recorded None, with DP or without
        check_checkpoint(self.path, checkpoint, upto, found, "merchant", _settings)


def _settings(counted: dict[str, Any]) -> str:
    return (f"{counted.get('mode')}, noise {counted.get('noise_multiplier')}, sampling "
            f"rate {counted.get('sampling_rate')}")
