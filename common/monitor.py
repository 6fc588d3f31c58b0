"""The real-time decay monitor: JSON-line events in, activation alerts out.

Per user the monitor keeps, updated in O(1) per event (amortised):

- the interest score ``I`` at the user's latest event, ``I <- I * exp(-dt / tau) + w``
  (a late event adds ``w * exp(-(t_latest - t) / tau)``);
- the number of events and the time of the first one (history length, tenure);
- the recent events, in time order: every event of the observation window plus the
  last ``max_len + 1`` events (the sequence and the gap before its first step). Older
  events are dropped as the stream clock moves on.

Users touched by new events are rescored in micro-batches (every ``batch`` events, at
the end of the input and, for live input only, when the input pauses) at the cutoff
"one second after the stream clock's second",
and every user still in the observation window is rescored every ``sweep_hours`` of
stream time, because risk grows while a user is silent. The features are those of
``common.snapshots.unlabelled_snapshots`` on the same events and cutoff (the batch
scorer's :func:`~client.batch_features.build_features` on the kept events plus the
aggregates); the
test suite checks monitor == batch scorer.

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

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import select
import stat
import sys
import time
import zipfile
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import chain, pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from client.batch_features import UserEvents, build_features, unix_ns
from client.scoring import predict_batches, score_frame, warm_up
from common import atomic, timestamps
from common.config import PolicyConfig, SnapshotConfig, to_flat
from common.features import DAY, hash_categories
from common.policy import choose_actions
from common.schema import DEFAULT_CATEGORY, DEFAULT_MERCHANT, EVENT_TYPES
from common.snapshots import Snapshots
from common.timestamps import EARLIEST_NS, NS_LIMIT

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

STATE_FILE = "monitor.npz"
STATE_SUMMARY = "monitor.json"
LEGACY_STATE_FILE = "monitor.state"  # version 1 (a pickle): refused, never loaded
_STATE_VERSION = 3  # 3: the SHA-256 covers the meta JSON too (2 covered the arrays only)
_SECOND = 1_000_000_000
_EARLIEST_TEXT = timestamps.earliest_text()
_DAY_NS = 86_400 * _SECOND
_EVENT_CODES = {name: i for i, name in enumerate(EVENT_TYPES)}
_SCORE_BATCH = 8192  # users per feature/predict pass of a sweep
_READ_BYTES = 64 << 10  # input read at a time: small reads keep alert latency low
Alert = dict[str, Any]
PredictFn = Callable[[Snapshots], Mapping[str, np.ndarray]]


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ValueError(f"monitor setting '{key}': {message}")


@dataclasses.dataclass(frozen=True)
class MonitorConfig:
    """How the monitor batches, alerts and checkpoints (CLI flags of ``fedecay monitor``)."""

    batch: int = 1000  # rescore touched users every this many events (and on pauses)
    max_delay_seconds: float = 0.5  # ... or when the first unscored event waited this long
    cooldown_hours: float = 72.0  # no second alert for a user within this stream time
    sweep_hours: float = 24.0  # rescore every active user this often (stream time); 0 = off
    checkpoint_every: int = 100_000  # events between state checkpoints
    window_cap: int = 10_000  # most events kept per user (observation window + sequence)
    max_future_hours: float = 24.0  # events this far past the wall clock are malformed; 0 = off
    max_line_bytes: int = 1 << 20  # longer input lines are skipped (never held whole)

    def __post_init__(self) -> None:
        _check(self.batch >= 1, "batch", "must be >= 1")
        _check(self.max_delay_seconds > 0, "max-delay-seconds", "must be > 0")
        _check(self.cooldown_hours >= 0, "cooldown-hours", "must be >= 0")
        _check(self.sweep_hours >= 0, "sweep-hours", "must be >= 0")
        _check(self.checkpoint_every >= 1, "checkpoint-every", "must be >= 1")
        _check(self.window_cap >= 2, "window-cap", "must be >= 2")
        _check(self.max_future_hours >= 0, "max-future-hours", "must be >= 0")
        _check(self.max_line_bytes >= 1, "max-line-bytes", "must be >= 1")


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
        out = dataclasses.asdict(self)
        out["reasons"] = dict(self.reasons)
        return out


class Malformed(ValueError):
    """A line that is not a valid event; the message says why."""


# ---------------------------------------------------------------------------- parsing


def _ident(value: Any, name: str) -> str | None:
    """An id as the canonical loader reads it: stripped text, integral numbers without .0."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        return value or None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Malformed(f"{name}: expected a string or number")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise Malformed(f"{name}: not a finite number")
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def parse_timestamp(value: Any) -> int:
    """Unix ns from ISO-8601 text, unix seconds or milliseconds (naive = UTC).

    The rules are :func:`common.timestamps.parse_timestamp`'s. Times before
    :data:`common.timestamps.EARLIEST_TIME` (1971-01-01) are malformed, as the batch
    loader refuses them: placeholders (0) or unit mistakes, not behaviour.
    """
    try:
        ns = timestamps.parse_timestamp(value)
    except timestamps.TimestampError as err:
        raise Malformed(str(err)) from None
    if ns < EARLIEST_NS:
        raise Malformed(f"timestamp: before {_EARLIEST_TEXT}")
    return ns


def parse_event(line: str | bytes) -> tuple[str, str, int, int, str, float, str]:
    """One JSON line as (merchant, user, ns, event code, category, value, item).

    Raises :class:`Malformed` naming the field and the problem, and nothing else,
    whatever the line holds (deep nesting, numbers too large for a float, ...).
    """
    try:
        return _parse_event(line)
    except Malformed:
        raise
    except RecursionError:
        raise Malformed("not valid JSON: nested too deeply") from None
    except (ArithmeticError, LookupError, TypeError, ValueError) as err:
        raise Malformed(f"unreadable: {type(err).__name__}") from None


