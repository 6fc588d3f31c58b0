"""Global attributions: permutation importance on hand-built data, the merchants'
weighted aggregate computed by hand, the reply's whitelist, and a real federation that
writes ``attributions.json``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.attribution import (
    ATTRIBUTION_METRICS,
    aggregate_metrics,
    global_attributions,
)
from common.config import ModelConfig, SnapshotConfig
from common.feature_groups import FEATURE_GROUPS, GROUP_NAMES
from common.features import AGGREGATE_FEATURES, NUMERIC_FEATURES
from common.snapshots import Snapshots
from common.tabular import TabularModel

L = 6
INTEREST = AGGREGATE_FEATURES.index("log_interest")


def hand_built(n: int = 400, seed: int = 0) -> Snapshots:
    """``n`` rows whose decay label is [log_interest < 0]; every other input is noise."""
    rng = np.random.default_rng(seed)
    static = rng.normal(size=(n, len(AGGREGATE_FEATURES))).astype(np.float32)
    y = (static[:, INTEREST] < 0).astype(np.float32)
    return Snapshots(
        events=rng.integers(1, 6, (n, L)).astype(np.int32),
        categories=rng.integers(1, 9, (n, L)).astype(np.int32),
        numeric=rng.normal(size=(n, L, len(NUMERIC_FEATURES))).astype(np.float32),
        static=static, decay=y, interest=np.zeros(n, np.float32),
        interest_now=np.ones(n, np.float32), action=np.full(n, -1, np.int32),
        activation=np.zeros(n, np.float32), propensity=np.ones(n, np.float32),
        intervention=np.full(n, -1, np.int64),
        user_id=np.array([f"u{i}" for i in range(n)], object),
        merchant_id=np.full(n, "m", object),
        cutoff=np.full(n, np.datetime64("2025-03-01"), "datetime64[ns]"),
        split=np.full(n, 1, np.int8), fading_category=np.full(n, "c1", object))


class InterestOnly:
    """A decay classifier that reads only ``log_interest``: P = sigmoid(-4 x)."""

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        p = 1 / (1 + np.exp(4 * x[:, INTEREST]))
        return np.column_stack([1 - p, p])


class Constant:
    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.zeros(len(x))


def tabular() -> TabularModel:
    return TabularModel("gbdt", InterestOnly(), Constant(), (0.5,))


def test_only_the_informative_group_matters_for_a_tabular_model() -> None:
    snaps = hand_built()
    att = global_attributions(tabular(), snaps, repeats=3, seed=1)
    interest = att.groups["interest"]
    assert interest.log_loss_rise > 0.3 and interest.auc_drop > 0.3
    for name in GROUP_NAMES:
        if name != "interest":
            g = att.groups[name]
            assert g.log_loss_rise == 0.0 and g.auc_drop == 0.0, name
            assert g.grad_input is None
    # GBDT and LR read no sequence: a group is read when it has aggregate columns.
    for group in FEATURE_GROUPS:
        assert att.groups[group.name].reads == bool(
            group.aggregate_columns(snaps.static.shape[1])), group.name
    assert att.base_auc == pytest.approx(1.0) and att.rows == att.auc_rows == 400
    # Seeded: the same seed gives the same numbers, another seed others.
    again = global_attributions(tabular(), snaps, repeats=3, seed=1)
    other = global_attributions(tabular(), snaps, repeats=3, seed=2)
    assert again == att
    assert other.groups["interest"].log_loss_rise != interest.log_loss_rise


class FirstColumn:
    """A decay classifier on its own first column: P = sigmoid(-4 x[:, 0])."""

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        p = 1 / (1 + np.exp(4 * x[:, 0]))
        return np.column_stack([1 - p, p])


def test_a_tabular_model_is_read_by_its_column_names() -> None:
    """A model file whose features are ``log_interest`` then one aggregate of another
    group (an older or reordered file): its first column is ``log_interest``, not
    ``Snapshots.static[:, 0]``."""
    other = "log_click_per_view"  # event_mix
    model = TabularModel("gbdt", FirstColumn(), Constant(), (0.5,),
                         features=("log_interest", other))
    att = global_attributions(model, hand_built(), repeats=2, seed=0)
    assert att.base_auc == pytest.approx(1.0)  # it reads log_interest: the label's input
    assert att.groups["interest"].log_loss_rise > 0.3
    read = {g.name for g in FEATURE_GROUPS if att.groups[g.name].reads}
    named = {g.name for g in FEATURE_GROUPS
             if {"log_interest", other} & set(g.aggregates)}
    assert read == named and len(named) == 2
    assert all(att.groups[n].log_loss_rise == 0.0 for n in named - {"interest"})


def test_the_stacked_predictions_equal_one_call_per_permutation() -> None:
    """Permuted copies are predicted stacked; one small stack per copy gives the same."""
    from common.attribution import inputs_read, permutation_importance

    snaps, model = hand_built(120), tabular()
    calls: list[int] = []

    def predict(s: Snapshots) -> np.ndarray:
        calls.append(len(s))
        return model.predict(s)["decay"]

    big = permutation_importance(predict, snaps, inputs_read(model), repeats=2, seed=3)
    # base + 2 repeats x the 6 groups GBDT reads (every group has aggregates)
    assert calls == [120 * (1 + 2 * 6)]
    small = permutation_importance(predict, snaps, inputs_read(model), repeats=2, seed=3,
                                   stack_rows=1)
    assert big == small


def test_reply_metrics_are_whitelisted_and_aggregate_by_hand() -> None:
    att = global_attributions(tabular(), hand_built(), repeats=2, seed=0)
    metrics = att.as_metrics()
    assert set(metrics) <= set(ATTRIBUTION_METRICS)
    assert "attr_grad_interest" not in metrics  # a tabular model has no gradients
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in metrics.values())

    a = {"attr_n": 10, "attr_auc_n": 10, "attr_base_log_loss": 0.5, "attr_base_auc": 0.8,
         "attr_perm_interest": 0.2, "attr_auc_interest": 0.10, "attr_grad_interest": 1.0}
    b = {"attr_n": 30, "attr_auc_n": 0, "attr_base_log_loss": 0.7, "attr_base_auc": 0.0,
         "attr_perm_interest": 0.6, "attr_auc_interest": 0.0, "attr_grad_interest": 3.0}
    out = aggregate_metrics([a, b])
    assert out["rows"] == 40 and out["auc_rows"] == 10 and out["merchants"] == 2
    assert out["base_log_loss"] == pytest.approx((10 * 0.5 + 30 * 0.7) / 40)
    assert out["base_auc"] == pytest.approx(0.8)  # b has one class: no AUC weight
    interest = out["groups"]["interest"]
    assert interest["log_loss_rise"] == pytest.approx((10 * 0.2 + 30 * 0.6) / 40)  # 0.5
    assert interest["auc_drop"] == pytest.approx(0.10)
    assert interest["grad_input"] == pytest.approx((10 * 1.0 + 30 * 3.0) / 40)  # 2.5
    assert out["groups"]["activity"] == {"log_loss_rise": None, "auc_drop": None,
                                         "grad_input": None}


@pytest.fixture(scope="module")
def lstm() -> Any:
    from common.model import build_model

    snap = SnapshotConfig(max_len=L, hash_buckets=8)
    return build_model(ModelConfig(lstm_units=4, dense_units=4, jit_compile=False), snap,
                       seed=0)


def test_an_lstm_blind_to_its_aggregates_gives_them_no_importance(lstm: Any) -> None:
    from common.model import set_weights_of, weights_of

    snaps = hand_built(200)
    kept = weights_of(lstm)
    try:
        kernel = lstm.get_layer("static_dense").kernel
        kernel.assign(np.zeros(kernel.shape, np.float32))  # the static input is cut off
        att = global_attributions(lstm, snaps, repeats=2, seed=0)
    finally:
        set_weights_of(lstm, kept)
    for name in ("activity", "interest"):  # aggregates only
        g = att.groups[name]
        assert g.log_loss_rise == pytest.approx(0.0, abs=1e-6), name
        assert g.auc_drop == pytest.approx(0.0, abs=1e-6) and g.grad_input == 0.0, name
    seq = att.groups["event_mix"]
    # Its ids go through an embedding (no gradient); its aggregates, the funnel's rates,
    # are cut off with the rest.
    assert seq.reads and seq.grad_input == 0.0
    assert abs(seq.log_loss_rise) > 0  # the sequence still moves the risk
    assert att.groups["recency"].grad_input > 0
    assert set(att.as_metrics()) <= set(ATTRIBUTION_METRICS)


def test_permuted_group_keeps_every_other_input_in_place() -> None:
    from common.attribution import InputsRead, permute_group
    from common.feature_groups import FEATURE_GROUPS

    snaps = hand_built(50)
    order = np.random.default_rng(0).permutation(50)
    recency = next(g for g in FEATURE_GROUPS if g.name == "recency")
    out = permute_group(snaps, recency, order, InputsRead(True, 10))
    np.testing.assert_array_equal(out.events, snaps.events)
    np.testing.assert_array_equal(out.numeric[:, :, 2], snaps.numeric[:, :, 2])  # value
    np.testing.assert_array_equal(out.numeric[:, :, :2], snaps.numeric[order][:, :, :2])
    cols = [6, 9]  # recency's columns below width 10; the cadence ones are not read
    np.testing.assert_array_equal(out.static[:, cols], snaps.static[order][:, cols])
    rest = [c for c in range(snaps.static.shape[1]) if c not in cols]
    np.testing.assert_array_equal(out.static[:, rest], snaps.static[:, rest])
    assert out.decay is snaps.decay  # labels untouched


def test_auc_of_many_rows_at_once_matches_scikit_learn_with_ties() -> None:
    from sklearn.metrics import roc_auc_score

    from common.attribution import _auc_rows

    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.3).astype(float)
    probs = np.round(rng.random((5, 300)), 1)  # many ties
    np.testing.assert_allclose(_auc_rows(y, probs), [roc_auc_score(y, p) for p in probs])
    assert np.isnan(_auc_rows(np.ones(4), probs[:, :4])).all()


class AttributionGrid:
    """Nodes 1 and 2 reply canned attribution scalars, node 3 an error, node 4 a name
    outside the whitelist; the instructions are kept."""

    def __init__(self, replies: dict[int, dict[str, Any]]) -> None:
        self.replies, self.sent = replies, []

    def get_node_ids(self) -> list[int]:
        return [4, 3, 2, 1]

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        from flwr.app import Error, Message, MetricRecord, RecordDict

        self.sent = list(messages)
        out = []
        for m in self.sent:
            node = m.metadata.dst_node_id
            if node == 3:
                out.append(Message(Error(code=100, reason="attributions: no validation "
                                         "snapshots in this merchant's data"), reply_to=m))
            else:
                out.append(Message(RecordDict({"metrics": MetricRecord(self.replies[node])}),
                                   reply_to=m))
        return out


@pytest.mark.usefixtures("server_identity")
def test_the_server_weights_two_merchants_by_rows_and_rejects_the_rest(
        tmp_path: Path) -> None:
    from server.attribution import attribution_round
    from server.config import FederationConfig

    one = {"attr_n": 20, "attr_auc_n": 20, "attr_base_log_loss": 0.4, "attr_base_auc": 0.9,
           "attr_perm_recency": 0.30, "attr_auc_recency": 0.2, "attr_grad_recency": 1.0}
    two = {"attr_n": 60, "attr_auc_n": 60, "attr_base_log_loss": 0.6, "attr_base_auc": 0.7,
           "attr_perm_recency": 0.10, "attr_auc_recency": 0.0, "attr_grad_recency": 2.0}
    grid = AttributionGrid({1: one, 2: two, 4: {**one, "user_id_hash": 7.0}})
    weights = [np.ones((2, 2), np.float32)]
    out = attribution_round(grid, FederationConfig(attributions=True, attribution_repeats=2),
                            weights, tmp_path, seed=5, model_round=3)

    assert [m.metadata.dst_node_id for m in grid.sent] == [1, 2, 3, 4]
    config = grid.sent[0].content.config_records["config"]
    assert dict(config) == {"attributions": True, "attribution-repeats": 2,
                            "attribution-seed": 5, "server-round": 3}
    written = json.loads((tmp_path / "attributions.json").read_text())
    assert written == json.loads(json.dumps(out))
    assert written["status"] == "ok" and written["merchants"] == 2 and written["asked"] == 4
    assert written["rows"] == 80 and written["model_round"] == 3
    recency = written["groups"]["recency"]
    assert recency["log_loss_rise"] == pytest.approx((20 * 0.30 + 60 * 0.10) / 80)  # 0.15
    assert recency["auc_drop"] == pytest.approx((20 * 0.2 + 60 * 0.0) / 80)  # 0.05
    assert recency["grad_input"] == pytest.approx((20 * 1.0 + 60 * 2.0) / 80)  # 1.75
    assert written["base_auc"] == pytest.approx(0.75)
    assert sorted(written["failures"]) == [
        "node 3: attributions: no validation snapshots in this merchant's data",
        "node 4: rejected: metric names outside the whitelist: user_id_hash"]
    assert set(written["reply_metrics"]) <= set(ATTRIBUTION_METRICS)


@pytest.mark.usefixtures("server_identity")
def test_a_reply_without_its_auc_rows_is_rejected_and_the_others_written(
        tmp_path: Path) -> None:
    """One reply lacking ``attr_auc_n`` (a row count the aggregate weighs by) is named
    among the failures; the file holds the other two merchants' aggregate."""
    from server.attribution import attribution_round
    from server.config import FederationConfig

    one = {"attr_n": 20, "attr_auc_n": 20, "attr_base_log_loss": 0.4, "attr_base_auc": 0.9,
           "attr_perm_recency": 0.30, "attr_auc_recency": 0.2}
    two = {"attr_n": 60, "attr_auc_n": 60, "attr_base_log_loss": 0.6, "attr_base_auc": 0.7,
           "attr_perm_recency": 0.10, "attr_auc_recency": 0.0}
    no_auc_rows = {k: v for k, v in one.items() if k != "attr_auc_n"}
    grid = AttributionGrid({1: one, 2: two, 4: no_auc_rows})
    out = attribution_round(grid, FederationConfig(attributions=True), [], tmp_path,
                            seed=0, model_round=1)
    written = json.loads((tmp_path / "attributions.json").read_text())
    assert out is not None and written == json.loads(json.dumps(out))
    assert written["status"] == "ok" and written["merchants"] == 2 and written["rows"] == 80
    assert written["groups"]["recency"]["auc_drop"] == pytest.approx(20 * 0.2 / 80)
    assert "node 4: rejected: row counts missing: attr_auc_n" in written["failures"]
    # The aggregate alone does not fail on such a reply either: it weighs nothing there.
    alone = aggregate_metrics([one, no_auc_rows])
    assert alone["base_auc"] == pytest.approx(0.9) and alone["rows"] == 40


