"""Which rounds of a federation the bench counts as steady (``steady_rounds``)."""

from __future__ import annotations

from simulations.bench import steady_rounds


def _line(g: int, seconds: float, evaluated: bool = False) -> dict:
    return {"round": g, "round_seconds": seconds,
            "centralised": {"val_loss": 0.5} if evaluated else {}}


def test_round_one_and_the_evaluated_rounds_are_left_out() -> None:
    lines = [_line(0, 6.0, True), _line(1, 60.0), _line(2, 8.0), _line(3, 7.0),
             _line(4, 9.5, True)]
    assert steady_rounds(lines) == [8.0, 7.0]


def test_evaluated_rounds_count_when_nothing_else_is_left() -> None:
    assert steady_rounds([_line(0, 6.0, True), _line(1, 60.0), _line(2, 9.0, True)]) == [9.0]
    assert steady_rounds([_line(0, 6.0, True), _line(1, 60.0, True)]) == [60.0]
    assert steady_rounds([_line(0, 6.0, True)]) == []
