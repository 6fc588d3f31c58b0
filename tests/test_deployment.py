"""A real deployment on loopback: merchants' own files on SuperNodes behind TLS and auth.

One ``flower-superlink`` with TLS and SuperNode authentication; three registered
SuperNodes, each holding one merchant's events in another format (canonical CSV,
canonical Parquet, Taobao's headerless CSV); a fourth node whose key was never
registered, and a fifth, registered node whose file names unknown events. ``flwr run .``
submits two rounds in ``federation.mode = "deployment"`` with client-side evaluation.
Two of the three merchants run a warm trainer (``fedecay merchant serve``) beside their
SuperNode; the third and the bad node work in their ClientApp processes. The processes
are launched by :mod:`simulations.loopback`, which the deployment benchmark shares.

Checked: the stranger is refused; the run finishes; ``metrics.jsonl`` holds both
rounds with three replies each, the bad node's failure and the clients' evaluation;
every good merchant trained and evaluated in both rounds (its own log says so, and says
whether its trainer did the work; the trainers are still up after the run); the bad
node's log carries one line per message naming the file problem, while the server
only learns the kind of error (no rows or values cross the network).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import zipfile
from io import BytesIO
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from helpers import (
    PROJECT,
    driver,
    flwr_json,
    tail,
    wait_for,
)

from common.config import SnapshotConfig
from common.io import write_events
from server.config import FederationConfig
from simulations.apps import deployment_config, deployment_run_dir, is_deployment, prepare_run
from simulations.experiment import shared_calendar
from simulations.loopback import LoopbackFederation, Node, missing_tools
from simulations.synth import generate_federation, load_preset, synth_config_from_preset

ROOT = PROJECT
ROUNDS = 2
#: The three smallest merchants of the quick preset, seed 0, and the format each uses.
MERCHANTS = {"m04": "csv", "m03": "parquet", "m01": "taobao"}
#: The merchants that run a warm trainer beside their SuperNode (the others do not).
WARM = ("m04", "m01")
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


def test_every_key_flwr_run_c_takes_is_a_known_setting_and_the_head_refit_is_one() -> None:
    """``flwr run -c`` takes only the keys pyproject declares: each must be a setting
    the run reads, and a deployment must be able to turn the head refit off (its sums
    leave the merchants unnoised; only a preset file could before)."""
    import tomllib

    from simulations.settings import experiment_from_flat

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
        "config"]
    assert "federation.head-refit-steps" in declared
    exp = experiment_from_flat(deployment_config(
        {**declared, "federation.mode": "deployment", "federation.head-refit-steps": 0}))
    assert exp.federation.head_refit_steps == 0


def test_deployment_run_dir_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    assert deployment_run_dir({"federation.run-dir": "pilot"}) == tmp_path / "runs" / "pilot"
    assert deployment_run_dir({"federation.run-dir": str(tmp_path / "x")}) == tmp_path / "x"
    auto = deployment_run_dir({"federation.run-dir": ""})
    assert auto.parent == tmp_path / "runs" and auto.name.startswith("deployment-")


def test_server_side_of_a_deployment_prepares_no_data(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
        ) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    run = {"experiment.preset": "quick", "federation.mode": "deployment",
           "federation.run-dir": "pilot", "snapshots.start": "2025-01-01",
           "snapshots.end": "2025-03-31T23:59:59+00:00", "federation.fraction-evaluate": 0.0}
    flat = prepare_run(run)
    # fraction-evaluate 0 is what docs/deployment.md advises: pre-evaluate (on in
    # deployment) still scores every round's model, and the best is kept.
    assert "no model will be evaluated" not in caplog.text
    prepare_run({**run, "federation.pre-evaluate": "off"})
    assert "no model will be evaluated; the last round's model is kept" in caplog.text
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
    assert lines == ["INFO client.app: no warm trainer listening for this node: train in "
                     "this process",
                     f"ERROR client.app: merchant data rejected: {bad}: column 'event' has "
                     "unknown or missing event name(s) at data row 1 ('page_view') (file line "
                     "2); expected "
                     "one of view, click, cart, favorite, purchase"], done.stderr


def _train_message(run_config: dict[str, Any], node_config: dict[str, Any]) -> tuple[Any, Any]:
    """A server's train message for round 1 and a deployed node's Context."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Metadata, RecordDict
    from flwr.app.message.message import make_message

    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config=run_config,
                      node_config=node_config)
    meta = Metadata(run_id=1, message_id="m", src_node_id=1, dst_node_id=7,
                    reply_to_message_id="", group_id="1", created_at=time.time(), ttl=600,
                    message_type="train")
    content = RecordDict({"arrays": ArrayRecord([]),
                          "config": ConfigRecord({"server-round": 1})})
    return make_message(meta, content), context


