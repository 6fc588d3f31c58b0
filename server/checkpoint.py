"""Atomic, verified checkpoints of the global model and the server optimizer state."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Strategy attributes that hold server-side optimizer state (FedAdam/FedYogi/FedAvgM).
STATE_ATTRIBUTES: tuple[str, ...] = ("current_arrays", "m_t", "v_t", "momentum_vector")
_MAGIC = b"FEDECAY-CKPT-1\n"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated or corrupt."""


def save_checkpoint(directory: Path, round_number: int, payload: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write ``round-NNNNN.ckpt`` atomically (temp file, fsync, rename) with a checksum."""
    directory.mkdir(parents=True, exist_ok=True)
    body = pickle.dumps({"round": round_number, **payload}, protocol=pickle.HIGHEST_PROTOCOL)
    digest = hashlib.sha256(body).hexdigest().encode()
    path = directory / f"round-{round_number:05d}.ckpt"
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as fh:
        fh.write(_MAGIC + digest + b"\n" + body)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    for old in sorted(directory.glob("round-*.ckpt"))[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read and verify a checkpoint; raise :class:`CheckpointError` with the reason."""
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None
    if not raw.startswith(_MAGIC):
        raise CheckpointError(f"checkpoint {path} is not a fedecay checkpoint (bad header)")
    head, _, body = raw[len(_MAGIC):].partition(b"\n")
    if hashlib.sha256(body).hexdigest().encode() != head:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt (checksum mismatch, {len(raw)} bytes)")
    return pickle.load(io.BytesIO(body))


def clear_checkpoints(directory: Path) -> int:
    """Remove the checkpoints of an earlier run in ``directory``; returns how many."""
    found = sorted(Path(directory).glob("round-*.ckpt"))
    for path in found:
        path.unlink()
    return len(found)


def latest_checkpoint(directory: Path) -> Path | None:
    found = sorted(Path(directory).glob("round-*.ckpt"))
    return found[-1] if found else None


def strategy_state(strategy: Any) -> dict[str, Any]:
    """The server optimizer's state as plain numpy (whatever the strategy keeps)."""
    state = {}
    for name in STATE_ATTRIBUTES:
        value = getattr(strategy, name, None)
        if value is None:
            continue
        if hasattr(value, "to_numpy_ndarrays"):
            value = {"__arrayrecord__": value.to_numpy_ndarrays(), "keys": list(value.keys())}
        state[name] = value
    return state


def restore_strategy_state(strategy: Any, state: dict[str, Any]) -> None:
    from flwr.app import Array, ArrayRecord

    for name, value in state.items():
        if isinstance(value, dict) and "__arrayrecord__" in value:
            # ArrayRecord takes a list of ndarrays or a dict of Arrays (not of ndarrays).
            value = ArrayRecord(dict(zip(value["keys"], [Array(np.asarray(a)) for a in
                                                           value["__arrayrecord__"]],
                                         strict=True)))
        setattr(strategy, name, value)
