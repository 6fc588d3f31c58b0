"""The deployment benchmark: seconds per round of a real TLS deployment on loopback.

For each merchant count and warm-trainer setting, :func:`run_deployment_bench` starts a
:class:`simulations.loopback.LoopbackFederation` (the smallest merchants of the
``quick`` synthetic federation, one canonical CSV each), runs ``rounds`` rounds of one
message per merchant (the train reply carries the incoming model's scores, no separate
evaluate), stops everything, and splits each round's time by stage from the ClientApps'
timing lines (:class:`client.timer.HandlerTimer`):

- ``start``: the ClientApp process's age when its handler began (Python, Flower, the
  app bundle, the app's imports), on the round's slowest node;
- ``setup``: reading the file, importing TensorFlow and building the model in the
  ClientApp (cold), or the trainer's own data and model laps (warm);
- ``hand-off``: the channel's cost (the hand-off lap minus the trainer's work);
- ``training``: local training and the pre-training scores;
- ``messaging``: the rest of the round: Flower's polling, process launch, transport,
  the server's aggregation and checkpoint.
"""

from __future__ import annotations

import os
import re
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.progress import SILENT, Progress

#: Flower's latency knobs the benchmark's processes get (see docs/deployment.md).
FLOWER_KNOBS = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}
#: Laps of a handler that are local training and scoring; the others are set-up.
TRAINING_LAPS = ("fit", "pre-training evaluation", "evaluate")
_LINE = re.compile(r"(?P<kind>train|evaluate) round (?P<round>\d+): handler began "
                   r"(?P<age>[\d.]+) s after process start; (?P<laps>[^(\n]*?)"
                   r"(?: \(trainer: (?P<trainer>[^)\n]*)\))?$", re.M)
_LAP = re.compile(r"(?P<name>[\w -]+?) (?P<seconds>[\d.]+) s")


def parse_laps(text: str) -> dict[str, float]:
    """``name 1.23 s, other 0.5 s`` as {name: seconds} (repeated names summed)."""
    laps: dict[str, float] = {}
    for match in _LAP.finditer(text):
        name = match["name"].strip()
        laps[name] = laps.get(name, 0.0) + float(match["seconds"])
    return laps


def message_stages(line: re.Match[str]) -> dict[str, float]:
    """One timing line split into the benchmark's stages (seconds)."""
    laps, trainer = parse_laps(line["laps"]), parse_laps(line["trainer"] or "")
    work = trainer if line["trainer"] else laps
    training = sum(v for k, v in work.items() if k in TRAINING_LAPS)
    setup = sum(v for k, v in work.items() if k not in TRAINING_LAPS)
    handoff = laps.get("hand-off", 0.0) - sum(trainer.values()) if line["trainer"] else 0.0
    local = sum(v for k, v in laps.items() if k != "hand-off") if line["trainer"] else 0.0
    return {"start": float(line["age"]), "setup": setup + local,
            "hand-off": max(handoff, 0.0), "training": training}


def round_stages(node_logs: Sequence[Path], metrics: Sequence[dict[str, Any]]
                 ) -> list[dict[str, Any]]:
    """Per round: its seconds and the stages of its critical path, the slowest merchant's
    train message plus, when the round sent any, the slowest evaluate message."""
    lines: dict[tuple[int, str], list[dict[str, float]]] = {}
    for log in node_logs:
        for match in _LINE.finditer(log.read_text(errors="replace")):
            key = (int(match["round"]), match["kind"])
            lines.setdefault(key, []).append(message_stages(match))
    rows = []
    for entry in metrics:
        r, seconds = int(entry["round"]), float(entry["round_seconds"])
        if r < 1:
            continue
        path = [max(lines[(r, kind)], key=lambda s: sum(s.values()))
                for kind in ("train", "evaluate") if (r, kind) in lines]
        stages = {k: sum(s[k] for s in path) if path else float("nan")
                  for k in ("start", "setup", "hand-off", "training")}
        rows.append({"round": r, "round_s": seconds, **stages,
                     "messaging": seconds - sum(stages.values()),
                     "messages": len(path),
                     "warm": sum(1 for s in lines.get((r, "train"), []) if s["hand-off"] > 0)})
    return rows


