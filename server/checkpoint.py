"""Atomic, verified checkpoints of the global model and the server optimizer state.

A checkpoint is one ``round-NNNNN.npz``: the arrays as plain ``.npy`` members, and a
JSON member that holds everything else (round, model selection, clipping norm) with
references to the arrays, plus a SHA-256 over both. Nothing in it can run code:
it is read with ``np.load(allow_pickle=False)`` and ``json``, so a crafted file can only
fail to load, with :class:`CheckpointError` saying why. Checkpoints of the earlier
pickle format (``round-NNNNN.ckpt``) are never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from common import atomic
from server.flower_seam import OPTIMIZER_STATE, read_optimizer_state, write_optimizer_state
from server.shift_step import VELOCITY

log = logging.getLogger(__name__)

#: Strategy attributes that hold server-side optimizer state (FedAdam/FedYogi/FedAvgM),
#: and the response shifts' velocity (``server.shift_step``).
STATE_ATTRIBUTES: tuple[str, ...] = (*OPTIMIZER_STATE, VELOCITY)
FORMAT = "fedecay-checkpoint-2"
_NAME = re.compile(r"^round-(\d{5,})\.npz$")
_META, _DIGEST = "__meta__", "__sha256__"
#: The earlier, pickle-based format: recognised so it can be refused by name.
_LEGACY_GLOB = "round-*.ckpt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt or not of this format."""


# ----------------------------------------------------------------------- encoding


def _encode(value: Any, arrays: list[np.ndarray]) -> Any:
    """``value`` as JSON, its arrays moved to ``arrays`` and named by position."""
    if isinstance(value, ArrayRecord):
        return {"__arrayrecord__": [[k, _encode(a.numpy(), arrays)] for k, a in value.items()]}
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise TypeError("object arrays cannot be checkpointed")
        arrays.append(np.ascontiguousarray(value))
        return {"__array__": len(arrays) - 1}
    if isinstance(value, dict):
        if not all(isinstance(k, str) and not k.startswith("__") for k in value):
            raise TypeError(f"checkpoint dict keys must be plain strings: {list(value)}")
        return {k: _encode(v, arrays) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v, arrays) for v in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot checkpoint a {type(value).__name__}")


def _decode(value: Any, arrays: list[np.ndarray], where: str) -> Any:
    if isinstance(value, dict):
        if "__array__" in value:
            index = value["__array__"]
            if not isinstance(index, int) or not 0 <= index < len(arrays):
                raise CheckpointError(f"{where}: array reference {index!r} out of range")
            return arrays[index]
        if "__arrayrecord__" in value:
            items = [(str(k), _decode(a, arrays, where)) for k, a in value["__arrayrecord__"]]
            return ArrayRecord({k: Array(np.asarray(a)) for k, a in items})
        return {k: _decode(v, arrays, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, arrays, where) for v in value]
    return value


