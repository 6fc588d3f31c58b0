"""Column converters: text, ids, numbers, times and names, each checked row by row.

Every converter takes the raw column of one chunk and either returns it in its canonical
dtype or raises one :class:`~common.schema.DataError` naming the offending rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from common.io.errors import Origin, column_error
from common.io.results import add_count
from common.schema import DEFAULT_MERCHANT, STRING, DataError
from common.timestamps import (
    MS_THRESHOLD,
    NUMBER,
    ROUNDING_DIGITS,
    SCIENTIFIC,
    iso_to_ns,
    numbers_to_ns,
)

#: pyarrow -> pandas types for ``to_pandas``: text becomes pyarrow-backed strings.
STRING_TYPES = {pa.string(): STRING, pa.large_string(): STRING}


def lower_name(column: Any) -> str:
    """A column name as matched: stripped and lower-cased."""
    return str(column).strip().lower()


def as_arrow(s: pd.Series) -> pa.Array:
    """The column as one pyarrow array of strings (zero-copy for pyarrow-backed text)."""
    if not isinstance(s.dtype, pd.StringDtype):
        s = s.astype(STRING)
    arr = pa.array(s)
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def _text(s: pd.Series) -> pa.Array:
    """Stripped strings; empty cells become null."""
    arr = pc.utf8_trim_whitespace(as_arrow(s))
    return pc.if_else(pc.equal(arr, ""), pa.scalar(None, arr.type), arr)


def _valid(arr: pa.Array) -> np.ndarray:
    return arr.is_valid().to_numpy(zero_copy_only=False)


#: How exports write a missing id: databases (``NULL``, MySQL's ``\N``), pandas and
#: numpy (``nan``, ``<NA>``, ``None``), spreadsheets (``#N/A``, ``N/A``). Read as missing,
#: not as one customer (or merchant) who did everything the missing ones did. ``NA`` is
#: left alone: it is a plausible real id (a region, initials).
NULL_IDS = ("NULL", "null", "Null", "\\N", "nan", "NaN", "NAN", "None", "<NA>", "#N/A",
            "N/A", "n/a")
INTEGRAL_TEXT = r"^(-?[0-9]+)\.0+$"  # "13.0": an integer id exported from a float column


def exact_float_bits(dtype: Any) -> int:
    """Bits of integer a float dtype holds exactly: 53 for float64, 24 for float32 (its
    significand); from 2 to that power on, neighbouring integers read the same."""
    return int(np.finfo(getattr(dtype, "numpy_dtype", dtype)).nmant) + 1


def as_string(s: pd.Series) -> pd.Series:
    """IDs as stripped pyarrow strings (empty and :data:`NULL_IDS` -> missing);
    integral floats lose '.0', and so does every text id such as ``13.0`` (a float
    column written to CSV), value by value, so that a CSV and a Parquet of the same ids,
    any chunk of a file and the monitor's stream all give the same ids."""
    if pd.api.types.is_float_dtype(s.dtype):
        values = s.to_numpy(dtype="float64", na_value=np.nan)
        finite = values[~np.isnan(values)]
        limit = 2.0 ** exact_float_bits(s.dtype)
        if np.all((finite == np.round(finite)) & (np.abs(finite) < limit)):
            s = s.astype("Int64")
    arr = _text(s)
    arr = pc.if_else(pc.is_in(arr, value_set=pa.array(NULL_IDS, arr.type)),
                     pa.scalar(None, arr.type), arr)
    if pc.any(pc.match_substring(arr, ".0")).as_py():  # the regex only where it may match
        arr = pc.replace_substring_regex(arr, INTEGRAL_TEXT, r"\1")
    return pd.Series(STRING.__from_arrow__(arr), index=s.index)


