"""Run one simulation, recording every client's plain update; argv[1] is a JSON spec.

Spec keys: ``overrides`` (of the quick preset), ``run_dir``, ``record_dir`` (where each
client's update of round g goes, as ``r<g>-p<partition>.npz`` with its num_examples),
``drop`` (``{"pid", "stage", "round"}``: that partition fails at that SecAgg+ stage of
that round, or null). The recording mod runs inside ``secaggplus_mod``, on the plain
update. Prints ``DRIVER DONE`` at the end.
"""

import functools
import json
import sys
from pathlib import Path

import numpy as np

import client.app
import client.secagg
from simulations import federated
from simulations.experiment import prepare
from simulations.settings import resolve


def make_mods(record_dir: Path, drop: dict | None) -> tuple:
    """The recording mod and the dropout mod of this run."""

    def record(msg, context, call_next):
        """Save the plain update a client is about to send (inside secaggplus_mod)."""
        reply = call_next(msg, context)
        if msg.metadata.message_type != "train" or reply.has_error():
            return reply
        content = reply.content
        if "arrays" in content.array_records:  # Message API
            weights = content["arrays"].to_numpy_ndarrays()
            n = int(content["metrics"]["num-examples"])
            g = int(msg.content["config"]["global-round"])
        else:  # legacy FitRes
            from flwr.common import parameters_to_ndarrays
            from flwr.compat.common import recorddict_compat as compat

            fitres = compat.recorddict_to_fitres(content, keep_input=True)
            weights, n = parameters_to_ndarrays(fitres.parameters), fitres.num_examples
            g = int(msg.content.config_records["fitins.config"]["global-round"])
        pid = int(context.node_config["partition-id"])
        np.savez(record_dir / f"r{g}-p{pid}.npz", *weights, num_examples=n)
        return reply

    def dropout(msg, context, call_next):
        """Partition drop["pid"] fails at stage drop["stage"] of round drop["round"]."""
        from flwr.app import Error, Message

        configs = msg.content.config_records.get("secaggplus_configs")
        if (drop and msg.metadata.message_type == "train" and configs is not None
                and configs.get("stage") == drop["stage"]
                and int(msg.metadata.group_id) == drop["round"]
                and int(context.node_config["partition-id"]) == drop["pid"]):
            return Message(Error(code=101, reason=f"test dropout of partition {drop['pid']} "
                                 f"at stage {drop['stage']}"), reply_to=msg)
        return call_next(msg, context)

    return record, dropout


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    record_dir = Path(spec["record_dir"])
    record_dir.mkdir(parents=True, exist_ok=True)
    record, dropout = make_mods(record_dir, spec.get("drop"))

    plain_mods = client.app.train_mods
    client.app.train_mods = lambda flat: [record, *plain_mods(flat)]
    client.secagg.make_secagg_client_app = functools.partial(
        client.secagg.make_secagg_client_app, outer_mods=[dropout], inner_mods=[record])

    exp = resolve("quick", overrides=spec["overrides"])
    data = prepare(exp)
    federated.run_federated(exp, data, Path(spec["run_dir"]))
    print("DRIVER DONE", flush=True)


if __name__ == "__main__":
    main()