def _digest(meta: bytes, arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256(meta)
    for a in arrays:
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# -------------------------------------------------------------------- save / load


def checkpoint_path(directory: Path, round_number: int) -> Path:
    """``directory/round-NNNNN.npz``, the round number zero-padded to five digits."""
    return Path(directory) / f"round-{round_number:05d}.npz"


def save_checkpoint(directory: Path, round_number: int, payload: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write ``round-NNNNN.npz`` atomically (temp file, fsync, rename); keep the newest
    ``keep`` checkpoints."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays: list[np.ndarray] = []
    body = {"format": FORMAT, "round": int(round_number), **payload}
    meta = json.dumps(_encode(body, arrays), allow_nan=True).encode()
    members = {f"a{i}": a for i, a in enumerate(arrays)}
    members[_META] = np.frombuffer(meta, np.uint8)
    members[_DIGEST] = np.frombuffer(_digest(meta, arrays).encode(), np.uint8)
    path = checkpoint_path(directory, round_number)
    with atomic.replacing(path) as tmp:
        np.savez(tmp, allow_pickle=False, **members)
    for old in list_checkpoints(directory)[keep:]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read and verify a checkpoint; raise :class:`CheckpointError` with the reason."""
    path = Path(path)
    if path.suffix == ".ckpt":
        raise CheckpointError(f"checkpoint {path} is of the old pickle format, which is never "
                              "loaded (it could run code)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = set(npz.files)
            if _META not in names or _DIGEST not in names:
                raise CheckpointError(f"checkpoint {path} is not a fedecay checkpoint "
                                      "(no metadata)")
            count = len(names) - 2
            if names != {_META, _DIGEST} | {f"a{i}" for i in range(count)}:
                raise CheckpointError(f"checkpoint {path} holds unexpected members")
            meta, digest = (_member(npz, name, path).tobytes() for name in (_META, _DIGEST))
            arrays = [_member(npz, f"a{i}", path) for i in range(count)]
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"cannot read checkpoint {path}: no such file") from None
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    except (ValueError, zipfile.BadZipFile, EOFError, KeyError) as err:
        # np.load raises ValueError for object (pickled) members and for non-npz bytes.
        raise CheckpointError(f"checkpoint {path} is truncated, corrupt or not a fedecay "
                              f"checkpoint ({type(err).__name__}: {err})") from None
    if _digest(meta, arrays).encode() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupt (checksum mismatch)")
    try:
        body = json.loads(meta)
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path}: unreadable metadata ({err})") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: format {body.get('format')!r} "
                              f"(expected {FORMAT!r})" if isinstance(body, dict) else
                              f"checkpoint {path}: metadata is not an object")
    state = _decode(body, arrays, str(path))
    if not isinstance(state.get("round"), int) or state["round"] < 0:
        raise CheckpointError(f"checkpoint {path}: round {state.get('round')!r} is not a "
                              "round number")
    return state


def _member(npz: Any, name: str, path: Path) -> np.ndarray:
    value = npz[name]  # a member that is no .npy comes back as raw bytes
    if not isinstance(value, np.ndarray) or value.dtype.hasobject:
        raise CheckpointError(f"checkpoint {path}: member {name!r} is not a plain array")
    return value


def list_checkpoints(directory: Path) -> list[Path]:
    """The checkpoints in ``directory``, newest round first."""
    found = []
    for path in Path(directory).glob("round-*.npz"):
        if (m := _NAME.match(path.name)) is not None:
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found, reverse=True)]


def legacy_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints of the earlier pickle format, which are never loaded."""
    return sorted(Path(directory).glob(_LEGACY_GLOB))


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint of the highest round in ``directory`` (not verified), or None."""
    found = list_checkpoints(directory)
    return found[0] if found else None


def usable_checkpoints(directory: Path) -> Iterator[tuple[Path, dict[str, Any] | None, str]]:
    """Each checkpoint, newest first, with its state or (None, the reason it is unusable)."""
    for path in list_checkpoints(directory):
        try:
            yield path, load_checkpoint(path), ""
        except CheckpointError as err:
            yield path, None, str(err)


def strategy_state(strategy: Any) -> dict[str, Any]:
    """The server optimizer's state (whatever the strategy keeps) and the response
    shifts' velocity if any, for a checkpoint."""
    state = read_optimizer_state(strategy)
    velocity = getattr(strategy, VELOCITY, None)
    if velocity is not None:
        state[VELOCITY] = list(velocity)
    return state


def restore_strategy_state(strategy: Any, state: dict[str, Any]) -> None:
    """Give ``strategy`` the optimizer state of :func:`strategy_state`; raise
    :class:`CheckpointError` when ``state`` names attributes outside ``STATE_ATTRIBUTES``."""
    unknown = set(state) - set(STATE_ATTRIBUTES)
    if unknown:
        raise CheckpointError(f"checkpoint names unknown strategy state {sorted(unknown)}")
    velocity = state.get(VELOCITY)
    write_optimizer_state(strategy, {k: v for k, v in state.items() if k != VELOCITY})
    if velocity is not None:
        setattr(strategy, VELOCITY, [np.asarray(v) for v in velocity])