def test_no_attribution_round_under_differential_privacy(tmp_path: Path) -> None:
    from server.attribution import attribution_round
    from server.config import DP_MODES, DPConfig, FederationConfig

    fed = FederationConfig(attributions=True)
    for mode in DP_MODES[1:]:
        grid = AttributionGrid({})
        out = attribution_round(grid, fed, [], tmp_path, seed=0, model_round=1,
                                privacy=DPConfig(mode=mode))
        assert out is not None and out["status"] == "unavailable", mode
        assert "differential privacy" in out["reason"] and mode in out["reason"]
        assert json.loads((tmp_path / "attributions.json").read_text()) == out
        assert grid.sent == []


def test_a_merchant_with_few_validation_rows_refuses_naming_the_minimum() -> None:
    from client.attribution import MIN_VALIDATION_ROWS, attribution_metrics
    from client.config import ClientConfig, ClientSettings
    from common.config import TrainConfig

    settings = ClientSettings(snapshots=SnapshotConfig(max_len=L), model=ModelConfig(),
                              train=TrainConfig(), client=ClientConfig(), seed=0)
    few = hand_built(MIN_VALIDATION_ROWS - 1)  # every row in the validation period
    with pytest.raises(ValueError, match=f"fewer than the {MIN_VALIDATION_ROWS}"):
        attribution_metrics(settings, few, [], {})


