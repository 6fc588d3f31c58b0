"""Customer-level DP (issue 17, central placement): config, the clipped per-customer
sum (a non-finite customer left out), the customer sampling (secret by default,
seeded in simulation only), the server's noised step, the dp-accounting ledger,
its replay on resume, the budget, and a simulation end to end."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from helpers import FakeGrid, hand_snapshots, read_jsonl, run_driver

from client.customer_dp import sampled_customers, sampling_rng
from common.config import ModelConfig, SnapshotConfig, TrainConfig
from common.customer_updates import clipped_customer_sum, pack_customers, row_losses
from common.features import AGGREGATE_FEATURES, NUMERIC_FEATURES
from common.model import build_model, model_inputs, targets, weights_of
from common.protocol import (
    CUSTOMER_CLIP_KEY,
    CUSTOMER_LR_KEY,
    CUSTOMER_RATE_KEY,
    CUSTOMER_SEEDED_KEY,
    CUSTOMERS_DROPPED,
    CUSTOMERS_SAMPLED,
    CUSTOMERS_TOTAL,
    PRE_EVALUATE_KEY,
)
from common.snapshots import Snapshots
from server.config import DPConfig, FederationConfig, check_compatible
from server.customer_dp import wrap_customer_dp
from server.dp_accounting import CustomerLedger, customer_epsilons, settled
from server.strategy import build_strategy
from simulations.settings import experiment_from_flat

SNAP = SnapshotConfig(max_len=8, hash_buckets=16)
MODEL = ModelConfig(lstm_units=8, dense_units=8)
L, A = SNAP.max_len, len(SNAP.actions)

# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flat", "key"), [
    ({"privacy.unit": "household"}, "privacy.unit"),
    ({"privacy.unit": "customer", "privacy.customer-rate": 0.0}, "privacy.customer-rate"),
    ({"privacy.unit": "customer", "privacy.customer-rate": 1.5}, "privacy.customer-rate"),
    ({"privacy.unit": "customer", "privacy.mode": "server-fixed"}, "privacy.mode"),
    ({"privacy.unit": "customer", "federation.strategy": "krum"}, "privacy.unit"),
    ({"privacy.unit": "customer", "privacy.customers": -3}, "privacy.customers"),
    # The pre-training losses would leave outside epsilon: an explicit 'on' is refused.
    ({"privacy.unit": "customer", "federation.pre-evaluate": "on"},
     "federation.pre-evaluate"),
    ({"privacy.target-delta": -0.1}, "privacy.target-delta"),
    # The customer-* keys are range-checked whatever the unit.
    ({"privacy.customer-rate": 0.0}, "privacy.customer-rate"),
    ({"privacy.customers": -1}, "privacy.customers"),
    ({"privacy.customer-learning-rate": -1.0}, "privacy.customer-learning-rate"),
    ({"privacy.server-learning-rate": float("inf")}, "privacy.server-learning-rate"),
    ({"privacy.unit": "customer", "federation.strategy": "fedprox",
      "federation.proximal-mu": 0.5}, "federation.proximal-mu"),
    # A sample the server can recompute: simulations of customer-level DP only.
    ({"privacy.seeded-sampling": True}, "privacy.seeded-sampling"),
    ({"privacy.unit": "customer", "privacy.seeded-sampling": True,
      "federation.mode": "deployment"}, "privacy.seeded-sampling"),
])
def test_bad_customer_dp_config_fails_fast_naming_the_key(flat: dict[str, Any],
                                                          key: str) -> None:
    with pytest.raises(ValueError, match=f"'{key}'"):
        experiment_from_flat(flat)


def test_customer_unit_config_and_its_delta() -> None:
    exp = experiment_from_flat({"privacy.unit": "customer", "privacy.customer-rate": 1.0})
    dp = exp.privacy
    assert dp.customer_level and not dp.enabled and dp.customer_rate == 1.0
    assert dp.delta(20_000) == pytest.approx(5e-6)  # 1 / (10 customers)
    assert DPConfig(unit="customer", target_delta=1e-7).delta(20_000) == 1e-7
    assert DPConfig(mode="server-fixed").delta() == 1e-5  # merchant level: unchanged
    check_compatible(FederationConfig(strategy="fedprox"), dp)


# ---------------------------------------------------------------------------------------
# The clipped per-customer sum (hand-built batches)
# ---------------------------------------------------------------------------------------


def _snapshots(users: list[str], seed: int) -> Snapshots:
    rng = np.random.default_rng(seed)
    n = len(users)
    lengths = rng.integers(1, L + 1, n)
    valid = np.arange(L)[None, :] >= (L - lengths)[:, None]
    snaps = hand_snapshots(
        rng,
        events=np.where(valid, rng.integers(1, 6, (n, L)), 0).astype(np.int32),
        categories=np.where(valid, rng.integers(1, SNAP.hash_buckets + 1, (n, L)), 0)
        .astype(np.int32),
        numeric=np.where(valid[..., None], rng.normal(size=(n, L, len(NUMERIC_FEATURES))), 0)
        .astype(np.float32),
        static=rng.normal(size=(n, len(AGGREGATE_FEATURES))).astype(np.float32),
        decay=rng.random(n) < 0.5, interest=rng.normal(1.0, 1.0, n), n_actions=A)
    snaps.user_id = np.array(users, dtype=object)
    return snaps


@pytest.fixture(scope="module")
def model() -> Any:
    return build_model(MODEL, SNAP, seed=0)


def _norm(arrays: list[np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays))


def test_a_customer_with_50_snapshots_moves_the_sum_by_at_most_the_clipping_norm(
        model: Any) -> None:
    others = [f"c{i}" for i in range(12) for _ in range(1 + i % 3)]
    without = _snapshots(others, seed=1)
    big = _snapshots(["whale"] * 50, seed=2)
    big.decay = 1.0 - big.decay  # labels the model gets wrong: a large gradient
    with_big = Snapshots.concat([without, big])
    clip, lr = 0.05, 1.0
    a = clipped_customer_sum(model, MODEL, without, clipping_norm=clip, learning_rate=lr,
                             rows=16)
    b = clipped_customer_sum(model, MODEL, with_big, clipping_norm=clip, learning_rate=lr,
                             rows=16)  # the whale has more rows than a batch: raised to 50
    alone = clipped_customer_sum(model, MODEL, big, clipping_norm=1e9, learning_rate=lr)
    assert alone.mean_norm > 10 * clip  # unclipped, the whale would move it far more
    diff = _norm([y - x for x, y in zip(a.update, b.update, strict=True)])
    assert diff <= clip * (1 + 1e-4)
    assert diff == pytest.approx(clip, rel=1e-3)  # clipped to exactly C
    assert (a.customers, b.customers, b.rows) == (12, 13, len(others) + 50)
    assert b.clipped >= 1


def test_unclipped_sum_is_minus_eta_times_the_gradient_of_the_summed_loss(model: Any) -> None:
    snaps = _snapshots([f"c{i // 3}" for i in range(21)], seed=3)
    lr = 0.5
    got = clipped_customer_sum(model, MODEL, snaps, clipping_norm=1e9, learning_rate=lr,
                               rows=8)
    x = {k: tf.constant(v) for k, v in model_inputs(model, snaps).items()}
    y = {k: tf.constant(v) for k, v in targets(snaps, A).items()}
    weights = (MODEL.loss_weight_decay, MODEL.loss_weight_interest,
               MODEL.loss_weight_activation, True)
    with tf.GradientTape() as tape:
        losses = row_losses(model(x, training=False), y, weights)
        total = tf.reduce_sum(losses)
    grads = tape.gradient(total, model.weights)
    for g, u in zip(grads, got.update, strict=True):
        np.testing.assert_allclose(u, -lr * tf.convert_to_tensor(g).numpy(), rtol=2e-3,
                                   atol=2e-6)
    # The per-row terms are Keras' compiled losses, per row (its activation term divides
    # by the batch's logged rows instead of all rows).
    out = model(x, training=False)
    compiled = model.compute_loss(x=x, y=y, y_pred=out)
    heads = tf.reduce_mean(row_losses(out, y, (weights[0], weights[1], 0.0, True)))
    logged = float(np.sum(snaps.action >= 0))
    act = tf.reduce_sum(row_losses(out, y, (0.0, 0.0, 1.0, True))) / logged
    assert float(heads + weights[2] * act) == pytest.approx(float(compiled), rel=1e-4)
    assert got.clipped == 0 and got.customers == 7
    empty = clipped_customer_sum(model, MODEL, snaps.subset(np.zeros(21, bool)),
                                 clipping_norm=1.0, learning_rate=lr)
    assert empty.customers == 0 and _norm(empty.update) == 0


def test_batches_hold_whole_customers() -> None:
    codes = np.array([3, 0, 0, 1, 2, 2, 2, 3, 1, 0])
    batches, size = pack_customers(codes, rows=4)
    assert size == 4 and sorted(np.concatenate(batches).tolist()) == list(range(10))
    for batch in batches:
        assert len(batch) <= size
        for c in set(codes[batch].tolist()):  # every row of a customer in one batch
            assert set(np.flatnonzero(codes == c)) <= set(batch.tolist())
    # A customer with more rows than a batch raises it to the next multiple of the batch
    # size, so a few sizes cover every customer (each size is one more trace).
    assert pack_customers(np.array([0] * 7 + [1]), rows=4)[1] == 8
    assert pack_customers(np.array([0] * 8 + [1]), rows=4)[1] == 8
    assert pack_customers(np.array([0] * 9 + [1]), rows=4)[1] == 12


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_a_customer_with_a_non_finite_update_is_left_out_and_counted(model: Any,
                                                                     bad: float) -> None:
    users = [f"c{i // 2}" for i in range(12)]  # 6 customers, two rows each
    snaps = _snapshots(users, seed=6)
    clean = clipped_customer_sum(model, MODEL, snaps, clipping_norm=0.1, learning_rate=1.0,
                                 rows=8)
    evil = _snapshots(["evil"], seed=7)
    evil.numeric[:] = bad  # every event of that customer
    evil.static[:] = bad
    poisoned = Snapshots.concat([snaps, evil])
    got = clipped_customer_sum(model, MODEL, poisoned, clipping_norm=0.1, learning_rate=1.0,
                               rows=8)
    assert (got.dropped, got.customers, clean.dropped) == (1, 6, 0)
    assert all(np.isfinite(u).all() for u in got.update) and math.isfinite(got.mean_norm)
    for a, b in zip(got.update, clean.update, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _seeded(ids: np.ndarray, rate: float, seed: int, server_round: int,
            merchant: str) -> np.ndarray:
    return sampled_customers(ids, rate, sampling_rng(True, seed, server_round, merchant))


def test_customer_sampling_is_poisson_and_seeded_only_when_asked() -> None:
    ids = np.array([f"u{i}" for i in range(4000)] * 2, dtype=object)  # two rows each
    a = _seeded(ids, 0.1, seed=0, server_round=1, merchant="m1")
    assert len(a) == len(set(a.tolist())) and abs(len(a) - 400) < 4 * math.sqrt(360)
    assert np.array_equal(a, _seeded(ids, 0.1, 0, 1, "m1"))
    assert not np.array_equal(a, _seeded(ids, 0.1, 0, 2, "m1"))
    assert not np.array_equal(a, _seeded(ids, 0.1, 0, 1, "m2"))
    assert len(_seeded(ids, 1.0, 0, 1, "m1")) == 4000
    # By default the sample comes from OS entropy: the run's seed does not recompute it.
    secret = [sampled_customers(ids, 0.1, sampling_rng(False, 0, 1, "m1")) for _ in range(2)]
    assert not np.array_equal(secret[0], a) and not np.array_equal(secret[0], secret[1])
    assert all(abs(len(x) - 400) < 4 * math.sqrt(360) for x in secret)


# ---------------------------------------------------------------------------------------
# Accounting and ledger
# ---------------------------------------------------------------------------------------


def _direct(q: float, z: float, rounds: int, delta: float) -> tuple[float, float]:
    from dp_accounting import dp_event, pld, rdp

    event = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z))
    by_rdp, by_pld = rdp.RdpAccountant(), pld.PLDAccountant()
    by_rdp.compose(event, rounds)
    by_pld.compose(event, rounds)
    return float(by_rdp.get_epsilon(delta)), float(by_pld.get_epsilon(delta))


@pytest.mark.parametrize(("q", "z", "rounds"), [(0.05, 1.0, 20), (0.5, 2.0, 3), (1.0, 4.0, 1)])
def test_accountant_epsilon_equals_dp_accounting(q: float, z: float, rounds: int) -> None:
    delta = 1 / (10 * 30_000)
    assert customer_epsilons(q, z, rounds, delta) == pytest.approx(_direct(q, z, rounds,
                                                                           delta), rel=1e-9)
    eps_rdp, eps_pld = customer_epsilons(q, z, rounds, delta)
    assert 0 < eps_pld <= eps_rdp  # PLD is the tighter here


def _ledger(path: Path | None, **dp: Any) -> CustomerLedger:
    return CustomerLedger(DPConfig(unit="customer", **{"customer_rate": 0.1,
                                                       "noise_multiplier": 1.0, **dp}), path)


def _three_released_rounds(path: Path, placement: str) -> str:
    """A ledger at ``path`` of rounds 1-3, each released by 7 of 8 merchants, settled
    (:func:`_settle`); its text."""
    ledger = _ledger(path, placement=placement, customers=5000)
    for r in (1, 2, 3):
        ledger.released(r, 7)
        ledger.record(r, 8, 7, 1.0)
    return _settle(path)


def _settle(path: Path) -> str:
    """Rewrite the ledger at ``path`` with its complete lines only (the pending lines
    they follow dropped), as a replay leaves it and as ledgers were before pending
    lines; its text."""
    text = "".join(json.dumps(x) + "\n" for x in settled(read_jsonl(path)))
    path.write_text(text)
    return text


def test_ledger_lines_and_replay_on_resume(tmp_path: Path) -> None:
    path = tmp_path / "privacy.jsonl"
    ledger = _ledger(path)
    ledger.learn_customers(5000)
    eps = []
    for r in (1, 2, 3):
        ledger.released(r, 7)
        eps.append(ledger.record(r, 8, 7, 1.0)["epsilon"])
    assert ledger.record(4, 8, 0, 1.0)["epsilon"] == eps[-1]  # released nothing: free
    raw = [json.loads(t) for t in path.read_text().splitlines()]
    assert [(x["round"], x.get("pending", False)) for x in raw] == [
        (1, True), (1, False), (2, True), (2, False), (3, True), (3, False)]
    lines = settled(raw)
    assert [line["round"] for line in lines] == [1, 2, 3]
    first = lines[0]
    assert (first["sampling_rate"], first["noise_multiplier"], first["clipping_norm"],
            first["customers"], first["sampling"]) == (0.1, 1.0, 1.0, 5000, "secret")
    assert "customers_sampled" not in first  # outside epsilon: not published
    assert first["delta"] == pytest.approx(1 / 50_000)
    rdp2, pld2 = _direct(0.1, 1.0, 2, 1 / 50_000)
    assert (lines[1]["epsilon_rdp"], lines[1]["epsilon_pld"]) == pytest.approx((rdp2, pld2))
    assert lines[1]["epsilon"] == pytest.approx(min(rdp2, pld2)) and eps[1] == lines[1]["epsilon"]
    # Resume after round 2: the count comes back from the file, later lines go.
    again = _ledger(path)
    assert again.replay(upto=2) == 2
    assert again.customers == 5000 and again.epsilon == pytest.approx(eps[1])
    assert len(path.read_text().splitlines()) == 2
    again.released(3, 7)
    assert again.record(3, 8, 7, 1.0)["epsilon"] == pytest.approx(eps[2])
    with pytest.raises(ValueError, match="other privacy settings"):
        _ledger(path, noise_multiplier=2.0).replay(upto=3)


def test_budget_withholds_the_round_that_would_pass_it() -> None:
    delta = 1 / 10_000
    eps = [min(_direct(0.2, 1.0, r, delta)) for r in (1, 2, 3)]
    ledger = _ledger(None, customer_rate=0.2, target_epsilon=(eps[1] + eps[2]) / 2)
    assert not ledger.would_exceed()  # the count (so delta) is unknown yet
    ledger.learn_customers(1000)
    decisions = []
    for r in (1, 2, 3):
        decisions.append(ledger.would_exceed())
        if not decisions[-1]:
            ledger.released(r, 4)
            ledger.record(r, 4, 4, 1.0)
    assert decisions == [False, False, True] and ledger.epsilon <= ledger.dp.target_epsilon


# ---------------------------------------------------------------------------------------
# The server's aggregation (hand-made replies)
# ---------------------------------------------------------------------------------------

SHAPES = [(2, 3), (3,)]
pytestmark = pytest.mark.usefixtures("server_identity")


def _reply(ins: Message, arrays: list[np.ndarray], sampled: int, total: int) -> Message:
    return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(
        {"num-examples": 10 * total, CUSTOMERS_SAMPLED: sampled, CUSTOMERS_TOTAL: total,
         "fit_seconds": 0.1})}), reply_to=ins)


def _server(tmp_path: Path, **dp: Any) -> tuple[Any, CustomerLedger, dict[int, Message],
                                                 list[np.ndarray]]:
    fed = FederationConfig(min_train_nodes=1, min_available_nodes=1)
    config = DPConfig(unit="customer", **{"customer_rate": 0.5, "clipping_norm": 1.0, **dp})
    runner, ledger = wrap_customer_dp(build_strategy(fed, 0), config, fed, 3,
                                      tmp_path / "privacy.jsonl")
    start = [np.ones(s, np.float32) for s in SHAPES]
    ins = {m.metadata.dst_node_id: m for m in runner.configure_train(
        1, ArrayRecord(start), ConfigRecord(), FakeGrid([1, 2, 3]))}
    return runner, ledger, ins, start


def test_server_adds_the_sums_and_divides_by_the_expected_sample(tmp_path: Path) -> None:
    runner, ledger, ins, start = _server(tmp_path, noise_multiplier=1e-9,
                                         server_learning_rate=2.0, server_optimizer="sgd")
    config = next(iter(ins.values())).content.config_records["config"]
    assert (config[CUSTOMER_RATE_KEY], config[CUSTOMER_CLIP_KEY], config[CUSTOMER_LR_KEY]) \
        == (0.5, 1.0, 1.0)
    sums = [[np.full(s, v, np.float32) for s in SHAPES] for v in (0.3, -0.1, 0.4)]
    nan = [np.full(s, np.nan, np.float32) for s in SHAPES]
    replies = [_reply(ins[1], sums[0], 3, 40), _reply(ins[2], sums[1], 2, 20),
               _reply(ins[3], nan, 9, 90)]  # screened out by the guard
    arrays, metrics = runner.aggregate_train(1, replies)
    assert CUSTOMERS_SAMPLED not in metrics  # nor in metrics.jsonl: outside epsilon
    # Only the merchants' counts are published: no sample size, no fit time.
    assert set(runner.strategy.rounds.round(1).train) <= {"num-examples", CUSTOMERS_TOTAL}
    # Customers estimated from the two usable replies, scaled to 3 merchants: 90.
    assert ledger.customers == 90 and runner.expected_sampled == pytest.approx(45.0)
    for got, a, b, w in zip(arrays.to_numpy_ndarrays(), sums[0], sums[1], start, strict=True):
        np.testing.assert_allclose(got, w + 2.0 * (a + b) / 45.0, rtol=1e-6)
    # Released: on disk before aggregate_train returns (the recorder comes later).
    (pending,) = read_jsonl(tmp_path / "privacy.jsonl")
    assert (pending["round"], pending["pending"], pending["merchants_replied"]) == (1, True, 2)
    line = ledger.record(1, 3, 2, 1.0)
    assert "customers_sampled" not in line and line["merchants_replied"] == 2
    assert CUSTOMER_SEEDED_KEY not in config and PRE_EVALUATE_KEY not in config


def test_server_noise_has_std_z_times_c_on_the_sum(tmp_path: Path) -> None:
    runner, ledger, ins, start = _server(tmp_path, noise_multiplier=2.0, customers=8,
                                         server_optimizer="sgd", server_learning_rate=1.0)
    runner.rng = np.random.default_rng(7)  # a test may fix it; a run draws OS entropy
    big = [np.zeros((400, 50), np.float32)]
    runner._current = [np.zeros((400, 50), np.float32)]
    step = runner.noised_step(big)[0] * runner.expected_sampled  # D = 0.5 * 8 * 1
    assert step.std() == pytest.approx(2.0 * 1.0, rel=0.03) and abs(step.mean()) < 0.05


def test_adam_steps_each_weight_by_its_own_scale_and_its_moments_are_checkpointed(
        tmp_path: Path) -> None:
    from server.checkpoint import restore_strategy_state, strategy_state

    runner, *_ = _server(tmp_path, noise_multiplier=1e-9, customers=8)  # adam, lr 0.01
    runner._current = [np.zeros(3, np.float32)]
    # Weights whose updates differ by 1,000x move by the same 0.01 in the first step.
    first = runner.noised_step([np.array([4.0, -0.004, 0.4])], 1)[0]
    np.testing.assert_allclose(first, [0.01, -0.01, 0.01], rtol=0.02)
    state = strategy_state(runner.strategy)
    assert set(state) >= {"m_t", "v_t"}
    resumed, *_ = _server(tmp_path, noise_multiplier=1e-9, customers=8)
    restore_strategy_state(resumed.strategy, state)
    for r in (runner, resumed):
        r._current = [first]
    np.testing.assert_array_equal(runner.noised_step([np.array([1.0, 1.0, 1.0])], 2)[0],
                                  resumed.noised_step([np.array([1.0, 1.0, 1.0])], 2)[0])
    from server.config import DPConfig

    with pytest.raises(ValueError, match="privacy.server-optimizer"):
        DPConfig(unit="customer", server_optimizer="adagrad")


def test_server_noise_is_seeded_only_under_seeded_sampling(tmp_path: Path) -> None:
    """What makes the end-to-end run below deterministic: seeded sampling seeds the
    server's noise too (simulation only); otherwise it comes from OS entropy."""
    def step(**dp: Any) -> np.ndarray:
        runner, *_ = _server(tmp_path, customers=8, **dp)
        runner._current = [np.zeros(50, np.float32)]
        return runner.noised_step([np.zeros(50)])[0]

    assert np.array_equal(step(seeded_sampling=True), step(seeded_sampling=True))
    assert not np.array_equal(step(), step())


