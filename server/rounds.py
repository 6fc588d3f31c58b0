"""The per-round bookkeeping of a federation, one piece for both ways of running rounds.

The guarded Message API strategies (``server.strategy``) and the SecAgg+ workflow
(``server.secagg``) each own a :class:`RoundBook`. It maps Flower's server round to the
global round (a resumed run keeps counting), keeps one :class:`RoundStats` per global
round (sampled / replied / failed / rejected / timed-out nodes, bytes each way, failure
reasons, train and client-side evaluation metrics), counts the rounds that left the
global model unchanged, and says whether a round may start at all (the simulation
engine failed, or the rounds were stopped). ``server.recorder.RoundRecorder`` reads a
round's stats for its line in ``metrics.jsonl`` and the privacy ledger.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from common.protocol import PRE_TRAINING_LOSSES

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RoundStats:
    """What happened in one round, for ``metrics.jsonl``."""

    sampled: int = 0
    replied: int = 0
    failed: int = 0
    rejected: int = 0
    timed_out: int = 0  # sampled, no reply within the round timeout (also in ``failed``)
    bytes_down: int = 0
    bytes_up: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)
    client_eval: dict[str, float] = dataclasses.field(default_factory=dict)
    train: dict[str, float] = dataclasses.field(default_factory=dict)
    #: The previous round's global model scored by this round's train replies before
    #: they trained (:func:`federated_scores`); empty unless the server asked for it.
    federated: dict[str, float] = dataclasses.field(default_factory=dict)
    #: The last round only: its own global model scored by evaluate replies.
    federated_final: dict[str, float] = dataclasses.field(default_factory=dict)
    awaited: list[int] = dataclasses.field(default_factory=list)  # nodes sent a train message
    #: SecAgg+ only: wall time of each protocol stage's send and receive.
    stage_seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    def line_fields(self) -> dict[str, Any]:
        """The round's fields of its ``metrics.jsonl`` line (at most 20 failure reasons)."""
        return {"sampled": self.sampled, "replied": self.replied, "failed": self.failed,
                "rejected": self.rejected, "timed_out": self.timed_out,
                "bytes_down": self.bytes_down, "bytes_up": self.bytes_up,
                "train": self.train, "client_eval": self.client_eval,
                "federated": self.federated,
                **({"federated_final": self.federated_final} if self.federated_final else {}),
                "failures": self.failures[:20]}


class EngineStop(threading.Event):
    """The event the driver of Flower's Simulation Engine sets when the engine failed
    (:meth:`set`) or the user stopped the run (:meth:`interrupt`: Ctrl-C, SIGTERM). Once
    set, no round starts and a pending wait for replies ends; after an interrupt the
    ServerApp leaves the run folder as its last checkpoint left it (for ``--resume``)."""

    interrupted = False

    def interrupt(self) -> None:
        self.interrupted = True
        self.set()


class RoundBook:
    """The rounds of one run: their stats, the empty ones, and whether one may start.

    Parameters
    ----------
    engine_failed : set by whoever runs Flower's Simulation Engine when it failed; once
        set, no round starts.
    """

    def __init__(self, engine_failed: threading.Event | None = None) -> None:
        #: Rounds done before this run started (a resumed run): server round 1 is
        #: global round ``offset + 1``.
        self.offset = 0
        self.stats: dict[int, RoundStats] = {}
        #: Rounds that left the global model unchanged (no usable reply).
        self.empty_rounds = 0
        self.engine_failed = engine_failed
        #: Why the rounds were stopped (an exception raised after the last round ran);
        #: no round starts once it is set.
        self.stopped_by: BaseException | None = None

    def global_round(self, server_round: int) -> int:
        """The global round of Flower's ``server_round`` (which restarts at 1 on resume)."""
        return server_round + self.offset

    def round(self, g: int) -> RoundStats:
        """The stats of global round ``g``, opened on first use."""
        return self.stats.setdefault(g, RoundStats())

    def get(self, g: int) -> RoundStats | None:
        """The stats of global round ``g``, None when nothing was recorded for it."""
        return self.stats.get(g)

    @property
    def interrupted(self) -> bool:
        """Whether the user stopped the run (:meth:`EngineStop.interrupt`)."""
        return isinstance(self.engine_failed, EngineStop) and self.engine_failed.interrupted

    @property
    def engine_down(self) -> bool:
        """Whether the simulation engine was reported failed."""
        return self.engine_failed is not None and self.engine_failed.is_set()

    @property
    def halted(self) -> bool:
        """Whether no round may start any more: the rounds were stopped, or the
        simulation engine failed. Unlike :meth:`may_start`, logs and records nothing."""
        return self.stopped_by is not None or self.engine_down

    def may_start(self, g: int) -> bool:
        """False when round ``g`` must not start: the rounds were stopped, or the
        simulation engine failed (logged; the round is recorded with nothing sampled)."""
        if self.stopped_by is not None:
            return False
        if self.engine_down:
            log.error("round %d: not started, the simulation engine failed", g)
            self.round(g)
            return False
        return True

    def sampled(self, g: int, nodes: Iterable[int], bytes_each: int = 0) -> RoundStats:
        """Record the nodes sent round ``g``'s train instruction and the bytes sent to each."""
        stats = self.round(g)
        stats.awaited = sorted(nodes)
        stats.sampled = len(stats.awaited)
        stats.bytes_down += bytes_each * stats.sampled
        return stats

    def failed(self, g: int, node: int, reason: str) -> None:
        """Count a node whose reply is an error (``reason`` already summarised)."""
        stats = self.round(g)
        stats.failed += 1
        stats.failures.append(f"node {node}: {reason}")
        log.warning("round %d: node %s failed: %s", g, node, reason)

    def rejected(self, g: int, node: int, reason: str) -> None:
        """Count a reply left out of the aggregate, and say why."""
        stats = self.round(g)
        stats.rejected += 1
        stats.failures.append(f"node {node}: rejected: {reason}")
        log.warning("round %d: reply of node %s rejected before aggregation: %s",
                    g, node, reason)

    def missing(self, g: int, answered: set[int], limit: str) -> None:
        """Count the awaited nodes of round ``g`` that sent nothing within ``limit``: the
        round stopped waiting for them, and a late reply is never used."""
        stats = self.round(g)
        for node in stats.awaited:
            if node in answered:
                continue
            stats.failed += 1
            stats.timed_out += 1
            stats.failures.append(f"node {node}: no reply within round-timeout {limit}")
            log.warning("round %d: node %s sent no reply within round-timeout %s; the round "
                        "goes on without it and a late reply is never used", g, node, limit)

    def empty(self, g: int, why: str) -> None:
        """Count round ``g`` as one that left the global model unchanged, and log ``why``."""
        self.empty_rounds += 1
        log.warning("round %d: %s; the global model is unchanged (%d such rounds so far)",
                    g, why, self.empty_rounds)

    def train_metrics(self, g: int, metrics: Mapping[str, Any]) -> None:
        """The aggregated train metrics of round ``g`` (the numeric ones; the
        pre-training scores, which Flower weighs by training rows, are left to
        :meth:`pre_training`)."""
        self.round(g).train = {k: v for k, v in numeric(metrics).items()
                               if k not in PRE_TRAINING_KEYS}

    def pre_training(self, g: int, replies: Iterable[Mapping[str, Any]]) -> None:
        """Score the global model round ``g`` started from with its replies' metrics."""
        self.round(g).federated = federated_scores(replies)

    def final_scores(self, g: int, replies: Iterable[Mapping[str, Any]]) -> None:
        """Score round ``g``'s own global model with its evaluate replies' metrics."""
        self.round(g).federated_final = federated_scores(replies)

    def client_metrics(self, g: int, metrics: Mapping[str, Any]) -> None:
        """The aggregated client-side evaluation metrics of round ``g`` (the numeric ones;
        the validation scores are left to :meth:`final_scores`)."""
        self.round(g).client_eval = {k: v for k, v in numeric(metrics).items()
                                     if k not in PRE_TRAINING_KEYS}


