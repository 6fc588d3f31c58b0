"""Headed tables by column name, whether the file is CSV or Parquet."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from common.io.columns import lower_name
from common.io.csv_reader import ReadRules, csv_batches, csv_header
from common.io.files import is_parquet
from common.io.parquet_reader import parquet_batches, parquet_columns


def column_names(path: Path) -> list[str]:
    """All column names of a headed CSV or Parquet file, stripped and lower-cased."""
    names = parquet_columns(path) if is_parquet(path) else csv_header(path)
    return [str(c).strip().lower() for c in names]


def read_table(path: Path, rules: ReadRules, wanted: tuple[str, ...]
               ) -> Iterator[tuple[int, pd.DataFrame]]:
    """Chunks of a headed CSV or Parquet file, columns lower-cased, only ``wanted`` kept."""
    if is_parquet(path):
        yield from parquet_batches(path, rules.chunksize, wanted)
        return
    usecols = [c for c in csv_header(path) if lower_name(c) in wanted]
    for offset, chunk in csv_batches(path, rules, usecols=usecols):
        yield offset, chunk.rename(columns=lower_name)
