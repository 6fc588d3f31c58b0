"""Federated vs centralised vs local-only vs GBDT on the same snapshots, seeds and budget.

Writes ``results.json``, ``report.md`` and PNG plots to the run folder and returns the
table the CLI prints.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from simulations.baselines import MethodResult, assess, run_centralised, run_gbdt, run_local
from simulations.experiment import Experiment, PreparedData, prepare, write_json

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclasses.dataclass
class Comparison:
    run_dir: Path
    results: dict[str, Any]
    table: str


def budget_epochs(exp: Experiment) -> int:
    """Epochs every neural method may use: rounds x local epochs of the federation."""
    return exp.federation.num_rounds * exp.federation.local_epochs


def run_comparison(exp: Experiment, run_dir: Path, *, strategies: tuple[str, ...] = ("fedavg",),
                   methods: tuple[str, ...] = ("gbdt", "centralised", "local", "federated"),
                   noise: tuple[float, ...] = (), audit: bool = False,
                   progress: Progress | None = None) -> Comparison:
    """Run every method on one ``PreparedData`` and write the report.

    ``noise``: noise multipliers to sweep, one federated run per strategy and value (0 =
    without differential privacy; otherwise ``privacy.mode``, ``server-fixed`` if off).
    ``audit``: run the membership-inference audit on every federated model and the
    centralised one (always on with a sweep).
    """
    say = progress or (lambda text: log.info("%s", text))
    variants = _privacy_variants(exp, noise)  # bad values fail before any training
    started = time.perf_counter()
    write_json(run_dir / "config.json", dict(exp.flat))
    data = prepare(exp)
    say(f"data: {len(data.merchants)} merchants, {len(data.snapshots):,} snapshots "
        f"({data.seconds:.1f} s)")
    epochs = budget_epochs(exp)
    outcomes: list[MethodResult] = []
    if "gbdt" in methods:
        say("gbdt: training")
        outcomes.append(run_gbdt(exp, data))
    if "centralised" in methods:
        say(f"centralised: up to {epochs} epochs")
        result, model = run_centralised(
            exp, data, epochs=epochs,
            on_epoch=lambda e, row: say(f"centralised epoch {e}/{epochs}: "
                                        f"loss {row['loss']:.4f} val {row.get('val_loss', 0):.4f}"))
        outcomes.append(result)
        from common.bundle import save_model_bundle

        path = save_model_bundle(model, data.snapshot_config, exp.policy,
                                 run_dir / "centralised" / "model.keras")
        result.details["run_dir"] = str(path.parent)
    if "local" in methods:
        say(f"local-only: {len(data.merchants)} merchants, up to {epochs} epochs each")
        outcomes.append(run_local(exp, data, epochs=epochs, progress=say))
    if "federated" in methods:
        from simulations.federated import run_federated

        for strategy in strategies:
            for suffix, changes in variants:
                fexp = _with(exp, {"federation.strategy": strategy, **changes})
                name = f"federated-{strategy}{suffix}"
                say(f"{name}: {exp.federation.num_rounds} rounds, {len(data.merchants)} "
                    "merchants" + (f", noise multiplier {fexp.privacy.noise_multiplier:g}"
                                   if fexp.privacy.enabled else ""))
                outcome = run_federated(
                    fexp, data, run_dir / name,
                    progress=lambda line: say(_round_text(line, exp.federation.num_rounds)))
                outcome.name = name
                outcomes.append(outcome)
    audits = _membership_audits(outcomes, data, run_dir, say) if audit else {}
    results = _results(exp, data, outcomes, time.perf_counter() - started)
    for name, found in audits.items():
        results["methods"][name]["membership"] = found
    write_json(run_dir / "results.json", results)
    plots = write_plots(results, run_dir)
    table = format_table(results)
    (run_dir / "report.md").write_text(report_markdown(results, table, plots))
    return Comparison(run_dir=run_dir, results=results, table=table)


def _privacy_variants(exp: Experiment, noise: tuple[float, ...]
                      ) -> list[tuple[str, dict[str, Any]]]:
    """(name suffix, config changes) of every federated run: one per noise multiplier."""
    if not noise:
        return [("", {})]
    mode = exp.privacy.mode if exp.privacy.enabled else "server-fixed"
    variants = []
    for z in noise:
        if z < 0 or not np.isfinite(z):
            raise ValueError(f"--noise {z}: noise multipliers must be finite and >= 0")
        variants.append(("", {"privacy.mode": "off"}) if z == 0 else
                        (f"-dp{z:g}", {"privacy.mode": mode, "privacy.noise-multiplier": z}))
    return variants


def _membership_audits(outcomes: list[MethodResult], data: PreparedData, run_dir: Path,
                       say: Progress) -> dict[str, dict[str, Any]]:
    """The membership audit of every saved model (federated runs and centralised)."""
    from simulations.privacy_audit import membership_audit

    found = {}
    for outcome in outcomes:
        folder = outcome.details.get("run_dir")
        if not folder or not (Path(folder) / "model.keras").exists():
            continue
        result = membership_audit(folder, data=data)
        found[outcome.name] = {k: result[k] for k in ("auc", "ci_low", "ci_high", "members",
                                                      "non_members", "calibrated")}
        cal = result["calibrated"]
        say(f"membership audit of {outcome.name}: attack AUC {result['auc']:.4f} "
            f"[{result['ci_low']:.4f}, {result['ci_high']:.4f}], calibrated {cal['auc']:.4f}")
    return found


def _with(exp: Experiment, changes: dict[str, Any]) -> Experiment:
    from simulations.experiment import experiment_from_flat

    return experiment_from_flat({**exp.flat, **changes})


def _round_text(line: dict[str, Any], total: int) -> str:
    auc = line.get("centralised", {}).get("decay_roc_auc")
    auc_text = f"global decay AUC {auc:.4f}" if auc is not None else "no server evaluation"
    done = f"{line.get('replied', '-')}/{line.get('sampled', '-')} clients"
    return f"round {line['round']}/{total}: {done}, {auc_text} ({line['round_seconds']:.1f} s)"


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
        "seconds": seconds,
    }


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


COLUMNS = (("decay AUC", "decay", "roc_auc"), ("PR-AUC", "decay", "pr_auc"),
           ("F1", "decay", "f1"), ("lift@10%", "decay", "top_decile_lift"),
           ("interest MAE", "interest", "mae"))


def format_table(results: dict[str, Any]) -> str:
    head = ["method"] + [c[0] for c in COLUMNS] + ["worst-decile AUC", "policy value",
                                                   "regret", "seconds"]
    rows = [head]
    for name, m in results["methods"].items():
        row = [name] + [_fmt(m.get(sec, {}).get(key)) for _, sec, key in COLUMNS]
        row.append(_fmt(m.get("merchant_spread", {}).get("worst_decile")))
        pol = m.get("policy", {}).get("policy", {})
        row.append(_fmt(pol.get("net_truth", pol.get("net_snips"))))
        row.append(_fmt(pol.get("net_regret")))
        row.append(f"{m['seconds']:.0f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths, strict=True))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return f"{value:.4f}"


def write_plots(results: dict[str, Any], run_dir: Path) -> list[str]:
    """PNG plots: AUC per round, per-merchant gain, policy value per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    methods = results["methods"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in methods.items():
        if "rounds" in m:
            r = [x for x in m["rounds"] if x.get("decay_roc_auc") is not None]
            ax.plot([x["round"] for x in r], [x["decay_roc_auc"] for x in r], marker="o",
                    label=name)
    for name, style in (("centralised", "--"), ("gbdt", ":")):
        if name in methods:
            ax.axhline(methods[name]["decay"]["roc_auc"], linestyle=style, color="grey",
                       label=f"{name} (final)")
    ax.set_xlabel("round")
    ax.set_ylabel("decay ROC-AUC (held-out test)")
    ax.set_title("Global model per round")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "auc_per_round.png", dpi=110)
    plt.close(fig)
    made.append("auc_per_round.png")

    local = methods.get("local-only", {}).get("per_merchant_auc")
    feds = [n for n in methods if n.startswith("federated")]
    if local and feds:
        sizes = results["data"]["merchant_train_sizes"]
        fed = methods[feds[0]]["per_merchant_auc"]
        ms = [m for m in fed if m in local and np.isfinite(fed[m] or np.nan)
              and np.isfinite(local[m] or np.nan)]
        fig, ax = plt.subplots(figsize=(6, 4))
        sc = ax.scatter([local[m] for m in ms], [fed[m] for m in ms],
                        c=[np.log10(max(sizes.get(m, 1), 1)) for m in ms], cmap="viridis")
        lo = min([local[m] for m in ms] + [fed[m] for m in ms] + [0.5])
        ax.plot([lo, 1], [lo, 1], color="grey", linestyle="--")
        ax.set_xlabel("local-only AUC")
        ax.set_ylabel(f"{feds[0]} AUC")
        ax.set_title("Per merchant: above the line gains from joining")
        fig.colorbar(sc, label="log10 training snapshots")
        fig.tight_layout()
        fig.savefig(run_dir / "merchant_gain.png", dpi=110)
        plt.close(fig)
        made.append("merchant_gain.png")

    if any("privacy" in m for m in methods.values()):
        made.append(_privacy_plot(methods, run_dir))

    names = [n for n, m in methods.items() if "policy" in m]
    if names:
        first = methods[names[0]]["policy"]
        refs = [k for k in first if k != "policy"]
        key = "net_truth" if "net_truth" in first["policy"] else "net_snips"
        labels = names + refs
        values = [methods[n]["policy"]["policy"].get(key, np.nan) for n in names] + \
                 [first[k].get(key, np.nan) for k in refs]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar(range(len(labels)), values,
               color=["tab:blue"] * len(names) + ["tab:grey"] * len(refs))
        ax.set_xticks(range(len(labels)), labels, rotation=40, ha="right", fontsize=8)
        ax.set_ylabel(f"policy value ({key})")
        ax.set_title("Activation policy value per method")
        fig.tight_layout()
        fig.savefig(run_dir / "policy_value.png", dpi=110)
        plt.close(fig)
        made.append("policy_value.png")
    return made


