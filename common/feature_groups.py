"""Feature groups: the named factors every explanation speaks of.

A customer's reasons (``fedecay score``, monitor alerts), the global attributions the
merchants compute in the federation and the tabular models' importances all report the
same groups, so their names are stable and can be counted. Each group is a set of model
inputs: channels of the sequence inputs and columns of the aggregates
(``AGGREGATE_FEATURES``).

| group | sequence inputs | aggregates |
|---|---|---|
| ``event_mix`` | the event types of the last events | the funnel's rates |
| ``activity`` | — | event counts by type, in the last 7/30 days, over the history |
| ``categories`` | the hashed categories of the last events | distinct, the top one's share |
| ``recency`` | gaps between events, time before the cutoff | recency, tenure, cadence |
| ``value`` | the value of each event | value sum, value per event |
| ``interest`` | — | the interest score ``I(T)`` |
"""

from __future__ import annotations

import dataclasses

from common.features import AGGREGATE_FEATURES, NUMERIC_FEATURES
from common.vocabulary import EVENT_TYPES


@dataclasses.dataclass(frozen=True)
class FeatureGroup:
    """One factor: which model inputs carry it.

    ``sequence``: names of the whole sequence inputs (``events``, ``categories``);
    ``numeric``: indices of ``NUMERIC_FEATURES`` channels; ``aggregates``: names in
    ``AGGREGATE_FEATURES``.
    """

    name: str
    sequence: tuple[str, ...] = ()
    numeric: tuple[int, ...] = ()
    aggregates: tuple[str, ...] = ()

    def aggregate_columns(self, width: int | None = None) -> tuple[int, ...]:
        """Columns of ``Snapshots.static`` in this group, below ``width`` if given (a
        model that reads only the first columns)."""
        cols = tuple(AGGREGATE_FEATURES.index(a) for a in self.aggregates)
        return cols if width is None else tuple(c for c in cols if c < width)


def _numeric(*names: str) -> tuple[int, ...]:
    return tuple(NUMERIC_FEATURES.index(n) for n in names)


FEATURE_GROUPS: tuple[FeatureGroup, ...] = (
    FeatureGroup("event_mix", sequence=("events",), aggregates=(
        "log_click_per_view", "log_favorite_per_click", "log_purchase_per_cart")),
    FeatureGroup("activity", aggregates=(
        *(f"log_n_{ev}" for ev in EVENT_TYPES), "log_n_history", "log_n_last_7d",
        "log_n_last_30d")),
    FeatureGroup("categories", sequence=("categories",),
                 aggregates=("log_n_categories", "top_category_share")),
    FeatureGroup("recency", numeric=_numeric("log_gap_hours", "log_hours_to_cutoff"),
                 aggregates=(
                     "log_recency_days", "log_tenure_days", "log_gap_window_mean_days",
                     "log_gap_window_median_days", "log_gap_window_std_days",
                     "log_gap_last_days", "log_gap_history_mean_days",
                     "log_gap_recent_median_days", "log_gap_recent_std_days",
                     "log_recency_over_gap")),
    FeatureGroup("value", numeric=_numeric("log_value"),
                 aggregates=("log_value_sum", "log_value_per_event")),
    FeatureGroup("interest", aggregates=("log_interest",)),
)
#: The group names, in report order.
GROUP_NAMES: tuple[str, ...] = tuple(g.name for g in FEATURE_GROUPS)


def group_of_aggregate(name: str) -> str:
    """The group an aggregate column belongs to (``ValueError`` for an unknown name)."""
    for group in FEATURE_GROUPS:
        if name in group.aggregates:
            return group.name
    raise ValueError(f"aggregate feature {name!r} is in no feature group")
