"""One input line as one event: parsing, rejection with a reason, and the reverse.

:func:`parse_event` reads a JSON line the way the batch loader reads a row (the same
timestamp rules, ids, defaults and event names) and raises :class:`Malformed`, naming
the field and the problem, for anything else. :func:`events_to_jsonl` writes a
canonical event frame as such lines (a replayable stream).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from client.batch_features import unix_ns
from common import timestamps
from common.io.columns import INTEGRAL_TEXT, NULL_IDS
from common.io.validation import MAX_VALUE, SCIENTIFIC_ID
from common.schema import DEFAULT_CATEGORY, DEFAULT_MERCHANT, EVENT_TYPES
from common.timestamps import EARLIEST_NS

Event = tuple[str, str, int, int, str, float, str]
"""(merchant, user, unix ns, event code, category, value, item)."""

_EARLIEST_TEXT = timestamps.earliest_text()
_NULL_IDS = frozenset(NULL_IDS)
_INTEGRAL = re.compile(INTEGRAL_TEXT)
_ROUNDED_ID = re.compile(SCIENTIFIC_ID)
_EVENT_CODES = {name: i for i, name in enumerate(EVENT_TYPES)}
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u206f"
                     r"\ufeff\ud800-\udfff]")


class Malformed(ValueError):
    """A line that is not a valid event; the message says why."""


def _ident(value: Any, name: str) -> str | None:
    """An id as the canonical loader reads it: stripped text, integral numbers without .0."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        if not value or value in _NULL_IDS:
            return None
        if _ROUNDED_ID.match(value):  # as the batch loader refuses it
            raise Malformed(f"{name}: {value[:40]!r} is written in scientific notation (a "
                            "spreadsheet or a float column rounded it: write ids in full)")
        integral = _INTEGRAL.match(value)  # "13.0" reads "13", as the batch loader reads it
        return integral.group(1) if integral else value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Malformed(f"{name}: expected a string or number")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise Malformed(f"{name}: not a finite number")
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


class StreamMerchants:
    """Whether a stream names the merchant of its events: the batch loader refuses a row
    without a merchant id beside rows naming one. Without this, such an event became
    merchant ``local``: one merchant more, holding users that are another merchant's.

    A stream naming no merchant is one merchant, ``DEFAULT_MERCHANT``. Once an event
    names one (``merchants``: those of a restored state, then each event :meth:`check`
    accepts), an event naming none is :class:`Malformed`. Events naming a merchant after
    unnamed ones are kept (a stream whose first event lacked it must not lose everything
    after it); :meth:`check` says so, for the caller to warn once.
    """

    def __init__(self, merchants: Iterable[str] = ()) -> None:
        kinds = {merchant == DEFAULT_MERCHANT for merchant in merchants}
        self.named, self.unnamed = False in kinds, True in kinds

    def check(self, merchant: str) -> bool:
        """Accept ``merchant`` (as :func:`parse_event` gives it) or raise :class:`Malformed`;
        True for the first named event after events that named none."""
        if merchant == DEFAULT_MERCHANT:
            if self.named:
                raise Malformed("merchant_id: missing, while the stream's other events name "
                                "their merchant (as merchant 'local' the event would make "
                                "one merchant more)")
            self.unnamed = True
            return False
        first = self.unnamed and not self.named
        self.named = True
        return first


def parse_timestamp(value: Any) -> int:
    """Unix ns from ISO-8601 text, unix seconds or milliseconds (naive = UTC).

    Parameters
    ----------
    value : Any
        The ``timestamp`` field of one event line.

    Returns
    -------
    int
        Unix nanoseconds, by the rules of :func:`common.timestamps.parse_timestamp`.

    Raises
    ------
    Malformed
        When the value cannot be read, or is before
        :data:`common.timestamps.EARLIEST_TIME` (1971-01-01): the batch loader refuses
        such times too (placeholders such as 0, or unit mistakes, not behaviour).
    """
    try:
        ns = timestamps.parse_timestamp(value)
    except timestamps.TimestampError as err:
        raise Malformed(str(err)) from None
    if ns < EARLIEST_NS:
        raise Malformed(f"timestamp: before {_EARLIEST_TEXT}")
    return ns