#: The reply metrics scoring the incoming global model (``common.protocol``, which
#: ``client.work`` writes them by), left out of the train and evaluate means.
PRE_TRAINING_KEYS = frozenset(k for pair in PRE_TRAINING_LOSSES.values() for k in pair)


def federated_scores(replies: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """The incoming global model's losses over all replying merchants' rows.

    Each loss is the mean of the replies' losses weighted by their row counts
    (``val_examples`` for the validation loss, ``test_examples`` for the test losses),
    so it is the loss on the pooled rows; a reply without rows (or with a non-finite
    or negative loss) weighs nothing. Returns ``val_loss``, ``eval_loss`` and
    ``decay_log_loss`` where some rows back them, with the row counts
    ``val_examples`` / ``test_examples`` and ``merchants``, the replies behind the
    validation loss (with a fraction of the merchants sampled each round, rounds are
    scored on different merchants); empty when no reply carries the scores.
    """
    totals: dict[str, float] = {}
    rows: dict[str, float] = {}
    backing: dict[str, int] = {}
    for metrics in replies:
        for name, (loss_key, count_key) in PRE_TRAINING_LOSSES.items():
            loss, count = metrics.get(loss_key), metrics.get(count_key)
            if not isinstance(loss, (int, float)) or not isinstance(count, (int, float)):
                continue
            if not (math.isfinite(loss) and loss >= 0 and math.isfinite(count) and count > 0):
                continue
            totals[name] = totals.get(name, 0.0) + float(loss) * float(count)
            rows[name] = rows.get(name, 0.0) + float(count)
            backing[name] = backing.get(name, 0) + 1
    scores = {name: totals[name] / rows[name] for name in totals}
    if "val_loss" in rows:
        scores["val_examples"] = rows["val_loss"]
        scores["merchants"] = float(backing["val_loss"])
    if "eval_loss" in rows:
        scores["test_examples"] = rows["eval_loss"]
    return scores


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The int and float values of ``metrics``, as floats."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def error_summary(reason: str | None) -> str:
    """A one-line account of a failed reply's error reason.

    A ClientApp whose Ray actor process died (SIGKILL by the kernel's OOM killer or Ray's
    memory monitor, a crash) comes back from Flower's simulation engine as a multi-line
    ``ActorDiedError`` text; other reasons are kept as they are.
    """
    reason = reason or ""
    if "ActorDiedError" not in reason and "The actor died" not in reason:
        return reason
    pid = re.search(r"\bpid: (\d+)", reason)
    exit_type = re.search(r"Worker exit type: (\w+)", reason)
    who = f"ClientApp's Ray actor (pid {pid.group(1) if pid else '?'})"
    if exit_type and exit_type.group(1) == "NODE_OUT_OF_MEMORY":
        return f"{who} was killed by Ray's memory monitor: the node ran out of memory"
    how = f", worker exit {exit_type.group(1)}" if exit_type else ""
    return (f"{who} died{how}: killed by the OOM killer or another signal, or crashed "
            "(see the Ray log)")
