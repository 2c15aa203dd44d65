"""The driver, the listeners and the relay sockets in one process, on loopback.

No subprocess: a :class:`TurnDriver` runs the core on the test's event loop, with a UDP
listener or a TCP server made from the engine under test, and aioice allocates through it.
Every test runs with both relay engines. The native one is built here and in CI; where it
cannot be imported the test is skipped with the reason, and in CI (``CI=true``) it fails.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import sys
from typing import Any

import aioice.stun
import aioice.turn
import pytest

from support.engines import HOST, USER, audit_records, make_engine, running, wait_for, warnings
from support.interop import udp_echo_server
from tsunagu.transport.engine import EngineUnavailable, RelayEngine, load_engine
from tsunagu.transport.relay import UdpRelayBinder
from tsunagu.turn import PeerPolicy


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_channel_data_both_ways_and_the_audit_line(
    engine: RelayEngine, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tsunagu")
    async with running(engine, worker=3) as rig, udp_echo_server(HOST) as (echo, peer):
        client = await rig.allocate(transport)
        assert client.relayed[0] == HOST
        payloads = [b"x" * size for size in (1, 3, 4, 100, 1200)]
        for payload in payloads:
            assert await client.echo(payload, peer) == payload
        assert [data for data, _ in echo.received] == payloads
        await client.close()
        await wait_for(lambda: audit_records(caplog))
    [record] = audit_records(caplog)
    total = sum(map(len, payloads))
    assert record["event"] == "allocation-ended" and record["reason"] == "deleted"
    assert record["worker"] == 3
    assert record["user"] == USER
    assert record["client"].startswith(f"{transport}:{HOST}:")
    assert record["relay"] == [f"{client.relayed[0]}:{client.relayed[1]}"]
    assert record["peers"] == [HOST]
    assert record["to_peers"] == {"packets": len(payloads), "bytes": total}
    assert record["to_client"] == {"packets": len(payloads), "bytes": total}
    assert record["dropped"] == 0
    assert record["permission_requests"] == 1  # aioice's ChannelBind
    assert record["refused"] == {}
    assert warnings(caplog) == []


async def test_a_peer_without_a_channel_reaches_the_client_in_a_data_indication(
    engine: RelayEngine,
) -> None:
    async with running(engine) as rig, udp_echo_server(HOST) as (_, peer):
        client = await rig.allocate("udp")
        assert await client.echo(b"open", peer) == b"open"  # permission for the peer's IP
        other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with other:
            other.bind((HOST, 0))
            other.sendto(b"no channel", client.relayed)
            data, addr = await client.app.next()
            assert (data, addr) == (b"no channel", other.getsockname())


async def test_a_peer_without_permission_is_dropped_and_counted(
    engine: RelayEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tsunagu")
    async with running(engine) as rig, udp_echo_server(HOST) as (_, peer):
        client = await rig.allocate("udp")
        assert await client.echo(b"open", peer) == b"open"
        # Permissions are per IP address: 127.0.0.2 has none.
        outsider = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with outsider:
            outsider.bind(("127.0.0.2", 0))
            outsider.sendto(b"stranger", client.relayed)
            await asyncio.sleep(0.1)
        assert client.app.queue.empty()
        await client.close()
        await wait_for(lambda: audit_records(caplog))
    [record] = audit_records(caplog)
    assert record["dropped"] == 1


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_channel_data_that_cannot_be_relayed_is_counted_by_cause(
    engine: RelayEngine, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tsunagu")
    async with running(engine) as rig, udp_echo_server(HOST) as (_, peer):
        client = await rig.allocate(transport)
        assert await client.echo(b"open", peer) == b"open"
        drops = rig.driver.server.drops
        before = drops["unbound channel"]
        # The core's rule (turn.forwarding) decides on both listeners: channel 0x4FFF is not
        # bound, so the packet is dropped and counted against the allocation.
        client.inner._send(b"\x4f\xff\x00\x04data")
        await wait_for(lambda: drops["unbound channel"] == before + 1)
        await client.close()
        await wait_for(lambda: audit_records(caplog))
    [record] = audit_records(caplog)
    assert record["dropped"] == 1
    assert record["to_peers"] == {"packets": 1, "bytes": 4}


@pytest.mark.parametrize(
    "stream",
    [b"\xff\x00\x00\x00", b"\x40\x00\x00\x04abcd"],
    ids=["not-stun-nor-channel-data", "channel-data-before-allocating"],
)
async def test_tcp_connection_that_is_not_turn_is_closed(
    engine: RelayEngine, stream: bytes
) -> None:
    async with running(engine) as rig:
        reader, writer = await asyncio.open_connection(*rig.tcp_address)
        writer.write(stream)
        assert await asyncio.wait_for(reader.read(), 5.0) == b""
        writer.close()
        await wait_for(lambda: not rig.driver.streams)
        # Counted for the log, with what the bytes looked like and where they came.
        [failure] = rig.driver.failures.take()
        assert (failure.cause, failure.client, failure.count) == ("not STUN", HOST, 1)
        assert failure.facts["transport"] == "tcp"
        assert failure.facts["port"] == rig.tcp_address[1]
        assert failure.facts["what"].startswith(
            "ChannelData before any allocation" if stream[0] == 0x40 else "bytes that are neither"
        )


# --- the driver ---------------------------------------------------------------------------------


@pytest.mark.parametrize("short_lived", [0.0, 60.0])
async def test_an_allocation_that_never_had_a_peer_is_explained_once(
    engine: RelayEngine, caplog: pytest.LogCaptureFixture, short_lived: float
) -> None:
    """Explained as a warning, unless it was too short-lived to be more than routine."""
    caplog.set_level(logging.INFO, logger="tsunagu")
    async with running(engine, worker=1) as rig:
        rig.driver.short_lived = short_lived
        client = await rig.allocate("udp")
        mapped = client.mapped
        await client.close()
        await wait_for(lambda: audit_records(caplog))
    [record] = audit_records(caplog)
    assert record["peers"] == [] and record["permission_requests"] == 0
    explained = [
        r for r in caplog.records if r.name == "tsunagu" and "without relaying" in r.getMessage()
    ]
    assert [r.levelno for r in explained] == [logging.INFO if short_lived else logging.WARNING]
    line = explained[0].getMessage()
    assert "no CreatePermission or ChannelBind was received" in line
    assert "check signaling and the other side's candidates" in line
    assert f"'{USER}'" in line
    assert f"udp:{mapped[0]}:{mapped[1]}->{HOST}:{rig.udp_address[1]}" in line
    assert " ended after 0." in line


async def test_an_allocation_whose_permissions_were_refused_says_why(
    engine: RelayEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tsunagu")
    # The default peer policy denies loopback peers.
    async with running(engine, policy=PeerPolicy.create()) as rig:
        client = await rig.allocate("udp")
        with pytest.raises(aioice.stun.TransactionFailed):
            await client.inner.send_data(b"x", (HOST, 9))
        await client.close()
        await wait_for(lambda: audit_records(caplog))
    [record] = audit_records(caplog)
    assert record["permission_requests"] == 1
    rule = "loopback range 127.0.0.0/8, denied by default"
    assert record["refused"] == {f"ChannelBind 403 peer 127.0.0.1 not allowed: {rule}": 1}
    [line] = warnings(caplog)
    assert (
        "its 1 CreatePermission/ChannelBind requests were refused:"
        f" ChannelBind 403 peer 127.0.0.1 not allowed: {rule}; likely cause: the peer addresses"
        " the client named are denied by the relay policy"
    ) in line


async def test_the_timer_ends_an_allocation_that_is_not_refreshed(
    engine: RelayEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tsunagu")
    async with running(engine, max_lifetime=1, default_lifetime=1) as rig:
        client = await rig.allocate("udp")
        await client.abort()  # no Refresh will come
        assert rig.driver.server.allocations
        await wait_for(lambda: audit_records(caplog))
        assert not rig.driver.server.allocations
    [record] = audit_records(caplog)
    assert record["reason"] == "expired"
    assert 1.0 <= record["duration"] < 3.0


async def test_shutdown_ends_every_allocation_and_says_so(
    engine: RelayEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tsunagu")
    async with running(engine) as rig, udp_echo_server(HOST) as (_, peer):
        udp_client = await rig.allocate("udp")
        tcp_client = await rig.allocate("tcp")
        for client in (udp_client, tcp_client):
            assert await client.echo(b"hi", peer) == b"hi"
        rig.driver.all_ended.clear()
        rig.driver.shutdown()
        assert rig.driver.all_ended.is_set()
        await wait_for(lambda: not rig.driver.streams)
        assert not rig.driver.server.allocations
    records = audit_records(caplog)
    assert sorted(r["reason"] for r in records) == ["shutdown", "shutdown"]
    assert sorted(r["client"][:4] for r in records) == ["tcp:", "udp:"]


# --- choosing an engine -------------------------------------------------------------------------


def test_load_engine_python() -> None:
    assert load_engine("python").name == "python"


def test_load_engine_native_and_auto_where_built() -> None:
    make_engine("native")
    assert load_engine("native").name == "native"
    assert load_engine("auto").name == "native"


def test_without_the_extension_auto_runs_python_and_native_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "tsunagu.transport.native", None)
    assert load_engine("auto").name == "python"
    with pytest.raises(EngineUnavailable, match="--relay-engine python"):
        load_engine("native")


@pytest.mark.parametrize("dont_fragment", [False, True])
async def test_dont_fragment_sets_the_df_bit_on_the_relay_socket(
    engine: RelayEngine, dont_fragment: bool
) -> None:
    """DONT-FRAGMENT (RFC 8656 §14.8): IPv4 packets from the relay leave with DF set."""
    made: list[socket.socket] = []

    def endpoint(loop: asyncio.AbstractEventLoop, sock: socket.socket, *args: Any) -> Any:
        made.append(sock)
        return engine.relay_endpoint(loop, sock, *args)

    binder = UdpRelayBinder(asyncio.get_running_loop(), random.randbytes, endpoint)
    relay = binder.bind(HOST, 0, dont_fragment=dont_fragment)
    assert relay is not None
    try:
        # <linux/in.h>: IP_MTU_DISCOVER 10; IP_PMTUDISC_DO 2 (DF set), IP_PMTUDISC_DONT 0.
        mode = made[0].getsockopt(socket.IPPROTO_IP, 10)
        assert (mode == 2) is dont_fragment
    finally:
        binder.release(relay)
