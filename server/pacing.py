"""A Grid that looks for replies as often as is cheap.

Flower's grids wait a fixed time between two looks for replies: 0.1 s in simulation
(a third of a round of ten small merchants here) and 3 s in deployment
(``flwr/superlink/grid/http_grid.py``), which a round of a few warm merchants pays
once or twice. Looking every few milliseconds instead is not free either: with 1,000
merchants one look of the in-memory grid checks every awaited reply under the link
state's lock and takes tens of milliseconds, so a fixed short wait keeps the driver's
core busy and the workers waiting for the lock.

:class:`PacedGrid` sends through the grid's own ``push_messages`` and looks with its
``pull_messages`` (the public Grid interface), and after each look waits the look's own
time divided by ``busy_share``, between ``fastest`` and ``slowest``: looking then takes
about that share of a core, and the wait shrinks as the replies come in.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid


class PacedGrid:
    """``grid`` by delegation, with :meth:`send_and_receive` paced by its looks' cost;
    once ``stop`` is set a wait for replies ends with those that came (the engine that
    would answer is gone)."""

    def __init__(self, grid: Grid, *, fastest: float = 0.01, slowest: float = 1.0,
                 busy_share: float = 0.05, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 stop: threading.Event | None = None) -> None:
        if not 0 < fastest <= slowest:
            raise ValueError(f"PacedGrid: need 0 < fastest <= slowest, got {fastest}, "
                             f"{slowest}")
        if not 0 < busy_share <= 1:
            raise ValueError(f"PacedGrid: busy_share must be in (0, 1], got {busy_share}")
        self._grid = grid
        self.fastest, self.slowest, self.busy_share = fastest, slowest, busy_share
        self._clock, self._sleep = clock, sleep
        self._stop = stop
        self.looks = 0  # pulls made, for the logs and the tests

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages`` and pull their replies until all came or ``timeout`` s passed
        (None: until all came), as Flower's grids do."""
        if not (hasattr(self._grid, "push_messages") and hasattr(self._grid, "pull_messages")):
            # Not a Flower Grid (a stand-in with its own send_and_receive): as it is.
            return self._grid.send_and_receive(messages, timeout=timeout)
        awaited = set(self._grid.push_messages(messages))
        del messages
        end = None if timeout is None else self._clock() + timeout
        replies: list[Message] = []
        while awaited and (end is None or self._clock() < end) and not (
                self._stop is not None and self._stop.is_set()):
            started = self._clock()
            found = list(self._grid.pull_messages(awaited))
            took = self._clock() - started
            self.looks += 1
            replies.extend(found)
            awaited.difference_update(m.metadata.reply_to_message_id for m in found)
            if not awaited:
                break
            wait = min(max(took / self.busy_share, self.fastest), self.slowest)
            if end is not None:
                wait = min(wait, end - self._clock())
                if wait <= 0:
                    break
            self._sleep(wait)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
