"""The customer-level membership audit: its split, the canaries and the attack's AUC."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from common.snapshots import Snapshots
from common.vocabulary import EVENT_TYPES
from simulations.customer_audit import (
    CANARY_PATTERN,
    make_canaries,
    score_customers,
    split_customers,
    training_data,
)


def _snaps(merchant: list[str], user: list[str], split: list[int],
           decay: list[float] | None = None) -> Snapshots:
    n = len(user)
    cutoff = np.array(["2025-02-01"] * n, dtype="datetime64[ns]")
    return Snapshots(
        events=np.zeros((n, 4), np.int32), categories=np.zeros((n, 4), np.int32),
        numeric=np.zeros((n, 4, 3), np.float32), static=np.zeros((n, 2), np.float32),
        decay=np.asarray(decay if decay is not None else [0.0] * n, np.float32),
        interest=np.zeros(n, np.float32), interest_now=np.zeros(n, np.float32),
        action=np.full(n, -1, np.int32), activation=np.zeros(n, np.float32),
        propensity=np.ones(n, np.float32), intervention=np.full(n, -1, np.int64),
        user_id=np.array(user, dtype=object), merchant_id=np.array(merchant, dtype=object),
        cutoff=cutoff, split=np.asarray(split, np.int8),
        fading_category=np.array([""] * n, dtype=object))


def _population(merchants: int = 3, users: int = 10) -> Snapshots:
    m, u, s = [], [], []
    for i in range(merchants):
        for j in range(users):
            for split in (0, 0, 2):  # two training-period snapshots and a test one
                m.append(f"m{i}")
                u.append(f"m{i}-u{j}")
                s.append(split)
    return _snaps(m, u, s)


def test_split_keeps_merchants_and_puts_no_customer_on_both_sides() -> None:
    snaps = _population()
    split = split_customers(snaps, 0.3, seed=1)
    members, held = set(split.members), set(split.held_out)
    assert not members & held
    assert members | held == {(f"m{i}", f"m{i}-u{j}") for i in range(3) for j in range(10)}
    for i in range(3):  # every merchant on both sides, 3 of 10 withheld
        assert sum(m == f"m{i}" for m, _ in held) == 3
        assert sum(m == f"m{i}" for m, _ in members) == 7
    assert split_customers(snaps, 0.3, seed=1) == split
    assert split_customers(snaps, 0.3, seed=2).held_out != split.held_out
    with pytest.raises(ValueError, match="held-out share"):
        split_customers(snaps, 1.0, seed=0)


def test_training_data_drops_the_withheld_customers_only() -> None:
    from simulations.experiment import PreparedData

    snaps = _population()
    split = split_customers(snaps, 0.3, seed=0)
    events = pd.DataFrame({"user_id": snaps.user_id.astype(str),
                           "merchant_id": snaps.merchant_id.astype(str)})
    data = PreparedData(events=events, interventions=events.iloc[:0], truth=None,
                        snapshots=snaps, report=None,  # type: ignore[arg-type]
                        snapshot_config=None,  # type: ignore[arg-type]
                        merchants=["m0", "m1", "m2"], actions=(), seconds=0.0)
    out = training_data(data, split)
    kept = set(zip(out.snapshots.merchant_id, out.snapshots.user_id, strict=True))
    assert kept == set(split.members)
    assert set(zip(out.events.merchant_id, out.events.user_id, strict=True)) == kept
    assert out.merchants == data.merchants and len(data.snapshots) == 90  # input untouched


def _log() -> pd.DataFrame:
    from common.schema import empty_events

    base = empty_events()
    rows = pd.DataFrame({
        "user_id": ["a", "a", "b"], "event": ["view", "view", "click"],
        "timestamp": pd.to_datetime(["2025-01-01 10:00", "2025-01-20 10:00",
                                     "2025-02-28 10:00"], utc=True),
        "item_id": ["i1", "i2", "i3"], "category_id": ["c1", "c1", "c2"],
        "merchant_id": ["m0", "m0", "m1"], "value": [0.0, 0.0, 0.0]})
    return pd.concat([base, rows.astype(base.dtypes.to_dict())], ignore_index=True)


def test_canaries_are_seeded_paired_and_unusual() -> None:
    log = _log()
    out, table = make_canaries(log, 3, seed=5)
    assert len(table) == 6 and table["member"].sum() == 3
    assert (table.groupby("pair")["merchant_id"].nunique() == 1).all()  # a pair, one merchant
    assert (table.groupby("pair")["member"].sum() == 1).all()
    added = out.iloc[len(log):]
    assert out.dtypes.equals(log.dtypes) and out.iloc[:len(log)].equals(log)
    assert set(added["user_id"]) == set(table["user_id"])
    for _user, rows in added.groupby("user_id", observed=True):
        assert rows["category_id"].nunique() == 1  # its own category, nobody else's
        assert rows["category_id"].iat[0] not in set(log["category_id"])
        pattern = rows["event"].astype(str).to_numpy()
        assert len(pattern) % CANARY_PATTERN == 0 and len(pattern) >= 2 * CANARY_PATTERN
        sessions = pattern.reshape(-1, CANARY_PATTERN)
        assert (sessions == sessions[0]).all()  # the same pattern repeated
        assert set(pattern) <= set(EVENT_TYPES)
        assert rows["timestamp"].min() >= log["timestamp"].min().floor("D")
        assert rows["timestamp"].max() <= log["timestamp"].max() + pd.Timedelta(days=1)
    again, _ = make_canaries(log, 3, seed=5)
    assert again.equals(out)
    other, _ = make_canaries(log, 3, seed=6)
    assert not other.equals(out)


def test_scores_give_auc_one_when_members_have_no_loss() -> None:
    snaps = _population()
    split = split_customers(snaps, 0.3, seed=0)
    members = set(split.members)
    pairs = zip(snaps.merchant_id, snaps.user_id, strict=True)
    loss = np.array([0.0 if p in members else 1.0 for p in pairs])
    loss[snaps.split == 2] = 5.0  # test-period rows are never scored
    out = score_customers(snaps, loss, split, seed=0, n_boot=50)["customers"]
    assert out["auc"] == 1.0 and out["ci_low"] == 1.0
    assert out["members"] == 21 and out["non_members"] == 9
    assert out["member_snapshots"] == 42 and out["member_loss"] == 0.0
    flipped = score_customers(snaps, 1.0 - loss, split, seed=0, n_boot=50)["customers"]
    assert flipped["auc"] == 0.0
    assert "canaries" not in score_customers(snaps, loss, split, seed=0, n_boot=50)


@pytest.mark.parametrize("args, expected", [
    (["--unit", "customer", "--run", "x"], "--unit customer trains its own run"),
    (["--canaries", "3", "--run", "x"], "--canaries go with --unit customer"),
    ([], "--run is required"),
])
def test_the_audit_options_that_do_not_go_together(capsys: pytest.CaptureFixture[str],
                                                   args: list[str], expected: str) -> None:
    from simulations.cli import main

    assert main(["privacy", "audit", *args]) == 2
    assert expected in capsys.readouterr().err
