"""What keeps a SecAgg+ round cheap: a neighbourhood growing like log n, no data work on
the messages that do not train, and masked vectors sent as uint32.

The round runs Flower's own ``SecAggPlusWorkflow`` and ``secaggplus_mod`` in this
process (no Ray): every message is copied as the engine would serialise it and handed
to the client's ClientApp.
"""

from __future__ import annotations

import collections
import copy
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.app.message.message import make_message
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.task_identity import TaskIdentity

import client.flower_seam as client_seam
import client.secagg as client_secagg
from client.app import DATA_ERROR
from common.pinned import installed_version, source_digest
from common.schema import DataError
from server import secagg_workflow
from server.config import DPConfig, FederationConfig
from server.customer_secagg import min_replies
from server.secagg import (
    build_secagg_strategy,
    check_round_size,
    effective_shares,
    log_shares,
    smallest_unmasked,
)

# ---------------------------------------------------------------------------------------
# The neighbourhood
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sampled", "shares"), [
    (2, 2), (5, 5), (9, 9), (10, 9), (20, 11), (100, 15), (1000, 21)])
def test_log_shares_grow_like_log_n_and_stay_odd_or_everyone(sampled: int,
                                                             shares: int) -> None:
    assert log_shares(sampled) == shares
    assert shares == sampled or shares % 2 == 1


def test_the_default_neighbourhood_and_its_threshold_bound_distributed_dp() -> None:
    fed = FederationConfig(secure_aggregation=True)  # secagg-num-shares 0: log n
    assert effective_shares(fed, 20) == (11, 7)  # round(0.6 * 11)
    assert effective_shares(fed, 5) == (5, 3)  # few clients: everyone, as before
    for sampled in (2, 3, 20, 100, 1000):
        check_round_size(fed, sampled)
    dp = DPConfig(unit="customer", placement="distributed")
    # every one of the 20 needs 7 live among its 11: at least ceil(20 * 7 / 11) = 13 live
    assert smallest_unmasked(fed, 20) == 13 and min_replies(fed, dp, 20) == 13
    assert min_replies(fed, DPConfig(unit="customer", placement="distributed",
                                     min_replies=13), 20) == 13
    with pytest.raises(ValueError, match="'privacy.min-replies'.*smallest sum"):
        min_replies(fed, DPConfig(unit="customer", placement="distributed",
                                  min_replies=14), 20)
    everyone = FederationConfig(secure_aggregation=True, secagg_num_shares=1.0)
    assert effective_shares(everyone, 20) == (20, 12)
    assert smallest_unmasked(everyone, 20) == 12  # everyone: the threshold itself


@pytest.mark.parametrize("sampled", [12, 14, 16])
def test_smallest_unmasked_is_the_fewest_live_clients_the_workflow_accepts(
        sampled: int) -> None:
    """Every live set that passes the workflow's check (each sampled node has t live
    nodes among its neighbours: a window of k on the shuffled ring, as
    ``SecAggPlusWorkflow.setup_stage`` builds it) has at least ``smallest_unmasked``
    members, and one that small passes."""
    fed = FederationConfig(secure_aggregation=True)
    shares, threshold = effective_shares(fed, sampled)
    half = shares >> 1
    windows = [sum(1 << ((i + o) % sampled) for o in range(-half, half + 1))
               for i in range(sampled)]
    fewest = min(bin(live).count("1") for live in range(1 << sampled)
                 if all(bin(live & w).count("1") >= threshold for w in windows))
    assert shares < sampled and fewest == smallest_unmasked(fed, sampled)


def _smallest_part(sampled: int, shares: int, threshold: int) -> int:
    """The smallest sum the server can unmask, by brute force: over every live set the
    workflow accepts, its smallest part sharing no pairwise mask with the rest (live
    clients share one when at most ``shares // 2`` apart on the ring)."""
    half = shares >> 1
    near = [[(i + o) % sampled for o in range(-half, half + 1)] for i in range(sampled)]
    windows = [sum(1 << j for j in set(w)) for w in near]
    best = sampled
    for live in range(1, 1 << sampled):
        if not all(bin(live & w).count("1") >= threshold for w in windows):
            continue
        seen = 0
        for start in (i for i in range(sampled) if live >> i & 1):
            if seen >> start & 1:
                continue
            size, stack, seen = 0, [start], seen | 1 << start
            while stack:
                size += 1
                for j in near[stack.pop()]:
                    if live >> j & 1 and not seen >> j & 1:
                        seen |= 1 << j
                        stack.append(j)
            best = min(best, size)
    return best


@pytest.mark.parametrize(("shares", "threshold", "sampled"), [
    (3, 2, 7), (5, 3, 9), (5, 3, 10), (5, 3, 12), (5, 4, 12), (7, 4, 13), (7, 4, 14)])
def test_smallest_unmasked_counts_the_parts_a_sparse_ring_can_split_into(
        shares: int, threshold: int, sampled: int) -> None:
    """With k - t >= (k - 1) / 2 the live set can split into parts without a pairwise
    mask between them (gaps of (k - 1) / 2 gone clients), whose sums the server unmasks
    one by one: 3 of 12 at 5 shares, threshold 3, not ceil(12 * 3 / 5) = 8."""
    fed = FederationConfig(secure_aggregation=True, secagg_num_shares=shares,
                           secagg_reconstruction_threshold=threshold)
    assert smallest_unmasked(fed, sampled) == _smallest_part(sampled, shares, threshold)


