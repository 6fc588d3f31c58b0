"""Read a CSV file in chunks with pyarrow, every column as text, malformed rows reported."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pcsv

from common.io.columns import STRING_TYPES, no_repeats
from common.io.errors import Origin, quote_left_open
from common.io.files import (
    READ_ERRORS,
    compression,
    first_bad_utf8,
    head_rows,
    open_bytes,
    probe_encoding,
    unreadable,
)
from common.io.results import MALFORMED, UNCLOSED_QUOTE, add_count
from common.schema import STRING, DataError

logger = logging.getLogger(__name__)

_BLOCK_BYTES = 16 << 20  # CSV bytes parsed at a time (chunks are cut from these blocks)


@dataclass
class ReadRules:
    """How tables are read: rows per chunk, and what malformed CSV rows do."""

    chunksize: int
    bad_rows: str = "error"
    dropped: dict[str, int] = field(default_factory=dict)
    #: set by the CSV reader: the file name that numbers lines in error messages
    origin: Origin | None = None


def csv_batches(path: Path, rules: ReadRules, *, names: tuple[str, ...] | None = None,
                usecols: list[str] | None = None) -> Iterator[tuple[int, pd.DataFrame]]:
    """Yield ``(rows before this chunk, chunk)`` of at most ``rules.chunksize`` rows.

    pyarrow parses blocks of ``_BLOCK_BYTES`` in C++; each block is cut into chunks
    that are converted one at a time. Every column is read as text (so row-level
    errors can be reported); only empty cells are missing. A row with the wrong number
    of fields raises with its file line, or is dropped and counted under
    :data:`MALFORMED` when ``rules.bad_rows == "skip"``. ``rules.origin`` is set to the
    source name that error messages turn into file lines.
    """
    encoding = probe_encoding(path)
    columns = list(names) if names else csv_header(path)
    origin = rules.origin = Origin(path, 0 if names else 1, encoding)
    read = pcsv.ReadOptions(column_names=list(names) if names else None,
                            block_size=_BLOCK_BYTES,
                            encoding="utf8" if encoding.startswith("utf-8") else encoding)
    rejected: list[Any] = []
    skipped = swallowed = 0

    def on_bad_row(row: Any) -> str:
        nonlocal skipped, swallowed
        if rules.bad_rows != "skip":
            rejected.append(row)
            return "error"
        text = str(row.text)
        skipped += 1  # one record, however many lines its quoted fields span
        lines = text.splitlines()[1:]
        if quote_left_open(text):
            # a quote that never closes runs on over the following lines, each of which
            # would have been a row: they are counted one by one (blank lines aside)
            swallowed += sum(1 for line in lines if line.strip())
        else:
            # a stray quote closed by another lines later read those lines into this
            # record: each holding a separator inside the quote (the last line up to the
            # quote closing there) was a row of its own; a quoted line break in a
            # description holds none
            inside = [*lines[:-1], lines[-1].split('"', 1)[0]] if lines else []
            swallowed += sum(1 for line in inside if "," in line)
        origin.skip(text)
        return "skip"

    # quote-aware block ends: a quoted line break in a file of more than one block
    # put the parser "out of sync with chunker"
    parse = pcsv.ParseOptions(invalid_row_handler=on_bad_row, newlines_in_values=True)
    convert = pcsv.ConvertOptions(
        column_types={c: pa.string() for c in columns}, include_columns=usecols,
        null_values=[""], strings_can_be_null=True,
    )
    offset = 0
    kind = compression(path)
    source: Any = open_bytes(path) if kind in ("xz", "zip") else path
    try:
        with pcsv.open_csv(source, read_options=read, parse_options=parse,
                           convert_options=convert) as reader:
            for batch in reader:
                for start in range(0, batch.num_rows, rules.chunksize):
                    piece = batch.slice(start, rules.chunksize)
                    if offset:
                        logger.info("%s: %s rows read", path.name, f"{offset:,}")
                    yield offset, piece.to_pandas(types_mapper=STRING_TYPES.get)
                    offset += piece.num_rows
    except pa.ArrowInvalid as exc:
        if rejected:
            raise _malformed(origin, rejected[0]) from None
        if "straddl" in str(exc) and (opened := origin.unclosed_quote()) is not None:
            raise DataError(
                f"{origin}: a quoted field opened at data row {opened[0] + 1:,} (file line "
                f"{opened[1]:,}) is not closed: it runs on to the end of the file. Fix the "
                "line (a stray '\"'?); such a row cannot be skipped") from None
        if "Empty CSV" in str(exc):
            raise DataError(f"{path}: empty file (no header and no data rows)") from exc
        if "UTF8" in str(exc) or "utf8" in str(exc).lower():
            raise first_bad_utf8(path) from None
        raise DataError(f"{path}: not a readable CSV after data row {offset} "
                        f"({str(exc).strip()})") from exc
    except (UnicodeError, *READ_ERRORS) as exc:
        raise unreadable(path, exc) from exc
    finally:
        if not isinstance(source, Path):
            source.close()
        add_count(rules.dropped, MALFORMED, skipped)
        add_count(rules.dropped, UNCLOSED_QUOTE, swallowed)
        if skipped:
            logger.warning("%s: %d malformed rows skipped%s", path, skipped,
                           f" and {swallowed:,} lines a quote read into them"
                           if swallowed else "")
    if offset == 0:
        empty = pd.DataFrame({c: pd.Series(dtype=STRING) for c in usecols or columns})
        yield 0, empty


def _malformed(origin: Origin, row: Any) -> DataError:
    lines = str(row.text).splitlines() or [""]
    line = origin.line_of(lines[0])
    where = f"line {line}" if line is not None else "a line"
    text = lines[0]
    shown = repr(text if len(text) <= 80 else text[:77] + "...")
    if quote_left_open(str(row.text)):
        problem = (f"{where} ({shown}) opens a quote that is not closed: the next "
                   f"{len(lines) - 1:,} line(s) were read into the same row")
    else:
        span = f", a quoted field running over {len(lines)} lines" if len(lines) > 1 else ""
        problem = (f"{where} has {row.actual_columns} field(s), expected "
                   f"{row.expected_columns} ({shown}{span}): the row is cut or malformed "
                   "(a missing or extra separator, or an unterminated quote)")
    return DataError(
        f"{origin}: {problem}. Fix the line, or read with bad_rows='skip' (CLI: "
        "--bad-rows skip) to drop such rows and count them")


def csv_header(path: Path) -> list[str]:
    """The header cells of a CSV file as written."""
    rows = head_rows(path, 1, strip=False)
    if not rows:
        raise DataError(f"{path}: empty file (no header and no data rows)")
    no_repeats(path, rows[0], "header")
    return rows[0]
