"""Flower strategies with the checks a federation of merchants needs.

``build_strategy`` picks FedAvg, FedProx, FedAdam, FedYogi, FedAvgM, FedTrimmedAvg,
FedMedian or Krum from ``flwr.serverapp.strategy`` and adds, through hooks rather
than a copy of ``start``:

- seeded node sampling: node ids sorted, drawn from the strategy's own ``random.Random``
  seeded per global round (Flower's ``sample_nodes`` draws from the ``random`` module);
- rejection of replies whose weights are non-finite or do not match the global
  model's dtypes and shapes, or that lack one ArrayRecord and one MetricRecord with a positive
  ``num-examples``, logged by node, before anything is averaged;
- replies sorted by content so the float sum is the same whatever order they came in;
- instructions sent largest merchant first (by the rows each last reported);
- each reply's tensors read once: checked, then handed to the aggregation as read;
- per-round bookkeeping: sampled / replied / failed / rejected nodes, bytes each way,
  rounds where no client replied; a sampled node with no reply at all is counted as
  failed and timed out (Flower's ``send_and_receive`` stops waiting after the round
  timeout and never hands its late reply to a later round).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import SType
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategy

from server import flower_seam
from server.config import FederationConfig

log = logging.getLogger(__name__)

@dataclasses.dataclass
class RoundStats:
    """What happened in one round, for ``metrics.jsonl``."""

    sampled: int = 0
    replied: int = 0
    failed: int = 0
    rejected: int = 0
    timed_out: int = 0  # sampled, no reply within the round timeout (also in ``failed``)
    bytes_down: int = 0
    bytes_up: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)
    client_eval: dict[str, float] = dataclasses.field(default_factory=dict)
    train: dict[str, float] = dataclasses.field(default_factory=dict)
    awaited: list[int] = dataclasses.field(default_factory=list)  # nodes sent a train message


class _SortedGrid:
    """A Grid whose node ids come sorted, so seeded sampling does not depend on order."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def get_node_ids(self) -> list[int]:
        return sorted(self._grid.get_node_ids())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class _OwnedSampling(flwr_strategy.FedAvg):
    """FedAvg's ``configure_train`` and ``configure_evaluate`` with the nodes drawn from
    ``round_rng``, the strategy's own RNG, where Flower's ``sample_nodes`` draws from the
    ``random`` module. ``build_strategy`` places it right after the chosen strategy and
    before FedAvg, so that strategy's own steps (FedProx's ``proximal-mu``, FedOpt's copy
    of the arrays) still run first. Same seed, same nodes as ``sample_nodes`` after
    ``random.seed``.
    """

    round_rng: random.Random

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.fraction_train == 0.0:
            return []
        nodes = self._sample(grid, self.fraction_train, self.min_train_nodes, "train")
        return self._messages(server_round, arrays, config, nodes, MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        nodes = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes, "evaluate")
        return self._messages(server_round, arrays, config, nodes, MessageType.EVALUATE)

    def _sample(self, grid: Grid, fraction: float, minimum: int, what: str) -> list[int]:
        """``flwr.serverapp.strategy.strategy_utils.sample_nodes``, drawing from
        ``round_rng``: wait for the nodes needed, then sample the share asked for."""
        size = max(int(len(list(grid.get_node_ids())) * fraction), minimum)
        needed = max(self.min_available_nodes, size)
        while len(nodes := list(grid.get_node_ids())) < needed:
            log.info("waiting for nodes to connect: %d connected, %d needed", len(nodes),
                     needed)
            time.sleep(1)
        sampled = self.round_rng.sample(nodes, size)
        log.info("configure_%s: sampled %d nodes (out of %d)", what, len(sampled), len(nodes))
        return sampled

    def _messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                  nodes: list[int], message_type: str) -> list[Message]:
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [Message(content=record, message_type=message_type, dst_node_id=node)
                for node in nodes]


def array_bytes(record: ArrayRecord) -> int:
    return int(sum(len(a.data) for a in record.values()))


def check_reply_records(content: RecordDict, weight_key: str) -> str | None:
    """Why a reply's records cannot be aggregated (FedAvg needs one ArrayRecord and one
    MetricRecord with a positive weight), or None when they can."""
    if len(content.array_records) != 1:
        return f"{len(content.array_records)} ArrayRecords, expected 1"
    if len(content.metric_records) != 1:
        return f"{len(content.metric_records)} MetricRecords, expected 1"
    weight = next(iter(content.metric_records.values())).get(weight_key)
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        return f"metric '{weight_key}' is {weight!r}, expected a positive number"
    return None


