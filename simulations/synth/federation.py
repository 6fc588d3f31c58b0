"""The frames of one synthetic federation, and a summary of them."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from common.schema import EVENT_TYPES


@dataclass
class Federation:
    """All frames of one synthetic federation.

    Attributes
    ----------
    events : the event log, sorted by merchant, user and time (schema of ``common.schema``).
    interventions : the logged campaign actions with their propensities.
    truth : per intervention, P(purchase within ``response-days`` | action) for every
        action (``p_<action>``) and the drawn outcome ``reengaged``.
    users, merchants : the latent traits and per-row counts, for analysis.
    """

    events: pd.DataFrame
    interventions: pd.DataFrame
    truth: pd.DataFrame
    users: pd.DataFrame
    merchants: pd.DataFrame

    @property
    def actions(self) -> tuple[str, ...]:
        """The action names in index order, ``none`` (the control) first."""
        return tuple(str(a) for a in self.interventions["action"].cat.categories)

    def summary(self) -> str:
        """A compact human-readable table of sizes, event mix and campaigns."""
        ev, iv, m = self.events, self.interventions, self.merchants
        ts = ev["timestamp"]
        span = f"{ts.min():%Y-%m-%d} .. {ts.max():%Y-%m-%d}" if len(ev) else "-"
        mix = ev["event"].value_counts(normalize=True).reindex(list(EVENT_TYPES), fill_value=0)
        lines = [
            f"merchants     {len(m):,}",
            f"users         {len(self.users):,}",
            f"events        {len(ev):,}  ({span})",
            "event mix     " + "  ".join(f"{k} {v:.1%}" for k, v in mix.items()),
        ]
        if len(iv):
            shares = iv["action"].value_counts(normalize=True).reindex(self.actions)
            rate = float(self.truth["reengaged"].mean())
            lines.append(
                f"campaigns     {iv['timestamp'].dt.floor('D').nunique()} rounds, "
                f"{len(iv):,} interventions, re-engaged {rate:.1%}"
            )
            lines.append("actions       " + "  ".join(f"{k} {v:.1%}" for k, v in shares.items()))
        else:
            lines.append("campaigns     none")
        q = [0.0, 0.25, 0.5, 0.75, 0.9, 1.0]
        uq, eq = m["users"].quantile(q), m["events"].quantile(q)
        lines.append(f"{'per merchant':<14}{'min':>9}{'p25':>9}{'median':>9}"
                     f"{'p75':>9}{'p90':>9}{'max':>10}")
        for name, qs in (("  users", uq), ("  events", eq)):
            lines.append(f"{name:<14}" + "".join(f"{v:>9,.0f}" for v in qs.iloc[:-1])
                         + f"{qs.iloc[-1]:>10,.0f}")
        return "\n".join(lines)
