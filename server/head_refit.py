"""The head refit of a federation: Newton steps on the merchants' summed statistics.

After the last round, with ``federation.head-refit-steps`` > 0 and a model with the
contrast head (``common.head_refit``), the server takes the model the run keeps and,
each step, sends the merchants one plain evaluate instruction holding it and a config
asking for the head's sums (``client.head_refit``). It checks every reply (the
whitelisted names, one row count, finite numbers of the head's sizes), adds the usable
ones up and takes a damped Newton step (``common.head_refit.refit``): the step pooled
training on the answering merchants' rows together would take (a merchant answers only
with enough rows, ``common.head_refit.least_rows``). Every other weight stays as the
rounds left it. The kept model and ``federation.json``'s ``head_refit`` carry the
result.

Every connected merchant is asked at the first step; those who answer it are the ones
asked after it (each step sums the same rows, so the damping can compare their losses),
and one of them missing later stops the refit at the best head so far. Skipped, with the
reason logged and written, with a robust strategy (Krum, FedMedian, FedTrimmedAvg: a sum
is not robust to a merchant that lies), under SecAgg+ (the merchants run Flower's legacy
ClientApp, which has no such instruction, and each merchant's sums would reach the
server unmasked) and under differential privacy (the sums would leave each merchant
without noise, outside the privacy ledger's account).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common.head_refit import HeadStatistics, head_positions, head_vector, refit, with_head
from common.protocol import (
    HEAD_REFIT_GRADIENT,
    HEAD_REFIT_HESSIAN,
    HEAD_REFIT_KEY,
    HEAD_REFIT_LOSS,
    HEAD_REFIT_METRICS,
    HEAD_REFIT_ROWS,
    HEAD_REFIT_STEPS_KEY,
)
from server.config import ServerSettings
from server.rounds import error_summary

log = logging.getLogger(__name__)

#: Strategies chosen to withstand malicious merchants: the refit's plain sum would not.
ROBUST_STRATEGIES = ("krum", "fedmedian", "fedtrimmedavg")


def refit_head(grid: Grid, settings: ServerSettings, model: Any, weights: list[np.ndarray]
               ) -> tuple[list[np.ndarray], dict[str, Any] | None]:
    """``weights`` with the head refit on the merchants' sums, and what
    ``federation.json`` says about it (None when ``federation.head-refit-steps`` is 0). A
    failure is logged, never raised: the rounds' results are already safe."""
    steps = settings.federation.head_refit_steps
    if steps <= 0:
        return weights, None
    reason = unavailable_reason(settings, model)
    if reason is not None:
        log.info("head refit: %s", reason)
        return weights, {"status": "unavailable", "reason": reason}
    started = time.perf_counter()
    asking = RefitRound(grid, model, weights, steps, settings.federation.round_timeout)
    try:
        outcome = refit(head_vector(model, weights), asking.statistics, steps)
    except Exception:  # noqa: BLE001 - the run itself is done and saved
        log.exception("head refit: failed; the kept model's head is the rounds' own")
        return weights, {"status": "failed", "reason": "see the server log"}
    summary = {"status": "ok" if outcome.losses else "no-replies", **outcome.summary(),
               "merchants": asking.answered, "failures": asking.failures,
               "seconds": time.perf_counter() - started}
    if asking.stopped:
        summary["note"] = asking.stopped
    log.info("head refit: %d steps, mean log-loss %s, head of step %d kept, %s merchants, "
             "%.1f s%s", len(outcome.losses), [round(v, 5) for v in summary["mean_loss"]],
             outcome.kept, asking.answered, summary["seconds"],
             f" ({summary['note']})" if summary["note"] else "")
    return with_head(model, weights, outcome.theta), summary


def engine_down() -> dict[str, Any]:
    """What ``federation.json`` says when the engine failed before the refit."""
    return {"status": "unavailable", "reason": "the simulation engine failed: no merchant "
                                               "could be asked"}


class RefitRound:
    """The merchants' side of :func:`common.head_refit.refit`: each call asks them for
    their sums at a head and adds up the usable replies. Every connected merchant is
    asked first; after that only those who answered (each step sums the same rows), and
    one of them missing stops the refit (``stopped`` says why)."""

    def __init__(self, grid: Grid, model: Any, weights: list[np.ndarray], steps: int,
                 timeout: float) -> None:
        self.grid, self.model, self.weights = grid, model, weights
        self.steps, self.timeout = steps, timeout
        self.size = len(head_vector(model, weights))
        # the control logit's bias: right after its kernel, the head's first weight
        self.bias = int(np.size(weights[head_positions(model)[0]]))
        self.members: list[int] = []
        self.answered: list[int] = []  # merchants summed, per step
        self.failures: list[str] = []
        self.stopped = ""

    def statistics(self, theta: np.ndarray) -> HeadStatistics | None:
        nodes = self.members or sorted(self.grid.get_node_ids())
        config = ConfigRecord({HEAD_REFIT_KEY: True, HEAD_REFIT_STEPS_KEY: self.steps})
        content = RecordDict({"arrays": ArrayRecord(with_head(self.model, self.weights, theta)),
                              "config": config})
        messages = [Message(content=content, message_type=MessageType.EVALUATE,
                            dst_node_id=n) for n in nodes]
        replies = self.grid.send_and_receive(messages, timeout=self.timeout)
        total, answered, failed = summed_replies(replies, self.size, self.bias)
        self.failures.extend(failed)
        self.answered.append(len(answered))
        if not self.members:
            self.members = sorted(answered)
            if not answered:
                self.stopped = "no merchant answered the first step (failures say why)"
        elif sorted(answered) != self.members:
            # Other rows: their loss cannot be compared with the steps before.
            self.stopped = (f"{len(self.members) - len(answered)} of the "
                            f"{len(self.members)} merchants of the first step did not "
                            "answer a later one")
            return None
        return total if answered else None


