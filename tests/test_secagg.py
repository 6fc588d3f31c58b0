"""Secure aggregation (SecAgg+): config, protocol arithmetic, and two real runs.

The protocol's error, derived from Flower's ``secaggplus_mod`` / ``SecAggPlusWorkflow``:
client ``i`` with weight ``w_i`` (num-examples) and weights ``p_i`` sends
``x_i = sround((p_i q_i / T + c) T / 2c)`` with ``q_i = round(w_i T / M)`` (T the
quantisation range, c the clipping range, M the max weight, ``sround`` a stochastic
rounding off by less than 1). The server dequantises the masked sum and divides by
``Q = sum q_i``, which leaves ``sum_i q_i p_i / Q + (2c / Q) sum_i e_i`` with every
``|e_i| < 1``: each entry is within ``2 c n / Q`` of the ``q``-weighted mean, and the
``q``-weighted mean differs from FedAvg's ``w``-weighted mean by a term computed here.

The slow tests run two simulations of 5 merchants (quick preset), each in a subprocess
of its own session (killed as a whole at the end), recording every client's plain
update on the client side (a mod inside ``secaggplus_mod``):

- plain FedAvg, 1 round;
- SecAgg+, 2 rounds; in round 2 partition ``DROPPED`` fails at the
  ``collect_masked_vectors`` stage, after the keys were shared, so the server must
  rebuild its pairwise masks from the others' shares.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from helpers import read_jsonl, run_driver

from client.secagg import make_secagg_client_app, quantisation_problem
from common.config import apply_overrides
from server.checkpoint import load_checkpoint
from server.config import DPConfig, FederationConfig, check_compatible
from server.rounds import RoundBook
from server.sampling import SortedClientManager, round_seed, unpredictable_module_random
from server.secagg import (
    ClientSideFixedClipping,
    build_secagg_strategy,
    check_round_size,
    effective_shares,
    weighted_metrics,
)
from server.secagg_grid import MeteredGrid
from simulations.settings import experiment_from_flat

# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------


def _fed(**kwargs: Any) -> FederationConfig:
    return FederationConfig(secure_aggregation=True, **kwargs)


@pytest.mark.parametrize(("kwargs", "key", "why"), [
    ({"strategy": "krum"}, "federation.strategy", "each client's own update"),
    ({"strategy": "fedmedian"}, "federation.strategy", "each client's own update"),
    ({"strategy": "fedtrimmedavg"}, "federation.strategy", "each client's own update"),
    ({"secagg_num_shares": 4}, "federation.secagg-num-shares", "must be odd"),
    ({"secagg_num_shares": 2}, "federation.secagg-num-shares", "must be odd and >= 3"),
    ({"secagg_num_shares": 2.5}, "federation.secagg-num-shares", "a whole count"),
    ({"secagg_num_shares": -1.0}, "federation.secagg-num-shares", "must be 0"),
    ({"secagg_reconstruction_threshold": 0.5}, "federation.secagg-reconstruction-threshold",
     "cannot rebuild both secrets"),
    ({"secagg_num_shares": 5, "secagg_reconstruction_threshold": 2},
     "federation.secagg-reconstruction-threshold", "more than half"),
    ({"secagg_num_shares": 5, "secagg_reconstruction_threshold": 5},
     "federation.secagg-reconstruction-threshold", "less than it"),
    ({"secagg_clipping_range": 0.0}, "federation.secagg-clipping-range", "> 0"),
    ({"secagg_clipping_range": math.inf}, "federation.secagg-clipping-range", "finite"),
    ({"secagg_quantization_range": 2**32}, "federation.secagg-quantization-range", "2, "),
    ({"secagg_max_weight": -1.0}, "federation.secagg-max-weight", "> 0"),
])
def test_bad_secagg_settings_name_the_key_and_the_reason(kwargs: dict, key: str,
                                                         why: str) -> None:
    with pytest.raises(ValueError, match=f"'{key}'") as caught:
        _fed(**kwargs)
    assert why in str(caught.value)
    FederationConfig(**kwargs)  # checked only when secure aggregation is on


@pytest.mark.parametrize("mode", ["server-fixed", "adaptive"])
def test_server_side_clipping_cannot_see_masked_updates(mode: str) -> None:
    flat = {"federation.secure-aggregation": True, "privacy.mode": mode}
    with pytest.raises(ValueError, match="'privacy.mode'.*only sees their sum"):
        experiment_from_flat(flat)
    experiment_from_flat({**flat, "federation.secure-aggregation": False})


def test_client_clipping_composes_with_averaging_strategies_only() -> None:
    exp = experiment_from_flat({"federation.secure-aggregation": True,
                                "privacy.mode": "client-fixed",
                                "federation.strategy": "fedprox"})
    assert exp.federation.secure_aggregation and exp.privacy.mode == "client-fixed"
    with pytest.raises(ValueError, match="'privacy.mode'.*averages the clipped updates"):
        check_compatible(_fed(strategy="fedadam"), exp.privacy)


def test_cli_values_keep_flowers_share_or_count_meaning() -> None:
    flat = apply_overrides({}, ["federation.secure-aggregation=true",
                                "federation.secagg-num-shares=3",
                                "federation.secagg-reconstruction-threshold=2"])
    assert experiment_from_flat(flat).federation.secagg_shares() == (3, 2)
    flat = apply_overrides({}, ["federation.secure-aggregation=true",
                                "federation.secagg-num-shares=0.5"])
    assert experiment_from_flat(flat).federation.secagg_shares() == (0.5, 0.6)
    assert _fed(secagg_num_shares=1).secagg_shares()[0] == 1.0  # Flower: 1 means everyone


@pytest.mark.parametrize(("shares", "threshold", "sampled", "expected"), [
    (1.0, 0.6, 5, (5, 3)),   # everyone; round(3.0)
    (1.0, 0.6, 8, (8, 5)),   # everyone (even is fine then); round(4.8)
    (0.4, 0.6, 10, (5, 3)),  # round(4.0) is even and below 10: 5
    (0.1, 0.6, 10, (10, 6)),  # round(1.0) <= 2: everyone
    (0.6, 0.51, 5, (3, 2)),  # round(3.0); round(1.53)
    (3, 2, 9, (3, 2)),       # counts are kept
])
def test_effective_shares_follow_the_workflows_rules(shares: float, threshold: float,
                                                     sampled: int, expected: tuple) -> None:
    fed = _fed(secagg_num_shares=shares, secagg_reconstruction_threshold=threshold)
    assert effective_shares(fed, sampled) == expected


def test_the_sample_follows_the_seed_and_round() -> None:
    """As ``OwnedSampling``: the round's training sample, then its evaluation sample,
    from ``random.Random(round_seed(seed, g))`` over the sorted ids."""
    class Proxy:
        def __init__(self, node_id: int) -> None:
            self.cid, self.node_id = str(node_id), node_id

    nodes = [905, 17, 333, 4, 61, 250]
    strategy = build_secagg_strategy(_fed(fraction_train=0.5, min_train_nodes=2,
                                          min_available_nodes=2), DPConfig(), seed=4,
                                     population=len(nodes))
    manager = SortedClientManager()
    for node in nodes:
        manager.register(Proxy(node))
    params = ndarrays_to_parameters([np.zeros(3, np.float32)])
    with pytest.raises(RuntimeError, match="before seed_round"):
        strategy.configure_fit(2, params, manager)
    manager.seed_round(round_seed(4, 2))
    sampled = [p.node_id for p, _ in strategy.configure_fit(2, params, manager)]
    expected = random.Random(4 * 1_000_003 + 2)
    assert sampled == expected.sample(sorted(nodes), 3)
    assert [p.node_id for p in manager.sample(2)] == expected.sample(sorted(nodes), 2)


def test_the_ring_shuffle_ignores_any_seed_and_leaves_the_module_as_it_was() -> None:
    """SecAggPlusWorkflow shuffles the sampled clients with ``random.shuffle``: inside
    the block two shuffles after the same ``random.seed`` differ (by chance with
    probability 1 / 40!), and the module's seeded state comes back."""
    random.seed(11)
    seeded = random.getstate()
    rings = []
    for _ in range(2):
        random.setstate(seeded)
        with unpredictable_module_random():
            ring = list(range(40))
            random.shuffle(ring)
            rings.append(ring)
        assert random.getstate() == seeded
    assert rings[0] != rings[1]


