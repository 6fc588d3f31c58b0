"""The monitor's state on disk: ``monitor.npz`` (version 4) and ``monitor.json``.

The state is plain arrays in an ``.npz`` (never a pickle, read with
``allow_pickle=False``) with a SHA-256 over the arrays and the meta JSON; every member,
dtype and meta field is checked on load, and anything else (a pickle, an archive
holding objects, a truncated or altered file, a folder, an older version) is refused
with one ``ValueError`` naming the file and the problem.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import time
import zipfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from itertools import chain, pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from client.monitor.events import escape_controls
from client.monitor.stats import MonitorStats
from client.monitor.user import UserKey, UserState
from common import atomic, timestamps
from common.schema import EVENT_TYPES
from common.timestamps import EARLIEST_NS, NS_LIMIT

STATE_FILE = "monitor.npz"
STATE_SUMMARY = "monitor.json"
LEGACY_STATE_FILE = "monitor.state"  # version 1 (a pickle): refused, never loaded
#: 3: the SHA-256 covers the meta JSON too (2 covered the arrays only); 4: the meta holds
#: ``model``, the id of the weights the risks were scored with (null if unknown).
STATE_VERSION = 4
#: Versions this fedecay reads: in a version 3 state ``model`` may be missing.
READ_VERSIONS = (3, 4)
_DAY_NS = 86_400 * 1_000_000_000
_EARLIEST_TEXT = timestamps.earliest_text()

# Every member of the state archive and its dtype; nothing else is accepted.
_STATE_ARRAYS = {
    "meta": "u1", "lengths": "i8", "ns": "i8", "event": "i1", "cat": "i4", "value": "f8",
    "interest": "f8", "t_ref": "i8", "n": "i8", "first_ns": "i8", "risk": "f8",
    "alerted": "b1", "alert_ns": "i8", "dirty": "i8",
    **{f"{name}_{part}": dtype for name in ("merchant", "user", "category", "item")
       for part, dtype in (("text", "u1"), ("offsets", "i8"))},
}
_PER_USER = ("interest", "t_ref", "n", "first_ns", "risk", "alerted", "alert_ns")
_PER_EVENT = ("ns", "event", "cat", "value")


# --------------------------------------------------------------------------- writing


def state_arrays(users: Mapping[UserKey, UserState], dirty: Iterable[UserKey],
                 categories: Sequence[str]) -> dict[str, np.ndarray]:
    """The users (in dict order: sweeps depend on it) and their events as flat arrays.

    ``dirty`` are the users touched since the last rescoring (in order), ``categories``
    the name of every category code.
    """
    keys = list(users)
    states = list(users.values())
    n = len(states)
    lengths = np.fromiter((len(st.ns) for st in states), np.int64, n)
    total = int(lengths.sum())
    index = {key: i for i, key in enumerate(keys)}
    pending = [index[key] for key in dirty]
    arrays: dict[str, np.ndarray] = {
        "lengths": lengths,
        "ns": np.fromiter(chain.from_iterable(st.ns for st in states), np.int64, total),
        "event": np.fromiter(chain.from_iterable(st.ev for st in states), np.int8, total),
        "cat": np.fromiter(chain.from_iterable(st.cat for st in states), np.int32, total),
        "value": np.fromiter(chain.from_iterable(st.val for st in states), np.float64,
                             total),
        "interest": np.fromiter((st.interest for st in states), np.float64, n),
        "t_ref": np.fromiter((st.t_ref for st in states), np.int64, n),
        "n": np.fromiter((st.n for st in states), np.int64, n),
        "first_ns": np.fromiter((st.first_ns for st in states), np.int64, n),
        "risk": np.fromiter((math.nan if st.risk is None else st.risk for st in states),
                            np.float64, n),
        "alerted": np.fromiter((st.alert_ns is not None for st in states), np.bool_, n),
        "alert_ns": np.fromiter((st.alert_ns or 0 for st in states), np.int64, n),
        "dirty": np.array(pending, dtype=np.int64),
    }
    for name, strings in (("merchant", (k[0] for k in keys)), ("user", (k[1] for k in keys)),
                          ("category", categories),
                          ("item", chain.from_iterable(st.item for st in states))):
        arrays[f"{name}_text"], arrays[f"{name}_offsets"] = _pack_strings(strings)
    return arrays


def write_state(state_dir: str | Path, arrays: Mapping[str, np.ndarray],
                fields: Mapping[str, Any], users: int) -> Path:
    """Write ``monitor.npz`` atomically (temp file, fsync, rename), then ``monitor.json``.

    Parameters
    ----------
    state_dir : str or Path
        The state folder (created if missing).
    arrays : Mapping
        :func:`state_arrays`.
    fields : Mapping
        The meta fields but ``version`` and ``sha256``, in the order they are written
        (``snapshots``, ``clock_ns``, ``last_sweep_ns``, ``pending``,
        ``since_checkpoint``, ``stats``, ``position``): :func:`check_meta` says what
        each holds.
    users : int
        The number of users, for the readable summary.

    Returns
    -------
    Path
        The ``monitor.npz`` written.
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    meta = {"version": STATE_VERSION, **fields}
    meta["sha256"] = digest(arrays, meta)
    blob = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path = state_dir / STATE_FILE
    members: dict[str, Any] = {"meta": blob, **arrays}  # meta first, as always
    with atomic.replacing(path) as tmp:
        np.savez(tmp, **members)
    summary = {k: meta[k] for k in ("version", "clock_ns", "stats", "position")}
    summary["users"] = users
    clock_ns = meta["clock_ns"]
    summary["clock"] = (None if clock_ns is None else
                        pd.Timestamp(clock_ns, unit="ns", tz="UTC").isoformat())
    text = json.dumps(summary, indent=2, default=str) + "\n"
    atomic.write_text(state_dir / STATE_SUMMARY, text)
    return path


