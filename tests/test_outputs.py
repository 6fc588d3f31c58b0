"""What a run writes: the README's output tree, TensorBoard and MLflow tracking, the
report files and the progress of every long step.

The fast tests check each piece on tiny hand-made inputs; the slow ones run one small
comparison (3 merchants, 2 rounds) and check the files it wrote.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import PROJECT, run_driver

from simulations.render import to_html, to_markdown
from simulations.report import report_blocks
from simulations.tracking import (
    MLFLOW_DIR,
    MlflowTracker,
    TensorBoardTracker,
    round_scalars,
    tracking_backends,
)

HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None
NO_MLFLOW = "mlflow is not installed (the mlflow extra; make setup installs it)"


# ---------------------------------------------------------------------------------------
# Reading what was written
# ---------------------------------------------------------------------------------------


def tb_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard run in ``folder``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    acc = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        values = [(e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]
        if all(v.shape == () and v.dtype.kind == "f" for _, v in values):
            out[tag] = [(s, float(v)) for s, v in values]
    return out


def tb_tags(folder: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    acc.Reload()
    return acc.Tags()["tensors"]


def mlflow_run(store: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """The client of the file store ``store`` and its one run."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    runs = [r for e in client.search_experiments() for r in
            client.search_runs([e.experiment_id])]
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


# ---------------------------------------------------------------------------------------
# experiment.tracking
# ---------------------------------------------------------------------------------------


def test_tracking_values_are_checked_by_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from simulations.settings import resolve

    assert tracking_backends("tensorboard") == ("tensorboard",)
    for bad in ("mlflow", "", "tensorboard,wandb", "none"):
        with pytest.raises(ValueError, match=r"experiment\.tracking.*tensorboard,mlflow"):
            resolve("quick", overrides=[f"experiment.tracking={bad!r}"])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"experiment\.tracking.*not installed.*\[mlflow\]"):
        tracking_backends(" MLflow , tensorboard")


@pytest.mark.skipif(not HAS_MLFLOW, reason=NO_MLFLOW)
def test_both_backends_in_either_order() -> None:
    assert tracking_backends("mlflow,tensorboard") == ("tensorboard", "mlflow")
    assert tracking_backends("tensorboard, mlflow") == ("tensorboard", "mlflow")


# ---------------------------------------------------------------------------------------
# The trackers on their own
# ---------------------------------------------------------------------------------------


def _png(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1], [0, 1])
    fig.savefig(path, dpi=20)
    plt.close(fig)
    return path


def test_tensorboard_tracker_writes_scalars_params_text_and_images(tmp_path: Path) -> None:
    tracker = TensorBoardTracker(tmp_path / "tb")
    tracker.log_params({"federation.num-rounds": 2, "model.dropout": 0.1, "x.tuple": (1, 2)})
    tracker.log_metrics(1, "federated-fedavg", **{"test/decay_roc_auc": 0.75,
                                                   "val/loss": math.nan})
    tracker.log_metrics(2, "federated-fedavg", **{"test/decay_roc_auc": 0.8})
    tracker.log_metrics(0, "gbdt", **{"final/decay_roc_auc": 0.7})
    tracker.log_artifact(_png(tmp_path / "auc_per_round.png"))
    report = tmp_path / "report.md"
    report.write_text("| a | b |\n|---|---|\n| 1 | 2 |\n")
    tracker.log_artifact(report)
    tracker.log_artifact(tmp_path / "model.keras")  # not TensorBoard's: nothing happens
    tracker.close()

    fed = tb_scalars(tmp_path / "tb" / "federated-fedavg")
    assert fed["test/decay_roc_auc"] == [(1, 0.75), (2, pytest.approx(0.8))]
    assert "val/loss" not in fed  # NaN is skipped, not plotted
    assert tb_scalars(tmp_path / "tb" / "gbdt")["final/decay_roc_auc"] == [
        (0, pytest.approx(0.7))]
    tags = tb_tags(tmp_path / "tb" / "gbdt")
    assert "config" in tags and "_hparams_/session_start_info" in tags
    assert set(tb_tags(tmp_path / "tb" / "report")) >= {"auc_per_round", "report", "config"}


