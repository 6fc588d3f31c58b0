"""Differential privacy: config, Flower's DP wrappers behind the guard, the RDP ledger,
the budget stop, and the audits (egress, membership inference) on a real DP run."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from helpers import FakeGrid, run_driver

from client.app import train_mods
from server.config import DPConfig, FederationConfig, settings_from_flat
from server.privacy import PrivacyLedger, num_sampled, wrap_strategy
from server.strategy import build_strategy
from simulations.privacy_audit import attack_auc
from simulations.privacy_tradeoff import tradeoff_rows
from simulations.settings import experiment_from_flat

# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value", "key"), [
    ("mode", "central", "privacy.mode"),
    ("noise_multiplier", 0.0, "privacy.noise-multiplier"),
    ("noise_multiplier", math.inf, "privacy.noise-multiplier"),
    ("clipping_norm", -1.0, "privacy.clipping-norm"),
    ("target_delta", 1.0, "privacy.target-delta"),
    ("target_delta", -1e-5, "privacy.target-delta"),
    ("target_epsilon", -0.5, "privacy.target-epsilon"),
])
def test_bad_privacy_values_name_the_key(field: str, value: Any, key: str) -> None:
    with pytest.raises(ValueError, match=f"'{key}'"):
        DPConfig(**{field: value})


def test_privacy_section_is_part_of_an_experiment() -> None:
    exp = experiment_from_flat({"privacy.mode": "server-fixed", "privacy.target-epsilon": 8})
    assert exp.privacy == DPConfig(mode="server-fixed", target_epsilon=8.0)
    assert not experiment_from_flat({}).privacy.enabled
    with pytest.raises(ValueError, match="privacy.noise"):
        experiment_from_flat({"privacy.noise": 1.0})


@pytest.mark.parametrize("strategy", ["krum", "fedmedian", "fedadam", "fedavgm"])
def test_dp_refuses_strategies_whose_aggregate_is_not_a_mean(strategy: str) -> None:
    fed = FederationConfig(strategy=strategy)
    with pytest.raises(ValueError, match="'privacy.mode'"):
        wrap_strategy(build_strategy(fed, 0), DPConfig(mode="server-fixed"), fed, 8)


def test_client_clips_on_the_train_handler_only_when_asked() -> None:
    from flwr.clientapp.mod import fixedclipping_mod

    assert train_mods({"privacy.mode": "client-fixed"}) == [fixedclipping_mod]
    assert train_mods({"privacy.mode": "server-fixed"}) == []
    assert train_mods({}) == []
    assert len(train_mods(None)) == 1  # run config: clip when the server sends a norm


# ---------------------------------------------------------------------------------------
# Wrapper behind the guard (hand-made replies)
# ---------------------------------------------------------------------------------------

SHAPES = [(2, 3), (3,)]
#: Instruction messages take their run and node id from the running ServerApp.
pytestmark = pytest.mark.usefixtures("server_identity")


def _reply(ins: Message, arrays: list[np.ndarray], n: int) -> Message:
    return Message(RecordDict({"arrays": ArrayRecord(arrays),
                               "metrics": MetricRecord({"num-examples": n,
                                                        "train_loss": 1.0})}), reply_to=ins)


def test_server_clipping_sees_only_screened_replies_and_averages_uniformly() -> None:
    fed = FederationConfig(min_train_nodes=1, min_available_nodes=1)
    guarded = build_strategy(fed, 0)
    clip = 1.0
    dp = DPConfig(mode="server-fixed", noise_multiplier=1e-9, clipping_norm=clip)
    runner = wrap_strategy(guarded, dp, fed, population=3)
    assert num_sampled(fed, 3) == 3 and runner.num_sampled_clients == 3
    start = [np.zeros(s, np.float32) for s in SHAPES]
    ins = {m.metadata.dst_node_id: m for m in runner.configure_train(
        1, ArrayRecord(start), ConfigRecord(), FakeGrid([1, 2, 3]))}
    small = [np.full(s, 0.01, np.float32) for s in SHAPES]  # norm 0.03: not clipped
    big = [np.full(s, 10.0, np.float32) for s in SHAPES]  # norm 30: clipped to 1
    nan = [np.full(s, np.nan, np.float32) for s in SHAPES]
    replies = [_reply(ins[1], small, 10), _reply(ins[2], big, 1000), _reply(ins[3], nan, 5)]

    arrays, _ = runner.aggregate_train(1, replies)

    stats = guarded.rounds.stats[1]
    assert (stats.sampled, stats.replied, stats.rejected) == (3, 2, 1)
    assert "NaN" in stats.failures[0]
    norm_big = math.sqrt(sum(b.size * 100.0 for b in big))
    # The plain mean of the clipped updates, whatever num-examples said (10 vs 1000).
    expected = [(a + b * clip / norm_big) / 2 for a, b in zip(small, big, strict=True)]
    for got, want in zip(arrays.to_numpy_ndarrays(), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Ledger and budget
# ---------------------------------------------------------------------------------------


def _direct_epsilon(q: float, z: float, rounds: int, delta: float) -> float:
    from dp_accounting import dp_event, rdp

    acc = rdp.RdpAccountant()
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), rounds)
    return float(acc.get_epsilon(delta))


@pytest.mark.parametrize(("population", "sampled", "z"), [(8, 8, 1.0), (40, 10, 1.5)])
def test_ledger_epsilon_grows_and_matches_dp_accounting(tmp_path: Path, population: int,
                                                        sampled: int, z: float) -> None:
    dp = DPConfig(mode="server-fixed", noise_multiplier=z)
    ledger = PrivacyLedger(dp, population, sampled, tmp_path / "privacy.jsonl")
    eps = [ledger.record(r, sampled, sampled, 1.0)["epsilon"] for r in range(1, 6)]
    assert all(b > a for a, b in zip(eps, eps[1:], strict=False))
    for rounds in (1, 5):
        assert eps[rounds - 1] == pytest.approx(
            _direct_epsilon(sampled / population, z, rounds, dp.delta()), rel=1e-9)
    lines = [json.loads(t) for t in (tmp_path / "privacy.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2, 3, 4, 5]
    assert lines[0]["sampling_rate"] == sampled / population
    # A round that averaged fewer replies than the noise was calibrated for costs more.
    short = PrivacyLedger(dp, population, sampled)
    assert short.record(1, sampled, sampled - 2, 1.0)["epsilon"] > eps[0]
    # Resume: replaying the first two rounds gives round 2's epsilon and trims the file.
    again = PrivacyLedger(dp, population, sampled, tmp_path / "privacy.jsonl")
    assert again.replay(upto=2) == 2
    assert again.epsilon == pytest.approx(eps[1])
    assert len((tmp_path / "privacy.jsonl").read_text().splitlines()) == 2
    # A kill while writing round 3's line (before its checkpoint): the cut line is dropped.
    path = tmp_path / "privacy.jsonl"
    path.write_text(path.read_text() + '{"round": 3, "partic')
    assert PrivacyLedger(dp, population, sampled, path).replay(upto=2) == 2
    assert path.read_text().endswith("\n") and len(path.read_text().splitlines()) == 2


def test_a_resume_refuses_a_merchant_ledger_missing_rounds_its_checkpoint_counted(
        tmp_path: Path) -> None:
    # privacy.jsonl deleted or cut short before a resume from round 3's checkpoint:
    # replay found no line and epsilon covered only the rounds after the resume.
    from server.checkpoint import save_checkpoint
    from server.config import settings_from_flat
    from server.dp_accounting import CHECKPOINT_KEY, NO_LEDGER
    from server.recorder import RoundRecorder, Selection
    from server.resume import start_state
    from server.runner import Runner

    dp, path, weights = DPConfig(mode="server-fixed"), tmp_path / "privacy.jsonl", [np.zeros(2)]
    strategy = build_strategy(FederationConfig(), 0)
    spent = PrivacyLedger(dp, 8, 4, path)
    for r in (1, 2, 3):
        spent.record(r, 4, 4, 1.0)
    text = path.read_text()
    recorder = RoundRecorder(settings_from_flat({"privacy.mode": "server-fixed"}), tmp_path,
                             Runner(strategy, strategy, spent), None, done=0,
                             selection=Selection(), weights=weights)
    recorder._checkpoint(3, weights)  # what every round's checkpoint records

    def resume(mode: str = "server-fixed") -> PrivacyLedger:
        ledger = PrivacyLedger(DPConfig(mode=mode), 8, 4, path)
        assert start_state(tmp_path, True, Runner(strategy, strategy, ledger),
                           weights)[0] >= 3
        return ledger

    path.unlink()
    with pytest.raises(ValueError, match=rf"^{path}: the checkpoint of round 3 counted 3 "
                                         r"released rounds \(server-fixed, noise 1.0, "
                                         r"sampling rate 0.5\); the ledger is missing: it "
                                         r"holds 0 up to it: epsilon would be under-counted"):
        resume()
    path.write_text(text.split("\n")[0] + "\n")  # round 1's line only
    with pytest.raises(ValueError, match=r"counted 3 released rounds .*; the ledger holds 1 "
                                         r"up to it"):
        resume("adaptive")
    assert path.read_text() == text.split("\n")[0] + "\n"  # nothing rewritten
    path.write_text(text)
    assert resume().epsilon == pytest.approx(spent.epsilon)  # the whole ledger: resumed

    def checkpoint(g: int, **ledger: Any) -> None:
        save_checkpoint(tmp_path / "checkpoints", g, {
            "weights": weights, "strategy": {}, "clipping_norm": None,
            "selection": {}, **ledger}, keep=5)

    # A run without DP resumed with it: its rounds released unnoised updates.
    checkpoint(4, **{CHECKPOINT_KEY: NO_LEDGER})
    path.unlink()
    with pytest.raises(ValueError, match="the checkpoint of round 4 was written by a run "
                                         "without merchant-level accounting"):
        resume()
    # The version before wrote None with DP or without: resumed as it was, with its
    # ledger or with none (a run whose rounds had no replies yet has no line).
    checkpoint(4, **{CHECKPOINT_KEY: None})
    assert resume().epsilon == 0.0
    path.write_text(text)
    assert resume().epsilon == pytest.approx(spent.epsilon)
    checkpoint(5, **{CHECKPOINT_KEY: {"unit": "customer", "released_rounds": 3}})
    with pytest.raises(ValueError, match="the checkpoint of round 5 was written by a run "
                                         "without merchant-level accounting"):
        resume()
    checkpoint(6)  # a checkpoint of an older version, without the count: as before
    path.unlink()
    assert resume().epsilon == 0.0


def test_a_resume_refuses_to_turn_differential_privacy_off_or_back_on(tmp_path: Path) -> None:
    """Rounds 1-3 with DP, 4-6 resumed without (unnoised updates), then resumed with DP
    again: epsilon covered rounds 1-3 only (a checkpoint without DP wrote None, which the
    check read as a checkpoint of an older version). Either resume is refused now."""
    from server.recorder import RoundRecorder, Selection
    from server.resume import start_state
    from server.runner import Runner

    path, weights = tmp_path / "privacy.jsonl", [np.zeros(2)]
    strategy = build_strategy(FederationConfig(), 0)
    spent = PrivacyLedger(DPConfig(mode="server-fixed"), 8, 4, path)
    for r in (1, 2, 3):
        spent.record(r, 4, 4, 1.0)

    def checkpoint(g: int, flat: dict[str, Any], ledger: PrivacyLedger | None) -> None:
        RoundRecorder(settings_from_flat(flat), tmp_path, Runner(strategy, strategy, ledger),
                      None, done=0, selection=Selection(), weights=weights)._checkpoint(
                          g, weights)

    checkpoint(3, {"privacy.mode": "server-fixed"}, spent)
    with pytest.raises(ValueError, match=r"checkpoint of round 3 was written by a run with "
                                         r"merchant-level differential privacy .*3 released "
                                         r"rounds.*resume with the same privacy settings"):
        start_state(tmp_path, True, Runner(strategy, strategy, None), weights)
    checkpoint(6, {}, None)  # rounds 4-6 ran without DP (as an older version allowed)
    ledger = PrivacyLedger(DPConfig(mode="server-fixed"), 8, 4, path)
    with pytest.raises(ValueError, match="the checkpoint of round 6 was written by a run "
                                         "without merchant-level accounting"):
        start_state(tmp_path, True, Runner(strategy, strategy, ledger), weights)


def test_a_resume_counts_each_round_at_its_own_noise_and_sampling_rate(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A deployment may resume with other privacy settings or with merchants joined or
    # gone: the rounds already released keep the noise and rate they were released with.
    # Recomposed at this run's population, 4 of 8 sampled read as 4 of 16 and epsilon
    # fell from 6.48 to 4.42 (to 1.63 at 100 merchants).
    path = tmp_path / "privacy.jsonl"
    spent = PrivacyLedger(DPConfig(mode="server-fixed"), 8, 4, path)
    for r in (1, 2, 3):
        spent.record(r, 4, 4, 1.0)
    text = path.read_text()

    def resumed(population: int, sampled: int, **dp: Any) -> float:
        path.write_text(text)
        ledger = PrivacyLedger(DPConfig(**{"mode": "server-fixed", **dp}), population,
                               sampled, path)
        assert ledger.replay(upto=3) == 3
        return ledger.epsilon

    # Another noise or mode: each line is recomposed with the noise it records.
    assert resumed(8, 4, mode="adaptive", noise_multiplier=2.0) == \
        pytest.approx(spent.epsilon, rel=1e-9)
    with caplog.at_level("WARNING"):
        for population in (16, 100, 4):  # 4 of 8 is 8 of 16, 50 of 100, 2 of 4
            assert resumed(population, population // 2) == \
                pytest.approx(spent.epsilon, rel=1e-9), population
    assert "accounted at its own sampling rate" in caplog.text
    # A rate this population cannot give exactly is rounded up (4 of 8 as 4 of 7, not
    # 3.5): never under.
    assert resumed(7, 3) == pytest.approx(_direct_epsilon(4 / 7, 1.0, 3, DPConfig().delta()),
                                          rel=1e-9)
    assert resumed(7, 3) > spent.epsilon


def test_ledger_hides_the_accountants_per_order_warnings(caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    # At low noise and a high rate RDP skips its low fractional orders, warning once per
    # order and query: dozens of lines a round in a user's log before this was silenced.
    dp = DPConfig(mode="server-fixed", noise_multiplier=0.5, target_epsilon=100.0)
    ledger = PrivacyLedger(dp, 200, 30)
    with caplog.at_level("WARNING"):
        ledger.record(1, 30, 30, 1.0)
        ledger.next_round_exceeds()
    assert ledger.epsilon > 0
    assert not [r for r in caplog.records if "failed to converge" in r.getMessage()]


def test_budget_stops_before_the_round_that_would_exceed_it() -> None:
    z, m = 1.0, 8
    eps = [_direct_epsilon(1.0, z, r, 1e-5) for r in (1, 2, 3)]
    target = (eps[1] + eps[2]) / 2  # two rounds fit, a third does not
    ledger = PrivacyLedger(DPConfig(mode="server-fixed", noise_multiplier=z,
                                    target_epsilon=target), m, m)
    decisions = []
    for r in (1, 2):
        decisions.append(ledger.next_round_exceeds())
        ledger.record(r, m, m, 1.0)
    decisions.append(ledger.next_round_exceeds())
    assert decisions == [False, False, True]
    assert ledger.epsilon <= target
    unbounded = PrivacyLedger(DPConfig(mode="server-fixed", noise_multiplier=z), m, m)
    for r in range(1, 50):
        unbounded.record(r, m, m, 1.0)
    assert not unbounded.next_round_exceeds()  # no budget set: never stops


def test_attack_auc_and_its_interval_on_known_losses() -> None:
    rng = np.random.default_rng(0)
    losses = rng.exponential(size=400)
    same = attack_auc(losses, losses, seed=1, n_boot=200)  # members and non-members alike
    assert same["auc"] == 0.5 and same["ci_low"] < 0.5 < same["ci_high"]
    leaky = attack_auc(rng.exponential(0.2, size=400), rng.exponential(1.0, size=400), seed=1,
                       n_boot=200)
    assert leaky["auc"] > 0.8 and leaky["ci_low"] > 0.7
    assert attack_auc(np.ones(5), np.ones(5) * 2, seed=3) == attack_auc(
        np.ones(5), np.ones(5) * 2, seed=3)


# ---------------------------------------------------------------------------------------
# A real DP simulation (subprocess in its own session)
# ---------------------------------------------------------------------------------------

def test_dp_units_sweep_every_unit_once_per_noise_and_check_each_config() -> None:
    from simulations.compare import _privacy_variants

    exp = experiment_from_flat({})
    variants = dict(_privacy_variants(exp, (0.0, 0.5, 2.0),
                                      ("merchant", "customer", "customer-distributed")))
    assert list(variants) == ["", "-dp0.5", "-dp2", "-cdp0.5", "-cdp2", "-ddp0.5", "-ddp2"]
    assert variants[""]["privacy.mode"] == "off"
    assert variants["-dp2"] == {"privacy.mode": "server-fixed", "privacy.unit": "merchant",
                                "privacy.noise-multiplier": 2.0}
    assert variants["-cdp0.5"]["privacy.placement"] == "central"
    assert variants["-ddp2"]["federation.secure-aggregation"] is True
    assert variants["-ddp2"]["privacy.placement"] == "distributed"
    # Without --dp-units the sweep follows the configured unit, as before.
    assert [s for s, _ in _privacy_variants(exp, (0.0, 1.0))] == ["", "-dp1"]
    with pytest.raises(ValueError, match="unknown 'customers'"):
        _privacy_variants(exp, (1.0,), ("customers",))
    with pytest.raises(ValueError, match="--dp-units needs --noise"):
        _privacy_variants(exp, (), ("merchant",))
    # A variant the configuration refuses fails before any training, naming the run:
    # merchant-level server-side clipping cannot see the updates under SecAgg+.
    secagg = experiment_from_flat({"federation.secure-aggregation": True})
    with pytest.raises(ValueError, match="federated-dp1: .*privacy.mode"):
        _privacy_variants(secagg, (1.0,), ("merchant",))


Z, ROUNDS = 1.0, 2


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``fedecay compare --noise 0,Z --dp-units merchant,customer`` on the quick preset:
    the comparison folder."""
    tmp = tmp_path_factory.mktemp("dp-sweep")
    run_driver("cli_main", [
        "compare", "--preset", "quick", "--methods", "centralised,federated",
        "--noise", f"0,{Z}", "--dp-units", "merchant,customer",
        "--set", f"federation.num-rounds={ROUNDS}",
        "--set", "federation.local-epochs=1", "--set", "privacy.clipping-norm=1.0",
        "--set", f"experiment.output-dir={tmp / 'runs'}"],
        cwd=tmp, log=tmp / "run.log", timeout=600).check()
    (found,) = (tmp / "runs").glob("*-compare-quick")
    yield found


