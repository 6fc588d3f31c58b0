"""The app components ``flwr run .`` loads (see ``[tool.flwr.app.components]``).

The run config holds ``experiment.preset`` and any overrides. The ServerApp prepares
the preset's data (merchant shards, evaluation snapshots) in a folder derived from the
configuration, and writes the complete resolved config there; every ClientApp reads
that file, so server and clients agree on shards and calendar.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from client.app import make_client_app
from server.app import make_server_app

RESOLVED = "resolved-config.json"


def _experiment(run_config: Mapping[str, Any]):
    from simulations.experiment import experiment_from_flat
    from simulations.synth import load_preset

    run = dict(run_config)
    preset = str(run.get("experiment.preset") or "quick")
    flat = {**load_preset(preset), **run, "experiment.preset": preset}
    flat.setdefault("experiment.name", Path(preset).stem)
    output = Path(str(flat.get("experiment.output-dir", "runs"))).expanduser()
    if not output.is_absolute():
        # The ServerApp runs from Flower's app folder: anchor relative paths on FLWR_HOME.
        output = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")) / output
    flat["experiment.output-dir"] = str(output)
    return experiment_from_flat(flat)


def run_folder(run_config: Mapping[str, Any]) -> Path:
    """Where this configuration's ``flwr run`` output goes (one folder per config)."""
    exp = _experiment(run_config)
    key = exp.data_key()
    return exp.experiment.output_path() / f"flwr-run-{exp.experiment.name}-{key}"


def prepare_run(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """ServerApp side: build the data, write shards and the resolved config."""
    from simulations.experiment import prepare
    from simulations.federated import simulation_config

    exp = _experiment(run_config)
    run_dir = run_folder(run_config)
    data = prepare(exp)
    flat = simulation_config(exp, data, run_dir)
    (run_dir / RESOLVED).write_text(json.dumps(flat, indent=2, default=str))
    return flat


@functools.lru_cache(maxsize=4)
def _resolved(path: str) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def resolve_client(run_config: Mapping[str, Any]) -> Mapping[str, Any]:
    """ClientApp side: the config the ServerApp resolved for this run."""
    path = run_folder(run_config) / RESOLVED
    if not path.exists():
        raise FileNotFoundError(f"resolved run config not found: {path}")
    return _resolved(str(path))


server_app = make_server_app(prepare=prepare_run)
client_app = make_client_app(resolve=resolve_client)
