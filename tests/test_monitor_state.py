"""The monitor off the happy path: hostile state files, crashes, odd lines, long lines.

- the state file is plain arrays in an .npz: a pickle, an archive holding objects, a
  truncated or altered file, a folder or a version-1 state are refused with a
  ``ValueError`` naming the file, and nothing in them runs;
- a save / load round trip (pending users included) continues alert for alert;
- ``fedecay monitor --out`` SIGKILLed at several moments and restarted writes the alert
  file byte for byte as an uninterrupted run (slow: real subprocesses);
- ``parse_event`` raises nothing but ``Malformed``; lines longer than the cap are
  skipped and counted without being held whole.
"""

from __future__ import annotations

import io
import json
import os
import pickletools
import random
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.monitor import (
    LEGACY_STATE_FILE,
    STATE_FILE,
    AlertFile,
    Malformed,
    Monitor,
    MonitorConfig,
    alert_id,
    check_meta,
    has_state,
    parse_event,
    prepare_state_dir,
    run_stream,
)
from client.monitor.state import digest
from client.monitor.stream import LineReader
from common.config import PolicyConfig, SnapshotConfig
from common.features import STATIC_FEATURES
from common.snapshots import Snapshots
from simulations.cli import main

SNAP = SnapshotConfig(max_len=8, hash_buckets=16, observation_days=21, tau_days=5)
POLICY = PolicyConfig(risk_threshold=0.5)
ROOT = Path(__file__).resolve().parents[1]


def _recency_risk(snaps: Snapshots) -> dict[str, np.ndarray]:
    """Risk 1 - exp(-recency / 2 days): a model-free predict_fn that alerts often."""
    days = np.expm1(snaps.static[:, STATIC_FEATURES.index("log_recency_days")])
    n = len(snaps)
    return {"decay": 1 - np.exp(-days / 2), "interest": np.full(n, np.log1p(2.0)),
            "activation": np.tile([0.1, 0.3, 0.2, 0.1], (n, 1))}


