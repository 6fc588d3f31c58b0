"""The ServerApp: rounds of the configured strategy, evaluation, checkpoints, resume.

Every round the global model is evaluated on the pooled held-out data (simulation)
through ``evaluate_fn``; the validation loss selects the model that is kept, and a
round's line goes to ``metrics.jsonl``. Checkpoints hold the global weights, the
server optimizer state and the round count, so ``federation.resume`` continues a
killed run where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from common import atomic
from common.config import ModelConfig, SnapshotConfig, TrainConfig, from_flat
from common.progress import SILENT, Progress, Task
from common.snapshots import Snapshots
from server.checkpoint import (
    clear_checkpoints,
    legacy_checkpoints,
    restore_strategy_state,
    save_checkpoint,
    strategy_state,
    usable_checkpoints,
)
from server.config import DPConfig, FederationConfig
from server.privacy import PrivacyLedger, num_sampled, wrap_strategy
from server.strategy import build_strategy

log = logging.getLogger(__name__)

#: Centralised metrics written per round (decay on test; losses on validation).
ROUND_METRICS: tuple[str, ...] = ("decay_roc_auc", "decay_pr_auc", "decay_log_loss",
                                  "interest_mae", "interest_rmse")


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    federation: FederationConfig
    model: ModelConfig
    snapshots: SnapshotConfig
    train: TrainConfig
    seed: int
    privacy: DPConfig = DPConfig()


def settings_from_flat(flat: Mapping[str, Any]) -> ServerSettings:
    return ServerSettings(
        federation=from_flat(FederationConfig, flat, "federation"),
        model=from_flat(ModelConfig, flat, "model"),
        snapshots=from_flat(SnapshotConfig, flat, "snapshots"),
        train=from_flat(TrainConfig, flat, "train"),
        seed=int(flat.get("experiment.seed", 0)),
        privacy=from_flat(DPConfig, flat, "privacy"),
    )


@functools.lru_cache(maxsize=2)
def load_eval_data(path: str) -> tuple[Snapshots, Snapshots]:
    """Validation and test snapshots for the server's evaluation, loaded once."""
    snaps = Snapshots.load(path)
    return snaps.split_part("val"), snaps.split_part("test")


@dataclasses.dataclass
class _Selection:
    """Best round so far by validation loss."""

    round: int = -1
    val_loss: float = math.inf
    weights: list[np.ndarray] | None = None
    stale: int = 0

    def offer(self, g: int, val_loss: float, weights: list[np.ndarray]) -> None:
        if val_loss < self.val_loss - 1e-6:
            self.round, self.val_loss, self.weights, self.stale = g, val_loss, weights, 0
        elif g > 0:
            self.stale += 1


