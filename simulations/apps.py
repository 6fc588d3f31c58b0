"""The app components ``flwr run .`` loads (see ``[tool.flwr.app.components]``).

The run config holds ``experiment.preset`` and any overrides; ``federation.mode``
chooses between two ways of running.

``simulation`` (default): the ServerApp prepares the preset's data (merchant shards,
evaluation snapshots) in a folder derived from the configuration, and writes the
complete resolved config there; every ClientApp reads that file, so server and clients
agree on shards and calendar.

``deployment``: every SuperNode holds one merchant's own file (node config
``data-path``, ``format``). Nothing is generated and the server holds no data: the
preset contributes only its model, training and snapshot settings, output goes to
``federation.run-dir`` and evaluation is client-side (``federation.fraction-evaluate``).
Both sides build their settings from the run config alone. The coordinator passes the
shared calendar as ``snapshots.start`` / ``snapshots.end``; without it each merchant
counts cutoffs on its own log's dates.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from client.app import make_client_app
from client.secagg import make_secagg_client_app
from common.runtime import quiet_tensorflow
from server.app import make_server_app

log = logging.getLogger(__name__)

RESOLVED = "resolved-config.json"


def _anchored(path: Path) -> Path:
    """``path`` made absolute; relative paths go under FLWR_HOME.

    The ServerApp runs from Flower's app folder, so the current folder is no anchor.
    """
    path = path.expanduser()
    if path.is_absolute():
        return path
    return Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")) / path


def _experiment(run_config: Mapping[str, Any]):
    from simulations.settings import experiment_from_flat
    from simulations.synth import load_preset

    run = dict(run_config)
    preset = str(run.get("experiment.preset") or "quick")
    flat = {**load_preset(preset), **run, "experiment.preset": preset}
    flat.setdefault("experiment.name", Path(preset).stem)
    output = Path(str(flat.get("experiment.output-dir", "runs")))
    flat["experiment.output-dir"] = str(_anchored(output))
    return experiment_from_flat(flat)


def is_deployment(run_config: Mapping[str, Any]) -> bool:
    """Whether the run config asks for ``federation.mode = "deployment"`` (validated)."""
    from common.config import from_flat
    from server.config import FederationConfig

    return from_flat(FederationConfig, run_config, "federation").mode == "deployment"


def deployment_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The flat settings of a deployment run, as both the server and the clients see them.

    The preset gives the model, training and snapshot settings (its ``synthetic``
    section is not used); the run config overrides them. No evaluation data. XLA is
    off unless the preset turns it on: every message runs in a fresh ClientApp process,
    which would compile the model again each time (measured: first fit 6 s without,
    32 s with XLA).
    """
    from simulations.synth import load_preset

    run = dict(run_config)
    preset = str(run.get("experiment.preset") or "quick")
    flat = {k: v for k, v in load_preset(preset).items() if not k.startswith("synthetic.")}
    flat.setdefault("model.jit-compile", False)
    flat.update(run)
    flat["experiment.preset"] = preset
    flat["federation.eval-data"] = ""
    return flat


def deployment_run_dir(flat: Mapping[str, Any]) -> Path:
    """``federation.run-dir`` made absolute: relative paths go under ``<output-dir>``
    (``$FLWR_HOME/runs`` by default); empty means ``deployment-<date>-<time>`` there."""
    name = str(flat.get("federation.run-dir") or "") or time.strftime("deployment-%Y%m%d-%H%M%S")
    path = Path(name).expanduser()
    if path.is_absolute():
        return path
    return _anchored(Path(str(flat.get("experiment.output-dir", "runs")))) / path


def run_folder(run_config: Mapping[str, Any]) -> Path:
    """Where this configuration's ``flwr run`` output goes: one folder per config, named
    by a digest of every key (the ServerApp and the ClientApps find it from the run
    config alone). A second ``flwr run`` with other settings (``-c``) writes beside the
    first, not over it."""
    exp = _experiment(run_config)
    key = hashlib.sha1(json.dumps(dict(sorted(exp.flat.items())), default=str)
                       .encode()).hexdigest()[:10]
    return exp.experiment.output_path() / f"flwr-run-{exp.experiment.name}-{key}"


