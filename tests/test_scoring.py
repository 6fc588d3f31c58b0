"""Batch scoring and the real-time monitor: the same numbers, alerts, state and the CLI.

One small untrained model (8 LSTM units, sequences of 8) and one small synthetic
federation (3 merchants, 60 days) are shared by the module; a model does not need to
be good for the monitor and the batch scorer to agree on it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import RecordingProgress

from client.batch_features import batch_features, user_chunks
from client.monitor import (
    STATE_FILE,
    Malformed,
    Monitor,
    MonitorConfig,
    benchmark_monitor,
    events_to_jsonl,
    parse_timestamp,
    run_stream,
)
from client.scoring import SCORE_COLUMNS, prefetch, score_events
from common.bundle import load_model_bundle, save_model_bundle, sidecar_path
from common.config import ModelConfig, PolicyConfig, SnapshotConfig
from common.features import AGGREGATE_FEATURES, CADENCE_FEATURES, STATIC_FEATURES
from common.io import validate_events
from common.model import build_model
from common.schema import EVENT_DTYPE, STRING, DataError
from common.snapshots import Snapshots, unlabelled_snapshots
from simulations.cli import main
from simulations.synth import generate_federation, load_preset, synth_config_from_preset

SNAP = SnapshotConfig(max_len=8, hash_buckets=16, observation_days=21, tau_days=5)
POLICY = PolicyConfig(risk_threshold=0.45)
DAY_NS = 86_400 * 10**9


@pytest.fixture(scope="module")
def events() -> pd.DataFrame:
    cfg = dataclasses.replace(synth_config_from_preset(load_preset("quick")),
                              num_merchants=3, users_median=30, min_users=10, days=60)
    return generate_federation(cfg, seed=1).events


@pytest.fixture(scope="module")
def model():
    return build_model(ModelConfig(lstm_units=8, dense_units=8), SNAP, seed=0)


def _stream(events: pd.DataFrame) -> list[str]:
    """The log in time order, with late events and exact duplicates mixed in."""
    lines = events_to_jsonl(events)
    out: list[str] = []
    held: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        if i % 50 == 7:
            held.append((i + 200, line))  # arrives 200 lines late
            continue
        out.append(line)
        if i % 97 == 3:
            out.append(line)  # sent twice
        while held and held[0][0] <= i:
            out.append(held.pop(0)[1])
    out.extend(line for _, line in held)
    return out


def _cutoff(ns: int) -> pd.Timestamp:
    return pd.Timestamp(ns, unit="ns", tz="UTC")


def _assert_same_features(a: Snapshots, b: Snapshots) -> None:
    assert list(a.merchant_id) == list(b.merchant_id)
    assert list(a.user_id) == list(b.user_id)
    np.testing.assert_array_equal(a.events, b.events)
    np.testing.assert_array_equal(a.categories, b.categories)
    np.testing.assert_allclose(a.numeric, b.numeric, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(a.static, b.static, rtol=1e-6, atol=1e-6)
    # The cadence features are among them, and informative on this log.
    assert a.static.shape[1] == len(AGGREGATE_FEATURES)
    cadence = a.static[:, AGGREGATE_FEATURES.index(CADENCE_FEATURES[0]):]
    assert len(a) < 2 or (cadence.std(axis=0) > 0).sum() >= len(CADENCE_FEATURES) - 1
    np.testing.assert_allclose(a.interest_now, b.interest_now, rtol=1e-6)
    assert list(a.fading_category) == list(b.fading_category)


def _assert_same_scores(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(SCORE_COLUMNS) == list(b.columns)
    assert a["user_id"].tolist() == b["user_id"].tolist()
    assert a["merchant_id"].tolist() == b["merchant_id"].tolist()
    for col in ("decay_risk", "interest_forecast", "uplift", "expected_gain"):
        np.testing.assert_allclose(a[col], b[col], rtol=1e-5, atol=1e-6, err_msg=col)
    assert a["action"].tolist() == b["action"].tolist()
    assert a["category"].tolist() == b["category"].tolist()


# ------------------------------------------------------------------ batch features


@pytest.mark.parametrize("at", [None, "2025-02-10 13:20:10.5", "2025-03-12", "2024-06-01"])
def test_batch_features_equal_features_at(events: pd.DataFrame, at) -> None:
    chunks = [snaps for snaps, _, _ in batch_features(events, at, SNAP, chunk_events=500)]
    got = Snapshots.concat(chunks)
    if at is None:
        at = _cutoff((events["timestamp"].max().value // 10**9 + 1) * 10**9)
    else:
        at = pd.Timestamp(at, tz="UTC").ceil("s")
    if at.year == 2024:
        # Before the log nobody is active. (unlabelled_snapshots is not asked here: for a
        # cutoff before the log's first midnight its time keys go negative.)
        assert len(got) == 0
        return
    ref, _ = unlabelled_snapshots(events, at, SNAP)
    assert len(chunks) > 1 and len(ref) > 50
    _assert_same_features(got, ref)


@pytest.mark.parametrize("order", [["timestamp"], ["user_id", "merchant_id", "timestamp"],
                                   ["merchant_id", "user_id", "timestamp"]])
def test_batch_features_user_ids_shared_across_merchants(events: pd.DataFrame,
                                                         order: list[str]) -> None:
    # "u07" of m00 and "u07" of m01 are two users, whether the log is in time order,
    # grouped by user id (the merchant changes inside a group) or by merchant.
    shared = events.assign(user_id=events["user_id"].str.split("-").str[1])
    shared = shared.sort_values(order, kind="stable").reset_index(drop=True)
    at = pd.Timestamp("2025-02-20 08:00:00", tz="UTC")
    got = Snapshots.concat([s for s, _, _ in batch_features(shared, at, SNAP, chunk_events=700)])
    ref, _ = unlabelled_snapshots(shared, at, SNAP)
    assert len(set(ref.user_id)) < len(ref)  # the same id in several merchants
    _assert_same_features(got, ref)


@pytest.mark.parametrize("layout", ["halves", "reversed"])
def test_batch_features_any_row_layout(events: pd.DataFrame, layout: str) -> None:
    # Users in two runs of rows (the log's two halves, each grouped by user), or in one
    # run but latest event first: both leave the in-place fast path for the sort.
    if layout == "halves":
        early = events["timestamp"] < pd.Timestamp("2025-02-01", tz="UTC")
        log = pd.concat([events[early], events[~early]], ignore_index=True)
    else:
        log = events.iloc[::-1].sort_values(["merchant_id", "user_id"], kind="stable")
        log = log.reset_index(drop=True)
    at = pd.Timestamp("2025-02-20 08:00:00", tz="UTC")
    got = Snapshots.concat([s for s, _, _ in batch_features(log, at, SNAP, chunk_events=700)])
    ref, _ = unlabelled_snapshots(log, at, SNAP)
    _assert_same_features(got, ref)


def test_batch_features_categorical_ids_equal_strings(events: pd.DataFrame) -> None:
    coded = events.astype({c: "category" for c in ("user_id", "merchant_id", "category_id")})
    at = pd.Timestamp("2025-02-20 08:00:00", tz="UTC")
    got = Snapshots.concat([s for s, _, _ in batch_features(coded, at, SNAP, chunk_events=700)])
    plain = Snapshots.concat([s for s, _, _ in batch_features(events, at, SNAP,
                                                               chunk_events=700)])
    _assert_same_features(got, plain)
    _assert_same_features(got, unlabelled_snapshots(events, at, SNAP)[0])


def test_fading_ties_go_to_the_category_first_in_the_log() -> None:
    # zoe's two views (shoes, then bags) are at the same second: their drops tie. The
    # snapshot builder breaks ties by first appearance in the whole log, where abe's old
    # bags view comes first, though abe is not active and zoe met shoes first.
    at = pd.Timestamp("2025-03-01", tz="UTC")
    seen = pd.to_datetime(["2025-01-02", "2025-02-25", "2025-02-25"], utc=True)
    log = pd.DataFrame({
        "user_id": pd.Series(["abe", "zoe", "zoe"], dtype=STRING),
        "timestamp": seen,
        "event": pd.Series(["view"] * 3, dtype=EVENT_DTYPE),
        "category_id": pd.Series(["bags", "shoes", "bags"], dtype=STRING),
        "merchant_id": pd.Series(["m1"] * 3, dtype=STRING),
        "value": 0.0,
    })
    got = Snapshots.concat([s for s, _, _ in batch_features(log, at, SNAP)])
    ref, _ = unlabelled_snapshots(log, at, SNAP)
    assert list(ref.user_id) == ["zoe"] and list(ref.fading_category) == ["bags"]
    _assert_same_features(got, ref)


def test_chunks_hold_whole_batches_of_users() -> None:
    ten = np.ones(10, np.int64)  # one event per user
    assert user_chunks(ten, 7) == [(0, 7), (7, 10)]
    # 7 users would fit; 6 = two batches of 3. The last chunk takes the rest.
    assert user_chunks(ten, 7, batch=3) == [(0, 6), (6, 10)]
    # Fewer users than a batch fit: the chunk is not rounded to nothing.
    assert user_chunks(ten, 2, batch=3) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]


def test_score_events_chunking_progress_and_columns(events: pd.DataFrame, model) -> None:
    progress = RecordingProgress()
    whole = score_events(model, events, None, SNAP, POLICY)
    parts = score_events(model, events, None, SNAP, POLICY, chunk_events=2000,
                         progress=progress)
    _assert_same_scores(whole, parts)
    step = progress.steps["scoring users"]
    assert len(step["advances"]) > 2 and step["closed"]
    assert step["total"] == progress.done("scoring users") == len(whole)
    assert (whole["interest_forecast"] >= 0).all()
    treated = whole["action"] != "none"
    assert (whole.loc[~treated, "uplift"] == 0).all()
    assert (whole.loc[treated, "decay_risk"] >= POLICY.risk_threshold).all()
    rec = whole["action"] == "recommend"
    assert (whole.loc[rec, "category"] != "").all()


# ----------------------------------------------------------- monitor == batch scorer


def test_monitor_equals_batch_scorer(events: pd.DataFrame, model) -> None:
    alerts: list[dict] = []
    monitor = Monitor(model, SNAP, POLICY, MonitorConfig(batch=300, window_cap=10_000),
                      sink=alerts.append)
    monitor.feed_lines(_stream(events))
    monitor.flush()
    assert monitor.stats.late > 0 and monitor.stats.duplicates > 0
    assert monitor.stats.events == len(events) and monitor.stats.malformed == 0
    assert monitor.stats.sweeps > 10 and alerts
    end = monitor.cutoff_ns()
    for at in (_cutoff(end), _cutoff(end + 9 * DAY_NS + 3600 * 10**9)):
        snaps, _ = monitor.features(at)
        ref, _ = unlabelled_snapshots(events, at, SNAP)
        _assert_same_features(snaps, ref)
        _assert_same_scores(monitor.scores(at), score_events(model, events, at, SNAP, POLICY))
    with pytest.raises(ValueError, match="before the monitor's clock"):
        monitor.scores(_cutoff(end - DAY_NS))


# ------------------------------------------------------------ alerts and cool-down


def _recency_risk(snaps: Snapshots) -> dict[str, np.ndarray]:
    """Risk 1 - exp(-recency / 2 days); 0.9 for users called hot-*, 0 for calm-*.

    ``recommend`` pays: uplift 0.2, gain 10 * 0.2 - 0.05.
    """
    days = np.expm1(snaps.static[:, STATIC_FEATURES.index("log_recency_days")])
    names = snaps.user_id.astype(str)
    risk = np.where(np.char.startswith(names, "hot"), 0.9,
                    np.where(np.char.startswith(names, "calm"), 0.0, 1 - np.exp(-days / 2)))
    n = len(snaps)
    return {"decay": risk, "interest": np.full(n, np.log1p(2.0)),
            "activation": np.tile([0.1, 0.3, 0.2, 0.1], (n, 1))}


def _event(user: str, day: float, event: str = "view", category: str = "shoes") -> str:
    ts = pd.Timestamp("2025-03-01", tz="UTC") + pd.Timedelta(days=day)
    return json.dumps({"user_id": user, "timestamp": ts.isoformat(), "event": event,
                       "category_id": category, "merchant_id": "m1", "value": 0})


def test_alert_on_upward_crossing_with_cooldown() -> None:
    alerts: list[dict] = []
    monitor = Monitor(None, SNAP, PolicyConfig(risk_threshold=0.5),
                      MonitorConfig(batch=1000, cooldown_hours=72, sweep_hours=24),
                      sink=alerts.append, predict_fn=_recency_risk)

    def at(day: float, *lines: str) -> list[str]:
        monitor.feed_lines(lines)
        monitor.flush()
        return [a["user_id"] for a in alerts]

    assert at(0, _event("ann", 0), _event("ann", 0.04, "purchase", "bags")) == []  # fresh: low
    # Two days later (a sweep): ann has been silent for two days, risk 1 - e^-1 = 0.63.
    assert at(2, _event("calm-bob", 2.0)) == ["ann"]
    first = alerts[0]
    assert first["trigger"] == "sweep" and first["previous_risk"] < 0.5 <= first["decay_risk"]
    assert first["action"] == "recommend" and first["uplift"] == pytest.approx(0.2)
    assert first["expected_gain"] == pytest.approx(10 * 0.2 - 0.05)
    assert first["category"] in ("shoes", "bags")
    assert first["interest_forecast"] == pytest.approx(2.0, rel=1e-5)
    at(2.05, _event("ann", 2.05))  # ann is back: risk falls under the threshold
    # Silent again for two days: a new crossing, but within 72 h of the first alert.
    assert at(4.1, _event("calm-bob", 4.1)) == ["ann"]
    assert monitor.stats.suppressed == 1
    at(6.0, _event("ann", 6.0))
    assert at(8.5, _event("calm-bob", 8.5)) == ["ann", "ann"]  # cool-down over: alerted again
    # A user above the threshold at the first score is alerted by the event itself.
    assert at(8.6, _event("hot-1", 8.6))[-1] == "hot-1"
    assert alerts[-1]["trigger"] == "events" and alerts[-1]["previous_risk"] is None
    assert len(monitor.latencies) == 1 and monitor.latencies[0] >= 0


# ------------------------------------------------------------------- bad input


def test_malformed_lines_are_counted_never_raised(tmp_path: Path) -> None:
    good = [_event("ann", 0), _event("ann", 1, "cart"), _event("calm-bob", 1.5)]
    bad = [
        "not json at all",
        "[1, 2, 3]",
        json.dumps({"timestamp": "2025-03-01T00:00:00Z", "event": "view"}),
        json.dumps({"user_id": "u", "timestamp": "yesterday", "event": "view"}),
        json.dumps({"user_id": "u", "timestamp": "2025-03-01T00:00:00Z", "event": "teleport"}),
        json.dumps({"user_id": "u", "timestamp": "2025-03-01T00:00:00Z", "event": "view",
                    "value": -3}),
        json.dumps({"user_id": "u", "timestamp": "2025-03-01T00:00:00Z", "event": "view",
                    "value": "abc"}),
        # Above the batch loader's bound: it would overflow the spend features.
        json.dumps({"user_id": "u", "timestamp": "2025-03-01T00:00:00Z", "event": "view",
                    "value": 1e13}),
        json.dumps({"user_id": "u", "timestamp": "2999-01-01T00:00:00Z", "event": "view"}),
        json.dumps({"user_id": ["a"], "timestamp": 1.7e9, "event": "view"}),
        '{"user_id": "u", "timestamp": ',
    ]
    path = tmp_path / "events.jsonl"
    path.write_bytes(("\n".join([good[0], *bad[:5], "", good[1], *bad[5:], good[2]]) + "\n")
                     .encode() + b"\xff\xfe not utf-8\n")
    reports: list[str] = []
    monitor = Monitor(None, SNAP, POLICY, sink=lambda a: None, predict_fn=_recency_risk)
    out = run_stream(monitor, path, report=reports.append)
    assert out["events"] == 3 and out["malformed"] == len(bad) + 1
    assert monitor.stats.malformed == len(bad) + 1
    assert set(out["malformed_reasons"]) >= {"not valid JSON", "not a JSON object", "user_id",
                                             "timestamp", "event", "value"}
    assert sum(r.startswith("malformed line") for r in reports) == 10  # the first ten shown
    assert any("teleport" in r for r in reports)


def test_timestamps_parse_like_the_canonical_loader() -> None:
    texts = ["2025-03-01T10:20:30Z", "2025-03-01T10:20:30.123456789Z",
             "2025-03-01 10:20:30+02:00", "2025-03-01", "1740824430", "1740824430.25",
             "1740824430250"]
    frame = pd.DataFrame({"user_id": "u", "event": "view", "timestamp": texts})
    expected = validate_events(frame, "test")["timestamp"].dt.as_unit("ns").astype("int64")
    assert [parse_timestamp(t) for t in texts] == expected.tolist()
    assert parse_timestamp(1740824430) == 1740824430 * 10**9
    assert parse_timestamp(1740824430250) == 1740824430250 * 10**6
    with pytest.raises(Malformed):
        parse_timestamp(True)


@pytest.mark.parametrize("text, ok", [
    ("2017-11-02 10:00:00 UTC", True),  # BigQuery / GA4 exports
    ("2017-11-02 10:00:00.123456789 UTC", True),
    ("2017-11-02T10:00:00  UTC", True),
    ("03/01/2025 10:20", False),  # 1 March or 3 January: never guessed
    ("March 1, 2025", False),
    ("2017-11-02 10:00:00 CET", False),  # a zone abbreviation names no offset
    ("2017-11-02 10:00:00+02:00 UTC", False),  # which one?
    ("2017-11-02T10:00:00Z UTC", False),
    ("2017-11-02 UTC", True),
])
def test_the_monitor_reads_a_time_exactly_when_the_loader_does(text: str, ok: bool) -> None:
    """One set of rules for both (``common.timestamps``): the monitor read any text pandas
    could guess a time from (``03/01/2025`` as 1 March), while the loader refused it, and
    the loader refused BigQuery's ``... UTC``, which the monitor read."""
    frame = pd.DataFrame({"user_id": "u", "event": "view", "timestamp": [text]})
    if not ok:
        with pytest.raises(DataError, match="unparsable timestamp"):
            validate_events(frame, "test")
        with pytest.raises(Malformed, match="timestamp"):
            parse_timestamp(text)
        return
    loaded = validate_events(frame, "test")["timestamp"].dt.as_unit("ns").astype("int64")
    assert parse_timestamp(text) == loaded.iloc[0] == pd.Timestamp(
        text.replace("UTC", "").strip(), tz="UTC").value


