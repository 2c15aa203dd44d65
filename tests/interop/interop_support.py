"""Helpers for tests that run the real ``tsunagu serve`` process on loopback.

Used by tests/interop (third-party clients) and tests/transport (runtime behaviour such as
draining). Every process started here is bounded in time and ended by its PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aioice.stun
import aioice.turn

HOST = "127.0.0.1"
USER = "alice"
PASSWORD = "secret"
READY_LINE = "tsunagu: ready"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0
ROOT = Path(__file__).resolve().parents[2]

# Relay ranges come from below the kernel's ephemeral range (32768 and up on Linux), so
# that client sockets and servers' ports picked with port 0 never fall inside them.
_RELAY_LOW = 10000
_RELAY_HIGH = 32000


def _bindable(port: int, kinds: Sequence[int]) -> bool:
    for kind in kinds:
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                return False
    return True


def free_port(*, udp: bool = True, tcp: bool = True, pair: bool = False) -> int:
    """A port the kernel hands out that is free for UDP and TCP (and port+1 too if ``pair``)."""
    kinds = [k for k, wanted in ((socket.SOCK_DGRAM, udp), (socket.SOCK_STREAM, tcp)) if wanted]
    for _ in range(100):
        with socket.socket(socket.AF_INET, kinds[0]) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port >= 65535:
            continue
        if _bindable(port, kinds) and (not pair or _bindable(port + 1, kinds)):
            return port
    raise RuntimeError("no free port found")


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports, each free for both UDP and TCP."""
    ports: list[int] = []
    for _ in range(10 * count):
        port = free_port()
        if port not in ports:
            ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError("no free ports found")


def relay_range(size: int = 100) -> tuple[int, int]:
    """A window of ``size`` UDP ports, all free right now if possible.

    Other programs on the machine may hold ports scattered over any range; the server skips
    a port in use, so a window with a few of them still serves.
    """
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    best: tuple[int, int] | None = None
    for _ in range(40):
        start = rng.randrange(_RELAY_LOW, _RELAY_HIGH - size) // 10 * 10
        free = sum(_bindable(port, [socket.SOCK_DGRAM]) for port in range(start, start + size))
        if free == size:
            return start, start + size - 1
        if best is None or free > best[0]:
            best = (free, start)
    if best is None or best[0] < size * 3 // 4:
        raise RuntimeError("no free relay port range found")
    return best[1], best[1] + size - 1


