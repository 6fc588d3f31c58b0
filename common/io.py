"""Read behaviour logs in their public formats and turn them into the canonical frames.

Every reader ends in the same place: a canonical event frame (see ``common.schema``)
sorted by ``(user_id, timestamp)`` with a ``RangeIndex``, an interventions frame and a
:class:`LoadReport` that accounts for every row read. Bad input raises one
:class:`~common.schema.DataError` naming the file, the column, the first offending data
rows (1-based, header excluded) with their values, and what was expected. Rows dropped
on purpose (exact duplicates, rows outside the requested window, Complete Journey
returns) are counted in the report, never lost silently.

CSV files are read in chunks of ``chunksize`` rows; each chunk is converted to compact
dtypes (pyarrow strings, categorical events, ``datetime64[ns, UTC]``) before the chunks
are concatenated, so the raw text of a large file is never held whole.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import io
import logging
import lzma
import os
import stat
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from common.schema import (
    DEFAULT_ACTIONS,
    DEFAULT_CATEGORY,
    DEFAULT_MERCHANT,
    EVENT_COLUMNS,
    EVENT_DTYPE,
    EVENT_TYPES,
    INTERVENTION_COLUMNS,
    REQUIRED_EVENT_COLUMNS,
    STRING,
    DataError,
    action_dtype,
    empty_events,
    empty_interventions,
)
from common.timestamps import (
    EARLIEST_TIME,
    FUTURE_SLACK,
    NUMBER,
    iso_to_ns,
    numbers_to_ns,
)

logger = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("canonical", "taobao", "retailrocket", "completejourney")

TAOBAO_COLUMNS = ("user_id", "item_id", "category_id", "behavior_type", "timestamp")
TAOBAO_EVENTS: Mapping[str, str] = {
    "pv": "view", "cart": "cart", "fav": "favorite", "buy": "purchase",
}
#: RetailRocket ``events.csv`` columns read (``transactionid`` is not needed).
RETAILROCKET_COLUMNS = ("timestamp", "visitorid", "event", "itemid")
RETAILROCKET_EVENTS: Mapping[str, str] = {
    "view": "view", "addtocart": "cart", "transaction": "purchase",
}
CANONICAL_EVENTS: Mapping[str, str] = {name: name for name in EVENT_TYPES}
CJ_TRANSACTION_FILES = ("transactions.csv", "transactions_sample.csv")
CJ_COLUMNS = ("household_id", "store_id", "product_id", "sales_value", "transaction_timestamp")

DUPLICATE = "exact duplicate"
OUTSIDE_WINDOW = "outside window"
CJ_RETURN = "return (negative sales_value)"
NO_HOME_STORE = "household without kept transactions"

#: How ``load_events`` treats CSV rows with the wrong number of fields (a cut last line,
#: a stray separator, an unterminated quote): raise, or drop them and count them.
BAD_ROWS: tuple[str, ...] = ("error", "skip")
MALFORMED = "malformed CSV row (wrong number of fields or an unterminated quote)"
#: Largest accepted ``value``: no single event is worth 1e12 in any currency, and far
#: below it sums and log1p features stay finite in float32/float64.
MAX_VALUE = 1e12

_PARQUET_SUFFIXES = (".parquet", ".pq")
_CSV_SUFFIXES = (".csv", ".csv.gz")
#: Compressed CSV suffixes read (pyarrow decodes gzip and bz2 itself; xz, zip in Python).
_COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zip": "zip"}
_PROBE_BYTES = 1 << 16  # bytes of (decompressed) text checked for the encoding up front
_MAX_SKIPPED_TEXTS = 10_000  # distinct skipped rows remembered to number later lines
_SHOW = 5  # offending rows quoted in an error message
_BLOCK_BYTES = 16 << 20  # CSV bytes parsed at a time (chunks are cut from these blocks)
_STRING_TYPES = {pa.string(): STRING, pa.large_string(): STRING}


# --------------------------------------------------------------------------- results


@dataclass
class LoadReport:
    """What a load read, kept, dropped (reason -> rows) and filled (column -> rows)."""

    path: str
    format: str
    rows_read: int = 0
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    filled: dict[str, int] = field(default_factory=dict)
    interventions_read: int = 0
    interventions_kept: int = 0
    interventions_dropped: dict[str, int] = field(default_factory=dict)

    def summary_lines(self) -> list[str]:
        """Human-readable lines, one fact each."""
        lines = [f"{self.path} ({self.format}): {self.rows_read:,} rows read, "
                 f"{self.rows_kept:,} kept"]
        lines += [f"  dropped {n:,} rows: {why}" for why, n in self.dropped.items() if n]
        lines += [f"  filled {n:,} missing {col}" for col, n in self.filled.items() if n]
        if self.interventions_read:
            lines.append(f"  interventions: {self.interventions_read:,} read, "
                         f"{self.interventions_kept:,} kept")
            lines += [f"    dropped {n:,} interventions: {why}"
                      for why, n in self.interventions_dropped.items() if n]
        return lines


@dataclass(eq=False)
class EventLog:
    """A loaded log: canonical events, interventions (may be empty) and the report."""

    events: pd.DataFrame
    interventions: pd.DataFrame
    report: LoadReport


def _add(counts: dict[str, int], key: str, n: int) -> None:
    if n:
        counts[key] = counts.get(key, 0) + int(n)


# --------------------------------------------------------------------- error messages


class _Origin(str):
    """A CSV file's name as shown in messages, plus how its data rows map to file lines.

    It is the plain path string everywhere a source name is expected; error messages
    use :meth:`lines` to add the physical 1-based line numbers (header and blank lines
    counted, rows dropped by ``bad_rows='skip'`` stepped over).
    """

    path: Path
    header: int
    encoding: str
    skipped: set[str]

    def __new__(cls, path: Path, header: int, encoding: str) -> _Origin:
        self = super().__new__(cls, str(path))
        self.path, self.header, self.encoding, self.skipped = path, header, encoding, set()
        return self

    def lines(self, rows: list[int]) -> list[int]:
        """File lines of 0-based data rows (a rescan: only called on the error path)."""
        wanted, found = set(rows), {}
        record, header = -1, self.header
        try:
            for number, line in enumerate(_text_lines(self.path, self.encoding), 1):
                if not line:
                    continue  # the CSV parser skips blank lines
                if header:
                    header -= 1
                    continue
                if line in self.skipped:
                    continue
                record += 1
                if record in wanted:
                    found[record] = number
                    if len(found) == len(wanted):
                        break
        except (OSError, EOFError, zlib.error, lzma.LZMAError, zipfile.BadZipFile,
                DataError):
            pass  # the reader reports an unreadable file itself
        return [found.get(r, r + 1 + self.header) for r in rows]

    def line_of(self, text: str) -> int | None:
        """The first data line whose content is ``text`` (a row the parser rejected)."""
        header = self.header
        try:
            for number, line in enumerate(_text_lines(self.path, self.encoding), 1):
                if not line:
                    continue
                if header:
                    header -= 1
                    continue
                if line == text or line.rstrip("\r") == text.rstrip("\r"):
                    return number
        except (OSError, EOFError, zlib.error, lzma.LZMAError, zipfile.BadZipFile,
                DataError):
            pass
        return None


def _fail(source: str, column: str, bad: np.ndarray, raw: pd.Series, problem: str,
          expected: str, offset: int) -> DataError:
    """One message naming file, column, the first offending rows, their values and lines.

    Rows are data rows (1-based, header excluded); for a CSV file the physical lines of
    the file (1-based, header counted) follow.
    """
    rows = np.flatnonzero(bad)
    shown = ", ".join(
        f"{offset + r + 1} ({_quote(raw.iloc[r])})" for r in rows[:_SHOW]
    )
    more = f" and {len(rows) - _SHOW} more" if len(rows) > _SHOW else ""
    where = "data rows" if len(rows) > 1 else "data row"
    lines = ""
    if isinstance(source, _Origin):
        numbers = source.lines([offset + int(r) for r in rows[:_SHOW]])
        lines = (f" (file line{'s' if len(numbers) > 1 else ''} "
                 f"{', '.join(map(str, numbers))})")
    return DataError(f"{source}: column '{column}' has {problem} at {where} "
                     f"{shown}{more}{lines}; expected {expected}")


def _quote(value: Any) -> str:
    return "missing" if pd.isna(value) else repr(str(value))


# ------------------------------------------------------------------ column converters


def _arrow(s: pd.Series) -> pa.Array:
    """The column as one pyarrow array of strings (zero-copy for pyarrow-backed text)."""
    if not isinstance(s.dtype, pd.StringDtype):
        s = s.astype(STRING)
    arr = pa.array(s)
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def _text(s: pd.Series) -> pa.Array:
    """Stripped strings; empty cells become null."""
    arr = pc.utf8_trim_whitespace(_arrow(s))
    return pc.if_else(pc.equal(arr, ""), pa.scalar(None, arr.type), arr)


def _valid(arr: pa.Array) -> np.ndarray:
    return arr.is_valid().to_numpy(zero_copy_only=False)


def _as_string(s: pd.Series) -> pd.Series:
    """IDs as stripped pyarrow strings (empty -> missing); integral floats lose '.0'."""
    if pd.api.types.is_float_dtype(s.dtype):
        values = s.to_numpy(dtype="float64", na_value=np.nan)
        finite = values[~np.isnan(values)]
        if np.all((finite == np.round(finite)) & (np.abs(finite) < 2.0**53)):
            s = s.astype("Int64")
    return pd.Series(STRING.__from_arrow__(_text(s)), index=s.index)


def _numbers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Float values of number-looking strings (NaN elsewhere) and the mask of those."""
    try:
        values = pc.cast(arr, pa.float64())  # fast path: every non-null cell is a number
        return values.to_numpy(zero_copy_only=False), _valid(arr)
    except pa.ArrowInvalid:
        looks = pc.fill_null(pc.match_substring_regex(arr, NUMBER), False)
        values = pc.cast(pc.if_else(looks, arr, pa.scalar(None, arr.type)), pa.float64())
        return values.to_numpy(zero_copy_only=False), looks.to_numpy(zero_copy_only=False)


