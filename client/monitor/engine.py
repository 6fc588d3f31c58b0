"""The monitor: per-user state, micro-batch rescoring, sweeps and alerts.

How and when users are rescored and alerted, and where the monitor approximates the
batch scorer, is told in the package's docstring (:mod:`client.monitor`).
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from client.batch_features import build_features, cutoff_at
from client.monitor.alerts import Alert, alert_id
from client.monitor.config import MonitorConfig
from client.monitor.events import Malformed, StreamMerchants, escape_controls, parse_event
from client.monitor.folder import has_state
from client.monitor.state import (
    LEGACY_STATE_FILE,
    STATE_FILE,
    read_state,
    restore,
    state_arrays,
    write_state,
)
from client.monitor.stats import MonitorStats
from client.monitor.user import UserKey, UserState, user_events
from client.scoring import predict_batches, score_frame, warm_up
from common.config import PolicyConfig, SnapshotConfig, to_flat
from common.features import DAY, hash_categories, kept_days
from common.policy import choose_actions
from common.reasons import CategoryNames, Reference, reason_columns
from common.reasons.ig import warm_up_ig
from common.schema import DEFAULT_MERCHANT
from common.snapshots import Snapshots
from common.timestamps import NS_LIMIT

if TYPE_CHECKING:
    import keras

PredictFn = Callable[[Snapshots], Mapping[str, np.ndarray]]
_SECOND = 1_000_000_000
_DAY_NS = 86_400 * _SECOND
_SCORE_BATCH = 8192  # users per feature/predict pass of a sweep

log = logging.getLogger(__name__)


class Monitor:
    """Incremental per-user state, micro-batch rescoring and alerts.

    Parameters
    ----------
    model : keras.Model or None
        The trained model; may be None when ``predict_fn`` is given.
    snapshots, policy : SnapshotConfig, PolicyConfig
        The model's settings (``common.bundle.load_model_bundle``).
    config : MonitorConfig, optional
        Batching, cool-down, sweeps and checkpoints.
    sink : callable, optional
        Called with every alert (a dict) as it is emitted.
    predict_fn : callable, optional
        Snapshots -> head outputs; default ``predict_batches`` on ``model``.
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
        # Events kept besides the last max_len + 1: the observation window and the count
        # windows of the cadence features (common.features.kept_days), as the batch scorer.
        self._kept_ns = int(round(kept_days(self.snapshots) * DAY * _SECOND))
        self._keep = self.snapshots.max_len + 1
        self._cap = max(self.config.window_cap, self._keep)
        self._weights = self.snapshots.event_weights
        self._cooldown_ns = int(self.config.cooldown_hours * 3600 * _SECOND)
        self._sweep_ns = int(self.config.sweep_hours * 3600 * _SECOND)
        self._future_ns = int(self.config.max_future_hours * 3600 * _SECOND)
        self.users: dict[UserKey, UserState] = {}
        self._cat_index: dict[str, int] = {}
        self._cat_names: list[str] = []
        self._cat_hash: list[int] = []
        self._names = CategoryNames((), self.snapshots.hash_buckets)
        self._names_count = 0
        self.clock_ns: int | None = None  # latest event time seen
        self._lo_ns = -(2**62)  # events before this are in no future observation window
        self._prune_ns = -(2**62)  # events before this are read by no future snapshot
        self._last_sweep_ns: int | None = None
        self._dirty: dict[UserKey, UserState] = {}
        self.pending = 0
        self.oldest_pending = 0.0  # when the first unscored event was read (perf_counter)
        self.since_checkpoint = 0
        self.stats = MonitorStats()
        self.latencies: deque[float] = deque(maxlen=100_000)  # seconds, event-triggered alerts
        self.malformed_examples: list[str] = []
        self._merchants = StreamMerchants()  # every event names its merchant, or none
        self._jumps = 0  # clock jumps past an observation window (warned about)
        self._model_id = _weights_id(model) if model is not None else None

    def __len__(self) -> int:
        return len(self.users)

    def warm_up(self) -> None:
        """Compile the model for every micro-batch shape now, not at the first alerts."""
        if self.model is None:
            return
        warm_up(self.model, self._buckets)
        if self.sink is not None:  # alerts carry reasons: compile their IG too
            warm_up_ig(self.model)

    # -------------------------------------------------------------------- the stream

    def feed(self, line: str | bytes, read_at: float | None = None) -> None:
        """Take one input line; rescores when ``batch`` events are pending.

        A malformed line is counted (with its reason) and kept among the first ten
        ``malformed_examples``, escaped; it never raises.
        """
        self.stats.lines += 1
        if not line.strip():
            return
        try:
            merchant, user, ns, code, cat, value, item = parse_event(line)
            if self._future_ns and ns > time.time_ns() + self._future_ns:
                raise Malformed(f"timestamp: more than {self.config.max_future_hours:g} h "
                                "in the future")
            named_after_unnamed = self._merchants.check(merchant)
        except Malformed as err:
            self._malformed(str(err), line)
            return
        if named_after_unnamed:
            log.warning("line %d names merchant %s, the events before it named none: those "
                        "are kept as merchant '%s', one merchant more (replay the input into "
                        "a new --state to score them under their merchant); from here an "
                        "event without merchant_id is malformed", self.stats.lines,
                        escape_controls(merchant), DEFAULT_MERCHANT)
        self.add_event(merchant, user, ns, code, cat, value, item,
                       time.perf_counter() if read_at is None else read_at)

    def feed_lines(self, lines: Iterable[str | bytes]) -> None:
        """:meth:`feed` every line."""
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
        """Add one parsed event (see :func:`~client.monitor.parse_event`) to its user."""
        key = (merchant, user)
        st = self.users.get(key)
        if st is None:
            st = self.users[key] = UserState()
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
            if self.clock_ns is not None and ns - self.clock_ns > self._obs_ns:
                self._warn_jump(user, self.clock_ns, ns)
            self.clock_ns = ns
            if self._last_sweep_ns is None:
                self._last_sweep_ns = ns
            self._lo_ns = self.cutoff_ns() - self._obs_ns - _SECOND
            self._prune_ns = self.cutoff_ns() - self._kept_ns - _SECOND
        self.stats.window_overflow += st.prune(self._prune_ns, self._keep, self._cap)
        if st.read_at is None:
            st.read_at = read_at
        self._dirty[key] = st
        if self.pending == 0:
            self.oldest_pending = read_at
        self.pending += 1
        self.since_checkpoint += 1
        if self.pending >= self.config.batch:
            self.flush()

    def _warn_jump(self, user: str, clock_ns: int, ns: int) -> None:
        """Say when one event moves the stream clock past a whole observation window:
        every user is then scored at the new time, so a mistyped time (a wrong year, a
        unit slip) quietly turns the whole population into decayed customers."""
        self._jumps += 1
        if self._jumps <= 10:
            old, new = (pd.Timestamp(t, unit="ns", tz="UTC") for t in (clock_ns, ns))
            log.warning("line %d: user %s's event at %s moves the stream clock %.1f days "
                        "ahead (from %s); every user is now scored at that time. If the "
                        "time is wrong, correct the line and replay%s", self.stats.lines,
                        escape_controls(user[:60]), f"{new:%Y-%m-%d %H:%M}",
                        (ns - clock_ns) / (DAY * _SECOND), f"{old:%Y-%m-%d %H:%M}",
                        "" if self._jumps < 10 else " (further jumps are not reported)")

    def _category(self, name: str) -> int:
        code = len(self._cat_names)
        self._cat_index[name] = code
        self._cat_names.append(name)
        self._cat_hash.append(int(hash_categories(np.array([name], dtype=object),
                                                  self.snapshots.hash_buckets)[0]))
        return code

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
            self.stats.window_overflow += st.prune(self._prune_ns, self._keep, self._cap)
            if st.ns and st.ns[-1] >= self._lo_ns:
                active.append((key, st))
        for lo in range(0, len(active), _SCORE_BATCH):
            self._rescore(active[lo:lo + _SCORE_BATCH], "sweep")

    # ------------------------------------------------------------------- scoring

    def features(self, at: Any = None,
                 users: list[tuple[UserKey, UserState]] | None = None
                 ) -> tuple[Snapshots, np.ndarray]:
        """Snapshots of the active users at ``at`` (default: the monitor's cutoff).

        Returns
        -------
        snapshots : Snapshots
            Sorted by merchant, user when ``users`` is None.
        rows : numpy.ndarray
            Per snapshot, the index of its user in ``users``.
        """
        at_ns = self._check_cutoff(at)
        if users is None:
            users = sorted(self.users.items())
        ev = user_events(users, at_ns, self._tau_ns, self._cat_names, self._cat_hash)
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
        ns = cutoff_at(at)
        if ns < low:
            asked, clock = (pd.Timestamp(t, unit="ns", tz="UTC") for t in (ns, low))
            raise ValueError(f"cutoff {asked} is before the monitor's clock ({clock})")
        return ns

    def _rescore(self, users: list[tuple[UserKey, UserState]], trigger: str) -> None:
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
        alerting: list[tuple[int, int, float | None, float]] = []
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
            alerting.append((r, int(i), prev, now))
        why = self._reasons(snaps, [a[0] for a in alerting]) if self.sink else {}
        for k, (r, i, prev, now) in enumerate(alerting):
            (merchant, user), _ = users[i]
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
                    **{c: str(why[c][k]) for c in why},
                })
            started = read_at[i]
            if trigger == "events" and started is not None:
                self.latencies.append(time.perf_counter() - started)

    def _reasons(self, snaps: Snapshots, rows: list[int]) -> dict[str, np.ndarray]:
        """``common.reasons.REASON_COLUMNS`` of ``rows`` of a rescored batch (the reference
        customer: the batch's mean; a batch is a function of the input, so a replay
        explains alike). Empty without a Keras model (a ``predict_fn`` only)."""
        if not rows or self.model is None:
            return {}
        if self._names_count != len(self._cat_names):  # names are only ever appended
            self._names = CategoryNames(self._cat_names, self.snapshots.hash_buckets)
            self._names_count = len(self._cat_names)
        part = reason_columns(self.model, snaps, np.asarray(rows), self.snapshots,
                              Reference.mean_of(snaps), self._names)
        return {c: v[rows] for c, v in part.items()}

    # ------------------------------------------------------------------ checkpoints

    def _fingerprint(self) -> dict[str, Any]:
        return to_flat(self.snapshots, "snapshots")

    def save(self, state_dir: str | Path, position: Mapping[str, Any] | None = None) -> Path:
        """Write the whole state atomically (temp file, fsync, rename) into ``state_dir``.

        Pending (unscored) users are saved as such, not scored first: a restart goes on
        exactly as this monitor would have. ``position`` (where the input and the alert
        file stand) is kept with the state and returned by :meth:`load_state`.
        """
        arrays = state_arrays(self.users, self._dirty, self._cat_names)
        path = write_state(state_dir, arrays, {
            "snapshots": self._fingerprint(), "model": self._model_id,
            "clock_ns": self.clock_ns, "last_sweep_ns": self._last_sweep_ns,
            "pending": self.pending, "since_checkpoint": self.since_checkpoint,
            "stats": self.stats.as_dict(), "position": dict(position or {}),
        }, users=len(self.users))
        self.since_checkpoint = 0
        return path

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
        meta, arrays = read_state(path, latest)
        mine = self._fingerprint()
        saved = meta["snapshots"] if isinstance(meta.get("snapshots"), dict) else {}
        diff = sorted(k for k in mine if saved.get(k) != mine[k])
        if diff:
            k = diff[0]
            raise ValueError(f"{path} was built with {k}={saved.get(k)!r} but "
                             f"the model's settings say {mine[k]!r}; use a new --state folder")
        if meta.get("model") and self._model_id and meta["model"] != self._model_id:
            log.warning("%s was written with another model (weights %s, now %s): each "
                        "user's events carry over, but their last risks are the other "
                        "model's, so the first alerts compare the two models' scores",
                        path, meta["model"], self._model_id)
        try:
            restored = restore(arrays, meta)
        except (ArithmeticError, LookupError, TypeError, ValueError, UnicodeError) as err:
            raise ValueError(f"{path}: inconsistent monitor state ({err})") from None
        users, dirty, categories, stats = restored
        self.users = users
        self._merchants = StreamMerchants(merchant for merchant, _ in users)
        self.clock_ns = meta["clock_ns"]
        self._last_sweep_ns = meta["last_sweep_ns"]
        self._cat_index, self._cat_names, self._cat_hash = {}, [], []
        for name in categories:
            self._category(name)
        self.stats = stats
        if self.clock_ns is not None:
            self._lo_ns = self.cutoff_ns() - self._obs_ns - _SECOND
            self._prune_ns = self.cutoff_ns() - self._kept_ns - _SECOND
        self._dirty = {key: users[key] for key in dirty}
        self.pending = int(meta["pending"])
        self.oldest_pending = time.perf_counter()
        self.since_checkpoint = int(meta["since_checkpoint"])
        return dict(meta["position"])


def _weights_id(model: keras.Model) -> str:
    """A short id of the model's weights (SHA-256 of their bytes), kept with the state."""
    digest = hashlib.sha256()
    for w in model.get_weights():
        digest.update(np.ascontiguousarray(w).tobytes())
    return digest.hexdigest()[:16]
