"""The merchant's warm trainer: a long-running process beside ``flower-supernode``.

Flower starts a fresh ClientApp process for every message, which would import
TensorFlow, read and check the merchant's file and build the model each time. The
trainer does that once: it loads and checks the file at start, keeps the snapshots and
the compiled model per run settings, and serves the train and evaluate requests the
light ClientApps hand it over :mod:`client.channel`.

Who may connect: processes of the same user (``SO_PEERCRED``) that present the token
written at start (mode 0600). What it replies: the weight tensors and the scalar
metrics of :mod:`client.work`, or the kind of a data error; rows, ids and file contents
never leave it, and the ClientApp checks every reply against its whitelists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import socket
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from client import channel
from client.channel import ChannelError
from client.config import cached_settings
from client.timer import HandlerTimer
from common.config import SnapshotConfig
from common.protocol import SCORE_VALIDATION_KEY
from common.snapshots import Snapshots

log = logging.getLogger(__name__)

#: Seconds a connection may take to send each frame of its request (the whole frame).
READ_TIMEOUT = 60.0
#: Seconds a connection may take to read the reply.
SEND_TIMEOUT = 60.0
#: Connections served at once beyond which new ones are refused as busy.
MAX_CONNECTIONS = 8
#: Snapshot sets kept (one per distinct snapshot settings of the runs served).
SNAPSHOT_CACHE = 4
#: What a request's work returns: the reply header and the tensors (or None).
Reply = tuple[dict[str, Any], list[np.ndarray] | None]


@dataclasses.dataclass(frozen=True)
class MerchantFile:
    """The merchant's data as the node config names it."""

    path: str
    format: str = "auto"
    interventions: str | None = None

    def same_as(self, path: object, fmt: object, interventions: object) -> bool:
        """Whether a request names this file (paths compared resolved)."""
        def real(p: object) -> str | None:
            return os.path.realpath(str(p)) if p else None
        return (real(path) == real(self.path) and str(fmt) == self.format
                and real(interventions) == real(self.interventions))


class WarmWork:
    """The merchant's events, checked once, and what each request needs built from them.

    The events are read again only when the file changes on disk (size or time);
    snapshots are kept per snapshot settings, the compiled model per model settings
    (:func:`common.model.cached_model`). One request runs at a time.
    """

    def __init__(self, data: MerchantFile) -> None:
        self.data = data
        self._events: Any = None
        self._stamp: tuple[Any, ...] | None = None
        self._snapshots: OrderedDict[SnapshotConfig, Snapshots] = OrderedDict()
        self._lock = threading.Lock()

    def load(self) -> str:
        """Read and check the merchant's file; a summary line of what it holds."""
        from common.io import load_events

        stamp = self._file_stamp()
        loaded = load_events(self.data.path, self.data.format,
                             interventions_path=self.data.interventions)
        self._events, self._stamp = loaded, stamp
        self._snapshots.clear()
        return "; ".join(line.strip() for line in loaded.report.summary_lines())

    def warm_up(self) -> None:
        """Import TensorFlow and the training code now rather than at the first request."""
        import common.model  # noqa: F401
        import common.training  # noqa: F401

    def _file_stamp(self) -> tuple[Any, ...]:
        stamp: list[Any] = []
        for name in (self.data.path, self.data.interventions):
            if name:
                st = os.stat(name)
                stamp += [st.st_size, st.st_mtime_ns]
        return tuple(stamp)

    def _snaps(self, config: SnapshotConfig) -> Snapshots:
        from common.snapshots import build_snapshots

        if self._file_stamp() != self._stamp:
            log.info("%s changed on disk: reading it again", self.data.path)
            log.info("%s", self.load())
        if config not in self._snapshots:
            snaps, report = build_snapshots(self._events.events, config,
                                            self._events.interventions)
            for line in report.summary_lines():
                log.info("%s: %s", Path(self.data.path).name, line.strip())
            self._snapshots[config] = snaps
            while len(self._snapshots) > SNAPSHOT_CACHE:
                self._snapshots.popitem(last=False)
        self._snapshots.move_to_end(config)
        return self._snapshots[config]

    def __call__(self, request: Mapping[str, Any], weights: list[np.ndarray] | None) -> Reply:
        """Serve one checked request: train or evaluate the global ``weights``."""
        from client.work import evaluate_reply, global_round, train_reply
        from common.schema import DataError

        timer = HandlerTimer()
        kind, config = request["kind"], request["config"]
        with self._lock:
            try:
                settings = cached_settings(request["run-config"])
                snaps = self._snaps(settings.snapshots)
            except (DataError, ValueError, FileNotFoundError) as err:
                log.error("merchant data rejected: %s", err)
                return {"status": "error", "error": type(err).__name__}, None
            timer.lap("data")
            if kind == "train":
                if len(snaps.split_part("train")) == 0:
                    return {"status": "error", "error": "no-train-rows"}, None
                out, metrics = train_reply(settings, snaps, weights or [], config, timer)
                what = f"train round {global_round(config)}"
            else:
                test = snaps.split_part("test")
                if len(test) == 0:
                    return {"status": "error", "error": "no-test-rows"}, None
                # The server's last round: its model is scored on the validation rows too.
                val = snaps.split_part("val") if config.get(SCORE_VALIDATION_KEY) else None
                out, metrics = None, evaluate_reply(settings, test, weights or [], timer,
                                                    val=val)
                what = f"evaluate round {config.get('server-round', '?')}"
        log.info("%s", request_timing(what, timer.laps()))
        return {"status": "ok", "metrics": metrics, "laps": timer.laps()}, out


