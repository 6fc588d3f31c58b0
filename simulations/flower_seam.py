"""Every access of the simulation layer to Flower's private internals (flwr 1.42.0).

One small function per patch; each checks :data:`PIN` and, with another Flower
installed, leaves Flower's own code in place (one warning per process). The
``*_SOURCES`` constants hold the SHA-256 of the source of each Flower function a patch
replaces, mimics or reads, as found in 1.42.0 (``tests/test_flower_seam.py`` checks
them). Why each patch exists is told where it is used: ``simulations.handover`` and
``simulations.raypool``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from common.pinned import Pin

log = logging.getLogger(__name__)

PIN = Pin("flwr", "1.42.0", __name__, ("swap_message_handover", "swap_actor_pool",
                                        "start_ray"))

_VCE = "flwr.server.superlink.fleet.vce"
_LINKSTATE = "flwr.server.superlink.linkstate.in_memory_linkstate:InMemoryLinkState"
_POOL = "flwr.simulation.ray_transport.ray_actor:BasicActorPool"

#: ``swap_message_handover`` replaces Flower's hand-over, which ``run_api`` starts by
#: its module-global name; the replacement reads and stamps the in-memory link state
#: as ``get_message_ins`` does, and wraps ``store_message_ins``.
HANDOVER_SOURCES = {
    f"{_VCE}.vce_api:add_messages_to_queue":
        "953f4bd41a931a7779a4a670ab17b633f6e20b08a0128535328674466419777a",
    f"{_VCE}.vce_api:run_api":
        "f85c0cd6e902752f455c00ab9c7212c1cd94a8c681fa9bf294ba967463390898",
    f"{_LINKSTATE}.__init__":
        "d50d022da60695f51607941289feb37bd794b16cc500b0c1b40a5adcb72b7981",
    f"{_LINKSTATE}.store_message_ins":
        "a2b78afac51dc4a23d236ccf8d02958c8d0532aac179cd9ad9b1a0d939eecbea",
    f"{_LINKSTATE}.store_message_and_object_tree":
        "e523f6dbf63f5965dd1e8fb2efc2e2c28e2cfd702f76a10772adb6df64d2263a",
    f"{_LINKSTATE}.get_message_ins":
        "6547c8dcbc62e12f5b2aa5c69f4de8c7c7072c10d6c0876512cf37197d941056",
    f"{_LINKSTATE}._check_stored_messages":
        "2be47567d2478a58b766c116f1f0cd0ae3aa791d4e7e3ee85cb20d31f15a8082",
}

#: ``swap_actor_pool`` replaces the pool class ``RayBackend.build`` looks up by its
#: module-global name; ``replace_actor_of`` writes the pool's future-to-actor map, which
#: ``process_message`` then hands to ``add_actor_back_to_pool``.
ACTOR_POOL_SOURCES = {
    f"{_POOL}.__init__": "b9c2ef0d7bfedaeb42788fe17a71efc11a46c0fb369f030d34d99b5bb4a1acef",
    f"{_POOL}.submit": "672402921baad47352ebe3133ebd90248314959ce3836f08b6c8723111ec17c9",
    f"{_POOL}.add_actor_back_to_pool":
        "e88f89e6e878f4ce106cf1ef59b4aec3f50882ce408d6df0ab7e1953cf375d96",
    f"{_POOL}.fetch_result_and_return_actor_to_pool":
        "4e9babbe276dedd796dea84d4b55d84d638300152602c4624ff7e9796a07a24a",
    f"{_VCE}.backend.raybackend:RayBackend.build":
        "6a0c387457a6dbc1b35091762c24afdd2c3453fe09eeceeb7e966136f832ddc0",
    f"{_VCE}.backend.raybackend:RayBackend.process_message":
        "32a5db14180222d31bb6d622529f0cccab652d4f6c35fd137560240da84010b7",
}

#: ``start_ray`` builds Flower's ``RayBackend`` on the caller's thread: its constructor
#: starts Ray (``init_ray``, with the backend config's ``init_args``), and the backend
#: ``run_simulation`` builds later finds Ray up and uses it as it is.
RAY_START_SOURCES = {
    f"{_VCE}.backend.raybackend:RayBackend.__init__":
        "7ba3f97cc09875cb0a91f8224e85932dac0abbcec52eac4a39e9066afe1afa72",
    f"{_VCE}.backend.raybackend:RayBackend.init_ray":
        "617470e8182cea2e3939034f68cf1122e5f9f7283d97cbcf1bd1d0396fa9e67f",
}

#: Every patch of this module and the Flower sources it depends on.
PATCHES = {"swap_message_handover": HANDOVER_SOURCES, "swap_actor_pool": ACTOR_POOL_SOURCES,
           "start_ray": RAY_START_SOURCES}


# ------------------------------------------------------------------ message hand-over

def swap_message_handover(replacement: Callable[..., None]) -> Callable[..., None] | None:
    """Put ``replacement`` in place of the Simulation Engine's ``add_messages_to_queue``.

    Parameters
    ----------
    replacement : callable
        Called as Flower's function is: ``(state, queue, nodes_mapping, f_stop)``.

    Returns
    -------
    callable or None
        The function now replaced (Flower's), or ``replacement`` when it was already in
        place; None when nothing was swapped (another Flower: its own function runs).
    """
    if not PIN.holds():
        return None
    from flwr.server.superlink.fleet.vce import vce_api

    current = vce_api.add_messages_to_queue
    vce_api.add_messages_to_queue = replacement
    return current


#: What the replacement needs of the link state (Flower's in-memory one has them all).
_STATE_INTERNALS = ("lock", "message_ins_store", "_check_stored_messages", "store_message_ins")


def has_in_memory_store(state: Any) -> bool:
    """True when ``state`` has the internals of Flower 1.42's in-memory link state."""
    return all(hasattr(state, name) for name in _STATE_INTERNALS)


def take_undelivered(state: Any, nodes: set[int]) -> list[Any]:
    """Every message for ``nodes`` not yet delivered, marked delivered, in storing order.

    Expired messages and those whose nodes left the federation are dropped, and the
    ``delivered_at`` stamp is set, as in Flower's ``get_message_ins``, but in one pass
    over the store for all nodes.
    """
    from flwr.supercore.date import now

    with state.lock:
        waiting = [mid for mid, m in state.message_ins_store.items()
                   if m.metadata.delivered_at == "" and m.metadata.dst_node_id in nodes]
        if not waiting:
            return []
        state._check_stored_messages(set(waiting))
        found = [m for mid in waiting if (m := state.message_ins_store.get(mid))]
        stamp = now().isoformat()
        for m in found:
            m.metadata.delivered_at = stamp
    return found


def wake_on_store(state: Any) -> threading.Event:
    """An event set whenever ``state`` stores a message (what it stores is unchanged)."""
    stored = threading.Event()
    store = state.store_message_ins

    def store_message_ins(message: Any) -> str | None:
        message_id = store(message)
        stored.set()
        return message_id

    # An instance attribute: the state's own methods call it through ``self`` too.
    state.store_message_ins = store_message_ins
    return stored


# ------------------------------------------------------------------------ actor pool

def swap_actor_pool(subclass: Callable[[type], type]) -> bool:
    """Make Flower's Ray backend build its actor pools from ``subclass(BasicActorPool)``.

    Idempotent: the class made is marked, and a marked pool is not wrapped again.

    Returns
    -------
    bool
        True when the backend now uses such a pool; False with another Flower (its own
        ``BasicActorPool`` stays).
    """
    if not PIN.holds():
        return False
    from flwr.server.superlink.fleet.vce.backend import raybackend

    base = raybackend.BasicActorPool
    if not getattr(base, "_fedecay_pool", False):
        pool = subclass(base)
        pool._fedecay_pool = True  # type: ignore[attr-defined]
        raybackend.BasicActorPool = pool  # type: ignore[misc,assignment]
    return True


def replace_actor_of(pool: Any, future: Any, actor: Any) -> None:
    """Make ``actor`` the one that goes back to ``pool`` once ``future``'s job is done."""
    pool._future_to_actor[future] = actor


# ------------------------------------------------------------------ Ray's start

def start_ray(backend_config: dict[str, Any]) -> bool:
    """Start Ray on this thread exactly as Flower's Ray backend would for
    ``backend_config`` (see :data:`RAY_START_SOURCES`).

    Returns
    -------
    bool
        True when Ray was started (or was up already); False with another Flower (Ray
        then starts inside ``run_simulation``, as Flower does it).
    """
    if not PIN.holds():
        return False
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    RayBackend(backend_config)
    return True
