"""A merchant's train reply under customer-level DP (``privacy.unit = customer``).

Each round the merchant Poisson-samples its customers (each with chance q, a generator
seeded by the run's seed, the global round and the merchant), computes every sampled
customer's update from that customer's training snapshots only, clips it to C and
replies with the sum (``common.customer_updates``), the number of customers in it and
its count of customers. It sends no loss: the server's noise covers the sum alone.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from client.config import ClientSettings
from client.timer import HandlerTimer
from client.work import global_model, global_round, pre_training_metrics
from common.protocol import (
    CUSTOMER_CLIP_KEY,
    CUSTOMER_LR_KEY,
    CUSTOMER_RATE_KEY,
    CUSTOMERS_SAMPLED,
    CUSTOMERS_TOTAL,
    PRE_EVALUATE_KEY,
)
from common.snapshots import Snapshots


def sampled_customers(user_id: np.ndarray, rate: float, seed: int, server_round: int,
                      merchant: str) -> np.ndarray:
    """The sorted distinct ids of ``user_id``, each kept with probability ``rate``
    (Poisson sampling), from a generator seeded by ``seed``, the round and the merchant."""
    ids = np.unique(np.asarray(user_id).astype(str))
    key = zlib.crc32(merchant.encode())
    rng = np.random.default_rng([seed, server_round, key])
    return ids[rng.random(len(ids)) < rate]


def customer_train_reply(settings: ClientSettings, snaps: Snapshots,
                         weights: list[np.ndarray], config: Mapping[str, Any],
                         timer: HandlerTimer | None = None
                         ) -> tuple[list[np.ndarray], dict[str, float | int]]:
    """The clipped sum of the sampled customers' updates at the global ``weights`` and
    the reply's metrics (``num-examples``: training rows, as every train reply;
    ``customers-sampled``; ``customers``; ``fit_seconds``; the pre-training scores when
    ``config`` asks for them)."""
    from common.customer_updates import clipped_customer_sum

    started = time.perf_counter()
    rate = float(config[CUSTOMER_RATE_KEY])
    train = snaps.split_part("train")
    merchant = str(train.merchant_id[0]) if len(train) else ""
    chosen = sampled_customers(train.user_id, rate, settings.seed, global_round(config),
                               merchant)
    rows = np.isin(train.user_id.astype(str), chosen)
    model = global_model(settings, weights, timer)
    pre = pre_training_metrics(model, snaps) if config.get(PRE_EVALUATE_KEY) else {}
    summed = clipped_customer_sum(
        model, settings.model, train.subset(rows),
        clipping_norm=float(config[CUSTOMER_CLIP_KEY]),
        learning_rate=float(config[CUSTOMER_LR_KEY]),
        rows=settings.train.batch_size)
    if timer is not None:
        timer.lap("customer updates")
    metrics: dict[str, float | int] = {
        "num-examples": int(len(train)), CUSTOMERS_SAMPLED: summed.customers,
        CUSTOMERS_TOTAL: int(len(np.unique(train.user_id.astype(str)))),
        "fit_seconds": time.perf_counter() - started, **pre}
    return summed.update, metrics
