"""``--max-bps`` holds a flood to its rate through a real ``tsunagu serve``, each way, on both
relay engines, and a client under its limit loses nothing; a realm's ``max-bps`` set with
coturn's ``turnadmin`` limits the allocations made after it.

An aioice client floods at four times the limit, client to peer (what the peer receives is
measured) and peer to client (what the client receives). Past the first second, which the
one-second burst lets through, the rate received must be within 5 % of the limit.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aioice.turn
import pytest

from support.interop import HOST, PASSWORD, USER, Collector, ServeProcess, TurnClient, run_serve

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

LIMIT = 100_000  # bytes per second, each way
PAYLOAD = 1000
OFFERED = 4 * LIMIT // PAYLOAD  # packets per second: four times the limit
FLOOD = 4.0  # seconds
SETTLED = 1.5  # seconds: the burst has passed by then
TOLERANCE = 0.05

log = logging.getLogger(__name__)


class Timed(asyncio.DatagramProtocol):
    """Records when each datagram arrived, and its size."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, int]] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.arrivals.append((time.monotonic(), len(data)))


class TimedCollector(Collector):
    def __init__(self) -> None:
        super().__init__()
        self.arrivals: list[tuple[float, int]] = []

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.arrivals.append((time.monotonic(), len(data)))
        super().datagram_received(data, addr)


def settled_rate(arrivals: list[tuple[float, int]], start: float) -> float:
    """Bytes per second received between SETTLED and FLOOD seconds after ``start``."""
    low, high = start + SETTLED, start + FLOOD
    total = sum(size for at, size in arrivals if low <= at < high)
    return total / (high - low)


async def flood(send: Any, destination: tuple[str, int]) -> float:
    """Send PAYLOAD-byte datagrams at OFFERED per second for FLOOD seconds; the start time."""
    start = time.monotonic()
    sent = 0
    payload = b"f" * PAYLOAD
    while (elapsed := time.monotonic() - start) < FLOOD:
        due = int(elapsed * OFFERED) + 1
        while sent < due:
            send(payload, destination)
            sent += 1
        await asyncio.sleep(0.002)
    return start


@pytest.fixture(scope="module", params=["native", "python"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeProcess]:
    tmp: Path = tmp_path_factory.mktemp(f"bandwidth-{request.param}")
    extra = ("--relay-engine", request.param, "--max-bps", str(LIMIT))
    with run_serve(tmp, *extra) as server:
        assert any(f"relay path: {request.param}" in line for line in server.startup)
        yield server


async def allocate(server: ServeProcess, app: type[Collector] = TimedCollector) -> TurnClient:
    transport, protocol = await asyncio.wait_for(
        aioice.turn.create_turn_endpoint(
            app, server_addr=(HOST, server.port), username=USER, password=PASSWORD
        ),
        10.0,
    )
    return TurnClient(transport, protocol)


async def peer_socket() -> tuple[asyncio.DatagramTransport, Timed]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(Timed, local_addr=(HOST, 0))
    return transport, protocol


async def test_a_flood_to_the_peer_is_held_to_max_bps(served: ServeProcess) -> None:
    client = await allocate(served)
    transport, peer = await peer_socket()
    try:
        address = transport.get_extra_info("sockname")
        start = await flood(client.transport.sendto, address)
        await asyncio.sleep(0.3)
        rate = settled_rate(peer.arrivals, start)
        log.info("to the peer: %.0f B/s against a limit of %d", rate, LIMIT)
        assert abs(rate - LIMIT) <= TOLERANCE * LIMIT, rate
    finally:
        transport.close()
        await client.close()


async def test_a_flood_to_the_client_is_held_to_max_bps(served: ServeProcess) -> None:
    client = await allocate(served)
    transport, _ = await peer_socket()
    try:
        address = transport.get_extra_info("sockname")
        client.transport.sendto(b"hello", address)  # the permission and channel
        await asyncio.sleep(0.3)
        app = client.app
        assert isinstance(app, TimedCollector)
        app.arrivals.clear()
        start = await flood(transport.sendto, client.relayed)
        await asyncio.sleep(0.3)
        rate = settled_rate(app.arrivals, start)
        log.info("to the client: %.0f B/s against a limit of %d", rate, LIMIT)
        assert abs(rate - LIMIT) <= TOLERANCE * LIMIT, rate
    finally:
        transport.close()
        await client.close()


async def test_a_client_under_its_limit_loses_nothing(served: ServeProcess) -> None:
    client = await allocate(served, Collector)
    loop = asyncio.get_running_loop()

    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

        def datagram_received(self, data: bytes, addr: Any) -> None:
            self.transport.sendto(data, addr)

    transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=(HOST, 0))
    try:
        address = transport.get_extra_info("sockname")
        # Half the limit, each way, for three seconds, after a first message binds the channel.
        assert await client.echo(b"first", address) == b"first"
        count = 3 * (LIMIT // 2) // PAYLOAD
        for n in range(count):
            client.transport.sendto(n.to_bytes(4, "big") + bytes(PAYLOAD - 4), address)
            await asyncio.sleep(PAYLOAD / (LIMIT / 2))
        received = set()
        while len(received) < count:
            data, _ = await client.app.next(2.0)
            received.add(int.from_bytes(data[:4], "big"))
        assert received == set(range(count))
    finally:
        transport.close()
        await client.close()
    records = [r for r in served.audit_records() if r.get("event") == "allocation-ended"]
    assert records and all("bandwidth_dropped" in r for r in records)


async def test_a_realm_max_bps_from_turnadmin_limits_new_allocations(tmp_path: Path) -> None:
    database = tmp_path / "turndb"
    realm = "example.org"

    def turnadmin(*argv: str) -> None:
        done = subprocess.run(["turnadmin", *argv], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr + done.stdout

    turnadmin("-a", "-b", str(database), "-u", "erin", "-r", realm, "-p", "erin-pw")
    # One worker: each reads the realm's options on its own, within 5 s.
    serve = ("-b", str(database), "-r", realm, "--workers", "1")
    with run_serve(tmp_path / "serve", *serve) as server:
        turnadmin("-g", "-b", str(database), "-r", realm, "--max-bps", str(10 * PAYLOAD))
        assert await server.wait_for_log_async("10000 bytes per second per allocation", 12)
        transport, protocol = await asyncio.wait_for(
            aioice.turn.create_turn_endpoint(
                Collector, server_addr=(HOST, server.port), username="erin", password="erin-pw"
            ),
            10.0,
        )
        client = TurnClient(transport, protocol)
        peer_transport, peer = await peer_socket()
        try:
            address = peer_transport.get_extra_info("sockname")
            client.transport.sendto(b"bind", address)
            await asyncio.sleep(1.2)  # the channel is bound, the bucket full again
            for _ in range(30):
                client.transport.sendto(b"b" * PAYLOAD, address)
            await asyncio.sleep(0.5)
            # The first message, then one second's worth: ten.
            assert [size for _, size in peer.arrivals].count(PAYLOAD) == 10
        finally:
            peer_transport.close()
            await client.close()
