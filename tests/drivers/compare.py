"""A small comparison through the engine (``simulations.compare.run_comparison``), in a
process of its own: argv = output folder, ``experiment.tracking``, then ``--set`` pairs.

Every progress step and advance goes to ``<output folder>/progress.jsonl`` (one JSON
line each); prints the run folder and ``DRIVER DONE``.
"""

import json
import sys
import threading
from pathlib import Path

from common.runtime import quiet_tensorflow
from simulations.compare import run_comparison
from simulations.experiment import run_folder
from simulations.settings import resolve


class JsonlProgress:
    """Writes ``{"step", "total", "unit"}`` when a step starts, ``{"step", "amount",
    "fields"}`` per advance and ``{"step", "closed": true}`` when it ends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()  # rounds advance from the server's thread

    def write(self, line: dict) -> None:
        with self.lock, self.path.open("a") as fh:
            fh.write(json.dumps(line, default=str) + "\n")

    def task(self, description, total=None, unit=""):
        progress = self
        progress.write({"step": description, "total": total, "unit": unit})

        class Task:
            def advance(self, amount=1.0, **fields):
                progress.write({"step": description, "amount": amount, "fields": fields})

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                progress.write({"step": description, "closed": True})

        return Task()


if __name__ == "__main__":
    quiet_tensorflow()
    out, tracking, *sets = sys.argv[1:]
    exp = resolve("quick", overrides=[*sets, f"experiment.output-dir={out}",
                                      f"experiment.tracking={tracking!r}"])
    with run_folder(exp, "compare") as run_dir:
        run_comparison(exp, run_dir, progress=JsonlProgress(Path(out) / "progress.jsonl"))
    print(f"run folder: {run_dir}", flush=True)
    print("DRIVER DONE", flush=True)
