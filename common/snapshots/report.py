"""What the snapshot builder did, and whether its snapshots can join a federation."""

from __future__ import annotations

import dataclasses

import pandas as pd

from common.snapshots.container import SPLITS, Snapshots


@dataclasses.dataclass
class SnapshotReport:
    """What the builder did: cutoffs per split, counts and label rates."""

    cutoffs: dict[str, list[str]]
    skipped_cutoffs: list[str]
    snapshots: dict[str, int]
    decay_rate: dict[str, float]
    activation_rows: dict[str, int]
    interventions_unmatched: int
    interventions_unobserved: int
    #: cutoffs per split at which no user was active (they yield no snapshots)
    empty_cutoffs: dict[str, int] = dataclasses.field(default_factory=dict)

    def summary_lines(self) -> list[str]:
        """Indented lines for the log: per split the cutoffs, their span, snapshots, decay
        rate and rows with an intervention; then, when any, the cutoffs without an active
        user, the cutoffs left out between splits and the unmatched or unobserved
        interventions."""
        lines = []
        for s in SPLITS:
            cut = self.cutoffs.get(s, [])
            span = f"{cut[0]} .. {cut[-1]}" if cut else "-"
            lines.append(
                f"  {s:<5} cutoffs {len(cut):>2} ({span})  snapshots {self.snapshots.get(s, 0):>8,}"
                f"  decay rate {self.decay_rate.get(s, float('nan')):.3f}"
                f"  with intervention {self.activation_rows.get(s, 0):>6,}"
            )
        empty = {s: n for s, n in self.empty_cutoffs.items() if n}
        if empty:
            lines.append("  cutoffs without any active user: " + ", ".join(
                f"{s} {n}" for s, n in empty.items()))
        if self.skipped_cutoffs:
            lines.append(f"  cutoffs left out between splits (label windows would cross): "
                         f"{len(self.skipped_cutoffs)}")
        if self.interventions_unmatched or self.interventions_unobserved:
            lines.append(
                f"  interventions without an active snapshot: {self.interventions_unmatched:,};"
                f" response window past the end of the log: {self.interventions_unobserved:,}"
            )
        return lines


def federation_problems(snaps: Snapshots, report: SnapshotReport,
                        min_train_snapshots: int) -> list[str]:
    """Why these snapshots cannot join a federation; empty when they can.

    A merchant needs at least ``min_train_snapshots`` training snapshots (merchants with
    fewer are left out of a federation) and the log needs snapshots in the validation
    and test periods, or the model is scored on nothing; interventions that were given
    must meet some snapshot, or the activation heads learn from nothing.
    """
    problems = _unscorable(snaps, report)
    if report.interventions_unmatched and not sum(report.activation_rows.values()):
        problems.append(
            f"none of the {report.interventions_unmatched:,} interventions meets an active "
            "snapshot (the same user and merchant, within snapshots.intervention-window-days "
            "after a cutoff): check that their user_id and merchant_id are the events "
            "file's, and their times inside its span")
    train = snaps.split == 0
    sizes = pd.Series(snaps.merchant_id[train].astype(str)).value_counts()
    need = max(min_train_snapshots, 1)
    if not (sizes >= need).any():
        largest = (f"largest: merchant {sizes.index[0]} with {int(sizes.iloc[0]):,}"
                   if len(sizes) else "there are none")
        problems.append(
            f"no merchant has the {need:,} training snapshots a federation needs "
            f"(data.min-merchant-snapshots; {largest}); add history, lower "
            "snapshots.stride-days, or lower data.min-merchant-snapshots")
    return problems


def unscorable(snaps: Snapshots, report: SnapshotReport) -> str | None:
    """Why no model can be trained and scored on these snapshots (an empty validation or
    test period, training labels of one class), or None; every training command checks
    it, so that such settings fail instead of writing a model scored on nothing."""
    problems = _unscorable(snaps, report)
    return "; ".join(problems) if problems else None


def _unscorable(snaps: Snapshots, report: SnapshotReport) -> list[str]:
    problems = []
    for i, name in enumerate(SPLITS[1:], 1):
        if not (snaps.split == i).any():
            cut = report.cutoffs.get(name, [])
            problems.append(
                f"the {'validation' if name == 'val' else 'test'} period has no snapshots "
                f"(cutoffs {', '.join(cut) or '-'}: no user active in the observation "
                "window before them); the end of the log is empty or holds a few stray "
                "late rows: remove them, or lower snapshots.horizon-days / stride-days "
                "(or move snapshots.start / end, when set, inside the log)")
    labels = snaps.decay[snaps.split == 0]
    if len(labels) and (labels.min() == labels.max()):
        problems.append(
            f"every training snapshot has decay label {int(labels[0])} (decay rate "
            f"{float(labels.mean()):.3f}): there is nothing to learn; check snapshots.rho, "
            "tau-days and the weight-* settings")
    return problems