def test_round_size_checks_name_the_key() -> None:
    with pytest.raises(ValueError, match="at least 2 clients"):
        check_round_size(_fed(), 1)
    with pytest.raises(ValueError, match="'federation.secagg-num-shares': 7 shares for the 5"):
        check_round_size(_fed(secagg_num_shares=7, secagg_reconstruction_threshold=4), 5)
    with pytest.raises(ValueError, match="'federation.secagg-quantization-range'.*overflow"):
        check_round_size(_fed(), 1024)  # 1024 * 2**22 == 2**32
    check_round_size(_fed(), 1023)


# ---------------------------------------------------------------------------------------
# Protocol arithmetic
# ---------------------------------------------------------------------------------------


def protocol_reference(updates: list[list[np.ndarray]], weights: list[int], c: float,
                       levels: int, max_weight: float) -> tuple[list[np.ndarray], float]:
    """The ``q``-weighted mean SecAgg+ computes and its error bound ``2 c n / Q``."""
    q = [round(w / max_weight * levels) for w in weights]
    total = float(sum(q))
    mean = [sum(qi * u[k].astype(np.float64) for qi, u in zip(q, updates, strict=True)) / total
            for k in range(len(updates[0]))]
    return mean, 2 * c * len(updates) / total


def test_quantisation_error_stays_within_the_derived_bound() -> None:
    """Flower's own quantise / dequantise on the path the protocol takes, no masks."""
    rng = np.random.default_rng(0)
    c, levels, max_weight = 8.0, 2**22, 10_000.0
    weights = [169, 134, 239, 151, 117]
    updates = [[rng.normal(size=(40, 7)), rng.normal(size=13)] for _ in weights]
    q_sum, sums = 0, [np.zeros((40, 7), np.int64), np.zeros(13, np.int64)]
    for w, u in zip(weights, updates, strict=True):
        q = round(w / max_weight * levels)
        q_sum += q
        for k, x in enumerate(quantize([a * q / levels for a in u], c, levels)):
            sums[k] += x
    got = [a - (len(weights) - 1) * c for a in dequantize(sums, c, levels)]
    got = [a * levels / q_sum for a in got]
    mean, bound = protocol_reference(updates, weights, c, levels, max_weight)
    errors = [float(np.max(np.abs(g - m))) for g, m in zip(got, mean, strict=True)]
    assert max(errors) < bound
    assert max(errors) > bound / 50  # the bound is not loose by orders of magnitude
    fedavg = [sum(w * u[k] for w, u in zip(weights, updates, strict=True)) / sum(weights)
              for k in range(2)]
    assert max(float(np.max(np.abs(f - m))) for f, m in zip(fedavg, mean, strict=True)) < 1e-5


