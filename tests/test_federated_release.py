"""The driver lets go of the pooled log and the snapshots before the rounds run."""

from __future__ import annotations

import dataclasses
import gc
import weakref
from pathlib import Path

import numpy as np
import pytest

from simulations import federated
from simulations.experiment import prepare
from simulations.settings import resolve


class _RoundsReached(Exception):
    pass


@pytest.fixture(scope="module")
def exp():
    return resolve("quick", overrides=["synthetic.num-merchants=3",
                                       "data.min-merchant-snapshots=1"])


def _watch_rounds(monkeypatch: pytest.MonkeyPatch, refs: dict[str, weakref.ref]) -> dict:
    """Replace the rounds by a probe: which of ``refs`` are still alive when they start,
    and whether the object handed to them reaches any of them."""
    seen: dict = {}

    def probe(exp, staged, **kwargs) -> None:
        gc.collect()
        seen["alive"] = sorted(k for k, r in refs.items() if r() is not None)
        seen["fields"] = sorted(f.name for f in dataclasses.fields(staged))
        reached = {id(o) for o in _reachable(staged)}
        seen["staged_reaches"] = sorted(k for k, r in refs.items()
                                        if r() is not None and id(r()) in reached)
        raise _RoundsReached

    monkeypatch.setattr(federated, "run_rounds", probe)
    return seen


def _reachable(root: object) -> list[object]:
    found, todo, ids = [], [root], set()
    while todo:
        o = todo.pop()
        if id(o) in ids:
            continue
        ids.add(id(o))
        found.append(o)
        todo.extend(gc.get_referents(o))
    return found


def _refs(data) -> dict[str, weakref.ref]:
    s = data.snapshots
    return {"events": weakref.ref(data.events), "interventions": weakref.ref(data.interventions),
            "snapshots": weakref.ref(s), "sequences": weakref.ref(s.events),
            "numeric": weakref.ref(s.numeric)}


def test_released_data_is_gone_when_the_rounds_start(exp, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    data = prepare(exp)
    held_out = data.snapshots.subset(data.snapshots.split > 0)
    refs = _refs(data)
    seen = _watch_rounds(monkeypatch, refs)
    with pytest.raises(_RoundsReached):
        federated.run_federated(exp, data, tmp_path / "run", release=True)
    assert seen["alive"] == []  # nothing in the driver holds the log or the snapshots
    assert seen["fields"] == ["eval_path", "flat", "merchants", "train_rows"]
    assert len(data.events) == 0 and list(data.events.columns)  # columns kept, rows gone
    # An empty slice of an Arrow-backed column would still hold the whole log's buffers.
    for frame in (data.events, data.interventions):
        for name, col in frame.items():
            if hasattr(col.array, "__arrow_array__"):
                assert col.array.__arrow_array__().get_total_buffer_size() <= 64, name
    # eval.npz gives back the held-out rows, equal and in the same order.
    staged = federated.Staged({}, len(data.merchants), 0, tmp_path / "run" / "eval.npz")
    federated.restore_held_out(data, staged)
    for f in dataclasses.fields(held_out):
        np.testing.assert_array_equal(getattr(data.snapshots, f.name),
                                      getattr(held_out, f.name), err_msg=f.name)


def test_without_release_the_data_stays(exp, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    data = prepare(exp)
    events, n = data.events, len(data.snapshots)
    seen = _watch_rounds(monkeypatch, _refs(data))
    with pytest.raises(_RoundsReached):
        federated.run_federated(exp, data, tmp_path / "run")
    assert seen["alive"] == ["events", "interventions", "numeric", "sequences", "snapshots"]
    assert seen["staged_reaches"] == []  # the rounds' own object never reaches them
    assert data.events is events and len(data.snapshots) == n