class StopRounds(Exception):
    """Raised from the round hook to end Flower's ``start`` early; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass
class _Runner:
    """The strategy that keeps the round stats and the one that runs the rounds (a DP
    wrapper around it, or the same object), with the privacy ledger if any."""

    strategy: Any
    runner: Any
    ledger: PrivacyLedger | None

    @property
    def clipping_norm(self) -> float | None:
        value = getattr(self.runner, "clipping_norm", None)
        return None if value is None else float(value)


def _build_runner(settings: ServerSettings, grid: Grid, run_dir: Path,
                  engine_failed: threading.Event | None = None) -> _Runner:
    fed, dp = settings.federation, settings.privacy
    population = max(fed.min_available_nodes, len(list(grid.get_node_ids())))
    if fed.secure_aggregation:  # SecAgg+ runs in Flower's legacy workflow API
        from server.secagg import build_secagg_strategy

        strategy = runner = build_secagg_strategy(fed, dp, settings.seed, population)
    else:
        strategy = build_strategy(fed, settings.seed, engine_failed=engine_failed)
        runner = wrap_strategy(strategy, dp, fed, population)
    ledger = PrivacyLedger(dp, population, num_sampled(fed, population),
                           run_dir / "privacy.jsonl") if dp.enabled else None
    return _Runner(strategy, runner, ledger)


class RoundRecorder:
    """What follows every round, as Flower's ``evaluate_fn``: the global model evaluated on
    the held-out data, the model selection, the line in ``metrics.jsonl``, the privacy
    ledger, the checkpoint, progress, and the rules that stop the run early.

    Shared by the Message-API strategies and the SecAgg+ workflow (both call it with the
    round and the global weights). ``task`` advances by one per round (round 0, the
    initial model, by none), with the global decay AUC and the clients that replied;
    ``on_round`` gets every ``metrics.jsonl`` line as it is written.
    """

    def __init__(self, settings: ServerSettings, run_dir: Path, parts: _Runner, model: Any,
                 *, done: int, selection: _Selection, weights: list[np.ndarray],
                 task: Task | None = None,
                 on_round: Callable[[dict[str, Any]], None] | None = None,
                 engine_failed: threading.Event | None = None) -> None:
        fed = settings.federation
        self.settings, self.parts, self.model = settings, parts, model
        self.done, self.selection = done, selection
        self.metrics_path = run_dir / "metrics.jsonl"
        self.ckpt_dir = run_dir / "checkpoints"
        self.eval_sets = load_eval_data(fed.eval_data) if fed.eval_data else None
        self.task = task if task is not None else SILENT.task("rounds")
        self.on_round = on_round
        self.engine_failed = engine_failed
        self.latest = weights  # the global weights of the last round seen
        # The clipping norm of the round in progress (adaptive clipping moves it).
        self.clip_used = self._clipping_norm()
        self.started = self.last = time.perf_counter()

    def __call__(self, server_round: int, global_arrays: ArrayRecord) -> MetricRecord | None:
        g = server_round + self.done
        if server_round == 0 and self.done > 0:
            return None  # this round was evaluated before the restart
        weights = global_arrays.to_numpy_ndarrays()
        self.latest = weights
        record = self._evaluate(g, weights)
        line = self._line(g, record)
        _append_jsonl(self.metrics_path, line)
        save_checkpoint(self.ckpt_dir, g, {
            "weights": weights, "strategy": strategy_state(self.parts.strategy),
            "selection": dataclasses.asdict(self.selection),
            "clipping_norm": self.parts.clipping_norm},
            keep=self.settings.federation.keep_checkpoints)
        if self.on_round is not None:
            self.on_round(line)
        _log_round(line, self.settings.federation.num_rounds)
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

    def _line(self, g: int, record: dict[str, float]) -> dict[str, Any]:
        now = time.perf_counter()
        line: dict[str, Any] = {"round": g, "centralised": record,
                                "round_seconds": now - self.last,
                                "wall_seconds": now - self.started}
        self.last = now
        stats = self.parts.strategy.stats.get(g)
        if stats is not None:
            line.update({"sampled": stats.sampled, "replied": stats.replied,
                         "failed": stats.failed, "rejected": stats.rejected,
                         "timed_out": stats.timed_out,
                         "bytes_down": stats.bytes_down, "bytes_up": stats.bytes_up,
                         "train": stats.train, "client_eval": stats.client_eval,
                         "failures": stats.failures[:20]})
        ledger = self.parts.ledger
        if ledger is not None and g > 0 and stats is not None and stats.replied > 0:
            spent = ledger.record(g, stats.sampled, stats.replied, self.clip_used)
            line["privacy"] = {"epsilon": spent["epsilon"], "delta": spent["delta"],
                               "clipping_norm": self.clip_used}
        self.clip_used = self._clipping_norm()
        return line

    def _clipping_norm(self) -> float:
        norm = self.parts.clipping_norm
        return self.settings.privacy.clipping_norm if norm is None else norm

    def _check_stop(self, g: int) -> None:
        fed, dp, ledger = self.settings.federation, self.settings.privacy, self.parts.ledger
        if self.engine_failed is not None and self.engine_failed.is_set():
            log.error("the simulation engine failed (see above): stopping after round %d", g)
            raise StopRounds("engine-failed")
        if fed.patience_rounds and self.selection.stale >= fed.patience_rounds:
            log.info("validation loss has not improved for %d rounds: stopping after round %d",
                     self.selection.stale, g)
            raise StopRounds("patience")
        if ledger is not None and g < fed.num_rounds and ledger.next_round_exceeds():
            log.info("privacy budget: round %d would take epsilon past %g (spent %.4g at "
                     "delta %g): stopping after round %d", g + 1, dp.target_epsilon,
                     ledger.epsilon, dp.target_delta, g)
            raise StopRounds("privacy-budget")


def _start_state(settings: ServerSettings, run_dir: Path, parts: _Runner,
                 initial: list[np.ndarray]) -> tuple[int, list[np.ndarray], _Selection]:
    """Rounds done, the weights to start from and the selection so far: from the newest
    intact checkpoint on resume, else a fresh start that replaces an earlier run's
    outputs in the same folder (``flwr run`` keys the folder by the configuration)."""
    metrics_path = run_dir / "metrics.jsonl"
    state = find_resume_state(run_dir) if settings.federation.resume else None
    if state is not None:
        done = int(state["round"])
        restore_strategy_state(parts.strategy, state["strategy"])
        _keep_rounds_upto(metrics_path, done)
        if parts.ledger is not None:
            parts.ledger.replay(done)
        if state.get("clipping_norm") is not None and hasattr(parts.runner, "clipping_norm"):
            parts.runner.clipping_norm = float(state["clipping_norm"])  # adaptive clipping
        return done, [np.asarray(a) for a in state["weights"]], _Selection(**state["selection"])
    stale = clear_checkpoints(run_dir / "checkpoints")
    if stale or metrics_path.exists():
        log.info("%s: replacing the outputs of an earlier run (%d checkpoints)", run_dir, stale)
    metrics_path.unlink(missing_ok=True)
    if parts.ledger is not None and parts.ledger.path is not None:
        parts.ledger.path.unlink(missing_ok=True)
    return 0, initial, _Selection()


def run_federation(grid: Grid, settings: ServerSettings, progress: Progress = SILENT,
                   engine_failed: threading.Event | None = None, *,
                   on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the rounds; write checkpoints, ``metrics.jsonl`` and ``model.keras``.

    ``progress`` shows the rounds done of ``federation.num-rounds``; ``on_round`` gets
    each round's ``metrics.jsonl`` line. Once ``engine_failed`` is set no round starts
    and the rounds stop.
    """
    from common.model import build_model, weights_of

    fed = settings.federation
    if not fed.run_dir:
        raise ValueError("config key 'federation.run-dir' must name the run folder")
    run_dir = Path(fed.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(settings.model, settings.snapshots, seed=settings.seed)
    # Flower's in-memory grid (simulation) looks for replies every 0.1 s, a third of a
    # round of ten small merchants here.
    from server.flower_seam import shorten_reply_polling

    shorten_reply_polling(grid, 0.01)
    parts = _build_runner(settings, grid, run_dir, engine_failed)
    done, weights, selection = _start_state(settings, run_dir, parts, weights_of(model))
    parts.strategy.round_offset = done
    stop_reason = None
    final = weights
    with progress.task("federated rounds", total=fed.num_rounds, unit="rounds") as task:
        if done:
            task.advance(done, resumed=True)
        recorder = RoundRecorder(settings, run_dir, parts, model, done=done,
                                 selection=selection, weights=weights, task=task,
                                 on_round=on_round, engine_failed=engine_failed)
        if fed.num_rounds > done:
            try:
                result = parts.runner.start(
                    grid=grid, initial_arrays=ArrayRecord(weights),
                    num_rounds=fed.num_rounds - done, timeout=fed.round_timeout,
                    train_config=ConfigRecord({"local-epochs": fed.local_epochs}),
                    evaluate_fn=recorder)
                if result.arrays is not None:
                    final = result.arrays.to_numpy_ndarrays()
            except StopRounds as stop:
                stop_reason = stop.reason
                final = recorder.latest
    summary = _finish(settings, run_dir, model, parts, selection, final, done=done,
                      stop_reason=stop_reason, seconds=time.perf_counter() - recorder.started)
    log.info("federation finished: %s", summary)
    return summary


def _finish(settings: ServerSettings, run_dir: Path, model: Any, parts: _Runner,
            selection: _Selection, final: list[np.ndarray], *, done: int,
            stop_reason: str | None, seconds: float) -> dict[str, Any]:
    """Keep the selected round's model (``model.keras`` + ``model.json``), the last
    weights and ``federation.json``."""
    from common.bundle import write_model_settings
    from common.model import save_model, set_weights_of

    fed, dp = settings.federation, settings.privacy
    set_weights_of(model, selection.weights if selection.weights is not None else final)
    save_model(model, run_dir / "model.keras")
    # The scorer and the monitor read the snapshot settings from model.json beside it.
    write_model_settings(run_dir / "model.keras", settings.snapshots, None)
    np.savez(run_dir / "final_weights.npz", *final)
    summary: dict[str, Any] = {
        "rounds": fed.num_rounds, "resumed_from": done,
        "stopped_early": stop_reason is not None,
        "selected_round": selection.round, "selected_val_loss": selection.val_loss,
        "empty_rounds": parts.strategy.empty_rounds, "seconds": seconds,
        "strategy": fed.strategy, "stop_reason": stop_reason,
    }
    if fed.secure_aggregation:
        summary["secure_aggregation"] = parts.strategy.describe()
    if parts.ledger is not None:
        summary["privacy"] = {"mode": dp.mode, "epsilon": parts.ledger.epsilon,
                              "delta": dp.target_delta, "target_epsilon": dp.target_epsilon,
                              "noise_multiplier": dp.noise_multiplier}
    (run_dir / "federation.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


class ResumeError(ValueError):
    """A run that cannot be resumed without losing what it already wrote."""


def find_resume_state(run_dir: Path, *, report: bool = True) -> dict[str, Any] | None:
    """The state of the newest intact checkpoint in ``run_dir/checkpoints``.

    Damaged checkpoints are passed over, newest first, each with a warning that names
    it. None when the folder holds no outputs of an earlier run at all (the run then
    starts at round 1); :class:`ResumeError` when it does but no checkpoint is usable,
    so nothing that run wrote is deleted. ``report=False`` checks without logging (a
    caller that checks before the run starts, which then reports once).
    """
    say = log.warning if report else log.debug
    ckpt_dir = run_dir / "checkpoints"
    problems = []
    for path, state, reason in usable_checkpoints(ckpt_dir):
        if state is None:
            say("checkpoint %s is unusable (%s): trying an older one", path, reason)
            problems.append(f"{path.name}: {reason}")
            continue
        if problems:
            say("resuming from %s, the newest intact checkpoint (round %d)", path.name,
                state["round"])
        log.info("resuming from %s: %d rounds done", path.name, state["round"])
        return state
    problems += [f"{p.name}: old pickle format, never loaded" for p in
                 legacy_checkpoints(ckpt_dir)]
    outputs = [p.name for p in (run_dir / "metrics.jsonl", run_dir / "model.keras",
                                run_dir / "federation.json") if p.exists()]
    if problems or outputs:
        found = "; ".join(problems) or "no checkpoint"
        raise ResumeError(
            f"cannot resume {run_dir}: no usable checkpoint in {ckpt_dir} ({found}), but "
            f"the folder holds an earlier run's outputs ({', '.join(outputs) or 'checkpoints'})"
            ": nothing was deleted; start a new run in another folder")
    log.info("resume asked but %s holds no earlier run: starting at round 1", run_dir)
    return None


def _keep_rounds_upto(path: Path, done: int) -> None:
    """Drop the lines of rounds after ``done`` (written before a checkpoint that was lost)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [t for t in lines if t.endswith("\n") and _round_of(t) <= done]
    if len(kept) != len(lines):
        log.warning("%s: dropping %d lines of rounds after %d (redone from the checkpoint)",
                    path, len(lines) - len(kept), done)
        atomic.write_text(path, "".join(kept))


def _round_of(line: str) -> float:
    """A metrics line's round; a line cut by a kill counts as after every round."""
    try:
        return float(json.loads(line)["round"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def _append_jsonl(path: Path, line: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(line, default=_json_default) + "\n")


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


def _log_round(line: dict[str, Any], total: int) -> None:
    auc = line.get("centralised", {}).get("decay_roc_auc")
    auc_text = f", global decay AUC {auc:.4f}" if auc is not None else ""
    log.info("round %d/%d: %s/%s clients replied%s (%.1f s)", line["round"], total,
             line.get("replied", "-"), line.get("sampled", "-"), auc_text, line["round_seconds"])


def make_server_app(flat: Mapping[str, Any] | None = None,
                    prepare: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
                    progress: Progress = SILENT,
                    engine_failed: threading.Event | None = None, *,
                    on_round: Callable[[dict[str, Any]], None] | None = None) -> ServerApp:
    """A ServerApp with settings from ``flat`` or, if None, the run config.

    ``progress`` and ``on_round``: see :func:`run_federation`.

    ``prepare`` may complete the run config before the rounds start (the simulation
    layer uses it to write merchant shards and evaluation data). ``engine_failed`` is
    the event the driver of Flower's Simulation Engine sets when the engine failed (Ray
    did not start, say): ``run_simulation`` raises at once, but the ServerApp thread it
    started would go on sending rounds no client can answer, each ending only at the
    round timeout. Once it is set no round starts and the ServerApp stops.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = dict(flat if flat is not None else context.run_config)
        if prepare is not None:
            config = dict(prepare(config))
        run_federation(grid, settings_from_flat(config), progress=progress,
                       engine_failed=engine_failed, on_round=on_round)

    return app
app = make_server_app()