def _lines(n: int, seed: int = 0) -> list[str]:
    """``n`` events of 40 users over 60 days, in time order but for a few late ones."""
    rng = random.Random(seed)
    start = pd.Timestamp("2025-01-01", tz="UTC")
    out = []
    for i in range(n):
        t = start + pd.Timedelta(seconds=i * 60 * 60 * 24 * 60 // n - rng.randrange(3) * 600)
        out.append(json.dumps({
            "user_id": f"u{rng.randrange(40)}", "merchant_id": f"m{rng.randrange(2)}",
            "timestamp": t.isoformat(), "event": rng.choice(["view", "cart", "purchase"]),
            "category_id": f"c{rng.randrange(5)}", "item_id": f"i{rng.randrange(30)}",
            "value": rng.choice([0, 1.5, 20])}))
    return out


def _monitor(alerts: list, **config) -> Monitor:
    return Monitor(None, SNAP, POLICY, MonitorConfig(**{"batch": 50, **config}),
                   sink=alerts.append, predict_fn=_recency_risk)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A state folder holding a real state (some users still pending)."""
    monitor = _monitor([])
    monitor.feed_lines(_lines(600)[:230])
    assert monitor.pending > 0
    monitor.save(tmp_path / "state", {"path": "/x", "inode": 1, "offset": 7})
    return tmp_path / "state"


# ------------------------------------------------------------------ hostile state files


def _pickle_payload(marker: Path) -> bytes:
    """A protocol-0 pickle that, if unpickled, calls ``open(marker, "w")``.

    Built by hand so the tests need no pickle either; ``pickletools.dis`` checks (without
    running anything) that it is a well-formed pickle.
    """
    payload = f"cbuiltins\nopen\n(V{marker}\nVw\ntR.".encode()
    pickletools.dis(payload, out=io.StringIO())
    return payload


@pytest.mark.parametrize("name", [STATE_FILE, LEGACY_STATE_FILE])
def test_a_planted_pickle_is_refused_and_never_run(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "state"
    folder.mkdir()
    (folder / name).write_bytes(_pickle_payload(marker))
    with pytest.raises(ValueError, match=str(folder / name)):
        has_state(folder)
        _monitor([]).load_state(folder)
    assert not marker.exists()


def _rewrite(path: Path, **replace: np.ndarray) -> None:
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays.update(replace)
    np.savez(path, **arrays)


def test_damaged_or_crafted_state_files_are_refused(state: Path) -> None:
    path = state / STATE_FILE
    good = path.read_bytes()
    cases = {
        "truncated": lambda: path.write_bytes(good[: len(good) // 2]),
        "empty": lambda: path.write_bytes(b""),
        "garbage": lambda: path.write_bytes(b"PK\x03\x04" + os.urandom(300)),
        "object array": lambda: _rewrite(path, lengths=np.array([{"a": 1}], dtype=object)),
        "wrong dtype": lambda: _rewrite(path, lengths=np.zeros(3, dtype=np.float32)),
        "altered": lambda: _rewrite(path, interest=np.load(path)["interest"] + 1.0),
        "extra member": lambda: _rewrite(path, extra=np.zeros(2)),
        "compressed": lambda: np.savez_compressed(path, **dict(np.load(path))),
    }
    for case, damage in cases.items():
        path.write_bytes(good)
        damage()
        monitor = _monitor([])
        with pytest.raises(ValueError, match=str(path)) as err:
            monitor.load_state(state)
        assert len(monitor) == 0, case  # left as it was
        assert "\n" not in str(err.value), case
    path.unlink()
    path.mkdir()  # a folder where the file should be
    with pytest.raises(ValueError, match="a folder"):
        _monitor([]).load_state(state)


def test_old_state_is_named_and_refused(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    folder.mkdir()
    assert not has_state(folder)
    (folder / LEGACY_STATE_FILE).write_bytes(b"\x80\x05}\x94.")  # a pickled {}
    with pytest.raises(ValueError, match="older fedecay .*new --state folder"):
        has_state(folder)
    with pytest.raises(ValueError, match="older fedecay"):
        _monitor([]).load_state(folder)


def _rewrite_meta(path: Path, *, resign: bool, **edits: Any) -> None:
    """Edit meta fields (``position__offset=-50`` sets meta["position"]["offset"]; the
    value ``...`` deletes the field); ``resign`` recomputes the SHA-256 as the code does,
    as someone who knows the format could."""
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(arrays.pop("meta").tobytes())
    for dotted, value in edits.items():
        *parents, last = dotted.split("__")
        target = meta
        for key in parents:
            target = target.setdefault(key, {})
        if value is ...:
            del target[last]
        else:
            target[last] = value
    if resign:
        meta["sha256"] = digest(arrays, meta)
    np.savez(path, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)


def _refused(state: Path, match: str, **config: Any) -> str:
    monitor = _monitor([], **config)
    with pytest.raises(ValueError, match=match) as err:
        monitor.load_state(state)
    message = str(err.value)
    assert message.startswith(str(state / STATE_FILE)) and "\n" not in message
    assert len(monitor) == 0 and monitor.clock_ns is None  # left as it was
    return message


def test_meta_edits_fail_the_checksum(state: Path) -> None:
    path = state / STATE_FILE
    good = path.read_bytes()
    for edit in [{"position__offset": -50}, {"position__offset": 8},  # plausible, still caught
                 {"position__output": {"path": "/o", "size": -1}}, {"clock_ns": 2**63 - 1},
                 {"stats__alerts": 0}, {"pending": 0}, {"snapshots__extra": 1}]:
        path.write_bytes(good)
        _rewrite_meta(path, resign=False, **edit)
        _refused(state, "do not match their SHA-256")
    path.write_bytes(good)
    _rewrite_meta(path, resign=True)  # re-signing an unchanged meta: still loads
    assert _monitor([]).load_state(state) == {"path": "/x", "inode": 1, "offset": 7}


@pytest.mark.parametrize(("edit", "message"), [
    ({"position__offset": -50}, "meta field position.offset is -50, expected an integer >= 0"),
    ({"position__offset": 7.0}, "meta field position.offset is 7.0, expected an integer >= 0"),
    ({"position__inode": "1"}, "meta field position.inode is '1', expected an integer >= 0"),
    ({"position__path": 3}, "meta field position.path is 3, expected a string"),
    ({"position__output": {"path": "/o", "size": -1}},
     "meta field position.output.size is -1, expected an integer >= 0"),
    ({"position__output": {"path": "/o"}}, "meta field position.output.size is missing"),
    ({"position__output": [1]}, "meta field position.output is \\[1\\], expected a JSON object"),
    ({"position__evil": 1}, "meta field position.evil is 1, expected no such field"),
    ({"position": "x"}, "meta field position is 'x', expected a JSON object"),
    ({"clock_ns": 2**63 - 1}, "meta field clock_ns is 9223372036854775807, expected null or "
     "an integer time \\(unix ns\\) from 1971-01-01 to "),
    ({"clock_ns": 0}, "meta field clock_ns is 0, expected null or an integer time"),
    ({"clock_ns": -(2**70)}, "meta field clock_ns is -1180591620717411303424, expected"),
    ({"clock_ns": "2025-01-01"}, "meta field clock_ns is '2025-01-01', expected null or"),
    ({"clock_ns": None}, "meta field last_sweep_ns is .*, expected null with clock_ns"),
    ({"last_sweep_ns": True}, "meta field last_sweep_ns is True, expected null or an integer"),
    ({"last_sweep_ns": 2**62}, "meta field last_sweep_ns is 4611686018427387904, expected"),
    ({"pending": -1}, "meta field pending is -1, expected an integer >= 0"),
    ({"since_checkpoint": ...}, "meta field meta.since_checkpoint is missing"),
    ({"stats__events": -1}, "meta field stats.events is -1, expected an integer >= 0"),
    ({"stats__alerts": 1.5}, "meta field stats.alerts is 1.5, expected an integer >= 0"),
    ({"stats__sweeps": ...}, "meta field stats.sweeps is missing"),
    ({"stats__bogus": 1}, "meta field stats.bogus is 1, expected no such field"),
    ({"stats__reasons": {"x\x1b[2J": -2}},
     "meta field stats.reasons.x\\\\x1b\\[2J is -2, expected an integer >= 0"),
    ({"stats__reasons": []}, "meta field stats.reasons is \\[\\], expected a JSON object"),
    ({"snapshots": 5}, "meta field snapshots is 5, expected a JSON object"),
])
def test_implausible_meta_fields_are_named(state: Path, edit: dict, message: str) -> None:
    path = state / STATE_FILE
    _rewrite_meta(path, resign=True, **edit)  # passes the checksum: the check names the field
    _refused(state, message)
    # The same check, called directly on the meta dict.
    with np.load(path, allow_pickle=False) as npz:
        meta = json.loads(npz["meta"].tobytes())
    with pytest.raises(ValueError, match=f"^here: {message}"):
        check_meta(meta, "here")


def test_meta_check_accepts_what_save_writes(tmp_path: Path) -> None:
    position = {"path": "/in", "inode": 5, "offset": 0, "output": {"path": "/o", "size": 0}}
    for lines in ([], _lines(50)):
        monitor = _monitor([])
        monitor.feed_lines(lines)
        monitor.save(tmp_path / "s", position)
        with np.load(tmp_path / "s" / STATE_FILE, allow_pickle=False) as npz:
            check_meta(json.loads(npz["meta"].tobytes()), "s")
        assert _monitor([]).load_state(tmp_path / "s") == position
    # A clock past now + 1 day is refused, unless the monitor accepts such events.
    _rewrite_meta(tmp_path / "s" / STATE_FILE, resign=True, clock_ns=4_102_444_800 * 10**9,
                  last_sweep_ns=4_102_444_800 * 10**9)  # 2100-01-01
    _refused(tmp_path / "s", "meta field clock_ns is 4102444800000000000, expected")
    _refused(tmp_path / "s", "meta field clock_ns", max_future_hours=24)
    assert _monitor([], max_future_hours=0).load_state(tmp_path / "s") == position
    assert _monitor([], max_future_hours=10**6).load_state(tmp_path / "s") == position


def test_version_2_state_is_named_and_refused(state: Path) -> None:
    _rewrite_meta(state / STATE_FILE, resign=False, version=2)
    message = _refused(state, "older fedecay .*state version 2.*new --state folder")
    assert "reads versions 3 and 4" in message
    _rewrite_meta(state / STATE_FILE, resign=False, version="3\x1b[31m")
    message = _refused(state, "state version '3\\\\x1b\\[31m', this fedecay reads 3 and 4")
    assert "\x1b" not in message


def test_a_version_3_state_without_the_model_id_is_read_and_version_4_needs_it(
        state: Path) -> None:
    # Version 4 added the model's id; a state of the fedecay before it resumes as it was.
    position = _monitor([]).load_state(state)
    _rewrite_meta(state / STATE_FILE, resign=True, version=3)  # as the fedecay before wrote
    assert _monitor([]).load_state(state) == position
    _rewrite_meta(state / STATE_FILE, resign=True, model=...)  # as earlier ones wrote
    assert _monitor([]).load_state(state) == position
    _rewrite_meta(state / STATE_FILE, resign=True, version=4)
    _refused(state, "meta field meta.model is missing")


def test_state_folder_that_is_a_file_is_refused_up_front(tmp_path: Path, capsys) -> None:
    plain = tmp_path / "state.txt"
    plain.write_text("not a folder")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        prepare_state_dir(plain)
    with pytest.raises(ValueError, match="cannot create or write"):
        prepare_state_dir(plain / "below")
    # The CLI says so in one line, before loading any model.
    assert main(["monitor", "--model", str(tmp_path / "none.keras"), "--state", str(plain)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: state folder") and "\n" not in err


# ------------------------------------------------------------------------- round trip


def test_round_trip_gives_identical_future_alerts(state: Path, tmp_path: Path) -> None:
    lines = _lines(600)
    first: list = []
    straight = _monitor(first)
    straight.feed_lines(lines[:230])  # as the fixture's monitor, which saved its state
    before = len(first)
    restored: list = []
    again = _monitor(restored)
    position = again.load_state(state)
    assert position == {"path": "/x", "inode": 1, "offset": 7}
    assert again.pending == straight.pending > 0 and list(again._dirty) == list(straight._dirty)
    for monitor in (straight, again):
        monitor.feed_lines(lines[230:])
        monitor.flush()
    assert restored == first[before:] and len(restored) > 5
    assert again.stats == straight.stats
    pd.testing.assert_frame_equal(again.scores(), straight.scores())
    # Saving the restored monitor writes the same arrays.
    again.save(tmp_path / "a")
    straight.save(tmp_path / "b")
    with np.load(tmp_path / "a" / STATE_FILE) as a, np.load(tmp_path / "b" / STATE_FILE) as b:
        assert a.files == b.files
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_a_state_of_another_model_resumes_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A merchant swaps in the next round's model: the event history carries over, said so.
    from common.config import ModelConfig
    from common.model import build_model

    first, second = (build_model(ModelConfig(lstm_units=8, dense_units=8), SNAP, seed=seed)
                     for seed in (0, 1))

    def monitor(model: object) -> Monitor:
        return Monitor(model, SNAP, POLICY, MonitorConfig(batch=50), predict_fn=_recency_risk)

    writer = monitor(first)
    writer.feed_lines(_lines(120))
    writer.save(tmp_path / "state")
    monitor(first).load_state(tmp_path / "state")
    assert "another model" not in caplog.text
    monitor(second).load_state(tmp_path / "state")
    assert "was written with another model (weights " in caplog.text


def test_alert_ids_are_stable_and_replays_repeat_them(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(_lines(800)) + "\n")
    runs = []
    for _ in range(2):
        alerts: list = []
        run_stream(_monitor(alerts, max_delay_seconds=1e-9), path)  # wall clock unused
        runs.append(alerts)
    assert runs[0] == runs[1] and len(runs[0]) > 5
    ids = [a["alert_id"] for a in runs[0]]
    assert len(set(ids)) == len(ids)
    a = runs[0][0]
    assert a["alert_id"] == alert_id(a["merchant_id"], a["user_id"], a["at"])
    assert len(a["alert_id"]) == 16 and alert_id("m", "u", "t") != alert_id("m", "u", "t2")


def test_alert_file_truncates_to_the_checkpoint_and_refuses_to_guess(tmp_path: Path) -> None:
    out = tmp_path / "alerts.jsonl"
    alerts = AlertFile.open(out)
    alerts.write({"n": 1})
    mark = alerts.sync()
    alerts.write({"n": 2})
    alerts.close()
    assert mark == {"path": str(out), "size": len('{"n": 1}\n')}
    again = AlertFile.open(out, {"output": mark})  # the restart drops what came after
    again.close()
    assert out.read_text() == '{"n": 1}\n'
    with pytest.raises(ValueError, match="not empty and no --state records it"):
        AlertFile.open(out)
    out.write_text("")
    with pytest.raises(ValueError, match="recorded 9 at its last checkpoint"):
        AlertFile.open(out, {"output": mark})
    AlertFile.open(out).close()  # an empty file is a fresh start


# --------------------------------------------------------------------- crash and restart


def _fedecay(*args: str) -> list[str]:
    return [sys.executable, "-m", "simulations.cli", "monitor", *args]


@pytest.mark.slow
def test_sigkill_at_any_moment_then_restart_writes_the_same_alert_file(tmp_path: Path
                                                                       ) -> None:
    from common.bundle import save_model_bundle
    from common.config import ModelConfig
    from common.model import build_model

    model = save_model_bundle(build_model(ModelConfig(lstm_units=8, dense_units=8), SNAP,
                                          seed=0), SNAP, POLICY, tmp_path / "model.keras")
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(_lines(6000, seed=3)) + "\nnot json\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}

    def args(name: str) -> list[str]:
        return _fedecay("--model", str(model), "--input", str(events),
                        "--state", str(tmp_path / f"{name}-state"),
                        "--out", str(tmp_path / f"{name}.jsonl"),
                        "--batch", "40", "--checkpoint-every", "500")

    subprocess.run(args("straight"), env=env, cwd=tmp_path, check=True, timeout=300,
                   capture_output=True)
    expected = (tmp_path / "straight.jsonl").read_bytes()
    assert expected.count(b"\n") > 20
    out = tmp_path / "crash.jsonl"
    sizes = []  # of the alert file when killed
    # Kill while it starts (no state yet), then after the file has grown past these sizes.
    for grown in (None, len(expected) // 5, len(expected) // 2, len(expected) * 4 // 5):
        base = out.stat().st_size if out.exists() else 0
        proc = subprocess.Popen(args("crash"), env=env, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            size = out.stat().st_size if out.exists() else 0
            if grown is None or size >= max(grown, base + 1):  # grown since this start
                break
            time.sleep(0.005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            sizes.append(out.stat().st_size if out.exists() else -1)
        proc.wait(timeout=30)
    done = subprocess.run(args("crash"), env=env, cwd=tmp_path, timeout=300,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len(sizes) == 4 and len({n for n in sizes if 0 < n < len(expected)}) == 3, sizes
    assert out.read_bytes() == expected
    # Replayed to stdout, the same input gives the same alerts, ids and cutoffs.
    replay = subprocess.run(_fedecay("--model", str(model), "--input", str(events),
                                     "--batch", "40"),
                            env=env, cwd=tmp_path, timeout=300, capture_output=True)
    assert replay.stdout == expected


# ----------------------------------------------------------------------- input lines


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                               max_size=4),
    max_leaves=12)
events_ish = st.fixed_dictionaries({}, optional={
    "user_id": json_values, "merchant_id": json_values, "category_id": json_values,
    "item_id": json_values, "value": json_values,
    "event": st.sampled_from(["view", " Cart ", "purchase", "x"]) | json_values,
    "timestamp": st.sampled_from(["2025-03-01T10:20:30Z", "1740824430", "1740824430250",
                                  "2025-13-45", "9" * 5000, "1e999", "+.5e-3"])
                 | st.integers() | st.floats() | st.text(max_size=40) | json_values,
})


@settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300) | st.text(max_size=300)
       | events_ish.map(json.dumps) | json_values.map(json.dumps))
def test_parse_event_returns_an_event_or_malformed(line: str | bytes) -> None:
    try:
        merchant, user, ns, code, category, value, item = parse_event(line)
    except Malformed:
        return
    assert user and merchant and category and isinstance(ns, int) and value >= 0


def test_parse_event_hostile_examples() -> None:
    for line in ["[" * 100_000, '{"user_id": "u", "event": "view", "timestamp": ' + "9" * 5000
                 + "}", '{"user_id": "u", "event": "view", "timestamp": 1, "value": 1e400}',
                 '{"user_id": "u", "event": "view", "timestamp": 1, "value": ' + "9" * 400
                 + "}", b"\xff\xfe{", '{"user_id": "\\ud800", "event": "view"}']:
        with pytest.raises(Malformed):
            parse_event(line)


def test_events_before_1971_are_malformed_as_the_batch_loader_refuses_them() -> None:
    old = [{"user_id": "old1", "timestamp": "1900-01-02T00:00:00Z", "event": "purchase",
            "value": 5},
           {"user_id": "old2", "timestamp": 0, "event": "view"},
           {"user_id": "old3", "timestamp": "0", "event": "view"},
           {"user_id": "old4", "timestamp": 31_535_999.5, "event": "view"},  # 1970-12-31
           {"user_id": "old5", "timestamp": "1970-12-31T23:59:59.999999999Z", "event": "view"},
           {"user_id": "old6", "timestamp": -86_400, "event": "view"},
           {"user_id": "old7", "timestamp": "1500-06-01", "event": "view"}]
    for rec in old:
        with pytest.raises(Malformed, match="^timestamp: before 1971-01-01$"):
            parse_event(json.dumps(rec))
    first = {"user_id": "ok", "timestamp": "1971-01-01T00:00:00Z", "event": "view"}
    assert parse_event(json.dumps(first))[2] == 31_536_000 * 10**9  # the bound itself is fine
    monitor = _monitor([])
    monitor.feed_lines([json.dumps(rec) for rec in old] + _lines(3))
    assert monitor.stats.malformed == len(old) and monitor.stats.events == 3
    assert monitor.stats.reasons == {"timestamp": len(old)}
    assert all(": timestamp: before 1971-01-01: " in ex for ex in monitor.malformed_examples)
    assert all(user.startswith("u") for _, user in monitor.users)


def test_an_event_without_a_merchant_beside_named_merchants_is_malformed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # As the batch loader refuses a row without merchant_id beside rows naming one: as
    # merchant 'local' such an event made one merchant more, holding another's users.
    bare = [json.dumps({"user_id": "u1", "timestamp": "2025-03-02T00:00:00Z",
                        "event": "view", "merchant_id": m}) for m in (None, "", "NULL")]
    monitor = _monitor([])
    monitor.feed_lines(_lines(30) + bare)
    assert monitor.stats.malformed == 3 and monitor.stats.reasons == {"merchant_id": 3}
    assert all(": merchant_id: missing, while the stream's other events name their "
               "merchant" in ex for ex in monitor.malformed_examples)
    assert {merchant for merchant, _ in monitor.users} == {"m0", "m1"}
    # ... and after a restart from the saved state too.
    monitor.save(tmp_path / "state", {"path": "/x", "inode": 1, "offset": 7})
    restarted = _monitor([])
    restarted.load_state(tmp_path / "state")
    restarted.feed(bare[0])
    assert restarted.stats.reasons["merchant_id"] == 4
    # A stream naming no merchant is one merchant, 'local'. Events naming one after such
    # events are kept, said once (a stream whose first event lacked the merchant must not
    # lose everything after it); from there an event without one is malformed.
    local = _monitor([])
    local.feed_lines([json.dumps({k: v for k, v in json.loads(line).items()
                                  if k != "merchant_id"}) for line in _lines(30)])
    assert {merchant for merchant, _ in local.users} == {"local"}
    local.feed_lines(_lines(40)[30:])
    assert {merchant for merchant, _ in local.users} == {"local", "m0", "m1"}
    assert local.stats.malformed == 0 and caplog.text.count("the events before it named "
                                                             "none") == 1
    assert "line 31 names merchant m" in caplog.text
    local.feed(bare[0])
    assert local.stats.reasons == {"merchant_id": 1}


def test_a_time_that_jumps_the_clock_past_a_window_is_warned_about(
        caplog: pytest.LogCaptureFixture) -> None:
    monitor = _monitor([])
    monitor.feed_lines(_lines(50))  # 2025-01-01 .. 2025-03-01: steps of about a day
    assert "stream clock" not in caplog.text
    typo = {"user_id": "u1", "timestamp": "2026-02-27T10:00:00Z", "event": "view",
            "merchant_id": "m1"}
    monitor.feed(json.dumps(typo))  # a year ahead of the stream: the clock moves, said so
    assert "line 51: user u1's event at 2026-02-27 10:00 moves the stream clock" in caplog.text
    assert pd.Timestamp(monitor.clock_ns, unit="ns", tz="UTC").year == 2026
    with pytest.raises(Malformed, match="timestamp: expected ISO-8601 text or a unix time, "
                       "got true"):
        parse_event(json.dumps({"user_id": "u", "timestamp": True, "event": "view"}))
    with pytest.raises(Malformed, match="user_id: missing"):  # as the batch loader reads it
        parse_event(json.dumps({"user_id": "NULL", "timestamp": 1.7e9, "event": "view"}))


def _unsafe(text: str) -> list[str]:
    return [c for c in text if ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f
            or c in "\u2028\u2029\u202e\u200b\ufeff" or 0xd800 <= ord(c) <= 0xdfff]


def test_malformed_examples_never_carry_control_characters(tmp_path: Path) -> None:
    hostile = [
        '{"user_id": "a", \x1b[31mred\x1b[0m',  # not JSON, raw ESC sequences
        '{"user_id": "b", "timestamp": "2025-01-01", "event": "view\x1b]0;pwned\x07"}',
        "\x1b[2J\x1b[H\rfake: all good\x08\x7f\x9b31m\u202etxt.exe\u2028\ufeff\x00",
        json.dumps({"user_id": "c", "timestamp": "2025-01-01", "event": "\x1b[1mview"}),
    ]
    monitor = _monitor([])
    monitor.feed_lines(hostile)
    monitor.feed(b"\x1b[5m\xff\xfe\x9b{")  # bytes, invalid UTF-8 too
    monitor.feed("\ud800\x1b oops")  # a lone surrogate cannot reach stderr either
    monitor.skip_line("line too long", "\x1b[31m")
    examples = monitor.malformed_examples
    assert len(examples) == len(hostile) + 3
    for example in examples:
        assert not _unsafe(example), example
        example.encode("utf-8")  # printable as it is
    assert examples[0] == ('line 1: not valid JSON: {"user_id": "a", \\x1b[31mred\\x1b[0m')
    assert "\\x1b[2J\\x1b[H\\x0dfake: all good\\x08\\x7f\\x9b31m\\u202etxt.exe" in examples[2]
    assert examples[3].startswith("line 4: event: expected one of view, click, cart, favorite, "
                                  "purchase, got '\\x1b[1mview': {\"user_id\": \"c\", ")
    # ... and so are the lines run_stream reports (the CLI prints them on stderr).
    path = tmp_path / "events.jsonl"
    path.write_bytes("\n".join(hostile).encode("utf-8") + b"\n\x1b[31m\x9b\n")
    reports: list[str] = []
    run_stream(_monitor([]), path, report=reports.append)
    shown = [r for r in reports if r.startswith("malformed")]
    assert len(shown) == len(hostile) + 1
    assert not any(_unsafe(r) for r in reports)


@settings(max_examples=200, deadline=2000)
@given(st.lists(st.binary(max_size=12) | st.just(b"\n"), max_size=30),
       st.integers(1, 8), st.integers(1, 10))
def test_line_reader_splits_like_bytes_split_and_caps(pieces: list[bytes], cap: int,
                                                       step: int) -> None:
    data = b"".join(pieces)
    reader = LineReader(cap)
    got = []
    for lo in range(0, len(data), step):
        got.extend(reader.lines(data[lo:lo + step]))
        assert reader.held <= len(data) and sum(map(len, reader._parts)) <= cap
    *complete, last = data.split(b"\n")
    assert got == [(None if len(x) > cap else x, len(x) + 1) for x in complete]
    assert reader.rest() == (None if len(last) > cap else last, len(last))


def test_a_huge_line_is_skipped_counted_and_never_held(tmp_path: Path) -> None:
    good = _lines(3)
    path = tmp_path / "events.jsonl"
    huge = b'{"user_id": "' + b"x" * 5_000_000 + b'"}'
    path.write_bytes(b"\n".join([good[0].encode(), huge, good[1].encode(), good[2].encode(),
                                 huge]))  # the last one without a newline
    reports: list[str] = []
    monitor = _monitor([], max_line_bytes=64 << 10)
    tracemalloc.start()
    try:
        out = run_stream(monitor, path, report=reports.append, state_dir=tmp_path / "state")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out["events"] == 3 and out["malformed"] == 2
    assert out["malformed_reasons"] == {"line too long": 2}
    assert any(r.startswith("malformed line 2: line too long: 5,000,015 bytes") for r in reports)
    assert any(r.startswith("malformed line 5: line too long") for r in reports)
    assert peak < 2_000_000  # the 5 MB lines were never held whole
    saved = json.loads((tmp_path / "state" / "monitor.json").read_text())
    assert saved["position"]["offset"] == path.stat().st_size
    # At the cap a line is read; one byte over, skipped.
    reader = LineReader(len(good[0]))
    assert [line for line, _ in reader.lines(good[0].encode() + b"\n" + good[0].encode()
                                             + b"x\n")] == [good[0].encode(), None]
