"""Per-user features at a cutoff, shared by training, batch scoring and the monitor.

A :class:`SortedLog` holds events as numpy columns sorted by (user, time);
:func:`features_at` turns the users active in the observation window before a cutoff
into the model's inputs: the last ``max_len`` events as padded sequences
(``NUMERIC_FEATURES`` per step) and aggregates (``STATIC_FEATURES``), with the interest
score ``I(T)`` and the category whose interest fell most. The snapshot builder
(``common.snapshots``) adds labels to them; the batch scorer (``client.batch_features``)
builds the log from each user's recent events only and passes the interest in.

Everything is vectorised over events: a handful of numpy passes per cutoff, no Python
loop per user or event.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pandas as pd

from common.config import SnapshotConfig
from common.schema import DEFAULT_CATEGORY, EVENT_TYPES, DataError

log = logging.getLogger(__name__)

DAY = 86_400.0
NUMERIC_FEATURES: tuple[str, ...] = ("log_gap_hours", "log_hours_to_cutoff", "log_value")
STATIC_FEATURES: tuple[str, ...] = (
    "log_interest",
    *(f"log_n_{ev}" for ev in EVENT_TYPES),
    "log_recency_days",
    "log_value_sum",
    "log_n_history",
    "log_tenure_days",
    "log_n_categories",
)
#: How a customer answers: the funnel's rates and how focused the customer is, over the
#: observation window, after ``STATIC_FEATURES`` in ``Features.static``. Rates are
#: smoothed, ``log((a + 1) / (b + 2))``, so a log without views or favourites gives a
#: constant. Customers differ in what moves them (a push, a coupon, a recommendation), and
#: these are what of it their behaviour shows; the LSTM, GBDT and LR read them.
RESPONSE_FEATURES: tuple[str, ...] = (
    "top_category_share",  # share of the window's events in its most frequent category
    "log_click_per_view",
    "log_favorite_per_click",  # favourites per click that was not carted
    "log_purchase_per_cart",
)
#: Purchase cadence at the cutoff, after ``RESPONSE_FEATURES`` in ``Features.static``. Gaps
#: in days, each ``log1p``-ed. "window": gaps between consecutive events inside the
#: observation window; "recent": the last ``max_len`` gaps before the cutoff (the events
#: the batch scorer and the monitor keep, so every path computes the same number);
#: "history" mean: (last - first event) / (events - 1), exact over the whole history.
#: A statistic without a gap (a single event) is the observation window's length, its
#: spread 0. GBDT and LR read them; the LSTM only with ``model.cadence-features``.
CADENCE_FEATURES: tuple[str, ...] = (
    "log_gap_window_mean_days",
    "log_gap_window_median_days",
    "log_gap_window_std_days",
    "log_gap_last_days",
    "log_gap_history_mean_days",
    "log_gap_recent_median_days",
    "log_gap_recent_std_days",
    "log_recency_over_gap",  # recency / recent median gap (floored at one hour)
    "log_n_last_7d",
    "log_n_last_30d",
    "log_value_per_event",  # value sum / events in the observation window
)
#: Every aggregate column of ``Features.static``, in order.
AGGREGATE_FEATURES: tuple[str, ...] = (*STATIC_FEATURES, *RESPONSE_FEATURES,
                                      *CADENCE_FEATURES)
#: The count windows of the cadence features, in days.
COUNT_WINDOWS_DAYS: tuple[float, ...] = (7.0, 30.0)
#: Events older than this many tau before a cutoff add less than e^-30 to I(T): skipped.
TAU_SPAN = 30.0


def kept_days(config: SnapshotConfig) -> float:
    """Days before a cutoff whose events a snapshot reads besides its last ``max_len + 1``:
    the observation window or the longest count window. The batch scorer and the monitor
    keep them."""
    return max(config.observation_days, *COUNT_WINDOWS_DAYS)


def hash_categories(categories: np.ndarray | pd.Series, buckets: int) -> np.ndarray:
    """Stable hash of category strings into 1..buckets (0 is the padding id).

    Hashing lets merchants share a model without sharing a category vocabulary; the
    hash (pandas' SipHash with its fixed key) is the same in every process and machine.
    """
    values = pd.Series(categories, dtype="object").fillna(DEFAULT_CATEGORY).astype(str)
    uniques, inverse = np.unique(values.to_numpy(dtype=object), return_inverse=True)
    hashed = pd.util.hash_array(uniques.astype(object)) % np.uint64(buckets)
    return (hashed.astype(np.int64) + 1)[inverse].astype(np.int32)


def label_window(config: SnapshotConfig) -> float:
    """Seconds after a cutoff that its labels look at (decay horizon or activation response)."""
    return max(config.horizon_days, config.intervention_window_days + config.response_days) * DAY


def key_span(last_second: float, config: SnapshotConfig) -> int:
    """Seconds per user in :attr:`SortedLog.key`: past the last event or cutoff and
    every label window after it, so one user's keys never reach the next user's."""
    return int(np.ceil(last_second)) + int(label_window(config) * 4) + 10 * int(DAY)


@dataclasses.dataclass
class SortedLog:
    """Events as numpy columns sorted by (user, time), users as integer codes."""

    user: np.ndarray  # int64 code of (merchant, user), sorted
    t: np.ndarray  # float64 seconds since t0
    event: np.ndarray  # int8 0..4
    weight: np.ndarray  # float64
    cat_hash: np.ndarray  # int32 1..B
    cat_code: np.ndarray  # int32 index into cat_names
    cat_names: np.ndarray
    value: np.ndarray  # float64
    gap: np.ndarray  # float64 seconds since the user's previous event (0 for the first)
    key: np.ndarray  # int64 sort key user * span + second
    span: int
    user_start: np.ndarray  # int64 [U] first row of each user
    user_ids: np.ndarray  # object [U]
    merchant_ids: np.ndarray  # object [U]
    t0: pd.Timestamp
    t_end: float  # seconds since t0 of the last event

    def positions(self, users: np.ndarray, seconds: float) -> np.ndarray:
        """Per user, the first row at or after ``seconds`` (rows before it are < seconds)."""
        sec = int(np.ceil(seconds))
        return np.searchsorted(self.key, users * self.span + sec, side="left")

    @classmethod
    def from_events(cls, events: pd.DataFrame, config: SnapshotConfig,
                    category_names: np.ndarray | None = None) -> SortedLog:
        """The log of a canonical event frame (see ``common.schema``).

        ``t0`` is ``config.start`` or the first event's midnight; with ``config.start`` or
        ``config.end`` set, events outside that calendar are left out. A user is the pair
        (merchant, user id), coded in sorted order. Categories are coded in order of
        first appearance, or as their index in ``category_names`` when given (a part of
        a larger log, coded as in the whole: :func:`category_order` of it).
        """
        if len(events) == 0:
            raise DataError("no events to build snapshots from")
        ts = pd.DatetimeIndex(events["timestamp"])
        t0 = utc(config.start) if config.start else ts.min().floor("D")
        seconds = (ts - t0).total_seconds().to_numpy(dtype=np.float64)
        t_end = (utc(config.end) - t0).total_seconds() if config.end else float(seconds.max())
        if config.start or config.end:
            # Events outside the shared calendar are not part of this federation's period.
            inside = (seconds >= 0) & (seconds <= t_end)
            if not inside.all():
                log.info("%d events outside the calendar %s .. %s left out",
                         int((~inside).sum()), config.start or "-", config.end or "-")
                events = events.loc[inside].reset_index(drop=True)
                ts, seconds = ts[inside], seconds[inside]
            if len(events) == 0:
                raise DataError(f"no events inside the calendar {config.start} .. {config.end}")
        merchant = (
            events["merchant_id"].astype(str).to_numpy(dtype=object)
            if "merchant_id" in events else np.full(len(events), "local", dtype=object)
        )
        users = events["user_id"].astype(str).to_numpy(dtype=object)
        pair = pd.MultiIndex.from_arrays([merchant, users])
        user_code, uniques = pd.factorize(pair, sort=True)
        span = key_span(max(seconds.max(), t_end), config)
        key = user_code.astype(np.int64) * span + np.floor(seconds).astype(np.int64)
        order = np.argsort(key, kind="stable")

        codes = pd.Categorical(events["event"], categories=list(EVENT_TYPES)).codes
        if (codes < 0).any():
            raise DataError("events with an unknown event type reached the snapshot builder")
        categories = (
            events["category_id"] if "category_id" in events
            else pd.Series(DEFAULT_CATEGORY, index=events.index)
        )
        named = categories.astype(object).fillna(DEFAULT_CATEGORY)
        if category_names is None:
            cat_code, cat_names = pd.factorize(named)
        else:
            cat_names = category_names
            cat_code = pd.Index(cat_names).get_indexer(named)
            if (cat_code < 0).any():
                raise ValueError("category_names lacks categories of these events")
        cat_names = np.asarray(cat_names, dtype=object)
        value = (
            events["value"].to_numpy(dtype=np.float64, na_value=0.0)
            if "value" in events else np.zeros(len(events))
        )

        user = user_code[order].astype(np.int64)
        t = seconds[order]
        n_users = len(uniques)
        user_start = np.searchsorted(user, np.arange(n_users), side="left")
        gap = np.diff(t, prepend=0.0)
        gap[user_start] = 0.0
        event = codes[order].astype(np.int8)
        weights = np.asarray(config.event_weights, dtype=np.float64)
        hashed_names = hash_categories(cat_names, config.hash_buckets)
        return cls(
            user=user,
            t=t,
            event=event,
            weight=weights[event],
            cat_hash=hashed_names[cat_code[order]],
            cat_code=cat_code[order].astype(np.int32),
            cat_names=cat_names,
            value=np.maximum(value[order], 0.0),
            gap=gap,
            key=key[order],
            span=span,
            user_start=user_start,
            user_ids=np.asarray(uniques.get_level_values(1), dtype=object),
            merchant_ids=np.asarray(uniques.get_level_values(0), dtype=object),
            t0=t0,
            t_end=t_end,
        )


def category_order(events: pd.DataFrame) -> np.ndarray | None:
    """The category names of ``events`` in the order :meth:`SortedLog.from_events` codes
    them (first appearance, a missing one as ``DEFAULT_CATEGORY``); None without a
    ``category_id`` column. Computed without an object per event."""
    if "category_id" not in events:
        return None
    seen = pd.Series(events["category_id"].unique()).astype(object).fillna(DEFAULT_CATEGORY)
    return np.asarray(pd.unique(seen.to_numpy(dtype=object)), dtype=object)


def utc(value: str) -> pd.Timestamp:
    """A time as a UTC ``pd.Timestamp`` (naive = UTC)."""
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def interest_at(lg: SortedLog, at: float, tau: float) -> np.ndarray:
    """I(at) for every user: sum of w * exp(-(at - t) / tau) over events before ``at``.

    Parameters
    ----------
    lg : the log.
    at : seconds since ``lg.t0``.
    tau : decay time constant in seconds; events older than ``TAU_SPAN * tau`` are skipped.

    Returns
    -------
    float64 [U], indexed by user code.
    """
    rows = (lg.t < at) & (lg.t >= at - TAU_SPAN * tau)
    contrib = lg.weight[rows] * np.exp(-(at - lg.t[rows]) / tau)
    return np.bincount(lg.user[rows], weights=contrib, minlength=len(lg.user_start))


@dataclasses.dataclass
class Features:
    """Features of the active users at one cutoff (no labels); every array has N rows."""

    users: np.ndarray  # int64 [N] user codes of the log
    events: np.ndarray  # int32 [N, L]; 0 pads, 1..5 = EVENT_TYPES (pre-padded: latest last)
    categories: np.ndarray  # int32 [N, L]; 0 pads, 1..hash_buckets
    numeric: np.ndarray  # float32 [N, L, 3]; NUMERIC_FEATURES
    static: np.ndarray  # float32 [N, S]; AGGREGATE_FEATURES (STATIC, RESPONSE, then CADENCE)
    interest_now: np.ndarray  # float64 [N]; I(at)
    fading_category: np.ndarray  # object [N]; category whose interest fell most


def features_at(lg: SortedLog, at: float, config: SnapshotConfig,
                interest: np.ndarray | None = None, n_history: np.ndarray | None = None,
                first_t: np.ndarray | None = None) -> Features:
    """Sequences and aggregate features of users active in [at - observation, at).

    Parameters
    ----------
    lg : the log; ``at`` is in seconds since ``lg.t0``.
    at : the cutoff; only events strictly before it count.
    config : sequence length, windows, tau and hash buckets.
    interest : I(at) of every user of ``lg`` when the caller knows it (the batch
        scorer's ``lg`` holds only recent events); by default computed from ``lg``.
    n_history, first_t : per user of ``lg``, the events before ``at`` and the first
        event's time (seconds since ``lg.t0``) over the whole history, when ``lg``
        holds only recent events; by default from ``lg``.
    """
    tau = config.tau_days * DAY
    all_users = np.arange(len(lg.user_start), dtype=np.int64)
    end = lg.positions(all_users, at)
    begin = lg.positions(all_users, at - config.observation_days * DAY)
    active = end > begin
    users = all_users[active]
    end, begin = end[active], begin[active]
    start = lg.user_start[users]

    length = config.max_len
    idx = end[:, None] - length + np.arange(length)[None, :]
    valid = idx >= start[:, None]
    idx = np.where(valid, idx, 0)
    event_ids = np.where(valid, lg.event[idx].astype(np.int32) + 1, 0)
    cat_ids = np.where(valid, lg.cat_hash[idx], 0)
    t_seq = lg.t[idx]
    first = valid & ~np.roll(valid, 1, axis=1)
    first[:, 0] = valid[:, 0]
    gap = np.where(first & (idx == start[:, None]), 0.0, lg.gap[idx])
    numeric = np.stack(
        [
            np.log1p(np.maximum(gap, 0.0) / 3600.0),
            np.log1p(np.maximum(at - t_seq, 0.0) / 3600.0),
            np.log1p(lg.value[idx]),
        ],
        axis=-1,
    )
    numeric = np.where(valid[..., None], numeric, 0.0).astype(np.float32)

    interest_now = (interest_at(lg, at, tau) if interest is None else interest)[users]

    # Aggregates over the observation window.
    n_active = len(users)
    rows = np.repeat(np.arange(n_active), end - begin)
    win = ranges(begin, end)
    counts = np.bincount(rows * len(EVENT_TYPES) + lg.event[win],
                         minlength=n_active * len(EVENT_TYPES)).reshape(n_active, len(EVENT_TYPES))
    value_sum = np.bincount(rows, weights=lg.value[win], minlength=n_active)
    n_cats = _distinct_per_row(rows, lg.cat_code[win], n_active, len(lg.cat_names))
    recency = (at - lg.t[end - 1]) / DAY
    history = (end - start) if n_history is None else n_history[users]
    first = lg.t[start] if first_t is None else first_t[users]
    tenure = (at - first) / DAY
    static = np.column_stack([
        np.log1p(interest_now),
        np.log1p(counts),
        np.log1p(recency),
        np.log1p(value_sum),
        np.log1p(history),
        np.log1p(tenure),
        np.log1p(n_cats),
        _response(counts, rows, lg.cat_code[win], len(lg.cat_names)),
        _cadence(lg, at, config, begin, end, start, rows, win, value_sum, recency,
                 history, first),
    ]).astype(np.float32)

    fading = _fading_category(lg, idx, valid, at, tau, config.horizon_days * DAY)
    return Features(users, event_ids.astype(np.int32), cat_ids.astype(np.int32), numeric,
                    static, interest_now, fading)


def _response(counts: np.ndarray, rows: np.ndarray, codes: np.ndarray,
              n_codes: int) -> np.ndarray:
    """``RESPONSE_FEATURES`` from the window's event ``counts`` [N, event types] and the
    category ``codes`` of its events (``rows`` grouped, ascending)."""
    view, click, cart, fav, buy = (counts[:, EVENT_TYPES.index(e)].astype(np.float64)
                                   for e in EVENT_TYPES)

    def rate(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.log((a + 1.0) / (b + 2.0))

    n = len(counts)
    pairs = rows.astype(np.int64) * n_codes + codes
    if n * n_codes <= 8 * len(pairs):
        top = np.bincount(pairs, minlength=n * n_codes).reshape(n, n_codes).max(axis=1)
    else:
        uniq, per = np.unique(pairs, return_counts=True)
        top = np.zeros(n, dtype=np.int64)
        np.maximum.at(top, uniq // n_codes, per)
    share = top / np.maximum(counts.sum(axis=1), 1)
    return np.column_stack([share, rate(click, view), rate(fav, np.maximum(click - cart, 0)),
                            rate(buy, cart)])


def _cadence(lg: SortedLog, at: float, config: SnapshotConfig, begin: np.ndarray,
             end: np.ndarray, start: np.ndarray, rows: np.ndarray, win: np.ndarray,
             value_sum: np.ndarray, recency: np.ndarray, history: np.ndarray,
             first: np.ndarray) -> np.ndarray:
    """``CADENCE_FEATURES`` of the active users (rows of the window's events ``win``)."""
    n = len(end)
    empty = config.observation_days  # a statistic without a gap
    # Window gaps: each window event after the user's first one in the window.
    inner = win > np.repeat(begin, end - begin)
    w_rows, w_gap = rows[inner], (lg.t[win[inner]] - lg.t[win[inner] - 1]) / DAY
    w_mean, w_median, w_std = _row_stats(w_rows, w_gap, n, empty)
    # Recent gaps: the last max_len events whose previous event is in the user's log.
    r_begin = np.maximum(start + 1, end - config.max_len)
    r_begin = np.minimum(r_begin, end)
    recent = ranges(r_begin, end)
    r_rows = np.repeat(np.arange(n), end - r_begin)
    r_gap = (lg.t[recent] - lg.t[recent - 1]) / DAY
    _, r_median, r_std = _row_stats(r_rows, r_gap, n, empty)
    has_last = end - 1 > start
    last = np.where(has_last, (lg.t[end - 1] - lg.t[np.maximum(end - 2, 0)]) / DAY, empty)
    span = (lg.t[end - 1] - first) / DAY
    h_mean = np.where(history > 1, span / np.maximum(history - 1, 1), empty)
    over_gap = recency / np.maximum(r_median, 1.0 / 24.0)
    counts = [end - lg.positions(lg.user[end - 1], at - days * DAY)
              for days in COUNT_WINDOWS_DAYS]
    per_event = value_sum / np.maximum(end - begin, 1)
    return np.log1p(np.column_stack([
        w_mean, w_median, w_std, last, h_mean, r_median, r_std, over_gap, *counts, per_event,
    ]))


def _row_stats(rows: np.ndarray, values: np.ndarray, n_rows: int, empty: float
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: mean, median and standard deviation of its ``values`` (``rows`` grouped,
    ascending); rows without a value get ``empty`` (and spread 0)."""
    count = np.bincount(rows, minlength=n_rows)
    total = np.bincount(rows, weights=values, minlength=n_rows)
    some = count > 0
    mean = np.where(some, total / np.maximum(count, 1), empty)
    sq = np.bincount(rows, weights=(values - mean[rows]) ** 2, minlength=n_rows)
    std = np.sqrt(sq / np.maximum(count, 1))
    # pandas' grouped median selects within each group: several times faster than a
    # lexsort of every gap at every cutoff, and the same values (even counts: the mean
    # of the two middle ones).
    median = np.full(n_rows, float(empty))
    if len(values):
        grouped = pd.Series(values).groupby(rows).median()
        median[grouped.index.to_numpy()] = grouped.to_numpy()
    return mean, median, std


def ranges(begin: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Concatenation of arange(b, e) for every pair, vectorised."""
    lengths = end - begin
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(begin - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return np.arange(total, dtype=np.int64) + offsets


def _distinct_per_row(rows: np.ndarray, codes: np.ndarray, n_rows: int,
                      n_codes: int) -> np.ndarray:
    """How many distinct ``codes`` (0..n_codes-1) each of ``n_rows`` rows has.

    A table of seen (row, code) pairs when it is no larger than a few times the input,
    as with a small catalogue; else the pairs are sorted.
    """
    pairs = rows.astype(np.int64) * n_codes + codes
    if n_rows * n_codes <= 8 * len(pairs):
        seen = np.zeros(n_rows * n_codes, dtype=bool)
        seen[pairs] = True
        return np.count_nonzero(seen.reshape(n_rows, n_codes), axis=1)
    return np.bincount(np.unique(pairs) // n_codes, minlength=n_rows)


def _fading_category(lg: SortedLog, idx: np.ndarray, valid: np.ndarray, at: float, tau: float,
                     lookback: float) -> np.ndarray:
    """Per row, the category (of the sequence) whose interest dropped most over ``lookback``."""
    n, length = idx.shape
    if n == 0:
        return np.zeros(0, dtype=object)
    t = lg.t[idx]
    w = lg.weight[idx]
    now = w * np.exp(-(at - t) / tau)
    before_at = at - lookback
    then = np.where(t < before_at, w * np.exp(-(before_at - t) / tau), 0.0)
    drop = np.where(valid, then - now, 0.0)
    # Sum drops per (row, category) by sorting each row's short sequence by category.
    cat = np.where(valid, lg.cat_code[idx], -1)
    order = np.argsort(cat, axis=1, kind="stable")
    cat_sorted = np.take_along_axis(cat, order, axis=1)
    csum = np.cumsum(np.take_along_axis(drop, order, axis=1), axis=1)
    group_end = np.ones_like(valid)
    group_end[:, :-1] = cat_sorted[:, :-1] != cat_sorted[:, 1:]
    # Cumulative sum at the previous group end, by forward-filling group-end positions.
    last_end = np.where(group_end, np.arange(length), -1)
    last_end = np.maximum.accumulate(last_end, axis=1)
    prev = np.concatenate([np.full((n, 1), -1), last_end[:, :-1]], axis=1)
    before = np.where(prev >= 0, np.take_along_axis(csum, np.maximum(prev, 0), axis=1), 0.0)
    sums = np.where(group_end & (cat_sorted >= 0), csum - before, -np.inf)
    best = np.argmax(sums, axis=1)
    best_cat = cat_sorted[np.arange(n), best]
    out = np.full(n, "", dtype=object)
    ok = best_cat >= 0
    out[ok] = lg.cat_names[best_cat[ok]]
    return out
