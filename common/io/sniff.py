"""Tell a log's format from its content: header names, values, or a folder's tables."""

from __future__ import annotations

from pathlib import Path

from common.io.columns import other_separator
from common.io.completejourney import cj_transactions
from common.io.files import head_rows, is_parquet, regular_or_folder
from common.io.taobao import TAOBAO_EVENTS
from common.schema import EVENT_COLUMNS, DataError
from common.vocabulary import FORMATS


def _numberish(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def sniff(path: Path) -> str | None:
    """The format a file's content looks like, or None when nothing fits."""
    if path.is_dir():
        return "completejourney" if cj_transactions(path, strict=False) else None
    if is_parquet(path):
        return "canonical"
    rows = head_rows(path)
    if not rows:
        raise DataError(f"{path}: empty file (no header and no data rows)")
    header = {cell.strip().lower() for cell in rows[0]}
    if {"user_id", "timestamp", "event"} <= header:  # whatever other columns it carries
        return "canonical"
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
    regular_or_folder(path)
    found = sniff(path)
    if found is None:
        first = [] if path.is_dir() else head_rows(path, 1)
        if not path.is_dir() and not first:
            raise DataError(f"{path}: empty file (no header and no data rows)")
        seen = "a folder without transactions" if path.is_dir() else (
            "first line: " + ",".join(first[0]))
        if not path.is_dir() and (separator := other_separator(first[0])):
            raise DataError(f"{path}: the fields are separated by {separator}, not commas "
                            f"({seen}); fedecay reads comma-separated files: write the file "
                            "with ',' as the separator (or as Parquet)")
        raise DataError(
            f"{path}: cannot tell the format ({seen}); expected one of "
            f"{', '.join(FORMATS)}: canonical (header with user_id,timestamp,event), "
            "taobao (no header, user,item,category,pv|cart|fav|buy,unix-seconds), "
            "retailrocket (header timestamp,visitorid,event,itemid,transactionid), "
            "completejourney (folder with transactions*.csv)"
        )
    return found
