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
from common.snapshots import Snapshots

log = logging.getLogger(__name__)

#: Seconds a connection may take to send each frame of its request.
READ_TIMEOUT = 60.0
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
                out, metrics = None, evaluate_reply(settings, test, weights or [], timer)
                what = f"evaluate round {config.get('server-round', '?')}"
        log.info("%s", timer.summary(what))
        return {"status": "ok", "metrics": metrics, "laps": timer.laps()}, out


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
        self._listener: socket.socket | None = None
        self._lock_fd: int | None = None
        self._token = ""
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

    def listen(self) -> None:
        """Write a fresh token and listen; a stale socket file (left by a trainer that
        was killed) is replaced."""
        assert self._lock_fd is not None, "claim() first"
        if self.sock_path.exists() or self.sock_path.is_symlink():
            log.info("replacing the stale socket %s", self.sock_path)
            self.sock_path.unlink()
        self._token = channel.write_token(self.token_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket file is created with mode 0600
        try:
            listener.bind(str(self.sock_path))
        finally:
            os.umask(old)
        listener.listen(16)
        listener.settimeout(0.5)  # so that stop() is noticed
        self._listener = listener

    def stop(self) -> None:
        """Ask :meth:`serve_forever` to return."""
        self._stop.set()

    def close(self) -> None:
        """Remove the socket and the token, release the lock."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
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
                    self._refuse(conn, f"busy: {MAX_CONNECTIONS} requests under way")
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
        conn.settimeout(READ_TIMEOUT)
        uid = channel.peer_uid(conn)
        if uid != self.allowed_uid:
            log.warning("refused a connection from uid %d (only uid %d may connect)",
                        uid, self.allowed_uid)
            self._refuse(conn, f"uid {uid} may not use this trainer")
            return
        try:
            request = channel.recv_header(conn, "request")
        except ChannelError as err:
            log.warning("refused a request: %s", err)
            self._refuse(conn, str(err))
            return
        if not channel.same_token(request.get("token"), self._token):
            log.warning("refused a request with a wrong token")
            self._refuse(conn, f"wrong token (read it from {self.token_path})")
            return
        problem = self._check(request)
        if problem:
            log.warning("refused a request: %s", problem)
            self._refuse(conn, problem)
            return
        try:
            weights = channel.recv_arrays(conn, "request weights")
        except ChannelError as err:
            log.warning("refused a request: %s", err)
            self._refuse(conn, str(err))
            return
        conn.settimeout(None)
        request.pop("token")  # the work never sees it
        header, arrays = self.work(request, weights)
        with self._count:
            self.served += 1
        channel.send_message(conn, header, arrays)

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

    @staticmethod
    def _refuse(conn: socket.socket, reason: str) -> None:
        with contextlib.suppress(OSError):
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
