"""Features of a raw event log at a cutoff, built in chunks of whole users for scoring.

:func:`build_features` turns a description of some users (:class:`UserEvents`: the
recent events a snapshot looks at, plus whole-history aggregates) into the snapshot
builder's features; the monitor (``client.monitor``) keeps that description
incrementally. :func:`batch_features` describes every active user of a log, chunk by
chunk, so memory follows the chunk, not the log. The numbers equal
``common.snapshots.unlabelled_snapshots`` on the same log and cutoff (the tests check it).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd

from common.config import SnapshotConfig
from common.features import (
    DAY,
    TAU_SPAN,
    SortedLog,
    features_at,
    hash_categories,
    kept_days,
    key_span,
    ranges,
)
from common.schema import DEFAULT_CATEGORY, DEFAULT_MERCHANT, EVENT_TYPES, DataError
from common.snapshots import Snapshots

log = logging.getLogger(__name__)

_SECOND = 1_000_000_000  # ns


def unix_ns(timestamps: Any) -> np.ndarray:
    """Unix nanoseconds of a datetime column, whatever its unit (naive = UTC).

    A ``datetime64[ns]`` column is read in place, not copied.
    """
    index = pd.DatetimeIndex(timestamps, copy=False)
    return (index if index.unit == "ns" else index.as_unit("ns")).asi8


def cutoff_ns(events: pd.DataFrame, at: Any = None) -> int:
    """The cutoff as unix ns on a whole second (rounded up); default: just after the log.

    On whole seconds "before the cutoff" means the same for every feature of the
    snapshot builder (its windows are counted in whole seconds).
    """
    if at is None or at == "":
        last = int(unix_ns(events["timestamp"]).max())
        return (last // _SECOND + 1) * _SECOND
    return cutoff_at(at)


def cutoff_at(at: Any) -> int:
    """A cutoff given as ISO-8601 text or a timestamp (naive = UTC) as unix ns, rounded up
    to a whole second as :func:`cutoff_ns` does."""
    try:
        stamp = pd.Timestamp(at)
    except (TypeError, ValueError):
        raise ValueError(f"--at {at!r}: expected an ISO-8601 time") from None
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    ns = int(stamp.as_unit("ns").value)
    return -(-ns // _SECOND) * _SECOND


@dataclasses.dataclass
class UserEvents:
    """Some users' recent events as numpy columns, with whole-history aggregates.

    The columns must hold, per user, a *suffix* of the user's history before the cutoff
    that covers ``common.features.kept_days`` (the observation window and the cadence
    features' count windows) and the last ``max_len + 1`` events (the one
    before the sequence gives the first step's gap). Everything older only enters the
    snapshot through the aggregates: ``interest`` (I at the cutoff), ``n_history`` and
    ``first_ns`` (tenure). The batch scorer and the monitor both describe users this way.
    """

    user: np.ndarray  # int64 [E] index into user_ids; rows grouped by user, times ascending
    ns: np.ndarray  # int64 [E] unix ns
    event: np.ndarray  # int8 [E] index into EVENT_TYPES
    cat: np.ndarray  # int32 [E] index into cat_names
    value: np.ndarray  # float64 [E] >= 0
    user_ids: np.ndarray  # object [U]
    merchant_ids: np.ndarray  # object [U]
    cat_names: np.ndarray  # object [C]
    cat_hash: np.ndarray  # int32 [C] hash_categories(cat_names, hash_buckets)
    interest: np.ndarray  # float64 [U] I(cutoff) over the whole history
    n_history: np.ndarray  # int64 [U] events before the cutoff
    first_ns: np.ndarray  # int64 [U] time of the user's first event


def build_features(users: UserEvents, at_ns: int, config: SnapshotConfig) -> Snapshots:
    """Unlabelled snapshots at ``at_ns`` (a whole second after every event of ``users``).

    The same numbers as ``common.snapshots.unlabelled_snapshots`` on the users' full
    logs: :func:`common.features.features_at` runs on the columns (a ``SortedLog`` built
    here without ``SortedLog.from_events``' per-event string work) with the users'
    interest, history length and first event's time (tenure, mean gap over the history).
    """
    n_users = len(users.user_ids)
    t0 = pd.Timestamp(int(users.ns.min()) if len(users.ns) else at_ns, unit="ns",
                      tz="UTC").floor("D")
    t = (users.ns - t0.value) / 1e9
    at = (at_ns - t0.value) / 1e9
    span = key_span(max(float(t.max(initial=0.0)), at), config)
    user_start = np.searchsorted(users.user, np.arange(n_users), side="left")
    gap = np.diff(t, prepend=0.0)
    gap[user_start[user_start < len(t)]] = 0.0
    weights = np.asarray(config.event_weights, dtype=np.float64)
    lg = SortedLog(
        user=users.user, t=t, event=users.event, weight=weights[users.event],
        cat_hash=users.cat_hash[users.cat], cat_code=users.cat, cat_names=users.cat_names,
        value=users.value, gap=gap, key=users.user * span + np.floor(t).astype(np.int64),
        span=span, user_start=user_start, user_ids=users.user_ids,
        merchant_ids=users.merchant_ids, t0=t0, t_end=at,
    )
    feats = features_at(lg, at, config, interest=users.interest, n_history=users.n_history,
                        first_t=(users.first_ns - t0.value) / 1e9)
    rows = feats.users
    return Snapshots.unlabelled(feats, users.user_ids[rows], users.merchant_ids[rows],
                                pd.Timestamp(at_ns, unit="ns").to_datetime64())


def user_chunks(lengths: np.ndarray, chunk_events: int,
                 batch: int = 1) -> list[tuple[int, int]]:
    """(first user, end user) ranges of about ``chunk_events`` events; users never split.

    A chunk of ``batch`` users or more holds whole batches of them (but the last), so
    the model's fixed batch shape is filled with real rows, not padding.
    """
    ends = np.cumsum(lengths)
    bounds, first = [], 0
    while first < len(lengths):
        base = ends[first - 1] if first else 0
        end = max(int(np.searchsorted(ends, base + chunk_events, side="right")), first + 1)
        if end < len(lengths):
            end -= (end - first) % batch if end - first >= batch else 0
        bounds.append((first, end))
        first = end
    return bounds


def _user_runs(events: pd.DataFrame, ns: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Lay the log out user after user: (first row of each user, user ids, merchant ids,
    users in (merchant, user) order, row order).

    A log whose users each fill one run of rows, times ascending (as ``load_events`` and
    the generator write it), is used in place (row order None): only the rows where the
    user or merchant id changes are looked for, one comparison per row and no hashing.
    Any other log is coded by (merchant, user) pair and sorted by (user, time), file
    order among ties; the row order then says how.
    """
    new = _changes(events["user_id"])
    if "merchant_id" in events:
        new = np.union1d(new, _changes(events["merchant_id"]))
    start = np.r_[0, new].astype(np.int64)
    # Checking the runs costs string work per run: a log whose id changes on most rows
    # (in time order, say) is sorted straight away.
    if len(start) <= len(ns) // 4:
        users = _strings(events["user_id"].iloc[start])
        merchants = (_strings(events["merchant_id"].iloc[start]) if "merchant_id" in events
                     else np.full(len(start), DEFAULT_MERCHANT, dtype=object))
        by_name = _by_name(merchants, users)
        m, u = merchants[by_name], users[by_name]
        repeated = ((m[1:] == m[:-1]) & (u[1:] == u[:-1])).any()  # a user in several runs
        back = np.flatnonzero(ns[1:] < ns[:-1]) + 1
        if not repeated and np.isin(back, start).all():
            return start, users, merchants, by_name, None
    code, users = pd.factorize(events["user_id"])
    users = _strings(users)
    merchants = np.full(len(users), DEFAULT_MERCHANT, dtype=object)
    if "merchant_id" in events:
        mc, mu = pd.factorize(events["merchant_id"])
        n = max(len(users), 1)
        code, pair = pd.factorize(mc.astype(np.int64) * n + code)
        pair = np.asarray(pair, dtype=np.int64)
        users, merchants = users[pair % n], _strings(mu)[pair // n]
    order = np.lexsort((ns, code))
    code = code[order]
    start = np.flatnonzero(np.r_[True, code[1:] != code[:-1]])
    users, merchants = users[code[start]], merchants[code[start]]
    return start, users, merchants, _by_name(merchants, users), order


def _strings(ids: Any) -> np.ndarray:
    """Ids as an object array of ``str``."""
    return np.asarray(ids, dtype=object).astype(str).astype(object)


def _changes(column: pd.Series) -> np.ndarray:
    """Rows whose value differs from the row before (missing counts as different)."""
    if len(column) < 2:
        return np.zeros(0, np.int64)
    if isinstance(column.dtype, pd.CategoricalDtype):
        codes = column.cat.codes.to_numpy()
        return np.flatnonzero((codes[1:] != codes[:-1]) | (codes[1:] < 0)) + 1
    try:
        import pyarrow as pa
        import pyarrow.compute as pc

        arr = pa.array(column.array)
        differs = pc.not_equal(arr.slice(1), arr.slice(0, len(arr) - 1)).fill_null(True)
        return pc.indices_nonzero(differs).to_numpy().astype(np.int64) + 1
    except (ImportError, TypeError, ValueError, NotImplementedError):
        raw = column.to_numpy(dtype=object)
        return np.flatnonzero(raw[1:] != raw[:-1]) + 1


def _by_name(merchants: np.ndarray, users: np.ndarray) -> np.ndarray:
    """Positions of the users in (merchant id, user id) order (code point order, as ``str``)."""
    return np.lexsort((users.astype(str), merchants.astype(str)))


class _Categories:
    """Category codes of the rows a chunk looks at, in the snapshot builder's order.

    The snapshot builder codes categories by first appearance in the log, and that order
    breaks ties between fading categories. Only a chunk's rows are coded here; to rank
    their categories the log is read from its start only as far as needed to have met
    each of them (usually a small prefix: categories come up early), not hashed whole.
    A missing category is ``DEFAULT_CATEGORY``, as in the snapshot builder.
    """

    def __init__(self, events: pd.DataFrame, buckets: int) -> None:
        self._column = events["category_id"] if "category_id" in events else None
        self._buckets = buckets
        self._rank: dict[str, int] = {}  # name -> order of first appearance
        self._hash = np.zeros(0, np.int32)  # by rank: hash_categories of the name
        self._read = 0  # rows of the log read for _rank
        self._default = np.array([DEFAULT_CATEGORY], dtype=object)

    def code(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(code of each row, names by code, hashed names); codes in first-appearance order."""
        if self._column is None:
            return (np.zeros(len(rows), np.int32), self._default,
                    hash_categories(self._default, self._buckets))
        codes, names = pd.factorize(self._column.iloc[rows])  # missing -> -1
        names = _strings(names)
        if (codes < 0).any():
            if DEFAULT_CATEGORY not in names:
                names = np.append(names, np.array([DEFAULT_CATEGORY], dtype=object))
            codes = np.where(codes < 0, np.flatnonzero(names == DEFAULT_CATEGORY)[0], codes)
        rank = self._ranks(self._column, names)
        order = np.argsort(rank)
        return np.argsort(order)[codes].astype(np.int32), names[order], self._hash[rank[order]]

    def _ranks(self, column: pd.Series, names: np.ndarray) -> np.ndarray:
        """First-appearance rank of each name, reading further into the log if needed."""
        while self._read < len(column) and any(n not in self._rank for n in names):
            stop = min(len(column), max(2 * self._read, 1 << 16))
            met = [DEFAULT_CATEGORY if pd.isna(v) else str(v)
                   for v in pd.unique(column.iloc[self._read:stop])]
            new = np.array([n for n in dict.fromkeys(met) if n not in self._rank], dtype=object)
            if len(new):
                first = len(self._rank)
                self._rank.update({name: first + i for i, name in enumerate(new)})
                self._hash = np.r_[self._hash, hash_categories(new, self._buckets)]
            self._read = stop
        return np.array([self._rank[n] for n in names], dtype=np.int64)


def _search_runs(ns: np.ndarray, lo: np.ndarray, hi: np.ndarray, value: int) -> np.ndarray:
    """Per run of ascending times ``ns[lo:hi]``, the first row at or after ``value``
    (``hi`` if none).

    One binary search over all runs at once: about log2(longest run) numpy steps over
    the users, no pass over the events.
    """
    lo, hi = lo.copy(), hi.copy()
    while (open_ := lo < hi).any():
        mid = (lo + hi) // 2
        below = open_ & (ns[np.where(open_, mid, 0)] < value)
        lo = np.where(below, mid + 1, lo)
        hi = np.where(open_ & ~below, mid, hi)
    return lo


def batch_features(events: pd.DataFrame, at: Any, snap_cfg: SnapshotConfig, *,
                   chunk_events: int = 200_000,
                   batch: int = 1) -> Iterator[tuple[Snapshots, int, int]]:
    """Unlabelled snapshots of the users active before ``at``, in chunks of whole users.

    Yields (snapshots of a chunk, candidate users done, candidate users). Together the
    chunks equal ``common.snapshots.unlabelled_snapshots(events, at, snap_cfg)`` (the
    test suite checks it), users in (merchant, user) order. Before the first chunk only
    the users' runs of rows are found (:func:`_user_runs`) and searched for the cutoff
    and the observation window; the rest is per chunk, so it overlaps the model's
    predictions (see ``client.scoring.score_events``): interest over each user's
    history, then features from only the events a snapshot looks at (the observation
    window and the last ``max_len + 1``), without the snapshot builder's per-event
    string work.

    ``at`` is rounded up to a whole second; None = one second after the last event's
    second, so every event counts. A chunk of ``batch`` users or more holds whole
    batches of them but the last (:func:`user_chunks`).
    """
    if len(events) == 0:
        raise DataError("no events to score")
    if chunk_events < 1:
        raise ValueError(f"chunk_events={chunk_events}: expected a positive number of events")
    at_ns = cutoff_ns(events, at)
    cfg = dataclasses.replace(snap_cfg, start="", end="")
    ns = unix_ns(events["timestamp"])
    event = pd.Categorical(events["event"], categories=list(EVENT_TYPES)).codes
    if (event < 0).any():
        raise DataError("events with an unknown event type reached the scorer")
    # NaN for a missing value; fmax makes it 0 on the rows used.
    value = (events["value"].to_numpy(dtype=np.float64, na_value=np.nan)
             if "value" in events else np.zeros(len(events)))
    start, user_ids, merchant_ids, by_name, order = _user_runs(events, ns)
    if order is not None:
        ns, event, value = ns[order], event[order], value[order]
    # User i's events before the cutoff are rows start[i]:before[i].
    before = _search_runs(ns, start, np.r_[start[1:], len(ns)], at_ns)
    # Active = an event in the observation window (one second of slack: the snapshot
    # builder makes the exact choice). Only active users are looked at further.
    window_start = at_ns - int(round(cfg.observation_days * DAY * _SECOND)) - _SECOND
    window = _search_runs(ns, start, before, window_start)
    active = window < before
    by_name = by_name[active[by_name]]
    # Rows a snapshot looks at: kept_days (the observation window and the count windows
    # of the cadence features) and the last max_len + 1 events.
    keep_from = _search_runs(ns, start, before,
                             at_ns - int(round(kept_days(cfg) * DAY * _SECOND)) - _SECOND)
    kept = np.minimum(before - start, np.maximum(before - keep_from, cfg.max_len + 1))
    tau = cfg.tau_days * DAY
    weights = np.asarray(cfg.event_weights, dtype=np.float64)
    log.info("%d users active at %s (%d of %d events needed)", len(by_name),
             pd.Timestamp(at_ns, unit="ns", tz="UTC"), kept[by_name].sum(), len(events))
    if len(by_name) == 0:
        yield build_features(_no_users(cfg.hash_buckets), at_ns, cfg), 0, 0
        return
    categories = _Categories(events, cfg.hash_buckets)
    for first, end in user_chunks(kept[by_name], chunk_events, batch):
        u = by_name[first:end]
        each = np.arange(end - first)
        # Interest over the history; rows older than TAU_SPAN tau add nothing.
        recent = _search_runs(ns, start[u], before[u], at_ns - int(TAU_SPAN * tau * _SECOND))
        history = ranges(recent, before[u])
        # exp(-age / tau) with age = (at_ns - ns) / 1e9, in place.
        decay = np.subtract(at_ns, ns[history]) / 1e9
        np.exp(np.divide(decay, -tau, out=decay), out=decay)
        interest = np.bincount(np.repeat(each, before[u] - recent),
                               weights=np.multiply(weights[event[history]], decay, out=decay),
                               minlength=len(u))
        part = ranges(before[u] - kept[u], before[u])
        cat, cat_names, cat_hash = categories.code(part if order is None else order[part])
        chunk = UserEvents(
            user=np.repeat(each, kept[u]), ns=ns[part], event=event[part].astype(np.int8),
            cat=cat, value=np.fmax(value[part], 0.0), user_ids=user_ids[u],
            merchant_ids=merchant_ids[u], cat_names=cat_names, cat_hash=cat_hash,
            interest=interest, n_history=before[u] - start[u], first_ns=ns[start[u]],
        )
        yield build_features(chunk, at_ns, cfg), end, len(by_name)


def _no_users(buckets: int) -> UserEvents:
    empty = np.zeros(0, np.int64)
    cat_names = np.array([DEFAULT_CATEGORY], dtype=object)
    cat_hash = hash_categories(cat_names, buckets)
    return UserEvents(user=empty, ns=empty, event=np.zeros(0, np.int8),
                      cat=np.zeros(0, np.int32), value=np.zeros(0), user_ids=np.zeros(0, object),
                      merchant_ids=np.zeros(0, object), cat_names=cat_names, cat_hash=cat_hash,
                      interest=np.zeros(0), n_history=empty, first_ns=empty)
