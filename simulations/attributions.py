"""The comparison's global attributions: per feature group, for every model compared.

The federated model's numbers are the merchants' own, aggregated by the server after
the last round (``attributions.json`` in its run folder, ``server.attribution``): each
merchant permuted its own validation period. The centralised LSTM, GBDT and LR are
explained by the same function (``common.attribution.global_attributions``) on the
pooled validation period, with the same repeats and seed; LR also shows its native
importance, |standardised coefficient| summed per group (``group_of_aggregate``).
GBDT and LR read no sequence: their ``event_mix`` is the funnel's rates among the
aggregates alone. Local-only (one model per merchant) is left out.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from common.feature_groups import GROUP_NAMES, group_of_aggregate
from common.progress import SILENT, Progress
from simulations.render import Block, Heading, Paragraph, Table

log = logging.getLogger(__name__)

#: Most pooled validation rows explained per model (a seeded sample beyond that).
MAX_ROWS = 20_000
MEASURES = (("log_loss_rise", "decay log-loss rise"), ("auc_drop", "decay AUC drop"),
            ("grad_input", "mean |gradient x input|"))


def attributions_of(outcomes: list[Any], data: Any, exp: Any,
                    progress: Progress = SILENT) -> dict[str, Any]:
    """Per method, per group: the measures of :data:`MEASURES` (and LR's native
    importance); ``results.json`` keeps the dict as ``attributions``."""
    from common.attribution import global_attributions
    from common.tabular import TabularModel

    started = time.perf_counter()
    val = data.snapshots.split_part("val")
    if len(val) > MAX_ROWS:
        rows = np.sort(np.random.default_rng(exp.seed).choice(len(val), MAX_ROWS, replace=False))
        val = val.subset(rows)
    repeats, seed = exp.federation.attribution_repeats, exp.seed
    methods: dict[str, Any] = {}
    with progress.task("attributions", total=len(outcomes), unit="models") as task:
        for outcome in outcomes:
            name, folder = outcome.name, outcome.details.get("run_dir")
            if name.startswith("federated"):
                methods[name] = _from_merchants(Path(folder) / "attributions.json"
                                                if folder else None)
            elif name == "centralised" and folder:
                from common.model import load_model

                att = global_attributions(load_model(Path(folder) / "model.keras"), val,
                                          repeats=repeats, seed=seed)
                methods[name] = {"source": "pooled validation", **_measures(att.to_json())}
            elif isinstance(outcome.model, TabularModel):
                att = global_attributions(outcome.model, val, repeats=repeats, seed=seed)
                methods[name] = {"source": "pooled validation", **_measures(att.to_json())}
                native = native_importance(outcome.model)
                if native:
                    methods[name]["native"] = native
            task.advance(1, model=name)
    return {"groups": list(GROUP_NAMES), "rows": len(val), "repeats": repeats, "seed": seed,
            "methods": methods, "seconds": time.perf_counter() - started}


def _measures(att: Mapping[str, Any]) -> dict[str, Any]:
    """``{measure: {group: value}}`` from ``Attributions.to_json()`` or the server's file."""
    groups = att["groups"]
    return {"rows": att["rows"],
            **{m: {g: groups[g].get(m) for g in GROUP_NAMES} for m, _ in MEASURES}}


def _from_merchants(path: Path | None) -> dict[str, Any]:
    """The federation's aggregate, or why there is none."""
    if path is None or not path.exists():
        return {"source": "merchants", "unavailable": "no attributions.json (run with "
                "federation.attributions = true)"}
    found = json.loads(path.read_text())
    if found.get("status") != "ok":
        return {"source": "merchants",
                "unavailable": found.get("reason") or "no merchant replied"}
    return {"source": f"{found['merchants']} merchants' validation periods",
            "merchants": found["merchants"], **_measures(found)}


