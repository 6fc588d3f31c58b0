"""``fedecay simulate`` for timing SecAgg+ against plain FedAvg (README, Secure
aggregation, Overhead); not run by the tests.

    python tests/drivers/secagg_bench.py TRACE.jsonl simulate --preset default ...

Two things differ from the plain command:

- Flower's simulation draws its node ids at random, so two runs sample different
  merchants, and a merchant's first round builds its snapshots (0.2-4 s by size): round
  times then differ between runs by more than SecAgg+ costs. Here the ids come from a
  seeded generator (``FEDECAY_BENCH_NODE_SEED``, default 0), so every run of the same
  size samples the same merchants.
- ``FEDECAY_BENCH_KEYS_AHEAD=0`` turns the server's keys ahead off (``server.secagg``):
  each round's ``setup`` and ``share_keys`` then wait for the last round's evaluation.
- ``FEDECAY_BENCH_QUICK_DECODE=1`` / ``0`` turns the server's quick decoding of the
  masked vectors on / off (``server.secagg_workflow.quick_decode``; unset: the server's
  default).
- Every message a ClientApp handles is appended to ``TRACE.jsonl``: its stage (SecAgg+)
  or type, partition, when it was created and handled, and, under SecAgg+, the time
  spent inside ``secaggplus_mod``'s call to the training (``inner``).
- Each trace line also holds the seconds the process spent in Python's cyclic garbage
  collector during the handler (``gc``) and the full (generation 2) collections among
  them (``gc2``).
- The server's side goes into the same trace, one line each with a ``server`` key: every
  ``send_and_receive`` of the Grid (``send``: its stage or message type, round, the
  number of messages, when it started and returned, and the latest ``created_at`` of
  its replies, so the poll's share of a wait shows), every call of the round recorder
  (``recorder``: the centralised evaluation, the line in ``metrics.jsonl``, the
  checkpoint) and, under SecAgg+ with keys ahead, the main thread's wait for the next
  round's key stages (``keys_wait``).
- ``FEDECAY_BENCH_PROFILE=DIR``: each training handler after the first round
  (``collect_masked_vectors`` under SecAgg+, ``train`` without) runs under ``cProfile``,
  its statistics written to ``DIR/PID-ROUND-NODE-STAGE.prof`` (read them with
  ``pstats``).
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from typing import Any

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

_GC = {"seconds": 0.0, "full": 0, "started": 0.0}


def _gc_timer(phase: str, info: dict[str, int]) -> None:
    """``gc.callbacks`` hook: adds up the collector's time in this process."""
    if phase == "start":
        _GC["started"] = time.perf_counter()
    else:
        _GC["seconds"] += time.perf_counter() - _GC["started"]
        _GC["full"] += info["generation"] == 2


