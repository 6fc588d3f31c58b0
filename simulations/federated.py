"""Run the federation on Flower's Simulation Engine (Ray), one virtual node per merchant
(or ``federation.merchants-per-node`` merchants a node: ``server.merchant_grid``).

The driver writes each merchant's own events to a shard file, the pooled held-out
snapshots to ``eval.npz`` for the server's evaluation, and then starts the ServerApp
and ClientApps with the resolved configuration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from common import atomic, jsonl
from common.hosting import nodes_needed
from common.progress import SILENT, Progress, Task
from common.snapshots import Snapshots
from simulations import ray_seam
from simulations.baselines import MethodResult, splits
from simulations.experiment import PreparedData
from simulations.settings import Experiment
from simulations.tracking import NO_TRACKING, Tracker, round_scalars

log = logging.getLogger(__name__)


def write_shards(data: PreparedData, shard_dir: Path, task: Task | None = None) -> list[Path]:
    """One events (and interventions) Parquet file per merchant, named by partition id.

    Merchant by merchant: each one's rows are taken from the pooled log, written and
    freed, so the log is never held twice; each file is written whole or not at all
    (:func:`common.atomic.replacing`). ``task`` advances by one a merchant.
    """
    shard_dir.mkdir(parents=True, exist_ok=True)
    events = _rows_by_merchant(data.events)
    iv = data.interventions
    inter = _rows_by_merchant(iv) if len(iv) else {}
    paths = []
    for pid, merchant in enumerate(data.merchants):
        path = shard_dir / f"{pid:05d}.parquet"
        _write_parquet(data.events.take(events[merchant]), path)
        if merchant in inter:
            _write_parquet(iv.take(inter[merchant]),
                           shard_dir / f"{pid:05d}-interventions.parquet")
        paths.append(path)
        if task is not None:
            task.advance(1)
    return paths


def _rows_by_merchant(frame: Any) -> dict[str, np.ndarray]:
    """Row positions of each merchant (by its id as a string), in the frame's order:
    one pass over the log (a mask per merchant would be merchants x events), without a
    string object per row."""
    groups = frame.groupby("merchant_id", observed=True, sort=False).indices
    rows: dict[str, np.ndarray] = {}
    for key, positions in groups.items():
        name = str(key)
        rows[name] = np.sort(np.concatenate([rows[name], positions])) if name in rows \
            else positions
    return rows


def _write_parquet(frame: Any, path: Path) -> None:
    # Not fsynced: a shard is rewritten by the next run; the rename keeps it whole.
    with atomic.replacing(path, durable=False) as tmp:
        frame.to_parquet(tmp, index=False)


@dataclasses.dataclass
class Staged:
    """What the rounds need once the driver has written a federation's inputs: the flat
    run config (shard folder, ``eval.npz``), the number of merchants and the training
    rows' count. No reference to the pooled log, the snapshots or any per-merchant frame,
    so a caller that lets go of its :class:`PreparedData` (``release_data``) does not hold
    them while the rounds run."""

    flat: dict[str, Any]
    merchants: int
    train_rows: int
    eval_path: Path


def stage_federation(exp: Experiment, data: PreparedData, run_dir: Path, *,
                     progress: Progress = SILENT) -> Staged:
    """Write the shards and ``eval.npz`` into ``run_dir``; the config every app gets."""
    check_hosting(exp)
    flat = simulation_config(exp, data, run_dir, progress=progress)
    return Staged(flat=flat, merchants=len(data.merchants),
                  train_rows=int(np.count_nonzero(data.snapshots.split == 0)),
                  eval_path=Path(flat["federation.eval-data"]))


def check_hosting(exp: Experiment) -> None:
    """Refuse what several merchants a node (``federation.merchants-per-node`` > 1)
    cannot simulate: a simulated crash kills the node's process, and with it the other
    merchants it serves; a straggler's delay holds up the merchants served after it."""
    if exp.federation.merchants_per_node > 1 and exp.simulation.crash_prob > 0:
        raise ValueError("config key 'federation.merchants-per-node': must be 1 with "
                         "simulation.crash-prob > 0 (a simulated crash kills the node's "
                         "process, failing every merchant it hosts)")
    if exp.federation.merchants_per_node > 1 and exp.simulation.straggler_prob > 0:
        raise ValueError("config key 'federation.merchants-per-node': must be 1 with "
                         "simulation.straggler-prob > 0 (a node serves its merchants one "
                         "after another, so a straggler's delay holds up the others and "
                         "the round timeout applies to the node, not the merchant)")


