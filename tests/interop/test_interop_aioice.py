"""aioice's TURN client (the one aiortc uses) against ``tsunagu serve``.

aioice sends no REQUESTED-ADDRESS-FAMILY, so it always asks for an IPv4 relayed address
(RFC 8656 section 7.2), also when it reaches the server over IPv6.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import time
from typing import Any

import aioice.turn
import pytest

from support.audit import required_workers, workers_seen
from support.interop import (
    HOST,
    USER,
    Collector,
    ServeProcess,
    TurnClient,
    address_field,
    client_field,
    turn_allocate,
    udp_echo_server,
)

pytestmark = pytest.mark.interop

PAYLOADS = [b"x", b"hello through the relay", bytes(range(256)) * 4, b"\x00" * 1200]


async def wait_for_record(
    server: ServeProcess, client: str, timeout: float = 5.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        for record in server.audit_records():
            if record["client"] == client:
                return record
        assert time.monotonic() < deadline, f"no audit record for {client}"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
async def test_aioice_allocates_and_relays(
    request: pytest.FixtureRequest, family: str, transport: str
) -> None:
    serve: ServeProcess = request.getfixturevalue("serve" if family == "ipv4" else "serve6")
    host = serve.host
    context = None
    if transport == "tls":
        context = ssl.create_default_context(cafile=str(serve.cert_path))
    async with udp_echo_server(HOST) as (echo, peer):
        started = time.monotonic()
        client = await turn_allocate(serve, "udp" if transport == "udp" else "tcp", ssl=context)
        relay_ip, relay_port = client.relayed
        assert relay_ip == HOST
        assert serve.min_port <= relay_port <= serve.max_port
        # On loopback the server sees the client's own address, of the client's family.
        assert client.mapped[0] == host

        for payload in PAYLOADS:
            assert await client.echo(payload, peer) == payload
        await client.close()
        elapsed = time.monotonic() - started
    # The peer saw the datagrams coming from the relayed address, in order.
    assert echo.received == [(payload, (relay_ip, relay_port)) for payload in PAYLOADS]

    server_port = serve.tls_port if transport == "tls" else serve.port
    record = await wait_for_record(
        serve, client_field(transport, client.mapped, (host, server_port))
    )
    assert record["user"] == USER
    assert record["reason"] == "deleted"
    assert record["relay"] == [address_field(client.relayed)]
    assert record["peers"] == [HOST]
    total = sum(len(p) for p in PAYLOADS)
    assert record["to_peers"] == {"packets": len(PAYLOADS), "bytes": total}
    assert record["to_client"] == {"packets": len(PAYLOADS), "bytes": total}
    assert 0 <= record["duration"] <= elapsed + 0.5


# Clients per transport and worker.
SPREAD_CLIENTS = 16


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
async def test_aioice_allocations_land_on_every_worker(
    request: pytest.FixtureRequest, family: str
) -> None:
    """The server runs one worker per core; the kernel spreads clients over them by their
    addresses and ports. With 16 clients per transport and worker, a worker left without any
    by chance has odds below 1 in 10**6 (two workers: 1 in 2**31), so a worker that got none
    is not serving."""
    serve: ServeProcess = request.getfixturevalue("serve" if family == "ipv4" else "serve6")
    assert serve.workers == len(os.sched_getaffinity(0)), serve.startup
    tls = ssl.create_default_context(cafile=str(serve.cert_path))
    async with udp_echo_server(HOST) as (_, peer):
        for transport in ("udp", "tcp", "tls"):
            clients = await asyncio.gather(
                *(
                    turn_allocate(
                        serve,
                        "udp" if transport == "udp" else "tcp",
                        ssl=tls if transport == "tls" else None,
                    )
                    for _ in range(SPREAD_CLIENTS * serve.workers)
                )
            )
            for client in clients:
                assert await client.echo(b"which worker?", peer) == b"which worker?"
            await asyncio.gather(*(client.close() for client in clients))
            server_port = serve.tls_port if transport == "tls" else serve.port
            records = [
                await wait_for_record(
                    serve, client_field(transport, client.mapped, (serve.host, server_port))
                )
                for client in clients
            ]
            for client, record in zip(clients, records, strict=True):
                assert record["relay"] == [address_field(client.relayed)]
                assert record["to_client"]["packets"] == 1, record
            seen = workers_seen(records, serve.workers)
            assert set(seen) <= set(range(serve.workers)), (transport, seen)
            assert len(seen) >= required_workers(serve.workers, len(records)), (transport, seen)


async def test_the_start_up_credential_works_and_is_short_lived(serve: ServeProcess) -> None:
    """The ready-to-paste entry relays, and expires within 10 minutes: the start-up output
    ends up in logs, where a day-long credential would be there for anyone to use."""
    (heading,) = [line for line in serve.startup if "ICE server entry" in line]
    assert "valid 10 min" in heading
    entry = json.loads(serve.startup[serve.startup.index(heading) + 1])
    assert any(url.startswith("turn:") for url in entry["urls"])
    expiry = int(entry["username"].split(":")[0])
    assert time.time() < expiry <= time.time() + 600
    turn_transport, app = await asyncio.wait_for(
        aioice.turn.create_turn_endpoint(
            Collector,
            server_addr=(serve.host, serve.port),
            username=entry["username"],
            password=entry["credential"],
        ),
        10.0,
    )
    client = TurnClient(turn_transport, app)
    try:
        async with udp_echo_server(HOST) as (_, peer):
            assert await client.echo(b"pasted", peer) == b"pasted"
    finally:
        await client.close()
