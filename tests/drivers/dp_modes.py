"""One DP federation per mode, 4 merchants of the quick preset.

argv: run folder root, rounds, then the modes (``client-fixed``, ``adaptive``, ...); each
mode's run goes to ``<root>/<mode>``. Prints ``DRIVER DONE`` at the end.
"""

import sys
from pathlib import Path

from simulations import federated
from simulations.experiment import prepare
from simulations.settings import resolve


def main() -> None:
    root, rounds = Path(sys.argv[1]), int(sys.argv[2])
    for mode in sys.argv[3:]:
        exp = resolve("quick", overrides=[
            "synthetic.num-merchants=4", f"federation.num-rounds={rounds}",
            "federation.local-epochs=1", f"privacy.mode={mode}", "privacy.noise-multiplier=1.0",
            "privacy.clipping-norm=0.5", "privacy.clipped-count-stddev=1.0",
            f"experiment.output-dir={root}"])
        federated.run_federated(exp, prepare(exp), root / mode)
    print("DRIVER DONE", flush=True)


if __name__ == "__main__":
    main()
