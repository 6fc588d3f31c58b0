"""Ordinary file-system trouble and hostile input through the real CLI.

Every case runs ``simulations.cli.main`` in-process and expects exit code 2, one
``error:`` line on stderr naming the path, no traceback, and nothing half-written left
behind. No test trains a model: the failures happen before any training starts.
"""

from __future__ import annotations

import csv
import errno
import gzip
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import server.certs as certs
import simulations.experiment as experiment
from client.scoring import escape_formulas, write_scores
from simulations.cli import main, os_error_text
from simulations.experiment import run_folder
from simulations.settings import resolve


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], *expected: str) -> str:
    """Run the CLI, expect exit code 2 and one error line holding every ``expected``."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# ---------------------------------------------------------------------------------------
# Run folders: never an empty one after a failure, never one outside output-dir


def test_missing_events_file_leaves_no_run_folder(tmp_path: Path, capsys) -> None:
    runs = tmp_path / "runs"
    missing = tmp_path / "missing.csv"
    _fails(["train", "--mode", "gbdt", "--events", str(missing),
            "--set", f"experiment.output-dir={runs}"], capsys, str(missing),
           "No such file or directory")
    assert not runs.exists()


def test_truncated_gzip_events_leaves_no_run_folder(tmp_path: Path, capsys) -> None:
    whole = gzip.compress(b"user_id,merchant_id,timestamp,event\n"
                          + b"".join(b"u%d,m1,2024-01-01T00:00:00,view\n" % i
                                     for i in range(2000)))
    events = tmp_path / "events.csv.gz"
    events.write_bytes(whole[: len(whole) // 2])
    runs = tmp_path / "runs"
    _fails(["train", "--mode", "gbdt", "--events", str(events),
            "--set", f"experiment.output-dir={runs}"], capsys, str(events))
    assert not runs.exists()


@pytest.mark.parametrize("error", [
    EOFError("Compressed file ended before the end-of-stream marker was reached"),
    zlib.error("Error -3 while decompressing data: invalid block type"),
    zipfile.BadZipFile("File is not a zip file"),
    gzip.BadGzipFile("Not a gzipped file (b'ab')"),
    UnicodeDecodeError("utf-8", b"\xff\xfe", 0, 1, "invalid start byte"),
    PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/events.csv"),
], ids=lambda e: type(e).__name__)
def test_raw_decoding_errors_of_the_loader_are_one_line(tmp_path: Path, capsys, monkeypatch,
                                                        error: Exception) -> None:
    # Whatever a reader raises on bad bytes, the CLI names the input and keeps no folder.
    events = tmp_path / "events.csv"
    events.write_text("user_id,merchant_id,timestamp,event\n")
    runs = tmp_path / "runs"

    def broken(exp):
        raise error

    monkeypatch.setattr(experiment, "load_source", broken)
    expected = "/data/events.csv" if isinstance(error, PermissionError) else str(events)
    _fails(["train", "--mode", "gbdt", "--events", str(events),
            "--set", f"experiment.output-dir={runs}"], capsys, expected)
    assert not runs.exists()


def test_unknown_method_leaves_no_run_folder(tmp_path: Path, capsys) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    _fails(["compare", "--preset", "quick", "--methods", "gdbt",
            "--set", f"experiment.output-dir={runs}"], capsys, "--methods", "gdbt")
    assert not any(runs.iterdir())


def test_run_folder_is_removed_on_failure_unless_it_holds_a_result(tmp_path: Path) -> None:
    exp = resolve("quick", overrides=[f"experiment.output-dir={tmp_path}"])
    with pytest.raises(RuntimeError), run_folder(exp, "train") as run:
        (run / "config.json").write_text("{}")
        raise RuntimeError("the data could not be loaded")
    assert not any(tmp_path.iterdir())
    with pytest.raises(RuntimeError), run_folder(exp, "train") as run:
        (run / "config.json").write_text("{}")
        (run / "results.json").write_text("{}")
        raise RuntimeError("the third method failed")
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "results.json"]


@pytest.mark.parametrize("name", ["../../x", "a/b", "/tmp/abs", "..", "a\\b", ""])
def test_experiment_name_cannot_leave_the_output_dir(tmp_path: Path, capsys, name: str) -> None:
    runs = tmp_path / "deep" / "runs"
    _fails(["train", "--mode", "gbdt", "--set", f"experiment.output-dir={runs}",
            "--set", f"experiment.name='{name}'"], capsys, "experiment.name")
    assert not any(tmp_path.iterdir())


def test_output_dir_under_a_regular_file(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    _fails(["train", "--mode", "gbdt", "--set", f"experiment.output-dir={blocker}/runs"],
           capsys, "experiment.output-dir", str(blocker), "is a file")
    assert blocker.read_text() == "keep me"


# ---------------------------------------------------------------------------------------
# Presets


def test_preset_that_is_a_folder(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "mine.toml"
    folder.mkdir()
    _fails(["train", "--preset", str(folder)], capsys, str(folder), "is a folder")


def test_preset_that_is_not_utf8(tmp_path: Path, capsys) -> None:
    preset = tmp_path / "latin1.toml"
    preset.write_bytes('[experiment]\nname = "café"\n'.encode("latin-1"))
    _fails(["train", "--preset", str(preset)], capsys, str(preset), "not UTF-8")


def test_preset_that_is_not_toml(tmp_path: Path, capsys) -> None:
    preset = tmp_path / "broken.toml"
    preset.write_text("[experiment\nname = = 1\n")
    _fails(["train", "--preset", str(preset)], capsys, str(preset), "line 1")


# ---------------------------------------------------------------------------------------
# Models


def test_corrupt_model_is_not_reported_as_missing(tmp_path: Path, capsys) -> None:
    model = tmp_path / "model.keras"
    model.write_bytes(np.random.default_rng(0).bytes(4096))
    line = _fails(["score", "--model", str(model), "--events", str(tmp_path / "e.csv")],
                  capsys, str(model), "is not a readable Keras model")
    assert "not found" not in line


def test_zip_that_is_not_a_keras_model(tmp_path: Path, capsys) -> None:
    model = tmp_path / "model.keras"
    with zipfile.ZipFile(model, "w") as archive:
        archive.writestr("notes.txt", "not a model")
    _fails(["score", "--model", str(model), "--events", str(tmp_path / "e.csv")],
           capsys, str(model), "is not a readable Keras model")


def test_model_that_is_a_folder(tmp_path: Path, capsys) -> None:
    # A folder is a run folder: the model in it is used, and one without any is named.
    run = tmp_path / "run"
    run.mkdir()
    _fails(["score", "--model", str(run), "--events", str(tmp_path / "e.csv")],
           capsys, str(run), "holds no model")
    (run / "model.keras").write_bytes(b"")
    _fails(["score", "--model", str(run), "--events", str(tmp_path / "e.csv")],
           capsys, str(run / "model.keras"), "is not a readable Keras model")


def test_keras_model_that_is_not_a_scorer(tmp_path: Path, capsys) -> None:
    import keras

    path = tmp_path / "other.keras"
    keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)]).save(path)
    _fails(["score", "--model", str(path), "--events", str(tmp_path / "e.csv")],
           capsys, str(path), "not a fedecay scoring model")


def test_score_output_under_a_file_fails_before_scoring(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "scores"
    blocker.write_text("")
    # The model does not exist either: --out is checked first, before any work.
    _fails(["score", "--model", str(tmp_path / "none.keras"), "--events", "x.csv",
            "--out", str(blocker / "s.csv")], capsys, "--out", str(blocker), "is a file")


# ---------------------------------------------------------------------------------------
# deploy: all files or none


def test_certs_into_a_regular_file(tmp_path: Path, capsys) -> None:
    target = tmp_path / "certs"
    target.write_text("not a folder")
    _fails(["deploy", "certs", str(target)], capsys, str(target), "is a file")
    assert target.read_text() == "not a folder"
    assert _listing(tmp_path) == {"certs"}
    _fails(["deploy", "node-key", str(target / "keys")], capsys, str(target), "is a file")
    assert _listing(tmp_path) == {"certs"}


def test_certs_over_a_folder_of_the_same_name(tmp_path: Path, capsys) -> None:
    (tmp_path / "ca.crt").mkdir()
    _fails(["deploy", "certs", str(tmp_path), "--overwrite"], capsys,
           str(tmp_path / "ca.crt"), "folder")
    assert _listing(tmp_path) == {"ca.crt"}  # no new CA without its key, nor anything else


def test_existing_certs_name_the_overwrite_flag(tmp_path: Path, capsys) -> None:
    assert main(["deploy", "certs", str(tmp_path)]) == 0
    _fails(["deploy", "certs", str(tmp_path)], capsys, "ca.crt", "--overwrite")
    _fails(["deploy", "node-key", str(tmp_path), "--name", "ca.crt"], capsys, "--overwrite")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_certs_failing_midway_leave_nothing(tmp_path: Path, capsys, monkeypatch,
                                            code: int) -> None:
    real = certs._write
    calls = []

    def third_fails(path: Path, data: bytes, *, private: bool) -> None:
        calls.append(path)
        if len(calls) == 3:
            raise OSError(code, os.strerror(code), str(path))
        real(path, data, private=private)

    monkeypatch.setattr(certs, "_write", third_fails)
    target = tmp_path / "new" / "certs"
    # The message names the file's final path, not the hidden staging folder.
    _fails(["deploy", "certs", str(target)], capsys, os.strerror(code),
           str(target / "server.csr"))
    assert len(calls) == 3
    assert not any(tmp_path.iterdir())  # the folders this call made are gone too


def test_certs_overwrite_failing_midway_keeps_the_old_set(tmp_path: Path, capsys,
                                                          monkeypatch) -> None:
    first = certs.make_certs(tmp_path)
    before = {k: p.read_bytes() for k, p in first.items()}
    real = os.replace
    calls = []

    def fourth_fails(src, dst):
        calls.append(dst)
        if len(calls) == 4:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(dst))
        real(src, dst)

    monkeypatch.setattr(certs.os, "replace", fourth_fails)
    _fails(["deploy", "certs", str(tmp_path), "--overwrite"], capsys, "Input/output error")
    monkeypatch.undo()
    assert {k: p.read_bytes() for k, p in first.items()} == before  # the CA and its key match
    assert _listing(tmp_path) == set(certs.CERT_FILES.values())  # no staging folder left


def test_node_key_failing_midway_leaves_nothing(tmp_path: Path, capsys, monkeypatch) -> None:
    def full(path: Path, data: bytes, *, private: bool) -> None:
        if not private:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        Path(path).write_bytes(data)

    monkeypatch.setattr(certs, "_write", full)
    _fails(["deploy", "node-key", str(tmp_path), "--name", "m1"], capsys,
           "No space left on device")
    assert not any(tmp_path.iterdir())


def test_a_bug_still_shows_its_traceback(monkeypatch, capsys) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(certs, "make_certs", broken)
    with pytest.raises(RuntimeError, match="boom"):
        main(["deploy", "certs", "unused"])
    assert "internal error (RuntimeError), a bug in fedecay" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# The one-line OSError message


@pytest.mark.parametrize(("code", "expected"), [
    (errno.ENOENT, "cannot open /d/f: No such file or directory"),
    (errno.ENOSPC, "cannot write /d/f: No space left on device"),
    (errno.EROFS, "cannot write /d/f: Read-only file system"),
    (errno.EACCES, "cannot access /d/f: Permission denied"),
    (errno.EISDIR, "cannot open /d/f: Is a directory (a folder where a file was expected)"),
    (errno.ENOTDIR, "cannot use /d/f: Not a directory (a part of the path is a file, "
                    "not a folder)"),
])
def test_os_error_text(code: int, expected: str) -> None:
    assert os_error_text(OSError(code, os.strerror(code), "/d/f")) == expected


def test_os_error_text_keeps_our_own_messages() -> None:
    assert os_error_text(FileExistsError("/d/f already exists")) == "/d/f already exists"
    assert os_error_text(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) == \
        "cannot write: No space left on device"


# ---------------------------------------------------------------------------------------
# Scores as CSV: no spreadsheet formulas


def _scores() -> pd.DataFrame:
    ids = ["=cmd|' /C calc'!A0", "+1", "-2", "@SUM(A1)", "\tx", "\rx", "plain", None]
    return pd.DataFrame({
        "user_id": pd.Series(ids, dtype="string"),
        "merchant_id": pd.Series(["m1"] * 7 + ["=HYPERLINK(1)"], dtype="string"),
        "decay_risk": np.linspace(0, 1, 8),
        "uplift": [-0.25, -1.0, 0.5, -3e-5, 0.0, 1.0, -2.0, 0.1],
    })


def test_csv_scores_escape_formulas_but_keep_negative_numbers(tmp_path: Path) -> None:
    path = write_scores(_scores(), tmp_path / "scores.csv")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["user_id"] for r in rows] == [
        "'=cmd|' /C calc'!A0", "'+1", "'-2", "'@SUM(A1)", "'\tx", "'\rx", "plain", ""]
    assert rows[-1]["merchant_id"] == "'=HYPERLINK(1)"
    assert [float(r["uplift"]) for r in rows] == [-0.25, -1.0, 0.5, -3e-5, 0.0, 1.0, -2.0, 0.1]
    read = pd.read_csv(path)
    assert read["uplift"].dtype == np.float64 and read["decay_risk"].dtype == np.float64
    assert not list(tmp_path.glob("*.tmp"))


def test_parquet_scores_are_left_as_data(tmp_path: Path) -> None:
    frame = _scores()
    path = write_scores(frame, tmp_path / "scores.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(path), frame)
    assert escape_formulas(frame)["user_id"].iloc[0] == "'" + frame["user_id"].iloc[0]
    assert frame["user_id"].iloc[0].startswith("=")  # the caller's frame is not changed
