"""Capture and the value-vs-budget curve in the comparison: computed, reported, plotted.

Capture (``common.metrics.capture``) is the headline policy figure: the share of the
gain over the best single action that a method's policy takes, on the held-out campaign
customers with the generator's true values. A real log has no true values, so there is
neither capture nor curve, and the report says so instead of a number.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common import metrics
from common.config import PolicyConfig
from common.policy import choose_actions, treatment_order
from simulations.render import Block, Heading, Paragraph, Table

#: Budget shares the report's table quotes (the plot shows the whole curve).
TABLE_SHARES = (0.1, 0.25, 0.5)
NO_TRUTH = ("No capture and no value-vs-budget curve: they need every action's true value "
            "for every customer, which only the synthetic generator knows (a real log "
            "shows one action per customer).")
DEFINITION = ("Capture = (policy - best single action) / (oracle - best single action) in "
              "true net value per campaign customer on the held-out test: 1 = the oracle, "
              "0 = no better than giving everyone the best single action, < 0 = worse.")


def policy_capture(decay_risk: Any, activation: Any, truth: Any, policy: PolicyConfig,
                   actions: Sequence[str]) -> dict[str, Any]:
    """``capture`` (of the policy as configured, budget included) and ``budget_curve``
    (the same ranking at every budget) of one method on the campaign rows."""
    risk = np.asarray(decay_risk, dtype=float)
    costs = np.array([policy.cost(a) for a in actions])
    chosen = choose_actions(risk, activation, policy, actions)
    unlimited = choose_actions(risk, activation, dataclasses.replace(policy, budget=0),
                               actions)
    order = treatment_order(unlimited.expected_gain, risk, policy.risk_threshold)
    return {
        "capture": metrics.capture_values(chosen.action_index, truth, actions,
                                          value=policy.value, costs=costs),
        "budget_curve": metrics.budget_curve(order, unlimited.action_index, truth, actions,
                                             value=policy.value, costs=costs),
    }


def fmt(value: Any, spec: str = ".3f") -> str:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return "-"
    return format(f, spec) if np.isfinite(f) else "-"


def at_share(curve: Mapping[str, Any], share: float, key: str = "policy") -> float:
    """The curve's ``key`` value at the grid point nearest ``share``."""
    grid = np.asarray(curve["share"])
    return float(curve[key][int(np.argmin(np.abs(grid - share)))])


def capture_blocks(results: Mapping[str, Any]) -> list[Block]:
    """The capture table, the value at a few budgets, and the seed summary if any."""
    methods = results["methods"]
    with_policy = [n for n, m in methods.items() if "policy" in m]
    if not with_policy:
        return []
    found = [(n, methods[n]) for n in with_policy if "capture" in methods[n]]
    if not found:
        return [Heading("Capture"), Paragraph(NO_TRUTH)]
    first = found[0][1]["capture"]
    rows = [[n, fmt(m["capture"]["capture"]), fmt(m["capture"]["policy"]),
             m["capture"]["note"] or ""] for n, m in found]
    blocks: list[Block] = [
        Heading("Capture (share of the achievable gain)"),
        Paragraph(f"{DEFINITION} On these {first['rows']:,} customers: best single "
                  f"action {first['best_single_action']} {fmt(first['best_single'])}, "
                  f"oracle {fmt(first['oracle'])}."),
        _table(["method", "capture", "net value", "note"], rows)]
    curve_rows = [[n, *(fmt(at_share(m["budget_curve"], s)) for s in TABLE_SHARES),
                   f"{m['budget_curve']['treated'] / max(m['budget_curve']['rows'], 1):.0%}"]
                  for n, m in found]
    curve = found[0][1]["budget_curve"]
    curve_rows.append(["oracle", *(fmt(at_share(curve, s, "oracle")) for s in TABLE_SHARES),
                       "-"])
    curve_rows.append([f"random customers, {curve['single_action']}",
                       *(fmt(at_share(curve, s, "single")) for s in TABLE_SHARES), "-"])
    blocks += [
        Heading("Value against budget (true net value per campaign customer)"),
        Paragraph("Each method treats the customers with the largest expected gain "
                  "(value x uplift - cost of its best action) first, as policy.budget "
                  "does; the rest get none. Treated without a budget: the share of "
                  "customers with a positive expected gain."),
        _table(["method", *(f"{s:.0%} treated" for s in TABLE_SHARES),
                "treated without a budget"], curve_rows)]
    blocks += seed_blocks(results.get("seeds"))
    return blocks


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> Table:
    return Table(tuple(head), tuple(tuple(str(c) for c in r) for r in rows))


def write_budget_plot(results: Mapping[str, Any], run_dir: Path,
                      save: Callable[[Any, Path, str], str]) -> str | None:
    """``value_vs_budget.png``: every method's curve, the oracle's and the single
    action's; None without true values."""
    found = [(n, m["budget_curve"]) for n, m in results["methods"].items()
             if "budget_curve" in m]
    if not found:
        return None
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in found:
        ax.plot(np.asarray(curve["share"]) * 100, curve["policy"], label=name)
    curve = found[0][1]
    ax.plot(np.asarray(curve["share"]) * 100, curve["oracle"], color="black",
            linestyle="--", label="oracle")
    ax.plot(np.asarray(curve["share"]) * 100, curve["single"], color="grey", linestyle=":",
            label=f"random customers, {curve['single_action']}")
    ax.set_xlabel("customers treated (% of the campaign customers, by expected gain)")
    ax.set_ylabel("true net value per campaign customer")
    ax.set_title("Value against budget (held-out test)")
    ax.legend(fontsize=8)
    return save(fig, run_dir, "value_vs_budget.png")


def seed_summary(per_seed: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Capture and net value per method over seeds: ``{method: {capture_mean,
    capture_std, value_mean, value_std, seeds, capture, value}}`` from each seed's
    ``results.json``; ``std`` is the sample standard deviation (``nan`` for one seed).
    Seeds where capture is undefined count in ``seeds`` but not in the mean."""
    names = dict.fromkeys(n for r in per_seed.values() for n in r["methods"])
    out: dict[str, Any] = {}
    for name in names:
        caps, values = [], []
        for results in per_seed.values():
            cap = results["methods"].get(name, {}).get("capture")
            if cap is not None:
                caps.append(float(cap["capture"]))
                values.append(float(cap["policy"]))
        if not caps:
            continue
        c = np.asarray(caps)
        ok = c[np.isfinite(c)]
        out[name] = {"seeds": len(caps), "capture": caps, "value": values,
                     "capture_mean": float(ok.mean()) if len(ok) else float("nan"),
                     "capture_std": float(ok.std(ddof=1)) if len(ok) > 1 else float("nan"),
                     "value_mean": float(np.mean(values)),
                     "value_std": float(np.std(values, ddof=1)) if len(values) > 1
                     else float("nan")}
    return out


def seed_blocks(summary: Mapping[str, Any] | None) -> list[Block]:
    """The over-seeds table of :func:`seed_summary`."""
    if not summary:
        return []
    rows = [[n, str(s["seeds"]), fmt(s["capture_mean"]), fmt(s["capture_std"]),
             ", ".join(fmt(c) for c in s["capture"]), fmt(s["value_mean"]),
             fmt(s["value_std"])] for n, s in summary.items()]
    return [Heading("Capture over seeds"),
            _table(["method", "seeds", "capture mean", "capture sd", "per seed",
                    "net value mean", "net value sd"], rows)]
