"""The merchant's ClientApp: trains the shared model on its own snapshots only.

The merchant's data comes from the node configuration: ``data-path`` (and optional
``format``, ``interventions-path``) in deployment, ``partition-id`` in simulation,
where the shard is ``<client.shard-dir>/<partition-id>.parquet``. Snapshots and the
compiled model are built once per process; each message only sets weights.

A reply carries the model's weight tensors and a whitelist of scalar metrics, never
ids or rows.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.config import ClientConfig
from common import atomic
from common.config import ModelConfig, SnapshotConfig, TrainConfig, from_flat
from common.schema import DataError
from common.snapshots import Snapshots, build_snapshots

log = logging.getLogger(__name__)

#: Metric names a client may send; anything else is a defect (see the egress tests).
TRAIN_METRICS: tuple[str, ...] = ("num-examples", "train_loss", "val_loss", "epochs",
                                  "fit_seconds")
EVALUATE_METRICS: tuple[str, ...] = ("num-examples", "eval_loss", "decay_log_loss",
                                     "decay_accuracy", "decay_positive_rate")
#: Error code of a reply whose merchant data could not be used.
DATA_ERROR = 100
#: Error code of a simulated dropout.
SIMULATED_DROPOUT = 101


@dataclasses.dataclass(frozen=True)
class ClientSettings:
    snapshots: SnapshotConfig
    model: ModelConfig
    train: TrainConfig
    client: ClientConfig
    seed: int


def settings_from_flat(flat: Mapping[str, Any]) -> ClientSettings:
    return ClientSettings(
        snapshots=from_flat(SnapshotConfig, flat, "snapshots"),
        model=from_flat(ModelConfig, flat, "model"),
        train=from_flat(TrainConfig, flat, "train"),
        client=from_flat(ClientConfig, flat, "client"),
        seed=int(flat.get("experiment.seed", 0)),
    )


def shard_location(node_config: Mapping[str, Any], client: ClientConfig
                   ) -> tuple[str, str, str | None]:
    """(events path, format, interventions path) of this node's merchant."""
    if "data-path" in node_config:
        path = str(node_config["data-path"])
        fmt = str(node_config.get("format", "auto"))
        inter = node_config.get("interventions-path")
        return path, fmt, str(inter) if inter else None
    if "partition-id" in node_config:
        if not client.shard_dir:
            raise DataError("simulation node without 'client.shard-dir' in the run config")
        base = Path(client.shard_dir) / f"{int(node_config['partition-id']):05d}"
        inter = base.with_name(base.name + "-interventions.parquet")
        return str(base.with_suffix(".parquet")), "canonical", \
            str(inter) if inter.exists() else None
    raise DataError("node config has neither 'data-path' (deployment) nor 'partition-id' "
                    "(simulation)")


class _Timer:
    """Where a message's time goes, logged at INFO as one line (deployment shows it).

    Each message of a deployment runs in a fresh process, so the line starts with the
    process's age when the handler began: interpreter, Flower and app start-up.
    """

    def __init__(self) -> None:
        self._age = _process_age()
        self._last = time.perf_counter()
        self._laps: list[tuple[str, float]] = []

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self._laps.append((name, now - self._last))
        self._last = now

    def report(self, what: str) -> None:
        age = "?" if self._age is None else f"{self._age:.1f} s"
        laps = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self._laps)
        log.info("%s: handler began %s after process start; %s", what, age, laps)


def _process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``), None elsewhere."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


#: Where the size of a process's shard cache comes from, in MiB.
SHARD_CACHE_ENV = "FEDECAY_SHARD_CACHE_MB"


def shard_cache_bytes(environ: Mapping[str, str] = os.environ) -> int:
    """Bytes of snapshots a process keeps: ``FEDECAY_SHARD_CACHE_MB`` (default 2048).

    A Ray actor serves many merchants: a count-bounded cache smaller than the merchants
    per actor rebuilt every shard every round; a byte bound keeps as many as fit.
    """
    raw = environ.get(SHARD_CACHE_ENV, "2048")
    try:
        mib = int(raw)
    except ValueError:
        mib = -1
    if mib < 0:
        raise ValueError(f"{SHARD_CACHE_ENV} must be a whole number of MiB >= 0, got {raw!r}")
    return mib * 2**20


