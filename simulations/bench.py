"""``fedecay bench``: throughput figures measured side by side in one run.

Figures, not pass/fail: timed tests flake on a shared machine, so speed targets are
read from this command's output.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np

from simulations.settings import Experiment

#: Seconds between samples of the federation's memory. Reading a process's PSS makes the
#: kernel walk its page tables: every second, the bench's own tree took about a fifth
#: of a core from the rounds it timed (docs/performance.md).
MEMORY_EVERY_S = 5.0


def _best(fn, repeat: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _timed(fn) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def run_bench(exp: Experiment, repeat: int = 3) -> dict[str, Any]:
    """Generation, snapshot building, centralised training and batch scoring throughput."""
    from client.scoring import REASON_POINTS, score_events, warm_up
    from common.model import build_model
    from common.reasons.ig import SCORE_IG_STEPS, warm_up_ig
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
    seconds, _ = _best(lambda: fit(model, train, None, one, seed=exp.seed), min(repeat, 2))
    figures["centralised_samples_per_s"] = len(train) / seconds
    # Batch scoring as `fedecay score` does it: every user active at the end of the log,
    # features from the raw events, the three heads and the policy; reasons for nobody,
    # for the users the policy targets (the default) and for every user at risk.
    warm_up(model)
    warm_up_ig(model)  # the reasons' first call would compile it
    plain, scores = _best(lambda: score_events(model, fed.events, None, cfg, exp.policy,
                                               reasons="none"), repeat)
    n = len(scores)
    figures["scored_users"] = n
    figures["scoring_users_per_s_without_reasons"] = n / plain
    # The default explains the users the policy targets; its rate is the new default's.
    for mode, name, rate in (("targeted", "targeted", "scoring_users_per_s"),
                             ("at-risk", "at_risk", "scoring_users_per_s_reasons_at_risk")):
        runs = [_timed(lambda m=mode: score_events(model, fed.events, None, cfg, exp.policy,
                                                   reasons=m)) for _ in range(repeat)]
        explained = runs[-1][1].attrs["explained"]
        why = min(r[1].attrs["explain_seconds"] for r in runs)
        figures[rate] = n / min(r[0] for r in runs)
        figures[f"{name}_users"] = explained
        figures[f"{name}_share"] = explained / max(n, 1)
        # Users explained per second of the reasons' own time (None: nobody to explain).
        figures[f"{name}_explained_per_s"] = explained / why if explained else None
    # The same targets with the other quadrature rules (fedecay score --reasons-points).
    for points in (k for k in REASON_POINTS if k != SCORE_IG_STEPS):
        warm_up_ig(model, steps=points)
        why = min(score_events(model, fed.events, None, cfg, exp.policy, reason_points=points)
                  .attrs["explain_seconds"] for _ in range(repeat))
        figures[f"targeted_explained_per_s_{points}_points"] = (
            figures["targeted_users"] / why if figures["targeted_users"] else None)
    test = snaps.split_part("test")
    predict(model, test)
    seconds, _ = _best(lambda: predict(model, test), repeat)
    figures["predict_only_users_per_s"] = len(test) / seconds
    return figures


def format_bench(figures: dict[str, Any]) -> str:
    rows = [(k, f"{v:.1%}" if k.endswith("_share") else
             f"{v:,.0f}" if isinstance(v, (int, float, np.floating)) else
             "-" if v is None else str(v))
            for k, v in figures.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v:>14}" for k, v in rows)


class CollectorClock:
    """Python's garbage collections in this process while in use (``gc.callbacks``):
    how many were full (generation 2) and the seconds all of them took."""

    def __init__(self) -> None:
        self.full = 0
        self.seconds = 0.0
        self._started = 0.0

    def _hook(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        self.seconds += time.perf_counter() - self._started
        self.full += info["generation"] == 2

    def __enter__(self) -> CollectorClock:
        import gc

        gc.callbacks.append(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        import gc

        gc.callbacks.remove(self._hook)


def run_federation_bench(exp: Experiment, merchants: tuple[int, ...] = (10, 100),
                         rounds: int = 4, out_dir=None) -> list[dict[str, Any]]:
    """Federated vs centralised wall time on the same data and sample-epochs.

    For each federation size: the centralised model trains ``rounds`` epochs on the
    pooled training snapshots; the federation runs ``rounds`` rounds of one local epoch
    with every merchant (or the ``federation.fraction-train`` share of them, compared
    with that share of a centralised epoch). Both compute the validation loss once an
    epoch, as in ``fedecay compare``: the centralised model on the pooled validation
    snapshots, each client on its own. Steady-state round time excludes round 1
    (Ray actors start, TensorFlow imports, XLA compiles); the ratio uses steady rounds
    only, and the start-up is reported on its own. Memory is the peak proportional set
    size of this process and every process it started (Ray's actors included;
    :mod:`simulations.memory`, every :data:`MEMORY_EVERY_S` seconds) while the rounds
    run, so other work on the machine does not count. Once the centralised epochs are
    timed and the shards written, the driver lets go of the pooled log, the snapshots
    and the centralised model: the rounds read only the shards and ``eval.npz``
    (:class:`simulations.federated.Staged`).
    ``total_federated_s`` is writing the shards plus the rounds. ``heap_frozen``: whether
    the processes froze their heaps (``client.work.freezes_heap``); ``driver_full_gcs``
    and ``driver_gc_s``: this process's full garbage collections during the rounds and
    the seconds all its collections took.
    """
    import statistics
    import tempfile
    from pathlib import Path

    from client.work import freezes_heap
    from common.model import build_model
    from common.training import fit
    from simulations.experiment import prepare
    from simulations.federated import (
        read_metrics,
        return_freed_memory,
        run_rounds,
        stage_federation,
    )
    from simulations.memory import TreeSampler
    from simulations.settings import experiment_from_flat

    rows = []
    for n in merchants:
        # The centralised epochs it is compared with validate nothing: the server
        # evaluates the global model only before the first round and after the last.
        flat = {**exp.flat, "synthetic.num-merchants": n, "federation.num-rounds": rounds,
                "federation.local-epochs": 1, "federation.fraction-evaluate": 0.0,
                "federation.eval-every": rounds, "data.min-merchant-snapshots": 1}
        e = experiment_from_flat(flat)
        data = prepare(e)
        train = data.snapshots.split_part("train")
        val = data.snapshots.split_part("val")
        model = build_model(e.model, data.snapshot_config, seed=e.seed)
        one = dataclasses.replace(e.train, epochs=1, patience=0)
        fit(model, train, val, one, seed=e.seed)  # compile once, as the clients do
        cen = dataclasses.replace(e.train, epochs=rounds, patience=rounds)
        t = time.perf_counter()
        fit(model, train, val, cen, seed=e.seed)
        centralised = time.perf_counter() - t
        train_rows = len(train)
        del model, train, val  # timed: the rounds need none of the centralised side
        run_dir = Path(out_dir or tempfile.mkdtemp(prefix="fedecay-bench-")) / f"fed-{n}"
        t = time.perf_counter()
        staged = stage_federation(e, data, run_dir)
        del data  # the pooled log and the snapshots: the rounds read the shards
        return_freed_memory()
        with TreeSampler(every=MEMORY_EVERY_S) as memory, CollectorClock() as collector:
            run_rounds(e, staged)
        total = time.perf_counter() - t
        peaks = memory.peaks
        lines = read_metrics(run_dir / "metrics.jsonl")
        per_round = [r["round_seconds"] for r in lines if r["round"] >= 1]
        steady = per_round[1:] or per_round
        steady_round = statistics.median(steady)
        fit_mean = statistics.median([r.get("train", {}).get("fit_seconds", 0.0)
                                      for r in lines if r["round"] >= 2] or [0.0])
        cpus = e.simulation.ray_cpus or os.cpu_count() or 1
        # With federation.fraction-train < 1 a round trains the sampled merchants only:
        # its centralised counterpart is that share of an epoch.
        sampled = statistics.median([r["sampled"] for r in lines if r.get("sampled")]
                                    or [staged.merchants])
        share = sampled / staged.merchants
        overhead = max(steady_round * cpus / sampled - fit_mean, 0.0)
        rows.append({
            "merchants": staged.merchants,
            "sampled_per_round": int(sampled),
            "train_snapshots": train_rows,
            "centralised_s_per_epoch": centralised / rounds,
            "federated_steady_round_s": steady_round,
            "centralised_samples_per_s": train_rows * rounds / centralised,
            "federated_samples_per_s": share * train_rows / steady_round,
            "federated_over_centralised": steady_round / (share * centralised / rounds),
            "first_round_s": per_round[0] if per_round else float("nan"),
            "startup_s": lines[0]["round_seconds"] if lines else float("nan"),
            "total_federated_s": total,
            "client_fit_s_median": fit_mean,
            "per_client_overhead_ms": overhead * 1000,
            "peak_memory_mb": peaks.total / 2**20,
            "peak_driver_mb": peaks.driver / 2**20,
            "peak_actor_mb": peaks.actor / 2**20,
            "actors": peaks.actors,
            "heap_frozen": freezes_heap(),
            "driver_full_gcs": collector.full,
            "driver_gc_s": collector.seconds,
        })
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    widths = [max(len(k), 10) for k in keys]
    head = "  ".join(k.rjust(w) for k, w in zip(keys, widths, strict=True))
    body = ["  ".join((f"{r[k]:,.2f}" if isinstance(r[k], float) else str(r[k])).rjust(w)
                      for k, w in zip(keys, widths, strict=True)) for r in rows]
    return "\n".join([head, *body])