def write_merchants(out: Path, count: int, seed: int = 0) -> list[Path]:
    """The ``count`` smallest merchants of the ``quick`` federation, one canonical CSV
    each, and the shared calendar's run-config entries (written beside as ``calendar``)."""
    from common.config import SnapshotConfig
    from common.io import write_events
    from simulations.experiment import shared_calendar
    from simulations.synth import generate_federation, load_preset, synth_config_from_preset

    fed = generate_federation(synth_config_from_preset(load_preset("quick")), seed=seed)
    merchants = fed.events["merchant_id"].astype(str)
    smallest = merchants.value_counts().sort_values(kind="stable").index[:count]
    out.mkdir(parents=True, exist_ok=True)
    calendar = shared_calendar(fed.events, SnapshotConfig())
    (out / "calendar").write_text(f"{calendar.start}\n{calendar.end}\n")
    return [write_events(fed.events[merchants == m], out / f"{m}.csv") for m in smallest]


def run_deployment_bench(counts: Sequence[int], warm: Sequence[bool], runs: int = 2,
                         rounds: int = 3, work_dir: Path | None = None,
                         extra_env: dict[str, str] | None = None,
                         progress: Progress = SILENT) -> list[dict[str, Any]]:
    """Time ``rounds`` rounds of every (merchant count, warm trainer) ``runs`` times.

    Returns one row per run: the configuration, the load average before it, round 1's
    seconds, the last round's, and the steady rounds' stages (:func:`summarise`).
    """
    from common import jsonl
    from simulations.loopback import LoopbackFederation, Node

    base = Path(work_dir or tempfile.mkdtemp(prefix="fdbench-")).absolute()
    files = write_merchants(base / "data", max(counts))
    start, end = (base / "data" / "calendar").read_text().split()
    results = []
    plan = [(n, w, k) for n in counts for w in warm for k in range(1, runs + 1)]
    with progress.task("deployment runs", total=len(plan), unit="runs") as task:
        for n, w, k in plan:
            name = f"n{n}-{'warm' if w else 'cold'}-{k}"
            load = os.getloadavg()[0]
            nodes = {f"m{i}": Node(path, "canonical", trainer=w)
                     for i, path in enumerate(files[:n])}
            with LoopbackFederation(base / name, nodes,
                                    {**FLOWER_KNOBS, **(extra_env or {})}) as fed:
                t = time.monotonic()
                fed.start()
                startup = time.monotonic() - t
                config = ["federation.mode='deployment'", f"federation.num-rounds={rounds}",
                          "federation.fraction-evaluate=0.0", f"federation.run-dir='{name}'",
                          f"federation.min-train-nodes={n}",
                          f"federation.min-available-nodes={n}",
                          f"snapshots.start='{start}'", f"snapshots.end='{end}'"]
                (base / name / "load").write_text(f"{load:.2f}\n")
                seconds = fed.run(config, base / name / "flwr-run.log")
                metrics = jsonl.read(fed.run_dir(name) / "metrics.jsonl")
                rows = round_stages(list(fed.logs.values()), metrics)
            summary: dict[str, Any] = {
                "merchants": n, "trainer": "warm" if w else "cold", "run": k, "load": load,
                "startup_s": startup, "flwr_run_s": seconds, **summarise(rows)}
            summary["rounds"], summary["logs"] = rows, str(base / name)
            results.append(summary)
            task.advance(round_s=summary["round_s"])
    return results


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Round 1 (the trainer's first build and tracing), the last round (which also sends
    the final evaluate messages), and the medians of the rounds between: one message
    per merchant, the steady state."""
    nan = float("nan")
    middle = rows[1:-1] or rows[1:]
    out = {"round1_s": rows[0]["round_s"] if rows else nan,
           "last_s": rows[-1]["round_s"] if len(rows) > 1 else nan}
    for key in ("round_s", "start", "setup", "hand-off", "training", "messaging"):
        out[key] = statistics.median([r[key] for r in middle]) if middle else nan
    return out


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """A Markdown table: one row per run; the stages are those of the steady rounds."""
    head = ("| merchants | trainer | run | load | round 1 s | round s | start | setup | "
            "hand-off | training | messaging | last round s |")
    rows = [head, "|" + "---|" * 12]
    for r in results:
        rows.append(f"| {r['merchants']} | {r['trainer']} | {r['run']} | {r['load']:.1f} | "
                    f"{r['round1_s']:.1f} | {r['round_s']:.1f} | {r['start']:.1f} | "
                    f"{r['setup']:.1f} | {r['hand-off']:.2f} | {r['training']:.1f} | "
                    f"{r['messaging']:.1f} | {r['last_s']:.1f} |")
    return "\n".join(rows)