def test_the_monitor_refuses_what_a_spreadsheet_rounded_as_the_loader_does() -> None:
    """Ids and unix times written in scientific notation (Excel's ``1.23457E+11``,
    ``1.50953E+12``): the loader refuses them, the monitor read them (the time 400 s off,
    three customers as one id)."""
    from client.monitor.events import parse_event

    line = '{{"user_id": "{u}", "timestamp": "{t}", "event": "view"}}'
    with pytest.raises(Malformed, match="user_id: .*scientific notation"):
        parse_event(line.format(u="1.23457E+11", t="2025-03-01T10:20:30Z"))
    with pytest.raises(Malformed, match="timestamp: .*scientific notation"):
        parse_event(line.format(u="u1", t="1.50953E+12"))
    # the shortest exact form (Java, numpy), and codes that only look alike, are read
    assert parse_event(line.format(u="1E-05", t="1.509530461E9"))[1:3] == (
        "1E-05", 1509530461 * 10**9)


# ------------------------------------------------------------- state and restarts


def test_restart_from_state_gives_identical_scores(events: pd.DataFrame, model,
                                                   tmp_path: Path) -> None:
    lines = events_to_jsonl(events)
    half = len(lines) // 2
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines[:half]) + "\n")
    state = tmp_path / "state"
    config = MonitorConfig(batch=500, checkpoint_every=2000)

    def fresh(alerts: list) -> Monitor:
        return Monitor(model, SNAP, POLICY, config, sink=alerts.append)

    first_alerts: list = []
    first = fresh(first_alerts)
    run_stream(first, path, state_dir=state)
    assert (state / STATE_FILE).exists() and not list(state.glob("*.tmp"))
    saved = json.loads((state / "monitor.json").read_text())
    assert saved["position"]["offset"] == path.stat().st_size
    assert saved["stats"]["events"] == half
    # The file grows; a restarted monitor resumes after the last line it had read ...
    with path.open("a") as fh:
        fh.write("\n".join(lines[half:]) + "\n")
    restarted_alerts: list = []
    restarted = fresh(restarted_alerts)
    position = restarted.load_state(state)
    reports: list[str] = []
    out = run_stream(restarted, path, state_dir=state, position=position,
                     report=reports.append)
    assert out["events"] == len(lines) - half and any("resuming" in r for r in reports)
    # ... exactly as the monitor that wrote the state would have gone on, alert for alert,
    continued_alerts: list = []
    first.sink = continued_alerts.append
    run_stream(first, path, state_dir=tmp_path / "other", position=position)
    assert restarted_alerts == continued_alerts and restarted_alerts
    pd.testing.assert_frame_equal(restarted.scores(), first.scores())
    # ... and ends with the scores of a monitor that read the whole log in one go.
    straight = fresh([])
    straight.feed_lines(lines)
    straight.flush()
    assert restarted.stats.events == straight.stats.events == len(events)
    _assert_same_scores(restarted.scores(), straight.scores())
    # State written for other settings is refused with the key named.
    other = Monitor(model, dataclasses.replace(SNAP, tau_days=9), POLICY, config)
    with pytest.raises(ValueError, match="snapshots.tau-days"):
        other.load_state(state)


