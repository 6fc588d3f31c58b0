"""The simulated time axis: whole days and milliseconds since midnight UTC of the start."""

from __future__ import annotations

import numpy as np
import pandas as pd

from simulations.synth.config import SynthConfig

DAY_MS = 86_400_000


def start_ns(cfg: SynthConfig) -> int:
    """Midnight UTC of ``cfg.start`` in nanoseconds since the epoch."""
    start = pd.Timestamp(cfg.start)
    start = start.tz_localize("UTC") if start.tzinfo is None else start.tz_convert("UTC")
    return int(start.normalize().as_unit("ns").value)


def timestamps(start_ns: int, ms: np.ndarray) -> pd.Series:
    """Milliseconds since ``start_ns`` as a ``datetime64[ns, UTC]`` column."""
    ns = start_ns + ms.astype(np.int64) * 1_000_000
    return pd.Series(pd.DatetimeIndex(ns.astype("datetime64[ns]")).tz_localize("UTC"))
