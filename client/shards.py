"""A merchant's snapshots: where its file is, and a per-process cache of them.

A Ray actor serves many merchants, and Flower hands it the ClientApp anew with every
message: the snapshots are kept in a process-wide :class:`ShardCache` bounded in bytes
(:func:`process_shard_cache`). A simulation's shards also get their snapshots written
beside them (:func:`snapshot_file`), so the other processes load them instead of
building them again.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from client.config import ClientConfig
from common import atomic
from common.config import SnapshotConfig
from common.features import AGGREGATE_FEATURES
from common.schema import DataError
from common.snapshots import Snapshots, build_snapshots

log = logging.getLogger(__name__)

#: Where the size of a process's shard cache comes from, in MiB.
SHARD_CACHE_ENV = "FEDECAY_SHARD_CACHE_MB"


def shard_location(node_config: Mapping[str, Any], client: ClientConfig
                   ) -> tuple[str, str, str | None]:
    """(events path, format, interventions path) of this node's merchant.

    ``data-path`` (and optional ``format``, ``interventions-path``) in deployment,
    ``partition-id`` in simulation, where the shard is
    ``<client.shard-dir>/<partition-id>.parquet``.
    """
    if "data-path" in node_config:
        path = str(node_config["data-path"])
        fmt = str(node_config.get("format", "auto"))
        inter = node_config.get("interventions-path")
        return path, fmt, str(inter) if inter else None
    if "partition-id" in node_config:
        if not client.shard_dir:
            raise DataError("simulation node without 'client.shard-dir' in the run config")
        base = Path(client.shard_dir) / f"{int(node_config['partition-id']):05d}"
        inter = base.with_name(base.name + "-interventions.parquet")
        return str(base.with_suffix(".parquet")), "canonical", \
            str(inter) if inter.exists() else None
    raise DataError("node config has neither 'data-path' (deployment) nor 'partition-id' "
                    "(simulation)")


def shard_cache_bytes(environ: Mapping[str, str] = os.environ) -> int:
    """Bytes of snapshots a process keeps: ``FEDECAY_SHARD_CACHE_MB`` (default 2048).

    A Ray actor serves many merchants: a count-bounded cache smaller than the merchants
    per actor rebuilt every shard every round; a byte bound keeps as many as fit.
    """
    raw = environ.get(SHARD_CACHE_ENV, "2048")
    try:
        mib = int(raw)
    except ValueError:
        mib = -1
    if mib < 0:
        raise ValueError(f"{SHARD_CACHE_ENV} must be a whole number of MiB >= 0, got {raw!r}")
    return mib * 2**20


class ShardCache:
    """Merchants' snapshots kept in memory up to ``max_bytes`` (least recently used
    shards leave first; the newest is always kept). Safe to share between threads."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0  # bytes of the snapshots held
        self._shards: OrderedDict[tuple[Any, ...], Snapshots] = OrderedDict()
        self._lock = threading.Lock()

    def keys(self) -> list[tuple[Any, ...]]:
        """(path, format, interventions, config) of the shards held, oldest use first."""
        with self._lock:
            return list(self._shards)

    def load(self, path: str, fmt: str, interventions: str | None,
             config: SnapshotConfig, *, disk_cache: bool = False) -> Snapshots:
        """Validate the merchant's file and build its snapshots, or return them from the
        cache.

        With ``disk_cache`` (the simulation's shards) the snapshots are also written
        beside the shard, so the other processes load them instead of building them again.
        """
        key = (path, fmt, interventions, config)
        with self._lock:
            if key in self._shards:
                self._shards.move_to_end(key)
                return self._shards[key]
        cached = snapshot_file(path, interventions, config) if disk_cache else None
        snaps = load_saved(cached) if cached is not None else None
        if snaps is None:
            snaps = _build_shard(path, fmt, interventions, config)
            if cached is not None:
                _save_beside(snaps, cached)
        with self._lock:
            if key not in self._shards:  # another thread may have built it meanwhile
                self._shards[key] = snaps
                self.nbytes += _nbytes(snaps)
            while len(self._shards) > 1 and self.nbytes > self.max_bytes:
                _, dropped = self._shards.popitem(last=False)
                self.nbytes -= _nbytes(dropped)
        return snaps


@functools.cache
def process_shard_cache(max_bytes: int) -> ShardCache:
    """This process's shard cache of that size, made on first use.

    Flower hands a Ray actor the ClientApp anew with every message, so a cache inside
    the app would start empty each time; the process outlives the messages.
    """
    return ShardCache(max_bytes)


def snapshot_file(path: str, interventions: str | None, config: SnapshotConfig) -> Path:
    """Where a shard's snapshots are kept: named by the settings and the files' sizes
    and times, so a changed shard or setting never reads stale snapshots.

    A simulation's merchant is served by whichever Ray actor is free; without the file
    each actor builds every merchant's snapshots itself, at many times the cost of
    loading them.
    """
    stamp = [repr(config), ",".join(AGGREGATE_FEATURES)]  # new features: new file
    for name in (path, interventions):
        if name:
            st = os.stat(name)
            stamp.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    digest = hashlib.sha256("|".join(stamp).encode()).hexdigest()[:16]
    shard = Path(path)
    return shard.with_name(f"{shard.stem}.snapshots-{digest}.npz")


def load_saved(path: Path) -> Snapshots | None:
    """The snapshots saved at ``path``; None when there are none or they are unreadable
    (they are then built again)."""
    if not path.exists():
        return None
    try:
        return Snapshots.load(path)
    except Exception as err:  # noqa: BLE001 - any unreadable file is rebuilt
        log.warning("%s unreadable (%s): building the snapshots again", path.name, err)
        return None


def _save_beside(snaps: Snapshots, path: Path) -> None:
    """Write atomically (a process-private temp file, then rename); a failure only costs
    the other processes a rebuild."""
    try:
        with atomic.replacing(path, durable=False) as tmp:
            snaps.save(tmp)
    except OSError as err:
        log.warning("cannot keep %s (%s): other processes build it too", path.name, err)


def _nbytes(snaps: Snapshots) -> int:
    return sum(getattr(snaps, f.name).nbytes for f in dataclasses.fields(snaps)
               if isinstance(getattr(snaps, f.name), np.ndarray))


def _build_shard(path: str, fmt: str, interventions: str | None,
                 config: SnapshotConfig) -> Snapshots:
    from common.io import load_events

    loaded = load_events(path, fmt, interventions_path=interventions)
    snaps, report = build_snapshots(loaded.events, config, loaded.interventions)
    for line in report.summary_lines():
        log.info("%s: %s", Path(path).name, line.strip())
    return snaps
