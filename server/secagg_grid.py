"""What the SecAgg+ protocol's messages carry each round, and which nodes fail at which
stage: a Grid that meters them into the run's ``server.rounds.RoundBook``."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.serverapp import Grid

from server.rounds import RoundBook, error_summary

log = logging.getLogger(__name__)


def payload_bytes(content: RecordDict) -> int:
    """Bytes of tensors and byte strings in a message (weights, masked vectors, keys)."""
    total = sum(len(a.data) for rec in content.array_records.values() for a in rec.values())
    for rec in content.config_records.values():
        for value in rec.values():
            if isinstance(value, bytes):
                total += len(value)
            elif isinstance(value, list):
                total += sum(len(v) for v in value if isinstance(v, bytes))
    return total


def message_stage(content: RecordDict) -> str:
    """The SecAgg+ stage a message belongs to ("?" when it names none)."""
    configs = content.config_records.get(RECORD_KEY_CONFIGS)
    return str(configs.get(Key.STAGE, "?")) if configs is not None else "?"


class MeteredGrid:
    """A Grid that meters the SecAgg+ train messages of each round into ``rounds``.

    The workflow sends a round's messages with its server round as ``group_id``. Per
    round: bytes each way, the wall time of each stage, and every error or missing
    reply with its stage. One at the ``unmask`` stage does not drop the node's update
    (it was summed already), so only the earlier stages count towards ``timed_out``;
    how many nodes failed is settled when the round closes (sampled less summed).
    """

    def __init__(self, grid: Grid, rounds: RoundBook) -> None:
        self._grid = grid
        self.rounds = rounds

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        train = [m for m in messages if m.metadata.message_type == MessageType.TRAIN]
        if not train:
            return self._grid.send_and_receive(messages, timeout=timeout)
        stats = self.rounds.round(self.rounds.global_round(int(train[0].metadata.group_id)))
        stages = {m.metadata.dst_node_id: message_stage(m.content) for m in train}
        stats.bytes_down += sum(payload_bytes(m.content) for m in train)
        started = time.perf_counter()
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        step = message_stage(train[0].content)  # one stage per call
        stats.stage_seconds[step] = (stats.stage_seconds.get(step, 0.0)
                                     + time.perf_counter() - started)
        for reply in replies:
            node = reply.metadata.src_node_id
            stage = stages.pop(node, "?")
            if reply.has_error():
                reason = error_summary(reply.error.reason)
                stats.failures.append(f"node {node}: {reason} (secagg stage {stage})")
                log.warning("secure aggregation: node %s failed at stage %s: %s", node,
                            stage, reason)
            else:
                stats.bytes_up += payload_bytes(reply.content)
        limit = f"{timeout:g} s" if timeout else "the timeout"
        for node, stage in stages.items():  # sent, never answered
            if stage != Stage.UNMASK:
                stats.timed_out += 1
            stats.failures.append(f"node {node}: no reply within {limit} (secagg stage {stage})")
            log.warning("secure aggregation: node %s did not reply at stage %s", node, stage)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
