"""From an event log to labelled, time-split snapshots.

For every cutoff ``T`` (every ``stride`` days) each user with activity in
``[T - observation, T)`` yields one snapshot: the last ``max_len`` events before ``T``
as padded arrays, aggregate features, the interest score ``I(T)``, the decay label
``I(T + H) < rho * I(T)``, the interest target ``log1p(I(T + H))`` and, when the user
received an intervention in ``[T, T + window)``, the activation target.

The features come from ``common.features``; this package plans the cutoffs
(:mod:`~common.snapshots.cutoffs`), adds the labels and splits by time
(:mod:`~common.snapshots.build`), matches the logged interventions
(:mod:`~common.snapshots.interventions`), holds the arrays
(:mod:`~common.snapshots.container`) and reports what it did
(:mod:`~common.snapshots.report`). A user is the pair (merchant, user id): a household
shopping in two stores is two users, one per merchant, as in a federation.
"""

from __future__ import annotations

from common.snapshots.build import build_snapshots, unlabelled_snapshots
from common.snapshots.container import SPLITS, Snapshots
from common.snapshots.cutoffs import MAX_CUTOFFS, STRAY_GAP_DAYS, plan_cutoffs, stray_gap
from common.snapshots.report import SnapshotReport, federation_problems, unscorable

__all__ = [
    "MAX_CUTOFFS",
    "SPLITS",
    "STRAY_GAP_DAYS",
    "SnapshotReport",
    "Snapshots",
    "build_snapshots",
    "federation_problems",
    "unscorable",
    "plan_cutoffs",
    "stray_gap",
    "unlabelled_snapshots",
]
