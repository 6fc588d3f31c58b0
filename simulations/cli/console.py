"""What the command line shows while it works, on stderr (stdout keeps the results).

On a terminal every step of :class:`common.progress.Progress` is a Rich progress bar
with its ETA and the latest fields (``auc=0.79``); elsewhere (a CI log, a pipe) each
finished step is one plain line, so logs stay readable. ``-q`` shows neither.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from common.progress import SILENT, Task

log = logging.getLogger(__name__)


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def fields_text(fields: Mapping[str, Any]) -> str:
    """``auc=0.7336 loss=1.43``: the latest fields of a step, in the order given."""
    return "  ".join(f"{k}={_value(v)}" for k, v in fields.items())


class _PlainTask:
    """One line per finished step: ``round 2/5 rounds  auc=0.7336  (12.3 s)``."""

    def __init__(self, console: Console, description: str, total: float | None,
                 unit: str) -> None:
        self._console, self._description, self._unit = console, description, unit
        self.total = total
        self.done = 0.0
        self._started = time.perf_counter()

    def advance(self, amount: float = 1.0, **fields: Any) -> None:
        self.done += amount
        count = ""  # a step of one thing (loading a model) needs no count
        if self.total is not None or self._unit:
            count = f" {self.done:g}" + (f"/{self.total:g}" if self.total is not None else "")
            count += f" {self._unit}" if self._unit else ""
        info = f"  {fields_text(fields)}" if fields else ""
        seconds = time.perf_counter() - self._started
        self._console.say(f"{self._description}{count}{info}  ({seconds:.1f} s)")

    def __enter__(self) -> _PlainTask:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _BarTask:
    """A Rich progress bar; it stays on screen, complete, when the step ends."""

    def __init__(self, console: Console, description: str, total: float | None,
                 unit: str) -> None:
        self._console = console
        self._bars = console.bars()
        self._id = self._bars.add_task(description, total=total, unit=unit, info="")

    def advance(self, amount: float = 1.0, **fields: Any) -> None:
        update: dict[str, Any] = {"advance": amount}
        if fields:
            update["info"] = fields_text(fields)
        self._bars.update(self._id, **update)

    def __enter__(self) -> _BarTask:
        return self

    def __exit__(self, *exc: object) -> None:
        task = next(t for t in self._bars.tasks if t.id == self._id)
        if exc[0] is None and task.total is None:
            self._bars.update(self._id, total=task.completed or 1, completed=task.completed or 1)
        self._bars.stop_task(self._id)
        self._console.release()


class Console:
    """Progress, notes and the next command, for one run of the command line.

    Parameters
    ----------
    verbose : debug logs (``-v``); Flower's own logs too.
    quiet : show only results and errors (``-q``).
    live : draw Rich bars; default: when stderr is a terminal.
    """

    def __init__(self, *, verbose: bool = False, quiet: bool = False,
                 live: bool | None = None) -> None:
        self.verbose = verbose
        self.quiet = quiet
        self._live = live
        self._bars: Any = None  # rich.progress.Progress while a bar is shown
        self._open = 0
        self._lock = threading.Lock()

    @property
    def live(self) -> bool:
        if self._live is None:
            isatty = getattr(sys.stderr, "isatty", None)
            self._live = bool(isatty and isatty())
        return self._live

    # -- the Progress protocol (common.progress) ------------------------------------

    def task(self, description: str, total: float | None = None, unit: str = "") -> Task:
        """A step of ``total`` units; see :class:`common.progress.Progress`."""
        if self.quiet:
            return SILENT.task(description, total, unit)
        if self.live:
            return _BarTask(self, description, total, unit)
        return _PlainTask(self, description, total, unit)

    def __call__(self, text: str) -> None:
        """Progress given as text (engine calls that take a ``(str) -> None``)."""
        self.say(text)

    # -- lines ----------------------------------------------------------------------

    def say(self, text: str) -> None:
        """A progress note on stderr (above the bars while they are drawn)."""
        if self.quiet:
            return
        if self._bars is not None:
            self._bars.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, file=sys.stderr, flush=True)

    def next(self, *commands: str) -> None:
        """The next useful command(s), the last lines a command prints."""
        for command in commands:
            self.say(f"next: {command}")

    # -- Rich -----------------------------------------------------------------------

    def bars(self) -> Any:
        """The shared Rich display, started for the first open step."""
        from rich.console import Console as RichConsole
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        with self._lock:
            if self._bars is None:
                self._bars = Progress(
                    SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                    MofNCompleteColumn(), TextColumn("{task.fields[unit]}"),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    TextColumn("{task.fields[info]}"),
                    # Drawn for the terminal `live` saw: while TensorFlow imports, fd 2 is
                    # a pipe to the stderr filter (common.runtime), and Rich asking again
                    # would stop drawing for those seconds.
                    console=RichConsole(file=sys.stderr, highlight=False,
                                        force_terminal=True),
                    redirect_stdout=False, redirect_stderr=False)
                self._bars.start()
            self._open += 1
            return self._bars

    def release(self) -> None:
        """One step ended; the display stops (bars stay on screen) after the last one."""
        with self._lock:
            self._open -= 1
            if self._open <= 0:
                self.close()

    def close(self) -> None:
        """Stop drawing (before an error line or the results are printed)."""
        bars, self._bars, self._open = self._bars, None, 0
        if bars is not None:
            bars.stop()

    @contextmanager
    def watch(self, description: str, read: Callable[[], Mapping[str, Any]],
              every: float = 0.5) -> Iterator[None]:
        """Redraw ``read()``'s figures (``events`` first) every ``every`` s on a terminal.

        For long streams (the monitor), whose own loop reports to the log every so often
        elsewhere.
        """
        if self.quiet or not self.live:
            yield
            return
        bars = self.bars()
        task_id = bars.add_task(description, total=None, unit="events", info="")
        stop = threading.Event()
        started = time.perf_counter()

        def refresh() -> None:
            while not stop.wait(every):
                figures = dict(read())
                events = figures.pop("events", 0)
                rate = events / max(time.perf_counter() - started, 1e-9)
                bars.update(task_id, completed=events,
                            info=fields_text({"events/s": round(rate), **figures}))

        thread = threading.Thread(target=refresh, name="fedecay-watch", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            bars.stop_task(task_id)
            self.release()


def current() -> Console:
    """The console of the running command (``main`` puts it in the click context)."""
    import click

    ctx = click.get_current_context(silent=True)
    obj = ctx.find_root().obj if ctx is not None else None
    return obj if isinstance(obj, Console) else Console()


def configure_logging(verbose: bool, quiet: bool) -> None:
    """Logs on stderr: warnings by default, debug with ``-v``, errors only with ``-q``."""
    level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.root.setLevel(level)
    for handler in logging.root.handlers:
        handler.setLevel(level)  # Flower's logger sends DEBUG records up to the root
    if not verbose:
        warnings.filterwarnings("ignore", category=DeprecationWarning)


def quiet_flower(verbose: bool) -> None:
    """Flower's own console handler shows INFO; keep it to errors unless ``-v``.

    Called by the commands that run Flower, just before: importing Flower takes seconds,
    which a command that fails on its arguments should not spend.
    """
    if verbose:
        return
    from flwr.supercore.logger import console_handler

    console_handler.setLevel(logging.ERROR)
    logging.getLogger("flwr").propagate = False
