"""Check a chunk against the canonical contract and convert it to canonical dtypes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from common.io.columns import (
    MerchantRows,
    as_arrow,
    as_string,
    exact_float_bits,
    id_column,
    map_names,
    merchant_column,
    no_repeats,
    parse_numbers,
    parse_timestamps,
    require_columns,
)
from common.io.errors import SHOW_ROWS, column_error
from common.io.results import add_count
from common.schema import (
    DEFAULT_ACTIONS,
    DEFAULT_CATEGORY,
    EVENT_COLUMNS,
    EVENT_DTYPE,
    EVENT_TYPES,
    INTERVENTION_COLUMNS,
    REQUIRED_EVENT_COLUMNS,
    action_dtype,
)
from common.timestamps import EARLIEST_TIME, FUTURE_SLACK

CANONICAL_EVENTS: Mapping[str, str] = {name: name for name in EVENT_TYPES}
NO_RENAMES: Mapping[str, str] = {}  # a canonical file names its columns canonically
#: Largest accepted ``value``: no single event is worth 1e12 in any currency, and far
#: below it sums and log1p features stay finite in float32/float64.
MAX_VALUE = 1e12


def _plain_values(df: pd.DataFrame, source: str, offset: int,
                  names: Mapping[str, str] = NO_RENAMES) -> None:
    """Reject cells that are lists, dicts, sets or bytes (frames built in Python)."""
    for column in df.columns:
        if df[column].dtype != object or pd.api.types.infer_dtype(
                df[column], skipna=True) in _PLAIN_KINDS:
            continue
        kinds = df[column].map(_nested_kind)
        bad = kinds.notna().to_numpy()
        if bad.any():
            kind = kinds[bad].iloc[0]
            raise column_error(source, names.get(str(column), str(column)), bad,
                               df[column].astype(str), f"{kind} value(s)", "one plain value "
                               "per row (text, a number or a time), not a nested or binary "
                               "value", offset)


REQUIRED_INTERVENTION_COLUMNS = ("user_id", "timestamp", "action")
_ID_COLUMNS = ("user_id", "item_id", "category_id", "merchant_id")


def _exact_float_ids(df: pd.DataFrame, source: str, offset: int,
                     names: Mapping[str, str] = NO_RENAMES) -> None:
    """Reject id columns stored as floats with infinite values, or values at or beyond
    the first integer the column's float type cannot tell from the next one (2^53 for
    float64, 2^24 for float32): ids there may already be several made one
    (9007199254740993 reads 9007199254740992 in a float64)."""
    for column in _ID_COLUMNS:
        if column not in df or not pd.api.types.is_float_dtype(df[column].dtype):
            continue
        values = df[column].to_numpy(dtype="float64", na_value=np.nan)
        infinite = np.isinf(values)
        if infinite.any():
            raise column_error(source, names.get(column, column), infinite,
                               df[column].astype(str),
                               "infinite value(s) (not a number an id can be)", "ids stored as "
                               "integers or text", offset)
        bits = exact_float_bits(df[column].dtype)
        bad = np.abs(np.nan_to_num(values)) >= 2.0**bits
        if bad.any():
            raise column_error(source, names.get(column, column), bad,
                               df[column].astype(str), "id(s) stored as floating-point "
                               f"numbers beyond 2^{bits} (distinct ids there may already have "
                               "become one)", "ids stored as integers or text: write the "
                               "column without converting it to float", offset)


#: A whole number in normalised scientific notation, as a spreadsheet (``1.23457E+11``),
#: R or a float column writes a long one: the exponent's ``+`` is what tells it from a code
#: (no rounded whole number has a negative exponent: ``1E-05`` is a code).
SCIENTIFIC_ID = r"^\s*[-+]?[0-9](\.[0-9]+)?[eE]\+[0-9]{1,3}\s*$"
#: A line break, then a separator: the lines a stray quote read into a field.
_SWALLOWED_LINES = r"[\r\n][^\r\n]*,"
_GARBLED_ID = f"(?:{SCIENTIFIC_ID})|(?:{_SWALLOWED_LINES})"


def _check_id_text(df: pd.DataFrame, source: str, offset: int,
                   names: Mapping[str, str] = NO_RENAMES) -> None:
    """Reject text ids written in scientific notation: a spreadsheet keeps 6 significant
    digits (123456789012 is written 1.23457E+11), so distinct customers became one id
    and their rows looked like duplicates. Reject ids holding whole lines of the file,
    which a stray quote reads into its field (those rows are lost)."""
    for column in _ID_COLUMNS:
        if column not in df or not (isinstance(df[column].dtype, pd.StringDtype)
                                    or df[column].dtype == object):
            continue
        text = as_arrow(df[column])
        if pc.all(pc.ascii_is_decimal(text)).as_py() is not False:
            continue  # digits only (most id columns): neither problem can be there
        if not pc.any(pc.match_substring_regex(text, _GARBLED_ID)).as_py():
            continue  # one pass over the column; the problem is told apart only if found
        for pattern, problem, expected in (
                (SCIENTIFIC_ID, "id(s) written in scientific notation (a spreadsheet or a "
                 "float column rounded them: distinct ids may have become one)",
                 "ids written in full: export the column as text (or write Parquet)"),
                (_SWALLOWED_LINES, "id(s) holding a line break and a separator (a quote "
                 "opened in the field ran over the next lines, which were lost as rows)",
                 "one id per row: close or remove the stray quote")):
            bad = pc.fill_null(pc.match_substring_regex(text, pattern),
                               False).to_numpy(zero_copy_only=False)
            if bad.any():
                raise column_error(source, names.get(column, column), bad, df[column],
                                   problem, expected, offset)


_PLAIN_KINDS = {"string", "empty", "integer", "floating", "mixed-integer-float", "decimal",
                "boolean", "datetime", "datetime64", "date"}


def _nested_kind(value: Any) -> str | None:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "binary"
    if isinstance(value, (list, tuple, set, frozenset, dict, np.ndarray)):
        return "nested (list/dict)"
    return None


def canonicalise(df: pd.DataFrame, source: str, *, offset: int = 0,
                 events: Mapping[str, str] = CANONICAL_EVENTS, unit: str | None = None,
                 negative_reason: str | None = None, dropped: dict[str, int] | None = None,
                 filled: dict[str, int] | None = None,
                 window: tuple[pd.Timestamp | None, pd.Timestamp | None] = (None, None),
                 merchants: MerchantRows | None = None,
                 names: Mapping[str, str] = NO_RENAMES) -> pd.DataFrame:
    """Check and convert one chunk whose columns already carry canonical names.

    ``names`` maps a canonical column to the file's own name for it (``store_id`` for
    ``merchant_id``): errors name the column the user can find in the file.

    ``negative_reason`` turns negative values from an error into a counted drop. Times
    outside the plausible range (see :data:`EARLIEST_TIME`) raise unless they fall
    outside ``window``, whose rows the caller drops and counts; such rows, and dropped
    negative ones, are not checked for a merchant id either (``merchants`` counts the
    others across a file's chunks).
    """
    dropped = {} if dropped is None else dropped
    filled = {} if filled is None else filled
    require_columns(source, df.columns, REQUIRED_EVENT_COLUMNS, "the canonical event log")
    def name(column: str) -> str:
        return names.get(column, column)

    _plain_values(df, source, offset, names)
    _exact_float_ids(df, source, offset, names)
    _check_id_text(df, source, offset, names)
    user = as_string(df["user_id"])
    bad = user.isna().to_numpy()
    if bad.any():
        raise column_error(source, name("user_id"), bad, df["user_id"], "missing user id(s)",
                           "a non-empty id", offset)
    timestamp = parse_timestamps(df["timestamp"], source, name("timestamp"), offset, unit)
    _check_plausible(timestamp, df["timestamp"], source, offset, window, name("timestamp"))
    event = map_names(df["event"], events, EVENT_DTYPE, source, name("event"), offset,
                      "event")
    value = (parse_numbers(df["value"], source, name("value"), offset) if "value" in df
             else pd.Series(0.0, index=df.index))
    negative = (value < 0).to_numpy()
    if negative.any() and negative_reason is None:
        raise column_error(source, name("value"), negative, df["value"], "negative value(s)",
                           "a value >= 0", offset)
    huge = (value.abs() > MAX_VALUE).to_numpy()
    if huge.any():
        raise column_error(source, name("value"), huge, df["value"],
                           "implausibly large value(s)", f"a value of at most {MAX_VALUE:.0e} "
                           "(larger ones overflow the features); check the unit or the column",
                           offset)
    used = in_window(timestamp, *window) & ~negative  # the rows the load keeps
    out = pd.DataFrame(
        {
            "user_id": user,
            "timestamp": timestamp,
            "event": event,
            "item_id": id_column(df, "item_id", "", filled),
            "category_id": id_column(df, "category_id", DEFAULT_CATEGORY, filled),
            "merchant_id": merchant_column(df, source, offset, filled, used, merchants,
                                           name("merchant_id")),
        },
        index=df.index,
    )
    if "value" in df:
        add_count(filled, "value", value.isna().sum())
    out["value"] = value.fillna(0.0)
    if negative.any():
        add_count(dropped, str(negative_reason), negative.sum())
        out = out[~negative]
    return out


def _check_plausible(ts: pd.Series, raw: pd.Series, source: str, offset: int,
                     window: tuple[pd.Timestamp | None, pd.Timestamp | None],
                     column: str = "timestamp") -> None:
    """Raise for times before :data:`EARLIEST_TIME` or after now + :data:`FUTURE_SLACK`."""
    latest = pd.Timestamp.now(tz="UTC") + FUTURE_SLACK
    bad = ((ts < EARLIEST_TIME) | (ts > latest)).to_numpy() & in_window(ts, *window)
    if not bad.any():
        return
    shown = pd.Series("", index=raw.index, dtype=object)
    first = np.flatnonzero(bad)[:SHOW_ROWS]
    shown.iloc[first] = [f"{raw.iloc[r]} = {ts.iloc[r]:%Y-%m-%d %H:%M}" for r in first]
    raise column_error(source, column, bad, shown, "implausible time(s)",
                       f"a time between {EARLIEST_TIME:%Y-%m-%d} and {latest:%Y-%m-%d %H:%M} UTC "
                       "(now + 1 day); fix or remove these rows, or load a window (start/end) "
                       "that leaves them out", offset)


def validate_events(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """Check a frame against the canonical contract and coerce it to canonical dtypes.

    Parameters
    ----------
    df : pandas.DataFrame
        Columns named as the canonical log; extra columns are ignored.
    source : str
        Name used in error messages (usually the file path).

    Returns
    -------
    pandas.DataFrame
        The canonical frame (``EVENT_COLUMNS`` in order, ``RangeIndex``), rows in input
        order.

    Raises
    ------
    DataError
        Missing required column, missing user id, unparsable timestamp, unknown event
        name, non-numeric or negative value.
    """
    no_repeats(source, df.columns, "frame's columns")
    df = df.rename(columns=lambda c: str(c).strip().lower())
    out = canonicalise(df.reset_index(drop=True), source)
    return out[list(EVENT_COLUMNS)].reset_index(drop=True)


def validate_interventions(df: pd.DataFrame, source: str, *, offset: int = 0,
                           actions: tuple[str, ...] = DEFAULT_ACTIONS,
                           window: tuple[pd.Timestamp | None, pd.Timestamp | None] = (None, None),
                           merchants: MerchantRows | None = None) -> pd.DataFrame:
    """Check and coerce an interventions frame (propensity NaN is kept for later fill).

    Parameters
    ----------
    df : pandas.DataFrame
        Columns named as the canonical interventions log; extra columns are ignored.
    source : str
        Name used in error messages (usually the file path).
    offset : int
        Data rows before ``df`` in its file, so messages number rows as the file does.
    actions : tuple of str
        The accepted action names.
    window : (start, end), optional
        The load's window: rows outside it (which the caller drops) are not checked for
        a merchant id.
    merchants : MerchantRows, optional
        Counts the rows with and without a merchant id across a file's chunks.

    Returns
    -------
    pandas.DataFrame
        ``INTERVENTION_COLUMNS`` in order, with the index of ``df``.

    Raises
    ------
    DataError
        Missing column, missing user id, unparsable or implausible timestamp (as the
        events'), unknown action, or a propensity outside (0, 1].
    """
    no_repeats(source, df.columns, "frame's columns")
    df = df.rename(columns=lambda c: str(c).strip().lower())
    require_columns(source, df.columns, REQUIRED_INTERVENTION_COLUMNS, "the interventions log")
    _exact_float_ids(df, source, offset)
    _check_id_text(df, source, offset)
    user = as_string(df["user_id"])
    if user.isna().any():
        raise column_error(source, "user_id", user.isna().to_numpy(), df["user_id"],
                           "missing user id(s)", "a non-empty id", offset)
    propensity = (parse_numbers(df["propensity"], source, "propensity", offset)
                  if "propensity" in df else pd.Series(np.nan, index=df.index))
    bad = (propensity.notna() & ~propensity.between(0.0, 1.0, inclusive="right")).to_numpy()
    if bad.any():
        raise column_error(source, "propensity", bad, df["propensity"], "out-of-range value(s)",
                           "a probability in (0, 1]", offset)
    timestamp = parse_timestamps(df["timestamp"], source, "timestamp", offset)
    _check_plausible(timestamp, df["timestamp"], source, offset, (None, None))
    return pd.DataFrame(
        {
            "user_id": user,
            "timestamp": timestamp,
            "action": map_names(df["action"], {a: a for a in actions}, action_dtype(actions),
                                source, "action", offset, "action"),
            "propensity": propensity,
            "merchant_id": merchant_column(df, source, offset, {},
                                           in_window(timestamp, *window), merchants),
        },
        index=df.index,
    )[list(INTERVENTION_COLUMNS)]


def in_window(ts: pd.Series, start: pd.Timestamp | None, end: pd.Timestamp | None
              ) -> np.ndarray:
    """Mask of the rows with ``start <= ts < end``; a bound of None leaves that side open."""
    keep = np.ones(len(ts), dtype=bool)
    if start is not None:
        keep &= (ts >= start).to_numpy()
    if end is not None:
        keep &= (ts < end).to_numpy()
    return keep
