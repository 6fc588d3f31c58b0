"""Several simulated merchants a virtual node (``federation.merchants-per-node``).

The grid's bookkeeping is checked against a scripted node side; the end-to-end check
runs the real ClientApp and ServerApp in this process (an in-memory grid calls the
ClientApp directly, no Ray) on a tiny federation, once with one merchant a node and
once with three, and compares what the server kept.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.app.message.message import make_message
from helpers import read_jsonl

from client.hosted import named_merchants, serve
from common.hosting import MERCHANTS_RECORD, hosted_by, nodes_needed, record_key, split_key
from server.merchant_grid import MerchantGrid, unpack_reply

pytestmark = pytest.mark.usefixtures("server_identity")


def test_hosting_keys_and_ranges() -> None:
    assert split_key(record_key(12, "arrays")) == (12, "arrays")
    assert split_key(record_key(0, "a/b")) == (0, "a/b")
    assert split_key("arrays") is None and split_key("x/arrays") is None
    assert nodes_needed(10, 3) == 4 and nodes_needed(9, 3) == 3 and nodes_needed(1, 5) == 1
    assert [list(hosted_by(i, 3, 10)) for i in range(4)] == [
        [0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


class NodeSide:
    """Nodes 50, 10, 30 (so sorted: 10, 30, 50) answering with a scripted handler;
    ``silent`` nodes never answer."""

    def __init__(self, handler: Any, silent: frozenset[int] = frozenset()) -> None:
        self.handler, self.silent = handler, silent
        self.pushed: list[Message] = []
        self.replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return [50, 10, 30]

    def push_messages(self, messages: Any) -> list[str]:
        ids = []
        for m in messages:
            self.pushed.append(m)
            meta = m.metadata
            mid = str(uuid.uuid4())
            stored = make_message(Metadata(
                run_id=meta.run_id, message_id=mid, src_node_id=meta.src_node_id,
                dst_node_id=meta.dst_node_id, reply_to_message_id="",
                group_id=meta.group_id, created_at=time.time(), ttl=meta.ttl,
                message_type=meta.message_type), m.content)
            if meta.dst_node_id not in self.silent:
                self.replies[mid] = self.handler(stored)
            ids.append(mid)
        return ids

    def pull_messages(self, ids: Any) -> list[Message]:
        return [self.replies.pop(i) for i in set(ids) if i in self.replies]


def _train_messages(merchants: list[int]) -> list[Message]:
    content = RecordDict({"arrays": ArrayRecord([np.zeros(2, np.float32)]),
                          "config": ConfigRecord({"server-round": 1})})
    return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=m)
            for m in merchants]


def _per_merchant(msg: Message) -> Message:
    """A node's reply: merchant m replies num-examples m + 1, merchant 4 a data error."""
    ctx = Context(run_id=1, node_id=msg.metadata.dst_node_id, node_config={},
                  state=RecordDict(), run_config={})

    def one(m: Message, c: Context, weights: Any) -> Message:
        assert weights is not None and not weights[0].flags.writeable
        pid = int(c.node_config["partition-id"])
        if pid == 4:
            return Message(Error(code=100, reason="merchant data rejected"), reply_to=m)
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": pid + 1})}),
                       reply_to=m)

    return serve(msg, ctx, one)


def test_one_message_per_node_and_one_reply_per_merchant() -> None:
    nodes = NodeSide(_per_merchant)
    grid = MerchantGrid(nodes, merchants=7, per_node=3)  # type: ignore[arg-type]
    assert sorted(grid.get_node_ids()) == list(range(7))
    replies = grid.send_and_receive(_train_messages([0, 2, 3, 4, 6]), timeout=5)
    # Node 10 hosts 0-2, node 30 3-5, node 50 only 6: one message each, naming its own.
    assert sorted((m.metadata.dst_node_id, tuple(named_merchants(m) or [])) for m in
                  nodes.pushed) == [(10, (0, 2)), (30, (3, 4)), (50, (6,))]
    by = {m.metadata.src_node_id: m for m in replies}
    assert sorted(by) == [0, 2, 3, 4, 6]
    assert by[4].has_error() and by[4].error.code == 100
    for m in (0, 2, 3, 6):
        assert dict(by[m].content.metric_records["metrics"]) == {"num-examples": m + 1}
        assert list(by[m].content) == ["metrics"]


