"""Read a Parquet file in batches, refusing columns that hold more than one value per row."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from common.io.columns import STRING_TYPES, lower_name, no_repeats
from common.io.files import READ_ERRORS, misnamed
from common.schema import DataError


def _unreadable(path: Path, exc: Exception) -> DataError:
    """A file named .parquet that is CSV text or compressed data says so; a damaged one
    says pyarrow's reason."""
    wrong = misnamed(path, "a Parquet file")
    return wrong or DataError(f"{path}: not a readable Parquet file ({exc})")


def parquet_columns(path: Path) -> list[str]:
    """The column names of a Parquet file as written (read from its schema)."""
    try:
        names = pq.read_schema(path).names
    except Exception as exc:  # pyarrow raises several unrelated types here
        raise _unreadable(path, exc) from exc
    no_repeats(path, names, "Parquet schema")
    return names


def parquet_batches(path: Path, chunksize: int, wanted: tuple[str, ...]
                    ) -> Iterator[tuple[int, pd.DataFrame]]:
    """Yield ``(rows before this batch, batch)``, columns lower-cased, only ``wanted`` kept."""
    try:
        pfile = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several unrelated types here
        raise _unreadable(path, exc) from exc
    no_repeats(path, pfile.schema_arrow.names, "Parquet schema")
    columns = [c for c in pfile.schema_arrow.names if lower_name(c) in wanted]
    _check_parquet_types(path, pfile.schema_arrow, columns)
    offset = 0
    batches = pfile.iter_batches(batch_size=chunksize, columns=columns)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            break
        except (pa.ArrowException, *READ_ERRORS) as exc:
            raise DataError(f"{path}: not a readable Parquet file after row {offset} "
                            f"({exc})") from exc
        yield offset, batch.to_pandas(types_mapper=STRING_TYPES.get).rename(columns=lower_name)
        offset += batch.num_rows
    if offset == 0:
        yield 0, pfile.schema_arrow.empty_table().select(columns).to_pandas().rename(
            columns=lower_name)


def _plain_type(t: pa.DataType) -> bool:
    """One text, number or time per row: what a canonical column can hold."""
    if pa.types.is_dictionary(t):
        return _plain_type(t.value_type)
    return (pa.types.is_string(t) or pa.types.is_large_string(t)
            or pa.types.is_integer(t) or pa.types.is_floating(t)
            or pa.types.is_timestamp(t) or pa.types.is_date(t)
            or pa.types.is_boolean(t) or pa.types.is_null(t)
            or getattr(pa.types, "is_string_view", lambda _: False)(t))


def _check_parquet_types(path: Path, schema: pa.Schema, columns: list[str]) -> None:
    for name in columns:
        t = schema.field(name).type
        if _plain_type(t):
            continue
        kind = ("binary" if pa.types.is_binary(t) or pa.types.is_large_binary(t)
                or pa.types.is_fixed_size_binary(t) else
                "nested (list/struct/map)" if pa.types.is_nested(t) else "unsupported")
        raise DataError(
            f"{path}: column '{name}' is a {kind} column (Parquet type {t}) at rows 1, 2, "
            "3, ... (every row); expected one plain value per row: text, a number or a "
            "time. Flatten or decode the column before loading")
