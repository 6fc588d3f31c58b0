"""The non-neural baselines (GBDT, LR) on a tiny synthetic federation, and the lead."""

from __future__ import annotations

import numpy as np
import pytest

from simulations.baselines import aggregate_names, assess, run_gbdt, run_lr
from simulations.compare import neural_lead
from simulations.experiment import PreparedData, prepare
from simulations.methods import METHODS
from simulations.settings import Experiment, resolve


@pytest.fixture(scope="module")
def tiny() -> tuple[Experiment, PreparedData]:
    exp = resolve("quick", overrides=["synthetic.num-merchants=3"])
    return exp, prepare(exp)


def test_lr_beats_a_trivial_baseline_and_is_seeded(tiny: tuple[Experiment, PreparedData]
                                                   ) -> None:
    exp, data = tiny
    first, again = run_lr(exp, data), run_lr(exp, data)
    for key in ("decay", "interest", "activation"):
        np.testing.assert_array_equal(first.test[key], again.test[key])
    found = assess(first, data, exp)
    # A constant score has AUC 0.5; the aggregates (recency, interest) carry the decay.
    assert found["decay"]["roc_auc"] > 0.6
    test = data.snapshots.split_part("test")
    constant_mae = float(np.mean(np.abs(test.interest - np.mean(test.interest))))
    assert found["interest"]["mae"] < constant_mae
    assert first.test["activation"].shape == (len(test), len(data.actions))
    assert first.details["inputs"]["features"] == aggregate_names()
    assert first.details["hyperparameters"]["decay"]["random_state"] == exp.seed


def test_gbdt_reports_its_early_stopping(tiny: tuple[Experiment, PreparedData]) -> None:
    exp, data = tiny
    hyper = run_gbdt(exp, data).details["hyperparameters"]["decay"]
    assert hyper["early_stopping"] is True and hyper["max_iter"] == 200
    assert 1 <= hyper["iterations_used"] <= 200
    assert hyper["stopped_early"] == (hyper["iterations_used"] < 200)


def test_neural_lead_is_best_neural_minus_best_non_neural() -> None:
    methods = {"gbdt": {"decay": {"roc_auc": 0.70}}, "lr": {"decay": {"roc_auc": 0.72}},
               "centralised": {"decay": {"roc_auc": 0.75}},
               "federated-fedavg": {"decay": {"roc_auc": 0.76}},
               "local-only": {"decay": {"roc_auc": float("nan")}}}
    lead = neural_lead(methods)
    assert lead["best_neural"] == "federated-fedavg" and lead["best_non_neural"] == "lr"
    assert lead["difference"] == pytest.approx(0.04)
    assert neural_lead({"gbdt": methods["gbdt"]}) == {}


def test_the_cli_checks_methods_against_the_one_list() -> None:
    from simulations.cli import checks

    assert checks.METHODS is METHODS and "lr" in METHODS
    assert checks.names("lr,gbdt", checks.METHODS, "--methods") == ("lr", "gbdt")


def test_a_diverged_training_run_is_an_error() -> None:
    from common.config import ModelConfig
    from common.training import FitResult
    from simulations.baselines import _check_converged

    exp = resolve("quick")
    weights = [np.zeros((2, 2), np.float32), np.ones(3, np.float32)]

    def result(loss: float, ws: list[np.ndarray]) -> FitResult:
        return FitResult(epochs=3, examples=10, train_loss=loss, val_loss=loss, best_epoch=3,
                         seconds=0.1, history=[], weights=ws)

    _check_converged(result(0.7, weights), "centralised training", exp)  # fine: no error
    with pytest.raises(ValueError, match=r"^centralised training diverged \(training loss nan "
                       r"after 3 epochs\): lower model.learning-rate \(now 0.003\)"):
        _check_converged(result(float("nan"), weights), "centralised training", exp)
    broken = [weights[0], np.array([1.0, np.inf, 0.0], np.float32)]
    with pytest.raises(ValueError, match=r"merchant m1's local training diverged .*weights not "
                       "finite"):
        _check_converged(result(0.7, broken), "merchant m1's local training", exp)
    with pytest.raises(ValueError, match=r"'model.learning-rate': must be in \(0, 1\]"):
        ModelConfig(learning_rate=1e6)
