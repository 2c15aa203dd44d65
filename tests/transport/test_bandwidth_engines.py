"""Bandwidth limits on both relay engines: the same arithmetic, the same packets dropped.

The C path refills and spends the core's buckets itself (``_fastpath.admit`` is that code,
exposed for this test); on the same packet sequence it must decide as
:func:`tsunagu.turn.bandwidth.admit` does and leave the buckets in the same state. Then a
burst through each engine, each way, over UDP and TCP: exactly one second's worth passes,
the rest is counted as "bandwidth" drops in the core and in the audit record.
"""

from __future__ import annotations

import asyncio
import random
import socket
from array import array

import pytest

from support.engines import HOST, audit_records, make_engine, running, wait_for
from tsunagu.stun import Data, MessageClass, Method, XorPeerAddress, encode_message
from tsunagu.turn.bandwidth import MAX_BPS, NS, admit, new_bucket

pytestmark = pytest.mark.timeout(60)

PAYLOAD = 1000
LIMIT = 10 * PAYLOAD  # one second's burst: ten packets
SENT = 30


def native_admit() -> object:
    make_engine("native")  # skips where the extension is not built
    from tsunagu.transport import _fastpath

    return _fastpath.admit


@pytest.mark.parametrize("seed", range(8))
def test_c_and_python_decide_alike_on_the_same_packets(seed: int) -> None:
    c_admit = native_admit()
    rng = random.Random(seed)
    rates = [rng.choice([1, 100, 64_000, 1_250_000, MAX_BPS]) for _ in range(rng.randint(1, 3))]
    python_buckets = tuple(new_bucket(rate) for rate in rates)
    c_buckets = tuple(array("q", bucket) for bucket in python_buckets)
    now = rng.randrange(NS, 10**15)
    decisions = []
    for _ in range(5000):
        # Mostly back to back, sometimes a pause longer than the burst, now and then a step
        # backwards (another path read the clock a little later).
        now += rng.choice([0, 1, 1000, 20_000, 1_000_000, 3 * NS, -500])
        size = rng.choice([0, 1, 100, 1200, 65535])
        python = admit(python_buckets, now, size)
        assert c_admit(c_buckets, now, size) is python  # type: ignore[operator]
        assert c_buckets == python_buckets
        decisions.append(python)
    assert any(decisions)


def test_the_c_path_refuses_what_is_not_a_bucket() -> None:
    c_admit = native_admit()
    with pytest.raises(TypeError):
        c_admit((array("i", [0, 0, 0, 0]),), 0, 1)  # type: ignore[operator]
    with pytest.raises(TypeError):
        c_admit((array("q", [0, 0, 0]),), 0, 1)  # type: ignore[operator]


def sink() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    sock.setblocking(False)
    return sock


def drain(sock: socket.socket) -> int:
    count = 0
    while True:
        try:
            sock.recv(65536)
        except BlockingIOError:
            return count
        count += 1


@pytest.mark.parametrize("engine_name", ["native", "python"])
@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_a_burst_passes_one_seconds_worth_each_way(
    engine_name: str, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(engine_name)
    caplog.set_level("INFO", logger="tsunagu.audit")
    async with running(engine, max_bps=LIMIT) as rig:
        client = await rig.allocate(transport)
        peer = sink()
        peer_address = peer.getsockname()
        try:
            # The channel is bound (aioice binds one before the first ChannelData).
            client.transport.sendto(b"x" * PAYLOAD, peer_address)
            await wait_for(lambda: drain(peer) == 1)
            await asyncio.sleep(1.1)  # the bucket is full again
            for _ in range(SENT):
                client.transport.sendto(b"u" * PAYLOAD, peer_address)
            await asyncio.sleep(0.3)
            assert drain(peer) == 10
            relay = client.relayed
            for _ in range(SENT):
                peer.sendto(b"d" * PAYLOAD, relay)
            await asyncio.sleep(0.3)
            received = 0
            while not client.app.queue.empty():
                client.app.queue.get_nowait()
                received += 1
            assert received == 10
            assert rig.driver.server.drops["bandwidth"] == 2 * (SENT - 10)
        finally:
            peer.close()
        await client.close()
        await wait_for(lambda: bool(audit_records(caplog)))
    (record,) = audit_records(caplog)
    assert record["bandwidth_dropped"] == 2 * (SENT - 10)
    assert record["dropped"] >= record["bandwidth_dropped"]
    assert record["to_peers"]["packets"] == 11
    assert record["to_client"]["packets"] == 10


@pytest.mark.parametrize("engine_name", ["native", "python"])
async def test_send_indications_pay_the_same_buckets(engine_name: str) -> None:
    engine = make_engine(engine_name)
    async with running(engine, max_bps=LIMIT) as rig:
        client = await rig.allocate("udp")
        peer = sink()
        peer_address = peer.getsockname()
        try:
            client.transport.sendto(b"x" * PAYLOAD, peer_address)  # the permission
            await wait_for(lambda: drain(peer) == 1)
            await asyncio.sleep(1.1)
            server_socket = client.inner.transport
            for n in range(SENT):
                attributes = [XorPeerAddress(*peer_address), Data(b"s" * PAYLOAD)]
                txid = n.to_bytes(12, "big")
                server_socket.sendto(
                    encode_message(Method.SEND, MessageClass.INDICATION, txid, attributes)
                )
            await asyncio.sleep(0.3)
            assert drain(peer) == 10
            assert rig.driver.server.drops["bandwidth"] == SENT - 10
        finally:
            peer.close()
