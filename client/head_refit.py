"""A merchant's share of the head refit (``common.head_refit``), computed only when the
server asks.

An evaluate instruction whose config carries ``head-refit`` (true) asks this merchant
for the sums of the global model's head statistics over its training campaign rows: the
row count, the log-loss, its gradient and Hessian in the head's weights (63 and 3,969
numbers for the default model; ``common.protocol.HEAD_REFIT_METRICS``), never a row, an
id or a label.
A merchant with fewer training campaign rows, in all or of one action, than
``common.head_refit.least_rows`` asks for the steps the server announces refuses.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from client.config import ClientSettings
from common.head_refit import campaign_refusal, head_positions, head_statistics
from common.protocol import (
    HEAD_REFIT_GRADIENT,
    HEAD_REFIT_HESSIAN,
    HEAD_REFIT_KEY,
    HEAD_REFIT_LOSS,
    HEAD_REFIT_ROWS,
    HEAD_REFIT_STEPS_KEY,
)
from common.snapshots import Snapshots

log = logging.getLogger(__name__)

#: Most steps a merchant answers a refit for (the rows it needs grow with them).
MAX_STEPS = 20
#: Node config key with which a merchant declines every head refit (``false``).
NODE_CONFIG_KEY = "head-refit"


def wants_head_refit(config: Mapping[str, Any] | None) -> bool:
    """Whether an instruction's config asks for the head refit's sums."""
    return config is not None and bool(config.get(HEAD_REFIT_KEY, False))


def head_refit_metrics(settings: ClientSettings, snaps: Snapshots,
                       weights: list[np.ndarray], config: Mapping[str, Any]
                       ) -> dict[str, Any]:
    """The sums at the global model ``weights`` over this merchant's training campaign
    rows. ``ValueError`` when the model has no such head, ``config`` announces no valid
    number of steps, or there are too few campaign rows for them
    (``common.head_refit.campaign_refusal``)."""
    from common.model import cached_model, set_weights_of

    steps = config.get(HEAD_REFIT_STEPS_KEY)
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"'{HEAD_REFIT_STEPS_KEY}' must be an int in [1, {MAX_STEPS}], "
                         f"got {steps!r}")
    model = cached_model(settings.model, settings.snapshots, settings.seed)
    if not head_positions(model):
        raise ValueError("the model has no contrast head with response shifts to refit")
    train = snaps.split_part("train")
    refusal = campaign_refusal(train, model, steps)
    if refusal is not None:
        raise ValueError(refusal)
    set_weights_of(model, weights)
    stats = head_statistics(model, train)
    return {HEAD_REFIT_ROWS: stats.rows, HEAD_REFIT_LOSS: stats.loss,
            HEAD_REFIT_GRADIENT: [float(v) for v in stats.gradient],
            HEAD_REFIT_HESSIAN: [float(v) for v in np.ravel(stats.hessian)]}


def declines(node_config: Mapping[str, Any]) -> bool:
    """Whether this merchant's node config turns the head refit down
    (``head-refit=false``): it then answers no refit, whatever its rows."""
    value = node_config.get(NODE_CONFIG_KEY, True)
    return value is False or str(value).strip().lower() in ("false", "off", "0", "no")


def head_refit_reply(msg: Any, settings: ClientSettings, snaps: Snapshots,
                     weights: list[np.ndarray] | None,
                     node_config: Mapping[str, Any] | None = None) -> Any:
    """The reply to an evaluate instruction that asks for the head refit's sums: the
    sums, or an error naming what is missing or that this merchant declines
    (``node_config``, :func:`declines`)."""
    from flwr.app import Error, Message, MetricRecord, RecordDict

    from client.app import DATA_ERROR

    if declines(node_config or {}):
        return Message(Error(code=DATA_ERROR, reason=f"head refit: this merchant declines "
                             f"it ({NODE_CONFIG_KEY}=false in its node config)"),
                       reply_to=msg)
    if weights is None:
        weights = msg.content.array_records["arrays"].to_numpy_ndarrays()
    started = time.perf_counter()
    try:
        metrics = head_refit_metrics(settings, snaps, weights,
                                     msg.content.config_records["config"])
    except ValueError as err:
        return Message(Error(code=DATA_ERROR, reason=f"head refit: {err}"), reply_to=msg)
    log.info("head refit sums over %d training campaign rows: %.2f s",
             metrics[HEAD_REFIT_ROWS], time.perf_counter() - started)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
