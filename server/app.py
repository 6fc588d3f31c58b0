"""The ServerApp: rounds of the configured strategy, evaluation, checkpoints, resume.

:func:`run_federation` wires the pieces: the strategy (``server.runner``), where the run
starts (``server.resume``), what follows every round (``server.recorder``: the global
model evaluated on the pooled held-out data (simulation), the model selection by
validation loss, a line in ``metrics.jsonl``, the checkpoint that lets
``federation.resume`` continue a killed run), and the outputs kept at the end.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.progress import SILENT, Progress
from server.attribution import explain_kept_model
from server.config import FederationConfig, ServerSettings, settings_from_flat
from server.dp_accounting import strict_json
from server.head_refit import engine_down, refit_head
from server.pacing import PacedGrid
from server.recorder import RoundRecorder, Selection, StopRounds
from server.resume import start_state
from server.runner import Runner, build_runner

log = logging.getLogger(__name__)

#: ``federation.json``'s ``selection`` under customer-level DP when no round is selected.
NO_SELECTION = ("no round is selected under customer-level DP without held-out data on "
                "the server: the merchants' losses do not leave them (they would be "
                "outside epsilon), so the last round's model is kept")


def run_federation(grid: Grid, settings: ServerSettings, progress: Progress = SILENT,
                   engine_failed: threading.Event | None = None, *,
                   on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the rounds; write checkpoints, ``metrics.jsonl`` and ``model.keras``.

    Parameters
    ----------
    grid : the Grid the ServerApp was given.
    settings : the run's settings (``federation.run-dir`` names the run folder).
    progress : shows the rounds done of ``federation.num-rounds``.
    engine_failed : once set, no round starts and the rounds stop.
    on_round : gets each round's ``metrics.jsonl`` line.

    Returns
    -------
    The summary written to ``federation.json`` (``{"stop_reason": "interrupted"}`` when
    the user stopped the run: nothing is written then).
    """
    from common.model import build_model, response_shift_weights, weights_of

    fed = settings.federation
    run_dir = _run_folder(fed)
    model = build_model(settings.model, settings.snapshots, seed=settings.seed)
    grid = PacedGrid(grid, stop=engine_failed)  # type: ignore[assignment]  # by delegation
    population = max(fed.min_available_nodes, len(list(grid.get_node_ids())))
    parts = build_runner(settings, population, run_dir, engine_failed,
                         shifts=response_shift_weights(model))
    done, weights, selection = start_state(run_dir, fed.resume, parts, weights_of(model))
    parts.rounds.offset = done
    with progress.task("federated rounds", total=fed.num_rounds, unit="rounds") as task:
        if done:
            task.advance(done, resumed=True)
        recorder = RoundRecorder(settings, run_dir, parts, model, done=done,
                                 selection=selection, weights=weights, task=task,
                                 on_round=on_round)
        final, stop_reason = _run_rounds(grid, fed, parts, recorder, weights)
    if parts.rounds.interrupted:
        return _interrupted(parts, done)
    kept, head_refit = _kept_weights(settings, model, selection, final), None
    if parts.rounds.engine_down:
        head_refit = engine_down() if fed.head_refit_steps > 0 else None
    else:
        kept, head_refit = refit_head(grid, settings, model, kept)
        explain_kept_model(grid, settings, selection, kept, run_dir,
                           last_round=max(parts.rounds.stats, default=done))
    if parts.rounds.interrupted:  # stopped during the refit or the attributions
        return _interrupted(parts, done)
    summary = _finish(settings, run_dir, model, parts, selection, final, kept, done=done,
                      stop_reason=stop_reason, seconds=time.perf_counter() - recorder.started,
                      head_refit=head_refit)
    log.info("federation finished: %s", summary)
    return summary


def _interrupted(parts: Runner, done: int) -> dict[str, Any]:
    """The ServerApp's end when the user stopped the run: nothing finished or kept."""
    log.info("federation stopped by the user during round %d; the run folder is as its "
             "last checkpoint left it (resume with --resume)",
             max(parts.rounds.stats, default=done))
    return {"stop_reason": "interrupted"}


