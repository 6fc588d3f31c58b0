"""The real-time decay monitor: JSON-line events in, activation alerts out.

What a merchant runs (``fedecay monitor``) to watch a live event stream. One concept a
file:

- :mod:`~client.monitor.events`: one input line as one event (or :class:`Malformed`);
- :mod:`~client.monitor.user`: one user's running state (interest, aggregates, the
  recent events), updated in O(1) per event (amortised);
- :mod:`~client.monitor.engine`: :class:`Monitor`, rescoring and alerts;
- :mod:`~client.monitor.state` and :mod:`~client.monitor.folder`: the state on disk
  (``monitor.npz``, version 3) and its folder;
- :mod:`~client.monitor.alerts`: alert ids and the :class:`AlertFile`;
- :mod:`~client.monitor.stream`: reading the input, checkpoints and restarts;
- :mod:`~client.monitor.stats`: counters, status lines and summaries;
- :mod:`~client.monitor.bench`: throughput and alert latency in process.

Users touched by new events are rescored in micro-batches (every ``batch`` events, at
the end of the input and, for live input only, when the input pauses) at the cutoff
"one second after the stream clock's second", and every user still in the observation
window is rescored every ``sweep_hours`` of stream time, because risk grows while a
user is silent. The features are those the snapshot builder computes on the same events
and cutoff (``common.snapshots.unlabelled_snapshots``; the batch scorer's
:func:`~client.batch_features.build_features` on the kept events plus the aggregates);
the test suite checks monitor == batch scorer.

An alert (one JSON line) is emitted when a user's decay risk reaches
``policy.risk-threshold`` from below (or on the user's first score), unless the user
had an alert less than ``cooldown_hours`` of stream time before. Each alert carries an
``alert_id`` derived from the merchant, the user and the cutoff (a user gets at most one
alert per cutoff).

Exactly once: read from a regular file (not followed), every rescoring and checkpoint
decision is a function of the input alone, and a checkpoint records the size of the
alert file (:class:`AlertFile`) after syncing it; a restart truncates the file back to
that size and replays the input from the checkpoint's offset, so the file ends byte for
byte as an uninterrupted run writes it. The state is plain arrays in an ``.npz`` (never
a pickle) with a SHA-256 of their contents.

Approximations, all documented in ``docs/operators.md``:

- interest counts every past event; the batch builder skips events older than 30 tau
  (they add less than e^-30 of their weight);
- a user with more than ``window_cap`` events inside the observation window keeps only
  the last ``window_cap`` (counted as ``window_overflow``);
- exact duplicates are dropped only against the events the monitor still keeps;
- the budget of the policy is not applied (decisions are per user, as they stream);
- ties between categories whose interest fell by exactly the same amount may name a
  different fading category than the batch scorer (category order differs).
"""

from client.monitor.alerts import Alert, AlertFile, alert_id
from client.monitor.bench import benchmark_monitor
from client.monitor.config import MonitorConfig
from client.monitor.engine import Monitor, PredictFn
from client.monitor.events import (
    Event,
    Malformed,
    escape_controls,
    events_to_jsonl,
    parse_event,
    parse_timestamp,
)
from client.monitor.folder import has_state, prepare_state_dir
from client.monitor.state import (
    LEGACY_STATE_FILE,
    STATE_FILE,
    STATE_SUMMARY,
    STATE_VERSION,
    check_meta,
)
from client.monitor.stats import MonitorStats, status_line, summary
from client.monitor.stream import StopStream, run_stream

__all__ = [
    "LEGACY_STATE_FILE",
    "STATE_FILE",
    "STATE_SUMMARY",
    "STATE_VERSION",
    "Alert",
    "AlertFile",
    "Event",
    "Malformed",
    "Monitor",
    "MonitorConfig",
    "MonitorStats",
    "PredictFn",
    "StopStream",
    "alert_id",
    "benchmark_monitor",
    "check_meta",
    "escape_controls",
    "events_to_jsonl",
    "has_state",
    "parse_event",
    "parse_timestamp",
    "prepare_state_dir",
    "run_stream",
    "status_line",
    "summary",
]