# --------------------------------------------------------------- bundle and the CLI


def test_model_bundle_round_trip_and_checks(model, tmp_path: Path) -> None:
    path = save_model_bundle(model, SNAP, POLICY, tmp_path / "run" / "model.keras")
    assert sidecar_path(path).name == "model.json"
    bundle = load_model_bundle(path)
    assert bundle.snapshots == dataclasses.replace(SNAP, start="", end="")
    assert bundle.policy == POLICY
    assert load_model_bundle(path, ["policy.budget=5"]).policy.budget == 5
    with pytest.raises(ValueError, match="snapshots.max-len"):
        load_model_bundle(path, ["snapshots.max-len=16"])
    sidecar_path(path).unlink()
    with pytest.raises(ValueError, match="max-len is 32 .*hash-buckets is 64 .*--set"):
        load_model_bundle(path)  # the defaults do not fit this model
    assert load_model_bundle(path, ["snapshots.max-len=8", "snapshots.hash-buckets=16"]) \
        .snapshots.max_len == 8


def test_bundle_refuses_feature_overrides_bad_settings_files_and_nan_weights(
        model, tmp_path: Path) -> None:
    path = save_model_bundle(model, SNAP, POLICY, tmp_path / "run" / "model.keras")
    # The features the model learnt may not change at scoring time...
    for key in ("snapshots.tau-days", "snapshots.weight-view", "snapshots.observation-days"):
        with pytest.raises(ValueError, match=rf"--set {key}=100: the model was trained with"):
            load_model_bundle(path, [f"{key}=100"])
    # ... their own values pass, and so do the keys that do not define features.
    assert load_model_bundle(path, [f"snapshots.tau-days={SNAP.tau_days}",
                                    "snapshots.horizon-days=3"]).snapshots.horizon_days == 3
    # A settings file with a key no version knows is named, before the model is read.
    sidecar = sidecar_path(path)
    good = sidecar.read_text()
    sidecar.write_text(json.dumps({**json.loads(good), "snapshots.tau-dayz": 3}))
    with pytest.raises(ValueError, match=rf"^{sidecar}: unknown config key 'snapshots.tau-dayz'"):
        load_model_bundle(path)
    # Without settings files, --set is how the training settings are given.
    sidecar.unlink()
    shapes = [f"snapshots.max-len={SNAP.max_len}", f"snapshots.hash-buckets={SNAP.hash_buckets}"]
    assert load_model_bundle(path, [*shapes, "snapshots.tau-days=9"]).snapshots.tau_days == 9
    # A model whose weights are not finite is refused, naming the file and a weight.
    sidecar.write_text(good)
    broken = build_model(ModelConfig(lstm_units=8, dense_units=8), SNAP, seed=0)
    broken.set_weights([np.full_like(w, np.nan) if i == 3 else w
                        for i, w in enumerate(model.get_weights())])
    nan_path = save_model_bundle(broken, SNAP, POLICY, tmp_path / "nan" / "model.keras")
    with pytest.raises(ValueError, match=r"model.keras has weights that are not finite \(first: "):
        load_model_bundle(nan_path)


