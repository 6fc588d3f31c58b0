"""What a load returns: the events, the interventions and a report of every row read."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

#: Reasons rows are dropped on purpose (keys of :attr:`LoadReport.dropped`).
DUPLICATE = "exact duplicate"
OUTSIDE_WINDOW = "outside window"
MALFORMED = "malformed CSV row (wrong number of fields or an unterminated quote)"
#: A line a quote read into a malformed row (one that never closes: every non-blank line
#: after it; a stray one closed lines later: those holding a separator inside it): each
#: would have been a row of its own, so each is counted.
UNCLOSED_QUOTE = "line read into a malformed row by a quote (each line counted)"
#: Reasons the CSV parser drops rows (they are read, then dropped).
PARSE_DROPS = (MALFORMED, UNCLOSED_QUOTE)


@dataclass
class LoadReport:
    """What a load read, kept, dropped (reason -> rows) and filled (column -> rows)."""

    path: str
    format: str
    rows_read: int = 0
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    filled: dict[str, int] = field(default_factory=dict)
    #: the interventions file read, if one was given (Complete Journey's come from its folder)
    interventions_path: str | None = None
    interventions_read: int = 0
    interventions_kept: int = 0
    interventions_dropped: dict[str, int] = field(default_factory=dict)
    #: interventions kept, by action (every configured action, zero included)
    interventions_actions: dict[str, int] = field(default_factory=dict)
    #: interventions whose propensity was missing (filled with the action's share)
    propensities_filled: int = 0
    #: (merchant, user, time) logged with two or more actions: the first in the file counts
    interventions_ambiguous: int = 0

    def summary_lines(self) -> list[str]:
        """Human-readable lines, one fact each."""
        lines = [f"{self.path} ({self.format}): {self.rows_read:,} rows read, "
                 f"{self.rows_kept:,} kept"]
        lines += [f"  dropped {n:,} rows: {why}" for why, n in self.dropped.items() if n]
        lines += [f"  filled {n:,} missing {col}" for col, n in self.filled.items() if n]
        if self.interventions_read:
            lines.append(f"  interventions: {self.interventions_read:,} read, "
                         f"{self.interventions_kept:,} kept")
            lines += [f"    dropped {n:,} interventions: {why}"
                      for why, n in self.interventions_dropped.items() if n]
            lines += self._intervention_notes()
        elif self.interventions_path is not None:
            lines.append(f"  interventions: none ({self.interventions_path} has a header only): "
                         "no action's effect can be learnt from it")
        return lines

    def _intervention_notes(self) -> list[str]:
        """The actions' counts and what the learner will make of the file."""
        if not self.interventions_kept:
            return []
        counts = self.interventions_actions
        lines = ["    by action: " + ", ".join(f"{a} {n:,}" for a, n in counts.items())]
        if self.propensities_filled:
            lines.append(f"    filled {self.propensities_filled:,} missing propensity with "
                         "the action's share of the file")
        if self.interventions_ambiguous:
            lines.append(f"    two or more actions logged for one customer at one moment: "
                         f"{self.interventions_ambiguous:,} such moments; the first in the "
                         "file counts")
        control = next(iter(counts), None)
        if control is not None and not counts[control]:
            lines.append(f"    no control rows (action '{control}'): on its own this file "
                         "cannot tell an action's effect from doing nothing")
        elif control is not None and not any(n for a, n in counts.items() if a != control):
            lines.append("    only control rows: no action's effect can be learnt from it")
        return lines


@dataclass(eq=False)
class EventLog:
    """A loaded log: canonical events, interventions (may be empty) and the report."""

    events: pd.DataFrame
    interventions: pd.DataFrame
    report: LoadReport


def add_count(counts: dict[str, int], key: str, n: int) -> None:
    """Add ``n`` rows to ``counts[key]``; a zero count adds no key."""
    if n:
        counts[key] = counts.get(key, 0) + int(n)
