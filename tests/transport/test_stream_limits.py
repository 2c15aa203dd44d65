"""What one TCP client may cost, with both relay engines, in one process on loopback.

A client that does not read what it is sent gets its reading paused at the write buffer's
high-water mark (answers to its requests and data from its peers both count), and resumed
below the low-water mark; meanwhile what its peers send is dropped and counted. A client
paused too long, or with too much unread, or without an allocation in time, is
disconnected. The listener counts connections per client address (IPv6: per /64) and in
total, refuses those over a cap at accept time and logs refusals once per interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import aioice.turn
import pytest

from support.engines import HOST, USER, make_engine, running, wait_for
from support.interop import Collector, TurnClient, udp_echo_server
from tsunagu.transport.admission import (
    ConnectionCounter,
    ConnectionLimits,
    StreamListener,
    descriptor_budget,
    stream_socket,
    worker_share,
)
from tsunagu.transport.driver import TurnDriver
from tsunagu.transport.engine import RelayEngine
from tsunagu.transport.listeners import StreamConnection, StreamLimits

# Small marks and a small kernel send buffer, so that a few hundred KiB fill everything.
LIMITS = StreamLimits(
    high_water=16 * 1024,
    low_water=4 * 1024,
    hard_cap=8 << 20,
    stall_timeout=60.0,
    allocate_timeout=60.0,
)
SEND_BUFFER = 4096
BINDING_RESPONSE = 0x0101


def binding_requests(count: int) -> bytes:
    return b"".join(
        struct.pack("!HHI", 0x0001, 0, 0x2112A442) + os.urandom(12) for _ in range(count)
    )


class SmallBufferConnection(StreamConnection):
    """A connection whose kernel buffers are tiny, so that asyncio's buffer fills soon."""

    small_receive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        if self.small_receive:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SEND_BUFFER)
        super().connection_made(transport)


class LargeReadConnection(SmallBufferConnection):
    """Reads as much as the client sent at once: one read holds thousands of requests."""

    small_receive = False


@contextlib.asynccontextmanager
async def stream_server(
    driver: TurnDriver,
    limits: StreamLimits = LIMITS,
    kind: type[SmallBufferConnection] = SmallBufferConnection,
) -> AsyncIterator[tuple[str, int]]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: kind(driver, "tcp", limits), HOST, 0)
    try:
        address = server.sockets[0].getsockname()
        yield (address[0], address[1])
    finally:
        server.close()
        for stream in list(driver.streams):
            stream.transport.abort()
        await asyncio.sleep(0)


def raw_client(address: tuple[str, int], *, small_send: bool = True) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    if small_send:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sock.connect(address)
    sock.setblocking(False)
    return sock


async def send_until_blocked(sock: socket.socket, data: bytes, timeout: float = 10.0) -> int:
    """Send ``data``; stop once the kernel has taken nothing for 0.3 s. Returns bytes sent."""
    sent = 0
    idle_since = time.monotonic()
    deadline = time.monotonic() + timeout
    while sent < len(data) and time.monotonic() < deadline:
        try:
            sent += sock.send(data[sent : sent + 65536])
            idle_since = time.monotonic()
        except BlockingIOError:
            if time.monotonic() - idle_since > 0.3:
                break
            await asyncio.sleep(0.01)
        except OSError:  # the server disconnected
            break
    return sent


def only_stream(driver: TurnDriver) -> StreamConnection:
    assert len(driver.streams) == 1, f"{len(driver.streams)} connections"
    return next(iter(driver.streams))


async def test_a_client_that_does_not_read_its_answers_is_paused_then_resumed(
    engine: RelayEngine,
) -> None:
    async with running(engine) as rig, stream_server(rig.driver) as address:
        client = raw_client(address)
        try:
            requests = 10000  # 200 KB of Binding requests, about 400 KB of answers
            sent = await send_until_blocked(client, binding_requests(requests))
            await wait_for(lambda: len(rig.driver.streams) == 1)
            stream = only_stream(rig.driver)
            await wait_for(lambda: stream.paused)
            unsent = stream.transport.get_write_buffer_size()
            assert not stream.transport.is_reading(), "reading goes on while paused"
            # Reading stopped: what was read is answered, nothing more piles up.
            await asyncio.sleep(0.3)
            later = stream.transport.get_write_buffer_size()
            assert later <= unsent, f"{later} bytes unsent 0.3 s after {unsent} at the pause"
            assert unsent < 2 << 20, f"{unsent} bytes unsent at pause"
            assert sent < 200000, f"the server read all {sent} bytes while not being read"

            # The client reads again: the server resumes reading and answers every request.
            rest = binding_requests(requests)[sent:]
            received = bytearray()
            answers = 0
            deadline = time.monotonic() + 20
            while answers < requests and time.monotonic() < deadline:
                try:
                    chunk = client.recv(262144)
                    assert chunk, "the server closed the connection"
                    received += chunk
                except BlockingIOError:
                    await asyncio.sleep(0)
                if rest:
                    try:
                        taken = client.send(rest[:65536])
                        rest = rest[taken:]
                    except BlockingIOError:
                        pass
                while len(received) >= 20:
                    kind, length = struct.unpack_from("!HH", received)
                    if len(received) < 20 + length:
                        break
                    assert kind == BINDING_RESPONSE, hex(kind)
                    answers += 1
                    del received[: 20 + length]
            assert answers == requests, f"{answers} of {requests} requests answered"
            assert not stream.paused and stream.transport.is_reading()
            assert stream.closed_because is None
        finally:
            client.close()


