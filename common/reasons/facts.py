"""What a customer's own events say, in figures a reason quotes.

Everything is read back from the snapshot (``Snapshots``): the aggregates are exact over
the customer's history and observation window (they are ``log1p`` of counts, days and
values), the per-step figures come from the last ``max_len`` events (event type, hashed
category, hours before the cutoff, value). Vectorised over customers.

The interest decomposition per category follows ``common.features._fading_category``:
per category of the sequence, interest *then* (at ``cutoff - horizon``, from the events
before it) and *now* (at the cutoff), each the sum of ``w * exp(-age / tau)``. The
model sees categories as hash buckets, so the decomposition is per bucket; a bucket is
named by the customer's fading category when that hashes to it, else by the category
names the caller knows for it (:class:`CategoryNames`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

from common.config import SnapshotConfig
from common.features import AGGREGATE_FEATURES, DAY, NUMERIC_FEATURES, hash_categories
from common.schema import EVENT_TYPES
from common.snapshots import Snapshots

#: Events of the sequence the event-mix figures look at (the latest ones).
RECENT_EVENTS = 10
#: Fading categories listed per customer.
TOP_CATEGORIES = 3

_HOURS = NUMERIC_FEATURES.index("log_hours_to_cutoff")
_VALUE = NUMERIC_FEATURES.index("log_value")


def _col(name: str) -> int:
    return AGGREGATE_FEATURES.index(name)


def _ev(name: str) -> int:
    return EVENT_TYPES.index(name) + 1  # ids in the sequence are 1-based


@dataclasses.dataclass
class Facts:
    """Per customer (N rows) the figures the reasons quote."""

    recency_days: np.ndarray  # days since the last event
    purchase_days: np.ndarray  # days since the last purchase in the sequence, NaN if none
    seq_n: np.ndarray  # events in the sequence
    seq_days: np.ndarray  # days since the sequence's first event
    cart_open: np.ndarray  # bool: a cart after the last purchase of the sequence
    cart_days: np.ndarray  # days since that cart (NaN if none)
    events_7d: np.ndarray  # events in the last 7 days
    weekly_before: np.ndarray  # events per week in the window before the last 7 days
    window_events: np.ndarray  # events in the observation window
    value_7d: np.ndarray  # value in the last 7 days (sequence)
    value_weekly_before: np.ndarray  # value per week in the window before (aggregate - 7d)
    window_value: np.ndarray  # value in the observation window
    recent_views: np.ndarray  # views among the last RECENT_EVENTS events
    recent_purchases: np.ndarray  # purchases among them
    recent_n: np.ndarray  # events among them (<= RECENT_EVENTS)
    usual_gap_days: np.ndarray  # median gap between the recent events
    overdue: np.ndarray  # recency / usual gap
    n_categories: np.ndarray  # distinct categories in the observation window
    interest_then: np.ndarray  # I(cutoff - horizon) over the sequence
    interest_now: np.ndarray  # I(cutoff) over the sequence
    cat_bucket: np.ndarray  # int [N, TOP_CATEGORIES]: fading buckets, 0 = none
    cat_then: np.ndarray  # [N, TOP_CATEGORIES] interest then
    cat_now: np.ndarray  # [N, TOP_CATEGORIES] interest now
    cat_name: np.ndarray  # object [N, TOP_CATEGORIES]

    def __len__(self) -> int:
        return len(self.recency_days)

    def as_lists(self) -> Facts:
        """The same figures with every field a plain Python list (rows of lists for the
        ``[N, TOP_CATEGORIES]`` ones): the reasons read one customer at a time, and a list
        is indexed (and its floats formatted) several times faster than an array."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).tolist()
                                            for f in dataclasses.fields(self)})


class CategoryNames:
    """Category names by hash bucket, from the names a merchant's log holds.

    A bucket several names hash to is named by them all (``c3/c9``); a bucket with no
    known name is ``bucket 17``.
    """

    def __init__(self, names: Iterable[str], buckets: int) -> None:
        names = np.asarray(sorted({str(n) for n in names}), dtype=object)
        self._by_bucket: dict[int, list[str]] = {}
        if len(names):
            for name, b in zip(names, hash_categories(names, buckets), strict=True):
                self._by_bucket.setdefault(int(b), []).append(str(name))
        self.buckets = buckets

    def name(self, bucket: int, fading: str = "") -> str:
        """The bucket's name; ``fading`` (the customer's exact fading category) wins
        when it hashes to ``bucket``."""
        known = self._by_bucket.get(int(bucket), [])
        if fading and fading in known:
            return fading
        return "/".join(known) if known else f"bucket {int(bucket)}"