def request_timing(what: str, laps: list[tuple[str, float]]) -> str:
    """The trainer's line for one request: its own seconds and their laps (the
    ClientApp's line gives its process's age; the trainer's age would say nothing)."""
    spent = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in laps)
    return f"{what}: {sum(s for _, s in laps):.2f} s in the trainer; {spent}"


class TrainerServer:
    """The listening side of the channel: checks each peer and request, then runs
    ``work`` on it. A broken or hostile connection is answered (when it can be) and
    closed; the server goes on.

    Parameters
    ----------
    sock_path : Path
        Where to listen; ``<sock_path>.token`` and ``<sock_path>.lock`` go beside it.
    data : MerchantFile
        The file this trainer serves; requests naming another file are refused.
    work : callable
        ``work(request_header, weights) -> (reply_header, weights | None)``.
    allowed_uid : int, optional
        The only uid that may connect (default: this process's).
    """

    def __init__(self, sock_path: Path, data: MerchantFile,
                 work: Callable[[Mapping[str, Any], list[np.ndarray] | None], Reply],
                 allowed_uid: int | None = None) -> None:
        self.sock_path = Path(sock_path).absolute()
        self.token_path = channel.token_path(self.sock_path)
        self.lock_path = self.sock_path.with_name(self.sock_path.name + ".lock")
        self.data, self.work = data, work
        self.allowed_uid = os.getuid() if allowed_uid is None else allowed_uid
        self.served = 0  # requests answered with the work's reply
        self.refused = 0  # connections turned away (peer, request or busy)
        self._listener: socket.socket | None = None
        self._lock_fd: int | None = None
        self._token = ""
        self._bound: tuple[int, int] | None = None
        self._stop = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._count = threading.Lock()

    # -- life cycle -----------------------------------------------------------------

    def start(self) -> None:
        """:meth:`claim` the socket, then :meth:`listen` on it."""
        self.claim()
        self.listen()

    def claim(self) -> None:
        """Hold the socket's lock file for this process's life: refused at once when
        another trainer holds it."""
        channel.private_dir(self.sock_path.parent)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ChannelError(f"another trainer (pid {holder}) already serves "
                               f"{self.sock_path}; stop it first") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd
        try:
            self._stale_socket()  # a path that is not a socket is refused before listening
        except ChannelError:
            self.close()
            raise

    def _stale_socket(self) -> bool:
        """Whether a socket file is left at the path (by a trainer that was killed: the
        lock says none serves it); refused when something else is there."""
        try:
            info = self.sock_path.lstat()
        except FileNotFoundError:
            return False
        if not stat.S_ISSOCK(info.st_mode):
            what = "a symlink" if stat.S_ISLNK(info.st_mode) else \
                "a folder" if stat.S_ISDIR(info.st_mode) else "a file"
            raise ChannelError(f"{self.sock_path} exists and is not a socket ({what}): "
                               "not replacing it; remove it or choose another socket path")
        # Our lock says no trainer serves it, but another program may listen there.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.sock_path))
        except OSError:  # refused: nobody listens, the file is stale
            return True
        finally:
            probe.close()
        raise ChannelError(f"{self.sock_path} is in use: another process listens on it; "
                           "not replacing it; stop that process or choose another socket path")

    def listen(self) -> None:
        """Write a fresh token and listen; a stale socket file (left by a trainer that
        was killed) is replaced, anything else at the path is refused."""
        assert self._lock_fd is not None, "claim() first"
        if self._stale_socket():
            log.info("replacing the stale socket %s", self.sock_path)
            self.sock_path.unlink()
        self._token = channel.write_token(self.token_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket file is created with mode 0600
        try:
            listener.bind(str(self.sock_path))
        finally:
            os.umask(old)
        self._bound = self._identity()
        listener.listen(16)
        listener.settimeout(0.5)  # so that stop() is noticed
        self._listener = listener

    def _identity(self) -> tuple[int, int] | None:
        """(device, inode) of the socket file, None when it is gone."""
        try:
            info = self.sock_path.lstat()
        except FileNotFoundError:
            return None
        return info.st_dev, info.st_ino

    def stop(self) -> None:
        """Ask :meth:`serve_forever` to return."""
        self._stop.set()

    def close(self) -> None:
        """Remove the socket and the token, release the lock."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            if self._bound is not None and self._identity() == self._bound:
                # Only the socket this trainer bound: never a file put there since.
                with contextlib.suppress(FileNotFoundError):
                    self.sock_path.unlink()
            with contextlib.suppress(FileNotFoundError):
                self.token_path.unlink()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> TrainerServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def serve_forever(self) -> None:
        """Accept connections until :meth:`stop`; each is served in a thread."""
        assert self._listener is not None, "start() first"
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as err:
                if self._stop.is_set():
                    break
                log.warning("accept failed: %s", err)
                continue
            if not self._slots.acquire(blocking=False):
                with contextlib.closing(conn):
                    self._turn_away(conn, f"busy: {MAX_CONNECTIONS} requests under way")
                continue
            threading.Thread(target=self._serve_one, args=(conn,), daemon=True).start()

    # -- one connection ---------------------------------------------------------------

    def _serve_one(self, conn: socket.socket) -> None:
        try:
            with contextlib.closing(conn):
                self._answer(conn)
        except (OSError, ChannelError) as err:  # the peer went away or broke the rules
            log.warning("request dropped: %s", err)
        except Exception:  # noqa: BLE001 - a bug in one request must not stop the trainer
            log.exception("request failed")
        finally:
            self._slots.release()

    def _answer(self, conn: socket.socket) -> None:
        try:
            request, weights = self._read_request(conn)
        except ChannelError as err:
            self._turn_away(conn, str(err))
            return
        header, arrays = self.work(request, weights)
        with self._count:
            self.served += 1
        conn.settimeout(SEND_TIMEOUT)
        channel.send_message(conn, header, arrays)

    def _read_request(self, conn: socket.socket
                      ) -> tuple[dict[str, Any], list[np.ndarray] | None]:
        """The checked request and its weights (the token removed: the work never sees
        it); ChannelError names why one is refused. Each frame must arrive within
        :data:`READ_TIMEOUT` s, however slowly the peer sends it."""
        uid = channel.peer_uid(conn)
        if uid != self.allowed_uid:
            raise ChannelError(f"uid {uid} may not use this trainer (only uid "
                               f"{self.allowed_uid} may connect)")
        request = channel.recv_header(conn, "request", READ_TIMEOUT)
        if not channel.same_token(request.pop("token", None), self._token):
            raise ChannelError(f"wrong token (read it from {self.token_path})")
        problem = self._check(request)
        if problem:
            raise ChannelError(problem)
        return request, channel.recv_arrays(conn, "request weights", timeout=READ_TIMEOUT)

    def _check(self, request: Mapping[str, Any]) -> str | None:
        if request.get("protocol") != channel.PROTOCOL:
            return f"protocol {request.get('protocol')!r}, this trainer speaks {channel.PROTOCOL}"
        if request.get("kind") not in ("train", "evaluate"):
            return f"unknown kind {request.get('kind')!r} (train or evaluate)"
        if not isinstance(request.get("run-config"), dict) or \
                not isinstance(request.get("config"), dict):
            return "'run-config' and 'config' must be JSON objects"
        if not self.data.same_as(request.get("data-path"), request.get("format"),
                                 request.get("interventions-path")):
            return (f"this trainer serves {self.data.path} (format {self.data.format}), "
                    f"not {request.get('data-path')} (format {request.get('format')})")
        return None

    def _turn_away(self, conn: socket.socket, reason: str) -> None:
        """Log and count a refusal, and tell the peer why (when it still listens)."""
        log.warning("refused a request: %s", reason)
        with self._count:
            self.refused += 1
        with contextlib.suppress(OSError):
            conn.settimeout(SEND_TIMEOUT)
            channel.send_message(conn, {"status": "refused", "reason": reason}, None)


@contextlib.contextmanager
def running(server: TrainerServer) -> Iterator[threading.Thread]:
    """``server`` started and serving in a thread; stopped and cleaned up on exit."""
    server.start()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        server.stop()
        thread.join(timeout=5)
        server.close()


def serve(data: MerchantFile, sock_path: Path | None = None,
          report: Callable[[str], None] = log.info) -> int:
    """Run a warm trainer for ``data`` until SIGTERM or SIGINT; the requests served.

    The file is read and checked first (a bad file raises before anything listens),
    TensorFlow is imported, then the socket (default :func:`client.channel.default_socket`)
    and its token are written; both are removed on the way out.
    """
    import signal

    path = sock_path or channel.default_socket(data.path)
    server = TrainerServer(path, data, work := WarmWork(data))
    server.claim()  # refused at once when another trainer holds the socket
    try:
        report(f"data: {data.path}: {work.load()}")
        work.warm_up()
        server.listen()
        previous = {sig: signal.signal(sig, lambda signum, frame: server.stop())
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        report(f"listening on {server.sock_path} (token {server.token_path}, uid "
               f"{server.allowed_uid} only); stop with Ctrl-C or SIGTERM")
        try:
            server.serve_forever()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        server.close()
    return server.served
