"""The head refit: its sums against TensorFlow's own gradient and Hessian, the merchants'
sums adding up to the pooled ones, the damped Newton steps, a planted uplift recovered,
the server's checks of a reply, and the setting's bad values."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers import hand_snapshots

from common.config import ModelConfig, SnapshotConfig
from common.features import AGGREGATE_FEATURES, NUMERIC_FEATURES, RESPONSE_FEATURES
from common.head_refit import (
    HeadStatistics,
    campaign_refusal,
    head_positions,
    head_statistics,
    head_vector,
    least_rows,
    refit,
    refit_locally,
    with_head,
)
from common.model import build_model, model_inputs
from common.protocol import (
    HEAD_REFIT_GRADIENT,
    HEAD_REFIT_HESSIAN,
    HEAD_REFIT_LOSS,
    HEAD_REFIT_ROWS,
)
from common.snapshots import Snapshots

SNAP = SnapshotConfig(max_len=4, hash_buckets=8)
A = len(SNAP.actions)


def _model(**changes: Any) -> Any:
    config = ModelConfig(lstm_units=4, dense_units=4, jit_compile=False, **changes)
    return build_model(config, SNAP, seed=3)


def _snaps(n: int, seed: int, *, uplift: float = 0.0) -> Any:
    """``n`` rows, about 60 % campaign rows; with ``uplift`` push raises the
    re-engagement logit by ``uplift`` times the first response feature."""
    rng = np.random.default_rng(seed)
    L = SNAP.max_len
    static = rng.normal(size=(n, len(AGGREGATE_FEATURES))).astype(np.float32)
    snaps = hand_snapshots(
        rng, events=rng.integers(1, 6, (n, L)).astype(np.int32),
        categories=rng.integers(1, 9, (n, L)).astype(np.int32),
        numeric=rng.normal(size=(n, L, len(NUMERIC_FEATURES))).astype(np.float32),
        static=static, decay=rng.random(n) < 0.4, interest=rng.random(n), n_actions=A)
    snaps.action[:] = np.where(rng.random(n) < 0.6, rng.integers(0, A, n), -1)
    x = static[:, AGGREGATE_FEATURES.index(RESPONSE_FEATURES[0])]
    logit = -0.3 + np.where(snaps.action == SNAP.actions.index("push"), uplift * x, 0.0)
    snaps.activation[:] = np.where(snaps.action >= 0, rng.random(n) < 1 / (1 + np.exp(-logit)),
                                   0)
    return snaps


def _tf_sums(model: Any, snaps: Any) -> tuple[float, np.ndarray, np.ndarray]:
    """The summed log-loss of the logged actions, with its gradient and Hessian in the
    head's weights, by TensorFlow's autodiff through the model itself."""
    import tensorflow as tf

    rows = np.flatnonzero(snaps.action >= 0)
    sub = snaps.subset(rows)
    x = model_inputs(model, sub)
    y = tf.constant(sub.activation, tf.float64)
    pick = tf.constant(np.stack([np.arange(len(rows)), sub.action], axis=1))
    variables = [model.weights[i] for i in head_positions(model)]
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            p = tf.cast(tf.gather_nd(model(x, training=False)["activation"], pick), tf.float64)
            loss = -tf.reduce_sum(y * tf.math.log(p) + (1 - y) * tf.math.log(1 - p))
        grads = inner.gradient(loss, variables)
        flat = tf.concat([tf.reshape(tf.cast(g, tf.float64), [-1]) for g in grads], 0)
        parts = tf.unstack(flat)
    hessian = np.stack([
        np.concatenate([np.ravel(h) for h in outer.gradient(g, variables)]) for g in parts])
    return float(loss), np.asarray(flat), hessian


def test_the_sums_are_tensorflows_gradient_and_hessian_of_the_head() -> None:
    model = _model()
    rng = np.random.default_rng(0)
    # A head away from its zero start, so that every column of the design matters.
    weights = [np.asarray(w) for w in model.get_weights()]
    theta = rng.normal(scale=0.5, size=len(head_vector(model, weights)))
    model.set_weights(with_head(model, weights, theta))
    snaps = _snaps(300, seed=1)
    stats = head_statistics(model, snaps)
    loss, gradient, hessian = _tf_sums(model, snaps)
    assert stats.rows == np.count_nonzero(snaps.action >= 0)
    assert stats.loss == pytest.approx(loss, rel=1e-4)
    np.testing.assert_allclose(stats.gradient, gradient, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(stats.hessian, hessian, rtol=1e-3, atol=1e-3)


def test_the_sums_follow_a_shift_gain() -> None:
    model = _model(activation_shift_gain=4.0)
    weights = [np.asarray(w) for w in model.get_weights()]
    theta = np.random.default_rng(2).normal(scale=0.03, size=len(head_vector(model, weights)))
    model.set_weights(with_head(model, weights, theta))
    snaps = _snaps(200, seed=2)
    _, gradient, hessian = _tf_sums(model, snaps)
    stats = head_statistics(model, snaps)
    np.testing.assert_allclose(stats.gradient, gradient, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(stats.hessian, hessian, rtol=1e-3, atol=1e-3)


def test_merchants_sums_add_up_to_the_pooled_sums_so_the_refits_agree() -> None:
    model = _model()
    snaps = _snaps(400, seed=3, uplift=2.0)
    parts = [snaps.subset(np.arange(lo, lo + 100)) for lo in range(0, 400, 100)]
    pooled = head_statistics(model, snaps)
    total = HeadStatistics.zero(len(pooled.gradient))
    for part in parts:
        total = total + head_statistics(model, part)
    assert total.rows == pooled.rows and total.loss == pytest.approx(pooled.loss, rel=1e-9)
    np.testing.assert_allclose(total.gradient, pooled.gradient, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(total.hessian, pooled.hessian, rtol=1e-9, atol=1e-9)
    # The federated refit (sums of the parts each step) is the pooled one.
    weights = [np.asarray(w) for w in model.get_weights()]

    def federated(theta: np.ndarray) -> HeadStatistics:
        model.set_weights(with_head(model, weights, theta))
        out = HeadStatistics.zero(len(theta))
        for part in parts:
            out = out + head_statistics(model, part)
        return out

    apart = refit(head_vector(model, weights), federated, 4)
    model.set_weights(weights)
    together = refit_locally(model, snaps, 4)
    assert together is not None
    np.testing.assert_allclose(apart.theta, together.theta, rtol=1e-6, atol=1e-8)


def test_refit_reaches_the_minimum_and_recovers_a_planted_uplift() -> None:
    model = _model()
    snaps = _snaps(3000, seed=4, uplift=2.0)
    outcome = refit_locally(model, snaps, 6)
    assert outcome is not None and outcome.note == ""
    means = [loss / rows for loss, rows in zip(outcome.losses, outcome.rows, strict=True)]
    assert all(b <= a + 1e-12 for a, b in zip(means, means[1:], strict=False)), means
    at = head_statistics(model, snaps)
    assert np.abs(at.gradient).max() < 1e-3 * at.rows  # the ridge's pull only
    # The push shift's weight on the first response feature (standardised by a fixed
    # scale) is the planted 2.0 times that scale; the other actions' stay near 0.
    kernel = np.asarray(model.get_layer("activation_shift").kernel)
    scale = model.get_layer("activation_response").scale[0]
    push = SNAP.actions.index("push") - 1
    assert kernel[0, push] == pytest.approx(2.0 * scale, rel=0.25)
    assert np.abs(np.delete(kernel[0], push)).max() < 0.3 * kernel[0, push]


def test_a_step_that_raises_the_loss_is_halved_back_and_not_kept() -> None:
    # A one-weight problem whose "Newton step" is made to overshoot: the statistics
    # report a flat curvature, so the step lands far past the minimum at 1.
    def statistics(theta: np.ndarray) -> HeadStatistics:
        t = float(theta[0])
        return HeadStatistics(10, 10 * (t - 1.0) ** 2, np.array([20 * (t - 1.0)]),
                              np.array([[2.0]]))

    outcome = refit(np.array([0.0]), statistics, 4)
    means = [loss / 10 for loss in outcome.losses]
    # 0 (loss 1) -> 10 (81: worse, halved back) -> 5 (16: worse) -> 2.5 (2.25: worse)
    assert means == pytest.approx([1.0, 81.0, 16.0, 2.25], rel=1e-2)
    assert outcome.theta == pytest.approx([0.0]) and outcome.kept == 0  # the best summed


def test_the_head_kept_is_the_best_summed_never_an_unsummed_step() -> None:
    # A proper quadratic: the first Newton step lands on the minimum at 1; the step
    # after it stays there. Two calls: the kept head is the second one's, summed.
    def statistics(theta: np.ndarray) -> HeadStatistics:
        t = float(theta[0])
        return HeadStatistics(10, 10 * (t - 1.0) ** 2 + 1.0, np.array([20 * (t - 1.0)]),
                              np.array([[20.0]]))

    outcome = refit(np.array([0.0]), statistics, 2)
    assert outcome.kept == 1 and outcome.theta == pytest.approx([1.0], abs=1e-3)
    assert outcome.losses[-1] == pytest.approx(1.0, abs=1e-4)
    one = refit(np.array([0.0]), statistics, 1)  # one call: the start, summed, is kept
    assert one.kept == 0 and one.theta == pytest.approx([0.0])


def test_a_direction_without_rows_stays_where_the_rounds_left_it() -> None:
    model = _model()
    snaps = _snaps(600, seed=8, uplift=2.0)
    snaps.action[snaps.action == SNAP.actions.index("coupon")] = -1  # no coupon rows
    weights = [np.asarray(w) for w in model.get_weights()]
    start = head_vector(model, weights) + 0.3  # the rounds' head, coupon's shift included
    model.set_weights(with_head(model, weights, start))
    refit_locally(model, snaps, 4)
    coupon = SNAP.actions.index("coupon") - 1
    kernel = np.asarray(model.get_layer("activation_shift").kernel)
    bias = np.asarray(model.get_layer("activation_shift").bias)
    np.testing.assert_allclose(kernel[:, coupon], 0.3, atol=1e-6)
    assert bias[coupon] == pytest.approx(0.3, abs=1e-6)


def test_a_merchant_answers_only_with_rows_enough_for_the_steps() -> None:
    model = _model()
    size = len(head_vector(model, model.get_weights()))
    k = model.get_layer("activation_shift").kernel.shape[0]
    assert least_rows(size, k, 3) == (3 * size, 3 * (k + 1))
    snaps = _snaps(2000, seed=9)
    assert campaign_refusal(snaps, model, 3) is None
    few = snaps.subset(np.flatnonzero(snaps.action >= 0)[: 3 * size - 1])
    assert "fewer than the" in (campaign_refusal(few, model, 3) or "")
    assert campaign_refusal(few, model, 1) is None  # one step needs a third of the rows
    thin = snaps.subset(np.flatnonzero(snaps.action != 2)).subset(np.arange(1000))
    keep = np.flatnonzero(snaps.action == 2)[: 3 * (k + 1) - 1]
    lopsided = Snapshots.concat([thin, snaps.subset(keep)])
    assert "action 2 has" in (campaign_refusal(lopsided, model, 3) or "")


def test_refit_stops_keeping_the_best_head_when_nothing_is_summed() -> None:
    calls: list[np.ndarray] = []

    def statistics(theta: np.ndarray) -> HeadStatistics | None:
        calls.append(theta)
        return None

    outcome = refit(np.array([0.5, -0.5]), statistics, 3)
    assert len(calls) == 1 and outcome.losses == []
    assert outcome.theta == pytest.approx([0.5, -0.5]) and "no campaign rows" in outcome.note


def test_models_without_the_head_are_left_alone() -> None:
    snaps = _snaps(100, seed=5)
    for changes in ({"activation_shift": "shared"}, {"activation_head": "separate"}):
        model = _model(**changes)
        before = [np.asarray(w) for w in model.get_weights()]
        assert head_positions(model) == () and refit_locally(model, snaps, 3) is None
        for a, b in zip(before, model.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)


def test_the_setting_rejects_negative_steps_naming_the_key() -> None:
    from server.config import FederationConfig

    with pytest.raises(ValueError, match="federation.head-refit-steps"):
        FederationConfig(head_refit_steps=-1)


# ---------------------------------------------------------------------------------------
# The server's checks of a merchant's reply
# ---------------------------------------------------------------------------------------


def _reply(**changes: Any) -> Any:
    from flwr.app import Message, MetricRecord, RecordDict

    size = 3
    metrics: dict[str, Any] = {HEAD_REFIT_ROWS: 25, HEAD_REFIT_LOSS: 12.5,
                               HEAD_REFIT_GRADIENT: [0.1, -0.2, 0.3],
                               HEAD_REFIT_HESSIAN: list(np.eye(size).ravel() * 2.0)}
    metrics.update(changes)
    metrics = {k: v for k, v in metrics.items() if v is not None}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), dst_node_id=7,
                   message_type="evaluate")


@pytest.mark.usefixtures("server_identity")
def test_a_good_reply_is_summed() -> None:
    from server.head_refit import check_head_refit_reply

    stats, reason = check_head_refit_reply(_reply(), 3)
    assert stats is not None and reason == ""
    assert stats.rows == 25 and stats.hessian.shape == (3, 3)


@pytest.mark.usefixtures("server_identity")
@pytest.mark.parametrize("changes, reason", [
    ({HEAD_REFIT_ROWS: 0}, "positive count"),
    ({HEAD_REFIT_ROWS: None}, "metric names"),
    ({"leak": 1.0}, "metric names"),
    ({HEAD_REFIT_LOSS: float("nan")}, "finite number"),
    ({HEAD_REFIT_GRADIENT: [0.1, 0.2]}, "holds 2 numbers, expected 3"),
    ({HEAD_REFIT_GRADIENT: [0.1, float("inf"), 0.0]}, "not finite"),
    ({HEAD_REFIT_HESSIAN: [1.0, 2.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]}, "not symmetric"),
    ({HEAD_REFIT_HESSIAN: list(-np.eye(3).ravel())}, "positive semi-definite"),
])
def test_a_bad_reply_is_rejected_with_its_reason(changes: dict[str, Any], reason: str) -> None:
    from server.head_refit import check_head_refit_reply

    stats, why = check_head_refit_reply(_reply(**changes), 3)
    assert stats is None and reason in why


def _federation_settings() -> tuple[Any, Any, Any]:
    """The server's and a merchant's settings of a small model, and the model."""
    from client.config import settings_from_flat as client_settings
    from server.config import settings_from_flat as server_settings

    flat = {"model.lstm-units": 4, "model.dense-units": 4, "model.jit-compile": False,
            "snapshots.max-len": 4, "snapshots.hash-buckets": 8, "seed": 3,
            "federation.run-dir": "unused", "federation.head-refit-steps": 3}
    settings = server_settings(flat)
    return settings, client_settings(flat), build_model(settings.model, settings.snapshots,
                                                        seed=3)


class _Merchants:
    """A Grid whose merchants answer the server's evaluate instructions with the real
    client handler's sums over their own rows (node 3 has too few campaign rows and
    refuses, node 9 sends a reply with a name outside the whitelist)."""

    def __init__(self, shards: dict[int, Any], settings: Any, *, leaves: int | None = None
                 ) -> None:
        self.shards, self.settings, self.leaves = shards, settings, leaves
        self.asked: list[int] = []
        self.steps = 0

    def get_node_ids(self) -> list[int]:
        return [*self.shards, 9]

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        from flwr.app import Message, MetricRecord, RecordDict

        from client.head_refit import head_refit_reply

        out = []
        self.steps += 1
        for m in messages:
            node = m.metadata.dst_node_id
            self.asked.append(node)
            if node == self.leaves and self.steps > 1:
                continue  # gone after the first step: no reply
            if node == 9:
                out.append(Message(RecordDict({"metrics": MetricRecord({"leak": 1.0})}),
                                   reply_to=m))
                continue
            out.append(head_refit_reply(m, self.settings, self.shards[node], None))
        return out


@pytest.mark.usefixtures("server_identity")
def test_the_servers_refit_on_the_merchants_sums_is_the_pooled_refit() -> None:
    from server.head_refit import refit_head

    settings, merchant, model = _federation_settings()
    snaps = _snaps(900, seed=6, uplift=2.0)
    shards = {1: snaps.subset(np.arange(0, 400)), 2: snaps.subset(np.arange(400, 890)),
              3: snaps.subset(np.arange(890, 900))}  # 10 rows: too few to answer
    grid = _Merchants(shards, merchant)
    weights = [np.asarray(w) for w in model.get_weights()]
    refit_weights, summary = refit_head(grid, settings, model, weights)
    assert summary is not None and summary["status"] == "ok" and summary["steps"] == 3
    # The first step asks every node; the two that answered it are asked after it.
    assert summary["merchants"] == [2, 2, 2] and len(summary["failures"]) == 2
    assert any("training campaign snapshots, fewer than the" in f
               for f in summary["failures"])
    assert any("metric names" in f for f in summary["failures"])
    # The pooled refit on the two answering merchants' rows together.
    model.set_weights(weights)
    refit_locally(model, snaps.subset(np.arange(0, 890)), 3)
    for i, (a, b) in enumerate(zip(refit_weights, model.get_weights(), strict=True)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        if i not in head_positions(model):
            np.testing.assert_array_equal(a, weights[i])  # only the head moved
    assert grid.asked == [1, 2, 3, 9, 1, 2, 1, 2]


@pytest.mark.usefixtures("server_identity")
def test_a_merchant_gone_after_the_first_step_stops_the_refit_at_the_best_head() -> None:
    from server.head_refit import refit_head

    settings, merchant, model = _federation_settings()
    snaps = _snaps(600, seed=7, uplift=2.0)
    shards = {1: snaps.subset(np.arange(0, 300)), 2: snaps.subset(np.arange(300, 600))}
    grid = _Merchants(shards, merchant, leaves=2)
    weights = [np.asarray(w) for w in model.get_weights()]
    kept, summary = refit_head(grid, settings, model, weights)
    assert summary is not None and summary["merchants"] == [2, 1]
    assert summary["note"] == "1 of the 2 merchants of the first step did not answer a later one"
    # The one head summed was the rounds' own: it is kept.
    for a, b in zip(kept, weights, strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_server_does_not_ask_under_secagg_or_dp() -> None:
    from server.config import settings_from_flat as server_settings
    from server.head_refit import refit_head

    base = {"model.lstm-units": 4, "model.dense-units": 4, "snapshots.max-len": 4,
            "snapshots.hash-buckets": 8, "federation.run-dir": "unused"}
    model = build_model(server_settings(base).model, server_settings(base).snapshots)
    weights = model.get_weights()
    for changes, says in (({"federation.secure-aggregation": True}, "SecAgg+"),
                          ({"federation.strategy": "krum"}, "not robust"),
                          ({"privacy.mode": "server-fixed"}, "differential privacy"),
                          ({"privacy.unit": "customer"}, "differential privacy")):
        kept, summary = refit_head(None, server_settings({**base, **changes}), model, weights)
        assert kept is weights and summary is not None
        assert summary["status"] == "unavailable" and says in summary["reason"]
    kept, summary = refit_head(None, server_settings({**base, "federation.head-refit-steps": 0}),
                               model, weights)
    assert kept is weights and summary is None


@pytest.mark.usefixtures("server_identity")
def test_a_merchant_declines_by_node_config_or_without_valid_steps() -> None:
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

    from client.config import settings_from_flat as client_settings
    from client.head_refit import declines, head_refit_reply
    from common.protocol import HEAD_REFIT_KEY, HEAD_REFIT_STEPS_KEY

    flat = {"model.lstm-units": 4, "model.dense-units": 4, "model.jit-compile": False,
            "snapshots.max-len": 4, "snapshots.hash-buckets": 8, "seed": 3}
    settings = client_settings(flat)
    model = build_model(settings.model, settings.snapshots, seed=3)
    content = RecordDict({"arrays": ArrayRecord(model.get_weights()),
                          "config": ConfigRecord({HEAD_REFIT_KEY: True,
                                                  HEAD_REFIT_STEPS_KEY: 3})})
    msg = Message(content=content, dst_node_id=1, message_type="evaluate")
    snaps = _snaps(1000, seed=10)
    answered = head_refit_reply(msg, settings, snaps, None, {"data-path": "/d.csv"})
    assert not answered.has_error()
    for value in (False, "false", "off"):
        assert declines({"head-refit": value})
        reply = head_refit_reply(msg, settings, snaps, None, {"head-refit": value})
        assert reply.has_error() and "declines" in reply.error.reason
    assert not declines({}) and not declines({"head-refit": True})
    for steps in (None, 0, 21, True, 2.5):  # the steps must be announced, in [1, 20]
        config = {HEAD_REFIT_KEY: True} | ({} if steps is None else
                                           {HEAD_REFIT_STEPS_KEY: steps})
        bad = Message(content=RecordDict({"arrays": ArrayRecord(model.get_weights()),
                                          "config": ConfigRecord(config)}),
                      dst_node_id=1, message_type="evaluate")
        reply = head_refit_reply(bad, settings, snaps, None, {})
        assert reply.has_error() and "'head-refit-steps' must be an int" in reply.error.reason
