"""Experiment tracking: TensorBoard event files for every run, MLflow when asked.

A run logs through one :class:`Tracker`: its resolved configuration once
(:meth:`~Tracker.log_params`), scalars per step and method (a federated round, a
centralised epoch, the final test metrics), and the files it wrote
(:meth:`~Tracker.log_artifact`). ``experiment.tracking`` picks the backends:

- ``tensorboard`` (always written): ``<run>/tensorboard/<method>/`` holds one event
  file per method (``tensorboard --logdir runs`` shows them side by side), the
  configuration as hparams and as a text table; PNG plots and ``report.md`` go to
  ``<run>/tensorboard/report/``.
- ``tensorboard,mlflow``: the same, plus an MLflow run in the local file store
  ``<run>/mlruns`` (no server): params, metrics named ``<method>/<tag>``, the report,
  plots and models as artifacts. Needs the ``mlflow`` extra.

Tags read the same in both: ``train/loss``, ``val/loss``, ``test/decay_roc_auc`` ...
per step, ``final/<metric>`` for the metrics of the finished method.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

#: ``experiment.tracking`` values: TensorBoard is always written.
TRACKING_CHOICES: tuple[str, ...] = ("tensorboard", "tensorboard,mlflow")
#: Where each backend writes, inside the run folder.
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"
#: The TensorBoard run that holds the plots and the report text.
REPORT_RUN = "report"
MLFLOW_INSTALL = '.venv/bin/uv pip install -c requirements.lock -e ".[mlflow]"'


def tracking_backends(value: str, key: str = "experiment.tracking") -> tuple[str, ...]:
    """The backends ``value`` names, validated: ``("tensorboard",)`` or with ``"mlflow"``.

    Raises ``ValueError`` naming ``key`` for anything else, and when MLflow is asked but
    not installed (checked without importing it).
    """
    names = tuple(dict.fromkeys(p.strip().lower() for p in str(value).split(",") if p.strip()))
    if set(names) not in ({"tensorboard"}, {"tensorboard", "mlflow"}):
        raise ValueError(f"config key '{key}': must be {' or '.join(map(repr, TRACKING_CHOICES))}"
                         f" (TensorBoard is always written), got {value!r}")
    if "mlflow" in names and importlib.util.find_spec("mlflow") is None:
        raise ValueError(f"config key '{key}': asks for MLflow, which is not installed: "
                         f"{MLFLOW_INSTALL} (or make setup)")
    return ("tensorboard", "mlflow") if "mlflow" in names else ("tensorboard",)


class Tracker(Protocol):
    """Where a run reports its configuration, its scalars and its files."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """The run's resolved configuration (flat keys), once, before any metric."""

    def log_metrics(self, step: int, method: str, **values: float) -> None:
        """Scalars of ``method`` at ``step`` (round, epoch); non-finite values are skipped."""

    def log_artifact(self, path: Path, folder: str = "") -> None:
        """A file the run wrote; ``folder`` groups it (``models/centralised``)."""

    def close(self) -> None:
        """Write out everything; the tracker is not used again."""



