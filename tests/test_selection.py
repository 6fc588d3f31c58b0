"""Model selection in deployment: the server holds no data, so round r's train replies
score round r-1's global model on the merchants' validation rows, weighted by those rows;
the last round's model is scored by evaluate messages that ask for the validation loss.

A scripted grid stands in for two merchants: each reply moves the global model by one
(so the model after round r is the initial one plus r) and reports the loss its table
gives the incoming model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message, MessageType, MetricRecord, RecordDict
from helpers import FakeGrid

from server.rounds import federated_scores

pytestmark = pytest.mark.usefixtures("server_identity")

#: Validation rows of each merchant (node id -> rows).
VAL_ROWS = {1: 10, 2: 30}


class ScriptedGrid(FakeGrid):
    """Two merchants whose validation loss of global model r is ``losses[node][r]``."""

    def __init__(self, losses: dict[int, list[float]]) -> None:
        super().__init__(sorted(losses))
        self.losses = losses
        self.trained = 0  # train rounds answered: the incoming model's round
        self.sent: list[tuple[str, int, dict[str, Any]]] = []

    def send_and_receive(self, messages: Any, *, timeout: float | None = None
                         ) -> list[Message]:
        messages = list(messages)
        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            config = dict(m.content.config_records["config"])
            self.sent.append((m.metadata.message_type, node, config))
            if m.metadata.message_type == MessageType.TRAIN:
                loss = self.losses[node][self.trained]
                arrays = m.content["arrays"].to_numpy_ndarrays()
                metrics = {"num-examples": 20, "train_loss": 0.5, "pre_val_loss": loss,
                           "val_examples": VAL_ROWS[node], "pre_eval_loss": loss,
                           "pre_decay_log_loss": loss, "test_examples": 5}
                content = RecordDict({"arrays": _record([a + 1 for a in arrays]),
                                      "metrics": MetricRecord(metrics)})
            else:  # evaluate: the global model of the round just trained
                metrics = {"num-examples": 5, "eval_loss": 0.3}
                if config.get("score-validation"):
                    metrics |= {"pre_val_loss": self.losses[node][self.trained],
                                "val_examples": VAL_ROWS[node]}
                content = RecordDict({"metrics": MetricRecord(metrics)})
            replies.append(Message(content, reply_to=m))
        if messages and messages[0].metadata.message_type == MessageType.TRAIN:
            self.trained += 1
        return replies


def _record(arrays: list[np.ndarray]) -> Any:
    from flwr.app import ArrayRecord

    return ArrayRecord([np.asarray(a, np.float32) for a in arrays])


def _run(tmp_path: Path, losses: dict[int, list[float]], *, shift_patience: int = 4,
         **federation: Any) -> tuple[dict[str, Any], list[dict[str, Any]], ScriptedGrid, Path]:
    from server.app import run_federation
    from server.config import settings_from_flat

    run_dir = tmp_path / "run"
    flat = {"federation.mode": "deployment", "federation.min-available-nodes": 2,
            "federation.min-train-nodes": 2, "federation.run-dir": str(run_dir),
            "model.lstm-units": 4, "model.dense-units": 4, "snapshots.max-len": 4,
            "snapshots.hash-buckets": 8, "train.shift-patience": shift_patience,
            # Rounds are told apart by their scripted weights: no server step on the shifts,
            # no head refit after the rounds.
            "federation.shift-server-momentum": 0.0, "federation.head-refit-steps": 0,
            **{f"federation.{k}": v for k, v in federation.items()}}
    grid = ScriptedGrid(losses)
    summary = run_federation(grid, settings_from_flat(flat))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return summary, rows, grid, run_dir


def _kept_round(run_dir: Path, shifts: bool = False) -> int:
    """How far the kept model is from the initial one: the round it is from (of its
    response shifts with ``shifts``, of every other weight without)."""
    from common.model import build_model, load_model, response_shift_weights, weights_of
    from server.config import settings_from_flat

    model = load_model(run_dir / "model.keras")
    kept = weights_of(model)
    flat = {"model.lstm-units": 4, "model.dense-units": 4, "snapshots.max-len": 4,
            "snapshots.hash-buckets": 8}
    settings = settings_from_flat(flat)
    initial = weights_of(build_model(settings.model, settings.snapshots, seed=settings.seed))
    positions = set(response_shift_weights(model))
    offsets = {round(float(np.mean(k - i))) for n, (k, i) in enumerate(zip(kept, initial,
                                                                          strict=True))
               if (n in positions) == shifts}
    assert len(offsets) == 1, offsets
    return offsets.pop()


def test_federated_scores_weigh_each_merchants_loss_by_its_rows() -> None:
    replies = [{"pre_val_loss": 0.2, "val_examples": 10, "pre_eval_loss": 1.0,
                "pre_decay_log_loss": 0.5, "test_examples": 1},
               {"pre_val_loss": 0.8, "val_examples": 30, "pre_eval_loss": 2.0,
                "pre_decay_log_loss": 0.7, "test_examples": 3},
               {"pre_val_loss": 0.0, "val_examples": 0, "pre_eval_loss": 0.0,
                "pre_decay_log_loss": 0.0, "test_examples": 0},  # no rows: no weight
               {"num-examples": 4}]  # pre-evaluation off: ignored
    scores = federated_scores(replies)
    assert scores == pytest.approx({"val_loss": (2 + 24) / 40, "val_examples": 40,
                                    "merchants": 2, "eval_loss": (1 + 6) / 4,
                                    "decay_log_loss": 2.6 / 4, "test_examples": 4})
    assert federated_scores([{"num-examples": 4}]) == {}


def test_deployment_keeps_the_round_with_the_lowest_weighted_validation_loss(
        tmp_path: Path) -> None:
    # Round:            0    1    2    3
    losses = {1: [1.0, 0.2, 0.9, 0.8],   # 10 rows
              2: [1.0, 0.8, 0.5, 0.7]}   # 30 rows
    # Weighted: 1.0, 0.65, 0.6, 0.725 -> round 2 (unweighted means would pick round 1).
    summary, rows, grid, run_dir = _run(tmp_path, losses, **{"num-rounds": 3})

    assert summary["selected_round"] == 2
    assert summary["selected_val_loss"] == pytest.approx(0.6)
    assert _kept_round(run_dir) == 2
    assert _kept_round(run_dir, shifts=True) == 3  # train.shift-patience: the last round's
    # metrics.jsonl: each round's line holds the previous round's model's score, the
    # last line also its own model's (evaluate messages).
    assert "federated" not in rows[0]  # round 0: nothing sent yet
    assert [r["federated"]["val_loss"] for r in rows[1:]] == pytest.approx([1.0, 0.65, 0.6])
    assert rows[-1]["federated_final"]["val_loss"] == pytest.approx(0.725)
    assert all(r["federated"]["val_examples"] == 40 for r in rows[1:])
    assert all(r["federated"]["merchants"] == 2 for r in rows[1:])
    assert rows[-1]["federated_final"]["merchants"] == 2
    assert not any("pre_val_loss" in r["train"] for r in rows[1:])
    # Every train message asked for the score; only the last round sent evaluate
    # messages (fraction-evaluate is 0), to both merchants, asking for validation.
    train = [c for kind, _, c in grid.sent if kind == MessageType.TRAIN]
    evaluate = [(n, c) for kind, n, c in grid.sent if kind == MessageType.EVALUATE]
    assert len(train) == 6 and all(c.get("pre-evaluate") for c in train)
    assert sorted(n for n, _ in evaluate) == [1, 2]
    assert all(c["score-validation"] and c["server-round"] == 3 for _, c in evaluate)


def test_without_shift_patience_the_shifts_come_from_the_selected_round(
        tmp_path: Path) -> None:
    losses = {1: [1.0, 0.2, 0.9, 0.8], 2: [1.0, 0.8, 0.5, 0.7]}
    summary, _, _, run_dir = _run(tmp_path, losses, shift_patience=0, **{"num-rounds": 3})
    assert summary["selected_round"] == 2
    assert _kept_round(run_dir) == _kept_round(run_dir, shifts=True) == 2


def test_the_last_rounds_model_is_kept_when_its_evaluate_replies_score_best(
        tmp_path: Path) -> None:
    losses = {1: [1.0, 0.9, 0.8, 0.1], 2: [1.0, 0.9, 0.8, 0.2]}
    summary, _, _, run_dir = _run(tmp_path, losses, **{"num-rounds": 3})
    assert summary["selected_round"] == 3
    assert summary["selected_val_loss"] == pytest.approx((1 + 6) / 40)
    assert _kept_round(run_dir) == 3


def test_patience_stops_a_deployment_when_the_federated_loss_stops_improving(
        tmp_path: Path) -> None:
    losses = {n: [1.0, 0.5, 0.6, 0.7, 0.4, 0.3, 0.2] for n in VAL_ROWS}
    summary, rows, _, run_dir = _run(tmp_path, losses,
                                     **{"num-rounds": 6, "patience-rounds": 2})
    # Round 2 scores model 1 (best), rounds 3 and 4 score models 2 and 3 (worse): stop.
    assert summary["stop_reason"] == "patience"
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert summary["selected_round"] == 1
    assert _kept_round(run_dir) == 1


def test_pre_evaluation_off_keeps_the_last_round_and_sends_no_evaluate(
        tmp_path: Path) -> None:
    losses = {n: [1.0, 0.1, 0.9, 0.9] for n in VAL_ROWS}
    summary, rows, grid, run_dir = _run(tmp_path, losses,
                                        **{"num-rounds": 3, "pre-evaluate": "off"})
    assert summary["selected_round"] == -1 and math.isinf(summary["selected_val_loss"])
    assert _kept_round(run_dir) == 3
    assert all(kind == MessageType.TRAIN and "pre-evaluate" not in c
               for kind, _, c in grid.sent)


def test_pre_evaluate_is_on_by_default_in_deployment_only() -> None:
    from server.config import FederationConfig

    assert FederationConfig(mode="deployment").pre_evaluates
    assert not FederationConfig().pre_evaluates
    assert FederationConfig(pre_evaluate="on").pre_evaluates
    with pytest.raises(ValueError, match="federation.pre-evaluate"):
        FederationConfig(pre_evaluate="yes")


def test_the_last_round_of_a_halted_run_is_not_logged_or_opened_again(
        caplog: pytest.LogCaptureFixture) -> None:
    """configure_evaluate of a run whose engine failed asks for no validation score,
    and neither logs the failure a second time nor opens a stats entry for the round."""
    import logging
    import threading

    from flwr.app import ArrayRecord, ConfigRecord

    from server.config import FederationConfig
    from server.strategy import build_strategy

    failed = threading.Event()
    failed.set()
    fed = FederationConfig(mode="deployment", num_rounds=1, min_available_nodes=2,
                           min_train_nodes=2)
    strategy = build_strategy(fed, seed=0, engine_failed=failed)
    config = ConfigRecord({})
    with caplog.at_level(logging.ERROR, logger="server"):
        messages = list(strategy.configure_evaluate(
            1, ArrayRecord([np.zeros(2, np.float32)]), config, FakeGrid([1, 2])))
    assert messages == [] and "score-validation" not in config
    assert strategy.rounds.get(1) is None
    assert not [r for r in caplog.records if "engine failed" in r.getMessage()]