def _parse_timestamps(raw: pd.Series, source: str, column: str, offset: int,
                      unit: str | None = None) -> pd.Series:
    """Parse to ``datetime64[ns, UTC]``: datetimes, ISO-8601 strings or unix numbers.

    Numbers are seconds, or milliseconds above 1e11, unless ``unit`` ("s" or "ms")
    fixes it. Naive times are taken as UTC.
    """
    if isinstance(raw.dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_dtype(raw):
        parsed = raw.dt.tz_localize("UTC") if raw.dt.tz is None else raw.dt.tz_convert("UTC")
        parsed = parsed.astype("datetime64[ns, UTC]")
        bad = parsed.isna().to_numpy()
        if bad.any():
            raise _fail(source, column, bad, raw, "missing timestamp(s)", "a time", offset)
        return parsed

    if pd.api.types.is_numeric_dtype(raw.dtype) and not pd.api.types.is_bool_dtype(raw):
        text = None
        values = raw.to_numpy(dtype="float64", na_value=np.nan)
        is_num = ~np.isnan(values)
    else:
        text = _text(raw)
        values, is_num = _numbers(text)
    ns = np.full(len(raw), np.iinfo(np.int64).min, dtype=np.int64)  # NaT
    if is_num.any():
        exact, ok = numbers_to_ns(values, is_num, unit)
        ns = np.where(ok, exact, ns)
    if text is not None and not is_num.all():
        ns[~is_num] = iso_to_ns(pd.Series(STRING.__from_arrow__(text.filter(pa.array(~is_num)))))
    parsed = pd.Series(pd.to_datetime(ns, unit="ns", utc=True), index=raw.index)
    bad = parsed.isna().to_numpy()
    if bad.any():
        expected = (f"unix {'seconds' if unit == 's' else 'milliseconds'}" if unit
                    else "ISO-8601 strings, unix seconds or unix milliseconds")
        raise _fail(source, column, bad, raw, "unparsable timestamp(s)", expected, offset)
    return parsed


def _map_names(raw: pd.Series, mapping: Mapping[str, str], dtype: pd.CategoricalDtype,
               source: str, column: str, offset: int, what: str) -> pd.Series:
    """Map names (case-insensitive, stripped) through ``mapping`` onto a categorical."""
    keys = list(mapping)
    found = pc.index_in(pc.utf8_lower(_text(raw)), value_set=pa.array(keys))
    codes = pc.fill_null(found, -1).to_numpy(zero_copy_only=False)
    bad = codes < 0
    if bad.any():
        raise _fail(source, column, bad, raw, f"unknown or missing {what} name(s)",
                    "one of " + ", ".join(keys), offset)
    categories = list(dtype.categories)
    lookup = np.array([categories.index(mapping[k]) for k in keys], dtype=np.int8)
    return pd.Series(pd.Categorical.from_codes(lookup[codes], dtype=dtype), index=raw.index)


def _parse_numbers(raw: pd.Series, source: str, column: str, offset: int) -> pd.Series:
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
        raise _fail(source, column, bad, raw, "non-numeric value(s)", "a finite number",
                    offset)
    return pd.Series(values, index=raw.index)


def _no_repeats(source: Any, columns: Any, where: str) -> None:
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


def _require(source: str, columns: Any, needed: tuple[str, ...], what: str) -> None:
    missing = [c for c in needed if c not in set(columns)]
    if missing:
        raise DataError(
            f"{source}: missing required column(s) {', '.join(map(repr, missing))} for "
            f"{what} (found: {', '.join(map(str, columns)) or 'no columns'})"
        )


def _id_column(df: pd.DataFrame, name: str, default: str, filled: dict[str, int]
               ) -> pd.Series:
    if name not in df:
        return pd.Series(default, index=df.index, dtype=STRING)
    s = _as_string(df[name])
    missing = s.isna()
    if missing.any():
        _add(filled, name, missing.sum())
        s = s.fillna(default)
    return s


# ------------------------------------------------------------------ canonicalisation


def _plain_values(df: pd.DataFrame, source: str, offset: int) -> None:
    """Reject cells that are lists, dicts, sets or bytes (frames built in Python)."""
    for column in df.columns:
        if df[column].dtype != object or pd.api.types.infer_dtype(
                df[column], skipna=True) in _PLAIN_KINDS:
            continue
        kinds = df[column].map(_nested_kind)
        bad = kinds.notna().to_numpy()
        if bad.any():
            kind = kinds[bad].iloc[0]
            raise _fail(source, str(column), bad, df[column].astype(str),
                        f"{kind} value(s)", "one plain value per row (text, a number or "
                        "a time), not a nested or binary value", offset)


_PLAIN_KINDS = {"string", "empty", "integer", "floating", "mixed-integer-float", "decimal",
                "boolean", "datetime", "datetime64", "date"}


def _nested_kind(value: Any) -> str | None:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "binary"
    if isinstance(value, (list, tuple, set, frozenset, dict, np.ndarray)):
        return "nested (list/dict)"
    return None


def _canonicalise(df: pd.DataFrame, source: str, *, offset: int = 0,
                  events: Mapping[str, str] = CANONICAL_EVENTS, unit: str | None = None,
                  negative_reason: str | None = None, dropped: dict[str, int] | None = None,
                  filled: dict[str, int] | None = None,
                  window: tuple[pd.Timestamp | None, pd.Timestamp | None] = (None, None)
                  ) -> pd.DataFrame:
    """Check and convert one chunk whose columns already carry canonical names.

    ``negative_reason`` turns negative values from an error into a counted drop. Times
    outside the plausible range (see :data:`EARLIEST_TIME`) raise unless they fall
    outside ``window``, whose rows the caller drops and counts.
    """
    dropped = {} if dropped is None else dropped
    filled = {} if filled is None else filled
    _require(source, df.columns, REQUIRED_EVENT_COLUMNS, "the canonical event log")
    _plain_values(df, source, offset)
    user = _as_string(df["user_id"])
    bad = user.isna().to_numpy()
    if bad.any():
        raise _fail(source, "user_id", bad, df["user_id"], "missing user id(s)",
                    "a non-empty id", offset)
    timestamp = _parse_timestamps(df["timestamp"], source, "timestamp", offset, unit)
    _check_plausible(timestamp, df["timestamp"], source, offset, window)
    out = pd.DataFrame(
        {
            "user_id": user,
            "timestamp": timestamp,
            "event": _map_names(df["event"], events, EVENT_DTYPE, source, "event", offset,
                                "event"),
            "item_id": _id_column(df, "item_id", "", filled),
            "category_id": _id_column(df, "category_id", DEFAULT_CATEGORY, filled),
            "merchant_id": _id_column(df, "merchant_id", DEFAULT_MERCHANT, filled),
        },
        index=df.index,
    )
    value = (_parse_numbers(df["value"], source, "value", offset) if "value" in df
             else pd.Series(0.0, index=df.index))
    negative = (value < 0).to_numpy()
    if negative.any() and negative_reason is None:
        raise _fail(source, "value", negative, df["value"], "negative value(s)",
                    "a value >= 0", offset)
    huge = (value.abs() > MAX_VALUE).to_numpy()
    if huge.any():
        raise _fail(source, "value", huge, df["value"], "implausibly large value(s)",
                    f"a value of at most {MAX_VALUE:.0e} (larger ones overflow the "
                    "features); check the unit or the column", offset)
    if "value" in df:
        _add(filled, "value", value.isna().sum())
    out["value"] = value.fillna(0.0)
    if negative.any():
        _add(dropped, str(negative_reason), negative.sum())
        out = out[~negative]
    return out


def _check_plausible(ts: pd.Series, raw: pd.Series, source: str, offset: int,
                     window: tuple[pd.Timestamp | None, pd.Timestamp | None]) -> None:
    """Raise for times before :data:`EARLIEST_TIME` or after now + :data:`FUTURE_SLACK`."""
    latest = pd.Timestamp.now(tz="UTC") + FUTURE_SLACK
    bad = ((ts < EARLIEST_TIME) | (ts > latest)).to_numpy() & _in_window(ts, *window)
    if not bad.any():
        return
    shown = pd.Series("", index=raw.index, dtype=object)
    first = np.flatnonzero(bad)[:_SHOW]
    shown.iloc[first] = [f"{raw.iloc[r]} = {ts.iloc[r]:%Y-%m-%d %H:%M}" for r in first]
    raise _fail(source, "timestamp", bad, shown, "implausible time(s)",
                f"a time between {EARLIEST_TIME:%Y-%m-%d} and {latest:%Y-%m-%d %H:%M} UTC "
                "(now + 1 day); fix or remove these rows, or load a window (start/end) "
                "that leaves them out", offset)


def validate_events(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """Check a frame against the canonical contract and coerce it to canonical dtypes.

    Parameters
    ----------
    df : columns named as the canonical log; extra columns are ignored.
    source : name used in error messages (usually the file path).

    Returns
    -------
    The canonical frame (``EVENT_COLUMNS`` in order, ``RangeIndex``), rows in input order.

    Raises
    ------
    DataError
        Missing required column, missing user id, unparsable timestamp, unknown event
        name, non-numeric or negative value.
    """
    _no_repeats(source, df.columns, "frame's columns")
    df = df.rename(columns=lambda c: str(c).strip().lower())
    out = _canonicalise(df.reset_index(drop=True), source)
    return out[list(EVENT_COLUMNS)].reset_index(drop=True)


def validate_interventions(df: pd.DataFrame, source: str, *, offset: int = 0,
                           actions: tuple[str, ...] = DEFAULT_ACTIONS) -> pd.DataFrame:
    """Check and coerce an interventions frame (propensity NaN is kept for later fill).

    Raises
    ------
    DataError
        Missing column, missing user id, unparsable timestamp, unknown action, or a
        propensity outside (0, 1].
    """
    _no_repeats(source, df.columns, "frame's columns")
    df = df.rename(columns=lambda c: str(c).strip().lower())
    _require(source, df.columns, ("user_id", "timestamp", "action"), "the interventions log")
    user = _as_string(df["user_id"])
    if user.isna().any():
        raise _fail(source, "user_id", user.isna().to_numpy(), df["user_id"],
                    "missing user id(s)", "a non-empty id", offset)
    propensity = (_parse_numbers(df["propensity"], source, "propensity", offset)
                  if "propensity" in df else pd.Series(np.nan, index=df.index))
    bad = (propensity.notna() & ~propensity.between(0.0, 1.0, inclusive="right")).to_numpy()
    if bad.any():
        raise _fail(source, "propensity", bad, df["propensity"], "out-of-range value(s)",
                    "a probability in (0, 1]", offset)
    return pd.DataFrame(
        {
            "user_id": user,
            "timestamp": _parse_timestamps(df["timestamp"], source, "timestamp", offset),
            "action": _map_names(df["action"], {a: a for a in actions}, action_dtype(actions),
                                 source, "action", offset, "action"),
            "propensity": propensity,
            "merchant_id": _id_column(df, "merchant_id", DEFAULT_MERCHANT, {}),
        },
        index=df.index,
    )[list(INTERVENTION_COLUMNS)]


# ------------------------------------------------------------------------ detection


def _regular_or_folder(path: Path) -> None:
    """Refuse a pipe, device or socket before anything opens it (a FIFO would block).

    The loader opens a file several times (probe, sniff, parse), which a pipe cannot
    replay. Raises FileNotFoundError when nothing is at ``path``.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file or folder") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc})") from exc
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise DataError(f"{path}: is a pipe (or a device/socket), not a regular file: "
                        "save it to a file first")


def _is_parquet(path: Path) -> bool:
    return path.name.lower().endswith(_PARQUET_SUFFIXES)


def _compression(path: Path) -> str | None:
    """gzip, bz2, xz or zip from the file name; None for plain text."""
    return _COMPRESSION.get(path.suffix.lower())


_READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, zipfile.BadZipFile)


def _unreadable(path: Path, exc: BaseException) -> DataError:
    """The one message for a file whose bytes cannot be read or decompressed."""
    kind = _compression(path)
    if kind:
        return DataError(f"{path}: the {kind} data is truncated or corrupt ({exc}); "
                         "re-download or re-compress the file")
    return DataError(f"{path}: cannot be read ({exc})")


def _open_bytes(path: Path) -> IO[bytes]:
    """The file's (decompressed) bytes as a binary stream."""
    kind = _compression(path)
    try:
        if kind == "gzip":
            return gzip.open(path, "rb")
        if kind == "bz2":
            return bz2.open(path, "rb")
        if kind == "xz":
            return lzma.open(path, "rb")
        if kind == "zip":
            archive = zipfile.ZipFile(path)
            members = [m for m in archive.namelist() if not m.endswith("/")]
            if len(members) != 1:
                raise DataError(f"{path}: a zip archive must hold exactly one CSV file "
                                f"(found {len(members)})")
            return archive.open(members[0])
        return open(path, "rb")
    except _READ_ERRORS as exc:
        raise _unreadable(path, exc) from exc


def _text_lines(path: Path, encoding: str) -> Iterator[str]:
    """Decoded lines without their line ending (universal newlines, bad bytes replaced)."""
    with _open_bytes(path) as raw, io.TextIOWrapper(
            raw, encoding=encoding, errors="replace", newline=None) as text:
        for line in text:
            yield line.rstrip("\n")


def _probe(path: Path) -> str:
    """The text encoding of a CSV file: utf-8, or utf-16/utf-32 when a BOM says so.

    Raises
    ------
    DataError
        Unreadable or corrupt compressed data, binary content, or text that is not
        UTF-8 in the first 64 KB (later bytes are checked while parsing).
    """
    try:
        with _open_bytes(path) as fh:
            head = fh.read(_PROBE_BYTES)
    except _READ_ERRORS as exc:
        raise _unreadable(path, exc) from exc
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "utf-32"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if b"\x00" in head:
        raise _binary(path, head)
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < _PROBE_BYTES)
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, head, exc.start) from None
    return "utf-8"


