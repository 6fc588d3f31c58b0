"""How fedecay reads a time: one set of rules for the batch loader and the live monitor.

A time is a datetime, ISO-8601 text (naive means UTC; a trailing `` UTC``, as BigQuery and
GA4 exports write, means UTC too) or a unix number: seconds, or milliseconds when its
magnitude is above :data:`MS_THRESHOLD`. Nothing else is guessed: ``03/01/2025`` is 1 March
or 3 January, so it is refused. Every time becomes an
integer of nanoseconds since 1970-01-01 UTC. :func:`numbers_to_ns` and
:func:`iso_to_ns` apply the rules to whole columns (the loader), :func:`parse_timestamp`
to one value (the monitor, one event at a time); both round only the fraction of a
number, so they agree to the nanosecond.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd

#: Times before this are placeholders (0 = 1970-01-01) or a unit mistake (unix seconds
#: read as milliseconds land in January 1970), not behaviour. Later than now plus
#: ``FUTURE_SLACK`` is a clock or year error.
EARLIEST_TIME = pd.Timestamp("1971-01-01", tz="UTC")
EARLIEST_NS = int(EARLIEST_TIME.as_unit("ns").value)
FUTURE_SLACK = pd.Timedelta(days=1)
#: Numbers above this are unix milliseconds (1e11 s is the year 5138).
MS_THRESHOLD = 1e11
#: ``datetime64[ns]`` covers about +-9.22e18 ns around 1970.
NS_LIMIT = 9.2e18
#: A plain decimal number, as text.
NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"

#: The most significant digits a rounding writer of scientific notation keeps (``%e``: 7;
#: a spreadsheet and ``%g``: 6). A longer mantissa comes from a writer of the shortest
#: exact form (Java, Spark, numpy), which drops trailing zeros (``1.5095304E9``).
ROUNDING_DIGITS = 7
#: A number in scientific notation: its mantissa's digits after the point, its exponent.
SCIENTIFIC = (r"^[-+]?[0-9]*(?:\.(?P<digits>[0-9]*))?[eE](?P<sign>[-+]?)"
              r"(?P<exponent>[0-9]{1,4})$")
#: A trailing ``UTC`` after an ISO-8601 time without an offset of its own
#: (``2017-11-02 10:00:00 UTC``; ``...+02:00 UTC`` contradicts itself and is refused).
UTC_SUFFIX = r"(?<![+-]\d\d:\d\d)(?<![+-]\d{4})(?<!Z)\s+UTC$"

_SCALE = {"s": 10**9, "ms": 10**6}
_UTC_SUFFIX = re.compile(UTC_SUFFIX)
_SCIENTIFIC = re.compile(SCIENTIFIC)
_NUMBER = re.compile(NUMBER)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class TimestampError(ValueError):
    """One value is not a time; the message starts with ``timestamp:``."""


def earliest_text() -> str:
    """:data:`EARLIEST_TIME` as ``YYYY-MM-DD``, for messages."""
    return f"{EARLIEST_TIME:%Y-%m-%d}"


def numbers_to_ns(values: np.ndarray, is_num: np.ndarray, unit: str | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Unix numbers to ns.

    Parameters
    ----------
    values
        float64 numbers (anything where ``is_num`` is False is ignored).
    is_num
        Which entries hold a number.
    unit
        ``"s"`` or ``"ms"`` to fix the unit; ``None`` reads magnitudes above
        :data:`MS_THRESHOLD` as milliseconds.

    Returns
    -------
    ns, ok
        The times in ns (meaningless where ``ok`` is False) and which numbers are in range.
    """
    if unit is None:
        scale = np.where(np.abs(values) > MS_THRESHOLD, 10**6, 10**9)
    else:
        scale = np.full(len(values), _SCALE[unit])
    with np.errstate(invalid="ignore"):
        ok = is_num & (np.abs(values * scale) < NS_LIMIT)
    # integer part times an integer scale stays exact; only fractions are rounded
    whole = np.floor(np.where(ok, values, 0.0))
    frac = np.where(ok, values, 0.0) - whole
    return whole.astype(np.int64) * scale + np.round(frac * scale).astype(np.int64), ok


