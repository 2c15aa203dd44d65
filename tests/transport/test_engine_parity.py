"""The core, the Python engine and the native engine forward, drop and count alike.

The same client datagrams (ChannelData on a bound channel, with UDP padding, on an unbound
channel, cut short; Send indications to a permitted and to an unpermitted peer) go through:

- the core alone (:meth:`TurnServer.receive`, in memory),
- a UDP listener and relay socket of the Python engine, and
- those of the native engine,

and each must deliver the same payloads to the peer, drop the same datagrams, and count the
same packets, bytes and drops by cause. The way back (peer to client: ChannelData, a Data
indication, a peer without permission) has no core path; the two engines are compared there.

NAT behaviour discovery (RFC 5780) is compared the same way: Binding requests with and without
CHANGE-REQUEST, RESPONSE-PORT and PADDING, sent to each of the four addresses, must be answered
from the same address, to the same port, with the same attributes, by the core alone and by
both engines (whose C path answers plain Bindings itself only where RFC 5780 does not run).
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from typing import Any

import pytest

from support.engines import (
    HOST,
    HOST2,
    PASSWORD,
    USER,
    audit_records,
    make_engine,
    running,
    wait_for,
)
from support.turn_harness import NOW, PEER, Client, channel_data, make_server, success
from tsunagu.stun import (
    Attribute,
    ChangeRequest,
    ChannelNumber,
    Data,
    ErrorCode,
    Lifetime,
    MessageClass,
    Method,
    OtherAddress,
    Padding,
    ResponseOrigin,
    ResponsePort,
    XorMappedAddress,
    XorPeerAddress,
    encode_message,
    parse_message,
)
from tsunagu.transport.engine import RelayEngine
from tsunagu.turn import FiveTuple, Forward, NatDiscovery, Reply, TurnSettings

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


# --- NAT behaviour discovery -------------------------------------------------------------------

# (which of the four addresses it goes to, attributes, FINGERPRINT); "other port" stands for the
# port of the client's second socket, where RESPONSE-PORT sends the answer.
OTHER_PORT = -1
DISCOVERY_REQUESTS: list[tuple[str, list[Attribute], bool]] = [
    ("A1:P1", [], False),
    ("A2:P2", [], True),  # plain, with FINGERPRINT: the kind C would answer by itself
    ("A1:P1", [ChangeRequest(change_ip=True, change_port=True)], False),
    ("A2:P2", [ChangeRequest(change_ip=True)], True),
    ("A2:P1", [ChangeRequest(change_port=True)], False),
    ("A1:P2", [ChangeRequest()], False),
    ("A1:P2", [ResponsePort(OTHER_PORT)], False),
    ("A2:P1", [ResponsePort(OTHER_PORT), ChangeRequest(change_ip=True)], True),
    ("A1:P1", [ChangeRequest(change_ip=True, change_port=True), Padding(bytes(1200))], True),
    ("A1:P1", [ResponsePort(OTHER_PORT), Padding(bytes(8))], False),  # 400
]


def _request(attributes: list[Attribute], fingerprint: bool, other_port: int, index: int) -> bytes:
    attributes = [
        ResponsePort(other_port) if isinstance(a, ResponsePort) else a for a in attributes
    ]
    txid = index.to_bytes(12, "big")
    return encode_message(
        Method.BINDING, MessageClass.REQUEST, txid, attributes, fingerprint=fingerprint
    )


def _seen(
    data: bytes,
    source: tuple[str, int],
    to: str,
    names: dict[tuple[str, int], str],
    client: tuple[str, int],
) -> tuple[Any, ...]:
    """A response, with addresses as the roles they play (A1:P1, client...)."""
    message = parse_message(data)
    fields: list[Any] = []
    for attribute in message.attributes:
        if isinstance(attribute, ResponseOrigin | OtherAddress):
            fields.append((type(attribute).__name__, names[attribute.address]))
        elif isinstance(attribute, XorMappedAddress):
            fields.append(("XorMappedAddress", attribute.address == client))
        elif isinstance(attribute, ErrorCode):
            fields.append(("ErrorCode", attribute.code))
        else:
            fields.append(type(attribute).__name__)
    return (names[source], to, message.message_class.name, len(data), tuple(fields))


def core_discovery() -> tuple[list[tuple[Any, ...]], dict[str, int]]:
    ports = (3478, 3479)
    addresses = {
        f"A{i + 1}:P{j + 1}": (ip, port)
        for i, ip in enumerate((HOST, HOST2))
        for j, port in enumerate(ports)
    }
    names = {address: name for name, address in addresses.items()}
    server, _ = make_server(TurnSettings(nat_discovery=NatDiscovery(((HOST, HOST2),), ports)))
    client, other = (HOST, 40000), (HOST, 40001)
    seen = []
    for index, (target, attributes, fingerprint) in enumerate(DISCOVERY_REQUESTS):
        request = _request(attributes, fingerprint, other[1], index)
        local = addresses[target]
        answer = server.receive(request, FiveTuple("udp", client, local), NOW)
        if isinstance(answer, Reply):
            to = "client" if answer.destination == client else "other"
            seen.append(_seen(answer.data, answer.source, to, names, client))
        else:
            assert isinstance(answer, bytes)
            seen.append(_seen(answer, local, "client", names, client))
    return seen, dict(server.drops)


async def engine_discovery(engine: RelayEngine) -> tuple[list[tuple[Any, ...]], dict[str, int]]:
    async with running(engine, rfc5780=True) as rig:
        listeners = [rig.udp, *rig.others]
        addresses = {}
        for listener in listeners:
            ip, port = listener.local
            addresses[f"A{1 + (ip == HOST2)}:P{1 + (port != rig.udp.local[1])}"] = listener.local
        names = {address: name for name, address in addresses.items()}
        seen = []
        with _udp() as client_sock, _udp() as other_sock:
            client = client_sock.getsockname()
            for index, (target, attributes, fingerprint) in enumerate(DISCOVERY_REQUESTS):
                request = _request(attributes, fingerprint, other_sock.getsockname()[1], index)
                client_sock.sendto(request, addresses[target])
                waiting = [("client", client_sock), ("other", other_sock)]
                got = await _first_answer(waiting)
                assert got is not None, (target, attributes)
                to, data, source = got
                seen.append(_seen(data, source, to, names, client))
        drops = dict(rig.driver.server.drops)
        # Nothing was answered by C, where RESPONSE-ORIGIN and OTHER-ADDRESS would be missing.
        assert getattr(rig.udp, "bindings", 0) == 0
    return seen, drops


async def _first_answer(
    socks: list[tuple[str, socket.socket]], timeout: float = 3.0
) -> tuple[str, bytes, tuple[str, int]] | None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for _, sock in socks:
        sock.setblocking(False)
    while loop.time() < deadline:
        for name, sock in socks:
            try:
                data, source = sock.recvfrom(65536)
            except BlockingIOError:
                continue
            return name, data, (source[0], source[1])
        await asyncio.sleep(0.005)
    return None


async def test_both_engines_answer_nat_discovery_as_the_core_does() -> None:
    core, core_drops = core_discovery()
    python, python_drops = await engine_discovery(make_engine("python"))
    native, native_drops = await engine_discovery(make_engine("native"))
    assert python == core
    assert native == core
    assert python_drops == native_drops == core_drops
    # The table the three agree on, spelled out for the first requests.
    assert core[0][:3] == ("A1:P1", "client", "SUCCESS")
    assert core[2][:2] == ("A2:P2", "client")  # change IP and port
    assert core[6][:2] == ("A1:P2", "other")  # RESPONSE-PORT
    assert core[9][4] == (("ErrorCode", 400),)
