"""Are the reasons faithful and stable? (``fedecay explain``, issue 19 item 3.)

Faithfulness: on held-out customers, delete each one's top-k events by integrated-gradients
attribution (the steps pushing the risk up most) and, separately, k events chosen at
random; the mean drop in decay risk per k is the deletion curve. Faithful attributions
drop the risk more than random deletions. A deleted event leaves the sequence (the
events before it move up, the pre-padding grows, the next event's gap is measured from
the event before the deleted one); the aggregates stay as they were, so the curve
measures what the sequence attributions say about the sequence.

Stability: the same customers' group attributions under two models (a second run of the
same method with another seed, or a second model file): per customer the Spearman rank
correlation of the six group attributions, and how often the top group agrees.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from common.feature_groups import GROUP_NAMES
from common.features import NUMERIC_FEATURES
from common.progress import SILENT, Progress
from common.reasons import Reference, integrated_gradients
from common.snapshots import Snapshots

log = logging.getLogger(__name__)

#: Events deleted per customer: 1..MAX_K.
MAX_K = 5
_GAP = NUMERIC_FEATURES.index("log_gap_hours")
_HOURS = NUMERIC_FEATURES.index("log_hours_to_cutoff")


def delete_steps(snaps: Snapshots, drop: np.ndarray) -> Snapshots:
    """``snaps`` without the steps ``drop`` marks (bool [N, L]): kept steps move to the
    end (latest last), padding fills the front, a kept step after a deleted one gets
    its gap from the kept step before it."""
    n, length = snaps.events.shape
    keep = (snaps.events > 0) & ~drop
    pos = np.arange(length)
    order = np.argsort(keep * length + pos, axis=1, kind="stable")
    take = lambda a: np.take_along_axis(a, order if a.ndim == 2 else order[..., None],  # noqa: E731
                                        axis=1)
    kept = take(keep)
    events = np.where(kept, take(snaps.events), 0)
    categories = np.where(kept, take(snaps.categories), 0)
    numeric = np.where(kept[..., None], take(snaps.numeric), 0.0).astype(np.float32)
    # Gaps between kept neighbours, in hours: hours_to_cutoff(previous) - hours_to_cutoff.
    hours = np.expm1(numeric[..., _HOURS].astype(np.float64))
    prev_kept = np.zeros_like(kept)
    prev_kept[:, 1:] = kept[:, :-1]
    gap = np.log1p(np.maximum(np.roll(hours, 1, axis=1) - hours, 0.0))
    numeric[..., _GAP] = np.where(kept & prev_kept, gap, numeric[..., _GAP])
    return dataclasses.replace(snaps, events=events.astype(np.int32),
                               categories=categories.astype(np.int32), numeric=numeric)


def deletion_curve(model: Any, snaps: Snapshots, reference: Reference, *, seed: int = 0,
                   max_k: int = MAX_K, progress: Progress = SILENT) -> dict[str, Any]:
    """Mean drop in decay risk after deleting each customer's top-k attributed events
    vs k random ones, k = 1..max_k, over customers with more than ``max_k`` events."""
    from common.training import predict

    real = snaps.events > 0
    rows = np.flatnonzero(real.sum(axis=1) > max_k)
    if len(rows) == 0:
        raise ValueError(f"no held-out customer has more than {max_k} events in its sequence")
    snaps = snaps.subset(rows)
    real = real[rows]
    with progress.task("attributing held-out customers", 1, "steps") as task:
        attr = integrated_gradients(model, snaps, reference)
        task.advance()
    risk = predict(model, snaps)["decay"].astype(np.float64)
    rng = np.random.default_rng(seed)
    by_attr = np.argsort(np.where(real, -attr.steps, np.inf), axis=1, kind="stable")
    random_rank = np.argsort(np.where(real, rng.random(real.shape), np.inf), axis=1)
    rows_out = []
    with progress.task("deleting events", max_k, "k") as task:
        for k in range(1, max_k + 1):
            out = {"k": k}
            for name, ranking in (("top", by_attr), ("random", random_rank)):
                drop = np.zeros_like(real)
                np.put_along_axis(drop, ranking[:, :k], True, axis=1)
                after = predict(model, delete_steps(snaps, drop & real))["decay"]
                change = risk - after.astype(np.float64)
                out[f"{name}_risk_drop"] = float(change.mean())
                out[f"{name}_risk_drop_se"] = float(change.std(ddof=1) / np.sqrt(len(change)))
            rows_out.append(out)
            task.advance()
    return {"customers": len(rows), "mean_risk": float(risk.mean()),
            "ig_completeness_gap": float(np.abs(attr.delta).mean()), "curve": rows_out}


def rank_stability(first: np.ndarray, second: np.ndarray) -> dict[str, Any]:
    """Per-customer Spearman correlation of two ``[N, G]`` group attributions, and the
    share of customers whose top group agrees."""
    def ranks(a: np.ndarray) -> np.ndarray:
        return np.argsort(np.argsort(a, axis=1, kind="stable"), axis=1).astype(np.float64)

    ra, rb = ranks(first), ranks(second)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    rho = (ra * rb).sum(axis=1) / np.sqrt((ra**2).sum(axis=1) * (rb**2).sum(axis=1))
    # Mean |attribution| per group: the global ranking each model gives.
    glob = [np.abs(a).mean(axis=0) for a in (first, second)]
    g_rho = float(np.corrcoef(ranks(glob[0][None])[0], ranks(glob[1][None])[0])[0, 1])
    return {
        "customers": len(first),
        "spearman_mean": float(np.nanmean(rho)),
        "spearman_median": float(np.nanmedian(rho)),
        "top_group_agreement": float((first.argmax(axis=1) == second.argmax(axis=1)).mean()),
        "global_spearman": g_rho,
        "mean_abs_by_group": {m: dict(zip(GROUP_NAMES, map(float, g), strict=True))
                              for m, g in zip(("first", "second"), glob, strict=True)},
    }


def plot_curve(faith: dict[str, Any], path: Path) -> Path:
    """The deletion curve as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r["k"] for r in faith["curve"]]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, style in (("top", "o-"), ("random", "s--")):
        ax.errorbar(ks, [r[f"{name}_risk_drop"] for r in faith["curve"]],
                    yerr=[1.96 * r[f"{name}_risk_drop_se"] for r in faith["curve"]],
                    fmt=style, capsize=3,
                    label="top-k attributed events" if name == "top" else "k random events")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("events deleted per customer (k)")
    ax.set_ylabel("mean drop in decay risk")
    ax.set_title(f"Deletion curve ({faith['customers']:,} held-out customers)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_explanations(result: dict[str, Any]) -> str:
    """The curve and the stability figures as plain-text tables."""
    faith = result["faithfulness"]
    lines = [f"deletion curve: {faith['customers']:,} held-out customers, mean risk "
             f"{faith['mean_risk']:.3f}, IG completeness gap {faith['ig_completeness_gap']:.4f}",
             "  k   drop (top-k attributed)   drop (k random)"]
    for r in faith["curve"]:
        lines.append(f"  {r['k']}   {r['top_risk_drop']:+.4f} ± {1.96 * r['top_risk_drop_se']:.4f}"
                     f"        {r['random_risk_drop']:+.4f} ± "
                     f"{1.96 * r['random_risk_drop_se']:.4f}")
    points = result.get("quadrature")
    if points:
        lines.append(f"IG points vs {points[-1]['points']} ({points[0]['customers']:,} "
                     "customers): agreement of the top reason, of the top 3 in order; mean "
                     "completeness gap (relative to |f(x) - f(reference)|); risk removed by "
                     "occluding the top group (share of customers where it removes the most)")
        lines += [f"  {r['points']:>2}   {r['top_reason_agreement']:6.1%}   "
                  f"{r['top3_reasons_agreement']:6.1%}   {r['completeness_gap']:.5f} "
                  f"({r['relative_gap']:.1%})   {r['top_group_occlusion_drop']:+.4f} "
                  f"({r['top_group_is_largest_occlusion']:.1%})" for r in points]
        lines.append(f"  occluding the group that removes the most: "
                     f"{points[0]['largest_occlusion_drop']:+.4f}; a random group: "
                     f"{points[0]['random_group_occlusion_drop']:+.4f}")
    stab = result.get("stability")
    if stab:
        lines.append(f"rank stability ({stab['against']}): Spearman per customer mean "
                     f"{stab['spearman_mean']:.3f}, median {stab['spearman_median']:.3f}; "
                     f"top group agrees for {stab['top_group_agreement']:.1%}; global "
                     f"ranking Spearman {stab['global_spearman']:.3f}")
    return "\n".join(lines)


#: IG points compared with the reference rule in :func:`quadrature_agreement`.
QUADRATURE_POINTS: tuple[int, ...] = (1, 2, 4, 8)
#: Points of the reference rule (close to the exact integral).
EXACT_POINTS = 32


def quadrature_agreement(model: Any, snaps: Snapshots, reference: Reference, facts: Any, *,
                         points: tuple[int, ...] = QUADRATURE_POINTS,
                         exact: int = EXACT_POINTS, progress: Progress = SILENT
                         ) -> list[dict[str, Any]]:
    """How far IG with few Gauss-Legendre points is from ``exact`` points, per rule:
    the share of customers whose top reason code, top-3 codes (in order) and top group
    agree with the reference rule's, and the mean completeness gap |sum - (f(x) -
    f(reference))|, also relative to the mean |f(x) - f(reference)|. One point is the
    midpoint rule: gradient at the midpoint x (input - reference).

    And how faithful each rule's top reason is: the mean risk removed by occluding its top
    group (:func:`common.reasons.ig.occlude_groups`) and how often that group is the one
    whose occlusion removes the most; every row also carries the two yardsticks (the
    largest occlusion's mean, a random group's)."""
    from common.reasons import integrated_gradients, reasons_of
    from common.reasons.ig import occlude_groups

    rules = (*points, exact)
    out: dict[int, Any] = {}
    with progress.task("IG with each number of points", len(rules) + 1, "rules") as task:
        for k in rules:
            attr = integrated_gradients(model, snaps, reference, steps=k)
            out[k] = (attr, reasons_of(facts, attr.groups).codes)
            task.advance()
        occluded = occlude_groups(model, snaps, reference).astype(np.float64)
        task.advance()
    ref_attr, ref_codes = out[exact]
    spread = float(np.abs(ref_attr.risk - ref_attr.reference_risk).mean())
    each = np.arange(len(snaps))
    # The scale for the rules' figures: the most any one group's occlusion removes, and
    # what a group drawn at random removes.
    scale = {"largest_occlusion_drop": float(occluded.max(axis=1).mean()),
             "random_group_occlusion_drop": float(occluded[each, np.random.default_rng(0)
                                                           .integers(0, occluded.shape[1],
                                                                     len(snaps))].mean())}
    rows = []
    for k in rules:
        attr, codes = out[k]
        top = attr.groups.argmax(axis=1)
        rows.append({
            "points": k, "customers": len(snaps),
            "top_reason_agreement": float(np.mean([a[:1] == b[:1]
                                                   for a, b in zip(codes, ref_codes,
                                                                   strict=True)])),
            "top3_reasons_agreement": float(np.mean([a == b for a, b in zip(codes, ref_codes,
                                                                            strict=True)])),
            "top_group_agreement": float((attr.groups.argmax(axis=1)
                                          == ref_attr.groups.argmax(axis=1)).mean()),
            "completeness_gap": float(np.abs(attr.delta).mean()),
            "relative_gap": float(np.abs(attr.delta).mean() / max(spread, 1e-12)),
            # Faithfulness of the rule's top reason: the risk it removes when occluded,
            # against the group whose occlusion removes the most.
            "top_group_occlusion_drop": float(occluded[each, top].mean()),
            "top_group_is_largest_occlusion": float((top == occluded.argmax(axis=1)).mean()),
            **scale,
        })
    return rows