def test_server_withholds_a_round_past_the_budget(tmp_path: Path) -> None:
    runner, ledger, ins, start = _server(tmp_path, noise_multiplier=0.5, customers=100,
                                         target_epsilon=0.01)
    zero = [np.zeros(s, np.float32) for s in SHAPES]
    arrays, _ = runner.aggregate_train(1, [_reply(ins[n], zero, 1, 30) for n in (1, 2, 3)])
    assert arrays is None and ledger.record(1, 3, 3, 1.0)["epsilon"] == 0.0
    # The round not applied has its ledger line, as under SecAgg+ (nothing spent).
    (line,) = read_jsonl(tmp_path / "privacy.jsonl")
    assert (line["round"], line["released"], line["merchants_replied"]) == (1, False, 3)
    assert "target-epsilon" in line["reason"] and line["epsilon"] == 0.0


def test_server_notes_a_round_without_a_usable_reply_in_the_ledger(tmp_path: Path) -> None:
    runner, ledger, *_ = _server(tmp_path, customers=100)
    assert runner.aggregate_train(1, []) == (None, None)
    (line,) = read_jsonl(tmp_path / "privacy.jsonl")
    assert (line["round"], line["released"], line["merchants_replied"]) == (1, False, 0)
    assert ledger.record(1, 3, 0, 1.0)["epsilon"] == 0.0 and ledger.rounds == 0