def error_summary(reason: str) -> str:
    """A one-line account of a failed reply's error reason.

    A ClientApp whose Ray actor process died (SIGKILL by the kernel's OOM killer or Ray's
    memory monitor, a crash) comes back from Flower's simulation engine as a multi-line
    ``ActorDiedError`` text; other reasons are kept as they are.
    """
    if "ActorDiedError" not in reason and "The actor died" not in reason:
        return reason
    pid = re.search(r"\bpid: (\d+)", reason)
    exit_type = re.search(r"Worker exit type: (\w+)", reason)
    who = f"ClientApp's Ray actor (pid {pid.group(1) if pid else '?'})"
    if exit_type and exit_type.group(1) == "NODE_OUT_OF_MEMORY":
        return f"{who} was killed by Ray's memory monitor: the node ran out of memory"
    how = f", worker exit {exit_type.group(1)}" if exit_type else ""
    return (f"{who} died{how}: killed by the OOM killer or another signal, or crashed "
            "(see the Ray log)")


class ReplyLayout:
    """How the global weights' tensors look serialized in a reply (Flower's ``Array``:
    a ``.npy`` header, then the raw values), to read a well-formed reply without parsing
    its headers: ``numpy()`` parses each header with ``ast.literal_eval``, ~36 us a
    tensor, which made reading the replies most of the server's aggregation time.
    A tensor whose header is byte for byte the expected one has exactly the expected
    dtype and shape; any other goes through ``numpy()``, and so does every tensor when
    ``server.flower_seam`` does not know the installed Flower's byte layout.
    """

    def __init__(self, reference: list[np.ndarray]) -> None:
        self.reference = [np.ascontiguousarray(r) for r in reference]
        self.heads = [flower_seam.npy_header(ref) for ref in self.reference]

    def read(self, i: int, array: Array) -> np.ndarray:
        ref, head = self.reference[i], self.heads[i]
        data = array.data
        if head is not None and array.stype == SType.NUMPY \
                and len(data) == len(head) + ref.nbytes and data.startswith(head):
            return np.frombuffer(data, ref.dtype, ref.size, len(head)).reshape(ref.shape)
        if array.stype != SType.NUMPY:
            raise TypeError(f"serialization type {array.stype!r}, expected {SType.NUMPY!r}")
        # Read the header first: a crafted one could claim a shape whose payload numpy
        # would allocate before finding the data short.
        stream = io.BytesIO(data)
        version = np.lib.format.read_magic(stream)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(stream)
        if dtype != ref.dtype:
            raise _Mismatch(f"has dtype {dtype}, expected {ref.dtype}")
        if tuple(shape) != ref.shape:
            raise _Mismatch(f"has shape {tuple(shape)}, expected {ref.shape}")
        return array.numpy()


class _Mismatch(ValueError):
    """A reply tensor whose header names another dtype or shape than the global one's."""


def read_reply_arrays(reply: ArrayRecord, layout: ReplyLayout
                      ) -> tuple[list[np.ndarray], str | None]:
    """A reply's tensors, and why they cannot be averaged in (None when they can)."""
    arrays = list(reply.values())
    if len(arrays) != len(layout.reference):
        return [], f"{len(arrays)} weight tensors, expected {len(layout.reference)}"
    values = []
    for i, (array, ref) in enumerate(zip(arrays, layout.reference, strict=True)):
        try:
            a = layout.read(i, array)
        except _Mismatch as err:
            return [], f"tensor {i} {err}"
        except Exception as err:  # noqa: BLE001 - untrusted bytes: any failure rejects
            return [], f"tensor {i} cannot be read ({type(err).__name__}: {err})"
        if not isinstance(a, np.ndarray):
            return [], f"tensor {i} is not an array ({type(a).__name__})"
        if a.dtype != ref.dtype:
            # Strings, structures, complex, bool or datetimes would either break the
            # average or be averaged into something meaningless.
            return [], f"tensor {i} has dtype {a.dtype}, expected {ref.dtype}"
        if a.shape != ref.shape:
            return [], f"tensor {i} has shape {a.shape}, expected {ref.shape}"
        if not np.all(np.isfinite(a)):
            return [], f"tensor {i} holds NaN or infinite values"
        values.append(a)
    return values, None


def _checked_record(record: ArrayRecord, values: list[np.ndarray]) -> ArrayRecord:
    """The reply's tensors, each giving its values already read and checked."""
    checked = ArrayRecord()  # item by item: the constructor would copy into plain Arrays
    for (key, array), value in zip(record.items(), values, strict=True):
        checked[key] = flower_seam.array_returning(array, value)
    return checked


