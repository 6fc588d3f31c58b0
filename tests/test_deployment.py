"""A real deployment on loopback: merchants' own files on SuperNodes behind TLS and auth.

One ``flower-superlink`` with TLS and SuperNode authentication; three registered
SuperNodes, each holding one merchant's events in another format (canonical CSV,
canonical Parquet, Taobao's headerless CSV); a fourth node whose key was never
registered, and a fifth, registered node whose file names unknown events. ``flwr run .``
submits two rounds in ``federation.mode = "deployment"`` with client-side evaluation.

Checked: the stranger is refused; the run finishes; ``metrics.jsonl`` holds both
rounds with three replies each, the bad node's failure and the clients' evaluation;
every good merchant trained and evaluated in both rounds (its own log says so); the bad
node's log carries one line per message naming the file problem, while the server
only learns the kind of error (no rows or values cross the network).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from io import BytesIO
from pathlib import Path

import pandas as pd
import pytest
from helpers import (
    BIN,
    PROJECT,
    driver,
    flwr_json,
    free_ports,
    launched,
    listening,
    tail,
    wait_for,
)

from common.config import SnapshotConfig
from common.io import write_events
from server.certs import make_certs, make_node_key
from server.config import FederationConfig
from simulations.apps import deployment_config, deployment_run_dir, is_deployment, prepare_run
from simulations.experiment import shared_calendar
from simulations.synth import generate_federation, load_preset, synth_config_from_preset

ROOT = PROJECT
CONNECTION = "fedecay-deploy"
ROUNDS = 2
#: The three smallest merchants of the quick preset, seed 0, and the format each uses.
MERCHANTS = {"m04": "csv", "m03": "parquet", "m01": "taobao"}
TAOBAO_BEHAVIOUR = {"view": "pv", "click": "pv", "cart": "cart", "favorite": "fav",
                    "purchase": "buy"}


def write_merchant_files(out: Path) -> tuple[dict[str, tuple[Path, str]], SnapshotConfig]:
    """One file per merchant in its format's real layout, plus the pooled calendar."""
    fed = generate_federation(synth_config_from_preset(load_preset("quick")), seed=0)
    out.mkdir(parents=True)
    files: dict[str, tuple[Path, str]] = {}
    for merchant, kind in MERCHANTS.items():
        part = fed.events[fed.events["merchant_id"].astype(str) == merchant]
        if kind == "csv":
            files[merchant] = (write_events(part, out / f"{merchant}.csv"), "canonical")
        elif kind == "parquet":
            files[merchant] = (write_events(part, out / f"{merchant}.parquet"), "canonical")
        else:
            # UserBehavior.csv: no header; integer ids; pv/cart/fav/buy; unix seconds.
            # Taobao has no separate click: a click is logged as a page view.
            table = pd.DataFrame({
                "user_id": pd.factorize(part["user_id"])[0] + 1,
                "item_id": pd.factorize(part["item_id"])[0] + 1,
                "category_id": pd.factorize(part["category_id"])[0] + 1,
                "behavior_type": part["event"].astype(str).map(TAOBAO_BEHAVIOUR),
                "timestamp": part["timestamp"].astype("int64") // 10**9,
            })
            path = out / f"{merchant}-UserBehavior.csv"
            table.to_csv(path, header=False, index=False)
            files[merchant] = (path, "taobao")
    # A merchant who exported its own event names instead of the canonical ones.
    bad = pd.read_csv(files["m04"][0]).head(500)
    bad["event"] = bad["event"].map({"view": "page_view", "click": "tap"}).fillna("checkout")
    bad_path = out / "bad-events.csv"
    bad.to_csv(bad_path, index=False)
    files["bad"] = (bad_path, "canonical")
    return files, shared_calendar(fed.events, SnapshotConfig())


