"""Checkpoints (plain arrays and JSON, never pickle) and resuming a run from them."""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from helpers import FakeGrid

from server.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_strategy_state,
    save_checkpoint,
    strategy_state,
)
from server.config import FederationConfig
from server.strategy import build_strategy

SHAPES = [(2, 3), (3,)]


def _payload(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {"weights": [rng.normal(size=s).astype(np.float32) for s in SHAPES],
            "strategy": {}, "selection": {"round": seed, "val_loss": 0.5, "weights": None,
                                          "stale": 0},
            "clipping_norm": None}


def _strategy(name: str) -> Any:
    return build_strategy(FederationConfig(strategy=name, min_train_nodes=1,
                                           min_available_nodes=1), seed=0)


def test_checkpoint_round_trip_keeps_the_newest(tmp_path: Path) -> None:
    for r in (1, 2, 3):
        save_checkpoint(tmp_path, r, _payload(r), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-00002.npz",
                                                           "round-00003.npz"]
    latest = latest_checkpoint(tmp_path)
    assert latest == tmp_path / "round-00003.npz"
    state = load_checkpoint(latest)
    assert state["round"] == 3 and state["selection"]["round"] == 3
    for got, want in zip(state["weights"], _payload(3)["weights"], strict=True):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == want.dtype
    assert latest_checkpoint(tmp_path / "none") is None


def test_infinite_validation_loss_and_round_numbers_past_five_digits(tmp_path: Path) -> None:
    payload = {**_payload(1), "selection": {"round": -1, "val_loss": float("inf"),
                                            "weights": None, "stale": 0}}
    save_checkpoint(tmp_path, 99_999, payload)
    save_checkpoint(tmp_path, 100_000, payload)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["round-100000.npz",
                                                            "round-99999.npz"]
    assert load_checkpoint(latest_checkpoint(tmp_path))["selection"]["val_loss"] == np.inf


def _server_state(strategy: str, rng: np.random.Generator) -> dict[str, Any]:
    """Server optimizer state as Flower 1.42 keeps it (FedAvgM: an ArrayRecord)."""
    arrays = {"a": rng.normal(size=(2, 3)), "b": rng.normal(size=3)}
    if strategy == "fedavgm":
        return {"current_arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                "momentum_vector": [rng.normal(size=(2, 3)), rng.normal(size=3)]}
    return {"current_arrays": arrays, "m_t": {k: 2 * v for k, v in arrays.items()},
            "v_t": {k: v * v for k, v in arrays.items()}}


def _as_numpy(value: Any) -> Any:
    if isinstance(value, ArrayRecord):
        return dict(zip(value.keys(), value.to_numpy_ndarrays(), strict=True))
    return value


@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_server_optimizer_state_survives_a_checkpoint(tmp_path: Path, name: str) -> None:
    strategy = _strategy(name)
    state = _server_state(name, np.random.default_rng(5))
    for attr, value in state.items():
        setattr(strategy, attr, value)
    path = save_checkpoint(tmp_path, 7, {"strategy": strategy_state(strategy)})

    fresh = _strategy(name)
    restore_strategy_state(fresh, load_checkpoint(path)["strategy"])

    for attr, value in state.items():
        restored = getattr(fresh, attr)
        assert type(restored) is type(value), attr
        want, got = _as_numpy(value), _as_numpy(restored)
        pairs = (zip(want.values(), (got[k] for k in want), strict=True)
                 if isinstance(want, dict) else zip(want, got, strict=True))
        if isinstance(want, dict):
            assert list(got) == list(want)
        for w, g in pairs:
            np.testing.assert_array_equal(g, w)


def _truncate(raw: bytes) -> bytes:
    return raw[: len(raw) - 100]


def _flip_a_weight(raw: bytes) -> bytes:
    # The members are stored uncompressed: change one byte inside the first array.
    at = raw.index(b"a0.npy") + len(b"a0.npy") + 128 + 4  # past the .npy header
    return raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1:]


@pytest.mark.parametrize(("damage", "message"), [
    (_truncate, "is truncated, corrupt or not a fedecay checkpoint"),
    (_flip_a_weight, "corrupt"),
    (lambda raw: raw[:10], "is truncated, corrupt or not a fedecay checkpoint"),
    (lambda raw: b"", "is truncated, corrupt or not a fedecay checkpoint"),
])
def test_damaged_checkpoint_is_refused_with_the_reason(
        tmp_path: Path, damage: Callable[[bytes], bytes], message: str) -> None:
    path = save_checkpoint(tmp_path, 2, _payload(2))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    assert message in str(caught.value) and str(path) in str(caught.value)


def test_missing_checkpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*round-00009.npz"):
        load_checkpoint(tmp_path / "round-00009.npz")


class _Payload:
    """Unpickling this would create ``marker``: proof that a load ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def _planted(tmp_path: Path, marker: Path) -> dict[str, bytes]:
    """Files a crafted checkpoint could be: a raw pickle, an npz with a pickled (object)
    member, an npz whose metadata member is a pickle, the old ``.ckpt`` format."""
    blob = pickle.dumps({"round": 9, "x": _Payload(marker)})
    obj = tmp_path / "obj.npz"
    np.savez(obj, a0=np.array([_Payload(marker)], dtype=object),
             __meta__=np.frombuffer(b"{}", np.uint8), __sha256__=np.zeros(64, np.uint8))
    meta = tmp_path / "meta.npz"
    with zipfile.ZipFile(meta, "w") as zf:
        zf.writestr("__meta__.npy", blob)
        zf.writestr("__sha256__.npy", blob)
    return {"round-00009.npz": blob, "round-00008.npz": obj.read_bytes(),
            "round-00007.npz": meta.read_bytes(),
            "round-00006.ckpt": b"FEDECAY-CKPT-1\n" + b"0" * 64 + b"\n" + blob}


def test_planted_pickle_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name, raw in _planted(tmp_path, marker).items():
        (folder / name).write_bytes(raw)
        with pytest.raises(CheckpointError) as caught:
            load_checkpoint(folder / name)
        assert str(folder / name) in str(caught.value)
    assert not marker.exists()


def _earlier_run(run_dir: Path, text: str) -> None:
    """What a finished run leaves in its folder, each file holding ``text``."""
    from server.resume import DERIVED_OUTPUTS, FINAL_OUTPUTS

    save_checkpoint(run_dir / "checkpoints", 3, _payload(3))
    for name in (*FINAL_OUTPUTS, *DERIVED_OUTPUTS, "metrics.jsonl", "privacy.jsonl",
                 "config.json"):
        (run_dir / name).write_text(text)


def test_a_fresh_start_moves_the_earlier_run_to_previous(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A deployment reusing ``federation.run-dir``: the fresh start deleted the earlier
    run's model, metrics and privacy ledger before the new run's first round (a new run
    that then failed left no model to score with, and the ledger was gone)."""
    from server.resume import (
        DERIVED_OUTPUTS,
        FINAL_OUTPUTS,
        PREVIOUS,
        find_resume_state,
        start_state,
    )
    from server.runner import Runner
    from simulations.cli.runs import PREVIOUS_RUN, federation_in, model_in

    assert PREVIOUS == PREVIOUS_RUN == "previous"  # the CLI's copy of the name

    # explain's and the customer audit's files describe the earlier model: they go too.
    earlier = (*FINAL_OUTPUTS, *DERIVED_OUTPUTS, "checkpoints", "metrics.jsonl",
               "privacy.jsonl")
    _earlier_run(tmp_path, "first run")
    with caplog.at_level("INFO", logger="server.resume"):
        done, _, _ = start_state(tmp_path, False, Runner(None, None, None), [np.zeros(2)])
    assert done == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "previous"]
    previous = tmp_path / "previous"
    assert sorted(p.name for p in previous.iterdir()) == sorted(earlier)
    assert (previous / "model.keras").read_text() == "first run"
    assert (previous / "privacy.jsonl").read_text() == "first run"
    assert [p.name for p in list_checkpoints(previous / "checkpoints")] == ["round-00003.npz"]
    assert "the earlier finished run's attributions.json, audit_split.json, checkpoints, " \
        "customer_audit.json, explanations.json" in caplog.text
    assert str(previous) in caplog.text
    # The readers of the folder never take previous/ for the run: none finished yet.
    with pytest.raises(ValueError, match=r"holds no model: .*; the run before it left "
                                         r".*previous/model.keras"):
        model_in(tmp_path, None)
    with pytest.raises(ValueError, match="holds no federation: give a run folder"):
        federation_in(tmp_path, None)
    assert find_resume_state(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()  # the new run's rounds under way
    with pytest.raises(ValueError, match=r"its rounds did not finish .*; the run before "
                                         r"it left .*previous/model.keras"):
        model_in(tmp_path, None)
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "model.keras").write_text("second run")
    assert model_in(tmp_path, None)[1] == tmp_path / "model.keras"
    assert federation_in(tmp_path, None)[1] == tmp_path
    # A fresh start with nothing to set aside keeps previous/; so do runs that stopped
    # before their model (each leaves its round-0 checkpoint and metrics line at once):
    # they go to previous-unfinished/, the latest replacing the one before.
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "model.keras").unlink()
    (tmp_path / "checkpoints").rmdir()
    start_state(tmp_path, False, Runner(None, None, None), [np.zeros(2)])
    assert (previous / "model.keras").read_text() == "first run"
    for attempt in ("failed once", "failed twice"):
        save_checkpoint(tmp_path / "checkpoints", 0, _payload(0))
        (tmp_path / "metrics.jsonl").write_text(attempt)
        start_state(tmp_path, False, Runner(None, None, None), [np.zeros(2)])
        assert (previous / "model.keras").read_text() == "first run"
        assert (previous / "privacy.jsonl").read_text() == "first run"
        assert (tmp_path / "previous-unfinished" / "metrics.jsonl").read_text() == attempt
    with pytest.raises(ValueError, match="holds no model"):
        model_in(tmp_path, None)  # neither kept run is taken for the folder's
    _earlier_run(tmp_path, "second run")
    start_state(tmp_path, False, Runner(None, None, None), [np.zeros(2)])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json", "previous", "previous-unfinished"]
    assert {(previous / n).read_text() for n in earlier if n != "checkpoints"} == {
        "second run"}


