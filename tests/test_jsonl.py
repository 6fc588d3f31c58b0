"""common.jsonl: the one writer and reader of the JSON-lines files a run appends to."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common import jsonl


def test_read_jsonl_leaves_out_a_cut_last_line_and_names_a_bad_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1}\n\n{"round": 2}\n{"round": 3, "auc"')  # killed mid-write
    assert jsonl.read(path) == [{"round": 1}, {"round": 2}]
    assert "metrics.jsonl: line 4 is cut" in caplog.text
    path.write_text('{"round": 1}\n{"round": 2, oops}\n{"round": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 2 is not valid JSON"):
        jsonl.read(path)
    path.write_text('{"round": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 2 is not a JSON object"):
        jsonl.read(path)


def test_append_writes_one_line_a_record_and_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    jsonl.append(path, {"round": 1, "auc": np.float32(0.5)}, default=lambda v: v.item())
    jsonl.append(path, {"round": 2, "auc": float("nan")})
    assert path.read_text().count("\n") == 2
    rows = jsonl.read(path)
    assert rows[0] == {"round": 1, "auc": 0.5} and rows[1]["round"] == 2
    with pytest.raises(ValueError):  # the ledgers refuse NaN rather than write it
        jsonl.append(path, {"epsilon": float("nan")}, allow_nan=False)
    assert len(jsonl.read(path)) == 2
