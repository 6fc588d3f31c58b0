"""Customer-level DP with the merchants adding the noise (issue 17, item 2):
``privacy.placement = distributed`` (shares summed by SecAgg+) and ``local``.

The config refusals, m_min, the shares' summed variance (a chi-square test on seeded
draws), the server's step and ledger lines (released, not applied), the local
placement without SecAgg+, and one distributed run end to end with SecAgg+ in which a
merchant drops out after the keys were shared."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from helpers import FakeGrid, read_jsonl, run_driver
from scipy.stats import chi2

from client.customer_dp import add_noise, noise_rng
from common.protocol import CUSTOMER_NOISE_KEY, CUSTOMERS_TOTAL
from server.checkpoint import load_checkpoint
from server.config import DPConfig, FederationConfig
from server.customer_dp import wrap_customer_dp
from server.customer_secagg import attach_customer_dp, min_replies, share_std
from server.dp_accounting import customer_epsilons, settled
from server.strategy import build_strategy
from simulations.settings import experiment_from_flat

SECURE = {"federation.secure-aggregation": True}
DISTRIBUTED = {"privacy.unit": "customer", "privacy.placement": "distributed"}


@pytest.mark.parametrize(("flat", "key"), [
    ({**DISTRIBUTED}, "privacy.placement"),  # no SecAgg+: a share alone protects nothing
    ({"privacy.unit": "customer", **SECURE}, "privacy.placement"),  # central needs the sum
    ({"privacy.unit": "customer", "privacy.placement": "nearby"}, "privacy.placement"),
    ({**DISTRIBUTED, **SECURE, "privacy.min-replies": -1}, "privacy.min-replies"),
    ({"privacy.unit": "customer", "privacy.min-replies": 3}, "privacy.min-replies"),
])
def test_bad_placement_config_fails_fast_naming_the_key(flat: dict[str, Any],
                                                        key: str) -> None:
    with pytest.raises(ValueError, match=f"'{key}'"):
        experiment_from_flat(flat)


def test_min_replies_defaults_to_the_reconstruction_threshold_and_may_not_exceed_it() -> None:
    # everyone shares with everyone, threshold 0.6 of the shares
    fed = FederationConfig(secure_aggregation=True, secagg_num_shares=1.0)
    dp = DPConfig(unit="customer", placement="distributed")
    assert min_replies(fed, dp, 5) == 3 and min_replies(fed, dp, 10) == 6
    assert min_replies(fed, DPConfig(unit="customer", placement="distributed",
                                     min_replies=2), 5) == 2  # fewer: more noise, allowed
    with pytest.raises(ValueError, match="'privacy.min-replies'.*reconstruction threshold"):
        min_replies(fed, DPConfig(unit="customer", placement="distributed",
                                  min_replies=4), 5)
    experiment_from_flat({"privacy.unit": "customer", "privacy.placement": "local"})
    experiment_from_flat({**DISTRIBUTED, **SECURE, "privacy.min-replies": 2})


def test_distributed_shares_sum_to_the_configured_noise_variance() -> None:
    """Each of 5 merchants adds N(0, (z C)^2 / m_min) (seeded draws through the client's
    own functions): a sum of n shares has variance n / m_min (z C)^2, exactly (z C)^2 at
    m_min replies. Chi-square bounds at 1e-9 on either side: it cannot flake, and a 5 %
    error in the variance would fall outside them."""
    z, c, merchants = 1.5, 0.8, 5
    fed = FederationConfig(secure_aggregation=True)
    dp = DPConfig(unit="customer", placement="distributed", noise_multiplier=z,
                  clipping_norm=c)
    m_min = min_replies(fed, dp, merchants)
    std = share_std(dp, m_min)
    assert m_min == 3 and std == pytest.approx(z * c / math.sqrt(3))
    zero = [np.zeros((400, 300), np.float32), np.zeros(80_000, np.float32)]
    shares = [np.concatenate([a.astype(np.float64).ravel() for a in
                              add_noise(zero, std, noise_rng(True, 7, 2, f"m{i}"))])
              for i in range(merchants)]
    size = shares[0].size
    lo, hi = chi2.ppf(1e-9, size), chi2.ppf(1 - 1e-9, size)
    assert hi / lo < 1.05  # the bounds are tight enough to catch a 5 % error
    for n in range(m_min, merchants + 1):
        total = np.sum(shares[:n], axis=0)
        statistic = float(np.sum(total**2)) / (n / m_min * (z * c) ** 2)
        assert lo < statistic < hi, (n, statistic / size)
    # Every merchant draws its own stream: the shares are uncorrelated.
    assert abs(np.corrcoef(shares[0], shares[1])[0, 1]) < 6 / math.sqrt(size)
    assert not np.array_equal(add_noise(zero, std, noise_rng(False, 7, 2, "m0"))[1],
                              add_noise(zero, std, noise_rng(False, 7, 2, "m0"))[1])


def test_secagg_clips_a_noised_sum_beyond_the_range_and_the_merchant_counts_it(
        caplog: pytest.LogCaptureFixture) -> None:
    from client.secagg import clipped_coordinates, note_clipped

    weights = [np.array([0.5, -9.0, 8.0]), np.array([[12.0]])]
    assert clipped_coordinates(weights, 8.0) == 2
    with caplog.at_level("WARNING"):
        note_clipped(weights, 8.0)
    assert "2 coordinates" in caplog.text and "secagg-clipping-range" in caplog.text


def _shares(tmp_path: Path, **dp: Any) -> tuple[Any, Any]:
    fed = FederationConfig(secure_aggregation=True, min_train_nodes=5, min_available_nodes=5)
    config = DPConfig(unit="customer", **{"placement": "distributed", "customer_rate": 0.5,
                                          "customers": 40, "server_learning_rate": 2.0,
                                          "server_optimizer": "sgd",
                                          **dp})
    strategy = SimpleNamespace()
    ledger = attach_customer_dp(strategy, config, fed, 5, tmp_path / "privacy.jsonl")
    return strategy.customer, ledger


def test_server_steps_along_the_unmasked_sum_and_the_ledger_notes_every_round(
        tmp_path: Path) -> None:
    hooks, ledger = _shares(tmp_path, noise_multiplier=2.0)
    assert hooks.train_config()[CUSTOMER_NOISE_KEY] == pytest.approx(2.0 / math.sqrt(3))
    hooks.current = [np.ones((2, 3), np.float32)]
    mean = [np.full((2, 3), 0.25)]
    counts = [{CUSTOMERS_TOTAL: 8, "num-examples": 80}] * 4
    # The mean of 4 replies is a sum of 4 x 0.25 = 1.0; D = 0.5 * 40 = 20; step 2.0.
    np.testing.assert_allclose(hooks.step(1, mean, counts)[0], 1 + 2.0 * 1.0 / 20)
    line = ledger.record(1, 5, 4, 1.0)
    assert (line["released"], line["min_replies"], line["merchants_replied"]) == (True, 3, 4)
    assert line["epsilon"] == pytest.approx(min(customer_epsilons(0.5, 2.0, 1, 1 / 400)))
    assert "more replies only add noise" in line["accounting"]
    assert hooks.step(2, mean, counts[:2]) is None  # 2 < m_min: not applied
    hooks.close(2, applied=False, replied=2)
    hooks.close(3, applied=False, replied=None)  # SecAgg+ unmasked nothing
    lines = settled(read_jsonl(tmp_path / "privacy.jsonl"))
    assert [(x["round"], x["released"]) for x in lines] == [(1, True), (2, False), (3, False)]
    assert "fewer than min_replies 3" in lines[1]["reason"]
    assert "SecAgg+ did not complete" in lines[2]["reason"]
    assert lines[2]["epsilon"] == line["epsilon"]  # nothing released: nothing spent
    # A resume replays two lines but only one released round.
    again = attach_customer_dp(SimpleNamespace(), ledger.dp, FederationConfig(
        secure_aggregation=True), 5, tmp_path / "privacy.jsonl")
    assert again.replay(upto=3) == 3 and again.rounds == 1
    assert again.epsilon == pytest.approx(line["epsilon"])


def test_local_placement_without_secagg_asks_for_the_full_noise_and_adds_none(
        tmp_path: Path, server_identity: None) -> None:
    fed = FederationConfig(min_train_nodes=1, min_available_nodes=1)
    dp = DPConfig(unit="customer", placement="local", customer_rate=0.5, customers=20,
                  noise_multiplier=1.5, clipping_norm=0.4, server_optimizer="sgd")
    runner, ledger = wrap_customer_dp(build_strategy(fed, 0), dp, fed, 2, None)
    start = [np.ones(3, np.float32)]
    ins = list(runner.configure_train(1, ArrayRecord(start), ConfigRecord(),
                                      FakeGrid([1, 2])))
    assert ins[0].content.config_records["config"][CUSTOMER_NOISE_KEY] == pytest.approx(0.6)
    replies = [Message(RecordDict({"arrays": ArrayRecord([np.full(3, v, np.float32)]),
                                   "metrics": MetricRecord({"num-examples": 10,
                                                            CUSTOMERS_TOTAL: 10})}),
                       reply_to=m) for m, v in zip(ins, (0.5, 1.5), strict=True)]
    arrays, _ = runner.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], 1 + (0.5 + 1.5) / 10)
    fields = ledger.summary_fields()
    assert fields["placement"] == "local" and "its own sum" in fields["threat_model"]


def test_a_build_with_secagg_wires_the_hooks_and_refuses_too_high_a_minimum(
        tmp_path: Path) -> None:
    from common.config import ModelConfig, SnapshotConfig, TrainConfig
    from server.config import ServerSettings
    from server.runner import build_runner

    def settings(**dp: Any) -> ServerSettings:
        return ServerSettings(
            federation=FederationConfig(secure_aggregation=True, min_train_nodes=5,
                                        min_available_nodes=5),
            model=ModelConfig(), snapshots=SnapshotConfig(), train=TrainConfig(), seed=0,
            privacy=DPConfig(unit="customer", placement="distributed", **dp))

    parts = build_runner(settings(), 5, tmp_path)
    assert parts.strategy.customer.min_replies == 3 and parts.strategy.max_weight == 1.0
    assert parts.ledger is not None and parts.ledger.min_replies == 3
    with pytest.raises(ValueError, match="'privacy.min-replies'"):
        build_runner(settings(min_replies=4), 5, tmp_path)


# ---------------------------------------------------------------------------------------
# End to end: distributed noise under SecAgg+, one merchant dropped after key sharing
# ---------------------------------------------------------------------------------------

MERCHANTS, DROPPED, RATE, Z = 5, 2, 0.5, 1.0


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("distributed")
    overrides = [
        f"synthetic.num-merchants={MERCHANTS}", "federation.num-rounds=2",
        "model.jit-compile=false", "experiment.seed=0", f"experiment.output-dir={tmp}",
        "federation.secure-aggregation=true", "privacy.unit=customer",
        "privacy.placement=distributed", f"privacy.customer-rate={RATE}",
        f"privacy.noise-multiplier={Z}", "privacy.seeded-sampling=true",
        "privacy.server-optimizer=sgd"]  # the step checked below: lr 1 along the mean
    spec = {"overrides": overrides, "run_dir": str(tmp / "run"),
            "record_dir": str(tmp / "records"),
            "drop": {"pid": DROPPED, "stage": "collect_masked_vectors", "round": 2}}
    (tmp / "spec.json").write_text(json.dumps(spec))
    run_driver("secagg", [str(tmp / "spec.json")], cwd=tmp, log=tmp / "driver.log",
               timeout=420).check()
    yield tmp


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_distributed_noise_under_secagg_survives_a_dropout(distributed_run: Path) -> None:
    run_dir, records = distributed_run / "run", distributed_run / "records"
    ledger = settled(read_jsonl(run_dir / "privacy.jsonl"))
    assert [(x["round"], x["released"], x["merchants_replied"]) for x in ledger] == \
        [(1, True, MERCHANTS), (2, True, MERCHANTS - 1)]
    assert all(x["placement"] == "distributed" and x["min_replies"] == 3 for x in ledger)
    customers = ledger[0]["customers"]
    assert ledger[1]["epsilon"] == pytest.approx(
        min(customer_epsilons(RATE, Z, 2, 1 / (10 * customers))))
    # Round 2's model is round 1's plus the survivors' noised sums over D (lr 1), within
    # SecAgg+'s quantisation error (the mean of n replies is off by < 2 c / T each).
    shares = {int(p.stem.split("-p")[1]): p for p in records.glob("r2-p*.npz")}
    assert sorted(shares) == [p for p in range(MERCHANTS) if p != DROPPED]
    total: list[np.ndarray] = []
    for path in shares.values():
        with np.load(path) as z:
            arrays = [z[f"arr_{i}"].astype(np.float64) for i in range(len(z.files) - 1)]
            assert int(z["num_examples"]) == 1  # every merchant weighs in with 1
        total = arrays if not total else [t + a for t, a in zip(total, arrays, strict=True)]
    before = load_checkpoint(run_dir / "checkpoints" / "round-00001.npz")["weights"]
    after = load_checkpoint(run_dir / "checkpoints" / "round-00002.npz")["weights"]
    fed = FederationConfig()
    denominator = RATE * customers
    bound = len(shares) * 2 * fed.secagg_clipping_range / fed.secagg_quantization_range \
        / denominator
    error = max(float(np.max(np.abs(a - (b + t / denominator))))
                for a, b, t in zip(after, before, total, strict=True))
    assert error <= bound + 1e-6, (error, bound)
    assert max(float(np.max(np.abs(t))) for t in total) / denominator > 20 * bound
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert (rows[2]["sampled"], rows[2]["replied"], rows[2]["failed"]) == (MERCHANTS, 4, 1)
    assert "customers" in rows[1]["train"]  # of the merchants' metrics, only their counts
    assert all(set(r.get("train", {})) <= {"customers"} for r in rows)
    summary = json.loads((run_dir / "federation.json").read_text())
    assert summary["privacy"]["placement"] == "distributed"
    assert "honest-but-curious" in summary["privacy"]["threat_model"]


def test_a_round_sampling_too_few_for_m_min_is_skipped_before_masking(
        tmp_path: Path) -> None:
    # Issue 17 (2): 10 merchants planned a round, threshold 0.6 of the shares: m_min 6.
    fed = FederationConfig(secure_aggregation=True, min_train_nodes=10,
                           min_available_nodes=10, secagg_num_shares=1.0)
    dp = DPConfig(unit="customer", placement="distributed", customer_rate=0.5,
                  customers=40)
    strategy = SimpleNamespace()
    ledger = attach_customer_dp(strategy, dp, fed, 10, tmp_path / "privacy.jsonl")
    hooks = strategy.customer
    assert hooks.min_replies == 6
    assert hooks.admit(1, 10)  # as planned: SecAgg+'s threshold is 6
    assert not hooks.admit(2, 8)  # 8 sampled: threshold round(0.6 x 8) = 5 < 6
    hooks.close(2, applied=False, replied=0)
    (line,) = read_jsonl(tmp_path / "privacy.jsonl")
    assert (line["round"], line["released"], ledger.rounds) == (2, False, 0)
    assert "below min_replies 6" in line["reason"] and line["epsilon"] == 0
    local = DPConfig(unit="customer", placement="local", customer_rate=0.5, customers=40)
    other = SimpleNamespace()
    attach_customer_dp(other, local, fed, 10, None)
    assert other.customer.admit(1, 3)  # local: every share carries the full noise


def test_secagg_strategy_asks_nobody_in_a_round_it_must_skip() -> None:
    from server.secagg import SecAggMixin

    asked: list[int] = []

    class Base:
        def configure_fit(self, server_round: int, parameters: Any,
                          client_manager: Any) -> list[tuple[Any, Any]]:
            return [(SimpleNamespace(cid=str(i)), None) for i in range(4)]

    class Strategy(SecAggMixin, Base):
        pass

    hooks = SimpleNamespace(current=None, admit=lambda g, n: asked.append(n) or n >= 5)
    rounds = SimpleNamespace(global_round=lambda r: r, sampled=lambda g, ids: None)
    strategy = Strategy.__new__(Strategy)
    strategy.customer, strategy.rounds = hooks, rounds
    from flwr.common import ndarrays_to_parameters

    assert strategy.configure_fit(1, ndarrays_to_parameters([np.zeros(2)]), None) == []
    assert asked == [4]
