"""Seeded faults of simulated merchants: dropouts, stragglers and crashes.

Each partition draws its fault of a round from ``[seed, round, partition]``, so a run
with the same seed fails the same way (the tests compute the expected failures from
the same draws).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from client.config import ClientConfig

log = logging.getLogger(__name__)

#: Error code of a simulated dropout.
SIMULATED_DROPOUT = 101


def planned_fault(cfg: ClientConfig, seed: int, server_round: int, pid: int) -> str | None:
    """The simulated fault of partition ``pid`` in ``server_round``: "dropout",
    "straggler", "crash" or None; one seeded draw each, in that order."""
    rng = np.random.default_rng([seed, server_round, pid])
    if rng.random() < cfg.dropout_prob:
        return "dropout"
    if rng.random() < cfg.straggler_prob:
        return "straggler"
    if rng.random() < cfg.crash_prob:
        return "crash"
    return None


def simulated_fault(cfg: ClientConfig, seed: int, node_config: Mapping[str, Any],
                    server_round: int) -> str | None:
    """Act out this node's planned fault of ``server_round``.

    A straggler sleeps ``straggler-delay`` seconds and goes on; a crash is a SIGKILL of
    this process (what the kernel's OOM killer does: no clean-up, no reply). Returns the
    reason to reply with for a dropout, else None. Deployment nodes (no
    ``partition-id``) never fault.
    """
    if "partition-id" not in node_config or \
            cfg.dropout_prob == cfg.straggler_prob == cfg.crash_prob == 0:
        return None
    pid = int(node_config["partition-id"])
    fault = planned_fault(cfg, seed, server_round, pid)
    if fault == "dropout":
        return f"simulated dropout of partition {pid} in round {server_round}"
    if fault == "straggler":
        time.sleep(cfg.straggler_delay)
    elif fault == "crash":
        log.error("simulated crash of partition %d in round %d: SIGKILL of process %d",
                  pid, server_round, os.getpid())
        os.kill(os.getpid(), signal.SIGKILL)
    return None
