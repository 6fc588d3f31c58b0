"""Alerts: their ids, and the alert file that restarts neither repeat nor lose.

Exactly once: read from a regular file (not followed), every rescoring and checkpoint
decision of the monitor is a function of the input alone, and a checkpoint records the
size of the alert file after syncing it; a restart truncates the file back to that size
and replays the input from the checkpoint's offset, so the file ends byte for byte as an
uninterrupted run writes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

Alert = dict[str, Any]


def alert_id(merchant: str, user: str, at: str) -> str:
    """The alert's id: the first 16 hex digits of SHA-256 over (merchant, user, cutoff).

    ``at`` is the cutoff as the alert shows it (ISO-8601, UTC). A user gets at most one
    alert per cutoff, so the id names the alert, and a replay repeats it.
    """
    key = json.dumps([merchant, user, at]).encode()
    return hashlib.sha256(key).hexdigest()[:16]


class AlertFile:
    """Alerts appended to a file as JSON lines, such that restarts repeat and lose none.

    Open it with :meth:`open`. At each checkpoint :func:`~client.monitor.run_stream`
    calls :meth:`sync` and saves the size it returns with the state; opening the file
    with that saved position truncates it back to the size, and the replay from the
    checkpoint writes the same alerts again, byte for byte.
    """

    def __init__(self, path: Path, fh: IO[bytes], size: int) -> None:
        self.path = path
        self._fh = fh
        self.size = size

    @classmethod
    def open(cls, path: str | Path, position: Mapping[str, Any] | None = None) -> AlertFile:
        """Open ``path`` for the run that restores ``position`` (None: a fresh run).

        Raises
        ------
        ValueError
            When the file cannot match the state: shorter than the state recorded, or
            not empty when the state records nothing for it; or when it cannot be
            written.
        """
        path = Path(path).expanduser().resolve()
        if path.is_dir():
            raise ValueError(f"--out {path}: is a folder")
        recorded = (position or {}).get("output") or {}
        size = path.stat().st_size if path.exists() else 0
        if recorded.get("path") == str(path):
            keep = int(recorded.get("size", 0))
            if size < keep:
                raise ValueError(
                    f"--out {path}: {size:,} bytes, but the state recorded {keep:,} at its "
                    "last checkpoint: the file was replaced or cut since; refusing to guess "
                    "which alerts it holds (restore it, or use a new --state and --out)")
        elif size:
            raise ValueError(
                f"--out {path}: not empty and no --state records it: appending could repeat "
                "alerts; move it away or empty it (or give the --state it was written with)")
        else:
            keep = 0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(path, "ab")  # noqa: SIM115 (closed by close())
        except OSError as err:
            raise ValueError(f"--out {path}: cannot write it ({err.strerror or err})") from None
        if size > keep:
            log.info("%s: dropping %d bytes written after the last checkpoint", path,
                     size - keep)
            fh.truncate(keep)
        return cls(path, fh, keep)

    def write(self, alert: Alert) -> None:
        """Append one alert (a sink for :class:`~client.monitor.Monitor`)."""
        data = (json.dumps(alert) + "\n").encode()
        self._fh.write(data)
        self._fh.flush()  # readers of the file see the alert now
        self.size += len(data)

    def sync(self) -> dict[str, Any]:
        """Flush and fsync; returns the position a checkpoint records for this file."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        return {"path": str(self.path), "size": self.size}

    def close(self) -> None:
        """Close the file (no fsync: call :meth:`sync` first to make the alerts durable)."""
        self._fh.close()
