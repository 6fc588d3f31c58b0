"""Error messages that name the file, the column, the offending rows and their file lines."""

from __future__ import annotations

import csv
import re
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common.io.files import READ_ERRORS, text_lines, wide_csv_fields
from common.schema import DataError

SHOW_ROWS = 5  # offending rows quoted in an error message
_MAX_SKIPPED_TEXTS = 10_000  # distinct skipped records remembered to number later lines
_NEWLINE = re.compile(r"\r\n?")
#: a field as pyarrow splits one: quoted (``""`` inside is a quote) when it starts with a
#: quote; then any text up to the next separator or line break
_QUOTED = re.compile(r'"(?:[^"]|"")*(")?')
_SEPARATOR = re.compile(r'[,\r\n]')


def quote_left_open(text: str) -> bool:
    """Whether a record's text ends inside a quoted field, as pyarrow reads it: a quote
    opens a field only at its start (elsewhere it is text), ``""`` inside is a quote."""
    pos, end = 0, len(text)
    while pos <= end:
        quoted = _QUOTED.match(text, pos)
        if quoted:
            if quoted.group(1) is None:
                return True
            pos = quoted.end()
        after = _SEPARATOR.search(text, pos)  # the field's end
        pos = after.end() if after else end + 1
    return False


class Origin(str):
    """A CSV file's name as shown in messages, plus how its data rows map to file lines.

    It is the plain path string everywhere a source name is expected; error messages
    use :meth:`lines` to add the physical 1-based line numbers (header and blank lines
    counted, rows dropped by ``bad_rows='skip'`` stepped over). ``skipped`` holds the
    text of each dropped record whole (a quoted field's newlines as ``\\n``).
    """

    path: Path
    header: int
    encoding: str
    skipped: set[str]

    def __new__(cls, path: Path, header: int, encoding: str) -> Origin:
        self = super().__new__(cls, str(path))
        self.path, self.header, self.encoding, self.skipped = path, header, encoding, set()
        return self

    def skip(self, text: str) -> None:
        """Remember a record dropped by ``bad_rows='skip'`` (its text as the parser saw
        it, quoted newlines included) so that :meth:`lines` steps over it."""
        if len(self.skipped) < _MAX_SKIPPED_TEXTS:
            self.skipped.add(_NEWLINE.sub("\n", text))

    def _records(self) -> Iterator[tuple[int, int, str]]:
        """``(0-based data row, the file line it starts on, its text)`` of every record
        (a rescan: only on the error path); header, blank lines and records dropped by
        ``bad_rows='skip'`` are stepped over, a quoted field's newlines counted. The
        last record of a quote that never closes runs to the end of the file."""
        record, header = -1, self.header
        raw: list[str] = []  # the physical lines of the record being read

        def lines() -> Iterator[str]:
            for line in text_lines(self.path, self.encoding):
                raw.append(line)
                yield line

        try:
            # a field over csv's default size limit would end the rescan there, and the
            # rows after it be numbered as if no quoted newline came before them
            with wide_csv_fields():
                reader = csv.reader(lines())
                start = 1
                for cells in reader:
                    first, start = start, reader.line_num + 1
                    text = "\n".join(raw)  # the record as the parser saw it
                    raw.clear()
                    if not cells:
                        continue  # the CSV parser skips blank lines
                    if header:
                        header -= 1
                        continue
                    if text in self.skipped:
                        continue
                    record += 1
                    yield record, first, text
        except (*READ_ERRORS, DataError, csv.Error):
            pass  # the reader reports an unreadable file itself

    def lines(self, rows: list[int]) -> list[int]:
        """File lines of 0-based data rows; a row is numbered by the line it starts on."""
        wanted, found = set(rows), {}
        for record, first, _ in self._records():
            if record in wanted:
                found[record] = first
                if len(found) == len(wanted):
                    break
        return [found.get(r, r + 1 + self.header) for r in rows]

    def unclosed_quote(self) -> tuple[int, int] | None:
        """``(0-based data row, file line)`` of the record whose quote never closes (the
        file's last, read to its end), or None when every quote closes."""
        last = deque(self._records(), maxlen=1)
        if last and quote_left_open(last[0][2]):
            return last[0][0], last[0][1]
        return None

    def line_of(self, text: str) -> int | None:
        """The first data line whose content is ``text`` (a row the parser rejected)."""
        header = self.header
        try:
            for number, line in enumerate(text_lines(self.path, self.encoding), 1):
                if not line:
                    continue
                if header:
                    header -= 1
                    continue
                if line == text or line.rstrip("\r") == text.rstrip("\r"):
                    return number
        except (*READ_ERRORS, DataError):
            pass
        return None


def column_error(source: str, column: str, bad: np.ndarray, raw: pd.Series, problem: str,
                 expected: str, offset: int) -> DataError:
    """One message naming file, column, the first offending rows, their values and lines.

    Rows are data rows (1-based, header excluded); for a CSV file the physical lines of
    the file (1-based, header counted) follow.
    """
    rows = np.flatnonzero(bad)
    shown = ", ".join(
        f"{offset + r + 1} ({_quote(raw.iloc[r])})" for r in rows[:SHOW_ROWS]
    )
    more = f" and {len(rows) - SHOW_ROWS} more" if len(rows) > SHOW_ROWS else ""
    where = "data rows" if len(rows) > 1 else "data row"
    lines = ""
    if isinstance(source, Origin):
        numbers = source.lines([offset + int(r) for r in rows[:SHOW_ROWS]])
        lines = (f" (file line{'s' if len(numbers) > 1 else ''} "
                 f"{', '.join(map(str, numbers))})")
    return DataError(f"{source}: column '{column}' has {problem} at {where} "
                     f"{shown}{more}{lines}; expected {expected}")


def _quote(value: Any) -> str:
    return "missing" if pd.isna(value) else repr(str(value))