async def test_relayed_data_is_dropped_while_the_client_is_paused(engine: RelayEngine) -> None:
    async with (
        running(engine, policy=_policy()) as rig,
        stream_server(rig.driver) as address,
        udp_echo_server(HOST) as (_, echo),
    ):
        turn_transport, app = await asyncio.wait_for(
            aioice.turn.create_turn_endpoint(
                Collector,
                server_addr=address,
                username=USER,
                password="alice-pw",
                transport="tcp",
            ),
            5.0,
        )
        client = TurnClient(turn_transport, app)
        try:
            assert await client.echo(b"open", echo) == b"open"  # a permission and a channel
            stream = only_stream(rig.driver)
            allocation = stream.allocation
            assert allocation is not None
            relays: list[Any] = list(allocation.relays.values())
            # A small fixed receive buffer: the client's kernel soon holds all it will take.
            client_socket = client.inner.transport.get_extra_info("socket")
            client_socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.inner.transport.pause_reading()

            peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with peer:
                peer.bind((HOST, 0))
                client.transport.sendto(b"permit", peer.getsockname())  # a permission for it
                await asyncio.sleep(0.1)
                payload = b"x" * 1200
                deadline = time.monotonic() + 10
                while not stream.paused and time.monotonic() < deadline:
                    for _ in range(32):
                        with contextlib.suppress(BlockingIOError):
                            peer.sendto(payload, client.relayed)
                    await asyncio.sleep(0.001)
                assert stream.paused, "the stream was never paused"
                assert not stream.transport.is_reading()
                if engine.name == "native":
                    assert all(relay.paused for relay in relays)
                before = _dropped(allocation, relays)
                relayed = _to_client(allocation, relays)
                largest = 0
                for number in range(200):
                    with contextlib.suppress(BlockingIOError):
                        peer.sendto(payload, client.relayed)
                    if number % 4 == 3:
                        await asyncio.sleep(0.002)  # slow enough for the relay socket's buffer
                        largest = max(largest, stream.transport.get_write_buffer_size())
                await asyncio.sleep(0.1)
                dropped = _dropped(allocation, relays) - before
                more = _to_client(allocation, relays) - relayed
                # What the client's kernel still takes is relayed (the stream resumes below
                # the low-water mark); the rest is dropped, not queued.
                assert dropped >= 50, f"{dropped} of 200 datagrams dropped, {more} relayed"
                bound = LIMITS.high_water + len(payload) + 40
                assert largest <= bound, f"{largest} bytes unsent while paused (bound {bound})"

                # Reading again: the server resumes, and relays to the client once more.
                client.inner.transport.resume_reading()
                await wait_for(lambda: not stream.paused, timeout=10)
                assert stream.transport.is_reading()
                if engine.name == "native":
                    assert not any(relay.paused for relay in relays)
                client.transport.sendto(b"after", echo)
                deadline = time.monotonic() + 5
                while True:  # what the flood left in the buffers comes first
                    data, addr = await app.next(max(0.1, deadline - time.monotonic()))
                    if addr == echo:
                        break
                assert data == b"after"
        finally:
            client.transport.close()


def _policy() -> Any:
    from tsunagu.turn import PeerPolicy

    return PeerPolicy.create(allowed=("127.0.0.0/8",))


def _to_client(allocation: Any, relays: list[Any]) -> int:
    return allocation.packets_to_client + sum(
        getattr(relay, "packets_to_client", 0) for relay in relays
    )


def _dropped(allocation: Any, relays: list[Any]) -> int:
    # The Python relay counts on the allocation; C counts on its relay sockets until the end.
    return allocation.dropped + sum(getattr(relay, "dropped", 0) for relay in relays)