@dataclass
class ServeProcess:
    """A running ``tsunagu serve`` with its ports, output files and audit log."""

    process: subprocess.Popen[bytes]
    port: int
    tls_port: int
    min_port: int
    max_port: int
    stdout_path: Path
    log_path: Path
    state_dir: Path
    startup: list[str] = field(default_factory=list)
    terminated: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def cert_path(self) -> Path:
        match = re.search(r"TLS certificate (\S+)", "\n".join(self.startup))
        assert match is not None, self.startup
        return Path(match.group(1))

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def audit_records(self) -> list[dict[str, Any]]:
        """The JSON records the server wrote on the ``tsunagu.audit`` logger so far."""
        records = []
        for line in self.log_text().splitlines():
            _, marker, payload = line.partition(" tsunagu.audit INFO ")
            if marker:
                records.append(json.loads(payload))
        return records

    def wait_for_log(self, text: str, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log_text():
                return True
            time.sleep(0.02)
        return text in self.log_text()

    async def wait_for_log_async(self, text: str, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log_text():
                return True
            await asyncio.sleep(0.02)
        return text in self.log_text()

    def send_signal(self, signum: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signum)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    async def wait_async(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                return code
            await asyncio.sleep(0.02)
        return self.process.poll()

    def terminate(self) -> None:
        """Send the first SIGTERM (drain) once; a second one would exit at once."""
        if not self.terminated:
            self.terminated = True
            self.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait a bounded time, SIGKILL if needed; return the exit status."""
        self.terminate()
        code = self.wait(timeout)
        if code is None:
            self.process.kill()
            code = self.process.wait(timeout=5)
        return code


def _wait_ready(server: ServeProcess, deadline: float) -> list[str]:
    while time.monotonic() < deadline:
        lines = server.stdout_path.read_text(errors="replace").splitlines()
        if READY_LINE in lines:
            return lines
        if server.process.poll() is not None:
            raise RuntimeError(
                f"tsunagu serve exited with {server.process.returncode}:\n"
                + "\n".join(lines)
                + "\n"
                + server.log_text()
            )
        time.sleep(0.02)
    raise RuntimeError("tsunagu serve was not ready in time:\n" + server.log_text())


@contextlib.contextmanager
def run_serve(
    tmp: Path, *extra: str, drain_timeout: float = 1.0, check_exit: bool = True
) -> Iterator[ServeProcess]:
    """Start ``tsunagu serve`` on loopback with fresh ports; stop it by PID afterwards."""
    port, tls_port = free_ports(2)
    low, high = relay_range()
    tmp.mkdir(parents=True, exist_ok=True)
    state = tmp / "state"
    stdout_path = tmp / "serve.stdout"
    log_path = tmp / "serve.log"
    command = [
        sys.executable,
        "-m",
        "tsunagu",
        "serve",
        "-L",
        HOST,
        "-p",
        str(port),
        "--tls-listening-port",
        str(tls_port),
        "--no-web",
        "--allowed-peer-ip",
        HOST,
        "-u",
        f"{USER}:{PASSWORD}",
        "--min-port",
        str(low),
        "--max-port",
        str(high),
        "--drain-timeout",
        str(drain_timeout),
        "--log-file",
        str(log_path),
        *extra,
    ]
    env = dict(os.environ, XDG_STATE_HOME=str(state), PYTHONUNBUFFERED="1")
    with open(stdout_path, "wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    server = ServeProcess(process, port, tls_port, low, high, stdout_path, log_path, state)
    try:
        server.startup = _wait_ready(server, time.monotonic() + START_TIMEOUT)
        yield server
    finally:
        code = server.stop()
    if check_exit:
        assert code == 0, f"tsunagu serve exited with {code}:\n{server.log_text()}"


@dataclass
class EchoPeer:
    """``turnutils_peer``: a UDP echo server on port and port+1."""

    process: subprocess.Popen[bytes]
    port: int


@contextlib.contextmanager
def run_turnutils_peer(tmp: Path) -> Iterator[EchoPeer]:
    port = free_port(tcp=False, pair=True)
    with open(tmp / "peer.out", "wb") as out:
        process = subprocess.Popen(
            ["turnutils_peer", "-L", HOST, "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        _wait_udp_echo(process, port)
        yield EchoPeer(process, port)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def _wait_udp_echo(process: subprocess.Popen[bytes], port: int, timeout: float = 10.0) -> None:
    """Poll the peer until it echoes, so that no test races its start."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.1)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"turnutils_peer exited with {process.returncode}")
            sock.sendto(b"ping", (HOST, port))
            try:
                if sock.recv(64) == b"ping":
                    return
            except (TimeoutError, ConnectionRefusedError):
                continue
    raise RuntimeError("turnutils_peer did not echo in time")


# --- small asyncio peers and a TURN client wrapper around aioice ---------------------------


class UdpEcho(asyncio.DatagramProtocol):
    """An asyncio UDP echo server that counts what it echoed."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.received: list[tuple[bytes, tuple[str, int]]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append((data, addr))
        assert self.transport is not None
        self.transport.sendto(data, addr)


@contextlib.asynccontextmanager
async def udp_echo_server() -> Any:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(UdpEcho, local_addr=(HOST, 0))
    try:
        yield protocol, transport.get_extra_info("sockname")[:2]
    finally:
        transport.close()


class Collector(asyncio.DatagramProtocol):
    """What a TURN client's application side receives."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
        self.errors: list[Exception] = []
        self.closed = asyncio.Event()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait((data, addr))

    def error_received(self, exc: Exception) -> None:
        self.errors.append(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()

    async def next(self, timeout: float = 5.0) -> tuple[bytes, tuple[str, int]]:
        return await asyncio.wait_for(self.queue.get(), timeout)


@dataclass
class TurnClient:
    """An aioice TURN allocation and the protocol that sees its data."""

    transport: aioice.turn.TurnTransport
    app: Collector

    @property
    def relayed(self) -> tuple[str, int]:
        address = self.transport.get_extra_info("sockname")
        return (address[0], address[1])

    @property
    def mapped(self) -> tuple[str, int]:
        address = self.transport.get_extra_info("related_address")
        return (address[0], address[1])

    async def echo(self, payload: bytes, peer: tuple[str, int], timeout: float = 5.0) -> bytes:
        """Send ``payload`` to ``peer`` through the relay and return what comes back."""
        self.transport.sendto(payload, peer)
        data, addr = await self.app.next(timeout)
        assert addr == peer
        return data

    @property
    def inner(self) -> Any:
        """aioice's protocol under the transport: the STUN client talking to the server."""
        return self.transport._TurnTransport__inner_protocol  # type: ignore[attr-defined]

    async def close(self, timeout: float = 5.0) -> None:
        """Delete the allocation (Refresh with LIFETIME 0) and wait until it is gone."""
        self.transport.close()
        await asyncio.wait_for(self.app.closed.wait(), timeout)

    async def abort(self, timeout: float = 5.0) -> None:
        """Drop the socket to the server without deleting the allocation."""
        self.inner.transport.close()
        await asyncio.wait_for(self.app.closed.wait(), timeout)
        # Stops aioice's refresh task; it sends nothing now that its socket is closed.
        self.transport.close()

    async def request(self, message: aioice.stun.Message, timeout: float = 5.0) -> Any:
        """One authenticated STUN transaction on the allocation's connection."""
        return await asyncio.wait_for(self.inner.request_with_retry(message), timeout)


async def turn_allocate(
    server: ServeProcess,
    transport: str = "udp",
    *,
    password: str = PASSWORD,
    ssl: Any = None,
    timeout: float = 10.0,
) -> TurnClient:
    """Allocate with aioice over ``transport`` ("udp" or "tcp"; "tcp" with ``ssl`` is TLS)."""
    port = server.tls_port if ssl is not None else server.port
    turn_transport, app = await asyncio.wait_for(
        aioice.turn.create_turn_endpoint(
            Collector,
            server_addr=(HOST, port),
            username=USER,
            password=password,
            ssl=ssl,
            transport=transport,
        ),
        timeout,
    )
    return TurnClient(turn_transport, app)


def error_code(exc: BaseException) -> int | None:
    """The STUN error code of a failed aioice transaction, if that is what ``exc`` is."""
    if isinstance(exc, aioice.stun.TransactionFailed):
        code = exc.response.attributes.get("ERROR-CODE")
        return None if code is None else int(code[0])
    return None


def client_field(protocol: str, client: tuple[str, int], server: tuple[str, int]) -> str:
    """How the audit log names a client's 5-tuple."""
    return f"{protocol}:{client[0]}:{client[1]}->{server[0]}:{server[1]}"
