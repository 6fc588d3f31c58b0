"""The replacement of dead ClientApp actors (``simulations/raypool.py``), on Flower's own
Ray backend with a real Ray cluster of one CPU (one actor)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from simulations import raypool


def run_with_timeout(fn, seconds: float):
    """``fn()``'s result or exception; fails the test if it takes longer than ``seconds``."""
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the test
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"no answer from the Ray backend within {seconds} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.mark.slow
@pytest.mark.usefixtures("server_identity")
def test_a_dead_actor_is_replaced_so_only_its_own_message_fails(monkeypatch) -> None:
    import ray
    from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.server.superlink.fleet.vce.backend import raybackend
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

    def client_app() -> ClientApp:  # nested: Ray ships it by value, not by module
        app = ClientApp()

        @app.train()
        def train(msg: Message, context: Context) -> Message:
            if msg.content["config"]["die"]:
                os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would
            time.sleep(float(msg.content["config"]["sleep"]))
            return Message(RecordDict({"m": MetricRecord({"pid": os.getpid()})}), reply_to=msg)

        return app

    def send(backend, die: bool, sleep: float = 0.0) -> int:
        """The pid of the actor that ran one train message."""
        msg = Message(RecordDict({"config": ConfigRecord({"die": die, "sleep": sleep})}),
                      dst_node_id=1, message_type="train")
        context = Context(run_id=1, node_id=1, node_config={"partition-id": 0},
                          state=RecordDict(), run_config={})
        reply, _ = run_with_timeout(lambda: backend.process_message(msg, context), 60)
        return int(reply.content["m"]["pid"])

    monkeypatch.setattr(raybackend, "BasicActorPool", BasicActorPool)
    raypool.replace_dead_actors()
    replacing = raybackend.BasicActorPool
    assert replacing is not BasicActorPool
    config = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
              "init_args": {"num_cpus": 1, "include_dashboard": False,
                            "logging_level": "ERROR", "log_to_driver": False}}
    try:
        for pool, replaces in ((BasicActorPool, False), (replacing, True)):
            monkeypatch.setattr(raybackend, "BasicActorPool", pool)
            backend = raybackend.RayBackend(config)
            backend.build(client_app)
            assert backend.num_workers == 1
            first = send(backend, die=False)
            with pytest.raises(ray.exceptions.ActorDiedError):
                send(backend, die=True)
            if replaces:  # only the message that was running is lost
                assert send(backend, die=False) != first
                assert send(backend, die=False) != first
                # Ctrl-C: the wait for a message still running ends (a ray.get left
                # waiting once kept the process from exiting, forever).
                ended: list[BaseException] = []

                def wait_for_a_long_message(backend=backend, ended=ended) -> None:
                    try:
                        send(backend, die=False, sleep=60)
                    except BaseException as err:  # noqa: BLE001 - checked below
                        ended.append(err)

                waiting = threading.Thread(target=wait_for_a_long_message, daemon=True)
                waiting.start()
                time.sleep(2)
                raypool.abandon_waits()
                waiting.join(5)
                assert not waiting.is_alive() and isinstance(ended[0], raypool.RunAbandoned)
                raypool.replace_dead_actors()  # a next run's messages are awaited again
            else:  # Flower's pool hands the dead actor out again
                with pytest.raises(ray.exceptions.ActorDiedError):
                    send(backend, die=False)
            backend.pool.terminate_all_actors()
    finally:
        ray.shutdown()
