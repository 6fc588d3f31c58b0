"""The federation: the guarded strategy's arithmetic, checkpoints, and real runs.

Unit tests hand-build Flower replies and compare the strategy's aggregate with the
weighted average computed here. The slow tests run real simulations (Ray, TensorFlow)
in subprocesses of their own session, so a stuck run is killed with everything it
started and its memory is released (``helpers.Simulation``, run by ``test_faults`` too):

- run A: 3 rounds, seeded dropout 0.3, partition 1's shard truncated, every reply
  recorded on the way into the strategy (egress whitelist, failures, reference weights);
- run B: the same configuration, SIGKILLed after round 2's checkpoint, then resumed;
  its final weights must equal run A's;
- ``flwr run .`` on a local SuperLink with FLWR_HOME in a temp folder.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as flwr_strategy
from helpers import (
    BIN,
    PROJECT,
    FakeGrid,
    Simulation,
    free_ports,
    kill_session,
    read_jsonl,
    sim_env,
    tail,
)

from client.app import EVALUATE_METRICS, TRAIN_METRICS
from common.attribution import ATTRIBUTION_METRICS
from common.feature_groups import GROUP_NAMES
from common.protocol import (
    HEAD_REFIT_GRADIENT,
    HEAD_REFIT_HESSIAN,
    HEAD_REFIT_LOSS,
    HEAD_REFIT_ROWS,
)
from server.checkpoint import (
    latest_checkpoint,
)
from server.config import FederationConfig
from server.replies import ReplyLayout, array_bytes, checked_record, read_reply_arrays
from server.strategy import build_strategy

# ---------------------------------------------------------------------------------------
# Hand-made replies
# ---------------------------------------------------------------------------------------

SHAPES = [(2, 3), (3,)]
#: Instruction messages take their run and node id from the running ServerApp.
pytestmark = pytest.mark.usefixtures("server_identity")


def _strategy(seed: int = 0, **kwargs: Any) -> Any:
    kwargs = {"min_train_nodes": 1, "min_available_nodes": 1, **kwargs}
    return build_strategy(FederationConfig(**kwargs), seed=seed)


def _instructions(strategy: Any, nodes: list[int], server_round: int = 1) -> list[Message]:
    """Train messages of ``server_round`` for ``nodes``; sets the strategy's reference."""
    reference = ArrayRecord([np.zeros(s, np.float32) for s in SHAPES])
    return list(strategy.configure_train(server_round, reference, ConfigRecord(),
                                         FakeGrid(nodes)))


def _reply(ins: Message, arrays: list[np.ndarray] | None, metrics: dict | None) -> Message:
    content = RecordDict()
    if arrays is not None:
        content["arrays"] = ArrayRecord(arrays)
    if metrics is not None:
        content["metrics"] = MetricRecord(metrics)
    return Message(content, reply_to=ins)


def _weights(rng: np.random.Generator, scale: float = 1.0) -> list[np.ndarray]:
    return [(scale * rng.normal(size=s)).astype(np.float32) for s in SHAPES]


def _weighted_average(weights: list[list[np.ndarray]], counts: list[int]) -> list[np.ndarray]:
    total = float(sum(counts))
    return [sum(n / total * w[i].astype(np.float64) for w, n in zip(weights, counts,
                                                                    strict=True))
            for i in range(len(SHAPES))]


def _by_node(messages: list[Message]) -> dict[int, Message]:
    return {m.metadata.dst_node_id: m for m in messages}


def test_fedavg_aggregate_is_the_example_weighted_average() -> None:
    strategy = _strategy()
    ins = _by_node(_instructions(strategy, [11, 12, 13]))
    rng = np.random.default_rng(0)
    weights = [_weights(rng) for _ in range(3)]
    counts, losses = [10, 30, 60], [0.5, 1.0, 2.0]
    replies = [_reply(ins[node], w, {"num-examples": n, "train_loss": loss})
               for node, w, n, loss in zip(ins, weights, counts, losses, strict=True)]

    arrays, metrics = strategy.aggregate_train(1, replies)

    got = arrays.to_numpy_ndarrays()
    expected = _weighted_average(weights, counts)
    assert [g.shape for g in got] == SHAPES
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-7)
    # The unweighted mean is far from it: the weights do matter in this example.
    assert not np.allclose(got[0], np.mean([w[0] for w in weights], axis=0), atol=1e-3)
    assert metrics["train_loss"] == pytest.approx((10 * 0.5 + 30 * 1.0 + 60 * 2.0) / 100)
    stats = strategy.rounds.stats[1]
    assert (stats.sampled, stats.replied, stats.failed, stats.rejected) == (3, 3, 0, 0)
    one = array_bytes(ArrayRecord([np.zeros(s, np.float32) for s in SHAPES]))
    assert stats.bytes_down == stats.bytes_up == 3 * one
    assert stats.train["train_loss"] == pytest.approx(1.55)


