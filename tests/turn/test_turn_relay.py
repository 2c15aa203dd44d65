"""Send indications, ChannelData (client to peer) and Data indications (peer to client)."""

from __future__ import annotations

import pytest

from support.turn_harness import (
    NOW,
    PEER,
    PEER2,
    PEER6,
    Client,
    channel_data,
    stun,
    success,
    udp,
)
from tsunagu.stun import (
    Attribute,
    ChannelNumber,
    Data,
    MessageClass,
    Method,
    UnknownAttribute,
    XorPeerAddress,
    parse_message,
)
from tsunagu.turn import Forward, data_indication


@pytest.fixture
def relaying(allocated: Client) -> Client:
    """alice with a permission for PEER and channel 0x4000 bound to PEER."""
    response = allocated.request(
        Method.CHANNEL_BIND, [ChannelNumber(0x4000), XorPeerAddress(*PEER)]
    )
    assert success(response)
    return allocated


def send_indication(peer: tuple[str, int], payload: bytes, fingerprint: bool = False) -> bytes:
    return stun(
        Method.SEND,
        [XorPeerAddress(*peer), Data(payload)],
        klass=MessageClass.INDICATION,
        fingerprint=fingerprint,
    )


def test_send_indication_needs_a_permission(allocated: Client) -> None:
    server = allocated.server
    assert allocated.send(send_indication(PEER, b"hello")) is None
    allocation = server.allocations[allocated.five_tuple]
    assert allocation.dropped == 1
    assert server.drops["no permission"] == 1
    assert allocation.packets_to_peers == 0


def test_send_indication_forwarded_with_permission(relaying: Client) -> None:
    allocation = relaying.server.allocations[relaying.five_tuple]
    forward = relaying.send(send_indication(PEER, b"hello", fingerprint=True))
    assert forward == Forward(allocation.relays[4], b"hello", PEER)
    # The permission is per IP: any port of the permitted peer is reachable.
    other_port = (PEER[0], 9)
    assert relaying.send(send_indication(other_port, b"x")) == Forward(
        allocation.relays[4], b"x", other_port
    )
    assert (allocation.packets_to_peers, allocation.bytes_to_peers) == (2, 6)


def test_send_indication_to_other_peer_is_dropped(relaying: Client) -> None:
    assert relaying.send(send_indication(PEER2, b"x")) is None
    assert relaying.send(send_indication(PEER6, b"x")) is None  # no IPv6 relay either
    assert relaying.server.drops["no permission"] == 2


def test_send_indication_without_allocation(alice: Client) -> None:
    assert alice.send(send_indication(PEER, b"x")) is None
    assert alice.server.drops["no allocation"] == 1


@pytest.mark.parametrize(
    "attributes",
    [
        [XorPeerAddress(*PEER)],
        [Data(b"x")],
        [UnknownAttribute(XorPeerAddress.TYPE, b"\x00\x09\x00\x00"), Data(b"x")],
    ],
    ids=["no-data", "no-peer", "bad-peer"],
)
def test_malformed_send_indication_is_dropped(
    relaying: Client, attributes: list[Attribute]
) -> None:
    raw = stun(Method.SEND, attributes, klass=MessageClass.INDICATION)
    assert relaying.send(raw) is None
    assert relaying.server.drops["malformed send"] == 1


def test_send_indication_after_permission_expiry(relaying: Client) -> None:
    server = relaying.server
    server.handle_timer(NOW + server.settings.permission_lifetime)
    assert relaying.send(send_indication(PEER, b"late"), NOW + 301) is None


