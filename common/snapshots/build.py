"""From an event log to labelled, time-split snapshots (and unlabelled ones to score)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pandas as pd

from common.config import SnapshotConfig
from common.features import DAY, SortedLog, features_at, interest_at, utc
from common.progress import SILENT, Progress, Task
from common.snapshots.container import SPLITS, Snapshots
from common.snapshots.cutoffs import plan_cutoffs
from common.snapshots.interventions import attach_interventions
from common.snapshots.report import SnapshotReport

log = logging.getLogger(__name__)


def build_snapshots(
    events: pd.DataFrame,
    config: SnapshotConfig,
    interventions: pd.DataFrame | None = None,
    *,
    progress: Progress = SILENT,
    chunk_events: int = 0,
) -> tuple[Snapshots, SnapshotReport]:
    """Build labelled, time-split snapshots from a canonical event log.

    Parameters
    ----------
    events : canonical event frame (see ``common.schema``).
    config : snapshot parameters.
    interventions : optional canonical interventions frame.
    progress : reports the cutoffs done (the merchants done when built in chunks).
    chunk_events : when > 0 and the calendar is fixed (``config.start`` and
        ``config.end``), build whole merchants at a time, about this many events a
        chunk, so the builder's working arrays (a few hundred bytes an event) never
        cover the whole log; the result is the same (:mod:`common.snapshots.chunks`).
    """
    if chunk_events > 0:
        from common.snapshots.chunks import build_in_chunks

        return build_in_chunks(events, config, interventions, chunk_events=chunk_events,
                               progress=progress)
    lg = SortedLog.from_events(events, config)
    plan, skipped = plan_cutoffs(lg.t_end, config)
    with progress.task("building snapshots", total=sum(len(plan[s]) for s in SPLITS),
                       unit="cutoffs") as task:
        built = build_log(lg, plan, config, interventions, task)
    report = make_report(built.snapshots, lg.t0, plan, skipped, built.empty,
                         (built.unmatched, built.unobserved))
    log.info("built %d snapshots from %d events", len(built.snapshots), len(lg.t))
    return built.snapshots, report


@dataclasses.dataclass
class BuiltLog:
    """The snapshots of one log, with what merging several logs' snapshots needs."""

    snapshots: Snapshots
    slot: np.ndarray  # int32 [N]: each row's cutoff, numbered in plan order (train, val, test)
    empty: np.ndarray  # bool [cutoffs]: cutoffs without an active user, in plan order
    unmatched: int  # interventions without a snapshot to attach to
    unobserved: int  # interventions whose response window runs past the log


def build_log(lg: SortedLog, plan: dict[str, list[float]], config: SnapshotConfig,
              interventions: pd.DataFrame | None, task: Task) -> BuiltLog:
    """Every cutoff's labelled snapshots of ``lg``, interventions attached; ``task``
    advances by one a cutoff."""
    # A cutoff with no event in its observation window yields nothing; finding that by
    # binary search keeps long empty stretches of a calendar cheap.
    t_sorted = np.sort(lg.t)
    obs = config.observation_days * DAY
    ats = [at for name in SPLITS for at in plan[name]]
    splits = [i for i, name in enumerate(SPLITS) for _ in plan[name]]
    empty = np.zeros(len(ats), dtype=bool)
    parts: list[Snapshots] = []
    part_users: list[np.ndarray] = []
    slots: list[np.ndarray] = []
    made = 0
    for slot, (at, split_index) in enumerate(zip(ats, splits, strict=True)):
        window = np.searchsorted(t_sorted, [at - obs - 1.0, at + 1.0])
        if window[1] == window[0]:
            empty[slot] = True
            task.advance(1)
            continue
        part, users = _labelled(lg, at, config, split_index)
        empty[slot] = len(users) == 0
        parts.append(part)
        part_users.append(users)
        slots.append(np.full(len(users), slot, dtype=np.int32))
        made += len(part)
        task.advance(1, snapshots=made)
    if not parts:  # every cutoff empty: one empty part gives the arrays their shapes
        part, users = _labelled(lg, plan["train"][0], config, 0)
        parts.append(part)
        part_users.append(users)
        slots.append(np.zeros(0, dtype=np.int32))
    user_codes = np.concatenate(part_users)
    snaps = Snapshots.concat(parts)
    unmatched = unobserved = 0
    if interventions is not None and len(interventions):
        unmatched, unobserved = attach_interventions(snaps, user_codes, lg, interventions, config)
    return BuiltLog(snaps, np.concatenate(slots), empty, unmatched, unobserved)


def make_report(snaps: Snapshots, t0: pd.Timestamp, plan: dict[str, list[float]],
                skipped: list[float], empty: np.ndarray,
                interventions_left: tuple[int, int]) -> SnapshotReport:
    """The builder's report: cutoff dates, snapshots and label rates per split, empty
    cutoffs (``empty``: per cutoff in plan order) and the interventions (unmatched,
    unobserved) left out."""

    def day(cutoff: float) -> str:
        return str((t0 + pd.Timedelta(seconds=cutoff)).date())

    bounds = np.cumsum([0, *(len(plan[s]) for s in SPLITS)])
    return SnapshotReport(
        cutoffs={s: [day(c) for c in plan[s]] for s in SPLITS},
        skipped_cutoffs=[day(c) for c in skipped],
        snapshots={s: int((snaps.split == i).sum()) for i, s in enumerate(SPLITS)},
        decay_rate={s: float(snaps.decay[snaps.split == i].mean()) if (snaps.split == i).any()
                    else float("nan") for i, s in enumerate(SPLITS)},
        activation_rows={s: int(((snaps.split == i) & (snaps.action >= 0)).sum())
                         for i, s in enumerate(SPLITS)},
        interventions_unmatched=interventions_left[0],
        interventions_unobserved=interventions_left[1],
        empty_cutoffs={s: int(empty[bounds[i]:bounds[i + 1]].sum())
                       for i, s in enumerate(SPLITS)},
    )


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
