"""A TCP client that stops reading must cost packets, not the server's memory.

The peer floods the client's relayed address; the client's socket is not read. Whatever
the kernel's buffers do not hold piles up in the server's write buffer for that connection
until it is paused; from then on the relay drops, and the server keeps serving others.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.interop import HOST, ServeProcess, run_serve, turn_allocate, udp_echo_server

pytestmark = pytest.mark.interop

PAYLOAD = 1200
# Well beyond what the kernel's TCP buffers on both ends can hold on loopback.
FLOOD_BYTES = 48 << 20
# The server pauses a connection at 256 KiB unsent; allow for the interpreter's noise.
RSS_GROWTH_LIMIT = 12 << 20


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(params=["native", "python"])
def serve(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServeProcess]:
    with run_serve(tmp_path, "--relay-engine", request.param) as server:
        yield server


async def test_a_client_that_stops_reading_loses_packets_not_server_memory(
    serve: ServeProcess,
) -> None:
    stalled = await turn_allocate(serve, "tcp")
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        peer.bind((HOST, 0))
        peer.setblocking(False)
        peer_address = peer.getsockname()
        # A permission for the peer, then the client stops reading its socket.
        stalled.transport.sendto(b"hello", peer_address)
        deadline = time.monotonic() + 5
        while True:
            try:
                peer.recvfrom(2048)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "the peer never heard from the client"
                await asyncio.sleep(0.01)
        stalled.inner.transport.pause_reading()
        before = _rss(serve.pid)
        payload = b"x" * PAYLOAD
        sent = 0
        started = time.monotonic()
        while sent < FLOOD_BYTES and time.monotonic() - started < 20:
            for _ in range(64):
                try:
                    peer.sendto(payload, stalled.relayed)
                    sent += PAYLOAD
                except BlockingIOError:
                    break
            await asyncio.sleep(0.0005)
        await asyncio.sleep(0.3)
        growth = _rss(serve.pid) - before
        assert sent >= FLOOD_BYTES // 2, sent
        assert growth < RSS_GROWTH_LIMIT, f"server RSS grew by {growth} bytes"

        # Another client is served as usual.
        async with udp_echo_server(HOST) as (_, echo):
            other = await turn_allocate(serve, "udp")
            try:
                assert await other.echo(b"still here", echo) == b"still here"
            finally:
                await other.close()
    finally:
        peer.close()
        await stalled.abort()