def test_client_refuses_updates_the_protocol_would_garble() -> None:
    ok = [np.array([[0.5, -3.0]]), np.array([2.0])]
    assert quantisation_problem(ok, 5_000, 8.0, 2**22, 10_000.0) is None
    nan = [np.array([[0.5, np.nan]]), np.array([2.0])]
    assert "NaN" in quantisation_problem(nan, 5_000, 8.0, 2**22, 10_000.0)
    heavy = quantisation_problem(ok, 12_000, 8.0, 2**22, 10_000.0)
    assert "federation.secagg-max-weight (10000)" in heavy
    # 3.0 * 10000 / 10000 = 3 > 2.5: would be clipped; half the weight would not.
    assert "federation.secagg-clipping-range (2.5)" in quantisation_problem(
        ok, 10_000, 2.5, 2**22, 10_000.0)
    assert quantisation_problem(ok, 5_000, 2.5, 2**22, 10_000.0) is None


def _fitres(arrays: list[np.ndarray], n: int, **metrics: float) -> tuple[Any, FitRes]:
    return None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n,
                        {"num-examples": n, **metrics})


def _strategy(name: str, reference: list[np.ndarray], **kwargs: Any) -> Any:
    fed = _fed(strategy=name, min_train_nodes=2, min_available_nodes=2, **kwargs)
    from server.config import DPConfig

    strategy = build_secagg_strategy(fed, DPConfig(), seed=0, population=5)
    strategy._reference = reference
    strategy.initial_parameters = ndarrays_to_parameters(reference)
    if hasattr(strategy, "current_weights"):
        strategy.current_weights = [a.copy() for a in reference]
    return strategy