def test_no_attribution_round_when_off_or_under_secagg(tmp_path: Path) -> None:
    from server.attribution import attribution_round
    from server.config import FederationConfig

    grid = AttributionGrid({})
    assert attribution_round(grid, FederationConfig(), [], tmp_path, seed=0,
                             model_round=1) is None
    fed = FederationConfig(attributions=True, secure_aggregation=True)
    out = attribution_round(grid, fed, [], tmp_path, seed=0, model_round=1)
    assert out is not None and out["status"] == "unavailable" and "SecAgg+" in out["reason"]
    assert json.loads((tmp_path / "attributions.json").read_text()) == out
    assert grid.sent == []  # nothing asked of the merchants


def test_the_egress_audit_checks_the_attribution_replies_names(tmp_path: Path) -> None:
    from simulations.privacy_audit import egress_summary

    (tmp_path / "metrics.jsonl").write_text(json.dumps(
        {"round": 1, "sampled": 2, "replied": 2, "bytes_down": 8, "bytes_up": 8,
         "train": {"train_loss": 0.5}, "client_eval": {}}) + "\n")
    names = ["attr_n", "attr_perm_recency"]
    (tmp_path / "attributions.json").write_text(json.dumps({"reply_metrics": names}))
    out = egress_summary(tmp_path)
    assert set(names) <= set(out["seen_evaluate_metrics"]) and out["unexpected_metrics"] == []
    assert not out["finished"] and "did not finish" in out["notes"][0]  # no model.keras
    (tmp_path / "attributions.json").write_text(json.dumps(
        {"reply_metrics": [*names, "user_ids"]}))
    assert egress_summary(tmp_path)["unexpected_metrics"] == ["user_ids"]


