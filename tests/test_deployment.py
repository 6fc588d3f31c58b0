"""A real deployment on loopback: merchants' own files on SuperNodes behind TLS and auth.

One ``flower-superlink`` with TLS and SuperNode authentication; three registered
SuperNodes, each holding one merchant's events in another format (canonical CSV,
canonical Parquet, Taobao's headerless CSV); a fourth node whose key was never
registered, and a fifth, registered node whose file names unknown events. ``flwr run .``
submits two rounds in ``federation.mode = "deployment"`` with client-side evaluation.

Checked: the stranger is refused; the run finishes; ``metrics.jsonl`` holds both
rounds with three replies each, the bad node's failure and the clients' evaluation;
every good merchant trained and evaluated in both rounds (its own log says so); the bad
node's log carries one line naming the file problem, and it never imported TensorFlow.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import zipfile
from contextlib import ExitStack
from io import BytesIO
from pathlib import Path

import pandas as pd
import pytest
from test_deploy import BIN, _flwr, _free_ports, _listening, _started, _tail, _wait_for

from common.config import SnapshotConfig
from common.io import write_events
from simulations.deploy import make_certs, make_node_key
from simulations.experiment import shared_calendar
from simulations.synth import generate_federation, load_preset, synth_config_from_preset

ROOT = Path(__file__).resolve().parents[1]
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


def test_fab_leaves_out_environment_and_outputs() -> None:
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.constant import FAB_MAX_SIZE

    fab = build_fab_from_disk(ROOT)
    names = zipfile.ZipFile(BytesIO(fab)).namelist()
    assert len(fab) < FAB_MAX_SIZE
    assert "simulations/apps.py" in names and "simulations/presets/quick.toml" in names
    assert not [n for n in names if n.startswith((".venv/", "runs/", ".flwr/", "tests/"))]


@pytest.mark.slow
@pytest.mark.timeout(330)
def test_deployment_with_tls_auth_and_merchant_files(tmp_path: Path) -> None:
    for tool in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr"):
        if not (BIN / tool).exists():
            pytest.skip(f"{tool} not installed beside {sys.executable}")
    started = time.monotonic()
    files, calendar = write_merchant_files(tmp_path / "data")
    certs = make_certs(tmp_path / "certs")
    names = [*MERCHANTS, "bad"]
    keys = {name: make_node_key(tmp_path / "keys", name) for name in [*names, "stranger"]}
    link_port, *node_ports = _free_ports(1 + len(keys))
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
        link = stack.enter_context(_started(superlink_cmd, link_log, env))
        _wait_for(lambda: link.poll() is not None or _listening(link_port), 60,
                  "the SuperLink", link_log)
        assert link.poll() is None, _tail(link_log)
        node_ids = {}
        for name in names:
            done = _flwr(["supernode", "register", str(keys[name]["public_key"]), CONNECTION],
                         env)
            assert done["success"], done
            node_ids[name] = int(done["node-id"])
        nodes = {name: stack.enter_context(_started(*supernode(name)))
                 for name in keys}

        # The node whose key was never registered is refused and exits.
        _wait_for(lambda: nodes["stranger"].poll() is not None, 60, "the stranger's exit",
                  logs["stranger"])
        assert nodes["stranger"].returncode != 0
        assert "Failed to activate SuperNode" in logs["stranger"].read_text(errors="replace")
        assert "No SuperNode found with the given public key" in link_log.read_text()

        def online() -> set[int]:
            listed = _flwr(["supernode", "list"], env)
            assert listed["success"], listed
            return {int(n["node-id"]) for n in listed["nodes"] if n["status"] == "online"}

        # Round 1 samples the nodes online when it starts: wait for all four.
        _wait_for(lambda: online() == set(node_ids.values()), 60, "four nodes online",
                  link_log)

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
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=240,
                check=False,
            )
        run_dir = home / "runs" / "deploy-test"  # relative run-dir: under $FLWR_HOME/runs
        metrics = run_dir / "metrics.jsonl"
        context = "\n".join([_tail(run_log), *(_tail(logs[n], 15) for n in names)])
        assert run.returncode == 0, context
        assert (run_dir / "federation.json").exists(), context
        assert (run_dir / "model.keras").exists(), context
        listed = _flwr(["list"], env)
        assert listed["success"], listed
        assert [r["status"] for r in listed["runs"]] == ["finished:completed"], listed
        for name in [*names, "stranger"]:
            if name != "stranger":
                assert nodes[name].poll() is None, _tail(logs[name])
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
        assert line["train"]["num-examples"] > 0, line
        assert line["client_eval"]["num-examples"] > 0, line
        assert 0 < line["client_eval"]["eval_loss"] < 10, line

    resolved = json.loads((run_dir / "resolved-config.json").read_text())
    assert resolved["federation.mode"] == "deployment"
    assert resolved["federation.eval-data"] == ""
    assert not any(k.startswith("synthetic.") for k in resolved)
    assert not (run_dir / "shards").exists()

    for name in MERCHANTS:
        text = logs[name].read_text(errors="replace")
        for r in range(1, ROUNDS + 1):
            assert re.search(rf"train round {r}: handler began [\d.]+ s after process start",
                             text), _tail(logs[name])
        assert len(re.findall(r"INFO client\.app: evaluate: ", text)) == ROUNDS, _tail(
            logs[name])
        assert "rejected" not in text, _tail(logs[name])
    bad = logs["bad"].read_text(errors="replace")
    rejected = [line for line in bad.splitlines() if "merchant data rejected" in line]
    assert len(rejected) == 2 * ROUNDS, _tail(logs["bad"])  # train + evaluate, each round
    for line in rejected:
        assert "bad-events.csv: column 'event' has unknown or missing event name(s)" in line
        assert "'page_view'" in line and "expected one of view, click" in line
    assert "Traceback" not in bad and "handler began" not in bad, _tail(logs["bad"])
    print(f"deployment test: {elapsed:.0f} s with processes, run log {run_log}")