def test_score_and_monitor_commands(events: pd.DataFrame, model, tmp_path: Path,
                                    capsys) -> None:
    model_path = save_model_bundle(model, SNAP, POLICY, tmp_path / "model.keras")
    events_path = tmp_path / "events.parquet"
    events.to_parquet(events_path)
    out = tmp_path / "scores.csv"
    assert main(["score", "--model", str(model_path), "--events", str(events_path),
                 "--out", str(out)]) == 0
    text = capsys.readouterr()
    scores = pd.read_csv(out, keep_default_na=False)
    assert tuple(scores.columns) == SCORE_COLUMNS
    expected = score_events(model, events, None, SNAP, POLICY)
    assert len(scores) == len(expected) > 50
    np.testing.assert_allclose(scores["decay_risk"], expected["decay_risk"], rtol=1e-5)
    assert "users scored" in text.err and "users/s" in text.err and "at risk" in text.err

    assert main(["score", "--model", str(model_path), "--events", str(events_path),
                 "--at", "2025-02-20"]) == 0
    table = capsys.readouterr().out
    assert "decay_risk" in table and len(table.strip().splitlines()) == 21

    jsonl = tmp_path / "events.jsonl"
    jsonl.write_text("\n".join(events_to_jsonl(events.iloc[:3000])) + "\nnot json\n")
    state = tmp_path / "state"
    args = ["monitor", "--model", str(model_path), "--input", str(jsonl), "--state", str(state),
            "--batch", "200"]
    assert main(args) == 0
    run = capsys.readouterr()
    alerts = [json.loads(line) for line in run.out.splitlines()]
    assert alerts and {"user_id", "decay_risk", "action", "uplift", "category"} <= set(alerts[0])
    assert "malformed lines 1" in run.err and "alert latency p50" in run.err
    assert (state / STATE_FILE).exists()
    assert main(args) == 0  # a restart on the same file: nothing new to read
    again = capsys.readouterr()
    assert again.out == "" and "resuming" in again.err and "events 0 " in again.err


