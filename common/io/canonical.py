"""The canonical format (see ``common.schema``): read it from, and write it to, CSV or Parquet."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from common.io.columns import require_columns
from common.io.csv_reader import ReadRules
from common.io.files import CSV_SUFFIXES, PARQUET_SUFFIXES, compression
from common.io.tables import column_names, read_table
from common.io.validation import validate_events
from common.schema import EVENT_COLUMNS, REQUIRED_EVENT_COLUMNS

logger = logging.getLogger(__name__)


def iter_canonical(path: Path, rules: ReadRules) -> Iterator[tuple[int, pd.DataFrame]]:
    """Chunks of a canonical CSV or Parquet log; the required columns are checked first."""
    if not path.name.lower().endswith(CSV_SUFFIXES + PARQUET_SUFFIXES) \
            and not compression(path):
        logger.warning("%s: unknown suffix, reading it as CSV", path)
    require_columns(str(path), column_names(path), REQUIRED_EVENT_COLUMNS, "format canonical")
    yield from read_table(path, rules, EVENT_COLUMNS)


def write_events(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a canonical event frame as Parquet (.parquet/.pq) or CSV (.csv/.csv.gz).

    The frame is validated first, so what is written reads back unchanged. Parent
    folders are created.

    Returns
    -------
    Path
        The resolved path written.

    Raises
    ------
    ValueError
        A file name that is none of the suffixes above.
    DataError
        A frame that breaks the canonical contract (see :func:`validate_events`).
    """
    path = Path(path).resolve()
    name = path.name.lower()
    if not name.endswith(PARQUET_SUFFIXES + CSV_SUFFIXES):
        raise ValueError(f"{path}: expected a .parquet, .pq, .csv or .csv.gz file name")
    frame = validate_events(df, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith(PARQUET_SUFFIXES):
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    logger.info("wrote %s events to %s", f"{len(frame):,}", path)
    return path