class ShardCache:
    """Merchants' snapshots kept in memory up to ``max_bytes`` (least recently used
    shards leave first; the newest is always kept). Safe to share between threads."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0  # bytes of the snapshots held
        self._shards: OrderedDict[tuple[Any, ...], Snapshots] = OrderedDict()
        self._lock = threading.Lock()

    def keys(self) -> list[tuple[Any, ...]]:
        """(path, format, interventions, config) of the shards held, oldest use first."""
        with self._lock:
            return list(self._shards)

    def load(self, path: str, fmt: str, interventions: str | None,
             config: SnapshotConfig, *, disk_cache: bool = False) -> Snapshots:
        """Validate the merchant's file and build its snapshots, or return them from the
        cache.

        With ``disk_cache`` (the simulation's shards) the snapshots are also written
        beside the shard, so the other processes load them instead of building them again.
        """
        key = (path, fmt, interventions, config)
        with self._lock:
            if key in self._shards:
                self._shards.move_to_end(key)
                return self._shards[key]
        cached = _snapshot_file(path, interventions, config) if disk_cache else None
        snaps = _load_saved(cached) if cached is not None else None
        if snaps is None:
            snaps = _build_shard(path, fmt, interventions, config)
            if cached is not None:
                _save_beside(snaps, cached)
        with self._lock:
            if key not in self._shards:  # another thread may have built it meanwhile
                self._shards[key] = snaps
                self.nbytes += _nbytes(snaps)
            while len(self._shards) > 1 and self.nbytes > self.max_bytes:
                _, dropped = self._shards.popitem(last=False)
                self.nbytes -= _nbytes(dropped)
        return snaps


@functools.cache
def process_shard_cache(max_bytes: int) -> ShardCache:
    """This process's shard cache of that size, made on first use.

    Flower hands a Ray actor the ClientApp anew with every message, so a cache inside
    the app would start empty each time; the process outlives the messages.
    """
    return ShardCache(max_bytes)


def _snapshot_file(path: str, interventions: str | None, config: SnapshotConfig) -> Path:
    """Where a shard's snapshots are kept: named by the settings and the files' sizes
    and times, so a changed shard or setting never reads stale snapshots.

    A simulation's merchant is served by whichever Ray actor is free, and each actor
    built every merchant's snapshots itself (61 ms a shard of the quick preset's 100
    merchants, against 5 ms to load them): rounds 2-5 kept paying for cold shards.
    """
    import hashlib

    stamp = [repr(config)]
    for name in (path, interventions):
        if name:
            st = os.stat(name)
            stamp.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    digest = hashlib.sha256("|".join(stamp).encode()).hexdigest()[:16]
    shard = Path(path)
    return shard.with_name(f"{shard.stem}.snapshots-{digest}.npz")


def _load_saved(path: Path) -> Snapshots | None:
    if not path.exists():
        return None
    try:
        return Snapshots.load(path)
    except Exception as err:  # noqa: BLE001 - any unreadable file is rebuilt
        log.warning("%s unreadable (%s): building the snapshots again", path.name, err)
        return None


def _save_beside(snaps: Snapshots, path: Path) -> None:
    """Write atomically (a process-private temp file, then rename); a failure only costs
    the other processes a rebuild."""
    try:
        with atomic.replacing(path, durable=False) as tmp:
            snaps.save(tmp)
    except OSError as err:
        log.warning("cannot keep %s (%s): other processes build it too", path.name, err)


def _nbytes(snaps: Snapshots) -> int:
    return sum(getattr(snaps, f.name).nbytes for f in dataclasses.fields(snaps)
               if isinstance(getattr(snaps, f.name), np.ndarray))


def _build_shard(path: str, fmt: str, interventions: str | None,
                 config: SnapshotConfig) -> Snapshots:
    from common.io import load_events

    loaded = load_events(path, fmt, interventions_path=interventions)
    snaps, report = build_snapshots(loaded.events, config, loaded.interventions)
    for line in report.summary_lines():
        log.info("%s: %s", Path(path).name, line.strip())
    return snaps


def _error_reply(msg: Message, code: int, reason: str) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=msg)


def _data_error(msg: Message, err: Exception) -> Message:
    """Log the full reason locally; send only its kind, never quoted rows or values."""
    log.error("merchant data rejected: %s", err)
    return _error_reply(msg, DATA_ERROR, f"merchant data rejected ({type(err).__name__}); "
                        "the reason is in this merchant's SuperNode log")


def planned_fault(cfg: ClientConfig, seed: int, server_round: int, pid: int) -> str | None:
    """The simulated fault of partition ``pid`` in ``server_round``: "dropout",
    "straggler", "crash" or None; one seeded draw each, in that order."""
    rng = np.random.default_rng([seed, server_round, pid])
    if rng.random() < cfg.dropout_prob:
        return "dropout"
    if rng.random() < cfg.straggler_prob:
        return "straggler"
    if rng.random() < cfg.crash_prob:
        return "crash"
    return None


def _simulated_fault(settings: ClientSettings, node_config: Mapping[str, Any],
                     server_round: int) -> str | None:
    """Seeded dropout / straggler / crash behaviour of simulated clients."""
    cfg = settings.client
    if "partition-id" not in node_config or \
            cfg.dropout_prob == cfg.straggler_prob == cfg.crash_prob == 0:
        return None
    pid = int(node_config["partition-id"])
    fault = planned_fault(cfg, settings.seed, server_round, pid)
    if fault == "dropout":
        return f"simulated dropout of partition {pid} in round {server_round}"
    if fault == "straggler":
        time.sleep(cfg.straggler_delay)
    elif fault == "crash":
        # What the kernel's OOM killer does: SIGKILL, no clean-up, no reply.
        log.error("simulated crash of partition %d in round %d: SIGKILL of process %d",
                  pid, server_round, os.getpid())
        os.kill(os.getpid(), signal.SIGKILL)
    return None


def _global_model(settings: ClientSettings, msg: Message, timer: _Timer) -> Any:
    """The process's cached model holding the weights the server sent."""
    from common.model import cached_model, set_weights_of

    timer.lap("tensorflow import")
    model = cached_model(settings.model, settings.snapshots, settings.seed)
    set_weights_of(model, msg.content["arrays"].to_numpy_ndarrays())
    timer.lap("model")
    return model