def _parse_event(line: str | bytes) -> tuple[str, str, int, int, str, float, str]:
    try:
        rec = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise Malformed("not valid JSON") from None
    if not isinstance(rec, dict):
        raise Malformed("not a JSON object")
    user = rec.get("user_id")
    user = (user.strip() or None) if user.__class__ is str else _ident(user, "user_id")
    if user is None:
        raise Malformed("user_id: missing")
    ns = parse_timestamp(rec.get("timestamp"))
    name = rec.get("event")
    code = _EVENT_CODES.get(name.strip().lower()) if isinstance(name, str) else None
    if code is None:
        raise Malformed(f"event: expected one of {', '.join(EVENT_TYPES)}, got {name!r}"[:120])
    raw = rec.get("value")
    if raw is None or raw == "":
        value = 0.0
    elif raw.__class__ is float and raw >= 0 and raw != math.inf:
        value = raw
    elif isinstance(raw, bool):
        raise Malformed("value: expected a number")
    else:
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise Malformed("value: expected a number") from None
        if not math.isfinite(value) or value < 0:
            raise Malformed("value: expected a finite number >= 0")
    merchant, category, item = (rec.get(k) for k in ("merchant_id", "category_id", "item_id"))
    return (
        (merchant.strip() if merchant.__class__ is str else _ident(merchant, "merchant_id"))
        or DEFAULT_MERCHANT,
        user, ns, code,
        (category.strip() if category.__class__ is str else _ident(category, "category_id"))
        or DEFAULT_CATEGORY,
        value,
        (item.strip() if item.__class__ is str else _ident(item, "item_id")) or "",
    )


_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u206f"
                     r"\ufeff\ud800-\udfff]")


def escape_controls(text: str) -> str:
    """``text`` with every control character as ``\\xNN`` (``\\uNNNN`` above 0xff).

    C0 and C1 controls (ESC included), DEL, line/paragraph separators, bidi overrides,
    zero-width characters and lone surrogates: whoever writes the input cannot move the
    operator's cursor, recolour or rewrite the terminal, or hide text in what is shown.
    Ordinary text, backslashes included, is left as it is.
    """
    return _UNSAFE.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) <= 0xff
                       else f"\\u{ord(m[0]):04x}", text)


# ------------------------------------------------------------------------- user state


class _User:
    """One user's running state; lists hold the kept events in time order."""

    __slots__ = ("ns", "ev", "cat", "val", "item", "interest", "t_ref", "n", "first_ns",
                 "risk", "alert_ns", "read_at")

    def __init__(self) -> None:
        self.ns: list[int] = []
        self.ev: list[int] = []
        self.cat: list[int] = []
        self.val: list[float] = []
        self.item: list[str] = []
        self.interest = 0.0  # I at t_ref
        self.t_ref = 0  # ns of the latest event
        self.n = 0
        self.first_ns = 0
        self.risk: float | None = None
        self.alert_ns: int | None = None
        self.read_at: float | None = None  # when the first unscored event was read

    def drop_front(self, k: int) -> None:
        for lst in (self.ns, self.ev, self.cat, self.val, self.item):
            del lst[:k]


# ----------------------------------------------------------------------------- monitor


