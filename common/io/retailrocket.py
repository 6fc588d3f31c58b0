"""RetailRocket ``events.csv``: visitors' views, add-to-carts and transactions."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import pandas as pd

from common.io.columns import require_columns
from common.io.csv_reader import ReadRules
from common.io.tables import column_names, read_table

#: RetailRocket ``events.csv`` columns read (``transactionid`` is not needed).
RETAILROCKET_COLUMNS = ("timestamp", "visitorid", "event", "itemid")
#: Canonical columns under their RetailRocket names (errors name the file's column).
RETAILROCKET_NAMES: Mapping[str, str] = {"user_id": "visitorid", "item_id": "itemid"}
RETAILROCKET_EVENTS: Mapping[str, str] = {
    "view": "view", "addtocart": "cart", "transaction": "purchase",
}


def iter_retailrocket(path: Path, rules: ReadRules) -> Iterator[tuple[int, pd.DataFrame]]:
    """Chunks of RetailRocket events, ``visitorid`` and ``itemid`` renamed canonically."""
    require_columns(str(path), column_names(path), RETAILROCKET_COLUMNS, "format retailrocket")
    renames = {theirs: ours for ours, theirs in RETAILROCKET_NAMES.items()}
    for offset, chunk in read_table(path, rules, RETAILROCKET_COLUMNS):
        yield offset, chunk.rename(columns=renames)