def test_score_refuses_what_it_would_get_wrong(events: pd.DataFrame, model, tmp_path: Path,
                                               capsys) -> None:
    """A cutoff with nobody active, --out over the log, keys the model does not use, an
    infinite value: each one line and exit 2, never a quiet empty or changed result."""
    model_path = save_model_bundle(model, SNAP, POLICY, tmp_path / "model.keras")
    events_path = tmp_path / "events.csv"
    events.to_csv(events_path, index=False)
    before = events_path.read_bytes()
    base = ["score", "--model", str(model_path), "--events", str(events_path)]
    cases = [
        (["--at", "2024-01-01"], "has events in the 21 days before the cutoff 2024-01-01"),
        (["--at", "2200-01-01"], "--at 2200-01-01: expected a time between 1971-01-01"),
        (["--at", "someday"], "--at 'someday': expected an ISO-8601 time"),
        (["--out", str(events_path)], "is the --events file"),
        (["--set", "polcy.risk-threshold=0.9"], "only snapshots.* and policy.* keys"),
        (["--set", "train.epochs=5"], "only snapshots.* and policy.* keys"),
        (["--set", "policy.value=inf"], "'policy.value': expected a finite number"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
    assert events_path.read_bytes() == before
    # Keys of other sections are refused before the model is even read.
    assert main(["score", "--model", str(tmp_path / "missing.keras"), "--events",
                 str(events_path), "--set", "federation.num-rounds=abc"]) == 2
    assert "only snapshots.* and policy.* keys" in capsys.readouterr().err


def test_data_synth_checks_every_key_and_a_plausible_calendar(tmp_path: Path,
                                                              capsys) -> None:
    for setting, message in [("synthtic.num-merchants=3", "unknown config key 'synthtic"),
                             ("synthetic.start=1900-01-01", "'synthetic.start'")]:
        assert main(["data", "synth", "--preset", "quick", "--out", str(tmp_path / "x"),
                     "--set", setting]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_benchmark_monitor_reports_figures(events: pd.DataFrame) -> None:
    figures = benchmark_monitor(None, events.iloc[:5000], SNAP, POLICY,
                                MonitorConfig(batch=250), predict_fn=_recency_risk)
    assert figures["events"] == 5000 and figures["events_per_s"] > 0
    assert figures["alerts"] > 0
    assert figures["alert_latency_p50_ms"] <= figures["alert_latency_p99_ms"]


def test_read_ahead_keeps_order_raises_the_producers_error_and_stops_early() -> None:
    assert list(prefetch(iter(range(50)))) == list(range(50))

    def failing():
        yield 1
        raise DataError("chunk 2 is broken")

    got = []
    with pytest.raises(DataError, match="chunk 2"):
        for item in prefetch(failing()):
            got.append(item)
    assert got == [1]
    produced = []

    def endless():
        for i in range(10**6):
            produced.append(i)
            yield i

    for item in prefetch(endless()):
        if item == 3:
            break  # the consumer leaves: the producer must stop, not fill memory
    assert len(produced) < 10