def release_data(data: PreparedData) -> None:
    """Let go of what only the staging needed, in place: the pooled log, the interventions
    and every snapshot (the held-out ones are in ``eval.npz``; :func:`restore_held_out`
    reads them back). ``data`` keeps its merchants, actions, calendar, report and truth."""
    data.events = _empty_like(data.events)
    data.interventions = _empty_like(data.interventions)
    data.snapshots = data.snapshots.subset(np.zeros(len(data.snapshots), dtype=bool))
    return_freed_memory()


def _empty_like(frame: Any) -> Any:
    """A frame with ``frame``'s columns and dtypes and no rows, sharing no buffer with it
    (``frame.iloc[:0].copy()`` keeps an Arrow-backed column's whole buffers)."""
    import pandas as pd

    return pd.DataFrame({c: pd.array([], dtype=t) for c, t in frame.dtypes.items()})


def restore_held_out(data: PreparedData, staged: Staged) -> None:
    """Give a released ``data`` its held-out (validation and test) snapshots back from
    ``eval.npz``: the same rows in the same order as before, what :func:`assess` reads."""
    data.snapshots = Snapshots.load(staged.eval_path)


def return_freed_memory() -> None:
    """Hand freed memory back to the system: Arrow's pool (pandas' string columns live
    there) and the C heap (glibc's ``malloc_trim``; nothing on another C library), so
    the driver shrinks once large frames are freed."""
    import ctypes
    import ctypes.util
    import sys

    arrow = sys.modules.get("pyarrow")
    if arrow is not None:
        arrow.default_memory_pool().release_unused()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim(0)


def simulation_config(exp: Experiment, data: PreparedData, run_dir: Path, *,
                      progress: Progress = SILENT) -> dict[str, Any]:
    """The flat run config every app gets: the experiment plus paths and the calendar."""
    n = len(data.merchants)
    for key in ("federation.min-available-nodes", "federation.min-train-nodes"):
        if key in exp.flat and int(exp.flat[key]) > n:
            # Flower would wait for merchants that never come, every round.
            raise ValueError(f"config key '{key}': {exp.flat[key]} merchants asked for, but "
                             f"the federation has {n}")
    shard_dir = run_dir / "shards"
    with progress.task("writing shards", total=len(data.merchants), unit="merchants") as task:
        write_shards(data, shard_dir, task)
    eval_path = run_dir / "eval.npz"
    s = data.snapshots
    s.subset(s.split > 0).save(eval_path)
    flat = dict(exp.flat)
    sim = exp.simulation
    flat.update({
        "snapshots.start": data.snapshot_config.start,
        "snapshots.end": data.snapshot_config.end,
        "client.shard-dir": str(shard_dir),
        # The ClientApp reads its seeded fault knobs from section "client".
        "client.dropout-prob": sim.dropout_prob,
        "client.straggler-prob": sim.straggler_prob,
        "client.straggler-delay": sim.straggler_delay,
        "client.crash-prob": sim.crash_prob,
        "federation.run-dir": str(run_dir),
        "federation.eval-data": str(eval_path),
    })
    # Everyone must be sampled unless the scenario says otherwise.
    flat.setdefault("federation.min-available-nodes", n)
    flat.setdefault("federation.min-train-nodes",
                    max(1, int(n * exp.federation.fraction_train)))
    return flat


def backend_config(exp: Experiment) -> dict[str, Any]:
    sim = exp.simulation
    init: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": False}
    if sim.ray_address:
        init["address"] = sim.ray_address
    else:
        init["num_cpus"] = sim.ray_cpus or os.cpu_count() or 1
    return {"client_resources": {"num_cpus": sim.client_cpus, "num_gpus": 0.0},
            "init_args": init}