def customer_facts(snaps: Snapshots, config: SnapshotConfig,
                   names: CategoryNames | None = None) -> Facts:
    """The figures of every row of ``snaps`` (see :class:`Facts`)."""
    n = len(snaps)
    stat = np.expm1(snaps.static.astype(np.float64))
    events = snaps.events
    real = events > 0
    hours = np.where(real, np.expm1(snaps.numeric[..., _HOURS].astype(np.float64)), np.inf)
    value = np.where(real, np.expm1(snaps.numeric[..., _VALUE].astype(np.float64)), 0.0)
    days = hours / 24.0

    purchase = events == _ev("purchase")
    purchase_days = np.where(purchase, days, np.inf).min(axis=1)
    cart = events == _ev("cart")
    cart_after = cart & (days < purchase_days[:, None])
    cart_days = np.where(cart_after, days, np.inf).min(axis=1)

    window_events = stat[:, [_col(f"log_n_{e}") for e in EVENT_TYPES]].sum(axis=1)
    events_7d = stat[:, _col("log_n_last_7d")]
    before_weeks = max(config.observation_days - 7.0, 0.0) / 7.0
    weekly_before = (np.maximum(window_events - events_7d, 0.0) / before_weeks
                     if before_weeks > 0 else np.full(n, np.nan))
    in_7d = days < 7.0
    value_7d = (value * in_7d).sum(axis=1)
    window_value = stat[:, _col("log_value_sum")]
    value_weekly_before = (np.maximum(window_value - value_7d, 0.0) / before_weeks
                           if before_weeks > 0 else np.full(n, np.nan))

    # The latest RECENT_EVENTS steps (pre-padded: latest last).
    last = events[:, -RECENT_EVENTS:]
    recent_n = (last > 0).sum(axis=1)
    usual = stat[:, _col("log_gap_recent_median_days")]

    then, now, buckets = _category_interest(snaps, config, hours)
    order = np.argsort(-(then - now), axis=1, kind="stable")[:, :TOP_CATEGORIES]
    top_then = np.take_along_axis(then, order, axis=1)
    top_now = np.take_along_axis(now, order, axis=1)
    top_bucket = np.where(top_then > top_now, np.take_along_axis(buckets, order, axis=1), 0)
    top_name = np.full(top_bucket.shape, "", dtype=object)
    for r, c in zip(*np.nonzero(top_bucket), strict=True):
        fading = str(snaps.fading_category[r])
        top_name[r, c] = (names.name(top_bucket[r, c], fading) if names is not None
                          else fading if c == 0 and fading else f"bucket {top_bucket[r, c]}")
    return Facts(
        recency_days=stat[:, _col("log_recency_days")],
        purchase_days=np.where(np.isfinite(purchase_days), purchase_days, np.nan),
        seq_n=real.sum(axis=1), seq_days=np.where(real, days, 0.0).max(axis=1, initial=0.0),
        cart_open=np.isfinite(cart_days),
        cart_days=np.where(np.isfinite(cart_days), cart_days, np.nan),
        events_7d=events_7d, weekly_before=weekly_before, window_events=window_events,
        value_7d=value_7d, value_weekly_before=value_weekly_before, window_value=window_value,
        recent_views=(last == _ev("view")).sum(axis=1),
        recent_purchases=(last == _ev("purchase")).sum(axis=1), recent_n=recent_n,
        usual_gap_days=usual, overdue=stat[:, _col("log_recency_over_gap")],
        n_categories=stat[:, _col("log_n_categories")],
        interest_then=then.sum(axis=1), interest_now=now.sum(axis=1),
        cat_bucket=top_bucket, cat_then=np.where(top_bucket > 0, top_then, 0.0),
        cat_now=np.where(top_bucket > 0, top_now, 0.0), cat_name=top_name,
    )


def _category_interest(snaps: Snapshots, config: SnapshotConfig, hours: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Interest then and now per distinct bucket of each row: ``[N, L]`` arrays holding
    each bucket once (at its first step; other steps 0) and the bucket ids."""
    tau = config.tau_days * DAY
    weights = np.asarray((0.0, *config.event_weights))[snaps.events]
    age = np.where(np.isfinite(hours), hours * 3600.0, 0.0)
    lookback = config.horizon_days * DAY
    now_step = np.where(np.isfinite(hours), weights * np.exp(-age / tau), 0.0)
    then_step = np.where(np.isfinite(hours) & (age > lookback),
                         weights * np.exp(-(age - lookback) / tau), 0.0)
    cats = np.where(snaps.events > 0, snaps.categories, 0)
    # Per row, sum the steps of each bucket into the bucket's first step: the first True
    # of a step's row of ``same`` (padding steps, all False, carry 0 into step 0).
    same = (cats[:, :, None] == cats[:, None, :]) & (cats[:, :, None] > 0)
    owner = np.argmax(same, axis=2)
    flat = (np.arange(len(cats))[:, None] * cats.shape[1] + owner).ravel()
    size = cats.size
    then = np.bincount(flat, then_step.ravel(), minlength=size).reshape(cats.shape)
    now = np.bincount(flat, now_step.ravel(), minlength=size).reshape(cats.shape)
    return then, now, cats
