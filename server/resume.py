"""Where a run starts: the newest intact checkpoint of an earlier run on resume, else a
fresh start that moves an earlier run's outputs in the same folder to ``previous/``."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from common import atomic
from server.checkpoint import (
    legacy_checkpoints,
    restore_strategy_state,
    usable_checkpoints,
)
from server.dp_accounting import CHECKPOINT_KEY
from server.recorder import Selection
from server.runner import Runner
from server.shift_step import VELOCITY

log = logging.getLogger(__name__)


class ResumeError(ValueError):
    """A run that cannot be resumed without losing what it already wrote."""


def start_state(run_dir: Path, resume: bool, parts: Runner, initial: list[np.ndarray]
                ) -> tuple[int, list[np.ndarray], Selection]:
    """Rounds done, the weights to start from and the model selection so far.

    With ``resume``, from the newest intact checkpoint in ``run_dir`` (the strategy's
    optimizer state, the privacy ledger and the adaptive clipping norm restored, later
    ``metrics.jsonl`` lines dropped); else, or when the folder holds no earlier run, a
    fresh start from ``initial`` that moves an earlier run's checkpoints, metrics,
    ledger and final outputs (:data:`EARLIER_RUN`; ``flwr run`` keys the folder by the
    configuration) into ``run_dir/previous/`` (an unfinished one into
    ``previous-unfinished/``; :func:`set_aside`): the folder never holds one run's model
    beside another's rounds, and new runs that fail lose neither the model merchants
    scored with nor the earlier runs' privacy ledgers.
    """
    state = find_resume_state(run_dir) if resume else None
    if state is not None:
        _check_layout(run_dir, state, initial)
        return _resumed(run_dir, state, parts)
    set_aside(run_dir)
    return 0, initial, Selection()


#: What a finished run leaves beside its rounds (``server.app._finish``,
#: ``server.attribution``); a fresh start in the folder moves them with the rounds.
FINAL_OUTPUTS = ("model.keras", "model.json", "final_weights.npz", "federation.json",
                 "attributions.json")
#: What commands write later from a finished run's model into its folder (``fedecay
#: explain``, ``fedecay privacy audit --unit customer``): they go with that model.
DERIVED_OUTPUTS = ("explanations.json", "explanations.png", "customer_audit.json",
                   "audit_split.json")
#: An earlier run's files that a fresh start in its folder moves to :data:`PREVIOUS`.
EARLIER_RUN = ("checkpoints", "metrics.jsonl", "privacy.jsonl", *FINAL_OUTPUTS,
               *DERIVED_OUTPUTS)
#: The subfolder of a run folder holding the last finished run (one that wrote its
#: ``model.keras``) before the folder's latest fresh start; an unfinished one goes to
#: :data:`UNFINISHED`, so a new run that fails, then another, never pushes out the model
#: merchants scored with. The readers of run folders (``simulations.cli.runs``) never look
#: into either.
PREVIOUS = "previous"
UNFINISHED = "previous-unfinished"


def set_aside(run_dir: Path) -> list[str]:
    """Move an earlier run's files (:data:`EARLIER_RUN`) from ``run_dir`` into
    ``run_dir/previous/`` when that run finished, else into ``previous-unfinished/``,
    replacing the older one of that kind; the names moved.

    The files are gathered in ``<kind>.new/`` (renames: nothing is copied), then
    ``<kind>/`` is renamed ``<kind>.old/``, ``<kind>.new/`` renamed ``<kind>/`` and
    ``<kind>.old/`` removed, so a crash at any point leaves both the earlier run's files
    and the older one on disk; the next fresh start finishes what it left. With nothing
    to move, both stay as they are.
    """
    kinds = (PREVIOUS, UNFINISHED)
    for kind in kinds:  # a crash after a swap: finish it
        if (run_dir / f"{kind}.old").exists() and not (run_dir / f"{kind}.new").exists():
            _remove(run_dir / f"{kind}.old")
    names = [name for name in EARLIER_RUN if (run_dir / name).exists()]
    started = [kind for kind in kinds if (run_dir / f"{kind}.new").exists()]
    if not names and not started:
        return []
    kind = started[0] if started else (
        PREVIOUS if (run_dir / "model.keras").exists() else UNFINISHED)
    target, staged, older = (run_dir / kind, run_dir / f"{kind}.new", run_dir / f"{kind}.old")
    staged.mkdir(exist_ok=True)
    for name in names:
        os.replace(run_dir / name, staged / name)
    moved = sorted(p.name for p in staged.iterdir())
    replaced = target.exists()
    if replaced:
        if older.exists():  # only after a crash: superseded by the one being replaced
            shutil.rmtree(older)
        os.replace(target, older)
    os.replace(staged, target)
    with contextlib.suppress(OSError):  # some file systems cannot flush a folder
        atomic.fsync(run_dir)
    if older.exists():
        _remove(older)
    log.info("%s: a new run starts; the earlier %s run's %s moved to %s%s", run_dir,
             "finished" if kind == PREVIOUS else "unfinished", ", ".join(moved), target,
             " (replacing the one before it)" if replaced else "")
    return moved


def _remove(folder: Path) -> None:
    """Remove a superseded run's folder; one that cannot be removed (a busy network file
    system) is left, said once: the next fresh start tries again."""
    try:
        shutil.rmtree(folder)
    except OSError as err:
        log.warning("%s: cannot remove it (%s); the next new run in this folder tries again",
                    folder, err.strerror or err)


def _check_layout(run_dir: Path, state: dict[str, Any], initial: list[np.ndarray]) -> None:
    """Refuse a checkpoint whose weights do not fit the model this version builds (one
    written before the model's layout changed), before anything of the run is touched."""
    saved = [tuple(np.shape(a)) for a in state["weights"]]
    built = [tuple(np.shape(a)) for a in initial]
    if saved != built:
        # The first array that differs (a shorter list differs where it ends).
        first = next((i for i, (a, b) in enumerate(zip(saved, built, strict=False))
                      if a != b), min(len(saved), len(built)))
        raise ResumeError(
            f"{run_dir}: the checkpoint of round {state['round']} holds {len(saved)} weight "
            f"arrays that do not fit the {len(built)} of the model this version and these "
            f"settings build (array {first}: {saved[first] if first < len(saved) else '-'} "
            f"vs {built[first] if first < len(built) else '-'}); it was written with another "
            "model layout or settings: run without --resume into a new folder")


def _resumed(run_dir: Path, state: dict[str, Any], parts: Runner
             ) -> tuple[int, list[np.ndarray], Selection]:
    """Put the checkpoint's state back into ``parts`` and the run folder."""
    done = int(state["round"])
    counted = state.get(CHECKPOINT_KEY)
    if parts.ledger is None and isinstance(counted, dict) and counted.get("unit") is not None:
        raise ResumeError(
            f"{run_dir}: the checkpoint of round {done} was written by a run with "
            f"{counted['unit']}-level differential privacy ({counted.get('released_rounds')} "
            "released rounds in its privacy.jsonl); resumed without it, the next rounds "
            "would release un-noised updates that no epsilon covers: resume with the same "
            "privacy settings, or start a new run in another folder")
    velocity = state["strategy"].get(VELOCITY)
    step = getattr(parts.strategy, "shift_step", None)
    if velocity is not None and step is not None:
        misfit = step.misfit(velocity, state["weights"])
        if misfit:
            raise ResumeError(f"{run_dir}: the checkpoint of round {done} does not fit this "
                              f"run's settings: {misfit}; run without --resume into a new "
                              "folder")
    restore_strategy_state(parts.strategy, state["strategy"])
    keep_rounds_upto(run_dir / "metrics.jsonl", done)
    if parts.ledger is not None:
        parts.ledger.replay(done, state)  # refuses a ledger missing checkpointed rounds
    if state.get("clipping_norm") is not None and hasattr(parts.runner, "clipping_norm"):
        parts.runner.clipping_norm = float(state["clipping_norm"])  # adaptive clipping
    return done, [np.asarray(a) for a in state["weights"]], Selection(**state["selection"])


def find_resume_state(run_dir: Path, *, report: bool = True) -> dict[str, Any] | None:
    """The state of the newest intact checkpoint in ``run_dir/checkpoints``.

    Damaged checkpoints are passed over, newest first, each with a warning that names
    it. None when the folder holds no outputs of an earlier run at all (the run then
    starts at round 1); :class:`ResumeError` when it does but no checkpoint is usable,
    so nothing that run wrote is deleted. ``report=False`` checks without logging (a
    caller that checks before the run starts, which then reports once).
    """
    say = log.warning if report else log.debug
    ckpt_dir = run_dir / "checkpoints"
    problems = []
    for path, state, reason in usable_checkpoints(ckpt_dir):
        if state is None:
            say("checkpoint %s is unusable (%s): trying an older one", path, reason)
            problems.append(f"{path.name}: {reason}")
            continue
        if problems:
            say("resuming from %s, the newest intact checkpoint (round %d)", path.name,
                state["round"])
        log.info("resuming from %s: %d rounds done", path.name, state["round"])
        return state
    problems += [f"{p.name}: old pickle format, never loaded" for p in
                 legacy_checkpoints(ckpt_dir)]
    outputs = [p.name for p in (run_dir / "metrics.jsonl", run_dir / "model.keras",
                                run_dir / "federation.json") if p.exists()]
    if problems or outputs:
        found = "; ".join(problems) or "no checkpoint"
        raise ResumeError(
            f"cannot resume {run_dir}: no usable checkpoint in {ckpt_dir} ({found}), but "
            f"the folder holds an earlier run's outputs ({', '.join(outputs) or 'checkpoints'})"
            ": nothing was deleted; start a new run in another folder")
    log.info("resume asked but %s holds no earlier run: starting at round 1", run_dir)
    return None


def keep_rounds_upto(path: Path, done: int) -> None:
    """Drop the lines of rounds after ``done`` (written before a checkpoint that was lost)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [t for t in lines if t.endswith("\n") and _round_of(t) <= done]
    if len(kept) != len(lines):
        log.warning("%s: dropping %d lines of rounds after %d (redone from the checkpoint)",
                    path, len(lines) - len(kept), done)
        atomic.write_text(path, "".join(kept))


def _round_of(line: str) -> float:
    """A metrics line's round; a line cut by a kill counts as after every round."""
    try:
        return float(json.loads(line)["round"])
    except (ValueError, KeyError, TypeError):
        return math.inf
