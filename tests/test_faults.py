"""Faults a federation must survive and report: a client slower than the round timeout,
and a ClientApp process SIGKILLed the way the kernel's OOM killer kills it.

The unit tests cover the seeded fault plan and the server's account of a dead actor.
The slow tests share one real simulation (``helpers.Simulation``: a subprocess
in a session of its own, killed with everything it started; ~3 min on 2 busy cores):
3 merchants, 4 rounds, one merchant asleep past the round timeout in round 1, another
one's process SIGKILLed in round 3; the driver records every instruction pushed, every
reply stored and every reply handed to the strategy.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import Simulation, read_jsonl, run_driver

from client.config import ClientConfig
from client.faults import planned_fault
from server.checkpoint import load_checkpoint
from server.rounds import error_summary

# ---------------------------------------------------------------------------------------
# The seeded fault plan
# ---------------------------------------------------------------------------------------


def _plan(cfg: ClientConfig, seed: int, partitions: int, rounds: int = 2
          ) -> dict[int, dict[int, str]]:
    """{round: {partition: fault}} for the partitions that have one."""
    return {r: {p: f for p in range(partitions)
                if (f := planned_fault(cfg, seed, r, p)) is not None}
            for r in range(1, rounds + 1)}


def test_fault_plan_is_seeded_and_crash_draw_leaves_the_others_alone() -> None:
    cfg = ClientConfig(dropout_prob=0.2, straggler_prob=0.2, crash_prob=0.3)
    plan = _plan(cfg, seed=5, partitions=200)
    assert plan == _plan(cfg, seed=5, partitions=200)
    assert plan != _plan(cfg, seed=6, partitions=200)
    kinds = [f for faults in plan.values() for f in faults.values()]
    # 400 draws: about 80 dropouts, 64 stragglers, 77 crashes.
    assert {k: kinds.count(k) for k in ("dropout", "straggler", "crash")} == \
        {"dropout": pytest.approx(80, abs=25), "straggler": pytest.approx(64, abs=25),
         "crash": pytest.approx(77, abs=25)}
    # The crash draw comes last: adding it changes no dropout or straggler of a seed.
    without = _plan(ClientConfig(dropout_prob=0.2, straggler_prob=0.2), seed=5, partitions=200)
    assert without == {r: {p: f for p, f in faults.items() if f != "crash"}
                       for r, faults in plan.items()}
    everyone = _plan(ClientConfig(crash_prob=1.0), seed=5, partitions=10)
    assert everyone == {r: dict.fromkeys(range(10), "crash") for r in (1, 2)}
    with pytest.raises(ValueError, match="client.crash-prob"):
        ClientConfig(crash_prob=1.5)


#: What Flower 1.42 put in the error reply of the ClientApp killed in the run below
#: (``vce_api.worker``: ``str(type(ex)) + ":<'" + str(ex) + "'>"``).
ACTOR_DIED = (
    "<class 'ray.exceptions.ActorDiedError'>:<'The actor died unexpectedly before "
    "finishing this task.\n\tclass_name: ClientAppActor\n\tactor_id: "
    "a24201e6adcfa64df2a22f8801000000\n\tpid: 28380\n\tnamespace: b44a4a52\n\tip: "
    "192.0.2.2\nThe actor is dead because its worker process has died. Worker exit type: "
    "SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits with a connection error "
    "code 2. End of file. Some common causes include: (1) the process was killed by the "
    "OOM killer due to high memory usage, (2) ray stop --force was called, or (3) the "
    "worker crashed unexpectedly due to SIGSEGV or another unexpected error.'>"
)


def test_a_dead_actor_is_reported_in_one_line_with_its_pid() -> None:
    assert error_summary(ACTOR_DIED) == (
        "ClientApp's Ray actor (pid 28380) died, worker exit SYSTEM_ERROR: killed by the "
        "OOM killer or another signal, or crashed (see the Ray log)")
    by_ray = ACTOR_DIED.replace("Worker exit type: SYSTEM_ERROR",
                                "Worker exit type: NODE_OUT_OF_MEMORY")
    assert error_summary(by_ray) == ("ClientApp's Ray actor (pid 28380) was killed by Ray's "
                                     "memory monitor: the node ran out of memory")
    other = "merchant data rejected (DataError); the reason is in this merchant's log"
    assert error_summary(other) == other


# ---------------------------------------------------------------------------------------
# Real simulations
# ---------------------------------------------------------------------------------------

SEED = 431
MERCHANTS = 3
ROUNDS = 4
#: Seeded plan of the run (checked below): partition 1 sleeps in round 1, partition 2's
#: process is SIGKILLed in round 3. Apart so that no round has two cold starts in it
#: (the first round's actors, the dead actor's replacement) and a round after each.
KNOBS = ClientConfig(straggler_prob=0.2, crash_prob=0.2)
SLOW, SLOW_ROUND = 1, 1
KILLED, KILL_ROUND = 2, 3
#: Round timeout: above a cold first round (Ray actors importing TensorFlow, the first
#: fit tracing its graph: 15-70 s seen on a 2-core machine shared with other jobs).
TIMEOUT = 90
#: The straggler sleeps this long before its work: late whatever the load.
DELAY = TIMEOUT + 5


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulation]:
    """One run with both faults, every instruction and reply recorded by the driver."""
    plan = _plan(KNOBS, SEED, MERCHANTS, ROUNDS)
    expected: dict[int, dict[int, str]] = {g: {} for g in range(1, ROUNDS + 1)}
    expected[SLOW_ROUND], expected[KILL_ROUND] = {SLOW: "straggler"}, {KILLED: "crash"}
    assert plan == expected, f"the seeded plan changed ({plan}): pick another seed"
    tmp = tmp_path_factory.mktemp("faults")
    overrides = [
        f"synthetic.num-merchants={MERCHANTS}", f"federation.num-rounds={ROUNDS}",
        "federation.local-epochs=1", f"federation.keep-checkpoints={ROUNDS}",
        f"federation.round-timeout={TIMEOUT}", "model.jit-compile=false",
        f"simulation.straggler-prob={KNOBS.straggler_prob}",
        f"simulation.straggler-delay={DELAY}", f"simulation.crash-prob={KNOBS.crash_prob}",
        f"experiment.seed={SEED}", f"experiment.output-dir={tmp}",
        # Each round's weights are checked against FedAvg of its on-time replies: no
        # server step on the response shifts (tests/test_shift_step.py covers that).
        "federation.shift-server-momentum=0",
    ]
    sim = Simulation(tmp, "faults", tmp / "run", overrides, observe=tmp / "observed.jsonl",
                     keep_weights=True)
    try:
        sim.wait(timeout=480)
        yield sim
    finally:
        sim.stop()


def _observed(sim: Simulation) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """The driver's records and its partition id -> node id map."""
    assert sim.observe is not None
    nodes = json.loads(Path(f"{sim.observe}.nodes.json").read_text())
    return read_jsonl(sim.observe), {pid: int(node) for node, pid in nodes.items()}


