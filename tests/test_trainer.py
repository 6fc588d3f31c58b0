"""The warm trainer's channel: who may connect, what it accepts, what it replies.

The quick tests serve a stand-in for the training (``EchoWork``: it returns the weights
it got plus one, and fixed metrics) so the channel's rules are checked without
TensorFlow; the slow test serves the real work on a merchant's file and checks the
ClientApp's reply through the trainer against the one it computes itself.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import driver, wait_for

from client import channel
from client.channel import ChannelError
from client.handoff import ask_trainer, trainer_socket
from client.trainer import MerchantFile, TrainerServer, running

TRAIN = ("num-examples", "train_loss")
WEIGHTS = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4, dtype=np.float32)]


class EchoWork:
    """The work stand-in: weights + 1 and fixed metrics, or a reply set by the test."""

    def __init__(self) -> None:
        self.requests: list[Mapping[str, Any]] = []
        self.reply: tuple[dict[str, Any], list[np.ndarray] | None] | None = None

    def __call__(self, request: Mapping[str, Any], weights: list[np.ndarray] | None
                 ) -> tuple[dict[str, Any], list[np.ndarray] | None]:
        self.requests.append(request)
        if self.reply is not None:
            return self.reply
        out = [w + 1 for w in weights or []] if request["kind"] == "train" else None
        return {"status": "ok", "metrics": {"num-examples": 3, "train_loss": 0.5},
                "laps": [["fit", 0.01]]}, out


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "events.csv"
    path.write_text("user_id,timestamp,event\n")
    return path


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    folder.mkdir(mode=0o700)
    return folder / "t.sock"


@pytest.fixture
def echo(sock: Path, data_file: Path) -> Iterator[tuple[TrainerServer, EchoWork]]:
    work = EchoWork()
    server = TrainerServer(sock, MerchantFile(str(data_file)), work)
    with running(server):
        yield server, work


def node(data_file: Path, sock: Path) -> dict[str, Any]:
    return {"data-path": str(data_file), channel.SOCKET_KEY: str(sock)}


def ask(data_file: Path, sock: Path, kind: str = "train",
        allowed: tuple[str, ...] = TRAIN) -> Any:
    return ask_trainer(sock, kind, node(data_file, sock), {"experiment.seed": 0},
                       {"server-round": 1}, WEIGHTS, allowed)


def raw_request(sock: Path, frames: list[bytes]) -> dict[str, Any]:
    """Send ``frames`` as they are; the trainer's reply header ({} when it hung up)."""
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(10)
        conn.connect(str(sock))
        for frame in frames:
            conn.sendall(frame)
        try:
            return channel.recv_header(conn, "reply")
        except ChannelError:
            return {}


def frame(payload: bytes) -> bytes:
    return struct.pack("!4sQ", b"FDC1", len(payload)) + payload


def request_header(sock: Path, data_file: Path, **extra: Any) -> dict[str, Any]:
    return {"protocol": channel.PROTOCOL, "kind": "train", "data-path": str(data_file),
            "format": "auto", "interventions-path": None, "run-config": {}, "config": {},
            "token": channel.read_token(channel.token_path(sock)), **extra}


# ---------------------------------------------------------------------------------------
# The happy path and the files
# ---------------------------------------------------------------------------------------


def test_a_request_comes_back_trained(echo, data_file: Path, sock: Path) -> None:
    server, work = echo
    got = ask(data_file, sock)
    assert got.error is None and got.metrics == {"num-examples": 3, "train_loss": 0.5}
    assert [w.tolist() for w in got.weights] == [(w + 1).tolist() for w in WEIGHTS]
    assert got.laps == [("fit", 0.01)]
    assert work.requests[0]["run-config"] == {"experiment.seed": 0}
    assert "token" not in work.requests[0] and server.served == 1
    assert ask(data_file, sock, "evaluate").weights is None


def test_socket_token_and_folder_are_private(echo, sock: Path) -> None:
    assert stat.S_IMODE(sock.stat().st_mode) & 0o077 == 0
    token = channel.token_path(sock)
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert len(channel.read_token(token)) == 64
    token.chmod(0o644)
    with pytest.raises(ChannelError, match="mode 0600"):
        channel.read_token(token)