class Monitor:
    """Incremental per-user state, micro-batch rescoring and alerts.

    Parameters
    ----------
    model : the trained model; may be None when ``predict_fn`` is given.
    snapshots, policy : the model's settings (``common.bundle.load_model_bundle``).
    config : batching, cool-down, sweeps and checkpoints.
    sink : called with every alert (a dict) as it is emitted.
    predict_fn : Snapshots -> head outputs; default ``predict_batches`` on ``model``.
    """

    def __init__(self, model: keras.Model | None, snapshots: SnapshotConfig,
                 policy: PolicyConfig, config: MonitorConfig | None = None, *,
                 sink: Callable[[Alert], None] | None = None,
                 predict_fn: PredictFn | None = None) -> None:
        if model is None and predict_fn is None:
            raise ValueError("Monitor needs a model or a predict_fn")
        self.model = model
        self.snapshots = dataclasses.replace(snapshots, start="", end="")
        self.policy = policy
        self.config = config or MonitorConfig()
        self.sink = sink
        self._buckets = (64, 256, 1024)
        self._predict = predict_fn or (
            lambda snaps: predict_batches(model, snaps, 1024, self._buckets))
        self._tau_ns = self.snapshots.tau_days * DAY * _SECOND
        self._obs_ns = int(round(self.snapshots.observation_days * DAY * _SECOND))
        self._keep = self.snapshots.max_len + 1
        self._cap = max(self.config.window_cap, self._keep)
        self._weights = self.snapshots.event_weights
        self._cooldown_ns = int(self.config.cooldown_hours * 3600 * _SECOND)
        self._sweep_ns = int(self.config.sweep_hours * 3600 * _SECOND)
        self._future_ns = int(self.config.max_future_hours * 3600 * _SECOND)
        self.users: dict[tuple[str, str], _User] = {}
        self._cat_index: dict[str, int] = {}
        self._cat_names: list[str] = []
        self._cat_hash: list[int] = []
        self.clock_ns: int | None = None  # latest event time seen
        self._lo_ns = -(2**62)  # events before this are in no future observation window
        self._last_sweep_ns: int | None = None
        self._dirty: dict[tuple[str, str], _User] = {}
        self.pending = 0
        self.oldest_pending = 0.0  # when the first unscored event was read (perf_counter)
        self.since_checkpoint = 0
        self.stats = MonitorStats()
        self.latencies: deque[float] = deque(maxlen=100_000)  # seconds, event-triggered alerts
        self.malformed_examples: list[str] = []

    def __len__(self) -> int:
        return len(self.users)

    def warm_up(self) -> None:
        """Compile the model for every micro-batch shape now, not at the first alerts."""
        if self.model is None:
            return
        warm_up(self.model, self._buckets)

    # -------------------------------------------------------------------- the stream

    def feed(self, line: str | bytes, read_at: float | None = None) -> None:
        """Take one input line; rescores when ``batch`` events are pending."""
        self.stats.lines += 1
        if not line.strip():
            return
        try:
            merchant, user, ns, code, cat, value, item = parse_event(line)
            if self._future_ns and ns > time.time_ns() + self._future_ns:
                raise Malformed(f"timestamp: more than {self.config.max_future_hours:g} h "
                                "in the future")
        except Malformed as err:
            self._malformed(str(err), line)
            return
        self.add_event(merchant, user, ns, code, cat, value, item,
                       time.perf_counter() if read_at is None else read_at)

    def feed_lines(self, lines: Iterable[str | bytes]) -> None:
        for line in lines:
            self.feed(line)

    def skip_line(self, reason: str, shown: str = "") -> None:
        """Count one input line that was not read (e.g. longer than ``max_line_bytes``)."""
        self.stats.lines += 1
        self._malformed(reason, shown)

    def _malformed(self, reason: str, line: str | bytes) -> None:
        self.stats.malformed += 1
        self.stats.reasons[reason.split(":")[0]] += 1
        if len(self.malformed_examples) < 10:
            text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
            self.malformed_examples.append(
                escape_controls(f"line {self.stats.lines}: {reason}: {text.strip()[:120]}"))

    def add_event(self, merchant: str, user: str, ns: int, code: int, cat: str, value: float,
                  item: str = "", read_at: float = 0.0) -> None:
        """Add one parsed event to its user's state."""
        key = (merchant, user)
        st = self.users.get(key)
        if st is None:
            st = self.users[key] = _User()
        c = self._cat_index.get(cat)
        if c is None:
            c = self._category(cat)
        times = st.ns
        pos = bisect.bisect_right(times, ns)
        i = pos - 1
        while i >= 0 and times[i] == ns:  # an exact duplicate of a kept event?
            if st.ev[i] == code and st.cat[i] == c and st.val[i] == value \
                    and st.item[i] == item:
                self.stats.duplicates += 1
                return
            i -= 1
        if pos == len(times):
            times.append(ns)
            st.ev.append(code)
            st.cat.append(c)
            st.val.append(value)
            st.item.append(item)
        else:
            self.stats.late += 1
            times.insert(pos, ns)
            st.ev.insert(pos, code)
            st.cat.insert(pos, c)
            st.val.insert(pos, value)
            st.item.insert(pos, item)
        self.stats.events += 1
        w = self._weights[code]
        if st.n == 0:
            st.interest, st.t_ref, st.first_ns = w, ns, ns
        elif ns >= st.t_ref:
            st.interest = st.interest * math.exp(-(ns - st.t_ref) / self._tau_ns) + w
            st.t_ref = ns
        else:
            st.interest += w * math.exp(-(st.t_ref - ns) / self._tau_ns)
            st.first_ns = min(st.first_ns, ns)
        st.n += 1
        if self.clock_ns is None or ns > self.clock_ns:
            self.clock_ns = ns
            if self._last_sweep_ns is None:
                self._last_sweep_ns = ns
            self._lo_ns = self.cutoff_ns() - self._obs_ns - _SECOND
        self._prune(st)
        if st.read_at is None:
            st.read_at = read_at
        self._dirty[key] = st
        if self.pending == 0:
            self.oldest_pending = read_at
        self.pending += 1
        self.since_checkpoint += 1
        if self.pending >= self.config.batch:
            self.flush()

    def _category(self, name: str) -> int:
        code = len(self._cat_names)
        self._cat_index[name] = code
        self._cat_names.append(name)
        self._cat_hash.append(int(hash_categories(np.array([name], dtype=object),
                                                  self.snapshots.hash_buckets)[0]))
        return code

    def _prune(self, st: _User) -> None:
        """Drop events that no future snapshot looks at, and past the cap."""
        n = len(st.ns)
        if n > self._keep and st.ns[0] < self._lo_ns:
            k = min(bisect.bisect_left(st.ns, self._lo_ns), n - self._keep)
            if k > 0:
                st.drop_front(k)
                n -= k
        if n > self._cap:
            self.stats.window_overflow += n - self._cap
            st.drop_front(n - self._cap)

    def cutoff_ns(self) -> int:
        """The monitor's cutoff: one second after the stream clock's second."""
        if self.clock_ns is None:
            raise ValueError("the monitor has seen no events yet")
        return (self.clock_ns // _SECOND + 1) * _SECOND

    def flush(self) -> None:
        """Rescore the users touched since the last rescoring; sweep when one is due."""
        if self._dirty:
            users = list(self._dirty.items())
            self._dirty.clear()
            self.pending = 0
            self._rescore(users, "events")
        if (self._sweep_ns and self.clock_ns is not None and self._last_sweep_ns is not None
                and self.clock_ns - self._last_sweep_ns >= self._sweep_ns):
            self.sweep()

    def sweep(self) -> None:
        """Rescore every user still in the observation window (silent users' risk grows)."""
        if self.clock_ns is None:
            return
        self._last_sweep_ns = self.clock_ns
        self.stats.sweeps += 1
        active = []
        for key, st in self.users.items():
            self._prune(st)
            if st.ns and st.ns[-1] >= self._lo_ns:
                active.append((key, st))
        for lo in range(0, len(active), _SCORE_BATCH):
            self._rescore(active[lo:lo + _SCORE_BATCH], "sweep")

    # ------------------------------------------------------------------- scoring

    def _user_events(self, users: list[tuple[tuple[str, str], _User]], at_ns: int
                     ) -> UserEvents:
        states = [st for _, st in users]
        lengths = np.fromiter((len(st.ns) for st in states), np.int64, len(states))
        total = int(lengths.sum())
        tau = self._tau_ns
        return UserEvents(
            user=np.repeat(np.arange(len(states), dtype=np.int64), lengths),
            ns=np.fromiter(chain.from_iterable(st.ns for st in states), np.int64, total),
            event=np.fromiter(chain.from_iterable(st.ev for st in states), np.int8, total),
            cat=np.fromiter(chain.from_iterable(st.cat for st in states), np.int32, total),
            value=np.fromiter(chain.from_iterable(st.val for st in states), np.float64, total),
            user_ids=np.array([k[1] for k, _ in users], dtype=object),
            merchant_ids=np.array([k[0] for k, _ in users], dtype=object),
            cat_names=np.array(self._cat_names, dtype=object),
            cat_hash=np.array(self._cat_hash, dtype=np.int32),
            interest=np.array([st.interest * math.exp(-(at_ns - st.t_ref) / tau)
                               for st in states]),
            n_history=np.array([st.n for st in states], dtype=np.int64),
            first_ns=np.array([st.first_ns for st in states], dtype=np.int64),
        )

    def features(self, at: Any = None,
                 users: list[tuple[tuple[str, str], _User]] | None = None
                 ) -> tuple[Snapshots, np.ndarray]:
        """Snapshots of the active users at ``at`` (default: the monitor's cutoff).

        Returns the snapshots (sorted by merchant, user when ``users`` is None) and, per
        row, the index of the user in ``users``.
        """
        at_ns = self._check_cutoff(at)
        if users is None:
            users = sorted(self.users.items())
        ev = self._user_events(users, at_ns)
        snaps = build_features(ev, at_ns, self.snapshots)
        index = {(m, u): i for i, (m, u) in
                 enumerate(zip(ev.merchant_ids, ev.user_ids, strict=True))}
        rows = np.array([index[(m, u)] for m, u in
                         zip(snaps.merchant_id, snaps.user_id, strict=True)], dtype=np.int64)
        return snaps, rows

    def scores(self, at: Any = None) -> pd.DataFrame:
        """The score table of every active user, as ``client.scoring.score_events``.

        A read-only view: it neither updates risks nor emits alerts.
        """
        snaps, _ = self.features(at)
        return score_frame(snaps.user_id, snaps.merchant_id, self._predict(snaps),
                           snaps.fading_category, self.snapshots, self.policy)

    def _check_cutoff(self, at: Any) -> int:
        low = self.cutoff_ns()
        if at is None:
            return low
        stamp = pd.Timestamp(at)
        stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
        ns = -(-int(stamp.as_unit("ns").value) // _SECOND) * _SECOND
        if ns < low:
            raise ValueError(f"cutoff {stamp} is before the monitor's clock "
                             f"({pd.Timestamp(low, unit='ns', tz='UTC')})")
        return ns

    def _rescore(self, users: list[tuple[tuple[str, str], _User]], trigger: str) -> None:
        """Score ``users`` at the cutoff; emit alerts for upward threshold crossings."""
        at_ns = self.cutoff_ns()
        read_at = [st.read_at for _, st in users]
        for _, st in users:
            st.read_at = None
        snaps, rows = self.features(at_ns, users)
        if len(snaps) == 0:
            return
        pred = self._predict(snaps)
        budgetless = dataclasses.replace(self.policy, budget=0)
        decision = choose_actions(pred["decay"], pred["activation"], budgetless,
                                  self.snapshots.actions, snaps.fading_category)
        self.stats.rescored += len(snaps)
        self.stats.rescore_batches += 1
        threshold = self.policy.risk_threshold
        risk = np.asarray(pred["decay"], dtype=np.float64)
        forecast = np.expm1(np.maximum(np.asarray(pred["interest"], np.float64), 0.0))
        cutoff = pd.Timestamp(at_ns, unit="ns", tz="UTC").isoformat()
        for r, i in enumerate(rows):
            (merchant, user), st = users[i]
            prev, now = st.risk, float(risk[r])
            st.risk = now
            if now < threshold or (prev is not None and prev >= threshold):
                continue
            if st.alert_ns is not None and (at_ns - st.alert_ns < self._cooldown_ns
                                            or st.alert_ns == at_ns):
                self.stats.suppressed += 1  # (one alert per user and cutoff at most)
                continue
            st.alert_ns = at_ns
            self.stats.alerts += 1
            if self.sink is not None:
                self.sink({
                    "alert_id": alert_id(merchant, user, cutoff),
                    "user_id": user, "merchant_id": merchant, "at": cutoff,
                    "decay_risk": round(now, 6),
                    "previous_risk": None if prev is None else round(prev, 6),
                    "interest_now": round(float(snaps.interest_now[r]), 6),
                    "interest_forecast": round(float(forecast[r]), 6),
                    "action": str(decision.action[r]),
                    "uplift": round(float(decision.uplift[r]), 6),
                    "expected_gain": round(float(decision.expected_gain[r]), 6),
                    "category": str(decision.category[r]),
                    "trigger": trigger,
                })
            if trigger == "events" and read_at[i] is not None:
                self.latencies.append(time.perf_counter() - read_at[i])

    # ------------------------------------------------------------------ checkpoints

    def _fingerprint(self) -> dict[str, Any]:
        return to_flat(self.snapshots, "snapshots")

    def save(self, state_dir: str | Path, position: Mapping[str, Any] | None = None) -> Path:
        """Write the whole state atomically (temp file, fsync, rename) into ``state_dir``.

        Pending (unscored) users are saved as such, not scored first: a restart goes on
        exactly as this monitor would have. ``position`` (where the input and the alert
        file stand) is kept with the state and returned by :meth:`load_state`.
        """
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        arrays = self._state_arrays()
        meta = {
            "version": _STATE_VERSION, "snapshots": self._fingerprint(),
            "clock_ns": self.clock_ns, "last_sweep_ns": self._last_sweep_ns,
            "pending": self.pending, "since_checkpoint": self.since_checkpoint,
            "stats": self.stats.as_dict(), "position": dict(position or {}),
        }
        meta["sha256"] = _digest(arrays, meta)
        blob = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        path = state_dir / STATE_FILE
        with atomic.replacing(path) as tmp:
            np.savez(tmp, meta=blob, **arrays)
        summary = {k: meta[k] for k in ("version", "clock_ns", "stats", "position")}
        summary["users"] = len(self.users)
        summary["clock"] = (None if self.clock_ns is None else
                            pd.Timestamp(self.clock_ns, unit="ns", tz="UTC").isoformat())
        text = json.dumps(summary, indent=2, default=str) + "\n"
        atomic.write_text(state_dir / STATE_SUMMARY, text)
        self.since_checkpoint = 0
        return path

    def _state_arrays(self) -> dict[str, np.ndarray]:
        """The users (in dict order: sweeps depend on it) and their events as flat arrays."""
        keys = list(self.users)
        states = list(self.users.values())
        n = len(states)
        lengths = np.fromiter((len(st.ns) for st in states), np.int64, n)
        total = int(lengths.sum())
        index = {key: i for i, key in enumerate(keys)}
        arrays = {
            "lengths": lengths,
            "ns": np.fromiter(chain.from_iterable(st.ns for st in states), np.int64, total),
            "event": np.fromiter(chain.from_iterable(st.ev for st in states), np.int8, total),
            "cat": np.fromiter(chain.from_iterable(st.cat for st in states), np.int32, total),
            "value": np.fromiter(chain.from_iterable(st.val for st in states), np.float64,
                                 total),
            "interest": np.fromiter((st.interest for st in states), np.float64, n),
            "t_ref": np.fromiter((st.t_ref for st in states), np.int64, n),
            "n": np.fromiter((st.n for st in states), np.int64, n),
            "first_ns": np.fromiter((st.first_ns for st in states), np.int64, n),
            "risk": np.fromiter((math.nan if st.risk is None else st.risk for st in states),
                                np.float64, n),
            "alerted": np.fromiter((st.alert_ns is not None for st in states), np.bool_, n),
            "alert_ns": np.fromiter((st.alert_ns or 0 for st in states), np.int64, n),
            "dirty": np.fromiter((index[key] for key in self._dirty), np.int64,
                                 len(self._dirty)),
        }
        for name, strings in (("merchant", (k[0] for k in keys)), ("user", (k[1] for k in keys)),
                              ("category", self._cat_names),
                              ("item", chain.from_iterable(st.item for st in states))):
            arrays[f"{name}_text"], arrays[f"{name}_offsets"] = _pack_strings(strings)
        return arrays

    def load_state(self, state_dir: str | Path) -> dict[str, Any]:
        """Restore what :meth:`save` wrote; returns the saved position.

        Anything but a state this version wrote (a pickle, an archive holding objects, a
        truncated or altered file, a folder) raises ``ValueError`` naming the file; the
        monitor is left as it was.
        """
        path = Path(state_dir) / STATE_FILE
        if not path.exists() and not path.is_symlink():
            if (Path(state_dir) / LEGACY_STATE_FILE).exists():
                has_state(state_dir)  # raises, naming the old file
            raise FileNotFoundError(f"no monitor state in {state_dir} ({STATE_FILE})")
        latest = (time.time_ns() + max(_DAY_NS, self._future_ns) if self._future_ns
                  else int(NS_LIMIT))  # the latest clock this monitor could have reached
        meta, arrays = _read_state(path, latest)
        mine = self._fingerprint()
        saved = meta["snapshots"] if isinstance(meta.get("snapshots"), dict) else {}
        diff = sorted(k for k in mine if saved.get(k) != mine[k])
        if diff:
            k = diff[0]
            raise ValueError(f"{path} was built with {k}={saved.get(k)!r} but "
                             f"the model's settings say {mine[k]!r}; use a new --state folder")
        try:
            restored = _restore(arrays, meta)
        except (ArithmeticError, LookupError, TypeError, ValueError, UnicodeError) as err:
            raise ValueError(f"{path}: inconsistent monitor state ({err})") from None
        users, dirty, categories, stats = restored
        self.users = users
        self.clock_ns = meta["clock_ns"]
        self._last_sweep_ns = meta["last_sweep_ns"]
        self._cat_index, self._cat_names, self._cat_hash = {}, [], []
        for name in categories:
            self._category(name)
        self.stats = stats
        if self.clock_ns is not None:
            self._lo_ns = self.cutoff_ns() - self._obs_ns - _SECOND
        self._dirty = {key: users[key] for key in dirty}
        self.pending = int(meta["pending"])
        self.oldest_pending = time.perf_counter()
        self.since_checkpoint = int(meta["since_checkpoint"])
        return dict(meta["position"])


# ------------------------------------------------------------------ the state file

# Every member of the state archive and its dtype; nothing else is accepted.
_STATE_ARRAYS = {
    "meta": "u1", "lengths": "i8", "ns": "i8", "event": "i1", "cat": "i4", "value": "f8",
    "interest": "f8", "t_ref": "i8", "n": "i8", "first_ns": "i8", "risk": "f8",
    "alerted": "b1", "alert_ns": "i8", "dirty": "i8",
    **{f"{name}_{part}": dtype for name in ("merchant", "user", "category", "item")
       for part, dtype in (("text", "u1"), ("offsets", "i8"))},
}
_PER_USER = ("interest", "t_ref", "n", "first_ns", "risk", "alerted", "alert_ns")
_PER_EVENT = ("ns", "event", "cat", "value")


def _pack_strings(strings: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings as one UTF-8 byte blob and int64 offsets (no object or fixed-width arrays)."""
    encoded = [s.encode("utf-8", "surrogatepass") for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)), out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


def _unpack_strings(text: np.ndarray, offsets: np.ndarray, count: int, name: str) -> list[str]:
    if len(offsets) != count + 1 or offsets[0] != 0 or offsets[-1] != len(text) \
            or (np.diff(offsets) < 0).any():
        raise ValueError(f"{name}_offsets do not fit {name}_text")
    data = text.tobytes()
    bounds = offsets.tolist()
    return [data[a:b].decode("utf-8", "surrogatepass") for a, b in pairwise(bounds)]


def _digest(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> str:
    """SHA-256 over the arrays' names, dtypes, shapes and bytes (in name order), then
    over the meta JSON (all but ``sha256``, keys sorted, compact)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    body = {k: v for k, v in meta.items() if k != "sha256"}
    h.update(b"meta:" + json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


def _shown(value: Any) -> str:
    text = escape_controls(repr(value))
    return text if len(text) <= 60 else text[:57] + "..."


def check_meta(meta: Mapping[str, Any], where: str, latest_ns: int | None = None) -> None:
    """Raise ``ValueError`` ("<where>: meta field position.offset is -50, expected an
    integer >= 0") unless every field of a state's meta has the type and range
    :meth:`Monitor.save` writes. Times are unix ns from 1971-01-01 to ``latest_ns``
    (default: now + 1 day) or null; offsets, sizes and counters are integers >= 0.
    """
    latest = time.time_ns() + _DAY_NS if latest_ns is None else int(latest_ns)

    def fail(name: str, value: Any, expected: str) -> None:
        raise ValueError(f"{where}: meta field {name} is {_shown(value)}, expected {expected}")

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def count(name: str, value: Any) -> None:
        if not is_int(value) or value < 0:
            fail(name, value, "an integer >= 0")

    def text(name: str, value: Any) -> None:
        if not isinstance(value, str):
            fail(name, value, "a string")

    def table(name: str, value: Any, keys: Iterable[str], required: bool) -> dict:
        if not isinstance(value, dict):
            fail(name, value, "a JSON object")
        allowed = set(keys)
        extra = sorted(map(str, set(value) - allowed))
        if extra:
            fail(f"{name}.{extra[0]}", value[extra[0]], f"no such field (one of "
                 f"{', '.join(sorted(allowed))})")
        missing = sorted(allowed - set(value)) if required else []
        if missing:
            raise ValueError(f"{where}: meta field {name}.{missing[0]} is missing")
        return value

    table("meta", dict(meta), ("version", "snapshots", "clock_ns", "last_sweep_ns", "pending",
                               "since_checkpoint", "stats", "position", "sha256"), True)
    if not isinstance(meta["snapshots"], dict):
        fail("snapshots", meta["snapshots"], "a JSON object")
    text("sha256", meta["sha256"])
    span = (f"null or an integer time (unix ns) from {_EARLIEST_TEXT} to "
            f"{pd.Timestamp(min(latest, int(NS_LIMIT)), unit='ns'):%Y-%m-%d %H:%M} UTC")
    for key in ("clock_ns", "last_sweep_ns"):
        value = meta[key]
        if value is not None and (not is_int(value) or not EARLIEST_NS <= value <= latest):
            fail(key, value, span)
    clock, last_sweep = meta["clock_ns"], meta["last_sweep_ns"]
    if (clock is None) != (last_sweep is None) or (clock is not None and last_sweep > clock):
        fail("last_sweep_ns", last_sweep, "null with clock_ns, else a time <= clock_ns "
             f"({clock!r})")
    count("pending", meta["pending"])
    count("since_checkpoint", meta["since_checkpoint"])
    fields = [f.name for f in dataclasses.fields(MonitorStats)]
    stats = table("stats", meta["stats"], fields, True)
    for name in fields:
        if name != "reasons":
            count(f"stats.{name}", stats[name])
    reasons = stats["reasons"]
    if not isinstance(reasons, dict):
        fail("stats.reasons", reasons, "a JSON object")
    for name, value in reasons.items():
        count(f"stats.reasons.{escape_controls(name)[:40]}", value)
    position = table("position", meta["position"], ("path", "inode", "offset", "output"),
                     False)
    if "path" in position:
        text("position.path", position["path"])
    for key in ("inode", "offset"):
        if key in position:
            count(f"position.{key}", position[key])
    if "output" in position:
        output = table("position.output", position["output"], ("path", "size"), True)
        text("position.output.path", output["path"])
        count("position.output.size", output["size"])


def _read_state(path: Path, latest_ns: int | None = None
                ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The meta dict and the arrays of a state file, checked; ValueError naming ``path``.

    ``latest_ns``: the latest stream clock accepted (see :func:`check_meta`).
    """
    if path.is_dir():
        raise ValueError(f"{path}: a folder where the monitor state file should be")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"{path}: cannot read the monitor state ({err.strerror})") from None
    if not data.startswith(b"PK\x03\x04"):
        kind = " (it looks like a pickle, which is never loaded)" if data[:1] == b"\x80" else ""
        raise ValueError(f"{path}: not a monitor state file: not an .npz archive{kind}")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in archive.infolist():
                name = info.filename.removesuffix(".npy")
                if name not in _STATE_ARRAYS or info.compress_type != zipfile.ZIP_STORED \
                        or info.file_size > len(data):
                    raise ValueError(f"unexpected member {info.filename!r}")
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, EOFError, zipfile.BadZipFile, ValueError) as err:
        raise ValueError(f"{path}: not a readable monitor state ({err})") from None
    missing = sorted(set(_STATE_ARRAYS) - set(arrays))
    if missing:
        raise ValueError(f"{path}: not a monitor state file (no {', '.join(missing)})")
    for name, a in arrays.items():
        if a.ndim != 1 or a.dtype != np.dtype(_STATE_ARRAYS[name]):
            raise ValueError(f"{path}: member {name!r} is {a.dtype}{list(a.shape)}, "
                             f"expected a 1-d {np.dtype(_STATE_ARRAYS[name])} array")
    try:
        meta = json.loads(arrays.pop("meta").tobytes())
    except (ValueError, RecursionError):
        raise ValueError(f"{path}: not a monitor state file (unreadable metadata)") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: not a monitor state file (metadata is not a JSON object)")
    version = meta.get("version")
    if isinstance(version, int) and not isinstance(version, bool) \
            and 2 <= version < _STATE_VERSION:
        raise ValueError(f"{path}: a monitor state of an older fedecay (state version "
                         f"{version}, whose SHA-256 does not cover its metadata; this fedecay "
                         f"reads version {_STATE_VERSION}); replay the input into a new "
                         "--state folder")
    if version != _STATE_VERSION:
        raise ValueError(f"{path}: state version {_shown(version)}, this fedecay reads "
                         f"{_STATE_VERSION}")
    if meta.get("sha256") != _digest(arrays, meta):
        raise ValueError(f"{path}: the state's contents do not match their SHA-256 "
                         "(the file was altered or damaged)")
    check_meta(meta, str(path), latest_ns)
    return meta, arrays


def _restore(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]
             ) -> tuple[dict[tuple[str, str], _User], list[tuple[str, str]], list[str],
                        MonitorStats]:
    """Users, dirty keys (in order), category names and counters from checked arrays."""
    lengths = arrays["lengths"]
    n, total = len(lengths), int(lengths.sum())
    if (lengths < 0).any() or any(len(arrays[k]) != n for k in _PER_USER):
        raise ValueError("per-user arrays of different lengths")
    if any(len(arrays[k]) != total for k in _PER_EVENT):
        raise ValueError("event arrays do not add up to the users' lengths")
    merchants = _unpack_strings(arrays["merchant_text"], arrays["merchant_offsets"], n,
                                "merchant")
    user_ids = _unpack_strings(arrays["user_text"], arrays["user_offsets"], n, "user")
    n_cats = len(arrays["category_offsets"]) - 1
    categories = _unpack_strings(arrays["category_text"], arrays["category_offsets"], n_cats,
                                 "category")
    items = _unpack_strings(arrays["item_text"], arrays["item_offsets"], total, "item")
    ns, event, cat = arrays["ns"], arrays["event"], arrays["cat"]
    for name in ("ns", "t_ref", "first_ns"):
        times = arrays[name]
        if len(times) and (times.min() < EARLIEST_NS or times.max() >= NS_LIMIT):
            raise ValueError(f"{name} holds times before {_EARLIEST_TEXT} or out of range")
    if total and (event.min() < 0 or event.max() >= len(EVENT_TYPES)
                  or cat.min() < 0 or cat.max() >= n_cats):
        raise ValueError("event or category codes out of range")
    starts = np.cumsum(lengths)
    within = np.ones(max(total - 1, 0), dtype=bool)
    within[starts[(starts > 0) & (starts < total)] - 1] = False
    if (np.diff(ns)[within] < 0).any():
        raise ValueError("a user's events are not in time order")
    dirty = arrays["dirty"]
    if len(dirty) and (dirty.min() < 0 or dirty.max() >= n or len(np.unique(dirty)) < len(dirty)):
        raise ValueError("pending users out of range")
    per_user = {k: arrays[k].tolist() for k in _PER_USER}
    columns = ns.tolist(), event.tolist(), cat.tolist(), arrays["value"].tolist()
    users: dict[tuple[str, str], _User] = {}
    lo = 0
    for i, length in enumerate(lengths.tolist()):
        st = _User()
        hi = lo + length
        st.ns, st.ev, st.cat, st.val = (col[lo:hi] for col in columns)
        st.item = items[lo:hi]
        lo = hi
        st.interest, st.t_ref = per_user["interest"][i], per_user["t_ref"][i]
        st.n, st.first_ns = per_user["n"][i], per_user["first_ns"][i]
        risk = per_user["risk"][i]
        st.risk = None if math.isnan(risk) else risk
        st.alert_ns = per_user["alert_ns"][i] if per_user["alerted"][i] else None
        users[(merchants[i], user_ids[i])] = st
    if len(users) != n:
        raise ValueError("a user appears twice")
    keys = list(users)
    saved = dict(meta["stats"])
    reasons = saved.pop("reasons", {})
    fields = {f.name for f in dataclasses.fields(MonitorStats)} - {"reasons"}
    if set(saved) - fields or not isinstance(reasons, dict) \
            or not all(isinstance(v, int) for v in (*saved.values(), *reasons.values())):
        raise ValueError("unexpected counters")
    stats = MonitorStats(**saved, reasons=Counter({str(k): v for k, v in reasons.items()}))
    return users, [keys[i] for i in dirty.tolist()], categories, stats


def has_state(state_dir: str | Path) -> bool:
    """Whether ``state_dir`` holds a monitor state to restore.

    Raises ``ValueError`` for a state of an older version (a pickle): it is never loaded,
    and starting afresh beside it would repeat every alert.
    """
    state_dir = Path(state_dir)
    if (state_dir / STATE_FILE).exists() or (state_dir / STATE_FILE).is_symlink():
        return True
    legacy = state_dir / LEGACY_STATE_FILE
    if legacy.exists() or legacy.is_symlink():
        raise ValueError(f"{legacy}: a monitor state of an older fedecay (state version 1, "
                         "a pickle, which this version never loads since it could run code); "
                         "replay the input into a new --state folder")
    return False


def prepare_state_dir(state_dir: str | Path) -> Path:
    """``state_dir`` resolved and created; ``ValueError`` if it cannot hold a state."""
    path = Path(state_dir).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise ValueError(f"state folder {path}: is a file, not a folder")
    probe = path / f".write-test-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as err:
        raise ValueError(f"state folder {path}: cannot create or write it "
                         f"({err.strerror or err})") from None
    return path


# -------------------------------------------------------------------- the alert file


def alert_id(merchant: str, user: str, at: str) -> str:
    """The alert's id: the first 16 hex digits of SHA-256 over (merchant, user, cutoff)."""
    key = json.dumps([merchant, user, at]).encode()
    return hashlib.sha256(key).hexdigest()[:16]


class AlertFile:
    """Alerts appended to a file as JSON lines, such that restarts repeat and lose none.

    Open it with :meth:`open`. At each checkpoint :func:`run_stream` calls :meth:`sync`
    and saves the size it returns with the state; opening the file with that saved
    position truncates it back to the size, and the replay from the checkpoint writes
    the same alerts again, byte for byte.
    """

    def __init__(self, path: Path, fh: Any, size: int) -> None:
        self.path = path
        self._fh = fh
        self.size = size

    @classmethod
    def open(cls, path: str | Path, position: Mapping[str, Any] | None = None) -> AlertFile:
        """Open ``path`` for the run that restores ``position`` (None: a fresh run).

        Raises ``ValueError`` when the file cannot match the state: shorter than the
        state recorded, or not empty when the state records nothing for it.
        """
        path = Path(path).expanduser().resolve()
        if path.is_dir():
            raise ValueError(f"--out {path}: is a folder")
        recorded = (position or {}).get("output") or {}
        size = path.stat().st_size if path.exists() else 0
        if recorded.get("path") == str(path):
            keep = int(recorded.get("size", 0))
            if size < keep:
                raise ValueError(
                    f"--out {path}: {size:,} bytes, but the state recorded {keep:,} at its "
                    "last checkpoint: the file was replaced or cut since; refusing to guess "
                    "which alerts it holds (restore it, or use a new --state and --out)")
        elif size:
            raise ValueError(
                f"--out {path}: not empty and no --state records it: appending could repeat "
                "alerts; move it away or empty it (or give the --state it was written with)")
        else:
            keep = 0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(path, "ab")  # noqa: SIM115 (closed by close())
        except OSError as err:
            raise ValueError(f"--out {path}: cannot write it ({err.strerror or err})") from None
        if size > keep:
            log.info("%s: dropping %d bytes written after the last checkpoint", path,
                     size - keep)
            fh.truncate(keep)
        return cls(path, fh, keep)

    def write(self, alert: Alert) -> None:
        """Append one alert (a sink for :class:`Monitor`)."""
        data = (json.dumps(alert) + "\n").encode()
        self._fh.write(data)
        self._fh.flush()  # readers of the file see the alert now
        self.size += len(data)

    def sync(self) -> dict[str, Any]:
        """Flush and fsync; the position a checkpoint records for this file."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        return {"path": str(self.path), "size": self.size}

    def close(self) -> None:
        self._fh.close()


# ------------------------------------------------------------------------ the input


class StopStream(Exception):
    """Raised (e.g. by a sink whose reader went away) to end :func:`run_stream` cleanly."""


class _LineReader:
    """Splits bytes into lines in linear time, never holding more than ``cap`` bytes.

    :meth:`lines` yields ``(line, size)`` per complete line: ``size`` is the bytes it
    took in the input (newline included); ``line`` is None for a line longer than ``cap``
    bytes, whose bytes were dropped as they came.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._parts: list[bytes] = []
        self.held = 0  # bytes of the unfinished line (kept or skipped)
        self._skipping = False

    def lines(self, data: bytes) -> Iterator[tuple[bytes | None, int]]:
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            size = self.held + end - start
            if self._skipping or size > self.cap:
                line = None
            else:
                line = b"".join([*self._parts, data[start:end]]) if self._parts \
                    else data[start:end]
            self._parts, self.held, self._skipping = [], 0, False
            start = end + 1
            yield line, size + 1
        rest = len(data) - start
        if rest:
            self.held += rest
            if self._skipping or self.held > self.cap:
                self._parts, self._skipping = [], True
            else:
                self._parts.append(data[start:])

    def rest(self) -> tuple[bytes | None, int]:
        """The unfinished last line (a file that does not end with a newline), and its size."""
        line = None if self._skipping else b"".join(self._parts)
        size = self.held
        self._parts, self.held, self._skipping = [], 0, False
        return line, size

    def reset(self) -> None:
        self._parts, self.held, self._skipping = [], 0, False


def _position(path: Path | None, fd: int, offset: int,
              alerts: AlertFile | None) -> dict[str, Any]:
    """Where a restart continues: the input (regular files only) and the alert file."""
    out: dict[str, Any] = {}
    if path is not None and stat.S_ISREG(os.fstat(fd).st_mode):
        out = {"path": str(path), "inode": os.fstat(fd).st_ino, "offset": offset}
    if alerts is not None:
        out["output"] = alerts.sync()  # the alerts on disk before the state that counts them
    return out


def run_stream(monitor: Monitor, source: str | Path, *, follow: bool = False,
               state_dir: str | Path | None = None, position: Mapping[str, Any] | None = None,
               report: Callable[[str], None] | None = None, poll: float = 0.2,
               status_every: float = 30.0,
               should_stop: Callable[[], bool] | None = None,
               alerts: AlertFile | None = None) -> dict[str, Any]:
    """Feed JSON lines from ``source`` (a file, or "-" for stdin) into ``monitor``.

    Touched users are rescored every ``batch`` events and at the end of the input. For
    live input (a pipe, stdin, or ``follow``) they are also rescored when the first
    unscored event has waited ``max_delay_seconds`` and whenever the input pauses (nothing
    to read for ``poll`` seconds, or the end of a followed file); a regular file that is
    not followed gets no such wall-clock rescoring, so what the monitor emits depends on
    the input alone (see :class:`AlertFile`).

    The state is saved to ``state_dir`` when there is none yet, after every
    ``checkpoint_every`` events (checked after each line) and at the end (also on
    KeyboardInterrupt, :class:`StopStream` or ``should_stop``), with the byte offset of
    the last line read, so a restart on the same file continues after it; with
    ``alerts``, the alert file is synced first and its size saved too. Lines longer than
    ``max_line_bytes`` are skipped and counted as malformed. ``report`` gets progress and
    problems (the CLI prints them on stderr). ``should_stop`` is asked between reads: a
    signal handler that sets a flag stops the stream between two events, never inside
    one.
    """
    say = report or (lambda text: log.info("%s", text))
    path = None if str(source) == "-" else Path(source).resolve()
    fh = sys.stdin.buffer if path is None else open(path, "rb")  # noqa: SIM115
    fd = fh.fileno()
    regular = stat.S_ISREG(os.fstat(fd).st_mode)
    live = not regular or follow  # wall-clock rescoring only where latency matters
    offset = 0
    if regular and path is not None and position and position.get("path") == str(path):
        info = os.fstat(fd)
        saved = int(position.get("offset", 0))
        if position.get("inode") == info.st_ino and saved <= info.st_size:
            offset = saved
            say(f"resuming {path} at byte {offset:,}")
        else:
            say(f"{path} changed since the checkpoint (rotated or truncated): reading it "
                "from the start")
    if offset:
        os.lseek(fd, offset, os.SEEK_SET)
    started = last_status = time.perf_counter()
    before = monitor.stats.as_dict()
    config = monitor.config
    shown = len(monitor.malformed_examples)
    reader = _LineReader(config.max_line_bytes)
    stopping = should_stop or (lambda: False)

    def take(line: bytes | None, size: int, read_at: float) -> None:
        if line is None:
            monitor.skip_line(f"line too long: {size:,} bytes "
                              f"(max-line-bytes {config.max_line_bytes:,})")
        else:
            monitor.feed(line, read_at)

    def checkpoint() -> None:
        monitor.save(state_dir, _position(path, fd, offset, alerts))

    if state_dir is not None and not has_state(state_dir):
        checkpoint()  # a crash before the first checkpoint finds this one
    try:
        while not stopping():
            if not regular:
                ready, _, _ = select.select([fd], [], [], min(poll, config.max_delay_seconds))
                if not ready:
                    monitor.flush()  # the input pauses
                    continue
            data = os.read(fd, _READ_BYTES)
            if not data:
                if regular and follow:
                    monitor.flush()
                    if os.fstat(fd).st_size < offset + reader.held:
                        say(f"{path} was truncated: reading it from the start")
                        offset = 0
                        reader.reset()
                        os.lseek(fd, 0, os.SEEK_SET)
                    time.sleep(poll)
                    continue
                break
            read_at = time.perf_counter()
            for line, size in reader.lines(data):
                offset += size  # the checkpoint's offset: lines taken, no more
                take(line, size - 1, read_at)
                if state_dir is not None and monitor.since_checkpoint >= config.checkpoint_every:
                    checkpoint()
            if live and monitor.pending and \
                    time.perf_counter() - monitor.oldest_pending >= config.max_delay_seconds:
                monitor.flush()
            while shown < len(monitor.malformed_examples):
                say(f"malformed {monitor.malformed_examples[shown]}")
                shown += 1
            now = time.perf_counter()
            if now - last_status >= status_every:
                last_status = now
                say(status_line(monitor, monitor.stats.events - before["events"], now - started))
        if stopping():
            say("stopping" + (": saving the state" if state_dir is not None else ""))
        else:
            line, size = reader.rest()  # a last line without a newline
            if size:
                offset += size
                if line is None or line.strip():
                    take(line, size, time.perf_counter())
        if not stopping() or state_dir is None:
            monitor.flush()  # the end of the input (or a stop with no state to keep them)
    except (KeyboardInterrupt, StopStream):
        say("stopping" + (": saving the state" if state_dir is not None else ""))
    finally:
        while shown < len(monitor.malformed_examples):
            say(f"malformed {monitor.malformed_examples[shown]}")
            shown += 1
        if state_dir is not None:
            checkpoint()
        if path is not None:
            fh.close()
    return summary(monitor, time.perf_counter() - started, before)


def status_line(monitor: Monitor, events: int, seconds: float) -> str:
    st = monitor.stats
    clock = ("-" if monitor.clock_ns is None
             else pd.Timestamp(monitor.clock_ns, unit="ns", tz="UTC").strftime("%Y-%m-%d %H:%M"))
    return (f"events {events:,} ({events / max(seconds, 1e-9):,.0f}/s)  users {len(monitor):,}  "
            f"alerts {st.alerts:,}  malformed {st.malformed:,}  stream clock {clock}")


def summary(monitor: Monitor, seconds: float,
            since: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Figures of a run (counters since ``since``, a ``stats.as_dict()``): throughput,
    alerts, problems and alert latency."""
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


def events_to_jsonl(events: pd.DataFrame) -> list[str]:
    """A canonical event frame as JSON lines in time order (a replayable stream)."""
    order = np.argsort(unix_ns(events["timestamp"]), kind="stable")
    frame = events.iloc[order]
    ns = unix_ns(frame["timestamp"])
    unit = "ms" if (ns % 1_000_000 == 0).all() else "us" if (ns % 1000 == 0).all() else "ns"
    text = frame.to_json(orient="records", lines=True, date_format="iso", date_unit=unit)
    return text.splitlines()


def benchmark_monitor(model: keras.Model | None, events: pd.DataFrame,
                      snapshots: SnapshotConfig, policy: PolicyConfig,
                      config: MonitorConfig | None = None, *,
                      predict_fn: PredictFn | None = None) -> dict[str, Any]:
    """Replay ``events`` through a fresh monitor as fast as it takes them.

    Parsing, state updates, micro-batch rescoring, sweeps and alert serialisation are
    timed; converting the frame to JSON lines and compiling the model are not.
    Latency: from feeding the first unscored event of a user to emitting its alert.
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