def _binary(path: Path, head: bytes) -> DataError:
    """Content with NUL bytes: UTF-16 without a BOM, a known binary format, or junk."""
    odd, even = head[1::2], head[0::2]
    if len(head) >= 4 and odd.count(0) > 0.4 * len(odd) and even.count(0) < 0.1 * len(even):
        return _convert(path, "looks like UTF-16 (little-endian) without a byte-order mark",
                        "UTF-16LE")
    if len(head) >= 4 and even.count(0) > 0.4 * len(even) and odd.count(0) < 0.1 * len(odd):
        return _convert(path, "looks like UTF-16 (big-endian) without a byte-order mark",
                        "UTF-16BE")
    for magic, what in ((b"PAR1", "a Parquet file: give it a .parquet name"),
                        (b"PK\x03\x04", "a zip archive (or an Excel workbook): give a "
                         "zipped CSV a .zip name, export a workbook as CSV"),
                        (b"\x1f\x8b", "gzip data: give it a .csv.gz name")):
        if head.startswith(magic):
            return DataError(f"{path}: is not CSV text, it is {what}")
    return DataError(f"{path}: is binary data (NUL bytes), not CSV text; expected a "
                     "UTF-8 CSV file, .csv.gz/.bz2/.xz/.zip, or .parquet")