def native_importance(model: Any) -> dict[str, float] | None:
    """LR: |standardised decay coefficient| summed per group, as shares of the total
    (None for a model without coefficients: scikit-learn's histogram GBDT has no
    ``feature_importances_``)."""
    coef = getattr(getattr(model.decay, "steps", [[None, model.decay]])[-1][1], "coef_", None)
    if coef is None:
        return None
    weights = np.abs(np.asarray(coef, np.float64).ravel())
    per_group = dict.fromkeys(GROUP_NAMES, 0.0)
    for feature, w in zip(model.features, weights, strict=True):
        per_group[group_of_aggregate(feature)] += float(w)
    total = sum(per_group.values()) or 1.0
    return {g: v / total for g, v in per_group.items()}


# ------------------------------------------------------------------------- report

def attribution_blocks(found: Mapping[str, Any] | None) -> list[Block]:
    """The report's section: one table per measure, methods as rows, groups as columns."""
    if not found or not found.get("methods"):
        return []
    methods, groups = found["methods"], found["groups"]
    blocks: list[Block] = [Heading("Global attributions per feature group")]
    for measure, title in MEASURES:
        rows = [(name, m["source"], *(_cell(m.get(measure, {}).get(g)) for g in groups))
                for name, m in methods.items() if "unavailable" not in m]
        rows = [r for r in rows if any(c != "-" for c in r[2:])]  # GBDT/LR: no gradients
        if rows:
            blocks += [Paragraph(f"{title[0].upper()}{title[1:]} when the group is permuted"
                                 if measure != "grad_input" else f"{title} (LSTM only):"),
                       Table(("method", "computed on", *groups), tuple(rows))]
    native = [(n, *(_cell(m["native"][g], ".1%") for g in groups))
              for n, m in methods.items() if m.get("native")]
    if native:
        blocks += [Paragraph("Native importance: share of |standardised coefficient|:"),
                   Table(("method", *groups), tuple(native))]
    blocks.append(Paragraph(
        f"Permutation importance: a group's inputs are moved together to other rows "
        f"({found['repeats']} seeded permutations, seed {found['seed']}); the rise in decay "
        "log-loss and the fall in decay AUC say how much the model relies on them. "
        "Federated: each merchant computed them on its own validation period with the kept "
        "global model and sent only these per-group numbers; the server weighted them by "
        "rows, so its AUC figures are row-weighted means of within-merchant AUCs, while "
        "the other rows' AUC is one pooled AUC whose permutations also move inputs across "
        "merchants (the two are not on the same scale). "
        f"Others: the pooled validation period ({found['rows']:,} rows). GBDT and LR "
        "read no sequence, so their event_mix is the funnel's rates among the aggregates "
        "alone; gradient x input "
        "covers the LSTM's float inputs only (event types and categories enter as ids)."))
    blocks += [Paragraph(f"{n}: attributions unavailable ({m['unavailable']}).")
               for n, m in methods.items() if "unavailable" in m]
    return blocks


def _cell(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None or not np.isfinite(value) else format(float(value), spec)


def write_attribution_plot(found: Mapping[str, Any] | None, run_dir: Path,
                           save: Callable[[Any, Path, str], str]) -> str | None:
    """Grouped bars: decay log-loss rise per group for every method explained."""
    if not found:
        return None
    shown = {n: m for n, m in found["methods"].items() if "log_loss_rise" in m}
    if not shown:
        return None
    import matplotlib.pyplot as plt

    groups = found["groups"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(shown)
    for i, (name, m) in enumerate(shown.items()):
        values = [m["log_loss_rise"].get(g) or 0.0 for g in groups]
        ax.bar(np.arange(len(groups)) + (i - (len(shown) - 1) / 2) * width, values, width,
               label=name)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(groups)), groups, rotation=20)
    ax.set_ylabel("decay log-loss rise when permuted")
    ax.set_title("Global attributions per feature group")
    ax.legend(fontsize=8)
    return save(fig, run_dir, "attributions.png")
