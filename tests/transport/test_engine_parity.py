"""The core, the Python engine and the native engine forward, drop and count alike.

The same client datagrams (ChannelData on a bound channel, with UDP padding, on an unbound
channel, cut short; Send indications to a permitted and to an unpermitted peer) go through:

- the core alone (:meth:`TurnServer.receive`, in memory),
- a UDP listener and relay socket of the Python engine, and
- those of the native engine,

and each must deliver the same payloads to the peer, drop the same datagrams, and count the
same packets, bytes and drops by cause. The way back (peer to client: ChannelData, a Data
indication, a peer without permission) has no core path; the two engines are compared there.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from typing import Any

import pytest

from support.engines import HOST, PASSWORD, USER, audit_records, make_engine, running, wait_for
from support.turn_harness import NOW, PEER, Client, channel_data, make_server, success
from tsunagu.stun import (
    ChannelNumber,
    Data,
    Lifetime,
    MessageClass,
    Method,
    XorPeerAddress,
    encode_message,
    parse_message,
)
from tsunagu.transport.engine import RelayEngine
from tsunagu.turn import Forward

CHANNEL = 0x4000
PAYLOADS = [b"x" * size for size in (1, 3, 4, 100, 1200)]
COUNTED = ("no allocation", "short channel data", "unbound channel", "no permission")


def send_indication(peer: tuple[str, int], payload: bytes) -> bytes:
    return encode_message(
        Method.SEND,
        MessageClass.INDICATION,
        bytes(12),
        [XorPeerAddress(*peer), Data(payload)],
    )


def client_datagrams(peer: tuple[str, int], outsider: tuple[str, int]) -> list[bytes]:
    """What the client sends once its channel to ``peer`` is bound (in this order)."""
    return [
        *(channel_data(CHANNEL, payload) for payload in PAYLOADS),
        channel_data(CHANNEL, b"abc") + b"\x00",  # UDP may carry ChannelData's padding
        channel_data(0x4FFF, b"unbound"),
        b"\x40\x00\x00\x10" + b"only4",  # says 16 bytes, carries 5
        send_indication(peer, b"by indication"),
        send_indication(outsider, b"no permission"),
    ]


EXPECTED_AT_PEER = [*PAYLOADS, b"abc", b"by indication"]


@dataclass
class Outcome:
    """What one path did with the client's datagrams."""

    delivered: list[bytes]
    packets_to_peers: int
    bytes_to_peers: int
    dropped: int
    drops: dict[str, int]
    back: list[Any] = field(default_factory=list)
    to_client: tuple[int, int] = (0, 0)


def core_outcome() -> Outcome:
    server, _ = make_server()
    client = Client(server)
    assert success(client.allocate())
    bound = client.request(Method.CHANNEL_BIND, [ChannelNumber(CHANNEL), XorPeerAddress(*PEER)])
    assert success(bound)
    delivered = []
    for datagram in client_datagrams(PEER, ("203.0.113.9", 9)):
        result = client.send(datagram, NOW)
        if isinstance(result, Forward):
            delivered.append(result.data)
    allocation = server.allocations[client.five_tuple]
    return Outcome(
        delivered,
        allocation.packets_to_peers,
        allocation.bytes_to_peers,
        allocation.dropped,
        {cause: server.drops[cause] for cause in COUNTED if server.drops[cause]},
    )


class WireClient(Client):
    """The in-memory harness's client, talking to a real listener over a UDP socket."""

    def __init__(self, sock: socket.socket, server_address: tuple[str, int]) -> None:
        super().__init__(None, username=USER, password=PASSWORD)  # type: ignore[arg-type]
        self.sock = sock
        self.server_address = server_address

    def send(self, data: bytes, now: float = NOW) -> bytes:
        self.sock.sendto(data, self.server_address)
        return self.sock.recv(65536)


def _udp(host: str = HOST) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(5.0)
    return sock