# ---------------------------------------------------------------------------------------
# End to end: a tiny simulated federation (subprocess in its own session)
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def customer_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("customer-dp")
    run_driver("cli_main", [
        "simulate", "--preset", "quick", "--set", "privacy.unit=customer",
        "--set", "privacy.customer-rate=0.5", "--set", "privacy.noise-multiplier=1.0",
        "--set", "privacy.clipping-norm=1.0", "--set", "federation.num-rounds=3",
        "--set", "privacy.seeded-sampling=true", "--set", "synthetic.num-merchants=4",
        "--set", "model.jit-compile=false",  # each process computes a few steps only
        "--set", f"experiment.output-dir={tmp / 'runs'}"],
        cwd=tmp, log=tmp / "run.log", timeout=600).check()
    (found,) = (tmp / "runs").glob("*-simulate-quick*")
    yield found


@pytest.mark.slow
@pytest.mark.timeout(700)
def test_customer_level_simulation_trains_and_writes_the_ledger(customer_run: Path) -> None:
    (fed_dir,) = {p.parent for p in customer_run.rglob("privacy.jsonl")}
    lines = settled(read_jsonl(fed_dir / "privacy.jsonl"))
    assert [line["round"] for line in lines] == [1, 2, 3]
    eps = [line["epsilon"] for line in lines]
    assert all(b > a > 0 for a, b in zip(eps, eps[1:], strict=False))
    customers = lines[0]["customers"]
    assert eps[-1] == pytest.approx(min(_direct(0.5, 1.0, 3, 1 / (10 * customers))))
    metrics = [json.loads(t) for t in (fed_dir / "metrics.jsonl").read_text().splitlines()]
    val = [m["centralised"]["val_loss"] for m in metrics if "val_loss" in m["centralised"]]
    auc = [m["centralised"]["decay_roc_auc"] for m in metrics
           if "decay_roc_auc" in m["centralised"]]
    # It trains: round 3's model beats round 0's. Deterministic: seeded sampling seeds
    # the customer samples and the server's noise.
    assert len(val) == 4 and val[-1] < val[0]
    assert max(auc) > 0.5
    assert all(line["sampling"] == "seeded" and "customers_sampled" not in line
               for line in lines)
    summary = json.loads((fed_dir / "federation.json").read_text())
    assert "only in simulation" in summary["privacy"]["threat_model"]
    assert summary["privacy"]["unit"] == "customer"
    assert "all of that customer's events there" in summary["privacy"]["unit_text"]
    assert summary["privacy"]["epsilon"] == pytest.approx(eps[-1])