def test_reply_order_does_not_change_the_aggregate() -> None:
    """Replies are sorted before the float sum; plain FedAvg's sum depends on the order."""
    rng = np.random.default_rng(1)
    nodes = [21, 22, 23, 24, 25]
    weights = [_weights(rng, scale=10.0 ** k) for k in range(-2, 3)]
    counts = [3, 7, 11, 13, 17]

    def replies(order: tuple[int, ...]) -> list[Message]:
        ins = _by_node(_instructions(_strategy(), nodes))
        return [_reply(ins[nodes[i]], weights[i], {"num-examples": counts[i],
                                                   "train_loss": float(i)}) for i in order]

    def flat(arrays: ArrayRecord) -> bytes:
        return b"".join(a.tobytes() for a in arrays.to_numpy_ndarrays())

    def guarded(order: tuple[int, ...]) -> bytes:
        strategy = _strategy()
        _instructions(strategy, nodes)  # sets the reference shapes
        return flat(strategy.aggregate_train(1, replies(order))[0])

    def plain(order: tuple[int, ...]) -> bytes:
        fedavg = flwr_strategy.FedAvg(min_train_nodes=1, min_available_nodes=1)
        return flat(fedavg.aggregate_train(1, replies(order))[0])

    orders = list(itertools.permutations(range(5)))[::7]
    assert len({guarded(order) for order in orders}) == 1
    assert len({plain(order) for order in orders}) > 1, \
        "this example is not sensitive to the summation order; pick other numbers"


def test_nan_wrong_shape_malformed_and_error_replies_are_left_out() -> None:
    strategy = _strategy()
    nodes = list(range(101, 110))
    ins = _by_node(_instructions(strategy, nodes))
    rng = np.random.default_rng(2)
    good = [_weights(rng), _weights(rng)]
    nan = _weights(rng)
    nan[1][0] = np.nan
    inf = _weights(rng)
    inf[0][1, 2] = np.inf
    replies = [
        _reply(ins[101], good[0], {"num-examples": 4, "train_loss": 1.0}),
        _reply(ins[102], good[1], {"num-examples": 12, "train_loss": 2.0}),
        _reply(ins[103], nan, {"num-examples": 1000, "train_loss": 0.1}),
        _reply(ins[104], inf, {"num-examples": 1000, "train_loss": 0.1}),
        _reply(ins[105], [np.ones((3, 2), np.float32), np.ones(3, np.float32)],
               {"num-examples": 1000, "train_loss": 0.1}),
        _reply(ins[106], [np.ones((2, 3), np.float32)], {"num-examples": 1000,
                                                         "train_loss": 0.1}),
        _reply(ins[107], _weights(rng), None),
        _reply(ins[108], _weights(rng), {"num-examples": 0, "train_loss": 0.1}),
        Message(Error(code=100, reason="merchant data rejected: bad file"), reply_to=ins[109]),
    ]

    arrays, metrics = strategy.aggregate_train(1, replies)

    for g, e in zip(arrays.to_numpy_ndarrays(), _weighted_average(good, [4, 12]), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-7)
    assert metrics["train_loss"] == pytest.approx((4 * 1.0 + 12 * 2.0) / 16)
    stats = strategy.rounds.stats[1]
    assert (stats.sampled, stats.replied, stats.rejected, stats.failed) == (9, 2, 6, 1)
    failures = "\n".join(stats.failures)
    for node, reason in [
        (103, "rejected: tensor 1 holds NaN or infinite values"),
        (104, "rejected: tensor 0 holds NaN or infinite values"),
        (105, "rejected: tensor 0 has shape (3, 2), expected (2, 3)"),
        (106, "rejected: 1 weight tensors, expected 2"),
        (107, "rejected: 0 MetricRecords, expected 1"),
        (108, "rejected: metric 'num-examples' is 0, expected a positive number"),
        (109, "merchant data rejected: bad file"),
    ]:
        assert f"node {node}: {reason}" in failures
    assert "node 101" not in failures and "node 102" not in failures
    assert stats.bytes_up == 2 * array_bytes(ArrayRecord(good[0]))
    assert strategy.rounds.empty_rounds == 0


@pytest.mark.parametrize("bad", [
    np.ones((2, 3), np.float64), np.ones((2, 3), np.int32), np.ones((2, 3), bool),
    np.ones((2, 3), np.complex64), np.full((2, 3), "x"),
    np.zeros((2, 3), "datetime64[s]"), np.zeros((2, 3), [("a", "f4")]),
])
def test_reply_of_another_dtype_is_a_rejection_and_the_round_goes_on(bad: np.ndarray
                                                                      ) -> None:
    strategy = _strategy(seed=1)
    ins = _by_node(_instructions(strategy, [1, 2]))
    rng = np.random.default_rng(3)
    good = _weights(rng)
    replies = [_reply(ins[1], good, {"num-examples": 5, "train_loss": 1.0}),
               _reply(ins[2], [bad, np.ones(3, np.float32)], {"num-examples": 5,
                                                              "train_loss": 1.0})]
    arrays, _ = strategy.aggregate_train(1, replies)
    for got, want in zip(arrays.to_numpy_ndarrays(), good, strict=True):
        np.testing.assert_allclose(got, want)
    stats = strategy.rounds.stats[1]
    assert (stats.replied, stats.rejected) == (1, 1)
    assert f"node 2: rejected: tensor 0 has dtype {bad.dtype}, expected float32" in \
        stats.failures[0]


