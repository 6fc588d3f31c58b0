"""A two-node Ray cluster on this machine: ``fedecay simulate --ray-address`` puts its
clients on both nodes (docs/cluster.md).

The head and the second node are two ``ray start --block`` processes, each in a session
and a temp dir of its own, stopped by process group when the test ends. One CPU a node
and one CPU a client make Flower's pool one actor a node. Where each ClientApp message
ran is read from Ray's own record, its export events (``RAY_enable_export_api_write_config``):
the head's GCS writes every node and actor with its node id, and each actor's worker
writes the tasks it ran into the temp dir of the node it runs on.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from helpers import PROJECT, RayNode, free_ports, ray_node, read_jsonl, sim_env, tail

MERCHANTS, ROUNDS = 4, 1
RUN = "task::ClientAppActor.run"  # Ray's profile event of one ClientApp message


def export_events(node: RayNode, kind: str) -> list[tuple[Path, dict[str, Any]]]:
    """``(file, event_data)`` of every ``EXPORT_<kind>`` event in the node's temp dir."""
    files = sorted(node.temp_dir.glob(f"session_*/logs/export_events/event_EXPORT_{kind}*.log"))
    return [(f, json.loads(line)["event_data"]) for f in files
            for line in f.read_text().splitlines() if line.strip()]


def messages_run(node: RayNode) -> Counter[int]:
    """ClientApp messages run on this node, by worker pid."""
    runs: Counter[int] = Counter()
    for f, event in export_events(node, "TASK"):
        profile = event.get("profile_events", {}).get("events", [])
        runs[int(f.stem.rsplit("_", 1)[1])] += sum(p["event_name"] == RUN for p in profile)
    return +runs


@pytest.mark.slow
def test_simulate_places_clients_on_both_nodes_of_a_two_node_cluster(tmp_path: Path) -> None:
    # The nodes start the actors, so their settings go to `ray start`: the driver's
    # environment does not reach a raylet's workers.
    env = {**sim_env(tmp_path / "flwr-home"), "TF_NUM_INTRAOP_THREADS": "1",
           "TF_NUM_INTEROP_THREADS": "1",
           "RAY_enable_export_api_write_config": "EXPORT_NODE,EXPORT_ACTOR,EXPORT_TASK"}
    gcs, client_server, agent_head, agent_node = free_ports(4)
    # Ray picks its other ports itself; these have fixed defaults (6379, 10001, and 52365
    # on every node) that two nodes on one host, or other Ray clusters on it, would share.
    # No dashboard (it needs ray[default]); worker ports random, not 10002-19999 for both.
    each = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--min-worker-port=0",
            "--max-worker-port=0"]
    started = time.monotonic()
    with ray_node(["--head", f"--port={gcs}", f"--ray-client-server-port={client_server}",
                   "--include-dashboard=false", f"--dashboard-agent-listen-port={agent_head}",
                   *each],
                  tmp_path / "head.log", env) as head, \
            ray_node([f"--address=127.0.0.1:{gcs}",
                      f"--dashboard-agent-listen-port={agent_node}", *each],
                     tmp_path / "node.log", env) as node:
        up = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-m", "simulations.cli", "simulate", "--preset", "quick",
             "--ray-address", f"127.0.0.1:{gcs}",
             "--set", f"federation.num-rounds={ROUNDS}",
             "--set", f"synthetic.num-merchants={MERCHANTS}",
             "--set", "simulation.client-cpus=1",
             "--set", f"experiment.output-dir={tmp_path / 'runs'}"],
            cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300)
        simulated = time.monotonic()
        assert out.returncode == 0, out.stderr[-3000:] + tail(tmp_path / "head.log")
        # Off a terminal the progress is one line per round on stderr.
        assert f"federated rounds {ROUNDS}/{ROUNDS} rounds" in out.stderr
        assert f"clients={MERCHANTS}/{MERCHANTS}" in out.stderr
        [metrics] = (tmp_path / "runs").glob("*-simulate-quick/metrics.jsonl")
        rounds = [r for r in read_jsonl(metrics) if r["round"] >= 1]
        assert [r["replied"] for r in rounds] == [MERCHANTS] * ROUNDS

        # Two distinct nodes, the first the head.
        nodes = {e["node_id"]: e["is_head_node"] for _, e in export_events(head, "NODE")}
        assert sorted(nodes.values()) == [False, True], nodes
        head_id = next(n for n, is_head in nodes.items() if is_head)
        # One ClientApp actor a node (Flower sizes its pool node by node).
        actors = {e["pid"]: e["node_id"] for _, e in export_events(head, "ACTOR")
                  if e["class_name"] == "ClientAppActor" and e["state"] == "ALIVE"}
        assert sorted(actors.values()) == sorted(nodes), actors
        # Each node's actor ran messages, recorded on that node by that actor's process.
        on_head, on_node = messages_run(head), messages_run(node)
        assert on_head and {actors[pid] for pid in on_head} == {head_id}, (on_head, actors)
        assert on_node and {actors[pid] for pid in on_node} == set(nodes) - {head_id}, \
            (on_node, actors)
        assert on_head.total() + on_node.total() >= MERCHANTS * ROUNDS
    print(f"\ntwo Ray nodes up in {up - started:.0f} s, simulate {simulated - up:.0f} s; "
          f"ClientApp messages run: head {on_head.total()}, second node {on_node.total()}")
