"""Utility against ε across comparisons: ``fedecay privacy tradeoff RUN...``.

Each ``fedecay compare --noise ... --dp-units ...`` run answers for one federation (one
population of merchants and customers). A privacy team asks how the trade-off moves
with the population and the privacy unit, so this gathers the federated models of
several comparisons into one table and one figure, grouped by population: the
comparison's merchants and training snapshots identify it, and it is named by its
customer count when a run declared ``privacy.customers``. Each row keeps the count its
ledger used (declared, or estimated in round 1 from the merchants sampled). The gap of
each DP model is taken to the non-private federated model of the same population,
when one of the runs holds it.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import atomic

RESULTS_FILE = "results.json"
#: The ledger's ``mode`` of a model trained without differential privacy.
NO_DP = "none"


def _results(run: Path) -> dict[str, Any]:
    """A comparison's ``results.json``; ValueError naming the file when it is not one."""
    path = run / RESULTS_FILE
    if not run.is_dir():
        raise ValueError(f"{run}: not a folder (give the run folders fedecay compare wrote)")
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{run}: no {RESULTS_FILE}; give a folder fedecay compare wrote"
                         ) from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable ({err})") from None
    if not isinstance(results, dict) or not isinstance(results.get("methods"), dict) \
            or not isinstance(results.get("data"), dict):
        raise ValueError(f"{path}: not a comparison's results (no 'methods' and 'data')")
    return results


def _declared_customers(results: dict[str, Any]) -> int | None:
    """``privacy.customers`` as the comparison set it, or None (estimated or none)."""
    value = (results.get("experiment") or {}).get("privacy.customers")
    return int(value) if isinstance(value, int) and value > 0 else None


def _population(results: dict[str, Any]) -> tuple[int, int]:
    """(merchants, training snapshots): the same federation gives the same pair."""
    data = results["data"]
    snapshots = data.get("snapshots")
    train = snapshots.get("train") if isinstance(snapshots, dict) else None
    return int(data.get("merchants") or 0), int(train or 0)


def tradeoff_rows(runs: Sequence[Path]) -> list[dict[str, Any]]:
    """One row per federated model of ``runs``: its population, privacy unit and
    placement (``mode``), noise z, ε at δ, decay AUC, the gap to the population's
    non-private federated AUC and the membership attack's AUC; sorted by population,
    mode and z."""
    rows: list[dict[str, Any]] = []
    for run in runs:
        results = _results(Path(run))
        merchants, snapshots = _population(results)
        declared = _declared_customers(results)
        for name, method in results["methods"].items():
            if not name.startswith("federated") or not isinstance(method, dict):
                continue
            privacy = method.get("privacy") or {}
            rows.append({
                "run": str(run), "method": name, "merchants": merchants,
                "train_snapshots": snapshots, "mode": privacy.get("mode") or NO_DP,
                "noise_multiplier": privacy.get("noise_multiplier"),
                "epsilon": privacy.get("epsilon"), "delta": privacy.get("delta"),
                "customers": privacy.get("customers"), "declared_customers": declared,
                "auc": (method.get("decay") or {}).get("roc_auc"),
                "attack_auc": (method.get("membership") or {}).get("auc")})
    if not rows:
        raise ValueError("no federated model in " + ", ".join(str(r) for r in runs)
                         + " (run fedecay compare --methods federated --noise ...)")
    for key in {(r["merchants"], r["train_snapshots"]) for r in rows}:
        group = [r for r in rows if (r["merchants"], r["train_snapshots"]) == key]
        customers = next((r["declared_customers"] for r in group
                          if r["declared_customers"]), None)
        plain = [r["auc"] for r in group if r["mode"] == NO_DP and r["auc"] is not None]
        for r in group:
            r["population_customers"] = customers
            r["auc_gap"] = None if not plain or r["auc"] is None else plain[0] - r["auc"]
    rows.sort(key=lambda r: (r["merchants"], r["train_snapshots"], r["mode"] != NO_DP,
                             r["mode"], r["noise_multiplier"] or 0.0))
    return rows


def population_label(row: dict[str, Any]) -> str:
    """``"200 merchants, 85,459 customers"`` (when a run declared the count), else
    ``"100 merchants, 244,811 training snapshots"``."""
    if row["population_customers"]:
        return f"{row['merchants']:,} merchants, {row['population_customers']:,} customers"
    return f"{row['merchants']:,} merchants, {row['train_snapshots']:,} training snapshots"


def _num(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def format_tradeoff(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a markdown table, a population after the other."""
    lines = ["| population | DP mode | z | ε | δ | customers (ledger) | decay AUC | "
             "gap to no DP | attack AUC |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {population_label(r)} | {r['mode']} | {_num(r['noise_multiplier'], 'g')} | "
            f"{_num(r['epsilon'], '.3g')} | {_num(r['delta'], '.2g')} | "
            f"{_num(r['customers'], ',')} | "
            f"{_num(r['auc'], '.4f')} | {_num(r['auc_gap'], '+.4f')} | "
            f"{_num(r['attack_auc'], '.3f')} |")
    return "\n".join(lines)


def _legend(mode: str) -> str:
    """The unit beside the mode: ``customer-central`` says it, ``server-fixed`` not."""
    return mode if mode.startswith("customer") else f"merchant, {mode}"


def plot_tradeoff(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Decay AUC against ε, one panel per population, one line per DP mode, the
    non-private federated AUC as a dotted line; written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(population_label(r) for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows if r["mode"] != NO_DP))
    colours = {mode: f"C{i}" for i, mode in enumerate(modes)}  # the same in every panel
    fig, axes = plt.subplots(1, len(labels), figsize=(4.5 * len(labels), 4), sharey=True,
                             squeeze=False)
    for ax, label in zip(axes[0], labels, strict=True):
        group = [r for r in rows if population_label(r) == label]
        for mode in dict.fromkeys(r["mode"] for r in group if r["mode"] != NO_DP):
            points = sorted((r["epsilon"], r["auc"]) for r in group if r["mode"] == mode
                            and r["epsilon"] is not None and r["auc"] is not None)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                    color=colours[mode], label=_legend(mode))
        for r in group:
            if r["mode"] == NO_DP and r["auc"] is not None:
                ax.axhline(r["auc"], linestyle=":", color="grey", label="no DP")
                break
        ax.set_xscale("log")
        ax.set_xlabel("ε (log scale)")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("decay ROC-AUC (held-out test)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic.write_bytes(path, buffer.getvalue())