@pytest.mark.parametrize(("extra", "key", "logged"), [
    ({"interventions_path": "/data/interventions.csv"}, "interventions_path",
     "did you mean 'interventions-path'?"),
    ({"head_refit": False}, "head_refit", "did you mean 'head-refit'?"),
    ({"head-refit": "flase"}, "head-refit", "'flase' is neither a yes"),
    ({"fromat": "taobao"}, "fromat", "did you mean 'format'?"),
    ({"trainer_socket": "/run/m.sock"}, "trainer_socket", "did you mean 'trainer-socket'?"),
    ({"colour": "red"}, "colour", "a merchant's node takes data-path, format,"),
    ({"data-path": "events.csv"}, "data-path", "'events.csv' is not an absolute path"),
    ({"data-path": ""}, "data-path", "'' is not an absolute path"),
])
def test_a_misspelt_or_bad_node_config_key_fails_the_reply_by_name(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, extra: dict[str, Any], key: str,
        logged: str) -> None:
    """A deployed node's unknown key was ignored without a word (a misspelt
    ``interventions-path`` trained without the interventions, a misspelt ``head-refit``
    joined the refit the merchant meant to decline): the reply now fails naming the key
    to the server, and the merchant's log says what was expected."""
    from client.app import make_client_app

    good = tmp_path / "events.csv"
    good.write_text("user_id,timestamp,event\nu1,2025-01-01T10:00:00Z,view\n")
    node = {"data-path": str(good), "format": "canonical", **extra}
    msg, context = _train_message({"experiment.preset": "quick",
                                   "federation.mode": "deployment"}, node)
    with caplog.at_level("ERROR", logger="client.app"):
        reply = make_client_app(resolve=deployment_config)(msg, context)
    assert reply.has_error() and reply.error.code == 100
    assert reply.error.reason == (f"merchant node config rejected (key {key!r}); the reason "
                                  "is in this merchant's SuperNode log")
    assert f"node config key {key!r}: " in caplog.text and logged in caplog.text


def test_good_node_configs_pass_the_check(tmp_path: Path) -> None:
    from client.config import NodeConfigError, check_node_config

    check_node_config({"data-path": "/data/events.csv", "format": "canonical",
                       "interventions-path": "/data/i.csv", "trainer-socket": "~/m.sock",
                       "head-refit": False})
    for refit in (True, "off", "No", 0, "1"):
        check_node_config({"data-path": "/data/events.csv", "head-refit": refit})
    check_node_config({"partition-id": 3, "num-partitions": 10})  # a simulation's node
    check_node_config({})  # the loader names the missing data-path
    with pytest.raises(NodeConfigError, match="'data_path': unknown: did you mean 'data-path'"):
        check_node_config({"data_path": "/data/events.csv"})