def global_round(config: Mapping[str, Any]) -> int:
    """The round a train instruction belongs to; "global-round" survives a resume
    (server-round restarts at 1), and the seeds follow it."""
    return int(config.get("global-round", config.get("server-round", 0)))


def fit_locally(model: Any, settings: ClientSettings, snaps: Snapshots,
                config: Mapping[str, Any]) -> dict[str, float | int]:
    """Train ``model`` (holding the global weights) on this merchant's training rows as
    the server's ``config`` asks; the whitelisted metrics of the reply."""
    from common.training import fit

    train_rows, val_rows = snaps.split_part("train"), snaps.split_part("val")
    train_cfg = dataclasses.replace(
        settings.train,
        epochs=int(config.get("local-epochs", settings.train.epochs)),
        proximal_mu=float(config.get("proximal-mu", settings.train.proximal_mu)),
    )
    result = fit(model, train_rows, val_rows, train_cfg,
                 seed=settings.seed * 100_003 + global_round(config))
    metrics: dict[str, float | int] = {
        k: float(v) if np.isfinite(v) else -1.0 for k, v in result.as_metrics().items()}
    metrics["num-examples"] = int(len(train_rows))
    return metrics


def evaluate_locally(model: Any, test: Snapshots) -> dict[str, float | int]:
    """The whitelisted metrics of ``model`` on this merchant's held-out rows."""
    from common.training import predict, validation_loss

    p = np.clip(predict(model, test)["decay"], 1e-7, 1 - 1e-7)
    y = test.decay
    return {
        "num-examples": int(len(test)),
        "eval_loss": validation_loss(model, test),
        "decay_log_loss": float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))),
        "decay_accuracy": float(np.mean((p >= 0.5) == (y > 0.5))),
        "decay_positive_rate": float(y.mean()),
    }


