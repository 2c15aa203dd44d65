"""Worker processes: several processes serving the same TURN ports.

With ``workers`` > 1 the process that ``tsunagu serve`` started is worker 0; it starts
workers 1..N-1 with :func:`start_workers`. Each worker binds the same ports with
SO_REUSEPORT, so the kernel spreads clients over them. A child reads its configuration and
the secrets every worker must share (:class:`WorkerShare`) as one JSON line on stdin, runs
the same serve function as worker 0, and says ``tsunagu: ready`` on stdout once its
listeners are bound. No worker reads its UDP sockets until every worker has bound them
(:func:`release_workers` writes ``go`` on each child's stdin): each socket that joins a
port moves some clients' datagrams to another socket. The stdin stays open: when worker 0
goes away, the child drains.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import IO, Any

from .config import Config, config_from_json, config_to_json

__all__ = [
    "DRAINED_LINE",
    "READING_LINE",
    "READY_LINE",
    "WorkerShare",
    "loop_factory",
    "release_workers",
    "start_workers",
    "wait_drained",
    "wait_reading",
    "worker_main",
]

READY_LINE = "tsunagu: ready"
# What worker 0 writes on a worker's stdin once every worker has bound the ports.
GO_LINE = b"go\n"
# What a worker says on stdout when its drain is over; it then keeps its sockets until
# worker 0 closes its stdin.
DRAINED_LINE = "tsunagu: drained"
# What a worker says on stdout once it reads its UDP sockets after worker 0's word.
READING_LINE = "tsunagu: reading"
# How long a worker may take to bind its listeners before the start-up counts as failed.
_START_TIMEOUT = 30.0
# The child command: the serve module sits above this one, so only the child imports it.
_CHILD = (
    "from tsunagu.serve import serve; from tsunagu.workers import worker_main; "
    "raise SystemExit(worker_main(serve))"
)

ServeFunction = Callable[[Config, "WorkerShare | None"], Coroutine[Any, Any, int]]


@dataclass(frozen=True, slots=True)
class WorkerShare:
    """What every worker process of one server must agree on."""

    turn_secret: str
    nonce_secret: bytes
    index: int
    admin_dir: str = ""
    """The private (0700) directory where each worker k > 0 answers worker 0's admin
    requests on ``worker-<k>.sock``; empty without the admin API."""


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory where uvloop is installed, else None (asyncio's own loop).

    Used with :class:`asyncio.Runner` rather than a global event loop policy: uvloop's
    ``install()`` is deprecated, and this leaves the process-wide policy alone.
    """
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _payload(config: Config, share: WorkerShare, index: int) -> bytes:
    document = {
        "config": config_to_json(config),
        "turn_secret": share.turn_secret,
        "nonce_secret": share.nonce_secret.hex(),
        "index": index,
        "admin_dir": share.admin_dir,
    }
    return json.dumps(document).encode() + b"\n"


def _read_payload(line: str | bytes) -> tuple[Config, WorkerShare]:
    document = json.loads(line)
    share = WorkerShare(
        document["turn_secret"],
        bytes.fromhex(document["nonce_secret"]),
        document["index"],
        document.get("admin_dir", ""),
    )
    return config_from_json(document["config"]), share


def _wait_ready(stdout: IO[bytes]) -> bool:
    for line in stdout:
        if line.startswith(READY_LINE.encode()):
            return True
    return False


async def start_workers(config: Config, share: WorkerShare) -> list[subprocess.Popen[bytes]]:
    """Start workers 1..N-1 and wait (bounded) until each has bound its listeners.

    Returns the children, or an empty list if any of them did not become ready; the caller
    kills what was started.
    """
    children: list[subprocess.Popen[bytes]] = []
    for index in range(1, config.workers):
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert child.stdin is not None
        # Only worker 0 serves the web app.
        child.stdin.write(_payload(dataclasses.replace(config, no_web=True), share, index))
        child.stdin.flush()
        children.append(child)
    ready = []
    for child in children:
        assert child.stdout is not None
        try:
            if await asyncio.wait_for(asyncio.to_thread(_wait_ready, child.stdout), _START_TIMEOUT):
                ready.append(child)
        except TimeoutError:
            pass
    return ready if len(ready) == len(children) else ready[:0]


def release_workers(children: list[subprocess.Popen[bytes]], *, stop: bool = False) -> None:
    """Tell every worker that all of them have bound the ports: they may answer on UDP;
    with ``stop``, that all of them have drained: they may close them and exit."""
    for child in children:
        assert child.stdin is not None
        try:
            if stop:
                child.stdin.close()
            else:
                child.stdin.write(GO_LINE)
                child.stdin.flush()
        except OSError:
            pass  # gone already: worker 0 sees it when it stops


def _wait_line(stdout: IO[bytes], line: str) -> bool:
    for text in stdout:
        if text.startswith(line.encode()):
            return True
    return False


async def wait_drained(children: list[subprocess.Popen[bytes]], timeout: float) -> int:
    """Wait (at most ``timeout`` seconds) until every worker says its drain is over, or is
    gone; how many said so."""
    return await _wait_lines(children, DRAINED_LINE, timeout)


async def wait_reading(children: list[subprocess.Popen[bytes]], timeout: float) -> int:
    """Wait (at most ``timeout`` seconds) until every worker released by
    :func:`release_workers` says it reads its UDP sockets; how many said so."""
    return await _wait_lines(children, READING_LINE, timeout)


async def _wait_lines(children: list[subprocess.Popen[bytes]], line: str, timeout: float) -> int:
    async def one(child: subprocess.Popen[bytes]) -> bool:
        assert child.stdout is not None
        return await asyncio.to_thread(_wait_line, child.stdout, line)

    tasks = [asyncio.create_task(one(child)) for child in children]
    done, pending = await asyncio.wait(tasks, timeout=timeout) if tasks else (set(), set())
    for task in pending:
        task.cancel()
    return sum(1 for task in done if not task.cancelled() and task.result())


def worker_main(serve: ServeFunction) -> int:
    """Entry point of worker processes 1..N-1: run ``serve`` with what arrives on stdin."""
    config, share = _read_payload(sys.stdin.readline())
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return int(runner.run(serve(config, share)))