def test_channel_data_forwarded(relaying: Client) -> None:
    allocation = relaying.server.allocations[relaying.five_tuple]
    forward = relaying.send(channel_data(0x4000, b"payload"))
    assert forward == Forward(allocation.relays[4], b"payload", PEER)
    # Over UDP the message may be padded to a multiple of 4; the padding is not relayed.
    assert relaying.send(channel_data(0x4000, b"abc") + b"\x00") == Forward(
        allocation.relays[4], b"abc", PEER
    )
    assert relaying.send(channel_data(0x4000, b"")) == Forward(allocation.relays[4], b"", PEER)
    assert (allocation.packets_to_peers, allocation.bytes_to_peers) == (3, 10)


def test_channel_data_direct_entry_point(relaying: Client) -> None:
    allocation = relaying.server.allocations[relaying.five_tuple]
    forward = relaying.server.receive_channel_data(channel_data(0x4000, b"z"), relaying.five_tuple)
    assert forward == Forward(allocation.relays[4], b"z", PEER)


def test_channel_data_on_unknown_channel_is_dropped(relaying: Client) -> None:
    assert relaying.send(channel_data(0x4001, b"x")) is None
    assert relaying.send(channel_data(0x7FFF, b"x")) is None
    assert relaying.server.drops["unbound channel"] == 2
    assert relaying.server.allocations[relaying.five_tuple].dropped == 2


def test_short_channel_data_is_dropped(relaying: Client) -> None:
    truncated = channel_data(0x4000, b"payload")[:-1]
    assert relaying.send(truncated) is None
    assert relaying.server.drops["short channel data"] == 1
    # Three bytes are not ChannelData at all; they are not STUN either.
    assert relaying.send(b"\x40\x00\x00") is None
    assert relaying.server.drops["malformed"] == 1


def test_channel_data_without_allocation(alice: Client) -> None:
    assert alice.send(channel_data(0x4000, b"x")) is None
    assert alice.server.drops["no allocation"] == 1


def test_channel_data_needs_a_live_permission(relaying: Client) -> None:
    server = relaying.server
    server.handle_timer(NOW + server.settings.permission_lifetime)
    allocation = server.allocations[relaying.five_tuple]
    assert 0x4000 in allocation.channels  # the channel outlives the permission
    assert relaying.send(channel_data(0x4000, b"x"), NOW + 301) is None
    assert server.drops["unbound channel"] == 1


def test_channel_data_from_another_five_tuple_is_dropped(relaying: Client) -> None:
    intruder = udp(("198.51.100.7", 50001))
    assert relaying.server.receive(channel_data(0x4000, b"x"), intruder, NOW) is None


@pytest.mark.parametrize("peer", [PEER, PEER6])
@pytest.mark.parametrize("payload", [b"", b"a", b"hello world", bytes(range(256)) * 4])
def test_data_indication_round_trips(peer: tuple[str, int], payload: bytes) -> None:
    txid = bytes(range(12))
    raw = data_indication(txid, peer, payload)
    message = parse_message(raw)
    assert message.method == Method.DATA
    assert message.message_class is MessageClass.INDICATION
    assert message.transaction_id == txid
    assert message.get(XorPeerAddress) == XorPeerAddress(*peer)
    assert message.get(Data) == Data(payload)
    assert len(raw) % 4 == 0
    assert not message.has_integrity and message.fingerprint_offset is None


def test_send_indication_with_unknown_required_attribute_is_dropped(relaying: Client) -> None:
    # RFC 8489 §6.3.2: an indication with an unknown comprehension-required attribute is
    # discarded (there is no response to carry a 420).
    raw = stun(
        Method.SEND,
        [XorPeerAddress(*PEER), Data(b"x"), UnknownAttribute(0x7FF0, b"")],
        klass=MessageClass.INDICATION,
    )
    assert relaying.send(raw) is None
    assert relaying.server.allocations[relaying.five_tuple].packets_to_peers == 0
    # An unknown optional attribute is fine.
    raw = stun(
        Method.SEND,
        [XorPeerAddress(*PEER), Data(b"x"), UnknownAttribute(0xFFF0, b"")],
        klass=MessageClass.INDICATION,
    )
    assert isinstance(relaying.send(raw), Forward)