def merchant_data(
    context: Context,
    flat: Mapping[str, Any] | None,
    resolve: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None,
    shards: ShardCache,
) -> tuple[ClientSettings, Snapshots]:
    """This node's settings (``flat``, else the run config completed by ``resolve``) and
    its merchant's snapshots (through ``shards``)."""
    config = flat if flat is not None else context.run_config
    if resolve is not None:
        config = resolve(config)
    settings = _settings(config)
    path, fmt, inter = shard_location(context.node_config, settings.client)
    # Only the simulation's shards (files the driver wrote in its run folder) get a
    # snapshot file beside them; a merchant's own data folder is left as it is.
    return settings, shards.load(path, fmt, inter, settings.snapshots,
                                 disk_cache="data-path" not in context.node_config)


def make_client_app(
    flat: Mapping[str, Any] | None = None,
    resolve: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
) -> ClientApp:
    """A ClientApp reading its settings from ``flat`` or, if None, the run config.

    ``run_simulation`` hands apps an empty run config, so simulations driven from
    Python pass the resolved settings explicitly; ``resolve`` may complete a run
    config (``flwr run``) before it is read. The shard cache's size is read now
    (:func:`shard_cache_bytes`); the cache itself is the process's.
    """
    app = ClientApp()
    cache_bytes = shard_cache_bytes()

    def _context(msg: Message, context: Context) -> tuple[ClientSettings, Snapshots]:
        return merchant_data(context, flat, resolve, process_shard_cache(cache_bytes))

    @app.train(mods=train_mods(flat))
    def train(msg: Message, context: Context) -> Message:
        timer = _Timer()
        # The file is checked before TensorFlow is imported: a bad file fails fast.
        try:
            settings, snaps = _context(msg, context)
        except (DataError, ValueError, FileNotFoundError) as err:
            return _data_error(msg, err)
        timer.lap("data")
        config = msg.content["config"]
        server_round = global_round(config)
        fault = _simulated_fault(settings, context.node_config, server_round)
        if fault:
            return _error_reply(msg, SIMULATED_DROPOUT, fault)
        if len(snaps.split_part("train")) == 0:
            return _error_reply(msg, DATA_ERROR, "no training snapshots in this merchant's data")
        model = _global_model(settings, msg, timer)
        metrics = fit_locally(model, settings, snaps, config)
        timer.lap("fit")
        timer.report(f"train round {server_round}")
        from common.model import weights_of

        reply = RecordDict({"arrays": ArrayRecord(weights_of(model)),
                            "metrics": MetricRecord(metrics)})
        return Message(reply, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        timer = _Timer()
        try:
            settings, snaps = _context(msg, context)
        except (DataError, ValueError, FileNotFoundError) as err:
            return _data_error(msg, err)
        timer.lap("data")
        test = snaps.split_part("test")
        if len(test) == 0:
            return _error_reply(msg, DATA_ERROR, "no held-out snapshots in this merchant's data")
        model = _global_model(settings, msg, timer)
        metrics = evaluate_locally(model, test)
        timer.lap("evaluate")
        config = msg.content.config_records.get("config") or {}
        timer.report(f"evaluate round {config.get('server-round', '?')}")
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


def train_mods(flat: Mapping[str, Any] | None) -> list[Callable[..., Message]]:
    """Mods of the train handler only (on the whole app ``fixedclipping_mod`` would break
    every evaluate reply).

    With explicit settings, ``privacy.mode = client-fixed`` makes this merchant clip its
    own update and refuse a server that sends no clipping norm. From a run config the
    update is clipped whenever the server's DP wrapper sends a norm.
    """
    from flwr.clientapp.mod import fixedclipping_mod

    if flat is not None:
        return [fixedclipping_mod] if flat.get("privacy.mode") == "client-fixed" else []
    return [_clip_when_asked]


def _clip_when_asked(msg: Message, context: Context, call_next: Callable[..., Message]
                     ) -> Message:
    from flwr.clientapp.mod import fixedclipping_mod
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    config = msg.content.config_records.get("config")
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


@functools.lru_cache(maxsize=8)
def _settings_cached(items: tuple[tuple[str, Any], ...]) -> ClientSettings:
    return settings_from_flat(dict(items))


def _settings(flat: Mapping[str, Any]) -> ClientSettings:
    return _settings_cached(tuple(sorted((k, _hashable(v)) for k, v in flat.items())))


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


app = make_client_app()
