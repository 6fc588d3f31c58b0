"""``fedecay bench``: throughput figures measured side by side in one run.

Figures, not pass/fail: timed tests flake on a shared machine, so speed targets are
read from this command's output.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from simulations.experiment import Experiment


def _best(fn, repeat: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def run_bench(exp: Experiment, repeat: int = 3) -> dict[str, Any]:
    """Generation, snapshot building, centralised training and batch scoring throughput."""
    from common.model import build_model
    from common.snapshots import build_snapshots
    from common.training import fit, predict
    from simulations.experiment import shared_calendar
    from simulations.synth import generate_federation

    if exp.synthetic is None:
        raise ValueError("fedecay bench needs a synthetic preset")
    figures: dict[str, Any] = {"preset": exp.experiment.name}
    seconds, fed = _best(lambda: generate_federation(exp.synthetic, seed=exp.seed), repeat)
    n_events = len(fed.events)
    figures["generation_events_per_s"] = n_events / seconds
    figures["events"] = n_events
    cfg = shared_calendar(fed.events, exp.snapshots)
    seconds, built = _best(lambda: build_snapshots(fed.events, cfg, fed.interventions), repeat)
    snaps, _ = built
    figures["snapshot_events_per_s"] = n_events / seconds
    figures["snapshots"] = len(snaps)
    train = snaps.split_part("train")
    model = build_model(exp.model, cfg, seed=exp.seed)
    one = dataclasses.replace(exp.train, epochs=1, patience=0)
    fit(model, train, None, one, seed=exp.seed)  # compile once, as a long run would
    seconds, _ = _best(lambda: fit(model, train, None, one, seed=exp.seed), 2)
    figures["centralised_samples_per_s"] = len(train) / seconds
    test = snaps.split_part("test")
    predict(model, test)
    seconds, _ = _best(lambda: predict(model, test), repeat)
    figures["scoring_users_per_s"] = len(test) / seconds
    figures["scored_users"] = len(test)
    return figures


def format_bench(figures: dict[str, Any]) -> str:
    rows = [(k, f"{v:,.0f}" if isinstance(v, (int, float, np.floating)) else str(v))
            for k, v in figures.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v:>14}" for k, v in rows)