async def _collect(sock: socket.socket, count: int, timeout: float = 3.0) -> list[bytes]:
    """Read ``count`` datagrams (or what came within ``timeout``), then check nothing follows."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    got: list[bytes] = []
    deadline = loop.time() + timeout
    while len(got) < count and loop.time() < deadline:
        try:
            got.append(sock.recv(65536))
        except BlockingIOError:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    while True:
        try:
            got.append(sock.recv(65536))
        except BlockingIOError:
            return got


def _what_came_back(datagram: bytes) -> Any:
    """ChannelData as bytes; a Data indication as (peer, data), its transaction id aside."""
    if 0x40 <= datagram[0] <= 0x7F:
        return ("channel data", datagram)
    message = parse_message(datagram)
    peer, data = message.get(XorPeerAddress), message.get(Data)
    assert peer is not None and data is not None
    return ("data indication", peer.address, data.value)


async def engine_outcome(engine: RelayEngine, caplog: pytest.LogCaptureFixture) -> Outcome:
    async with running(engine) as rig:
        with _udp() as client_sock, _udp() as peer, _udp() as other, _udp("127.0.0.2") as stray:
            client = WireClient(client_sock, rig.udp_address)
            peer_address = peer.getsockname()
            allocated = await asyncio.to_thread(client.allocate)
            assert success(allocated)
            bound = await asyncio.to_thread(
                client.request,
                Method.CHANNEL_BIND,
                [ChannelNumber(CHANNEL), XorPeerAddress(*peer_address)],
            )
            assert success(bound)
            relayed = rig.driver.server.allocations
            [allocation] = relayed.values()
            relay_address = allocation.relayed_addresses[4]

            client_sock.setblocking(False)
            for datagram in client_datagrams(peer_address, ("127.0.0.2", 9)):
                client_sock.sendto(datagram, rig.udp_address)
            delivered = await _collect(peer, len(EXPECTED_AT_PEER))

            # The way back: bound peer (ChannelData), same IP without a channel (Data
            # indication), an address without permission (dropped).
            peer.sendto(b"back by channel", relay_address)
            other.sendto(b"back by indication", relay_address)
            stray.sendto(b"stray", relay_address)
            back = [_what_came_back(d) for d in await _collect(client_sock, 2)]
            back = [
                item
                if item[0] == "channel data"
                else (item[0], "other" if item[1] == other.getsockname() else item[1], item[2])
                for item in back
            ]

            client_sock.settimeout(5.0)
            deleted = await asyncio.to_thread(client.request, Method.REFRESH, [Lifetime(0)])
            assert success(deleted)
            await wait_for(lambda: audit_records(caplog))
        drops = rig.driver.server.drops
        counted = {cause: drops[cause] for cause in COUNTED if drops[cause]}
    [record] = audit_records(caplog)
    caplog.clear()
    # The audit line holds the allocation's counters, the native engine's folded in.
    return Outcome(
        delivered,
        record["to_peers"]["packets"],
        record["to_peers"]["bytes"],
        record["dropped"],
        counted,
        back,
        (record["to_client"]["packets"], record["to_client"]["bytes"]),
    )


def _expected(outcome: Outcome, *, way_back: bool) -> None:
    assert outcome.delivered == EXPECTED_AT_PEER
    assert outcome.packets_to_peers == len(EXPECTED_AT_PEER)
    assert outcome.bytes_to_peers == sum(map(len, EXPECTED_AT_PEER))
    # Unbound channel, short ChannelData, Send indication to a peer without permission.
    assert outcome.drops == {"short channel data": 1, "unbound channel": 1, "no permission": 1}
    # On the way back, the stray peer's datagram is dropped too.
    assert outcome.dropped == 3 + way_back


def test_the_core_alone() -> None:
    _expected(core_outcome(), way_back=False)


async def test_both_engines_do_what_the_core_does(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="tsunagu")
    core = core_outcome()
    python = await engine_outcome(make_engine("python"), caplog)
    native = await engine_outcome(make_engine("native"), caplog)
    _expected(python, way_back=True)
    _expected(native, way_back=True)
    for name in ("delivered", "packets_to_peers", "bytes_to_peers", "drops"):
        assert getattr(python, name) == getattr(core, name), name
        assert getattr(native, name) == getattr(core, name), name
    # Peer to client: the engines alone.
    assert (
        python.back
        == native.back
        == [
            ("channel data", channel_data(CHANNEL, b"back by channel")),  # no padding on UDP
            ("data indication", "other", b"back by indication"),
        ]
    )
    back_bytes = len(b"back by channel") + len(b"back by indication")
    assert python.to_client == native.to_client == (2, back_bytes)