def _privacy_plot(methods: dict[str, Any], run_dir: Path) -> str:
    """Decay AUC against epsilon of the DP runs, the non-private runs as lines."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    dp = sorted(((m["privacy"]["epsilon"], m["decay"]["roc_auc"], name)
                 for name, m in methods.items() if "privacy" in m), key=lambda x: x[0])
    ax.plot([x[0] for x in dp], [x[1] for x in dp], marker="o", label="federated with DP")
    for eps, auc, name in dp:
        z = methods[name]["privacy"].get("noise_multiplier")
        ax.annotate(f"z={z:g}", (eps, auc), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    for name, m in methods.items():
        if "privacy" not in m and (name.startswith("federated") or name == "centralised"):
            ax.axhline(m["decay"]["roc_auc"], linestyle="--" if name == "centralised" else ":",
                       color="grey" if name == "centralised" else "tab:orange",
                       label=f"{name} (no DP)")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon (delta as configured), log scale")
    ax.set_ylabel("decay ROC-AUC (held-out test)")
    ax.set_title("Utility against privacy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "auc_vs_epsilon.png", dpi=110)
    plt.close(fig)
    return "auc_vs_epsilon.png"


def _privacy_lines(results: dict[str, Any]) -> list[str]:
    """The report's privacy table: epsilon, utility and attack AUC per method."""
    rows = [(n, m) for n, m in results["methods"].items()
            if "privacy" in m or "membership" in m]
    if not rows:
        return []
    lines = ["## Privacy: epsilon, utility and membership attack", "",
             "| method | noise | epsilon | delta | decay AUC | attack AUC (95% CI) | "
             "calibrated attack AUC (95% CI) |", "|---|---|---|---|---|---|---|"]
    for name, m in rows:
        p = m.get("privacy") or {}
        a = m.get("membership") or {}
        c = a.get("calibrated") or {}
        attack = (f"{a['auc']:.4f} ({a['ci_low']:.3f}-{a['ci_high']:.3f})" if a else "-")
        calib = (f"{c['auc']:.4f} ({c['ci_low']:.3f}-{c['ci_high']:.3f})" if c else "-")
        eps = p.get("epsilon")
        lines.append(f"| {name} | {p.get('noise_multiplier', '-')} | "
                     f"{_fmt(eps) if eps is not None else 'no DP'} | {p.get('delta', '-')} | "
                     f"{_fmt(m['decay']['roc_auc'])} | {attack} | {calib} |")
    stopped = [n for n, m in rows if (m.get("privacy") or {}).get("stop_reason")
               == "privacy-budget"]
    lines.append("")
    if stopped:
        lines.append("Stopped early by the privacy budget (privacy.target-epsilon): "
                     + ", ".join(stopped) + ".")
        lines.append("")
    lines.append("Members: training snapshots of a seeded sample of merchants; non-members: "
                 "their held-out (later) snapshots, so a shift over time can move the AUC "
                 "too. Calibrated: losses standardised per merchant and label.")
    lines.append("")
    return lines


