"""The monitor's counters and how a run reports them (status lines and summaries)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from client.monitor.engine import Monitor


@dataclasses.dataclass
class MonitorStats:
    """Counters since the state was created (they survive restarts)."""

    lines: int = 0
    events: int = 0
    malformed: int = 0
    duplicates: int = 0
    late: int = 0  # events older than the same user's latest (inserted in order)
    window_overflow: int = 0
    alerts: int = 0
    suppressed: int = 0  # crossings inside a user's cool-down
    rescored: int = 0  # user scores computed
    rescore_batches: int = 0
    sweeps: int = 0
    reasons: Counter = dataclasses.field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        """The counters as plain JSON values (``reasons`` as a dict)."""
        out = dataclasses.asdict(self)
        out["reasons"] = dict(self.reasons)
        return out


def status_line(monitor: Monitor, events: int, seconds: float) -> str:
    """One progress line: events (and their rate over ``seconds``), users, alerts,
    malformed lines and the stream clock."""
    st = monitor.stats
    clock = ("-" if monitor.clock_ns is None
             else pd.Timestamp(monitor.clock_ns, unit="ns", tz="UTC").strftime("%Y-%m-%d %H:%M"))
    return (f"events {events:,} ({events / max(seconds, 1e-9):,.0f}/s)  users {len(monitor):,}  "
            f"alerts {st.alerts:,}  malformed {st.malformed:,}  stream clock {clock}")


def summary(monitor: Monitor, seconds: float,
            since: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The figures of a run: throughput, alerts, problems and alert latency.

    Parameters
    ----------
    monitor : Monitor
        The monitor after the run.
    seconds : float
        The run's duration (for ``events_per_s``).
    since : Mapping, optional
        ``monitor.stats.as_dict()`` at the start of the run: counters are counted from
        it (default: since the state was created).

    Returns
    -------
    dict
        Counters, ``events_per_s``, ``malformed_reasons`` and the p50 / p99 latency (ms)
        from reading an event to emitting the alert it triggered (NaN without any).
    """
    lat = np.asarray(monitor.latencies, dtype=np.float64) * 1000
    now = monitor.stats.as_dict()
    st = {k: v - (since or {}).get(k, 0) for k, v in now.items() if k != "reasons"}
    events = st["events"]
    return {
        "events": events, "seconds": seconds, "events_per_s": events / max(seconds, 1e-9),
        "users": len(monitor), "alerts": st["alerts"], "suppressed_by_cooldown": st["suppressed"],
        "malformed": st["malformed"], "duplicates": st["duplicates"], "late": st["late"],
        "window_overflow": st["window_overflow"], "rescored": st["rescored"],
        "sweeps": st["sweeps"],
        "malformed_reasons": {k: n - (since or {}).get("reasons", {}).get(k, 0)
                              for k, n in now["reasons"].items()
                              if n > (since or {}).get("reasons", {}).get(k, 0)},
        "alert_latency_p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "alert_latency_p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
    }
