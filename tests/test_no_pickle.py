"""Nothing the project persists or loads can run code: no pickle anywhere in its code,
and pickle payloads planted where state files are expected never run."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "client", "server", "simulations")
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "shelve",
                  "marshal"}


class Payload:
    """Unpickling this creates ``marker``: proof that a load ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def _sources() -> list[Path]:
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def test_project_code_imports_no_unpickler_and_never_allows_pickle() -> None:
    found = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names
                      if n.split(".")[0] in UNSAFE_MODULES]
            if isinstance(node, ast.keyword) and node.arg == "allow_pickle" and not (
                    isinstance(node.value, ast.Constant) and node.value.value is False):
                found.append(f"{path.relative_to(ROOT)}:{node.value.lineno} allow_pickle")
    assert found == []


def _object_npz(path: Path, marker: Path, names: list[str]) -> Path:
    np.savez(path, **{n: np.array([Payload(marker)], dtype=object) for n in names})
    return path


def test_planted_snapshot_files_are_rebuilt_or_refused_never_run(tmp_path: Path) -> None:
    import dataclasses

    from client.shards import load_saved
    from common.snapshots import Snapshots

    marker = tmp_path / "ran"
    names = [f.name for f in dataclasses.fields(Snapshots)]
    cache = _object_npz(tmp_path / "00000.snapshots-0123456789abcdef.npz", marker, names)
    assert load_saved(cache) is None  # the client builds the snapshots again
    raw = tmp_path / "00001.snapshots-0123456789abcdef.npz"
    raw.write_bytes(pickle.dumps(Payload(marker)))
    assert load_saved(raw) is None
    with pytest.raises(ValueError):
        Snapshots.load(_object_npz(tmp_path / "eval.npz", marker, names))
    assert not marker.exists()
