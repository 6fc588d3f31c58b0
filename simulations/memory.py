"""Memory of a process and everything it started, sampled while a benchmark runs.

A benchmark on a shared machine cannot read its own footprint from the machine's memory
in use: other work comes and goes. This reads Linux's ``/proc`` instead: the
proportional set size (PSS, shared pages split between the processes sharing them) of
this process and its descendants (Ray's GCS, raylet and actors when the benchmark
started Ray), so the figures add up to what the run itself holds.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path

PROC = Path("/proc")
#: How the Simulation Engine's workers name themselves (``ray::ClientAppActor.run``).
ACTOR_PREFIX = "ray::ClientAppActor"


def children_of(proc: Path = PROC) -> dict[int, list[int]]:
    """Every live process's children, from each ``/proc/<pid>/stat``'s parent field."""
    kids: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # ended meanwhile
            continue
        # The command name may hold spaces and parentheses: the fields follow the last ")".
        ppid = int(stat.rpartition(")")[2].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def descendants(pid: int, proc: Path = PROC) -> list[int]:
    """``pid`` and every process below it."""
    kids = children_of(proc)
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(kids.get(p, []))
    return found


def pss_bytes(pid: int, proc: Path = PROC) -> int:
    """Proportional set size of ``pid`` in bytes; 0 once it has ended or is unreadable."""
    try:
        text = (proc / str(pid) / "smaps_rollup").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def command_of(pid: int, proc: Path = PROC) -> str:
    """The process's command line (Ray's workers rename themselves there)."""
    try:
        return (proc / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace").strip()
    except OSError:
        return ""


@dataclasses.dataclass
class MemoryPeaks:
    """Peaks seen while sampling, in bytes."""

    total: int = 0  # this process and every descendant, summed at one instant
    driver: int = 0  # this process alone
    actor: int = 0  # the largest single Simulation Engine worker
    actors: int = 0  # the most workers alive at one instant


class TreeSampler:
    """Samples the PSS of this process's tree every ``every`` seconds in a thread.

    Use as a context manager; :attr:`peaks` holds the maxima once it has exited.
    """

    def __init__(self, every: float = 1.0, pid: int | None = None, proc: Path = PROC) -> None:
        self.every, self.pid, self.proc = every, pid or os.getpid(), proc
        self.peaks = MemoryPeaks()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fedecay-memory", daemon=True)

    def sample(self) -> None:
        """Take one sample now."""
        pids = descendants(self.pid, self.proc)
        sizes = {p: pss_bytes(p, self.proc) for p in pids}
        actors = [sizes[p] for p in pids if command_of(p, self.proc).startswith(ACTOR_PREFIX)]
        peaks = self.peaks
        peaks.total = max(peaks.total, sum(sizes.values()))
        peaks.driver = max(peaks.driver, sizes.get(self.pid, 0))
        peaks.actor = max([peaks.actor, *actors])
        peaks.actors = max(peaks.actors, len(actors))

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def __enter__(self) -> TreeSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5 * self.every + 5)
        self.sample()
