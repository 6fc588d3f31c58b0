"""T- and X-learner on gradient boosting: they find a planted uplift, save without pickle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skops.io as sio

from common.features import AGGREGATE_FEATURES
from common.tabular import TabularModel, load_tabular, save_tabular
from common.uplift_learners import (
    fit_t_learner,
    fit_x_learner,
    predict_t_learner,
    predict_x_learner,
)

ACTIONS = ("none", "recommend", "coupon")
WIDTH = len(AGGREGATE_FEATURES)


def _planted(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A randomised log: P(none) depends on x0 only; recommend adds 0.35 where x1 > 0.5
    and nothing elsewhere, coupon adds a flat 0.05. Returns x, action, outcome, truth."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, WIDTH)).astype(np.float32)
    base = 0.15 + 0.3 / (1 + np.exp(-x[:, 0]))
    truth = np.column_stack([base, base + 0.35 * (x[:, 1] > 0.5), base + 0.05])
    action = rng.integers(0, len(ACTIONS), n)
    outcome = (rng.random(n) < truth[np.arange(n), action]).astype(np.float32)
    return x, action, outcome, truth


def _learners(seed: int = 0) -> dict[str, tuple[tuple, tuple]]:
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    args = {"max_iter": 100, "learning_rate": 0.05, "early_stopping": True,
            "validation_fraction": 0.15, "random_state": seed}
    x, action, outcome, _ = _planted(6000, seed)
    per_action = fit_t_learner(x, action, outcome, ACTIONS,
                               lambda: HistGradientBoostingClassifier(**args))
    effects = fit_x_learner(x, action, outcome, per_action,
                            lambda: HistGradientBoostingRegressor(**args))
    return {"t": (per_action, ()), "x": (per_action, effects)}


@pytest.fixture(scope="module")
def learners() -> dict[str, tuple[tuple, tuple]]:
    return _learners()


def _scores(fitted: tuple[tuple, tuple], x: np.ndarray) -> np.ndarray:
    per_action, effects = fitted
    return predict_x_learner(per_action, effects, x) if effects else \
        predict_t_learner(per_action, x)


@pytest.mark.parametrize("kind", ["t", "x"])
def test_top_decile_finds_the_planted_uplift(learners: dict, kind: str) -> None:
    x, _, _, truth = _planted(4000, seed=1)  # fresh rows
    scores = _scores(learners[kind], x)
    assert scores.shape == (len(x), len(ACTIONS))
    uplift = scores[:, 1] - scores[:, 0]
    top = np.argsort(-uplift)[: len(x) // 10]
    true_uplift = truth[:, 1] - truth[:, 0]
    # random targeting gets the mean true uplift (~0.35 * 0.31 = 0.11); the planted
    # subgroup has 0.35: the learner's top decile must be mostly inside it
    assert true_uplift[top].mean() > 0.3 > 2 * true_uplift.mean()
    # and recommend's uplift is ranked above coupon's flat 0.05 inside the subgroup
    inside = x[:, 1] > 0.8
    assert np.mean(uplift[inside] > scores[inside, 2] - scores[inside, 0]) > 0.8


def test_constant_groups_fall_back_to_their_mean() -> None:
    x = np.zeros((40, WIDTH), np.float32)
    action = np.r_[np.zeros(20, int), np.ones(5, int), np.full(15, -1)]
    outcome = np.r_[np.ones(10), np.zeros(10), np.ones(5), np.zeros(15)].astype(np.float32)
    per_action = fit_t_learner(x, action, outcome, ACTIONS, lambda: None)
    assert per_action == pytest.approx((0.5, 1.0, 0.6))  # coupon: no row -> overall rate
    effects = fit_x_learner(x, action, outcome, per_action, lambda: None)
    assert effects[0] == pytest.approx({"treated": 0.5, "control": 0.5, "weight": 0.2})
    # coupon was never logged: weight 0 puts everything on its treated rows' (no) effect
    assert effects[1]["weight"] == 0.0 and effects[1]["treated"] == 0.0
    np.testing.assert_allclose(predict_x_learner(per_action, effects, x[:2]),
                               [[0.5, 1.0, 0.5]] * 2)
    with pytest.raises(ValueError, match="effects"):
        predict_x_learner(per_action, effects[:1], x[:2])


@pytest.mark.parametrize("positives", [1, 2])
def test_an_outcome_seen_once_gets_its_rate_not_a_crash(positives: int) -> None:
    from sklearn.ensemble import HistGradientBoostingClassifier

    from simulations.baselines import GBDT_ARGS

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, WIDTH)).astype(np.float32)
    action = np.zeros(40, int)
    outcome = np.r_[np.ones(positives), np.zeros(40 - positives)].astype(np.float32)
    per_action = fit_t_learner(x, action, outcome, ACTIONS[:1],
                               lambda: HistGradientBoostingClassifier(**GBDT_ARGS))
    # The early-stopping classifier cannot split a class of one: the rate stands in.
    assert isinstance(per_action[0], float) == (positives == 1)
    assert predict_t_learner(per_action, x).shape == (40, 1)


def _model(fitted: tuple[tuple, tuple], kind: str) -> TabularModel:
    from sklearn.linear_model import LinearRegression, LogisticRegression

    x, _, outcome, _ = _planted(200, 3)
    return TabularModel(kind, LogisticRegression().fit(x, outcome),
                        LinearRegression().fit(x, x[:, 2]), fitted[0], effects=fitted[1])


class _Rows:
    def __init__(self, static: np.ndarray) -> None:
        self.static = static


def test_x_learner_file_predicts_as_in_memory(learners: dict, tmp_path: Path) -> None:
    model = _model(learners["x"], "x-learner")
    loaded = load_tabular(save_tabular(model, tmp_path / "model.skops"))
    x = _planted(100, 5)[0]
    np.testing.assert_array_equal(model.predict(_Rows(x))["activation"],
                                  loaded.predict(_Rows(x))["activation"])
    assert loaded.kind == "x-learner" and len(loaded.effects) == len(ACTIONS) - 1


def test_bad_effects_are_refused(learners: dict, tmp_path: Path) -> None:
    model = _model(learners["x"], "x-learner")
    path = save_tabular(model, tmp_path / "model.skops")
    payload = sio.load(path, trusted=sio.get_untrusted_types(file=path))
    payload["effects"] = payload["effects"][:1]
    sio.dump(payload, tmp_path / "short.skops")
    with pytest.raises(ValueError, match="short.skops: 1 X-learner effects"):
        load_tabular(tmp_path / "short.skops")
    payload["kind"] = "gbdt"
    sio.dump(payload, tmp_path / "gbdt.skops")
    with pytest.raises(ValueError, match="gbdt model with X-learner effects"):
        load_tabular(tmp_path / "gbdt.skops")


@pytest.mark.parametrize("missing", [0, 1])
def test_an_action_never_logged_still_fits_and_scores(missing: int) -> None:
    """A real log may lack the control (no row logged with ``none``) or an action: both
    learners still fit (that group gets the overall rate) and score every row."""
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    x, action, outcome, _ = _planted(600, 3)
    keep = action != missing
    x, action, outcome = x[keep], action[keep], outcome[keep]
    per_action = fit_t_learner(x, action, outcome, ACTIONS,
                               lambda: HistGradientBoostingClassifier(max_iter=20))
    assert per_action[missing] == pytest.approx(float(outcome.mean()))
    effects = fit_x_learner(x, action, outcome, per_action,
                            lambda: HistGradientBoostingRegressor(max_iter=20))
    scores = predict_x_learner(per_action, effects, x[:50])
    assert scores.shape == (50, len(ACTIONS)) and np.isfinite(scores).all()
    assert predict_t_learner(per_action, x[:0]).shape == (0, len(ACTIONS))
