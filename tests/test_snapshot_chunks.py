"""Snapshots built in chunks of merchants equal those built at once (common.snapshots.chunks),
and so do the shards a simulation writes from them."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from common.snapshots import Snapshots, build_snapshots
from simulations.experiment import prepare, shared_calendar
from simulations.federated import write_shards
from simulations.settings import resolve
from simulations.synth import generate_federation

SMALL = ["synthetic.num-merchants=12", "synthetic.users-median=12", "synthetic.min-users=4"]


def assert_same(a: Snapshots, b: Snapshots) -> None:
    assert len(a) == len(b) > 0
    for f in dataclasses.fields(Snapshots):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert x.dtype == y.dtype, f.name
        assert np.array_equal(x, y), f.name


def report_json(report: object) -> str:
    return json.dumps(dataclasses.asdict(report), default=str, sort_keys=True)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def federation():
    exp = resolve("quick", overrides=SMALL)
    fed = generate_federation(exp.synthetic, seed=3)
    return fed, shared_calendar(fed.events, exp.snapshots)


@pytest.mark.parametrize("chunk_events", [1, 2_000, 10**9])
def test_chunked_build_equals_the_whole(federation, chunk_events):
    fed, cfg = federation
    whole, whole_report = build_snapshots(fed.events, cfg, fed.interventions)
    chunked, report = build_snapshots(fed.events, cfg, fed.interventions,
                                      chunk_events=chunk_events)
    assert_same(whole, chunked)
    assert report_json(report) == report_json(whole_report)
    # Interventions are numbered as rows of the whole frame, as at once.
    assert (chunked.intervention >= 0).sum() > 0


def test_chunks_fill_propensities_and_drop_merchants_as_the_whole_log(federation):
    fed, cfg = federation
    iv = fed.interventions.copy()
    iv.loc[iv.index[::3], "propensity"] = np.nan  # filled from the whole frame's shares
    # Interventions of a merchant with no event count as unmatched once.
    ghost = iv.iloc[:5].assign(merchant_id="zz-ghost")
    iv = pd.concat([iv, ghost], ignore_index=True)
    # A merchant whose events all lie outside the calendar gives nothing.
    events = fed.events.copy()
    late = events["merchant_id"] == events["merchant_id"].iloc[-1]
    events.loc[late, "timestamp"] += np.timedelta64(400, "D")
    whole, whole_report = build_snapshots(events, cfg, iv)
    chunked, report = build_snapshots(events, cfg, iv, chunk_events=1)
    assert_same(whole, chunked)
    assert report_json(report) == report_json(whole_report)
    assert report.interventions_unmatched >= 5
    assert not np.isin(events.loc[late, "merchant_id"].iloc[0], chunked.merchant_id)


def test_preparation_with_a_tiny_chunk_gives_the_same_shards(tmp_path):
    exp = resolve("quick", overrides=SMALL)
    whole = prepare(exp, chunk_events=0)
    tiny = prepare(exp, chunk_events=1)
    assert_same(whole.snapshots, tiny.snapshots)
    assert whole.merchants == tiny.merchants
    a, b = tmp_path / "whole", tmp_path / "tiny"
    paths = write_shards(whole, a)
    write_shards(tiny, b)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert len(paths) == len(whole.merchants)
    assert any(name.endswith("-interventions.parquet") for name in files)
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert not [p for p in a.iterdir() if ".tmp" in p.name]  # nothing half-written
    # Each shard holds exactly its merchant's events.
    shard = pd.read_parquet(paths[1])
    assert set(shard["merchant_id"].astype(str)) == {whole.merchants[1]}
    assert len(shard) == int((whole.events["merchant_id"] == whole.merchants[1]).sum())
