"""One user's running state, and users described for the feature builder.

Per user the monitor keeps, updated in O(1) per event (amortised):

- the interest score ``I`` at the user's latest event, ``I <- I * exp(-dt / tau) + w``
  (a late event adds ``w * exp(-(t_latest - t) / tau)``);
- the number of events and the time of the first one (history length, tenure);
- the recent events, in time order: every event of the last ``kept_days`` (the
  observation window and the cadence features' count windows) plus the
  last ``max_len + 1`` events (the sequence and the gap before its first step). Older
  events are dropped as the stream clock moves on.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from itertools import chain

import numpy as np

from client.batch_features import UserEvents

UserKey = tuple[str, str]
"""(merchant, user)."""


class UserState:
    """One user's running state; the lists hold the kept events in time order."""

    __slots__ = ("ns", "ev", "cat", "val", "item", "interest", "t_ref", "n", "first_ns",
                 "risk", "alert_ns", "read_at")

    def __init__(self) -> None:
        self.ns: list[int] = []
        self.ev: list[int] = []
        self.cat: list[int] = []
        self.val: list[float] = []
        self.item: list[str] = []
        self.interest = 0.0  # I at t_ref
        self.t_ref = 0  # ns of the latest event
        self.n = 0
        self.first_ns = 0
        self.risk: float | None = None
        self.alert_ns: int | None = None
        self.read_at: float | None = None  # when the first unscored event was read

    def drop_front(self, k: int) -> None:
        """Forget the ``k`` oldest kept events (the aggregates keep counting them)."""
        for lst in (self.ns, self.ev, self.cat, self.val, self.item):
            del lst[:k]

    def prune(self, lo_ns: int, keep: int, cap: int) -> int:
        """Drop the events no future snapshot looks at, then those past the cap.

        Events before ``lo_ns`` go, but the last ``keep`` always stay (the sequence);
        then all but the last ``cap``. Returns how many the cap dropped.
        """
        n = len(self.ns)
        if n > keep and self.ns[0] < lo_ns:
            k = min(bisect.bisect_left(self.ns, lo_ns), n - keep)
            if k > 0:
                self.drop_front(k)
                n -= k
        if n > cap:
            self.drop_front(n - cap)
            return n - cap
        return 0


def user_events(users: Sequence[tuple[UserKey, UserState]], at_ns: int, tau_ns: float,
                cat_names: Sequence[str], cat_hash: Sequence[int]) -> UserEvents:
    """``users`` as the batch scorer describes users (the input of ``build_features``).

    Parameters
    ----------
    users : sequence of ((merchant, user), UserState)
        The users, in the order of the rows of ``user_ids``.
    at_ns : int
        The cutoff (unix ns): the interest is decayed to it.
    tau_ns : float
        The interest's time constant in ns.
    cat_names, cat_hash : sequence
        Every category code's name and hash bucket.
    """
    states = [st for _, st in users]
    lengths = np.fromiter((len(st.ns) for st in states), np.int64, len(states))
    total = int(lengths.sum())
    return UserEvents(
        user=np.repeat(np.arange(len(states), dtype=np.int64), lengths),
        ns=np.fromiter(chain.from_iterable(st.ns for st in states), np.int64, total),
        event=np.fromiter(chain.from_iterable(st.ev for st in states), np.int8, total),
        cat=np.fromiter(chain.from_iterable(st.cat for st in states), np.int32, total),
        value=np.fromiter(chain.from_iterable(st.val for st in states), np.float64, total),
        user_ids=np.array([k[1] for k, _ in users], dtype=object),
        merchant_ids=np.array([k[0] for k, _ in users], dtype=object),
        cat_names=np.array(cat_names, dtype=object),
        cat_hash=np.array(cat_hash, dtype=np.int32),
        interest=np.array([st.interest * math.exp(-(at_ns - st.t_ref) / tau_ns)
                           for st in states]),
        n_history=np.array([st.n for st in states], dtype=np.int64),
        first_ns=np.array([st.first_ns for st in states], dtype=np.int64),
    )
