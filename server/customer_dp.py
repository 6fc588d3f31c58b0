"""Customer-level DP with central noise: the server side (``privacy.unit = customer``).

Each train instruction carries q (``privacy.customer-rate``), C (``privacy.clipping-norm``)
and the customers' learning rate eta; each merchant replies with the sum of its sampled
customers' clipped updates (``client.customer_dp``). The server sums the replies
(screened by the guard first), adds Gaussian noise N(0, (z C)^2) to every coordinate of
the sum, divides by the *expected* number of sampled customers and steps the global
weights along that mean (``privacy.server-learning-rate``)::

    w <- w + lr_s * (sum_merchants sum_customers clip(u_c) + N(0, (z C)^2 I)) / D
    D  = q * customers * (merchants sampled a round / merchants)

Why the denominator is safe. D is fixed for the run and never depends on who was
sampled: the released update is the Gaussian mechanism on a sum of sensitivity C,
post-processed, so ε is what ``server.dp_accounting`` says. (Dividing by the number
actually sampled would leak it.) ``customers`` is ``privacy.customers`` when declared
(a public figure: nothing about the data enters D) or, when 0, estimated once in
round 1 from the merchants' counts (sum of the replies' ``customers``, scaled by
merchants / replies) and then fixed, kept in the ledger for a resume. That count is
a merchant-level statistic outside ε (one customer moves D by a factor 1 + 1/customers),
and the default δ = 1 / (10 customers) then rests on the merchants' word (one that
under-reports loosens δ): a warning names ``privacy.customers``; declare it to keep both
out.

No per-round score leaves a merchant: the server does not ask for the pre-training
losses (``federation.pre-evaluate`` is forced off), so in deployment the model kept is
the last round's, and in simulation the one the server's own held-out data selects.
The ledger does not publish how many customers a round sampled (that count is logged
at debug level only).

The noise is drawn from operating-system entropy, not from ``experiment.seed``: noise
anyone can regenerate protects nothing. Only ``privacy.seeded-sampling`` (simulation
only, marked in the ledger) seeds it too, so that a simulated run is reproducible.
The server is trusted (it sees every merchant's clipped sum): the threat model of the
central placement.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common.protocol import (
    CUSTOMER_CLIP_KEY,
    CUSTOMER_LR_KEY,
    CUSTOMER_NOISE_KEY,
    CUSTOMER_RATE_KEY,
    CUSTOMER_SEEDED_KEY,
    CUSTOMERS_DROPPED,
    CUSTOMERS_SAMPLED,
    CUSTOMERS_TOTAL,
)
from server.config import DPConfig, FederationConfig, check_compatible
from server.customer_step import server_learning_rate, server_step
from server.dp_accounting import THREAT_MODEL, UNIT_TEXT, CustomerLedger
from server.privacy import num_sampled
from server.replies import reply_order

log = logging.getLogger(__name__)

#: Separates the server noise's seeded stream from the merchants' sampling streams.
NOISE_STREAM = 0x5EED_401
#: The aggregated train metrics written to ``metrics.jsonl`` under customer-level DP.
PUBLISHED_TRAIN_METRICS: frozenset[str] = frozenset({"num-examples", CUSTOMERS_TOTAL})


class CentralCustomerDP(Strategy):
    """The guarded strategy with customer-level aggregation and central noise; under
    ``privacy.placement = local`` (without SecAgg+) the merchants add the noise
    (``client.customer_dp``) and the server adds none."""

    def __init__(self, strategy: Any, dp: DPConfig, fed: FederationConfig, population: int,
                 ledger: CustomerLedger, rng: np.random.Generator | None = None) -> None:
        self.strategy = strategy
        self.dp = dp
        self.ledger = ledger
        self.population = max(int(population), 1)
        #: Expected share of the merchants in a round (FedAvg's own sample size).
        self.merchant_share = num_sampled(fed, population) / self.population
        self.rng = rng if rng is not None else np.random.default_rng()
        self.clipping_norm = dp.clipping_norm
        self._current: list[np.ndarray] = []

    def summary(self) -> None:
        log.info("customer-level DP (%s): q %g, z %g, C %g; unit: %s", self.dp.placement,
                 self.dp.customer_rate, self.dp.noise_multiplier, self.clipping_norm,
                 UNIT_TEXT)
        self.strategy.summary()

    @property
    def expected_sampled(self) -> float | None:
        """D: the customers a round samples on average (None until their count is known)."""
        return expected_sampled(self.dp, self.ledger.customers, self.merchant_share)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._current = arrays.to_numpy_ndarrays()
        config[CUSTOMER_RATE_KEY] = self.dp.customer_rate
        config[CUSTOMER_CLIP_KEY] = self.clipping_norm
        config[CUSTOMER_LR_KEY] = self.dp.customer_learning_rate
        if self.dp.seeded_sampling:
            config[CUSTOMER_SEEDED_KEY] = True
        if self.dp.placement == "local":
            config[CUSTOMER_NOISE_KEY] = self.dp.noise_multiplier * self.clipping_norm
        messages: Iterable[Message] = self.strategy.configure_train(server_round, arrays,
                                                                    config, grid)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        g = self.strategy.rounds.global_round(server_round)
        good = self.strategy.screen_train_replies(server_round, replies)
        if not good:
            self.ledger.withheld(g, 0, "no merchant's reply passed the guard: nothing "
                                       "was released")
            return None, None
        good.sort(key=reply_order)
        counts = [_metrics(m) for m in good]
        estimate_customers(self.ledger, counts, self.population, g)
        if self.ledger.would_exceed():
            log.warning("round %d: releasing it would take epsilon past privacy.target-"
                        "epsilon %g (spent %.4g): the round's update is withheld", g,
                        self.dp.target_epsilon, self.ledger.epsilon)
            self.ledger.withheld(g, len(good), "privacy.target-epsilon would be passed")
            return None, None
        summed = _sum_updates(good)
        _, metrics = self.strategy.aggregate_train(server_round, good)  # bookkeeping
        if metrics is not None:
            # Only the merchants' customer counts reach metrics.jsonl: the sample size,
            # the customers dropped and the fit time (which grows with the sample) stay
            # out, as they are outside epsilon.
            metrics = MetricRecord({k: v for k, v in metrics.items()
                                    if k in PUBLISHED_TRAIN_METRICS})
            self.strategy.rounds.train_metrics(g, metrics)
        new = self.noised_step(summed, g)
        sampled = int(sum(c.get(CUSTOMERS_SAMPLED, 0) for c in counts))
        dropped = int(sum(c.get(CUSTOMERS_DROPPED, 0) for c in counts))
        self.ledger.released(g, len(good))
        log.info("round %d: %d merchants; noise std %g on the sum (%s), divided by %.1f "
                 "expected customers", g, len(good),
                 self.dp.noise_multiplier * self.clipping_norm, self.dp.placement,
                 self.expected_sampled)
        log.debug("round %d: %d customers in the sum (not published: it is outside "
                  "epsilon)", g, sampled)
        if dropped:
            log.warning("round %d: %d sampled customers left out by their merchants: their "
                        "update was not finite", g, dropped)
        # federation.shift-server-lr after the noise (post-processing).
        return self.strategy.step_shifts(ArrayRecord(new)), metrics

    def noised_step(self, summed: list[np.ndarray], g: int = 1) -> list[np.ndarray]:
        """The global weights after round ``g``'s step along ``(summed + noise) / D``
        (``server.customer_step``: Adam's moments live on the inner strategy)."""
        denominator = self.expected_sampled
        if denominator is None or not self._current:
            raise RuntimeError("noised_step before configure_train / the customers' count")
        if self.dp.placement == "central":  # local: the merchants' sums carry the noise
            std = self.dp.noise_multiplier * self.clipping_norm
            summed = [s + self.rng.normal(0.0, std, s.shape) for s in summed]
        mean = [s / max(denominator, 1.0) for s in summed]
        return server_step(self.dp, g, self._current, mean, self.strategy)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages: Iterable[Message] = self.strategy.configure_evaluate(server_round, arrays,
                                                                       config, grid)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        metrics: MetricRecord | None = self.strategy.aggregate_evaluate(server_round, replies)
        return metrics


def expected_sampled(dp: DPConfig, customers: int | None, merchant_share: float
                     ) -> float | None:
    """D = q * customers * merchant share (None while the customers' count is unknown)."""
    return None if customers is None else dp.customer_rate * customers * merchant_share


def estimate_customers(ledger: CustomerLedger, counts: list[dict[str, float]],
                       population: int, g: int) -> None:
    """Fix the ledger's customer count, if still unknown, from the merchants' counts of
    round ``g`` scaled to the ``population`` (a warning names ``privacy.customers``)."""
    if ledger.customers is not None or not counts:
        return
    ledger.learn_customers(round(
        sum(c.get(CUSTOMERS_TOTAL, 0) for c in counts) * population / len(counts)))
    log.warning("customer-level DP: %d customers in the federation, estimated from the "
                "counts the %d merchants of round %d reported; delta = %.3g and the "
                "denominator rest on them (a merchant that under-reports loosens delta): "
                "declare privacy.customers to fix both", ledger.customers, len(counts), g,
                ledger.delta)


def noise_rng(seeded: bool, seed: int) -> np.random.Generator:
    """The server's noise generator: OS entropy, or (``privacy.seeded-sampling``,
    simulation only) one seeded by ``seed``."""
    return np.random.default_rng([seed, NOISE_STREAM]) if seeded else np.random.default_rng()


def _metrics(msg: Message) -> dict[str, float]:
    record = next(iter(msg.content.metric_records.values()))
    return {k: float(v) for k, v in record.items()  # type: ignore[arg-type]
            if k in (CUSTOMERS_SAMPLED, CUSTOMERS_TOTAL, CUSTOMERS_DROPPED)}


def _sum_updates(replies: list[Message]) -> list[np.ndarray]:
    """The sum of the replies' arrays (as the guard read and checked them), in float64."""
    total: list[np.ndarray] | None = None
    for msg in replies:
        arrays = next(iter(msg.content.array_records.values())).to_numpy_ndarrays()
        if total is None:
            total = [a.astype(np.float64) for a in arrays]
        else:
            for t, a in zip(total, arrays, strict=True):
                t += a
    assert total is not None
    return total


def wrap_customer_dp(strategy: Any, dp: DPConfig, fed: FederationConfig, population: int,
                     path: Path | None, seed: int = 0
                     ) -> tuple[CentralCustomerDP, CustomerLedger]:
    """The guarded ``strategy`` inside customer-level DP, and its ledger at ``path``;
    ``seed`` seeds the server's noise only under ``privacy.seeded-sampling``."""
    check_customer_run(dp, fed)
    if getattr(strategy, "pre_evaluate", False):  # 'auto' in deployment ('on' refused)
        strategy.pre_evaluate = False
    ledger = CustomerLedger(dp, path)
    wrapped = CentralCustomerDP(strategy, dp, fed, population, ledger,
                                rng=noise_rng(dp.seeded_sampling, seed))
    return wrapped, ledger


def check_customer_run(dp: DPConfig, fed: FederationConfig) -> None:
    """Check the two sections together and log what customer-level DP does with them
    (ignored keys, seeded sampling, the placement and its threat model)."""
    check_compatible(fed, dp)
    if fed.local_epochs != FederationConfig.local_epochs:
        log.warning("federation.local-epochs = %d is ignored with privacy.unit = customer: "
                    "each customer's update is one gradient step at the global weights",
                    fed.local_epochs)
    if fed.strategy == "fedprox":
        log.warning("federation.proximal-mu has no effect with privacy.unit = customer: a "
                    "merchant takes no local steps (fedprox runs as fedavg)")
    if dp.seeded_sampling:
        log.warning("privacy.seeded-sampling: merchants seed their customer sample, and "
                    "the noise is seeded, from the run config; epsilon assumes a sample "
                    "and noise nobody can recompute, so it holds only in simulation")
    log.info("customer-level DP, %s noise: q = %g, z = %g, C = %g, eta = %g, server "
             "%s at learning rate %g; %s", dp.placement, dp.customer_rate,
             dp.noise_multiplier, dp.clipping_norm, dp.customer_learning_rate,
             dp.server_optimizer, server_learning_rate(dp),
             THREAT_MODEL[dp.placement])