def test_a_named_trainer_socket_nobody_listens_on_is_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A merchant who names its trainer's socket and whose trainer stopped (or lost its
    socket) hears it as a warning, not as the info line of a node without a trainer."""
    from client.app import warm_reply
    from client.timer import HandlerTimer

    sock = tmp_path / "gone.sock"
    msg, context = _train_message({}, {"data-path": str(tmp_path / "e.csv"),
                                       "trainer-socket": str(sock)})
    with caplog.at_level("INFO", logger="client.app"):
        assert warm_reply(msg, context, "train", {}, HandlerTimer()) is None
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", f"no warm trainer listens at trainer-socket={sock}: train in this process")]


def test_fab_leaves_out_environment_and_outputs() -> None:
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.constant import FAB_MAX_SIZE

    fab = build_fab_from_disk(ROOT)
    names = zipfile.ZipFile(BytesIO(fab)).namelist()
    assert len(fab) < FAB_MAX_SIZE
    assert "simulations/apps.py" in names and "simulations/presets/quick.toml" in names
    assert not [n for n in names if n.startswith((".venv/", "runs/", ".flwr/", "tests/"))]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_deployment_with_tls_auth_and_merchant_files(tmp_path: Path) -> None:
    if missing_tools():
        pytest.skip(f"{missing_tools()} not installed beside {sys.executable}")
    started = time.monotonic()
    files, calendar = write_merchant_files(tmp_path / "data")
    nodes = {name: Node(path, fmt, trainer=name in WARM) for name, (path, fmt) in files.items()}
    nodes["stranger"] = Node(*files["m04"], registered=False)
    names = [*MERCHANTS, "bad"]
    with LoopbackFederation(tmp_path / "fed", nodes) as fed:  # stops every process
        fed.start()
        env, logs, node_ids = fed.env, fed.logs, fed.node_ids
        listed = flwr_json(["supernode", "list"], env)
        assert listed["success"], listed
        online = {int(n["node-id"]) for n in listed["nodes"] if n["status"] == "online"}
        assert online == set(node_ids.values()), listed

        run_log = tmp_path / "flwr-run.log"
        run_dir = fed.run_dir("deploy-test")  # relative run-dir: under $FLWR_HOME/runs
        metrics = run_dir / "metrics.jsonl"
        try:
            fed.run(["federation.mode='deployment'", f"federation.num-rounds={ROUNDS}",
                     "federation.fraction-evaluate=1.0", "federation.run-dir='deploy-test'",
                     f"snapshots.start='{calendar.start}'", f"snapshots.end='{calendar.end}'"],
                    run_log, timeout=600)
        except RuntimeError as err:
            pytest.fail("\n".join([str(err), *(tail(logs[n], 15) for n in names)]))
        context = "\n".join([tail(run_log), *(tail(logs[n], 15) for n in names)])
        assert (run_dir / "federation.json").exists(), context
        assert (run_dir / "model.keras").exists(), context
        listed = flwr_json(["list"], env)
        assert listed["success"], listed
        assert [r["status"] for r in listed["runs"]] == ["finished:completed"], listed

        # The node whose key was never registered was refused and exited long ago.
        stranger = fed.nodes["stranger"]
        wait_for(lambda: stranger.poll() is not None, 60, "the stranger's exit",
                 logs["stranger"])
        assert stranger.returncode != 0
        assert "Failed to activate SuperNode" in logs["stranger"].read_text(errors="replace")
        assert "No SuperNode found with the given public key" in fed.link_log.read_text()
        for name in names:  # a bad file fails the node's replies, not the node
            assert fed.nodes[name].poll() is None, tail(logs[name])
        for name in WARM:  # the trainers outlive the ClientApps they served
            assert fed.trainers[name].poll() is None, tail(fed.trainer_logs[name])
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

    # The round kept has the lowest federated validation loss: round r's train replies
    # score round r-1's model, the last round's evaluate replies the last model.
    scored = {line["round"] - 1: line["federated"]["val_loss"] for line in lines[1:]}
    if "val_loss" in lines[-1].get("federated_final", {}):
        scored[ROUNDS] = lines[-1]["federated_final"]["val_loss"]
    assert all(line["federated"]["val_examples"] > 0 for line in lines[1:]), lines
    summary = json.loads((run_dir / "federation.json").read_text())
    assert summary["selected_round"] == min(scored, key=scored.__getitem__), (summary, scored)

    resolved = json.loads((run_dir / "resolved-config.json").read_text())
    assert resolved["federation.mode"] == "deployment"
    assert resolved["federation.eval-data"] == ""
    assert not any(k.startswith("synthetic.") for k in resolved)
    assert not (run_dir / "shards").exists()

    for name in MERCHANTS:
        text = logs[name].read_text(errors="replace")
        # A warm node hands every message to its trainer; a cold one says it works alone.
        handed = r" \(trainer: data [\d.]+ s" if name in WARM else "$"
        for r in range(1, ROUNDS + 1):
            assert re.search(rf"train round {r}: handler began [\d.]+ s after process start;"
                             rf"[^\n]*{handed}", text, re.M), tail(logs[name])
            assert re.search(rf"evaluate round {r}: handler began [\d.]+ s[^\n]*{handed}",
                             text, re.M), tail(logs[name])
        assert ("no warm trainer listening" in text) == (name not in WARM), tail(logs[name])
        assert "not used" not in text and "rejected" not in text, tail(logs[name])
    for name in WARM:  # the trainer built the snapshots once and served every message
        served = fed.trainer_logs[name].read_text(errors="replace")
        assert served.count("train round") == ROUNDS, tail(fed.trainer_logs[name])
        assert served.count("evaluate round") == ROUNDS, tail(fed.trainer_logs[name])
        assert "Traceback" not in served and "refused" not in served
    bad = logs["bad"].read_text(errors="replace")
    rejected = [line for line in bad.splitlines() if "merchant data rejected" in line]
    # train + evaluate each round, and the head refit's first step (every node is asked
    # once; only those that answer it are asked again)
    assert len(rejected) == 2 * ROUNDS + 1, tail(logs["bad"])
    for line in rejected:
        assert "bad-events.csv: column 'event' has unknown or missing event name(s)" in line
        assert "'page_view'" in line and "expected one of view, click" in line
    assert "Traceback" not in bad and "handler began" not in bad, tail(logs["bad"])
    print(f"deployment test: {elapsed:.0f} s with processes, run log {run_log}")