def test_report_names_the_unit_and_the_threat_model() -> None:
    from simulations.report import _privacy_blocks

    ledger = _ledger(None)
    ledger.learn_customers(1000)
    privacy = {"epsilon": 2.0, "delta": ledger.delta, "noise_multiplier": 1.0,
               **ledger.summary_fields()}
    blocks = _privacy_blocks({"methods": {"federated-fedavg-cdp1": {
        "privacy": privacy, "decay": {"roc_auc": 0.7}}}})
    text = " ".join(str(b) for b in blocks)
    assert "one customer of one merchant: all of that customer's events there" in text
    assert "trusted" in text


def test_resume_replays_the_customer_ledger_through_the_server(tmp_path: Path) -> None:
    """The real resume path (``server.resume.start_state``) on a customer-level run
    killed after round 3 whose newest checkpoint is round 2."""
    from server.checkpoint import save_checkpoint, strategy_state
    from server.config import ServerSettings
    from server.resume import start_state
    from server.runner import build_runner

    settings = ServerSettings(
        federation=FederationConfig(num_rounds=5, min_available_nodes=1, min_train_nodes=1),
        model=MODEL, snapshots=SNAP, train=TrainConfig(),
        seed=0, privacy=DPConfig(unit="customer", customer_rate=0.1))
    parts = build_runner(settings, 4, tmp_path)
    ledger = parts.ledger
    assert isinstance(ledger, CustomerLedger) and parts.clipping_norm == 1.0
    ledger.learn_customers(2000)
    for r in (1, 2, 3):
        ledger.released(r, 4)
        ledger.record(r, 4, 4, 1.0)
    weights = [np.full(s, 0.5, np.float32) for s in SHAPES]
    save_checkpoint(tmp_path / "checkpoints", 2, {
        "weights": weights, "strategy": strategy_state(parts.strategy),
        "selection": {"round": 2, "val_loss": 1.0, "weights": None, "stale": 0},
        "clipping_norm": parts.clipping_norm})
    (tmp_path / "metrics.jsonl").write_text("")

    again = build_runner(settings, 4, tmp_path)
    done, got, _ = start_state(tmp_path, True, again, [np.zeros(s) for s in SHAPES])
    assert done == 2 and np.array_equal(got[0], weights[0])
    assert again.ledger is not None and again.ledger.customers == 2000
    assert again.ledger.epsilon == pytest.approx(min(_direct(0.1, 1.0, 2, 1 / 20_000)))
    assert again.runner.expected_sampled == pytest.approx(0.1 * 2000)
    assert len((tmp_path / "privacy.jsonl").read_text().splitlines()) == 2


