"""From an event log to labelled, time-split snapshots.

For every cutoff ``T`` (every ``stride`` days) each user with activity in
``[T - observation, T)`` yields one snapshot: the last ``max_len`` events before ``T``
as padded arrays, aggregate features, the interest score ``I(T)``, the decay label
``I(T + H) < rho * I(T)``, the interest target ``log1p(I(T + H))`` and, when the user
received an intervention in ``[T, T + window)``, the activation target.

The features come from ``common.features``; this module plans the cutoffs, adds the
labels and the logged interventions, and splits by time. A user is the pair (merchant,
user id): a household shopping in two stores is two users, one per merchant, as in a
federation.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from common.config import SnapshotConfig
from common.features import (
    DAY,
    Features,
    SortedLog,
    features_at,
    interest_at,
    label_window,
    utc,
)
from common.progress import SILENT, Progress
from common.schema import EVENT_TYPES, DataError

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Most cutoffs a calendar may have: more means stray rows stretch the log or the stride
#: is far too small, and building them would run for hours.
MAX_CUTOFFS = 10_000
#: An event-free stretch this long inside a log means rows from another period.
STRAY_GAP_DAYS = 365.0


@dataclasses.dataclass
class Snapshots:
    """Model-ready arrays for N snapshots; every array has N rows."""

    events: np.ndarray  # int32 [N, L]; 0 pads, 1..5 = EVENT_TYPES (pre-padded: latest last)
    categories: np.ndarray  # int32 [N, L]; 0 pads, 1..hash_buckets
    numeric: np.ndarray  # float32 [N, L, 3]; NUMERIC_FEATURES
    static: np.ndarray  # float32 [N, S]; STATIC_FEATURES
    decay: np.ndarray  # float32 [N]; 1 = interest fades
    interest: np.ndarray  # float32 [N]; log1p(I(T + H))
    interest_now: np.ndarray  # float32 [N]; I(T)
    action: np.ndarray  # int32 [N]; logged action index, -1 = no intervention
    activation: np.ndarray  # float32 [N]; re-engaged within the response window
    propensity: np.ndarray  # float32 [N]; logging probability of the action (1 if none)
    intervention: np.ndarray  # int64 [N]; row of the matched intervention in its frame, -1
    user_id: np.ndarray  # object [N]
    merchant_id: np.ndarray  # object [N]
    cutoff: np.ndarray  # datetime64[ns] [N]
    split: np.ndarray  # int8 [N]; index into SPLITS
    fading_category: np.ndarray  # object [N]; category whose interest fell most

    def __len__(self) -> int:
        return len(self.decay)

    def subset(self, rows: np.ndarray) -> Snapshots:
        """Rows by boolean mask or index array."""
        return Snapshots(**{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)})

    def split_part(self, name: str) -> Snapshots:
        return self.subset(self.split == SPLITS.index(name))

    def merchant(self, merchant_id: str) -> Snapshots:
        return self.subset(self.merchant_id == merchant_id)

    @property
    def activation_mask(self) -> np.ndarray:
        return (self.action >= 0).astype(np.float32)

    def inputs(self) -> dict[str, np.ndarray]:
        """Keras model inputs by name."""
        return {
            "events": self.events,
            "categories": self.categories,
            "numeric": self.numeric,
            "static": self.static,
        }

    @classmethod
    def unlabelled(cls, feats: Features, user_id: np.ndarray, merchant_id: np.ndarray,
                   cutoff: np.datetime64) -> Snapshots:
        """Snapshots of ``feats`` to score: labels zero, no action, in the test split.

        ``user_id`` and ``merchant_id`` name the rows of ``feats``; ``cutoff`` is naive UTC.
        """
        n = len(feats.users)
        return cls(
            events=feats.events, categories=feats.categories, numeric=feats.numeric,
            static=feats.static.astype(np.float32), decay=np.zeros(n, np.float32),
            interest=np.zeros(n, np.float32), interest_now=feats.interest_now.astype(np.float32),
            action=np.full(n, -1, np.int32), activation=np.zeros(n, np.float32),
            propensity=np.ones(n, np.float32), intervention=np.full(n, -1, np.int64),
            user_id=user_id, merchant_id=merchant_id,
            cutoff=np.full(n, cutoff, dtype="datetime64[ns]"),
            split=np.full(n, SPLITS.index("test"), np.int8),
            fading_category=feats.fading_category,
        )

    @classmethod
    def concat(cls, parts: Sequence[Snapshots]) -> Snapshots:
        return cls(**{
            f.name: np.concatenate([getattr(p, f.name) for p in parts])
            for f in dataclasses.fields(cls)
        })

    def save(self, path: str | Path) -> None:
        """Write a compressed ``.npz`` (the suffix is added when missing)."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        np.savez_compressed(path, **{
            f.name: getattr(self, f.name).astype(str)
            if getattr(self, f.name).dtype == object else getattr(self, f.name)
            for f in dataclasses.fields(self)
        })

    @classmethod
    def load(cls, path: str | Path) -> Snapshots:
        path = Path(path)
        if path.suffix != ".npz" and not path.exists():
            path = path.with_name(path.name + ".npz")
        with np.load(path, allow_pickle=False) as data:
            arrays = {f.name: data[f.name] for f in dataclasses.fields(cls)}
        for name in ("user_id", "merchant_id", "fading_category"):
            arrays[name] = arrays[name].astype(object)
        return cls(**arrays)


