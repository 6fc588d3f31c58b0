"""Whom each method serves badly: decay AUC, calibration and the policy's reach per segment.

For every method of a comparison, on the held-out test snapshots it already predicted
(``MethodResult.test``, nothing is predicted again), per customer segment:

- **new vs returning**: *new* when the customer's first event in the log falls inside the
  observation window before the cutoff (tenure at the cutoff <= ``observation-days``,
  i.e. no event before the window), *returning* otherwise. A log that starts late makes
  long-standing customers whose earlier history it lacks look new.
- **activity quartile**: events in the observation window (the ``log_n_<event>``
  aggregates).
- **value quartile**: spend in the observation window (``log_value_sum``).
- **merchant size quartile**: distinct customers of the customer's merchant in the test
  period, each merchant counted once for the edges.

Quartile edges are the 25/50/75 % quantiles of the test period itself (linear
interpolation); q1 holds ``x <= e1``, q2 ``e1 < x <= e2``, q3 ``e2 < x <= e3``, q4
``x > e3``, so ties at an edge fall into the lower quartile and a quartile may be empty.

Per segment and method: ROC-AUC of the decay head (``nan``, shown "—", with fewer than
:data:`MIN_ROWS` rows or one class only), the expected calibration error
(:func:`common.metrics.decay.expected_calibration_error`) and the share of rows the
activation policy (:func:`common.policy.choose_actions`, run once on every test row)
targets with an action other than ``none``. A segment whose AUC is more than
:data:`FLAG_GAP` below the method's AUC on every test row is flagged.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from simulations.render import Block, Heading, Paragraph, Table

if TYPE_CHECKING:
    from common.config import PolicyConfig
    from common.snapshots import Snapshots
    from simulations.baselines import MethodResult
    from simulations.experiment import PreparedData
    from simulations.settings import Experiment

log = logging.getLogger(__name__)

#: Fewest rows of a segment for an AUC (as per-merchant AUCs in ``assess``).
MIN_ROWS = 20
#: A segment this far below its method's overall AUC is flagged.
FLAG_GAP = 0.05
DASH = "—"


def segment_auc(y_true: Any, p: Any, min_rows: int = MIN_ROWS) -> float:
    """ROC-AUC of ``p`` for ``y_true``; ``nan`` with fewer than ``min_rows`` rows or one class."""
    from common.metrics.arrays import two_classes  # common.metrics imports scikit-learn

    y = np.asarray(y_true, dtype=float)
    if len(y) < max(min_rows, 1) or not two_classes(y):
        return float("nan")
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, np.asarray(p, dtype=float)))


def quartile_edges(x: Any) -> list[float]:
    """The 25, 50 and 75 % quantiles of ``x`` (linear interpolation); NaNs without rows."""
    v = np.asarray(x, dtype=float)
    if len(v) == 0:
        return [float("nan")] * 3
    return [float(e) for e in np.quantile(v, [0.25, 0.5, 0.75])]


def quartile_of(x: Any, edges: Sequence[float]) -> np.ndarray:
    """Quartile 1..4 of each value: q1 ``x <= e1``, q2 ``e1 < x <= e2``, q3 ``e2 < x <=
    e3``, q4 ``x > e3``."""
    return np.searchsorted(np.asarray(edges, dtype=float), np.asarray(x, dtype=float),
                           side="left") + 1


@dataclasses.dataclass(frozen=True)
class Segmentation:
    """One way of cutting the test rows: a segment name per row."""

    name: str  # e.g. "activity"
    about: str  # what the segments mean, for the report
    names: tuple[str, ...]  # the segments, in order
    of_row: np.ndarray  # str [N]: the segment of each row
    edges: tuple[float, ...] = ()  # quartile edges, when quartiles


def _aggregate(test: Snapshots, name: str) -> np.ndarray:
    """One aggregate column of ``test.static`` back on its natural scale (``expm1``)."""
    from common.features import STATIC_FEATURES

    col = STATIC_FEATURES.index(name)
    if test.static.ndim != 2 or test.static.shape[1] <= col:
        raise ValueError(f"snapshots.static: expected at least {len(STATIC_FEATURES)} "
                         f"aggregate columns (STATIC_FEATURES), got shape {test.static.shape}")
    return np.expm1(test.static[:, col].astype(np.float64))


def _quartiles(name: str, about: str, x: np.ndarray, edges: list[float] | None = None
               ) -> Segmentation:
    edges = quartile_edges(x) if edges is None else edges
    names = ("q1", "q2", "q3", "q4")
    of_row = np.asarray(names)[quartile_of(x, edges) - 1] if len(x) else np.zeros(0, str)
    return Segmentation(name, about, names, of_row, tuple(edges))


def segmentations(test: Snapshots, observation_days: float) -> list[Segmentation]:
    """New vs returning, activity, value and merchant size quartiles of ``test``'s rows."""
    from common.features import EVENT_TYPES

    tenure = _aggregate(test, "log_tenure_days")
    new = tenure <= observation_days + 1e-6  # float32 features: a hair of slack
    events = np.rint(sum((_aggregate(test, f"log_n_{ev}") for ev in EVENT_TYPES),
                         np.zeros(len(test))))
    spend = _aggregate(test, "log_value_sum")
    merchants = test.merchant_id.astype(str)
    ids, at = np.unique(merchants, return_inverse=True)
    users = np.unique(test.user_id.astype(str), return_inverse=True)[1]
    pairs = np.unique(np.stack([at, users]), axis=1)  # one column per (merchant, customer)
    customers = np.bincount(pairs[0], minlength=len(ids)).astype(float)
    return [
        Segmentation("customer", f"new: first event in the log within the {observation_days:g}"
                     "-day observation window before the cutoff; returning: earlier events",
                     ("new", "returning"), np.where(new, "new", "returning")),
        _quartiles("activity", f"events in the {observation_days:g}-day observation window",
                   events),
        _quartiles("value", f"spend (value sum) in the {observation_days:g}-day observation "
                   "window", spend),
        _quartiles("merchant size", "distinct customers of the merchant in the test period "
                   "(edges over merchants, each counted once)",
                   customers[at] if len(ids) else np.zeros(0),
                   quartile_edges(customers)),
    ]


