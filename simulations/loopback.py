"""A real deployment on one machine: a TLS SuperLink with node authentication, one
SuperNode per merchant file (optionally with its warm trainer), ``flwr run`` on top.

Shared by ``tests/test_deployment.py`` and the deployment benchmark
(:mod:`simulations.deploy_bench`). Every process is started here and stopped by its
PID (Flower's children of the SuperLink and SuperNodes included); nothing listens
beyond 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing
from pathlib import Path

BIN = Path(sys.executable).parent  # the venv's bin: flower-superlink, flwr, fedecay
PROJECT = Path(__file__).resolve().parents[1]
CONNECTION = "fedecay-loopback"
TOOLS = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr")


# ---------------------------------------------------------------------------------------
# Logs, ports, processes
# ---------------------------------------------------------------------------------------


def tail(log: Path, lines: int = 60) -> str:
    """The end of a log, headed by its path."""
    text = log.read_text(errors="replace") if log.exists() else "(no log)"
    return f"--- {log} ---\n" + "\n".join(text.splitlines()[-lines:])


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports on loopback."""
    with ExitStack() as stack:  # hold all sockets until every port is picked
        socks = [stack.enter_context(closing(socket.socket())) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def listening(port: int) -> bool:
    """Whether something accepts connections on ``127.0.0.1:port``."""
    with closing(socket.socket()) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_until(check: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    """Poll ``check`` until it holds; TimeoutError with the tail of ``log`` after
    ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail(log)}")


@contextlib.contextmanager
def launched(cmd: list[str], log: Path, env: Mapping[str, str]
             ) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` with output to ``log``; stop it by its PID on the way out."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(env))
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


def flwr_json(args: list[str], env: Mapping[str, str], timeout: float = 120) -> dict:
    """``flwr ... --format json`` (it exits 0 even on failure: read ``success``)."""
    try:
        done = subprocess.run([str(BIN / "flwr"), *args, "--format", "json"], env=dict(env),
                              capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"success": False, "error-message": f"flwr {args[0]} timed out"}
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        return {"success": False, "error-message": done.stdout + done.stderr}


def descendants(pids: set[int]) -> set[int]:
    """Every live descendant of ``pids`` (Flower spawns SuperExec, ServerApp, ClientApps)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found: set[int] = set()
    frontier = set(pids)
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def stop_flower_leftovers(pids: set[int]) -> None:
    """SIGKILL, by PID, the Flower processes among ``pids`` that are still alive."""
    for pid in sorted(pids):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue  # already gone
        if b"flwr" in cmdline or b"flower" in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def flower_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of the Flower processes: their FLWR_HOME, quiet TensorFlow, no
    dependency installation, no update check, no telemetry."""
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "TF_ENABLE_ONEDNN_OPTS": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        **(extra or {}),
    }


# ---------------------------------------------------------------------------------------
# The federation
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Node:
    """One merchant's SuperNode: its file, whether its key is registered, whether a
    warm trainer (``fedecay merchant serve``) runs beside it."""

    data_path: Path
    format: str = "auto"
    registered: bool = True
    trainer: bool = False


class LoopbackFederation:
    """A SuperLink with TLS and node authentication plus one SuperNode per :class:`Node`,
    all on 127.0.0.1, under ``work_dir``; used as a context manager, which stops every
    process it started (and their Flower children) on the way out.

    ``extra_env`` goes to every Flower process (e.g. ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``).
    After :meth:`start`: ``node_ids`` (registered nodes), ``logs``, ``nodes`` (the
    SuperNode processes), ``link`` and ``link_log``.
    """

    def __init__(self, work_dir: Path, nodes: Mapping[str, Node],
                 extra_env: Mapping[str, str] | None = None) -> None:
        self.work_dir = Path(work_dir).absolute()
        self.specs = dict(nodes)
        self.home = self.work_dir / "coordinator"
        self.env = flower_env(self.home, extra_env)
        self.extra_env = dict(extra_env or {})
        self.logs = {name: self.work_dir / f"node-{name}.log" for name in self.specs}
        self.trainer_logs = {name: self.work_dir / f"trainer-{name}.log"
                             for name, spec in self.specs.items() if spec.trainer}
        self.link_log = self.work_dir / "superlink.log"
        self.node_ids: dict[str, int] = {}
        self.nodes: dict[str, subprocess.Popen] = {}
        self.trainers: dict[str, subprocess.Popen] = {}
        self.link: subprocess.Popen | None = None
        self._stack = ExitStack()
        self._leftovers: set[int] = set()

    def __enter__(self) -> LoopbackFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the trainers, SuperNodes and SuperLink by PID, then their leftovers."""
        started = {p.pid for p in [*self.nodes.values(), *self.trainers.values()]}
        if self.link is not None:
            started.add(self.link.pid)
        self._leftovers |= descendants(started)
        self._stack.close()
        stop_flower_leftovers(self._leftovers)

    def start(self, online_timeout: float = 120) -> None:
        """Certificates, keys, the SuperLink, the registrations, the trainers and the
        SuperNodes; returns once every registered node is online."""
        from server.certs import make_certs, make_node_key

        self.home.mkdir(parents=True, exist_ok=True)
        certs = make_certs(self.work_dir / "certs")
        keys = {name: make_node_key(self.work_dir / "keys", name) for name in self.specs}
        link_port, *node_ports = free_ports(1 + len(self.specs))
        self.link_port = link_port
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{link_port}"\n'
            f'root-certificates = "{certs["ca_cert"]}"\n')
        self.link = self._stack.enter_context(launched([
            str(BIN / "flower-superlink"),
            "--ssl-ca-certfile", str(certs["ca_cert"]),
            "--ssl-certfile", str(certs["server_cert"]),
            "--ssl-keyfile", str(certs["server_key"]),
            "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(link_port),
        ], self.link_log, self.env))
        link = self.link
        wait_until(lambda: link.poll() is not None or listening(link_port), 60,
                   "the SuperLink", self.link_log)
        if link.poll() is not None:
            raise RuntimeError(f"the SuperLink exited\n{tail(self.link_log)}")
        names = [n for n, spec in self.specs.items() if spec.registered]
        with ThreadPoolExecutor(max(len(names), 1)) as pool:  # the CLI starts slowly
            registered = dict(zip(names, pool.map(lambda n: flwr_json(
                ["supernode", "register", str(keys[n]["public_key"]), CONNECTION,
                 "--name", n], self.env), names), strict=True))
        failed = {n: r for n, r in registered.items() if not r.get("success")}
        if failed:
            raise RuntimeError(f"registration failed: {failed}")
        self.node_ids = {n: int(r["node-id"]) for n, r in registered.items()}
        for name in self.trainer_logs:
            self._start_trainer(name)
        for name, port in zip(self.specs, node_ports, strict=True):
            self._start_node(name, port, certs["ca_cert"], keys[name]["private_key"])
        for name in names:  # round 1 samples the nodes online when it starts
            wait_until(functools.partial(self.online, name), online_timeout,
                       f"node {name} online", self.logs[name])

    def online(self, name: str) -> bool:
        """Whether registered node ``name`` says it joined (its log names its id)."""
        return f"SuperNode ID: {self.node_ids[name]}" in self.logs[name].read_text(
            errors="replace")

    def trainer_socket(self, name: str) -> Path:
        """Where node ``name``'s trainer listens (short: AF_UNIX paths have 108 bytes)."""
        return self.work_dir / "run" / f"{name}.sock"

    def _node_config(self, name: str) -> str:
        spec = self.specs[name]
        parts = [f"data-path='{spec.data_path}'", f"format='{spec.format}'"]
        if spec.trainer:
            parts.append(f"trainer-socket='{self.trainer_socket(name)}'")
        return " ".join(parts)

    def _start_trainer(self, name: str) -> None:
        spec, sock = self.specs[name], self.trainer_socket(name)
        sock.parent.mkdir(mode=0o700, exist_ok=True)
        cmd = [sys.executable, "-m", "simulations.cli", "merchant", "serve",
               "--data-path", str(spec.data_path), "--format", spec.format,
               "--socket", str(sock)]
        log = self.trainer_logs[name]
        proc = self._stack.enter_context(launched(cmd, log, {**self.env, "PYTHONPATH": str(
            PROJECT)}))
        self.trainers[name] = proc
        wait_until(lambda: proc.poll() is not None or sock.is_socket(), 180,
                   f"trainer {name}", log)
        if proc.poll() is not None:
            raise RuntimeError(f"trainer {name} exited\n{tail(log)}")

    def _start_node(self, name: str, port: int, ca: Path, key: Path) -> None:
        node_home = self.work_dir / "nodes" / name  # each merchant has its own machine
        node_home.mkdir(parents=True, exist_ok=True)
        cmd = [str(BIN / "flower-supernode"),
               "--superlink", f"127.0.0.1:{self.link_port}",
               "--root-certificates", str(ca), "--auth-supernode-private-key", str(key),
               "--node-config", self._node_config(name), "--port", str(port)]
        self.nodes[name] = self._stack.enter_context(launched(
            cmd, self.logs[name], flower_env(node_home, self.extra_env)))

    def run(self, run_config: Sequence[str], log: Path, timeout: float = 900) -> float:
        """``flwr run . --stream -c RUN_CONFIG`` from the project; its seconds.

        Raises
        ------
        RuntimeError
            ``flwr run`` failed or ran out of time.
        """
        started = time.monotonic()
        with log.open("wb") as out:
            done = subprocess.run(
                [str(BIN / "flwr"), "run", ".", CONNECTION, "-c", " ".join(run_config),
                 "--stream"], cwd=PROJECT, env=self.env, stdout=out,
                stderr=subprocess.STDOUT, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"flwr run exited with {done.returncode}\n{tail(log)}")
        return time.monotonic() - started

    def run_dir(self, name: str) -> Path:
        """A relative ``federation.run-dir``'s folder (under the SuperLink's FLWR_HOME)."""
        return self.home / "runs" / name


def missing_tools() -> list[str]:
    """Flower's command-line tools not installed beside this Python."""
    return [tool for tool in TOOLS if not (BIN / tool).exists()]


