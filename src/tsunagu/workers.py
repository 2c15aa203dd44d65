"""Worker processes: several processes serving the same TURN ports.

With ``workers`` > 1 the process that ``tsunagu serve`` started is worker 0; it starts
workers 1..N-1 with :func:`start_workers`. Every worker serves the same ports, each on
sockets of its own in one SO_REUSEPORT group per port, so the kernel spreads clients over
them. A child reads its configuration and
the secrets every worker must share (:class:`WorkerShare`) as one JSON line on stdin, runs
the same serve function as worker 0, and says ``tsunagu: ready`` on stdout once it
serves its listeners. Worker 0 binds every worker's listening sockets and passes each
worker its own (``pass_fds``; :attr:`WorkerShare.udp_fds`), keeping a copy: a worker
started again takes over the sockets of the one that died, in the same place in each
port's SO_REUSEPORT group, so that no other worker's clients move. No worker reads its UDP
sockets until every worker serves (:func:`release_workers` writes ``go`` on each child's
stdin). The stdin stays open: when worker 0 goes away, the child drains.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from .config import Config, config_from_json, config_to_json
from .logs import structured

log = logging.getLogger("tsunagu")

__all__ = [
    "DRAINED_LINE",
    "READING_LINE",
    "READY_LINE",
    "Sockets",
    "Worker",
    "WorkerShare",
    "exit_cause",
    "keep_workers",
    "loop_factory",
    "release_workers",
    "start_workers",
    "wait_drained",
    "wait_exited",
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
# A worker that exits while the server runs is started again, at most this many times in
# this many seconds (keep_workers).
RESTART_LIMIT = 5
RESTART_WINDOW = 60.0
# How long a worker may take to bind its listeners before the start-up counts as failed.
_START_TIMEOUT = 30.0
# The child command: the serve module sits above this one, so only the child imports it.
_CHILD = (
    "from tsunagu.serve import serve; from tsunagu.workers import worker_main; "
    "raise SystemExit(worker_main(serve))"
)


@dataclass(eq=False)
class Worker:
    """A worker process 1..N-1 as worker 0 started it: worker 0 writes on its stdin and the
    event loop reads its stdout, so that a wait for one of its lines that times out leaves
    no reader behind (a thread blocked on the pipe would hold the process at exit) and no
    line is read by a wait that no longer wants it.

    A plain ``Popen``, not an asyncio subprocess: exec keeps the signals serve ignores
    (SIGHUP during the start), where uvloop's spawn resets them.
    """

    process: subprocess.Popen[bytes]
    output: asyncio.StreamReader
    pipe: asyncio.BaseTransport

    @classmethod
    async def start(cls, command: list[str], pass_fds: tuple[int, ...] = ()) -> Worker:
        process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=pass_fds
        )
        output = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        pipe, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(output), process.stdout
        )
        return cls(process, output, pipe)

    def write(self, data: bytes) -> None:
        """Write a line on the worker's stdin (a few bytes: the pipe never fills)."""
        assert self.process.stdin is not None
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def close_stdin(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)  # nothing once it has been reaped

    def kill(self) -> None:
        self.process.kill()

    async def exited(self, timeout: float) -> bool:
        """Whether the worker exits within ``timeout`` seconds (reaped if so)."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def close(self) -> None:
        """Close both pipes (the worker has exited)."""
        with contextlib.suppress(OSError):
            self.close_stdin()
        self.pipe.close()


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
    udp_fds: tuple[int, ...] = ()
    """Worker k > 0: its UDP listening sockets, which worker 0 bound (in endpoint order)."""
    tcp_fds: tuple[int, ...] = ()
    """Worker k > 0: its TCP (and TLS) listening sockets, likewise."""


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
        "udp_fds": list(share.udp_fds),
        "tcp_fds": list(share.tcp_fds),
    }
    return json.dumps(document).encode() + b"\n"


def _read_payload(line: str | bytes) -> tuple[Config, WorkerShare]:
    document = json.loads(line)
    share = WorkerShare(
        document["turn_secret"],
        bytes.fromhex(document["nonce_secret"]),
        document["index"],
        document.get("admin_dir", ""),
        tuple(document.get("udp_fds", ())),
        tuple(document.get("tcp_fds", ())),
    )
    return config_from_json(document["config"]), share


async def _wait_line(child: Worker, line: str) -> bool:
    """Read the child's output until ``line``; False at its end.

    Cancelled (a wait that timed out), it leaves what it has not read in the child's stream
    for the next wait: no reader outlives a wait, and none takes another's line.
    """
    while text := await child.output.readline():
        if text.startswith(line.encode()):
            return True
    return False


Sockets = tuple[tuple[int, ...], tuple[int, ...]]
"""A worker's listening sockets as worker 0 holds them: UDP and TCP file descriptors."""


async def start_workers(config: Config, share: WorkerShare, sockets: list[Sockets]) -> list[Worker]:
    """Start workers 1..N-1, worker k on ``sockets[k]``, and wait (bounded) until each
    serves its listeners.

    Returns the children; an empty list, after killing what was started, if any of them
    did not become ready.
    """
    children: list[Worker] = []
    for index in range(1, config.workers):
        children.append(await _start_worker(config, share, index, sockets[index]))
    ready = await _wait_lines(children, READY_LINE, _START_TIMEOUT)
    if ready == len(children):
        return children
    await wait_exited(children, 0.0)
    return []


