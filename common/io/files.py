"""Open a log file: refuse pipes, decompress, probe the encoding, spot binary content."""

from __future__ import annotations

import bz2
import codecs
import contextlib
import csv
import gzip
import io
import lzma
import os
import stat
import sys
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, cast

from common.schema import DataError

PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv", ".csv.gz")
#: Compressed CSV suffixes read (pyarrow decodes gzip and bz2 itself; xz, zip in Python).
_COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zip": "zip"}
_PROBE_BYTES = 1 << 16  # bytes of (decompressed) text checked for the encoding up front


def regular_or_folder(path: Path) -> None:
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


def is_parquet(path: Path) -> bool:
    """A Parquet file by its name (.parquet or .pq)."""
    return path.name.lower().endswith(PARQUET_SUFFIXES)


def compression(path: Path) -> str | None:
    """gzip, bz2, xz or zip from the file name; None for plain text."""
    return _COMPRESSION.get(path.suffix.lower())


READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, zipfile.BadZipFile)


#: What a file's first bytes say it is, and the name to give it.
_MAGIC = ((b"PAR1", "a Parquet file", ".parquet"), (b"\x1f\x8b", "gzip data", ".csv.gz"),
          (b"BZh", "bz2 data", ".csv.bz2"), (b"\xfd7zXZ\x00", "xz data", ".csv.xz"),
          (b"PK\x03\x04", "a zip archive", ".zip"))
_BOMS = (codecs.BOM_UTF8, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
#: what a compression suffix promises, as :data:`_MAGIC` names it
_PROMISED = {"gzip": "gzip data", "bz2": "bz2 data", "xz": "xz data", "zip": "a zip archive"}


def misnamed(path: Path, promised: str) -> DataError | None:
    """An error naming what ``path`` is when its first bytes are not ``promised`` (one of
    :data:`_MAGIC`'s names) but another known format, or plain text; None otherwise (a
    damaged file of the promised format, or unknown bytes)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return None
    found = next(((what, name) for magic, what, name in _MAGIC if head.startswith(magic)),
                 None)
    if found is None and head and (head.startswith(_BOMS) or b"\x00" not in head):
        found = ("plain text", ".csv")
    if found is None or found[0] == promised:
        return None
    return DataError(f"{path}: is {found[0]}, not {promised}: give it a {found[1]} name")


def unreadable(path: Path, exc: BaseException) -> DataError:
    """The one message for a file whose bytes cannot be read or decompressed."""
    kind = compression(path)
    if kind:
        if (wrong := misnamed(path, _PROMISED[kind])) is not None:
            return wrong
        return DataError(f"{path}: the {kind} data is truncated or corrupt ({exc}); "
                         "re-download or re-compress the file")
    return DataError(f"{path}: cannot be read ({exc})")


def open_bytes(path: Path) -> IO[bytes]:
    """The file's (decompressed) bytes as a binary stream."""
    kind = compression(path)
    try:
        if kind == "gzip":
            return cast(IO[bytes], gzip.open(path, "rb"))  # a GzipFile is one
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
    except READ_ERRORS as exc:
        raise unreadable(path, exc) from exc


def text_lines(path: Path, encoding: str) -> Iterator[str]:
    """Decoded lines without their line ending (universal newlines, bad bytes replaced)."""
    with open_bytes(path) as raw, io.TextIOWrapper(
            raw, encoding=encoding, errors="replace", newline=None) as text:
        for line in text:
            yield line.rstrip("\n")


def probe_encoding(path: Path) -> str:
    """The text encoding of a CSV file: utf-8, or utf-16/utf-32 when a BOM says so.

    Raises
    ------
    DataError
        Unreadable or corrupt compressed data, binary content, or text that is not
        UTF-8 in the first 64 KB (later bytes are checked while parsing).
    """
    try:
        with open_bytes(path) as fh:
            head = fh.read(_PROBE_BYTES)
    except READ_ERRORS as exc:
        raise unreadable(path, exc) from exc
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
    gz = " (decompress it first)" if compression(path) else ""
    return DataError(f"{path}: is not UTF-8 text: {why}. Convert it{gz} with: iconv -f "
                     f"{source} -t UTF-8 {path.name} > {name}.utf8.csv")


def first_bad_utf8(path: Path) -> DataError:
    """Find the first line that is not UTF-8 (error path: a rescan of the file)."""
    with open_bytes(path) as fh:
        for number, line in enumerate(fh, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return _not_utf8(path, line, exc.start, number)
    return DataError(f"{path}: is not UTF-8 text; convert it with iconv -t UTF-8")


#: csv's field size limit while fedecay reads with it: any field pyarrow reads (its
#: default, 131,072 characters, made a long text cell an error; sys.maxsize overflows a C
#: long on some platforms).
_FIELD_LIMIT = min(sys.maxsize, 2**31 - 1)


@contextlib.contextmanager
def wide_csv_fields() -> Iterator[None]:
    """Lift Python csv's field size limit for the block, restoring it after."""
    limit = csv.field_size_limit(_FIELD_LIMIT)
    try:
        yield
    finally:
        csv.field_size_limit(limit)


def head_rows(path: Path, n: int = 5, strip: bool = True) -> list[list[str]]:
    """The first ``n`` non-blank lines, split as CSV (header and format sniffing)."""
    encoding = probe_encoding(path)
    rows: list[list[str]] = []
    try:
        with wide_csv_fields(), open_bytes(path) as raw, io.TextIOWrapper(
                raw, encoding=encoding, errors="replace", newline="") as fh:
            for row in csv.reader(fh):
                if any(cell.strip() for cell in row):
                    rows.append([cell.strip() for cell in row] if strip else row)
                if len(rows) >= n:
                    break
    except READ_ERRORS as exc:
        raise unreadable(path, exc) from exc
    except csv.Error as exc:
        raise DataError(f"{path}: cannot be read as CSV text ({exc})") from exc
    return rows
