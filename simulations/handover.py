"""Hand the ServerApp's messages to the ClientApp workers as soon as they are stored.

In Flower 1.42 the Simulation Engine moves instructions from its link state to the
workers' queue in ``add_messages_to_queue``
(``flwr/server/superlink/fleet/vce/vce_api.py``): every 0.1 s it asks the state, node
by node, for one undelivered message, and the in-memory state answers each question by
checking every stored message. A round's first message therefore waits up to 0.1 s
for a worker, and each scan costs nodes × stored messages checks in the driver (10,000
at 100 merchants, 1,000,000 at 1,000, ten times a second while a round runs); what
this module saves is measured in ``docs/performance.md``.

This module swaps that function for one that wakes when the state stores a message and
takes every undelivered message for the simulation's nodes in one pass over the store,
with the same expiry and federation checks and the same ``delivered_at`` stamp as
Flower's. It relies on the in-memory state's internals (``lock``,
``message_ins_store``, ``_check_stored_messages``), reached only through
``simulations.flower_seam``; with any other state, or another Flower version than the
seam's, Flower's own function runs.
"""

from __future__ import annotations

import logging
import threading
from queue import Queue
from typing import Any

from simulations import flower_seam

log = logging.getLogger(__name__)

#: Longest wait between two passes when no message is stored (as Flower's scan).
IDLE_WAIT_S = 0.1


def add_messages_to_queue(state: Any, queue: Queue, nodes_mapping: Any,
                          f_stop: threading.Event) -> None:
    """Flower's ``add_messages_to_queue`` without the fixed wait and the per-node scan."""
    if not flower_seam.has_in_memory_store(state):
        log.warning("the simulation's link state (%s) is not Flower 1.42's in-memory "
                    "one: messages are handed over by Flower's 0.1 s scan",
                    type(state).__name__)
        _FLOWER_SCAN(state, queue, nodes_mapping, f_stop)
        return
    nodes = set(nodes_mapping.keys())
    stored = flower_seam.wake_on_store(state)
    while not f_stop.is_set():
        stored.clear()  # a message stored during the pass wakes the next wait at once
        for message in flower_seam.take_undelivered(state, nodes):
            queue.put(message)
        stored.wait(IDLE_WAIT_S)


_FLOWER_SCAN: Any = None


def hand_over_at_once() -> None:
    """Make the Simulation Engine (in this process) use this module's hand-over.

    Idempotent; call it before ``run_simulation``. With another Flower version than
    ``simulations.flower_seam``'s, Flower's own hand-over stays (one warning).
    """
    global _FLOWER_SCAN
    replaced = flower_seam.swap_message_handover(add_messages_to_queue)
    if replaced is not None and replaced is not add_messages_to_queue:
        _FLOWER_SCAN = replaced
