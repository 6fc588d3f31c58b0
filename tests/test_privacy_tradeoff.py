"""``fedecay privacy tradeoff``: utility against ε across comparisons, by population."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from simulations.cli import main
from simulations.privacy_tradeoff import format_tradeoff, tradeoff_rows


def _method(auc: float, mode: str | None = None, z: float = 1.0, eps: float = 3.0,
            customers: int | None = None) -> dict[str, Any]:
    method: dict[str, Any] = {"decay": {"roc_auc": auc}, "membership": {"auc": 0.5}}
    if mode is not None:
        method["privacy"] = {"mode": mode, "noise_multiplier": z, "epsilon": eps,
                             "delta": 1e-6, "customers": customers}
    return method


def _comparison(folder: Path, merchants: int, train: int, methods: dict[str, Any],
                declared: int | None = None) -> Path:
    """A run folder as ``fedecay compare`` leaves it (the parts the reader uses)."""
    folder.mkdir(parents=True)
    experiment: dict[str, Any] = {"synthetic.num-merchants": merchants}
    if declared:
        experiment["privacy.customers"] = declared
    (folder / "results.json").write_text(json.dumps({
        "experiment": experiment, "methods": methods,
        "data": {"merchants": merchants, "snapshots": {"train": train, "test": 10}}}))
    return folder


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    small = _comparison(tmp_path / "small-merchant", 30, 5_000, {
        "centralised": _method(0.82),
        "federated-fedavg": _method(0.81),
        "federated-fedavg-dp2": _method(0.77, "server-fixed", z=2, eps=10.7),
        "federated-fedavg-dp1": _method(0.79, "server-fixed", z=1, eps=25.9)})
    small_customer = _comparison(tmp_path / "small-customer", 30, 5_000, {
        "federated-fedavg-cdp1": _method(0.80, "customer-central", eps=2.9,
                                         customers=9_983)}, declared=9_983)
    large = _comparison(tmp_path / "large", 100, 20_000, {
        "federated-fedavg-ddp1": _method(0.79, "customer-distributed", eps=3.2,
                                         customers=41_000)})
    return [large, small_customer, small]


def test_rows_group_by_population_and_measure_the_gap_to_no_dp(runs: list[Path]) -> None:
    rows = tradeoff_rows(runs)
    assert [(r["merchants"], r["mode"], r["noise_multiplier"]) for r in rows] == [
        (30, "none", None), (30, "customer-central", 1), (30, "server-fixed", 1),
        (30, "server-fixed", 2), (100, "customer-distributed", 1)]
    by_method = {(r["merchants"], r["method"]): r for r in rows}
    assert "centralised" not in {r["method"] for r in rows}  # federated models only
    assert by_method[30, "federated-fedavg-dp2"]["auc_gap"] == pytest.approx(0.04)
    # The gap crosses runs of the same population; a population without a
    # non-private federated model has none.
    assert by_method[30, "federated-fedavg-cdp1"]["auc_gap"] == pytest.approx(0.01)
    assert by_method[100, "federated-fedavg-ddp1"]["auc_gap"] is None
    table = format_tradeoff(rows)
    # A declared customer count names the population; else its training snapshots.
    assert "| 30 merchants, 9,983 customers | server-fixed | 2 | 10.7 |" in table
    assert ("| 100 merchants, 20,000 training snapshots | customer-distributed | 1 | 3.2 |"
            " 1e-06 | 41,000 | 0.7900 | – | 0.500 |") in table


def test_cli_prints_the_table_and_writes_the_figure_and_json(
        runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, dest = tmp_path / "figs" / "tradeoff.png", tmp_path / "tradeoff.json"
    assert main(["privacy", "tradeoff", *map(str, runs), "--out", str(out),
                 "--json", str(dest)]) == 0
    printed = capsys.readouterr().out
    assert "| 30 merchants, 9,983 customers | customer-central |" in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(json.loads(dest.read_text())["rows"]) == 5


def _empty(folder: Path) -> None:
    folder.mkdir()


def _writes(text: str) -> Any:
    def make(folder: Path) -> None:
        folder.mkdir()
        (folder / "results.json").write_text(text)
    return make


@pytest.mark.parametrize(("make", "message"), [
    (_empty, "no results.json; give a folder fedecay compare wrote"),
    (_writes("[1, 2]"), "not a comparison's results"),
    (_writes('{"methods": '), "results.json: unreadable"),
    (lambda d: _comparison(d, 3, 10, {"centralised": _method(0.8)}), "no federated model in"),
])
def test_a_folder_that_is_not_a_comparison_is_named(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Any, message: str) -> None:
    folder = tmp_path / "run"
    make(folder)
    assert main(["privacy", "tradeoff", str(folder)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(folder) in err and "Traceback" not in err
