"""Every model input belongs to exactly one feature group."""

import pytest

from common.feature_groups import FEATURE_GROUPS, GROUP_NAMES, group_of_aggregate
from common.features import AGGREGATE_FEATURES, NUMERIC_FEATURES


def test_every_aggregate_is_in_exactly_one_group():
    owners = [g.name for a in AGGREGATE_FEATURES for g in FEATURE_GROUPS if a in g.aggregates]
    assert len(owners) == len(AGGREGATE_FEATURES)
    assert group_of_aggregate("log_interest") == "interest"
    assert group_of_aggregate("log_n_cart") == "activity"


def test_every_sequence_channel_is_in_exactly_one_group():
    numeric = sorted(i for g in FEATURE_GROUPS for i in g.numeric)
    assert numeric == list(range(len(NUMERIC_FEATURES)))
    sequences = sorted(s for g in FEATURE_GROUPS for s in g.sequence)
    assert sequences == ["categories", "events"]


def test_columns_below_a_model_width_and_unknown_names():
    recency = next(g for g in FEATURE_GROUPS if g.name == "recency")
    assert recency.aggregate_columns(width=10) == (6, 9)
    assert len(GROUP_NAMES) == len(set(GROUP_NAMES))
    with pytest.raises(ValueError, match="no feature group"):
        group_of_aggregate("shoe_size")
