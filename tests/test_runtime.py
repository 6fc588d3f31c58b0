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


def _python_without_quiet_variables(script: str) -> subprocess.CompletedProcess[str]:
    """``script`` run by this Python, none of :data:`QUIET_TENSORFLOW` set; it must pass."""
    env = {k: v for k, v in os.environ.items() if k not in QUIET_TENSORFLOW}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


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
    done = _python_without_quiet_variables(script)
    assert done.stdout.splitlines()[-2:] == ["[]", "[]"], done.stdout


def test_tensorflows_absl_start_up_lines_are_left_out_and_the_rest_of_stderr_kept() -> None:
    """TensorFlow 2.21's import writes two absl lines twice ("All log messages before
    absl::InitializeLog()", "Could not find cuda drivers") that TF_CPP_MIN_LOG_LEVEL=3
    does not reach; the entry points' import leaves them out, other output stays."""
    script = (
        "import os, sys\n"
        "from common.runtime import quiet_tensorflow\n"
        "quiet_tensorflow()\n"
        "print('before', file=sys.stderr, flush=True)\n"
        "import tensorflow\n"
        "print('after', tensorflow.__version__, file=sys.stderr)\n"
    )
    done = _python_without_quiet_variables(script)
    assert done.stderr.splitlines()[0] == "before", done.stderr
    assert done.stderr.splitlines()[-1].startswith("after "), done.stderr
    assert "absl::InitializeLog" not in done.stderr and "cudart_stub" not in done.stderr


def test_the_stderr_filter_keeps_every_other_line_in_order() -> None:
    from common.runtime import ABSL_NOISE

    script = (
        "import os, sys\n"
        "from common.runtime import ABSL_NOISE, _stderr_without\n"
        "with _stderr_without(ABSL_NOISE):\n"
        "    os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called '\n"
        "                b'are written to STDERR\\nreal problem 1\\n')\n"
        "    os.write(2, b'I0000 00:00:1796675553.337133   13425 cudart_stub.cc:31] Could not '\n"
        "                b'find cuda drivers on your machine\\n')\n"
        "    print('real problem 2', file=sys.stderr)\n"
        "print('after', file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ,
                          "PYTHONPATH": str(ROOT)}, cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["real problem 1", "real problem 2", "after"]
    assert ABSL_NOISE.search("I1207 20:33:41.383582   13302 cudart_stub.cc:31] Could not "
                             "find cuda drivers on your machine, GPU will not be used.")


def test_with_stderr_closed_the_import_goes_on_uncaught() -> None:
    # `fedecay … 2>&-`: sys.stderr is None and fd 2 closed; the import must not fail.
    script = ("from common.runtime import ABSL_NOISE, _stderr_without\n"
              "with _stderr_without(ABSL_NOISE):\n"
              "    print('inside')\n"
              "print('after')\n")
    done = subprocess.run(["bash", "-c", f'{sys.executable} -c "$0" 2>&-', script],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.split() == ["inside", "after"], done