def test_a_threshold_share_stays_above_half_of_few_shares() -> None:
    fed = FederationConfig(secure_aggregation=True)  # 0.6 of 4 rounds to 2, half of them
    assert effective_shares(fed, 4) == (4, 3)
    check_round_size(fed, 4)


def test_a_threshold_count_must_stay_above_half_the_logarithmic_shares() -> None:
    fed = FederationConfig(secure_aggregation=True, secagg_reconstruction_threshold=6)
    check_round_size(fed, 20)  # 6 of the 11 shares
    fed = FederationConfig(secure_aggregation=True, secagg_reconstruction_threshold=5)
    with pytest.raises(ValueError, match="'federation.secagg-reconstruction-threshold'"):
        check_round_size(fed, 20)


# ---------------------------------------------------------------------------------------
# The client: data work only where it trains
# ---------------------------------------------------------------------------------------


def _message(stage: str, node: int = 7) -> Message:
    meta = Metadata(run_id=1, message_id="m", src_node_id=1, dst_node_id=node,
                    reply_to_message_id="", group_id="1", created_at=time.time(), ttl=600,
                    message_type="train")
    return make_message(meta, RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: stage})}))


def test_the_client_reads_no_data_outside_collect_masked_vectors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[str] = []

    def merchant_data(*_: Any) -> Any:
        reads.append("read")
        raise DataError("unreadable rows")

    monkeypatch.setattr(client_secagg, "merchant_data", merchant_data)
    guard = client_secagg.make_secagg_client_app({})._mods[0]
    events = tmp_path / "events.csv"
    events.write_text("user_id,timestamp\n")
    context = Context(run_id=1, node_id=7, node_config={"data-path": str(events)},
                      state=RecordDict(), run_config={})
    passed: list[str] = []

    def call_next(msg: Message, _: Context) -> Message:
        passed.append(str(msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]))
        return Message(RecordDict(), reply_to=msg)

    for stage in (Stage.SETUP, Stage.SHARE_KEYS, Stage.UNMASK):
        assert not guard(_message(stage), context, call_next).has_error()
    assert passed == [Stage.SETUP, Stage.SHARE_KEYS, Stage.UNMASK] and reads == []

    reply = guard(_message(Stage.COLLECT_MASKED_VECTORS), context, call_next)
    assert reads == ["read"] and reply.has_error() and reply.error.code == DATA_ERROR

    events.unlink()  # a merchant without its file leaves at setup, before any keys
    reply = guard(_message(Stage.SETUP), context, call_next)
    assert reply.has_error() and reply.error.code == DATA_ERROR
    assert passed == [Stage.SETUP, Stage.SHARE_KEYS, Stage.UNMASK] and reads == ["read"]


def test_a_misspelt_node_config_key_makes_the_merchant_leave_at_setup(tmp_path: Path) -> None:
    """Under SecAgg+ a deployed node's unknown key was ignored (the plain ClientApp refuses
    it, ``client.config.check_node_config``): a merchant with ``interventions_path``
    trained without its interventions. It leaves at ``setup`` now, before any keys."""
    guard = client_secagg.make_secagg_client_app({})._mods[0]
    events = tmp_path / "events.csv"
    events.write_text("user_id,timestamp,event\nu1,2025-01-01T10:00:00Z,view\n")
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                      node_config={"data-path": str(events), "interventions_path": "/x.csv"})
    passed: list[str] = []

    def call_next(msg: Message, _: Context) -> Message:
        passed.append("next")
        return Message(RecordDict(), reply_to=msg)

    reply = guard(_message(Stage.SETUP), context, call_next)
    assert reply.has_error() and reply.error.code == DATA_ERROR and passed == []
    assert "merchant node config rejected (key 'interventions_path')" in reply.error.reason

@pytest.mark.parametrize(("node_config", "warm"), [
    ({"partition-id": 3, "num-partitions": 100}, True),
    ({"partition-id": 3, "num-partitions": 2}, False),  # a small one compiles as it meets
    ({"data-path": "/m/events.csv", "num-partitions": 100}, False)])
def test_a_simulated_merchant_compiles_its_fit_layouts_first_as_the_plain_path_does(
        monkeypatch: pytest.MonkeyPatch, node_config: dict[str, Any], warm: bool) -> None:
    import client.work as work

    settings, snaps = object(), object()
    monkeypatch.setattr(client_secagg, "merchant_data", lambda *_: (settings, snaps))
    seen: list[tuple[Any, ...]] = []

    def train_reply(*args: Any, **kwargs: Any) -> tuple[list[np.ndarray], dict[str, Any]]:
        seen.append((*args[:2], kwargs.get("warm")))
        return [np.zeros(2, np.float32)], {"num-examples": 4}

    monkeypatch.setattr(work, "train_reply", train_reply)
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                      run_config={})
    client = client_secagg.merchant_client(context, {}, None, 1 << 20)
    _, weight, _ = client.fit([np.zeros(2, np.float32)], {})
    assert seen == [(settings, snaps, warm)] and weight == 4


# ---------------------------------------------------------------------------------------
# A whole round in this process: uint32 uploads, the round's counts, a dropout
# ---------------------------------------------------------------------------------------


class _Client(NumPyClient):
    def __init__(self, node: int) -> None:
        self.node = node

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]
            ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        return [p + 0.01 * self.node for p in parameters], 10 * self.node, {}


