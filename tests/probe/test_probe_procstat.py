"""CPU time and memory from /proc, as the probe reads them for the server under test."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tsunagu.probe import procstat


def test_sample_of_this_process_counts_cpu_and_memory() -> None:
    before = procstat.sample(os.getpid())
    deadline = time.process_time() + 0.1
    while time.process_time() < deadline:
        pass
    after = procstat.sample(os.getpid())
    assert before.processes >= 1 and before.rss_bytes > 1_000_000
    # /proc counts in clock ticks (10 ms here): 100 ms of work shows as at least 50 ms.
    assert after.cpu_seconds - before.cpu_seconds >= 0.05


def test_children_are_included() -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nend = time.time() + 0.3\nwhile time.time() < end: pass",
        ]
    )
    try:
        assert child.pid in procstat.descendants(os.getpid())
        alone = procstat.sample(child.pid)
        together = procstat.sample(os.getpid())
        assert together.processes >= 2
        assert together.rss_bytes > alone.rss_bytes
    finally:
        child.wait(5)
    assert child.pid not in procstat.descendants(os.getpid())


def test_a_process_that_is_gone_raises() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(5)
    with pytest.raises(OSError):
        procstat.sample(child.pid)
