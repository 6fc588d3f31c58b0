"""Centralised, local-only and GBDT baselines, and the one assessment all methods share.

Every method returns predictions for the pooled validation and test snapshots of a
``PreparedData``; :func:`assess` turns them into the same metrics for every method.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from common import metrics
from common.policy import choose_actions
from common.progress import SILENT, Progress
from common.snapshots import Snapshots
from common.tabular import TabularModel
from simulations.experiment import PreparedData
from simulations.settings import Experiment
from simulations.tracking import NO_TRACKING, Tracker, epoch_scalars

if TYPE_CHECKING:
    from common.training import FitResult

log = logging.getLogger(__name__)

Predictions = dict[str, np.ndarray]


@dataclasses.dataclass
class MethodResult:
    """Predictions of one method on the shared validation and test snapshots."""

    name: str
    val: Predictions
    test: Predictions
    seconds: float
    sample_epochs: float  # training rows seen, counted over every epoch and merchant
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: The fitted GBDT or LR models (``common.tabular.TabularModel``), to save; else None.
    model: Any = dataclasses.field(default=None, repr=False)


def splits(data: PreparedData) -> tuple[Snapshots, Snapshots, Snapshots]:
    s = data.snapshots
    return s.split_part("train"), s.split_part("val"), s.split_part("test")


def assess(result: MethodResult, data: PreparedData, exp: Experiment) -> dict[str, Any]:
    """Metrics of a method on the held-out test period, thresholds chosen on validation;
    with the generator's truth also ``capture`` and ``budget_curve``
    (:func:`simulations.capture.policy_capture`)."""
    _, val, test = splits(data)
    threshold = metrics.choose_threshold(val.decay, result.val["decay"])
    out: dict[str, Any] = {"method": result.name, "seconds": result.seconds,
                           "sample_epochs": result.sample_epochs, "threshold": threshold}
    out["decay"] = metrics.decay_metrics(test.decay, result.test["decay"], threshold=threshold)
    out["interest"] = metrics.interest_metrics(test.interest, result.test["interest"])
    out["per_merchant_auc"] = {
        m: v["roc_auc"] for m, v in metrics.per_merchant(
            test.merchant_id, metrics.decay_metrics, test.decay, result.test["decay"],
            min_rows=20).items()
    }
    out["merchant_spread"] = metrics.spread(out["per_merchant_auc"])
    logged = test.action >= 0
    if logged.any():
        act = result.test["activation"]
        out["activation"] = metrics.activation_metrics(act, test.action, test.activation,
                                                       data.actions)
        rows = np.flatnonzero(logged)
        decision = choose_actions(result.test["decay"][rows], act[rows], exp.policy,
                                  data.actions, test.fading_category[rows])
        truth = data.truth_matrix(test.subset(rows))
        costs = np.array([exp.policy.cost(a) for a in data.actions])
        out["policy"] = metrics.policy_report(
            decision.action_index, test.action[rows], test.activation[rows],
            test.propensity[rows], truth, data.actions, value=exp.policy.value, costs=costs,
            seed=exp.seed)
        out["policy_support"] = policy_support(test.action[rows], data.actions)
        if truth is not None:  # only a synthetic log knows every action's true value
            from simulations.capture import policy_capture

            out.update(policy_capture(result.test["decay"][rows], act[rows], truth,
                                      exp.policy, data.actions))
        out["policy_mix"] = {a: float(np.mean(decision.action == a)) for a in data.actions}
    return out


def policy_support(logged: np.ndarray, actions: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """What the log can support: rows per logged action and whether it has controls.

    Without ``none`` rows nothing compares an action with doing nothing, so no uplift
    and no policy value can be estimated off-policy from the log.
    """
    counts = {a: int(np.count_nonzero(logged == i)) for i, a in enumerate(actions)}
    return {"logged_rows": int(np.count_nonzero(logged >= 0)), "per_action": counts,
            "has_control": counts.get("none", 0) > 0}


def _train_val(data: PreparedData, merchant: str | None = None) -> tuple[Snapshots, Snapshots]:
    train, val, _ = splits(data)
    if merchant is not None:
        train, val = train.merchant(merchant), val.merchant(merchant)
    return train, val


def run_centralised(exp: Experiment, data: PreparedData, *, epochs: int | None = None,
                    progress: Progress = SILENT, tracker: Tracker = NO_TRACKING,
                    ) -> tuple[MethodResult, Any]:
    """Pool every merchant's training snapshots and train the shared model once.

    Each epoch advances ``progress`` (with the losses) and goes to ``tracker``.
    """
    from common.model import build_model
    from common.training import fit, predict

    started = time.perf_counter()
    train, val = _train_val(data)
    _, val_all, test = splits(data)
    model = build_model(exp.model, data.snapshot_config, seed=exp.seed)
    cfg = dataclasses.replace(exp.train, epochs=epochs or exp.train.epochs)
    with progress.task("centralised", total=cfg.epochs, unit="epochs") as task:
        def on_epoch(epoch: int, row: dict[str, float]) -> None:
            scalars = epoch_scalars(row)
            tracker.log_metrics(epoch, "centralised", **scalars)
            task.advance(1, **{k.replace("/", "_"): v for k, v in scalars.items()})

        res = fit(model, train, val, cfg, seed=exp.seed, on_epoch=on_epoch)
    _check_converged(res, "centralised training", exp)
    result = MethodResult(
        name="centralised", val=predict(model, val_all), test=predict(model, test),
        seconds=time.perf_counter() - started, sample_epochs=float(res.epochs * len(train)),
        details={"epochs": res.epochs, "best_epoch": res.best_epoch, "history": res.history},
    )
    return result, model


def run_local(exp: Experiment, data: PreparedData, *, epochs: int | None = None,
              progress: Progress = SILENT, tracker: Tracker = NO_TRACKING) -> MethodResult:
    """Each merchant trains alone (same initial weights and seed) and predicts its own rows.

    ``progress`` advances per merchant; ``tracker`` gets each epoch's losses averaged
    over the merchants that trained it, weighted by their training rows.
    """
    from common.model import cached_model
    from common.training import fit, predict

    started = time.perf_counter()
    _, val_all, test = splits(data)
    model = cached_model(exp.model, data.snapshot_config, exp.seed)
    initial = model.get_weights()
    cfg = dataclasses.replace(exp.train, epochs=epochs or exp.train.epochs)
    num_actions = len(data.actions)
    val_pred = _empty_predictions(len(val_all), num_actions)
    test_pred = _empty_predictions(len(test), num_actions)
    seen = 0.0
    per_merchant: dict[str, dict[str, float]] = {}
    epoch_rows: list[dict[str, float]] = []  # per epoch: row-weighted loss sums and weights
    with progress.task("local-only", total=len(data.merchants), unit="merchants") as task:
        for merchant in data.merchants:
            train, val = _train_val(data, merchant)
            if len(train) == 0:
                task.advance(1, merchant=merchant)
                continue
            model.set_weights(initial)
            res = fit(model, train, val, cfg, seed=exp.seed)
            _check_converged(res, f"merchant {merchant}'s local training", exp)
            seen += res.epochs * len(train)
            per_merchant[merchant] = {"epochs": res.epochs, "train_rows": len(train)}
            _add_epochs(epoch_rows, res.history, len(train))
            for snaps, pred in ((val_all, val_pred), (test, test_pred)):
                rows = snaps.merchant_id == merchant
                if rows.any():
                    out = predict(model, snaps.subset(rows))
                    for k, v in out.items():
                        pred[k][rows] = v
            task.advance(1, merchant=merchant, epochs=res.epochs, loss=res.train_loss)
    for epoch, sums in enumerate(epoch_rows, start=1):
        tracker.log_metrics(epoch, "local-only", **epoch_scalars({
            "loss": sums["loss"] / sums["rows"],
            "val_loss": sums["val_loss"] / sums["val_rows"] if sums["val_rows"] else np.nan}))
    return MethodResult(name="local-only", val=val_pred, test=test_pred,
                        seconds=time.perf_counter() - started, sample_epochs=seen,
                        details={"merchants": per_merchant})


def _check_converged(res: FitResult, what: str, exp: Experiment) -> None:
    """Refuse a training run that diverged: its non-finite weights would score every row
    NaN, and the comparison would go on with them."""
    bad = [i for i, w in enumerate(res.weights) if not np.all(np.isfinite(w))]
    if bad or not np.isfinite(res.train_loss):
        raise ValueError(
            f"{what} diverged (training loss {res.train_loss:.4g} after {res.epochs} "
            f"epochs{', weights not finite' if bad else ''}): lower model.learning-rate "
            f"(now {exp.model.learning_rate:g})")


def _add_epochs(sums: list[dict[str, float]], history: list[dict[str, float]],
                rows: int) -> None:
    """Add one merchant's per-epoch losses, weighted by its training rows, to ``sums``."""
    for i, row in enumerate(history):
        if i == len(sums):
            sums.append({"loss": 0.0, "rows": 0.0, "val_loss": 0.0, "val_rows": 0.0})
        sums[i]["loss"] += row["loss"] * rows
        sums[i]["rows"] += rows
        if np.isfinite(row.get("val_loss", np.nan)):
            sums[i]["val_loss"] += row["val_loss"] * rows
            sums[i]["val_rows"] += rows