def _finite(values: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in values.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out[k] = f
    return out


def _hparam(value: Any) -> bool | int | float | str:
    """A value the hparams plugin takes (bool, number or text)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return "" if value is None else str(value)


def config_markdown(params: Mapping[str, Any]) -> str:
    """The configuration as a two-column Markdown table (TensorBoard's text tab)."""
    rows = [f"| `{k}` | {str(v).replace('|', '&#124;')} |" for k, v in params.items()]
    return "\n".join(["| key | value |", "|---|---|", *rows])


class TensorBoardTracker:
    """Event files under ``root/<method>/``, written with ``tf.summary``.

    One writer per method, made when the method first logs; each gets the configuration
    as hparams (``method`` added, so the HParams tab compares the methods) and as text.
    Writers flush after every call, so a running federation shows up round by round.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._writers: dict[str, Any] = {}
        self._params: dict[str, Any] = {}
        self._lock = threading.Lock()  # the federation's rounds log from the server thread

    def log_params(self, params: Mapping[str, Any]) -> None:
        with self._lock:
            self._params = dict(params)

    def log_metrics(self, step: int, method: str, **values: float) -> None:
        import tensorflow as tf

        finite = _finite(values)
        with self._lock:
            writer = self._writer(method)
            with writer.as_default(step=int(step)):
                for tag, value in finite.items():
                    tf.summary.scalar(tag, value)
            writer.flush()

    def log_artifact(self, path: Path, folder: str = "") -> None:
        """PNG plots as images and Markdown as text in the ``report`` run; others are
        not TensorBoard's to show."""
        import tensorflow as tf

        name = f"{folder}/{path.stem}" if folder else path.stem
        with self._lock:
            if path.suffix == ".png":
                writer = self._writer(REPORT_RUN)
                image = tf.io.decode_png(path.read_bytes(), channels=4)[tf.newaxis]
                with writer.as_default(step=0):
                    tf.summary.image(name, image)
            elif path.suffix == ".md":
                writer = self._writer(REPORT_RUN)
                with writer.as_default(step=0):
                    tf.summary.text(name, path.read_text())
            else:
                return
            writer.flush()

    def close(self) -> None:
        with self._lock:
            for writer in self._writers.values():
                writer.close()
            self._writers.clear()

    def _writer(self, method: str) -> Any:
        writer = self._writers.get(method)
        if writer is not None:
            return writer
        import tensorflow as tf

        writer = tf.summary.create_file_writer(str(self.root / method))
        self._writers[method] = writer
        if self._params:
            with writer.as_default(step=0):
                self._write_params(method)
        return writer

    def _write_params(self, method: str) -> None:
        import tensorflow as tf

        try:
            from tensorboard.plugins.hparams import api as hp
        except ImportError:  # the text table below still shows the configuration
            hp = None
        if hp is not None and method != REPORT_RUN:
            hparams = {k: _hparam(v) for k, v in self._params.items()}
            hp.hparams({**hparams, "method": method}, trial_id=method)
        tf.summary.text("config", config_markdown(self._params))


_CLOSE = object()


class MlflowTracker:
    """One MLflow run in the file store ``store`` (``file:`` URI, no server).

    MLflow takes seconds to import, so a background thread imports it and does every
    call in order while training goes on; :meth:`close` waits for it. A failure of the
    tracking is logged once and ends the MLflow run, never the training. The file store
    is in maintenance mode in MLflow 3 and refuses to open unless
    ``MLFLOW_ALLOW_FILE_STORE`` is true: it is set while the tracker is open (a value the
    user set wins).
    """

    def __init__(self, store: Path, experiment: str, run_name: str) -> None:
        self.store = store
        self.run_id: str | None = None
        self._queue: queue.Queue[Any] = queue.Queue()
        self._added_env = "MLFLOW_ALLOW_FILE_STORE" not in os.environ
        if self._added_env:
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        self._thread = threading.Thread(target=self._work, args=(experiment, run_name),
                                        name="fedecay-mlflow", daemon=True)
        self._thread.start()

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._queue.put(("params", dict(params)))

    def log_metrics(self, step: int, method: str, **values: float) -> None:
        stamp = int(time.time() * 1000)
        self._queue.put(("metrics", [(f"{method}/{k}", v, stamp, int(step))
                                     for k, v in _finite(values).items()]))

    def log_artifact(self, path: Path, folder: str = "") -> None:
        self._queue.put(("artifact", (str(path), folder or None)))

    def close(self) -> None:
        self._queue.put(_CLOSE)
        self._thread.join()
        if self._added_env:
            os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)

    def _work(self, experiment: str, run_name: str) -> None:
        client = None
        try:
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri=self.store.resolve().as_uri())
            found = client.get_experiment_by_name(experiment)
            exp_id = found.experiment_id if found else client.create_experiment(experiment)
            self.run_id = client.create_run(exp_id, run_name=run_name).info.run_id
            while (item := self._queue.get()) is not _CLOSE:
                self._do(client, *item)
            client.set_terminated(self.run_id)
        except Exception as err:  # tracking must not take a finished training with it
            log.error("MLflow tracking in %s failed, the run goes on without it: %s",
                      self.store, err)
            if client is not None and self.run_id is not None:
                with contextlib.suppress(Exception):
                    client.set_terminated(self.run_id, status="FAILED")
            while self._queue.get() is not _CLOSE:  # let close() return
                pass

    def _do(self, client: Any, kind: str, payload: Any) -> None:
        from mlflow.entities import Metric, Param

        assert self.run_id is not None
        if kind == "params":
            params = [Param(k, str(v)) for k, v in payload.items()]
            for i in range(0, len(params), 100):  # MLflow takes 100 params per batch
                client.log_batch(self.run_id, params=params[i:i + 100])
        elif kind == "metrics":
            metrics = [Metric(k, v, stamp, step) for k, v, stamp, step in payload]
            for i in range(0, len(metrics), 1000):
                client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
        else:
            path, folder = payload
            client.log_artifact(self.run_id, path, folder)