def _numbers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Float values of number-looking strings (NaN elsewhere) and the mask of those."""
    try:
        values = pc.cast(arr, pa.float64())  # fast path: every non-null cell is a number
        return values.to_numpy(zero_copy_only=False), _valid(arr)
    except pa.ArrowInvalid:
        looks = pc.fill_null(pc.match_substring_regex(arr, NUMBER), False)
        values = pc.cast(pc.if_else(looks, arr, pa.scalar(None, arr.type)), pa.float64())
        return values.to_numpy(zero_copy_only=False), looks.to_numpy(zero_copy_only=False)


def _rounded_times(text: pa.Array, values: np.ndarray, is_num: np.ndarray,
                   unit: str | None) -> np.ndarray:
    """Unix times in scientific notation whose last digit is coarser than a second: a
    spreadsheet keeps 6 digits, so 1509530400000 ms is written 1.50953E+12 (2.8 h);
    ``printf``'s ``%e`` keeps 7. None is flagged when a mantissa of the batch holds more
    than :data:`ROUNDING_DIGITS` digits: the writer is one of the shortest exact form
    (Java, Spark, numpy), which drops trailing zeros (1509530400 is ``1.5095304E9``), so
    every one of its numbers is exact, short or long (``common.timestamps.
    rounded_scientific`` is the rule for one value, the monitor's)."""
    if not is_num.any():  # ISO-8601 text: nothing to scan
        return np.zeros(len(text), dtype=bool)
    scientific = pc.fill_null(pc.match_substring_regex(text, SCIENTIFIC), False)
    if not pc.any(scientific).as_py():
        return np.zeros(len(text), dtype=bool)
    parts = pc.extract_regex(pc.if_else(scientific, text, pa.scalar("0e0", text.type)),
                             SCIENTIFIC)
    digits = pc.utf8_length(pc.fill_null(parts.field("digits"), "")).to_numpy(
        zero_copy_only=False)
    exponent = pc.cast(parts.field("exponent"), pa.int64()).to_numpy(zero_copy_only=False)
    exponent = np.where(pc.equal(parts.field("sign"), "-").to_numpy(zero_copy_only=False),
                        -exponent, exponent)
    millis = np.abs(values) > MS_THRESHOLD if unit is None else np.full(len(text), unit == "ms")
    scientific_rows = scientific.to_numpy(zero_copy_only=False)
    if (scientific_rows & (digits + 1 > ROUNDING_DIGITS)).any():
        return np.zeros(len(text), dtype=bool)
    step = exponent - digits - np.where(millis, 3, 0)  # the last digit's place, in seconds
    return scientific_rows & (step > 0)


def parse_timestamps(raw: pd.Series, source: str, column: str, offset: int,
                     unit: str | None = None, used: np.ndarray | None = None) -> pd.Series:
    """Parse to ``datetime64[ns, UTC]``: datetimes, ISO-8601 strings or unix numbers.

    Numbers are seconds, or milliseconds above 1e11, unless ``unit`` ("s" or "ms")
    fixes it. Naive times are taken as UTC. Only the rows ``used`` marks (all by
    default) must hold a time: the others may hold anything, and come back as NaT.
    """
    used = np.ones(len(raw), dtype=bool) if used is None else used
    if isinstance(raw.dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_dtype(raw):
        parsed = raw.dt.tz_localize("UTC") if raw.dt.tz is None else raw.dt.tz_convert("UTC")
        out = _within_ns_range(parsed, raw, source, column, offset, used)
        parsed = parsed.mask(out).astype("datetime64[ns, UTC]")
        bad = parsed.isna().to_numpy() & used
        if bad.any():
            raise column_error(source, column, bad, raw, "missing timestamp(s)", "a time", offset)
        return parsed

    if pd.api.types.is_numeric_dtype(raw.dtype) and not pd.api.types.is_bool_dtype(raw):
        text = None
        values = raw.to_numpy(dtype="float64", na_value=np.nan)
        is_num = ~np.isnan(values)
    else:
        text = _text(raw)
        values, is_num = _numbers(text)
        rounded = _rounded_times(text, values, is_num, unit) & used
        if rounded.any():
            raise column_error(source, column, rounded, raw, "unix time(s) written in "
                               "scientific notation, rounded coarser than a second (a "
                               "spreadsheet keeps 6 digits: 1509530400000 becomes 1.50953E+12)",
                               "unix times written in full (a whole-number column format "
                               "before exporting) or ISO-8601 text", offset)
    ns = np.full(len(raw), np.iinfo(np.int64).min, dtype=np.int64)  # NaT
    if is_num.any():
        exact, ok = numbers_to_ns(values, is_num, unit)
        ns = np.where(ok, exact, ns)
    if text is not None and not is_num.all():
        ns[~is_num] = iso_to_ns(pd.Series(STRING.__from_arrow__(text.filter(pa.array(~is_num)))))
    parsed = pd.Series(pd.to_datetime(ns, unit="ns", utc=True), index=raw.index)
    bad = parsed.isna().to_numpy() & used
    if bad.any():
        expected = (f"unix {'seconds' if unit == 's' else 'milliseconds'}" if unit
                    else "ISO-8601 strings, unix seconds or unix milliseconds")
        raise column_error(source, column, bad, raw, "unparsable timestamp(s)", expected, offset)
    return parsed


def _within_ns_range(times: pd.Series, raw: pd.Series, source: str, column: str,
                     offset: int, used: np.ndarray) -> np.ndarray:
    """Raise for ``used`` datetimes (of a coarser unit than ns, as Parquet's) that
    nanoseconds cannot hold: before 1677-09-21 or after 2262-04-11, such as a sentinel
    9999-12-31; the mask of such times among the others is returned. The message quotes
    ``raw``, the column as the file holds it (not ``times`` in UTC)."""
    per_unit = {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}[times.dt.unit]
    values = times.array.asi8  # in the column's own unit; NaT is the int64 minimum
    bound = np.iinfo(np.int64).max // per_unit
    out = (values != np.iinfo(np.int64).min) & (np.abs(values) > bound)
    bad = out & used
    if bad.any():
        raise column_error(source, column, bad, raw.astype(str), "time(s) outside "
                           f"{pd.Timestamp.min:%Y-%m-%d} to {pd.Timestamp.max:%Y-%m-%d} (a "
                           "sentinel such as 9999-12-31?)", "a real time: fix or remove these "
                           "rows", offset)
    return out


def map_names(raw: pd.Series, mapping: Mapping[str, str], dtype: pd.CategoricalDtype,
              source: str, column: str, offset: int, what: str) -> pd.Series:
    """Map names (case-insensitive, stripped) through ``mapping`` onto a categorical."""
    keys = list(mapping)
    found = pc.index_in(pc.utf8_lower(_text(raw)), value_set=pa.array(keys))
    codes = pc.fill_null(found, -1).to_numpy(zero_copy_only=False)
    bad = codes < 0
    if bad.any():
        raise column_error(source, column, bad, raw, f"unknown or missing {what} name(s)",
                           "one of " + ", ".join(keys), offset)
    categories = list(dtype.categories)
    lookup = np.array([categories.index(mapping[k]) for k in keys], dtype=np.int8)
    return pd.Series(pd.Categorical.from_codes(lookup[codes], dtype=dtype), index=raw.index)


def parse_numbers(raw: pd.Series, source: str, column: str, offset: int) -> pd.Series:
    """Float64; missing stays NaN, text or infinities raise."""
    if pd.api.types.is_numeric_dtype(raw.dtype) and not pd.api.types.is_bool_dtype(raw):
        values = raw.to_numpy(dtype="float64", na_value=np.nan)
        present = ~np.isnan(values)
    else:
        text = _text(raw)
        values, _ = _numbers(text)
        present = _valid(text)
    bad = present & ~np.isfinite(values)
    if bad.any():
        raise column_error(source, column, bad, raw, "non-numeric value(s)", "a finite number",
                           offset)
    return pd.Series(values, index=raw.index)


def no_repeats(source: Any, columns: Any, where: str) -> None:
    """Raise when a column name (stripped, lower-cased) appears more than once."""
    seen: dict[str, list[int]] = {}
    for number, column in enumerate(columns, start=1):
        seen.setdefault(str(column).strip().lower(), []).append(number)
    for name, numbers in seen.items():
        if len(numbers) > 1:
            times = "twice" if len(numbers) == 2 else f"{len(numbers)} times"
            listed = ", ".join(map(str, numbers[:-1])) + f" and {numbers[-1]}"
            raise DataError(f"{source}: column '{name}' appears {times} in the {where} "
                            f"(columns {listed}); expected each column name once. Rename "
                            "or remove the repeated column")


def require_columns(source: str, columns: Any, needed: tuple[str, ...], what: str) -> None:
    """Raise :class:`DataError` naming ``source``, the missing ones and the columns found
    when any of ``needed`` is not in ``columns``; ``what`` says what they are needed for."""
    missing = [c for c in needed if c not in set(columns)]
    if missing:
        separator = other_separator(list(columns))
        raise DataError(
            f"{source}: missing required column(s) {', '.join(map(repr, missing))} for "
            f"{what} (found: {', '.join(map(str, columns)) or 'no columns'})"
            + (f"; the fields look separated by {separator}, not commas: write the file "
               "with ',' as the separator (or as Parquet)" if separator else "")
        )


#: Separators other exports use, as an error names them.
OTHER_SEPARATORS = {";": "semicolons (';')", "\t": "tabs", "|": "pipes ('|')"}


def other_separator(header: list[Any]) -> str | None:
    """The name of the separator a one-cell CSV header seems to use instead of commas."""
    if len(header) != 1:
        return None
    return next((name for sep, name in OTHER_SEPARATORS.items() if sep in str(header[0])),
                None)


def id_column(df: pd.DataFrame, name: str, default: str, filled: dict[str, int]
              ) -> pd.Series:
    """Column ``name`` of ``df`` as IDs (:func:`as_string`), missing values set to ``default``.

    Parameters
    ----------
    df
        The frame read from the input.
    name
        The ID column; when ``df`` lacks it, every row gets ``default``.
    default
        The ID given to rows without one.
    filled
        Counts per column of the missing values filled in; ``name``'s count grows by
        this column's (a column that is absent counts nothing).

    Returns
    -------
    pd.Series
        Pyarrow strings on ``df``'s index.
    """
    if name not in df:
        return pd.Series(default, index=df.index, dtype=STRING)
    s = as_string(df[name])
    missing = s.isna()
    if missing.any():
        add_count(filled, name, missing.sum())
        s = s.fillna(default)
    return s


@dataclass
class MerchantRows:
    """The used rows of one file with and without a merchant id, across its chunks.

    :func:`merchant_column` refuses a chunk mixing the two; this refuses a file whose
    chunks differ (a chunk naming no merchant beside chunks that do), naming its first
    row without one. Rows the caller drops (outside the load's window) are not counted.
    """

    column: str = "merchant_id"  # the file's name for it, as errors say it
    named: int = 0
    unnamed: int = 0
    first_unnamed: int | None = None  # 0-based data row of the file

    def add(self, named: int, unnamed: np.ndarray, offset: int) -> None:
        """Count one chunk's rows: ``named`` rows with a merchant, ``unnamed`` the
        positions (in the chunk) of the rows without one."""
        self.named += named
        self.unnamed += len(unnamed)
        if self.first_unnamed is None and len(unnamed):
            self.first_unnamed = offset + int(unnamed[0])

    def check(self, source: str, merchants: pd.Series) -> None:
        """Raise when some used rows name a merchant and others none; ``merchants`` is
        the loaded ``merchant_id`` column (to count the merchants named)."""
        if not (self.named and self.unnamed and self.first_unnamed is not None):
            return
        row = self.first_unnamed
        line = (f", file line {source.lines([row])[0]}" if isinstance(source, Origin)
                else "")
        named = merchants[merchants != DEFAULT_MERCHANT].nunique()
        n = self.unnamed
        raise DataError(
            f"{source}: {n:,} row{'s have' if n > 1 else ' has'} no {self.column} (the first "
            f"at data row {row + 1:,}{line}) while the others name {named:,} merchant(s); "
            "a row without a merchant belongs to no merchant of the federation: fill the "
            "column on every row (or leave it out for a log of one merchant)")


def merchant_column(df: pd.DataFrame, source: str, offset: int, filled: dict[str, int],
                    used: np.ndarray | None = None, rows: MerchantRows | None = None,
                    column: str = "merchant_id") -> pd.Series:
    """``merchant_id`` as :func:`id_column` gives it, ``DEFAULT_MERCHANT`` for a log of one
    merchant (no such column, or no value in it); an error when some rows name a merchant
    and others none: such a row belongs to no merchant of the federation, and as merchant
    ``local`` it would make one merchant more.

    Only the rows ``used`` marks (all by default) are checked, counted as filled and
    counted into ``rows`` (which checks the file across its chunks): the caller drops
    the others (outside the load's window), so they make no merchant. ``column`` is the
    file's name for the column, as errors say it.
    """
    used = np.ones(len(df), dtype=bool) if used is None else used
    if "merchant_id" not in df:
        if rows is not None:
            rows.add(0, np.flatnonzero(used), offset)
        return pd.Series(DEFAULT_MERCHANT, index=df.index, dtype=STRING)
    s = as_string(df["merchant_id"])
    missing = s.isna().to_numpy()
    unnamed = missing & used
    named = int((~missing & used).sum())
    if unnamed.any() and named:
        raise column_error(source, column, unnamed, df["merchant_id"],
                           "missing merchant id(s) where other rows name one",
                           "a merchant id on every row (or no merchant_id column for a log "
                           "of one merchant)", offset)
    add_count(filled, "merchant_id", unnamed.sum())
    if rows is not None:
        rows.add(named, np.flatnonzero(unnamed), offset)
    return s.fillna(DEFAULT_MERCHANT)
