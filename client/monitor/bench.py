"""The monitor's throughput and alert latency, measured in process.

Figures, not pass/fail: example runs and their figures are in ``docs/operators.md``.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import pandas as pd

from client.monitor.config import MonitorConfig
from client.monitor.engine import Monitor, PredictFn
from client.monitor.events import events_to_jsonl
from client.monitor.stats import summary
from common.config import PolicyConfig, SnapshotConfig

if TYPE_CHECKING:
    import keras


def benchmark_monitor(model: keras.Model | None, events: pd.DataFrame,
                      snapshots: SnapshotConfig, policy: PolicyConfig,
                      config: MonitorConfig | None = None, *,
                      predict_fn: PredictFn | None = None) -> dict[str, Any]:
    """Replay ``events`` through a fresh monitor as fast as it takes them.

    Parsing, state updates, micro-batch rescoring, sweeps and alert serialisation are
    timed; converting the frame to JSON lines and compiling the model are not.

    Parameters
    ----------
    model, snapshots, policy, config, predict_fn
        As for :class:`~client.monitor.Monitor`.
    events : pandas.DataFrame
        A canonical event frame, replayed in time order.

    Returns
    -------
    dict
        :func:`~client.monitor.summary`'s figures and the ``batch`` size. Latency runs
        from feeding the first unscored event of a user to emitting its alert.
    """
    lines = events_to_jsonl(events)
    out: list[str] = []
    monitor = Monitor(model, snapshots, policy, config, predict_fn=predict_fn,
                      sink=lambda alert: out.append(json.dumps(alert)))
    monitor.warm_up()
    started = time.perf_counter()
    for line in lines:
        monitor.feed(line)
    monitor.flush()
    figures = summary(monitor, time.perf_counter() - started)
    figures["batch"] = monitor.config.batch
    return figures