@dataclasses.dataclass
class SnapshotReport:
    """What the builder did: cutoffs per split, counts and label rates."""

    cutoffs: dict[str, list[str]]
    skipped_cutoffs: list[str]
    snapshots: dict[str, int]
    decay_rate: dict[str, float]
    activation_rows: dict[str, int]
    interventions_unmatched: int
    interventions_unobserved: int
    #: cutoffs per split at which no user was active (they yield no snapshots)
    empty_cutoffs: dict[str, int] = dataclasses.field(default_factory=dict)

    def summary_lines(self) -> list[str]:
        lines = []
        for s in SPLITS:
            cut = self.cutoffs.get(s, [])
            span = f"{cut[0]} .. {cut[-1]}" if cut else "-"
            lines.append(
                f"  {s:<5} cutoffs {len(cut):>2} ({span})  snapshots {self.snapshots.get(s, 0):>8,}"
                f"  decay rate {self.decay_rate.get(s, float('nan')):.3f}"
                f"  with intervention {self.activation_rows.get(s, 0):>6,}"
            )
        empty = {s: n for s, n in self.empty_cutoffs.items() if n}
        if empty:
            lines.append("  cutoffs without any active user: " + ", ".join(
                f"{s} {n}" for s, n in empty.items()))
        if self.skipped_cutoffs:
            lines.append(f"  cutoffs left out between splits (label windows would cross): "
                         f"{len(self.skipped_cutoffs)}")
        if self.interventions_unmatched or self.interventions_unobserved:
            lines.append(
                f"  interventions without an active snapshot: {self.interventions_unmatched:,};"
                f" response window past the end of the log: {self.interventions_unobserved:,}"
            )
        return lines


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


def federation_problems(snaps: Snapshots, report: SnapshotReport,
                        min_train_snapshots: int) -> list[str]:
    """Why these snapshots cannot join a federation; empty when they can.

    A merchant needs at least ``min_train_snapshots`` training snapshots (merchants with
    fewer are left out of a federation) and the log needs snapshots in the validation
    and test periods, or the model is scored on nothing.
    """
    problems = []
    for i, name in enumerate(SPLITS[1:], 1):
        if not (snaps.split == i).any():
            cut = report.cutoffs.get(name, [])
            problems.append(
                f"the {'validation' if name == 'val' else 'test'} period has no snapshots "
                f"(cutoffs {', '.join(cut) or '-'}: no user active in the observation "
                "window before them); the end of the log is empty or holds a few stray "
                "late rows: remove them, or lower snapshots.horizon-days / stride-days")
    train = snaps.split == 0
    sizes = pd.Series(snaps.merchant_id[train].astype(str)).value_counts()
    need = max(min_train_snapshots, 1)
    if not (sizes >= need).any():
        largest = (f"largest: merchant {sizes.index[0]} with {int(sizes.iloc[0]):,}"
                   if len(sizes) else "there are none")
        problems.append(
            f"no merchant has the {need:,} training snapshots a federation needs "
            f"(data.min-merchant-snapshots; {largest}); add history, lower "
            "snapshots.stride-days, or lower data.min-merchant-snapshots")
    return problems