@pytest.mark.skipif(not HAS_MLFLOW, reason=NO_MLFLOW)
def test_mlflow_tracker_logs_params_metrics_and_artifacts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    tracker = MlflowTracker(tmp_path / MLFLOW_DIR, "quick", "run-1")
    params = {f"k.{i:03d}": i for i in range(150)}  # more than one batch of 100
    tracker.log_params(params)
    for step, auc in ((0, 0.7), (1, 0.75), (2, 0.8)):
        tracker.log_metrics(step, "federated-fedavg", **{"test/decay_roc_auc": auc,
                                                          "val/loss": math.inf})
    model = tmp_path / "model.keras"
    model.write_bytes(b"weights")
    tracker.log_artifact(model, "models/centralised")
    tracker.close()
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ  # only while it was open

    client, run = mlflow_run(tmp_path / MLFLOW_DIR, monkeypatch)
    assert run.info.run_name == "run-1" and run.info.status == "FINISHED"
    assert run.data.params == {k: str(v) for k, v in params.items()}
    history = client.get_metric_history(run.info.run_id, "federated-fedavg/test/decay_roc_auc")
    assert [(m.step, m.value) for m in history] == [(0, 0.7), (1, 0.75), (2, 0.8)]
    assert "federated-fedavg/val/loss" not in run.data.metrics
    files = [f.path for f in client.list_artifacts(run.info.run_id, "models/centralised")]
    assert files == ["models/centralised/model.keras"]


def test_round_scalars_of_a_metrics_line() -> None:
    line = {"round": 3, "centralised": {"decay_roc_auc": 0.8, "val_loss": 1.2},
            "round_seconds": 2.5, "sampled": 4, "replied": 3, "failed": 1, "bytes_up": 10,
            "bytes_down": 20, "train": {"train_loss": 0.9, "val_loss": float("nan")},
            "privacy": {"epsilon": 1.5}, "failures": ["node 7: timeout"]}
    assert round_scalars(line) == {
        "test/decay_roc_auc": 0.8, "val/loss": 1.2, "train/loss": 0.9,
        "clients/sampled": 4.0, "clients/replied": 3.0, "clients/failed": 1.0,
        "bytes/up": 10.0, "bytes/down": 20.0, "seconds/round": 2.5, "privacy/epsilon": 1.5}
    assert round_scalars({"round": 0, "centralised": {}, "round_seconds": 1.0}) == {
        "seconds/round": 1.0}


# ---------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------


def _results() -> dict[str, Any]:
    """A comparison's results as run_comparison holds them in memory (numpy scalars)."""
    decay = {"roc_auc": np.float64(0.8123456), "pr_auc": np.float64(0.7), "f1": np.nan,
             "top_decile_lift": np.float32(2.5)}
    policy = {"policy": {"net_truth": np.float64(3.25), "net_snips": 3.0, "net_regret": 0.5},
              "random": {"net_truth": 2.0, "net_snips": 2.1, "net_regret": 1.75}}
    return {
        "experiment": {"experiment.name": "tiny", "experiment.seed": 0},
        "calendar": {"start": "2025-01-01", "end": "2025-03-31"},
        "data": {"merchants": 3, "snapshots": {"train": 573, "val": 178, "test": 172},
                 "decay_rate": {"train": np.float64(0.4), "val": 0.3, "test": np.nan}},
        "budget_epochs": 2, "seconds": 12.3,
        "methods": {
            "gbdt": {"decay": decay, "interest": {"mae": 0.5}, "seconds": 1.2,
                     "merchant_spread": {"worst_decile": 0.69}, "policy": policy},
            "odd|name": {"decay": decay, "interest": {"mae": 0.6}, "seconds": 2.0},
        },
        "gain_from_joining": {"federated-fedavg": {
            "mean": -0.014, "by_size_quartile": {"q1": 0.02, "q2": np.nan, "q3": 0.0,
                                                 "q4": -0.01},
            "merchants": 3, "share_gaining": 1 / 3}},
    }


def test_report_markdown_has_real_tables_and_no_python_reprs() -> None:
    md = to_markdown(report_blocks(_results(), ["auc_per_round.png"],
                                   {"experiment.seed": 0}))
    assert "```" not in md and "np.float" not in md and "{" not in md and "nan" not in md
    lines = md.splitlines()
    head = lines.index("| method | decay AUC | PR-AUC | F1 | lift@10% | interest MAE | "
                       "worst-decile AUC | policy value | regret | capture | seconds |")
    assert lines[head + 1] == "|---|" + "---:|" * 10
    assert lines[head + 2] == ("| gbdt | 0.8123 | 0.7000 | - | 2.5000 | 0.5000 | 0.6900 | "
                               "3.2500 | 0.5000 | - | 1 |")
    assert "No capture and no value-vs-budget curve" in md  # no truth in these results
    assert lines[head + 3].startswith("| odd\\|name | 0.8123 |")  # a pipe cannot split a row
    assert "- merchants: 3; snapshots per split: train 573, val 178, test 172" in lines
    assert "- decay label rate per split: train 0.400, val 0.300, test -" in lines
    assert "| federated-fedavg | -0.0140 | +0.0200 | - | +0.0000 | -0.0100 | 33% of 3 |" in lines
    assert "| random | 2.0000 | 2.1000 | 1.7500 |" in lines
    assert "![auc_per_round.png](auc_per_round.png)" in lines