def _empty_predictions(n: int, num_actions: int) -> Predictions:
    # Rows of a merchant that could not train keep the uninformative 0.5.
    return {"decay": np.full(n, 0.5, np.float32), "interest": np.zeros(n, np.float32),
            "activation": np.full((n, num_actions), 0.5, np.float32)}


def gbdt_features(snaps: Snapshots) -> np.ndarray:
    """Aggregate features of the non-neural baselines (GBDT, LR): :func:`aggregate_names`
    (``common.tabular.aggregate_features``, which the scorer reads too)."""
    from common.tabular import aggregate_features

    return aggregate_features(snaps)


def aggregate_names() -> list[str]:
    """Names of the columns of :func:`gbdt_features`, in order."""
    from common.features import AGGREGATE_FEATURES

    return list(AGGREGATE_FEATURES)


def _per_action(train: Snapshots, x_train: np.ndarray, actions: list[str],
                make: Callable[[], Any], done: Callable[[str], None]) -> list[Any]:
    """T-learner for activation (``common.uplift_learners.fit_t_learner``): one classifier
    per action on the rows logged with it; ``done`` is called with each action."""
    from common.uplift_learners import fit_t_learner

    return list(fit_t_learner(x_train, train.action, train.activation, actions, make,
                              done=done))


#: The GBDT's decay and interest models (the T- and X-learner methods share them).
GBDT_ARGS: dict[str, Any] = {"max_iter": 200, "learning_rate": 0.05, "early_stopping": True,
                             "validation_fraction": 0.15}


