"""One experiment: resolved configuration, its data and its snapshots.

Every method compared (federated, centralised, local-only, GBDT) starts from the same
``PreparedData``: the same events, the same shared calendar, the same snapshots and
splits, the same seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common import atomic
from common.config import SnapshotConfig, check_key
from common.progress import SILENT, Progress
from common.schema import DataError
from common.snapshots import SnapshotReport, Snapshots, build_snapshots, unscorable
from simulations.settings import DataConfig, Experiment, check_path_part
from simulations.synth import generate_federation

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PreparedData:
    """The events of every merchant and their snapshots on one shared calendar."""

    events: pd.DataFrame
    interventions: pd.DataFrame
    truth: pd.DataFrame | None  # synthetic only: P(re-engage | action) per intervention
    snapshots: Snapshots
    report: SnapshotReport
    snapshot_config: SnapshotConfig  # with the shared calendar filled in
    merchants: list[str]  # partition id i is merchants[i]
    actions: tuple[str, ...]
    seconds: float

    def truth_matrix(self, snaps: Snapshots) -> np.ndarray | None:
        """[N, A] true P(re-engage | action) for rows with an intervention (NaN elsewhere)."""
        if self.truth is None:
            return None
        cols = [f"p_{a}" for a in self.actions]
        table = self.truth[cols].to_numpy(dtype=np.float64)
        out = np.full((len(snaps), len(cols)), np.nan)
        rows = snaps.intervention >= 0
        out[rows] = table[snaps.intervention[rows]]
        return out

    def merchant_sizes(self) -> dict[str, int]:
        """Training snapshots per merchant (the size a merchant brings)."""
        train = self.snapshots.split == 0
        ids, counts = np.unique(self.snapshots.merchant_id[train].astype(str), return_counts=True)
        sizes = dict(zip(ids.tolist(), counts.tolist(), strict=True))
        return {m: int(sizes.get(m, 0)) for m in self.merchants}


def load_source(exp: Experiment) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    """Events, interventions and (synthetic only) the ground truth."""
    if exp.synthetic is not None:
        fed = generate_federation(exp.synthetic, seed=exp.seed)
        return fed.events, fed.interventions, fed.truth
    from common.io import load_events

    loaded = load_events(exp.data.events, exp.data.format,
                         interventions_path=exp.data.interventions or None,
                         bad_rows=exp.data.bad_rows)
    for line in loaded.report.summary_lines():
        log.info("%s", line)
    events = loaded.events
    if exp.data.partitioner:
        events = partition_users(events, exp.data, seed=exp.seed)
    return events, loaded.interventions, None


def partition_users(events: pd.DataFrame, config: DataConfig, seed: int) -> pd.DataFrame:
    """Assign users of a log without merchants to ``num_partitions`` merchants.

    Uses Flower Datasets' partitioners on the table of users, so a log without a
    merchant column becomes a federation (IID, or Dirichlet over the users' main
    category for a non-IID split).
    """
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if config.num_partitions < 2:
        raise ValueError("config key 'data.num-partitions': must be >= 2 with a partitioner")
    merchants = events["merchant_id"].nunique()
    if merchants > 1:  # the split would replace the log's own merchants, silently
        raise ValueError(f"config key 'data.partitioner': the log names {merchants} "
                         "merchants (merchant_id); a partitioner splits a log without "
                         "merchants: leave data.partitioner empty")
    users = events["user_id"].nunique()
    if config.num_partitions > users:
        raise ValueError(f"config key 'data.num-partitions': {config.num_partitions} "
                         f"merchants from {users:,} users; at most one merchant per user")
    users = (events.groupby("user_id", observed=True)["category_id"]
             .agg(lambda s: s.mode().iat[0]).rename("main_category").reset_index())
    users["label"] = pd.factorize(users["main_category"])[0]
    table = datasets.Dataset.from_pandas(users[["user_id", "label"]].astype({"user_id": str}),
                                         preserve_index=False)
    if config.partitioner == "iid":
        part = IidPartitioner(num_partitions=config.num_partitions)
    else:
        part = DirichletPartitioner(num_partitions=config.num_partitions, partition_by="label",
                                    alpha=config.dirichlet_alpha, seed=seed,
                                    min_partition_size=1, self_balancing=False)
    part.dataset = table
    owner = {}
    for i in range(config.num_partitions):
        ids = part.load_partition(i).with_format("numpy")[:]["user_id"]
        owner.update(dict.fromkeys(ids.tolist(), f"p{i:04d}"))
    out = events.copy()
    out["merchant_id"] = out["user_id"].astype(str).map(owner).astype(events["user_id"].dtype)
    return out


def shared_calendar(events: pd.DataFrame, config: SnapshotConfig) -> SnapshotConfig:
    """Fix the calendar (first midnight, end) from the pooled log, unless already set."""
    ts = events["timestamp"]
    start = config.start or str(ts.min().floor("D").date())
    end = config.end or ts.max().isoformat()
    return dataclasses.replace(config, start=start, end=end)


#: Events a chunk of merchants brings to the snapshot builder at most (unless one
#: merchant has more): its working arrays, a few hundred bytes an event, stay under ~1 GB
#: whatever the number of merchants (:mod:`common.snapshots.chunks`).
CHUNK_EVENTS = 2_000_000


def prepare(exp: Experiment, *, progress: Progress = SILENT,
            chunk_events: int = CHUNK_EVENTS) -> PreparedData:
    """Load or generate the data and build the snapshots every method shares.

    The snapshots are built in chunks of whole merchants of about ``chunk_events``
    events (0: the whole log at once); the result is the same either way.
    """
    started = time.perf_counter()
    what = "generating events" if exp.synthetic is not None else "loading events"
    with progress.task(what, total=1, unit="logs") as task:
        events, interventions, truth = load_source(exp)
        task.advance(1, events=len(events))
    snap_cfg = shared_calendar(events, exp.snapshots)
    snaps, report = build_snapshots(events, snap_cfg, interventions, progress=progress,
                                    chunk_events=chunk_events)
    sizes = pd.Series(snaps.merchant_id[snaps.split == 0].astype(str)).value_counts()
    keep = sorted(sizes[sizes >= max(exp.data.min_merchant_snapshots, 1)].index.tolist())
    dropped = sorted(set(events["merchant_id"].astype(str).unique()) - set(keep))
    if dropped:
        log.info("%d merchants with fewer than %d training snapshots left out of the "
                 "federation: %s", len(dropped), exp.data.min_merchant_snapshots,
                 ", ".join(dropped[:10]) + (" ..." if len(dropped) > 10 else ""))
        snaps = snaps.subset(np.isin(snaps.merchant_id.astype(str), keep))
    if len(keep) < 1:
        raise ValueError("no merchant has enough training snapshots "
                         f"(data.min-merchant-snapshots = {exp.data.min_merchant_snapshots})")
    problem = unscorable(snaps, report)  # of the merchants kept
    if problem:  # a model trained on them would be scored on nothing, or learn nothing
        raise DataError(f"the snapshots of {exp.data.events or 'the synthetic log'}: "
                        f"{problem}")
    return PreparedData(
        events=events, interventions=interventions, truth=truth, snapshots=snaps,
        report=report, snapshot_config=snap_cfg, merchants=keep,
        actions=snap_cfg.actions, seconds=time.perf_counter() - started,
    )


def new_run_dir(exp: Experiment, kind: str) -> Path:
    """A fresh ``<output-dir>/<timestamp>-<kind>-<name>`` folder, absolute.

    The folder is checked to lie inside ``experiment.output-dir`` (``experiment.name``
    cannot lead out of it); prefer :func:`run_folder`, which removes the folder again
    if the command fails before writing a result into it.
    """
    check_path_part(kind, "run kind")
    base = exp.experiment.output_path()
    for parent in (base, *base.parents):
        if parent.exists():
            check_key(parent.is_dir(), "experiment.output-dir",
                   f"{base} cannot be created: {parent} is a file, not a folder")
            break
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = base / f"{stamp}-{kind}-{exp.experiment.name}"
    suffix = 1
    while run.exists():
        suffix += 1
        run = base / f"{stamp}-{kind}-{exp.experiment.name}-{suffix}"
    check_key(run.resolve().parent == base.resolve(), "experiment.name",
           f"the run folder {run} would lie outside experiment.output-dir {base}")
    run.mkdir(parents=True)
    return run


#: Files a run folder holds before any result: a folder with only these is not a run
#: (``mlruns``: the MLflow store, opened with the run).
_PREAMBLE = frozenset({"config.json", "config.json.tmp", "mlruns"})


@contextlib.contextmanager
def run_folder(exp: Experiment, kind: str) -> Iterator[Path]:
    """:func:`new_run_dir` that is removed again if the block fails before a result.

    A failed command (a missing events file, an unknown method) must not leave an
    empty ``runs/...`` folder behind; a folder with results in it is kept, partial
    or not, since a report of what did finish is worth keeping.
    """
    base_existed = exp.experiment.output_path().exists()
    run = new_run_dir(exp, kind)
    try:
        yield run
    except BaseException:
        if run.is_dir() and {p.name for p in run.iterdir()} <= _PREAMBLE:
            shutil.rmtree(run, ignore_errors=True)
            log.debug("removed %s: the command failed before writing a result", run)
            if not base_existed:
                with contextlib.suppress(OSError):  # only if nothing else is in it
                    run.parent.rmdir()
        raise


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (NaN as null)."""
    atomic.write_text(path, json.dumps(_jsonable(payload), indent=2, sort_keys=False))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        f = float(value)
        return None if not np.isfinite(f) else f
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value
