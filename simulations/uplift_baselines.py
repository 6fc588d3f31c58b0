"""The uplift baselines of the comparison: a T-learner and an X-learner on gradient boosting.

Both read the same aggregates as the GBDT and use the GBDT's decay and interest models
(the same fit, reused when the comparison already ran ``gbdt``), so they differ from it
only in the activation scores the policy ranks (``common.uplift_learners``):

- ``t-learner``: one ``HistGradientBoostingClassifier`` per action on the training rows
  logged with it, stopped early on 15 % of those rows (the GBDT's activation is the same
  learner at a fixed 100 trees);
- ``x-learner``: those classifiers, then per non-control action two
  ``HistGradientBoostingRegressor`` s on the imputed effects, combined by the share of
  the action among its rows and the control's.
"""

from __future__ import annotations

import time
from typing import Any

from common.progress import SILENT, Progress
from common.tabular import TabularModel
from simulations.baselines import (
    GBDT_ARGS,
    MethodResult,
    aggregate_inputs,
    fit_gbdt_decay_interest,
    gbdt_features,
    splits,
)
from simulations.experiment import PreparedData
from simulations.settings import Experiment

#: ``compare --methods`` names, in the report's order.
UPLIFT_METHODS: tuple[str, ...] = ("t-learner", "x-learner")


def run_uplift(kind: str, exp: Experiment, data: PreparedData, *,
               progress: Progress = SILENT, base: TabularModel | None = None) -> MethodResult:
    """Fit the ``kind`` learner (``t-learner`` or ``x-learner``) on the training split.

    ``base``: a fitted GBDT whose decay and interest models to reuse; fitted here
    (seeded by ``exp.seed``, as ``run_gbdt`` does) when None. ``progress`` advances per
    model fitted.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    from common.uplift_learners import MIN_ROWS, fit_t_learner, fit_x_learner

    if kind not in UPLIFT_METHODS:
        raise ValueError(f"uplift method {kind!r}: expected one of {', '.join(UPLIFT_METHODS)}")
    started = time.perf_counter()
    train, val_all, test = splits(data)
    x_train = gbdt_features(train)
    args = dict(GBDT_ARGS, random_state=exp.seed)
    actions = list(data.actions)
    stages = len(actions) + (len(actions) - 1 if kind == "x-learner" else 0)
    with progress.task(kind, total=stages + (2 if base is None else 0), unit="models") as task:
        if base is None:
            decay, interest = fit_gbdt_decay_interest(train, x_train, exp.seed)
            task.advance(2, model="decay, interest")
        else:
            decay, interest = base.decay, base.interest
        per_action = fit_t_learner(
            x_train, train.action, train.activation, actions,
            lambda: HistGradientBoostingClassifier(**args),
            done=lambda a: task.advance(1, model=f"P({a})"))
        effects: tuple[dict[str, Any], ...] = ()
        if kind == "x-learner":
            effects = fit_x_learner(
                x_train, train.action, train.activation, per_action,
                lambda: HistGradientBoostingRegressor(**args), names=actions,
                done=lambda a: task.advance(1, model=f"effect of {a}"))
    model = TabularModel(kind, decay, interest, per_action, effects=effects)
    hyper = {"decay and interest": "the GBDT's",
             "activation": {**args, "kind": f"{kind}, one model per group with >= "
                            f"{MIN_ROWS} rows (else its mean)"}}
    return MethodResult(name=kind, val=model.predict(val_all), test=model.predict(test),
                        seconds=time.perf_counter() - started,
                        sample_epochs=float(len(train)),
                        details={"inputs": aggregate_inputs(), "hyperparameters": hyper},
                        model=model)