class _Grid:
    """Hands each message, copied as the engine would serialise it, to its node's app;
    records the masked vectors' dtypes and drops ``dropped`` at ``drop_stage``."""

    def __init__(self, app: ClientApp, nodes: int, dropped: int, drop_stage: str) -> None:
        self.app, self.dropped, self.drop_stage = app, dropped, drop_stage
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(),
                                    run_config={}) for n in range(1, nodes + 1)}
        self.dtypes: set[str] = set()
        self.setup: dict[str, Any] = {}
        self.stages: list[str] = []  # each stage, once, in the order first sent
        #: node -> the nodes whose public keys it was sent (its neighbours: the ring)
        self.neighbours: dict[int, frozenset[int]] = {}
        self.run = type("Run", (), {"run_id": 1})()

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None
                         ) -> list[Message]:
        replies = []
        for msg in messages:
            msg = copy.deepcopy(msg)
            msg.metadata.__dict__["_message_id"] = f"m{id(msg)}"
            configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
            stage = configs.get(Key.STAGE) if configs is not None else None
            if stage is not None and stage not in self.stages:
                self.stages.append(str(stage))
            if stage == Stage.SETUP:
                self.setup = dict(configs)
            if stage == Stage.SHARE_KEYS:
                self.neighbours[msg.metadata.dst_node_id] = frozenset(
                    int(k) for k in configs if k != Key.STAGE)
            if msg.metadata.dst_node_id == self.dropped and stage == self.drop_stage:
                continue  # never answers
            reply = self.app(msg, self.contexts[msg.metadata.dst_node_id])
            out = reply.content.config_records.get(RECORD_KEY_CONFIGS)
            if out is not None and Key.MASKED_PARAMETERS in out:
                self.dtypes |= {str(bytes_to_ndarray(b).dtype)
                                for b in out[Key.MASKED_PARAMETERS]}
            replies.append(reply)
        return replies


START = [np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3), np.arange(4, dtype=np.float32)]


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # as the ServerApp process has them
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _one_round(nodes: int, dropped: int = 0, seed: int = 0, outer: tuple[Any, ...] = ()
               ) -> tuple[_Grid, Any, Any]:
    """(grid, strategy, result) of one SecAgg+ round of ``nodes`` clients, every one
    sampled; node ``dropped`` never sends its masked vector; ``outer`` mods first."""
    app = ClientApp(client_fn=lambda ctx: _Client(ctx.node_id).to_client(),
                    mods=[*outer, client_secagg.compact_masked_vectors, secaggplus_mod])
    grid = _Grid(app, nodes, dropped, Stage.COLLECT_MASKED_VECTORS)
    fed = FederationConfig(secure_aggregation=True, num_rounds=1, min_train_nodes=nodes,
                           min_available_nodes=nodes, secagg_clipping_range=100.0)
    strategy = build_secagg_strategy(fed, DPConfig(), seed=seed, population=nodes)
    result = strategy.start(grid, ArrayRecord(START), num_rounds=1, timeout=60)
    return grid, strategy, result


def _assert_weighted_mean(result: Any, nodes: int, dropped: int) -> list[int]:
    """The unmasked result is the weighted mean of the live clients' updates (client n
    sends START + 0.01 n with weight 10 n) within the quantisation bound 2 c n / Q;
    returns the live clients."""
    live = [n for n in range(1, nodes + 1) if n != dropped]
    weights = np.array([10.0 * n for n in live])
    expected = [a + 0.01 * float(np.dot(weights, live)) / weights.sum() for a in START]
    bound = 2 * 100.0 * len(live) / (weights.sum() * 4_194_304 / 10_000)
    for got, want in zip(result.arrays.to_numpy_ndarrays(), expected, strict=True):
        assert np.max(np.abs(got - want)) < bound
    return live


@pytest.mark.usefixtures("in_process")
def test_a_round_with_uint32_uploads_and_a_dropout_unmasks_the_weighted_mean() -> None:
    nodes, dropped = 12, 5
    grid, strategy, result = _one_round(nodes, dropped)

    assert grid.dtypes == {"uint32"}
    assert (grid.setup[Key.SHARE_NUMBER], grid.setup[Key.THRESHOLD]) == (9, 5)  # log n
    live = _assert_weighted_mean(result, nodes, dropped)
    assert strategy.rounds.round(1).replied == len(live)


@pytest.mark.usefixtures("in_process")
def test_the_same_seed_gives_the_same_sample_and_another_ring() -> None:
    """Each of 12 clients gets the keys of its 9 neighbours (itself included) on a ring
    shuffled from OS entropy: two runs of seed 0 share about 1 ring in 20 million."""
    first, _, _ = _one_round(12, seed=0)
    second, _, _ = _one_round(12, seed=0)
    assert sorted(first.neighbours) == sorted(second.neighbours) == list(range(1, 13))
    assert {len(n) for n in first.neighbours.values()} == {9}
    assert first.neighbours != second.neighbours