def unavailable_reason(settings: ServerSettings, model: Any) -> str | None:
    """Why the merchants may not be asked for the head's sums, or None when they may."""
    if not head_positions(model):
        return ("the model has no contrast head with response shifts "
                "(model.activation-head = contrast, model.activation-shift = response)")
    if settings.federation.strategy in ROBUST_STRATEGIES:
        return (f"not run with federation.strategy = {settings.federation.strategy}: the "
                "refit adds the merchants' sums, and a sum is not robust to a merchant "
                "that lies")
    if settings.federation.secure_aggregation:
        return ("not run under SecAgg+: the merchants run Flower's legacy ClientApp and a "
                "merchant's sums would reach the server unmasked")
    dp = settings.privacy
    if dp.enabled or dp.customer_level:
        setting = "unit = customer" if dp.customer_level else f"mode = {dp.mode}"
        return (f"not run under differential privacy (privacy.{setting}): a merchant's sums "
                "would leave it without noise and outside the privacy ledger's account")
    return None


def summed_replies(replies: Iterable[Message], size: int, bias: int | None = None
                   ) -> tuple[HeadStatistics, list[int], list[str]]:
    """The sum of the usable replies, the nodes that sent them, and why the others were
    not used."""
    total = HeadStatistics.zero(size)
    answered: list[int] = []
    failures: list[str] = []
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            failures.append(f"node {node}: {error_summary(msg.error.reason)}")
            continue
        stats, reason = check_head_refit_reply(msg, size, bias)
        if stats is None:
            failures.append(f"node {node}: rejected: {reason}")
            log.warning("head refit: reply of node %s rejected: %s", node, reason)
            continue
        total = total + stats
        answered.append(node)
    return total, answered, failures


def check_head_refit_reply(msg: Message, size: int, bias: int | None = None
                           ) -> tuple[HeadStatistics | None, str]:
    """A reply's sums, or None and why they cannot be used: one MetricRecord, no
    arrays, exactly the whitelisted names, a positive row count, a finite loss, a
    gradient of ``size`` and a symmetric positive semi-definite ``size`` x ``size``
    Hessian, all finite; with ``bias`` (the control logit's bias's position) its
    gradient and curvature within what ``rows`` rows can give."""
    content = msg.content
    if len(content.array_records) or len(content.metric_records) != 1:
        return None, (f"{len(content.array_records)} ArrayRecords and "
                      f"{len(content.metric_records)} MetricRecords, expected 0 and 1")
    record = dict(next(iter(content.metric_records.values())))
    if set(record) != set(HEAD_REFIT_METRICS):
        return None, (f"metric names {sorted(record)}, expected "
                      f"{sorted(HEAD_REFIT_METRICS)}")
    rows, loss = record[HEAD_REFIT_ROWS], record[HEAD_REFIT_LOSS]
    if not isinstance(rows, int) or isinstance(rows, bool) or rows <= 0:
        return None, f"'{HEAD_REFIT_ROWS}' is {rows!r}, expected a positive count"
    if not isinstance(loss, (int, float)) or not math.isfinite(loss) or loss < 0:
        return None, f"'{HEAD_REFIT_LOSS}' is {loss!r}, expected a finite number >= 0"
    arrays = {}
    for key, length in ((HEAD_REFIT_GRADIENT, size), (HEAD_REFIT_HESSIAN, size * size)):
        value = record[key]
        if not isinstance(value, list) or len(value) != length:
            return None, f"'{key}' holds {_length(value)} numbers, expected {length}"
        array = np.asarray(value, dtype=float)
        if not np.all(np.isfinite(array)):
            return None, f"'{key}' holds numbers that are not finite"
        arrays[key] = array
    hessian = arrays[HEAD_REFIT_HESSIAN].reshape(size, size)
    if not np.allclose(hessian, hessian.T, rtol=1e-6, atol=1e-9):
        return None, f"'{HEAD_REFIT_HESSIAN}' is not symmetric"
    # A sum of p (1 - p) x x^T is positive semi-definite; anything else would turn the
    # summed step away from the minimum.
    if np.linalg.eigvalsh(hessian).min() < -1e-6 * max(1.0, float(np.abs(hessian).max())):
        return None, f"'{HEAD_REFIT_HESSIAN}' is not positive semi-definite"
    # The control logit's bias is the one column every row holds as 1: its gradient is
    # the sum of p - y (at most rows in size), its curvature the sum of p (1 - p).
    if bias is not None and (abs(arrays[HEAD_REFIT_GRADIENT][bias]) > rows * (1 + 1e-6)
                             or not 0 <= hessian[bias, bias] <= rows / 4 * (1 + 1e-6)):
        return None, "the control bias's sums do not fit the row count"
    return HeadStatistics(rows, float(loss), arrays[HEAD_REFIT_GRADIENT], hessian), ""


def _length(value: Any) -> str:
    return str(len(value)) if isinstance(value, list) else f"no list ({type(value).__name__})"
