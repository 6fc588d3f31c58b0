"""PacedGrid: replies pulled as often as is cheap, through the public Grid interface."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from server.pacing import PacedGrid


class ScriptedGrid:
    """Replies to message i arrive at look ``arrivals[i]``; each look costs ``cost(n)``
    seconds of the shared clock for ``n`` awaited replies."""

    def __init__(self, arrivals: list[int], clock: list[float], cost) -> None:
        self.arrivals, self.clock, self.cost = arrivals, clock, cost
        self.pulls: list[int] = []
        self.extra = "delegated"

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        ids = set(message_ids)
        self.clock[0] += self.cost(len(ids))
        look = len(self.pulls)
        self.pulls.append(len(ids))
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"m{i}"))
                for i, at in enumerate(self.arrivals) if at == look and f"m{i}" in ids]


def paced(grid: ScriptedGrid, clock: list[float], waits: list[float], **kw) -> PacedGrid:
    def sleep(s: float) -> None:
        waits.append(s)
        clock[0] += s

    return PacedGrid(grid, clock=lambda: clock[0], sleep=sleep, **kw)  # type: ignore[arg-type]


def test_the_wait_is_the_looks_cost_over_the_busy_share_within_bounds() -> None:
    clock, waits = [0.0], []
    # 1,000 awaited replies cost 30 ms a look, one awaited reply 0.1 ms.
    grid = ScriptedGrid([1] * 999 + [3], clock, lambda n: 0.03 if n > 1 else 0.0001)
    replies = paced(grid, clock, waits, busy_share=0.05).send_and_receive(range(1000))
    assert len(list(replies)) == 1000
    assert grid.pulls == [1000, 1000, 1, 1]
    assert waits == pytest.approx([0.6, 0.6, 0.01])  # 30 ms is 5 % of 0.6 s; then the floor


def test_a_slow_look_waits_at_most_slowest_and_never_past_the_timeout() -> None:
    clock, waits = [0.0], []
    grid = ScriptedGrid([99], clock, lambda n: 0.2)
    replies = paced(grid, clock, waits, slowest=1.0).send_and_receive([0], timeout=2.5)
    assert list(replies) == []
    # Looks at 0, 1.2 and 2.4 s (each takes 0.2 s): the last one ends past the timeout.
    assert waits == [1.0, 1.0] and len(grid.pulls) == 3 and clock[0] == pytest.approx(2.6)


def test_a_stop_ends_the_wait_with_the_replies_that_came() -> None:
    # The engine that would answer is gone (Ctrl-C): no wait until the round timeout.
    clock, waits, stop = [0.0], [], threading.Event()
    grid = ScriptedGrid([0, 99], clock, lambda n: 0.01)

    def sleep(s: float) -> None:
        waits.append(s)
        clock[0] += s
        stop.set()  # set while the grid waits between two looks

    replies = PacedGrid(grid, clock=lambda: clock[0], sleep=sleep,  # type: ignore[arg-type]
                        stop=stop).send_and_receive(range(2), timeout=600)
    assert len(list(replies)) == 1 and len(grid.pulls) == 1 and clock[0] < 1


def test_everything_else_is_the_wrapped_grids_and_bad_bounds_are_refused() -> None:
    grid = ScriptedGrid([], [0.0], lambda n: 0.0)
    assert PacedGrid(grid).extra == "delegated"  # type: ignore[arg-type]
    assert list(PacedGrid(grid).send_and_receive([])) == []  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fastest"):
        PacedGrid(grid, fastest=2.0, slowest=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="busy_share"):
        PacedGrid(grid, busy_share=0.0)  # type: ignore[arg-type]


def test_a_grid_without_push_and_pull_keeps_its_own_send_and_receive() -> None:
    class Echo:
        def send_and_receive(self, messages, *, timeout=None):
            return [("echo", m, timeout) for m in messages]

    assert list(PacedGrid(Echo()).send_and_receive([1], timeout=5)) == [  # type: ignore[arg-type]
        ("echo", 1, 5)]
