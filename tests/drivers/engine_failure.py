"""A federation whose Simulation Engine fails to start; argv[1] is the run folder.

Ray is asked for -1 CPUs, so ``ray.init`` fails inside Flower's engine (started there, as with
another Flower version than the pinned one), as it does when
the raylet times out on an overloaded machine. Prints ``RAISED <error>`` when
``run_federated`` raises, then ``DRIVER DONE``.
"""

import sys
from pathlib import Path

from simulations import federated, flower_seam
from simulations.experiment import prepare
from simulations.settings import resolve


def main() -> None:
    # Ray starts inside Flower's engine, as with a Flower other than the pinned one
    # (flower_seam.start_ray then starts nothing): the failure meets the running ServerApp.
    flower_seam.start_ray = lambda backend_config: False
    federated.backend_config = lambda exp: {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": -1, "logging_level": "ERROR"}}
    exp = resolve("quick", overrides=["synthetic.num-merchants=3", "federation.num-rounds=3",
                                      "federation.round-timeout=600"])
    try:
        federated.run_federated(exp, prepare(exp), Path(sys.argv[1]))
    except RuntimeError as err:
        print(f"RAISED {err}", flush=True)
    print("DRIVER DONE", flush=True)


if __name__ == "__main__":
    main()
