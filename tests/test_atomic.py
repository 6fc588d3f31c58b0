"""common.atomic: a file is replaced whole or not at all."""

import pytest

from common import atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    target = atomic.write_text(tmp_path / "state.json", "old")
    with pytest.raises(RuntimeError), atomic.replacing(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_the_temp_file_keeps_the_suffix_and_replaces_the_target(tmp_path):
    target = tmp_path / "model.keras"
    with atomic.replacing(target, durable=False) as tmp:
        assert tmp.suffix == ".keras" and tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["model.keras"]
