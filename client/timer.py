"""Where a ClientApp message's time goes: one line a message (deployment shows it)."""

from __future__ import annotations

import os
import time
from pathlib import Path


class HandlerTimer:
    """Laps of one message's handler, summed up in one line.

    Each message of a deployment runs in a fresh process, so the line starts with the
    process's age when the handler began: interpreter, Flower and app start-up.
    """

    def __init__(self) -> None:
        self._age = process_age()
        self._last = time.perf_counter()
        self._laps: list[tuple[str, float]] = []

    def lap(self, name: str) -> None:
        """End the lap ``name`` now."""
        now = time.perf_counter()
        self._laps.append((name, now - self._last))
        self._last = now

    def laps(self) -> list[tuple[str, float]]:
        """(name, seconds) of each lap so far."""
        return list(self._laps)

    def summary(self, what: str) -> str:
        """``what``, the process's age when the handler began, and each lap's seconds."""
        age = "?" if self._age is None else f"{self._age:.1f} s"
        laps = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self._laps)
        return f"{what}: handler began {age} after process start; {laps}"


def process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``), None elsewhere."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
