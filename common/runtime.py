"""Process set-up that belongs to entry points (the CLI, the Flower apps), never to an
import: importing a library module leaves the environment as it found it."""

from __future__ import annotations

import os
from collections.abc import MutableMapping

#: TensorFlow's C++ start-up logs and its oneDNN notice: noise for every command.
QUIET_TENSORFLOW: dict[str, str] = {"TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0"}


def quiet_tensorflow(environ: MutableMapping[str, str] | None = None) -> None:
    """Set :data:`QUIET_TENSORFLOW` in ``environ`` (the process's environment by default)
    where not set already: a user's own values win.

    TensorFlow reads them when it is imported, so call this before; child processes
    (Ray's workers, Flower's app processes) inherit them.
    """
    target = os.environ if environ is None else environ
    for key, value in QUIET_TENSORFLOW.items():
        target.setdefault(key, value)
