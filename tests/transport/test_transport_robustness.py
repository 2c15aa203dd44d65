"""The real ``tsunagu serve`` facing misbehaving clients, forbidden peers and ICMP errors."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import aioice.stun
import pytest

from support.interop import (
    HOST,
    ServeProcess,
    client_field,
    error_code,
    run_serve,
    turn_allocate,
    udp_echo_server,
)

pytestmark = pytest.mark.interop

GARBAGE = {
    "not stun": b"\xff" * 64,
    "stun length not a multiple of 4": b"\x00\x01\x00\x03\x21\x12\xa4\x42" + os.urandom(15),
    "random bytes": b"\x80" + os.urandom(200),
}


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServeProcess]:
    with run_serve(tmp_path) as server:
        yield server


def trusting(server: ServeProcess) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(server.cert_path))


async def closed_by_server(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float = 3.0
) -> bool:
    """Whether the server ends the connection (EOF or reset) within ``timeout``."""
    try:
        while True:
            data = await asyncio.wait_for(reader.read(4096), timeout)
            if not data:
                return True
    except (ConnectionResetError, ssl.SSLError):
        return True
    except TimeoutError:
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


def binding_request() -> aioice.stun.Message:
    return aioice.stun.Message(
        message_method=aioice.stun.Method.BINDING, message_class=aioice.stun.Class.REQUEST
    )


async def assert_serves(server: ServeProcess, peer: tuple[str, int]) -> None:
    """A well-behaved client still allocates and relays over UDP and TCP."""
    for transport in ("udp", "tcp"):
        client = await turn_allocate(server, transport)
        assert await client.echo(b"healthy " + transport.encode(), peer) == (
            b"healthy " + transport.encode()
        )
        await client.close()


@pytest.mark.parametrize("kind", list(GARBAGE))
async def test_tcp_garbage_is_disconnected(serve: ServeProcess, kind: str) -> None:
    reader, writer = await asyncio.open_connection(HOST, serve.port)
    writer.write(GARBAGE[kind])
    assert await closed_by_server(reader, writer), "the server kept a garbage connection"

    reader, writer = await asyncio.open_connection(HOST, serve.tls_port, ssl=trusting(serve))
    writer.write(GARBAGE[kind])
    assert await closed_by_server(reader, writer), "the server kept a garbage TLS connection"

    # Not TLS at all on the TLS port.
    reader, writer = await asyncio.open_connection(HOST, serve.tls_port)
    writer.write(GARBAGE[kind])
    assert await closed_by_server(reader, writer), "the server kept a non-TLS connection"

    async with udp_echo_server() as (_, peer):
        await assert_serves(serve, peer)
    assert serve.process.poll() is None


async def test_tcp_invalid_stun_is_ignored_and_the_connection_still_works(
    serve: ServeProcess,
) -> None:
    reader, writer = await asyncio.open_connection(HOST, serve.port)
    local = writer.get_extra_info("sockname")[:2]
    # Framed like STUN (length a multiple of 4) but with a wrong magic cookie.
    writer.write(b"\x00\x01\x00\x04\xde\xad\xbe\xef" + os.urandom(12) + b"\x00\x00\x00\x00")
    request = binding_request()
    writer.write(bytes(request))
    header = await asyncio.wait_for(reader.readexactly(20), 5)
    body = await asyncio.wait_for(reader.readexactly(int.from_bytes(header[2:4], "big")), 5)
    response = aioice.stun.parse_message(header + body)
    assert response.transaction_id == request.transaction_id
    assert response.message_class == aioice.stun.Class.RESPONSE
    assert response.attributes["XOR-MAPPED-ADDRESS"] == local
    writer.close()
    await writer.wait_closed()


async def test_garbage_on_an_allocation_connection_ends_that_allocation_only(
    serve: ServeProcess,
) -> None:
    async with udp_echo_server() as (_, peer):
        bystander = await turn_allocate(serve, "udp")
        victim = await turn_allocate(serve, "tcp")
        assert await victim.echo(b"before", peer) == b"before"
        victim.inner.transport.write(GARBAGE["not stun"])
        await asyncio.wait_for(victim.app.closed.wait(), 5)
        await victim.close()
        assert await bystander.echo(b"unaffected", peer) == b"unaffected"
        await bystander.close()
        await assert_serves(serve, peer)

    victim_client = client_field("tcp", victim.mapped, (HOST, serve.port))
    for _ in range(100):
        records = {r["client"]: r for r in serve.audit_records()}
        if victim_client in records:
            break
        await asyncio.sleep(0.02)
    assert records[victim_client]["reason"] == "connection closed"
    assert records[victim_client]["to_peers"]["packets"] == 1


@contextlib.contextmanager
def udp_listener(ip: str) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((ip, 0))
        sock.setblocking(False)
        yield sock


def peer_request(method: aioice.stun.Method, peer: tuple[str, int]) -> aioice.stun.Message:
    message = aioice.stun.Message(message_method=method, message_class=aioice.stun.Class.REQUEST)
    message.attributes["XOR-PEER-ADDRESS"] = peer
    if method == aioice.stun.Method.CHANNEL_BIND:
        message.attributes["CHANNEL-NUMBER"] = 0x4FFF
    return message


async def test_denied_peers_get_403(serve: ServeProcess) -> None:
    """Only 127.0.0.1 is allowed: other loopback addresses and private ranges are not."""
    async with udp_echo_server() as (echo, peer):
        client = await turn_allocate(serve, "udp")
        with udp_listener("127.0.0.2") as leak:
            denied_loopback = leak.getsockname()[:2]
            # aioice binds a channel before sending; the server refuses the binding.
            client.transport.sendto(b"must not arrive", denied_loopback)
            for _ in range(250):
                if client.app.errors:
                    break
                await asyncio.sleep(0.02)
            assert [error_code(e) for e in client.app.errors] == [403], client.app.errors

            for method in (aioice.stun.Method.CREATE_PERMISSION, aioice.stun.Method.CHANNEL_BIND):
                for denied in (denied_loopback, ("10.0.0.1", 9), ("192.168.1.1", 9)):
                    with pytest.raises(aioice.stun.TransactionFailed) as failed:
                        await client.request(peer_request(method, denied))
                    assert error_code(failed.value) == 403, (method, denied)

            # The allocation is unharmed and the allowed peer still works.
            assert await client.echo(b"allowed", peer) == b"allowed"
            await asyncio.sleep(0.1)
            with pytest.raises(BlockingIOError):
                leak.recv(2048)
        await client.close()
    assert [data for data, _ in echo.received] == [b"allowed"]


async def test_icmp_unreachable_does_not_end_allocations(serve: ServeProcess) -> None:
    with udp_listener(HOST) as gone:
        closed_port = gone.getsockname()[:2]
    async with udp_echo_server() as (echo, peer):
        client = await turn_allocate(serve, "udp")
        # Each datagram to the closed port draws an ICMP port unreachable to the relay.
        for index in range(5):
            client.transport.sendto(b"nobody home %d" % index, closed_port)
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        for index in range(3):
            payload = b"after icmp %d" % index
            assert await client.echo(payload, peer) == payload

        # A client that vanishes without deleting: the server's packets to it draw ICMP
        # errors on the listening socket, and nobody else notices.
        vanished = await turn_allocate(serve, "udp")
        assert await vanished.echo(b"hello", peer) == b"hello"
        await vanished.abort()
        assert echo.transport is not None
        for _ in range(5):
            echo.transport.sendto(b"to a closed client", vanished.relayed)
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        assert await client.echo(b"still here", peer) == b"still here"
        await assert_serves(serve, peer)

        client_id = client_field("udp", client.mapped, (HOST, serve.port))
        assert client_id not in {r["client"] for r in serve.audit_records()}
        await client.close()

    for _ in range(100):
        records = {r["client"]: r for r in serve.audit_records()}
        if client_id in records:
            break
        await asyncio.sleep(0.02)
    record = records[client_id]
    assert record["reason"] == "deleted"
    assert record["to_peers"]["packets"] == 5 + 3 + 1
    assert record["to_client"]["packets"] == 3 + 1
    assert serve.process.poll() is None