def test_a_merchant_whose_handler_raises_fails_alone(caplog: pytest.LogCaptureFixture
                                                      ) -> None:
    """Merchant 3 raises: its reply is the error Flower makes of a ClientApp that raised
    (code 2, ``"<class ...>:<'message'>"``); 4 and 5, served after it, still reply."""
    def raising(msg: Message) -> Message:
        ctx = Context(run_id=1, node_id=msg.metadata.dst_node_id, node_config={},
                      state=RecordDict(), run_config={})

        def one(m: Message, c: Context, weights: Any) -> Message:
            pid = int(c.node_config["partition-id"])
            if pid == 3:
                raise KeyError("train-rows")
            return Message(RecordDict({"metrics": MetricRecord({"num-examples": pid})}),
                           reply_to=m)

        return serve(msg, ctx, one)

    grid = MerchantGrid(NodeSide(raising), merchants=7, per_node=3)  # type: ignore[arg-type]
    grid.get_node_ids()
    with caplog.at_level("ERROR", logger="client.hosted"):
        replies = grid.send_and_receive(_train_messages([2, 3, 4, 5]), timeout=5)
    by = {m.metadata.src_node_id: m for m in replies}
    assert sorted(by) == [2, 3, 4, 5]
    assert by[3].has_error() and by[3].error.code == 2  # ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert by[3].error.reason == "<class 'KeyError'>:<''train-rows''>"
    for m in (2, 4, 5):
        assert dict(by[m].content.metric_records["metrics"]) == {"num-examples": m}
    assert "partition 3" in caplog.text and "KeyError" in caplog.text  # with its traceback


def test_a_node_error_fails_its_merchants_and_a_silent_node_leaves_them_unanswered(
) -> None:
    def broken(msg: Message) -> Message:
        return Message(Error(code=0, reason="ActorDiedError"), reply_to=msg)

    nodes = NodeSide(broken, silent=frozenset({30}))
    grid = MerchantGrid(nodes, merchants=9, per_node=3)  # type: ignore[arg-type]
    grid.get_node_ids()
    replies = grid.send_and_receive(_train_messages([0, 1, 3]), timeout=0.2)
    assert sorted(m.metadata.src_node_id for m in replies) == [0, 1]
    assert all(m.has_error() and "ActorDiedError" in m.error.reason for m in replies)


def test_the_grid_waits_for_every_node() -> None:
    class Few(NodeSide):
        def get_node_ids(self) -> list[int]:
            return [10]

    assert MerchantGrid(Few(_per_merchant), 4, 2).get_node_ids() == []  # type: ignore[arg-type]


def test_array_record_is_byte_for_byte_flowers() -> None:
    from client.arrays import array_record

    rng = np.random.default_rng(0)
    weights = [rng.normal(size=(3, 4)).astype(np.float32), np.arange(5, dtype=np.int64),
               np.array(2.5, np.float32),
               np.asfortranarray(rng.normal(size=(2, 3)))]
    ours, flowers = array_record(weights), ArrayRecord(weights)
    assert list(ours) == list(flowers)
    for k in flowers:
        assert ours[k].data == flowers[k].data and ours[k].shape == flowers[k].shape
        assert ours[k].dtype == flowers[k].dtype


def test_unpack_ignores_foreign_keys() -> None:
    content = RecordDict({record_key(3, "metrics"): MetricRecord({"a": 1.0}),
                          "stray": MetricRecord({"b": 2.0})})
    parts = unpack_reply(content)
    assert list(parts) == [3]
    assert dict(parts[3]["metrics"]) == {"a": 1.0}  # type: ignore[index]


