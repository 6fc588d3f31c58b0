"""CPU time of SecAgg+'s protocol work per round, client and server, in one process (README,
Secure aggregation, Overhead); not run by the tests.

    python tests/drivers/secagg_cpu.py [ROUNDS] [--flowers]

Flower's ``SecAggPlusWorkflow`` (through ``server.secagg``) and ``secaggplus_mod`` (with
the mods of ``client.secagg`` around it) run 20 clients sampled of 20 with the default
model's weight shapes; the client's training is a constant step, so what is timed is the
protocol: per stage, the client's CPU seconds summed over the clients, and the server's
(the rest). ``--flowers`` leaves Flower's own Shamir split and combination, key parsing,
key agreements and mask generator in place (``client.flower_seam``,
``client.secagg.pairwise_keys_ahead`` and ``server.secagg_workflow.serial_combine`` off).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import sys
import time
from typing import Any

import numpy as np


def main() -> None:
    from flwr.app import ArrayRecord, Context, Message, RecordDict
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp
    from flwr.supercore.task_identity import TaskIdentity

    import client.secagg as client_secagg
    import server.secagg_workflow as workflow
    from client.config import cached_settings
    from client.flower_seam import secaggplus_names
    from common.model import build_model, weights_of
    from server.config import DPConfig, FederationConfig
    from server.secagg import build_secagg_strategy
    from server.secagg_grid import message_stage

    rounds = int(next((a for a in sys.argv[1:] if a.isdigit()), "5"))
    nodes = 20
    flowers = "--flowers" in sys.argv
    if flowers:
        workflow.serial_combine = lambda: contextlib.nullcontext(False)  # type: ignore
    else:
        secaggplus_names()
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1  # type: ignore[attr-defined]
    settings = cached_settings({})
    shapes = [a.shape for a in weights_of(build_model(settings.model, settings.snapshots, 0))]

    class Step(NumPyClient):
        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]
                ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
            return [p + 0.001 for p in parameters], 1, {}

    app = ClientApp(client_fn=lambda ctx: Step().to_client(),
                    mods=[*([] if flowers else [client_secagg.pairwise_keys_ahead]),
                          client_secagg.compact_masked_vectors, secaggplus_mod,
                          client_secagg._quantisation_guard])
    contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(),
                           run_config={}) for n in range(1, nodes + 1)}
    cpu: dict[str, float] = collections.defaultdict(float)

    class Grid:
        run = type("Run", (), {"run_id": 1})()

        def get_node_ids(self) -> list[int]:
            return list(contexts)

        def send_and_receive(self, messages: Any, *, timeout: float | None = None
                             ) -> list[Message]:
            replies = []
            for msg in messages:
                msg = copy.deepcopy(msg)  # as the engine would serialise it
                msg.metadata.__dict__["_message_id"] = f"m{id(msg)}"
                stage = message_stage(msg.content)
                started = time.process_time()
                replies.append(app(msg, contexts[msg.metadata.dst_node_id]))
                cpu[stage] += time.process_time() - started
            return replies

    fed = FederationConfig(secure_aggregation=True, num_rounds=rounds, min_train_nodes=nodes,
                           min_available_nodes=nodes)
    strategy = build_secagg_strategy(fed, DPConfig(), 0, nodes)
    started = time.process_time()
    strategy.start(Grid(), ArrayRecord([np.zeros(s, np.float32) for s in shapes]),
                   num_rounds=rounds, timeout=60)
    total = time.process_time() - started
    clients = sum(cpu.values())
    print(f"CPU seconds a round ({nodes} clients, {sum(int(np.prod(s)) for s in shapes)} "
          f"weights, {rounds} rounds): clients {clients / rounds:.3f} "
          f"({', '.join(f'{k} {v / rounds:.3f}' for k, v in cpu.items())}), "
          f"server {(total - clients) / rounds:.3f}")


if __name__ == "__main__":
    main()
