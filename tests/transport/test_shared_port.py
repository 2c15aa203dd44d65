"""TLS and plain TCP on one port, with both relay engines, in one process on loopback.

The accept loop (``admission.StreamListener``) peeks at each connection's first byte: 0x16
starts a TLS handshake, 0x00 or 0x01 a STUN request; anything else is closed at once and
counted, with one log line per interval. The wait for that byte counts against the
allocation deadline, which runs from accept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aioice.turn
import pytest

from support.engines import HOST, PASSWORD, USER, Rig, audit_records, running, wait_for
from support.interop import Collector, TurnClient, udp_echo_server
from tsunagu.tls import ensure_certificate, server_ssl_context
from tsunagu.transport.admission import (
    ConnectionCounter,
    ConnectionLimits,
    StreamListener,
    stream_kind,
    stream_socket,
)
from tsunagu.transport.engine import RelayEngine
from tsunagu.transport.listeners import StreamConnection, StreamLimits


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a fresh self-signed certificate, and a client context trusting it."""
    material = ensure_certificate(None, None, [HOST], tmp_path / "state")
    client = ssl.create_default_context(cafile=str(material.cert_path))
    return server_ssl_context(material), client


@contextlib.asynccontextmanager
async def shared_port(
    rig: Rig,
    server_ssl: ssl.SSLContext | None,
    *,
    plain: bool = True,
    deadline: float = 10.0,
    log_interval: float = 10.0,
) -> AsyncIterator[StreamListener]:
    """A listener on a fresh loopback port taking TLS (with ``server_ssl``) and plain TCP."""
    loop = asyncio.get_running_loop()
    counter = ConnectionCounter(ConnectionLimits(), log_interval=log_interval)
    limits = StreamLimits(allocate_timeout=deadline)

    def connection(release: Callable[[], None], accepted: float, tls: bool) -> StreamConnection:
        protocol = "tls" if tls else "tcp"
        return StreamConnection(rig.driver, protocol, limits, release, accepted=accepted)

    listener = StreamListener(
        loop,
        stream_socket(HOST, 0),
        connection,
        counter,
        ssl=server_ssl,
        plain=plain,
        deadline=deadline,
    )
    try:
        yield listener
    finally:
        listener.close()
        counter.close()


async def allocate(address: tuple[str, int], client_ssl: ssl.SSLContext | None) -> TurnClient:
    transport, app = await asyncio.wait_for(
        aioice.turn.create_turn_endpoint(
            Collector,
            server_addr=address,
            username=USER,
            password=PASSWORD,
            ssl=client_ssl,
            transport="tcp",
        ),
        5.0,
    )
    return TurnClient(transport, app)


async def connect(address: tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, address)
    return sock


