"""The deployment benchmark's stage split, on hand-written SuperNode logs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from simulations.deploy_bench import round_stages, summarise

WARM = ("INFO client.app: train round {r}: handler began 8.0 s after process start; "
        "hand-off 1.50 s (trainer: data 0.10 s, tensorflow import 0.00 s, model 0.20 s, "
        "pre-training evaluation 0.30 s, fit 0.70 s)\n")
COLD = ("INFO client.app: train round {r}: handler began 5.0 s after process start; "
        "data 0.50 s, tensorflow import 9.00 s, model 1.00 s, pre-training evaluation "
        "1.00 s, fit 3.00 s\n")
EVAL = ("INFO client.app: evaluate round {r}: handler began 4.0 s after process start; "
        "hand-off 0.40 s (trainer: data 0.00 s, model 0.05 s, evaluate 0.25 s)\n")


def test_stages_of_the_slowest_message_each_round(tmp_path: Path) -> None:
    warm, cold = tmp_path / "node-a.log", tmp_path / "node-b.log"
    warm.write_text("noise\n" + WARM.format(r=1) + WARM.format(r=2) + EVAL.format(r=2))
    cold.write_text(COLD.format(r=1) + "INFO client.app: no warm trainer\n")
    metrics = [{"round": 0, "round_seconds": 1.0}, {"round": 1, "round_seconds": 30.0},
               {"round": 2, "round_seconds": 20.0}]
    one, two = round_stages([warm, cold], metrics)
    # Round 1: the cold node is slower (19.5 s busy against 9.5 s): its stages.
    assert one == pytest.approx({"round": 1, "round_s": 30.0, "start": 5.0, "setup": 10.5,
                                 "hand-off": 0.0, "training": 4.0, "messaging": 10.5,
                                 "messages": 1, "warm": 1})
    # Round 2: the warm train message plus its evaluate message. The hand-off is what the
    # ClientApp waited beyond the trainer's own laps: 1.5 - 1.3 and 0.4 - 0.3.
    assert two == pytest.approx({"round": 2, "round_s": 20.0, "start": 12.0, "setup": 0.35,
                                 "hand-off": 0.3, "training": 1.25, "messaging": 6.1,
                                 "messages": 2, "warm": 1})


def test_summary_keeps_round_one_and_the_last_apart() -> None:
    rows = [{"round": r, "round_s": s, "start": s / 2, "setup": 0.0, "hand-off": 0.1,
             "training": 1.0, "messaging": 2.0} for r, s in ((1, 60.0), (2, 10.0),
                                                             (3, 12.0), (4, 40.0))]
    out = summarise(rows)
    assert (out["round1_s"], out["last_s"], out["round_s"], out["start"]) == (60.0, 40.0,
                                                                               11.0, 5.5)
    assert math.isnan(summarise([])["round_s"])
