"""A trainer whose work is a stand-in (weights + 1), for the restart tests.

``stub_trainer.py SOCKET DATA_FILE``: serves until SIGTERM, then prints ``stopped``.
"""

import signal
import sys
from pathlib import Path

from client.trainer import MerchantFile, TrainerServer


def echo(request, weights):
    out = [w + 1 for w in weights or []] if request["kind"] == "train" else None
    return {"status": "ok", "metrics": {"num-examples": 3, "train_loss": 0.5}}, out


if __name__ == "__main__":
    server = TrainerServer(Path(sys.argv[1]), MerchantFile(sys.argv[2]), echo)
    signal.signal(signal.SIGTERM, lambda signum, frame: server.stop())
    with server:
        server.serve_forever()
    print("stopped", flush=True)
