"""The canonical behaviour-event and intervention frames shared by every layer.

Every adapter turns its own format into these frames; everything downstream
(snapshots, training, scoring) trusts them.
"""

from __future__ import annotations

import pandas as pd

from common.vocabulary import DEFAULT_ACTIONS, EVENT_TYPES

REQUIRED_EVENT_COLUMNS: tuple[str, ...] = ("user_id", "timestamp", "event")
OPTIONAL_EVENT_COLUMNS: tuple[str, ...] = ("item_id", "category_id", "merchant_id", "value")
EVENT_COLUMNS: tuple[str, ...] = REQUIRED_EVENT_COLUMNS + OPTIONAL_EVENT_COLUMNS

INTERVENTION_COLUMNS: tuple[str, ...] = (
    "user_id", "timestamp", "action", "propensity", "merchant_id",
)

#: Category given to events whose log has no category column.
DEFAULT_CATEGORY = "all"
#: Merchant given to events whose log has no merchant column (one file = one merchant).
DEFAULT_MERCHANT = "local"

STRING = pd.StringDtype("pyarrow")
EVENT_DTYPE = pd.CategoricalDtype(list(EVENT_TYPES))


class DataError(ValueError):
    """Input data that does not meet the contract; the message names file, column and rows."""


def action_dtype(actions: tuple[str, ...] = DEFAULT_ACTIONS) -> pd.CategoricalDtype:
    """The categorical dtype of the ``action`` column, with ``actions`` as its categories."""
    return pd.CategoricalDtype(list(actions))


def empty_events() -> pd.DataFrame:
    """An empty canonical event frame with the right dtypes."""
    return pd.DataFrame(
        {
            "user_id": pd.Series([], dtype=STRING),
            "timestamp": pd.Series([], dtype="datetime64[ns, UTC]"),
            "event": pd.Series([], dtype=EVENT_DTYPE),
            "item_id": pd.Series([], dtype=STRING),
            "category_id": pd.Series([], dtype=STRING),
            "merchant_id": pd.Series([], dtype=STRING),
            "value": pd.Series([], dtype="float64"),
        }
    )


def empty_interventions(actions: tuple[str, ...] = DEFAULT_ACTIONS) -> pd.DataFrame:
    """An empty canonical interventions frame with the right dtypes."""
    return pd.DataFrame(
        {
            "user_id": pd.Series([], dtype=STRING),
            "timestamp": pd.Series([], dtype="datetime64[ns, UTC]"),
            "action": pd.Series([], dtype=action_dtype(actions)),
            "propensity": pd.Series([], dtype="float64"),
            "merchant_id": pd.Series([], dtype=STRING),
        }
    )