def _children(pids: set[int]) -> set[int]:
    """Every live descendant of ``pids`` (Flower spawns SuperExec, ServerApp, ClientApps)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), set(pids)
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def _stop_leftovers(pids: set[int]) -> None:
    """Stop, by PID, the Flower processes that outlived the ones this test started."""
    for pid in sorted(pids):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue  # already gone
        if b"flwr" in cmdline or b"flower" in cmdline:
            os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------
# Deployment mode of the apps
# ---------------------------------------------------------------------------------------


def test_federation_mode_is_validated() -> None:
    assert FederationConfig().mode == "simulation"
    with pytest.raises(ValueError, match="'federation.mode'"):
        FederationConfig(mode="production")
    with pytest.raises(ValueError, match="'federation.eval-data'"):
        FederationConfig(mode="deployment", eval_data="/pooled/eval.npz")
    assert is_deployment({"federation.mode": "deployment"})
    assert not is_deployment({"experiment.preset": "quick"})


def test_deployment_config_takes_settings_but_no_data_from_the_preset() -> None:
    run = {"experiment.preset": "quick", "federation.mode": "deployment",
           "train.batch-size": 7}
    flat = deployment_config(run)
    assert not [k for k in flat if k.startswith("synthetic.")]
    assert flat["train.batch-size"] == 7  # the run config wins over the preset
    assert flat["snapshots.observation-days"] == load_preset("quick")["snapshots.observation-days"]
    assert flat["federation.eval-data"] == ""
    assert flat["model.jit-compile"] is False  # one fit per process: compiling costs more


def test_deployment_run_dir_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    assert deployment_run_dir({"federation.run-dir": "pilot"}) == tmp_path / "runs" / "pilot"
    assert deployment_run_dir({"federation.run-dir": str(tmp_path / "x")}) == tmp_path / "x"
    auto = deployment_run_dir({"federation.run-dir": ""})
    assert auto.parent == tmp_path / "runs" and auto.name.startswith("deployment-")


def test_server_side_of_a_deployment_prepares_no_data(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    run = {"experiment.preset": "quick", "federation.mode": "deployment",
           "federation.run-dir": "pilot", "snapshots.start": "2025-01-01",
           "snapshots.end": "2025-03-31T23:59:59+00:00"}
    flat = prepare_run(run)
    run_dir = tmp_path / "runs" / "pilot"
    assert flat["federation.run-dir"] == str(run_dir)
    assert [p.name for p in run_dir.iterdir()] == ["resolved-config.json"]  # no shards
    assert flat["snapshots.start"] == "2025-01-01" and flat["federation.eval-data"] == ""
    with pytest.raises(ValueError, match="'snapshots.start-day'"):
        prepare_run({**run, "snapshots.start-day": "2025-01-01"})


def test_client_rejects_a_bad_file_before_importing_tensorflow(tmp_path: Path) -> None:
    bad = tmp_path / "events.csv"
    bad.write_text("user_id,timestamp,event\nu1,2025-01-01T10:00:00Z,page_view\n"
                   "u1,2025-01-02T10:00:00Z,purchase\n")
    done = subprocess.run([sys.executable, str(driver("deployment_client")), str(bad)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    code, reason, tf_imported = done.stdout.strip().split("|")
    assert (code, tf_imported) == ("100", "False"), done.stderr
    assert reason == ("merchant data rejected (DataError); the reason is in this merchant's "
                      "SuperNode log")  # the server does not see the offending values
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [f"ERROR client.app: merchant data rejected: {bad}: column 'event' has "
                     "unknown or missing event name(s) at data row 1 ('page_view') (file line "
                     "2); expected "
                     "one of view, click, cart, favorite, purchase"], done.stderr


def test_fab_leaves_out_environment_and_outputs() -> None:
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.constant import FAB_MAX_SIZE

    fab = build_fab_from_disk(ROOT)
    names = zipfile.ZipFile(BytesIO(fab)).namelist()
    assert len(fab) < FAB_MAX_SIZE
    assert "simulations/apps.py" in names and "simulations/presets/quick.toml" in names
    assert not [n for n in names if n.startswith((".venv/", "runs/", ".flwr/", "tests/"))]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_deployment_with_tls_auth_and_merchant_files(tmp_path: Path) -> None:
    for tool in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr"):
        if not (BIN / tool).exists():
            pytest.skip(f"{tool} not installed beside {sys.executable}")
    started = time.monotonic()
    files, calendar = write_merchant_files(tmp_path / "data")
    certs = make_certs(tmp_path / "certs")
    names = [*MERCHANTS, "bad"]
    keys = {name: make_node_key(tmp_path / "keys", name) for name in [*names, "stranger"]}
    link_port, *node_ports = free_ports(1 + len(keys))
    ports = dict(zip(keys, node_ports, strict=True))
    home = tmp_path / "coordinator"
    home.mkdir()
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "TF_ENABLE_ONEDNN_OPTS": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{link_port}"\n'
        f'root-certificates = "{certs["ca_cert"]}"\n'
    )
    logs = {name: tmp_path / f"node-{name}.log" for name in keys}
    link_log, run_log = tmp_path / "superlink.log", tmp_path / "flwr-run.log"

    def supernode(name: str) -> tuple[list[str], Path, dict[str, str]]:
        node_home = tmp_path / "nodes" / name  # each merchant has its own machine
        node_home.mkdir(parents=True)
        path, fmt = files.get(name, files["m04"])
        cmd = [
            str(BIN / "flower-supernode"),
            "--superlink", f"127.0.0.1:{link_port}",
            "--root-certificates", str(certs["ca_cert"]),
            "--auth-supernode-private-key", str(keys[name]["private_key"]),
            "--node-config", f"data-path='{path}' format='{fmt}'",
            "--port", str(ports[name]),
        ]
        return cmd, logs[name], {**env, "FLWR_HOME": str(node_home)}

    superlink_cmd = [
        str(BIN / "flower-superlink"),
        "--ssl-ca-certfile", str(certs["ca_cert"]),
        "--ssl-certfile", str(certs["server_cert"]),
        "--ssl-keyfile", str(certs["server_key"]),
        "--enable-supernode-auth",
        "--host", "127.0.0.1",
        "--port", str(link_port),
    ]
    with ExitStack() as stack:  # every process is stopped by its PID on the way out
        leftovers: set[int] = set()
        stack.callback(lambda: _stop_leftovers(leftovers))  # runs last
        link = stack.enter_context(launched(superlink_cmd, link_log, env))
        wait_for(lambda: link.poll() is not None or listening(link_port), 60,
                  "the SuperLink", link_log)
        assert link.poll() is None, tail(link_log)
        with ThreadPoolExecutor(len(names)) as pool:  # the CLI starts slowly: in parallel
            registered = dict(zip(names, pool.map(lambda n: flwr_json(
                ["supernode", "register", str(keys[n]["public_key"]), CONNECTION, "--name", n],
                env), names), strict=True))
        assert all(done["success"] for done in registered.values()), registered
        node_ids = {name: int(done["node-id"]) for name, done in registered.items()}
        nodes = {name: stack.enter_context(launched(*supernode(name)))
                 for name in keys}
        started_pids = {link.pid, *(node.pid for node in nodes.values())}
        # Runs first: note the children before their parents are stopped.
        stack.callback(lambda: leftovers.update(_children(started_pids)))

        # Round 1 samples the nodes online when it starts: wait for all four.
        for name in names:
            wait_for(lambda n=name: f"SuperNode ID: {node_ids[n]}" in logs[n].read_text(
                errors="replace"), 90, f"node {name} online", logs[name])
        listed = flwr_json(["supernode", "list"], env)
        assert listed["success"], listed
        online = {int(n["node-id"]) for n in listed["nodes"] if n["status"] == "online"}
        assert online == set(node_ids.values()), listed

        run_config = " ".join([
            "federation.mode='deployment'",
            f"federation.num-rounds={ROUNDS}",
            "federation.fraction-evaluate=1.0",
            "federation.run-dir='deploy-test'",
            f"snapshots.start='{calendar.start}'",
            f"snapshots.end='{calendar.end}'",
        ])
        with run_log.open("wb") as out:
            run = subprocess.run(
                [str(BIN / "flwr"), "run", ".", CONNECTION, "-c", run_config, "--stream"],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=420,
                check=False,
            )
        run_dir = home / "runs" / "deploy-test"  # relative run-dir: under $FLWR_HOME/runs
        metrics = run_dir / "metrics.jsonl"
        context = "\n".join([tail(run_log), *(tail(logs[n], 15) for n in names)])
        assert run.returncode == 0, context
        assert (run_dir / "federation.json").exists(), context
        assert (run_dir / "model.keras").exists(), context
        listed = flwr_json(["list"], env)
        assert listed["success"], listed
        assert [r["status"] for r in listed["runs"]] == ["finished:completed"], listed

        # The node whose key was never registered was refused and exited long ago.
        wait_for(lambda: nodes["stranger"].poll() is not None, 60, "the stranger's exit",
                  logs["stranger"])
        assert nodes["stranger"].returncode != 0
        assert "Failed to activate SuperNode" in logs["stranger"].read_text(errors="replace")
        assert "No SuperNode found with the given public key" in link_log.read_text()
        for name in names:  # a bad file fails the node's replies, not the node
            assert nodes[name].poll() is None, tail(logs[name])
        elapsed = time.monotonic() - started

    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [line["round"] for line in lines] == list(range(ROUNDS + 1))
    assert all(line["centralised"] == {} for line in lines)  # the server holds no data
    for line in lines[1:]:
        assert (line["sampled"], line["replied"], line["failed"]) == (4, 3, 1), line
        assert line["rejected"] == 0, line
        assert line["failures"] == [f"node {node_ids['bad']}: merchant data rejected "
                                    "(DataError); the reason is in this merchant's "
                                    "SuperNode log"], line
        assert line["train"]["epochs"] == 1 and line["train"]["train_loss"] > 0, line
        assert 0 < line["client_eval"]["eval_loss"] < 10, line
        assert 0 <= line["client_eval"]["decay_accuracy"] <= 1, line

    resolved = json.loads((run_dir / "resolved-config.json").read_text())
    assert resolved["federation.mode"] == "deployment"
    assert resolved["federation.eval-data"] == ""
    assert not any(k.startswith("synthetic.") for k in resolved)
    assert not (run_dir / "shards").exists()

    for name in MERCHANTS:
        text = logs[name].read_text(errors="replace")
        for r in range(1, ROUNDS + 1):
            assert re.search(rf"train round {r}: handler began [\d.]+ s after process start",
                             text), tail(logs[name])
            assert re.search(rf"evaluate round {r}: handler began [\d.]+ s", text), tail(
                logs[name])
        assert "rejected" not in text, tail(logs[name])
    bad = logs["bad"].read_text(errors="replace")
    rejected = [line for line in bad.splitlines() if "merchant data rejected" in line]
    assert len(rejected) == 2 * ROUNDS, tail(logs["bad"])  # train + evaluate, each round
    for line in rejected:
        assert "bad-events.csv: column 'event' has unknown or missing event name(s)" in line
        assert "'page_view'" in line and "expected one of view, click" in line
    assert "Traceback" not in bad and "handler began" not in bad, tail(logs["bad"])
    print(f"deployment test: {elapsed:.0f} s with processes, run log {run_log}")