def iso_to_ns(text: pd.Series) -> np.ndarray:
    """ISO-8601 strings (or with a trailing `` UTC``) to ns; ``NaT``'s integer where a
    string is not a time in range."""
    ns = _iso_ns(text)
    failed = ns == np.iinfo(np.int64).min
    if failed.any():  # only there: a column of plain ISO times pays nothing
        again = text[failed]
        suffixed = again.str.endswith("UTC").fillna(False).to_numpy(bool)
        if suffixed.any():
            retried = np.flatnonzero(failed)[suffixed]
            ns[retried] = _iso_ns(again[suffixed].str.replace(UTC_SUFFIX, "", regex=True))
    return ns


def _iso_ns(text: pd.Series) -> np.ndarray:
    iso = pd.to_datetime(text, format="ISO8601", utc=True, errors="coerce")
    # parsed at a coarser unit, so years past 2262 must become NaT before going to ns
    fits = iso.between(pd.Timestamp.min.tz_localize("UTC"), pd.Timestamp.max.tz_localize("UTC"))
    return np.array(iso.where(fits).dt.as_unit("ns").array.asi8)


def rounded_scientific(text: str, value: float) -> bool:
    """Whether ``text``, the unix time ``value`` in scientific notation, was rounded
    coarser than a second by a writer that keeps :data:`ROUNDING_DIGITS` digits or fewer
    (a spreadsheet writes 1509530400000 ms as ``1.50953E+12``: 2.8 h)."""
    match = _SCIENTIFIC.match(text)
    if match is None:
        return False
    digits = len(match["digits"] or "")
    exponent = int(match["exponent"]) * (-1 if match["sign"] == "-" else 1)
    step = exponent - digits - (3 if abs(value) > MS_THRESHOLD else 0)
    return digits + 1 <= ROUNDING_DIGITS and step > 0


def number_to_ns(value: float | int) -> int:
    """One unix number (seconds, or milliseconds above :data:`MS_THRESHOLD`) to ns."""
    scale = 10**6 if abs(value) > MS_THRESHOLD else 10**9
    if isinstance(value, int):
        ns = value * scale
    else:
        whole = math.floor(value)
        ns = int(whole) * scale + round((value - whole) * scale)
    if abs(ns) >= NS_LIMIT:
        raise TimestampError("timestamp: out of range")
    return ns


def parse_timestamp(value: Any) -> int:
    """Unix ns of one time: ISO-8601 text, unix seconds or milliseconds (naive = UTC).

    Raises
    ------
    TimestampError
        For a missing value, text that is not a time, or a time out of range. The
        plausibility bounds (:data:`EARLIEST_TIME`) are the caller's to apply.
    """
    if value is None:
        raise TimestampError("timestamp: missing")
    if isinstance(value, bool):
        raise TimestampError(f"timestamp: expected ISO-8601 text or a unix time, got "
                             f"{str(value).lower()}")
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise TimestampError("timestamp: not a finite number")
        return number_to_ns(value)
    if not isinstance(value, str):
        raise TimestampError("timestamp: expected ISO-8601 text or a unix time")
    text = _UTC_SUFFIX.sub("", value.strip())
    iso = len(text) >= 10 and text[4] == "-"  # YYYY-...
    if not iso and _NUMBER.match(text):
        number = int(text) if text.lstrip("+-").isdigit() else float(text)
        if rounded_scientific(text, number):
            raise TimestampError(f"timestamp: {text[:40]!r} is a unix time in scientific "
                                 "notation rounded coarser than a second (write it in full)")
        return number_to_ns(number)
    try:
        dot = text.find(".")
        if dot > 0 and len(text) > dot + 7 and text[dot + 7].isdigit():
            raise ValueError  # more digits than datetime keeps: let pandas read them
        stamp = datetime.fromisoformat(text)
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)
        return (stamp - _EPOCH) // timedelta(microseconds=1) * 1000
    except ValueError:
        pass
    try:  # what datetime cannot hold (nanoseconds), by the loader's own rule
        ts = pd.to_datetime(text, format="ISO8601", utc=True)
    except (ValueError, OverflowError):
        raise TimestampError(f"timestamp: cannot read {value.strip()[:40]!r}") from None
    if ts is pd.NaT:
        raise TimestampError("timestamp: missing")
    return int(ts.as_unit("ns").value)