def _not_utf8(path: Path, data: bytes, at: int, line: int | None = None) -> DataError:
    """The message for bytes that are not UTF-8, with the line and a guessed encoding."""
    line = data.count(b"\n", 0, at) + 1 if line is None else line
    start = data.rfind(b"\n", 0, at) + 1
    end = data.find(b"\n", at)
    snippet = data[start: end if end >= 0 else start + 80][:80]
    controls = sum(b < 9 or 13 < b < 32 for b in data)
    if controls > 0.05 * max(len(data), 1):
        return DataError(f"{path}: is binary data, not CSV text (line {line}: {snippet!r}); "
                         "expected a UTF-8 CSV file, .csv.gz/.bz2/.xz/.zip, or .parquet")
    try:
        snippet.decode("cp1252")
        guess, source = "Windows-1252 / Latin-1 (or another 8-bit code page)", "WINDOWS-1252"
    except UnicodeDecodeError:
        guess, source = "Latin-1 (or another 8-bit code page)", "LATIN1"
    return _convert(path, f"line {line} has byte 0x{data[at]:02X} ({snippet!r}); it looks "
                    f"like {guess}", source)


def _convert(path: Path, why: str, source: str) -> DataError:
    name = path.name.split(".")[0]
    gz = " (decompress it first)" if _compression(path) else ""
    return DataError(f"{path}: is not UTF-8 text: {why}. Convert it{gz} with: iconv -f "
                     f"{source} -t UTF-8 {path.name} > {name}.utf8.csv")


