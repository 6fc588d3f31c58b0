"""The seams that hold every patch of Flower's and Keras' internals
(``common/keras_seam.py``, ``server/flower_seam.py``, ``simulations/flower_seam.py``):
the library code each patch relies on is unchanged, the pinned versions are the
installed ones, and with another version each patch leaves the library's own code in
place and says so once."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from common import keras_seam, pinned
from server import flower_seam as server_seam
from server.replies import ReplyLayout, read_reply_arrays
from simulations import flower_seam as simulation_seam
from simulations import handover, ray_seam, raypool

SEAMS = (keras_seam, server_seam, simulation_seam, ray_seam)
RELIED_ON = [(seam.__name__, patch, target, digest) for seam in SEAMS
             for patch, sources in seam.PATCHES.items()
             for target, digest in sources.items()]


@pytest.mark.parametrize(("seam", "patch", "target", "digest"), RELIED_ON,
                         ids=[f"{p}:{t.rpartition(':')[2]}" for _, p, t, _ in RELIED_ON])
def test_the_library_code_each_patch_relies_on_is_unchanged(seam, patch, target,
                                                            digest) -> None:
    assert pinned.source_digest(target) == digest, (
        f"{target} changed: read it again before moving {seam}.PIN, then check {patch}")


@pytest.mark.parametrize("seam", SEAMS, ids=[s.__name__ for s in SEAMS])
def test_each_seam_is_pinned_to_the_installed_version(seam) -> None:
    assert pinned.installed_version(seam.PIN.distribution) == seam.PIN.version
    assert set(seam.PATCHES) == set(seam.PIN.patches)
    assert all(callable(getattr(seam, name)) for name in seam.PIN.patches)
    assert seam.PIN.logger == seam.__name__


def test_a_digest_names_the_source_it_was_taken_of() -> None:
    a = pinned.source_digest("flwr.app:Array.numpy")
    assert a == pinned.source_digest("flwr.app:Array.numpy")
    assert a != pinned.source_digest("flwr.app:Array.from_numpy_ndarray")
    assert len(a) == 64


# ------------------------------------------------------------------- other versions

@pytest.fixture
def other_versions(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    """Flower 1.43.0 and Keras 3.99.0 installed, as far as the seams can tell."""
    found = {"flwr": "1.43.0", "keras": "3.99.0"}
    monkeypatch.setattr(pinned, "installed_version", found.get)
    pinned._warn_once.cache_clear()
    caplog.set_level(logging.WARNING)
    yield caplog
    pinned._warn_once.cache_clear()


def warnings_of(caplog: pytest.LogCaptureFixture, seam) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == seam.__name__ and r.levelno == logging.WARNING]


def test_another_version_is_named_in_one_warning_per_process(other_versions) -> None:
    assert not simulation_seam.PIN.holds()
    assert not simulation_seam.PIN.holds()
    (message,) = warnings_of(other_versions, simulation_seam)
    assert "flwr 1.43.0 is installed, not the 1.42.0" in message
    assert "swap_message_handover" in message and "swap_actor_pool" in message


def test_with_another_flower_its_own_hand_over_stays(monkeypatch, other_versions) -> None:
    from flwr.server.superlink.fleet.vce import vce_api

    def flowers_scan(*args) -> None:
        raise AssertionError("not run here")

    monkeypatch.setattr(vce_api, "add_messages_to_queue", flowers_scan)
    handover.hand_over_at_once()
    handover.hand_over_at_once()
    assert vce_api.add_messages_to_queue is flowers_scan
    assert len(warnings_of(other_versions, simulation_seam)) == 1


def test_with_another_flower_its_own_actor_pool_stays(monkeypatch, other_versions) -> None:
    from flwr.server.superlink.fleet.vce.backend import raybackend
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

    monkeypatch.setattr(raybackend, "BasicActorPool", BasicActorPool)
    raypool.replace_dead_actors()
    raypool.replace_dead_actors()
    assert raybackend.BasicActorPool is BasicActorPool
    assert len(warnings_of(other_versions, simulation_seam)) == 1


def test_the_pinned_flower_gets_the_replacing_pool_once(monkeypatch) -> None:
    from flwr.server.superlink.fleet.vce.backend import raybackend
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

    monkeypatch.setattr(raybackend, "BasicActorPool", BasicActorPool)
    raypool.replace_dead_actors()
    pool = raybackend.BasicActorPool
    raypool.replace_dead_actors()  # idempotent: not wrapped twice
    assert raybackend.BasicActorPool is pool
    assert pool.__mro__[1] is BasicActorPool


def reply(values: list[np.ndarray]) -> ArrayRecord:
    return ArrayRecord({str(i): Array(v) for i, v in enumerate(values)})


def test_with_another_flower_replies_are_read_through_array_numpy(other_versions) -> None:
    reference = [np.zeros((2, 3), np.float32), np.zeros(3, np.float32)]
    good = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(3, np.float32)]
    layout = ReplyLayout(reference)
    assert layout.heads == [None, None]
    values, why = read_reply_arrays(reply(good), layout)
    assert why is None and all(np.array_equal(a, b) for a, b in zip(values, good, strict=True))
    _, why = read_reply_arrays(reply([good[0].T.copy(), good[1]]), layout)
    assert why == "tensor 0 has shape (3, 2), expected (2, 3)"
    source = Array(good[1])
    assert server_seam.array_returning(source, good[1]) is source
    assert len(warnings_of(other_versions, server_seam)) == 1


def test_with_another_flower_the_server_keeps_flowers_own_state(other_versions) -> None:
    from flwr.serverapp.strategy import FedAdam

    strategy = FedAdam()
    strategy.m_t = {"w": np.ones(2)}
    assert server_seam.read_optimizer_state(strategy) == {}
    server_seam.write_optimizer_state(strategy, {"v_t": {"w": np.ones(2)}})
    assert strategy.v_t is None
    (message,) = warnings_of(other_versions, server_seam)
    assert "flwr 1.43.0" in message and "read_optimizer_state" in message


def test_with_another_flower_the_task_identity_is_set_through_its_setters(
        server_identity, other_versions) -> None:
    # server_identity (set up first, with the pinned Flower) restores it after the test.
    from flwr.app import Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    with server_seam.server_task_identity(run_id=3, node_id=1, task_id=4):
        assert (TaskIdentity.run_id, TaskIdentity.task_id) == (3, 4)
        msg = Message(RecordDict(), dst_node_id=2, message_type="train")
        assert msg.metadata.run_id == 3
    assert TaskIdentity.run_id == 3  # no public way to unset it: it stays
    assert len(warnings_of(other_versions, server_seam)) == 1


def small_model():
    import keras

    inputs = keras.Input((3, 2))
    x = keras.layers.LSTM(4, dropout=0.1, seed=3)(inputs)
    x = keras.layers.Dropout(0.5, seed=4)(x)
    model = keras.Model(inputs, keras.layers.Dense(1)(x))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


def test_with_another_keras_the_public_paths_find_the_same_variables(other_versions) -> None:
    model = small_model()
    fallback = (keras_seam.loss_tracker(model),
                keras_seam.optimizer_state_variables(model.optimizer),
                keras_seam.seed_states(model))
    assert len(warnings_of(other_versions, keras_seam)) == 1
    pinned._warn_once.cache_clear()
    other_versions.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pinned, "installed_version", {"keras": keras_seam.PIN.version}.get)
        tracker = keras_seam.loss_tracker(model)
        state = keras_seam.optimizer_state_variables(model.optimizer)
        seeds = keras_seam.seed_states(model)
    assert not warnings_of(other_versions, keras_seam)
    assert fallback[0] is tracker and tracker.name == "loss"
    assert [id(v) for v in fallback[1]] == [id(v) for v in state]
    assert "learning_rate" not in {v.name for v in state} and len(state) >= 3
    assert {id(v) for _, v in fallback[2]} == {id(v) for _, v in seeds}
    assert len(seeds) == 2  # the LSTM cell's and the Dropout layer's


# -------------------------------------------------------------------- pinned paths

def test_the_npy_header_is_what_flowers_array_puts_before_the_values() -> None:
    for ref in (np.zeros((2, 3), np.float32), np.arange(5, dtype=np.int64),
                np.zeros((4, 1, 2), np.float64)):
        head = server_seam.npy_header(ref)
        stream = io.BytesIO()
        np.save(stream, ref, allow_pickle=False)
        assert head == stream.getvalue()[:len(stream.getvalue()) - ref.nbytes]
        assert Array(ref).data == head + ref.tobytes()


def test_an_array_read_once_gives_copies_of_its_values_without_parsing() -> None:
    source = Array(np.arange(3, dtype=np.float32))
    value = np.array([7.0, 8.0, 9.0], np.float32)  # not what the bytes say: proves no parse
    read = server_seam.array_returning(source, value)
    first = read.numpy()
    first[0] = -1
    assert np.array_equal(read.numpy(), value)
    assert (read.dtype, read.shape, read.stype, read.data) == (
        source.dtype, source.shape, source.stype, source.data)
    record = ArrayRecord()
    record["w"] = read
    assert record["w"] is read


def test_the_optimizer_state_goes_from_one_strategy_to_another() -> None:
    from flwr.serverapp.strategy import FedAvgM

    strategy = FedAvgM(server_momentum=0.9)
    assert server_seam.read_optimizer_state(strategy) == {}
    strategy.momentum_vector = [np.ones(2)]
    state = server_seam.read_optimizer_state(strategy)
    fresh = FedAvgM(server_momentum=0.9)
    server_seam.write_optimizer_state(fresh, state)
    assert fresh.momentum_vector is strategy.momentum_vector


def test_the_task_identity_is_restored_after_the_block() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    def run_id() -> int | None:
        try:
            return TaskIdentity.run_id
        except RuntimeError:  # unset, as outside a ServerApp
            return None

    before = run_id()
    with server_seam.server_task_identity(run_id=5, node_id=6, task_id=7):
        with server_seam.server_task_identity(run_id=1):
            assert (TaskIdentity.run_id, TaskIdentity.node_id) == (1, 1)
        assert (TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id) == (5, 6, 7)
    assert run_id() == before


def test_ray_auto_start_is_off_in_the_block_and_after_an_exception() -> None:
    from ray._private import auto_init_hook

    before = auto_init_hook.enable_auto_connect
    with ray_seam.no_auto_start():
        assert auto_init_hook.enable_auto_connect is False
    assert auto_init_hook.enable_auto_connect == before
    try:
        with pytest.raises(KeyboardInterrupt), ray_seam.no_auto_start():
            raise KeyboardInterrupt
        assert auto_init_hook.enable_auto_connect is False
    finally:
        auto_init_hook.enable_auto_connect = before


def test_with_another_ray_its_auto_start_stays(monkeypatch, caplog) -> None:
    from ray._private import auto_init_hook

    monkeypatch.setattr(pinned, "installed_version", {"ray": "2.60.0"}.get)
    pinned._warn_once.cache_clear()
    caplog.set_level(logging.WARNING)
    before = auto_init_hook.enable_auto_connect
    try:
        with ray_seam.no_auto_start():
            assert auto_init_hook.enable_auto_connect == before
    finally:
        pinned._warn_once.cache_clear()
    (message,) = warnings_of(caplog, ray_seam)
    assert "ray 2.60.0 is installed, not the 2.55.1" in message