def parse_event(line: str | bytes) -> Event:
    """One JSON line as (merchant, user, ns, event code, category, value, item).

    Parameters
    ----------
    line : str or bytes
        One line of the input, without its newline.

    Returns
    -------
    Event
        Missing merchants and categories take the schema's defaults, a missing item is
        ``""`` and a missing value ``0.0`` (whether a missing merchant may stand beside
        the stream's other events is for :class:`StreamMerchants` to say).

    Raises
    ------
    Malformed
        Naming the field and the problem, and nothing else, whatever the line holds
        (deep nesting, numbers too large for a float, invalid UTF-8, ...).
    """
    try:
        return _parse_event(line)
    except Malformed:
        raise
    except RecursionError:
        raise Malformed("not valid JSON: nested too deeply") from None
    except (ArithmeticError, LookupError, TypeError, ValueError) as err:
        raise Malformed(f"unreadable: {type(err).__name__}") from None


def _parse_event(line: str | bytes) -> Event:
    try:
        rec = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise Malformed("not valid JSON") from None
    if not isinstance(rec, dict):
        raise Malformed("not a JSON object")
    user = _ident(rec.get("user_id"), "user_id")
    if user is None:
        raise Malformed("user_id: missing")
    ns = parse_timestamp(rec.get("timestamp"))
    name = rec.get("event")
    code = _EVENT_CODES.get(name.strip().lower()) if isinstance(name, str) else None
    if code is None:
        raise Malformed(f"event: expected one of {', '.join(EVENT_TYPES)}, got {name!r}"[:120])
    raw = rec.get("value")
    if raw is None or raw == "":
        value = 0.0
    elif raw.__class__ is float and 0 <= raw <= MAX_VALUE:
        value = raw
    elif isinstance(raw, bool):
        raise Malformed("value: expected a number")
    else:
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise Malformed("value: expected a number") from None
        if not math.isfinite(value) or value < 0:
            raise Malformed("value: expected a finite number >= 0")
        if value > MAX_VALUE:  # as the batch loader: larger ones overflow the features
            raise Malformed(f"value: above {MAX_VALUE:.0e}")
    merchant, category, item = (rec.get(k) for k in ("merchant_id", "category_id", "item_id"))
    return (
        _ident(merchant, "merchant_id") or DEFAULT_MERCHANT,
        user, ns, code,
        _ident(category, "category_id") or DEFAULT_CATEGORY,
        value,
        _ident(item, "item_id") or "",
    )


def escape_controls(text: str) -> str:
    """``text`` with every control character as ``\\xNN`` (``\\uNNNN`` above 0xff).

    C0 and C1 controls (ESC included), DEL, line/paragraph separators, bidi overrides,
    zero-width characters and lone surrogates: whoever writes the input cannot move the
    operator's cursor, recolour or rewrite the terminal, or hide text in what is shown.
    Ordinary text, backslashes included, is left as it is.
    """
    return _UNSAFE.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) <= 0xff
                       else f"\\u{ord(m[0]):04x}", text)


def events_to_jsonl(events: pd.DataFrame) -> list[str]:
    """A canonical event frame as JSON lines in time order (a replayable stream).

    Timestamps are written in ISO-8601 with the coarsest unit (ms, us or ns) that keeps
    every one of them exact.
    """
    order = np.argsort(unix_ns(events["timestamp"]), kind="stable")
    frame = events.iloc[order]
    ns = unix_ns(frame["timestamp"])
    unit = "ms" if (ns % 1_000_000 == 0).all() else "us" if (ns % 1000 == 0).all() else "ns"
    text = frame.to_json(orient="records", lines=True, date_format="iso", date_unit=unit)
    return text.splitlines()
