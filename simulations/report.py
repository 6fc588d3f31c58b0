"""The comparison's report: the terminal table, PNG plots, ``report.md`` and ``report.html``.

Both report files are rendered from one list of blocks (headings, paragraphs, tables,
plots, the configuration), so they say the same: ``report.md`` for a repository or a
notebook (real Markdown tables, plots linked beside it), ``report.html`` to open or mail
on its own (plots embedded as base64 PNG, the configuration in a collapsed table).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common import atomic
from simulations.attributions import attribution_blocks, write_attribution_plot
from simulations.capture import capture_blocks, write_budget_plot
from simulations.fairness import fairness_blocks, write_fairness_plot
from simulations.render import (
    Block,
    Bullets,
    Config,
    Heading,
    Paragraph,
    Plot,
    Table,
    to_html,
    to_markdown,
)

COLUMNS = (("decay AUC", "decay", "roc_auc"), ("PR-AUC", "decay", "pr_auc"),
           ("F1", "decay", "f1"), ("lift@10%", "decay", "top_decile_lift"),
           ("interest MAE", "interest", "mae"))


def fmt(value: Any, spec: str = ".4f") -> str:
    """A number for a table; ``-`` for none, NaN or infinity."""
    if value is None:
        return "-"
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    return format(f, spec) if np.isfinite(f) else "-"


def table_rows(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The comparison table: header and one row per method."""
    head = ["method"] + [c[0] for c in COLUMNS] + ["worst-decile AUC", "policy value",
                                                   "regret", "capture", "seconds"]
    rows = []
    for name, m in results["methods"].items():
        row = [name] + [fmt(m.get(sec, {}).get(key)) for _, sec, key in COLUMNS]
        row.append(fmt(m.get("merchant_spread", {}).get("worst_decile")))
        pol = m.get("policy", {}).get("policy", {})
        row.append(fmt(pol.get("net_truth", None if policy_caveat(m) else pol.get("net_snips"))))
        row.append(fmt(pol.get("net_regret")))
        row.append(fmt(m.get("capture", {}).get("capture"), ".3f"))
        row.append(fmt(m["seconds"], ".0f"))
        rows.append(row)
    return head, rows


def format_table(results: Mapping[str, Any]) -> str:
    """The comparison table as aligned text (what the command line prints)."""
    head, body = table_rows(results)
    rows = [head, *body]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths, strict=True))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lead = lead_sentence(results)
    return "\n".join(lines + ([lead] if lead else []))


def lead_sentence(results: Mapping[str, Any]) -> str:
    """How much the best neural method beats the best non-neural one ("" if not both)."""
    lead = results.get("neural_lead") or {}
    if not lead:
        return ""
    return (f"best neural ({lead['best_neural']}) - best non-neural "
            f"({lead['best_non_neural']}): {fmt(lead['difference'], '+.4f')} decay AUC "
            f"({fmt(lead['best_neural_auc'])} vs {fmt(lead['best_non_neural_auc'])})")


# ------------------------------------------------------------------------- plots

def write_plots(results: Mapping[str, Any], run_dir: Path) -> list[str]:
    """PNG plots: AUC per round, per-merchant gain, policy value per method, AUC per
    segment (:mod:`simulations.fairness`)."""
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
    for name, style in (("centralised", "--"), ("gbdt", ":"), ("lr", "-.")):
        if name in methods:
            ax.axhline(methods[name]["decay"]["roc_auc"], linestyle=style, color="grey",
                       label=f"{name} (final)")
    ax.set_xlabel("round")
    ax.set_ylabel("decay ROC-AUC (held-out test)")
    ax.set_title("Global model per round")
    ax.legend(fontsize=8)
    made.append(_save(fig, run_dir, "auc_per_round.png"))

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
        made.append(_save(fig, run_dir, "merchant_gain.png"))

    if any("privacy" in m for m in methods.values()):
        made.append(_privacy_plot(methods, run_dir))

    names = [n for n, m in methods.items() if "policy" in m and not policy_caveat(m)]
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
        made.append(_save(fig, run_dir, "policy_value.png"))
    budget = write_budget_plot(results, run_dir, _save)
    if budget:
        made.append(budget)
    fairness = write_fairness_plot(results.get("fairness"), run_dir, _save)
    attributions = write_attribution_plot(results.get("attributions"), run_dir, _save)
    return made + [p for p in (fairness, attributions) if p]


def _privacy_plot(methods: Mapping[str, Any], run_dir: Path) -> str:
    """Decay AUC against epsilon of the DP runs, one line per unit and placement (the
    ledger's ``mode``), the non-private runs as horizontal lines."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[str, list[tuple[float, float, str]]] = {}
    for name, m in methods.items():
        if "privacy" in m and m["privacy"].get("epsilon") is not None:
            series.setdefault(m["privacy"].get("mode") or "DP", []).append(
                (m["privacy"]["epsilon"], m["decay"]["roc_auc"], name))
    for mode, points in sorted(series.items()):
        points.sort(key=lambda x: x[0])
        ax.plot([x[0] for x in points], [x[1] for x in points], marker="o",
                label=f"federated, DP {mode}")
        for eps, auc, name in points:
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
    return _save(fig, run_dir, "auc_vs_epsilon.png")


def _save(fig: Any, run_dir: Path, name: str) -> str:
    """Write ``fig`` to ``run_dir / name`` and free it; the file name."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(run_dir / name, dpi=110)
    plt.close(fig)
    return name


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    return Table(tuple(head), tuple(tuple(str(c) for c in r) for r in rows))


