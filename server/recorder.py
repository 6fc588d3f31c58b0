"""What follows every round: :class:`RoundRecorder`, Flower's ``evaluate_fn`` for both
ways of running rounds (the guarded Message API strategies and the SecAgg+ workflow)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, MetricRecord

from common import jsonl
from common.progress import SILENT, Task
from common.snapshots import Snapshots
from server.checkpoint import save_checkpoint, strategy_state
from server.config import ServerSettings
from server.dp_accounting import CHECKPOINT_KEY, NO_LEDGER
from server.runner import Runner

log = logging.getLogger(__name__)

#: Centralised metrics written per round (decay on test; losses on validation).
ROUND_METRICS: tuple[str, ...] = ("decay_roc_auc", "decay_pr_auc", "decay_log_loss",
                                  "interest_mae", "interest_rmse")


@functools.lru_cache(maxsize=2)
def load_eval_data(path: str) -> tuple[Snapshots, Snapshots]:
    """Validation and test snapshots for the server's evaluation, loaded once."""
    snaps = Snapshots.load(path)
    return snaps.split_part("val"), snaps.split_part("test")


@dataclasses.dataclass
class Selection:
    """Best round so far by validation loss: the server's held-out data (simulation) or
    the train replies' federated validation loss (deployment)."""

    round: int = -1
    val_loss: float = math.inf
    weights: list[np.ndarray] | None = None
    stale: int = 0

    def offer(self, g: int, val_loss: float, weights: list[np.ndarray]) -> None:
        """Keep round ``g``'s weights when its validation loss is the best so far."""
        if val_loss < self.val_loss - 1e-6:
            self.round, self.val_loss, self.weights, self.stale = g, val_loss, weights, 0
        elif g > 0:
            self.stale += 1


