"""The benchmark's memory sampler reads this process's tree from /proc."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simulations.memory import TreeSampler, children_of, descendants, pss_bytes

pytestmark = pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(),
                                reason="needs Linux's /proc/<pid>/smaps_rollup")


def test_a_child_holding_memory_is_counted() -> None:
    # The child holds ~200 MB of touched pages until it is stopped.
    child = subprocess.Popen([sys.executable, "-c",
                              "import sys, time; b = bytearray(200 * 2**20); "
                              "b[::4096] = b'x' * len(b[::4096]); print('ready', flush=True); "
                              "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        assert child.pid in descendants(os.getpid())
        with TreeSampler(every=0.05) as sampler:
            time.sleep(0.2)
        peaks = sampler.peaks
        assert peaks.total - peaks.driver >= 190 * 2**20
        assert 0 < peaks.driver < peaks.total
        assert peaks.actors == 0 and peaks.actor == 0  # no Ray worker among them
    finally:
        child.kill()
        child.wait(timeout=10)


def test_an_ended_process_reads_as_nothing(tmp_path: Path) -> None:
    assert pss_bytes(2**22 + 12345) == 0  # above Linux's largest pid
    fake = tmp_path / "proc"
    (fake / "7").mkdir(parents=True)
    (fake / "7" / "stat").write_text("7 (odd) name)) S 1 7 7 0")
    (fake / "9").mkdir()
    (fake / "9" / "stat").write_text("9 (kid) S 7 9 9 0")
    (fake / "self").mkdir()
    assert children_of(fake) == {1: [7], 7: [9]}
    assert sorted(descendants(7, fake)) == [7, 9]
