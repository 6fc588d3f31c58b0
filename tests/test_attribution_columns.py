"""A tabular model reading an aggregate this version does not compute (issue 17)."""

from __future__ import annotations

import pytest

from common.attribution import tabular_columns
from common.features import AGGREGATE_FEATURES
from common.tabular import TabularModel


def test_an_unknown_aggregate_names_the_model_file_and_the_feature() -> None:
    model = TabularModel(kind="gbdt", decay=None, interest=None, activation=(),
                         features=(AGGREGATE_FEATURES[1], "no_such_aggregate"))
    with pytest.raises(ValueError, match=r"model\.skops \(gbdt\).*'no_such_aggregate'"):
        tabular_columns(model)
    known = TabularModel(kind="lr", decay=None, interest=None, activation=(),
                         features=(AGGREGATE_FEATURES[2], AGGREGATE_FEATURES[0]))
    assert tabular_columns(known) == (2, 0)