async def closed_after(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until the server ends the connection (EOF or reset); None if it does not."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    try:
        while True:
            left = started + timeout - time.monotonic()
            if left <= 0:
                return None
            if not await asyncio.wait_for(loop.sock_recv(sock, 4096), left):
                break
    except TimeoutError:
        return None
    except ConnectionError:
        pass
    return time.monotonic() - started


def binding_request() -> bytes:
    return struct.pack("!HHI", 0x0001, 0, 0x2112A442) + os.urandom(12)


def test_the_first_byte_says_what_a_connection_speaks() -> None:
    assert stream_kind(0x16) == "tls"
    assert stream_kind(0x00) == stream_kind(0x01) == "plain"
    # ChannelData cannot come first (no allocation yet): that is where HTTP falls.
    for first in (*range(0x40, 0x80), 0x02, 0x15, 0x17, 0x3F, 0x80, 0xFF):
        assert stream_kind(first) is None, hex(first)
    assert stream_kind(ord("G")) is None


async def test_tls_and_plain_tcp_allocate_and_relay_on_one_port(
    engine: RelayEngine,
    certificate: tuple[ssl.SSLContext, ssl.SSLContext],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tsunagu")
    server_ssl, client_ssl = certificate
    async with (
        running(engine) as rig,
        shared_port(rig, server_ssl) as listener,
        udp_echo_server(HOST) as (echo, peer),
    ):
        plain = await allocate(listener.address, None)
        tls = await allocate(listener.address, client_ssl)
        for client, name in ((plain, b"plain"), (tls, b"tls")):
            for size in (1, 3, 100, 1200):
                payload = name + b"-" * size
                assert await client.echo(payload, peer) == payload
        # One connection of each kind, both on the listener's port.
        protocols = sorted(stream.protocol for stream in rig.driver.streams)
        assert protocols == ["tcp", "tls"], protocols
        servers = {stream.five_tuple.server for stream in rig.driver.streams if stream.five_tuple}
        assert servers == {listener.address}
        await plain.close()
        await tls.close()
        await wait_for(lambda: len(audit_records(caplog)) == 2)
    assert listener.counter.not_turn == {}
    records = {record["client"].split(":")[0]: record for record in audit_records(caplog)}
    assert set(records) == {"tcp", "tls"}
    port = listener.address[1]
    for kind, record in records.items():
        assert record["client"].endswith(f"->{HOST}:{port}"), record
        assert record["to_peers"]["packets"] == 4 and record["to_client"]["packets"] == 4
        assert record["dropped"] == 0, (kind, record)
    assert len(echo.received) == 8


async def test_a_tls_only_or_plain_only_port_closes_the_other_kind_at_once(
    engine: RelayEngine, certificate: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_ssl, client_ssl = certificate
    async with running(engine) as rig:
        async with shared_port(rig, server_ssl, plain=False) as tls_only:
            sock = await connect(tls_only.address)
            sock.send(binding_request())
            after = await closed_after(sock, 2.0)
            sock.close()
            assert after is not None and after < 1.0, after
            assert tls_only.counter.not_turn == {
                "plain STUN, which this port does not take (--no-tcp)": 1
            }
            client = await allocate(tls_only.address, client_ssl)
            await client.close()
        async with shared_port(rig, None) as plain_only:
            sock = await connect(plain_only.address)
            sock.send(b"\x16\x03\x01\x00\x05hello")
            after = await closed_after(sock, 2.0)
            sock.close()
            assert after is not None and after < 1.0, after
            assert plain_only.counter.not_turn == {
                "TLS, which this port does not take (--no-tls)": 1
            }
            client = await allocate(plain_only.address, None)
            await client.close()
            await wait_for(lambda: plain_only.counter.total == 0)


GARBAGE = {
    "http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "channel data first": b"\x40\x00\x00\x04abcd",
    "high bit": b"\x80" + os.urandom(64),
    "all ones": b"\xff" * 16,
    "not a stun type": b"\x02\x00\x00\x00\x21\x12\xa4\x42" + os.urandom(12),
}


async def test_garbage_is_closed_at_once_and_logged_once_per_interval(
    engine: RelayEngine,
    certificate: tuple[ssl.SSLContext, ssl.SSLContext],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tsunagu")
    server_ssl, client_ssl = certificate
    async with (
        running(engine) as rig,
        shared_port(rig, server_ssl, log_interval=1.0) as listener,
        udp_echo_server(HOST) as (_, peer),
    ):
        socks = [await connect(listener.address) for _ in GARBAGE]
        for sock, data in zip(socks, GARBAGE.values(), strict=True):
            sock.send(data)
        closed = await asyncio.gather(*(closed_after(sock, 3.0) for sock in socks))
        for sock in socks:
            sock.close()
        assert all(t is not None and t < 1.0 for t in closed), dict(
            zip(GARBAGE, closed, strict=True)
        )
        assert sum(listener.counter.not_turn.values()) == len(GARBAGE)
        assert listener.counter.not_turn["first byte 0x47 'G'"] == 1
        await wait_for(lambda: listener.counter.total == 0)
        # Meanwhile, and after, both kinds are served on the same port.
        for client_ssl_or_none in (None, client_ssl):
            client = await allocate(listener.address, client_ssl_or_none)
            assert await client.echo(b"still serving", peer) == b"still serving"
            await client.close()
        # Nothing per connection; one line once the interval ends.
        lines = [r.getMessage() for r in caplog.records if "neither TLS nor STUN" in r.getMessage()]
        assert lines == []
        await wait_for(
            lambda: any("neither TLS nor STUN" in r.getMessage() for r in caplog.records), 3.0
        )
    lines = [r.getMessage() for r in caplog.records if "neither TLS nor STUN" in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        "closed 5 TCP/TLS connections in the last 1 s that spoke neither TLS nor STUN ("
    ), lines
    assert lines[0].endswith(f"; most from {HOST} (5)"), lines


async def test_the_wait_for_the_first_byte_counts_against_the_allocation_deadline(
    engine: RelayEngine, certificate: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_ssl, client_ssl = certificate
    deadline = 1.0
    async with running(engine) as rig, shared_port(rig, server_ssl, deadline=deadline) as listener:
        silent = await connect(listener.address)
        late = await connect(listener.address)
        started = time.monotonic()
        silent_closed = asyncio.ensure_future(closed_after(silent, 3.0))
        # Speaks after 0.6 s: answered, and still closed 1 s after accept, not after it spoke.
        await asyncio.sleep(0.6)
        late.send(binding_request())
        answer = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(late, 4096), 2.0)
        assert answer[:2] == b"\x01\x01", answer[:4].hex()
        late_closed = await closed_after(late, 3.0)
        assert late_closed is not None
        assert 0.8 < time.monotonic() - started < 1.5, time.monotonic() - started
        after = await silent_closed
        assert after is not None and deadline - 0.2 < after < deadline + 0.5, after
        # A TLS client that starts its handshake, then stalls, is closed at the deadline too.
        stalled = await connect(listener.address)
        started = time.monotonic()
        stalled.send(b"\x16\x03\x01")
        after = await closed_after(stalled, 3.0)
        assert after is not None and deadline - 0.2 < after < deadline + 0.5, after
        for sock in (silent, late, stalled):
            sock.close()
        await wait_for(lambda: listener.counter.total == 0)
        assert listener.counter.not_turn == {}


async def test_closing_the_listener_closes_connections_that_have_not_spoken(
    engine: RelayEngine,
) -> None:
    async with running(engine) as rig, shared_port(rig, None) as listener:
        sock = await connect(listener.address)
        await wait_for(lambda: listener.counter.total == 1)
        listener.close()
        after = await closed_after(sock, 2.0)
        sock.close()
        assert after is not None and after < 1.0
        assert listener.counter.total == 0