SHAPES = [(2, 3), (3,)]


def test_fedavg_passes_the_secagg_aggregate_through_and_weights_metrics() -> None:
    rng = np.random.default_rng(1)
    reference = [np.zeros(s, np.float32) for s in SHAPES]
    aggregate = [rng.normal(size=s) for s in SHAPES]  # float64, as the workflow makes it
    strategy = _strategy("fedavg", reference)
    results = [_fitres(aggregate, 10, train_loss=1.0), _fitres(aggregate, 30, train_loss=3.0)]
    params, metrics = strategy.aggregate_fit(1, results, [])
    got = parameters_to_ndarrays(params)
    for g, a in zip(got, aggregate, strict=True):
        assert g.dtype == np.float32
        np.testing.assert_array_equal(g, a.astype(np.float32))
    assert metrics == {"train_loss": pytest.approx(2.5)}
    assert strategy.rounds.stats[1].replied == 2 and strategy.rounds.stats[1].train == metrics
    assert weighted_metrics([(1, {"a": 2.0, "b": 1}), (3, {"a": 4.0})]) == {"a": 3.5}


def test_fedavgm_steps_from_the_global_weights_towards_the_aggregate() -> None:
    """Hand-computed SGD with momentum on the pseudo-gradient ``current - aggregate``."""
    w0 = [np.ones(s, np.float32) for s in SHAPES]
    a1 = [np.full(s, 0.5) for s in SHAPES]
    a2 = [np.full(s, 0.25) for s in SHAPES]
    strategy = _strategy("fedavgm", w0, server_momentum=0.9)
    w1 = parameters_to_ndarrays(strategy.aggregate_fit(1, [_fitres(a1, 5)], [])[0])
    np.testing.assert_allclose(w1[0], 0.5)  # round 1: momentum = gradient 0.5, lr 1
    w2 = parameters_to_ndarrays(strategy.aggregate_fit(2, [_fitres(a2, 5)], [])[0])
    # gradient 0.5 - 0.25 = 0.25; momentum 0.9 * 0.5 + 0.25 = 0.7; 0.5 - 0.7 = -0.2
    np.testing.assert_allclose(w2[1], -0.2, rtol=1e-6)


def test_fedadam_bias_correction_follows_the_global_round() -> None:
    w0 = [np.zeros(s, np.float32) for s in SHAPES]
    a = [np.full(s, 0.1) for s in SHAPES]
    eta, b1, b2, tau = 0.01, 0.9, 0.99, 1e-3

    def step(server_round: int) -> float:
        m, v = (1 - b1) * 0.1, (1 - b2) * 0.01
        eta_norm = eta * math.sqrt(1 - b2 ** (server_round + 1)) / (1 - b1 ** (server_round + 1))
        return eta_norm * m / (math.sqrt(v) + tau)

    strategy = _strategy("fedadam", w0, server_learning_rate=eta)
    got = parameters_to_ndarrays(strategy.aggregate_fit(1, [_fitres(a, 5)], [])[0])
    np.testing.assert_allclose(got[0], step(1), rtol=1e-5)
    resumed = _strategy("fedadam", w0, server_learning_rate=eta)
    resumed.rounds.offset = 3  # server round 1 of a run resumed after 3 rounds
    got = parameters_to_ndarrays(resumed.aggregate_fit(1, [_fitres(a, 5)], [])[0])
    np.testing.assert_allclose(got[0], step(4), rtol=1e-5)
    assert 4 in resumed.rounds.stats and 1 not in resumed.rounds.stats


