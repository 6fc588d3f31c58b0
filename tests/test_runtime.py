"""Process set-up happens at the entry points, never on import."""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
        "import importlib.machinery, tensorflow\n"
        "print('after', tensorflow.__version__, file=sys.stderr)\n"
        "print(all(isinstance(loader, importlib.machinery.SourceFileLoader) for loader in "
        "(tensorflow.__loader__, tensorflow.__spec__.loader)))\n"
    )
    done = _python_without_quiet_variables(script)
    assert done.stderr.splitlines()[0] == "before", done.stderr
    assert done.stderr.splitlines()[-1].startswith("after "), done.stderr
    assert "absl::InitializeLog" not in done.stderr and "cudart_stub" not in done.stderr
    assert done.stdout.split()[-1] == "True", "tensorflow's loader is not Python's own"


def test_the_stderr_filter_keeps_every_other_line_in_order() -> None:
    from common.runtime import ABSL_NOISE

    script = (
        "import os, sys\n"
        "import time\n"
        "from common.runtime import ABSL_NOISE, ABSL_NOISE_STARTS, _stderr_without\n"
        "with _stderr_without(ABSL_NOISE, ABSL_NOISE_STARTS):\n"
        "    os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called '\n"
        "                b'are written to STDERR\\nreal problem 1\\n')\n"
        "    os.write(2, b'I0000 00:00:1796675553.337133   13425 cudart_')\n"
        "    time.sleep(0.2)  # a line in two writes: the filter sees its start first\n"
        "    os.write(2, b'stub.cc:31] Could not find cuda drivers on your machine\\n')\n"
        "    os.write(2, b'Is it a problem? ')\n"
        "    time.sleep(0.2)\n"
        "    os.write(2, b'yes\\n')\n"
        "    print('real problem 2', file=sys.stderr)\n"
        "print('after', file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ,
                          "PYTHONPATH": str(ROOT)}, cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["real problem 1", "Is it a problem? yes",
                                        "real problem 2", "after"]
    assert ABSL_NOISE.search("I1207 20:33:41.383582   13302 cudart_stub.cc:31] Could not "
                             "find cuda drivers on your machine, GPU will not be used.")


def test_with_stderr_closed_the_import_goes_on_uncaught() -> None:
    # `fedecay … 2>&-`: sys.stderr is None and fd 2 closed; the import must not fail.
    script = ("from common.runtime import ABSL_NOISE, ABSL_NOISE_STARTS, _stderr_without\n"
              "with _stderr_without(ABSL_NOISE, ABSL_NOISE_STARTS):\n"
              "    print('inside')\n"
              "print('after')\n")
    done = subprocess.run(["bash", "-c", f'{sys.executable} -c "$0" 2>&-', script],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.split() == ["inside", "after"], done


def _filtered(body: str, new_session: bool = False) -> subprocess.Popen[bytes]:
    """A Python running ``body`` inside the stderr filter, its pipes open (in a process
    group of its own with ``new_session``)."""
    script = ("import os, sys\n"
              "from common.runtime import ABSL_NOISE, ABSL_NOISE_STARTS, _stderr_without\n"
              "with _stderr_without(ABSL_NOISE, ABSL_NOISE_STARTS):\n" + body)
    return subprocess.Popen([sys.executable, "-c", script], env={
        **os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=new_session)


def test_what_a_process_aborting_in_the_import_wrote_last_is_still_shown() -> None:
    # TensorFlow on a CPU it was not built for writes why, then aborts (exit 134).
    proc = _filtered("    os.write(2, b'The TensorFlow library was compiled to use AVX "
                     "instructions\\n')\n    os.abort()\n")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -6 and err.decode().splitlines() == [
        "The TensorFlow library was compiled to use AVX instructions"], err


@pytest.mark.parametrize("frame", [b"\r-- loading", b"Importing the model"])
def test_stderr_without_a_newline_is_passed_on_at_once(frame: bytes) -> None:
    # A progress spinner's frames ("\r⠋ loading") end in no newline: the filter must not
    # hold them until the import ends (one beginning with "I" neither: only "I" and four
    # digits may begin an absl line). The child waits for our go after its frame.
    proc = _filtered(f"    os.write(2, {frame!r})\n    sys.stdin.readline()\n"
                     "    os.write(2, b' done\\n')\n")
    assert proc.stderr is not None and proc.stdin is not None
    seen = b""
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stderr, selectors.EVENT_READ)
        deadline = time.monotonic() + 60
        while len(seen) < len(frame) and selector.select(deadline - time.monotonic()):
            seen += os.read(proc.stderr.fileno(), 1024)
    proc.stdin.write(b"go\n")
    rest = proc.communicate(timeout=60)[1]
    assert seen == frame, f"the frame was held back: {seen!r}"
    assert proc.returncode == 0 and rest == b" done\n", rest


def test_a_sigterm_to_the_process_group_leaves_the_filter_running() -> None:
    # `timeout`, systemd and a terminal signal the whole group; the parent (the CLI has a
    # handler) goes on writing, and the filter must still be there to pass it on.
    proc = _filtered("    import signal, time\n"
                     "    signal.signal(signal.SIGTERM, lambda *_: None)\n"
                     "    os.killpg(os.getpgrp(), signal.SIGTERM)\n"
                     "    time.sleep(0.5)\n"
                     "    os.write(2, b'still here\\n')\n", new_session=True)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and err == b"still here\n", err


def test_without_an_interpreter_to_run_the_filter_the_import_goes_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # An embedded Python (sys.executable empty or None) or a frozen app (the executable
    # is the app): nothing is filtered, nothing fails.
    from common.runtime import ABSL_NOISE, ABSL_NOISE_STARTS, _stderr_without

    for executable, frozen in ((None, False), ("", False), (sys.executable, True)):
        monkeypatch.setattr(sys, "executable", executable)
        monkeypatch.setattr(sys, "frozen", frozen, raising=False)
        before = os.fstat(2)
        with _stderr_without(ABSL_NOISE, ABSL_NOISE_STARTS):
            assert os.fstat(2) == before  # fd 2 left as it was
