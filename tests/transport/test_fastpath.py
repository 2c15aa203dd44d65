"""The native per-packet path (``tsunagu.transport._fastpath``) on real loopback sockets.

No event loop: each test sends datagrams, then calls ``readable()`` as the loop would when
the socket becomes readable. The C code must relay exactly what the Python path relays, hand
everything else to the fallback byte for byte, and survive anything a client or peer sends.
"""

from __future__ import annotations

import os
import random
import select
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tsunagu.stun.attributes import Data, XorMappedAddress, XorPeerAddress
from tsunagu.stun.framing import FramingError, StreamFramer
from tsunagu.stun.message import MessageClass, Method, encode_message, parse_message
from tsunagu.turn import TurnServer, TurnSettings, data_indication
from tsunagu.turn.allocation import Allocation, FiveTuple

# In CI the extension must be there: a silent fallback would leave it untested.
_fastpath = pytest.importorskip("tsunagu.transport._fastpath")

PREFIX = b"\x01\x02\x03\x04"


def _udp(host: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock


def _settle() -> None:
    # Loopback delivery is synchronous in practice; a short pause makes it certain.
    time.sleep(0.002)


def _readable_now(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def _receive_all(sock: socket.socket) -> list[tuple[bytes, Any]]:
    _settle()
    got = []
    while True:
        try:
            got.append(sock.recvfrom(70000))
        except BlockingIOError:
            return got


@dataclass
class Rig:
    """A client, a listener, a relay socket and a peer, wired like one allocation."""

    host: str
    client: socket.socket
    listener_sock: socket.socket
    relay_sock: socket.socket
    peer: socket.socket
    relay: Any
    listener: Any
    allocation: Allocation
    fallen_back: list[tuple[bytes, Any]] = field(default_factory=list)

    @property
    def peer_address(self) -> tuple[str, int]:
        return self.peer.getsockname()[:2]

    @property
    def client_key(self) -> Any:
        name = self.client.getsockname()
        return name if ":" in self.host else name[:2]

    def permit(self) -> None:
        self.allocation.permissions[self.host] = 1e18

    def bind_channel(self, number: int) -> None:
        self.allocation.channels[number] = (self.relay, self.peer_address)
        self.allocation.peer_channels[self.peer_address] = number

    def from_client(self, *datagrams: bytes) -> None:
        for datagram in datagrams:
            self.client.sendto(datagram, self.listener_sock.getsockname())
        _settle()
        self.listener.readable()

    def from_peer(self, *datagrams: bytes) -> None:
        for datagram in datagrams:
            self.peer.sendto(datagram, self.relay_sock.getsockname())
        _settle()
        # As the event loop does while the socket stays readable: a quiet relay socket
        # reads one datagram per call, a busy one a batch.
        for _ in range(len(datagrams) + 1):
            self.relay.readable()


def _rig(host: str) -> Iterator[Rig]:
    client, listener_sock, relay_sock, peer = (_udp(host) for _ in range(4))
    relay = _fastpath.Relay(relay_sock.fileno(), PREFIX)
    five_tuple = FiveTuple("udp", client.getsockname()[:2], listener_sock.getsockname()[:2])
    version = 6 if ":" in host else 4
    allocation = Allocation(
        five_tuple,
        "alice",
        "realm",
        {version: relay},
        {version: relay_sock.getsockname()[:2]},
        0.0,
        1e18,
        b"\x00" * 12,
        b"",
    )
    allocations: dict[Any, Allocation] = {}
    rig_holder: list[Rig] = []

    def fallback(data: bytes, address: Any) -> None:
        rig_holder[0].fallen_back.append((data, address))

    listener = _fastpath.Listener(listener_sock.fileno(), allocations, fallback)
    rig = Rig(host, client, listener_sock, relay_sock, peer, relay, listener, allocation)
    rig_holder.append(rig)
    allocations[rig.client_key] = allocation
    relay.allocation = allocation
    relay.set_client(listener_sock.fileno(), rig.client_key)
    try:
        yield rig
    finally:
        relay.clear_client()
        for sock in (rig.client, rig.listener_sock, rig.relay_sock, rig.peer):
            sock.close()


@pytest.fixture(params=["127.0.0.1", "::1"])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    yield from _rig(request.param)


@pytest.fixture
def rig4() -> Iterator[Rig]:
    yield from _rig("127.0.0.1")


def _send_indication(peer: tuple[str, int], payload: bytes, *, fingerprint: bool = False) -> bytes:
    return encode_message(
        Method.SEND,
        MessageClass.INDICATION,
        os.urandom(12),
        [XorPeerAddress(peer[0], peer[1]), Data(payload)],
        fingerprint=fingerprint,
    )


# ---------------------------------------------------------------- client -> peer


def test_channel_data_reaches_the_peer(rig: Rig) -> None:
    rig.permit()
    rig.bind_channel(0x4001)
    rig.from_client(struct.pack("!HH", 0x4001, 5) + b"hello", struct.pack("!HH", 0x4001, 2) + b"ok")
    got = _receive_all(rig.peer)
    assert [data for data, _ in got] == [b"hello", b"ok"]
    assert all(addr[:2] == rig.relay_sock.getsockname()[:2] for _, addr in got)
    assert (rig.relay.packets_to_peers, rig.relay.bytes_to_peers) == (2, 7)
    assert rig.fallen_back == []
    assert rig.listener.relayed == 2


def test_channel_data_with_padding_sends_only_the_announced_length(rig4: Rig) -> None:
    rig4.permit()
    rig4.bind_channel(0x4001)
    rig4.from_client(struct.pack("!HH", 0x4001, 3) + b"abc\x00")
    assert [data for data, _ in _receive_all(rig4.peer)] == [b"abc"]


@pytest.mark.parametrize(
    "case",
    ["unbound channel", "no permission", "short", "unknown client", "header only"],
)
def test_channel_data_the_fast_path_cannot_relay_goes_to_python_unchanged(
    rig4: Rig, case: str
) -> None:
    rig4.bind_channel(0x4001)
    rig4.permit()
    datagram = struct.pack("!HH", 0x4001, 5) + b"hello"
    if case == "unbound channel":
        datagram = struct.pack("!HH", 0x4002, 5) + b"hello"
    elif case == "no permission":
        rig4.allocation.permissions.clear()
    elif case == "short":
        datagram = struct.pack("!HH", 0x4001, 9) + b"hello"
    elif case == "unknown client":
        rig4.listener_sock.close()
        rig4.listener_sock = _udp("127.0.0.1")
        rig4.listener = _fastpath.Listener(
            rig4.listener_sock.fileno(), {}, lambda d, a: rig4.fallen_back.append((d, a))
        )
    elif case == "header only":
        datagram = b"\x40\x01"
    rig4.from_client(datagram)
    assert rig4.fallen_back == [(datagram, rig4.client_key)]
    assert _receive_all(rig4.peer) == []
    assert rig4.relay.packets_to_peers == 0


def test_stun_goes_to_python_with_the_socket_modules_address(rig: Rig) -> None:
    binding = bytes.fromhex("000100002112a442") + os.urandom(12)
    rig.from_client(binding, b"")
    assert rig.fallen_back == [(binding, rig.client_key), (b"", rig.client_key)]
    # The address is the tuple Python's socket module gives for that client.
    assert rig.fallen_back[0][1] == rig.client.getsockname()[: 4 if ":" in rig.host else 2]


def test_send_indication_reaches_the_peer(rig: Rig) -> None:
    rig.permit()
    rig.from_client(_send_indication(rig.peer_address, b"payload!x"))
    got = _receive_all(rig.peer)
    assert [data for data, _ in got] == [b"payload!x"]
    assert rig.fallen_back == []
    assert (rig.relay.packets_to_peers, rig.relay.bytes_to_peers) == (1, 9)


@pytest.mark.parametrize("case", ["no permission", "fingerprint", "other family", "no data"])
def test_send_indications_the_fast_path_cannot_relay_go_to_python(rig4: Rig, case: str) -> None:
    rig4.permit()
    if case == "no permission":
        rig4.allocation.permissions.clear()
        datagram = _send_indication(rig4.peer_address, b"x")
    elif case == "fingerprint":
        datagram = _send_indication(rig4.peer_address, b"x", fingerprint=True)
    elif case == "other family":
        datagram = _send_indication(("::1", 9), b"x")
    else:
        datagram = encode_message(
            Method.SEND, MessageClass.INDICATION, os.urandom(12), [XorPeerAddress("127.0.0.1", 9)]
        )
    rig4.from_client(datagram)
    assert rig4.fallen_back == [(datagram, rig4.client_key)]
    assert _receive_all(rig4.peer) == []


# ---------------------------------------------------------------- peer -> client


def test_peer_datagram_on_a_channel_reaches_the_client_as_channel_data(rig: Rig) -> None:
    rig.permit()
    rig.bind_channel(0x4ABC)
    rig.from_peer(b"pong", b"12345")
    got = _receive_all(rig.client)
    assert [data for data, _ in got] == [
        struct.pack("!HH", 0x4ABC, 4) + b"pong",
        struct.pack("!HH", 0x4ABC, 5) + b"12345",
    ]
    assert all(addr[:2] == rig.listener_sock.getsockname()[:2] for _, addr in got)
    assert (rig.relay.packets_to_client, rig.relay.bytes_to_client) == (2, 9)


def test_peer_datagram_without_a_channel_is_the_same_data_indication_python_builds(
    rig: Rig,
) -> None:
    rig.permit()
    payloads = [b"", b"a", b"ab", b"abc", b"abcd", os.urandom(1001)]
    rig.from_peer(*payloads)
    got = [data for data, _ in _receive_all(rig.client)]
    expected = [
        data_indication(PREFIX + n.to_bytes(8, "big"), rig.peer_address, payload)
        for n, payload in enumerate(payloads, start=1)
    ]
    assert got == expected


def test_peer_without_permission_is_dropped_and_counted(rig: Rig) -> None:
    rig.from_peer(b"intruder")
    assert _receive_all(rig.client) == []
    assert rig.relay.dropped == 1
    assert rig.relay.packets_to_client == 0


def test_relay_before_its_allocation_is_attached_drops(rig4: Rig) -> None:
    rig4.relay.allocation = None
    rig4.permit()
    rig4.from_peer(b"early")
    assert _receive_all(rig4.client) == []
    assert rig4.relay.dropped == 1


def test_a_burst_larger_than_a_batch_arrives_whole_and_in_order(rig4: Rig) -> None:
    rig4.permit()
    rig4.bind_channel(0x4001)
    count = _fastpath.BATCH * 2 + 5
    payloads = [i.to_bytes(4, "big") for i in range(count)]
    for payload in payloads:
        rig4.peer.sendto(payload, rig4.relay_sock.getsockname())
    _settle()
    calls = 0
    while calls < count and _readable_now(rig4.relay_sock):
        rig4.relay.readable()
        calls += 1
    assert [data[4:] for data, _ in _receive_all(rig4.client)] == payloads
    # The first call reads one; the rest, coming right after, read batches.
    assert calls <= count // 8, calls


def test_stream_clients_get_messages_through_their_link(rig4: Rig) -> None:
    rig4.permit()
    rig4.bind_channel(0x4001)
    rig4.relay.clear_client()
    rig4.relay.allocation = rig4.allocation
    sent: list[bytes] = []
    rig4.relay.to_client = sent.append
    rig4.from_peer(b"one", b"two")
    assert sent == [struct.pack("!HH", 0x4001, 3) + b"one", struct.pack("!HH", 0x4001, 3) + b"two"]
    assert rig4.relay.packets_to_client == 2


def test_stream_clients_get_padded_frames_unless_their_transport_is_paused(rig4: Rig) -> None:
    rig4.permit()
    rig4.bind_channel(0x4001)
    rig4.relay.clear_client()
    rig4.relay.allocation = rig4.allocation
    sent: list[bytes] = []
    rig4.relay.to_client = sent.append
    rig4.relay.pad_stream = True
    rig4.from_peer(b"a", b"abcd")
    rig4.relay.paused = True
    rig4.from_peer(b"lost")
    rig4.relay.paused = False
    rig4.from_peer(b"abcde")
    assert sent == [
        struct.pack("!HH", 0x4001, 1) + b"a\x00\x00\x00",
        struct.pack("!HH", 0x4001, 4) + b"abcd",
        struct.pack("!HH", 0x4001, 5) + b"abcde\x00\x00\x00",
    ]
    assert (rig4.relay.packets_to_client, rig4.relay.dropped) == (3, 1)


def test_a_failing_stream_link_costs_one_packet(rig4: Rig) -> None:
    rig4.permit()
    rig4.relay.clear_client()
    rig4.relay.allocation = rig4.allocation
    calls = []

    def send(message: bytes) -> None:
        calls.append(message)
        if len(calls) == 1:
            raise OSError("gone")

    rig4.relay.to_client = send
    rig4.from_peer(b"one", b"two")
    assert len(calls) == 2
    assert (rig4.relay.dropped, rig4.relay.packets_to_client) == (1, 1)


def test_an_oversized_data_indication_is_dropped_not_sent(rig4: Rig) -> None:
    rig4.permit()
    rig4.from_peer(b"x" * 65507)  # the largest IPv4 datagram: no room for the headers
    assert _receive_all(rig4.client) == []
    assert rig4.relay.dropped == 1


def test_sendto_behaves_like_the_socket_method(rig: Rig) -> None:
    assert rig.relay.sendto(b"direct", rig.peer_address) == 6
    assert [data for data, _ in _receive_all(rig.peer)] == [b"direct"]
    with pytest.raises(TypeError):
        rig.relay.sendto(b"x", "not a tuple")
    with pytest.raises(ValueError):
        rig.relay.sendto(b"x", ("not an ip", 1))
    with pytest.raises(OverflowError):
        rig.relay.sendto(b"x", ("127.0.0.1", 70000))


# ---------------------------------------------------------------- failures


def test_an_exception_in_the_fallback_does_not_cost_the_datagrams_behind_it(rig4: Rig) -> None:
    seen: list[bytes] = []

    def fallback(data: bytes, address: Any) -> None:
        seen.append(data)
        if data == b"\x00\x01boom":
            raise ValueError("bug")

    listener = _fastpath.Listener(rig4.listener_sock.fileno(), {}, fallback)
    for datagram in (b"\x00\x01boom", b"\x00\x01next"):
        rig4.client.sendto(datagram, rig4.listener_sock.getsockname())
    _settle()
    with pytest.raises(ValueError, match="bug"):
        listener.readable()
    assert seen == [b"\x00\x01boom", b"\x00\x01next"]


def test_reading_again_from_inside_a_read_is_refused(rig4: Rig) -> None:
    def fallback(data: bytes, address: Any) -> None:
        rig4.relay.readable()

    listener = _fastpath.Listener(rig4.listener_sock.fileno(), {}, fallback)
    rig4.client.sendto(b"\x00\x01", rig4.listener_sock.getsockname())
    _settle()
    with pytest.raises(RuntimeError, match="re-entered"):
        listener.readable()
    # The guard is released: reading works again.
    rig4.client.sendto(b"\x00\x02", rig4.listener_sock.getsockname())
    _settle()
    seen: list[bytes] = []
    _fastpath.Listener(rig4.listener_sock.fileno(), {}, lambda d, a: seen.append(d)).readable()
    assert seen == [b"\x00\x02"]


def test_nothing_to_read_is_not_an_error(rig4: Rig) -> None:
    rig4.listener.readable()
    rig4.relay.readable()
    assert rig4.fallen_back == [] and rig4.relay.dropped == 0


def test_bad_constructor_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        _fastpath.Relay(0, b"abc")
    with pytest.raises(TypeError):
        _fastpath.Listener(0, {}, "not callable")
    with pytest.raises(TypeError):
        _fastpath.Listener(0, [], print)


_PEER = ("127.0.0.1", 9)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.one_of(
        st.binary(max_size=80),
        st.builds(
            lambda b, rest: bytes([b]) + rest, st.integers(0x40, 0x7F), st.binary(max_size=40)
        ),
        st.builds(
            lambda cut, flip, payload: _mutate(_send_indication(_PEER, payload), cut, flip),
            st.integers(0, 60),
            st.integers(0, 60 * 8),
            st.binary(max_size=12),
        ),
    )
)
def test_fuzz_anything_from_a_client_is_relayed_whole_or_handed_over_unchanged(
    rig4: Rig, datagram: bytes
) -> None:
    rig4.fallen_back.clear()
    rig4.relay.clear_client()
    rig4.relay.allocation = rig4.allocation
    rig4.relay.set_client(rig4.listener_sock.fileno(), rig4.client_key)
    rig4.permit()
    rig4.allocation.channels[0x4001] = (rig4.relay, rig4.peer_address)
    before = rig4.listener.relayed
    rig4.from_client(datagram)
    relayed = rig4.listener.relayed - before
    assert relayed + len(rig4.fallen_back) == 1
    if rig4.fallen_back:
        assert rig4.fallen_back == [(datagram, rig4.client_key)]
    _receive_all(rig4.peer)


def _mutate(datagram: bytes, cut: int, flip: int) -> bytes:
    data = bytearray(datagram[: max(0, len(datagram) - cut)] if cut % 3 == 0 else datagram)
    if data and flip // 8 < len(data):
        data[flip // 8] ^= 1 << (flip % 8)
    return bytes(data)


# ---------------------------------------------------------------- Binding


def _binding(fingerprint: bool) -> bytes:
    return encode_message(
        Method.BINDING, MessageClass.REQUEST, os.urandom(12), fingerprint=fingerprint
    )


@pytest.mark.parametrize("fingerprint", [False, True])
def test_plain_binding_is_answered_as_the_core_answers_it(rig: Rig, fingerprint: bool) -> None:
    rig.listener.answer_binding = True
    request = _binding(fingerprint)
    rig.from_client(request)
    got = _receive_all(rig.client)
    assert len(got) == 1 and rig.fallen_back == []
    response = parse_message(got[0][0])
    assert response.message_class is MessageClass.SUCCESS
    assert response.transaction_id == request[8:20]
    mapped = response.get(XorMappedAddress)
    assert mapped is not None
    assert (mapped.ip, mapped.port) == rig.client.getsockname()[:2]
    assert response.check_fingerprint() is (True if fingerprint else None)
    # Byte for byte what the Python core sends for the same request.
    assert got[0][0] == _core_binding_answer(request, rig.client.getsockname()[:2])
    assert rig.listener.bindings == 1


def test_a_batch_of_bindings_is_answered_whole(rig4: Rig) -> None:
    rig4.listener.answer_binding = True
    requests = [_binding(i % 2 == 0) for i in range(_fastpath.BATCH + 3)]
    for request in requests:
        rig4.client.sendto(request, rig4.listener_sock.getsockname())
    _settle()
    rig4.listener.readable()
    rig4.listener.readable()
    got = [data for data, _ in _receive_all(rig4.client)]
    assert sorted(r[8:20] for r in got) == sorted(r[8:20] for r in requests)


@pytest.mark.parametrize("case", ["off", "bad fingerprint", "attribute", "rfc3489", "length"])
def test_other_bindings_go_to_python(rig4: Rig, case: str) -> None:
    rig4.listener.answer_binding = case != "off"
    request = _binding(True)
    if case == "bad fingerprint":
        request = request[:-1] + bytes([request[-1] ^ 1])
    elif case == "attribute":
        request = encode_message(
            Method.BINDING, MessageClass.REQUEST, os.urandom(12), [Data(b"abcd")]
        )
    elif case == "rfc3489":
        request = bytes.fromhex("00010000") + os.urandom(16)
    elif case == "length":
        request = request[:2] + b"\x00\x04" + request[4:]
    rig4.from_client(request)
    assert rig4.fallen_back == [(request, rig4.client_key)]
    assert _receive_all(rig4.client) == []


def _core_binding_answer(request: bytes, client: tuple[str, int]) -> bytes:
    class _NoStore:
        def get_keys(self, *args: Any) -> tuple[bytes, ...]:
            return ()

    class _NoBinder:
        def bind(self, *args: Any, **kwargs: Any) -> None:
            return None

        def release(self, relay: Any) -> None:
            pass

    server = TurnServer(
        TurnSettings(),
        _NoStore(),  # type: ignore[arg-type]
        _NoBinder(),  # type: ignore[arg-type]
        random.Random(1),
    )
    answer = server.receive(request, FiveTuple("udp", client, ("127.0.0.1", 3478)), 0.0)
    assert isinstance(answer, bytes)
    return answer


# ---------------------------------------------------------------- TCP/TLS streams


def _stream_of(*frames: bytes) -> bytes:
    return b"".join(frame + b"\x00" * (-len(frame) % 4) for frame in frames)


def _python_frames(chunks: list[bytes]) -> tuple[list[tuple[bool, bytes]], bool]:
    framer = StreamFramer()
    out: list[tuple[bool, bytes]] = []
    try:
        for chunk in chunks:
            framer.feed(chunk)
            out.extend(framer.frames())
    except FramingError:
        return out, True
    return out, False


def _native_frames(chunks: list[bytes]) -> tuple[list[tuple[bool, bytes]], bool]:
    out: list[tuple[bool, bytes]] = []
    stream = _fastpath.Stream(lambda is_channel_data, frame: out.append((is_channel_data, frame)))
    try:
        for chunk in chunks:
            assert stream.feed(chunk) is False
    except FramingError:
        return out, True
    return out, False


def test_stream_relays_channel_data_and_hands_over_the_rest(rig4: Rig) -> None:
    rig4.permit()
    rig4.bind_channel(0x4001)
    seen: list[tuple[bool, bytes]] = []
    stream = _fastpath.Stream(lambda is_channel_data, frame: seen.append((is_channel_data, frame)))
    binding = _binding(True)
    unbound = struct.pack("!HH", 0x4002, 1) + b"z"
    data = _stream_of(struct.pack("!HH", 0x4001, 3) + b"abc", binding, unbound)
    # Before the allocation is known every frame goes to Python.
    assert stream.feed(data) is False
    assert seen == [
        (True, struct.pack("!HH", 0x4001, 3) + b"abc"),
        (False, binding),
        (True, unbound),
    ]
    seen.clear()
    stream.allocation = rig4.allocation
    for cut in range(len(data) + 1):  # every split of the stream into two reads
        stream.feed(data[:cut])
        stream.feed(data[cut:])
    assert seen == [(False, binding), (True, unbound)] * (len(data) + 1)
    assert [d for d, _ in _receive_all(rig4.peer)] == [b"abc"] * (len(data) + 1)
    assert stream.relayed == len(data) + 1 and stream.buffered == 0


def test_stream_stops_when_the_fallback_says_so() -> None:
    seen: list[bytes] = []

    def fallback(is_channel_data: bool, frame: bytes) -> bool:
        seen.append(frame)
        return True

    stream = _fastpath.Stream(fallback)
    first, second = _binding(False), _binding(False)
    assert stream.feed(first + second + b"\x00\x01") is True
    assert seen == [first] and stream.buffered == 0


@pytest.mark.parametrize(
    "data", [b"\x80\x00\x00\x00", b"\xffGET / HTTP/1.1\r\n", b"\x00\x01\x00\x05" + b"x" * 20]
)
def test_a_stream_that_is_not_turn_raises_the_framers_error(data: bytes) -> None:
    stream = _fastpath.Stream(lambda *args: None)
    with pytest.raises(FramingError):
        stream.feed(data)
    assert stream.buffered == 0


def test_a_stream_cannot_be_fed_from_its_own_fallback() -> None:
    holder: list[Any] = []
    stream = _fastpath.Stream(lambda is_channel_data, frame: holder[0].feed(b""))
    holder.append(stream)
    with pytest.raises(RuntimeError, match="inside its own feed"):
        stream.feed(_binding(False))


_FRAME = st.one_of(
    st.binary(min_size=0, max_size=40).map(
        lambda b: struct.pack("!HH", 0x4000 | (len(b) & 0xFF), len(b)) + b
    ),
    st.builds(lambda fp: _binding(fp), st.booleans()),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_FRAME, max_size=6),
    st.lists(st.integers(0, 400), max_size=6),
    st.binary(max_size=6),
)
def test_fuzz_the_native_framer_splits_streams_exactly_as_the_python_one(
    frames: list[bytes], cuts: list[int], tail: bytes
) -> None:
    data = _stream_of(*frames) + tail
    points = sorted({min(cut, len(data)) for cut in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    native, native_broken = _native_frames(chunks)
    python, python_broken = _python_frames(chunks)
    assert native_broken == python_broken
    if python_broken:
        # Python drops the whole read that broke the stream; C has already handed over the
        # frames in front of the garbage. Either way the connection is closed next.
        assert native[: len(python)] == python
    else:
        assert native == python