def build_snapshots(
    events: pd.DataFrame,
    config: SnapshotConfig,
    interventions: pd.DataFrame | None = None,
    *,
    progress: Progress = SILENT,
) -> tuple[Snapshots, SnapshotReport]:
    """Build labelled, time-split snapshots from a canonical event log.

    Parameters
    ----------
    events : canonical event frame (see ``common.schema``).
    config : snapshot parameters.
    interventions : optional canonical interventions frame.
    progress : reports the cutoffs done.
    """
    lg = SortedLog.from_events(events, config)
    plan, skipped = plan_cutoffs(lg.t_end, config)
    # A cutoff with no event in its observation window yields nothing; finding that by
    # binary search keeps long empty stretches of a calendar cheap.
    t_sorted = np.sort(lg.t)
    obs = config.observation_days * DAY
    empty = dict.fromkeys(SPLITS, 0)
    parts: list[Snapshots] = []
    part_users: list[np.ndarray] = []
    cutoffs, made = sum(len(plan[name]) for name in SPLITS), 0
    with progress.task("building snapshots", total=cutoffs, unit="cutoffs") as task:
        for split_index, name in enumerate(SPLITS):
            for at in plan[name]:
                window = np.searchsorted(t_sorted, [at - obs - 1.0, at + 1.0])
                if window[1] == window[0]:
                    empty[name] += 1
                    task.advance(1)
                    continue
                part, users = _labelled(lg, at, config, split_index)
                empty[name] += int(len(users) == 0)
                parts.append(part)
                part_users.append(users)
                made += len(part)
                task.advance(1, snapshots=made)
    if not parts:  # every cutoff empty: one empty part gives the arrays their shapes
        part, users = _labelled(lg, plan["train"][0], config, 0)
        parts.append(part)
        part_users.append(users)
    user_codes = np.concatenate(part_users)
    snaps = Snapshots.concat(parts)
    unmatched = unobserved = 0
    if interventions is not None and len(interventions):
        unmatched, unobserved = _attach_interventions(snaps, user_codes, lg, interventions, config)
    report = SnapshotReport(
        cutoffs={s: [str((lg.t0 + pd.Timedelta(seconds=c)).date()) for c in plan[s]]
                 for s in SPLITS},
        skipped_cutoffs=[str((lg.t0 + pd.Timedelta(seconds=c)).date()) for c in skipped],
        snapshots={s: int((snaps.split == i).sum()) for i, s in enumerate(SPLITS)},
        decay_rate={s: float(snaps.decay[snaps.split == i].mean()) if (snaps.split == i).any()
                    else float("nan") for i, s in enumerate(SPLITS)},
        activation_rows={s: int(((snaps.split == i) & (snaps.action >= 0)).sum())
                         for i, s in enumerate(SPLITS)},
        interventions_unmatched=unmatched,
        interventions_unobserved=unobserved,
        empty_cutoffs=empty,
    )
    log.info("built %d snapshots from %d events", len(snaps), len(lg.t))
    return snaps, report


def _labelled(lg: SortedLog, at: float, config: SnapshotConfig, split_index: int
              ) -> tuple[Snapshots, np.ndarray]:
    """Labelled snapshots of the users active at cutoff ``at``, and their user codes."""
    feats = features_at(lg, at, config)
    tau = config.tau_days * DAY
    future = interest_at(lg, at + config.horizon_days * DAY, tau)[feats.users]
    n = len(feats.users)
    part = Snapshots(
        events=feats.events,
        categories=feats.categories,
        numeric=feats.numeric,
        static=feats.static,
        decay=(future < config.rho * feats.interest_now).astype(np.float32),
        interest=np.log1p(future).astype(np.float32),
        interest_now=feats.interest_now.astype(np.float32),
        action=np.full(n, -1, dtype=np.int32),
        activation=np.zeros(n, dtype=np.float32),
        propensity=np.ones(n, dtype=np.float32),
        intervention=np.full(n, -1, dtype=np.int64),
        user_id=lg.user_ids[feats.users],
        merchant_id=lg.merchant_ids[feats.users],
        cutoff=np.full(n, (lg.t0 + pd.Timedelta(seconds=at)).tz_localize(None)
                       .to_datetime64(), dtype="datetime64[ns]"),
        split=np.full(n, split_index, dtype=np.int8),
        fading_category=feats.fading_category,
    )
    return part, feats.users


