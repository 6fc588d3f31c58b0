"""Fixtures shared by several test files (shared helpers: ``helpers.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from server.flower_seam import server_task_identity

#: Scripts the slow tests run in a subprocess of their own (``helpers.run_driver``).
collect_ignore = ["drivers"]


@pytest.fixture
def server_identity() -> Iterator[None]:
    """Instruction messages take their run and node id from the running ServerApp."""
    with server_task_identity(run_id=1, node_id=1, task_id=1):
        yield
