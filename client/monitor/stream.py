"""The input: JSON lines read from a file or stdin, checkpoints, and where to resume."""

from __future__ import annotations

import logging
import os
import select
import stat
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from client.monitor.alerts import AlertFile
from client.monitor.engine import Monitor
from client.monitor.folder import has_state
from client.monitor.stats import status_line, summary

log = logging.getLogger(__name__)

_READ_BYTES = 64 << 10  # input read at a time: small reads keep alert latency low


class StopStream(Exception):
    """Raised (e.g. by a sink whose reader went away) to end :func:`run_stream` cleanly."""


class LineReader:
    """Splits bytes into lines in linear time, never holding more than ``cap`` bytes.

    :meth:`lines` yields ``(line, size)`` per complete line: ``size`` is the bytes it
    took in the input (newline included); ``line`` is None for a line longer than ``cap``
    bytes, whose bytes were dropped as they came.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._parts: list[bytes] = []
        self.held = 0  # bytes of the unfinished line (kept or skipped)
        self._skipping = False

    def lines(self, data: bytes) -> Iterator[tuple[bytes | None, int]]:
        """The lines that ``data`` completes; the rest is held for the next call."""
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            size = self.held + end - start
            if self._skipping or size > self.cap:
                line = None
            else:
                line = b"".join([*self._parts, data[start:end]]) if self._parts \
                    else data[start:end]
            self._parts, self.held, self._skipping = [], 0, False
            start = end + 1
            yield line, size + 1
        rest = len(data) - start
        if rest:
            self.held += rest
            if self._skipping or self.held > self.cap:
                self._parts, self._skipping = [], True
            else:
                self._parts.append(data[start:])

    def rest(self) -> tuple[bytes | None, int]:
        """The unfinished last line (a file that does not end with a newline), and its size."""
        line = None if self._skipping else b"".join(self._parts)
        size = self.held
        self._parts, self.held, self._skipping = [], 0, False
        return line, size

    def reset(self) -> None:
        """Forget the unfinished line (the input starts again)."""
        self._parts, self.held, self._skipping = [], 0, False


def _position(path: Path | None, fd: int, offset: int,
              alerts: AlertFile | None) -> dict[str, Any]:
    """Where a restart continues: the input (regular files only) and the alert file."""
    out: dict[str, Any] = {}
    if path is not None and stat.S_ISREG(os.fstat(fd).st_mode):
        out = {"path": str(path), "inode": os.fstat(fd).st_ino, "offset": offset}
    if alerts is not None:
        out["output"] = alerts.sync()  # the alerts on disk before the state that counts them
    return out


def run_stream(monitor: Monitor, source: str | Path, *, follow: bool = False,
               state_dir: str | Path | None = None, position: Mapping[str, Any] | None = None,
               report: Callable[[str], None] | None = None, poll: float = 0.2,
               status_every: float = 30.0,
               should_stop: Callable[[], bool] | None = None,
               alerts: AlertFile | None = None) -> dict[str, Any]:
    """Feed JSON lines from ``source`` (a file, or "-" for stdin) into ``monitor``.

    Touched users are rescored every ``batch`` events and at the end of the input. For
    live input (a pipe, stdin, or ``follow``) they are also rescored when the first
    unscored event has waited ``max_delay_seconds`` and whenever the input pauses (nothing
    to read for ``poll`` seconds, or the end of a followed file); a regular file that is
    not followed gets no such wall-clock rescoring, so what the monitor emits depends on
    the input alone (see :class:`~client.monitor.AlertFile`).

    The state is saved to ``state_dir`` when there is none yet, after every
    ``checkpoint_every`` events (checked after each line) and at the end (also on
    KeyboardInterrupt, :class:`StopStream` or ``should_stop``), with the byte offset of
    the last line read, so a restart on the same file continues after it; with
    ``alerts``, the alert file is synced first and its size saved too. Lines longer than
    ``max_line_bytes`` are skipped and counted as malformed.

    Parameters
    ----------
    position : Mapping, optional
        What :meth:`Monitor.load_state` returned: where the input stood.
    report : callable, optional
        Gets progress (every ``status_every`` seconds) and problems; the CLI prints them
        on stderr. Default: the module's logger.
    should_stop : callable, optional
        Asked between reads: a signal handler that sets a flag stops the stream between
        two events, never inside one.

    Returns
    -------
    dict
        The run's figures (:func:`~client.monitor.summary`).
    """
    say = report or (lambda text: log.info("%s", text))
    path = None if str(source) == "-" else Path(source).resolve()
    fh = sys.stdin.buffer if path is None else open(path, "rb")  # noqa: SIM115
    fd = fh.fileno()
    regular = stat.S_ISREG(os.fstat(fd).st_mode)
    live = not regular or follow  # wall-clock rescoring only where latency matters
    offset = 0
    if regular and path is not None and position and position.get("path") == str(path):
        info = os.fstat(fd)
        saved = int(position.get("offset", 0))
        if position.get("inode") == info.st_ino and saved <= info.st_size:
            offset = saved
            say(f"resuming {path} at byte {offset:,}")
        else:
            say(f"{path} changed since the checkpoint (rotated or truncated): reading it "
                "from the start")
    if offset:
        os.lseek(fd, offset, os.SEEK_SET)
    started = last_status = time.perf_counter()
    before = monitor.stats.as_dict()
    config = monitor.config
    shown = len(monitor.malformed_examples)
    reader = LineReader(config.max_line_bytes)
    stopping = should_stop or (lambda: False)

    def take(line: bytes | None, size: int, read_at: float) -> None:
        if line is None:
            monitor.skip_line(f"line too long: {size:,} bytes "
                              f"(max-line-bytes {config.max_line_bytes:,})")
        else:
            monitor.feed(line, read_at)

    def checkpoint() -> None:
        assert state_dir is not None
        monitor.save(state_dir, _position(path, fd, offset, alerts))

    if state_dir is not None and not has_state(state_dir):
        checkpoint()  # a crash before the first checkpoint finds this one
    try:
        while not stopping():
            if not regular:
                ready, _, _ = select.select([fd], [], [], min(poll, config.max_delay_seconds))
                if not ready:
                    monitor.flush()  # the input pauses
                    continue
            data = os.read(fd, _READ_BYTES)
            if not data:
                if regular and follow:
                    monitor.flush()
                    if os.fstat(fd).st_size < offset + reader.held:
                        say(f"{path} was truncated: reading it from the start")
                        offset = 0
                        reader.reset()
                        os.lseek(fd, 0, os.SEEK_SET)
                    time.sleep(poll)
                    continue
                break
            read_at = time.perf_counter()
            for line, size in reader.lines(data):
                offset += size  # the checkpoint's offset: lines taken, no more
                take(line, size - 1, read_at)
                if state_dir is not None and monitor.since_checkpoint >= config.checkpoint_every:
                    checkpoint()
            if live and monitor.pending and \
                    time.perf_counter() - monitor.oldest_pending >= config.max_delay_seconds:
                monitor.flush()
            while shown < len(monitor.malformed_examples):
                say(f"malformed {monitor.malformed_examples[shown]}")
                shown += 1
            now = time.perf_counter()
            if now - last_status >= status_every:
                last_status = now
                say(status_line(monitor, monitor.stats.events - before["events"], now - started))
        if stopping():
            say("stopping" + (": saving the state" if state_dir is not None else ""))
        else:
            line, size = reader.rest()  # a last line without a newline
            if size:
                offset += size
                if line is None or line.strip():
                    take(line, size, time.perf_counter())
        if not stopping() or state_dir is None:
            monitor.flush()  # the end of the input (or a stop with no state to keep them)
    except (KeyboardInterrupt, StopStream):
        say("stopping" + (": saving the state" if state_dir is not None else ""))
    finally:
        while shown < len(monitor.malformed_examples):
            say(f"malformed {monitor.malformed_examples[shown]}")
            shown += 1
        if state_dir is not None:
            checkpoint()
        if path is not None:
            fh.close()
    return summary(monitor, time.perf_counter() - started, before)
