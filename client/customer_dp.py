"""A merchant's train reply under customer-level DP (``privacy.unit = customer``).

Each round the merchant Poisson-samples its customers (each with chance q) from a
generator on operating-system entropy, so nobody else can recompute the sample: the
subsampling amplification in ε rests on that. Only when the server's instruction asks
for it (``privacy.seeded-sampling``, simulation only) is the generator seeded by the
run's seed, the global round and the merchant. The merchant computes every sampled
customer's update from that customer's training snapshots only, clips it to C and
replies with the sum (``common.customer_updates``), the number of customers in it, the
number left out for a non-finite update and its count of customers. It sends no loss,
not even the pre-training scores (the server does not ask for them under customer-level
DP, and they are not added if it does): the noise covers the sum alone.

Where the noise is added (``privacy.placement``): ``central``, by the server. Under
``distributed`` and ``local`` the instruction carries a std (``customer-noise-std``) and
the merchant adds N(0, std^2) to every coordinate of its sum before it leaves (a share
``z C / sqrt(m_min)`` that SecAgg+ sums with the others', or all of ``z C``), from OS
entropy unless seeded as above; the server is then not trusted, so the reply carries
only ``num-examples`` and ``customers`` (no sample size, no count left out, no time).
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from client.config import ClientSettings
from client.timer import HandlerTimer
from client.work import global_model, global_round
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
from common.snapshots import Snapshots

log = logging.getLogger(__name__)

#: Separates a merchant's seeded noise stream from its seeded sampling stream.
NOISE_STREAM = 0x401_5E


def sampling_rng(seeded: bool, seed: int, server_round: int, merchant: str
                 ) -> np.random.Generator:
    """The customer sample's generator: OS entropy, or (``seeded``, simulation only) one
    seeded by ``seed``, the round and the merchant."""
    if not seeded:
        return np.random.default_rng()
    return np.random.default_rng([seed, server_round, zlib.crc32(merchant.encode())])


def noise_rng(seeded: bool, seed: int, server_round: int, merchant: str
              ) -> np.random.Generator:
    """The noise share's generator: OS entropy, or (``seeded``, simulation only) a stream
    of its own seeded by ``seed``, the round and the merchant."""
    if not seeded:
        return np.random.default_rng()
    return np.random.default_rng([seed, server_round, zlib.crc32(merchant.encode()),
                                  NOISE_STREAM])


def add_noise(summed: list[np.ndarray], std: float, rng: np.random.Generator
              ) -> list[np.ndarray]:
    """``summed`` plus N(0, ``std``^2) on every coordinate (drawn in float64)."""
    return [(s.astype(np.float64) + rng.normal(0.0, std, s.shape)).astype(s.dtype)
            for s in summed]


def sampled_customers(user_id: np.ndarray, rate: float, rng: np.random.Generator
                      ) -> np.ndarray:
    """The sorted distinct ids of ``user_id``, each kept with probability ``rate``
    (Poisson sampling) by ``rng``."""
    ids = np.unique(np.asarray(user_id).astype(str))
    return ids[rng.random(len(ids)) < rate]


def customer_train_reply(settings: ClientSettings, snaps: Snapshots,
                         weights: list[np.ndarray], config: Mapping[str, Any],
                         timer: HandlerTimer | None = None
                         ) -> tuple[list[np.ndarray], dict[str, float | int]]:
    """The clipped sum of the sampled customers' updates at the global ``weights`` and
    the reply's metrics (``num-examples``: training rows, as every train reply;
    ``customers-sampled``; ``customers-dropped``; ``customers``; ``fit_seconds``)."""
    from common.customer_updates import clipped_customer_sum

    started = time.perf_counter()
    rate = float(config[CUSTOMER_RATE_KEY])
    train = snaps.split_part("train")
    merchant = str(train.merchant_id[0]) if len(train) else ""
    rng = sampling_rng(bool(config.get(CUSTOMER_SEEDED_KEY)), settings.seed,
                       global_round(config), merchant)
    chosen = sampled_customers(train.user_id, rate, rng)
    rows = np.isin(train.user_id.astype(str), chosen)
    model = global_model(settings, weights, timer)
    summed = clipped_customer_sum(
        model, settings.model, train.subset(rows),
        clipping_norm=float(config[CUSTOMER_CLIP_KEY]),
        learning_rate=float(config[CUSTOMER_LR_KEY]),
        rows=settings.train.batch_size)
    if summed.dropped:
        log.warning("round %d: %d sampled customers left out of the sum: their update "
                    "was not finite", global_round(config), summed.dropped)
    if timer is not None:
        timer.lap("customer updates")
    customers = int(len(np.unique(train.user_id.astype(str))))
    std = float(config.get(CUSTOMER_NOISE_KEY, 0.0))
    if std > 0:  # distributed / local: the noise leaves with the sum; the server is not trusted
        noised = add_noise(summed.update, std, noise_rng(
            bool(config.get(CUSTOMER_SEEDED_KEY)), settings.seed, global_round(config),
            merchant))
        return noised, {"num-examples": int(len(train)), CUSTOMERS_TOTAL: customers}
    metrics: dict[str, float | int] = {
        "num-examples": int(len(train)), CUSTOMERS_SAMPLED: summed.customers,
        CUSTOMERS_DROPPED: summed.dropped, CUSTOMERS_TOTAL: customers,
        "fit_seconds": time.perf_counter() - started}
    return summed.update, metrics
