"""Customer-level DP with the merchants adding the noise, under SecAgg+
(``privacy.placement = distributed``, or ``local`` with ``federation.secure-aggregation``).

Each merchant replies with its clipped customer sum plus Gaussian noise of std
``sigma`` on every coordinate (``client.customer_dp``), weight 1, masked by SecAgg+:

- ``distributed``: ``sigma = z C / sqrt(m_min)``, m_min = ``privacy.min-replies`` or, at
  0, the smallest sum SecAgg+ can unmask for the merchants sampled a round,
  ``ceil(n t / k)`` with k shares and threshold t (``server.secagg.smallest_unmasked``;
  t when everyone shares, or when the live merchants can split into groups sharing no
  pairwise mask): each sampled merchant needs t live neighbours among its k.
  m_min <= that bound is required, so a sum the server ever sees holds
  n >= m_min shares: noise variance ``n (z C)^2 / m_min >= (z C)^2``. The ledger accounts
  every released round at z (the effective multiplier at m_min replies); more replies
  only add noise. A round with fewer than m_min replies is not applied and the ledger
  says so in a line of its own. The bound follows the merchants actually sampled: a
  round whose bound would fall below m_min (fewer sampled than planned) is skipped
  before masking (:meth:`CustomerNoiseShares.admit`).
- ``local``: ``sigma = z C``: each merchant's sum is private on its own (same ε per
  customer: a customer is in one merchant's sum); the average carries n times the
  variance needed.

The workflow reveals the mean of the n replies (every weight 1, ``max-weight`` 1); the
server multiplies it back to the sum and steps ``w + lr_s * sum / D`` with the same
fixed denominator D as the central placement (``server.customer_dp``), adding no noise.

SecAgg+ quantisation: each reply is clipped to ``[-c, c]`` per coordinate
(``federation.secagg-clipping-range``) before it is quantised. The range is the
operator's choice, public and data-independent; a merchant never refuses its noised sum
for lying beyond it (that would drop it for what its customers did): SecAgg+ clips it,
and the merchant logs how many coordinates were clipped (``client.secagg``). The
accounting assumes none is: choose c above the largest coordinate of a clipped sum plus
about 6 sigma (a customer's update has L2 norm <= C, so a coordinate of a sum of k
customers is at most k C, in practice far less). The quantisation step 2c / T
(``secagg-quantization-range`` T) adds a small error after the noise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import Scalar

from common.protocol import (
    CUSTOMER_CLIP_KEY,
    CUSTOMER_LR_KEY,
    CUSTOMER_NOISE_KEY,
    CUSTOMER_RATE_KEY,
    CUSTOMER_SEEDED_KEY,
    CUSTOMERS_TOTAL,
)
from server.config import DPConfig, FederationConfig
from server.customer_dp import check_customer_run, estimate_customers, expected_sampled
from server.customer_step import server_step
from server.dp_accounting import CustomerLedger
from server.privacy import num_sampled
from server.secagg import effective_shares, smallest_unmasked

log = logging.getLogger(__name__)


def min_replies(fed: FederationConfig, dp: DPConfig, sampled: int) -> int:
    """m_min of the distributed placement for ``sampled`` merchants a round:
    ``privacy.min-replies``, or at 0 the smallest sum SecAgg+ can unmask
    (``server.secagg.smallest_unmasked``); a ``ValueError`` names the key when it exceeds
    that bound (SecAgg+ could unmask a sum with less noise than accounted)."""
    bound = smallest_unmasked(fed, sampled)
    if dp.min_replies == 0:
        return bound
    if dp.min_replies > bound:
        shares, threshold = effective_shares(fed, sampled)
        raise ValueError(
            f"config key 'privacy.min-replies': {dp.min_replies} is more than the smallest "
            f"sum SecAgg+ can unmask ({bound} of the {sampled} merchants sampled a round: "
            f"reconstruction threshold {threshold} of {shares} shares): it may unmask a sum "
            "of that few, whose noise would fall short of the accounted z C; lower it or "
            "raise federation.secagg-reconstruction-threshold")
    return dp.min_replies


def share_std(dp: DPConfig, m_min: int) -> float:
    """The std a merchant adds to each coordinate: z C / sqrt(m_min) (distributed) or
    z C (local)."""
    full = dp.noise_multiplier * dp.clipping_norm
    return full / math.sqrt(m_min) if dp.placement == "distributed" else full


class CustomerNoiseShares:
    """The customer-level DP hooks of the SecAgg+ strategy (``server.secagg``): what a
    train instruction carries, the step from the unmasked mean, and the ledger."""

    def __init__(self, dp: DPConfig, fed: FederationConfig, population: int,
                 ledger: CustomerLedger) -> None:
        self.dp, self.ledger = dp, ledger
        self.population = max(int(population), 1)
        self.fed = fed
        sampled = num_sampled(fed, self.population)
        self.merchant_share = sampled / self.population
        self.min_replies = min_replies(fed, dp, sampled) if dp.placement == "distributed" \
            else 1
        if dp.placement == "distributed":
            ledger.min_replies = self.min_replies
        self.std = share_std(dp, self.min_replies)
        self.current: list[np.ndarray] = []
        self._not_applied: dict[int, str] = {}
        #: Where the server optimizer keeps its state: the strategy (checkpointed).
        self.state: Any = self

    def train_config(self) -> dict[str, Scalar]:
        """The customer-level keys of a train instruction (with the noise std)."""
        config: dict[str, Scalar] = {
            CUSTOMER_RATE_KEY: self.dp.customer_rate,
            CUSTOMER_CLIP_KEY: self.dp.clipping_norm,
            CUSTOMER_LR_KEY: self.dp.customer_learning_rate, CUSTOMER_NOISE_KEY: self.std}
        if self.dp.seeded_sampling:
            config[CUSTOMER_SEEDED_KEY] = True
        return config

    def admit(self, g: int, sampled: int) -> bool:
        """Whether round ``g`` may run SecAgg+ with the ``sampled`` merchants its strategy
        chose. Under ``distributed`` the smallest sum SecAgg+ can unmask follows the
        merchants actually sampled (``server.secagg.smallest_unmasked``); when fewer are
        sampled than planned it can fall below m_min, and a sum of fewer than m_min noise
        shares could be unmasked. Such a round is skipped before any masking: no SecAgg+
        run, nothing spent, a ledger line (at :meth:`close`) says why."""
        if self.dp.placement != "distributed":
            return True
        bound = smallest_unmasked(self.fed, sampled)
        if bound >= self.min_replies:
            return True
        self._not_applied[g] = (
            f"{sampled} merchants sampled: the smallest sum SecAgg+ could unmask would be "
            f"{bound}, below min_replies {self.min_replies}, so a sum with too little "
            "noise could be unmasked; skipped before masking")
        log.warning("round %d: %s", g, self._not_applied[g])
        return False

    def step(self, g: int, mean: list[np.ndarray], counts: list[Mapping[str, Any]]
             ) -> list[np.ndarray] | None:
        """The global weights after round ``g`` from the unmasked ``mean`` of the
        ``len(counts)`` replies (their clear metrics), or None when it is not applied
        (fewer than m_min replies, or the budget)."""
        n = len(counts)
        if n < self.min_replies:
            self._not_applied[g] = (f"{n} merchants replied, fewer than min_replies "
                                    f"{self.min_replies}: the sum lacks noise")
            log.warning("round %d: %s; not applied", g, self._not_applied[g])
            return None
        estimate_customers(self.ledger, [{CUSTOMERS_TOTAL: float(c.get(CUSTOMERS_TOTAL, 0))}
                                         for c in counts], self.population, g)
        if self.ledger.would_exceed():
            self._not_applied[g] = "privacy.target-epsilon would be passed"
            log.warning("round %d: releasing it would take epsilon past privacy.target-"
                        "epsilon %g (spent %.4g): not applied", g, self.dp.target_epsilon,
                        self.ledger.epsilon)
            return None
        denominator = expected_sampled(self.dp, self.ledger.customers, self.merchant_share)
        if denominator is None or not self.current:
            raise RuntimeError(f"round {g}: customer-level DP step without the customer "
                               "count or the current weights (configure_fit not run?)")
        self.ledger.released(g, n)
        log.info("round %d: %d merchants' noised sums (%s, std %g each, %.3g on the sum), "
                 "divided by %.1f expected customers", g, n, self.dp.placement, self.std,
                 self.std * math.sqrt(n), denominator)
        scale = n / max(denominator, 1.0)  # the workflow's mean of n sums, over D
        return server_step(self.dp, g, self.current, [scale * m.astype(np.float64)
                                                      for m in mean], self.state)

    def close(self, g: int, applied: bool, replied: int | None) -> None:
        """After round ``g``'s SecAgg+ stages: a round not applied gets its ledger line."""
        if applied:
            return
        reason = self._not_applied.pop(g, "SecAgg+ did not complete (fewer merchants "
                                          "stayed than its reconstruction threshold, or a "
                                          "failure): nothing was unmasked")
        self.ledger.withheld(g, replied, reason)


def attach_customer_dp(strategy: Any, dp: DPConfig, fed: FederationConfig, population: int,
                       path: Path | None) -> CustomerLedger:
    """Give the SecAgg+ ``strategy`` its customer-level DP hooks; the ledger at ``path``."""
    check_customer_run(dp, fed)
    ledger = CustomerLedger(dp, path)
    strategy.customer = CustomerNoiseShares(dp, fed, population, ledger)
    strategy.customer.state = strategy
    log.info("customer-level DP under SecAgg+: each merchant adds noise of std %g (%s%s)",
             strategy.customer.std, dp.placement,
             f", m_min {strategy.customer.min_replies}" if dp.placement == "distributed"
             else "")
    return ledger