@pytest.mark.usefixtures("in_process")
def test_a_round_whose_counts_were_not_given_stops_the_run_before_secrets_are_shared(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without its counts the workflow would set up 12 clients with everyone sharing
    (threshold 7, m_min 7) where the round's counts are 9 and 5 (m_min 8)."""
    from server.secagg_workflow import RoundCountsMissing, RoundWorkflow

    monkeypatch.setattr(RoundWorkflow, "give_counts", lambda *_: None)
    grid = _Grid(ClientApp(client_fn=lambda ctx: _Client(ctx.node_id).to_client(),
                           mods=[secaggplus_mod]), 12, 0, Stage.COLLECT_MASKED_VECTORS)
    fed = FederationConfig(secure_aggregation=True, num_rounds=1, min_train_nodes=12,
                           min_available_nodes=12, secagg_clipping_range=100.0)
    strategy = build_secagg_strategy(fed, DPConfig(), seed=0, population=12)
    with pytest.raises(RoundCountsMissing, match="without its shares and threshold for 12 "
                                                 "clients.*12 shares and threshold 7.*m_min"):
        strategy.start(grid, ArrayRecord(START), num_rounds=1, timeout=60)
    assert grid.stages == [Stage.SETUP]  # public keys only: no secret left a client


def test_counts_hold_for_one_round_and_must_be_the_ones_given(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from flwr.server.workflow import SecAggPlusWorkflow

    from server.secagg_workflow import RoundCountsMissing, RoundWorkflow

    def setup(self: RoundWorkflow, grid: Any, context: Any, state: Any) -> bool:
        """Flower's stage, reduced to: configure_fit gives ``state.give``, and 12 clients
        are set up with 9 shares and threshold 6."""
        if state.give is not None:
            self.give_counts(*state.give)
        state.sampled_node_ids, state.num_shares, state.threshold = set(range(12)), 9, 6
        return True

    monkeypatch.setattr(SecAggPlusWorkflow, "setup_stage", setup)
    workflow = RoundWorkflow(max_weight=1.0, clipping_range=8.0, quantization_range=2**22,
                             timeout=None)
    assert workflow.setup_stage(None, None, SimpleNamespace(give=(9, 6)))
    with pytest.raises(RoundCountsMissing, match="9 shares and threshold 6, not the 9 "
                                                 "and 5 given for its 12 clients"):
        workflow.setup_stage(None, None, SimpleNamespace(give=(9, 5)))
    with pytest.raises(RoundCountsMissing, match="without its shares and threshold"):
        workflow.setup_stage(None, None, SimpleNamespace(give=None))  # not the last ones


def test_as_uint32_refuses_what_the_mod_cannot_have_made() -> None:
    from flwr.common import ndarray_to_bytes

    fine = np.array([0, 2**32 - 1, 7], dtype=np.int64)
    packed = client_secagg.as_uint32(ndarray_to_bytes(fine), 2**32)
    assert bytes_to_ndarray(packed).dtype == np.uint32
    assert bytes_to_ndarray(packed).tolist() == fine.tolist()
    assert len(packed) < len(ndarray_to_bytes(fine))
    with pytest.raises(ValueError, match="outside"):
        client_secagg.as_uint32(ndarray_to_bytes(np.array([-1], dtype=np.int64)), 2**32)
    # the server's int64 arithmetic mod 2**32 and the wrapped uint32 sum agree
    rng = np.random.default_rng(0)
    vecs = [rng.integers(0, 2**32, 1000, dtype=np.int64) for _ in range(20)]
    wrapped = sum((v.astype(np.uint32) for v in vecs[1:]), vecs[0].astype(np.uint32))
    assert ((wrapped & (2**32 - 1)) == (sum(vecs) & (2**32 - 1))).all()


def test_the_server_keeps_threshold_shares_of_each_secret() -> None:
    from flwr.app import Error

    from server.secagg_grid import keep_threshold_shares

    def reply(node: int, owners: list[int]) -> Message:
        msg = _message(Stage.UNMASK, node)
        return Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({
            Key.NODE_ID_LIST: owners,
            Key.SHARE_LIST: [f"{node}->{o}".encode() for o in owners]})}), reply_to=msg)

    replies = [reply(1, [1, 2, 3]), reply(2, [1, 2, 3]),
               Message(Error(code=1, reason="gone"), reply_to=_message(Stage.UNMASK, 4)),
               reply(3, [2, 3, 1])]
    assert keep_threshold_shares(replies, 2) == 3
    kept = [dict(zip(r.content.config_records[RECORD_KEY_CONFIGS][Key.NODE_ID_LIST],
                     r.content.config_records[RECORD_KEY_CONFIGS][Key.SHARE_LIST],
                     strict=True)) for r in replies if not r.has_error()]
    assert kept == [{1: b"1->1", 2: b"1->2", 3: b"1->3"},
                    {1: b"2->1", 2: b"2->2", 3: b"2->3"}, {}]


# ---------------------------------------------------------------------------------------
# The client's seam: Flower's Shamir split without a thread pool, keys parsed once
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("target", "digest"),
                         sorted(client_seam.SECAGGPLUS_NAMES_SOURCES.items()))
def test_the_flower_code_the_client_seam_relies_on_is_unchanged(target: str,
                                                                 digest: str) -> None:
    assert source_digest(target) == digest, f"{target} changed: re-read client.flower_seam"
    assert client_seam.PIN.version == installed_version("flwr")


def test_the_serial_split_gives_flowers_layout_and_any_threshold_rebuilds_it() -> None:
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares

    secret = bytes(range(40))  # 3 chunks once padded
    ours, flowers = client_seam.create_shares(secret, 4, 7), create_shares(secret, 4, 7)
    assert [len(s) for s in ours] == [len(s) for s in flowers] == [4 + 3 * 16] * 7
    assert [s[:4] for s in ours] == [s[:4] for s in flowers]  # index i, little-endian
    for subset in ([0, 1, 2, 3], [6, 4, 2, 0], [1, 3, 5, 6]):
        assert combine_shares([ours[i] for i in subset]) == secret
    assert ours != flowers  # fresh random polynomials, as Flower's