def test_merchant_reply_sends_the_clipped_sum_and_whitelisted_counts_only(model: Any) -> None:
    from client.app import TRAIN_METRICS
    from client.config import ClientConfig, ClientSettings
    from client.work import train_reply
    from common.protocol import GLOBAL_ROUND_KEY

    settings = ClientSettings(snapshots=SNAP, model=MODEL, train=TrainConfig(batch_size=16),
                              client=ClientConfig(), seed=4)
    snaps = _snapshots([f"c{i // 2}" for i in range(40)], seed=5)  # 20 customers
    config = {CUSTOMER_RATE_KEY: 0.5, CUSTOMER_CLIP_KEY: 0.1, CUSTOMER_LR_KEY: 1.0,
              GLOBAL_ROUND_KEY: 3, CUSTOMER_SEEDED_KEY: True}  # to know the sample
    arrays, metrics = train_reply(settings, snaps, weights_of(model), config)
    assert set(metrics) <= set(TRAIN_METRICS) and "train_loss" not in metrics
    chosen = _seeded(snaps.user_id, 0.5, 4, 3, "m")
    assert metrics[CUSTOMERS_SAMPLED] == len(chosen) and metrics[CUSTOMERS_TOTAL] == 20
    assert metrics["num-examples"] == 40
    assert [a.shape for a in arrays] == [w.shape for w in weights_of(model)]
    assert 0 < _norm(arrays) <= 0.1 * len(chosen) * (1 + 1e-4)
    # Distributed / local: the same sum plus the noise asked for, and counts only (the
    # server is not trusted with the sample size or the time).
    from common.protocol import CUSTOMER_NOISE_KEY

    noised, counts = train_reply(settings, snaps, weights_of(model),
                                 {**config, CUSTOMER_NOISE_KEY: 0.3})
    assert set(counts) == {"num-examples", CUSTOMERS_TOTAL}
    diff = np.concatenate([(n - a).ravel() for n, a in zip(noised, arrays, strict=True)])
    assert diff.std() == pytest.approx(0.3, rel=0.1) and diff.size > 1000


# ---------------------------------------------------------------------------------------
# Review findings: what leaves the merchant, the ledger's JSON, the sampling mode
# ---------------------------------------------------------------------------------------


def test_merchant_reply_sends_no_pre_training_loss_even_when_asked(model: Any) -> None:
    from client.app import TRAIN_METRICS
    from client.config import ClientConfig, ClientSettings
    from client.work import train_reply
    from common.protocol import GLOBAL_ROUND_KEY, PRE_TRAINING_METRICS

    settings = ClientSettings(snapshots=SNAP, model=MODEL, train=TrainConfig(batch_size=16),
                              client=ClientConfig(), seed=4)
    snaps = Snapshots.concat([_snapshots([f"c{i // 2}" for i in range(20)], seed=5),
                              _snapshots([f"c{i}" for i in range(6)], seed=6)])
    snaps.split[20:23], snaps.split[23:] = 1, 2  # validation and test rows to score
    config = {CUSTOMER_RATE_KEY: 0.5, CUSTOMER_CLIP_KEY: 0.1, CUSTOMER_LR_KEY: 1.0,
              GLOBAL_ROUND_KEY: 3, PRE_EVALUATE_KEY: True}
    _, metrics = train_reply(settings, snaps, weights_of(model), config)
    assert set(metrics) <= set(TRAIN_METRICS)
    assert not set(metrics) & set(PRE_TRAINING_METRICS)
    assert metrics[CUSTOMERS_DROPPED] == 0


