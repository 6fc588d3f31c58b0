"""Fixtures shared by several test files (shared helpers: ``helpers.py``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest

from server.flower_seam import server_task_identity

#: Scripts the slow tests run in a subprocess of their own (``helpers.run_driver``).
collect_ignore = ["drivers"]


#: Seconds the slowest files' slow tests took (``make test`` on two workers from a clean
#: clone of 4443e67, ``--durations=25``, summed by file). Under ``--dist loadfile`` a file
#: runs whole on one worker: the longest go first, so no long file starts near the end
#: while the other worker has nothing left (pytest-xdist's own order puts files with the
#: most tests first, which left ``test_deployment.py``, ``test_faults.py`` and
#: ``test_ray_cluster.py``, with few but long tests, to the end).
LONGEST_FILES = {"test_privacy.py": 545, "test_federation.py": 508,
                 "test_deployment.py": 339, "test_faults.py": 236, "test_cli.py": 227,
                 "test_outputs.py": 223, "test_secagg.py": 158, "test_monitor_state.py": 123,
                 "test_customer_placements.py": 97, "test_reasons.py": 87,
                 "test_ray_cluster.py": 85, "test_customer_dp.py": 84,
                 "test_training.py": 55, "test_raypool.py": 48}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under two pytest workers, the files in :data:`LONGEST_FILES` order first (then by
    their number of tests, as pytest-xdist would) and each test's ``timeout`` mark is
    stretched by ``helpers.TIME_SCALE`` (the mark put first is the one pytest-timeout
    reads)."""
    from helpers import TIME_SCALE

    if TIME_SCALE == 1.0:
        return
    counts = Counter(item.path.name for item in items)
    items.sort(key=lambda item: (-LONGEST_FILES.get(item.path.name, 0),
                                 -counts[item.path.name], item.path.name))
    for item in items:
        marker = item.get_closest_marker("timeout")
        if marker is not None and marker.args:
            item.add_marker(pytest.mark.timeout(marker.args[0] * TIME_SCALE), append=False)


@pytest.fixture
def server_identity() -> Iterator[None]:
    """Instruction messages take their run and node id from the running ServerApp."""
    with server_task_identity(run_id=1, node_id=1, task_id=1):
        yield