def _first_bad_utf8(path: Path) -> DataError:
    """Find the first line that is not UTF-8 (error path: a rescan of the file)."""
    with _open_bytes(path) as fh:
        for number, line in enumerate(fh, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return _not_utf8(path, line, exc.start, number)
    return DataError(f"{path}: is not UTF-8 text; convert it with iconv -t UTF-8")


def _head(path: Path, n: int = 5, strip: bool = True) -> list[list[str]]:
    """The first ``n`` non-blank lines, split as CSV (header and format sniffing)."""
    encoding = _probe(path)
    rows: list[list[str]] = []
    try:
        with _open_bytes(path) as raw, io.TextIOWrapper(
                raw, encoding=encoding, errors="replace", newline="") as fh:
            for row in csv.reader(fh):
                if any(cell.strip() for cell in row):
                    rows.append([cell.strip() for cell in row] if strip else row)
                if len(rows) >= n:
                    break
    except _READ_ERRORS as exc:
        raise _unreadable(path, exc) from exc
    except csv.Error as exc:
        raise DataError(f"{path}: cannot be read as CSV text ({exc})") from exc
    return rows


def _numberish(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _sniff(path: Path) -> str | None:
    """The format a file's content looks like, or None when nothing fits."""
    if path.is_dir():
        return "completejourney" if _cj_transactions(path, strict=False) else None
    if _is_parquet(path):
        return "canonical"
    rows = _head(path)
    if not rows:
        raise DataError(f"{path}: empty file (no header and no data rows)")
    header = {cell.lower() for cell in rows[0]}
    if "visitorid" in header:
        return "retailrocket"
    if "household_id" in header:
        return "completejourney"
    if "user_id" in header or len(header & set(EVENT_COLUMNS)) >= 2:
        return "canonical"
    if all(
        len(r) == 5 and r[3].lower() in TAOBAO_EVENTS
        and all(_numberish(r[i]) for i in (0, 1, 2, 4))
        for r in rows
    ):
        return "taobao"
    return None


def detect_format(path: str | Path) -> str:
    """Guess one of :data:`FORMATS` from the file's content (header, values, folder).

    Raises
    ------
    FileNotFoundError
        No such file or folder.
    DataError
        Empty file, or nothing fits; the message lists the formats.
    """
    path = Path(path)
    _regular_or_folder(path)
    found = _sniff(path)
    if found is None:
        first = [] if path.is_dir() else _head(path, 1)
        if not path.is_dir() and not first:
            raise DataError(f"{path}: empty file (no header and no data rows)")
        seen = "a folder without transactions" if path.is_dir() else (
            "first line: " + ",".join(first[0]))
        raise DataError(
            f"{path}: cannot tell the format ({seen}); expected one of "
            f"{', '.join(FORMATS)}: canonical (header with user_id,timestamp,event), "
            "taobao (no header, user,item,category,pv|cart|fav|buy,unix-seconds), "
            "retailrocket (header timestamp,visitorid,event,itemid,transactionid), "
            "completejourney (folder with transactions*.csv)"
        )
    return found


# -------------------------------------------------------------------------- readers


@dataclass
class _Rules:
    """How tables are read: rows per chunk, and what malformed CSV rows do."""

    chunksize: int
    bad_rows: str = "error"
    dropped: dict[str, int] = field(default_factory=dict)
    #: set by the CSV reader: the file name that numbers lines in error messages
    origin: _Origin | None = None


def _csv_batches(path: Path, rules: _Rules, *, names: tuple[str, ...] | None = None,
                 usecols: list[str] | None = None) -> Iterator[tuple[int, pd.DataFrame]]:
    """Yield ``(rows before this chunk, chunk)`` of at most ``rules.chunksize`` rows.

    pyarrow parses blocks of ``_BLOCK_BYTES`` in C++; each block is cut into chunks
    that are converted one at a time. Every column is read as text (so row-level
    errors can be reported); only empty cells are missing. A row with the wrong number
    of fields raises with its file line, or is dropped and counted under
    :data:`MALFORMED` when ``rules.bad_rows == "skip"``. ``rules.origin`` is set to the
    source name that error messages turn into file lines.
    """
    encoding = _probe(path)
    columns = list(names) if names else _csv_header(path)
    origin = rules.origin = _Origin(path, 0 if names else 1, encoding)
    read = pcsv.ReadOptions(column_names=list(names) if names else None,
                            block_size=_BLOCK_BYTES,
                            encoding="utf8" if encoding.startswith("utf-8") else encoding)
    rejected: list[Any] = []
    skipped = 0

    def on_bad_row(row: Any) -> str:
        nonlocal skipped
        if rules.bad_rows != "skip":
            rejected.append(row)
            return "error"
        # an unterminated quote runs on over the following lines: each one is dropped
        lines = str(row.text).splitlines() or [""]
        skipped += len(lines)
        if len(origin.skipped) < _MAX_SKIPPED_TEXTS:
            origin.skipped.update(lines)
        return "skip"

    parse = pcsv.ParseOptions(invalid_row_handler=on_bad_row)
    convert = pcsv.ConvertOptions(
        column_types={c: pa.string() for c in columns}, include_columns=usecols,
        null_values=[""], strings_can_be_null=True,
    )
    offset = 0
    kind = _compression(path)
    source: Any = _open_bytes(path) if kind in ("xz", "zip") else path
    try:
        with pcsv.open_csv(source, read_options=read, parse_options=parse,
                           convert_options=convert) as reader:
            for batch in reader:
                for start in range(0, batch.num_rows, rules.chunksize):
                    piece = batch.slice(start, rules.chunksize)
                    if offset:
                        logger.info("%s: %s rows read", path.name, f"{offset:,}")
                    yield offset, piece.to_pandas(types_mapper=_STRING_TYPES.get)
                    offset += piece.num_rows
    except pa.ArrowInvalid as exc:
        if rejected:
            raise _malformed(origin, rejected[0]) from None
        if "Empty CSV" in str(exc):
            raise DataError(f"{path}: empty file (no header and no data rows)") from exc
        if "UTF8" in str(exc) or "utf8" in str(exc).lower():
            raise _first_bad_utf8(path) from None
        raise DataError(f"{path}: not a readable CSV after data row {offset} "
                        f"({str(exc).strip()})") from exc
    except (UnicodeError, *_READ_ERRORS) as exc:
        raise _unreadable(path, exc) from exc
    finally:
        if not isinstance(source, Path):
            source.close()
        _add(rules.dropped, MALFORMED, skipped)
        if skipped:
            logger.warning("%s: %d malformed rows skipped", path, skipped)
    if offset == 0:
        empty = pd.DataFrame({c: pd.Series(dtype=STRING) for c in usecols or columns})
        yield 0, empty


def _malformed(origin: _Origin, row: Any) -> DataError:
    lines = str(row.text).splitlines() or [""]
    line = origin.line_of(lines[0])
    where = f"line {line}" if line is not None else "a line"
    text = lines[0]
    shown = repr(text if len(text) <= 80 else text[:77] + "...")
    if len(lines) > 1:
        problem = (f"{where} ({shown}) opens a quote that is not closed: the next "
                   f"{len(lines) - 1:,} line(s) were read into the same row")
    else:
        problem = (f"{where} has {row.actual_columns} field(s), expected "
                   f"{row.expected_columns} ({shown}): the row is cut or malformed (a "
                   "missing or extra separator, or an unterminated quote)")
    return DataError(
        f"{origin}: {problem}. Fix the line, or read with bad_rows='skip' (CLI: "
        "--bad-rows skip) to drop such rows and count them")


def _csv_header(path: Path) -> list[str]:
    """The header cells of a CSV file as written."""
    rows = _head(path, 1, strip=False)
    if not rows:
        raise DataError(f"{path}: empty file (no header and no data rows)")
    _no_repeats(path, rows[0], "header")
    return rows[0]


def _columns(path: Path) -> list[str]:
    """All column names of a headed CSV or Parquet file, stripped and lower-cased."""
    if _is_parquet(path):
        try:
            names = pq.read_schema(path).names
        except Exception as exc:  # pyarrow raises several unrelated types here
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc
        _no_repeats(path, names, "Parquet schema")
    else:
        names = _csv_header(path)
    return [str(c).strip().lower() for c in names]


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


def _read_table(path: Path, rules: _Rules, wanted: tuple[str, ...]
                ) -> Iterator[tuple[int, pd.DataFrame]]:
    """Chunks of a headed CSV or Parquet file, columns lower-cased, only ``wanted`` kept."""
    def lower(c: Any) -> str:
        return str(c).strip().lower()

    if not _is_parquet(path):
        usecols = [c for c in _csv_header(path) if lower(c) in wanted]
        for offset, chunk in _csv_batches(path, rules, usecols=usecols):
            yield offset, chunk.rename(columns=lower)
        return
    try:
        pfile = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several unrelated types here
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc
    _no_repeats(path, pfile.schema_arrow.names, "Parquet schema")
    columns = [c for c in pfile.schema_arrow.names if lower(c) in wanted]
    _check_parquet_types(path, pfile.schema_arrow, columns)
    offset = 0
    batches = pfile.iter_batches(batch_size=rules.chunksize, columns=columns)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            break
        except (pa.ArrowException, *_READ_ERRORS) as exc:
            raise DataError(f"{path}: not a readable Parquet file after row {offset} "
                            f"({exc})") from exc
        yield offset, batch.to_pandas(types_mapper=_STRING_TYPES.get).rename(columns=lower)
        offset += batch.num_rows
    if offset == 0:
        yield 0, pfile.schema_arrow.empty_table().select(columns).to_pandas().rename(
            columns=lower)


def _iter_canonical(path: Path, rules: _Rules) -> Iterator[tuple[int, pd.DataFrame]]:
    if not path.name.lower().endswith(_CSV_SUFFIXES + _PARQUET_SUFFIXES) \
            and not _compression(path):
        logger.warning("%s: unknown suffix, reading it as CSV", path)
    _require(str(path), _columns(path), REQUIRED_EVENT_COLUMNS, "format canonical")
    yield from _read_table(path, rules, EVENT_COLUMNS)


def _iter_taobao(path: Path, rules: _Rules) -> Iterator[tuple[int, pd.DataFrame]]:
    for offset, chunk in _csv_batches(path, rules, names=TAOBAO_COLUMNS):
        yield offset, chunk.rename(columns={"behavior_type": "event"})


def _iter_retailrocket(path: Path, rules: _Rules) -> Iterator[tuple[int, pd.DataFrame]]:
    _require(str(path), _columns(path), RETAILROCKET_COLUMNS, "format retailrocket")
    renames = {"visitorid": "user_id", "itemid": "item_id"}
    for offset, chunk in _read_table(path, rules, RETAILROCKET_COLUMNS):
        yield offset, chunk.rename(columns=renames)


# ------------------------------------------------------------------ Complete Journey


def _cj_transactions(folder: Path, strict: bool = True) -> Path | None:
    for name in CJ_TRANSACTION_FILES:
        if (folder / name).is_file():
            return folder / name
    if strict:
        raise DataError(f"{folder}: no {' or '.join(CJ_TRANSACTION_FILES)} in this folder; "
                        "expected the Complete Journey tables")
    return None


def _small_csv(path: Path, **options: Any) -> pd.DataFrame:
    """A small side table (Complete Journey products, campaigns) read whole, as text."""
    try:
        return pd.read_csv(path, dtype=str, encoding=_probe(path), **options)
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path}: empty file (no header and no data rows)") from exc
    except (pd.errors.ParserError, UnicodeError, *_READ_ERRORS) as exc:
        raise DataError(f"{path}: not a readable CSV ({str(exc).strip()})") from exc


def _cj_categories(folder: Path) -> pd.Series:
    """product_id -> product_category, else department, else the default category."""
    path = folder / "products.csv"
    if not path.is_file():
        logger.warning("%s: not found, every product gets category %r", path, DEFAULT_CATEGORY)
        return pd.Series(dtype=STRING)
    products = _small_csv(path, keep_default_na=False, na_values=[""],
                          usecols=lambda c: c in ("product_id", "product_category",
                                                  "department"))
    _require(str(path), products.columns, ("product_id",), "Complete Journey products")
    category = pd.Series(DEFAULT_CATEGORY, index=products.index, dtype=STRING)
    for column in ("department", "product_category"):  # later columns win
        if column in products:
            category = products[column].astype(STRING).fillna(category)
    return pd.Series(category.to_numpy(), index=products["product_id"].astype(STRING),
                     dtype=STRING).groupby(level=0).first()


def _iter_completejourney(transactions: Path, rules: _Rules, households: list[pd.Index]
                          ) -> Iterator[tuple[int, pd.DataFrame]]:
    """Transactions as purchase events; every household id read goes into ``households``."""
    _require(str(transactions), _columns(transactions), CJ_COLUMNS, "format completejourney")
    categories = _cj_categories(transactions.parent)
    for offset, chunk in _read_table(transactions, rules, CJ_COLUMNS):
        households.append(pd.Index(chunk["household_id"].dropna().unique()))
        product = chunk["product_id"].astype(STRING)
        yield offset, pd.DataFrame(
            {
                "user_id": chunk["household_id"],
                "timestamp": chunk["transaction_timestamp"],
                "event": "purchase",
                "item_id": product,
                "category_id": product.map(categories).astype(STRING),
                "merchant_id": chunk["store_id"],
                "value": chunk["sales_value"],
            },
            index=chunk.index,
        )


def _home_stores(events: pd.DataFrame) -> pd.Series:
    """Each user's most frequent merchant (ties: the smallest merchant id)."""
    counts = (events.groupby(["user_id", "merchant_id"], observed=True).size()
              .rename("n").reset_index()
              .sort_values(["user_id", "n", "merchant_id"], ascending=[True, False, True])
              .drop_duplicates("user_id"))
    return pd.Series(counts["merchant_id"].to_numpy(), index=counts["user_id"].to_numpy())


def _cj_interventions(folder: Path, events: pd.DataFrame, households: pd.Index,
                      report: LoadReport) -> pd.DataFrame:
    """Targeted households per campaign as ``coupon`` rows at the campaign start date.

    Only the logged targeted rows are returned (no ``none`` control rows). The merchant
    is the household's most frequent store among the kept events; households without
    kept events are dropped and counted. Propensity is the campaign's targeted share:
    targeted households / all households (transactions and campaigns together).
    """
    campaigns_path = folder / "campaigns.csv"
    descriptions_path = folder / "campaign_descriptions.csv"
    if not (campaigns_path.is_file() and descriptions_path.is_file()):
        logger.warning("%s: no campaigns.csv / campaign_descriptions.csv, no interventions",
                       folder)
        return empty_interventions()
    campaigns = _small_csv(campaigns_path)
    _require(str(campaigns_path), campaigns.columns, ("campaign_id", "household_id"),
             "Complete Journey campaigns")
    descriptions = _small_csv(descriptions_path)
    _require(str(descriptions_path), descriptions.columns, ("campaign_id", "start_date"),
             "Complete Journey campaign descriptions")
    start = campaigns["campaign_id"].map(
        descriptions.drop_duplicates("campaign_id").set_index("campaign_id")["start_date"]
    )
    if start.isna().any():
        raise _fail(str(campaigns_path), "campaign_id", start.isna().to_numpy(),
                    campaigns["campaign_id"], "campaign(s) without a description",
                    f"a campaign_id listed in {descriptions_path.name}", 0)
    population = len(households.union(pd.Index(campaigns["household_id"].dropna().unique())))
    targeted = campaigns.groupby("campaign_id")["household_id"].nunique()
    merchant = campaigns["household_id"].astype(STRING).map(_home_stores(events))
    has_home = merchant.notna().to_numpy()
    report.interventions_read = len(campaigns)
    _add(report.interventions_dropped, NO_HOME_STORE, (~has_home).sum())
    logged = pd.DataFrame(
        {
            "user_id": campaigns["household_id"],
            "timestamp": start,
            "action": "coupon",
            "propensity": campaigns["campaign_id"].map(targeted) / max(population, 1),
            "merchant_id": merchant,
        }
    )
    return validate_interventions(logged, str(campaigns_path))[has_home]


# ------------------------------------------------------------------------- the load


def _bound(value: Any, name: str) -> pd.Timestamp | None:
    if value is None:
        return None
    try:
        stamp = pd.Timestamp(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}={value!r}: expected a date/time") from exc
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return stamp.as_unit("ns")


def _in_window(ts: pd.Series, start: pd.Timestamp | None, end: pd.Timestamp | None
               ) -> np.ndarray:
    keep = np.ones(len(ts), dtype=bool)
    if start is not None:
        keep &= (ts >= start).to_numpy()
    if end is not None:
        keep &= (ts < end).to_numpy()
    return keep


def _finish(frame: pd.DataFrame, dropped: dict[str, int]) -> pd.DataFrame:
    """Sort by (user_id, timestamp) keeping file order in ties, drop exact duplicates."""
    n = len(frame)
    users = pc.dictionary_encode(_arrow(frame["user_id"]))
    rank = pc.rank(users.dictionary, sort_keys="ascending").to_numpy(zero_copy_only=False)
    user = rank[users.indices.to_numpy(zero_copy_only=False)]
    ts = frame["timestamp"].array.asi8
    order = np.lexsort((ts, user))  # stable
    # exact duplicates share (user, time), so after sorting they sit in one run of equal
    # keys; only rows in such runs need the (slow) full-row comparison
    same = (user[order][1:] == user[order][:-1]) & (ts[order][1:] == ts[order][:-1])
    candidate = np.zeros(n, dtype=bool)
    candidate[1:] |= same
    candidate[:-1] |= same
    dup = np.zeros(n, dtype=bool)
    if candidate.any():
        dup[candidate] = frame.iloc[order[candidate]].duplicated(keep="first").to_numpy()
    _add(dropped, DUPLICATE, dup.sum())
    return frame.take(order[~dup]).reset_index(drop=True)


def _load_interventions(path: Path, chunksize: int, report: LoadReport,
                        bad_rows: str) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such interventions file")
    _regular_or_folder(path)
    parts = []
    rules = _Rules(chunksize, bad_rows, report.interventions_dropped)
    for offset, chunk in _read_table(path, rules, INTERVENTION_COLUMNS):
        parts.append(validate_interventions(chunk, rules.origin or str(path), offset=offset))
        report.interventions_read += len(chunk)
    report.interventions_read += report.interventions_dropped.get(MALFORMED, 0)
    return pd.concat(parts, ignore_index=True) if parts else empty_interventions()


def load_events(path: str | Path, format: str = "auto", *, start: Any = None,
                end: Any = None, interventions_path: str | Path | None = None,
                chunksize: int = 1_000_000, bad_rows: str = "error") -> EventLog:
    """Load a behaviour log in any of :data:`FORMATS` into the canonical frames.

    Parameters
    ----------
    path : the log file (CSV, CSV.gz or Parquet), or the Complete Journey folder.
    format : one of :data:`FORMATS`, or "auto" to detect it from the content.
    start, end : keep events in ``[start, end)`` (naive times are UTC); the rest are
        counted under "outside window". Interventions get the same window.
    interventions_path : a canonical interventions file (CSV or Parquet); for Complete
        Journey it replaces the campaigns-derived log.
    chunksize : most rows converted at a time (CSV is parsed by pyarrow in 16 MB
        blocks, each cut into chunks of at most ``chunksize`` rows).
    bad_rows : "error" (default) raises on a CSV row with the wrong number of fields
        (a cut last line, an unterminated quote), naming its file line; "skip" drops
        such rows and counts them in the report under :data:`MALFORMED`.

    Returns
    -------
    EventLog with events sorted by ``(user_id, timestamp)``, interventions (empty when
    none) and a report of rows read, kept, dropped (by reason) and filled.

    Raises
    ------
    DataError
        Unreadable or empty file, a format that does not match the content, a missing
        column, unparsable timestamp, unknown event name or negative value.
    """
    path = Path(path)
    _regular_or_folder(path)
    if format not in FORMATS + ("auto",):
        raise ValueError(f"format={format!r}: expected 'auto' or one of {', '.join(FORMATS)}")
    if chunksize < 1:
        raise ValueError(f"chunksize={chunksize}: expected a positive number of rows")
    if bad_rows not in BAD_ROWS:
        raise ValueError(f"bad_rows={bad_rows!r}: expected one of {', '.join(BAD_ROWS)}")
    lo, hi = _bound(start, "start"), _bound(end, "end")
    if lo is not None and hi is not None and lo >= hi:
        raise ValueError(f"start={lo} is not before end={hi}")

    looks = _sniff(path)
    if format == "auto":
        format = looks if looks is not None else detect_format(path)  # detect_format raises
    elif looks is not None and looks != format:
        raise DataError(f"{path}: format={format!r} was requested but the content looks like "
                        f"{looks}; pass format={looks!r} or format='auto'")
    if path.is_dir() and format != "completejourney":
        raise DataError(f"{path}: is a folder; only format 'completejourney' reads a folder")
    if format == "taobao" and _is_parquet(path):
        raise DataError(f"{path}: format 'taobao' is a headerless CSV, not Parquet")

    report = LoadReport(path=str(path), format=format)
    rules = _Rules(chunksize, bad_rows, report.dropped)
    households: list[pd.Index] = []
    options: dict[str, Any] = {}
    if format == "canonical":
        chunks = _iter_canonical(path, rules)
    elif format == "taobao":
        chunks, options = _iter_taobao(path, rules), {"events": TAOBAO_EVENTS, "unit": "s"}
    elif format == "retailrocket":
        chunks = _iter_retailrocket(path, rules)
        options = {"events": RETAILROCKET_EVENTS, "unit": "ms"}
    else:
        transactions = _cj_transactions(path) if path.is_dir() else path
        assert transactions is not None
        chunks = _iter_completejourney(transactions, rules, households)
        options = {"negative_reason": CJ_RETURN}
        report.path = str(transactions)

    parts = []
    for offset, chunk in chunks:
        report.rows_read += len(chunk)
        frame = _canonicalise(chunk, rules.origin or report.path, offset=offset,
                              dropped=report.dropped, filled=report.filled,
                              window=(lo, hi), **options)
        keep = _in_window(frame["timestamp"], lo, hi)
        _add(report.dropped, OUTSIDE_WINDOW, (~keep).sum())
        parts.append(frame.loc[keep, list(EVENT_COLUMNS)])
    report.rows_read += report.dropped.get(MALFORMED, 0)  # parsed, then dropped
    if report.rows_read == 0:
        raise DataError(f"{report.path}: no data rows (the file has a header only)")
    events = pd.concat(parts, ignore_index=True) if parts else empty_events()
    parts.clear()  # the chunks are copied into ``events``; free them before sorting
    events = _finish(events, report.dropped)
    report.rows_kept = len(events)

    if interventions_path is not None:
        interventions = _load_interventions(Path(interventions_path), chunksize, report,
                                            bad_rows)
    elif format == "completejourney":
        folder = path if path.is_dir() else path.parent
        population = pd.Index(np.unique(np.concatenate([h.to_numpy(str) for h in households])))
        interventions = _cj_interventions(folder, events, population, report)
    else:
        interventions = empty_interventions()
    if len(interventions):
        keep = _in_window(interventions["timestamp"], lo, hi)
        _add(report.interventions_dropped, OUTSIDE_WINDOW, (~keep).sum())
        interventions = _finish(interventions[keep], report.interventions_dropped)
        share = interventions["action"].map(
            interventions["action"].value_counts(normalize=True)).astype("float64")
        interventions["propensity"] = interventions["propensity"].fillna(share)
    report.interventions_kept = len(interventions)

    if report.rows_kept == 0:
        logger.warning("%s: no events left after dropping %s", report.path, report.dropped)
    for line in report.summary_lines():
        logger.info("%s", line)
    return EventLog(events=events, interventions=interventions, report=report)


def write_events(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a canonical event frame as Parquet (.parquet/.pq) or CSV (.csv/.csv.gz).

    The frame is validated first, so what is written reads back unchanged. Parent
    folders are created. Returns the resolved path.
    """
    path = Path(path).resolve()
    name = path.name.lower()
    if not name.endswith(_PARQUET_SUFFIXES + _CSV_SUFFIXES):
        raise ValueError(f"{path}: expected a .parquet, .pq, .csv or .csv.gz file name")
    frame = validate_events(df, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith(_PARQUET_SUFFIXES):
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    logger.info("wrote %s events to %s", f"{len(frame):,}", path)
    return path