class StopRounds(Exception):
    """Raised from the round hook to end Flower's ``start`` early; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RoundRecorder:
    """What follows every round, as Flower's ``evaluate_fn``: the global model evaluated on
    the held-out data (or, without any, scored by the next round's train replies), the
    model selection, the line in ``metrics.jsonl``, the privacy
    ledger, the checkpoint, progress, and the rules that stop the run early.

    Shared by the Message-API strategies and the SecAgg+ workflow (both call it with the
    round and the global weights; both keep their round stats in ``parts.rounds``).
    ``task`` advances by one per round (round 0, the initial model, by none), with the
    global decay AUC and the clients that replied; ``on_round`` gets every
    ``metrics.jsonl`` line as it is written.
    """

    def __init__(self, settings: ServerSettings, run_dir: Path, parts: Runner, model: Any,
                 *, done: int, selection: Selection, weights: list[np.ndarray],
                 task: Task | None = None,
                 on_round: Callable[[dict[str, Any]], None] | None = None) -> None:
        fed = settings.federation
        self.settings, self.parts, self.model = settings, parts, model
        self.done, self.selection = done, selection
        self.metrics_path = run_dir / "metrics.jsonl"
        self.ckpt_dir = run_dir / "checkpoints"
        self.eval_sets = load_eval_data(fed.eval_data) if fed.eval_data else None
        self.task = task if task is not None else SILENT.task("rounds")
        self.on_round = on_round
        self.latest = weights  # the global weights of the last round seen
        # The clipping norm of the round in progress (adaptive clipping moves it).
        self.clip_used = self._clipping_norm()
        self.started = self.last = time.perf_counter()

    def __call__(self, server_round: int, global_arrays: ArrayRecord) -> MetricRecord | None:
        g = server_round + self.done
        if server_round == 0 and self.done > 0:
            return None  # this round was evaluated before the restart
        weights = global_arrays.to_numpy_ndarrays()
        previous, self.latest = self.latest, weights
        if self.eval_sets is None:
            self._select_federated(g, previous)
        record = self._evaluate(g, weights)
        line = self._line(g, record)
        jsonl.append(self.metrics_path, line, default=_json_default)
        if not self.parts.rounds.interrupted:  # a round cut short is run again on resume
            self._checkpoint(g, weights)
        if self.on_round is not None:
            self.on_round(line)
        log_round(line, self.settings.federation.num_rounds)
        self.task.advance(1 if server_round > 0 else 0, **round_fields(line))
        self._check_stop(g)
        return MetricRecord({k: v for k, v in record.items() if math.isfinite(v)}) \
            if record else None

    def _evaluate(self, g: int, weights: list[np.ndarray]) -> dict[str, float]:
        """Centralised metrics of the global model, in the rounds that evaluate it."""
        from common.model import set_weights_of
        from common.training import predict, score_predictions, validation_loss

        fed = self.settings.federation
        if self.eval_sets is None or not (g % fed.eval_every == 0 or g >= fed.num_rounds):
            return {}
        val, test = self.eval_sets
        set_weights_of(self.model, weights)
        val_loss = validation_loss(self.model, val) if len(val) else float("nan")
        scores = score_predictions(predict(self.model, test), test)
        record = {k: float(scores[k]) for k in ROUND_METRICS if k in scores}
        record["val_loss"] = val_loss
        self.selection.offer(g, val_loss, weights)
        return record

    def _select_federated(self, g: int, previous: list[np.ndarray]) -> None:
        """Without held-out data (deployment): offer the global model round ``g``
        started from, ``previous``, scored by round ``g``'s train replies on the
        merchants' validation rows (their loss weighted by their rows).

        The last round's model, which no train reply scores, is offered too when that
        round's evaluate replies scored it (``GuardedMixin.configure_evaluate``). A
        round whose replies carry no validation score offers nothing.
        """
        stats = self.parts.rounds.get(g)
        if g == 0 or stats is None:
            return
        for scored, scores, weights in ((g - 1, stats.federated, previous),
                                        (g, stats.federated_final, self.latest)):
            if "val_loss" not in scores:
                continue
            self.selection.offer(scored, scores["val_loss"], weights)
            # Merchants differ between rounds when fraction-train < 1: say how many.
            log.info("round %d: federated validation loss of round %d's model %.5f over %d "
                     "rows of %d merchants (best: round %d, %.5f)", g, scored,
                     scores["val_loss"], int(scores.get("val_examples", 0)),
                     int(scores.get("merchants", 0)), self.selection.round,
                     self.selection.val_loss)

    def _line(self, g: int, record: dict[str, float]) -> dict[str, Any]:
        """Round ``g``'s ``metrics.jsonl`` line; composes the round in the privacy ledger."""
        now = time.perf_counter()
        line: dict[str, Any] = {"round": g, "centralised": record,
                                "round_seconds": now - self.last,
                                "wall_seconds": now - self.started}
        self.last = now
        stats = self.parts.rounds.get(g)
        if stats is not None:
            line.update(stats.line_fields())
        ledger = self.parts.ledger
        if ledger is not None and g > 0 and stats is not None and stats.replied > 0:
            spent = ledger.record(g, stats.sampled, stats.replied, self.clip_used)
            line["privacy"] = {"epsilon": spent["epsilon"], "delta": spent["delta"],
                               "clipping_norm": self.clip_used}
        self.clip_used = self._clipping_norm()
        return line

    def _checkpoint(self, g: int, weights: list[np.ndarray]) -> None:
        # The privacy ledger's count (customer or merchant level): a resume refuses a
        # ledger holding fewer.
        ledger = self.parts.ledger
        save_checkpoint(self.ckpt_dir, g, {
            "weights": weights, "strategy": strategy_state(self.parts.strategy),
            "selection": dataclasses.asdict(self.selection),
            "clipping_norm": self.parts.clipping_norm,
            CHECKPOINT_KEY: NO_LEDGER if ledger is None else ledger.checkpoint_fields()},
            keep=self.settings.federation.keep_checkpoints)

    def _clipping_norm(self) -> float:
        norm = self.parts.clipping_norm
        return self.settings.privacy.clipping_norm if norm is None else norm

    def _check_stop(self, g: int) -> None:
        """Raise :class:`StopRounds` when the run must end after round ``g``."""
        fed, dp, ledger = self.settings.federation, self.settings.privacy, self.parts.ledger
        if self.parts.rounds.engine_down:
            if self.parts.rounds.interrupted:
                log.warning("stopped (Ctrl-C or SIGTERM) during round %d", g)
                raise StopRounds("interrupted")
            log.error("the simulation engine failed (see above): stopping after round %d", g)
            raise StopRounds("engine-failed")
        if fed.patience_rounds and self.selection.stale >= fed.patience_rounds:
            log.info("validation loss has not improved for %d rounds: stopping after round %d",
                     self.selection.stale, g)
            raise StopRounds("patience")
        if ledger is not None and g < fed.num_rounds and ledger.next_round_exceeds():
            log.info("privacy budget: round %d would take epsilon past %g (spent %.4g at "
                     "delta %g): stopping after round %d", g + 1, dp.target_epsilon,
                     ledger.epsilon, ledger.delta, g)
            raise StopRounds("privacy-budget")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def round_fields(line: dict[str, Any]) -> dict[str, Any]:
    """What a round's progress shows: the global decay AUC and the clients that replied."""
    fields: dict[str, Any] = {}
    auc = line.get("centralised", {}).get("decay_roc_auc")
    if auc is not None:
        fields["auc"] = round(float(auc), 4)
    if line.get("sampled") is not None:
        fields["clients"] = f"{line.get('replied', 0)}/{line['sampled']}"
    return fields


def log_round(line: dict[str, Any], total: int) -> None:
    """One INFO line per round: clients replied of sampled, the global AUC, the time."""
    auc = line.get("centralised", {}).get("decay_roc_auc")
    auc_text = f", global decay AUC {auc:.4f}" if auc is not None else ""
    log.info("round %d/%d: %s/%s clients replied%s (%.1f s)", line["round"], total,
             line.get("replied", "-"), line.get("sampled", "-"), auc_text, line["round_seconds"])
