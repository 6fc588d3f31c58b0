"""Reasons of some customers under either kind of model: the score table's columns.

The LSTM's group attributions are integrated gradients (:mod:`common.reasons.ig`). A
GBDT/LR model reads only the aggregates; its group attribution of a customer is the
change in risk when the group's columns are replaced by the reference customer's
(occlusion: ``f(x) - f(x with group g at the reference)``), one prediction per group.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from common.config import SnapshotConfig
from common.feature_groups import FEATURE_GROUPS
from common.reasons.facts import CategoryNames, customer_facts
from common.reasons.ig import IG_STEPS, SCORE_IG_STEPS, Reference, group_ig
from common.reasons.text import Reasons, reasons_of
from common.snapshots import Snapshots
from common.tabular import TabularModel

#: The score table's reason columns, in order.
REASON_COLUMNS: tuple[str, ...] = ("reasons", "reason_codes", "fading_categories")
#: Rows explained at a time by :func:`reason_columns`.
EXPLAIN_CHUNK = 2048


def group_attributions(model: Any, snaps: Snapshots, reference: Reference, *,
                       steps: int = IG_STEPS) -> np.ndarray:
    """``[N, len(FEATURE_GROUPS)]`` attributions of the decay risk: IG for the LSTM,
    occlusion of each group's aggregates for a GBDT/LR model."""
    if isinstance(model, TabularModel):
        return occlusion(model, snaps, reference.static)
    width = int(model.input["static"].shape[-1])
    return group_ig(model, snaps, Reference(reference.numeric, reference.static[:width]),
                    steps=steps)


def occlusion(model: TabularModel, snaps: Snapshots, reference_static: np.ndarray
              ) -> np.ndarray:
    """Per group, the risk minus the risk with the group's aggregate columns set to
    ``reference_static`` (a group without aggregates gets 0)."""
    out = np.zeros((len(snaps), len(FEATURE_GROUPS)), np.float32)
    if len(snaps) == 0:
        return out
    risk = model.predict(snaps)["decay"]
    for g, group in enumerate(FEATURE_GROUPS):
        cols = list(group.aggregate_columns(snaps.static.shape[1]))
        if not cols:
            continue
        static = snaps.static.copy()
        static[:, cols] = reference_static[cols]
        out[:, g] = risk - model.predict(_with_static(snaps, static))["decay"]
    return out


def _with_static(snaps: Snapshots, static: np.ndarray) -> Snapshots:
    import dataclasses

    return dataclasses.replace(snaps, static=static)


def explain(model: Any, snaps: Snapshots, config: SnapshotConfig, reference: Reference,
            names: CategoryNames | None = None, *, steps: int = IG_STEPS) -> Reasons:
    """The reasons of every row of ``snaps`` (see :func:`common.reasons.text.reasons_of`)."""
    groups = group_attributions(model, snaps, reference, steps=steps)
    return reasons_of(customer_facts(snaps, config, names), groups)


def reason_columns(model: Any, snaps: Snapshots, rows: np.ndarray, config: SnapshotConfig,
                   reference: Reference, names: CategoryNames | None = None, *,
                   steps: int = SCORE_IG_STEPS, chunk: int = EXPLAIN_CHUNK
                   ) -> dict[str, np.ndarray]:
    """``REASON_COLUMNS`` for every row of ``snaps``: the reasons of ``rows`` (indices),
    empty text for the others (IG with ``steps`` points: the scorer's default).

    ``chunk`` rows at a time: the next chunk's attributions are computed (TensorFlow, in
    a worker thread) while this chunk's figures are turned into words (Python).
    """
    from concurrent.futures import ThreadPoolExecutor

    out = {c: np.full(len(snaps), "", dtype=object) for c in REASON_COLUMNS}
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) <= chunk:  # one chunk (a monitor's batch of alerts): nothing to overlap
        if len(rows):
            part = snaps.subset(rows)
            groups = group_attributions(model, part, reference, steps=steps)
            for column, values in reasons_of(customer_facts(part, config, names),
                                             groups).columns().items():
                out[column][rows] = values
        return out
    parts = [snaps.subset(rows[lo:lo + chunk]) for lo in range(0, len(rows), chunk)]
    pool = ThreadPoolExecutor(1, thread_name_prefix="fedecay-attributions")
    try:
        pending = [pool.submit(group_attributions, model, part, reference, steps=steps)
                   for part in parts]
        for lo, part, future in zip(range(0, len(rows), chunk), parts, pending, strict=True):
            facts = customer_facts(part, config, names)
            for column, values in reasons_of(facts, future.result()).columns().items():
                out[column][rows[lo:lo + chunk]] = values
    finally:
        pool.shutdown(cancel_futures=True)  # an error here stops the chunks not started
    return out