def test_server_does_not_ask_for_pre_training_losses_in_deployment(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fed = FederationConfig(mode="deployment", min_train_nodes=1, min_available_nodes=1,
                           local_epochs=2)
    assert fed.pre_evaluates  # what a deployment would ask for without customer-level DP
    dp = DPConfig(unit="customer", customer_rate=0.5)
    with caplog.at_level("WARNING"):
        runner, _ = wrap_customer_dp(build_strategy(fed, 0), dp, fed, 3, None)
    assert "federation.local-epochs" in caplog.text  # ignored: said once, naming the key
    msgs = list(runner.configure_train(1, ArrayRecord([np.ones(3, np.float32)]),
                                       ConfigRecord(), FakeGrid([1, 2, 3])))
    config = msgs[0].content.config_records["config"]
    assert PRE_EVALUATE_KEY not in config and CUSTOMER_SEEDED_KEY not in config


def test_estimated_customer_count_warns_naming_the_key(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    runner, ledger, ins, _ = _server(tmp_path)
    zero = [np.zeros(s, np.float32) for s in SHAPES]
    with caplog.at_level("WARNING"):
        runner.aggregate_train(1, [_reply(ins[n], zero, 1, 30) for n in (1, 2, 3)])
    assert ledger.customers == 90 and "privacy.customers" in caplog.text


def test_seeded_sampling_is_marked_in_the_ledger_and_the_summary(tmp_path: Path) -> None:
    path = tmp_path / "privacy.jsonl"
    ledger = _ledger(path, seeded_sampling=True)
    ledger.learn_customers(1000)
    ledger.released(1, 3)
    assert ledger.record(1, 3, 3, 1.0)["sampling"] == "seeded"
    assert [x["sampling"] for x in read_jsonl(path)] == ["seeded", "seeded"]  # pending too
    fields = ledger.summary_fields()
    assert fields["sampling"] == "seeded" and "only in simulation" in fields["threat_model"]
    assert _ledger(None).summary_fields()["sampling"] == "secret"


def test_ledger_and_summary_are_strict_json(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import server.dp_accounting as accounting
    from server.app import _summary
    from server.config import ServerSettings
    from server.recorder import Selection

    monkeypatch.setattr(accounting, "customer_epsilons", lambda *a: (5.0, math.inf))
    path = tmp_path / "privacy.jsonl"
    ledger = _ledger(path)
    ledger.learn_customers(1000)
    ledger.released(1, 3)
    ledger.record(1, 3, 3, 1.0)
    text = path.read_text()
    assert "Infinity" not in text and read_jsonl(path)[-1]["epsilon_pld"] is None
    unknown = _ledger(None)  # customers not known yet: delta is NaN
    parts = type("Parts", (), {"ledger": unknown, "rounds": type("B", (), {
        "empty_rounds": 0})(), "strategy": None})()
    settings = ServerSettings(federation=FederationConfig(), model=MODEL, snapshots=SNAP,
                              train=TrainConfig(), seed=0, privacy=unknown.dp)
    summary = _summary(settings, parts, Selection(), done=0,  # type: ignore[arg-type]
                       stop_reason=None, seconds=1.0)
    dumped = json.dumps(summary["privacy"], allow_nan=False)  # raises on NaN / inf
    assert json.loads(dumped)["delta"] is None
    # Deployment: no round selected (no loss leaves a merchant): nulls and a note.
    deployed = dataclasses.replace(settings, federation=FederationConfig(mode="deployment"))
    summary = _summary(deployed, parts, Selection(), done=0,  # type: ignore[arg-type]
                       stop_reason=None, seconds=1.0)
    again = json.loads(json.dumps(summary, allow_nan=False))
    assert again["selected_round"] is None and again["selected_val_loss"] is None
    assert "losses do not leave" in again["selection"]


def _analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """ε of the Gaussian mechanism with sensitivity 1 and noise std ``sigma`` at
    ``delta``, exactly (Balle & Wang 2018, Theorem 8), by bisection on
    δ(ε) = Φ(1/(2σ) - εσ) - e^ε Φ(-1/(2σ) - εσ)."""
    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    def delta_of(eps: float) -> float:
        return phi(0.5 / sigma - eps * sigma) - math.exp(eps) * phi(-0.5 / sigma - eps * sigma)

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize(("z", "delta"), [(1.0, 1e-5), (2.0, 1e-6), (4.0, 1 / 300_000)])
def test_one_full_round_matches_the_analytic_gaussian_mechanism(z: float,
                                                                delta: float) -> None:
    exact = _analytic_gaussian_epsilon(z, delta)
    eps_rdp, eps_pld = customer_epsilons(1.0, z, 1, delta)
    assert eps_pld == pytest.approx(exact, rel=1e-3)  # PLD: exact up to discretisation
    assert exact <= eps_rdp <= 1.2 * exact  # RDP: an upper bound, looser


def test_ledger_delta_is_the_configured_one_before_the_count_is_known() -> None:
    assert math.isnan(_ledger(None).delta)  # the default 1 / (10 customers): unknown yet
    ledger = _ledger(None, target_delta=1e-6)
    assert ledger.delta == 1e-6 and ledger.summary_fields()["customers"] is None
    ledger.learn_customers(1000)
    assert ledger.delta == 1e-6  # set: the count does not change it


def test_replay_refuses_a_resume_with_another_sampling_mode(tmp_path: Path) -> None:
    path = tmp_path / "privacy.jsonl"
    ledger = _ledger(path, seeded_sampling=True)
    ledger.learn_customers(1000)
    ledger.released(1, 3)
    ledger.record(1, 3, 3, 1.0)
    with pytest.raises(ValueError, match="privacy.seeded-sampling") as err:
        _ledger(path).replay(upto=1)
    assert "'seeded'" in str(err.value) and "'secret'" in str(err.value)
    assert _ledger(path, seeded_sampling=True).replay(upto=1) == 1


# ---------------------------------------------------------------------------------------
# Issue 17: a deployed merchant refuses seeded sampling and noise
# ---------------------------------------------------------------------------------------


def test_a_deployed_merchant_refuses_seeded_sampling_before_any_work() -> None:
    import time

    from flwr.app import Context, Metadata
    from flwr.app.message.message import make_message

    from client.app import handle_train
    from client.customer_dp import SEEDED_REFUSED, seeded_refusal
    from common.protocol import GLOBAL_ROUND_KEY

    config = {CUSTOMER_RATE_KEY: 0.5, CUSTOMER_CLIP_KEY: 0.1, CUSTOMER_LR_KEY: 1.0,
              GLOBAL_ROUND_KEY: 1, CUSTOMER_SEEDED_KEY: True}
    deployed = {"data-path": "/nonexistent/merchant.csv"}
    assert seeded_refusal(config, {"partition-id": 0}) is None  # simulation: honoured
    assert seeded_refusal({**config, CUSTOMER_SEEDED_KEY: False}, deployed) is None
    meta = Metadata(run_id=1, message_id="m", src_node_id=1, dst_node_id=7,
                    reply_to_message_id="", group_id="1", created_at=time.time(), ttl=600,
                    message_type="train")
    msg = make_message(meta, RecordDict({"arrays": ArrayRecord([np.zeros(2, np.float32)]),
                                         "config": ConfigRecord(config)}))
    context = Context(run_id=1, node_id=7, node_config=deployed, state=RecordDict(),
                      run_config={})

    def no_work(*_: Any) -> Any:
        raise AssertionError("the merchant must refuse before reading data or handing off")

    reply = handle_train(msg, context, no_work, no_work)
    assert reply.has_error() and reply.error.code == SEEDED_REFUSED
    assert "customer-seeded-sampling" in reply.error.reason


@pytest.mark.parametrize("placement", ["central", "distributed", "local"])
def test_replay_keeps_rounds_past_the_checkpoint_spent_unless_central(
        tmp_path: Path, placement: str) -> None:
    # Issue 17 (3): rounds 2 and 3 were released after the checkpoint of round 1.
    path = tmp_path / "privacy.jsonl"
    ledger = _ledger(path, placement=placement, customers=5000)
    for r in (1, 2, 3):
        ledger.released(r, 7)
        ledger.record(r, 8, 7, 1.0)
    ledger.withheld(4, 2, "too few replies")
    eps1, eps3 = min(_direct(0.1, 1.0, 1, 1 / 50_000)), min(_direct(0.1, 1.0, 3, 1 / 50_000))
    again = _ledger(path, placement=placement, customers=5000)
    again.replay(upto=1)
    lines = read_jsonl(path)
    if placement == "central":  # trusted server: the later rounds are simply run again
        assert (again.rounds, [x["round"] for x in lines]) == (1, [1])
        assert again.epsilon == pytest.approx(eps1)
        return
    # The untrusted server saw rounds 2 and 3: still spent; round 4 released nothing.
    assert again.rounds == 3 and again.epsilon == pytest.approx(eps3)
    assert [(x["round"], x.get("lost", False)) for x in lines] == [
        (1, False), (2, True), (3, True)]
    third = _ledger(path, placement=placement, customers=5000)  # a second resume
    third.replay(upto=1)
    assert third.rounds == 3 and len(read_jsonl(path)) == 3
    third.released(2, 7)
    assert third.record(2, 8, 7, 1.0)["released_rounds"] == 4


@pytest.mark.parametrize("placement", ["central", "distributed", "local"])
def test_a_round_released_but_never_recorded_stays_spent_unless_central(
        tmp_path: Path, placement: str) -> None:
    # Killed after aggregate_train released round 3's noised sum, before the recorder's
    # record() (the evaluate round, evaluate_fn): round 3 had no line, not even a cut
    # one, and a resume under 'distributed' / 'local' never counted it.
    path = tmp_path / "privacy.jsonl"
    ledger = _ledger(path, placement=placement, customers=5000)
    for r in (1, 2):
        ledger.released(r, 7)
        ledger.record(r, 8, 7, 1.0)
    ledger.released(3, 7)  # the kill: no record(3)
    again = _ledger(path, placement=placement)
    assert again.replay(upto=2) == (2 if placement == "central" else 3)
    lines = read_jsonl(path)
    if placement == "central":  # trusted: round 3 is simply run again
        assert again.rounds == 2 and [x["round"] for x in lines] == [1, 2]
        return
    assert again.rounds == 3 and again.epsilon == pytest.approx(
        min(_direct(0.1, 1.0, 3, 1 / 50_000)))
    assert [(x["round"], x.get("pending", False), x.get("lost", False))
            for x in lines] == [(1, False, False), (2, False, False), (3, True, True)]
    again.released(3, 7)  # round 3 run again, recorded this time: a fourth release
    assert again.record(3, 8, 7, 1.0)["released_rounds"] == 4
    # Killed while writing round 4's complete line: its pending line counts it, once.
    again.released(4, 7)
    again.record(4, 8, 7, 1.0)
    text = path.read_text()
    path.write_text(text[:len(text) - 50])
    third = _ledger(path, placement=placement)
    assert third.replay(upto=3) == 5 and third.rounds == 5
    assert [(x["round"], x.get("pending", False), x.get("lost", False))
            for x in read_jsonl(path)] == [(1, False, False), (2, False, False),
                                           (3, True, True), (3, False, False),
                                           (4, True, True)]


def test_a_resume_refuses_a_ledger_missing_rounds_its_checkpoint_counted(
        tmp_path: Path) -> None:
    # privacy.jsonl deleted (or DP newly enabled) before a resume from round 3's
    # checkpoint: replay found no line and epsilon covered only the later rounds.
    from server.checkpoint import save_checkpoint
    from server.dp_accounting import CHECKPOINT_KEY
    from server.privacy import PrivacyLedger
    from server.recorder import Selection
    from server.resume import start_state
    from server.runner import Runner

    path, weights = tmp_path / "privacy.jsonl", [np.zeros(2)]
    text = _three_released_rounds(path, "distributed")
    counted = _ledger(path, placement="distributed")
    counted.replay(upto=3)
    strategy = build_strategy(FederationConfig(), 0)

    def checkpoint(g: int, **ledger: Any) -> None:
        save_checkpoint(tmp_path / "checkpoints", g, {
            "weights": weights, "strategy": {}, "clipping_norm": None,
            "selection": dataclasses.asdict(Selection()), **ledger}, keep=5)

    def resume() -> CustomerLedger:
        ledger = _ledger(path, placement="distributed")
        assert start_state(tmp_path, True, Runner(strategy, strategy, ledger),
                           weights)[0] > 0
        return ledger

    checkpoint(3, **{CHECKPOINT_KEY: counted.checkpoint_fields()})
    path.unlink()
    with pytest.raises(ValueError, match=rf"^{path}: the checkpoint of round 3 counted 3 "
                                         r"released rounds \(distributed, noise 1.0, "
                                         r"customer rate 0.1\); the ledger is missing: it "
                                         r"holds 0 up to it"):
        resume()
    path.write_text(text.split("\n")[0] + "\n")  # round 1's line only
    with pytest.raises(ValueError, match=r"counted 3 released rounds .*; the ledger "
                                         r"holds 1 up to it"):
        resume()
    assert path.read_text() == text.split("\n")[0] + "\n"  # nothing rewritten
    path.write_text(text)
    assert resume().rounds == 3  # the whole ledger: resumed
    # Written by a run without customer-level DP, resumed with it: refused.
    checkpoint(4, **{CHECKPOINT_KEY: None})
    with pytest.raises(ValueError, match="the checkpoint of round 4 was written by a run "
                                         "without customer-level accounting"):
        resume()
    checkpoint(5)  # a checkpoint of an older version, without the count: as before
    path.unlink()
    assert resume().rounds == 0
    # The merchant-level ledger on a customer-level one: a refusal, not KeyError.
    path.write_text(text)
    merchant = PrivacyLedger(DPConfig(mode="server-fixed"), 8, 8, path)
    with pytest.raises(ValueError, match=r"round 1 was accounted at the customer level, "
                                         r"not per merchant \(privacy.unit differs\)"):
        merchant.replay(upto=3)


@pytest.mark.parametrize("placement", ["central", "distributed", "local"])
def test_replay_counts_a_line_cut_by_a_kill_unless_central(
        tmp_path: Path, placement: str, caplog: pytest.LogCaptureFixture) -> None:
    # Killed while writing round 3's line, before its checkpoint: the server may have
    # seen round 3's noised sum, so an untrusted placement counts it as spent.
    path = tmp_path / "privacy.jsonl"
    text = _three_released_rounds(path, placement)
    path.write_text(text[:len(text) - 40])  # the last line cut, no newline after it
    again = _ledger(path, placement=placement)
    again.replay(upto=2)
    assert "line 3 is cut" in caplog.text
    lines = read_jsonl(path)
    assert again.customers == 5000  # from the complete lines
    if placement == "central":
        assert again.rounds == 2 and [x["round"] for x in lines] == [1, 2]
        assert again.epsilon == pytest.approx(min(_direct(0.1, 1.0, 2, 1 / 50_000)))
        return
    assert again.rounds == 3 and [(x["round"], x.get("lost", False)) for x in lines] == [
        (1, False), (2, False), (3, True)]
    assert again.epsilon == pytest.approx(min(_direct(0.1, 1.0, 3, 1 / 50_000)))
    path.write_text(path.read_text() + '{"round": 4, "unit"')  # a second kill, same place
    _ledger(path, placement=placement).replay(upto=2)
    assert [x["round"] for x in read_jsonl(path)] == [1, 2, 3, 4]


@pytest.mark.parametrize("placement", ["distributed", "local"])
def test_a_sole_cut_line_is_counted_only_with_the_settings_it_shows(
        tmp_path: Path, placement: str) -> None:
    # Killed while writing round 1's line; the resumed run (a deployment may change its
    # settings) would count it with its own noise: more noise, an under-counted epsilon.
    path = tmp_path / "privacy.jsonl"
    ledger = _ledger(path, placement=placement, customers=5000)
    ledger.released(1, 7)
    ledger.record(1, 8, 7, 1.0)
    line = _settle(path)  # no pending line before it
    path.write_text(line[:len(line) - 60])
    with pytest.raises(ValueError, match=r"line 1 \(cut\) was accounted with "
                                         r"noise_multiplier 1.0, this run's is 2.0"):
        _ledger(path, placement=placement, noise_multiplier=2.0).replay(upto=0)
    assert path.read_text() == line[:len(line) - 60]  # nothing rewritten
    _ledger(path, placement=placement).replay(upto=0)  # the same settings: counted
    assert [x["round"] for x in read_jsonl(path)] == [1]
    path.write_text('{"round": 1, "unit": "customer", "placem')  # cut before its noise
    with pytest.raises(ValueError, match=r"line 1, its only line, was cut before its noise"):
        _ledger(path, placement=placement).replay(upto=0)


@pytest.mark.parametrize("placement", ["distributed", "local"])
def test_a_cut_line_is_confirmed_only_by_a_line_checked_against_this_run(
        tmp_path: Path, placement: str) -> None:
    # Round 1 released nothing and round 2's line was cut before its noise, with no
    # checkpoint: round 1's line (dropped, past it) confirmed the settings unchecked, so
    # round 2 was counted with the resumed run's greater noise (epsilon under-counted).
    path = tmp_path / "privacy.jsonl"
    ledger = _ledger(path, placement=placement, customers=5000)
    ledger.withheld(1, 2, "too few replies")
    ledger.released(2, 7)
    ledger.record(2, 8, 7, 1.0)
    text = _settle(path)  # no pending line before the cut one
    text = text[:text.rindex('"noise_multiplier"')]
    path.write_text(text)
    with pytest.raises(ValueError, match=r"round 1 was accounted with other privacy "
                                         r"settings \(privacy.unit, customer-rate or "
                                         r"noise-multiplier differ\)"):
        _ledger(path, placement=placement, noise_multiplier=2.0).replay(upto=0)
    with pytest.raises(ValueError, match=r"round 1 was accounted with 'secret' customer "
                                         r"sampling"):
        _ledger(path, placement=placement, seeded_sampling=True).replay(upto=0)
    assert path.read_text() == text  # nothing rewritten
    again = _ledger(path, placement=placement)  # the same settings: counted
    assert again.replay(upto=0) == 1 and again.rounds == 1
    assert [(x["round"], x["released"], x.get("cut")) for x in read_jsonl(path)] == [
        (2, True, True)]


@pytest.mark.parametrize(("before", "after"), [
    ("distributed", "central"), ("local", "central"), ("central", "distributed"),
    ("distributed", "local")])
def test_replay_refuses_a_resume_under_another_placement(
        tmp_path: Path, before: str, after: str) -> None:
    # Rounds 2 and 3 were released after the checkpoint of round 1: resumed as 'central'
    # a 'distributed' ledger dropped them (the server trusted), epsilon under-counted.
    path = tmp_path / "privacy.jsonl"
    text = _three_released_rounds(path, before)
    with pytest.raises(ValueError) as err:
        _ledger(path, placement=after, customers=5000).replay(upto=1)
    assert str(err.value).startswith(f"{path}: round 1 was accounted under "
                                     f"privacy.placement {before!r} and this run's is "
                                     f"{after!r}")
    assert str(err.value).endswith("resume with the same setting")
    with pytest.raises(ValueError, match="privacy.placement"):
        _ledger(path, placement=after, customers=5000).replay(upto=0)  # all past it
    assert path.read_text() == text  # nothing rewritten
    assert _ledger(path, placement=before, customers=5000).replay(upto=1) == (
        1 if before == "central" else 3)
    # A sole line a kill cut after its placement: 'central' dropped it unchecked.
    cut = text[:text.index('"sampling_rate"')]
    path.write_text(cut)
    with pytest.raises(ValueError, match=rf"line 1 \(cut\) was accounted under "
                                         rf"privacy.placement '{before}' and this "
                                         rf"run's is '{after}'"):
        _ledger(path, placement=after).replay(upto=0)
    assert path.read_text() == cut


def test_a_sole_line_cut_before_its_placement_is_not_dropped_unseen(tmp_path: Path) -> None:
    path = tmp_path / "privacy.jsonl"
    path.write_text('{"round": 1, "unit": "customer", "plac')
    with pytest.raises(ValueError, match=r"line 1, its only line, was cut before its "
                                         r"placement was written"):
        _ledger(path).replay(upto=0)  # central would drop a round a 'local' run spent
    # After a complete line, which names the placement: dropped as before.
    ledger = _ledger(path, customers=5000)
    path.write_text("")
    ledger.released(1, 7)
    ledger.record(1, 8, 7, 1.0)
    path.write_text(_settle(path) + '{"round": 2, "unit": "customer", "plac')
    assert _ledger(path).replay(upto=1) == 1 and len(read_jsonl(path)) == 1


def test_a_deployed_secagg_merchant_refuses_seeded_sampling_as_a_dropout() -> None:
    import time

    from flwr.app import Context, Metadata
    from flwr.app.message.message import make_message
    from flwr.common.secure_aggregation.secaggplus_constants import (
        RECORD_KEY_CONFIGS,
        Key,
        Stage,
    )

    from client.customer_dp import SEEDED_REFUSED
    from client.secagg import make_secagg_client_app

    guard = make_secagg_client_app({})._mods[0]  # no outer mods: the guard comes first
    meta = Metadata(run_id=1, message_id="m", src_node_id=1, dst_node_id=7,
                    reply_to_message_id="", group_id="1", created_at=time.time(), ttl=600,
                    message_type="train")
    msg = make_message(meta, RecordDict({
        RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: Stage.COLLECT_MASKED_VECTORS}),
        "fitins.config": ConfigRecord({CUSTOMER_RATE_KEY: 0.5, CUSTOMER_SEEDED_KEY: True})}))
    context = Context(run_id=1, node_id=7, node_config={"data-path": "/nonexistent.csv"},
                      state=RecordDict(), run_config={})

    def no_work(*_: Any) -> Any:
        raise AssertionError("the merchant must refuse before reading data or masking")

    reply = guard(msg, context, no_work)
    assert reply.has_error() and reply.error.code == SEEDED_REFUSED
