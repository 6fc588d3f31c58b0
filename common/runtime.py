"""Process set-up that belongs to entry points (the CLI, the Flower apps), never to an
import: importing a library module leaves the environment as it found it."""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import re
import subprocess
import sys
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

#: TensorFlow's C++ start-up logs and its oneDNN notice: noise for every command.
QUIET_TENSORFLOW: dict[str, str] = {"TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0"}

#: What TensorFlow 2.21's import writes to stderr through absl, which
#: ``TF_CPP_MIN_LOG_LEVEL`` does not reach (twice: two of its libraries log it).
ABSL_NOISE = re.compile(
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
    r"STDERR\s*$|^I\d{4} [0-9:.]+ +\d+ cudart_stub\.cc:\d+\] Could not find cuda drivers")
#: How every :data:`ABSL_NOISE` line begins (the filter holds back only such lines).
ABSL_NOISE_STARTS = ("WARNING: All log messages before absl::", "I0000 ")  # 0: a digit


def quiet_tensorflow(environ: MutableMapping[str, str] | None = None) -> None:
    """Set :data:`QUIET_TENSORFLOW` in ``environ`` (the process's environment by default)
    where not set already: a user's own values win.

    TensorFlow reads them when it is imported, so call this before; child processes
    (Ray's workers, Flower's app processes) inherit them. For the process's own
    environment, with ``TF_CPP_MIN_LOG_LEVEL`` at 3 (errors only), TensorFlow's import
    also leaves out the :data:`ABSL_NOISE` lines the variable does not reach; anything
    else it writes to stderr is passed on at once.
    """
    target = os.environ if environ is None else environ
    for key, value in QUIET_TENSORFLOW.items():
        target.setdefault(key, value)
    if environ is None and target.get("TF_CPP_MIN_LOG_LEVEL") == "3" \
            and "tensorflow" not in sys.modules \
            and not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())


@contextlib.contextmanager
def _stderr_without(noise: re.Pattern[str], starts: tuple[str, ...]) -> Iterator[None]:
    """File descriptor 2 (C++ libraries' stderr too) passed, in the block, through
    :mod:`common.stderr_filter` in its own process, which leaves out the lines ``noise``
    matches (``starts``: how they begin) and writes the rest at once."""
    script = Path(__file__).with_name("stderr_filter.py")
    # Run with stderr closed (2>&-), or no interpreter to run the filter with (an embedded
    # or frozen Python): nothing is filtered.
    if sys.stderr is None or not sys.executable or getattr(sys, "frozen", False) \
            or not script.is_file():
        yield
        return
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        # A group of its own: a signal to ours (Ctrl-C, `timeout`) must not end the
        # filter while this process goes on writing to it.
        child = subprocess.Popen([sys.executable, "-I", "-S", str(script), noise.pattern,
                                  *starts], stdin=subprocess.PIPE, stdout=saved,
                                 process_group=0)
    except (OSError, ValueError):
        os.close(saved)
        yield
        return
    assert child.stdin is not None
    os.dup2(child.stdin.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        child.stdin.close()
        try:  # the filter ends when the pipe's last writer closes it
            child.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass  # a process started in the block holds the pipe: the filter outlives it


class _QuietLoader(importlib.abc.Loader):
    """The loader of ``tensorflow`` with its module's code run inside
    :func:`_stderr_without`; everything else is the real loader's."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        # The module is TensorFlow's own (its loader as Python's would set it) ...
        module.__loader__ = module.__spec__.loader = self._loader
        with _stderr_without(ABSL_NOISE, ABSL_NOISE_STARTS):  # ... only its import filtered
            self._loader.exec_module(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` as Python's path finder does, with :class:`_QuietLoader`."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "tensorflow":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec
