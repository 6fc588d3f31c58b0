"""Fixtures shared by several test files (shared helpers: ``helpers.py``)."""

from __future__ import annotations

import pytest
from flwr.supercore.task_identity import TaskIdentity

#: Scripts the slow tests run in a subprocess of their own (``helpers.run_driver``).
collect_ignore = ["drivers"]


@pytest.fixture
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Instruction messages take their run and node id from the running ServerApp."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
