"""The command line: exit codes, messages and files a user sees first."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from helpers import run_driver

from common.config import SnapshotConfig, apply_overrides, from_flat
from simulations.cli import main
from simulations.settings import experiment_from_flat, resolve


def test_data_synth_writes_parquet_and_check_accepts_it(tmp_path: Path, capsys) -> None:
    out = tmp_path / "fed"
    assert main(["data", "synth", "--preset", "quick", "--out", str(out), "--seed", "3"]) == 0
    events = pd.read_parquet(out / "events.parquet")
    assert len(events) > 10_000 and events["merchant_id"].nunique() == 8
    # The next step checks the file with the preset's calendar (it left --preset out).
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"next: fedecay data check {out / 'events.parquet'} --interventions "
        f"{out / 'interventions.parquet'} --preset quick")
    rc = main(["data", "check", str(out / "events.parquet"),
               "--interventions", str(out / "interventions.parquet")])
    text = capsys.readouterr().out
    assert rc == 0
    assert "decay rate" in text and "OK: this file can join a federation" in text
    assert "train" in text and "test" in text
    # Again into the same folder: replaced only when asked, each file all at once.
    assert main(["data", "synth", "--preset", "quick", "--out", str(out), "--seed", "3"]) == 2
    assert main(["data", "synth", "--preset", "quick", "--out", str(out), "--seed", "4",
                 "--overwrite"]) == 0
    assert not pd.read_parquet(out / "events.parquet").equals(events)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{name}.parquet" for name in ("events", "interventions", "truth", "users", "merchants"))


def test_data_check_rejects_bad_file_with_exit_code_and_message(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,timestamp,event\nu1,2025-01-01T00:00:00Z,teleport\n")
    rc = main(["data", "check", str(bad), "--format", "canonical"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "bad.csv" in err and "teleport" in err and "event" in err


def test_data_check_checks_a_supernode_node_config_string(tmp_path: Path, capsys) -> None:
    """A merchant checks the --node-config string it will give its SuperNode before
    joining: the keys the ClientApp refuses are named here too, and the files it names
    are the ones checked."""
    good = tmp_path / "events.csv"
    good.write_text("user_id,timestamp,event\nu1,2025-01-01T00:00:00Z,view\n")
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,timestamp,event\nu1,2025-01-01T00:00:00Z,teleport\n")

    def check(*args: str) -> tuple[int, str]:
        rc = main(["data", "check", *args])
        return rc, capsys.readouterr().err

    rc, err = check("--node-config", f"data-path='{good}' interventions_path='/x.csv'")
    assert rc == 2 and ("--node-config: node config key 'interventions_path': unknown: did "
                        "you mean 'interventions-path'?") in err
    rc, err = check("--node-config", "data-path='events.csv'")
    assert rc == 2 and "'events.csv' is not an absolute path" in err
    rc, err = check("--node-config", f"data-path='{bad}' format='canonical'")
    assert rc == 2 and "bad.csv" in err and "teleport" in err  # the file it names is read
    rc, err = check(str(good), "--node-config", f"data-path='{bad}'")
    assert rc == 2 and "FILE" in err and "data-path" in err
    rc, err = check("--node-config", "data-path=")
    assert rc == 2 and "--node-config" in err
    rc, err = check()
    assert rc == 2 and "FILE" in err


def test_unknown_config_key_names_the_key() -> None:
    with pytest.raises(ValueError, match="train.epochz"):
        resolve("quick", overrides=["train.epochz=3"])
    with pytest.raises(ValueError, match="unknown config key 'nosuch.key'"):
        experiment_from_flat({"nosuch.key": 1})


def test_out_of_range_value_names_the_key() -> None:
    with pytest.raises(ValueError, match="snapshots.rho"):
        from_flat(SnapshotConfig, {"snapshots.rho": 1.5}, "snapshots")
    with pytest.raises(ValueError, match="federation.strategy"):
        resolve("quick", overrides=["federation.strategy=fedmagic"])


def test_overrides_parse_toml_scalars() -> None:
    flat = apply_overrides({}, ["train.epochs=3", "model.dropout=0.25", "model.bidirectional=true",
                                "experiment.name=my run"])
    assert flat == {"train.epochs": 3, "model.dropout": 0.25, "model.bidirectional": True,
                    "experiment.name": "my run"}
    exp = resolve("quick", overrides=["train.epochs=3", "snapshots.actions=none,coupon"])
    assert exp.train.epochs == 3
    assert exp.snapshots.actions == ("none", "coupon")


def test_a_log_given_as_data_events_drops_the_presets_synthetic_section(
        tmp_path: Path) -> None:
    events = tmp_path / "events.csv"
    events.write_text("user_id,timestamp,event\na,2020-01-01,view\n")
    exp = resolve("quick", overrides=[f"data.events={events}"])  # as README lists the key
    assert exp.synthetic is None and not any(k.startswith("synthetic.") for k in exp.flat)
    assert resolve(events=str(events), overrides=["data.format=canonical"]).data.format \
        == "canonical"  # --format not given: --set alone decides
    with pytest.raises(ValueError, match=r"'synthetic.num-merchants': the data comes from"):
        resolve(events=str(events), overrides=["synthetic.num-merchants=3"])


def test_bare_toml_dates_become_iso_text(tmp_path: Path) -> None:
    # `--set snapshots.start=2025-01-01` (as the docs write it) and an unquoted date in a
    # preset parse as TOML dates: config.json could not hold them (a TypeError once).
    flat = apply_overrides({}, ["snapshots.start=2025-01-01",
                                "snapshots.end=2025-03-31T23:59:59Z"])
    assert flat == {"snapshots.start": "2025-01-01", "snapshots.end": "2025-03-31T23:59:59+00:00"}
    preset = tmp_path / "mine.toml"
    preset.write_bytes("\ufeff[synthetic]\nnum-merchants = 3\n[snapshots]\n"
                       "start = 2025-01-01\n".encode())  # and a byte-order mark
    exp = resolve(str(preset))
    assert exp.flat["snapshots.start"] == "2025-01-01"
    json.dumps(exp.flat)


def test_deploy_commands_write_files(tmp_path: Path, capsys) -> None:
    assert main(["deploy", "certs", str(tmp_path / "certs")]) == 0
    assert (tmp_path / "certs" / "server.crt").exists()
    assert main(["deploy", "node-key", str(tmp_path / "keys"), "--name", "m1"]) == 0
    assert (tmp_path / "keys" / "m1.pub").read_text().startswith("ecdsa-sha2-nistp384")
    # A second run refuses to overwrite, with exit code 2 and the file named.
    capsys.readouterr()
    assert main(["deploy", "node-key", str(tmp_path / "keys"), "--name", "m1"]) == 2
    assert "m1" in capsys.readouterr().err


def test_bench_prints_and_writes_every_throughput(tmp_path: Path, capsys) -> None:
    import json

    out = tmp_path / "bench.json"
    rc = main(["bench", "--preset", "quick", "--set", "synthetic.num-merchants=3",
               "--set", "train.batch-size=64", "--repeat", "1", "--json", str(out)])
    text = capsys.readouterr().out
    figures = json.loads(out.read_text())
    assert rc == 0
    for key in ("generation_events_per_s", "snapshot_events_per_s",
                "centralised_samples_per_s", "scoring_users_per_s", "predict_only_users_per_s",
                "targeted_explained_per_s", "targeted_explained_per_s_4_points"):
        assert figures[key] > 0 and key in text
    assert 0 < figures["scored_users"] <= figures["snapshots"]



@pytest.mark.slow
def test_bench_times_a_federation_against_centralised_training(tmp_path: Path) -> None:
    """``--federation``: a real simulation on Ray beside the centralised epochs (in a
    subprocess of its own session, as the other simulations of the suite)."""
    import json

    out = tmp_path / "bench.json"
    run = run_driver("cli_main", [
        "bench", "--preset", "quick", "--set", "synthetic.num-merchants=3", "--repeat", "1",
        "--federation", "3", "--rounds", "3", "--json", str(out)],
        cwd=tmp_path, log=tmp_path / "run.log", timeout=600)
    run.check()
    text = run.text()
    [row] = json.loads(out.read_text())["federation"]
    assert row["merchants"] == row["sampled_per_round"] == 3
    for key in ("centralised_s_per_epoch", "federated_steady_round_s", "first_round_s",
                "startup_s", "total_federated_s", "client_fit_s_median",
                "centralised_samples_per_s", "federated_samples_per_s", "peak_memory_mb"):
        assert row[key] > 0, key
        assert key in text
    assert row["federated_over_centralised"] == pytest.approx(
        row["federated_steady_round_s"] / row["centralised_s_per_epoch"])
    assert row["federated_samples_per_s"] == pytest.approx(
        row["train_snapshots"] / row["federated_steady_round_s"])
    assert row["centralised_samples_per_s"] == pytest.approx(
        row["train_snapshots"] / row["centralised_s_per_epoch"])
    assert row["total_federated_s"] > row["first_round_s"] + row["federated_steady_round_s"]
    assert row["per_client_overhead_ms"] >= 0


def test_tracking_flag_sets_the_config_key_and_refuses_other_values(capsys) -> None:
    from simulations.cli.options import tracking_keys

    assert tracking_keys(None) == {}
    assert tracking_keys("mlflow") == {"experiment.tracking": "tensorboard,mlflow"}
    assert main(["train", "--tracking", "wandb"]) == 2
    assert "wandb" in capsys.readouterr().err
