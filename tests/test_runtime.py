"""Process set-up happens at the entry points, never on import."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from common.runtime import QUIET_TENSORFLOW, quiet_tensorflow

ROOT = Path(__file__).resolve().parents[1]


def test_quiet_tensorflow_fills_in_what_is_unset_and_keeps_what_is_set() -> None:
    environ = {"TF_CPP_MIN_LOG_LEVEL": "1", "OTHER": "x"}
    quiet_tensorflow(environ)
    assert environ == {"TF_CPP_MIN_LOG_LEVEL": "1", "TF_ENABLE_ONEDNN_OPTS": "0", "OTHER": "x"}


def test_importing_the_library_sets_no_variable_and_no_warning_filter() -> None:
    script = (
        "import os, warnings\n"
        "filters = list(warnings.filters)\n"
        "import common.model, common.training, client.app, server.app, simulations.cli, "
        "simulations.federated\n"
        f"print(sorted(k for k in {sorted(QUIET_TENSORFLOW)!r} if k in os.environ))\n"
        "print([str(f[1].pattern) for f in warnings.filters if f not in filters "
        "and f[1] is not None and '__array__' in f[1].pattern])\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in QUIET_TENSORFLOW}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-2:] == ["[]", "[]"], done.stdout