def test_a_folder_others_can_enter_is_refused(tmp_path: Path) -> None:
    open_dir = tmp_path / "shared"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    with pytest.raises(ChannelError, match="chmod 700"):
        channel.private_dir(open_dir)
    # A shared sticky folder such as /tmp is never to be chmod-ed: a private one inside.
    open_dir.chmod(0o1777)
    with pytest.raises(ChannelError, match=r"mode 1777; .*a private folder inside it") as err:
        channel.private_dir(open_dir)
    assert "chmod" not in str(err.value)


def test_default_socket_follows_the_resolved_data_path(tmp_path: Path) -> None:
    env = {channel.RUNTIME_DIR_ENV: str(tmp_path)}
    (tmp_path / "d").mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "d")
    a = channel.default_socket(tmp_path / "d" / "events.csv", env)
    assert a == channel.default_socket(link / "events.csv", env)
    assert a != channel.default_socket(tmp_path / "d" / "other.csv", env)
    assert a.parent == tmp_path and len(str(a)) < 108  # AF_UNIX path limit
    assert channel.socket_for({"partition-id": 1}, env) is None  # simulation nodes
    assert channel.socket_for({"data-path": "x", channel.SOCKET_KEY: "/s/t.sock"}) == \
        Path("/s/t.sock")


def test_no_trainer_no_socket(data_file: Path, sock: Path) -> None:
    assert trainer_socket(node(data_file, sock)) is None
    assert trainer_socket({"partition-id": 0}) is None


# ---------------------------------------------------------------------------------------
# Refusals: each is answered, and the trainer goes on serving
# ---------------------------------------------------------------------------------------


def test_a_wrong_token_is_refused(echo, data_file: Path, sock: Path) -> None:
    server, work = echo
    header = request_header(sock, data_file, token="0" * 64)
    reply = raw_request(sock, [frame(json.dumps(header).encode()), frame(b"")])
    assert reply == {"status": "refused", "reason": f"wrong token (read it from "
                                                    f"{channel.token_path(sock)})"}
    assert work.requests == []
    channel.token_path(sock).write_text("f" * 64)  # a token someone else wrote
    with pytest.raises(ChannelError, match="refused the request: wrong token"):
        ask(data_file, sock)
    channel.write_token(channel.token_path(sock))  # a fresh one is not the trainer's either
    with pytest.raises(ChannelError, match="wrong token"):
        ask(data_file, sock)
    assert work.requests == [] and server.served == 0


def test_another_uid_is_refused(sock: Path, data_file: Path) -> None:
    work = EchoWork()
    server = TrainerServer(sock, MerchantFile(str(data_file)), work,
                           allowed_uid=os.getuid() + 1)
    with running(server):
        with pytest.raises(ChannelError, match=f"uid {os.getuid()} may not use this trainer"):
            ask(data_file, sock)
    assert work.requests == []


def test_peer_uid_reads_the_kernels_credentials() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        assert channel.peer_uid(a) == channel.peer_uid(b) == os.getuid()


def test_oversized_and_malformed_frames_are_refused(echo, data_file: Path, sock: Path) -> None:
    server, work = echo
    huge = struct.pack("!4sQ", b"FDC1", 2**40)  # claims a terabyte, sends nothing more
    assert raw_request(sock, [huge])["reason"] == (
        f"request: frame of {2**40:,} bytes exceeds the limit of "
        f"{channel.MAX_HEADER_BYTES:,} bytes")
    assert "not a fedecay trainer frame" in raw_request(sock, [b"GET / HTTP/1.1\r\n\r\n"])[
        "reason"]
    assert "header is not JSON" in raw_request(sock, [frame(b"\x80\x04pickle")])["reason"]
    header = json.dumps(request_header(sock, data_file)).encode()
    big_weights = struct.pack("!4sQ", b"FDC1", channel.MAX_WEIGHTS_BYTES + 1)
    assert "exceeds the limit" in raw_request(sock, [frame(header), big_weights])["reason"]
    pickled = np.lib.format.__name__  # any non-npz payload
    assert "not a valid .npz" in raw_request(sock, [frame(header), frame(pickled.encode())])[
        "reason"]
    obj = channel.arrays_to_npz([np.array([{"a": 1}], dtype=object)])
    assert "not a valid .npz" in raw_request(sock, [frame(header), frame(obj)])["reason"]
    other = json.dumps(request_header(sock, data_file, **{"data-path": "/elsewhere.csv"}))
    assert "this trainer serves" in raw_request(sock, [frame(other.encode())])["reason"]
    assert work.requests == []
    assert ask(data_file, sock).error is None  # still serving