def test_named_merchants_are_checked() -> None:
    msg = _train_messages([0])[0]
    assert named_merchants(msg) is None
    content = RecordDict({MERCHANTS_RECORD: ConfigRecord({"ids": [1, -2]})})
    with pytest.raises(ValueError, match="partition ids"):
        named_merchants(Message(content=content, message_type="train", dst_node_id=1))


def test_a_simulation_of_ten_merchants_or_more_warms_up() -> None:
    """K = 1: the virtual nodes are the merchants; K > 1: nodes times the merchants the
    message names; a deployed node (its own data file) never warms up."""
    from client.hosted import WARM_UP_MERCHANTS, warms_up

    def context(node_config: dict[str, Any]) -> Context:
        return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                       run_config={})

    plain = _train_messages([0])[0]
    named = Message(content=RecordDict({MERCHANTS_RECORD: ConfigRecord({"ids": [4, 5]})}),
                    message_type="train", dst_node_id=1)
    assert WARM_UP_MERCHANTS == 10
    assert warms_up(plain, context({"partition-id": 3, "num-partitions": 10}))
    assert not warms_up(plain, context({"partition-id": 3, "num-partitions": 9}))
    assert warms_up(named, context({"partition-id": 4, "num-partitions": 5}))
    assert not warms_up(named, context({"partition-id": 4, "num-partitions": 4}))
    assert not warms_up(plain, context({"data-path": "/m.csv", "num-partitions": 50}))
    assert not warms_up(plain, context({"partition-id": 3}))


@pytest.mark.parametrize(("key", "value", "extra", "match"), [
    ("federation.secure-aggregation", True, {}, "SecAgg"),
    ("privacy.mode", "client-fixed", {}, "client-fixed"),
    ("privacy.unit", "customer", {}, "customer"),
    ("federation.mode", "deployment", {}, "deployment"),
])
def test_unsupported_combinations_are_refused(key: str, value: Any, extra: dict[str, Any],
                                              match: str) -> None:
    from simulations.settings import experiment_from_flat

    flat = {"experiment.preset": "quick", "federation.merchants-per-node": 2, key: value,
            **extra}
    with pytest.raises(ValueError, match=f"merchants-per-node.*{match}|{match}.*"
                                         "merchants-per-node"):
        experiment_from_flat(flat)


@pytest.mark.parametrize("key", ["simulation.crash-prob", "simulation.straggler-prob"])
def test_faults_that_reach_node_mates_are_refused(key: str) -> None:
    """A crash kills the node's process; a straggler's delay holds up the merchants
    served after it on the node: both are refused naming both keys, with K > 1 only."""
    from simulations.federated import check_hosting
    from simulations.settings import experiment_from_flat

    flat = {"experiment.preset": "quick", key: 0.1}
    check_hosting(experiment_from_flat(flat))
    check_hosting(experiment_from_flat({**flat, key: 0.0, "federation.merchants-per-node": 2}))
    with pytest.raises(ValueError, match=f"'federation.merchants-per-node'.*{key} > 0"):
        check_hosting(experiment_from_flat({**flat, "federation.merchants-per-node": 2}))