@pytest.mark.parametrize(
    ("limits", "reason"),
    [
        (StreamLimits(16 * 1024, 4 * 1024, 8 << 20, 0.5, 60.0), "not reading for 0.5 s"),
        (StreamLimits(16 * 1024, 4 * 1024, 64 * 1024, 60.0, 60.0), "more than 65536 bytes"),
        (StreamLimits(allocate_timeout=0.5), "no allocation within 0.5 s"),
    ],
    ids=["stalled", "hard cap", "no allocation"],
)
async def test_a_client_beyond_its_limits_is_disconnected(
    engine: RelayEngine, limits: StreamLimits, reason: str
) -> None:
    hard_cap = reason.startswith("more than")
    kind = LargeReadConnection if hard_cap else SmallBufferConnection
    async with running(engine) as rig, stream_server(rig.driver, limits, kind) as address:
        client = raw_client(address, small_send=not hard_cap)
        try:
            await wait_for(lambda: len(rig.driver.streams) == 1)
            stream = only_stream(rig.driver)
            requests = 30000 if limits.allocate_timeout > 1 else 1
            started = time.monotonic()
            await send_until_blocked(client, binding_requests(requests), timeout=2.0)
            await wait_for(lambda: not rig.driver.streams, timeout=5.0)
            elapsed = time.monotonic() - started
            assert stream.closed_because is not None
            assert stream.closed_because.startswith(reason), stream.closed_because
            assert elapsed < 4.0, f"closed after {elapsed:.1f} s"
        finally:
            client.close()


# --- the listener's caps ------------------------------------------------------------------


def test_caps_are_shared_out_between_workers_and_bounded_by_descriptors() -> None:
    assert worker_share(256, 2) == 128
    assert worker_share(255, 2) == 128
    assert worker_share(0, 4) == 0
    assert descriptor_budget(1024) == 240
    assert descriptor_budget(1 << 20) == ((1 << 20) - 64) // 4
    assert descriptor_budget(10) == 16


def test_a_released_connection_frees_its_place_once() -> None:
    counter = ConnectionCounter(ConnectionLimits(per_address=2, total=3))
    first = counter.admit("2001:db8::1")
    second = counter.admit("2001:db8::2")
    assert first is not None and second is not None
    assert counter.per_address == {"2001:db8::/64": 2} and counter.total == 2
    first()
    first()
    assert counter.per_address == {"2001:db8::/64": 1} and counter.total == 1
    second()
    assert counter.per_address == {} and counter.total == 0


async def _connect(address: tuple[str, int], source: str) -> socket.socket:
    """A connection from ``source``; the server may have reset it before this returns."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.setblocking(False)
    with contextlib.suppress(ConnectionResetError):
        await asyncio.get_running_loop().sock_connect(sock, address)
    return sock


async def _refused(sock: socket.socket, timeout: float = 1.0) -> bool:
    """Whether the server ended the connection (a reset or EOF) within ``timeout``."""
    if _unconnected(sock):
        return True
    try:
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 1), timeout)
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return data == b""


def _unconnected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return True
    return False


async def test_the_listener_refuses_connections_over_its_caps_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="tsunagu")
    loop = asyncio.get_running_loop()
    counter = ConnectionCounter(ConnectionLimits(per_address=3, total=5), log_interval=30.0)
    engine = make_engine("python")
    async with running(engine) as rig:
        sock = stream_socket(HOST, 0)
        listener = StreamListener(
            loop,
            sock,
            lambda release, accepted, tls: StreamConnection(rig.driver, "tcp", on_lost=release),
            counter,
        )
        clients: list[socket.socket] = []
        try:
            for _ in range(6):
                clients.append(await _connect(listener.address, "127.0.0.1"))
            outcomes = [await _refused(client, 0.3) for client in clients]
            assert outcomes == [False] * 3 + [True] * 3, f"refused: {outcomes}"
            # Another address has its own count, up to the total.
            others = [await _connect(listener.address, "127.0.0.2") for _ in range(3)]
            clients += others
            outcomes = [await _refused(client, 0.3) for client in others]
            assert outcomes == [False, False, True], f"refused: {outcomes}"
            assert counter.total == 5, f"{counter.total} counted"

            # A connection that ends frees its place.
            clients[0].close()
            await wait_for(lambda: counter.total == 4)
            late = await _connect(listener.address, "127.0.0.1")
            clients.append(late)
            assert not await _refused(late, 0.3)
            assert counter.refused == {"per-address": 3, "total": 1}, counter.refused

            # Nothing is logged per refusal; the interval's line comes at its end (or on close).
            assert not [r for r in caplog.records if "refused" in r.getMessage()]
            counter.close()
            lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
            assert lines == [
                "refused 4 TCP/TLS connections in the last 30 s: 3 over the cap of 3 per client"
                " address; 1 over the cap of 5 in total; most from 127.0.0.1 (3), 127.0.0.2 (1)"
            ], lines
        finally:
            for client in clients:
                client.close()
            listener.close()
            counter.close()
