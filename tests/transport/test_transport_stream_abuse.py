"""The real ``tsunagu serve``, with default settings, against hostile TCP and TLS clients.

Each test attacks, measures, and then checks that well-behaved aioice clients still
allocate and relay over UDP and TCP:

- clients that pipeline requests (Binding, and Allocates answered 401) and never read what
  they are sent: the server's memory (RSS of every worker) grows by a bounded amount, and
  the connections end at the allocation deadline;
- many connections that never authenticate (some never finish their TLS handshake): all
  end about 10 s after they opened, while an allocation made meanwhile over TCP lives on;
- a flood of connections from one address: no more than the per-address cap stay open,
  the rest are reset at once, others' connections are served, and the refusals are logged
  once per interval, not once per connection.

Figures are in the assertion messages, and printed (``-s`` shows them).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import ssl
import struct
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from support.interop import (
    HOST,
    ServeProcess,
    run_serve,
    turn_allocate,
    udp_echo_server,
)

pytestmark = pytest.mark.interop

MIB = 1 << 20
# The server's own bounds per connection are 256 KiB unsent plus what one 256 KiB read of
# requests draws (4 MiB at most); the rest is the interpreter's noise.
RSS_GROWTH_LIMIT = 20 * MIB
ATTACK_SECONDS = 10.0
ALLOCATE_TIMEOUT = 10.0  # the default tcp_allocate_timeout
PER_ADDRESS_CAP = 256  # the default max_tcp_connections_per_ip
ATTACKER = "127.0.0.2"  # loopback's other addresses reach the server too


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServeProcess]:
    # Default settings: as many workers as cores, the default relay engine and limits.
    with run_serve(tmp_path) as server:
        yield server


def report(figures: str) -> None:
    sys.stdout.write(figures + "\n")


def process_tree(pid: int) -> list[int]:
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                pids += process_tree(int(child))
    return pids


def rss(pid: int) -> int:
    """Resident memory of the server and its worker processes, in bytes."""
    total = 0
    for each in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def binding_request() -> bytes:
    return struct.pack("!HHI", 0x0001, 0, 0x2112A442) + os.urandom(12)


def allocate_request() -> bytes:
    # Unauthenticated: the answer is a 401 with a realm and a nonce, larger than the request.
    transport = struct.pack("!HHB3x", 0x0019, 4, 17)
    return struct.pack("!HHI", 0x0003, len(transport), 0x2112A442) + os.urandom(12) + transport


def trusting(server: ServeProcess) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(server.cert_path))


async def assert_serves(server: ServeProcess) -> None:
    """A well-behaved client still allocates and relays over UDP and TCP."""
    async with udp_echo_server(HOST) as (_, peer):
        for transport in ("udp", "tcp"):
            client = await turn_allocate(server, transport)
            payload = b"healthy " + transport.encode()
            assert await client.echo(payload, peer) == payload, transport
            await client.close()


class NonReader:
    """A TCP or TLS client that pipelines requests as fast as it can and reads nothing."""

    def __init__(self, request: Callable[[], bytes], tls: bool) -> None:
        self.request = request
        self.tls = tls
        self.sent = 0
        self.closed_after: float | None = None

    async def run(self, server: ServeProcess, seconds: float) -> None:
        started = time.monotonic()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((HOST, server.tls_port if self.tls else server.port))
        sock.setblocking(False)
        if self.tls:
            sock = trusting(server).wrap_socket(
                sock, server_hostname=HOST, do_handshake_on_connect=False
            )
            while True:
                try:
                    sock.do_handshake()
                    break
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    await asyncio.sleep(0.01)
        try:
            batch = b""
            while time.monotonic() - started < seconds and not self._reset(sock, started):
                if not batch:
                    batch = b"".join(self.request() for _ in range(256))
                try:
                    taken = sock.send(batch)
                    self.sent += taken
                    batch = batch[taken:]
                    await asyncio.sleep(0)
                except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    await asyncio.sleep(0.01)  # the server is not reading us
            # Now read (bounded) until the server's end of the connection shows.
            deadline = started + ALLOCATE_TIMEOUT + 6
            while self.closed_after is None and time.monotonic() < deadline:
                try:
                    if not sock.recv(65536):
                        self.closed_after = time.monotonic() - started
                except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    await asyncio.sleep(0.05)
        except (ConnectionError, ssl.SSLError):
            if self.closed_after is None:
                self.closed_after = time.monotonic() - started
        finally:
            sock.close()

    def _reset(self, sock: socket.socket, started: float) -> bool:
        # A reset from the server shows as the socket's pending error, without reading.
        if self.closed_after is None and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.closed_after = time.monotonic() - started
        return self.closed_after is not None


async def sample_peak(pid: int, stop: asyncio.Event, peak: list[int]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], rss(pid))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)


async def test_clients_that_never_read_cost_bounded_memory(serve: ServeProcess) -> None:
    await assert_serves(serve)  # everything a first allocation loads is loaded
    before = rss(serve.pid)
    attackers = [
        NonReader(binding_request, tls=False),
        NonReader(allocate_request, tls=False),
        NonReader(binding_request, tls=True),
        NonReader(allocate_request, tls=True),
    ]
    stop = asyncio.Event()
    peak = [before]
    sampler = asyncio.create_task(sample_peak(serve.pid, stop, peak))
    await asyncio.gather(*(attacker.run(serve, ATTACK_SECONDS) for attacker in attackers))
    stop.set()
    await sampler
    growth = peak[0] - before
    sent = [round(attacker.sent / MIB, 1) for attacker in attackers]
    closed = [attacker.closed_after for attacker in attackers]
    figures = (
        f"server RSS {before / MIB:.1f} MiB before, peak growth {growth / MIB:.1f} MiB"
        f" ({serve.workers} workers); MiB sent by Binding/Allocate over TCP, then TLS: {sent};"
        f" closed after (s): {closed}"
    )
    report(figures)
    assert growth < RSS_GROWTH_LIMIT, figures
    for attacker in attackers:
        assert attacker.closed_after is not None, f"a connection was never closed: {figures}"
        assert attacker.closed_after < ALLOCATE_TIMEOUT + 4, figures
    await assert_serves(serve)
    assert serve.process.poll() is None


async def _open(port: int, *, tls: ssl.SSLContext | None = None, source: str = HOST) -> Any:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (HOST, port))
    except OSError:
        sock.close()
        raise
    if tls is None:
        return sock
    return await asyncio.open_connection(sock=sock, ssl=tls, server_hostname=HOST)


async def _closed_after(sock: socket.socket, started: float, timeout: float) -> float | None:
    """Seconds from ``started`` until the server ended the connection; None if it did not."""
    loop = asyncio.get_running_loop()
    deadline = started + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            data = await asyncio.wait_for(loop.sock_recv(sock, 4096), left)
            if not data:
                break
    except TimeoutError:
        return None
    except ConnectionError:
        pass
    return time.monotonic() - started


async def _tls_closed_after(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, started: float, timeout: float
) -> float | None:
    try:
        while True:
            left = started + timeout - time.monotonic()
            if left <= 0:
                return None
            if not await asyncio.wait_for(reader.read(4096), left):
                break
    except TimeoutError:
        return None
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.transport.abort()
    return time.monotonic() - started


async def test_connections_that_never_allocate_are_closed_after_10_s(
    serve: ServeProcess,
) -> None:
    started = time.monotonic()
    # From 14 addresses, 10 connections each: far below the cap per address.
    sources = (f"127.0.1.{1 + number % 14}" for number in range(140))
    silent = [await _open(serve.port, source=next(sources)) for _ in range(60)]  # no word
    binding = [await _open(serve.port, source=next(sources)) for _ in range(20)]  # STUN only
    for sock in binding:
        sock.send(binding_request())
    unauthenticated = [await _open(serve.port, source=next(sources)) for _ in range(20)]
    for sock in unauthenticated:
        sock.send(allocate_request())
    # Allocate, 401, silence (above); TCP to the TLS port only; TLS, then silence.
    no_handshake = [await _open(serve.tls_port, source=next(sources)) for _ in range(20)]
    tls = [
        await _open(serve.tls_port, tls=trusting(serve), source=next(sources)) for _ in range(20)
    ]
    opened = time.monotonic() - started
    # Meanwhile a real client allocates over TCP: its connection is not ended.
    async with udp_echo_server(HOST) as (_, peer):
        keeper = await turn_allocate(serve, "tcp")
        plain = silent + binding + unauthenticated + no_handshake
        timeout = ALLOCATE_TIMEOUT + opened + 5
        closed = await asyncio.gather(
            *(_closed_after(sock, started, timeout) for sock in plain),
            *(_tls_closed_after(reader, writer, started, timeout) for reader, writer in tls),
        )
        for sock in plain:
            sock.close()
        ended = [t for t in closed if t is not None]
        figures = (
            f"{len(ended)} of {len(closed)} connections closed, after"
            f" {min(ended, default=0):.1f}-{max(ended, default=0):.1f} s (opened within"
            f" {opened:.1f} s)"
        )
        report(figures)
        assert len(ended) == len(closed), figures
        assert min(ended) > ALLOCATE_TIMEOUT - 1, figures
        assert max(ended) < ALLOCATE_TIMEOUT + opened + 3, figures
        assert await keeper.echo(b"still allocated", peer) == b"still allocated"
        await keeper.close()
    await assert_serves(serve)


async def test_a_connection_flood_from_one_address_is_capped(serve: ServeProcess) -> None:
    flood: list[socket.socket] = []
    refused_at_connect = 0
    try:
        started = time.monotonic()
        for _ in range(PER_ADDRESS_CAP + 200):
            try:
                flood.append(await _open(serve.port, source=ATTACKER))
            except ConnectionError:
                refused_at_connect += 1
        # Refused connections are reset at once; the admitted ones stay until their deadline.
        await asyncio.sleep(1.0)
        reset = 0
        for sock in flood:
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                reset += 1
                continue
            try:
                if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    reset += 1
            except BlockingIOError:
                pass
            except ConnectionError:
                reset += 1
        refused = reset + refused_at_connect
        admitted = PER_ADDRESS_CAP + 200 - refused
        elapsed = time.monotonic() - started
        figures = (
            f"{admitted} of {PER_ADDRESS_CAP + 200} connections from {ATTACKER} admitted,"
            f" {refused} refused, in {elapsed:.1f} s"
        )
        report(figures)
        assert elapsed < ALLOCATE_TIMEOUT, figures
        assert admitted <= PER_ADDRESS_CAP, figures
        # The kernel spreads connections over the workers; each admits its share.
        assert admitted >= PER_ADDRESS_CAP * 3 // 4, figures

        # During the flood, clients from other addresses are served, over TLS too.
        await assert_serves(serve)
        reader, writer = await _open(serve.tls_port, tls=trusting(serve))
        writer.write(binding_request())
        header = await asyncio.wait_for(reader.readexactly(20), 5)
        assert header[:2] == b"\x01\x01", header.hex()
        writer.close()
    finally:
        for sock in flood:
            sock.close()
    # The refusals are logged once per 10 s and worker, not per connection.
    deadline = time.monotonic() + ALLOCATE_TIMEOUT + 2
    while True:
        lines = [line for line in serve.log_text().splitlines() if " refused " in line]
        logged = [re.search(r"refused (\d+) TCP/TLS connections", line) for line in lines]
        counted = sum(int(match.group(1)) for match in logged if match)
        if counted >= refused or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert counted == refused, f"{counted} refusals logged, {refused} seen: {lines}"
    assert len(lines) <= serve.workers, lines
    await assert_serves(serve)