def test_instructions_go_out_largest_merchant_first() -> None:
    """Nodes by the rows they last reported, largest first; nodes not heard from yet
    first of all (the simulation's workers take messages in this order)."""
    strategy = _strategy()
    nodes = [31, 32, 33, 34, 35]
    first = _instructions(strategy, nodes)  # in the order sampled: no sizes known yet
    assert sorted(m.metadata.dst_node_id for m in first) == nodes
    rng = np.random.default_rng(5)
    rows = {31: 5, 32: 50, 33: 20, 34: 80}  # 35 fails: its size stays unknown
    replies = [_reply(m, _weights(rng), {"num-examples": rows[m.metadata.dst_node_id],
                                         "train_loss": 1.0})
               for m in first if m.metadata.dst_node_id in rows]
    strategy.aggregate_train(1, replies)
    second = _instructions(strategy, nodes, server_round=2)
    assert [m.metadata.dst_node_id for m in second] == [35, 34, 32, 33, 31]


def test_replies_are_read_once_whatever_their_serialized_form() -> None:
    """A reply serialized like the global weights is read without parsing its headers;
    any other form is read by Flower's ``numpy()``; an unreadable one is a reason."""
    rng = np.random.default_rng(4)
    reference = _weights(rng)
    layout = ReplyLayout(reference)
    sent = _weights(rng)
    values, reason = read_reply_arrays(ArrayRecord(sent), layout)
    assert reason is None
    for got, want in zip(values, sent, strict=True):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == want.dtype
    other = [np.asfortranarray(sent[0]), sent[1]]  # another header: read by numpy()
    values, reason = read_reply_arrays(ArrayRecord(other), layout)
    assert reason is None and values[0].dtype == sent[0].dtype
    np.testing.assert_array_equal(values[0], sent[0])
    good = ArrayRecord(sent)
    first = next(iter(good.values()))
    broken = ArrayRecord()
    for key, array in good.items():
        broken[key] = Array(dtype=array.dtype, shape=tuple(array.shape), stype=array.stype,
                            data=array.data[:-4] if array is first else array.data)
    values, reason = read_reply_arrays(broken, layout)
    assert values == [] and reason.startswith("tensor 0 cannot be read (ValueError")
    # What the aggregation gets once read: the values, a fresh copy at every call.
    checked = checked_record(good, read_reply_arrays(good, layout)[0])
    for got, want in zip(checked.to_numpy_ndarrays(), sent, strict=True):
        np.testing.assert_array_equal(got, want)
    checked.to_numpy_ndarrays()[0][:] = 7.0
    np.testing.assert_array_equal(checked.to_numpy_ndarrays()[0], sent[0])


def test_round_without_usable_replies_returns_nothing_and_is_counted() -> None:
    strategy = _strategy(seed=3)
    strategy.rounds.offset = 4  # a resumed run: server round 1 is global round 5
    ins = _by_node(_instructions(strategy, [1, 2]))
    config = next(iter(ins.values())).content["config"]
    assert (config["server-round"], config["global-round"]) == (1, 5)
    failed = [Message(Error(code=101, reason=f"simulated dropout {n}"), reply_to=ins[n])
              for n in ins]

    assert strategy.aggregate_train(1, failed) == (None, None)
    assert strategy.rounds.empty_rounds == 1
    assert 1 not in strategy.rounds.stats
    stats = strategy.rounds.stats[5]
    assert (stats.sampled, stats.replied, stats.failed, stats.rejected) == (2, 0, 2, 0)
    assert sorted(stats.failures) == ["node 1: simulated dropout 1",
                                      "node 2: simulated dropout 2"]

    ins = _by_node(_instructions(strategy, [1, 2], server_round=2))
    nan = [np.full(s, np.nan, np.float32) for s in SHAPES]
    rejected = [_reply(ins[n], nan, {"num-examples": 5, "train_loss": 1.0}) for n in ins]
    assert strategy.aggregate_train(2, rejected) == (None, None)
    assert strategy.rounds.empty_rounds == 2
    assert (strategy.rounds.stats[6].rejected, strategy.rounds.stats[6].replied) == (2, 0)


