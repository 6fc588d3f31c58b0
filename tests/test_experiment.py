"""Experiments: shared data for every method, partitioning logs without merchants, Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

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


def test_partitioner_needs_two_partitions_users_for_them_and_a_log_without_merchants(
        ) -> None:
    log = _log_without_merchants()
    with pytest.raises(ValueError, match="data.num-partitions"):
        partition_users(log, DataConfig(partitioner="iid", num_partitions=1), seed=0)
    with pytest.raises(ValueError, match=r"'data.num-partitions': 61 merchants from 60 users"):
        partition_users(log, DataConfig(partitioner="iid", num_partitions=61), seed=0)
    two = log.assign(merchant_id=["m1", "m2"] * (len(log) // 2) + ["m1"] * (len(log) % 2))
    with pytest.raises(ValueError, match=r"'data.partitioner': the log names 2 merchants"):
        partition_users(two, DataConfig(partitioner="iid", num_partitions=4), seed=0)


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
