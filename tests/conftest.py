"""Fixtures shared by several test files (shared helpers: ``helpers.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from server.flower_seam import server_task_identity

#: Scripts the slow tests run in a subprocess of their own (``helpers.run_driver``).
collect_ignore = ["drivers"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under two pytest workers, each test's ``timeout`` mark is stretched by
    ``helpers.TIME_SCALE`` (the mark put first is the one pytest-timeout reads)."""
    from helpers import TIME_SCALE

    if TIME_SCALE == 1.0:
        return
    for item in items:
        marker = item.get_closest_marker("timeout")
        if marker is not None and marker.args:
            item.add_marker(pytest.mark.timeout(marker.args[0] * TIME_SCALE), append=False)


@pytest.fixture
def server_identity() -> Iterator[None]:
    """Instruction messages take their run and node id from the running ServerApp."""
    with server_task_identity(run_id=1, node_id=1, task_id=1):
        yield