def _weighted_mean(rows: list[dict[str, Any]]) -> list[np.ndarray]:
    """FedAvg by hand: the replies' weights averaged by their num-examples."""
    total = float(sum(r["num_examples"] for r in rows))
    tensors = []
    for r in rows:
        with np.load(r["weights"]) as npz:
            tensors.append([npz[f"arr_{i}"].astype(np.float64) for i in range(len(npz.files))])
    return [sum(r["num_examples"] / total * t[i] for r, t in zip(rows, tensors, strict=True))
            for i in range(len(tensors[0]))]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_client_slower_than_the_round_timeout(faulty_run: Simulation) -> None:
    rows = read_jsonl(faulty_run.run_dir / "metrics.jsonl")
    records, node = _observed(faulty_run)
    slow = node[SLOW]
    log = faulty_run.log.read_text(errors="replace")

    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    # The round waited the whole timeout, then went on with the replies it had.
    cut = rows[SLOW_ROUND]
    assert (cut["sampled"], cut["replied"], cut["failed"], cut["timed_out"]) == \
        (MERCHANTS, MERCHANTS - 1, 1, 1)
    assert cut["failures"] == [f"node {slow}: no reply within round-timeout {TIMEOUT} s"]
    assert cut["round_seconds"] >= TIMEOUT
    assert (f"round {SLOW_ROUND}: node {slow} sent no reply within round-timeout {TIMEOUT} s"
            in log)
    # The next round is whole, the straggler's node too: another actor runs its message
    # while its previous ClientApp may still be asleep. No round after waits for it.
    after = rows[SLOW_ROUND + 1]
    assert (after["sampled"], after["replied"], after["failed"]) == (MERCHANTS, MERCHANTS, 0)
    assert [r["timed_out"] for r in rows[1:]] == [int(g == SLOW_ROUND)
                                                  for g in range(1, ROUNDS + 1)]

    # What the strategy was handed: each round's own replies, never the late one.
    pushed = {r["id"]: r for r in records if r["kind"] == "pushed"}
    train = [r for r in records if r["kind"] == "train" and "error" not in r]
    for g in range(1, ROUNDS + 1):
        mine = [r for r in train if r["round"] == g]
        assert len({r["node"] for r in mine}) == len(mine) == rows[g]["replied"], mine
        assert all(pushed[r["reply_to"]]["round"] == g for r in mine), mine
    late = next(r for r in pushed.values()
                if r["type"] == "train" and r["round"] == SLOW_ROUND and r["node"] == slow)
    assert late["id"] not in {r["reply_to"] for r in train}
    # When the late reply reached the link state during a later round it stayed there:
    # Flower pulls replies by the message ids of the round that waits for them.
    for r in records:
        if r["kind"] == "stored" and r["reply_to"] == late["id"]:
            assert r["t"] - late["t"] > TIMEOUT

    # Each round's global weights are FedAvg of exactly that round's on-time replies.
    for g in range(1, ROUNDS + 1):
        ckpt = faulty_run.run_dir / "checkpoints" / f"round-{g:05d}.npz"
        got = load_checkpoint(ckpt)["weights"]
        want = _weighted_mean([r for r in train if r["round"] == g])
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"round {g}")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_client_process_killed_like_the_oom_killer_does(faulty_run: Simulation) -> None:
    rows = read_jsonl(faulty_run.run_dir / "metrics.jsonl")
    _, node = _observed(faulty_run)
    killed = node[KILLED]
    log = faulty_run.log.read_text(errors="replace")

    hit = rows[KILL_ROUND]
    # The killed ClientApp's message came back as an error at once: no timeout.
    assert (hit["sampled"], hit["replied"], hit["failed"], hit["timed_out"]) == \
        (MERCHANTS, MERCHANTS - 1, 1, 0)
    assert hit["round_seconds"] < TIMEOUT
    assert len(hit["failures"]) == 1, hit["failures"]
    reason = re.fullmatch(
        rf"node {killed}: ClientApp's Ray actor \(pid (\d+)\) died, worker exit SYSTEM_ERROR: "
        r"killed by the OOM killer or another signal, or crashed \(see the Ray log\)",
        hit["failures"][0])
    assert reason, hit["failures"]
    # The log says so: Flower's and Ray's account, then ours with the same pid.
    assert "The actor died unexpectedly before finishing this task" in log
    assert "(1) the process was killed by the OOM killer" in log
    assert (f"a ClientApp's Ray actor died (pid {reason.group(1)}; killed by the OOM killer"
            in log)
    # The round after loses no message to a dead actor: a new actor replaced it (Flower
    # alone hands the dead actor more messages, each failing at once).
    after = rows[KILL_ROUND + 1]
    assert (after["sampled"], after["replied"], after["failed"]) == (MERCHANTS, MERCHANTS, 0)
    assert math.isfinite(after["centralised"]["val_loss"])
    died = [f for row in rows[1:] for f in row["failures"] if "died" in f]
    assert died == hit["failures"]
    summary = json.loads((faulty_run.run_dir / "federation.json").read_text())
    assert summary["empty_rounds"] == 0 and summary["rounds"] == ROUNDS


# ---------------------------------------------------------------------------------------
# The Simulation Engine itself fails to start
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_engine_that_fails_to_start_ends_the_run_instead_of_waiting_out_every_round(
        tmp_path: Path) -> None:
    """``drivers/engine_failure.py`` asks Ray for -1 CPUs: ``ray.init`` fails inside
    Flower's engine, as it does when the raylet times out on an overloaded machine.
    Without the guard the ServerApp thread would wait 3 x 600 s for replies."""
    run_dir = tmp_path / "run"
    run = run_driver("engine_failure", [str(run_dir)], cwd=tmp_path,
                     log=tmp_path / "engine.log", timeout=300)
    run.check()
    text = run.text()
    assert "RAISED the simulation engine failed" in text
    summary = json.loads((run_dir / "federation.json").read_text())
    assert summary["stop_reason"] == "engine-failed"
    rounds = read_jsonl(run_dir / "metrics.jsonl")
    assert all(r.get("replied", 0) == 0 for r in rounds) and len(rounds) <= 2
    assert run.seconds < 300
