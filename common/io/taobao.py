"""Taobao UserBehavior: headerless CSV of user, item, category, behaviour, unix seconds."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import pandas as pd

from common.io.csv_reader import ReadRules, csv_batches

TAOBAO_COLUMNS = ("user_id", "item_id", "category_id", "behavior_type", "timestamp")
TAOBAO_EVENTS: Mapping[str, str] = {
    "pv": "view", "cart": "cart", "fav": "favorite", "buy": "purchase",
}


def iter_taobao(path: Path, rules: ReadRules) -> Iterator[tuple[int, pd.DataFrame]]:
    """Chunks of a headerless Taobao CSV, ``behavior_type`` renamed to ``event``."""
    for offset, chunk in csv_batches(path, rules, names=TAOBAO_COLUMNS):
        yield offset, chunk.rename(columns={"behavior_type": "event"})
