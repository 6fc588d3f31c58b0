"""The snapshot calendar: the cutoffs of each split, and the stray rows that would
stretch it."""

from __future__ import annotations

import numpy as np
import pandas as pd

from common.config import SnapshotConfig
from common.features import DAY, label_window
from common.schema import DataError

#: Most cutoffs a calendar may have: more means stray rows stretch the log or the stride
#: is far too small, and building them would run for hours.
MAX_CUTOFFS = 10_000
#: An event-free stretch this long inside a log means rows from another period.
STRAY_GAP_DAYS = 365.0


def plan_cutoffs(
    t_end: float, config: SnapshotConfig
) -> tuple[dict[str, list[float]], list[float]]:
    """Cutoffs (seconds since the log's first midnight) per split, and those left out.

    Test = the last ``test_cutoffs`` cutoffs whose label windows fit in the log;
    validation = the last ``val_cutoffs`` whose label windows end by the first test
    cutoff; train = every cutoff whose label window ends by the first validation cutoff.
    """
    obs, stride = config.observation_days * DAY, config.stride_days * DAY
    label = label_window(config)
    count = int(np.floor((t_end - label + 1e-6 - obs) / stride)) + 1  # before any arange
    if count > MAX_CUTOFFS:
        raise DataError(
            f"the log spans {t_end / DAY:,.1f} days: with snapshots.stride-days = "
            f"{config.stride_days:g} that is {count:,} cutoffs, more than {MAX_CUTOFFS:,}; "
            "look for stray rows far before or after the rest (or set snapshots.start / "
            "snapshots.end), or raise snapshots.stride-days")
    cutoffs = np.arange(obs, t_end - label + 1e-6, stride)
    needed = config.observation_days + config.horizon_days * 3 + config.stride_days * (
        config.val_cutoffs + config.test_cutoffs)
    if len(cutoffs) < config.val_cutoffs + config.test_cutoffs + 1:
        raise DataError(
            f"the log spans {t_end / DAY:.1f} days: too short for snapshots with observation "
            f"{config.observation_days:g} d, horizon {config.horizon_days:g} d and stride "
            f"{config.stride_days:g} d (about {needed:.0f} days are needed)"
        )
    test = list(cutoffs[-config.test_cutoffs:])
    val_pool = cutoffs[cutoffs + label <= test[0] + 1e-6]
    val = list(val_pool[-config.val_cutoffs:])
    train = list(cutoffs[cutoffs + label <= (val[0] if val else test[0]) + 1e-6])
    if not val or not train:
        raise DataError(
            f"the log spans {t_end / DAY:.1f} days: not enough cutoffs for disjoint train, "
            f"validation and test label windows (about {needed:.0f} days are needed)"
        )
    used = set(train) | set(val) | set(test)
    skipped = [c for c in cutoffs if c not in used]
    return {"train": train, "val": val, "test": test}, skipped


def stray_gap(timestamps: pd.Series, min_days: float = STRAY_GAP_DAYS) -> str | None:
    """Describe the longest event-free stretch of at least ``min_days``, or None.

    A log whose events fall into two periods years apart almost always holds stray
    rows (a wrong year, a placeholder date); they stretch the calendar into thousands
    of empty cutoffs. O(rows) with one bincount over days.
    """
    ns = pd.DatetimeIndex(timestamps).asi8
    if len(ns) < 2:
        return None
    day = (ns // (86_400 * 10**9)).astype(np.int64)
    first = int(day.min())
    counts = np.bincount(day - first)
    seen = np.flatnonzero(counts)
    gaps = np.diff(seen)
    if not len(gaps) or gaps.max() < min_days:
        return None
    i = int(np.argmax(gaps))
    before = int(counts[: seen[i] + 1].sum())
    after = len(ns) - before
    end_day = pd.Timestamp((first + seen[i] + 1) * DAY, unit="s", tz="UTC")
    resume = pd.Timestamp((first + seen[i + 1]) * DAY, unit="s", tz="UTC")
    if before <= after:
        stray = (f"the {before:,} events before {end_day:%Y-%m-%d} ({before / len(ns):.2%} "
                 f"of the log) look stray: fix or remove them, or --set "
                 f"snapshots.start={resume:%Y-%m-%d}")
    else:
        stray = (f"the {after:,} events from {resume:%Y-%m-%d} on ({after / len(ns):.2%} "
                 f"of the log) look stray: fix or remove them, or --set "
                 f"snapshots.end={end_day:%Y-%m-%d}")
    return (f"no events from {end_day:%Y-%m-%d} to {resume:%Y-%m-%d} "
            f"({int(gaps[i]) - 1:,} days); {stray}")