def test_a_crash_while_setting_the_earlier_run_aside_loses_neither_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed at any rename or removal of the move to previous/: the earlier run's files
    and the older previous/ are both still on disk, and the next fresh start finishes."""
    import os
    import shutil

    from server import resume

    calls = {"left": 0}

    def dies(real: Callable[..., Any]) -> Callable[..., Any]:
        def step(*args: Any) -> Any:
            if calls["left"] == 0:
                raise KeyboardInterrupt("killed")
            calls["left"] -= 1
            return real(*args)
        return step

    steps = 0
    while True:
        run = tmp_path / f"crash-{steps}"
        (run / "previous").mkdir(parents=True)
        (run / "previous" / "model.keras").write_text("older run")
        _earlier_run(run, "earlier run")
        calls["left"] = steps
        with monkeypatch.context() as patch:
            patch.setattr(resume.os, "replace", dies(os.replace))
            patch.setattr(resume.shutil, "rmtree", dies(shutil.rmtree))
            try:
                resume.set_aside(run)
                finished = True
            except KeyboardInterrupt:
                finished = False
        on_disk = {p.relative_to(run).as_posix(): p.read_text() for p in run.rglob("*")
                   if p.is_file() and p.parent.name != "checkpoints"}
        assert "older run" in on_disk.values() or finished, steps
        assert sum(v == "earlier run" for v in on_disk.values()) == 12, (steps, on_disk)
        resume.set_aside(run)  # the next fresh start
        assert sorted(p.name for p in run.iterdir()) == ["config.json", "previous"], steps
        assert (run / "previous" / "model.keras").read_text() == "earlier run"
        assert (run / "previous" / "checkpoints" / "round-00003.npz").is_file()
        if finished:
            break
        steps += 1
    assert steps == 15  # 12 renames into previous.new/, 2 for the swap, 1 removal


# ---------------------------------------------------------------------------------------
# Resuming a run (the real ServerApp loop; clients that step the weights by +1)
# ---------------------------------------------------------------------------------------


class StepGrid(FakeGrid):
    """Nodes that reply with the global weights plus one: each round moves the model."""

    def send_and_receive(self, messages: Any, *, timeout: float | None = None
                         ) -> list[Message]:
        out = []
        for m in messages:
            stepped = [a + np.float32(1) for a in m.content["arrays"].to_numpy_ndarrays()]
            out.append(Message(RecordDict({"arrays": ArrayRecord(stepped),
                                           "metrics": MetricRecord({"num-examples": 10})}),
                               reply_to=m))
        return out


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from simulations.experiment import prepare
    from simulations.settings import experiment_from_flat, resolve

    folder = tmp_path_factory.mktemp("eval")
    exp = experiment_from_flat({**resolve("quick").flat, "synthetic.num-merchants": 2})
    snaps = prepare(exp).snapshots
    snaps.subset(snaps.split > 0).save(folder / "eval.npz")
    return {**exp.flat, "federation.min-available-nodes": 2, "federation.min-train-nodes": 2,
            "federation.eval-data": str(folder / "eval.npz"),
            "federation.keep-checkpoints": 2}


def _run(flat: dict[str, Any], run_dir: Path, rounds: int, resume: bool = False
         ) -> dict[str, Any]:
    from server.app import run_federation
    from server.config import settings_from_flat

    settings = settings_from_flat({**flat, "federation.num-rounds": rounds,
                                   "federation.run-dir": str(run_dir),
                                   "federation.resume": resume})
    return run_federation(StepGrid([1, 2]), settings)


def _rounds(run_dir: Path) -> list[int]:
    return [json.loads(t)["round"] for t in (run_dir / "metrics.jsonl").open()]


def _final(run_dir: Path) -> list[np.ndarray]:
    with np.load(run_dir / "final_weights.npz") as npz:
        return [npz[k] for k in npz.files]


@pytest.mark.usefixtures("server_identity")
def test_resume_falls_back_to_the_newest_intact_checkpoint_and_extends_the_run(
        eval_setup: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    full = tmp_path / "full"
    _run(eval_setup, full, rounds=5)
    run = tmp_path / "run"
    _run(eval_setup, run, rounds=3)
    newest = run / "checkpoints" / "round-00003.npz"
    newest.write_bytes(newest.read_bytes()[:-50])  # damaged: round 2's is intact

    summary = _run(eval_setup, run, rounds=5, resume=True)  # and two rounds more

    assert summary["resumed_from"] == 2
    assert "round-00003.npz is unusable" in caplog.text
    assert "resuming from round-00002.npz, the newest intact checkpoint" in caplog.text
    assert _rounds(run) == [0, 1, 2, 3, 4, 5]  # round 3 redone once, not twice
    for got, want in zip(_final(run), _final(full), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.usefixtures("server_identity")
@pytest.mark.parametrize("damage", ["emptied", "all corrupt", "old format"])
def test_resume_without_a_usable_checkpoint_refuses_and_deletes_nothing(
        eval_setup: dict[str, Any], tmp_path: Path, damage: str) -> None:
    from server.resume import ResumeError

    run = tmp_path / "run"
    _run(eval_setup, run, rounds=2)
    ckpts = list_checkpoints(run / "checkpoints")
    for path in ckpts:
        if damage == "emptied":
            path.unlink()
        elif damage == "all corrupt":
            path.write_bytes(b"garbage")
        else:
            path.rename(path.with_suffix(".ckpt"))
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}

    with pytest.raises(ResumeError, match="cannot resume .*nothing was deleted"):
        _run(eval_setup, run, rounds=3, resume=True)

    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.usefixtures("server_identity")
def test_resume_refuses_a_checkpoint_of_another_model_layout(eval_setup: dict[str, Any],
                                                            tmp_path: Path) -> None:
    from server.resume import ResumeError

    run = tmp_path / "run"
    _run({**eval_setup, "model.activation-head": "separate"}, run, rounds=1)
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ResumeError, match="do not fit .* another model layout"):
        _run(eval_setup, run, rounds=2, resume=True)  # the contrast head's weights differ
    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.usefixtures("server_identity")
def test_resume_in_an_empty_folder_starts_at_round_one(eval_setup: dict[str, Any],
                                                       tmp_path: Path) -> None:
    summary = _run(eval_setup, tmp_path / "new", rounds=1, resume=True)
    assert summary["resumed_from"] == 0 and _rounds(tmp_path / "new") == [0, 1]


# ---------------------------------------------------------------------------------------
# `fedecay simulate --resume` settings (checked before any engine starts)
# ---------------------------------------------------------------------------------------


@pytest.fixture
def killed_run(tmp_path: Path) -> Path:
    from simulations.experiment import write_json
    from simulations.settings import resolve

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    write_json(run / "config.json", {**resolve("quick").flat, "federation.num-rounds": 3})
    save_checkpoint(run / "checkpoints", 2, _payload(2))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"round": r}) + "\n"
                                               for r in range(3)))
    return run


def test_resume_applies_more_rounds_and_records_them(killed_run: Path) -> None:
    from simulations.federated import resume_experiment

    exp = resume_experiment(killed_run, {"federation.num-rounds": 6})
    assert exp.federation.num_rounds == 6 and exp.federation.resume
    saved = json.loads((killed_run / "config.json").read_text())
    assert saved["federation.num-rounds"] == 6


@pytest.mark.parametrize(("overrides", "message"), [
    ({"model.lstm-units": 7}, "model.lstm-units cannot change on a resumed run"),
    ({"experiment.seed": 3}, "experiment.seed cannot change"),
    ({"federation.num-rounds": 1}, "2 rounds done, more than federation.num-rounds=1"),
])
def test_resume_refuses_what_it_cannot_apply_by_name(killed_run: Path, overrides: dict,
                                                     message: str) -> None:
    from simulations.federated import resume_experiment

    before = (killed_run / "config.json").read_bytes()
    with pytest.raises(ValueError, match=message):
        resume_experiment(killed_run, overrides)
    assert (killed_run / "config.json").read_bytes() == before


def test_cli_resume_errors_are_one_line_and_nothing_is_deleted(
        killed_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from simulations.cli import main

    for path in list_checkpoints(killed_run / "checkpoints"):
        path.unlink()
    before = sorted(p.name for p in killed_run.rglob("*"))
    assert main(["simulate", "--resume", str(killed_run)]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "nothing was deleted" in err and "Traceback" not in err
    assert main(["simulate", "--resume", str(killed_run), "--preset", "quick"]) == 2
    assert "--preset cannot be used with --resume" in capsys.readouterr().err
    assert sorted(p.name for p in killed_run.rglob("*")) == before