def report_blocks(results: Mapping[str, Any], plots: Sequence[str],
                  config: Mapping[str, Any] | None = None) -> list[Block]:
    """What the report says, in order; ``config``: the resolved configuration."""
    exp = results["experiment"]
    data = results["data"]
    per_split = ", ".join(f"{k} {v:,}" for k, v in data["snapshots"].items())
    rates = ", ".join(f"{k} {fmt(v, '.3f')}" for k, v in data["decay_rate"].items())
    blocks: list[Block] = [
        Heading(f"fedecay comparison: {exp.get('experiment.name', '')}", 1),
        Bullets((
            f"merchants: {data['merchants']}; snapshots per split: {per_split}",
            f"decay label rate per split: {rates}",
            f"calendar: {results['calendar']['start']} .. {results['calendar']['end']}",
            f"epoch budget of every neural method: {results['budget_epochs']} "
            "(federation: rounds x local epochs)",
            f"seed: {exp.get('experiment.seed', 0)}; total time {results['seconds']:.0f} s",
        )),
        Paragraph("Metrics on the held-out test period (last cutoff) of every merchant; "
                  "thresholds for F1 chosen on validation. Policy value: net value per "
                  "targeted user (value x P(re-engage) - cost), true values from the "
                  "generator where known."),
        _table(*table_rows(results)),
    ]
    lead = lead_sentence(results)
    if lead:
        blocks.append(Paragraph(lead[0].upper() + lead[1:] + "."))
    blocks += _gain_blocks(results)
    blocks += capture_blocks(results)
    blocks += _policy_blocks(results)
    blocks += _privacy_blocks(results)
    blocks += fairness_blocks(results.get("fairness"))
    blocks += attribution_blocks(results.get("attributions"))
    blocks += _inputs_blocks(results)
    blocks += [Plot(p) for p in plots]
    if config:
        blocks.append(Heading("Configuration"))
        blocks.append(Config(tuple((k, str(v)) for k, v in config.items())))
    return blocks


def _inputs_blocks(results: Mapping[str, Any]) -> list[Block]:
    """Per method: what it reads and the settings it trained with."""
    rows = []
    for name, m in results["methods"].items():
        inputs, settings = m.get("inputs"), m.get("hyperparameters")
        if not inputs:
            continue
        rows.append([name, _describe_inputs(inputs), _describe_settings(settings or {})])
    if not rows:
        return []
    return [Heading("Inputs and settings of each method"),
            _table(["method", "inputs", "settings"], rows)]


def _describe_inputs(inputs: Mapping[str, Any]) -> str:
    parts = []
    seq = inputs.get("sequence")
    if seq:
        parts.append(f"last {seq['max_len']} events: {', '.join(seq['per_event'])}")
    feats = inputs.get("features") or inputs.get("static") or []
    parts.append(f"{len(feats)} aggregates: {', '.join(feats)}")
    return "; ".join(parts)


def _describe_settings(settings: Mapping[str, Any]) -> str:
    """``part: key=value, ...`` per part, skipping empty values."""
    parts = []
    for part, values in settings.items():
        if isinstance(values, Mapping):
            items = ", ".join(f"{k}={v}" for k, v in values.items() if v is not None)
            parts.append(f"{part}: {items}")
        else:
            parts.append(f"{part}={values}")
    return "; ".join(parts)


def _gain_blocks(results: Mapping[str, Any]) -> list[Block]:
    gain = results.get("gain_from_joining")
    if not gain:
        return []
    rows = []
    for name, g in gain.items():
        q = g["by_size_quartile"]
        rows.append([name, fmt(g["mean"], "+.4f"), *(fmt(q.get(f"q{i}"), "+.4f")
                                                     for i in range(1, 5)),
                     f"{fmt(g['share_gaining'], '.0%')} of {g['merchants']}"])
    return [Heading("Gain from joining (federated AUC - local-only AUC per merchant)"),
            _table(["method", "mean", "q1 (smallest)", "q2", "q3", "q4 (largest)",
                    "merchants gaining"], rows)]


def policy_caveat(method: Mapping[str, Any]) -> str:
    """Why a method's off-policy value is not worth a number ("" when it is, or when the
    generator's true value is known)."""
    pol = method.get("policy", {}).get("policy", {})
    if not pol or "net_truth" in pol:
        return ""
    support = method.get("policy_support") or {}
    if support and not support.get("has_control"):
        logged = ", ".join(f"{a} {n:,}" for a, n in support.get("per_action", {}).items() if n)
        return (f"the log has no control (none) rows (logged: {logged or 'nothing'}), so no "
                "uplift and no off-policy value can be estimated")
    if pol.get("matched", 1) == 0:
        return (f"the policy never chose the logged action on the {pol.get('logged', 0):,} "
                "logged rows (no overlap), so its off-policy value is undefined")
    return ""


