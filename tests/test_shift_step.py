"""``federation.shift-server-lr``: after a round's aggregate the response shifts move by
the rate times the averaged change, every other weight is the aggregate as it is; at
rate 1 nothing changes, bit for bit (``server.shift_step``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from helpers import FakeGrid

from common.protocol import CUSTOMERS_SAMPLED, CUSTOMERS_TOTAL
from server.checkpoint import (
    load_checkpoint,
    restore_strategy_state,
    save_checkpoint,
    strategy_state,
)
from server.config import DPConfig, FederationConfig, settings_from_flat, shift_momentum
from server.customer_dp import wrap_customer_dp
from server.privacy import wrap_strategy
from server.secagg import ClientSideFixedClipping, build_secagg_strategy
from server.shift_step import ShiftStep
from server.strategy import build_strategy

pytestmark = pytest.mark.usefixtures("server_identity")

SHAPES = [(2, 3), (3,)]  # tensor 0: another weight; tensor 1: "the shifts"
SHIFTS = (1,)


def _fed(**kwargs: Any) -> FederationConfig:
    """Settings for a hand-made round; no momentum unless given (the default has some)."""
    return FederationConfig(min_train_nodes=1, min_available_nodes=1,
                            **{"shift_server_momentum": 0.0, **kwargs})


def _full(value: float) -> list[np.ndarray]:
    return [np.full(s, value, np.float32) for s in SHAPES]


def _round(runner: Any, start: list[np.ndarray], replies: list[tuple[float, int]]
           ) -> list[np.ndarray]:
    """One round from ``start``: node k replies every weight at ``replies[k][0]`` with
    ``replies[k][1]`` rows; the new global weights."""
    ins = list(runner.configure_train(1, ArrayRecord(start), ConfigRecord(),
                                      FakeGrid(list(range(1, len(replies) + 1)))))
    ins.sort(key=lambda m: m.metadata.dst_node_id)
    msgs = [Message(RecordDict({"arrays": ArrayRecord(_full(v)),
                                "metrics": MetricRecord({"num-examples": n})}), reply_to=m)
            for m, (v, n) in zip(ins, replies, strict=True)]
    arrays, _ = runner.aggregate_train(1, msgs)
    return arrays.to_numpy_ndarrays()  # type: ignore[no-any-return]


def test_the_step_is_the_rate_times_the_change_on_the_shifts_only() -> None:
    old = [np.array([1.0, 2.0], np.float32), np.array([0.5, -1.0], np.float32)]
    new = [np.array([3.0, 2.0], np.float32), np.array([1.0, -2.0], np.float32)]
    got, velocity = ShiftStep((1,), 3.0).apply(old, new)
    np.testing.assert_array_equal(got[0], new[0])  # not a shift: the aggregate
    # 0.5 + 3 (1 - 0.5) = 2; -1 + 3 (-2 + 1) = -4
    np.testing.assert_array_equal(got[1], np.array([2.0, -4.0], np.float32))
    assert got[1].dtype == np.float32
    assert velocity is not None
    np.testing.assert_array_equal(velocity[0], [0.5, -1.0])
    assert ShiftStep((1,), 1.0).apply(old, new)[0] is new
    assert ShiftStep((), 3.0).apply(old, new)[0] is new


def test_momentum_adds_the_decayed_velocity_to_the_change() -> None:
    old = [np.zeros(2, np.float32), np.array([1.0, 1.0], np.float32)]
    new = [np.ones(2, np.float32), np.array([1.5, 0.0], np.float32)]
    step = ShiftStep((1,), 2.0, 0.5)
    got, velocity = step.apply(old, new, [np.array([0.2, 0.4])])
    # v = 0.5 [0.2, 0.4] + [0.5, -1] = [0.6, -0.8]; 1 + 2 v = [2.2, -0.6]
    np.testing.assert_allclose(velocity[1 - 1], [0.6, -0.8])  # type: ignore[index]
    np.testing.assert_allclose(got[1], [2.2, -0.6], rtol=1e-6)
    np.testing.assert_array_equal(got[0], new[0])
    # The first round has no velocity yet: the plain step.
    np.testing.assert_allclose(step.apply(old, new)[0][1], [2.0, -1.0])
    with pytest.raises(ValueError, match="weight tensors"):
        ShiftStep((1,), 3.0).apply(old[:1], new)


def test_fedavg_steps_the_shifts_by_the_rate_times_the_averaged_change() -> None:
    start = _full(1.0)
    replies = [(2.0, 10), (5.0, 30)]  # FedAvg: (2 * 10 + 5 * 30) / 40 = 4.25
    strategy = build_strategy(_fed(shift_server_lr=2.0), seed=0, shifts=SHIFTS)
    got = _round(strategy, start, replies)
    np.testing.assert_array_equal(got[0], np.full(SHAPES[0], 4.25, np.float32))
    # 1 + 2 (4.25 - 1) = 7.5
    np.testing.assert_array_equal(got[1], np.full(SHAPES[1], 7.5, np.float32))


def test_at_rate_one_the_round_is_fedavgs_bit_for_bit() -> None:
    rng = np.random.default_rng(4)
    start = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    replies = [(0.3, 7), (-1.7, 11), (2.9, 5)]
    fed = _fed()
    with_shifts = _round(build_strategy(fed, seed=0, shifts=SHIFTS), start, replies)
    plain = _round(build_strategy(fed, seed=0), start, replies)
    assert [a.tobytes() for a in with_shifts] == [a.tobytes() for a in plain]
    # The default's momentum has no velocity in its first round: FedAvg's too.
    default = FederationConfig(min_train_nodes=1, min_available_nodes=1)
    assert default.shift_server_momentum > 0
    with_shifts = _round(build_strategy(default, seed=0, shifts=SHIFTS), start, replies)
    assert [a.tobytes() for a in with_shifts] == [a.tobytes() for a in plain]


def test_the_velocity_goes_through_a_checkpoint_and_a_resume_continues(tmp_path: Any
                                                                       ) -> None:
    fed = _fed(shift_server_lr=1.0, shift_server_momentum=0.5)
    first = build_strategy(fed, seed=0, shifts=SHIFTS)
    w1 = _round(first, _full(0.0), [(1.0, 4)])  # v = 1: shifts 1
    np.testing.assert_allclose(w1[1], 1.0)
    save_checkpoint(tmp_path, 1, {"weights": w1, "strategy": strategy_state(first)})
    w2 = _round(first, w1, [(1.5, 4)])  # v = 0.5 x 1 + 0.5 = 1: shifts 2
    np.testing.assert_allclose(w2[0], 1.5)
    np.testing.assert_allclose(w2[1], 2.0)

    resumed = build_strategy(fed, seed=0, shifts=SHIFTS)
    restore_strategy_state(resumed, load_checkpoint(tmp_path / "round-00001.npz")["strategy"])
    again = _round(resumed, w1, [(1.5, 4)])
    assert [a.tobytes() for a in again] == [a.tobytes() for a in w2]


def test_fedavgm_steps_on_from_the_stepped_shifts() -> None:
    """FedAvgM keeps its own copy of the global weights: the next round starts there."""
    strategy = build_strategy(_fed(strategy="fedavgm", server_momentum=0.0,
                                   shift_server_lr=2.0), seed=0, shifts=SHIFTS)
    w1 = _round(strategy, _full(0.0), [(1.0, 4)])
    np.testing.assert_allclose(w1[0], 1.0)
    np.testing.assert_allclose(w1[1], 2.0)
    w2 = _round(strategy, w1, [(3.0, 4)])
    np.testing.assert_allclose(w2[0], 3.0)  # 1 + (3 - 1)
    np.testing.assert_allclose(w2[1], 4.0)  # 2 + 2 (3 - 2)


def test_under_server_side_dp_the_step_follows_the_noise_once() -> None:
    fed = _fed(shift_server_lr=3.0)
    dp = DPConfig(mode="server-fixed", noise_multiplier=1e-9, clipping_norm=100.0)
    runner = wrap_strategy(build_strategy(fed, seed=0, shifts=SHIFTS), dp, fed, population=2)
    got = _round(runner, _full(0.0), [(0.01, 10), (0.03, 1000)])  # DP: a plain mean 0.02
    np.testing.assert_allclose(got[0], 0.02, rtol=1e-5)
    np.testing.assert_allclose(got[1], 0.06, rtol=1e-5)  # 3 x 0.02, stepped once


def test_under_customer_dp_the_step_follows_the_server_step(tmp_path: Any) -> None:
    fed = _fed(shift_server_lr=3.0)
    dp = DPConfig(unit="customer", customer_rate=0.5, clipping_norm=1.0,
                  noise_multiplier=1e-9, server_optimizer="sgd", server_learning_rate=1.0,
                  customers=8)
    runner, _ = wrap_customer_dp(build_strategy(fed, seed=0, shifts=SHIFTS), dp, fed, 2,
                                 tmp_path / "privacy.jsonl")
    start = _full(1.0)
    ins = list(runner.configure_train(1, ArrayRecord(start), ConfigRecord(), FakeGrid([1, 2])))
    msgs = [Message(RecordDict({"arrays": ArrayRecord(_full(v)), "metrics": MetricRecord(
        {"num-examples": 40, CUSTOMERS_SAMPLED: 2, CUSTOMERS_TOTAL: 4})}), reply_to=m)
        for m, v in zip(ins, (0.3, 0.5), strict=True)]
    got = runner.aggregate_train(1, msgs)[0].to_numpy_ndarrays()
    # D = 0.5 x 8 customers: the server's step is (0.3 + 0.5) / 4 = 0.2 from 1.
    np.testing.assert_allclose(got[0], 1.2, rtol=1e-5)
    np.testing.assert_allclose(got[1], 1.6, rtol=1e-5)  # 1 + 3 x 0.2


@pytest.mark.parametrize(("strategy", "dp", "applies"), [
    ("fedavg", DPConfig(), True),
    ("fedprox", DPConfig(), True),
    ("fedavgm", DPConfig(), False),  # its own server momentum
    ("fedadam", DPConfig(), False),
    ("krum", DPConfig(), False),  # a velocity would carry one round's pull on
    ("fedavg", DPConfig(mode="server-fixed", clipping_norm=1.0), False),  # sums noise
    ("fedavg", DPConfig(unit="customer", clipping_norm=1.0), False),
])
def test_the_shifts_momentum_applies_to_plain_averages_without_dp(
        strategy: str, dp: DPConfig, applies: bool) -> None:
    fed = FederationConfig(strategy=strategy, shift_server_momentum=0.75)
    assert shift_momentum(fed, dp) == (0.75 if applies else 0.0)
    built = build_strategy(FederationConfig(strategy=strategy, min_train_nodes=1,
                                            min_available_nodes=1), seed=0,
                           shifts=SHIFTS, privacy=dp)
    assert built.shift_step.momentum == (FederationConfig().shift_server_momentum
                                         if applies else 0.0)


def test_fedavgm_keeps_its_own_momentum_alone_on_the_shifts() -> None:
    # FedAvgM at its default (0.9) and the shift step's default momentum: the second
    # round's shifts are FedAvgM's, with no second velocity on top.
    fed = FederationConfig(strategy="fedavgm", min_train_nodes=1, min_available_nodes=1)
    plain = build_strategy(fed, seed=0)
    stepped = build_strategy(fed, seed=0, shifts=SHIFTS)
    for runner in (plain, stepped):
        w1 = _round(runner, _full(0.0), [(1.0, 4)])
        runner.last = _round(runner, w1, [(2.0, 4)])
    assert [a.tobytes() for a in stepped.last] == [a.tobytes() for a in plain.last]


def _fitres(arrays: list[np.ndarray], n: int) -> tuple[Any, FitRes]:
    return None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n,
                        {"num-examples": n})


@pytest.mark.parametrize("dp_on", [False, True])
def test_secagg_steps_the_shifts_of_its_aggregate(dp_on: bool) -> None:
    fed = FederationConfig(secure_aggregation=True, min_train_nodes=2,
                           min_available_nodes=2, shift_server_lr=4.0,
                           shift_server_momentum=0.0)
    dp = DPConfig(mode="client-fixed", noise_multiplier=1e-9, clipping_norm=1.0) \
        if dp_on else DPConfig()
    strategy = build_secagg_strategy(fed, dp, seed=0, population=5, shifts=SHIFTS)
    start = _full(0.5)
    strategy._reference = start
    strategy._incoming = start  # what configure_fit keeps of the round's parameters
    aggregate = [np.full(s, 0.75) for s in SHAPES]  # the unmasked mean, float64
    runner = ClientSideFixedClipping(strategy, 1e-9, 1.0, 2) if dp_on else strategy
    params, _ = runner.aggregate_fit(1, [_fitres(aggregate, 3), _fitres(aggregate, 3)], [])
    got = parameters_to_ndarrays(params)
    np.testing.assert_allclose(got[0], 0.75, rtol=1e-6)
    np.testing.assert_allclose(got[1], 1.5, rtol=1e-6)  # 0.5 + 4 (0.75 - 0.5), once


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_a_bad_rate_names_the_key(value: float) -> None:
    with pytest.raises(ValueError, match="'federation.shift-server-lr'"):
        settings_from_flat({"federation.shift-server-lr": value})


@pytest.mark.parametrize("value", [-0.1, 1.0, float("nan")])
def test_a_bad_momentum_names_the_key(value: float) -> None:
    with pytest.raises(ValueError, match="'federation.shift-server-momentum'"):
        settings_from_flat({"federation.shift-server-momentum": value})


@pytest.mark.parametrize("velocity", [[np.zeros(5)], [], [np.zeros(3, np.int64)]],
                         ids=["wrong-shape", "missing", "not-float"])
def test_a_checkpoint_whose_velocity_does_not_fit_is_refused_on_resume(
        velocity: list[np.ndarray], tmp_path: Any) -> None:
    from server.resume import ResumeError, start_state
    from server.runner import Runner

    strategy = build_strategy(_fed(shift_server_momentum=0.5), seed=0, shifts=SHIFTS)
    save_checkpoint(tmp_path / "checkpoints", 2, {
        "weights": _full(0.5), "strategy": {"shift_velocity": velocity},
        "selection": {"round": 2, "val_loss": 1.0, "weights": None, "stale": 0}})
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ResumeError, match="round 2 does not fit.*shift velocity"):
        start_state(tmp_path, True, Runner(strategy, strategy, None), _full(0.0))
