"""From an event log to labelled, time-split snapshots (and unlabelled ones to score)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from common.config import SnapshotConfig
from common.features import DAY, SortedLog, features_at, interest_at, utc
from common.progress import SILENT, Progress
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
        unmatched, unobserved = attach_interventions(snaps, user_codes, lg, interventions, config)
    report = _report(snaps, lg, plan, skipped, empty, (unmatched, unobserved))
    log.info("built %d snapshots from %d events", len(snaps), len(lg.t))
    return snaps, report


def _report(snaps: Snapshots, lg: SortedLog, plan: dict[str, list[float]],
            skipped: list[float], empty: dict[str, int],
            interventions_left: tuple[int, int]) -> SnapshotReport:
    """The builder's report: cutoff dates, snapshots and label rates per split, and the
    interventions (unmatched, unobserved) left out."""

    def day(cutoff: float) -> str:
        return str((lg.t0 + pd.Timedelta(seconds=cutoff)).date())

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
        empty_cutoffs=empty,
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