def report_markdown(results: dict[str, Any], table: str, plots: list[str]) -> str:
    exp = results["experiment"]
    data = results["data"]
    lines = [
        f"# fedecay comparison: {exp.get('experiment.name', '')}",
        "",
        f"- merchants: {data['merchants']}; snapshots per split: {data['snapshots']}",
        "- decay label rate per split: "
        + ", ".join(f"{k} {v:.3f}" for k, v in data["decay_rate"].items()),
        f"- calendar: {results['calendar']['start']} .. {results['calendar']['end']}",
        f"- epoch budget of every neural method: {results['budget_epochs']} "
        "(federation: rounds x local epochs)",
        f"- seed: {exp.get('experiment.seed', 0)}; total time {results['seconds']:.0f} s",
        "",
        "Metrics on the held-out test period (last cutoff) of every merchant; thresholds "
        "for F1 chosen on validation. Policy value: net value per targeted user "
        "(value x P(re-engage) - cost), true values from the generator where known.",
        "",
        "```",
        table,
        "```",
        "",
    ]
    gain = results.get("gain_from_joining")
    if gain:
        lines.append("## Gain from joining (federated AUC - local-only AUC per merchant)")
        lines.append("")
        for name, g in gain.items():
            q = ", ".join(f"{k} {v:+.4f}" for k, v in g["by_size_quartile"].items())
            lines.append(f"- {name}: mean {g['mean']:+.4f}; by size quartile "
                         f"(q1 smallest) {q}; {g['share_gaining']:.0%} of "
                         f"{g['merchants']} merchants gain")
        lines.append("")
    for name, m in results["methods"].items():
        if "policy" in m:
            pol = m["policy"]
            lines.append(f"## Reference policies (policy row: {name})")
            lines.append("")
            lines.append("| policy | " + " | ".join(k for k in pol["policy"]) + " |")
            lines.append("|---|" + "---|" * len(pol["policy"]))
            for pname, vals in pol.items():
                lines.append(f"| {pname} | " + " | ".join(_fmt(vals.get(k)) for k in
                                                       pol["policy"]) + " |")
            lines.append("")
            break  # reference policies are the same for every method
    lines += _privacy_lines(results)
    rows = [(n, m["policy"]["policy"]) for n, m in results["methods"].items() if "policy" in m]
    if rows:
        lines.append("## Policy value per method (net value per targeted user)")
        lines.append("")
        lines.append("| method | net_truth | net_snips | net_regret |")
        lines.append("|---|---|---|---|")
        for name, vals in rows:
            lines.append(f"| {name} | {_fmt(vals.get('net_truth'))} | "
                         f"{_fmt(vals.get('net_snips'))} | {_fmt(vals.get('net_regret'))} |")
        lines.append("")
    for plot in plots:
        lines.append(f"![{plot}]({plot})")
    return "\n".join(lines) + "\n"