def _cell(y: np.ndarray, p: np.ndarray, targeted: np.ndarray) -> dict[str, Any]:
    from common.metrics.decay import expected_calibration_error

    return {"auc": segment_auc(y, p), "ece": expected_calibration_error(y, p),
            "targeted": float(targeted.mean()) if len(y) else float("nan"),
            "rows": len(y), "positives": int(y.sum())}


def fairness(test: Snapshots, predictions: Mapping[str, Mapping[str, np.ndarray]],
             policy: PolicyConfig, actions: Sequence[str], observation_days: float,
             gap: float = FLAG_GAP) -> dict[str, Any]:
    """The fairness block of ``results.json``.

    ``predictions``: per method, its ``decay`` [N] and ``activation`` [N, A] on the rows
    of ``test``. Returns the definitions, the segmentations (edges, rows and positives
    per segment), per method the overall and per-segment AUC / ECE / targeted share, and
    the flags (segments more than ``gap`` below their method's overall AUC).
    """
    from common.metrics.decay import ECE_BINS
    from common.policy import choose_actions

    cuts = segmentations(test, observation_days)
    y = test.decay.astype(np.float64)
    out: dict[str, Any] = {
        "definitions": {
            "ece": f"{ECE_BINS} equal-width bins of the predicted decay risk; sum of "
                   "(rows in bin / rows) x |observed decay rate - mean predicted risk|",
            "targeted": "share of rows the activation policy (policy.* settings) gives an "
                        "action other than none, run on every test row",
            "auc": f"decay ROC-AUC; none with fewer than {MIN_ROWS} rows or one class",
            "quartiles": "edges: 25/50/75 % quantiles of the test period; q1 <= e1 < q2 "
                         "<= e2 < q3 <= e3 < q4",
            "flag": f"segment AUC more than {gap:g} below the method's overall AUC"},
        "segmentations": [{"name": c.name, "about": c.about, "edges": list(c.edges) or None,
                           "segments": {s: {"rows": int(np.sum(c.of_row == s)),
                                            "positives": int(y[c.of_row == s].sum())}
                                        for s in c.names}} for c in cuts],
        "methods": {}, "flags": [], "gap": gap, "min_rows": MIN_ROWS, "rows": len(test),
    }
    for method, pred in predictions.items():
        p = np.asarray(pred["decay"], dtype=np.float64)
        if p.shape != y.shape:
            raise ValueError(f"{method}: expected {len(y)} test decay predictions, "
                             f"got shape {p.shape}")
        decision = choose_actions(p, pred["activation"], policy, actions,
                                  test.fading_category)
        targeted = decision.action_index > 0
        entry = {"overall": _cell(y, p, targeted), "segments": {}}
        for c in cuts:
            for s in c.names:
                rows = c.of_row == s
                cell = _cell(y[rows], p[rows], targeted[rows])
                entry["segments"][f"{c.name} {s}"] = cell
                below = entry["overall"]["auc"] - cell["auc"]
                if np.isfinite(below) and below > gap:
                    out["flags"].append({"method": method, "segment": f"{c.name} {s}",
                                         "auc": cell["auc"], "overall": entry["overall"]["auc"],
                                         "below": below, "rows": cell["rows"]})
        out["methods"][method] = entry
    log.info("fairness: %d methods, %d segments, %d flagged", len(predictions),
             sum(len(c.names) for c in cuts), len(out["flags"]))
    return out


def _num(value: Any, spec: str) -> str:
    f = float("nan") if value is None else float(value)
    return format(f, spec) if np.isfinite(f) else DASH


