"""The local channel between a merchant's ClientApp and its warm trainer.

A Unix domain socket that only the merchant's own processes can use: it sits in a
folder of mode 0700 owned by the merchant's user, each side checks the other's uid
(``SO_PEERCRED``), and every request carries a secret token the trainer writes at start
to a file of mode 0600 beside the socket (``<socket>.token``).

A message is two length-prefixed frames: a JSON header, then the weight tensors as
``.npz`` bytes (read with ``allow_pickle=False``; an empty frame means no tensors).
Nothing on the channel is pickled; a frame larger than its limit is refused before it
is read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import socket
import stat
import struct
import tempfile
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

#: Environment variable naming the folder of the default sockets.
RUNTIME_DIR_ENV = "FEDECAY_RUNTIME_DIR"
#: Node config key naming the trainer's socket explicitly.
SOCKET_KEY = "trainer-socket"
#: Version of the frames' layout; both sides refuse another.
PROTOCOL = 1
#: Largest JSON header (bytes): settings and metrics are a few KB.
MAX_HEADER_BYTES = 1 << 20
#: Largest weights frame (bytes); the ``quick`` model's weights take 45 KB.
MAX_WEIGHTS_BYTES = 512 << 20
_PREFIX = struct.Struct("!4sQ")
_MAGIC = b"FDC1"
_TOKEN_BYTES = 32


class ChannelError(ValueError):
    """The channel failed or a peer broke its rules; the message names what."""


# ---------------------------------------------------------------------------------------
# Where the trainer listens
# ---------------------------------------------------------------------------------------


def runtime_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """The folder of the default sockets: ``$FEDECAY_RUNTIME_DIR``, else
    ``<temp dir>/fedecay-<uid>``."""
    given = environ.get(RUNTIME_DIR_ENV)
    if given:
        return Path(given).expanduser().absolute()
    return Path(tempfile.gettempdir()) / f"fedecay-{os.getuid()}"


def default_socket(data_path: str | os.PathLike[str],
                   environ: Mapping[str, str] = os.environ) -> Path:
    """The well-known socket of the trainer serving ``data_path`` (named by a digest of
    the file's absolute path, so the ClientApp and the trainer find the same one)."""
    real = os.path.realpath(os.fspath(data_path))
    digest = hashlib.sha256(real.encode()).hexdigest()[:16]
    return runtime_dir(environ) / f"trainer-{digest}.sock"


def socket_for(node_config: Mapping[str, Any],
               environ: Mapping[str, str] = os.environ) -> Path | None:
    """The trainer socket a node's ClientApp looks for: node config ``trainer-socket``,
    else the default for its ``data-path``; None for a node without a data path
    (simulation)."""
    explicit = node_config.get(SOCKET_KEY)
    if explicit:
        return Path(str(explicit)).expanduser().absolute()
    if "data-path" not in node_config:
        return None
    return default_socket(str(node_config["data-path"]), environ)


def token_path(sock: Path) -> Path:
    """The token file beside a socket."""
    return sock.with_name(sock.name + ".token")


def private_dir(folder: Path) -> Path:
    """``folder``, created with mode 0700 if missing; refused unless it is this user's
    own and closed to everyone else."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid():
        raise ChannelError(f"{folder} belongs to uid {info.st_uid}, not to this user "
                           f"({os.getuid()}): choose another folder ({RUNTIME_DIR_ENV} or "
                           f"node config {SOCKET_KEY})")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        # A shared folder such as /tmp (sticky, open to all) must stay as it is.
        fix = (f"put the socket in a private folder inside it (e.g. {folder}/fedecay-"
               f"$USER, which is created with mode 0700)" if mode & stat.S_ISVTX
               else f"chmod 700 {folder}, or choose a private folder")
        raise ChannelError(f"{folder} has mode {mode:04o}; other users could reach the "
                           f"trainer's socket: {fix}")
    return folder


# ---------------------------------------------------------------------------------------
# The token
# ---------------------------------------------------------------------------------------


def write_token(path: Path) -> str:
    """A fresh secret written to ``path`` with mode 0600 (replacing an older one)."""
    token = secrets.token_hex(_TOKEN_BYTES)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(token)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return token


def read_token(path: Path) -> str:
    """The token in ``path``; refused unless the file is this user's and mode 0600."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd) as src:
        info = os.fstat(src.fileno())
        if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
            raise ChannelError(f"{path}: the token file must belong to this user with "
                               f"mode 0600 (uid {info.st_uid}, mode "
                               f"{stat.S_IMODE(info.st_mode):04o})")
        token = src.read(4 * _TOKEN_BYTES).strip()
    if len(token) != 2 * _TOKEN_BYTES:
        raise ChannelError(f"{path}: not a trainer token")
    return token


def same_token(given: object, expected: str) -> bool:
    """Constant-time comparison of a request's token."""
    return isinstance(given, str) and secrets.compare_digest(given.encode(), expected.encode())


# ---------------------------------------------------------------------------------------
# Peers and frames
# ---------------------------------------------------------------------------------------


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (``SO_PEERCRED``)."""
    creds = struct.Struct("3i")
    _, uid, _ = creds.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                             creds.size))
    return int(uid)


def send_frame(sock: socket.socket, payload: bytes) -> None:
    """One frame: magic, length, payload."""
    sock.sendall(_PREFIX.pack(_MAGIC, len(payload)) + payload)


def recv_frame(sock: socket.socket, limit: int, what: str,
               timeout: float | None = None) -> bytes:
    """One frame of at most ``limit`` bytes; a wrong magic or a larger length is refused
    before the payload is read.

    ``timeout`` bounds the whole frame, not each read: a peer that sends a byte now and
    then is refused once it is spent (the socket's own timeout applies otherwise).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    was = sock.gettimeout()
    try:
        head = _recv_exactly(sock, _PREFIX.size, what, deadline, timeout)
        magic, size = _PREFIX.unpack(head)
        if magic != _MAGIC:
            raise ChannelError(f"{what}: not a fedecay trainer frame (starts {magic!r})")
        if size > limit:
            raise ChannelError(f"{what}: frame of {size:,} bytes exceeds the limit of "
                               f"{limit:,} bytes")
        return _recv_exactly(sock, size, what, deadline, timeout)
    finally:
        if deadline is not None:
            sock.settimeout(was)


def _recv_exactly(sock: socket.socket, size: int, what: str, deadline: float | None,
                  timeout: float | None) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        try:
            if deadline is not None:
                sock.settimeout(max(deadline - time.monotonic(), 1e-3))
            chunk = sock.recv(min(size - len(buf), 1 << 20))
        except TimeoutError:
            if deadline is None:
                raise
            raise ChannelError(f"{what}: frame not received within {timeout:g} s "
                               f"({len(buf):,} of {size:,} bytes came)") from None
        if not chunk:
            raise ChannelError(f"{what}: the peer closed the connection after "
                               f"{len(buf):,} of {size:,} bytes")
        buf += chunk
    return bytes(buf)


def send_message(sock: socket.socket, header: Mapping[str, Any],
                 arrays: list[np.ndarray] | None) -> None:
    """A JSON header and the ``arrays`` (none: an empty frame)."""
    send_payload(sock, header, b"" if arrays is None else arrays_to_npz(arrays))


def send_payload(sock: socket.socket, header: Mapping[str, Any], payload: bytes) -> None:
    """A JSON header and weights already packed by :func:`arrays_to_npz`."""
    send_frame(sock, json.dumps(dict(header)).encode())
    send_frame(sock, payload)


def recv_header(sock: socket.socket, what: str,
                timeout: float | None = None) -> dict[str, Any]:
    """The JSON header frame (within ``timeout`` s, see :func:`recv_frame`): an object,
    else refused."""
    raw = recv_frame(sock, MAX_HEADER_BYTES, what, timeout)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ChannelError(f"{what}: header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise ChannelError(f"{what}: header is not a JSON object")
    return header


def recv_arrays(sock: socket.socket, what: str, limit: int = MAX_WEIGHTS_BYTES,
                timeout: float | None = None) -> list[np.ndarray] | None:
    """The weights frame as arrays (None when empty), packed and unpacked within
    ``limit`` bytes."""
    raw = recv_frame(sock, limit, what, timeout)
    return npz_to_arrays(raw, what, limit) if raw else None


def arrays_to_npz(arrays: list[np.ndarray]) -> bytes:
    """``arrays`` in order as ``.npz`` bytes (``arr_0``, ``arr_1``, …), stored
    uncompressed."""
    buf = io.BytesIO()
    np.savez(buf, *[np.asarray(a) for a in arrays])
    return buf.getvalue()


def npz_to_arrays(raw: bytes, what: str, limit: int = MAX_WEIGHTS_BYTES
                  ) -> list[np.ndarray]:
    """The arrays of ``.npz`` bytes in order; object arrays and other names refused.

    The members must be stored, not deflated, and their unpacked sizes must sum to at
    most ``limit`` bytes: a small frame cannot unpack into a large one.
    """
    try:
        _check_members(zipfile.ZipFile(io.BytesIO(raw)).infolist(), what, limit)
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            names = list(npz.files)
            want = [f"arr_{i}" for i in range(len(names))]
            if sorted(names) != sorted(want):
                raise ChannelError(f"{what}: unexpected array names {names[:5]}")
            return [npz[name] for name in want]
    except ChannelError:
        raise
    except (ValueError, OSError, EOFError, KeyError, NotImplementedError, RuntimeError,
            zipfile.BadZipFile) as err:
        raise ChannelError(f"{what}: not a valid .npz of numeric arrays ({err})") from None


def _check_members(members: list[zipfile.ZipInfo], what: str, limit: int) -> None:
    for info in members:
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            raise ChannelError(f"{what}: {info.filename} is compressed or encrypted; "
                               "the channel takes stored .npz members only")
    unpacked = sum(info.file_size for info in members)
    if unpacked > limit:
        raise ChannelError(f"{what}: the arrays hold {unpacked:,} bytes unpacked, more "
                           f"than the limit of {limit:,} bytes")