def test_a_private_key_is_parsed_once_into_the_same_key() -> None:
    from flwr.supercore.primitives.asymmetric import (
        bytes_to_private_key,
        generate_key_pairs,
        private_key_to_bytes,
    )

    data = private_key_to_bytes(generate_key_pairs()[0])
    key = client_seam.private_key_of(data)
    assert client_seam.private_key_of(data) is key
    assert key.private_numbers() == bytes_to_private_key(data).private_numbers()


@pytest.fixture
def mod_names(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``secaggplus_mod``'s module, its patched names put back after the test."""
    import importlib

    mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    monkeypatch.setattr(mod, "create_shares", mod.create_shares)
    monkeypatch.setattr(mod, "bytes_to_private_key", mod.bytes_to_private_key)
    return mod


@pytest.mark.usefixtures("in_process")
def test_with_the_seam_a_dropout_is_still_unmasked_from_its_shares(mod_names: Any) -> None:
    """Node 5 sends no masked vector: the server rebuilds its private key from the shares
    the serial split made and removes its pairwise masks; the mean is exact as before."""
    assert client_seam.secaggplus_names()
    assert mod_names.create_shares is client_seam.create_shares
    assert mod_names.bytes_to_private_key is client_seam.private_key_of
    nodes, dropped = 12, 5
    grid, strategy, result = _one_round(nodes, dropped)
    assert grid.dtypes == {"uint32"} and client_seam.masked_as_uint32()  # by the mod
    _assert_weighted_mean(result, nodes, dropped)
    seconds = strategy.rounds.round(1).stage_seconds  # the server's own parts too
    assert {"server_setup", "server_unmask"} <= set(seconds)
    assert all(v >= 0 for v in seconds.values())


def test_with_another_flower_the_mod_keeps_its_own_names(
        mod_names: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from common import pinned

    monkeypatch.setattr(pinned, "installed_version", {"flwr": "1.43.0"}.get)
    original = mod_names.create_shares
    assert not client_seam.secaggplus_names()
    assert mod_names.create_shares is original


def test_the_client_seam_is_pinned_like_the_others() -> None:
    assert set(client_seam.PATCHES) == set(client_seam.PIN.patches)
    assert all(callable(getattr(client_seam, name)) for name in client_seam.PIN.patches)
    assert client_seam.PIN.logger == client_seam.__name__


@pytest.mark.parametrize(("target", "digest"), sorted(
    {t: d for sources in secagg_workflow.PATCHES.values() for t, d in sources.items()}.items()))
def test_the_flower_code_the_workflow_patches_rely_on_is_unchanged(target: str,
                                                                   digest: str) -> None:
    assert source_digest(target) == digest, f"{target} changed: re-read secagg_workflow"
    assert secagg_workflow.PIN.version == installed_version("flwr")
    assert set(secagg_workflow.PATCHES) == set(secagg_workflow.PIN.patches)
    assert all(callable(getattr(secagg_workflow, name))
               for name in secagg_workflow.PIN.patches)


def test_the_serial_combine_rebuilds_what_flowers_split_made_and_refuses_garbage() -> None:
    import importlib

    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares

    secret = bytes(range(200, 255))  # 4 chunks once padded
    shares = create_shares(secret, 3, 5)
    for subset in ([0, 1, 2], [4, 2, 0], [1, 3, 4]):
        picked = [shares[i] for i in subset]
        assert secagg_workflow.combine_shares(picked) == combine_shares(picked) == secret
    with pytest.raises(ValueError, match="Failed to combine shares"):
        secagg_workflow.combine_shares([s[:4] + bytes(len(s) - 4) for s in shares[:3]])
    module = importlib.import_module(secagg_workflow._WORKFLOW)
    flowers = module.combine_shares
    with secagg_workflow.serial_combine() as swapped:
        assert swapped and module.combine_shares is secagg_workflow.combine_shares
    assert module.combine_shares is flowers  # put back after the stage


@pytest.mark.parametrize("array", [
    np.arange(10_850, dtype=np.uint32) * 395_377,  # a masked vector's entries, any of 2**32
    np.arange(12, dtype=np.uint32).reshape(3, 4),
    np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    np.array(5, dtype=np.int64),
    np.zeros((0, 3), dtype=np.float32),
    np.arange(4, dtype=">i4"),
], ids=["masked", "matrix", "fortran", "scalar", "empty", "big-endian"])
def test_the_quick_decode_gives_flowers_array_as_a_fresh_copy(array: np.ndarray) -> None:
    from flwr.common import ndarray_to_bytes

    data = ndarray_to_bytes(array)
    got, want = secagg_workflow.bytes_to_ndarray(data), bytes_to_ndarray(data)
    assert (got.dtype, got.shape) == (want.dtype, want.shape)
    assert np.array_equal(got, want) and np.array_equal(got, array)
    assert got.flags.writeable and got.flags.f_contiguous == want.flags.f_contiguous
    assert not np.shares_memory(got, np.frombuffer(data, dtype=np.uint8))
    assert secagg_workflow.bytes_to_ndarray(data) is not got  # a new array each call


def test_the_quick_decode_leaves_what_is_not_a_plain_npy_to_flower() -> None:
    import io

    from flwr.common import ndarray_to_bytes

    data = ndarray_to_bytes(np.arange(5, dtype=np.uint32))
    longer = data + b"\x00" * 4  # np.load reads what the header says and ignores the rest
    assert np.array_equal(secagg_workflow.bytes_to_ndarray(longer), bytes_to_ndarray(longer))
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.array([1, "a"], dtype=object), allow_pickle=True)
    objects = buffer.getvalue()  # a pickle inside: Flower refuses to load it
    version_21 = data[:6] + b"\x02\x01" + data[8:]  # numpy reads 1.0, 2.0 and 3.0 only
    zero_width = ndarray_to_bytes(np.zeros(3, dtype="V0"))  # frombuffer refuses itemsize 0
    assert np.array_equal(secagg_workflow.bytes_to_ndarray(zero_width),
                          bytes_to_ndarray(zero_width))
    for garbage in (data[:-4], b"not an array at all", objects, version_21):
        with pytest.raises(ValueError) as flowers:
            bytes_to_ndarray(garbage)
        with pytest.raises(ValueError) as ours:
            secagg_workflow.bytes_to_ndarray(garbage)
        assert str(ours.value) == str(flowers.value)


@pytest.mark.usefixtures("in_process")
@pytest.mark.parametrize("switch", [None, False], ids=["by-default", "switched-off"])
def test_the_quick_decode_runs_by_default_and_either_way_unmasks_the_weighted_mean(
        switch: bool | None, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    module = importlib.import_module(secagg_workflow._WORKFLOW)
    flowers = module.bytes_to_ndarray
    decoded: list[tuple[int, ...]] = []
    quick = secagg_workflow.bytes_to_ndarray

    def counted(tensor: bytes) -> np.ndarray:
        array = quick(tensor)
        decoded.append(array.shape)
        return array

    monkeypatch.setattr(secagg_workflow, "bytes_to_ndarray", counted)
    if switch is not None:  # as the bench driver's FEDECAY_BENCH_QUICK_DECODE=0 does
        monkeypatch.setattr(secagg_workflow, "quick_decode_default", lambda: switch)
    nodes, dropped = 12, 5
    _, strategy, result = _one_round(nodes, dropped)

    live = _assert_weighted_mean(result, nodes, dropped)
    assert strategy.rounds.round(1).replied == len(live)
    # every masked array, ours: the quantised weight first, then the weights
    assert decoded == ([(1,), *(a.shape for a in START)] * len(live) if switch is None
                       else [])
    assert module.bytes_to_ndarray is flowers  # put back after the stage


def test_with_another_flower_the_stage_decodes_with_flowers_function(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from common import pinned

    monkeypatch.setattr(pinned, "installed_version", {"flwr": "1.43.0"}.get)
    module = importlib.import_module(secagg_workflow._WORKFLOW)
    flowers = module.bytes_to_ndarray
    with secagg_workflow.quick_decode() as swapped:
        assert not swapped and module.bytes_to_ndarray is flowers


# ---------------------------------------------------------------------------------------
# Keys ahead: round r + 1's setup and share_keys while the server evaluates round r
# ---------------------------------------------------------------------------------------


class _StageLog(_Grid):
    """:class:`_Grid` that logs (round, stage) of each call and signals when a round's
    keys were shared."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.calls: list[tuple[int, str]] = []
        self.shared: dict[int, threading.Event] = collections.defaultdict(threading.Event)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None
                         ) -> list[Message]:
        messages = list(messages)
        first = messages[0]
        stage = str(first.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
        r = int(first.metadata.group_id)
        self.calls.append((r, stage))
        replies = super().send_and_receive(messages, timeout=timeout)
        if stage == Stage.SHARE_KEYS:
            self.shared[r].set()
        return replies


def _rounds_with_an_evaluation(nodes: int, rounds: int, stop_at: int | None = None,
                               patience: float = 10.0
                               ) -> tuple[_StageLog, Any, Any, list[tuple[int, bool]]]:
    """SecAgg+ rounds whose server evaluation of round r waits (up to ``patience`` s) for
    round r + 1's keys; ``stop_at`` raises early stopping there. (grid, strategy, result or the
    exception, per round: whether the next round's keys came during its evaluation)."""
    app = ClientApp(client_fn=lambda ctx: _Client(ctx.node_id).to_client(),
                    mods=[client_secagg.compact_masked_vectors, secaggplus_mod])
    grid = _StageLog(app, nodes, 0, Stage.COLLECT_MASKED_VECTORS)
    fed = FederationConfig(secure_aggregation=True, num_rounds=rounds, min_train_nodes=nodes,
                           min_available_nodes=nodes, secagg_clipping_range=100.0)
    strategy = build_secagg_strategy(fed, DPConfig(), seed=0, population=nodes)
    overlapped: list[tuple[int, bool]] = []

    def evaluate(r: int, arrays: ArrayRecord) -> None:
        if r == 0:
            return
        overlapped.append((r, grid.shared[r + 1].wait(patience if r < rounds else 0.2)))
        if r == stop_at:
            raise StopIteration(f"stopped at round {r}")

    try:
        result = strategy.start(grid, ArrayRecord(START), num_rounds=rounds, timeout=60,
                                evaluate_fn=evaluate)
    except StopIteration as stop:
        result = stop
    return grid, strategy, result, overlapped


@pytest.mark.usefixtures("in_process")
def test_the_next_rounds_keys_are_shared_while_the_server_evaluates() -> None:
    nodes, rounds = 6, 3
    grid, strategy, result, overlapped = _rounds_with_an_evaluation(nodes, rounds)
    assert overlapped == [(1, True), (2, True), (3, False)]  # none after the last round
    stages = [Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK]
    assert grid.calls == [(r, s) for r in range(1, rounds + 1) for s in stages]
    weights = np.array([10.0 * n for n in range(1, nodes + 1)])
    step = 0.01 * float(np.dot(weights, range(1, nodes + 1))) / weights.sum()
    bound = rounds * 2 * 100.0 * nodes / (weights.sum() * 4_194_304 / 10_000)
    for got, start in zip(result.arrays.to_numpy_ndarrays(), START, strict=True):
        assert np.max(np.abs(got - (start + rounds * step))) < bound
    seconds = strategy.describe()["stage_seconds"]
    assert sorted(seconds) == [1, 2, 3]
    assert all({"server_setup", *stages, "server_unmask"} <= set(s) for s in seconds.values())
    assert [strategy.rounds.round(r).replied for r in (1, 2, 3)] == [nodes] * 3


class _Evaluating(_Client):
    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]
                 ) -> tuple[float, int, dict[str, Any]]:
        return 0.5, 10 * self.node, {}


class _SampleLog(_StageLog):
    """:class:`_StageLog` that records each round's training sample (the nodes sent
    ``setup``), evaluation sample and ring, and signals when a round's setup is sent."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.trained: dict[int, list[int]] = {}
        self.evaluated: dict[int, list[int]] = {}
        self.rings: dict[int, dict[int, frozenset[int]]] = {}
        self.setup_sent: dict[int, threading.Event] = collections.defaultdict(threading.Event)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None
                         ) -> list[Message]:
        messages = list(messages)
        r = int(messages[0].metadata.group_id)
        nodes = sorted(m.metadata.dst_node_id for m in messages)
        if messages[0].metadata.message_type == "evaluate":
            self.evaluated[r] = nodes
            return _Grid.send_and_receive(self, messages, timeout=timeout)
        stage = str(messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
        if stage == Stage.SETUP:
            self.trained[r] = nodes
            self.setup_sent[r].set()
        replies = super().send_and_receive(messages, timeout=timeout)
        if stage == Stage.SHARE_KEYS:
            self.rings[r] = dict(self.neighbours)
        return replies


def _seeded_rounds_ahead(rounds: int = 3) -> tuple[_SampleLog, list[bool]]:
    """Rounds of 12 of 16 clients (9 shares), 8 evaluating, seed 3, keys ahead on. The
    server's evaluation of round r uses the ``random`` module as another user would
    (Keras' default seeds, Flower's jitter): it seeds it once round r + 1's setup is under
    way and draws before and after that round's keys are shared; per round, whether its
    draws were the ones its seed gives."""
    import random

    app = ClientApp(client_fn=lambda ctx: _Evaluating(ctx.node_id).to_client(),
                    mods=[client_secagg.compact_masked_vectors, secaggplus_mod])
    grid = _SampleLog(app, 16, 0, Stage.COLLECT_MASKED_VECTORS)
    fed = FederationConfig(secure_aggregation=True, num_rounds=rounds, min_train_nodes=2,
                           fraction_train=0.75, fraction_evaluate=0.5, min_available_nodes=16,
                           secagg_clipping_range=100.0)
    strategy = build_secagg_strategy(fed, DPConfig(), seed=3, population=16)
    followed: list[bool] = []

    def evaluate(r: int, arrays: ArrayRecord) -> None:
        if r == 0:
            return
        ahead = r < rounds
        if ahead:
            assert grid.setup_sent[r + 1].wait(10.0)  # the thread is inside round r + 1
        random.seed(100 + r)
        drawn = [random.random()]
        if ahead:
            assert grid.shared[r + 1].wait(10.0)  # ... and has left its key stages
        drawn.append(random.random())
        expected = random.Random(100 + r)
        followed.append(drawn == [expected.random(), expected.random()])

    strategy.start(grid, ArrayRecord(START), num_rounds=rounds, timeout=60,
                   evaluate_fn=evaluate)
    return grid, followed


@pytest.mark.usefixtures("in_process")
def test_with_keys_ahead_the_seed_repeats_the_samples_not_the_rings() -> None:
    """Two runs of seed 3 sample the same 12 trainers and 8 evaluators each round (from
    the client manager's generator) while the main thread seeds and draws from the
    ``random`` module during the key stages; its draws follow its own seed, and the
    rings (from OS entropy) differ (the same ring by chance: about 1 in 10**8)."""
    first, followed_first = _seeded_rounds_ahead()
    second, followed_second = _seeded_rounds_ahead()
    assert followed_first == followed_second == [True, True, True]
    assert first.trained == second.trained and sorted(first.trained) == [1, 2, 3]
    assert first.evaluated == second.evaluated and sorted(first.evaluated) == [1, 2, 3]
    assert {len(n) for n in first.trained.values()} == {12}
    assert {len(n) for n in first.evaluated.values()} == {8}
    assert len({tuple(n) for n in first.trained.values()}) == 3  # each round its own
    for r in (1, 2, 3):
        assert {len(n) for n in first.rings[r].values()} == {9}
        assert first.rings[r] != second.rings[r]


def test_the_private_ring_shuffles_as_flowers_setup_would_and_leaves_the_module_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Given a generator, ``private_ring`` gives the ring Flower's setup makes after
    ``random.seed`` of the same seed; by default the ring comes from OS entropy and the
    ``random`` module is neither read nor reseeded."""
    import random
    from types import SimpleNamespace

    from flwr.server.workflow.secure_aggregation import secaggplus_workflow as module

    rings: list[list[int]] = []

    def shuffle(nodes: list[int]) -> None:  # what setup_stage does with the module's
        module.random.shuffle(nodes)
        rings.append(list(nodes))

    monkeypatch.setattr(module, "random", SimpleNamespace(shuffle=random.shuffle))
    random.seed(5)
    shuffle(list(range(30)))  # Flower's: the module random, seeded
    with secagg_workflow.private_ring(random.Random(5)) as swapped:
        assert swapped
        shuffle(list(range(30)))
    assert rings[0] == rings[1] != list(range(30))
    assert module.random.shuffle is random.shuffle  # put back after the stage

    monkeypatch.undo()
    random.seed(5)
    state = random.getstate()
    for _ in range(2):
        with secagg_workflow.private_ring():
            shuffle(list(range(30)))
        assert random.getstate() == state
    assert rings[2] != rings[3] and module.random is random


@pytest.mark.usefixtures("in_process")
def test_keys_shared_for_a_round_that_never_runs_leave_no_record() -> None:
    grid, strategy, result, overlapped = _rounds_with_an_evaluation(5, 4, stop_at=2)
    assert isinstance(result, StopIteration) and overlapped == [(1, True), (2, True)]
    assert (3, Stage.SHARE_KEYS) in grid.calls  # prepared while round 2 was evaluated
    assert (3, Stage.COLLECT_MASKED_VECTORS) not in grid.calls
    assert sorted(strategy.rounds.stats) == [1, 2]
    assert sorted(strategy.describe()["stage_seconds"]) == [1, 2]


@pytest.mark.usefixtures("in_process")
def test_with_another_flower_the_rounds_run_one_after_the_other(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from common import pinned

    monkeypatch.setattr(pinned, "installed_version", {"flwr": "1.43.0"}.get)
    _, strategy, result, overlapped = _rounds_with_an_evaluation(5, 2, patience=0.3)
    assert overlapped == [(1, False), (2, False)]
    assert sorted(strategy.rounds.stats) == [1, 2] and not isinstance(result, Exception)


@pytest.mark.usefixtures("in_process")
def test_pairwise_keys_agreed_at_share_keys_mask_the_same_and_a_dropout_still_unmasks(
        mod_names: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The merchants agree their pairwise keys at share_keys (Flower's key agreement,
    counted by stage): collect_masked_vectors agrees none and the mean is exact, with
    node 5's masks rebuilt by the server from its shares as Flower does."""
    from flwr.common.secure_aggregation.crypto import symmetric_encryption

    assert client_seam.secaggplus_names()
    assert mod_names.generate_shared_key is client_seam.shared_key
    agreed: collections.Counter[str] = collections.Counter()
    stage: list[str] = [""]
    flowers = symmetric_encryption.generate_shared_key

    def counted(private_key: Any, public_key: Any) -> bytes:
        agreed[stage[0]] += 1
        return flowers(private_key, public_key)

    monkeypatch.setattr(symmetric_encryption, "generate_shared_key", counted)

    def note_stage(msg: Message, context: Context, call_next: Any) -> Message:
        stage[0] = str(msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
        return call_next(msg, context)

    nodes, dropped = 12, 5
    grid, _, result = _one_round(nodes, dropped,
                                 outer=(note_stage, client_secagg.pairwise_keys_ahead))
    _assert_weighted_mean(result, nodes, dropped)
    neighbours = 9 - 1  # 9 shares at 12 clients: each agrees with 8 others, twice
    assert agreed == {Stage.SHARE_KEYS: 2 * nodes * neighbours}
    kept = [n for n, c in grid.contexts.items()
            if client_seam.PAIRWISE_RECORD in c.state.config_records]
    assert kept == [dropped]  # the others dropped theirs at collect_masked_vectors


def test_a_pair_not_agreed_ahead_is_agreed_as_flower_does() -> None:
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
        generate_shared_key,
    )
    from flwr.supercore.primitives.asymmetric import (
        generate_key_pairs,
        private_key_to_bytes,
        public_key_to_bytes,
    )

    mine, theirs, other = generate_key_pairs(), generate_key_pairs(), generate_key_pairs()
    sk1 = private_key_to_bytes(mine[0])
    record = {"sk1": sk1, "pk1": [public_key_to_bytes(theirs[1])],
              "keys": [generate_shared_key(mine[0], theirs[1])]}
    private = client_seam.private_key_of(sk1)
    with client_seam.pairwise_keys_agreed(record):
        assert client_seam.shared_key(private, theirs[1]) == record["keys"][0]
        assert client_seam.shared_key(private, other[1]) == \
            generate_shared_key(mine[0], other[1])  # not agreed ahead
        assert client_seam.shared_key(other[0], theirs[1]) == \
            generate_shared_key(other[0], theirs[1])  # another private key
    assert client_seam.shared_key(private, theirs[1]) == record["keys"][0]  # agreed again


def test_masked_arrays_leave_as_uint32_and_anything_else_as_it_is() -> None:
    masked = np.array([[0, 1], [2**32 - 1, 7]], dtype=np.int64)
    sent = bytes_to_ndarray(client_seam.masked_to_bytes(masked))
    assert sent.dtype == np.uint32 and np.array_equal(sent.astype(np.int64), masked)
    for other in (np.array([-1, 3]), np.array([2**32]), np.array([0.5, 1.0]),
                  np.array(5, dtype=np.int64)):
        back = bytes_to_ndarray(client_seam.masked_to_bytes(other))
        assert back.dtype == (np.uint32 if other.ndim == 0 else other.dtype)
        assert np.array_equal(back.astype(other.dtype), other)
