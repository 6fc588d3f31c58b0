"""docs/reliability.md lists every fault and bad input with what the user sees and the
test that shows it: every test it names must exist, and each row names one."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
CLASSES = {"clear error", "handled"}
_TEST = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def _rows() -> list[list[str]]:
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 4 and not set(cells[0]) <= {"-", " ", ":"} \
                and cells[0] != "fault or bad input":
            rows.append(cells)
    return rows


def _defined(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}


def test_every_row_names_an_existing_test_and_an_outcome() -> None:
    rows = _rows()
    assert len(rows) >= 30
    defined: dict[str, set[str]] = {}
    for fault, seen, outcome, test in rows:
        assert outcome in CLASSES, (fault, outcome)
        assert seen, fault
        named = _TEST.findall(test)
        assert named, f"row {fault!r} names no test"
        for file, name in named:
            if file not in defined:
                assert (ROOT / file).exists(), f"{file} (row {fault!r}) does not exist"
                defined[file] = _defined(ROOT / file)
            assert name in defined[file], f"{file}::{name} (row {fault!r}) does not exist"
