"""A synthetic federation on disk: one Parquet file per frame."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from common import atomic
from common.schema import EVENT_DTYPE, STRING, action_dtype
from simulations.synth.federation import Federation

log = logging.getLogger(__name__)

_FILES = ("events", "interventions", "truth", "users", "merchants")


def federation_files(out_dir: str | Path) -> dict[str, Path]:
    """The absolute path of each frame's ``<name>.parquet`` in ``out_dir``, by name."""
    out = Path(out_dir).resolve()
    return {name: out / f"{name}.parquet" for name in _FILES}


def write_federation(fed: Federation, out_dir: str | Path) -> dict[str, Path]:
    """Write the five frames as ``<name>.parquet`` files into ``out_dir``.

    The folder is created if missing and existing files are replaced, each all at once
    (a stop while writing leaves the previous file or none). Returns
    :func:`federation_files`.
    """
    paths = federation_files(out_dir)
    next(iter(paths.values())).parent.mkdir(parents=True, exist_ok=True)
    for name, path in paths.items():
        with atomic.replacing(path) as tmp:
            getattr(fed, name).to_parquet(tmp, index=False)
    log.info("wrote synthetic federation to %s", next(iter(paths.values())).parent)
    return paths


def read_federation(out_dir: str | Path) -> Federation:
    """Read what :func:`write_federation` wrote, with the canonical dtypes restored.

    Raises ``ValueError`` naming the folder and the file when a frame is missing.
    """
    out = Path(out_dir)
    frames = {}
    for name in _FILES:
        path = out / f"{name}.parquet"
        if not path.is_file():
            raise ValueError(f"synthetic federation in {out}: missing {path.name}")
        frames[name] = pd.read_parquet(path)
    actions = tuple(c[2:] for c in frames["truth"].columns if c.startswith("p_"))
    strings = {"user_id", "item_id", "category_id", "merchant_id", "top_category"}
    for frame in frames.values():
        for col in frame.columns:
            if col in strings:
                frame[col] = frame[col].astype(STRING)
            elif col == "timestamp":
                frame[col] = frame[col].astype("datetime64[ns, UTC]")
    frames["events"]["event"] = frames["events"]["event"].astype(str).astype(EVENT_DTYPE)
    frames["interventions"]["action"] = (
        frames["interventions"]["action"].astype(str).astype(action_dtype(actions)))
    return Federation(**frames)
