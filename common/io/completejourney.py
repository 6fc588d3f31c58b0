"""Dunnhumby's Complete Journey: transactions as purchases, campaigns as interventions.

What the interventions can and cannot support. ``campaigns.csv`` lists the households a
campaign *targeted*; it logs no untargeted household and no random assignment. So every
intervention row is a ``coupon`` and there is no ``none`` control row:

- they can train and evaluate the activation head's ``coupon`` output (did a targeted
  household re-engage within the response window), i.e. P(re-engage | coupon) among
  the households the retailer chose;
- they cannot estimate uplift (coupon against nothing), a Qini coefficient, or the
  off-policy value (IPS/SNIPS) of a policy that ever chooses ``none`` or another action:
  the comparison's report says so instead of printing a number;
- treating the active households a campaign did not target as its controls would need
  targeting to be as good as random given the features; the retailer chose them on
  purpose (``campaign_descriptions`` types A-C), so this adapter does not, and the
  ``propensity`` it writes (the targeted share of all households) is a base rate, not
  the probability a logging policy gave each household.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from common.io.columns import parse_timestamps, require_columns
from common.io.csv_reader import ReadRules
from common.io.errors import column_error
from common.io.files import READ_ERRORS, probe_encoding
from common.io.results import LoadReport, add_count
from common.io.tables import column_names, read_table
from common.io.validation import validate_interventions
from common.schema import DEFAULT_CATEGORY, STRING, DataError, empty_interventions

logger = logging.getLogger(__name__)

CJ_TRANSACTION_FILES = ("transactions.csv", "transactions_sample.csv")
CJ_COLUMNS = ("household_id", "store_id", "product_id", "sales_value", "transaction_timestamp")
#: Canonical columns under their Complete Journey names (errors name the file's column).
CJ_NAMES = {"user_id": "household_id", "timestamp": "transaction_timestamp",
            "item_id": "product_id", "merchant_id": "store_id", "value": "sales_value"}

#: Reasons Complete Journey rows are dropped on purpose.
CJ_RETURN = "return (negative sales_value)"
NO_HOME_STORE = "household without kept transactions"


def cj_transactions(folder: Path, strict: bool = True) -> Path | None:
    """The folder's transactions file, the full one before the sample.

    None when there is none, or a :class:`~common.schema.DataError` when ``strict``.
    """
    for name in CJ_TRANSACTION_FILES:
        if (folder / name).is_file():
            return folder / name
    if strict:
        raise DataError(f"{folder}: no {' or '.join(CJ_TRANSACTION_FILES)} in this folder; "
                        "expected the Complete Journey tables")
    return None


def _small_csv(path: Path, **options: Any) -> pd.DataFrame:
    """A small side table (Complete Journey products, campaigns) read whole, as text."""
    try:
        return pd.read_csv(path, dtype=str, encoding=probe_encoding(path), **options)
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path}: empty file (no header and no data rows)") from exc
    except (pd.errors.ParserError, UnicodeError, *READ_ERRORS) as exc:
        raise DataError(f"{path}: not a readable CSV ({str(exc).strip()})") from exc


def _cj_categories(folder: Path) -> pd.Series:
    """product_id -> product_category, else department, else the default category."""
    path = folder / "products.csv"
    if not path.is_file():
        logger.warning("%s: not found, every product gets category %r", path, DEFAULT_CATEGORY)
        return pd.Series(dtype=STRING)
    products = _small_csv(path, keep_default_na=False, na_values=[""],
                          usecols=lambda c: c in ("product_id", "product_category",
                                                  "department"))
    require_columns(str(path), products.columns, ("product_id",), "Complete Journey products")
    category = pd.Series(DEFAULT_CATEGORY, index=products.index, dtype=STRING)
    for column in ("department", "product_category"):  # later columns win
        if column in products:
            category = products[column].astype(STRING).fillna(category)
    return pd.Series(category.to_numpy(), index=products["product_id"].astype(STRING),
                     dtype=STRING).groupby(level=0).first()


def iter_completejourney(transactions: Path, rules: ReadRules, households: list[pd.Index]
                         ) -> Iterator[tuple[int, pd.DataFrame]]:
    """Transactions as purchase events; every household id read goes into ``households``."""
    require_columns(str(transactions), column_names(transactions), CJ_COLUMNS,
                    "format completejourney")
    categories = _cj_categories(transactions.parent)
    for offset, chunk in read_table(transactions, rules, CJ_COLUMNS):
        households.append(pd.Index(chunk["household_id"].dropna().unique()))
        product = chunk["product_id"].astype(STRING)
        frame = pd.DataFrame({ours: chunk[theirs] for ours, theirs in CJ_NAMES.items()},
                             index=chunk.index)
        frame["event"] = "purchase"
        frame["item_id"] = product
        frame["category_id"] = product.map(categories).astype(STRING)
        yield offset, frame


def _home_stores(events: pd.DataFrame) -> pd.Series:
    """Each user's most frequent merchant (ties: the smallest merchant id)."""
    counts = (events.groupby(["user_id", "merchant_id"], observed=True).size()
              .rename("n").reset_index()
              .sort_values(["user_id", "n", "merchant_id"], ascending=[True, False, True])
              .drop_duplicates("user_id"))
    return pd.Series(counts["merchant_id"].to_numpy(), index=counts["user_id"].to_numpy())