async def _start_worker(config: Config, share: WorkerShare, index: int, sockets: Sockets) -> Worker:
    udp, tcp = sockets
    child = await Worker.start([sys.executable, "-c", _CHILD], pass_fds=(*udp, *tcp))
    share = dataclasses.replace(share, udp_fds=udp, tcp_fds=tcp)
    try:
        # Only worker 0 serves the web app.
        child.write(_payload(dataclasses.replace(config, no_web=True), share, index))
    except OSError:  # it died at once
        await wait_exited([child], 0.0)
        raise
    return child


def exit_cause(returncode: int) -> str:
    """How a process ended, in words: ``killed by SIGKILL``, ``exit status 1``."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


async def keep_workers(
    children: list[Worker],
    current: Callable[[], Config],
    share: WorkerShare,
    sockets: list[Sockets],
    *,
    given_up: Callable[[int], None] = lambda index: None,
    interval: float = 0.5,
    limit: int = RESTART_LIMIT,
    window: float = RESTART_WINDOW,
    restarts: collections.Counter[int] | None = None,
) -> None:
    """While the server runs, start again a worker that exits (a crash, the OOM killer, an
    operator's kill), in its place in ``children``, with the configuration in force now
    (``current``: reloads included) on the same sockets (``sockets[k]``, which worker 0
    kept).

    Its allocations are gone with it; starting it again gives the server back its capacity.
    The other workers' clients notice nothing: the dead worker's sockets stayed in their
    place in each port's group, holding what its clients sent meanwhile. At most ``limit``
    restarts in ``window`` seconds: a worker that keeps dying is left dead, the log says
    so, and ``given_up(k)`` is called (worker 0 closes its copies of the sockets, so that
    the kernel hashes the dead worker's clients over the others). ``restarts`` counts the
    restarts by worker index (for the metrics). Runs until cancelled (the stop).
    """
    recent: list[float] = []
    abandoned: set[int] = set()
    while True:
        await asyncio.sleep(interval)
        for position, child in enumerate(children):
            returncode = child.process.poll()
            index = position + 1
            if returncode is None or index in abandoned:
                continue
            child.close()
            now = time.monotonic()
            recent = [when for when in recent if now - when < window]
            if len(recent) >= limit:
                abandoned.add(index)
                given_up(index)
                log.error(
                    "worker %d exited (%s); not started again: %d restarts in the last %.0f s",
                    index,
                    exit_cause(returncode),
                    len(recent),
                    window,
                    extra=structured(
                        {"event": "worker", "cause": "worker keeps exiting", "worker": index}
                    ),
                )
                continue
            recent.append(now)
            log.error(
                "worker %d (pid %d) exited (%s): its allocations are gone; starting it again",
                index,
                child.process.pid,
                exit_cause(returncode),
                extra=structured({"event": "worker", "cause": "worker exited", "worker": index}),
            )
            try:
                replacement = await _start_worker(current(), share, index, sockets[index])
            except OSError as exc:  # out of processes, memory or descriptors: next round
                log.error("worker %d: cannot start it again: %s", index, exc.strerror or exc)
                continue
            try:
                ready = await _wait_lines([replacement], READY_LINE, _START_TIMEOUT)
                if ready:
                    release_workers([replacement])
                    ready = await _wait_lines([replacement], READING_LINE, _START_TIMEOUT)
            except asyncio.CancelledError:
                await wait_exited([replacement], 0.0)
                raise
            if not ready:
                await wait_exited([replacement], 0.0)
                log.error("worker %d did not start again; trying later", index)
                continue
            children[position] = replacement
            if restarts is not None:
                restarts[index] += 1
            log.info("worker %d started again (pid %d)", index, replacement.process.pid)


def release_workers(children: list[Worker], *, stop: bool = False) -> None:
    """Tell every worker that all of them have bound the ports: they may answer on UDP;
    with ``stop``, that all of them have drained: they may close them and exit."""
    for child in children:
        try:
            if stop:
                child.close_stdin()
            else:
                child.write(GO_LINE)
        except OSError:
            pass  # gone already: worker 0 sees it when it stops


async def wait_drained(children: list[Worker], timeout: float) -> int:
    """Wait (at most ``timeout`` seconds) until every worker says its drain is over, or is
    gone; how many said so."""
    return await _wait_lines(children, DRAINED_LINE, timeout)


async def wait_reading(children: list[Worker], timeout: float) -> int:
    """Wait (at most ``timeout`` seconds) until every worker released by
    :func:`release_workers` says it reads its UDP sockets; how many said so."""
    return await _wait_lines(children, READING_LINE, timeout)


async def wait_exited(children: list[Worker], timeout: float) -> None:
    """Wait (at most ``timeout`` seconds in all) until every worker has exited; kill those
    that have not. Their output pipes are closed either way."""
    exited = await asyncio.gather(*(child.exited(timeout) for child in children))
    for child, gone in zip(children, exited, strict=True):
        if not gone:
            child.kill()
            await child.exited(1.0)
        child.close()


async def _wait_lines(children: list[Worker], line: str, timeout: float) -> int:
    tasks = [asyncio.create_task(_wait_line(child, line)) for child in children]
    done, pending = await asyncio.wait(tasks, timeout=timeout) if tasks else (set(), set())
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)
    return sum(1 for task in done if not task.cancelled() and task.result())


def worker_main(serve: ServeFunction) -> int:
    """Entry point of worker processes 1..N-1: run ``serve`` with what arrives on stdin."""
    config, share = _read_payload(sys.stdin.readline())
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return int(runner.run(serve(config, share)))