def test_a_client_that_dies_mid_request_does_not_stop_the_trainer(
        echo, data_file: Path, sock: Path) -> None:
    server, _ = echo
    header = json.dumps(request_header(sock, data_file)).encode()
    weights = frame(channel.arrays_to_npz(WEIGHTS))
    for cut in (3, len(header) // 2, len(header) + 12 + len(weights) // 2):
        with socket.socket(socket.AF_UNIX) as conn:  # sends part of a request and is gone
            conn.connect(str(sock))
            conn.sendall((frame(header) + weights)[:cut])
    with socket.socket(socket.AF_UNIX) as conn:  # sends all, leaves before the reply
        conn.connect(str(sock))
        conn.sendall(frame(header) + weights)
    assert ask(data_file, sock).error is None
    # Every connection is accounted for: the three partial ones refused, never served.
    wait_for(lambda: server.served + server.refused == 5, 10, "the five connections",
             Path(os.devnull))
    assert (server.served, server.refused) == (2, 3)
    assert len(echo[1].requests) == 2


def test_a_slow_drip_peer_loses_its_slot(echo, data_file: Path, sock: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The read limit is per frame: a byte every 0.1 s does not keep the connection."""
    server, work = echo
    monkeypatch.setattr("client.trainer.READ_TIMEOUT", 0.6)
    header = frame(json.dumps(request_header(sock, data_file)).encode())
    started = time.monotonic()
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(str(sock))
        conn.settimeout(0.1)
        reply = b""
        for byte in header[:80]:  # 8 s of drip, unless the trainer hangs up
            try:
                conn.sendall(bytes([byte]))
                reply += conn.recv(4096)
                break
            except TimeoutError:
                continue
            except OSError:
                break
        conn.settimeout(5)
        with contextlib.suppress(OSError):
            while chunk := conn.recv(4096):
                reply += chunk
    assert time.monotonic() - started < 3
    assert b"not received within 0.6 s" in reply
    assert server.refused == 1 and work.requests == []


# ---------------------------------------------------------------------------------------
# The reply's whitelist, checked by the ClientApp's side
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("reply", "message"), [
    (({"status": "ok", "metrics": {"num-examples": 3, "user_id": 7}}, WEIGHTS),
     "metrics outside the whitelist: \\['user_id'\\]"),
    (({"status": "ok", "metrics": {"num-examples": "u123"}}, WEIGHTS), "is not a number"),
    (({"status": "ok", "metrics": {"num-examples": True}}, WEIGHTS), "is not a number"),
    (({"status": "ok", "metrics": {}}, [WEIGHTS[0]]), "tensors unlike the 2 sent"),
    (({"status": "ok", "metrics": {}}, [WEIGHTS[0], np.ones(5, np.float32)]), "unlike"),
    (({"status": "ok", "metrics": {}}, [w.astype(np.float64) for w in WEIGHTS]), "unlike"),
    (({"status": "ok", "metrics": {}}, [*WEIGHTS, np.arange(3)]), "unlike"),
    (({"status": "error", "error": "rows u1,u2 are bad"}, None), "unexpected error"),
    (({"status": "done"}, None), "unknown status"),
    (({"status": "ok", "metrics": {"train_loss": float("nan")}}, WEIGHTS), "not finite"),
    (({"status": "ok", "metrics": {"train_loss": float("-inf")}}, WEIGHTS), "not finite"),
    (({"status": "ok", "metrics": {"num-examples": 10**30}}, WEIGHTS), "not finite"),
    (({"status": "ok", "metrics": {}, "laps": [1]}, WEIGHTS), "laps"),
    (({"status": "ok", "metrics": {}, "laps": 5}, WEIGHTS), "laps"),
    (({"status": "ok", "metrics": {}, "laps": "ab"}, WEIGHTS), "laps"),
    (({"status": "ok", "metrics": {}, "laps": [["fit", "1"]]}, WEIGHTS), "laps"),
    (({"status": "ok", "metrics": {}, "laps": [[3, 1.0]]}, WEIGHTS), "laps"),
    (({"status": "ok", "metrics": {}, "laps": [["fit", 1.0, 2]]}, WEIGHTS), "laps"),
    (({"status": "ok", "metrics": {}, "laps": [["fit", float("nan")]]}, WEIGHTS), "laps"),
    (({"status": "ok", "metrics": {}, "laps": [["fit", True]]}, WEIGHTS), "laps"),
    (({"status": "ok", "metrics": {}}, [WEIGHTS[0], np.ones(100_000, np.float32)]),
     "exceeds the limit of"),
])
def test_replies_outside_the_whitelist_are_refused(echo, data_file: Path, sock: Path,
                                                   reply: Any, message: str) -> None:
    echo[1].reply = reply
    with pytest.raises(ChannelError, match=message):
        ask(data_file, sock)


def test_a_malformed_reply_falls_back_to_the_clientapps_own_work(
        echo, data_file: Path, sock: Path) -> None:
    from flwr.app import Context, RecordDict

    from client.app import warm_reply
    from client.timer import HandlerTimer

    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                      node_config=node(data_file, sock))
    msg = _message("evaluate", WEIGHTS, {"server-round": 1})
    for laps in ([1], 5, "ab"):
        echo[1].reply = ({"status": "ok", "metrics": {"num-examples": 1}, "laps": laps}, None)
        assert warm_reply(msg, context, "evaluate", {}, HandlerTimer()) is None, laps
    echo[1].reply = ({"status": "ok", "metrics": {"num-examples": 1},
                      "laps": [["evaluate", 0.25]]}, None)
    handed = warm_reply(msg, context, "evaluate", {}, HandlerTimer())
    assert handed is not None and dict(handed.content.metric_records["metrics"]) == {
        "num-examples": 1}


def test_weights_must_be_stored_and_within_the_limit(echo, data_file: Path,
                                                     sock: Path) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, np.zeros(1 << 20, np.float32))  # 4 MiB in about 4 KB
    packed = buf.getvalue()
    assert len(packed) < 10_000
    with pytest.raises(ChannelError, match="arr_0.npy is compressed"):
        channel.npz_to_arrays(packed, "weights")
    header = json.dumps(request_header(sock, data_file)).encode()
    reply = raw_request(sock, [frame(header), frame(packed)])
    assert "request weights: arr_0.npy is compressed" in reply["reason"]
    stored = channel.arrays_to_npz(WEIGHTS)
    # Each .npy member: a 128-byte header, then 6 or 4 float32 values (24 and 16 bytes).
    with pytest.raises(ChannelError, match="hold 296 bytes unpacked, more than the limit "
                                           "of 295 bytes"):
        channel.npz_to_arrays(stored, "weights", limit=295)
    got = channel.npz_to_arrays(stored, "weights", limit=296)
    assert [a.tolist() for a in got] == [w.tolist() for w in WEIGHTS]
    assert echo[1].requests == []


def test_an_evaluate_reply_carries_no_tensors(echo, data_file: Path, sock: Path) -> None:
    echo[1].reply = ({"status": "ok", "metrics": {"num-examples": 1}}, WEIGHTS)
    with pytest.raises(ChannelError, match="carries no tensors"):
        ask(data_file, sock, "evaluate")


# ---------------------------------------------------------------------------------------
# One trainer per socket; a restart after a kill
# ---------------------------------------------------------------------------------------


def test_a_second_trainer_on_the_same_socket_is_refused(echo, data_file: Path,
                                                        sock: Path) -> None:
    second = TrainerServer(sock, MerchantFile(str(data_file)), EchoWork())
    with pytest.raises(ChannelError, match=f"another trainer \\(pid {os.getpid()}\\) "
                                           "already serves"):
        second.start()
    assert ask(data_file, sock).error is None  # the first one is untouched


@pytest.fixture
def stub_trainer(tmp_path: Path, data_file: Path, sock: Path
                 ) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """The stub trainer (``drivers/stub_trainer.py``) serving ``sock`` in its own process,
    and its log; killed on the way out if the test left it running."""
    log = tmp_path / "stub.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, str(driver("stub_trainer")), str(sock),
                                 str(data_file)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: sock.is_socket() and channel.token_path(sock).exists(), 60,
                 "the stub trainer", log)
        yield proc, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_restart_after_a_kill_replaces_the_stale_socket(stub_trainer, data_file: Path,
                                                        sock: Path) -> None:
    proc, _ = stub_trainer
    assert ask(data_file, sock).error is None
    old_token = channel.read_token(channel.token_path(sock))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert sock.is_socket()  # left behind: nobody listens
    with pytest.raises(ChannelError, match="stale socket"):
        ask(data_file, sock)
    with running(TrainerServer(sock, MerchantFile(str(data_file)), EchoWork())):
        assert channel.read_token(channel.token_path(sock)) != old_token
        assert ask(data_file, sock).error is None
    assert not sock.exists() and not channel.token_path(sock).exists()


def test_sigterm_stops_the_trainer_and_removes_its_files(stub_trainer, sock: Path) -> None:
    proc, log = stub_trainer
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0, log.read_text()
    assert not sock.exists() and not channel.token_path(sock).exists()
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline and "stopped" not in log.read_text():
        time.sleep(0.05)
    assert "stopped" in log.read_text()


def test_a_socket_path_too_long_for_unix_is_refused_before_the_file_is_read(
        data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from simulations.cli import main

    folder = tmp_path / "s"
    folder.mkdir(mode=0o700)
    long = folder / ("a" * 120 + ".sock")
    assert main(["merchant", "serve", "--data-path", str(data_file), "--socket",
                 str(long)]) == 2
    err = capsys.readouterr().err
    assert f"--socket {long}: " in err and "longer than the 107 a unix socket's path" in err
    assert list(folder.iterdir()) == []


def test_a_socket_another_program_listens_on_is_never_taken_over(data_file: Path,
                                                                 sock: Path) -> None:
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(sock))
    other.listen()
    try:
        server = TrainerServer(sock, MerchantFile(str(data_file)), EchoWork())
        with pytest.raises(ChannelError, match=f"{sock} is in use: another process listens"):
            server.start()
        server.close()
        assert sock.is_socket() and not channel.token_path(sock).exists()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(sock))  # still the other program's
        client.close()
    finally:
        other.close()


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_a_file_that_is_not_a_socket_is_never_replaced(
        tmp_path: Path, data_file: Path, sock: Path, kind: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    if kind == "file":
        sock.write_text("keep me")
    else:
        sock.symlink_to(precious)
    server = TrainerServer(sock, MerchantFile(str(data_file)), EchoWork())
    with pytest.raises(ChannelError, match=f"{sock} exists and is not a socket"):
        server.start()
    server.close()
    assert sock.is_symlink() == (kind == "symlink") and sock.read_text() == "keep me"
    assert precious.read_text() == "keep me" and not channel.token_path(sock).exists()

    from simulations.cli import main

    assert main(["merchant", "serve", "--data-path", str(data_file), "--socket",
                 str(sock)]) == 2
    assert f"{sock} exists and is not a socket" in capsys.readouterr().err
    assert sock.read_text() == "keep me"


# ---------------------------------------------------------------------------------------
# The real work: the ClientApp's reply through the trainer is the one it computes itself
# ---------------------------------------------------------------------------------------


def _message(kind: str, weights: list[np.ndarray], config: dict[str, Any]) -> Any:
    from flwr.app import ArrayRecord, ConfigRecord, Metadata, RecordDict
    from flwr.app.message.message import make_message

    meta = Metadata(run_id=1, message_id=f"m-{kind}", src_node_id=1, dst_node_id=7,
                    reply_to_message_id="", group_id="1", created_at=time.time(), ttl=600,
                    message_type=kind)
    return make_message(meta, RecordDict({"arrays": ArrayRecord(weights),
                                          "config": ConfigRecord(config)}))


def _records(reply: Any) -> dict[str, Any]:
    """What a reply carries, as the egress test of the simulation records it."""
    content = reply.content
    return {
        "arrays": {name: [(tuple(a.shape), str(a.dtype)) for a in rec.to_numpy_ndarrays()]
                   for name, rec in content.array_records.items()},
        "metrics": {name: {k: type(v).__name__ for k, v in rec.items()}
                    for name, rec in content.metric_records.items()},
        "configs": list(content.config_records),
    }


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_replies_through_the_trainer_match_the_clientapps_own(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from flwr.app import Context, RecordDict

    from client.app import (
        EVALUATE_METRICS,
        TRAIN_METRICS,
        handle_evaluate,
        handle_train,
        merchant_data,
        resolved_config,
        warm_reply,
    )
    from client.shards import ShardCache
    from client.timer import HandlerTimer
    from client.trainer import WarmWork
    from common.config import SnapshotConfig
    from common.io import write_events
    from common.model import build_model, weights_of
    from common.protocol import PRE_EVALUATE_KEY, SCORE_VALIDATION_KEY
    from simulations.apps import deployment_config
    from simulations.experiment import shared_calendar
    from simulations.synth import generate_federation, load_preset, synth_config_from_preset

    fed = generate_federation(synth_config_from_preset(load_preset("quick")), seed=0)
    part = fed.events[fed.events["merchant_id"].astype(str) == "m04"]
    path = write_events(part, tmp_path / "m04.csv")
    calendar = shared_calendar(fed.events, SnapshotConfig())
    run_config = {"experiment.preset": "quick", "federation.mode": "deployment",
                  "snapshots.start": str(calendar.start), "snapshots.end": str(calendar.end)}
    folder = tmp_path / "run"
    folder.mkdir(mode=0o700)
    sock = folder / "m04.sock"
    node_config = {"data-path": str(path), "format": "canonical",
                   channel.SOCKET_KEY: str(sock)}
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config=run_config,
                      node_config=node_config)
    flat = resolved_config(context, None, deployment_config)

    def data(ctx: Any) -> Any:
        return merchant_data(ctx, None, deployment_config, ShardCache(2**30))

    settings = data(context)[0]
    start = weights_of(build_model(settings.model, settings.snapshots, seed=3))
    # The server's last round asks the evaluate reply for the validation loss too.
    config = {"server-round": 2, "local-epochs": 1, PRE_EVALUATE_KEY: True,
              SCORE_VALIDATION_KEY: True}
    ids = set(part["user_id"].astype(str)) | set(part["item_id"].astype(str))

    work = WarmWork(MerchantFile(str(path), "canonical"))
    work.load()
    server = TrainerServer(sock, work.data, work)
    caplog.set_level("INFO", logger="client.trainer")
    with running(server):
        for kind, handle, allowed in (("train", handle_train, TRAIN_METRICS),
                                      ("evaluate", handle_evaluate, EVALUATE_METRICS)):
            msg = _message(kind, start, config)
            own = handle(msg, context, data)  # no warm trainer: the work in this process
            handed = warm_reply(msg, context, kind, flat, HandlerTimer())
            assert handed is not None and not handed.has_error(), kind
            assert _records(handed) == _records(own), kind
            got, want = handed.content.metric_records["metrics"], \
                own.content.metric_records["metrics"]
            assert set(got) <= set(allowed) and set(got) == set(want)
            if kind == "train":
                assert {"pre_val_loss", "pre_eval_loss"} <= set(got)  # one message a round
            else:
                assert {"pre_val_loss", "val_examples"} <= set(got)
                assert got["val_examples"] == want["val_examples"] > 0
            for name in want:
                if name != "fit_seconds":
                    assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-5), name
            if kind == "train":
                for a, b in zip(handed.content.array_records["arrays"].to_numpy_ndarrays(),
                                own.content.array_records["arrays"].to_numpy_ndarrays(),
                                strict=True):
                    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
            text = json.dumps({k: str(v) for k, v in got.items()})
            assert not [i for i in ids if len(i) > 3 and i in text]
        assert server.served == 2
    # The trainer's lines give each request's own time, not the trainer's age.
    lines = [r.getMessage() for r in caplog.records if r.name == "client.trainer"
             and " round 2: " in r.getMessage()]
    assert len(lines) == 2 and all(" s in the trainer; data " in line for line in lines)
    assert not [line for line in lines if "process start" in line]


def test_serve_refuses_a_bad_file_before_listening(tmp_path: Path, sock: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from simulations.cli import main

    bad = tmp_path / "events.csv"
    bad.write_text("user_id,timestamp,event\nu1,2025-01-01T10:00:00Z,page_view\n")
    assert main(["merchant", "serve", "--data-path", str(bad), "--format", "canonical",
                 "--socket", str(sock)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {bad}: column 'event' has unknown or missing event "
                              "name(s)"), err
    assert not sock.exists() and not channel.token_path(sock).exists()
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    data = tmp_path / "ok.csv"
    data.write_text("user_id,timestamp,event\n")
    assert main(["merchant", "serve", "--data-path", str(data),
                 "--socket", str(open_dir / "t.sock")]) == 2
    assert "chmod 700" in capsys.readouterr().err