@pytest.fixture(scope="module")
def dp_run(sweep: Path) -> Path:
    """The DP federation of the sweep (server-side fixed clipping)."""
    return sweep / f"federated-fedavg-dp{Z:g}"


@pytest.fixture(scope="module")
def modes_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Client-side fixed clipping (1 round) and adaptive clipping (2 rounds), 4 merchants."""
    tmp = tmp_path_factory.mktemp("dp-modes")
    for rounds, mode in (("1", "client-fixed"), ("2", "adaptive")):
        run_driver("dp_modes", [str(tmp), rounds, mode], cwd=tmp, log=tmp / f"{mode}.log",
                   timeout=400).check()
    return tmp


@pytest.mark.slow
@pytest.mark.timeout(700)
def test_server_fixed_run_writes_a_finite_growing_ledger(dp_run: Path) -> None:
    lines = [json.loads(t) for t in (dp_run / "privacy.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == list(range(1, ROUNDS + 1))
    eps = [line["epsilon"] for line in lines]
    assert all(math.isfinite(e) and e > 0 for e in eps) and eps[1] > eps[0]
    assert lines[-1]["participants"] == 8 and lines[-1]["sampling_rate"] == 1.0
    assert eps[-1] == pytest.approx(_direct_epsilon(1.0, Z, ROUNDS, 1e-5), rel=1e-6)
    summary = json.loads((dp_run / "federation.json").read_text())
    assert summary["privacy"]["epsilon"] == pytest.approx(eps[-1])
    assert summary["stop_reason"] is None


@pytest.mark.slow
def test_egress_summary_of_the_dp_run(dp_run: Path) -> None:
    from simulations.privacy_audit import egress_summary

    out = egress_summary(dp_run)
    assert [r["round"] for r in out["rounds"]] == [1, 2]
    assert all(r["bytes_up"] > 0 and r["bytes_up_per_client"] * r["replied"] == r["bytes_up"]
               for r in out["rounds"])
    assert out["unexpected_metrics"] == [] and out["differential_privacy"]


@pytest.mark.slow
def test_membership_audit_on_the_dp_model(dp_run: Path) -> None:
    from simulations.privacy_audit import membership_audit

    out = membership_audit(dp_run, merchants=3, seed=0, n_boot=200)
    assert len(out["merchants"]) == 3 and out["members"] > 0 and out["non_members"] > 0
    assert 0 <= out["ci_low"] <= out["auc"] <= out["ci_high"] <= 1
    assert "time period" in out["note"]
    assert membership_audit(dp_run, merchants=3, seed=0, n_boot=200)["ci_low"] == out["ci_low"]


@pytest.mark.slow
@pytest.mark.timeout(700)
def test_noise_sweep_reports_epsilon_utility_and_attacks(sweep: Path) -> None:
    results = json.loads((sweep / "results.json").read_text())
    methods = results["methods"]
    assert set(methods) == {"centralised", "federated-fedavg", f"federated-fedavg-dp{Z:g}",
                            f"federated-fedavg-cdp{Z:g}"}
    dp = methods[f"federated-fedavg-dp{Z:g}"]
    assert dp["privacy"]["noise_multiplier"] == Z and dp["privacy"]["mode"] == "server-fixed"
    assert dp["privacy"]["epsilon"] == pytest.approx(_direct_epsilon(1.0, Z, ROUNDS, 1e-5),
                                                     rel=1e-6)
    cdp = methods[f"federated-fedavg-cdp{Z:g}"]["privacy"]
    assert cdp["mode"] == "customer-central" and cdp["unit"] == "customer"
    assert cdp["noise_multiplier"] == Z and 0 < cdp["epsilon"] < dp["privacy"]["epsilon"]
    assert "privacy" not in methods["federated-fedavg"]
    for m in methods.values():  # every saved model is audited, both attacks
        audit = m["membership"]
        assert 0 <= audit["ci_low"] <= audit["auc"] <= audit["ci_high"] <= 1
        assert 0 <= audit["calibrated"]["auc"] <= 1
    assert (sweep / "auc_vs_epsilon.png").stat().st_size > 0
    report = (sweep / "report.md").read_text()
    assert "## Privacy: epsilon, utility and membership attack" in report
    assert "| customer-central |" in report and "| server-fixed |" in report
    assert "auc_vs_epsilon.png" in report
    assert (sweep / "centralised" / "model.keras").exists()
    # `fedecay privacy tradeoff` reads this comparison as it is written.
    rows = {r["method"]: r for r in tradeoff_rows([sweep])}
    assert set(rows) == set(methods) - {"centralised"}
    for name, row in rows.items():
        assert row["epsilon"] == methods[name].get("privacy", {}).get("epsilon")
        assert row["auc_gap"] == pytest.approx(
            methods["federated-fedavg"]["decay"]["roc_auc"] - methods[name]["decay"]["roc_auc"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_client_fixed_and_adaptive_clipping_runs(modes_run: Path) -> None:
    from server.checkpoint import latest_checkpoint, load_checkpoint

    fixed = [json.loads(t) for t in
             (modes_run / "client-fixed" / "privacy.jsonl").read_text().splitlines()]
    assert [line["round"] for line in fixed] == [1] and fixed[0]["clipping_norm"] == 0.5
    assert fixed[0]["epsilon"] == pytest.approx(_direct_epsilon(1.0, 1.0, 1, 1e-5), rel=1e-6)
    summary = json.loads((modes_run / "client-fixed" / "federation.json").read_text())
    assert summary["privacy"]["mode"] == "client-fixed"

    adaptive = [json.loads(t) for t in
                (modes_run / "adaptive" / "privacy.jsonl").read_text().splitlines()]
    assert [line["round"] for line in adaptive] == [1, 2]
    # Round 1 clips at the initial norm; the norm then follows the clipped fraction.
    assert adaptive[0]["clipping_norm"] == 0.5 and adaptive[1]["clipping_norm"] != 0.5
    state = load_checkpoint(latest_checkpoint(modes_run / "adaptive" / "checkpoints"))
    assert state["round"] == 2
    assert math.isfinite(state["clipping_norm"]) and state["clipping_norm"] > 0
    assert state["clipping_norm"] != adaptive[1]["clipping_norm"]  # the norm of round 3
