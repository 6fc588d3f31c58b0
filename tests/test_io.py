"""Tests for common.io: every adapter, every validation error, drop accounting."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pandas as pd
import pytest

from common.io import (
    FORMATS,
    LoadReport,
    csv_reader,
    detect_format,
    load_events,
    validate_events,
    write_events,
)
from common.schema import (
    DEFAULT_ACTIONS,
    DEFAULT_CATEGORY,
    DEFAULT_MERCHANT,
    EVENT_COLUMNS,
    EVENT_DTYPE,
    STRING,
    DataError,
)

CJ_DIR = Path(__file__).resolve().parents[2] / "shared/data/completejourney"

T0 = pd.Timestamp("2017-11-25 00:00:00", tz="UTC")  # = unix 1511568000
T0_S = 1511568000


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def assert_canonical(df: pd.DataFrame) -> None:
    assert list(df.columns) == list(EVENT_COLUMNS)
    for col in ("user_id", "item_id", "category_id", "merchant_id"):
        assert df[col].dtype == STRING, col
    assert df["timestamp"].dtype == "datetime64[ns, UTC]"
    assert df["event"].dtype == EVENT_DTYPE
    assert df["value"].dtype == "float64"
    assert isinstance(df.index, pd.RangeIndex) and df.index.start == 0
    assert (df["value"] >= 0).all()
    order = df.sort_values(["user_id", "timestamp"], kind="stable").index
    assert list(order) == list(df.index), "not sorted by (user_id, timestamp)"


# ------------------------------------------------------------------------- adapters


def test_canonical_csv(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", (
        "user_id,timestamp,event,value,extra\n"
        "u2,2017-11-25T01:00:00Z, Purchase ,9.5,x\n"
        "u1,2017-11-25 02:00:00+01:00,VIEW,,y\n"
        "u1,2017-11-25T00:00:00,cart,0,z\n"
    ))
    log = load_events(path)
    df = log.events
    assert_canonical(df)
    assert log.report.format == "canonical"
    assert df["user_id"].tolist() == ["u1", "u1", "u2"]
    assert df["event"].tolist() == ["cart", "view", "purchase"]
    # naive time is UTC; +01:00 is converted
    assert df["timestamp"].tolist() == [T0, T0 + pd.Timedelta(hours=1),
                                        T0 + pd.Timedelta(hours=1)]
    assert df["value"].tolist() == [0.0, 0.0, 9.5]
    assert set(df["category_id"]) == {DEFAULT_CATEGORY}
    assert set(df["merchant_id"]) == {DEFAULT_MERCHANT}
    assert set(df["item_id"]) == {""}
    assert log.report.filled == {"value": 1}
    assert log.interventions.empty


def test_canonical_parquet_and_write_round_trip(tmp_path: Path) -> None:
    raw = pd.DataFrame({
        "user_id": [7, 3, 3],  # integer ids become strings
        "timestamp": pd.to_datetime(["2017-11-25 03:00", "2017-11-25 02:00",
                                     "2017-11-25 01:00"]),  # naive -> UTC
        "event": ["favorite", "click", "purchase"],
        "item_id": ["a", "b", "c"],
        "category_id": ["c1", None, "c2"],
        "merchant_id": ["m1", "m1", "m2"],
        "value": [0.0, 1.5, 2.0],
    })
    src = tmp_path / "log.parquet"
    raw.to_parquet(src, index=False)
    log = load_events(src)
    df = log.events
    assert_canonical(df)
    assert df["user_id"].tolist() == ["3", "3", "7"]
    assert df["event"].tolist() == ["purchase", "click", "favorite"]
    assert df["timestamp"].iloc[0] == T0 + pd.Timedelta(hours=1)
    assert df["category_id"].tolist() == ["c2", DEFAULT_CATEGORY, "c1"]
    assert log.report.filled == {"category_id": 1}

    for name in ("again.parquet", "again.csv", "again.csv.gz"):
        out = write_events(df, tmp_path / "sub" / name)
        back = load_events(out).events
        pd.testing.assert_frame_equal(back, df)


def test_taobao(tmp_path: Path) -> None:
    path = write(tmp_path / "UserBehavior.csv", (
        f"1,100,10,pv,{T0_S}\n"
        f"1,100,10,fav,{T0_S + 60}\n"
        f"2,200,20,cart,{T0_S + 5}\n"
        f"2,200,20,buy,{T0_S + 10}\n"
    ))
    assert detect_format(path) == "taobao"
    log = load_events(path, format="taobao")
    df = log.events
    assert_canonical(df)
    assert df["event"].tolist() == ["view", "favorite", "cart", "purchase"]
    assert df["item_id"].tolist() == ["100", "100", "200", "200"]
    assert df["category_id"].tolist() == ["10", "10", "20", "20"]
    assert df["timestamp"].tolist() == [T0 + pd.Timedelta(seconds=s) for s in (0, 60, 5, 10)]
    assert set(df["merchant_id"]) == {DEFAULT_MERCHANT}
    assert log.report.rows_read == log.report.rows_kept == 4


def test_retailrocket(tmp_path: Path) -> None:
    ms = T0_S * 1000
    path = write(tmp_path / "events.csv", (
        "timestamp,visitorid,event,itemid,transactionid\n"
        f"{ms + 1500},9,view,355,\n"
        f"{ms},9,addtocart,355,\n"
        f"{ms + 2000},4,transaction,12,4000\n"
    ))
    assert detect_format(path) == "retailrocket"
    df = load_events(path).events
    assert_canonical(df)
    assert df["user_id"].tolist() == ["4", "9", "9"]
    assert df["event"].tolist() == ["purchase", "cart", "view"]
    assert df["timestamp"].tolist() == [T0 + pd.Timedelta(milliseconds=m) for m in
                                        (2000, 0, 1500)]
    assert set(df["category_id"]) == {DEFAULT_CATEGORY}
    assert set(df["merchant_id"]) == {DEFAULT_MERCHANT}


def test_unix_seconds_vs_milliseconds(tmp_path: Path) -> None:
    path = write(tmp_path / "mixed.csv", (
        "user_id,timestamp,event\n"
        f"a,{T0_S},view\n"
        f"b,{T0_S * 1000},view\n"
        f"c,{T0_S}.25,view\n"
        f"d,{T0_S * 1000 + 7},view\n"
        "e,120000000000,view\n"  # just above 1e11: milliseconds (1973)
    ))
    ts = load_events(path).events.set_index("user_id")["timestamp"]
    assert ts["a"] == T0 and ts["b"] == T0
    assert ts["c"] == T0 + pd.Timedelta(milliseconds=250)
    assert ts["d"] == T0 + pd.Timedelta(milliseconds=7)
    assert ts["e"] == pd.Timestamp(120_000_000_000, unit="ms", tz="UTC")
    # 1e11 itself is seconds, which is the year 5138: out of range, reported
    far = write(tmp_path / "far.csv", "user_id,timestamp,event\na,100000000000,view\n")
    with pytest.raises(DataError, match=r"far\.csv.*'timestamp'.*data row 1"):
        load_events(far)


# ---------------------------------------------------------------- drops and windows


def test_duplicates_and_window_are_counted(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", (
        "user_id,timestamp,event\n"
        "a,2017-11-25T00:00:00Z,view\n"
        "a,2017-11-25T00:00:00Z,view\n"   # duplicate
        "a,2017-11-25T00:00:00Z,view\n"   # duplicate
        "a,2017-11-25T00:00:00Z,cart\n"   # differs in event: kept
        "b,2017-11-24T23:59:59Z,view\n"   # before start
        "b,2017-11-26T00:00:00Z,view\n"   # == end: excluded
        "b,2017-11-25T12:00:00Z,view\n"
    ))
    log = load_events(path, start="2017-11-25", end=pd.Timestamp("2017-11-26", tz="UTC"),
                      chunksize=2)
    rep = log.report
    assert rep.rows_read == 7
    assert rep.rows_kept == len(log.events) == 3
    assert rep.dropped == {"exact duplicate": 2, "outside window": 2}
    assert rep.rows_read == rep.rows_kept + sum(rep.dropped.values())
    lines = "\n".join(rep.summary_lines())
    assert "exact duplicate" in lines and "outside window" in lines and "7 rows read" in lines


def test_chunked_equals_whole(tmp_path: Path) -> None:
    lines = [f"u{i % 3},{T0_S + i},{['view', 'cart', 'purchase'][i % 3]},{i}" for i in range(11)]
    path = write(tmp_path / "log.csv", "user_id,timestamp,event,value\n" + "\n".join(lines))
    whole = load_events(path).events
    chunked = load_events(path, chunksize=3).events
    pd.testing.assert_frame_equal(whole, chunked)
    assert len(whole) == 11


def test_interventions_file(tmp_path: Path) -> None:
    events = write(tmp_path / "log.csv", "user_id,timestamp,event\na,2017-11-25,view\n")
    inter = write(tmp_path / "inter.csv", (
        "user_id,timestamp,action,propensity\n"
        "a,2017-11-25,Coupon,0.5\n"
        "a,2017-11-26,none,\n"
        "b,2017-11-27,none,\n"
        "b,2017-11-28,push,\n"
        "b,2019-01-01,push,\n"  # outside window
    ))
    log = load_events(events, interventions_path=inter, end="2018-01-01")
    df = log.interventions
    assert df["action"].dtype == pd.CategoricalDtype(list(DEFAULT_ACTIONS))
    assert df["timestamp"].dtype == "datetime64[ns, UTC]"
    assert df["user_id"].dtype == STRING and df["merchant_id"].dtype == STRING
    # NaN propensity -> observed share of that action among the 4 kept rows
    assert df["propensity"].tolist() == [0.5, 0.5, 0.5, 0.25]
    assert log.report.interventions_dropped == {"outside window": 1}
    assert log.report.propensities_filled == 3 and log.report.interventions_ambiguous == 0
    text = "\n".join(log.report.summary_lines())
    assert "by action: none 2, recommend 0, coupon 1, push 1" in text
    assert "filled 3 missing propensity" in text and "control" not in text

    bad = write(tmp_path / "bad_inter.csv", "user_id,timestamp,action\na,2017-11-25,email\n")
    with pytest.raises(DataError, match=r"bad_inter\.csv.*'action'.*'email'.*coupon"):
        load_events(events, interventions_path=bad)
    # Times the events file may not hold are refused here too, not quietly unmatched.
    future = write(tmp_path / "future.csv", "user_id,timestamp,action\na,2017-11-25,none\n"
                                            "a,2235-11-26,push\n")
    with pytest.raises(DataError, match=r"future\.csv.*'timestamp'.*implausible.*data row 2"):
        load_events(events, interventions_path=future)


def test_an_interventions_file_of_another_separator_or_without_rows_is_named(
        tmp_path: Path) -> None:
    events = write(tmp_path / "log.csv", "user_id,timestamp,event\na,2017-11-25,view\n")
    # semicolons and decimal commas: it said "line 2 has 2 field(s), expected 1"
    semi = write(tmp_path / "semi.csv", "user_id;timestamp;action;propensity\n"
                                        "a;2017-11-25;coupon;0,5\n")
    with pytest.raises(DataError, match=r"semi\.csv: missing required column\(s\) 'user_id', "
                                        r".*separated by semicolons"):
        load_events(events, interventions_path=semi)
    # a header only: no interventions, and the summary said nothing of the file
    empty = write(tmp_path / "empty.csv", "user_id,timestamp,action\n")
    log = load_events(events, interventions_path=empty)
    assert len(log.interventions) == 0
    assert (f"  interventions: none ({empty} has a header only): no action's effect can be "
            "learnt from it") in log.report.summary_lines()
    assert not any(line.startswith("  interventions")
                   for line in load_events(events).report.summary_lines())
    (tmp_path / "ivs").mkdir()
    with pytest.raises(DataError, match=r"ivs: is a folder, not an interventions file"):
        load_events(events, interventions_path=tmp_path / "ivs")


def test_null_tokens_are_missing_ids_and_float_exported_ids_read_as_integers(
        tmp_path: Path) -> None:
    # "NULL" or "\\N" in user_id made one pseudo-customer holding every such row.
    for token in ("NULL", "\\N", "nan", "None", "#N/A"):
        path = write(tmp_path / "null.csv", "user_id,timestamp,event\na,2017-11-25,view\n"
                                            f"{token},2017-11-26,view\n")
        with pytest.raises(DataError, match=r"null\.csv.*missing user id.*data row 2"):
            load_events(path)
    # A category column exported from pandas as floats: 13.0 in the CSV, 13 in Parquet.
    frame = pd.DataFrame({"user_id": ["a", "b", "c"], "event": ["view"] * 3,
                          "timestamp": ["2017-11-25", "2017-11-26", "2017-11-27"],
                          "category_id": [13.0, float("nan"), 7.0]})
    frame.to_csv(tmp_path / "f.csv", index=False)
    frame.to_parquet(tmp_path / "f.parquet")
    csv, parquet = (load_events(tmp_path / f"f.{s}").events for s in ("csv", "parquet"))
    assert csv["category_id"].tolist() == parquet["category_id"].tolist()
    assert "13" in csv["category_id"].tolist() and "NA" not in csv["category_id"].tolist()
    real = write(tmp_path / "real.csv", "user_id,timestamp,event,category_id\n"
                                        "NA,2017-11-25,view,1.5\nb,2017-11-26,view,13.0\n")
    events = load_events(real).events  # "NA" may be a real id; each 13.0 reads 13
    assert sorted(events["user_id"]) == ["NA", "b"]
    assert set(events["category_id"]) == {"1.5", "13"}
    # value by value: the same id in two chunks of one file reads the same
    mixed = write(tmp_path / "mixed.csv", "user_id,timestamp,event\n" + "".join(
        f"{u},2017-11-2{i % 9},view\n" for i, u in enumerate(["3.0", "x7", "3.0", "4.0"])))
    assert set(load_events(mixed, chunksize=1).events["user_id"]) == {"3", "4", "x7"}


def test_ids_a_spreadsheet_wrote_in_scientific_notation_are_refused(tmp_path: Path) -> None:
    # Excel writes a long numeric id as 1.23457E+11: three customers read as one, and
    # two of their rows were then dropped as exact duplicates, without a word.
    rows = "".join(f"{u},2017-11-25,view,{c}\n" for u, c in
                   (("1.23457E+11", "7"), ("1.23457E+11", "7"), ("1.23457E+11", "7")))
    path = write(tmp_path / "excel.csv", "user_id,timestamp,event,category_id\n" + rows)
    with pytest.raises(DataError, match=r"excel\.csv: column 'user_id' has id\(s\) written in "
                                        r"scientific notation .*data rows 1 \('1\.23457E\+11'\)"
                                        r".*\(file lines 2, 3, 4\); expected .*as text"):
        load_events(path)
    for column, cell in (("item_id", "9E+12"), ("merchant_id", "-4.2e+07"),
                         ("category_id", "1.5e+3")):
        other = write(tmp_path / "other.csv", f"user_id,timestamp,event,{column}\n"
                                              f"a,2017-11-25,view,x\nb,2017-11-26,view,{cell}\n")
        with pytest.raises(DataError, match=rf"'{column}' has id\(s\) written in scientific"
                                            r".*data row 2 .*file line 3"):
            load_events(other)
    iv = write(tmp_path / "iv.csv", "user_id,timestamp,action\n1.2E+11,2017-11-25,coupon\n")
    ok = write(tmp_path / "ok.csv", "user_id,timestamp,event\n1.2E+11x,2017-11-25,view\n")
    with pytest.raises(DataError, match=r"iv\.csv: column 'user_id' has id\(s\) written in"):
        load_events(ok, interventions_path=iv)
    # codes that only look alike stay ids: no exponent sign, letters around, no mantissa,
    # a negative exponent (no rounded whole number is written with one)
    codes = write(tmp_path / "codes.csv", "user_id,timestamp,event,item_id\n" + "".join(
        f"u,2017-11-2{i},view,{c}\n" for i, c in enumerate(["1E5", "E+11", "12E+3", "2.5E+1a",
                                                             "1E-05"])))
    assert sorted(load_events(codes).events["item_id"]) == ["12E+3", "1E-05", "1E5", "2.5E+1a",
                                                            "E+11"]


def test_unix_times_a_spreadsheet_rounded_are_refused(tmp_path: Path) -> None:
    # Excel writes 1509530400000 (ms) as 1.50953E+12: the times were read 10,000 s
    # apart at best, 2.8 hours off, without a word.
    rows = "".join(f"u{i},{t},view\n" for i, t in
                   enumerate(["1509530400000", "1.50953E+12", "1.509530e+09"]))
    path = write(tmp_path / "excel.csv", "user_id,timestamp,event\n" + rows)
    with pytest.raises(DataError, match=r"excel\.csv: column 'timestamp' has unix time\(s\) "
                                        r"written in scientific notation.*data rows 2 "
                                        r"\('1\.50953E\+12'\), 3 \('1\.509530e\+09'\) "
                                        r"\(file lines 3, 4\); expected .*in full"):
        load_events(path)
    # written to the second (or finer), scientific notation is read as the number it is
    exact = write(tmp_path / "exact.csv", "user_id,timestamp,event\n"
                                          "a,1.509530400e+09,view\nb,1.509530400123E+12,view\n")
    assert [str(t) for t in load_events(exact).events["timestamp"]] == [
        "2017-11-01 10:00:00+00:00", "2017-11-01 10:00:00.123000+00:00"]
    # Java, Spark and numpy write the shortest exact form, trailing zeros dropped: a column
    # holding mantissas longer than a spreadsheet's 7 digits is such a writer's, all exact
    java = write(tmp_path / "java.csv", "user_id,timestamp,event\n"
                                        "a,1.5095304E9,view\nb,1.50953046E9,view\n"
                                        "c,1.50953E9,view\nd,1.5095304E12,view\n")
    events = load_events(java).events
    assert {u: str(t) for u, t in zip(events["user_id"], events["timestamp"], strict=True)} == {
        "a": "2017-11-01 10:00:00+00:00", "b": "2017-11-01 10:01:00+00:00",
        "c": "2017-11-01 09:53:20+00:00", "d": "2017-11-01 10:00:00+00:00"}


def test_an_id_holding_a_line_break_is_refused(tmp_path: Path) -> None:
    # A stray quote opening an id field, closed by another on a later line, read the
    # lines between into that id: u2's row was lost without a word. (A line break alone,
    # as in "a\nb", may be an odd id; followed by a separator it holds rows.)
    path = write(tmp_path / "stray.csv", "user_id,timestamp,event,item_id\n"
                                         'u1,2017-11-01,view,"x1\nu2,2017-11-02,view,x2"\n'
                                         "u3,2017-11-03,view,x3\n")
    with pytest.raises(DataError, match=r"stray\.csv: column 'item_id' has id\(s\) holding a "
                                        r"line break .*data row 1 .*\(file line 2\); expected "
                                        r".*stray quote"):
        load_events(path)
    iv = write(tmp_path / "iv.csv", 'user_id,timestamp,action\n"a\nb,2017-11-26,push",'
                                    "2017-11-25,none\n")
    with pytest.raises(DataError, match=r"iv\.csv: column 'user_id' has id\(s\) holding a line"):
        load_events(write(tmp_path / "ok.csv", "user_id,timestamp,event\na,2017-11-25,view\n"),
                     interventions_path=iv)


def test_a_row_without_a_merchant_beside_named_merchants_is_refused(tmp_path: Path) -> None:
    # Such a row became merchant "local": one merchant more in a pooled log.
    path = write(tmp_path / "m.csv", "user_id,timestamp,event,merchant_id\n"
                                     "a,2017-11-25,view,m1\nb,2017-11-25,view,\n"
                                     "c,2017-11-25,view,m2\n")
    with pytest.raises(DataError, match=r"m\.csv: column 'merchant_id' has missing merchant "
                                        r"id.*data row 2 .*file line 3"):
        load_events(path)
    with pytest.raises(DataError, match=r"m\.csv: 1 row has no merchant_id \(the first at "
                                        r"data row 2, file line 3\) while the others name 2 "
                                        r"merchant"):
        load_events(path, chunksize=1)  # the chunk of row 2 names no merchant at all
    empty = write(tmp_path / "one.csv", "user_id,timestamp,event,merchant_id\n"
                                        "a,2017-11-25,view,\nb,2017-11-25,view,NULL\n")
    log = load_events(empty)  # an empty column: a log of one merchant
    assert set(log.events["merchant_id"]) == {DEFAULT_MERCHANT}
    assert log.report.filled["merchant_id"] == 2
    actions = write(tmp_path / "iv.csv", "user_id,timestamp,action,merchant_id\n"
                                         "a,2017-11-25,push,m1\nc,2017-11-25,push,\n")
    with pytest.raises(DataError, match=r"iv\.csv: column 'merchant_id'.*data row 2"):
        load_events(write(tmp_path / "two.csv", "user_id,timestamp,event,merchant_id\n"
                                                "a,2017-11-25,view,m1\n"
                                                "c,2017-11-25,view,m2\n"),
                    interventions_path=actions)


def test_rows_the_window_drops_need_no_merchant_and_chunks_are_checked_across(
        tmp_path: Path) -> None:
    # Rows outside the load's start/end window are not used: without a merchant id they make no
    # merchant, so they do not fail the load, in one chunk or across chunks.
    head = "user_id,timestamp,event,merchant_id\n"
    path = write(tmp_path / "w.csv", head + "a,2017-11-25,view,m1\nb,2017-10-01,view,\n"
                                            "c,2017-11-26,view,m2\n")
    for chunksize in (1, 3):
        log = load_events(path, start="2017-11-01", chunksize=chunksize)
        assert set(log.events["merchant_id"]) == {"m1", "m2"}
        assert "merchant_id" not in log.report.filled
    # Inside the window the row is refused, named with its data row and file line, as
    # are interventions: a chunk naming no merchant beside chunks that do.
    late = write(tmp_path / "late.csv", head + "a,2017-11-25,view,m1\n\n"
                                              "b,2017-11-27,view,\nc,2017-11-26,view,m2\n")
    with pytest.raises(DataError, match=r"late\.csv: 1 row has no merchant_id \(the first "
                                        r"at data row 2, file line 4\)"):
        load_events(late, chunksize=1)
    events = write(tmp_path / "two.csv", head + "a,2017-11-25,view,m1\nc,2017-11-25,view,m2\n")
    actions = write(tmp_path / "iv.csv", "user_id,timestamp,action,merchant_id\n"
                                         "a,2017-11-25,push,m1\nc,2017-10-01,push,\n"
                                         "c,2017-10-02,push,\n")
    with pytest.raises(DataError, match=r"iv\.csv: 2 rows have no merchant_id \(the first "
                                        r"at data row 2, file line 3\) while the others "
                                        r"name 1 merchant"):
        load_events(events, interventions_path=actions, chunksize=1)
    log = load_events(events, interventions_path=actions, chunksize=1, start="2017-11-01")
    assert set(log.interventions["merchant_id"]) == {"m1"}


def test_parquet_float_ids_beyond_2_53_and_sentinel_dates_are_named(tmp_path: Path) -> None:
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq

    # 9007199254740993 is stored as ...992: two customers would silently become one.
    big = tmp_path / "big.parquet"
    pd.DataFrame({"user_id": [9007199254740993.0, 5.0], "event": ["view"] * 2,
                  "timestamp": ["2017-11-25"] * 2}).to_parquet(big)
    with pytest.raises(DataError, match=r"big\.parquet: column 'user_id' has id\(s\) stored "
                                        r"as floating-point numbers beyond 2\^53 .* at data row 1"):
        load_events(big)
    # A sentinel date in a Parquet time column failed with pandas' OutOfBoundsDatetime.
    sentinel = tmp_path / "sentinel.parquet"
    pq.write_table(pa.table({
        "user_id": ["a", "b"], "event": ["view", "view"],
        "timestamp": pa.array([dt.datetime(2017, 11, 25), dt.datetime(9999, 12, 31)],
                              pa.timestamp("us"))}), sentinel)
    with pytest.raises(DataError, match=r"sentinel\.parquet: column 'timestamp' has time\(s\) "
                                        r"outside .* at data row 2 \('9999-12-31"):
        load_events(sentinel)
    # The message quotes the file's own value: naive stays naive, a zone stays its zone
    # (it quoted the value converted to UTC).
    for zone, shown in ((None, "'9999-12-31'"), ("Asia/Tokyo", "'9999-12-31 09:00:00+09:00'")):
        pq.write_table(pa.table({
            "user_id": ["a", "b"], "event": ["view", "view"],
            "timestamp": pa.array([dt.datetime(2017, 11, 25), dt.datetime(9999, 12, 31)],
                                  pa.timestamp("us", tz=zone))}), sentinel)
        with pytest.raises(DataError, match=rf"at data row 2 \({re.escape(shown)}\)"):
            load_events(sentinel)


def test_float32_ids_are_exact_only_below_2_24_and_infinite_ids_are_named(
        tmp_path: Path) -> None:
    import numpy as np

    # A float32 column holds integers exactly only below 2^24: 16777217 reads 16777216.
    small = tmp_path / "f32.parquet"
    frame = pd.DataFrame({"user_id": np.array([16_777_215, 16_777_217], dtype="float32"),
                          "event": ["view"] * 2, "timestamp": ["2017-11-25"] * 2})
    frame.to_parquet(small)
    with pytest.raises(DataError, match=r"f32\.parquet: column 'user_id' has id\(s\) stored "
                                        r"as floating-point numbers beyond 2\^24 .* at data "
                                        r"row 2 \('1\.6777216e\+07'\)"):
        load_events(small)
    frame.iloc[:1].to_parquet(small)
    assert load_events(small).events["user_id"].tolist() == ["16777215"]
    # An infinite id is no number an id can be (it was "beyond 2^53").
    inf = tmp_path / "inf.parquet"
    pd.DataFrame({"user_id": ["u1", "u2"], "item_id": [1.0, -np.inf], "event": ["view"] * 2,
                  "timestamp": ["2017-11-25"] * 2}).to_parquet(inf)
    with pytest.raises(DataError, match=r"inf\.parquet: column 'item_id' has infinite "
                                        r"value\(s\) .* at data row 2 \('-inf'\)"):
        load_events(inf)


def test_the_report_says_what_the_learner_makes_of_an_interventions_file(
        tmp_path: Path) -> None:
    events = write(tmp_path / "log.csv", "user_id,timestamp,event\na,2017-11-25,view\n"
                                         "b,2017-11-25,view\n")

    def report(name: str, rows: str) -> str:
        inter = write(tmp_path / name, "user_id,timestamp,action,propensity\n" + rows)
        return "\n".join(load_events(events, interventions_path=inter).report.summary_lines())

    # One customer, one moment, two actions: ambiguous; the same action twice is a duplicate.
    text = report("two.csv", "a,2017-11-26,push,0.5\na,2017-11-26,coupon,0.5\n"
                             "b,2017-11-26,none,0.5\nb,2017-11-26,none,0.5\n")
    assert "two or more actions logged for one customer at one moment: 1 such" in text
    assert "dropped 1 interventions: exact duplicate" in text
    assert "no control rows" in report("treated.csv", "a,2017-11-26,push,0.5\n")
    assert "only control rows" in report("control.csv", "a,2017-11-26,none,0.5\n")


# ----------------------------------------------------------------------- validation

BAD_FILES = {
    "missing column": ("user_id,timestamp,value\na,2017-11-25,1\n",
                       [r"'event'", r"missing required column"]),
    "unparsable timestamp": ("user_id,timestamp,event\na,2017-11-25,view\nb,yesterday,view\n",
                             [r"'timestamp'", r"data row 2", r"'yesterday'", r"ISO-8601"]),
    "unknown event": ("user_id,timestamp,event\na,2017-11-25,view\na,2017-11-25,like\n",
                      [r"'event'", r"data row 2", r"'like'",
                       r"view, click, cart, favorite, purchase"]),
    "negative value": ("user_id,timestamp,event,value\na,2017-11-25,view,1\n"
                       "a,2017-11-26,view,2\na,2017-11-27,purchase,-3.5\n",
                       [r"'value'", r"data row 3", r"'-3.5'", r">= 0"]),
    "non-numeric value": ("user_id,timestamp,event,value\na,2017-11-25,view,lots\n",
                          [r"'value'", r"data row 1", r"'lots'", r"number"]),
    "missing user": ("user_id,timestamp,event\n,2017-11-25,view\n",
                     [r"'user_id'", r"data row 1"]),
    "empty file": ("", [r"empty file"]),
    "header only": ("user_id,timestamp,event\n", [r"no data rows"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_validation_errors_name_file_column_and_row(tmp_path: Path, case: str) -> None:
    text, patterns = BAD_FILES[case]
    path = write(tmp_path / f"bad_{case.replace(' ', '_')}.csv", text)
    with pytest.raises(DataError) as info:
        load_events(path, format="canonical")
    message = str(info.value)
    assert path.name in message
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)


def test_error_row_numbers_count_across_chunks(tmp_path: Path) -> None:
    rows = [f"a,{T0_S + i},view" for i in range(6)] + ["a,not-a-time,view"]
    path = write(tmp_path / "late.csv", "user_id,timestamp,event\n" + "\n".join(rows))
    with pytest.raises(DataError, match=r"late\.csv.*data row 7 \('not-a-time'\)"):
        load_events(path, chunksize=2)
    # A quoted field holding a newline: rows are numbered by the line they start on.
    quoted = write(tmp_path / "quoted.csv", 'user_id,timestamp,event,item_id\n'
                   'u1,2017-11-25,view,"a\nb"\nu2,2017-11-25,like,c\n\nu3,2017-11-25,bad,d\n')
    with pytest.raises(DataError, match=r"data rows 2 \('like'\), 3 \('bad'\) \(file lines 4, 6\)"):
        load_events(quoted)


def test_line_numbers_step_over_skipped_multiline_records_and_long_fields(
        tmp_path: Path) -> None:
    # A record dropped by bad_rows='skip' (5 fields for 4) whose quoted field holds a
    # newline: the rows after it start one line later than its first line suggests.
    header = "user_id,timestamp,event,item_id\n"
    skipped = write(tmp_path / "skipped.csv", header + 'u1,2017-11-25,view,"a\nb",extra\n'
                    "u2,2017-11-25,view,c\nu3,2017-11-25,bad,d\n")
    with pytest.raises(DataError, match=r"data row 2 \('bad'\) \(file line 5\)"):
        load_events(skipped, bad_rows="skip")
    # A field longer than csv's default limit (131,072 characters) holding newlines
    # before the bad row: the rescan reads past it (and so does the format sniff when
    # the field is among the first rows).
    field = '"' + "x" * 200_000 + '\ny\nz"'
    plain = "".join(f"u0,2017-11-25,view,{i}\n" for i in range(5))
    limit = csv.field_size_limit()
    for before, line in (("", 5), (plain, 10)):
        long = write(tmp_path / "long.csv", header + before + f"u1,2017-11-25,view,{field}\n"
                     "u2,2017-11-25,bad,d\n")
        with pytest.raises(DataError, match=rf"\('bad'\) \(file line {line}\)"):
            load_events(long)
    assert csv.field_size_limit() == limit  # restored
    ok = write(tmp_path / "ok.csv", header + f"u1,2017-11-25,view,{field}\n")
    assert load_events(ok).events["item_id"].str.len().tolist() == [200_004]


def test_quoted_line_breaks_load_across_parse_blocks(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # CSV is parsed in blocks (16 MB); a valid quoted line break in a file of more than
    # one block failed the load: "CSV parser got out of sync with chunker".
    monkeypatch.setattr(csv_reader, "_BLOCK_BYTES", 1000)
    header = "user_id,timestamp,event,item_id\n"
    rows = "".join(f'u{i % 3},2017-11-{1 + i % 28:02d},view,"item\n{i}"\n' for i in range(300))
    events = load_events(write(tmp_path / "multi.csv", header + rows)).events
    assert len(events) == 300 and set(events["item_id"]) == {f"item\n{i}" for i in range(300)}
    # a quote never closed runs on past a block: the error names the line it opens on
    good = "".join(f"u{i % 3},2017-11-{1 + i % 28:02d},view,x{i}\n" for i in range(100))
    cut = write(tmp_path / "cut.csv", header + good + 'u1,2017-11-02,view,"oops\n' + good)
    for bad_rows in ("error", "skip"):
        with pytest.raises(DataError, match=r"cut\.csv: a quoted field opened at data row 101 "
                                            r"\(file line 102\) is not closed"):
            load_events(cut, bad_rows=bad_rows)


def test_wrong_format_is_reported(tmp_path: Path) -> None:
    rr = write(tmp_path / "events.csv",
               "timestamp,visitorid,event,itemid,transactionid\n1433221332117,257597,view,355908,\n")
    with pytest.raises(DataError, match=r"events\.csv.*'taobao'.*looks like retailrocket"):
        load_events(rr, format="taobao")
    taobao = write(tmp_path / "ub.csv", f"1,2,3,pv,{T0_S}\n")
    with pytest.raises(DataError, match=r"ub\.csv.*'canonical'.*looks like taobao"):
        load_events(taobao, format="canonical")
    # header of unknown shape read as taobao: the behaviour column does not match
    odd = write(tmp_path / "odd.csv", f"1,2,3,click,{T0_S}\n")
    with pytest.raises(DataError, match=r"odd\.csv.*'event'.*pv, cart, fav, buy"):
        load_events(odd, format="taobao")
    # a RetailRocket file missing a column
    short = write(tmp_path / "rr_short.csv", "timestamp,visitorid,event\n1433221332117,1,view\n")
    with pytest.raises(DataError, match=r"rr_short\.csv.*'itemid'"):
        load_events(short)


def test_other_separators_are_named_and_extra_columns_keep_the_canonical_format(
        tmp_path: Path) -> None:
    for sep, name in ((";", "semicolons"), ("\t", "tabs"), ("|", "pipes")):
        path = write(tmp_path / "log.csv", sep.join(["user_id", "timestamp", "event"])
                     + "\n" + sep.join(["u1", "2017-11-25", "view"]) + "\n")
        with pytest.raises(DataError, match=rf"log\.csv: the fields are separated by {name}"):
            load_events(path)
        with pytest.raises(DataError, match=rf"missing required.*separated by {name}"):
            load_events(path, format="canonical")
    # A canonical log that also carries another format's id column (household_id from a
    # Complete Journey join, visitorid) was taken for that format.
    for extra in ("household_id", "visitorid"):
        path = write(tmp_path / "x.csv", f"user_id,timestamp,event,{extra}\n"
                                         "u1,2017-11-25,view,h1\n")
        assert detect_format(path) == "canonical"
        assert load_events(path).events["user_id"].tolist() == ["u1"]


def test_detect_format_lists_formats_when_nothing_fits(tmp_path: Path) -> None:
    path = write(tmp_path / "mystery.csv", "a,b\n1,2\n")
    with pytest.raises(DataError) as info:
        detect_format(path)
    assert "mystery.csv" in str(info.value)
    assert all(name in str(info.value) for name in FORMATS)
    with pytest.raises(DataError, match="completejourney"):
        detect_format(tmp_path)  # a folder without transactions
    with pytest.raises(FileNotFoundError):
        detect_format(tmp_path / "absent.csv")


def test_validate_events_on_a_frame() -> None:
    raw = pd.DataFrame({"User_ID": ["x"], "timestamp": [T0_S * 1000], "event": ["CART"],
                        "value": [None]})
    df = validate_events(raw, "frame")
    assert df["timestamp"].tolist() == [T0]
    assert df["event"].tolist() == ["cart"]
    assert df["value"].tolist() == [0.0]
    with pytest.raises(DataError, match=r"frame: column 'value'.*negative"):
        validate_events(raw.assign(value=[-1.0]), "frame")


def test_report_summary() -> None:
    rep = LoadReport(path="f.csv", format="taobao", rows_read=10, rows_kept=7,
                     dropped={"exact duplicate": 3})
    assert rep.summary_lines() == ["f.csv (taobao): 10 rows read, 7 kept",
                                   "  dropped 3 rows: exact duplicate"]


# ---------------------------------------------------------------- Complete Journey


def test_completejourney_folder() -> None:
    if not (CJ_DIR / "transactions_sample.csv").is_file():
        pytest.skip(f"{CJ_DIR} is absent")
    assert detect_format(CJ_DIR) == "completejourney"
    log = load_events(CJ_DIR)
    df, rep = log.events, log.report
    assert_canonical(df)
    assert rep.format == "completejourney"
    assert rep.rows_read == 75_000
    assert rep.rows_read == rep.rows_kept + sum(rep.dropped.values())
    assert len(df) > 70_000
    assert df["merchant_id"].nunique() > 50
    assert set(df["event"].unique()) == {"purchase"}
    assert (df["value"] >= 0).all()
    assert df["category_id"].nunique() > 100
    assert df["timestamp"].between(pd.Timestamp("2017-01-01", tz="UTC"),
                                   pd.Timestamp("2018-01-02", tz="UTC")).all()
    inter = log.interventions
    assert len(inter) > 1000
    assert set(inter["action"].unique()) == {"coupon"}
    assert inter["propensity"].between(0, 1, inclusive="right").all()
    assert inter["merchant_id"].isin(set(df["merchant_id"])).all()
    # the transactions file itself is accepted too, and a window is applied
    june = load_events(CJ_DIR / "transactions_sample.csv", start="2017-06-01",
                       end="2017-07-01")
    assert 0 < june.report.rows_kept < rep.rows_kept
    assert june.report.dropped["outside window"] == rep.rows_kept - june.report.rows_kept


def test_completejourney_returns_are_dropped_and_counted(tmp_path: Path) -> None:
    write(tmp_path / "transactions_sample.csv", (
        "household_id,store_id,basket_id,product_id,quantity,sales_value,retail_disc,"
        "coupon_disc,coupon_match_disc,week,transaction_timestamp\n"
        "1,10,b1,100,1,2.5,0,0,0,1,2017-01-02 10:00:00\n"
        "1,10,b2,101,1,-2.5,0,0,0,1,2017-01-03 10:00:00\n"
        "1,11,b3,100,1,1.0,0,0,0,1,2017-01-04 10:00:00\n"
        "2,11,b4,999,1,4.0,0,0,0,1,2017-01-05 10:00:00\n"
    ))
    write(tmp_path / "products.csv", (
        "product_id,manufacturer_id,department,brand,product_category,product_type,"
        "package_size\n100,1,GROCERY,X,MILK,,\n101,1,DRUG GM,X,,,\n"
    ))
    write(tmp_path / "campaigns.csv", "campaign_id,household_id\n1,1\n1,3\n")
    write(tmp_path / "campaign_descriptions.csv",
          "campaign_id,campaign_type,start_date,end_date\n1,Type A,2017-01-03,2017-02-01\n")
    log = load_events(tmp_path)
    df = log.events
    assert log.report.dropped == {"return (negative sales_value)": 1}
    assert df["user_id"].tolist() == ["1", "1", "2"]
    assert df["category_id"].tolist() == ["MILK", "MILK", DEFAULT_CATEGORY]
    assert df["merchant_id"].tolist() == ["10", "11", "11"]
    assert df["timestamp"].iloc[0] == pd.Timestamp("2017-01-02 10:00", tz="UTC")
    inter = log.interventions
    # household 3 has no transactions: dropped and counted; 2 of 3 households targeted
    assert inter["user_id"].tolist() == ["1"]
    assert inter["merchant_id"].tolist() == ["10"]  # tie 10/11 -> smallest id
    assert inter["propensity"].tolist() == pytest.approx([2 / 3])
    assert inter["timestamp"].tolist() == [pd.Timestamp("2017-01-03", tz="UTC")]
    assert log.report.interventions_dropped == {"household without kept transactions": 1}
    # A bad start date is named in the file that holds it.
    write(tmp_path / "campaign_descriptions.csv",
          "campaign_id,campaign_type,start_date,end_date\n1,Type A,someday,2017-02-01\n")
    with pytest.raises(DataError, match=r"campaign_descriptions\.csv: column 'start_date'"):
        load_events(tmp_path)


def test_completejourney_errors_name_its_columns_and_unused_campaigns_are_not_checked(
        tmp_path: Path) -> None:
    head = ("household_id,store_id,basket_id,product_id,quantity,sales_value,retail_disc,"
            "coupon_disc,coupon_match_disc,week,transaction_timestamp\n")
    rows = ["1,10,b1,100,1,2.5,0,0,0,1,2017-01-02 10:00:00",
            "2,11,b4,999,1,4.0,0,0,0,1,2017-01-05 10:00:00"]
    # A missing store_id is named as the file names it (it was 'merchant_id'), in one
    # chunk or across chunks; so is a household_id.
    write(tmp_path / "transactions.csv", head + "\n".join(rows + [
        "3,,b5,100,1,1.0,0,0,0,1,2017-01-06 10:00:00"]) + "\n")
    with pytest.raises(DataError, match=r"transactions\.csv: column 'store_id' has missing "
                                        r"merchant id.*data row 3 .*file line 4"):
        load_events(tmp_path)
    with pytest.raises(DataError, match=r"transactions\.csv: 1 row has no store_id \(the "
                                        r"first at data row 3, file line 4\)"):
        load_events(tmp_path, chunksize=1)
    write(tmp_path / "transactions.csv", head + "\n".join(rows + [
        ",10,b5,100,1,1.0,0,0,0,1,2017-01-06 10:00:00"]) + "\n")
    with pytest.raises(DataError, match=r"column 'household_id' has missing user id"):
        load_events(tmp_path)
    (tmp_path / "rr").mkdir()
    rr = write(tmp_path / "rr" / "events.csv",
               "timestamp,visitorid,event,itemid,transactionid\n1433221332117,,view,355,\n")
    with pytest.raises(DataError, match=r"column 'visitorid' has missing user id"):
        load_events(rr)  # RetailRocket's columns are named as its file names them too
    # Campaign 2 targets only household 3, which has no transactions: it is dropped
    # (counted), so its description's bad date does not fail the load; a used one does.
    write(tmp_path / "transactions.csv", head + "\n".join(rows) + "\n")
    write(tmp_path / "campaigns.csv", "campaign_id,household_id\n1,1\n2,3\n3,3\n")
    write(tmp_path / "campaign_descriptions.csv",
          "campaign_id,campaign_type,start_date,end_date\n1,Type A,2017-01-03,2017-02-01\n"
          "2,Type B,someday,2017-02-01\n1,Type A,again someday,2017-02-01\n")
    log = load_events(tmp_path)
    assert log.interventions["user_id"].tolist() == ["1"]
    assert log.report.interventions_dropped == {"household without kept transactions": 2}
    write(tmp_path / "campaigns.csv", "campaign_id,household_id\n1,1\n2,2\n")
    with pytest.raises(DataError, match=r"campaign_descriptions\.csv: column 'start_date' has "
                                        r"unparsable timestamp.* data row 2 \('someday'\)"):
        load_events(tmp_path)


def test_an_interventions_file_of_other_users_is_refused(tmp_path: Path) -> None:
    """Another merchant's file, or one without merchant_id beside a log of several
    merchants: the activation heads would learn from nothing."""
    events = write(tmp_path / "log.csv", "user_id,timestamp,event,merchant_id\n"
                                         "a,2017-11-25,view,m1\nb,2017-11-25,view,m2\n")
    mine = write(tmp_path / "mine.csv", "user_id,timestamp,action,merchant_id\n"
                                        "a,2017-11-26,none,m1\nz,2017-11-26,push,m1\n")
    assert len(load_events(events, interventions_path=mine).interventions) == 2
    theirs = write(tmp_path / "theirs.csv", "user_id,timestamp,action,merchant_id\n"
                                            "y,2017-11-26,none,m1\nz,2017-11-26,push,m2\n")
    with pytest.raises(DataError, match=r"theirs\.csv: none of its 2 interventions names a "
                       r"user \(with its merchant\) of .*log\.csv; is it"):
        load_events(events, interventions_path=theirs)
    bare = write(tmp_path / "bare.csv", "user_id,timestamp,action\na,2017-11-26,none\n")
    with pytest.raises(DataError, match=r"no merchant_id column and the events name 2 "
                       "merchants"):
        load_events(events, interventions_path=bare)
