"""Bad input off the happy path: every class gives one clear DataError, never a crash.

Each test writes a tiny hand-made file; the property tests feed the loader arbitrary
bytes and arbitrary small canonical CSVs.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import lzma
import os
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.config import SnapshotConfig
from common.io import (
    MALFORMED,
    UNCLOSED_QUOTE,
    EventLog,
    detect_format,
    load_events,
    validate_events,
    validate_interventions,
)
from common.schema import DataError
from common.snapshots import (
    MAX_CUTOFFS,
    build_snapshots,
    federation_problems,
    plan_cutoffs,
    stray_gap,
    unscorable,
)

HEADER = "user_id,timestamp,event,value\n"
#: 30 valid rows for three users in November 2017 (file lines 2..31)
GOOD = "".join(f"u{i % 3},2017-11-{1 + i % 28:02d}T10:00:00Z,view,1\n" for i in range(30))


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path, **kwargs: object) -> str:
    with pytest.raises(DataError) as info:
        load_events(path, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------- implausible values


@pytest.mark.parametrize("stamp", ["0", "1950-06-01", "-86400", "2099-01-01T00:00:00Z"])
def test_implausible_times_name_column_row_and_line(tmp_path: Path, stamp: str) -> None:
    path = write(tmp_path / "stray.csv", HEADER + GOOD + f"u1,{stamp},view,1\n")
    message = error_of(path)
    for pattern in (r"stray\.csv", r"'timestamp'", r"implausible", r"data row 31",
                    r"file line 32", r"between 1971-01-01 and"):
        assert re.search(pattern, message), (pattern, message)


def test_a_window_leaves_implausible_rows_out_and_counts_them(tmp_path: Path) -> None:
    path = write(tmp_path / "stray.csv", HEADER + GOOD + "u1,0,view,1\n")
    log = load_events(path, start="2017-01-01")
    assert len(log.events) == 30
    assert log.report.dropped["outside window"] == 1


@pytest.mark.parametrize("value, problem", [("1e300", "implausibly large"),
                                            ("1e13", "implausibly large"),
                                            ("nan", "non-numeric"), ("inf", "non-numeric"),
                                            ("-1", "negative")])
def test_values_that_would_not_give_finite_features(tmp_path: Path, value: str,
                                                    problem: str) -> None:
    path = write(tmp_path / "v.csv", HEADER + GOOD + f"u1,2017-11-02,view,{value}\n")
    message = error_of(path)
    assert "'value'" in message and problem in message and "file line 32" in message


def test_nested_and_binary_parquet_columns(tmp_path: Path) -> None:
    frame = pd.DataFrame({"user_id": [["a", "b"]] * 3,
                          "timestamp": pd.Timestamp("2017-11-02", tz="UTC"),
                          "event": "view"})
    frame.to_parquet(tmp_path / "nested.parquet")
    message = error_of(tmp_path / "nested.parquet")
    assert "'user_id'" in message and "nested" in message and "rows 1, 2, 3" in message
    frame["user_id"] = [b"\x00\x01"] * 3
    frame.to_parquet(tmp_path / "binary.parquet")
    message = error_of(tmp_path / "binary.parquet")
    assert "'user_id'" in message and "binary" in message


def test_nested_and_binary_cells_of_a_frame(tmp_path: Path) -> None:
    frame = pd.DataFrame({"user_id": ["a", ["b"], "c"], "timestamp": "2017-11-02",
                          "event": "view"})
    with pytest.raises(DataError, match=r"'user_id'.*nested.*data row 2"):
        validate_events(frame, "frame")
    frame["user_id"] = [b"a", b"b", b"c"]
    with pytest.raises(DataError, match=r"'user_id'.*binary.*data rows 1"):
        validate_events(frame, "frame")


# ------------------------------------------------------------------- malformed rows


def test_cut_last_line_of_a_taobao_log_names_its_line(tmp_path: Path) -> None:
    rows = "".join(f"{i},1,2,pv,{1511568000 + i}\n" for i in range(20))
    path = write(tmp_path / "UserBehavior.csv", rows + "5,1,2,p")
    message = error_of(path)
    assert "line 21 has 4 field(s), expected 5" in message and "'5,1,2,p'" in message
    assert "--bad-rows skip" in message


def test_malformed_rows_are_skipped_and_counted_on_request(tmp_path: Path) -> None:
    path = write(tmp_path / "cut.csv", HEADER + GOOD + "u1,2017-11-02,view,1,extra\n"
                 + "u2,2017-11\n")
    log = load_events(path, bad_rows="skip")
    assert len(log.events) == 30
    assert log.report.dropped[MALFORMED] == 2
    assert log.report.rows_read == log.report.rows_kept + sum(log.report.dropped.values())
    assert any("malformed" in line for line in log.report.summary_lines())
    with pytest.raises(ValueError, match="bad_rows"):
        load_events(path, bad_rows="ignore")


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_a_skipped_record_with_a_quoted_line_break_counts_as_one_row(tmp_path: Path,
                                                                     newline: str) -> None:
    # 5 fields for 4, one of them quoted across two lines: one record, one row dropped
    text = HEADER + GOOD + 'u1,2017-11-02,view,"1\n2",extra\n' + "u2,2017-11\n"
    path = tmp_path / "multi.csv"
    path.write_bytes(text.replace("\n", newline).encode())
    log = load_events(path, bad_rows="skip")
    assert len(log.events) == 30
    assert log.report.dropped == {MALFORMED: 2}
    assert log.report.rows_read == 32
    assert "  dropped 2 rows: malformed CSV row" in "\n".join(log.report.summary_lines())
    # the quote closes: the error names the field count, not an unclosed quote
    message = error_of(path)
    assert "line 32 has 5 field(s), expected 4" in message and "not closed" not in message


def test_a_skipped_record_whose_stray_quote_closes_later_counts_the_rows_it_swallowed(
        tmp_path: Path) -> None:
    # A stray quote closed by another three lines on read those lines (rows of their own:
    # they hold separators) into one record of too many fields: 4 rows were lost, not 1.
    text = (HEADER + GOOD + 'u1,"2017-11-02,view,1\nu2,2017-11-02,view,1\n'
            'u3,2017-11-02,view,1\nu4,",2017-11-02,view,1\n')
    log = load_events(write(tmp_path / "stray.csv", text), bad_rows="skip")
    assert len(log.events) == 30
    assert log.report.dropped == {MALFORMED: 1, UNCLOSED_QUOTE: 3}
    assert log.report.rows_read == 34

def test_unterminated_quote_names_its_line_and_counts_swallowed_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "quote.csv",
                 HEADER + GOOD + 'u1,"2017-11-02,view,1\n' + GOOD.replace("\n", "\n\n", 1))
    message = error_of(path)
    assert "line 32" in message and "quote" in message and "31 line(s)" in message
    log = load_events(path, bad_rows="skip")
    # never silently: the record, and each of the 30 rows it swallowed (not the blank line)
    assert log.report.dropped == {MALFORMED: 1, UNCLOSED_QUOTE: 30}
    assert log.report.rows_read == log.report.rows_kept + 31 == 61
    summary = "\n".join(log.report.summary_lines())
    assert "dropped 1 rows: malformed CSV row" in summary
    assert "dropped 30 rows: line read into a malformed row by a quote" in summary


def test_line_numbers_count_the_header_and_blank_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "blank.csv", HEADER + "\n\n" + GOOD + "\nu1,yesterday,view,1\n")
    message = error_of(path)
    assert "data row 31 ('yesterday') (file line 35)" in message


def test_line_numbers_step_over_skipped_rows(tmp_path: Path) -> None:
    path = write(tmp_path / "mix.csv", HEADER + "u1,2017-11\n" + GOOD + "u1,never,view,1\n")
    message = error_of(path, bad_rows="skip")
    assert "data row 31 ('never') (file line 33)" in message


# ------------------------------------------------------------- encodings, compression


def test_utf16_with_bom_is_decoded(tmp_path: Path) -> None:
    (tmp_path / "u16.csv").write_bytes((HEADER + GOOD).encode("utf-16"))
    (tmp_path / "u8bom.csv").write_bytes(codecs.BOM_UTF8 + (HEADER + GOOD).encode())
    for name in ("u16.csv", "u8bom.csv"):
        log = load_events(tmp_path / name)
        assert len(log.events) == 30 and log.report.format == "canonical"


def test_other_encodings_say_how_to_convert(tmp_path: Path) -> None:
    (tmp_path / "latin.csv").write_bytes((HEADER + GOOD + "Jos\xe9,2017-11-02,view,1\n")
                                         .encode("latin-1"))
    message = error_of(tmp_path / "latin.csv")
    assert "is not UTF-8 text" in message and "line 32" in message
    assert "iconv -f WINDOWS-1252 -t UTF-8" in message and "cannot tell" not in message
    (tmp_path / "u16le.csv").write_bytes((HEADER + GOOD).encode("utf-16-le"))
    message = error_of(tmp_path / "u16le.csv")
    assert "UTF-16" in message and "iconv -f UTF-16LE" in message


def test_invalid_utf8_past_the_probe_is_found_while_parsing(tmp_path: Path) -> None:
    body = GOOD * 3000  # about 100 KB: beyond the 64 KB checked up front
    (tmp_path / "late.csv").write_bytes((HEADER + body).encode() + b"\xff\xfe,2017-11-02,"
                                        b"view,1\n")
    message = error_of(tmp_path / "late.csv")
    assert "is not UTF-8 text" in message and f"line {body.count(chr(10)) + 2}" in message


@pytest.mark.parametrize("suffix, compress", [(".csv.gz", gzip.compress),
                                              (".csv.bz2", bz2.compress),
                                              (".csv.xz", lzma.compress)])
def test_truncated_compressed_files(tmp_path: Path, suffix: str, compress: object) -> None:
    data = compress((HEADER + GOOD * 200).encode())  # type: ignore[operator]
    good = tmp_path / f"good{suffix}"
    good.write_bytes(data)
    assert len(load_events(good).events) == 30
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    message = error_of(cut)
    assert cut.name in message and "truncated or corrupt" in message


def test_a_file_whose_name_says_another_format_is_named_for_what_it_is(
        tmp_path: Path) -> None:
    # It said the gzip data was "truncated or corrupt ... re-download", or Parquet's
    # "magic bytes not found in footer".
    text = (HEADER + GOOD).encode()
    pd.read_csv(write(tmp_path / "t.csv", HEADER + GOOD)).to_parquet(tmp_path / "real.parquet")
    parquet = (tmp_path / "real.parquet").read_bytes()
    for name, data, said in (
            ("pq.csv.gz", parquet, r"is a Parquet file, not gzip data: give it a \.parquet name"),
            ("plain.csv.gz", text, r"is plain text, not gzip data: give it a \.csv name"),
            ("gz.csv.bz2", gzip.compress(text), r"is gzip data, not bz2 data: give it a "
                                                r"\.csv\.gz name"),
            ("text.parquet", text, r"is plain text, not a Parquet file: give it a \.csv name"),
            ("gz.parquet", gzip.compress(text), r"is gzip data, not a Parquet file: give it a "
                                                r"\.csv\.gz name")):
        (tmp_path / name).write_bytes(data)
        assert re.search(rf"{re.escape(name)}: {said}$", error_of(tmp_path / name)), name
    # a file of the format its name says, but damaged, is still called damaged
    (tmp_path / "cut.parquet").write_bytes(parquet[:-20])
    assert "not a readable Parquet file" in error_of(tmp_path / "cut.parquet")


def test_zip_archives(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "log.zip", "w") as archive:
        archive.writestr("log.csv", HEADER + GOOD)
    assert len(load_events(tmp_path / "log.zip").events) == 30
    (tmp_path / "cut.zip").write_bytes((tmp_path / "log.zip").read_bytes()[:40])
    assert "truncated or corrupt" in error_of(tmp_path / "cut.zip")


# -------------------------------------------------------- calendar and readiness


def _events(days: list[str], users: int = 6) -> pd.DataFrame:
    rows = [(f"u{u}", pd.Timestamp(d, tz="UTC") + pd.Timedelta(hours=u), "view")
            for d in days for u in range(users)]
    return validate_events(pd.DataFrame(rows, columns=["user_id", "timestamp", "event"]),
                           "frame")


def _with_fading(days: list[str]) -> pd.DataFrame:
    """``_events(days)`` and six users who stop at different times: both decay labels."""
    fading = [_events(days[:n], users=1).assign(user_id=f"f{n}")
              for n in range(40, len(days), 25)]
    return pd.concat([_events(days), *fading], ignore_index=True)


def test_the_calendar_cannot_be_stretched_into_a_hang() -> None:
    config = SnapshotConfig(stride_days=0.05)
    started = time.perf_counter()
    with pytest.raises(DataError, match=r"spans 18,262\.0 days.*stride-days = 0\.05.*more "
                       rf"than {MAX_CUTOFFS:,}"):
        plan_cutoffs(18_262 * 86_400.0, config)
    assert time.perf_counter() - started < 1.0


def test_stray_old_rows_are_found_and_cost_little() -> None:
    days = [str(d.date()) for d in pd.date_range("2017-01-01", "2017-06-30", freq="D")]
    events = _events(days + ["1980-05-05"])
    gap = stray_gap(events["timestamp"])
    assert gap is not None and "the 6 events before 1980-05-06" in gap
    assert "snapshots.start=2017-01-01" in gap
    assert stray_gap(_events(days)["timestamp"]) is None
    started = time.perf_counter()  # 37 years at a 7-day stride: ~1,900 cutoffs, most empty
    snaps, report = build_snapshots(events, SnapshotConfig())
    assert time.perf_counter() - started < 30
    assert report.empty_cutoffs["train"] > 1_800


def test_readiness_needs_val_test_and_enough_training_snapshots() -> None:
    days = [str(d.date()) for d in pd.date_range("2017-01-01", "2017-06-30", freq="D")]
    snaps, report = build_snapshots(_with_fading(days), SnapshotConfig())
    assert federation_problems(snaps, report, 20) == []
    problems = federation_problems(snaps, report, 10_000)
    assert len(problems) == 1 and "data.min-merchant-snapshots" in problems[0]
    # everyone active every day: every label 0, nothing to learn (train said OK, exit 0)
    steady, report = build_snapshots(_events(days), SnapshotConfig())
    assert unscorable(steady, report) == federation_problems(steady, report, 20)[0]
    assert "every training snapshot has decay label 0" in unscorable(steady, report)
    # a stray late row: the val and test cutoffs move to where nobody is active
    late, report = build_snapshots(_events(days + ["2017-10-01"], users=1).pipe(
        lambda one: pd.concat([_events(days), one.tail(1)], ignore_index=True)),
        SnapshotConfig())
    problems = federation_problems(late, report, 20)
    assert any("validation period has no snapshots" in p for p in problems)
    assert any("test period has no snapshots" in p for p in problems)


def test_interventions_that_meet_no_snapshot_are_not_ok() -> None:
    """An interventions file whose users are not the events file's (or whose merchant
    ids are missing while the events have merchants) would train the activation heads
    on nothing while the check said OK."""
    days = [str(d.date()) for d in pd.date_range("2017-01-01", "2017-06-30", freq="D")]
    events = _with_fading(days)

    def interventions(user: str) -> pd.DataFrame:
        frame = pd.DataFrame({"user_id": [user] * 3, "action": ["none", "coupon", "push"],
                              "timestamp": pd.to_datetime(["2017-03-02", "2017-03-09",
                                                           "2017-03-16"], utc=True)})
        return validate_interventions(frame, "frame")

    snaps, report = build_snapshots(events, SnapshotConfig(), interventions("u1"))
    assert sum(report.activation_rows.values()) > 0
    assert federation_problems(snaps, report, 20) == []
    snaps, report = build_snapshots(events, SnapshotConfig(), interventions("nobody"))
    [problem] = federation_problems(snaps, report, 20)
    assert problem.startswith("none of the 3 interventions meets an active snapshot")
    assert "merchant_id" in problem


def test_valid_data_keeps_its_snapshot_counts() -> None:
    days = [str(d.date()) for d in pd.date_range("2017-01-01", "2017-06-30", freq="D")]
    events = _events(days)
    snaps, report = build_snapshots(events, SnapshotConfig())
    per_cutoff = pd.Series(snaps.cutoff).value_counts()
    assert (per_cutoff == 6).all() and report.empty_cutoffs == {"train": 0, "val": 0, "test": 0}
    assert sum(report.snapshots.values()) == len(snaps) == 6 * len(per_cutoff)


def test_data_check_exits_2_with_what_is_missing(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from simulations.cli import main

    def check(*argv: str) -> int:
        return main(["data", "check", *argv])

    days = [str(d.date()) for d in pd.date_range("2017-01-01", "2017-06-30", freq="D")]
    path = tmp_path / "events.csv"
    _with_fading(days).to_csv(path, index=False)
    assert check(str(path)) == 0
    assert "OK: this file can join a federation" in capsys.readouterr().out
    assert check(str(path), "--set", "data.min-merchant-snapshots=5000") == 2
    assert "NOT OK: no merchant has the 5,000 training snapshots" in capsys.readouterr().out
    stray = pd.concat([_events(days), _events(["1985-01-01"], users=1)])
    stray.to_csv(path, index=False)
    assert check(str(path), "--set", "snapshots.stride-days=0.5") == 2
    assert "NOT OK: no events from 1985-01-02 to 2017-01-01" in capsys.readouterr().out
    path.write_text(HEADER + GOOD + "u1,2017-11\n")
    assert check(str(path)) == 2
    assert "line 32 has 2 field" in capsys.readouterr().err
    assert check(str(path), "--bad-rows", "skip") == 2
    run = capsys.readouterr()
    assert "too short" in run.err  # the 30 kept rows span 28 days
    assert "dropped 1 rows: malformed" in run.out


# ------------------------------------------------------------ repeated column names


@pytest.mark.parametrize("header, name, where", [
    ("user_id,timestamp,event,item_id,category_id,merchant_id,value,value", "value",
     "columns 7 and 8"),
    ("user_id,timestamp,event,user_id,value", "user_id", "columns 1 and 4"),
    ("user_id,timestamp,event,Value, VALUE ,value", "value", "columns 4, 5 and 6"),
])
def test_a_column_named_twice_in_a_csv_header(tmp_path: Path, header: str, name: str,
                                              where: str) -> None:
    cells = len(header.split(","))
    row = ",".join(["u1", "2017-11-02T10:00:00Z", "view"] + ["1"] * (cells - 3))
    path = write(tmp_path / "twice.csv", header + "\n" + row + "\n")
    message = error_of(path)
    assert re.search(rf"twice\.csv: column '{name}' appears .* in the header \({where}\)",
                     message), message
    assert "\n" not in message


def test_a_column_named_twice_in_a_retailrocket_header(tmp_path: Path) -> None:
    path = write(tmp_path / "rr.csv", "timestamp,visitorid,event,itemid,transactionid,itemid\n"
                 "1433221332117,257597,view,355908,,1\n")
    assert "column 'itemid' appears twice in the header (columns 4 and 6)" in error_of(path)


def test_a_field_named_twice_in_a_parquet_schema(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table([["u1"], ["2017-11-02T10:00:00Z"], ["view"], [1.0], [2.0]],
                     names=["user_id", "timestamp", "event", "value", "value"])
    pq.write_table(table, tmp_path / "twice.parquet")
    message = error_of(tmp_path / "twice.parquet")
    assert "twice.parquet: column 'value' appears twice in the Parquet schema " \
        "(columns 4 and 5)" in message


def test_a_frame_with_a_column_label_twice() -> None:
    frame = pd.DataFrame([["u1", "2017-11-02", "view", 1, 2]],
                         columns=["user_id", "timestamp", "event", "value", "value"])
    with pytest.raises(DataError, match=r"^frame: column 'value' appears twice .*"
                                        r"\(columns 4 and 5\)"):
        validate_events(frame, "frame")
    frame.columns = ["user_id", "timestamp", "event", "USER_ID", "value"]
    with pytest.raises(DataError, match=r"column 'user_id' appears twice .*columns 1 and 4"):
        validate_events(frame, "frame")


# ----------------------------------------------------------- pipes, devices, sockets

PIPE = r"is a pipe \(or a device/socket\), not a regular file: save it to a file first"


@pytest.mark.timeout(30)
def test_a_named_fifo_is_refused_before_it_is_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "f.csv"
    os.mkfifo(fifo)  # nobody writes: opening it would block forever
    with pytest.raises(DataError, match=rf"f\.csv: {PIPE}"):
        load_events(fifo)
    with pytest.raises(DataError, match=PIPE):
        detect_format(fifo)
    with pytest.raises(DataError, match=PIPE):
        load_events(write(tmp_path / "ok.csv", HEADER + GOOD), interventions_path=fifo)


@pytest.mark.timeout(30)
def test_process_substitution_pipe_is_refused(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, (HEADER + GOOD).encode())
        os.close(write_end)
        path = Path(f"/dev/fd/{read_end}")
        if not path.exists():
            pytest.skip("no /dev/fd on this system")
        with pytest.raises(DataError, match=PIPE):
            detect_format(path)
        with pytest.raises(DataError, match=PIPE):
            load_events(path)
    finally:
        os.close(read_end)


def test_a_device_is_refused_and_a_missing_path_stays_not_found(tmp_path: Path) -> None:
    if Path("/dev/null").exists():
        with pytest.raises(DataError, match=PIPE):
            load_events("/dev/null")
    with pytest.raises(FileNotFoundError):
        detect_format(tmp_path / "missing.csv")


@pytest.mark.parametrize("text", ["", "\n\n", " , ,\n"])
def test_detect_format_of_an_empty_file_is_a_data_error(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "empty.csv", text)
    with pytest.raises(DataError, match="empty file"):
        detect_format(path)


# ------------------------------------------------------------------ property tests


def _load_or_data_error(path: Path) -> None:
    started = time.perf_counter()
    try:
        log = load_events(path)
    except DataError:
        pass
    else:
        assert isinstance(log, EventLog)
        assert log.report.rows_read == log.report.rows_kept + sum(log.report.dropped.values())
        assert np.isfinite(log.events["value"]).all()
    assert time.perf_counter() - started < 10


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=600),
       suffix=st.sampled_from([".csv", ".csv.gz", ".parquet", ".bz2", ".zip", ".txt"]))
@pytest.mark.timeout(600)
def test_arbitrary_bytes_give_an_event_log_or_a_data_error(tmp_path: Path, data: bytes,
                                                           suffix: str) -> None:
    path = tmp_path / f"any{suffix}"
    path.write_bytes(data)
    _load_or_data_error(path)


_CELL = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12),
    st.sampled_from(["view", "purchase", "PV", "0", "1e300", "-1", "nan", "inf", '"',
                     "2017-11-25", "1511568000", "1511568000000", "2017-11-25T10:00:00Z",
                     "", " ", "\\", "\r"]),
)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.lists(_CELL, min_size=1, max_size=6), max_size=8),
       header=st.sampled_from([HEADER, "user_id,timestamp,event\n", ""]))
@pytest.mark.timeout(600)
def test_small_canonical_csvs_give_an_event_log_or_a_data_error(
        tmp_path: Path, rows: list[list[str]], header: str) -> None:
    path = tmp_path / "small.csv"
    path.write_text(header + "".join(",".join(r) + "\n" for r in rows), encoding="utf-8")
    _load_or_data_error(path)
