"""One method into one run folder: what ``fedecay train`` and ``fedecay simulate`` run.

Both write ``config.json``, the method's metrics and model, and track the run
(``experiment.tracking``, see :mod:`simulations.tracking`) as a comparison does; the
command line only checks arguments, shows ``progress`` and prints the table.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from common.progress import SILENT, Progress
from simulations.baselines import MethodResult, assess
from simulations.compare import final_step, track_artifacts
from simulations.experiment import prepare, write_json
from simulations.methods import TRAIN_MODES
from simulations.report import format_table
from simulations.settings import Experiment
from simulations.tracking import Tracker, final_scalars, open_tracking


@dataclasses.dataclass
class SingleRun:
    """What a ``train`` or ``simulate`` run wrote."""

    run_dir: Path
    name: str  # the method: centralised, local-only, gbdt, federated-<strategy>
    metrics: dict[str, Any]
    model: Path | None  # the model file, when the method has one

    @property
    def table(self) -> str:
        return format_table({"methods": {self.name: self.metrics}})


def train_method(exp: Experiment, run_dir: Path, mode: str, *,
                 progress: Progress = SILENT) -> SingleRun:
    """Train one baseline for ``train.epochs``: ``config.json``, ``metrics.json`` and (for
    ``centralised``) ``model.keras`` in ``run_dir``; ``gbdt`` saves ``gbdt/model.skops``
    and its ``model.json`` (``common.bundle.save_tabular_bundle``)."""
    from simulations.baselines import run_centralised, run_gbdt, run_local

    if mode not in TRAIN_MODES:
        raise ValueError(f"--mode {mode!r}: choose from {', '.join(TRAIN_MODES)}")
    write_json(run_dir / "config.json", dict(exp.flat))
    with open_tracking(run_dir, exp.experiment.tracking, exp.resolved(),
                       experiment=exp.experiment.name) as tracker:
        data = prepare(exp, progress=progress)
        model_path = None
        if mode == "centralised":
            from common.model import save_model

            result, model = run_centralised(exp, data, progress=progress, tracker=tracker)
            model_path = run_dir / "model.keras"
            save_model(model, model_path)
        elif mode == "local":
            result = run_local(exp, data, progress=progress, tracker=tracker)
        else:
            from common.bundle import save_tabular_bundle

            result = run_gbdt(exp, data, progress=progress)
            model_path = save_tabular_bundle(result.model, data.snapshot_config, exp.policy,
                                             run_dir / result.name)
        metrics = assess(result, data, exp)
        write_json(run_dir / "metrics.json", metrics)
        _track_end(tracker, run_dir, result, metrics, run_dir / "metrics.json")
    return SingleRun(run_dir, result.name, metrics, model_path)


def simulate_federation(exp: Experiment, run_dir: Path, *, progress: Progress = SILENT,
                        resumed: bool = False) -> SingleRun:
    """Run the federation into ``run_dir`` (see README, *Outputs*) and assess its model:
    ``results.json``; ``config.json`` unless ``resumed`` (the run's own stays)."""
    from simulations.federated import run_federated

    if not resumed:
        write_json(run_dir / "config.json", dict(exp.flat))
    with open_tracking(run_dir, exp.experiment.tracking, exp.resolved(),
                       experiment=exp.experiment.name) as tracker:
        data = prepare(exp, progress=progress)
        # The rounds need only the shards and eval.npz: the driver lets go of the log.
        result = run_federated(exp, data, run_dir, progress=progress, tracker=tracker,
                               release=True)
        metrics = assess(result, data, exp)
        write_json(run_dir / "results.json", metrics)
        _track_end(tracker, run_dir, result, metrics, run_dir / "results.json",
                   run_dir / "metrics.jsonl", run_dir / "federation.json")
    return SingleRun(run_dir, result.name, metrics, run_dir / "model.keras")


def _track_end(tracker: Tracker, run_dir: Path, result: MethodResult, metrics: dict[str, Any],
               *files: Path) -> None:
    tracker.log_metrics(final_step(result), result.name, **final_scalars(metrics))
    track_artifacts(tracker, run_dir, list(files), top=result.name)
