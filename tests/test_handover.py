"""The Simulation Engine's hand-over of instructions to the ClientApp workers
(``simulations/handover.py``), on Flower's own in-memory link state and grid."""

from __future__ import annotations

import threading
import time
from queue import Empty, Queue

import pytest
from flwr.app import ConfigRecord, RecordDict

from server.flower_seam import server_task_identity
from simulations import handover


@pytest.fixture(autouse=True)
def superlink_identity():
    """The identity of the ServerApp in a simulation: its messages come from the link."""
    from flwr.common.constant import SUPERLINK_NODE_ID

    with server_task_identity(run_id=1, node_id=SUPERLINK_NODE_ID, task_id=1):
        yield


def link(num_nodes: int):
    """An in-memory link state with a run and ``num_nodes`` nodes, as ``run_simulation``
    sets it up, and the ServerApp's grid on it."""
    from flwr.proto.task_pb2 import Task
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(),
                               ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id=1)
    run.primary_task_id = 7
    run.federation_id = NOOP_FEDERATION_ID
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[7] = Task(task_id=7, run_id=run.run_id)
    nodes = vce_api._register_nodes(num_nodes, factory)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, grid, nodes


def push(grid, nodes, ttl: float | None = None) -> set[str]:
    messages = [grid.create_message(RecordDict({"config": ConfigRecord({"n": i})}), "train",
                                    node, group_id="1", ttl=ttl)
                for i, node in enumerate(nodes)]
    return set(grid.push_messages(messages))


def drain(queue: Queue, count: int, timeout: float) -> list:
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        got.append(queue.get(timeout=max(deadline - time.monotonic(), 0.001)))
    return got


def start(state, nodes):
    """The hand-over thread on ``state``; returns (queue, stop)."""
    queue: Queue = Queue()
    stop = threading.Event()
    thread = threading.Thread(target=handover.add_messages_to_queue,
                              args=(state, queue, nodes, stop), daemon=True)
    thread.start()
    return queue, stop, thread


@pytest.fixture
def running(monkeypatch):
    """The hand-over thread on a fresh link; yields (state, grid, nodes, queue)."""
    # A long idle wait: whatever arrives in the tests below was woken by the store.
    monkeypatch.setattr(handover, "IDLE_WAIT_S", 60.0)
    state, grid, nodes = link(6)
    queue, stop, thread = start(state, nodes)
    yield state, grid, nodes, queue
    stop.set()
    push(grid, list(nodes)[:1])  # wakes the thread, which then sees the stop
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_every_message_is_handed_over_once_as_soon_as_it_is_stored(running) -> None:
    state, grid, nodes, queue = running
    for _ in range(3):  # three rounds
        ids = push(grid, list(nodes))
        got = drain(queue, len(ids), timeout=10)
        assert {m.metadata.message_id for m in got} == ids
        assert {m.metadata.dst_node_id for m in got} == set(nodes)
        assert all(m.metadata.delivered_at for m in got)
        with pytest.raises(Empty):  # nothing twice
            queue.get(timeout=0.3)
        # The workers' replies would now be pulled and the instructions deleted.
        state.delete_messages(ids)


def test_expired_messages_are_dropped_not_handed_over() -> None:
    state, grid, nodes = link(2)
    first, second = list(nodes)
    expired = push(grid, [first], ttl=0.2)
    time.sleep(0.3)
    fresh = push(grid, [second])
    queue, stop, thread = start(state, nodes)
    try:
        got = drain(queue, 1, timeout=10)
        assert [m.metadata.message_id for m in got] == list(fresh)
        assert not expired & set(state.message_ins_store)
        with pytest.raises(Empty):
            queue.get(timeout=0.3)
    finally:
        stop.set()
        thread.join(timeout=10)


def test_another_link_state_gets_flowers_scan(monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(handover, "_FLOWER_SCAN", lambda *args: seen.append(args))
    stop = threading.Event()
    handover.add_messages_to_queue(object(), Queue(), {1: 0}, stop)
    assert len(seen) == 1 and seen[0][3] is stop


def test_the_engine_uses_this_hand_over_once_installed() -> None:
    from flwr.server.superlink.fleet.vce import vce_api

    handover.hand_over_at_once()
    handover.hand_over_at_once()  # idempotent: Flower's function stays the fallback
    assert vce_api.add_messages_to_queue is handover.add_messages_to_queue
    assert handover._FLOWER_SCAN is not handover.add_messages_to_queue
    assert handover._FLOWER_SCAN.__module__ == vce_api.__name__
