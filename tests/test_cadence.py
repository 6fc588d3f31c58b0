"""Cadence features (gaps, recent counts, value per event) computed by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from common.config import SnapshotConfig
from common.features import (
    AGGREGATE_FEATURES,
    CADENCE_FEATURES,
    DAY,
    RESPONSE_FEATURES,
    STATIC_FEATURES,
    SortedLog,
    features_at,
)

CFG = SnapshotConfig(observation_days=7, max_len=8, tau_days=5, start="2025-01-01",
                     end="2025-03-01")


def _log(days: list[float], values: list[float]) -> SortedLog:
    ts = pd.Timestamp("2025-01-01", tz="UTC") + pd.to_timedelta(days, unit="D")
    events = pd.DataFrame({"user_id": "u", "timestamp": ts, "event": "purchase",
                           "merchant_id": "m", "value": values})
    return SortedLog.from_events(events, CFG)


def _cadence(lg: SortedLog, at_day: float) -> dict[str, float]:
    feats = features_at(lg, at_day * DAY, CFG)
    assert feats.static.shape == (1, len(AGGREGATE_FEATURES))
    row = np.expm1(feats.static[0, AGGREGATE_FEATURES.index(CADENCE_FEATURES[0]):]
                 .astype(np.float64))
    return dict(zip(CADENCE_FEATURES, row, strict=True))


def test_cadence_by_hand() -> None:
    # Events on days 0, 2, 5, 9; cutoff day 10; observation window [3, 10): days 5, 9.
    c = _cadence(_log([0, 2, 5, 9], [1.0, 2.0, 3.0, 5.0]), 10)
    assert c["log_gap_window_mean_days"] == pytest.approx(4, rel=1e-5)
    assert c["log_gap_window_median_days"] == pytest.approx(4, rel=1e-5)
    assert c["log_gap_window_std_days"] == pytest.approx(0, abs=1e-6)
    assert c["log_gap_last_days"] == pytest.approx(4, rel=1e-5)
    assert c["log_gap_history_mean_days"] == pytest.approx(3, rel=1e-5)  # (9 - 0) / 3
    assert c["log_gap_recent_median_days"] == pytest.approx(3, rel=1e-5)  # of 2, 3, 4
    assert c["log_gap_recent_std_days"] == pytest.approx(np.sqrt(2 / 3), rel=1e-5)
    assert c["log_recency_over_gap"] == pytest.approx(1 / 3, rel=1e-5)
    assert c["log_n_last_7d"] == pytest.approx(2) and c["log_n_last_30d"] == pytest.approx(4)
    assert c["log_value_per_event"] == pytest.approx((3 + 5) / 2, rel=1e-5)


def test_one_event_has_no_gap_and_gets_the_window_length() -> None:
    c = _cadence(_log([9], [0.0]), 10)
    for name in ("log_gap_window_mean_days", "log_gap_window_median_days",
                 "log_gap_last_days", "log_gap_history_mean_days",
                 "log_gap_recent_median_days"):
        assert c[name] == pytest.approx(CFG.observation_days, rel=1e-5), name
    assert c["log_gap_window_std_days"] == 0 and c["log_gap_recent_std_days"] == 0
    assert c["log_n_last_7d"] == pytest.approx(1) and c["log_value_per_event"] == 0


def test_lstm_reads_the_cadence_features_only_when_asked() -> None:
    from common.config import ModelConfig
    from common.model import static_width

    assert static_width(ModelConfig()) == len(STATIC_FEATURES) + len(RESPONSE_FEATURES)
    assert static_width(ModelConfig(cadence_features=True)) == len(AGGREGATE_FEATURES)