def test_reply_with_odd_metric_names_is_left_out_not_fatal() -> None:
    strategy = _strategy()
    ins = _by_node(_instructions(strategy, [1, 2, 3]))
    rng = np.random.default_rng(7)
    weights = {n: _weights(rng) for n in ins}
    replies = [_reply(ins[1], weights[1], {"num-examples": 10, "train_loss": 1.0}),
               _reply(ins[2], weights[2], {"num-examples": 30, "train_loss": 2.0}),
               _reply(ins[3], weights[3], {"num-examples": 60, "train_loss": 3.0, "x": 1.0})]
    arrays, _ = strategy.aggregate_train(1, replies)
    expected = _weighted_average([weights[1], weights[2]], [10, 30])
    for got, want in zip(arrays.to_numpy_ndarrays(), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    stats = strategy.rounds.stats[1]
    assert (stats.replied, stats.rejected) == (2, 1)
    assert stats.failures == ["node 3: rejected: metric names differ from the other replies'"]


def test_sampled_node_without_a_reply_is_named_as_timed_out() -> None:
    """``send_and_receive`` hands over what came in before the round timeout: the
    silent node is counted and named, the aggregate is over the on-time replies."""
    strategy = _strategy(round_timeout=5)
    ins = _by_node(_instructions(strategy, [1, 2, 3, 4]))
    rng = np.random.default_rng(8)
    weights = {n: _weights(rng) for n in (1, 4)}
    replies = [_reply(ins[4], weights[4], {"num-examples": 30, "train_loss": 2.0}),
               Message(Error(code=101, reason="simulated dropout"), reply_to=ins[3]),
               _reply(ins[1], weights[1], {"num-examples": 10, "train_loss": 1.0})]

    arrays, metrics = strategy.aggregate_train(1, replies)

    expected = _weighted_average([weights[1], weights[4]], [10, 30])
    for got, want in zip(arrays.to_numpy_ndarrays(), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert metrics["train_loss"] == pytest.approx((10 * 1.0 + 30 * 2.0) / 40)
    stats = strategy.rounds.stats[1]
    assert (stats.sampled, stats.replied, stats.failed, stats.timed_out, stats.rejected) \
        == (4, 2, 2, 1, 0)
    assert stats.failures == ["node 3: simulated dropout",
                              "node 2: no reply within round-timeout 5 s"]

    # Nobody answers in time: the round is empty and every node is named.
    _instructions(strategy, [1, 2], server_round=2)
    assert strategy.aggregate_train(2, []) == (None, None)
    assert strategy.rounds.empty_rounds == 1
    assert (strategy.rounds.stats[2].failed, strategy.rounds.stats[2].timed_out) == (2, 2)
    assert strategy.rounds.stats[2].failures == ["node 1: no reply within round-timeout 5 s",
                                          "node 2: no reply within round-timeout 5 s"]


def test_sampling_is_seeded_by_global_round_and_ignores_node_order() -> None:
    nodes = list(range(300, 310))

    def sampled(seed: int, order: list[int], server_round: int, offset: int = 0) -> list[int]:
        strategy = _strategy(seed=seed, fraction_train=0.5)
        strategy.rounds.offset = offset
        return sorted(m.metadata.dst_node_id
                      for m in _instructions(strategy, order, server_round))

    shuffled = [int(n) for n in np.random.default_rng(4).permutation(nodes)]
    for r in (1, 2, 3):
        first = sampled(0, nodes, r)
        assert len(first) == 5 and set(first) <= set(nodes)
        assert sampled(0, shuffled, r) == first
        assert sampled(0, nodes[::-1], r) == first
    # A resumed run (server round 1 after 2 rounds) samples what round 3 sampled.
    assert sampled(0, shuffled, 1, offset=2) == sampled(0, nodes, 3)
    # Seed and round do change the sample (over several rounds at least once).
    assert any(sampled(0, nodes, r) != sampled(1, nodes, r) for r in range(1, 6))
    assert len({tuple(sampled(0, nodes, r)) for r in range(1, 6)}) > 1


class EchoGrid(FakeGrid):
    """Nodes that send the global weights straight back: a round with no training."""

    def send_and_receive(self, messages: Any, *, timeout: float | None = None
                         ) -> list[Message]:
        return [Message(RecordDict({"arrays": m.content["arrays"],
                                    "metrics": MetricRecord({"num-examples": 10})}),
                        reply_to=m) for m in messages]


def test_eval_every_scores_the_global_model_on_those_rounds_and_the_last(
        tmp_path: Path) -> None:
    from server.app import run_federation
    from server.config import settings_from_flat
    from simulations.experiment import prepare
    from simulations.settings import experiment_from_flat, resolve

    exp = experiment_from_flat({**resolve("quick").flat, "synthetic.num-merchants": 2})
    snaps = prepare(exp).snapshots
    snaps.subset(snaps.split > 0).save(tmp_path / "eval.npz")
    flat = {**exp.flat, "federation.num-rounds": 5, "federation.eval-every": 2,
            "federation.min-available-nodes": 2, "federation.min-train-nodes": 2,
            "federation.run-dir": str(tmp_path / "run"),
            "federation.eval-data": str(tmp_path / "eval.npz")}
    summary = run_federation(EchoGrid([1, 2]), settings_from_flat(flat))

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [bool(r["centralised"]) for r in rows] == [True, False, True, False, True, True]
    assert all(r["replied"] == 2 for r in rows[1:])  # every round ran and was logged
    assert summary["selected_round"] in (0, 2, 4, 5)


def test_sampling_draws_from_the_strategys_own_rng_and_leaves_the_module_alone() -> None:
    import random

    nodes = list(range(300, 310))
    random.seed(7)
    state = random.getstate()
    strategy = _strategy(seed=3, fraction_train=0.5, fraction_evaluate=0.3,
                         min_available_nodes=1)
    train = [m.metadata.dst_node_id for m in _instructions(strategy, nodes[::-1], 2)]
    reference = ArrayRecord([np.zeros(s, np.float32) for s in SHAPES])
    evaluate = [m.metadata.dst_node_id for m in strategy.configure_evaluate(
        2, reference, ConfigRecord(), FakeGrid(nodes))]
    assert random.getstate() == state
    # What the module's RNG seeded with seed * 1_000_003 + round drew (the earlier code):
    # the train sample from the sorted ids, then the evaluate sample.
    expected = random.Random(3 * 1_000_003 + 2)
    assert sorted(train) == sorted(expected.sample(nodes, 5))
    assert evaluate == expected.sample(nodes, 3)


def test_engine_failure_is_the_runs_own_event(tmp_path: Path) -> None:
    import threading

    from server.app import run_federation
    from server.config import settings_from_flat
    from simulations.settings import experiment_from_flat, resolve

    failed = threading.Event()
    strategy = build_strategy(FederationConfig(min_train_nodes=1, min_available_nodes=1),
                              seed=0, engine_failed=failed)
    assert len(_instructions(strategy, [1, 2])) == 2
    failed.set()
    assert _instructions(strategy, [1, 2], server_round=2) == []
    assert len(_instructions(_strategy(), [1, 2])) == 2  # another run's strategy goes on
    # Set before the rounds: round 0 is recorded, then the run stops.
    exp = experiment_from_flat(resolve("quick").flat)
    flat = {**exp.flat, "federation.num-rounds": 3, "federation.min-available-nodes": 2,
            "federation.min-train-nodes": 2, "federation.run-dir": str(tmp_path / "run")}
    summary = run_federation(EchoGrid([1, 2]), settings_from_flat(flat), engine_failed=failed)
    assert summary["stop_reason"] == "engine-failed"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["round"] for r in rows] == [0]


# ---------------------------------------------------------------------------------------
# Simulations (subprocesses in their own session)
# ---------------------------------------------------------------------------------------

SEED = 0
NUM_MERCHANTS = 8  # the quick preset
DROPOUT = 0.3
CORRUPT = 1  # this partition's shard is truncated before the run
ROUNDS = 3

def _overrides(tmp: Path, *extra: str) -> list[str]:
    return [f"federation.num-rounds={ROUNDS}", "federation.local-epochs=1",
            "federation.fraction-evaluate=1.0", f"simulation.dropout-prob={DROPOUT}",
            "federation.attributions=true",
            f"experiment.seed={SEED}", f"experiment.output-dir={tmp}", *extra]


def _reasons(row: dict[str, Any]) -> list[str]:
    """A round's failure reasons without the node ids (those differ between runs)."""
    return sorted(re.sub(r"^node \d+: ", "", f) for f in row["failures"])


def _expected_failures(global_round: int) -> list[str]:
    """Seeded dropout computed here: each partition's draw from [seed, round, partition]."""
    reasons = []
    for pid in range(NUM_MERCHANTS):
        if pid == CORRUPT:  # its data fail to load before the dropout draw
            reasons.append("merchant data rejected")
        elif np.random.default_rng([SEED, global_round, pid]).random() < DROPOUT:
            reasons.append(f"simulated dropout of partition {pid} in round {global_round}")
    return sorted(reasons)


@pytest.fixture(scope="module")
def run_a(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulation]:
    """Run A: uninterrupted, every reply recorded as the strategy receives it."""
    tmp = tmp_path_factory.mktemp("run-a")
    sim = Simulation(tmp, "run-a", tmp / "run", _overrides(tmp),
                     observe=tmp / "replies.jsonl", corrupt=[CORRUPT])
    try:
        sim.wait(timeout=420)
        yield sim
    finally:
        sim.stop()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_replies_carry_only_weights_and_whitelisted_metrics(run_a: Simulation) -> None:
    expected = json.loads(Path(f"{run_a.observe}.expected.json").read_text())
    shapes = [shape for shape, _ in expected["weights"]]
    dtypes = {dtype for _, dtype in expected["weights"]}
    rows = read_jsonl(run_a.observe)
    train = [r for r in rows if r["kind"] == "train" and "error" not in r]
    evaluate = [r for r in rows if r["kind"] == "evaluate" and "error" not in r]
    # 8 merchants, one with a broken file, seeded dropouts: 5 + 4 + 5 train replies.
    assert len(train) == sum(NUM_MERCHANTS - len(_expected_failures(g))
                             for g in range(1, ROUNDS + 1)) == 14
    assert len(evaluate) == ROUNDS * (NUM_MERCHANTS - 1)
    assert len(expected["merchants"]) == NUM_MERCHANTS
    assert expected["ids"] > 100  # the user and item ids searched for in every reply
    for r in train:
        assert list(r["arrays"]) == ["arrays"] and list(r["metrics"]) == ["metrics"], r
        tensors = r["arrays"]["arrays"]
        assert [shape for _, shape, _ in tensors] == shapes, r
        assert {dtype for _, _, dtype in tensors} == dtypes
        assert set(r["metrics"]["metrics"]) <= set(TRAIN_METRICS), r["metrics"]
        assert set(r["metrics"]["metrics"].values()) <= {"int", "float"}
        assert r["configs"] == [] and r["leaked"] == [], r
    for r in evaluate:
        assert r["arrays"] == {} and list(r["metrics"]) == ["metrics"], r
        assert set(r["metrics"]["metrics"]) <= set(EVALUATE_METRICS), r["metrics"]
        assert set(r["metrics"]["metrics"].values()) <= {"int", "float"}
        assert r["configs"] == [] and r["leaked"] == [], r


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_merchants_global_attributions_are_scalars_weighted_into_one_file(
        run_a: Simulation) -> None:
    """After the last round each merchant explains the kept model on its own validation
    rows; the replies hold only whitelisted scalars and the run folder their aggregate."""
    replies = [r for r in read_jsonl(run_a.observe) if r["kind"] == "attributions"]
    answered = [r for r in replies if "error" not in r]
    assert len(replies) == NUM_MERCHANTS and len(answered) == NUM_MERCHANTS - 1  # CORRUPT
    for r in answered:
        assert r["arrays"] == {} and list(r["metrics"]) == ["metrics"], r
        assert set(r["metrics"]["metrics"]) <= set(ATTRIBUTION_METRICS), r["metrics"]
        assert set(r["metrics"]["metrics"]) <= set(EVALUATE_METRICS)
        assert r["configs"] == [] and r["leaked"] == [], r
    out = json.loads((run_a.run_dir / "attributions.json").read_text())
    assert out["status"] == "ok" and out["merchants"] == NUM_MERCHANTS - 1
    (failure,) = out["failures"]  # the merchant whose file is broken
    assert re.sub(r"^node \d+: ", "", failure).startswith("merchant data rejected"), failure
    summary = json.loads((run_a.run_dir / "federation.json").read_text())
    assert out["model_round"] == summary["selected_round"]
    assert out["rows"] > 0 and set(out["groups"]) == set(GROUP_NAMES)
    assert all(math.isfinite(g["log_loss_rise"]) for g in out["groups"].values())
    # event_mix's ids have no gradient; its aggregates (the funnel's rates) do.
    assert out["groups"]["event_mix"]["grad_input"] > 0
    assert out["groups"]["recency"]["grad_input"] > 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_head_refit_asks_every_merchant_and_only_enough_rows_answer(
        run_a: Simulation) -> None:
    """After the last round every merchant is asked for its head sums
    (``federation.head-refit-steps``); on the quick preset's small merchants each declines
    with the rows it would need (the sums of so few rows would give them away) or its
    data error; any that answers sends exactly the four whitelisted sums, sized for the
    head, and is asked again at each step."""
    from common.head_refit import head_vector
    from common.model import load_model

    replies = [r for r in read_jsonl(run_a.observe) if r["kind"] == "head_refit"]
    answered = [r for r in replies if "error" not in r]
    declined = [r for r in replies if "error" in r]
    assert len(declined) <= NUM_MERCHANTS and len(replies) >= NUM_MERCHANTS
    first = NUM_MERCHANTS - len(declined)  # who answered step 1
    assert len(replies) == NUM_MERCHANTS + 2 * first and len(answered) == 3 * first
    for r in declined:  # the broken file, or too few campaign rows for three steps
        assert ("merchant data rejected" in r["error"]
                or "-step refit of a" in r["error"]), r["error"]
    assert sum("merchant data rejected" in r["error"] for r in declined) == 1  # CORRUPT
    model = load_model(run_a.run_dir / "model.keras")
    assert {r["head_size"] for r in replies} == {len(head_vector(model, model.get_weights()))}
    for r in answered:
        assert r["arrays"] == {} and list(r["metrics"]) == ["metrics"], r
        assert r["metrics"]["metrics"] == {HEAD_REFIT_ROWS: "int", HEAD_REFIT_LOSS: "float",
                                           HEAD_REFIT_GRADIENT: "list",
                                           HEAD_REFIT_HESSIAN: "list"}, r["metrics"]
        assert r["configs"] == [] and r["leaked"] == [], r
    refit = json.loads((run_a.run_dir / "federation.json").read_text())["head_refit"]
    assert refit["merchants"][0] == first and sum(refit["merchants"]) == len(answered)
    assert len(refit["failures"]) == len(declined)
    if first:
        assert refit["status"] == "ok" and refit["steps"] == 3
        assert refit["mean_loss"][refit["kept_step"]] == min(refit["mean_loss"])
    else:
        assert refit["status"] == "no-replies" and refit["kept_step"] == 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_failing_clients_are_recorded_and_the_run_completes(run_a: Simulation) -> None:
    rows = read_jsonl(run_a.run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    for row in rows[1:]:
        g = row["round"]
        want = _expected_failures(g)
        assert row["failed"] == len(want) >= 1, row
        assert row["sampled"] == NUM_MERCHANTS and row["rejected"] == 0
        assert row["replied"] == NUM_MERCHANTS - len(want)
        reasons = _reasons(row)
        data_error = "merchant data rejected"
        assert sorted(data_error if r.startswith(data_error) else r for r in reasons) == want
        broken = [r for r in reasons if r.startswith(data_error)]
        # The kind of error reaches the server; the file's path and contents do not.
        assert len(broken) == 1 and "(DataError)" in broken[0], broken
        assert "00001" not in broken[0] and "/" not in broken[0], broken
        assert math.isfinite(row["centralised"]["val_loss"])
        assert math.isfinite(row["client_eval"]["eval_loss"])  # 7 merchants evaluated
    assert (run_a.run_dir / "model.keras").stat().st_size > 0
    summary = json.loads((run_a.run_dir / "federation.json").read_text())
    assert summary["empty_rounds"] == 0 and summary["resumed_from"] == 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_run_resumes_to_the_same_weights(run_a: Simulation, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "round-00002.npz"
    killed = Simulation(tmp_path, "run-b1", run_dir, _overrides(tmp_path), corrupt=[CORRUPT])
    try:
        deadline = time.monotonic() + 420
        while not ckpt.exists():  # written after round 2's line in metrics.jsonl
            assert killed.proc.poll() is None, f"ended before the kill\n{tail(killed.log)}"
            assert time.monotonic() < deadline, f"no round 2 checkpoint\n{tail(killed.log)}"
            time.sleep(0.2)
    finally:
        left = killed.stop()
    assert left == [], f"processes outlived the SIGKILL of their session: {left}"
    assert latest_checkpoint(run_dir / "checkpoints") == ckpt
    assert [r["round"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [0, 1, 2]
    assert not (run_dir / "final_weights.npz").exists()

    resumed = Simulation(tmp_path, "run-b2", run_dir,
                         _overrides(tmp_path, "federation.resume=true"), corrupt=[CORRUPT])
    try:
        resumed.wait(timeout=420)
    finally:
        resumed.stop()

    summary = json.loads((run_dir / "federation.json").read_text())
    assert summary["resumed_from"] == 2
    a = np.load(run_a.run_dir / "final_weights.npz")
    b = np.load(run_dir / "final_weights.npz")
    assert len(a.files) == len(b.files) > 0
    for key in a.files:
        np.testing.assert_array_equal(b[key], a[key], err_msg=key)
    rows_a = read_jsonl(run_a.run_dir / "metrics.jsonl")
    rows_b = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows_b] == list(range(ROUNDS + 1))  # round 0 not redone
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert rb["centralised"] == ra["centralised"], rb["round"]
        if rb["round"]:
            assert _reasons(rb) == _reasons(ra) and rb["replied"] == ra["replied"]
    summary_a = json.loads((run_a.run_dir / "federation.json").read_text())
    assert summary["selected_round"] == summary_a["selected_round"]


# ---------------------------------------------------------------------------------------
# `flwr run .` on a local SuperLink
# ---------------------------------------------------------------------------------------


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _local_superlink_pids(flwr_home: Path) -> list[int]:
    """The SuperLink ``flwr run`` started for this FLWR_HOME and its SuperExec."""
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    links = [p for p in pids if "flower-superlink" in _cmdline(p)
             and f"{flwr_home}/local-superlink/" in _cmdline(p)]
    execs = [p for p in pids for link in links if "flower-superexec" in _cmdline(p)
             and f"--parent-pid {link}" in _cmdline(p)]
    return links + execs


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_flwr_run_on_a_local_superlink(tmp_path: Path) -> None:
    if not (BIN / "flwr").exists() or not (BIN / "flower-superlink").exists():
        pytest.skip(f"flwr / flower-superlink not installed beside {sys.executable}")
    flwr_home = tmp_path / "flwr-home"
    http_port, control_port = free_ports(2)
    env = {**sim_env(flwr_home),  # a SuperLink of our own, whatever else runs here
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
           "FLWR_LOCAL_CONTROL_API_PORT": str(control_port)}
    pyproject = (PROJECT / "pyproject.toml").read_bytes()
    log = tmp_path / "flwr-run.log"
    started = time.monotonic()
    try:
        with log.open("wb") as out:
            done = subprocess.run(
                [str(BIN / "flwr"), "run", ".", "--stream",
                 "-c", "federation.num-rounds=1",
                 "--federation-config",
                 f"num-supernodes={NUM_MERCHANTS} client-resources-num-cpus=1"],
                cwd=PROJECT, env=env, stdout=out, stderr=subprocess.STDOUT,
                timeout=480, check=False,
            )
    finally:
        servers = _local_superlink_pids(flwr_home)
        for pid in servers:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(3)
        for pid in servers:  # each one's session: the simulation and Ray, if still up
            kill_session(pid)
    seconds = time.monotonic() - started
    assert servers, f"no local SuperLink found for {flwr_home}\n{tail(log)}"
    assert _local_superlink_pids(flwr_home) == []
    assert done.returncode == 0, tail(log)
    assert (PROJECT / "pyproject.toml").read_bytes() == pyproject
    runs = sorted((flwr_home / "runs").glob("flwr-run-quick-*"))
    assert len(runs) == 1, f"{runs}\n{tail(log)}"
    rows = read_jsonl(runs[0] / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1], tail(log)
    assert (rows[1]["sampled"], rows[1]["replied"], rows[1]["failed"]) == (8, 8, 0)
    assert json.loads((runs[0] / "federation.json").read_text())["rounds"] == 1
    assert (runs[0] / "model.keras").exists() and (runs[0] / "resolved-config.json").exists()
    assert seconds < 480


def test_shard_cache_keeps_what_fits_and_drops_the_least_recently_used(
        tmp_path: Path) -> None:
    import dataclasses

    from client.shards import ShardCache
    from common.config import SnapshotConfig
    from simulations.synth import generate_federation, load_preset, synth_config_from_preset

    cfg = dataclasses.replace(synth_config_from_preset(load_preset("quick")),
                              num_merchants=3, users_median=20, min_users=10, days=90)
    events = generate_federation(cfg, seed=2).events
    paths = []
    for merchant, rows in events.groupby("merchant_id", observed=True):
        paths.append(str(tmp_path / f"{merchant}.parquet"))
        rows.to_parquet(paths[-1], index=False)
    snap_cfg = SnapshotConfig()
    sizes = []
    for p in paths:
        alone = ShardCache(max_bytes=2**40)
        first = alone.load(p, "canonical", None, snap_cfg)
        assert alone.load(p, "canonical", None, snap_cfg) is first
        sizes.append(alone.nbytes)
    assert min(sizes) > 0
    # Room for any two shards, not three: loading 2 after using 0 drops 1, the least recent.
    cache = ShardCache(max_bytes=sum(sizes) - 1)
    first = cache.load(paths[0], "canonical", None, snap_cfg)
    second = cache.load(paths[1], "canonical", None, snap_cfg)
    assert cache.load(paths[0], "canonical", None, snap_cfg) is first
    cache.load(paths[2], "canonical", None, snap_cfg)
    assert [key[0] for key in cache.keys()] == [paths[0], paths[2]]
    assert cache.nbytes == sizes[0] + sizes[2]
    assert cache.load(paths[1], "canonical", None, snap_cfg) is not second
    # Too small for any shard: the newest is kept all the same.
    tiny = ShardCache(max_bytes=0)
    for p in paths:
        tiny.load(p, "canonical", None, snap_cfg)
    assert [key[0] for key in tiny.keys()] == [paths[2]]


def test_shard_cache_size_comes_from_the_environment_when_the_app_is_built() -> None:
    from client.shards import process_shard_cache, shard_cache_bytes

    assert shard_cache_bytes({}) == 2048 * 2**20
    assert shard_cache_bytes({"FEDECAY_SHARD_CACHE_MB": "3"}) == 3 * 2**20
    for bad in ("", "1.5", "-1", "lots"):
        with pytest.raises(ValueError, match=f"FEDECAY_SHARD_CACHE_MB .* got {bad!r}"):
            shard_cache_bytes({"FEDECAY_SHARD_CACHE_MB": bad})
    # One cache per process and size: what every message of a Ray actor shares.
    assert process_shard_cache(5 * 2**20) is process_shard_cache(5 * 2**20)
    assert process_shard_cache(5 * 2**20).max_bytes == 5 * 2**20
    assert process_shard_cache(6 * 2**20) is not process_shard_cache(5 * 2**20)


def test_simulation_shards_keep_their_snapshots_beside_them_for_other_processes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses
    import os

    from client import app as client_app
    from client import shards
    from common.config import SnapshotConfig
    from simulations.synth import generate_federation, load_preset, synth_config_from_preset

    cfg = dataclasses.replace(synth_config_from_preset(load_preset("quick")),
                              num_merchants=1, users_median=20, min_users=10, days=90)
    path = str(tmp_path / "00000.parquet")
    generate_federation(cfg, seed=3).events.to_parquet(path, index=False)
    snap_cfg = SnapshotConfig()

    def fresh_process() -> shards.ShardCache:  # another Ray actor: nothing in memory
        return shards.ShardCache(max_bytes=2**40)

    built = fresh_process().load(path, "canonical", None, snap_cfg, disk_cache=True)
    saved = sorted(p.name for p in tmp_path.glob("00000.snapshots-*.npz"))
    assert len(saved) == 1 and not list(tmp_path.glob("*.tmp*"))
    monkeypatch.setattr(shards, "_build_shard", lambda *a: pytest.fail("built again"))
    loaded = fresh_process().load(path, "canonical", None, snap_cfg, disk_cache=True)
    for field in dataclasses.fields(built):
        np.testing.assert_array_equal(getattr(loaded, field.name).astype(str)
                                      if field.name.endswith("_id") else
                                      getattr(loaded, field.name),
                                      getattr(built, field.name).astype(str)
                                      if field.name.endswith("_id") else
                                      getattr(built, field.name))
    monkeypatch.undo()
    # Other settings, a changed shard or an unreadable file: built (and kept) again.
    other = dataclasses.replace(snap_cfg, max_len=snap_cfg.max_len // 2)
    fresh_process().load(path, "canonical", None, other, disk_cache=True)
    assert len(list(tmp_path.glob("00000.snapshots-*.npz"))) == 2
    os.utime(path, ns=(0, 0))
    fresh_process().load(path, "canonical", None, snap_cfg, disk_cache=True)
    assert len(list(tmp_path.glob("00000.snapshots-*.npz"))) == 3
    newest = max(tmp_path.glob("00000.snapshots-*.npz"), key=lambda p: p.stat().st_mtime_ns)
    newest.write_bytes(b"truncated")
    again = fresh_process().load(path, "canonical", None, snap_cfg, disk_cache=True)
    assert len(again) == len(built)
    # A merchant's own file (deployment) gets nothing written beside it.
    own = tmp_path / "own"
    own.mkdir()
    mine = str(own / "events.parquet")
    generate_federation(cfg, seed=4).events.to_parquet(mine, index=False)
    from flwr.app import Context, RecordDict

    context = Context(run_id=1, node_id=1, node_config={"data-path": mine, "format": "canonical"},
                      state=RecordDict(), run_config={})
    _, snaps = client_app.merchant_data(context, {}, None, fresh_process())
    assert len(snaps) > 0
    assert sorted(p.name for p in own.iterdir()) == ["events.parquet"]