def _interval(v: Mapping[str, Any], key: str) -> str:
    low, high = v.get(f"{key}_low"), v.get(f"{key}_high")
    return f"{fmt(low)}-{fmt(high)}" if low is not None else "-"


def _policy_blocks(results: Mapping[str, Any]) -> list[Block]:
    caveats = [(n, policy_caveat(m)) for n, m in results["methods"].items() if "policy" in m]
    if caveats and all(c for _, c in caveats):
        reasons = dict.fromkeys(c for _, c in caveats)
        return [Heading("Policy value"),
                Paragraph("No policy value: " + "; ".join(
                    f"{r} ({', '.join(n for n, c in caveats if c == r)})" for r in reasons)
                    + ".")]
    blocks: list[Block] = []
    for name, m in results["methods"].items():
        if "policy" in m:  # reference policies are the same for every method
            pol = m["policy"]
            keys = [k for k in pol["policy"] if not k.endswith(("_low", "_high"))]
            blocks += [Heading(f"Reference policies (policy row: {name})"),
                       _table(["policy", *keys],
                              [[p, *(fmt(v.get(k), ".0f" if k in ("logged", "matched")
                                         else ".4f") for k in keys)]
                               for p, v in pol.items()])]
            break
    rows = [(n, m["policy"]["policy"]) for n, m in results["methods"].items() if "policy" in m]
    if rows:
        blocks += [Heading("Policy value per method (net value per targeted user)"),
                   _table(["method", "net_truth", "net_snips", "net_snips 95% CI",
                           "matched / logged rows", "net_regret"],
                          [[n, fmt(v.get("net_truth")), fmt(v.get("net_snips")),
                            _interval(v, "net_snips"),
                            f"{v.get('matched', '-')} / {v.get('logged', '-')}",
                            fmt(v.get("net_regret"))] for n, v in rows])]
        blocks += [Paragraph(f"{n}: {c}.") for n, c in caveats if c]
        blocks.append(Paragraph("Off-policy values (IPS, SNIPS) rest on the logged rows "
                                "whose action the policy would also have chosen (matched); "
                                "intervals: seeded percentile bootstrap over logged rows."))
    return blocks


def _privacy_blocks(results: Mapping[str, Any]) -> list[Block]:
    """Epsilon, utility and attack AUC per method."""
    found = [(n, m) for n, m in results["methods"].items() if "privacy" in m or "membership" in m]
    if not found:
        return []
    rows = []
    for name, m in found:
        p = m.get("privacy") or {}
        a = m.get("membership") or {}
        c = a.get("calibrated") or {}
        attack = f"{fmt(a['auc'])} ({fmt(a['ci_low'], '.3f')}-{fmt(a['ci_high'], '.3f')})" \
            if a else "-"
        calib = f"{fmt(c['auc'])} ({fmt(c['ci_low'], '.3f')}-{fmt(c['ci_high'], '.3f')})" \
            if c else "-"
        eps = p.get("epsilon")
        rows.append([name, p.get("mode") or "-", fmt(p.get("noise_multiplier"), "g"),
                     fmt(eps) if eps is not None else "no DP", fmt(p.get("delta"), "g"),
                     fmt(m["decay"]["roc_auc"]), attack, calib])
    blocks: list[Block] = [
        Heading("Privacy: epsilon, utility and membership attack"),
        _table(["method", "DP", "noise", "epsilon", "delta", "decay AUC",
                "attack AUC (95% CI)",
                "calibrated attack AUC (95% CI)"], rows)]
    stopped = [n for n, m in found if (m.get("privacy") or {}).get("stop_reason")
               == "privacy-budget"]
    if stopped:
        blocks.append(Paragraph("Stopped early by the privacy budget "
                                f"(privacy.target-epsilon): {', '.join(stopped)}."))
    units = {((m.get("privacy") or {}).get("unit_text"),
              (m.get("privacy") or {}).get("threat_model")) for _, m in found}
    for text, threat in sorted(u for u in units if u[0]):
        blocks.append(Paragraph(f"Privacy unit: {text}." + (f" Threat model: {threat}."
                                                            if threat else "")))
    blocks.append(Paragraph(
        "Members: training snapshots of a seeded sample of merchants; non-members: their "
        "held-out (later) snapshots, so a shift over time can move the AUC too. "
        "Calibrated: losses standardised per merchant and label."))
    return blocks


def write_report(results: Mapping[str, Any], run_dir: Path,
                 config: Mapping[str, Any] | None = None) -> list[Path]:
    """The plots, ``report.md`` and ``report.html`` in ``run_dir``; the files written."""
    plots = write_plots(results, run_dir)
    blocks = report_blocks(results, plots, config)
    md, page = run_dir / "report.md", run_dir / "report.html"
    atomic.write_text(md, to_markdown(blocks))
    atomic.write_text(page, to_html(blocks, run_dir))
    return [*(run_dir / p for p in plots), md, page]