def _pack_strings(strings: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings as one UTF-8 byte blob and int64 offsets (no object or fixed-width arrays)."""
    encoded = [s.encode("utf-8", "surrogatepass") for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)), out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


def _unpack_strings(text: np.ndarray, offsets: np.ndarray, count: int, name: str) -> list[str]:
    if len(offsets) != count + 1 or offsets[0] != 0 or offsets[-1] != len(text) \
            or (np.diff(offsets) < 0).any():
        raise ValueError(f"{name}_offsets do not fit {name}_text")
    data = text.tobytes()
    bounds = offsets.tolist()
    return [data[a:b].decode("utf-8", "surrogatepass") for a, b in pairwise(bounds)]


def digest(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> str:
    """The state's SHA-256 (hex).

    Over the arrays' names, dtypes, shapes and bytes (in name order), then over the meta
    JSON (all but ``sha256``, keys sorted, compact).
    """
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    body = {k: v for k, v in meta.items() if k != "sha256"}
    h.update(b"meta:" + json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- reading


def _shown(value: Any) -> str:
    text = escape_controls(repr(value))
    return text if len(text) <= 60 else text[:57] + "..."


def check_meta(meta: Mapping[str, Any], where: str, latest_ns: int | None = None) -> None:
    """Check that every field of a state's meta has the type and range it is written with.

    Times are unix ns from 1971-01-01 to ``latest_ns`` (default: now + 1 day) or null;
    offsets, sizes and counters are integers >= 0.

    Raises
    ------
    ValueError
        Naming ``where`` and the field: ``<where>: meta field position.offset is -50,
        expected an integer >= 0``.
    """
    latest = time.time_ns() + _DAY_NS if latest_ns is None else int(latest_ns)

    def fail(name: str, value: Any, expected: str) -> None:
        raise ValueError(f"{where}: meta field {name} is {_shown(value)}, expected {expected}")

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def count(name: str, value: Any) -> None:
        if not is_int(value) or value < 0:
            fail(name, value, "an integer >= 0")

    def text(name: str, value: Any) -> None:
        if not isinstance(value, str):
            fail(name, value, "a string")

    def table(name: str, value: Any, keys: Iterable[str], required: bool,
              optional: Iterable[str] = ()) -> dict:
        if not isinstance(value, dict):
            fail(name, value, "a JSON object")
        allowed = set(keys) | set(optional)
        extra = sorted(map(str, set(value) - allowed))
        if extra:
            fail(f"{name}.{extra[0]}", value[extra[0]], f"no such field (one of "
                 f"{', '.join(sorted(allowed))})")
        missing = sorted(set(keys) - set(value)) if required else []
        if missing:
            raise ValueError(f"{where}: meta field {name}.{missing[0]} is missing")
        return value

    keys = ("version", "snapshots", "clock_ns", "last_sweep_ns", "pending",
            "since_checkpoint", "stats", "position", "sha256")
    # Version 4 always holds the model's id; version 3 may (the fedecay before the bump
    # wrote it into version 3 states) or may not (those written before that).
    if meta.get("version") == STATE_VERSION:
        table("meta", dict(meta), (*keys, "model"), True)
    else:
        table("meta", dict(meta), keys, True, optional=("model",))
    if not isinstance(meta["snapshots"], dict):
        fail("snapshots", meta["snapshots"], "a JSON object")
    text("sha256", meta["sha256"])
    if meta.get("model") is not None:
        text("model", meta["model"])
    span = (f"null or an integer time (unix ns) from {_EARLIEST_TEXT} to "
            f"{pd.Timestamp(min(latest, int(NS_LIMIT)), unit='ns'):%Y-%m-%d %H:%M} UTC")
    for key in ("clock_ns", "last_sweep_ns"):
        value = meta[key]
        if value is not None and (not is_int(value) or not EARLIEST_NS <= value <= latest):
            fail(key, value, span)
    clock, last_sweep = meta["clock_ns"], meta["last_sweep_ns"]
    if (clock is None) != (last_sweep is None) or (clock is not None and last_sweep > clock):
        fail("last_sweep_ns", last_sweep, "null with clock_ns, else a time <= clock_ns "
             f"({clock!r})")
    count("pending", meta["pending"])
    count("since_checkpoint", meta["since_checkpoint"])
    fields = [f.name for f in dataclasses.fields(MonitorStats)]
    stats = table("stats", meta["stats"], fields, True)
    for name in fields:
        if name != "reasons":
            count(f"stats.{name}", stats[name])
    reasons = stats["reasons"]
    if not isinstance(reasons, dict):
        fail("stats.reasons", reasons, "a JSON object")
    for name, value in reasons.items():
        count(f"stats.reasons.{escape_controls(name)[:40]}", value)
    position = table("position", meta["position"], ("path", "inode", "offset", "output"),
                     False)
    if "path" in position:
        text("position.path", position["path"])
    for key in ("inode", "offset"):
        if key in position:
            count(f"position.{key}", position[key])
    if "output" in position:
        output = table("position.output", position["output"], ("path", "size"), True)
        text("position.output.path", output["path"])
        count("position.output.size", output["size"])


def read_state(path: Path, latest_ns: int | None = None
               ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The meta dict and the arrays of a state file, checked.

    Parameters
    ----------
    path : Path
        The ``monitor.npz``.
    latest_ns : int, optional
        The latest stream clock accepted (see :func:`check_meta`).

    Raises
    ------
    ValueError
        Naming ``path`` and the problem, for anything but a state this version wrote.
    """
    if path.is_dir():
        raise ValueError(f"{path}: a folder where the monitor state file should be")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"{path}: cannot read the monitor state ({err.strerror})") from None
    if not data.startswith(b"PK\x03\x04"):
        kind = " (it looks like a pickle, which is never loaded)" if data[:1] == b"\x80" else ""
        raise ValueError(f"{path}: not a monitor state file: not an .npz archive{kind}")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in archive.infolist():
                name = info.filename.removesuffix(".npy")
                if name not in _STATE_ARRAYS or info.compress_type != zipfile.ZIP_STORED \
                        or info.file_size > len(data):
                    raise ValueError(f"unexpected member {info.filename!r}")
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, EOFError, zipfile.BadZipFile, ValueError) as err:
        raise ValueError(f"{path}: not a readable monitor state ({err})") from None
    missing = sorted(set(_STATE_ARRAYS) - set(arrays))
    if missing:
        raise ValueError(f"{path}: not a monitor state file (no {', '.join(missing)})")
    for name, a in arrays.items():
        if a.ndim != 1 or a.dtype != np.dtype(_STATE_ARRAYS[name]):
            raise ValueError(f"{path}: member {name!r} is {a.dtype}{list(a.shape)}, "
                             f"expected a 1-d {np.dtype(_STATE_ARRAYS[name])} array")
    try:
        meta = json.loads(arrays.pop("meta").tobytes())
    except (ValueError, RecursionError):
        raise ValueError(f"{path}: not a monitor state file (unreadable metadata)") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: not a monitor state file (metadata is not a JSON object)")
    version = meta.get("version")
    if isinstance(version, int) and not isinstance(version, bool) \
            and 2 <= version < min(READ_VERSIONS):
        raise ValueError(f"{path}: a monitor state of an older fedecay (state version "
                         f"{version}, whose SHA-256 does not cover its metadata; this fedecay "
                         f"reads versions {' and '.join(map(str, READ_VERSIONS))}); replay "
                         "the input into a new --state folder")
    if version not in READ_VERSIONS or isinstance(version, bool):
        raise ValueError(f"{path}: state version {_shown(version)}, this fedecay reads "
                         f"{' and '.join(map(str, READ_VERSIONS))}")
    if meta.get("sha256") != digest(arrays, meta):
        raise ValueError(f"{path}: the state's contents do not match their SHA-256 "
                         "(the file was altered or damaged)")
    check_meta(meta, str(path), latest_ns)
    return meta, arrays