def test_client_side_dp_adds_the_calibrated_noise_even_when_a_client_failed() -> None:
    reference = [np.zeros((200, 50), np.float32)]
    strategy = _strategy("fedavg", reference)
    z, clip, m = 1.0, 2.0, 4
    wrapper = ClientSideFixedClipping(strategy, z, clip, m)
    results = [_fitres([np.zeros((200, 50))], 1) for _ in range(3)]
    params, _ = wrapper.aggregate_fit(1, results, [RuntimeError("dropped")])
    noise = parameters_to_ndarrays(params)[0]
    assert noise.std() == pytest.approx(z * clip / m, rel=0.05)


def test_dp_clipping_runs_inside_the_secagg_mod() -> None:
    from flwr.client.mod import fixedclipping_mod, secaggplus_mod

    mods = make_secagg_client_app({"privacy.mode": "client-fixed"})._mods
    assert mods.index(secaggplus_mod) < mods.index(fixedclipping_mod)
    assert fixedclipping_mod not in make_secagg_client_app({})._mods


class _FakeGrid:
    """Answers stage messages: node 1 with keys, node 2 with an error, node 3 never."""

    def send_and_receive(self, messages: list[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node == 1:
                keys = ConfigRecord({"pk1": b"k" * 10, "pk2": b"k" * 6})
                replies.append(Message(RecordDict({"secaggplus_configs": keys}), reply_to=msg))
            elif node == 2:
                replies.append(Message(Error(code=101, reason="gone"), reply_to=msg))
        return replies


@pytest.mark.usefixtures("server_identity")  # as inside a running ServerApp
def test_metered_grid_counts_bytes_and_names_failed_nodes_with_their_stage() -> None:
    book = RoundBook()
    book.offset = 3  # group 4 is server round 4: global round 7 of a resumed run
    grid = MeteredGrid(_FakeGrid(), book)

    def send(stage: str, payload: bytes) -> None:
        content = RecordDict({"secaggplus_configs": ConfigRecord({"stage": stage,
                                                                   "ctxts": [payload]})})
        grid.send_and_receive([Message(content, dst_node_id=n, message_type="train",
                                       group_id="4") for n in (1, 2, 3)], timeout=5.0)

    send("setup", b"x" * 100)
    send("unmask", b"")
    meter = book.stats[7]
    assert meter.bytes_down == 300 and meter.bytes_up == 2 * 16
    assert meter.timed_out == 1  # node 3 at setup; at unmask its update was summed already
    assert meter.failed == 0  # settled when the round closes: sampled less summed
    assert meter.failures == ["node 2: gone (secagg stage setup)",
                              "node 3: no reply within 5 s (secagg stage setup)",
                              "node 2: gone (secagg stage unmask)",
                              "node 3: no reply within 5 s (secagg stage unmask)"]
    assert set(meter.stage_seconds) == {"setup", "unmask"}


@pytest.mark.parametrize("secure", [True, False])
def test_flwr_run_client_app_follows_the_resolved_config(tmp_path: Path, secure: bool) -> None:
    from simulations import apps

    run_config = {"experiment.output-dir": str(tmp_path),
                  "federation.secure-aggregation": secure}
    folder = apps.run_folder(run_config)
    folder.mkdir(parents=True)
    (folder / apps.RESOLVED).write_text(json.dumps({"federation.secure-aggregation": secure}))
    app = apps._EitherClientApp()
    app._plain, app._secure = (lambda m, c: "plain"), (lambda m, c: "secure")
    context = SimpleNamespace(run_config=run_config)
    assert app(None, context) == ("secure" if secure else "plain")


def test_flwr_run_folders_differ_by_setting_not_only_by_data(tmp_path: Path) -> None:
    # A second `flwr run -c "federation.strategy='fedprox'"` replaced the first run's
    # folder (it was named by the data settings alone).
    from simulations import apps

    base = {"experiment.output-dir": str(tmp_path)}
    fedprox = {**base, "federation.strategy": "fedprox"}
    assert apps.run_folder(base) != apps.run_folder(fedprox)
    assert apps.run_folder(fedprox) == apps.run_folder(dict(reversed(fedprox.items())))
    assert apps.run_folder(base).parent == apps.run_folder(fedprox).parent == tmp_path


# ---------------------------------------------------------------------------------------
# Simulations (subprocesses in their own session)
# ---------------------------------------------------------------------------------------

SEED = 0
MERCHANTS = 5
DROPPED = 2  # partition that fails in SecAgg+ round 2 ...
DROP_STAGE = "collect_masked_vectors"  # ... after the key shares went out


class Run:
    """One ``drivers/secagg.py`` run in a session of its own; everything in it is killed
    after."""

    def __init__(self, tmp: Path, overrides: list[str], drop: dict | None = None) -> None:
        self.tmp, self.run_dir, self.records = tmp, tmp / "run", tmp / "records"
        spec = {"overrides": overrides, "run_dir": str(self.run_dir),
                "record_dir": str(self.records), "drop": drop}
        (tmp / "spec.json").write_text(json.dumps(spec))
        self.driver = run_driver("secagg", [str(tmp / "spec.json")], cwd=tmp,
                                 log=tmp / "driver.log", timeout=420)

    def check(self) -> None:
        self.driver.check()

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.run_dir / "metrics.jsonl")

    def updates(self, global_round: int) -> dict[int, tuple[list[np.ndarray], int]]:
        """Each partition's recorded update of ``global_round`` and its weight."""
        found = {}
        for path in sorted(self.records.glob(f"r{global_round}-p*.npz")):
            with np.load(path) as z:
                arrays = [z[f"arr_{i}"] for i in range(len(z.files) - 1)]
                found[int(path.stem.split("-p")[1])] = (arrays, int(z["num_examples"]))
        return found

    def weights_after(self, global_round: int) -> list[np.ndarray]:
        return load_checkpoint(self.run_dir / "checkpoints" /
                               f"round-{global_round:05d}.npz")["weights"]


def _overrides(tmp: Path, rounds: int, *extra: str) -> list[str]:
    # XLA off: each process trains once or twice here, compiling would cost more. The
    # rounds' weights are checked against the protocol's mean of the round's updates: no
    # server step on the response shifts (tests/test_shift_step.py covers SecAgg+'s).
    return [f"synthetic.num-merchants={MERCHANTS}", f"federation.num-rounds={rounds}",
            "federation.local-epochs=1", "model.jit-compile=false", f"experiment.seed={SEED}",
            f"experiment.output-dir={tmp}", "federation.shift-server-momentum=0", *extra]


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("plain")
    run = Run(tmp, _overrides(tmp, 1))
    run.check()
    yield run


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("secagg")
    run = Run(tmp, _overrides(tmp, 2, "federation.secure-aggregation=true"),
              drop={"pid": DROPPED, "stage": DROP_STAGE, "round": 2})
    run.check()
    yield run


def _max_abs(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x.astype(np.float64) - y))) for x, y in
               zip(a, b, strict=True))