def prepare_run(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """ServerApp side: the settings of the rounds.

    Simulation: build the data, write shards and the resolved config. Deployment: no
    data; resolve the run folder and validate the settings.
    """
    if is_deployment(run_config):
        return _prepare_deployment(run_config)
    from simulations.experiment import prepare
    from simulations.federated import simulation_config

    exp = _experiment(run_config)
    run_dir = run_folder(run_config)
    data = prepare(exp)
    flat = simulation_config(exp, data, run_dir)
    (run_dir / RESOLVED).write_text(json.dumps(flat, indent=2, default=str))
    return flat


def _prepare_deployment(run_config: Mapping[str, Any]) -> dict[str, Any]:
    from simulations.settings import experiment_from_flat

    flat = deployment_config(run_config)
    run_dir = deployment_run_dir(flat)
    flat["federation.run-dir"] = str(run_dir)
    exp = experiment_from_flat(flat)  # every key known, every value in range
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RESOLVED).write_text(json.dumps(flat, indent=2, default=str))
    calendar = (f"{exp.snapshots.start} .. {exp.snapshots.end}"
                if exp.snapshots.start and exp.snapshots.end
                else "each merchant's own dates (no snapshots.start/end given)")
    log.warning("deployment run: output in %s; calendar %s; client-side evaluation on %.0f%% "
                "of the nodes", run_dir, calendar, 100 * exp.federation.fraction_evaluate)
    if exp.federation.fraction_evaluate == 0 and not exp.federation.pre_evaluates:
        # With pre-evaluate (auto: on here) train replies score each round's incoming
        # model and the last one goes to its trainers: the best round is still kept.
        log.warning("federation.fraction-evaluate is 0 and federation.pre-evaluate off: no "
                    "model will be evaluated; the last round's model is kept")
    return flat


@functools.lru_cache(maxsize=4)
def _resolved(path: str) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def resolve_client(run_config: Mapping[str, Any]) -> Mapping[str, Any]:
    """ClientApp side: the config the ServerApp resolved for this run.

    In deployment the run config itself (the server's folder is on another machine);
    the node config gives the merchant's file.
    """
    if is_deployment(run_config):
        _log_to_console()
        return deployment_config(run_config)
    path = run_folder(run_config) / RESOLVED
    if not path.exists():
        raise FileNotFoundError(f"resolved run config not found: {path}")
    return _resolved(str(path))


@functools.cache
def _log_to_console() -> None:
    """Show the ClientApp's INFO lines (data report, timings) in the SuperNode's log.

    Each message runs in a fresh ``flwr-clientapp`` process whose output goes to the
    SuperNode's; nothing else configures logging there.
    """
    logger = logging.getLogger("client")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


class _EitherClientApp(ClientApp):
    """The ClientApp ``flwr run`` loads: every message goes to the SecAgg+ ClientApp
    (Flower's legacy API) when the resolved config asks for secure aggregation, to the
    Message API ClientApp otherwise."""

    def __init__(self) -> None:
        super().__init__()
        quiet_tensorflow()  # before a handler imports TensorFlow
        self._plain = make_client_app(resolve=resolve_client)
        self._secure = make_secagg_client_app(resolve=resolve_client)

    def __call__(self, message: Message, context: Context) -> Message:
        from common.config import from_flat
        from server.config import FederationConfig

        resolved = resolve_client(context.run_config)
        secure = from_flat(FederationConfig, resolved, "federation").secure_aggregation
        return (self._secure if secure else self._plain)(message, context)


def _server_app() -> ServerApp:
    """The ServerApp ``flwr run`` loads, in a process that then imports TensorFlow for
    its evaluation."""
    quiet_tensorflow()
    return make_server_app(prepare=prepare_run)


server_app = _server_app()
client_app = _EitherClientApp()
