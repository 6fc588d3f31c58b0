"""The ClientApp's side of the channel: hand one message's work to the warm trainer.

Light on purpose: no TensorFlow, no pandas. :func:`ask_trainer` sends the global
weights, the server's instruction and the run's resolved settings, and checks the reply
before anything of it can reach the server: exactly the tensors it sent (count, shapes,
dtypes, in a frame no larger than 1.1 times the one sent), metric names from the
whitelist with finite int or float values, laps as ``[name, seconds]`` pairs, an error
only as one of :data:`ERROR_KINDS`. Any other reply raises :class:`ChannelError`, and
the ClientApp then does the work itself.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from client import channel
from client.channel import ChannelError

#: Seconds to wait for the trainer to accept a connection.
CONNECT_TIMEOUT = 5.0
#: Seconds to wait for the trainer's reply (training included).
REPLY_TIMEOUT = 1800.0
#: Bytes a reply's weights frame may hold beyond 1.1 times the frame it answers.
REPLY_SLACK_BYTES = 64 << 10
#: Error kinds a trainer may reply with; anything else is a broken reply.
ERROR_KINDS = ("DataError", "ValueError", "FileNotFoundError", "no-train-rows",
               "no-test-rows")


@dataclasses.dataclass(frozen=True)
class TrainerReply:
    """A checked reply: weights and metrics, or the kind of a data error."""

    weights: list[np.ndarray] | None
    metrics: dict[str, float | int]
    error: str | None
    laps: list[tuple[str, float]]  # the trainer's own timing (logged here, never sent)
    seconds: float  # the whole hand-off, as this side saw it


def trainer_socket(node_config: Mapping[str, Any]) -> Path | None:
    """The socket of this node's warm trainer when one is listening, else None (no
    data path, no socket file, or a stale file that nobody listens on)."""
    sock = channel.socket_for(node_config)
    if sock is None or not sock.is_socket():
        return None
    return sock


def ask_trainer(sock: Path, kind: str, node_config: Mapping[str, Any],
                run_config: Mapping[str, Any], config: Mapping[str, Any],
                weights: list[np.ndarray], allowed_metrics: tuple[str, ...]) -> TrainerReply:
    """Have the trainer at ``sock`` train (``kind="train"``) or evaluate ``weights``.

    Raises
    ------
    ChannelError
        The trainer is gone, refused the request or broke the reply's rules; the caller
        then does the work itself.
    """
    started = time.perf_counter()
    try:
        token = channel.read_token(channel.token_path(sock))
    except FileNotFoundError:
        raise ChannelError(f"{sock} has no token file beside it") from None
    request = {
        "protocol": channel.PROTOCOL, "token": token, "kind": kind,
        "data-path": str(node_config.get("data-path", "")),
        "format": str(node_config.get("format", "auto")),
        "interventions-path": node_config.get("interventions-path") or None,
        "run-config": dict(run_config), "config": _jsonable(config),
    }
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(CONNECT_TIMEOUT)
        try:
            conn.connect(str(sock))
        except OSError as err:
            stale = " (a stale socket: no trainer listens)" \
                if err.errno == errno.ECONNREFUSED else ""
            raise ChannelError(f"cannot connect to {sock}: {err.strerror}{stale}") from None
        uid = channel.peer_uid(conn)
        if uid != os.getuid():
            raise ChannelError(f"{sock} is served by uid {uid}, not by this user")
        conn.settimeout(REPLY_TIMEOUT)
        payload = channel.arrays_to_npz(weights)
        try:
            channel.send_payload(conn, request, payload)
        except OSError as err:  # a refusal closes the connection early: read it
            try:
                header = channel.recv_header(conn, "trainer reply")
            except (OSError, ChannelError):
                raise ChannelError(f"sending to {sock}: {err}") from None
            _checked(header, None, kind, weights, allowed_metrics, 0.0)
            raise ChannelError(f"sending to {sock}: {err}") from None
        header = channel.recv_header(conn, "trainer reply", REPLY_TIMEOUT)
        # The reply's tensors are the ones sent, trained: as large, give or take the
        # .npz's own bytes.
        arrays = channel.recv_arrays(conn, "trainer reply weights",
                                     int(len(payload) * 1.1) + REPLY_SLACK_BYTES,
                                     REPLY_TIMEOUT)
    return _checked(header, arrays, kind, weights, allowed_metrics,
                    time.perf_counter() - started)


def _checked(header: Mapping[str, Any], arrays: list[np.ndarray] | None, kind: str,
             sent: list[np.ndarray], allowed: tuple[str, ...], seconds: float
             ) -> TrainerReply:
    status = header.get("status")
    if status == "refused":
        raise ChannelError(f"the trainer refused the request: {header.get('reason')}")
    if status == "error":
        if header.get("error") not in ERROR_KINDS or arrays is not None:
            raise ChannelError(f"trainer reply: unexpected error {header.get('error')!r}")
        return TrainerReply(None, {}, str(header["error"]), [], seconds)
    if status != "ok":
        raise ChannelError(f"trainer reply: unknown status {status!r}")
    metrics = header.get("metrics")
    if not isinstance(metrics, dict) or set(metrics) - set(allowed):
        extra = sorted(set(metrics) - set(allowed)) if isinstance(metrics, dict) else metrics
        raise ChannelError(f"trainer reply: metrics outside the whitelist: {extra!r}")
    for name, value in metrics.items():
        if not _is_number(value):
            raise ChannelError(f"trainer reply: metric {name!r} is not a number")
        if not _finite(value):
            # The trainer runs client.work, which sends -1.0 for a non-finite loss: a
            # NaN here is a broken trainer, so the work is done again in this process.
            raise ChannelError(f"trainer reply: metric {name!r} is not finite or out of "
                               f"range ({str(value)[:40]})")
    if kind == "train":
        _check_like(arrays, sent)
    elif arrays is not None:
        raise ChannelError("trainer reply: an evaluate reply carries no tensors")
    return TrainerReply(arrays, dict(metrics), None, _laps(header.get("laps", [])),
                        seconds)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite(value: int | float) -> bool:
    """A finite float, or an int that fits a metric record's int64."""
    if isinstance(value, int):
        return -(2**63) <= value < 2**63
    return math.isfinite(value)


def _laps(laps: object) -> list[tuple[str, float]]:
    """The trainer's laps: a list of ``[name, seconds]`` pairs with finite seconds."""
    def lap(item: object) -> bool:
        return (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                and _is_number(item[1]) and _finite(item[1]))

    if not isinstance(laps, list) or not all(lap(item) for item in laps):
        raise ChannelError(f"trainer reply: laps must be [name, seconds] pairs, not "
                           f"{str(laps)[:80]}")
    return [(name, float(seconds)) for name, seconds in laps]


def _check_like(arrays: list[np.ndarray] | None, sent: list[np.ndarray]) -> None:
    """The reply's tensors are the model's: as many as sent, same shapes and dtypes."""
    got = [] if arrays is None else arrays
    want = [(a.shape, a.dtype) for a in sent]
    have = [(a.shape, a.dtype) for a in got]
    if have != want:
        raise ChannelError(f"trainer reply: {len(have)} tensors unlike the {len(want)} "
                           "sent (count, shape or dtype)")


def _jsonable(config: Mapping[str, Any]) -> dict[str, Any]:
    """The server's instruction (a ConfigRecord's scalars and lists) as JSON values."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, bytes):
            raise ChannelError(f"config {key!r} holds bytes: not handed to the trainer")
        out[str(key)] = list(value) if isinstance(value, list | tuple) else value
    return out