class LocalGrid:
    """A Grid whose nodes are the real ClientApp called in this process: node ``i``
    (id ``1000 + i``) has partition id ``i``."""

    def __init__(self, app: Any, nodes: int, run_config: dict[str, Any]) -> None:
        self.app, self.run_config = app, run_config
        self.nodes = {1000 + i: i for i in range(nodes)}
        self.replies: dict[str, Message] = {}
        self.messages = 0

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages: Any) -> list[str]:
        ids = []
        for m in messages:
            meta, mid = m.metadata, str(uuid.uuid4())
            stored = make_message(Metadata(
                run_id=meta.run_id, message_id=mid, src_node_id=meta.src_node_id,
                dst_node_id=meta.dst_node_id, reply_to_message_id="",
                group_id=meta.group_id, created_at=time.time(), ttl=meta.ttl,
                message_type=meta.message_type), m.content)
            node = meta.dst_node_id
            ctx = Context(run_id=1, node_id=node, state=RecordDict(),
                          node_config={"partition-id": self.nodes[node]},
                          run_config=self.run_config)
            self.replies[mid] = self.app(stored, ctx)
            self.messages += 1
            ids.append(mid)
        return ids

    def pull_messages(self, ids: Any) -> list[Message]:
        return [self.replies.pop(i) for i in set(ids) if i in self.replies]


def _federation(tmp_path: Path, per_node: int, staged: Any) -> tuple[list[dict[str, Any]],
                                                                     Any, int]:
    from client.app import make_client_app
    from server.app import run_federation
    from server.config import settings_from_flat

    run_dir = tmp_path / f"k{per_node}"
    flat = {**staged.flat, "federation.run-dir": str(run_dir),
            "federation.merchants-per-node": per_node}
    merchants = staged.merchants
    local = LocalGrid(make_client_app(flat), nodes_needed(merchants, per_node), flat)
    grid: Any = local if per_node == 1 else MerchantGrid(local, merchants, per_node)  # type: ignore[arg-type]
    run_federation(grid, settings_from_flat(flat))
    weights = np.load(run_dir / "final_weights.npz")
    return read_jsonl(run_dir / "metrics.jsonl"), [weights[k] for k in weights.files], \
        local.messages


def test_three_merchants_a_node_give_the_results_of_one(tmp_path: Path) -> None:
    """5 merchants, 2 rounds, a seeded dropout: K = 3 (nodes of 3 and 2) against K = 1."""
    from simulations.experiment import prepare
    from simulations.federated import stage_federation
    from simulations.settings import experiment_from_flat

    exp = experiment_from_flat({
        "experiment.preset": "quick", "synthetic.num-merchants": 5,
        "synthetic.users-median": 15, "synthetic.min-users": 5,
        "federation.num-rounds": 2, "federation.eval-every": 2,
        "simulation.dropout-prob": 0.3, "data.min-merchant-snapshots": 1,
        "model.jit-compile": False})  # XLA would compile for longer than the test runs
    data = prepare(exp)
    staged = stage_federation(exp, data, tmp_path / "data")
    one, w1, sent1 = _federation(tmp_path, 1, staged)
    three, w3, sent3 = _federation(tmp_path, 3, staged)
    assert staged.merchants == 5
    # 2 rounds, one message a node each, and the head refit's first step (these small
    # merchants all decline it, so there is no second)
    assert (sent1, sent3) == (5 * 3, 2 * 3)
    for a, b in zip(one, three, strict=True):
        for key in ("round", "sampled", "replied", "failed", "rejected", "bytes_down",
                    "bytes_up"):
            assert a.get(key) == b.get(key), (a["round"], key)
        for key, value in (a.get("train") or {}).items():
            if key != "fit_seconds":
                assert b["train"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert sum(r.get("failed", 0) for r in one) > 0  # the seeded dropout hit someone
    assert [r["round"] for r in one if r["round"] >= 1] == [1, 2]
    for x, y in zip(w1, w3, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_a_listener_sees_each_merchant_reply_as_it_is_pulled() -> None:
    grid = MerchantGrid(NodeSide(_per_merchant), merchants=7, per_node=3)  # type: ignore[arg-type]
    grid.get_node_ids()
    seen: list[Message] = []
    grid.listen(seen.extend)
    ids = grid.push_messages(_train_messages(list(range(7))))
    found = grid.pull_messages(ids)
    assert len(found) == 7 and [id(m) for m in seen] == [id(m) for m in found]
    grid.listen(None)
    assert grid.pull_messages(ids) == [] and len(seen) == 7