def traced(msg: Message, context: Context, call_next: Any) -> Message:
    """Outermost mod: one line per message into ``FEDECAY_BENCH_TRACE``."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    stage = str(configs.get(Key.STAGE)) if configs is not None else msg.metadata.message_type
    context.state.config_records.pop("bench", None)
    import gc

    if _gc_timer not in gc.callbacks:
        gc.callbacks.append(_gc_timer)
    gc_before = _GC["seconds"], _GC["full"]
    profile = os.environ.get("FEDECAY_BENCH_PROFILE")
    plain_config = msg.content.config_records.get("config")  # the Message API's train
    group = msg.metadata.group_id or str(plain_config.get("server-round", "")
                                         if plain_config is not None else "")
    profiler = None
    if profile and stage in ("collect_masked_vectors", "train") and group not in ("", "1"):
        import cProfile

        profiler = cProfile.Profile()
    started = time.time()
    if profiler is not None:
        reply = profiler.runcall(call_next, msg, context)
    else:
        reply = call_next(msg, context)
    ended = time.time()
    if profiler is not None and profile:
        profiler.dump_stats(os.path.join(profile, f"{os.getpid()}-{group}-"
                                                  f"{msg.metadata.dst_node_id}-{stage}.prof"))
    bench = context.state.config_records.pop("bench", None)
    line = {"pid": os.getpid(), "node": msg.metadata.dst_node_id, "stage": stage,
            "part": context.node_config.get("partition-id"), "group": group,
            "created": msg.metadata.created_at, "t0": started, "t1": ended,
            "inner": float(bench["inner"]) if bench else 0.0,  # type: ignore[arg-type]
            "gc": _GC["seconds"] - gc_before[0], "gc2": _GC["full"] - gc_before[1]}
    with open(os.environ["FEDECAY_BENCH_TRACE"], "a") as out:
        out.write(json.dumps(line) + "\n")
    return reply


def inner(msg: Message, context: Context, call_next: Any) -> Message:
    """Inside ``secaggplus_mod``: how long the training took."""
    started = time.time()
    reply = call_next(msg, context)
    context.state.config_records["bench"] = ConfigRecord({"inner": time.time() - started})
    return reply


class TracedApp(ClientApp):
    """The Message API ClientApp behind :func:`traced` (its mods are fixed at build)."""

    def __init__(self, app: ClientApp) -> None:  # noqa: D107 - no ClientApp state of its own
        self.app = app

    def __getattr__(self, name: str) -> Any:
        if name == "app":  # while unpickling
            raise AttributeError(name)
        return getattr(self.app, name)

    def __call__(self, message: Message, context: Context) -> Message:
        return traced(message, context, self.app)


def _server_line(line: dict[str, Any]) -> None:
    with open(os.environ["FEDECAY_BENCH_TRACE"], "a") as out:
        out.write(json.dumps(line) + "\n")


def trace_server() -> None:
    """Wrap the server's Grid, round recorder and key wait to write ``server`` lines."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    import server.pacing
    import server.recorder
    import server.secagg

    grid_class = server.pacing.PacedGrid  # the grid every server path sends through
    send = grid_class.send_and_receive

    def send_and_receive(self: Any, messages: Any, *, timeout: float | None = None) -> Any:
        messages = list(messages)
        first = messages[0] if messages else None
        kind, group = "", ""
        if first is not None:
            configs = first.content.config_records.get(RECORD_KEY_CONFIGS)
            kind = str(configs.get(Key.STAGE)) if configs is not None \
                else first.metadata.message_type
            group = first.metadata.group_id
        started = time.time()
        replies = list(send(self, messages, timeout=timeout))
        _server_line({"server": "send", "stage": kind, "group": group, "n": len(messages),
                      "t0": started, "t1": time.time(), "thread": threading.current_thread().name,
                      "last_reply": max((r.metadata.created_at for r in replies), default=0.0)})
        return replies

    grid_class.send_and_receive = send_and_receive  # type: ignore[method-assign]
    record = server.recorder.RoundRecorder.__call__

    def recorder(self: Any, server_round: int, arrays: Any) -> Any:
        started = time.time()
        try:
            return record(self, server_round, arrays)
        finally:
            _server_line({"server": "recorder", "group": str(server_round), "t0": started,
                          "t1": time.time()})

    server.recorder.RoundRecorder.__call__ = recorder  # type: ignore[method-assign,assignment]
    take = server.secagg._FitRound._take

    def keys_wait(self: Any, r: int) -> Any:
        started = time.time()
        try:
            return take(self, r)
        finally:
            _server_line({"server": "keys_wait", "group": str(r), "t0": started,
                          "t1": time.time()})

    server.secagg._FitRound._take = keys_wait  # type: ignore[method-assign]


def seeded_node_ids(seed: int) -> None:
    """Node ids from ``random.Random(seed)`` instead of the OS."""
    import flwr.server.superlink.linkstate.in_memory_linkstate as linkstate

    rng = random.Random(seed)

    def draw(num_bytes: int, exclude: set[int] | None = None) -> int:
        while True:
            value = rng.getrandbits(8 * num_bytes - 1) + 1
            if not exclude or value not in exclude:
                return value

    linkstate.generate_rand_int_from_bytes = draw  # type: ignore[attr-defined]


def main() -> None:
    import simulations.federated as federated
    from simulations.cli import main as cli

    os.environ["FEDECAY_BENCH_TRACE"] = os.path.abspath(sys.argv[1])
    seeded_node_ids(int(os.environ.get("FEDECAY_BENCH_NODE_SEED", "0")))
    trace_server()
    if os.environ.get("FEDECAY_BENCH_KEYS_AHEAD", "1") == "0":  # the rounds one by one
        import server.secagg

        server.secagg.keys_ahead = lambda: False  # type: ignore[attr-defined]
    quick = os.environ.get("FEDECAY_BENCH_QUICK_DECODE")
    if quick in ("0", "1"):
        import server.secagg_workflow

        server.secagg_workflow.quick_decode_default = (  # type: ignore[attr-defined]
            lambda: quick == "1")
    plain = federated.make_federated_client_app

    def make_app(flat: Any) -> Any:
        if federated.secure_aggregation(flat):
            from client.secagg import make_secagg_client_app

            return make_secagg_client_app(flat, outer_mods=[traced], inner_mods=[inner])
        return TracedApp(plain(flat))

    federated.make_federated_client_app = make_app
    sys.argv = ["fedecay", *sys.argv[2:]]
    cli()


if __name__ == "__main__":
    main()