@contextlib.contextmanager
def _actor_environment(client_cpus: float) -> Iterator[None]:
    """The environment Ray's processes start with: TensorFlow's thread pools sized to
    the cores each actor is given, TensorFlow's start-up logs quiet
    (:data:`common.runtime.QUIET_TENSORFLOW`), and Ray's notice about accelerator
    variables off.

    TensorFlow sizes its pools to the whole machine in every process, so actors sharing
    the cores fight over them: on 2 cores with 100 merchants a steady round took 4.5 s
    without this and 3.3 s with it (client fit 0.08 vs 0.05 s). Ray's processes
    take the driver's environment when it starts them (Flower's ``init_ray`` overrides
    ``runtime_env``), so the variables are set while the simulation runs and restored
    after; values already set by the user win. A driver whose TensorFlow starts in that
    time (``fedecay simulate``: the ServerApp's model) gets the same pools, which keeps
    the server's evaluation off the actors' cores.
    """
    from common.runtime import QUIET_TENSORFLOW

    threads = str(max(1, math.ceil(client_cpus)))
    wanted = {"TF_NUM_INTRAOP_THREADS": threads, "TF_NUM_INTEROP_THREADS": threads,
              **QUIET_TENSORFLOW, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    added = {k: v for k, v in wanted.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


@contextlib.contextmanager
def _heap_frozen() -> Iterator[None]:
    """The driver's heap as the rounds find it (TensorFlow, Flower, the staged config)
    out of reach of Python's garbage collector while they run, given back after.

    The reason is the actors' (``client.work.settle_heap``): a full collection walks
    every tracked object, hundreds of thousands with TensorFlow loaded, and in the
    driver it stalls the round's bookkeeping. Unlike an actor, the driver goes on after
    the rounds (the next method of a comparison, the next size of a bench), so the heap
    is unfrozen at the end: a cycle among what was frozen and has been let go of since
    is collected then. Off with ``client.work.GC_FREEZE_ENV`` off, or when something
    froze the heap already.
    """
    from client.work import freezes_heap

    if not freezes_heap() or gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def secure_aggregation(flat: Mapping[str, Any]) -> bool:
    """Whether the flat config asks for SecAgg+ (``federation.secure-aggregation``)."""
    from common.config import from_flat
    from server.config import FederationConfig

    return from_flat(FederationConfig, flat, "federation").secure_aggregation


def make_federated_client_app(flat: Mapping[str, Any]) -> Any:
    """The ClientApp for these settings: the SecAgg+ one (Flower's legacy API) when the
    federation runs secure aggregation, the Message API one otherwise."""
    if secure_aggregation(flat):
        from client.secagg import make_secagg_client_app

        return make_secagg_client_app(flat)
    from client.app import make_client_app

    return make_client_app(flat)


#: Settings a resumed run may change: how long it goes on and how it is executed. Every
#: other one (data, model, seed, strategy, privacy, ...) shaped the checkpoint's weights.
RESUME_MAY_CHANGE: tuple[str, ...] = (
    "federation.num-rounds", "federation.patience-rounds", "federation.round-timeout",
    "federation.keep-checkpoints", "federation.merchants-per-node",
    "simulation.client-cpus", "simulation.ray-cpus", "simulation.ray-address",
    "experiment.tracking",
)


def resume_experiment(run_dir: Path, overrides: Mapping[str, Any]) -> Experiment:
    """The experiment of a killed run, from its ``config.json``, to go on from the newest
    intact checkpoint.

    ``overrides`` (flat keys) are applied when they are in :data:`RESUME_MAY_CHANGE`;
    any other key whose value differs from the run's raises ``ValueError`` naming it.
    The updated configuration is written back to ``config.json``. Checked before any
    engine starts: a run that cannot be resumed fails here, with nothing deleted.
    """
    import json

    from server.resume import ResumeError, find_resume_state
    from simulations.experiment import write_json
    from simulations.settings import experiment_from_flat

    saved = run_dir / "config.json"
    if not run_dir.is_dir():
        raise ValueError(f"--resume: {run_dir} is not a run folder")
    try:
        flat = json.loads(saved.read_text())
    except FileNotFoundError:
        raise ValueError(f"--resume: {run_dir} has no config.json (not a simulate run "
                         "folder)") from None
    except ValueError as err:
        raise ValueError(f"--resume: {saved} is not valid JSON ({err})") from None
    if not isinstance(flat, dict):
        raise ValueError(f"--resume: {saved} does not hold a configuration object")
    changed = {k: v for k, v in overrides.items() if flat.get(k) != v}
    refused = sorted(k for k in changed if k not in RESUME_MAY_CHANGE)
    if refused:
        k = refused[0]
        raise ValueError(
            f"--resume: {k} cannot change on a resumed run (the run used {flat.get(k)!r}, "
            f"asked {changed[k]!r}); a resumed run may change only "
            f"{', '.join(RESUME_MAY_CHANGE)}")
    flat = {**flat, **changed}
    exp = experiment_from_flat({**flat, "federation.resume": True})
    state = find_resume_state(run_dir, report=False)  # the server reports it once
    done = 0 if state is None else int(state["round"])
    if done > exp.federation.num_rounds:
        raise ResumeError(f"--resume: {run_dir} has {done} rounds done, more than "
                          f"federation.num-rounds={exp.federation.num_rounds}")
    if changed:
        log.info("resumed run: %s", ", ".join(f"{k}={v!r}" for k, v in changed.items()))
        write_json(saved, flat)
    return exp


@contextlib.contextmanager
def _ray_start_up(progress: Progress) -> Iterator[None]:
    """Ray's start-up as a step of ``progress``: done once Ray is initialised (looked at
    every 0.1 s while the block runs; the engine starts Ray in its own thread). The
    actors' own start (TensorFlow, the first compile) is part of round 1."""
    import ray

    stop = threading.Event()

    def watch() -> None:
        with progress.task("starting Ray", total=1, unit="engine") as task:
            while not stop.wait(0.1):
                if ray.is_initialized():
                    task.advance(1)
                    return

    watcher = threading.Thread(target=watch, name="fedecay-ray-start", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()


@contextlib.contextmanager
def _interrupts_abandon(stop: Any) -> Iterator[None]:
    """While the engine runs, Ctrl-C and SIGTERM first end every wait for an actor and
    stop the rounds, then do what they did before (raise, or end the process).

    Flower's engine shuts Ray down on its way out (``RayBackend.terminate``) while its
    worker threads still run; a Ray call of theirs after that ends the process (exit 1,
    Ray's core worker). So they must stop calling Ray before the exception reaches it.
    Main thread only (signals are handled there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    from simulations.raypool import abandon_waits

    def stopping(signum: int, frame: Any) -> None:
        abandon_waits()
        stop.interrupt()
        previous = before[signum]
        if callable(previous):
            previous(signum, frame)
        else:  # the system's default: end as the signal would have
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig, handler in before.items():
        if handler is not signal.SIG_IGN:
            signal.signal(sig, stopping)
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _start_ray_on_this_thread(exp: Experiment) -> None:
    """Start Ray here, before ``run_simulation``, and keep SIGTERM's handler.

    Inside ``run_simulation`` Ray starts off the main thread, and its core worker then
    handles SIGTERM itself: the process aborted (exit 134, a stack dump) instead of
    unwinding as the command's handler does (``terminated``, exit 143, the run folder
    left for ``--resume``). Started on the main thread, Ray sets its own handler, which
    is put back right after; a Python handler also replaces the core worker's."""
    from simulations import flower_seam

    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main else None
    flower_seam.start_ray(backend_config(exp))
    if main and handler is not None:
        signal.signal(signal.SIGTERM, handler)


def run_federated(exp: Experiment, data: PreparedData, run_dir: Path, *,
                  progress: Progress = SILENT, tracker: Tracker = NO_TRACKING,
                  name: str | None = None, overrides: Mapping[str, Any] | None = None,
                  release: bool = False) -> MethodResult:
    """Federated training of the shared model; predictions of the selected global model.

    ``progress`` shows the shards written, Ray's start-up and the rounds; every round's
    line goes to ``tracker`` as method ``name`` (default ``federated-<strategy>``, with
    ``-secagg`` under secure aggregation). With ``release`` the driver lets go of the
    pooled log and the snapshots once the shards and ``eval.npz`` are written
    (:func:`release_data`), and ``data`` comes back with its held-out snapshots only
    (what :func:`~simulations.baselines.assess` reads); without it ``data`` is untouched
    and stays in memory during the rounds (a comparison needs it for the next method).
    """
    from common.model import load_model
    from common.training import predict
    from server.recorder import load_eval_data

    started = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    staged = stage_federation(exp, data, run_dir, progress=progress)
    staged.flat.update(overrides or {})
    name = name or (f"federated-{exp.federation.strategy}"
                    f"{'-secagg' if secure_aggregation(staged.flat) else ''}")
    if release:
        release_data(data)
    run_rounds(exp, staged, progress=progress, tracker=tracker, name=name)
    load_eval_data.cache_clear()  # the server's copy of eval.npz: the rounds are over
    model_path = run_dir / "model.keras"
    if not model_path.exists():
        raise RuntimeError(f"the federation did not produce {model_path}; see the log above")
    model = load_model(model_path)
    if release:
        restore_held_out(data, staged)
    _, val, test = splits(data)
    rounds = read_metrics(run_dir / "metrics.jsonl")
    return MethodResult(
        name=name, val=predict(model, val),
        test=predict(model, test), seconds=time.perf_counter() - started,
        sample_epochs=_sample_epochs(rounds, staged.train_rows),
        details={"rounds": rounds, "run_dir": str(run_dir)},
    )


def run_rounds(exp: Experiment, staged: Staged, *, progress: Progress = SILENT,
               tracker: Tracker = NO_TRACKING, name: str = "federated") -> None:
    """The Simulation Engine's rounds on ``staged``'s shards: the ServerApp in this
    process, a ClientApp actor per ``simulation.client-cpus``; every round's line goes to
    ``tracker`` as method ``name``. Writes ``model.keras`` and ``metrics.jsonl`` into the
    run folder. Ray is shut down after unless the run attached to a cluster."""
    import ray
    from flwr.simulation import run_simulation

    from server.rounds import EngineStop
    from simulations.handover import hand_over_at_once
    from simulations.raypool import abandon_waits, replace_dead_actors

    flat = staged.flat
    per_node = exp.federation.merchants_per_node

    def on_round(line: dict[str, Any]) -> None:
        tracker.log_metrics(int(line["round"]), name, **round_scalars(line))

    replace_dead_actors()
    hand_over_at_once()
    engine_failed = EngineStop()
    try:
        with _actor_environment(exp.simulation.client_cpus), _ray_start_up(progress), \
                _heap_frozen(), ray_seam.no_auto_start():
            _start_ray_on_this_thread(exp)
            with _interrupts_abandon(engine_failed):
                run_simulation(
                    server_app=federated_server_app(flat, staged.merchants, per_node,
                                                    progress=progress,
                                                    engine_failed=engine_failed,
                                                    on_round=on_round),
                    client_app=make_federated_client_app(flat),
                    num_supernodes=nodes_needed(staged.merchants, per_node),
                    backend_config=backend_config(exp),
                )
    except Exception as err:
        # The ServerApp thread outlives this exception: tell it to stop.
        engine_failed.set()
        raise RuntimeError(f"the simulation engine failed ({err}); the server stops after "
                           "the round in progress; the cause is in the log above") from err
    except BaseException:
        # Ctrl-C or SIGTERM: the ServerApp thread (which the process waits for at exit)
        # stops waiting for replies no actor will send, and finishes nothing. Usually
        # done already by the signal's handler (`_interrupts_abandon`); both calls are
        # idempotent, and this one also covers a run off the main thread.
        engine_failed.interrupt()
        abandon_waits()
        raise
    finally:
        # After an interrupt Flower's engine has shut Ray down on its way out
        # (RayBackend.terminate); Ray's own exit handler covers any other path.
        if ray.is_initialized() and not exp.simulation.ray_address \
                and not engine_failed.interrupted:
            ray.shutdown()


def federated_server_app(flat: Mapping[str, Any], merchants: int, per_node: int, *,
                         progress: Progress = SILENT,
                         engine_failed: threading.Event | None = None,
                         on_round: Callable[[dict[str, Any]], None] | None = None) -> Any:
    """The ServerApp of a simulation of ``merchants`` merchants, ``per_node`` to a
    virtual node: with more than one, its Grid shows the strategy one node per merchant
    (``server.merchant_grid.MerchantGrid``)."""
    from server.app import make_server_app, run_federation

    if per_node == 1:
        return make_server_app(flat, progress=progress, engine_failed=engine_failed,
                               on_round=on_round)
    from flwr.serverapp import Grid, ServerApp

    from server.config import settings_from_flat
    from server.merchant_grid import MerchantGrid

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Any) -> None:
        hosted = MerchantGrid(grid, merchants, per_node)
        run_federation(hosted, settings_from_flat(dict(flat)),  # type: ignore[arg-type]
                       progress=progress, engine_failed=engine_failed, on_round=on_round)
        log.info("%d merchants on %d nodes: %d node messages", merchants,
                 nodes_needed(merchants, per_node), hosted.node_messages)

    return app


def _sample_epochs(rounds: list[dict[str, Any]], train_rows: int) -> float:
    """Training rows seen, estimated per round from the mean epochs and the reply share."""
    total = 0.0
    for r in rounds:
        t = r.get("train") or {}
        if "epochs" in t and r.get("replied"):
            total += float(t["epochs"]) * train_rows * r["replied"] / max(r["sampled"], 1)
    return total


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rounds of ``metrics.jsonl`` (none when it is missing)."""
    return jsonl.read(path) if path.exists() else []
