"""The command line fails fast: bad arguments answer in one line before TensorFlow loads
or a folder is made; run folders are an interface; progress is one line per step in logs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from simulations.cli import checks, main, split_flags
from simulations.cli.console import Console
from simulations.cli.runs import federation_in, model_in

PROJECT = Path(__file__).resolve().parents[1]

# The CLI in a fresh interpreter; reports its exit code and whether TensorFlow was imported.
DRIVER = (
    "import json, sys\n"
    "from simulations.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print(json.dumps({'code': code, 'tensorflow': 'tensorflow' in sys.modules}))\n"
)


def _fedecay(args: list[str], cwd: Path) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, "-c", DRIVER, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin",
                                                       "PYTHONPATH": str(PROJECT)})
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.parametrize("args, expected", [
    (["train", "--preset", "quik"], "unknown preset 'quik'"),
    (["train", "--mode", "gbdt", "--events", "missing.csv"], "No such file or directory"),
    (["compare", "--methods", "gdbt"], "did you mean gbdt?"),
    (["compare", "--strategies", "fedavg,fedprx"], "did you mean fedprox?"),
    (["compare", "--strategies", "fedavg,fedprox,fedavg"], "fedavg named twice"),
    (["compare", "--methods", "gbdt,,lr"], "--methods 'gbdt,,lr': an empty item between"),
    (["simulate", "--set", "federation.num-rounds=0"], "federation.num-rounds"),
    (["simulate", "--set", "synthetic.num-merchants=true"],
     "'synthetic.num-merchants': expected int, got True"),
    (["score", "--model", "run", "--events", "events.csv", "--set", "policy.cost-coupon=-1"],
     "'policy.cost-coupon': must be >= 0"),
    (["data", "synth", "--out", "data", "--set", "synthtic.num-merchants=3"],
     "unknown config key 'synthtic.num-merchants'"),
    (["data", "synth", "--out", ""], "--out is empty: give a folder"),
    # It generated the built-in default federation (20 merchants), not a file's calendar.
    (["data", "synth", "--out", "x", "--preset", "completejourney"],
     "--preset completejourney: has no [synthetic] section, and data synth generates"),
    (["data", "synth", "--out", "x", "--set", "synthetic.users-median=1e8"],
     "users and 214,170,909,910 events, 34,935 GiB to generate; this machine has"),
    (["data", "synth", "--out", "fed"], "already holds events.parquet (a federation written"),
    (["deploy", "certs", ""], "DIR is empty: give a folder"),
    (["deploy", "certs", "certs", "--host", "a host"],
     "--host holds 'a host', neither an IP address nor a DNS name"),
    (["deploy", "certs", "certs", "--host", "999.1.1.1"],
     "--host holds '999.1.1.1': all numbers, so not a DNS name, and not an IP address"),
    (["deploy", "node-key", "keys", "--name", "a.pub"],
     "name must not end in '.pub' (the public key's suffix), got 'a.pub'"),
    (["data", "check", "events.csv", "--set", "train.epochs=3"],
     "data check uses only snapshots.* and data.* keys"),
    (["score", "--model", "run", "--events", "events.csv", "--out", "s.txt"],
     "expected a .csv, .parquet or .pq file name"),
    (["score", "--model", "run", "--events", "events.csv", "--at", "someday"],
     "expected an ISO-8601 time"),
    (["score", "--model", "run", "--events", "events.csv", "--method", "federated-fedprox"],
     "available: centralised, federated-fedavg"),
    (["score", "--model", "run", "--events", "run"],
     "is a folder without the Complete Journey tables"),
    (["score", "--model", "run/centralised/model.keras", "--events", "missing.csv"],
     "missing.csv: No such file or directory"),
    (["score", "--model", "run", "--events", "events.csv", "--set", "train.epochs=3"],
     "only snapshots.* and policy.* keys"),
    (["privacy", "egress", "--run", "run", "--json", "out.txt"], "expected a .json file"),
    (["score", "--model", "killed", "--events", "events.csv"],
     "holds no model.keras: its rounds did not finish (it has checkpoints/); finish them"),
    (["score", "--model", "killed/checkpoints/round-00002.npz", "--events", "events.csv"],
     "is a checkpoint (a round's weights), not a model"),
    (["privacy", "egress", "--run", "run", "--json", "run/config.json"],
     "is a file of the run"),
    (["privacy", "tradeoff", "run", "--json", "run/config.json"], "is a file of the run"),
    (["privacy", "tradeoff", "run", "run/"], "run given twice: each comparison once"),
    (["explain", "done", "--method", "centralised"],
     "explanations.json: is a folder, and explain writes this file there"),
    (["privacy", "egress", "--run", "run"],
     "metrics.jsonl records no round: the run was stopped before its first round ended"),
    (["privacy", "egress", "--run", "lost"],
     "is a federation's folder without its metrics.jsonl (the per-round record egress"),
    (["score", "--model", "run", "--events", "cj", "--out", "cj/transactions.csv"],
     "is a file of the --events folder"),
    (["simulate", "--set", "federation.keep-checkpoints=0"],
     "'federation.keep-checkpoints': must be >= 1 (the newest checkpoint is what --resume"),
    (["simulate", "--set", "federation.server-momentum=7"],
     "'federation.server-momentum': must be in [0, 1)"),
    (["privacy", "audit", "--run", "tab"], "is a gbdt model; the membership audit attacks"),
    (["data", "check", "loop1"], "loop1: Too many levels of symbolic links"),
    (["score", "--model", "run", "--events", "events.csv", "--out", "loop1"],
     "loop1: Too many levels of symbolic links"),
    (["train", "--set", "snapshots.observation-days=1e-9"],
     "'snapshots.observation-days': must be between 1/24 (an hour) and 3650 days"),
    (["train", "--set", "snapshots.max-len=1e9"], "'snapshots.max-len': must be between 1"),
    (["train", "--set", "snapshots.hash-buckets=1e9"], "'snapshots.hash-buckets': must be"),
    (["train", "--set", "snapshots.actions=none,coupon,coupon"],
     "names an action twice: none, coupon, coupon"),
    (["compare", "--methods", "gbdt", "--noise", "0.5,1"],
     "--methods gbdt runs no federation: add federated"),
    (["compare", "--noise", "1,1"], "--noise '1,1': 1 given twice"),
    (["compare", "--methods", "gbdt,lr", "--audit"], "--audit attacks the LSTM models"),
    (["bench", "--deployment", "1", "--set", "bogus.key=1"],
     "--set would be ignored: leave them out"),
    (["bench", "--trainer", "warm"], "--trainer and --runs go with --deployment"),
    (["train", "--events", "events.csv", "--set", "data.events=other.csv"],
     "and --events events.csv: give the events once"),
    (["train", "--events", "events.csv", "--set", "synthetic.num-merchants=-5"],
     "'synthetic.num-merchants': the data comes from data.events"),
    (["train", "--seed", "-1"], "'experiment.seed': must be between 0 and 4294967295"),
    (["compare", "--seeds", "1,4294967296"], "--seeds 1,4294967296: each seed must be"),
    (["train", "--bogus"], "No such option '--bogus'"),
    (["bench", "--federation", "10,x"], "--federation"),
])
def test_bad_commands_answer_in_one_line_before_tensorflow(tmp_path: Path, args: list[str],
                                                          expected: str) -> None:
    (tmp_path / "events.csv").write_text("user_id,timestamp,event\n")
    _fake_compare_run(tmp_path / "run")
    (tmp_path / "killed" / "checkpoints").mkdir(parents=True)  # a run stopped midway
    np.savez(tmp_path / "killed" / "checkpoints" / "round-00002.npz", w=np.zeros(3))
    _fake_compare_run(tmp_path / "done")
    (_fake_compare_run(tmp_path / "lost") / "federated-fedavg" / "metrics.jsonl").rename(
        tmp_path / "lost" / "federated-fedavg" / "federation.json")  # metrics.jsonl deleted
    (tmp_path / "done" / "centralised" / "explanations.json").mkdir()
    _fake_gbdt(tmp_path / "tab" / "model.skops")
    (tmp_path / "loop1").symlink_to("loop2")  # a symlink loop
    (tmp_path / "loop2").symlink_to("loop1")
    (tmp_path / "cj").mkdir()  # a Complete Journey folder
    (tmp_path / "cj" / "transactions.csv").write_text("household_id\n")
    (tmp_path / "fed").mkdir()  # an earlier `data synth --out fed`
    (tmp_path / "fed" / "events.parquet").write_bytes(b"PAR1")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result, err = _fedecay(args, tmp_path)  # fast: TensorFlow was never imported
    lines = [line for line in err.splitlines() if line.strip()]
    assert result == {"code": 2, "tensorflow": False}, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def _fake_model(path: Path) -> Path:
    """A .keras archive whose config.json names what a scorer has (no weights: the fast
    checks read only the config)."""
    import zipfile

    path.parent.mkdir(parents=True, exist_ok=True)
    config = {"class_name": "Functional", "config": {
        "input_layers": {"events": ["events", 0, 0]},
        "layers": [{"name": n, "config": {"name": n}}
                   for n in ("events", "category_embedding", "activation")]}}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", json.dumps(config))
    return path


def _fake_gbdt(path: Path) -> Path:
    """A .skops archive whose schema.json names a fedecay GBDT (what the fast checks read)."""
    import zipfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fields = {"format": "fedecay-tabular-model", "kind": "gbdt"}
    schema = {"content": {k: {"content": json.dumps(v)} for k, v in fields.items()}}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("schema.json", json.dumps(schema))
    return path


def _fake_compare_run(run: Path, strategies: tuple[str, ...] = ("fedavg",)) -> Path:
    """The layout ``compare`` writes: config.json, centralised/ and federated-<strategy>/."""
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"experiment.preset": "quick"}))
    _fake_model(run / "centralised" / "model.keras")
    for strategy in strategies:
        _fake_model(run / f"federated-{strategy}" / "model.keras")
        (run / f"federated-{strategy}" / "metrics.jsonl").write_text('{"round": 0}\n')
    return run


def test_the_checks_name_the_libraries_own_choices() -> None:
    from client.scoring import scores_path
    from common.io import BAD_ROWS, FORMATS
    from common.timestamps import EARLIEST_TIME, FUTURE_SLACK
    from server.config import STRATEGIES
    from simulations.single import TRAIN_MODES

    assert checks.FORMATS == ("auto", *FORMATS)
    assert checks.BAD_ROWS == tuple(BAD_ROWS)
    assert checks.STRATEGIES == STRATEGIES
    assert checks.TRAIN_MODES == TRAIN_MODES
    assert checks.EARLIEST == EARLIEST_TIME.to_pydatetime()
    assert checks.FUTURE_SLACK == FUTURE_SLACK.to_pytimedelta()
    for suffix in checks.SCORE_FILES:
        assert scores_path(f"scores{suffix}").name == f"scores{suffix}"
    with pytest.raises(ValueError, match="expected a .csv or .parquet file name"):
        scores_path("scores.txt")


def test_verbose_and_quiet_anywhere_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert split_flags(["train", "--preset", "quick", "-v"]) == (
        ["train", "--preset", "quick"], True, False)
    assert split_flags(["-q", "score", "--", "-v"]) == (["score", "--", "-v"], False, True)
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("fedecay ")
    assert main(["compare", "--methods", "gdbt", "-v"]) == 2  # -v after the command
    assert "did you mean gbdt?" in capsys.readouterr().err
    assert main(["-v", "-q", "compare"]) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_every_option_shows_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    import click
    import typer

    from simulations.cli import app

    def commands(group: click.Group, path: str):
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                yield from commands(command, f"{path} {name}")
            else:
                yield f"{path} {name}", command

    root = typer.main.get_command(app)
    assert isinstance(root, click.Group)
    for name, command in commands(root, "fedecay"):
        for param in command.params:
            if not isinstance(param, click.Option) or param.is_flag or param.required:
                continue
            assert param.show_default not in (False, None), (name, param.name)
            assert param.help, (name, param.name)


# ---------------------------------------------------------------------------- run folders


def test_a_model_is_picked_from_any_run_folder(tmp_path: Path) -> None:
    compare = _fake_compare_run(tmp_path / "compare")
    assert model_in(compare, None) == ("federated-fedavg", compare / "federated-fedavg"
                                       / "model.keras")
    assert model_in(compare, "centralised")[1] == compare / "centralised" / "model.keras"
    assert federation_in(compare, None) == ("federated-fedavg", compare / "federated-fedavg")
    two = _fake_compare_run(tmp_path / "two", ("fedavg", "fedprox"))
    with pytest.raises(ValueError, match="several federated models .federated-fedavg, "
                                         "federated-fedprox.: choose one with --method"):
        model_in(two, None)
    assert model_in(two, "federated-fedprox")[0] == "federated-fedprox"
    with pytest.raises(ValueError, match=r"no krum model \(available: centralised, "
                                         r"federated-fedavg, federated-fedprox\)"):
        model_in(two, "krum")
    with pytest.raises(ValueError, match="only a federation sends anything"):
        federation_in(two, "centralised")
    # simulate: the federation folder itself; train: the centralised model.
    simulate = tmp_path / "simulate"
    _fake_model(simulate / "model.keras")
    (simulate / "metrics.jsonl").write_text("{}\n")
    (simulate / "config.json").write_text(json.dumps({"federation.strategy": "fedprox"}))
    assert model_in(simulate, None)[0] == "federated-fedprox"
    assert federation_in(simulate, "federated")[1] == simulate
    train = tmp_path / "train"
    _fake_model(train / "model.keras")
    (train / "metrics.json").write_text("{}")
    assert model_in(train, None) == ("centralised", train / "model.keras")
    with pytest.raises(ValueError, match="has no federated model .available: centralised"):
        model_in(train, "federated")
    with pytest.raises(ValueError, match="--method centralised: only with a run folder"):
        model_in(train / "model.keras", "centralised")


def test_a_keras_model_that_is_not_a_scorer_is_named_without_tensorflow(tmp_path: Path
                                                                        ) -> None:
    import zipfile

    path = tmp_path / "other.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", json.dumps({"config": {"layers": [
            {"name": "dense", "config": {"name": "dense"}}], "input_layers": [["x", 0, 0]]}}))
    with pytest.raises(ValueError, match="not a fedecay scoring model .no input 'events', "
                                         "layer 'category_embedding', layer 'activation'"):
        checks.model_file(path)
    assert checks.model_file(_fake_model(tmp_path / "ok.keras")) == tmp_path / "ok.keras"


def test_explain_refuses_a_second_model_of_other_features_before_tensorflow(
        tmp_path: Path) -> None:
    run = _fake_compare_run(tmp_path / "run")
    other = _fake_model(tmp_path / "other" / "model.keras")
    (other.parent / "model.json").write_text(json.dumps({"snapshots.tau-days": 60.0}))
    result, err = _fedecay(["explain", str(run), "--second", str(other)], tmp_path)
    assert result == {"code": 2, "tensorflow": False}, err
    assert "trained with snapshots.tau-days=60, the first model with 7" in err, err


def test_progress_is_one_line_per_step_off_a_terminal(capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    console = Console(live=False)
    with console.task("federated-fedavg", total=3, unit="rounds") as task:
        task.advance(0, auc=0.71)  # round 0: the initial model, no step done
        task.advance(auc=0.7336, clients="3/3")
        task.advance(2)
    console("local-only 1/3 merchants")  # engine calls that report text
    console.next("fedecay score --model runs/x --events e.csv")
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("federated-fedavg 0/3 rounds  auc=0.71  (")
    assert err[1].startswith("federated-fedavg 1/3 rounds  auc=0.7336  clients=3/3  (")
    assert err[2].startswith("federated-fedavg 3/3 rounds  (")
    assert err[3:] == ["local-only 1/3 merchants",
                       "next: fedecay score --model runs/x --events e.csv"]
    quiet = Console(quiet=True, live=False)
    with quiet.task("x", total=1) as task:
        task.advance(auc=1.0)
    quiet("text")
    quiet.next("fedecay x")
    assert capsys.readouterr().err == ""


def test_progress_draws_rich_bars_on_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    console = Console(live=True)
    with console.task("centralised", total=2, unit="epochs") as task:
        task.advance(loss=1.43)
        console.say("a note above the bars")
        task.advance(loss=1.02)
    assert console._bars is None  # the display stopped with the last step
    err = capsys.readouterr().err
    assert "centralised" in err and "2/2" in err and "loss=1.02" in err
    assert "a note above the bars" in err


def test_bars_stay_drawn_as_on_a_terminal_while_stderr_is_a_pipe() -> None:
    # While TensorFlow imports, fd 2 is a pipe to the stderr filter: Rich, asking again
    # whether it writes to a terminal, stopped drawing the bars for those seconds.
    console = Console(live=True)
    with console.task("centralised", total=2, unit="epochs"):
        assert not sys.stderr.isatty() and console._bars.console.is_terminal


def test_sigterm_unwinds_like_ctrl_c_and_leaves_no_half_made_run_folder(tmp_path: Path
                                                                        ) -> None:
    """A scheduler's SIGTERM while the run has only its config.json: exit 143,
    "terminated", and the folder gone (Python's default would leave it behind)."""
    runs = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulations.cli", "compare", "--preset", "quick", "--methods",
         "gbdt", "--set", f"experiment.output-dir={runs}"],
        cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not list(runs.glob("*/config.json")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        assert list(runs.glob("*/config.json")), "no run folder after 60 s"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "terminated", err
    assert not runs.exists() or not any(runs.iterdir()), sorted(runs.rglob("*"))


def test_simulate_refuses_more_nodes_than_merchants_before_the_rounds(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Flower would wait for the missing merchants every round, silently."""
    runs = tmp_path / "runs"
    assert main(["simulate", "--preset", "quick", "--set", "federation.min-train-nodes=100",
                 "--set", f"experiment.output-dir={runs}"]) == 2
    err = capsys.readouterr().err
    assert ("config key 'federation.min-train-nodes': 100 merchants asked for, but the "
            "federation has 8") in err, err
    assert not runs.exists() or not any(runs.iterdir())
