"""The monitor's state folder: made ready before the model loads, and asked for a state."""

from __future__ import annotations

import os
from pathlib import Path

from client.monitor.state import LEGACY_STATE_FILE, STATE_FILE


def has_state(state_dir: str | Path) -> bool:
    """Whether ``state_dir`` holds a monitor state to restore.

    Raises
    ------
    ValueError
        For a state of an older version (a pickle): it is never loaded, and starting
        afresh beside it would repeat every alert.
    """
    state_dir = Path(state_dir)
    if (state_dir / STATE_FILE).exists() or (state_dir / STATE_FILE).is_symlink():
        return True
    legacy = state_dir / LEGACY_STATE_FILE
    if legacy.exists() or legacy.is_symlink():
        raise ValueError(f"{legacy}: a monitor state of an older fedecay (state version 1, "
                         "a pickle, which this version never loads since it could run code); "
                         "replay the input into a new --state folder")
    return False


def prepare_state_dir(state_dir: str | Path) -> Path:
    """``state_dir`` resolved (absolute) and created.

    Raises
    ------
    ValueError
        When it is a file, or cannot be created or written (a probe file is created and
        removed).
    """
    path = Path(state_dir).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise ValueError(f"state folder {path}: is a file, not a folder")
    probe = path / f".write-test-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as err:
        raise ValueError(f"state folder {path}: cannot create or write it "
                         f"({err.strerror or err})") from None
    return path
