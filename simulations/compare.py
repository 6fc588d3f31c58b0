"""Federated, centralised and local-only LSTM vs GBDT and LR on the same snapshots and budget.

Writes ``results.json``, ``report.md``, ``report.html`` and PNG plots to the run folder
(:mod:`simulations.report`), tracks every method (:mod:`simulations.tracking`) and
returns the table the CLI prints.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from common.progress import SILENT, Progress
from simulations.attributions import attributions_of
from simulations.baselines import (
    MethodResult,
    assess,
    neural_hyperparameters,
    neural_inputs,
    run_centralised,
    run_gbdt,
    run_local,
    run_lr,
)
from simulations.experiment import PreparedData, prepare, write_json
from simulations.fairness import fairness_of
from simulations.methods import AGGREGATE_METHODS, DP_UNITS, METHODS
from simulations.report import format_table, write_report
from simulations.settings import Experiment
from simulations.tracking import Tracker, final_scalars, open_tracking
from simulations.uplift_baselines import UPLIFT_METHODS, run_uplift

log = logging.getLogger(__name__)



@dataclasses.dataclass
class Comparison:
    run_dir: Path
    results: dict[str, Any]
    table: str


def budget_epochs(exp: Experiment) -> int:
    """Epochs every neural method may use: rounds x local epochs of the federation."""
    return exp.federation.num_rounds * exp.federation.local_epochs


def run_comparison(exp: Experiment, run_dir: Path, *, strategies: tuple[str, ...] = ("fedavg",),
                   methods: tuple[str, ...] = METHODS,
                   noise: tuple[float, ...] = (), dp_units: tuple[str, ...] = (),
                   audit: bool = False, progress: Progress = SILENT) -> Comparison:
    """Run every method on one ``PreparedData`` and write the report.

    ``noise``: noise multipliers to sweep, one federated run per strategy and value (0 =
    without differential privacy; otherwise ``privacy.mode``, ``server-fixed`` if off;
    customer-level DP with ``privacy.unit = customer``). ``dp_units``: instead, one
    federated run per unit/placement of :data:`DP_UNITS` and non-zero multiplier (z = 0
    once), so one comparison holds the whole utility-against-privacy table.
    ``audit``: run the membership-inference audit on every federated model and the
    centralised one (always on with a sweep). ``progress`` shows every long step;
    ``experiment.tracking`` decides where the metrics go besides ``results.json``.
    """
    variants = _privacy_variants(exp, noise, dp_units)  # bad values fail now
    started = time.perf_counter()
    write_json(run_dir / "config.json", dict(exp.flat))
    with open_tracking(run_dir, exp.experiment.tracking, exp.resolved(),
                       experiment=exp.experiment.name) as tracker:
        data = prepare(exp, progress=progress)
        outcomes = _run_methods(exp, data, run_dir, methods, strategies, variants, progress,
                                tracker)
        audits = _membership_audits(outcomes, data, progress) if audit else {}
        results = _results(exp, data, outcomes, time.perf_counter() - started)
        results["fairness"] = fairness_of(outcomes, data, exp)
        results["attributions"] = attributions_of(outcomes, data, exp, progress)
        for name, found in audits.items():
            results["methods"][name]["membership"] = found
        write_json(run_dir / "results.json", results)
        written = write_report(results, run_dir, exp.resolved())
        for outcome in outcomes:
            tracker.log_metrics(final_step(outcome), outcome.name,
                                **final_scalars(results["methods"][outcome.name]))
        track_artifacts(tracker, run_dir, [run_dir / "results.json", *written])
    return Comparison(run_dir=run_dir, results=results, table=format_table(results))


def run_seeds(exp: Experiment, run_dir: Path, seeds: tuple[int, ...],
              **options: Any) -> Comparison:
    """:func:`run_comparison` once per seed (``experiment.seed``: the data, splits and
    every model), each in ``run_dir/seed-<s>``, then capture and net value per method
    over the seeds (mean, sample sd, each seed's) in ``seeds.json`` and ``seeds.md``.
    ``options`` go to every :func:`run_comparison`."""
    from common import atomic
    from simulations.capture import seed_blocks, seed_summary
    from simulations.render import Heading, Paragraph, to_markdown

    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"--seeds {','.join(map(str, seeds))}: expected distinct seeds")
    per_seed = {}
    tables = []
    for seed in seeds:
        folder = run_dir / f"seed-{seed}"
        folder.mkdir(parents=True)
        out = run_comparison(_with(exp, {"experiment.seed": seed}), folder, **options)
        per_seed[seed] = out.results
        tables.append(f"seed {seed}\n{out.table}")
    summary = seed_summary(per_seed)
    write_json(run_dir / "seeds.json", {"seeds": list(seeds), "methods": summary})
    blocks = [Heading(f"fedecay comparison over seeds {', '.join(map(str, seeds))}", 1),
              Paragraph("Each seed's report is in seed-<s>/report.md."), *seed_blocks(summary)]
    if not summary:
        blocks.append(Paragraph("No capture: no method has the generator's true values."))
    atomic.write_text(run_dir / "seeds.md", to_markdown(blocks))
    return Comparison(run_dir=run_dir, results={"seeds": summary, "per_seed": per_seed},
                      table="\n\n".join([*tables, format_seed_table(summary)]))


def format_seed_table(summary: dict[str, Any]) -> str:
    """Capture per method over seeds as aligned text ("" without capture)."""
    if not summary:
        return ""
    rows = [["method", "seeds", "capture mean", "sd", "net value mean", "sd"]]
    rows += [[n, str(v["seeds"]), f"{v['capture_mean']:.3f}", f"{v['capture_std']:.3f}",
              f"{v['value_mean']:.3f}", f"{v['value_std']:.3f}"] for n, v in summary.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                     for r in rows)


def _run_methods(exp: Experiment, data: PreparedData, run_dir: Path, methods: tuple[str, ...],
                 strategies: tuple[str, ...], variants: list[tuple[str, dict[str, Any]]],
                 progress: Progress, tracker: Tracker) -> list[MethodResult]:
    """Every method asked for, in the report's order, on the same data and budget."""
    epochs = budget_epochs(exp)
    outcomes: list[MethodResult] = []
    from common.bundle import save_tabular_bundle

    for name, run in (("gbdt", run_gbdt), ("lr", run_lr)):
        if name in methods:
            outcome = run(exp, data, progress=progress)
            save_tabular_bundle(outcome.model, data.snapshot_config, exp.policy,
                                run_dir / name)
            outcomes.append(outcome)
    gbdt = next((o.model for o in outcomes if o.name == "gbdt"), None)
    for name in (m for m in UPLIFT_METHODS if m in methods):
        outcome = run_uplift(name, exp, data, progress=progress, base=gbdt)
        save_tabular_bundle(outcome.model, data.snapshot_config, exp.policy, run_dir / name)
        outcomes.append(outcome)
    if "centralised" in methods:
        result, model = run_centralised(exp, data, epochs=epochs, progress=progress,
                                        tracker=tracker)
        outcomes.append(result)
        from common.bundle import save_model_bundle

        path = save_model_bundle(model, data.snapshot_config, exp.policy,
                                 run_dir / "centralised" / "model.keras")
        result.details["run_dir"] = str(path.parent)
    if "local" in methods:
        outcomes.append(run_local(exp, data, epochs=epochs, progress=progress, tracker=tracker))
    if "federated" in methods:
        from simulations.federated import run_federated

        for strategy in strategies:
            for suffix, changes in variants:
                # The report shows the merchants' global attributions: one more evaluate
                # message per merchant after the last round, unless the user said no.
                fexp = _with(exp, {"federation.strategy": strategy,
                                   "federation.attributions": exp.flat.get(
                                       "federation.attributions", True), **changes})
                name = f"federated-{strategy}{suffix}"
                outcomes.append(run_federated(fexp, data, run_dir / name, progress=progress,
                                              tracker=tracker, name=name))
    return outcomes


def final_step(outcome: MethodResult) -> int:
    """The step a method's final metrics go to: its last round or epoch (0 for GBDT)."""
    details = outcome.details
    if details.get("rounds"):
        return int(details["rounds"][-1]["round"])
    if "merchants" in details:  # local-only: the longest a merchant trained
        return max((int(m["epochs"]) for m in details["merchants"].values()), default=0)
    return int(details.get("epochs", 0))


#: The model files of a method's folder that trackers keep as artifacts.
MODEL_FILES = ("model.keras", "model.skops", "model.json")


def track_artifacts(tracker: Tracker, run_dir: Path, files: list[Path], *,
                    top: str = "model") -> None:
    """``config.json``, ``files`` (the report's under ``report/``) and every model in
    ``run_dir`` and its method folders, under ``models/<method>`` (``top`` names a
    model saved in ``run_dir`` itself)."""
    for path in [run_dir / "config.json", *files]:
        if path.exists():
            tracker.log_artifact(path, "report" if path.suffix in (".md", ".html", ".png")
                                 else "")
    for name in MODEL_FILES:
        for path in sorted(run_dir.glob(name)) + sorted(run_dir.glob(f"*/{name}")):
            method = path.parent.name if path.parent != run_dir else top
            tracker.log_artifact(path, f"models/{method}")


def _privacy_variants(exp: Experiment, noise: tuple[float, ...],
                      units: tuple[str, ...] = ()) -> list[tuple[str, dict[str, Any]]]:
    """(name suffix, config changes) of every federated run: one per noise multiplier
    (per unit too with ``units``, keys of :data:`DP_UNITS`; z = 0 is one run without DP).
    Every variant's configuration is checked here, before any training."""
    if not noise:
        if units:
            raise ValueError("--dp-units needs --noise (the multipliers to sweep)")
        return [("", {})]
    for z in noise:
        if z < 0 or not np.isfinite(z):
            raise ValueError(f"--noise {z}: noise multipliers must be finite and >= 0")
    mode = exp.privacy.mode if exp.privacy.enabled else "server-fixed"
    if units:
        unknown = [u for u in units if u not in DP_UNITS]
        if unknown:
            raise ValueError(f"--dp-units: unknown {unknown[0]!r}; choose from "
                             f"{', '.join(DP_UNITS)}")
        sweeps = [(DP_UNITS[u][0], {"privacy.mode": mode, **DP_UNITS[u][1]}) for u in units]
        dp_off = {"privacy.unit": "merchant", "privacy.mode": "off"}
    elif exp.privacy.customer_level:  # the noise sweeps customer-level DP as configured
        sweeps = [("cdp", {"privacy.unit": "customer"})]
        dp_off = {"privacy.unit": "merchant", "privacy.mode": "off"}
    else:
        sweeps = [("dp", {"privacy.mode": mode})]
        dp_off = {"privacy.mode": "off"}
    variants = [("", dp_off)] if 0 in noise else []
    variants += [(f"-{infix}{z:g}", {**changes, "privacy.noise-multiplier": z})
                 for infix, changes in sweeps for z in noise if z > 0]
    for suffix, changes in variants:
        try:
            _with(exp, changes)
        except ValueError as err:
            raise ValueError(f"federated{suffix or ' without DP'}: {err}") from None
    return variants


def _membership_audits(outcomes: list[MethodResult], data: PreparedData,
                       progress: Progress) -> dict[str, dict[str, Any]]:
    """The membership audit of every saved model (federated runs and centralised)."""
    from simulations.privacy_audit import membership_audit

    found = {}
    audited = [o for o in outcomes if o.details.get("run_dir")
               and (Path(o.details["run_dir"]) / "model.keras").exists()]
    with progress.task("membership audits", total=len(audited), unit="models") as task:
        for outcome in audited:
            result = membership_audit(outcome.details["run_dir"], data=data)
            found[outcome.name] = {k: result[k] for k in ("auc", "ci_low", "ci_high",
                                                          "members", "non_members",
                                                          "calibrated")}
            task.advance(1, model=outcome.name, attack_auc=round(result["auc"], 4),
                         calibrated=round(result["calibrated"]["auc"], 4))
    return found


def _with(exp: Experiment, changes: dict[str, Any]) -> Experiment:
    from simulations.settings import experiment_from_flat

    return experiment_from_flat({**exp.flat, **changes})


def _results(exp: Experiment, data: PreparedData, outcomes: list[MethodResult],
             seconds: float) -> dict[str, Any]:
    sizes = data.merchant_sizes()
    methods = {}
    for outcome in outcomes:
        entry = assess(outcome, data, exp)
        if "rounds" in outcome.details:
            entry["rounds"] = [
                {"round": r["round"], **r.get("centralised", {}),
                 "round_seconds": r.get("round_seconds"), "replied": r.get("replied"),
                 "failed": r.get("failed"), "bytes_up": r.get("bytes_up"),
                 "bytes_down": r.get("bytes_down")}
                for r in outcome.details["rounds"]]
        if outcome.name == "centralised":
            entry["history"] = outcome.details.get("history")
        entry["inputs"], entry["hyperparameters"] = _inputs_and_settings(exp, data, outcome)
        privacy = _spent(outcome)
        if privacy:
            entry["privacy"] = privacy
        methods[outcome.name] = entry
    return {
        "experiment": dict(exp.flat),
        "calendar": {"start": data.snapshot_config.start, "end": data.snapshot_config.end},
        "data": {"merchants": len(data.merchants), "snapshots": data.report.snapshots,
                 "decay_rate": data.report.decay_rate, "merchant_train_sizes": sizes},
        "budget_epochs": budget_epochs(exp),
        "methods": methods,
        "gain_from_joining": gain_from_joining(methods, sizes),
        "neural_lead": neural_lead(methods),
        "seconds": seconds,
    }


def _inputs_and_settings(exp: Experiment, data: PreparedData, outcome: MethodResult
                         ) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a method reads and the settings it trained with (the baselines say their own)."""
    details = outcome.details
    if "inputs" in details:
        return details["inputs"], details.get("hyperparameters", {})
    settings = neural_hyperparameters(exp)
    settings["train"]["epochs"] = budget_epochs(exp)  # every neural method's budget
    if outcome.name == "centralised":
        settings["train"]["epochs_used"] = details.get("epochs")
        settings["train"]["best_epoch"] = details.get("best_epoch")
    if outcome.name.startswith("federated"):
        fed = exp.federation
        settings["federation"] = {"strategy": outcome.name.split("-")[1],
                                  "num_rounds": fed.num_rounds, "local_epochs": fed.local_epochs,
                                  "fraction_train": fed.fraction_train,
                                  "shift_server_lr": fed.shift_server_lr,
                                  "shift_server_momentum": fed.shift_server_momentum,
                                  "head_refit_steps": fed.head_refit_steps}
        settings["train"]["epochs"] = fed.local_epochs  # per round
    return neural_inputs(exp, data), settings


def neural_lead(methods: dict[str, Any]) -> dict[str, Any]:
    """Decay AUC of the best neural method (centralised, local-only, federated LSTM)
    minus that of the best non-neural one (GBDT, LR); ``{}`` when a side is missing."""
    def best(names: list[str]) -> tuple[str, float] | None:
        scored = [(n, float(methods[n]["decay"]["roc_auc"])) for n in names
                  if np.isfinite(methods[n]["decay"].get("roc_auc", np.nan))]
        return max(scored, key=lambda x: x[1]) if scored else None

    neural = best([n for n in methods if n not in AGGREGATE_METHODS])
    other = best([n for n in methods if n in AGGREGATE_METHODS])
    if neural is None or other is None:
        return {}
    return {"best_neural": neural[0], "best_neural_auc": neural[1],
            "best_non_neural": other[0], "best_non_neural_auc": other[1],
            "difference": neural[1] - other[1]}


def _spent(outcome: MethodResult) -> dict[str, Any] | None:
    """The privacy summary a DP federation wrote to ``federation.json``, if any."""
    import json

    folder = outcome.details.get("run_dir")
    path = Path(folder) / "federation.json" if folder else None
    if path is None or not path.exists():
        return None
    summary = json.loads(path.read_text())
    privacy = summary.get("privacy")
    if privacy:
        privacy = {**privacy, "stop_reason": summary.get("stop_reason")}
    return privacy


def gain_from_joining(methods: dict[str, Any], sizes: dict[str, int]) -> dict[str, Any]:
    """Per-merchant AUC of each federated method minus local-only, by size quartile."""
    local = methods.get("local-only", {}).get("per_merchant_auc")
    if not local:
        return {}
    ranked = sorted(sizes, key=lambda m: sizes[m])
    quartile = {m: min(3, i * 4 // max(len(ranked), 1)) for i, m in enumerate(ranked)}
    out = {}
    for name, entry in methods.items():
        if not name.startswith("federated"):
            continue
        fed = entry["per_merchant_auc"]
        diffs = {m: fed[m] - local[m] for m in fed
                 if m in local and np.isfinite(fed[m]) and np.isfinite(local[m])}
        by_q = {}
        for q in range(4):
            vals = [d for m, d in diffs.items() if quartile.get(m) == q]
            by_q[f"q{q + 1}"] = float(np.mean(vals)) if vals else float("nan")
        out[name] = {"mean": float(np.mean(list(diffs.values()))) if diffs else float("nan"),
                     "by_size_quartile": by_q, "merchants": len(diffs),
                     "share_gaining": float(np.mean([d > 0 for d in diffs.values()]))
                     if diffs else float("nan")}
    return out
