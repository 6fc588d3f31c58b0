"""What the SecAgg+ protocol's messages carry each round, and which nodes fail at which
stage: a Grid that meters them into the run's ``server.rounds.RoundBook``; it also hands
the workflow only the t shares of each secret that Shamir's reconstruction needs."""

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


def keep_threshold_shares(replies: list[Message], threshold: int) -> int:
    """Keep the first ``threshold`` shares of each secret in the ``unmask`` replies; the
    number of shares dropped.

    ``SecAggPlusWorkflow`` rebuilds each secret from every share it received, one from
    each live neighbour, and Shamir's reconstruction (pure Python, quadratic in the
    shares given) needs only ``threshold`` of them: the same secret from fewer shares,
    in about (t / k)**2 of the time (7 of 11 a secret at 20 clients a round).
    """
    kept: dict[int, int] = {}
    dropped = 0
    for reply in replies:
        if reply.has_error():
            continue
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is None or Key.NODE_ID_LIST not in configs:
            continue
        owners: list[int] = configs[Key.NODE_ID_LIST]  # type: ignore[assignment]
        shares: list[bytes] = configs[Key.SHARE_LIST]  # type: ignore[assignment]
        keep = []
        for i, owner in enumerate(owners):
            if kept.get(owner, 0) < threshold:
                kept[owner] = kept.get(owner, 0) + 1
                keep.append(i)
        dropped += len(owners) - len(keep)
        configs[Key.NODE_ID_LIST] = [owners[i] for i in keep]
        configs[Key.SHARE_LIST] = [shares[i] for i in keep]
    return dropped


def message_stage(content: RecordDict) -> str:
    """The SecAgg+ stage a message belongs to ("?" when it names none)."""
    configs = content.config_records.get(RECORD_KEY_CONFIGS)
    return str(configs.get(Key.STAGE, "?")) if configs is not None else "?"


class MeteredGrid:
    """A Grid that meters the SecAgg+ train messages of each round into ``rounds``.

    The workflow sends a round's messages with its server round as ``group_id``. Per
    round: bytes each way, the wall time of each stage, the server's own time before
    ``setup`` (``server_setup``: sampling and the instructions, from
    :meth:`start_round`), and every error or missing reply with its stage. One at the
    ``unmask`` stage does not drop the node's update (it was summed already), so only
    the earlier stages count towards ``timed_out``; how many nodes failed is settled
    when the round closes (sampled less summed). The strategy adds ``server_unmask``
    (from the last replies to its step: Shamir, masks, the step).
    """

    def __init__(self, grid: Grid, rounds: RoundBook) -> None:
        self._grid = grid
        self.rounds = rounds
        self._threshold = 0  # the round's, from its setup message
        self._round_started: float | None = None
        #: When the last stage's replies were all in (``time.perf_counter``).
        self.replied_at = time.perf_counter()

    def start_round(self) -> None:
        """Mark the start of a round's server work (before its clients are sampled)."""
        self._round_started = time.perf_counter()

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        train = [m for m in messages if m.metadata.message_type == MessageType.TRAIN]
        if not train:
            return self._grid.send_and_receive(messages, timeout=timeout)
        stats = self.rounds.round(self.rounds.global_round(int(train[0].metadata.group_id)))
        stages = {m.metadata.dst_node_id: message_stage(m.content) for m in train}
        stats.bytes_down += sum(payload_bytes(m.content) for m in train)
        step = message_stage(train[0].content)  # one stage per call
        if step == Stage.SETUP:
            configs = train[0].content.config_records[RECORD_KEY_CONFIGS]
            self._threshold = int(configs.get(Key.THRESHOLD, 0))  # type: ignore[arg-type]
        started = time.perf_counter()
        if step == Stage.SETUP and self._round_started is not None:
            stats.stage_seconds["server_setup"] = started - self._round_started
            self._round_started = None
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.replied_at = time.perf_counter()
        stats.stage_seconds[step] = (stats.stage_seconds.get(step, 0.0)
                                     + self.replied_at - started)
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
        if step == Stage.UNMASK and self._threshold:  # metered as sent, then trimmed
            keep_threshold_shares(replies, self._threshold)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
