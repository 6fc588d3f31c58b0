"""Experiments: shared data for every method, partitioning logs without merchants, Ray."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import free_ports, listening

from simulations.experiment import partition_users, prepare
from simulations.settings import DataConfig, resolve

ROOT = Path(__file__).resolve().parents[1]


def _log_without_merchants(n_users: int = 60, seed: int = 0) -> pd.DataFrame:
    from simulations.synth import generate_federation, load_preset, synth_config_from_preset

    fed = generate_federation(synth_config_from_preset(load_preset("quick")), seed=seed)
    ev = fed.events
    users = ev["user_id"].drop_duplicates().iloc[:n_users]
    ev = ev[ev["user_id"].isin(users)].copy()
    ev["merchant_id"] = "local"
    return ev.reset_index(drop=True)


@pytest.mark.parametrize("kind", ["iid", "dirichlet"])
def test_flower_partitioner_turns_a_log_into_merchants(kind: str) -> None:
    ev = _log_without_merchants()
    cfg = DataConfig(partitioner=kind, num_partitions=4, dirichlet_alpha=0.5)
    out = partition_users(ev, cfg, seed=1)
    assert len(out) == len(ev)  # no event lost
    owners = out.groupby("user_id", observed=True)["merchant_id"].nunique()
    assert (owners == 1).all()  # a user belongs to one merchant
    assert set(out["merchant_id"].unique()) <= {f"p{i:04d}" for i in range(4)}
    assert out["merchant_id"].nunique() >= 2
    again = partition_users(ev, cfg, seed=1)
    pd.testing.assert_series_equal(out["merchant_id"], again["merchant_id"])  # seeded


def test_partitioner_needs_two_partitions() -> None:
    with pytest.raises(ValueError, match="data.num-partitions"):
        partition_users(_log_without_merchants(), DataConfig(partitioner="iid",
                                                             num_partitions=1), seed=0)


def test_prepare_gives_every_method_the_same_snapshots() -> None:
    exp = resolve("quick", overrides=["synthetic.num-merchants=4"])
    a, b = prepare(exp), prepare(exp)
    assert a.merchants == b.merchants
    np.testing.assert_array_equal(a.snapshots.decay, b.snapshots.decay)
    np.testing.assert_array_equal(a.snapshots.events, b.snapshots.events)
    # The shared calendar is fixed from the pooled log and used by every merchant.
    assert a.snapshot_config.start and a.snapshot_config.end
    truth = a.truth_matrix(a.snapshots)
    rows = a.snapshots.action >= 0
    assert rows.any() and np.isfinite(truth[rows]).all() and np.isnan(truth[~rows]).all()


@pytest.mark.slow
def test_simulate_attaches_to_an_existing_ray_cluster(tmp_path: Path) -> None:
    """`fedecay simulate --ray-address` on a local `ray start --head` with a bounded life."""
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "TF_CPP_MIN_LOG_LEVEL": "3",
           "TF_ENABLE_ONEDNN_OPTS": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    [port] = free_ports(1)
    ray_bin = Path(sys.executable).parent / "ray"
    # Ray's unix socket paths must stay short: pytest's tmp_path is too deep for them.
    ray_tmp = tempfile.mkdtemp(prefix="fdray")
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
         "--node-ip-address=127.0.0.1", "--disable-usage-stats",
         "--include-dashboard=false", f"--temp-dir={ray_tmp}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if listening(port):
                break
            time.sleep(1)
        else:
            pytest.fail("ray head did not start within 90 s")
        out = subprocess.run(
            [sys.executable, "-m", "simulations.cli", "simulate", "--preset", "quick",
             "--ray-address", f"127.0.0.1:{port}",
             "--set", "federation.num-rounds=1", "--set", "synthetic.num-merchants=3",
             "--set", f"experiment.output-dir={tmp_path / 'runs'}"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        # Off a terminal the progress is one line per round on stderr.
        assert "federated rounds 1/1 rounds" in out.stderr and "clients=3/3" in out.stderr
        runs = list((tmp_path / "runs").glob("*-simulate-quick/metrics.jsonl"))
        assert len(runs) == 1
    finally:
        os.killpg(head.pid, 15)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)
            head.wait(timeout=10)
        shutil.rmtree(ray_tmp, ignore_errors=True)
