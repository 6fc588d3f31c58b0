"""The per-round bookkeeping both ways of running rounds share (``server.rounds``)."""

from __future__ import annotations

import threading

from server.rounds import RoundBook, numeric


def test_a_resumed_run_books_its_rounds_under_the_global_round() -> None:
    book = RoundBook()
    book.offset = 3
    g = book.global_round(1)
    stats = book.sampled(g, [7, 2, 5], bytes_each=100)
    assert g == 4 and book.stats == {4: stats} and book.get(1) is None
    assert (stats.sampled, stats.awaited, stats.bytes_down) == (3, [2, 5, 7], 300)


def test_failed_rejected_and_silent_nodes_are_counted_and_named() -> None:
    book = RoundBook()
    book.sampled(1, [1, 2, 3, 4])
    book.failed(1, 2, "gone")
    book.rejected(1, 3, "tensor 0 holds NaN or infinite values")
    book.missing(1, answered={2, 3, 4}, limit="5 s")
    stats = book.round(1)
    assert (stats.failed, stats.rejected, stats.timed_out) == (2, 1, 1)
    assert stats.failures == ["node 2: gone",
                              "node 3: rejected: tensor 0 holds NaN or infinite values",
                              "node 1: no reply within round-timeout 5 s"]
    line = stats.line_fields()
    assert (line["sampled"], line["failed"], line["failures"]) == (4, 2, stats.failures)


def test_only_twenty_failure_reasons_reach_the_metrics_line() -> None:
    book = RoundBook()
    for node in range(25):
        book.failed(1, node, "gone")
    assert book.round(1).failed == 25 and len(book.round(1).line_fields()["failures"]) == 20


def test_empty_rounds_are_counted_and_metrics_kept_numeric() -> None:
    book = RoundBook()
    book.empty(1, "no client replied with usable weights")
    book.empty(2, "secure aggregation did not complete")
    book.train_metrics(2, {"train_loss": 0.5, "num-examples": 3, "note": "x", "l": [1.0]})
    assert book.empty_rounds == 2
    assert book.round(2).train == {"train_loss": 0.5, "num-examples": 3.0}
    assert numeric({"a": 1, "b": "2"}) == {"a": 1.0}


def test_no_round_starts_once_the_engine_failed_or_the_rounds_stopped() -> None:
    failed = threading.Event()
    book = RoundBook(failed)
    assert book.may_start(1) and not book.engine_down
    failed.set()
    assert not book.may_start(2) and book.engine_down
    assert book.round(2).sampled == 0  # recorded, with nothing sampled
    other = RoundBook()
    other.stopped_by = RuntimeError("patience")
    assert not other.may_start(1) and other.get(1) is None
