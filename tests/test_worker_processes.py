"""How worker 0 talks to the other worker processes (tsunagu/workers.py), with real child
processes: their lines read by the event loop, waits that time out without leaving a reader
behind, a worker that will not exit, and SIGHUP still ignored across exec."""

from __future__ import annotations

import signal
import sys
import threading
import time

from tsunagu.workers import Worker, _wait_lines, release_workers, wait_exited

# A child that says "first", later "second", then waits for its stdin to close.
TALKER = (
    "import sys, time; print('first', flush=True); time.sleep(0.6);"
    " print('second', flush=True); sys.stdin.read()"
)


async def test_a_wait_that_times_out_leaves_its_line_to_the_next_one() -> None:
    threads = threading.active_count()
    child = await Worker.start([sys.executable, "-c", TALKER])
    try:
        # "second" comes 0.6 s later: this wait gives up first...
        assert await _wait_lines([child], "second", 0.2) == 0
        # ...and nothing it left behind reads on: the next wait still gets the line.
        assert await _wait_lines([child], "second", 5.0) == 1
        assert threading.active_count() == threads
    finally:
        release_workers([child], stop=True)
        began = time.monotonic()
        await wait_exited([child], 5.0)
    assert child.process.returncode == 0
    assert time.monotonic() - began < 2.0


async def test_a_line_that_never_comes_ends_at_the_child_exit() -> None:
    child = await Worker.start([sys.executable, "-c", "print('other', flush=True)"])
    began = time.monotonic()
    assert await _wait_lines([child], "tsunagu: drained", 10.0) == 0
    assert time.monotonic() - began < 5.0
    await wait_exited([child], 5.0)


async def test_a_worker_that_will_not_exit_is_killed() -> None:
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    child = await Worker.start([sys.executable, "-c", stubborn])
    await _wait_lines([child], "never", 0.3)
    child.signal(signal.SIGTERM)
    began = time.monotonic()
    await wait_exited([child], 0.5)
    assert child.process.returncode == -signal.SIGKILL
    assert time.monotonic() - began < 3.0
    # Reaped: signalling it again is nothing.
    child.signal(signal.SIGTERM)
    child.kill()


async def test_sighup_ignored_by_serve_stays_ignored_in_a_worker() -> None:
    report = (
        "import signal; print('ignored' if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN"
        " else 'default', flush=True)"
    )
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        child = await Worker.start([sys.executable, "-c", report])
    finally:
        signal.signal(signal.SIGHUP, before)
    assert await child.output.readline() == b"ignored\n"
    await wait_exited([child], 5.0)