def segment_rows(block: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The report's table: a row per segment (and "all"), a column per method holding
    ``AUC / ECE / targeted``; a flagged AUC carries a ``▼``."""
    methods = list(block["methods"])
    flagged = {(f["method"], f["segment"]) for f in block["flags"]}
    head = ["segment", "rows (decayed)", *methods]

    def cells(key: str | None) -> list[str]:
        out = []
        for m in methods:
            e = block["methods"][m]
            c = e["overall"] if key is None else e["segments"][key]
            mark = " ▼" if (m, key) in flagged else ""
            out.append(f"{_num(c['auc'], '.3f')}{mark} / {_num(c['ece'], '.3f')} / "
                       f"{_num(c['targeted'], '.0%')}")
        return out

    rows = [["all", f"{block['rows']:,}", *cells(None)]]
    for cut in block["segmentations"]:
        for s, n in cut["segments"].items():
            rows.append([f"{cut['name']} {s}", f"{n['rows']:,} ({n['positives']:,})",
                         *cells(f"{cut['name']} {s}")])
    return head, rows


def fairness_blocks(block: Mapping[str, Any] | None) -> list[Block]:
    """The report's fairness section: definitions, the table and the flags in words."""
    if not block or not block.get("methods"):
        return []
    head, rows = segment_rows(block)
    about = []
    for cut in block["segmentations"]:
        edges = cut.get("edges")
        shown = (f"; edges {', '.join(_num(e, '.4g') for e in edges)}" if edges else "")
        about.append(f"{cut['name']}: {cut['about']}{shown}")
    d = block["definitions"]
    blocks: list[Block] = [
        Heading("Fairness: decay AUC, calibration and policy reach per segment"),
        Paragraph("Each cell: decay ROC-AUC / expected calibration error / share targeted "
                  f"by the policy, on the held-out test rows. ECE: {d['ece']}. Targeted: "
                  f"{d['targeted']}. {DASH}: fewer than {block['min_rows']} rows or one class "
                  f"only. Quartiles: "
                  f"{d['quartiles']}. ▼: {d['flag']}."),
        Paragraph("Segments. " + " ".join(f"{a}." for a in about)),
        Table(tuple(head), tuple(tuple(r) for r in rows)),
    ]
    flags = block["flags"]
    if flags:
        words = []
        for method in dict.fromkeys(f["method"] for f in flags):
            mine = [f for f in flags if f["method"] == method]
            words.append(f"{method} (overall {_num(mine[0]['overall'], '.3f')}): " + ", ".join(
                f"{f['segment']} {_num(f['auc'], '.3f')} ({_num(-f['below'], '+.3f')}, "
                f"{f['rows']:,} rows)" for f in mine))
        blocks.append(Paragraph(f"Flagged, {len(flags)} segments: " + "; ".join(words) + "."))
    else:
        blocks.append(Paragraph(f"No segment is more than {block['gap']:g} AUC below its "
                                "method's overall AUC."))
    blocks.append(Paragraph(
        "Read the AUC of a segmentation whose variable itself predicts decay (activity, "
        "value) against its sibling segments as well as against the overall: within one "
        "segment the easy ranking across segments no longer counts, so every segment can "
        "sit below the overall AUC without any group being served worse than another."))
    return blocks


def write_fairness_plot(block: Mapping[str, Any] | None, run_dir: Path,
                        save: Callable[[Any, Path, str], str]) -> str | None:
    """``fairness.png``: decay AUC per segment, one marker series per method, its overall
    AUC as a dotted line; ``save(fig, run_dir, name)`` writes it. None without methods."""
    if not block or not block.get("methods"):
        return None
    import matplotlib.pyplot as plt

    keys = [f"{c['name']} {s}" for c in block["segmentations"] for s in c["segments"]]
    methods = list(block["methods"])
    fig, ax = plt.subplots(figsize=(max(7.0, 0.55 * len(keys)), 4.2))
    width = 0.7 / max(len(methods), 1)
    for i, m in enumerate(methods):
        e = block["methods"][m]
        xs = np.arange(len(keys)) - 0.35 + width * (i + 0.5)
        ys = [np.nan if e["segments"][k]["auc"] is None else e["segments"][k]["auc"]
              for k in keys]
        dots = ax.plot(xs, ys, marker="o", linestyle="none", label=m)
        overall = e["overall"]["auc"]
        if overall is not None and np.isfinite(overall):
            ax.axhline(overall, color=dots[0].get_color(), linestyle=":", linewidth=0.8)
    start = 0
    for c in block["segmentations"][:-1]:
        start += len(c["segments"])
        ax.axvline(start - 0.5, color="lightgrey", linewidth=0.8)
    ax.set_xticks(range(len(keys)), keys, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("decay ROC-AUC (held-out test)")
    ax.set_title("Decay AUC per segment (dotted: each method's overall)")
    ax.legend(fontsize=7, ncol=min(len(methods), 3))
    return save(fig, run_dir, "fairness.png")


def fairness_of(outcomes: Sequence[MethodResult], data: PreparedData, exp: Experiment
                ) -> dict[str, Any]:
    """:func:`fairness` of a comparison's ``MethodResult`` list on ``data``'s test split."""
    test = data.snapshots.split_part("test")
    return fairness(test, {o.name: o.test for o in outcomes}, exp.policy, data.actions,
                    data.snapshot_config.observation_days)