def _attach_interventions(snaps: Snapshots, user_codes: np.ndarray, lg: SortedLog,
                          interventions: pd.DataFrame, config: SnapshotConfig) -> tuple[int, int]:
    """Fill action / activation / propensity of snapshots that received an intervention."""
    actions = list(config.actions)
    merchant = (interventions["merchant_id"].astype(str).to_numpy(dtype=object)
                if "merchant_id" in interventions
                else np.full(len(interventions), "local", dtype=object))
    pair = pd.MultiIndex.from_arrays(
        [merchant, interventions["user_id"].astype(str).to_numpy(dtype=object)])
    lookup = pd.MultiIndex.from_arrays([lg.merchant_ids, lg.user_ids])
    code = lookup.get_indexer(pair).astype(np.int64)
    t_int = (pd.DatetimeIndex(interventions["timestamp"]) - lg.t0).total_seconds().to_numpy()
    action = pd.Index(actions).get_indexer(interventions["action"].astype(str))
    if (action < 0).any():
        bad = sorted(set(interventions["action"].astype(str)[action < 0]))[:5]
        raise DataError(f"interventions: unknown action(s) {bad}; configured actions: {actions}")
    prop = interventions["propensity"].to_numpy(dtype=np.float64, na_value=np.nan) \
        if "propensity" in interventions else np.full(len(interventions), np.nan)
    shares = np.bincount(action, minlength=len(actions)) / max(len(action), 1)
    prop = np.where(np.isfinite(prop) & (prop > 0), prop, shares[action])

    window = config.intervention_window_days * DAY
    response = config.response_days * DAY
    snap_sec = (snaps.cutoff - lg.t0.tz_localize(None).to_datetime64()) / np.timedelta64(1, "s")
    snap_key = user_codes * lg.span + np.round(snap_sec).astype(np.int64)
    order = np.argsort(snap_key)
    sorted_key = snap_key[order]
    # An intervention belongs to the same user's latest cutoff T <= t with t < T + window.
    known = code >= 0
    probe = code * lg.span + np.floor(t_int).astype(np.int64)
    pos = np.searchsorted(sorted_key, probe, side="right") - 1
    ok = known & (pos >= 0)
    pos = np.where(ok, pos, 0)
    ok &= (sorted_key[pos] // lg.span == code) & (probe - sorted_key[pos] < window)
    observed = t_int + response <= lg.t_end + 1
    matched = ok & observed
    # Keep the first intervention per snapshot.
    rows = order[pos[matched]]
    first_idx = np.argsort(t_int[matched], kind="stable")
    rows_sorted = rows[first_idx]
    _, keep = np.unique(rows_sorted, return_index=True)
    chosen = np.flatnonzero(matched)[first_idx][keep]
    target_rows = rows_sorted[keep]

    # Re-engagement: a qualifying event in (t_int, t_int + response].
    engage = lg.event == EVENT_TYPES.index("purchase") if config.reengage_event == "purchase" \
        else np.ones(len(lg.event), dtype=bool)
    ekey = lg.key[engage]
    c = code[chosen]
    lo = np.searchsorted(ekey, c * lg.span + np.floor(t_int[chosen]).astype(np.int64), side="right")
    hi = np.searchsorted(ekey, c * lg.span + np.floor(t_int[chosen] + response).astype(np.int64),
                         side="right")
    snaps.action[target_rows] = action[chosen]
    snaps.activation[target_rows] = (hi > lo).astype(np.float32)
    snaps.propensity[target_rows] = prop[chosen].astype(np.float32)
    snaps.intervention[target_rows] = chosen
    unobserved = int((ok & ~observed).sum())
    unmatched = int((~ok).sum())
    return unmatched, unobserved


def unlabelled_snapshots(events: pd.DataFrame, at: pd.Timestamp | str,
                         config: SnapshotConfig) -> tuple[Snapshots, np.ndarray]:
    """Unlabelled snapshots of every user active before ``at``, for scoring.

    The reference the batch scorer (``client.batch_features``) is tested against.
    Returns the snapshots (labels zero) and the user ids.
    """
    lg = SortedLog.from_events(events, config)
    cutoff = utc(str(at))
    feats = features_at(lg, (cutoff - lg.t0).total_seconds(), config)
    snaps = Snapshots.unlabelled(feats, lg.user_ids[feats.users], lg.merchant_ids[feats.users],
                                 cutoff.tz_localize(None).to_datetime64())
    return snaps, snaps.user_id