class GuardedMixin:
    """Hooks added in front of a Flower strategy (see the module docstring)."""

    seed: int = 0
    round_offset: int = 0
    #: Differential privacy: every update counts the same (the noise assumes a plain mean).
    uniform_weights: bool = False
    #: What ``start`` gets as ``timeout``; named in the reason of a missing reply.
    round_timeout: float | None = None
    #: Set by whoever runs Flower's Simulation Engine when it failed: no round starts.
    engine_failed: threading.Event | None = None

    def _init_guard(self, seed: int, round_timeout: float | None = None,
                    engine_failed: threading.Event | None = None) -> None:
        self.seed = seed
        self.round_timeout = round_timeout
        self.engine_failed = engine_failed
        self.round_offset = 0
        self._screened_round: int | None = None
        self.stats: dict[int, RoundStats] = {}
        self.empty_rounds = 0
        self._examples: dict[int, float] = {}  # training rows each node last reported
        self._layout = ReplyLayout([])
        self.round_rng = random.Random(seed)  # replaced at the start of every round

    def global_round(self, server_round: int) -> int:
        return server_round + self.round_offset

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        g = self.global_round(server_round)
        if self.engine_failed is not None and self.engine_failed.is_set():
            log.error("round %d: not started, the simulation engine failed", g)
            self.stats.setdefault(g, RoundStats())
            return []
        config["global-round"] = g
        self._layout = ReplyLayout(arrays.to_numpy_ndarrays())
        self.round_rng = random.Random(self.seed * 1_000_003 + g)
        messages = list(super().configure_train(server_round, arrays, config,  # type: ignore[misc]
                                                _SortedGrid(grid)))
        # Largest merchants first (by the rows they reported, new ones before all): the
        # simulation's workers take messages in this order, and a big merchant left for
        # last keeps the round waiting on one worker while the others idle.
        messages.sort(key=lambda m: -self._examples.get(m.metadata.dst_node_id, math.inf))
        stats = self.stats.setdefault(g, RoundStats())
        stats.sampled = len(messages)
        stats.awaited = sorted(m.metadata.dst_node_id for m in messages)
        stats.bytes_down = array_bytes(arrays) * len(messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        g = self.global_round(server_round)
        if self._screened_round == g:  # a DP wrapper screened them before clipping
            self._screened_round = None
            good = list(replies)
        else:
            good = self.screen_train_replies(server_round, replies)
            self._screened_round = None
        if not good:
            return None, None
        good.sort(key=_reply_order)
        if self.uniform_weights:
            good = [_with_unit_weight(m, self.weighted_by_key) for m in good]  # type: ignore[attr-defined]
        arrays, metrics = super().aggregate_train(server_round, good)  # type: ignore[misc]
        if metrics is not None:
            self.stats[g].train = {k: float(v) for k, v in metrics.items()
                                   if isinstance(v, (int, float))}
        return arrays, metrics

    def screen_train_replies(self, server_round: int, replies: Iterable[Message]
                             ) -> list[Message]:
        """The replies that can be aggregated; the others are counted and logged by node."""
        g = self.global_round(server_round)
        self._screened_round = g
        stats = self.stats.setdefault(g, RoundStats())
        good: list[Message] = []
        answered: set[int] = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            answered.add(node)
            if msg.has_error():
                stats.failed += 1
                reason = error_summary(msg.error.reason)
                stats.failures.append(f"node {node}: {reason}")
                log.warning("round %d: node %s failed: %s", g, node, reason)
                continue
            reason = check_reply_records(msg.content, self.weighted_by_key)  # type: ignore[attr-defined]
            key, record = next(iter(msg.content.array_records.items()), (None, None))
            values: list[np.ndarray] = []
            if reason is None and record is not None:
                values, reason = read_reply_arrays(record, self._layout)
            if reason is not None:
                stats.rejected += 1
                stats.failures.append(f"node {node}: rejected: {reason}")
                log.warning("round %d: reply of node %s rejected before aggregation: %s",
                            g, node, reason)
                continue
            stats.bytes_up += array_bytes(record)
            msg.content[key] = _checked_record(record, values)
            self._examples[node] = float(next(iter(msg.content.metric_records.values()))[
                self.weighted_by_key])  # type: ignore[attr-defined]
            good.append(msg)
        self._count_missing(g, stats, answered)
        stats.replied = len(good)
        if not good:
            self.empty_rounds += 1
            log.warning("round %d: no client replied with usable weights; the global model "
                        "is unchanged (%d such rounds so far)", g, self.empty_rounds)
            return []
        good, odd = _common_metric_keys(good)
        for msg in odd:
            stats.rejected += 1
            stats.replied -= 1
            reason = "metric names differ from the other replies'"
            stats.failures.append(f"node {msg.metadata.src_node_id}: rejected: {reason}")
            log.warning("round %d: reply of node %s rejected: %s", g, msg.metadata.src_node_id,
                        reason)
        return good

    def _count_missing(self, g: int, stats: RoundStats, answered: set[int]) -> None:
        """Count sampled nodes that sent nothing: the round stopped waiting for them."""
        limit = f"{self.round_timeout:g} s" if self.round_timeout else "the round timeout"
        for node in stats.awaited:
            if node in answered:
                continue
            stats.failed += 1
            stats.timed_out += 1
            stats.failures.append(f"node {node}: no reply within round-timeout {limit}")
            log.warning("round %d: node %s sent no reply within round-timeout %s; the round "
                        "goes on without it and a late reply is never used", g, node, limit)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        replies = [m for m in replies if not m.has_error()
                   and len(m.content.metric_records) == 1]
        replies, _ = _common_metric_keys(replies)
        metrics = super().aggregate_evaluate(server_round, replies)  # type: ignore[misc]
        if metrics is not None:
            stats = self.stats.setdefault(self.global_round(server_round), RoundStats())
            stats.client_eval = {k: float(v) for k, v in metrics.items()
                                 if isinstance(v, (int, float))}
        return metrics


def _common_metric_keys(replies: list[Message]) -> tuple[list[Message], list[Message]]:
    """Split replies into those with the most common metric key set and the others.

    Flower's aggregation raises when key sets differ; one odd client must not stop a
    round.
    """
    if not replies:
        return [], []
    keys = [frozenset(next(iter(m.content.metric_records.values())).keys()) for m in replies]
    common = Counter(keys).most_common(1)[0][0]
    same = [m for m, k in zip(replies, keys, strict=True) if k == common]
    other = [m for m, k in zip(replies, keys, strict=True) if k != common]
    return same, other


def _with_unit_weight(msg: Message, key: str) -> Message:
    """The reply with its weight metric set to 1 (the message is changed in place)."""
    name, record = next(iter(msg.content.metric_records.items()))
    msg.content[name] = MetricRecord({**dict(record), key: 1})
    return msg


def _reply_order(msg: Message) -> tuple:
    metrics = next(iter(msg.content.metric_records.values()))
    record = next(iter(msg.content.array_records.values()))
    first = next(iter(record.values()))
    return (float(metrics.get("num-examples", 0)), float(metrics.get("train_loss", 0.0)),
            bytes(first.data[-64:]))  # values (the start is the .npy header)


_BASES: dict[str, type] = {
    "fedavg": flwr_strategy.FedAvg,
    "fedprox": flwr_strategy.FedProx,
    "fedadam": flwr_strategy.FedAdam,
    "fedyogi": flwr_strategy.FedYogi,
    "fedavgm": flwr_strategy.FedAvgM,
    "fedtrimmedavg": flwr_strategy.FedTrimmedAvg,
    "fedmedian": flwr_strategy.FedMedian,
    "krum": flwr_strategy.Krum,
}


def build_strategy(config: FederationConfig, seed: int, *,
                   engine_failed: threading.Event | None = None) -> Any:
    """The configured Flower strategy with the guard hooks in front of it.

    ``engine_failed``, when given and set, stops rounds from starting (see
    ``server.app.make_server_app``).
    """
    base = _BASES[config.strategy]
    sampling = (_OwnedSampling,) if base is flwr_strategy.FedAvg else (base, _OwnedSampling)
    cls = type(f"Guarded{base.__name__}", (GuardedMixin, *sampling), {})
    kwargs: dict[str, Any] = {
        "fraction_train": config.fraction_train,
        "fraction_evaluate": config.fraction_evaluate,
        "min_train_nodes": config.min_train_nodes,
        "min_evaluate_nodes": min(config.min_train_nodes, 2) if config.fraction_evaluate else 0,
        "min_available_nodes": config.min_available_nodes,
    }
    if config.strategy == "fedprox":
        kwargs["proximal_mu"] = config.proximal_mu
    elif config.strategy in ("fedadam", "fedyogi"):
        kwargs["eta"] = config.server_learning_rate
    elif config.strategy == "fedavgm":
        kwargs["server_momentum"] = config.server_momentum
    elif config.strategy == "fedtrimmedavg":
        kwargs["beta"] = config.trim_beta
    elif config.strategy == "krum":
        kwargs["num_malicious_nodes"] = config.num_malicious
    strategy = cls(**kwargs)
    strategy._init_guard(seed, config.round_timeout, engine_failed)
    return strategy