def test_report_html_is_self_contained(tmp_path: Path) -> None:
    png = _png(tmp_path / "auc_per_round.png")
    page = to_html(report_blocks(_results(), [png.name], {"model.dropout": "0.1",
                                                          "x.html": "<b>"}), tmp_path)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "data:image/png;base64," in page and 'src="auc_per_round.png"' not in page
    assert not re.search(r"(src|href)=\"(https?:|//)", page)  # nothing fetched from outside
    assert "<td>odd|name</td>" in page and "&lt;b&gt;" in page and "<b>" not in page
    assert '<td class="num">0.8123</td>' in page and "<td>model.dropout</td>" in page
    assert "np.float" not in page


# ---------------------------------------------------------------------------------------
# One small comparison, end to end
# ---------------------------------------------------------------------------------------

ROUNDS = 2
TRACKING = "tensorboard,mlflow" if HAS_MLFLOW else "tensorboard"


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The run folder of a comparison of all four methods on 3 merchants."""
    tmp = tmp_path_factory.mktemp("compare")
    run_driver("compare", [str(tmp / "runs"), TRACKING, "synthetic.num-merchants=3",
                           f"federation.num-rounds={ROUNDS}", "federation.local-epochs=1"],
               cwd=tmp, log=tmp / "run.log", timeout=900).check()
    (found,) = (tmp / "runs").glob("*-compare-quick")
    yield found


def readme_tree() -> list[tuple[str, bool, bool]]:
    """``(path, optional, opaque)`` of each entry of the tree in README's *Outputs*,
    relative to the run folder; folders end in ``/``; ``opaque``: a folder whose
    contents the README does not list."""
    text = (PROJECT / "README.md").read_text()
    section = text[text.index("\n## Outputs\n"):]
    block = section[section.index("```\n") + 4:]
    lines = block[:block.index("```")].splitlines()
    assert lines[0] == "runs/<run-id>/", lines[0]
    entries: list[list[Any]] = []
    parents: list[tuple[int, str, bool]] = []  # (indent, path, optional)
    for line in lines[1:]:
        indent = len(line) - len(line.lstrip(" "))
        if indent > 8:  # a description going on
            continue
        name, _, about = line.strip().partition("  ")
        while parents and parents[-1][0] >= indent:
            parents.pop()
        prefix, inherited = (parents[-1][1], parents[-1][2]) if parents else ("", False)
        optional = inherited or about.strip().startswith("only")
        if parents:
            entries[[e[0] for e in entries].index(prefix)][2] = False  # it lists children
        entries.append([prefix + name, optional, name.endswith("/")])
        if name.endswith("/"):
            parents.append((indent, prefix + name, optional))
    return [(path, optional, opaque) for path, optional, opaque in entries]


def _pattern(path: str) -> re.Pattern[str]:
    regex = re.escape(path)
    regex = re.sub(r"<[^>]+>", "[^/]+", regex.replace(r"\<", "<").replace(r"\>", ">"))
    return re.compile(regex.replace("NNNNN", r"\d+").replace(r"\*", "[^/]*"))


@pytest.mark.slow
@pytest.mark.timeout(1000)
def test_readme_tree_is_what_a_comparison_writes(compared: Path) -> None:
    tree = readme_tree()
    written = sorted(p.relative_to(compared).as_posix() + ("/" if p.is_dir() else "")
                     for p in compared.rglob("*"))
    opaque = [_pattern(path) for path, _, is_opaque in tree if is_opaque]
    described = [_pattern(path) for path, _, _ in tree]
    unexplained = [w for w in written if not any(p.fullmatch(w) for p in described)
                   and not any(p.match(w) for p in opaque)]
    assert not unexplained, f"written but not in README's Outputs: {unexplained}"
    missing = [path for path, optional, _ in tree if not optional
               and not any(_pattern(path).fullmatch(w) for w in written)]
    assert not missing, f"in README's Outputs but not written: {missing}"
    assert ("mlruns/" in written) == HAS_MLFLOW
    # Every model of the comparison is scored with the policy the comparison judged it on.
    policy = {k: v for k, v in json.loads((compared / "config.json").read_text()).items()
              if k.startswith("policy.")}
    assert policy and len(list(compared.glob("*/model.json"))) >= 4
    for sidecar in compared.glob("*/model.json"):
        saved = json.loads(sidecar.read_text())
        assert {k: saved.get(k) for k in policy} == policy, sidecar


@pytest.mark.slow
@pytest.mark.timeout(1000)
def test_tensorboard_holds_every_method(compared: Path) -> None:
    results = json.loads((compared / "results.json").read_text())
    board = compared / "tensorboard"
    assert sorted(p.name for p in board.iterdir()) == sorted(
        [*results["methods"], "report"])
    rounds = [json.loads(t) for t in
              (compared / "federated-fedavg" / "metrics.jsonl").read_text().splitlines()]
    fed = tb_scalars(board / "federated-fedavg")
    assert fed["test/decay_roc_auc"] == [
        (r["round"], pytest.approx(r["centralised"]["decay_roc_auc"])) for r in rounds]
    assert [s for s, _ in fed["train/loss"]] == list(range(1, ROUNDS + 1))
    assert [v for _, v in fed["clients/replied"]] == [3.0] * ROUNDS
    history = results["methods"]["centralised"]["history"]
    cen = tb_scalars(board / "centralised")
    assert cen["train/loss"] == [(i + 1, pytest.approx(h["loss"])) for i, h in
                                 enumerate(history)]
    for name, entry in results["methods"].items():  # the table's figures, every method
        assert tb_scalars(board / name)["final/decay_roc_auc"][0][1] == pytest.approx(
            entry["decay"]["roc_auc"])
    assert set(tb_scalars(board / "local-only")) >= {"train/loss", "val/loss"}
    assert {"report/auc_per_round", "report/merchant_gain", "report/policy_value",
            "report/report"} <= set(tb_tags(board / "report"))


@pytest.mark.slow
@pytest.mark.timeout(1000)
@pytest.mark.skipif(not HAS_MLFLOW, reason=NO_MLFLOW)
def test_mlflow_store_holds_the_run(compared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client, run = mlflow_run(compared / MLFLOW_DIR, monkeypatch)
    assert run.info.status == "FINISHED" and run.info.run_name == compared.name
    assert run.data.params["experiment.tracking"] == TRACKING
    assert run.data.params["federation.num-rounds"] == str(ROUNDS)
    rounds = [json.loads(t) for t in
              (compared / "federated-fedavg" / "metrics.jsonl").read_text().splitlines()]
    history = client.get_metric_history(run.info.run_id,
                                        "federated-fedavg/test/decay_roc_auc")
    assert [(m.step, m.value) for m in history] == [
        (r["round"], pytest.approx(r["centralised"]["decay_roc_auc"])) for r in rounds]

    def listed(folder: str) -> set[str]:
        return {f.path for f in client.list_artifacts(run.info.run_id, folder)}

    assert {"config.json", "results.json", "report", "models"} <= listed("")
    assert {"report/report.md", "report/report.html", "report/auc_per_round.png"} <= listed(
        "report")
    assert listed("models/federated-fedavg") == {"models/federated-fedavg/model.keras",
                                                 "models/federated-fedavg/model.json"}
    assert "models/centralised/model.keras" in listed("models/centralised")


@pytest.mark.slow
@pytest.mark.timeout(1000)
def test_report_files_of_the_comparison(compared: Path) -> None:
    md = (compared / "report.md").read_text()
    assert "```" not in md and "np.float" not in md
    assert "| federated-fedavg |" in md and "![merchant_gain.png](merchant_gain.png)" in md
    assert "## Fairness: decay AUC, calibration and policy reach per segment" in md
    assert "| customer new |" in md and "![fairness.png](fairness.png)" in md
    page = (compared / "report.html").read_text()
    assert "## Global attributions per feature group" in md
    assert "![attributions.png](attributions.png)" in md
    assert "## Capture (share of the achievable gain)" in md
    assert "![value_vs_budget.png](value_vs_budget.png)" in md
    assert page.count("data:image/png;base64,") == 6 and "<td>federation.num-rounds</td>" in page


@pytest.mark.slow
@pytest.mark.timeout(1000)
def test_every_long_step_reports_progress(compared: Path) -> None:
    lines = [json.loads(t) for t in
             (compared.parent / "progress.jsonl").read_text().splitlines()]
    steps: dict[str, dict[str, Any]] = {}
    for line in lines:
        step = steps.setdefault(line["step"], {"advances": [], "closed": False})
        if "total" in line:
            step["total"] = line["total"]
        elif line.get("closed"):
            step["closed"] = True
        else:
            step["advances"].append((line["amount"], line["fields"]))
    results = json.loads((compared / "results.json").read_text())
    expected = {"generating events": 1, "building snapshots": None, "gbdt": 6,
                "centralised": len(results["methods"]["centralised"]["history"]),
                "local-only": 3, "writing shards": 3, "starting Ray": 1,
                "federated rounds": ROUNDS}
    for name, done in expected.items():
        step = steps[name]
        assert step["closed"], name
        total = sum(a for a, _ in step["advances"])
        assert total == (done if done is not None else step["total"]), (name, step)
    rounds = steps["federated rounds"]["advances"]
    fed = results["methods"]["federated-fedavg"]["rounds"]
    assert [f["auc"] for _, f in rounds] == [round(r["decay_roc_auc"], 4) for r in fed]
    assert [f.get("clients") for a, f in rounds if a] == ["3/3"] * ROUNDS
