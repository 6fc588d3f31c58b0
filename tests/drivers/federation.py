"""Run one simulation through ``run_federated``; argv[1] is a JSON spec (``Simulation``).

Spec keys: ``overrides`` (of the quick preset), ``run_dir``, ``corrupt`` (partitions
whose shard is truncated after it is written), ``observe`` (a JSON-lines file for every
reply, the attribution round's too, instruction and stored message, or null) and
``keep_weights`` (save each train reply's weights beside ``observe``). Prints
``DRIVER DONE`` at the end.
"""

import json
import sys
import threading
import time
from pathlib import Path

from simulations import federated
from simulations.experiment import prepare
from simulations.settings import resolve


def corrupt_shards(partitions: list[int]) -> None:
    """Truncate these partitions' shards right after they are written."""
    write_shards = federated.write_shards

    def corrupting_write_shards(prepared, shard_dir, task=None):
        paths = write_shards(prepared, shard_dir, task)
        for pid in partitions:
            raw = paths[pid].read_bytes()
            paths[pid].write_bytes(raw[: len(raw) // 3])
        return paths

    federated.write_shards = corrupting_write_shards


def observe(spec: dict, exp, data):
    """Record every reply, pushed instruction and stored message in ``spec["observe"]``;
    returns the function that appends a row to that file."""
    import numpy as np
    from flwr.common.serde import recorddict_to_proto
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    from common.model import build_model
    from server.strategy import GuardedMixin

    out = Path(spec["observe"])
    lock = threading.Lock()

    def record(row):
        with lock, out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    ids = sorted(set(data.events["user_id"].astype(str)) | set(data.events["item_id"].astype(str)))
    needles = [i.encode() for i in ids]

    def describe(kind, global_round, msg):
        row = {"kind": kind, "round": global_round, "node": msg.metadata.src_node_id,
               "reply_to": msg.metadata.reply_to_message_id, "t": time.time()}
        if msg.has_error():
            row["error"] = msg.error.reason
            return row
        content = msg.content
        raw = recorddict_to_proto(content).SerializeToString()
        row.update(
            arrays={name: [[k, list(a.shape), a.dtype] for k, a in rec.items()]
                    for name, rec in content.array_records.items()},
            metrics={name: {k: type(v).__name__ for k, v in rec.items()}
                     for name, rec in content.metric_records.items()},
            configs=sorted(content.config_records.keys()),
            leaked=[i for i, n in zip(ids, needles, strict=True) if n in raw],
        )
        if spec["keep_weights"] and kind == "train":
            row["num_examples"] = next(iter(content.metric_records.values()))["num-examples"]
            row["weights"] = f"{out}.{kind}-{global_round}-{row['node']}.npz"
            np.savez(row["weights"], *next(iter(content.array_records.values()))
                     .to_numpy_ndarrays())
        return row

    def observed(kind, method):
        def wrapper(self, server_round, replies):
            replies = list(replies)
            for msg in replies:
                record(describe(kind, self.rounds.global_round(server_round), msg))
            return method(self, server_round, replies)
        return wrapper

    # Every instruction pushed and every reply the link state gets, on time or not.
    push_messages = InMemoryGrid.push_messages

    def pushed(self, messages):
        messages = list(messages)
        message_ids = push_messages(self, messages)
        for msg in messages:
            config = msg.content.config_records.get("config") or {}
            record({"kind": "pushed", "type": msg.metadata.message_type,
                    "round": config.get("server-round"), "node": msg.metadata.dst_node_id,
                    "id": msg.metadata.message_id, "t": time.time()})
        return message_ids

    store_message_res = InMemoryLinkState.store_message_res

    def stored(self, message):
        kept = store_message_res(self, message)
        record({"kind": "stored", "node": message.metadata.src_node_id,
                "reply_to": message.metadata.reply_to_message_id,
                "error": message.has_error(), "kept": kept is not None, "t": time.time()})
        return kept

    register_nodes = vce_api._register_nodes

    def registered(num_nodes, state_factory):
        mapping = register_nodes(num_nodes, state_factory)
        Path(spec["observe"] + ".nodes.json").write_text(json.dumps(
            {str(node): pid for node, pid in mapping.items()}))
        return mapping

    InMemoryGrid.push_messages = pushed
    InMemoryLinkState.store_message_res = stored
    vce_api._register_nodes = registered

    from server import attribution

    summarise_replies = attribution.summarise_replies

    def summarised(replies, asked):  # the attribution round's replies
        replies = list(replies)
        for msg in replies:
            record(describe("attributions", None, msg))
        return summarise_replies(replies, asked)

    attribution.summarise_replies = summarised

    from server import head_refit

    summed_replies = head_refit.summed_replies

    def summed(replies, size, *rest):  # each head refit step's replies
        replies = list(replies)
        for msg in replies:
            record(describe("head_refit", None, msg) | {"head_size": size})
        return summed_replies(replies, size, *rest)

    head_refit.summed_replies = summed
    GuardedMixin.aggregate_train = observed("train", GuardedMixin.aggregate_train)
    GuardedMixin.aggregate_evaluate = observed("evaluate", GuardedMixin.aggregate_evaluate)
    model = build_model(exp.model, data.snapshot_config, seed=exp.seed)
    Path(spec["observe"] + ".expected.json").write_text(json.dumps({
        "weights": [[list(w.shape), str(w.dtype)] for w in model.get_weights()],
        "ids": len(ids), "merchants": data.merchants,
    }))
    return record


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    exp = resolve("quick", overrides=spec["overrides"])
    data = prepare(exp)
    corrupt_shards(spec["corrupt"])
    if spec["observe"]:
        record = observe(spec, exp, data)
    federated.run_federated(exp, data, Path(spec["run_dir"]))
    if spec["observe"]:
        record({"kind": "done", "t": time.time()})
    print("DRIVER DONE", flush=True)


if __name__ == "__main__":
    main()
