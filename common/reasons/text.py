"""Reasons in words: which ones the attributions pick, and the customer's own figures.

Each feature group has a few reasons, tried in order; the first whose condition holds on
the customer's figures (:class:`~common.reasons.facts.Facts`) speaks for the group, and
every group has one that always holds. Groups are taken by attribution, largest first,
those pushing the risk up (> 0) only (at least one group is always shown), one reason
per group. The codes (``REASON_CODES``) are stable, so they can be counted.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from common.feature_groups import GROUP_NAMES
from common.reasons.facts import RECENT_EVENTS, Facts

#: Reasons shown per customer.
TOP_REASONS = 3
#: A drop counts from this share down (activity, spend, interest, a category).
MIN_DROP = 0.2
#: Fewest events a week before the last 7 days for "activity down": at 0.1 a week, none
#: in the last 7 days is what the customer usually does, not a drop.
MIN_WEEKLY_EVENTS = 1.0
#: "Overdue" from this multiple of the customer's usual gap between events.
OVERDUE_RATIO = 2.0
#: Shortest usual gap an "overdue" reason compares with: several events at one visit
#: (a basket's items) make gaps of minutes, against which any absence looks overdue.
OVERDUE_MIN_GAP_DAYS = 1.0
#: "No purchase" from this many days.
INACTIVE_DAYS = 7.0

Rule = Callable[[Facts, int], "str | None"]


def _num(x: float) -> str:
    x = float(x)
    return f"{x:.0f}" if abs(x - round(x)) < 0.05 or abs(x) >= 10 else f"{x:.1f}"


def _days(x: float) -> str:
    x = float(x)
    return "1 day" if round(x) == 1 and x >= 0.5 else (
        f"{_num(x)} days" if x >= 1 else f"{x * 24:.0f} hours")


def _plural(n: float, word: str) -> str:
    return f"{_num(n)} {word}{'' if _num(n) == '1' else 's'}"


def _drop(before: float, after: float) -> float:
    return (before - after) / before if before > 0 else 0.0


def _weeks_before(f: Facts, window_days: float) -> str:
    return _plural(max(window_days - 7.0, 0.0) / 7.0, "previous week")


# --- one function per reason: the text, or None when the figures do not say it --------

def _cart(f: Facts, i: int) -> str | None:
    if not f.cart_open[i]:
        return None
    return f"cart without purchase ({_days(f.cart_days[i])} ago)"


def _browsing(f: Facts, i: int) -> str | None:
    n = int(f.recent_n[i])
    if n == 0 or f.recent_purchases[i] > 0 or f.recent_views[i] * 2 < n:
        return None
    return f"only browsing: {f.recent_views[i]} of the last {n} events are views, no purchase"


def _mix(f: Facts, i: int) -> str | None:
    return (f"last {int(f.recent_n[i])} events: {_plural(f.recent_views[i], 'view')}, "
            f"{_plural(f.recent_purchases[i], 'purchase')}")


def _activity_drop(f: Facts, i: int) -> str | None:
    before, now = f.weekly_before[i], f.events_7d[i]
    if not math.isfinite(before) or before < MIN_WEEKLY_EVENTS or _drop(before, now) < MIN_DROP:
        return None
    return (f"activity down {_drop(before, now):.0%} on the previous weeks "
            f"({_plural(now, 'event')} in the last 7 days vs {_num(before)} a week before)"
            ).replace("%", " %")


def _low_activity(f: Facts, i: int) -> str | None:
    return f"{_plural(f.window_events[i], 'event')} in the observation window"


def _category(f: Facts, i: int) -> str | None:
    then, now = f.cat_then[i][0], f.cat_now[i][0]
    # Only a drop the fading list shows too: a category at 0.04 -> 0.01 is no reason.
    if f.cat_bucket[i][0] == 0 or _drop(then, now) < MIN_DROP or not _shown(then, now):
        return None
    return f"interest in category {f.cat_name[i][0]} faded (\u2212{_drop(then, now):.0%})" \
        .replace("%", " %")


def _few_categories(f: Facts, i: int) -> str | None:
    return f"{_plural(f.n_categories[i], 'category')} in the observation window".replace(
        "categorys", "categories")


def _inactive(f: Facts, i: int) -> str | None:
    days = f.purchase_days[i]
    if math.isnan(days):  # none among the events the snapshot holds
        return (f"no purchase in the last {_plural(f.seq_n[i], 'event')} "
                f"({_days(f.seq_days[i])})")
    if days < INACTIVE_DAYS:
        return None
    return f"no purchase for {_days(days)}"


def _overdue(f: Facts, i: int) -> str | None:
    if f.overdue[i] < OVERDUE_RATIO or f.usual_gap_days[i] < OVERDUE_MIN_GAP_DAYS:
        return None
    return (f"last visit {_days(f.recency_days[i])} ago, {f.overdue[i]:.1f}\u00d7 the usual "
            f"gap of {_days(f.usual_gap_days[i])}")


def _last_visit(f: Facts, i: int) -> str | None:
    return f"last visit {_days(f.recency_days[i])} ago"


def _spend_drop(f: Facts, i: int) -> str | None:
    before, now = f.value_weekly_before[i], f.value_7d[i]
    if not math.isfinite(before) or _drop(before, now) < MIN_DROP:
        return None
    return (f"spend down {_drop(before, now):.0%} on the previous weeks ({now:.2f} in the "
            f"last 7 days vs {before:.2f} a week before)").replace("%", " %")


def _low_spend(f: Facts, i: int) -> str | None:
    return f"spend {f.window_value[i]:.2f} in the observation window"


def _interest_drop(f: Facts, i: int) -> str | None:
    then, now = f.interest_then[i], f.interest_now[i]
    if _drop(then, now) < MIN_DROP:
        return None
    return (f"interest score down {_drop(then, now):.0%} ({then:.1f} \u2192 {now:.1f})"
            ).replace("%", " %")


def _interest_low(f: Facts, i: int) -> str | None:
    return f"interest score {f.interest_now[i]:.1f}"


#: Per group, its reasons in the order they are tried: (code, rule).
RULES: dict[str, tuple[tuple[str, Rule], ...]] = {
    "event_mix": (("cart_without_purchase", _cart), ("browsing_only", _browsing),
                  ("event_mix", _mix)),
    "activity": (("activity_drop", _activity_drop), ("low_activity", _low_activity)),
    "categories": (("category_faded", _category), ("few_categories", _few_categories)),
    "recency": (("inactive", _inactive), ("overdue", _overdue), ("last_visit", _last_visit)),
    "value": (("spend_drop", _spend_drop), ("low_spend", _low_spend)),
    "interest": (("interest_fading", _interest_drop), ("interest_low", _interest_low)),
}
#: Every reason code, in group order.
REASON_CODES: tuple[str, ...] = tuple(code for g in GROUP_NAMES for code, _ in RULES[g])


@dataclasses.dataclass
class Reasons:
    """Per customer: reason codes and texts (best first) and the fading categories."""

    codes: list[tuple[str, ...]]
    texts: list[tuple[str, ...]]
    fading: list[str]  # "c17 4.1→0.6|c3 2.0→0.9"

    def columns(self) -> dict[str, list[str]]:
        """The score table's columns: ``reasons`` ("; "-joined), ``reason_codes``
        ("|"-joined) and ``fading_categories``."""
        return {"reasons": ["; ".join(t) for t in self.texts],
                "reason_codes": ["|".join(c) for c in self.codes],
                "fading_categories": list(self.fading)}


def reasons_of(facts: Facts, groups: np.ndarray, top: int = TOP_REASONS) -> Reasons:
    """The reasons of every customer from its figures and its group attributions
    ``[N, len(GROUP_NAMES)]``."""
    if groups.shape != (len(facts), len(GROUP_NAMES)):
        raise ValueError(f"group attributions of shape {groups.shape}, expected "
                         f"{(len(facts), len(GROUP_NAMES))}")
    # Stable order: by attribution, ties by GROUP_NAMES order.
    order = np.argsort(-groups, axis=1, kind="stable")[:, :top].tolist()
    values = groups.tolist()
    rules = [RULES[name] for name in GROUP_NAMES]
    plain = facts.as_lists()
    codes: list[tuple[str, ...]] = []
    texts: list[tuple[str, ...]] = []
    for i, (picked, value) in enumerate(zip(order, values, strict=True)):
        c_i: list[str] = []
        t_i: list[str] = []
        for g in picked:
            if c_i and value[g] <= 0:
                break
            for code, rule in rules[g]:
                text = rule(plain, i)
                if text is not None:
                    c_i.append(code)
                    t_i.append(text)
                    break
        codes.append(tuple(c_i))
        texts.append(tuple(t_i))
    return Reasons(codes, texts, fading_lists(plain))


def fading_lists(facts: Facts) -> list[str]:
    """Per customer, "name then→now" of its fading categories, "|"-joined (``facts``
    with arrays or :meth:`~common.reasons.facts.Facts.as_lists`)."""
    if isinstance(facts.cat_bucket, np.ndarray):
        facts = facts.as_lists()
    out = []
    for names, buckets, thens, nows in zip(facts.cat_name, facts.cat_bucket, facts.cat_then,
                                           facts.cat_now, strict=True):
        parts = []
        for name, bucket, then, now in zip(names, buckets, thens, nows, strict=True):
            if bucket > 0 and _shown(then, now):
                parts.append(f"{name} {then:.1f}\u2192{now:.1f}")
        out.append("|".join(parts))
    return out


def _shown(then: float, now: float) -> bool:
    """Whether a category's interest then -> now says something: a drop that rounds
    away at one decimal (0.0→0.0) does not."""
    return f"{then:.1f}" != f"{now:.1f}"


__all__ = ["REASON_CODES", "RECENT_EVENTS", "RULES", "TOP_REASONS", "Reasons", "reasons_of"]