def cj_interventions(folder: Path, events: pd.DataFrame, households: pd.Index,
                     report: LoadReport) -> pd.DataFrame:
    """Targeted households per campaign as ``coupon`` rows at the campaign start date.

    Only the logged targeted rows are returned (no ``none`` control rows). The merchant
    is the household's most frequent store among the kept events; households without
    kept events are dropped and counted. Propensity is the campaign's targeted share:
    targeted households / all households (transactions and campaigns together).
    """
    campaigns_path = folder / "campaigns.csv"
    descriptions_path = folder / "campaign_descriptions.csv"
    if not (campaigns_path.is_file() and descriptions_path.is_file()):
        logger.warning("%s: no campaigns.csv / campaign_descriptions.csv, no interventions",
                       folder)
        return empty_interventions()
    campaigns = _small_csv(campaigns_path)
    require_columns(str(campaigns_path), campaigns.columns, ("campaign_id", "household_id"),
                    "Complete Journey campaigns")
    descriptions = _small_csv(descriptions_path)
    require_columns(str(descriptions_path), descriptions.columns, ("campaign_id", "start_date"),
                    "Complete Journey campaign descriptions")
    # Only the campaigns of households with a home store are used (the others are
    # dropped and counted): only their descriptions must hold a start date.
    merchant = campaigns["household_id"].astype(STRING).map(_home_stores(events))
    has_home = merchant.notna().to_numpy()
    first = ~descriptions["campaign_id"].duplicated().to_numpy()  # the description used
    used = first & descriptions["campaign_id"].isin(campaigns.loc[has_home, "campaign_id"])
    # A bad date is named in the file that holds it (mapped onto campaigns.csv's rows it
    # would be reported there).
    parse_timestamps(descriptions["start_date"], str(descriptions_path), "start_date", 0,
                     used=used.to_numpy())
    start = campaigns["campaign_id"].map(
        descriptions[first].set_index("campaign_id")["start_date"])
    undescribed = start.isna().to_numpy() & has_home
    if undescribed.any():
        raise column_error(str(campaigns_path), "campaign_id", undescribed,
                           campaigns["campaign_id"], "campaign(s) without a description",
                           f"a campaign_id listed in {descriptions_path.name}", 0)
    population = len(households.union(pd.Index(campaigns["household_id"].dropna().unique())))
    targeted = campaigns.groupby("campaign_id")["household_id"].nunique()
    report.interventions_read = len(campaigns)
    add_count(report.interventions_dropped, NO_HOME_STORE, (~has_home).sum())
    logged = pd.DataFrame(
        {
            "user_id": campaigns["household_id"],
            "timestamp": start,
            "action": "coupon",
            "propensity": campaigns["campaign_id"].map(targeted) / max(population, 1),
            "merchant_id": merchant,
        }
    )
    # Only households with a home store: the others have no merchant (dropped, counted).
    return validate_interventions(logged[has_home], str(campaigns_path))