def _run_folder(fed: FederationConfig) -> Path:
    """``federation.run-dir``, absolute, made if missing."""
    if not fed.run_dir:
        raise ValueError("config key 'federation.run-dir' must name the run folder")
    run_dir = Path(fed.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _run_rounds(grid: Grid, fed: FederationConfig, parts: Runner, recorder: RoundRecorder,
                weights: list[np.ndarray]) -> tuple[list[np.ndarray], str | None]:
    """The rounds left, from ``weights``: the last global weights, and why the rounds
    stopped early (None when they all ran)."""
    if fed.num_rounds <= recorder.done:
        return weights, None
    try:
        result = parts.runner.start(
            grid=grid, initial_arrays=ArrayRecord(weights),
            num_rounds=fed.num_rounds - recorder.done, timeout=fed.round_timeout,
            train_config=ConfigRecord({"local-epochs": fed.local_epochs}),
            evaluate_fn=recorder)
    except StopRounds as stop:
        return recorder.latest, stop.reason
    if result.arrays is None:
        return weights, None
    return result.arrays.to_numpy_ndarrays(), None


def _kept_weights(settings: ServerSettings, model: Any, selection: Selection,
                  final: list[np.ndarray]) -> list[np.ndarray]:
    """The selected round's weights (with ``train.shift-patience`` its response shifts
    from the last round), else the last ones."""
    from common.model import with_shifts_of

    if selection.weights is None:
        return final
    # train.shift-patience: the response shifts of the last round, as fit keeps its
    # last epoch's (the selecting loss, mostly decay's, cannot tell when they are done).
    return (with_shifts_of(model, selection.weights, final)
            if settings.train.shift_patience > 0 else selection.weights)


def _finish(settings: ServerSettings, run_dir: Path, model: Any, parts: Runner,
            selection: Selection, final: list[np.ndarray], kept: list[np.ndarray], *,
            done: int, stop_reason: str | None, seconds: float,
            head_refit: dict[str, Any] | None = None) -> dict[str, Any]:
    """Keep ``kept`` (``model.keras`` + ``model.json``), the last weights and
    ``federation.json``; returns the summary written there."""
    from common.bundle import write_model_settings
    from common.model import save_model, set_weights_of

    set_weights_of(model, kept)
    save_model(model, run_dir / "model.keras")
    # The scorer and the monitor read the snapshot and policy settings from model.json.
    # A simulation's policy is the one its comparison judged the model on; a
    # deployment's run config takes the preset's (quick judges every customer, threshold
    # 0), which a merchant's monitor must not inherit: there the defaults apply.
    policy = settings.policy if settings.federation.mode == "simulation" else None
    write_model_settings(run_dir / "model.keras", settings.snapshots, policy)
    np.savez(run_dir / "final_weights.npz", *final)
    summary = _summary(settings, parts, selection, done=done, stop_reason=stop_reason,
                       seconds=seconds)
    if head_refit is not None:
        summary["head_refit"] = head_refit
    (run_dir / "federation.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _summary(settings: ServerSettings, parts: Runner, selection: Selection, *, done: int,
             stop_reason: str | None, seconds: float) -> dict[str, Any]:
    """What ``federation.json`` says about the run."""
    fed, dp = settings.federation, settings.privacy
    summary: dict[str, Any] = {
        "rounds": fed.num_rounds, "resumed_from": done,
        "stopped_early": stop_reason is not None,
        "selected_round": selection.round, "selected_val_loss": selection.val_loss,
        "empty_rounds": parts.rounds.empty_rounds, "seconds": seconds,
        "strategy": fed.strategy, "stop_reason": stop_reason,
    }
    if dp.customer_level and selection.round < 0:  # deployment: nothing to select by
        summary.update(selected_round=None, selected_val_loss=None, selection=NO_SELECTION)
    if fed.secure_aggregation:
        summary["secure_aggregation"] = parts.strategy.describe()
    if parts.ledger is not None:
        # Strict JSON: δ is NaN while the customers' count is unknown, ε_PLD may be inf.
        summary["privacy"] = strict_json({
            "mode": dp.mode, "epsilon": parts.ledger.epsilon, "delta": parts.ledger.delta,
            "target_epsilon": dp.target_epsilon, "noise_multiplier": dp.noise_multiplier,
            **parts.ledger.summary_fields()})
    return summary


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
