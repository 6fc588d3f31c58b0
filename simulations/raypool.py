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
"""

from __future__ import annotations

import logging
import re
from typing import Any

from simulations import flower_seam

log = logging.getLogger(__name__)


def _replacing_pool(base: type) -> type:
    import ray

    class ReplacingActorPool(base):  # type: ignore[misc,valid-type]
        """Flower's actor pool, except that a dead actor is replaced by a new one."""

        def fetch_result_and_return_actor_to_pool(self, future: Any) -> Any:
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

    return ReplacingActorPool


def replace_dead_actors() -> None:
    """Make Flower's Ray backend (in this process) build pools that replace dead actors.

    Idempotent; call it before ``run_simulation``.
    """
    flower_seam.swap_actor_pool(_replacing_pool)
