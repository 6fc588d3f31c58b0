"""Helpers shared by several test files: logs, ports, subprocess sessions, drivers.

Fixtures shared by several files live in ``conftest.py``. The scripts the slow tests run
in a subprocess of their own live in ``drivers/`` and are started by path
(``run_driver``, ``Simulation``), so that ruff reads them like any other module.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# Shared with the deployment benchmark, which launches the same processes.
from simulations.loopback import flwr_json, free_ports, launched, listening, tail

__all__ = ["flwr_json", "free_ports", "launched", "listening", "tail"]

#: How much longer than alone a test may take: ``make test`` runs two pytest workers on
#: the machine's cores (pytest-xdist), so a slow test shares them with another; the
#: waits below and the tests' ``timeout`` marks (``conftest.py``) are stretched by this.
TIME_SCALE = 2.0 if os.environ.get("PYTEST_XDIST_WORKER") else 1.0

BIN = Path(sys.executable).parent  # the venv's bin: flower-superlink, flwr, ray, ...
PROJECT = Path(__file__).resolve().parents[1]
DRIVERS = Path(__file__).resolve().parent / "drivers"

# ---------------------------------------------------------------------------------------
# Logs, ports, waiting
# ---------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(check: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    """Poll ``check`` until it holds; fail with the tail of ``log`` after ``timeout`` s."""
    timeout *= TIME_SCALE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tail(log)}")


# ---------------------------------------------------------------------------------------
# Flower's command-line tools
# ---------------------------------------------------------------------------------------


def sim_env(flwr_home: Path) -> dict[str, str]:
    """The environment of a simulation subprocess: its own FLWR_HOME, quiet TF and Flower."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(flwr_home),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "TF_ENABLE_ONEDNN_OPTS": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    }


# ---------------------------------------------------------------------------------------
# Subprocesses in a session of their own
# ---------------------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, session id) of a process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[3])


def session_members(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
            if stat[1] == sid and stat[0] != "Z":
                members.append(int(entry.name))
    return members


def kill_session(sid: int, grace: float = 10.0) -> list[int]:
    """SIGKILL what is left of a session we started; returns the pids that were left."""
    left = session_members(sid)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while session_members(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def driver(name: str) -> Path:
    """The path of ``drivers/<name>.py``."""
    path = DRIVERS / f"{name}.py"
    assert path.is_file(), f"no driver script {path}"
    return path


@dataclass(frozen=True)
class DriverRun:
    """How a driver subprocess ended: exit code (None: killed at the timeout), log, time."""

    rc: int | None
    log: Path
    seconds: float

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def check(self) -> None:
        """A clean exit after the driver's last line (``DRIVER DONE``)."""
        assert self.rc == 0, f"driver exited with {self.rc}\n{tail(self.log)}"
        assert "DRIVER DONE" in self.text(), tail(self.log)


def run_driver(name: str, args: Sequence[str], *, cwd: Path, log: Path,
               timeout: float) -> DriverRun:
    """Run ``drivers/<name>.py args`` in a session of its own, output to ``log``.

    Waits up to ``timeout`` s, then SIGKILLs whatever is left of the session (the driver
    itself when it overran, Ray's processes in any case). FLWR_HOME is ``cwd/flwr-home``.
    """
    started_at = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, str(driver(name)), *args], cwd=cwd,
                                env=sim_env(cwd / "flwr-home"), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout * TIME_SCALE)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            kill_session(proc.pid)
            proc.wait(timeout=30)
    return DriverRun(rc, log, time.monotonic() - started_at)


class Simulation:
    """One ``drivers/federation.py`` subprocess in a session of its own.

    With ``observe`` the driver records, as JSON lines in that file, every reply handed
    to the strategy (``train``/``evaluate``), every instruction pushed (``pushed``),
    every reply the link state received (``stored``) and the end of ``run_federated``
    (``done``); the node id -> partition id map goes to ``<observe>.nodes.json``;
    ``keep_weights`` saves each train reply's weights beside it. ``corrupt``: partitions
    whose shard is truncated before the run.
    """

    def __init__(self, tmp: Path, name: str, run_dir: Path, overrides: list[str],
                 observe: Path | None = None, corrupt: Sequence[int] = (),
                 keep_weights: bool = False) -> None:
        self.run_dir, self.log = run_dir, tmp / f"{name}.log"
        self.observe = observe
        spec = {"overrides": overrides, "run_dir": str(run_dir), "corrupt": list(corrupt),
                "observe": str(observe) if observe else None, "keep_weights": keep_weights}
        (tmp / f"{name}.json").write_text(json.dumps(spec))
        self._out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(driver("federation")), str(tmp / f"{name}.json")],
            cwd=tmp, env=sim_env(tmp / "flwr-home"), stdout=self._out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.started = time.monotonic()

    def wait(self, timeout: float) -> float:
        """Wait for a clean exit; fail with the log's tail otherwise."""
        timeout *= TIME_SCALE
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"simulation still running after {timeout:.0f} s\n{tail(self.log)}")
        seconds = time.monotonic() - self.started
        assert rc == 0, f"simulation exited with {rc}\n{tail(self.log)}"
        assert "DRIVER DONE" in self.log.read_text(errors="replace"), tail(self.log)
        return seconds

    def stop(self) -> list[int]:
        """SIGKILL the whole session (driver, Ray, actors); the pids found alive after."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        time.sleep(2)  # Ray's processes notice their parent's death
        left = kill_session(self.proc.pid)
        self._out.close()
        return left


# ---------------------------------------------------------------------------------------
# Ray nodes
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RayNode:
    """A running ``ray start --block`` and the node's temp dir (its logs, export events)."""

    proc: subprocess.Popen
    temp_dir: Path


