"""The ClientApp's side of the channel: hand one message's work to the warm trainer.

Light on purpose: no TensorFlow, no pandas. :func:`ask_trainer` sends the global
weights, the server's instruction and the run's resolved settings, and checks the reply
before anything of it can reach the server: exactly the tensors it sent (count, shapes,
dtypes), metric names from the whitelist with int or float values, an error only as
one of :data:`client.trainer.ERROR_KINDS`.
"""

from __future__ import annotations

import dataclasses
import errno
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
        try:
            channel.send_message(conn, request, weights)
        except OSError as err:  # a refusal closes the connection early: read it
            try:
                header = channel.recv_header(conn, "trainer reply")
            except (OSError, ChannelError):
                raise ChannelError(f"sending to {sock}: {err}") from None
            _checked(header, None, kind, weights, allowed_metrics, 0.0)
            raise ChannelError(f"sending to {sock}: {err}") from None
        header = channel.recv_header(conn, "trainer reply")
        arrays = channel.recv_arrays(conn, "trainer reply weights")
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
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ChannelError(f"trainer reply: metric {name!r} is not a number")
    if kind == "train":
        _check_like(arrays, sent)
    elif arrays is not None:
        raise ChannelError("trainer reply: an evaluate reply carries no tensors")
    laps = [(str(n), float(s)) for n, s in header.get("laps", [])
            if isinstance(s, int | float)]
    return TrainerReply(arrays, dict(metrics), None, laps, seconds)


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