def restore(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]
            ) -> tuple[dict[UserKey, UserState], list[UserKey], list[str], MonitorStats]:
    """Users, pending keys (in order), category names and counters from checked arrays.

    Raises
    ------
    ValueError
        When the arrays do not fit together (lengths, offsets, codes, time order);
        ``LookupError``, ``TypeError`` or ``UnicodeError`` may come from crafted data too.
    """
    lengths = arrays["lengths"]
    n, total = len(lengths), int(lengths.sum())
    if (lengths < 0).any() or any(len(arrays[k]) != n for k in _PER_USER):
        raise ValueError("per-user arrays of different lengths")
    if any(len(arrays[k]) != total for k in _PER_EVENT):
        raise ValueError("event arrays do not add up to the users' lengths")
    merchants = _unpack_strings(arrays["merchant_text"], arrays["merchant_offsets"], n,
                                "merchant")
    user_ids = _unpack_strings(arrays["user_text"], arrays["user_offsets"], n, "user")
    n_cats = len(arrays["category_offsets"]) - 1
    categories = _unpack_strings(arrays["category_text"], arrays["category_offsets"], n_cats,
                                 "category")
    items = _unpack_strings(arrays["item_text"], arrays["item_offsets"], total, "item")
    ns, event, cat = arrays["ns"], arrays["event"], arrays["cat"]
    for name in ("ns", "t_ref", "first_ns"):
        times = arrays[name]
        if len(times) and (times.min() < EARLIEST_NS or times.max() >= NS_LIMIT):
            raise ValueError(f"{name} holds times before {_EARLIEST_TEXT} or out of range")
    if total and (event.min() < 0 or event.max() >= len(EVENT_TYPES)
                  or cat.min() < 0 or cat.max() >= n_cats):
        raise ValueError("event or category codes out of range")
    starts = np.cumsum(lengths)
    within = np.ones(max(total - 1, 0), dtype=bool)
    within[starts[(starts > 0) & (starts < total)] - 1] = False
    if (np.diff(ns)[within] < 0).any():
        raise ValueError("a user's events are not in time order")
    dirty = arrays["dirty"]
    if len(dirty) and (dirty.min() < 0 or dirty.max() >= n or len(np.unique(dirty)) < len(dirty)):
        raise ValueError("pending users out of range")
    per_user = {k: arrays[k].tolist() for k in _PER_USER}
    columns = ns.tolist(), event.tolist(), cat.tolist(), arrays["value"].tolist()
    users: dict[UserKey, UserState] = {}
    lo = 0
    for i, length in enumerate(lengths.tolist()):
        st = UserState()
        hi = lo + length
        st.ns, st.ev, st.cat, st.val = (col[lo:hi] for col in columns)
        st.item = items[lo:hi]
        lo = hi
        st.interest, st.t_ref = per_user["interest"][i], per_user["t_ref"][i]
        st.n, st.first_ns = per_user["n"][i], per_user["first_ns"][i]
        risk = per_user["risk"][i]
        st.risk = None if math.isnan(risk) else risk
        st.alert_ns = per_user["alert_ns"][i] if per_user["alerted"][i] else None
        users[(merchants[i], user_ids[i])] = st
    if len(users) != n:
        raise ValueError("a user appears twice")
    keys = list(users)
    saved = dict(meta["stats"])
    reasons = saved.pop("reasons", {})
    fields = {f.name for f in dataclasses.fields(MonitorStats)} - {"reasons"}
    if set(saved) - fields or not isinstance(reasons, dict) \
            or not all(isinstance(v, int) for v in (*saved.values(), *reasons.values())):
        raise ValueError("unexpected counters")
    stats = MonitorStats(**saved, reasons=Counter({str(k): v for k, v in reasons.items()}))
    return users, [keys[i] for i in dirty.tolist()], categories, stats