def fit_gbdt_decay_interest(train: Snapshots, x_train: np.ndarray, seed: int) -> tuple[Any, Any]:
    """The GBDT's decay classifier and interest regressor on the training aggregates."""
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    args = dict(GBDT_ARGS, random_state=seed)
    decay = HistGradientBoostingClassifier(**args).fit(x_train, train.decay)
    interest = HistGradientBoostingRegressor(**args).fit(x_train, train.interest)
    return decay, interest


def run_gbdt(exp: Experiment, data: PreparedData, *, progress: Progress = SILENT
             ) -> MethodResult:
    """Gradient-boosted trees on aggregate features, pooled like the centralised model.

    Decay: ``HistGradientBoostingClassifier``. Interest: ``HistGradientBoostingRegressor``.
    Activation: a T-learner, one classifier per action on the rows logged with it.
    ``progress`` advances per model fitted.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier

    started = time.perf_counter()
    train, val_all, test = splits(data)
    x_train = gbdt_features(train)
    common_args = dict(GBDT_ARGS, random_state=exp.seed)
    action_args = dict(common_args, max_iter=100, early_stopping=False)
    with progress.task("gbdt", total=2 + len(data.actions), unit="models") as task:
        decay, interest = fit_gbdt_decay_interest(train, x_train, exp.seed)
        task.advance(2, model="decay, interest", trees=int(decay.n_iter_))
        per_action = _per_action(train, x_train, list(data.actions),
                                 lambda: HistGradientBoostingClassifier(**action_args),
                                 lambda a: task.advance(1, model=a))


    hyper = {"decay": {**common_args, "iterations_used": int(decay.n_iter_),
                       "stopped_early": bool(decay.n_iter_ < common_args["max_iter"])},
             "interest": {**common_args, "iterations_used": int(interest.n_iter_)},
             "activation": {**action_args, "kind": "T-learner, one model per action "
                            "with >= 30 logged rows"}}
    model = TabularModel("gbdt", decay, interest, tuple(per_action))
    return MethodResult(name="gbdt", val=model.predict(val_all), test=model.predict(test),
                        seconds=time.perf_counter() - started,
                        sample_epochs=float(decay.n_iter_ * len(train)),
                        details={"trees": int(decay.n_iter_),
                                 "inputs": aggregate_inputs(), "hyperparameters": hyper},
                        model=model)


def run_lr(exp: Experiment, data: PreparedData, *, progress: Progress = SILENT
           ) -> MethodResult:
    """Standardised linear models on the same aggregates as the GBDT, pooled.

    Decay: ``StandardScaler`` + ``LogisticRegression`` (L2, C = 1). Interest: the same
    scaler + ``Ridge`` (alpha = 1). Activation: the GBDT's T-learner with logistic
    regressions. Seeded through ``random_state`` (lbfgs itself is deterministic).
    """
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    started = time.perf_counter()
    train, val_all, test = splits(data)
    x_train = gbdt_features(train)
    lr_args = {"C": 1.0, "solver": "lbfgs", "max_iter": 1000,
               "random_state": exp.seed}

    def classifier() -> Any:
        return make_pipeline(StandardScaler(), LogisticRegression(**lr_args))

    with progress.task("lr", total=2 + len(data.actions), unit="models") as task:
        decay = classifier().fit(x_train, train.decay)
        task.advance(1, model="decay")
        interest = make_pipeline(StandardScaler(), Ridge(alpha=1.0)).fit(x_train, train.interest)
        task.advance(1, model="interest")
        per_action = _per_action(train, x_train, list(data.actions), classifier,
                                 lambda a: task.advance(1, model=a))


    iterations = int(np.max(decay[-1].n_iter_))
    hyper = {"decay": {"scaler": "StandardScaler", **lr_args, "iterations_used": iterations},
             "interest": {"scaler": "StandardScaler", "model": "Ridge", "alpha": 1.0},
             "activation": {"scaler": "StandardScaler", **lr_args,
                            "kind": "T-learner, one model per action with >= 30 logged rows"}}
    model = TabularModel("lr", decay, interest, tuple(per_action))
    return MethodResult(name="lr", val=model.predict(val_all), test=model.predict(test),
                        seconds=time.perf_counter() - started,
                        sample_epochs=float(iterations * len(train)),
                        details={"inputs": aggregate_inputs(), "hyperparameters": hyper},
                        model=model)


def aggregate_inputs() -> dict[str, Any]:
    """What GBDT and LR read: one row of aggregates per snapshot."""
    return {"kind": "aggregates at the cutoff", "features": aggregate_names()}


def neural_inputs(exp: Experiment, data: PreparedData) -> dict[str, Any]:
    """What the LSTM reads: the sequence spec and its static aggregates."""
    from common.features import AGGREGATE_FEATURES, NUMERIC_FEATURES
    from common.model import static_width

    cfg = data.snapshot_config
    return {"kind": "event sequence + aggregates",
            "sequence": {"max_len": cfg.max_len,
                         "per_event": ["event type (embedding)",
                                       f"category hashed into {cfg.hash_buckets} buckets "
                                       "(embedding)", *NUMERIC_FEATURES]},
            "static": list(AGGREGATE_FEATURES[:static_width(exp.model)])}


def neural_hyperparameters(exp: Experiment) -> dict[str, Any]:
    """The model's and the fit function's settings (the federation's are in results)."""
    return {"model": dataclasses.asdict(exp.model), "train": dataclasses.asdict(exp.train)}
