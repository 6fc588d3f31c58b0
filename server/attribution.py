"""The attribution round: merchants explain the kept global model on their own data.

After the last round, when ``federation.attributions`` is on, the server sends every
connected merchant one plain evaluate instruction holding the kept global model (the
selected round's weights, what ``model.keras`` holds) and a config asking for
attributions (``client.attribution``). Each merchant replies only per-group scalars
computed on its own validation period; the server checks every reply (names in
``common.attribution.ATTRIBUTION_METRICS``, finite values, a positive row count),
aggregates them weighted by rows (``common.attribution.aggregate_metrics``) and writes
``attributions.json`` in the run folder, all or nothing.

The round is skipped, with a logged note and the reason in ``attributions.json``,
under SecAgg+ (the merchants run Flower's legacy ClientApp, which has no such
instruction, and an individual merchant's numbers would reach the server unmasked) and
under differential privacy (``privacy.mode`` other than ``off``: the scalars would
leave each merchant without noise and outside the privacy ledger's account).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common import atomic
from common.attribution import ATTRIBUTION_METRICS, WEIGHT_METRICS, aggregate_metrics
from common.protocol import (
    ATTRIBUTION_REPEATS_KEY,
    ATTRIBUTION_SEED_KEY,
    ATTRIBUTIONS_KEY,
)
from server.config import DPConfig, FederationConfig, ServerSettings
from server.recorder import Selection
from server.rounds import error_summary

log = logging.getLogger(__name__)

ATTRIBUTIONS_FILE = "attributions.json"
#: What the merchants' replies are weighted by (the AUC figures by the AUC rows).
ROWS, AUC_ROWS = WEIGHT_METRICS


def explain_kept_model(grid: Grid, settings: ServerSettings, selection: Selection,
                       kept: list[np.ndarray], run_dir: Path, *, last_round: int
                       ) -> dict[str, Any] | None:
    """The attribution round for ``kept``, the model the run keeps (``model.keras``'s
    weights): from the selected round, else the last one (round ``last_round``). A
    failure is logged, never raised: the rounds' results are already safe."""
    try:
        return attribution_round(grid, settings.federation, kept, run_dir,
                                 seed=settings.seed,
                                 model_round=(selection.round if selection.weights is not None
                                              else last_round),
                                 privacy=settings.privacy)
    except Exception:  # noqa: BLE001 - the run itself is done and saved
        log.exception("attributions: the attribution round failed; no %s written",
                      ATTRIBUTIONS_FILE)
        return None


def attribution_round(grid: Grid, fed: FederationConfig, weights: list[np.ndarray],
                      run_dir: Path, *, seed: int, model_round: int,
                      privacy: DPConfig | None = None) -> dict[str, Any] | None:
    """Ask every connected merchant for attributions of ``weights`` (the model kept from
    round ``model_round``), aggregate the replies and write ``attributions.json``.

    Returns what was written, or None when ``federation.attributions`` is off. Under
    SecAgg+ or differential privacy (``privacy``) nothing is asked: the file says why.
    """
    if not fed.attributions:
        return None
    path = run_dir / ATTRIBUTIONS_FILE
    reason = unavailable_reason(fed, privacy)
    if reason is not None:
        log.info("attributions: %s", reason)
        out: dict[str, Any] = {"status": "unavailable", "reason": reason}
        atomic.write_text(path, json.dumps(out, indent=2) + "\n")
        return out
    started = time.perf_counter()
    nodes = sorted(grid.get_node_ids())
    config = ConfigRecord({ATTRIBUTIONS_KEY: True,
                           ATTRIBUTION_REPEATS_KEY: fed.attribution_repeats,
                           ATTRIBUTION_SEED_KEY: seed, "server-round": model_round})
    content = RecordDict({"arrays": ArrayRecord(weights), "config": config})
    messages = [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=n)
                for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=fed.round_timeout))
    out = summarise_replies(replies, asked=len(nodes))
    out.update({"model_round": model_round, "repeats": fed.attribution_repeats, "seed": seed,
                "seconds": time.perf_counter() - started})
    atomic.write_text(path, json.dumps(out, indent=2, default=_finite) + "\n")
    log.info("attributions: %d of %d merchants replied (%d validation rows), %.1f s; %s",
             out["merchants"], len(nodes), out["rows"], out["seconds"], path)
    return out


def unavailable_reason(fed: FederationConfig, privacy: DPConfig | None) -> str | None:
    """Why no merchant may be asked for attributions, or None when they may."""
    if fed.secure_aggregation:
        return ("not computed under SecAgg+: the merchants run Flower's legacy ClientApp "
                "and a merchant's attribution scalars would reach the server unmasked")
    if privacy is not None and (privacy.enabled or privacy.customer_level):
        setting = "unit = customer" if privacy.customer_level else f"mode = {privacy.mode}"
        return (f"not computed under differential privacy (privacy.{setting}): "
                "a merchant's attribution scalars would leave it without noise and outside "
                "the privacy ledger's account")
    return None


def summarise_replies(replies: Iterable[Message], asked: int) -> dict[str, Any]:
    """The weighted aggregate of the usable replies, with the others counted and why."""
    good: list[dict[str, float | int]] = []
    failures: list[str] = []
    names: set[str] = set()
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            failures.append(f"node {node}: {error_summary(msg.error.reason)}")
            continue
        metrics, reason = check_attribution_reply(msg)
        if reason is not None:
            failures.append(f"node {node}: rejected: {reason}")
            log.warning("attributions: reply of node %s rejected: %s", node, reason)
            continue
        names.update(metrics)
        good.append(metrics)
    out = aggregate_metrics(good)
    out.update({"status": "ok" if good else "no-replies", "asked": asked,
                "failures": failures, "reply_metrics": sorted(names)})
    return out


def check_attribution_reply(msg: Message) -> tuple[dict[str, float | int], str | None]:
    """A reply's scalars, and why they cannot be used (None when they can): one
    MetricRecord, no arrays, only whitelisted names, finite numbers, and the row counts
    the aggregate weighs by (``WEIGHT_METRICS``): rows > 0, AUC rows in [0, rows]."""
    content = msg.content
    if len(content.array_records) or len(content.metric_records) != 1:
        return {}, (f"{len(content.array_records)} ArrayRecords and "
                    f"{len(content.metric_records)} MetricRecords, expected 0 and 1")
    record = dict(next(iter(content.metric_records.values())))
    unknown = sorted(set(record) - set(ATTRIBUTION_METRICS))
    if unknown:
        return {}, f"metric names outside the whitelist: {', '.join(unknown)}"
    values: dict[str, float | int] = {}
    for key, value in record.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return {}, f"metric '{key}' is {value!r}, expected a finite number"
        values[key] = value
    missing = [key for key in WEIGHT_METRICS if key not in values]
    if missing:
        return {}, f"row counts missing: {', '.join(missing)}"
    if not values[ROWS] > 0:
        return {}, f"metric '{ROWS}' is {values[ROWS]!r}, expected a positive count"
    if not 0 <= values[AUC_ROWS] <= values[ROWS]:
        return {}, (f"metric '{AUC_ROWS}' is {values[AUC_ROWS]!r}, expected a count in "
                    f"[0, {ROWS}]")
    return values, None


def _finite(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)
