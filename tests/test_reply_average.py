"""The guard's own FedAvg (``server.replies.fedavg``): each reply's tensors averaged as
one flat vector, bit for bit what Flower's ``FedAvg.aggregate_train`` gives on the same
replies in the same (sorted) order; the cases it leaves to Flower's."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as flwr_strategy
from helpers import FakeGrid

from server.config import FederationConfig
from server.replies import ReplyLayout, fedavg, read_reply, reply_order
from server.strategy import build_strategy

pytestmark = pytest.mark.usefixtures("server_identity")

SHAPES = [(3, 4), (4,), (2, 2, 2)]
NODES = [41, 42, 43, 44, 45, 46]


def _replies(strategy: Any, rng: np.random.Generator, *, lists: bool = False
             ) -> list[Message]:
    """A reply per node: weights over five orders of magnitude, uneven counts, metrics
    of both kinds (a list when ``lists``)."""
    reference = ArrayRecord([np.zeros(s, np.float32) for s in SHAPES])
    ins = list(strategy.configure_train(1, reference, ConfigRecord(), FakeGrid(NODES)))
    out = []
    for k, msg in enumerate(ins):
        weights = [(10.0 ** (k - 2) * rng.normal(size=s)).astype(np.float32) for s in SHAPES]
        metrics: dict[str, Any] = {"num-examples": int(rng.integers(1, 90)),
                                   "train_loss": float(rng.random()), "epochs": 1.0}
        if lists:
            metrics["per_head"] = [float(v) for v in rng.random(3)]
        out.append(Message(RecordDict({"arrays": ArrayRecord(weights),
                                       "metrics": MetricRecord(metrics)}), reply_to=msg))
    return out


def _bytes(arrays: ArrayRecord) -> list[bytes]:
    return [a.data for a in arrays.values()]


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
@pytest.mark.parametrize("lists", [False, True])
def test_the_guards_average_is_flowers_to_the_bit(name: str, lists: bool) -> None:
    strategy = build_strategy(FederationConfig(strategy=name, min_train_nodes=1,
                                               min_available_nodes=1), seed=0)
    assert strategy._averages_as_fedavg()
    replies = _replies(strategy, np.random.default_rng(3), lists=lists)
    plain = flwr_strategy.FedAvg(min_train_nodes=1, min_available_nodes=1)
    want_arrays, want_metrics = plain.aggregate_train(1, sorted(replies, key=reply_order))

    got_arrays, got_metrics = strategy.aggregate_train(1, list(reversed(replies)))

    assert list(got_arrays.keys()) == list(want_arrays.keys())
    assert _bytes(got_arrays) == _bytes(want_arrays)
    assert dict(got_metrics) == dict(want_metrics)
    # The replies were averaged as read: none had its record rebuilt for Flower's path.
    assert all(type(a).__name__ == "Array" for m in replies
               for a in m.content["arrays"].values())


@pytest.mark.parametrize("name", ["fedadam", "fedavgm", "fedmedian", "krum"])
def test_other_aggregations_are_flowers_own(name: str) -> None:
    strategy = build_strategy(FederationConfig(strategy=name, min_train_nodes=1,
                                               min_available_nodes=1), seed=0)
    assert not strategy._averages_as_fedavg()


def test_unit_weights_leave_the_average_to_flower() -> None:
    strategy = build_strategy(FederationConfig(min_train_nodes=1, min_available_nodes=1),
                              seed=0)
    strategy.uniform_weights = True
    assert not strategy._averages_as_fedavg()
    replies = _replies(strategy, np.random.default_rng(5))
    arrays, _ = strategy.aggregate_train(1, replies)
    # Every reply counts the same: the plain mean of the tensors (up to float rounding).
    expected = np.mean([m.content["arrays"].to_numpy_ndarrays()[0] for m in replies], axis=0)
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], expected, rtol=1e-5,
                               atol=1e-6)


def test_replies_flower_would_refuse_are_left_to_it() -> None:
    layout = ReplyLayout([np.zeros(s, np.float32) for s in SHAPES])
    rng = np.random.default_rng(7)

    def reply(names: list[str], arrays_name: str = "arrays") -> Any:
        record = ArrayRecord()
        for key, shape in zip(names, SHAPES, strict=True):
            record[key] = ArrayRecord([rng.normal(size=shape).astype(np.float32)])["0"]
        msg = Message(RecordDict({arrays_name: record,
                                  "metrics": MetricRecord({"num-examples": 3})}),
                      dst_node_id=1, message_type="train")
        return read_reply(msg, layout, "num-examples")

    same = [reply(["0", "1", "2"]), reply(["0", "1", "2"])]
    assert fedavg(same, "num-examples") is not None
    assert fedavg([same[0], reply(["0", "1", "x"])], "num-examples") is None
    assert fedavg([same[0], reply(["0", "1", "2"], "weights")], "num-examples") is None
    mixed = ReplyLayout([np.zeros(2, np.float32), np.zeros(2, np.float64)])
    assert mixed.dtype is None


def test_a_non_finite_tensor_is_named_whatever_the_layout() -> None:
    layout = ReplyLayout([np.zeros(s, np.float32) for s in SHAPES])
    weights = [np.ones(s, np.float32) for s in SHAPES]
    weights[2][1, 0, 1] = np.inf
    msg = Message(RecordDict({"arrays": ArrayRecord(weights),
                              "metrics": MetricRecord({"num-examples": 3})}),
                  dst_node_id=1, message_type="train")
    assert read_reply(msg, layout, "num-examples") == "tensor 2 holds NaN or infinite values"


def test_replies_read_as_they_come_are_not_read_again(monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    """What ``MerchantGrid.listen`` hands over while the round runs is read then; the
    aggregate is the same as reading every reply at the end."""
    import server.strategy as guarded

    def averaged(early: bool) -> tuple[list[bytes], dict, int]:
        strategy = build_strategy(FederationConfig(min_train_nodes=1, min_available_nodes=1),
                                  seed=0)
        listened: list[Any] = []

        class Listening(FakeGrid):
            def listen(self, listener: Any) -> None:
                listened.append(listener)

        reference = ArrayRecord([np.zeros(s, np.float32) for s in SHAPES])
        ins = list(strategy.configure_train(1, reference, ConfigRecord(), Listening(NODES)))
        replies = _replies(strategy, np.random.default_rng(9))
        replies = [Message(m.content, reply_to=i) for m, i in zip(replies, ins, strict=True)]
        assert listened == [strategy._read_early]
        if early:
            listened[0](replies[:4])
            listened[0](replies[4:])
        calls = []
        real = guarded.read_reply
        monkeypatch.setattr(guarded, "read_reply", lambda *a: calls.append(1) or real(*a))
        arrays, metrics = strategy.aggregate_train(1, replies)
        monkeypatch.setattr(guarded, "read_reply", real)
        assert strategy._early == {}
        return _bytes(arrays), dict(metrics), len(calls)

    late_arrays, late_metrics, late_reads = averaged(early=False)
    early_arrays, early_metrics, early_reads = averaged(early=True)
    assert (late_reads, early_reads) == (len(NODES), 0)
    assert early_arrays == late_arrays and early_metrics == late_metrics