@contextmanager
def ray_node(args: Sequence[str], log: Path, env: dict[str, str],
             timeout: float = 120) -> Iterator[RayNode]:
    """One Ray node, ``ray start --block ARGS``, in a session of its own, output to ``log``.

    Yields once the node says it has started (for a worker node: joined the head); fails
    with the log's tail after ``timeout`` s. On the way out the session gets SIGTERM
    (``ray start --block`` then stops its GCS, raylet and workers), SIGKILL for whatever
    is left after 30 s, and the node's temp dir is removed. The temp dir is a short
    ``/tmp/fdray*``: Ray's unix socket paths do not fit under pytest's ``tmp_path``.
    """
    ray_tmp = Path(tempfile.mkdtemp(prefix="fdray"))
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", "--disable-usage-stats",
             f"--temp-dir={ray_tmp}", *args],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: proc.poll() is not None
                 or "Ray runtime started" in log.read_text(errors="replace"),
                 timeout, "ray start", log)
        assert proc.poll() is None, f"ray start exited with {proc.returncode}\n{tail(log)}"
        yield RayNode(proc, ray_tmp)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        kill_session(proc.pid)
        proc.wait(timeout=10)
        shutil.rmtree(ray_tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Test doubles
# ---------------------------------------------------------------------------------------


def hand_snapshots(rng: Any, *, events: Any, categories: Any, numeric: Any, static: Any,
                   decay: Any, interest: Any, n_actions: int, split: int = 0) -> Any:
    """Snapshots of one merchant "m" around the given inputs and labels (``n`` rows):
    30 % of the rows logged with a uniform random action (propensity 1 / ``n_actions``)
    and 30 % of those activated, drawn from ``rng``; every row in split ``split`` (an
    index into ``SPLITS``), no intervention, users u0..u{n-1}."""
    import numpy as np

    from common.snapshots import Snapshots

    n = len(decay)
    action = np.where(rng.random(n) < 0.3, rng.integers(0, n_actions, n), -1).astype(np.int32)
    return Snapshots(
        events=events, categories=categories, numeric=numeric, static=static,
        decay=np.asarray(decay, np.float32), interest=np.asarray(interest, np.float32),
        interest_now=np.ones(n, np.float32),
        action=action,
        activation=np.where(action >= 0, rng.random(n) < 0.3, 0).astype(np.float32),
        propensity=np.where(action >= 0, 1 / n_actions, 1).astype(np.float32),
        intervention=np.full(n, -1, np.int64),
        user_id=np.array([f"u{i}" for i in range(n)], dtype=object),
        merchant_id=np.array(["m"] * n, dtype=object),
        cutoff=np.zeros(n, "datetime64[ns]"),
        split=np.full(n, split, np.int8),
        fading_category=np.array([""] * n, dtype=object),
    )


class FakeGrid:
    """Just enough of a Grid for ``configure_train``: the connected node ids."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


# ---------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------


class RecordingProgress:
    """A :class:`common.progress.Progress` that keeps every step and advance:
    ``steps[description]`` is ``{"total": ..., "unit": ..., "advances": [(amount,
    fields), ...], "closed": bool}``."""

    def __init__(self) -> None:
        self.steps: dict[str, dict[str, Any]] = {}

    def task(self, description: str, total: float | None = None, unit: str = "") -> Any:
        step = {"total": total, "unit": unit, "advances": [], "closed": False}
        self.steps[description] = step

        class _Task:
            def advance(self, amount: float = 1.0, **fields: Any) -> None:
                step["advances"].append((amount, fields))

            def __enter__(self) -> _Task:
                return self

            def __exit__(self, *exc: object) -> None:
                step["closed"] = True

        return _Task()

    def done(self, description: str) -> float:
        """Units advanced in the step ``description``."""
        return sum(a for a, _ in self.steps[description]["advances"])
