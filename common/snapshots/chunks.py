"""Snapshots of a large log built whole merchants at a time, the same as built at once.

The builder's working arrays cost a few hundred bytes an event (the sorted log, its
object columns, each cutoff's gathers), so a pooled log of 50 M events needs tens of
GB at once. Snapshots never mix merchants: a user is the pair (merchant, user id), and
on a fixed calendar (``snapshots.start`` and ``snapshots.end``) every merchant has the
same cutoffs. So the log is cut into chunks of whole merchants, each chunk's snapshots
are built and its working arrays freed, and the parts are put back in the order of the
one-pass build (cutoff by cutoff, users in (merchant, user) order). The categories are
coded as in the whole log and missing propensities filled from the whole log's action
shares, so every array is equal, not just close.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import numpy as np
import pandas as pd

from common.config import SnapshotConfig
from common.features import SortedLog, category_order, utc
from common.progress import SILENT, Progress
from common.schema import DataError
from common.snapshots.build import BuiltLog, build_log, build_snapshots, make_report
from common.snapshots.container import Snapshots
from common.snapshots.cutoffs import plan_cutoffs
from common.snapshots.interventions import actions_and_propensities
from common.snapshots.report import SnapshotReport

log = logging.getLogger(__name__)


def build_in_chunks(events: pd.DataFrame, config: SnapshotConfig,
                    interventions: pd.DataFrame | None = None, *, chunk_events: int,
                    progress: Progress = SILENT) -> tuple[Snapshots, SnapshotReport]:
    """:func:`~common.snapshots.build_snapshots` of ``events``, built in chunks of whole
    merchants of about ``chunk_events`` events (a merchant larger than that is a chunk
    of its own); ``progress`` shows the merchants done.

    Without a fixed calendar, without a ``merchant_id`` column in the events (or in
    non-empty interventions), the log is built at once.
    """
    has_iv = interventions is not None and len(interventions) > 0
    if not (config.start and config.end) or "merchant_id" not in events or (
            has_iv and "merchant_id" not in interventions):  # type: ignore[operator]
        log.debug("snapshots built at once: chunks need a fixed calendar and merchant ids")
        return build_snapshots(events, config, interventions, progress=progress)
    if len(events) == 0:
        raise DataError("no events to build snapshots from")
    t0 = utc(config.start)
    t_end = (utc(config.end) - t0).total_seconds()
    plan, skipped = plan_cutoffs(t_end, config)
    groups = _rows_by_merchant(events)
    names = category_order(events)
    iv, iv_groups = _prepared_interventions(interventions, config) if has_iv else (None, {})
    left_out = sum(len(rows) for m, rows in iv_groups.items() if m not in groups)
    built: list[BuiltLog] = []
    with progress.task("building snapshots", total=len(groups), unit="merchants") as task:
        for chunk in _chunks(groups, chunk_events):
            part = _build_chunk(events, chunk, groups, iv, iv_groups, config, plan, names,
                                (t0, t_end))
            if part is not None:
                built.append(part)
            else:  # no event inside the calendar: its interventions match nothing
                left_out += sum(len(iv_groups.get(m, ())) for m in chunk)
            task.advance(len(chunk), snapshots=sum(len(b.snapshots) for b in built))
    if not built:
        raise DataError(f"no events inside the calendar {config.start} .. {config.end}")
    snaps = _in_build_order(built)
    empty = np.logical_and.reduce([b.empty for b in built])
    unmatched = left_out + sum(b.unmatched for b in built)
    report = make_report(snaps, t0, plan, skipped, empty,
                         (unmatched, sum(b.unobserved for b in built)))
    log.info("built %d snapshots from %d events in %d chunks", len(snaps), len(events),
             len(built))
    return snaps, report


def _rows_by_merchant(frame: pd.DataFrame) -> dict[object, np.ndarray]:
    """Row positions of each merchant, merchants in the order the builder codes them
    (by their string), rows in the frame's order."""
    groups = frame.groupby("merchant_id", observed=True, sort=False, dropna=False).indices
    return {m: groups[m] for m in sorted(groups, key=str)}


def _chunks(groups: dict[object, np.ndarray], chunk_events: int) -> Iterator[list[object]]:
    """Consecutive merchants, as few as reach ``chunk_events`` events together."""
    chunk: list[object] = []
    size = 0
    for merchant, rows in groups.items():
        chunk.append(merchant)
        size += len(rows)
        if size >= chunk_events:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _prepared_interventions(interventions: pd.DataFrame, config: SnapshotConfig
                            ) -> tuple[pd.DataFrame, dict[object, np.ndarray]]:
    """The interventions with every propensity filled in as the whole frame would fill
    it (a chunk's own action shares differ), and their rows by merchant."""
    _, prop = actions_and_propensities(interventions, list(config.actions))
    iv = interventions.assign(propensity=prop)
    return iv, _rows_by_merchant(iv)


def _build_chunk(events: pd.DataFrame, chunk: list[object], groups: dict[object, np.ndarray],
                 iv: pd.DataFrame | None, iv_groups: dict[object, np.ndarray],
                 config: SnapshotConfig, plan: dict[str, list[float]],
                 names: np.ndarray | None, calendar: tuple[pd.Timestamp, float]
                 ) -> BuiltLog | None:
    """One chunk's snapshots, their interventions numbered as rows of the whole frame;
    None when none of its events is inside the calendar."""
    rows = np.sort(np.concatenate([groups[m] for m in chunk]))
    part = events.take(rows)
    t0, t_end = calendar
    seconds = (pd.DatetimeIndex(part["timestamp"]) - t0).total_seconds().to_numpy()
    if not ((seconds >= 0) & (seconds <= t_end)).any():
        return None
    lg = SortedLog.from_events(part, config, category_names=names)
    del part
    mine = [iv_groups[m] for m in chunk if m in iv_groups]
    iv_rows = np.sort(np.concatenate(mine)) if mine else np.zeros(0, dtype=np.int64)
    part_iv = iv.take(iv_rows) if iv is not None and len(iv_rows) else None
    with SILENT.task("cutoffs") as quiet:  # the caller shows merchants, not cutoffs
        built = build_log(lg, plan, config, part_iv, quiet)
    got = built.snapshots.intervention >= 0
    built.snapshots.intervention[got] = iv_rows[built.snapshots.intervention[got]]
    return built


def _in_build_order(built: list[BuiltLog]) -> Snapshots:
    """The chunks' rows as the one-pass build orders them: by cutoff, then by user code
    (chunks hold consecutive merchants, so chunk order is code order)."""
    order = np.argsort(np.concatenate([b.slot for b in built]), kind="stable")
    # Field by field, so the parts and the result coexist one array at a time.
    return Snapshots(**{
        f.name: np.concatenate([getattr(b.snapshots, f.name) for b in built])[order]
        for f in dataclasses.fields(Snapshots)
    })