def _slack(weights: list[np.ndarray]) -> float:
    """The final cast to float32: half an ulp of the largest weight."""
    return max(float(np.max(np.abs(w))) for w in weights) * 2.0**-24


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_secagg_round_equals_fedavg_within_the_quantisation_error(plain: Run,
                                                                  secure: Run) -> None:
    fed = FederationConfig()  # the defaults both runs used
    c, levels, cap = fed.secagg_clipping_range, fed.secagg_quantization_range, \
        fed.secagg_max_weight
    plain_updates, secure_updates = plain.updates(1), secure.updates(1)
    assert sorted(plain_updates) == sorted(secure_updates) == list(range(MERCHANTS))
    for pid, (update, n) in plain_updates.items():  # deterministic training, same seeds
        assert secure_updates[pid][1] == n
        for a, b in zip(update, secure_updates[pid][0], strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"partition {pid}")
    updates = [plain_updates[p][0] for p in range(MERCHANTS)]
    weights = [plain_updates[p][1] for p in range(MERCHANTS)]

    # Plain FedAvg did what FedAvg does with these updates (float32 arithmetic).
    fedavg = [sum(w * u[k].astype(np.float64) for w, u in zip(weights, updates, strict=True))
              / sum(weights) for k in range(len(updates[0]))]
    with np.load(plain.run_dir / "final_weights.npz") as z:
        plain_result = [z[f"arr_{i}"] for i in range(len(z.files))]
    assert _max_abs(plain_result, fedavg) < 1e-6

    secure_result = secure.weights_after(1)
    mean, bound = protocol_reference(updates, weights, c, levels, cap)
    assert bound < 1e-3  # ~2 * 8 * 5 / (810 / 10000 * 2**22) = 2.4e-4
    error = _max_abs(secure_result, mean)
    assert error <= bound + _slack(mean), (error, bound)
    assert error > 0  # the aggregate did go through quantisation
    # ... and equals plain FedAvg within that bound plus the (computed) weight rounding.
    weight_rounding = _max_abs(mean, fedavg)
    assert _max_abs(secure_result, plain_result) <= bound + weight_rounding + 1e-6
    # The test can tell a weighted from an unweighted mean: their gap dwarfs the bound.
    unweighted = [np.mean([u[k] for u in updates], axis=0, dtype=np.float64)
                  for k in range(len(updates[0]))]
    assert _max_abs(unweighted, fedavg) > 20 * bound

    row = secure.metrics()[1]
    assert (row["sampled"], row["replied"], row["failed"]) == (MERCHANTS, MERCHANTS, 0)
    assert row["bytes_up"] > 0 and row["bytes_down"] > 0
    summary = json.loads((secure.run_dir / "federation.json").read_text())
    assert summary["secure_aggregation"]["shares"] == 5
    assert summary["secure_aggregation"]["threshold"] == 3
    assert summary["empty_rounds"] == 0
    assert (secure.run_dir / "model.keras").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dropout_after_key_sharing_is_recovered(secure: Run) -> None:
    fed = FederationConfig()
    survivors = secure.updates(2)
    assert sorted(survivors) == [p for p in range(MERCHANTS) if p != DROPPED]
    updates = [u for u, _ in survivors.values()]
    weights = [n for _, n in survivors.values()]
    mean, bound = protocol_reference(updates, weights, fed.secagg_clipping_range,
                                     fed.secagg_quantization_range, fed.secagg_max_weight)
    result = secure.weights_after(2)
    error = _max_abs(result, mean)
    assert 0 < error <= bound + _slack(mean), (error, bound)
    # Far from what the round-1 model or a mean including a stale update would give.
    assert _max_abs(result, secure.weights_after(1)) > 20 * bound

    rows = secure.metrics()
    assert [r["round"] for r in rows] == [0, 1, 2]
    row = rows[2]
    assert (row["sampled"], row["replied"], row["failed"]) == (MERCHANTS, MERCHANTS - 1, 1)
    assert len(row["failures"]) == 1, row["failures"]
    assert f"test dropout of partition {DROPPED}" in row["failures"][0]
    assert f"(secagg stage {DROP_STAGE})" in row["failures"][0]
    assert math.isfinite(row["centralised"]["val_loss"])
