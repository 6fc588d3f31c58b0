"""Replace a ClientApp actor whose process died instead of reusing the dead actor.

In Flower 1.42 a Ray actor that dies while running a ClientApp (SIGKILL by the kernel's
OOM killer, Ray's memory monitor, a segfault) turns that one message into an error
reply, which is right, but ``RayBackend.process_message`` then hands the dead actor
back to the pool (``flwr/server/superlink/fleet/vce/backend/raybackend.py``,
``BasicActorPool.add_actor_back_to_pool`` in
``flwr/simulation/ray_transport/ray_actor.py``; the actors have no ``max_restarts``).
Every later message given to it fails at once with ``ActorDiedError`` (seen with 4
clients on 2 actors: one kill in round 1 failed one more message of that round and 3
of round 2's 4). This pool swaps in a fresh actor before the dead one goes back, so
only the message that was running is lost. The pool's internals are reached only
through ``simulations.flower_seam``: with another Flower version than the seam's,
Flower's own pool stays (one warning).

The pool also waits for an actor's result in short looks rather than one ``ray.get``:
after Ctrl-C the driver shuts Ray down, and a ``ray.get`` already waiting then never
returns, so Flower's worker threads (which the interpreter joins at exit) kept the
process alive forever. :func:`abandon_waits` ends those waits.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

from simulations import flower_seam

log = logging.getLogger(__name__)

_abandoned = threading.Event()
_waiting = threading.Condition()  # guards _looks: waits inside ray.wait just now
_looks = [0]
_LOOK_SECONDS = 0.5
_flwr_level: list[int] = []  # Flower's log level before abandon_waits hid its errors


class RunAbandoned(RuntimeError):
    """The run was stopped while a ClientApp's message was running."""


def _replacing_pool(base: type) -> type:
    import ray

    class ReplacingActorPool(base):  # type: ignore[misc,valid-type]
        """Flower's actor pool, except that a dead actor is replaced by a new one."""

        def submit(self, *args: Any, **kwargs: Any) -> Any:
            if _abandoned.is_set():  # Ray may be shut down: a call would end the process
                raise RunAbandoned("the run was stopped; no message is sent")
            return super().submit(*args, **kwargs)

        def fetch_result_and_return_actor_to_pool(self, future: Any) -> Any:
            while not _look(future):
                pass
            try:
                return super().fetch_result_and_return_actor_to_pool(future)
            except ray.exceptions.ActorDiedError as err:
                # Flower's caller then puts the future's actor back in the pool.
                flower_seam.replace_actor_of(self, future, self.create_actor_fn())
                pid = re.search(r"\bpid: (\d+)", str(err))
                log.warning("a ClientApp's Ray actor died (pid %s; killed by the OOM killer "
                            "or a signal, or crashed): its message fails, a new actor takes "
                            "its place", pid.group(1) if pid else "?")
                raise

    def _look(future: Any) -> bool:
        """Whether ``future`` is done, after waiting up to a look; never once the run
        was abandoned (a ``ray`` call after the driver's shutdown would start a new
        local Ray instance)."""
        with _waiting:
            if _abandoned.is_set():
                raise RunAbandoned("the run was stopped; this message's reply is not "
                                   "awaited")
            _looks[0] += 1
        try:
            return bool(ray.wait([future], timeout=_LOOK_SECONDS)[0])
        finally:
            with _waiting:
                _looks[0] -= 1
                _waiting.notify_all()

    return ReplacingActorPool


def replace_dead_actors() -> None:
    """Make Flower's Ray backend (in this process) build pools that replace dead actors.

    Idempotent; call it before ``run_simulation``.
    """
    if _abandoned.is_set():  # a stopped run before this one in the same process
        _abandoned.clear()
        logging.getLogger("flwr").setLevel(_flwr_level.pop())
    flower_seam.swap_actor_pool(_replacing_pool)


def abandon_waits() -> None:
    """End every wait for an actor's result (the run was stopped: Ctrl-C, SIGTERM), and
    hide the errors Flower logs for the messages so ended."""
    if not _abandoned.is_set():
        _flwr_level.append(logging.getLogger("flwr").level)
    logging.getLogger("flwr").setLevel(logging.CRITICAL)
    with _waiting:
        _abandoned.set()
        # Ray may be shut down once no look is under way (each ends within a look).
        _waiting.wait_for(lambda: _looks[0] == 0, timeout=2 * _LOOK_SECONDS)
