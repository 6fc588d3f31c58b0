"""Experiments: shared data for every method, partitioning logs without merchants, Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import free_ports, ray_node

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
    """`fedecay simulate --ray-address` on a local `ray start --head` with a bounded life
    (two nodes: tests/test_ray_cluster.py)."""
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "TF_CPP_MIN_LOG_LEVEL": "3",
           "TF_ENABLE_ONEDNN_OPTS": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    port, client_server = free_ports(2)
    with ray_node(["--head", f"--port={port}", f"--ray-client-server-port={client_server}",
                   "--num-cpus=2", "--node-ip-address=127.0.0.1",
                   "--include-dashboard=false"], tmp_path / "head.log", env):
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