def test_the_comparison_table_beside_gbdt_and_lr(tmp_path: Path) -> None:
    """The report's section from the federation's file, a GBDT-like model and a real LR;
    LR's native importance puts the informative group first."""
    from types import SimpleNamespace

    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from simulations.attributions import attribution_blocks, attributions_of
    from simulations.render import to_markdown

    snaps = hand_built(300)
    lr = TabularModel("lr", make_pipeline(StandardScaler(), LogisticRegression()).fit(
        snaps.static, snaps.decay), Constant(), (0.5,))
    fed = tmp_path / "federated-fedavg"
    fed.mkdir()
    merchants = aggregate_metrics([global_attributions(tabular(), snaps).as_metrics()])
    (fed / "attributions.json").write_text(json.dumps({**merchants, "status": "ok"}))
    outcomes = [SimpleNamespace(name="gbdt", details={}, model=tabular()),
                SimpleNamespace(name="lr", details={}, model=lr),
                SimpleNamespace(name="local-only", details={}, model=None),
                SimpleNamespace(name="federated-fedavg", details={"run_dir": str(fed)},
                                model=None)]
    exp = SimpleNamespace(seed=0, federation=SimpleNamespace(attribution_repeats=2))
    found = attributions_of(outcomes, SimpleNamespace(snapshots=snaps), exp)

    assert list(found["methods"]) == ["gbdt", "lr", "federated-fedavg"]
    gbdt, fedavg = found["methods"]["gbdt"], found["methods"]["federated-fedavg"]
    assert gbdt["log_loss_rise"]["interest"] > 0.3 and gbdt["log_loss_rise"]["event_mix"] == 0
    assert fedavg["merchants"] == 1
    assert fedavg["log_loss_rise"]["interest"] == pytest.approx(
        merchants["groups"]["interest"]["log_loss_rise"])
    native = found["methods"]["lr"]["native"]
    assert max(native, key=native.get) == "interest" and sum(native.values()) == \
        pytest.approx(1.0)
    md = to_markdown(attribution_blocks(found))
    assert "| federated-fedavg | 1 merchants' validation periods |" in md
    assert "Native importance" in md and "| lr |" in md
    # Gradient x input exists for LSTMs only: no all-dash rows for the tabular models,
    # and no table at all when no LSTM is among the methods; no claim that event_mix is 0.
    assert "gradient x input| (LSTM only)" not in md and "| gbdt | pooled validation | - |" \
        not in md
    assert "by construction" not in md and "funnel's rates" in md
