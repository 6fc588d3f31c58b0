"""A merchant's global attributions, computed only when the server asks.

An evaluate instruction whose config carries ``attributions`` (true) asks this merchant
for the per-group importances of the global model it holds (``common.attribution``) on
its own validation period. The reply holds only those scalars
(``common.attribution.ATTRIBUTION_METRICS``, part of ``client.app.EVALUATE_METRICS``):
rows used and one number per feature group and measure, never a row, an id or a label.
A merchant with fewer than :data:`MIN_VALIDATION_ROWS` validation rows refuses.

:func:`attribution_metrics` takes and returns no Flower type, so a long-running trainer
beside the SuperNode can call it as the ClientApp does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from client.config import ClientSettings
from common.attribution import DEFAULT_REPEATS
from common.protocol import ATTRIBUTION_REPEATS_KEY as REPEATS_KEY
from common.protocol import ATTRIBUTION_SEED_KEY as SEED_KEY
from common.protocol import ATTRIBUTIONS_KEY
from common.snapshots import Snapshots

log = logging.getLogger(__name__)

#: Most permutations a server may ask for (each costs one prediction of the period).
MAX_REPEATS = 20
#: Fewest validation rows this merchant explains a model on: with a handful of rows
#: the reply's base log-loss and AUC all but give the rows' labels away (one row's
#: log-loss names its label).
MIN_VALIDATION_ROWS = 20


def wants_attributions(config: Mapping[str, Any] | None) -> bool:
    """Whether an instruction's config asks for attributions."""
    return config is not None and bool(config.get(ATTRIBUTIONS_KEY, False))


def attribution_metrics(settings: ClientSettings, snaps: Snapshots,
                        weights: list[np.ndarray], config: Mapping[str, Any]
                        ) -> dict[str, float | int]:
    """The whitelisted attribution scalars of the global model ``weights`` on this
    merchant's validation rows.

    ``ValueError`` when there are fewer than :data:`MIN_VALIDATION_ROWS` validation rows,
    or ``config`` asks for a number of repeats outside [1, MAX_REPEATS].
    """
    from common.attribution import global_attributions
    from common.model import cached_model, set_weights_of

    val = snaps.split_part("val")
    if len(val) == 0:
        raise ValueError("no validation snapshots in this merchant's data")
    if len(val) < MIN_VALIDATION_ROWS:
        raise ValueError(f"{len(val)} validation snapshots, fewer than the "
                         f"{MIN_VALIDATION_ROWS} a reply needs so that its scalars do not "
                         "give individual labels away")
    repeats = int(config.get(REPEATS_KEY, DEFAULT_REPEATS))
    if not 1 <= repeats <= MAX_REPEATS:
        raise ValueError(f"'{REPEATS_KEY}' must be in [1, {MAX_REPEATS}], got {repeats}")
    model = cached_model(settings.model, settings.snapshots, settings.seed)
    set_weights_of(model, weights)
    att = global_attributions(model, val, repeats=repeats, seed=int(config.get(SEED_KEY, 0)))
    return att.as_metrics()


def attribution_reply(msg: Any, settings: ClientSettings, snaps: Snapshots) -> Any:
    """The reply to an evaluate instruction that asks for attributions: the scalars, or
    an error naming what is missing."""
    import time

    from flwr.app import Error, Message, MetricRecord, RecordDict

    from client.app import DATA_ERROR

    config = msg.content.config_records["config"]
    started = time.perf_counter()
    try:
        metrics = attribution_metrics(settings, snaps,
                                      msg.content.array_records["arrays"].to_numpy_ndarrays(),
                                      config)
    except ValueError as err:
        return Message(Error(code=DATA_ERROR, reason=f"attributions: {err}"), reply_to=msg)
    log.info("attributions of the global model on %d validation rows: %.2f s",
             metrics["attr_n"], time.perf_counter() - started)
    return Message(RecordDict({"metrics": MetricRecord(dict(metrics))}), reply_to=msg)