class Trackers:
    """Every backend asked for, behind one :class:`Tracker`."""

    def __init__(self, backends: list[Tracker]) -> None:
        self.backends = backends

    def log_params(self, params: Mapping[str, Any]) -> None:
        for b in self.backends:
            b.log_params(params)

    def log_metrics(self, step: int, method: str, **values: float) -> None:
        for b in self.backends:
            b.log_metrics(step, method, **values)

    def log_artifact(self, path: Path, folder: str = "") -> None:
        for b in self.backends:
            b.log_artifact(path, folder)

    def close(self) -> None:
        for b in self.backends:
            b.close()


#: Records nothing: the default wherever a ``tracker`` argument is optional.
NO_TRACKING: Tracker = Trackers([])


@contextlib.contextmanager
def open_tracking(run_dir: Path, tracking: str, params: Mapping[str, Any], *,
                  experiment: str = "fedecay") -> Iterator[Tracker]:
    """The trackers ``tracking`` (``experiment.tracking``) asks for, in ``run_dir``,
    with ``params`` logged; closed (everything written) when the block ends, failed or
    not."""
    backends: list[Tracker] = [TensorBoardTracker(run_dir / TENSORBOARD_DIR)]
    if "mlflow" in tracking_backends(tracking):
        backends.append(MlflowTracker(run_dir / MLFLOW_DIR, experiment, run_dir.name))
    tracker = Trackers(backends)
    tracker.log_params(params)
    try:
        yield tracker
    finally:
        tracker.close()


# ----------------------------------------------------------------- what is logged

#: A federation's per-round line (``metrics.jsonl``) as tags: server-side evaluation of
#: the global model (test metrics, validation loss), clients and bytes.
_ROUND_TAGS = {"decay_roc_auc": "test/decay_roc_auc", "decay_pr_auc": "test/decay_pr_auc",
               "decay_log_loss": "test/decay_log_loss", "interest_mae": "test/interest_mae",
               "interest_rmse": "test/interest_rmse", "val_loss": "val/loss"}


def round_scalars(line: Mapping[str, Any]) -> dict[str, float]:
    """The scalars of one ``metrics.jsonl`` line worth plotting."""
    out = {tag: line.get("centralised", {}).get(key) for key, tag in _ROUND_TAGS.items()}
    train = line.get("train") or {}
    out["train/loss"] = train.get("train_loss")
    out["train/val_loss"] = train.get("val_loss")  # the clients' own validation rows
    for key in ("sampled", "replied", "failed"):
        out[f"clients/{key}"] = line.get(key)
    out["bytes/up"], out["bytes/down"] = line.get("bytes_up"), line.get("bytes_down")
    out["seconds/round"] = line.get("round_seconds")
    privacy = line.get("privacy") or {}
    out["privacy/epsilon"] = privacy.get("epsilon")
    return _finite({k: v for k, v in out.items() if v is not None})


def epoch_scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """One epoch of ``common.training.fit``'s history: training and validation loss."""
    return _finite({"train/loss": row.get("loss"), "val/loss": row.get("val_loss", math.nan)})


def final_scalars(entry: Mapping[str, Any]) -> dict[str, float]:
    """The metrics ``simulations.baselines.assess`` found for a method, as ``final/...``."""
    out: dict[str, Any] = {}
    for section in ("decay", "interest"):
        for key, value in (entry.get(section) or {}).items():
            if key != "n":  # row counts are not results
                out[f"final/{section}_{key}"] = value
    out["final/worst_decile_auc"] = (entry.get("merchant_spread") or {}).get("worst_decile")
    policy = (entry.get("policy") or {}).get("policy") or {}
    for key in ("net_truth", "net_snips", "net_regret"):
        out[f"final/policy_{key}"] = policy.get(key)
    out["final/seconds"] = entry.get("seconds")
    return _finite({k: v for k, v in out.items() if v is not None})
