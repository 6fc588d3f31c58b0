"""The JSON-lines files a run appends to (``metrics.jsonl``, ``privacy.jsonl``): one
writer and one reader.

A run appends one line per round and may be killed while writing it, so the last line
of a file can be cut. The reader leaves such a line out with a warning (or hands it to
the caller, who may have to count it: see ``server.dp_accounting``); any other line that
is not a JSON object is an error naming the file and the line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def append(path: Path, record: dict[str, Any], *, default: Callable[[Any], Any] | None = None,
           allow_nan: bool = True) -> None:
    """Append ``record`` as one line (one ``write``, so a kill cuts at most this line)."""
    text = json.dumps(record, default=default, allow_nan=allow_nan) + "\n"
    with path.open("a") as fh:
        fh.write(text)


def read_with_cut(path: Path) -> tuple[list[dict[str, Any]], tuple[int, str] | None]:
    """The records of ``path``, and the number and text of its last line when a kill cut
    it (a last line without a newline that is not JSON), else None."""
    text = path.read_text()
    lines = text.splitlines()
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            if number == len(lines) and not text.endswith("\n"):
                return records, (number, line)
            raise ValueError(f"{path}: line {number} is not valid JSON ({err})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {number} is not a JSON object "
                             f"(found {type(record).__name__})")
        records.append(record)
    return records, None


def read(path: Path) -> list[dict[str, Any]]:
    """The records of ``path``; a last line cut by a kill is left out with a warning."""
    records, cut = read_with_cut(path)
    if cut is not None:
        log.warning("%s: line %d is cut (the run was stopped while writing it); left out",
                    path, cut[0])
    return records
