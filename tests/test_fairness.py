"""The fairness report: per-segment AUC by hand, quartile edges, flags, "—" (the
calibration error's tests are in tests/test_metrics.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.config import PolicyConfig
from common.features import AGGREGATE_FEATURES
from common.snapshots import Snapshots
from simulations.fairness import (
    DASH,
    fairness,
    fairness_blocks,
    quartile_edges,
    quartile_of,
    segment_auc,
    segment_rows,
    segmentations,
    write_fairness_plot,
)
from simulations.render import Paragraph, Table, to_markdown

ACTIONS = ("none", "recommend", "coupon", "push")
OBSERVATION_DAYS = 28.0


# ---------------------------------------------------------------------------- metrics


def test_segment_auc_by_hand() -> None:
    y, p = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    assert segment_auc(y, p, min_rows=4) == pytest.approx(0.75)  # 3 of 4 pairs ordered
    assert math.isnan(segment_auc(y, p))  # fewer than MIN_ROWS (20) rows
    assert math.isnan(segment_auc([1] * 30, np.linspace(0, 1, 30)))  # one class


def test_quartile_edges_and_assignment() -> None:
    x = np.arange(1, 9)
    assert quartile_edges(x) == pytest.approx([2.75, 4.5, 6.25])
    assert quartile_of(x, quartile_edges(x)).tolist() == [1, 1, 2, 2, 3, 3, 4, 4]
    # ties at an edge fall into the lower quartile, which leaves q2 empty
    tied = np.array([0, 0, 0, 0, 0, 5, 6, 7])
    edges = quartile_edges(tied)
    assert edges == pytest.approx([0.0, 0.0, 5.25])
    assert quartile_of(tied, edges).tolist() == [1, 1, 1, 1, 1, 3, 4, 4]
    assert all(math.isnan(e) for e in quartile_edges([]))


# ----------------------------------------------------------------- a hand-built test set


def _static(**columns: np.ndarray) -> np.ndarray:
    n = len(next(iter(columns.values())))
    static = np.zeros((n, len(AGGREGATE_FEATURES)), np.float32)
    for name, values in columns.items():
        static[:, AGGREGATE_FEATURES.index(name)] = np.log1p(values)
    return static


def hand_built() -> tuple[Snapshots, np.ndarray]:
    """160 test rows: 80 new customers of merchant A (first event 5 days before the
    cutoff, no spend), 80 rows of 40 returning customers of merchant B (two cutoffs each,
    tenure 100 days; spend 100 when they decay, 50 when not). Events: 1..160 by row.
    Labels alternate. Returns the snapshots and a risk that is reversed on the new rows
    (decayed 0.2, kept 0.3) and right on the returning ones (0.9 / 0.1)."""
    n = 160
    new = np.arange(n) < 80
    y = (np.arange(n) % 2).astype(np.float32)
    static = _static(log_tenure_days=np.where(new, 5.0, 100.0),
                     log_n_purchase=np.arange(1, n + 1, dtype=float),
                     log_value_sum=np.where(new, 0.0, np.where(y == 1, 100.0, 50.0)))
    users = np.array([f"a{i}" if i < 80 else f"b{(i - 80) // 2}" for i in range(n)], object)
    snaps = Snapshots(
        events=np.ones((n, 2), np.int32), categories=np.ones((n, 2), np.int32),
        numeric=np.zeros((n, 2, 3), np.float32), static=static, decay=y,
        interest=np.zeros(n, np.float32), interest_now=np.ones(n, np.float32),
        action=np.full(n, -1, np.int32), activation=np.zeros(n, np.float32),
        propensity=np.ones(n, np.float32), intervention=np.full(n, -1, np.int64),
        user_id=users, merchant_id=np.where(new, "A", "B").astype(object),
        cutoff=np.full(n, np.datetime64("2025-03-01"), "datetime64[ns]"),
        split=np.full(n, 2, np.int8), fading_category=np.full(n, "c1", object))
    risk = np.where(new, np.where(y == 1, 0.2, 0.3), np.where(y == 1, 0.9, 0.1))
    return snaps, risk


def _activation(n: int) -> np.ndarray:
    # recommend pays for everyone (10 x 0.4 - 0.05 > 0): the risk threshold decides
    return np.tile([0.1, 0.5, 0.1, 0.1], (n, 1))


def test_segmentations_of_the_hand_built_set() -> None:
    snaps, _ = hand_built()
    cuts = {c.name: c for c in segmentations(snaps, OBSERVATION_DAYS)}
    assert (cuts["customer"].of_row == "new").tolist() == [True] * 80 + [False] * 80
    assert cuts["activity"].edges == pytest.approx((40.75, 80.5, 120.25))
    assert [int(np.sum(cuts["activity"].of_row == q)) for q in ("q1", "q2", "q3", "q4")] \
        == [40, 40, 40, 40]
    # 80 zeros, 40 x 50, 40 x 100
    assert cuts["value"].edges == pytest.approx((0.0, 25.0, 62.5))
    # A: 80 customers, B: 40 customers (two rows each): edges over [40, 80]
    assert cuts["merchant size"].edges == pytest.approx((50.0, 60.0, 70.0))
    assert set(cuts["merchant size"].of_row[:80]) == {"q4"}
    assert set(cuts["merchant size"].of_row[80:]) == {"q1"}


def run_fairness() -> dict[str, Any]:
    snaps, risk = hand_built()
    y = snaps.decay.astype(float)
    preds = {"reversed-on-new": {"decay": risk, "activation": _activation(len(y))},
             "right": {"decay": 0.1 + 0.8 * y, "activation": _activation(len(y))}}
    return fairness(snaps, preds, PolicyConfig(risk_threshold=0.5), ACTIONS, OBSERVATION_DAYS)


def test_a_segment_far_below_the_overall_auc_is_flagged() -> None:
    block = run_fairness()
    bad = block["methods"]["reversed-on-new"]
    # positives 0.2 (x80) and 0.9 (x80) vs negatives 0.3 and 0.1: (80*160 + 80*80) / 160^2
    assert bad["overall"]["auc"] == pytest.approx(0.75)
    # bins 1, 2, 3 and 9 hold 40 rows each, |rate - risk| 0.1, 0.8, 0.3 and 0.1
    assert bad["overall"]["ece"] == pytest.approx(0.325)
    assert bad["overall"]["targeted"] == pytest.approx(0.25)  # returning decayed only
    assert bad["segments"]["customer new"]["auc"] == pytest.approx(0.0)
    assert bad["segments"]["customer new"]["targeted"] == pytest.approx(0.0)
    assert bad["segments"]["customer returning"]["auc"] == pytest.approx(1.0)
    assert bad["segments"]["customer returning"]["targeted"] == pytest.approx(0.5)
    flagged = {(f["method"], f["segment"]) for f in block["flags"]}
    assert flagged == {("reversed-on-new", s) for s in (
        "customer new", "activity q1", "activity q2", "value q1", "merchant size q4")}
    assert all(f["below"] == pytest.approx(0.75) for f in block["flags"])


def test_one_class_and_empty_segments_show_a_dash_and_a_count() -> None:
    block = run_fairness()
    right = block["methods"]["right"]["segments"]
    assert math.isnan(right["value q3"]["auc"]) and right["value q3"]["rows"] == 40
    assert right["value q3"]["positives"] == 0  # kept customers only: one class
    assert right["value q2"]["rows"] == 0 and math.isnan(right["value q2"]["ece"])
    head, rows = segment_rows(block)
    table = {r[0]: r for r in rows}
    col = head.index("right")
    assert table["value q3"][1] == "40 (0)" and table["value q3"][col].startswith(DASH)
    assert table["value q2"][1] == "0 (0)" and table["value q2"][col] == f"{DASH} / {DASH} / {DASH}"
    assert table["customer new"][head.index("reversed-on-new")].startswith("0.000 ▼")
    assert table["all"][col] == "1.000 / 0.100 / 50%"


def test_report_section_and_plot(tmp_path: Path) -> None:
    block = run_fairness()
    blocks = fairness_blocks(block)
    assert any(isinstance(b, Table) for b in blocks)
    words = [b.text for b in blocks if isinstance(b, Paragraph) and b.text.startswith("Flagged")]
    assert words == ["Flagged, 5 segments: reversed-on-new (overall 0.750): customer new 0.000 "
                     "(-0.750, 80 rows), activity q1 0.000 (-0.750, 40 rows), activity q2 "
                     "0.000 (-0.750, 40 rows), value q1 0.000 (-0.750, 80 rows), merchant "
                     "size q4 0.000 (-0.750, 80 rows)."]
    md = to_markdown(blocks)
    assert "| value q3 | 40 (0) |" in md and "edges 0, 25, 62.5" in md
    assert fairness_blocks({}) == [] and fairness_blocks(None) == []

    def save(fig: Any, folder: Path, name: str) -> str:
        fig.savefig(folder / name)
        return name

    import matplotlib

    matplotlib.use("Agg")
    assert write_fairness_plot(block, tmp_path, save) == "fairness.png"
    assert (tmp_path / "fairness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert write_fairness_plot(None, tmp_path, save) is None


def test_predictions_of_the_wrong_length_name_the_method() -> None:
    snaps, risk = hand_built()
    with pytest.raises(ValueError, match="gbdt: expected 160 test decay predictions"):
        fairness(snaps, {"gbdt": {"decay": risk[:10], "activation": _activation(10)}},
                 PolicyConfig(), ACTIONS, OBSERVATION_DAYS)


def test_an_empty_test_period_gives_dashes_not_a_crash() -> None:
    snaps, risk = hand_built()
    empty = snaps.subset(np.zeros(len(snaps), bool))
    block = fairness(empty, {"lr": {"decay": risk[:0], "activation": _activation(0)}},
                     PolicyConfig(), ACTIONS, OBSERVATION_DAYS)
    assert block["methods"]["lr"]["overall"]["rows"] == 0 and not block["flags"]
    _, rows = segment_rows(block)
    assert rows[0] == ["all", "0", f"{DASH} / {DASH} / {DASH}"]
