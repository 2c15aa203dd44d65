"""The probe's client-side wire format, checked against the RFCs and the server's own codec."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tsunagu.probe import wire
from tsunagu.stun import (
    ChannelNumber,
    Data,
    ErrorCode,
    MessageClass,
    Method,
    Nonce,
    Realm,
    RequestedTransport,
    Username,
    XorMappedAddress,
    XorPeerAddress,
    XorRelayedAddress,
    encode_message,
    parse_message,
)
from tsunagu.turn import long_term_key

# RFC 5769 §2.2 and §2.3: the same transaction id, mapped address 192.0.2.1 / 2001:db8:...
RFC5769_TXID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
RFC5769_XOR_IPV4 = bytes.fromhex("0001a147e112a643")
RFC5769_XOR_IPV6 = bytes.fromhex("0002a1470113a9faa5d3f179bc25f4b5bed2b9d9")


@pytest.mark.parametrize(
    ("method", "klass", "value"),
    [
        (wire.BINDING, wire.CLASS_REQUEST, 0x0001),
        (wire.BINDING, wire.CLASS_SUCCESS, 0x0101),
        (wire.ALLOCATE, wire.CLASS_REQUEST, 0x0003),
        (wire.ALLOCATE, wire.CLASS_SUCCESS, 0x0103),
        (wire.ALLOCATE, wire.CLASS_ERROR, 0x0113),
        (wire.SEND, wire.CLASS_INDICATION, 0x0016),
        (wire.DATA, wire.CLASS_INDICATION, 0x0017),
        (wire.CHANNEL_BIND, wire.CLASS_REQUEST, 0x0009),
        (wire.CREATE_PERMISSION, wire.CLASS_SUCCESS, 0x0108),
    ],
)
def test_message_types_match_the_rfcs(method: int, klass: int, value: int) -> None:
    assert wire.message_type(method, klass) == value
    assert wire.split_type(value) == (method, klass)


@settings(deadline=None)
@given(st.integers(0, 0xFFF), st.integers(0, 3))
def test_message_type_round_trips(method: int, klass: int) -> None:
    value = wire.message_type(method, klass)
    assert value & 0xC000 == 0
    assert wire.split_type(value) == (method, klass)


def test_xor_addresses_match_rfc5769() -> None:
    kind, value = wire.attr_xor_address(0x0020, "192.0.2.1", 32853, RFC5769_TXID)
    assert (kind, value) == (0x0020, RFC5769_XOR_IPV4)
    ip6 = "2001:db8:1234:5678:11:2233:4455:6677"
    assert wire.attr_xor_address(0x0020, ip6, 32853, RFC5769_TXID)[1] == RFC5769_XOR_IPV6
    assert wire.decode_xor_address(RFC5769_XOR_IPV4, RFC5769_TXID) == ("192.0.2.1", 32853)
    assert wire.decode_xor_address(RFC5769_XOR_IPV6, RFC5769_TXID) == (ip6, 32853)


def test_xor_address_rejects_garbage() -> None:
    with pytest.raises(wire.WireError):
        wire.decode_xor_address(b"\x00\x01\x00", RFC5769_TXID)
    with pytest.raises(wire.WireError):
        wire.decode_xor_address(b"\x00\x03" + bytes(6), RFC5769_TXID)


def test_long_term_key_matches_the_server() -> None:
    assert wire.long_term_key("alice", "tsunagu", "secret") == long_term_key(
        "alice", "tsunagu", "secret", 1
    )


def test_authenticated_request_passes_the_servers_checks() -> None:
    key = wire.long_term_key("alice", "tsunagu", "secret")
    txid = bytes(range(12))
    data = wire.encode_request(
        wire.ALLOCATE,
        txid,
        [wire.attr_requested_transport(), wire.attr_lifetime(600)],
        credentials=("alice", "tsunagu", "nonce-123", key),
    )
    message = parse_message(data)
    assert message.method == Method.ALLOCATE
    assert message.message_class == MessageClass.REQUEST
    assert message.transaction_id == txid
    assert message.get(Username) == Username("alice")
    assert message.get(Realm) == Realm("tsunagu")
    assert message.get(Nonce) == Nonce("nonce-123")
    assert message.get(RequestedTransport) is not None
    assert message.check_integrity(key)
    assert not message.check_integrity(wire.long_term_key("alice", "tsunagu", "wrong"))
    assert message.check_fingerprint()


def test_request_without_fingerprint_or_credentials() -> None:
    data = wire.encode_request(wire.BINDING, bytes(12), [], fingerprint=False)
    assert data == bytes.fromhex("000100002112a442") + bytes(12)
    message = parse_message(data)
    assert not message.has_integrity and message.fingerprint_offset is None


def test_transaction_id_must_be_12_bytes() -> None:
    with pytest.raises(ValueError):
        wire.encode_request(wire.BINDING, bytes(16), [])


def test_channel_bind_attributes_as_the_server_reads_them() -> None:
    txid = bytes(range(1, 13))
    data = wire.encode_request(
        wire.CHANNEL_BIND,
        txid,
        [
            wire.attr_channel_number(0x4000),
            wire.attr_xor_address(0x0012, "127.0.0.1", 40000, txid),
        ],
    )
    message = parse_message(data)
    assert message.get(ChannelNumber) == ChannelNumber(0x4000)
    peer = message.get(XorPeerAddress)
    assert peer is not None and (peer.ip, peer.port) == ("127.0.0.1", 40000)


def test_send_indication_as_the_server_reads_it() -> None:
    txid = bytes(12)
    payload = b"x" * 101  # odd length: padded on the wire
    data = wire.send_indication(txid, ("::1", 5000), payload)
    assert len(data) % 4 == 0
    message = parse_message(data)
    assert (message.method, message.message_class) == (Method.SEND, MessageClass.INDICATION)
    peer = message.get(XorPeerAddress)
    assert peer is not None and (peer.ip, peer.port) == ("::1", 5000)
    assert message.get(Data) == Data(payload)


def test_reads_the_servers_answers() -> None:
    txid = bytes(range(12))
    unauthorized = encode_message(
        Method.ALLOCATE,
        MessageClass.ERROR,
        txid,
        [ErrorCode(401, "Unauthorized"), Realm("tsunagu"), Nonce("abc")],
        fingerprint=True,
    )
    reply = wire.parse_reply(unauthorized)
    assert (reply.method, reply.klass, reply.txid) == (wire.ALLOCATE, wire.CLASS_ERROR, txid)
    assert reply.error_code == 401 and reply.reason == "Unauthorized"
    assert reply.text(wire.ATTR_REALM) == "tsunagu"
    assert reply.text(wire.ATTR_NONCE) == "abc"

    success = encode_message(
        Method.ALLOCATE,
        MessageClass.SUCCESS,
        txid,
        [XorRelayedAddress("127.0.0.1", 20000), XorMappedAddress("127.0.0.1", 50000)],
    )
    reply = wire.parse_reply(success)
    assert reply.error_code is None and reply.reason == ""
    assert reply.address(wire.ATTR_XOR_RELAYED_ADDRESS) == ("127.0.0.1", 20000)
    assert reply.address(wire.ATTR_XOR_MAPPED_ADDRESS) == ("127.0.0.1", 50000)
    assert reply.address(wire.ATTR_XOR_PEER_ADDRESS) is None


def test_data_indication_payload() -> None:
    txid = bytes(12)
    indication = encode_message(
        Method.DATA,
        MessageClass.INDICATION,
        txid,
        [XorPeerAddress("127.0.0.1", 9), Data(b"hello")],
    )
    assert wire.data_payload(indication) == b"hello"
    assert wire.data_payload(indication[:-4]) is None  # truncated
    no_data = encode_message(
        Method.DATA, MessageClass.INDICATION, txid, [XorPeerAddress("127.0.0.1", 9)]
    )
    assert wire.data_payload(no_data) is None


@pytest.mark.parametrize(
    "data",
    [
        b"",
        bytes(19),
        b"\xc0" + bytes(19),  # top bits set
        bytes.fromhex("00010000") + b"\x00\x00\x00\x00" + bytes(12),  # wrong cookie
        bytes.fromhex("000100042112a442") + bytes(12),  # length beyond the data
        bytes.fromhex("000100022112a442") + bytes(12) + b"\x00\x00",  # length not aligned
        bytes.fromhex("000100042112a442") + bytes(12) + b"\x00\x01\x00\x08",  # attr overrun
    ],
)
def test_parse_reply_rejects_malformed(data: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.parse_reply(data)


def test_first_instance_of_an_attribute_wins() -> None:
    body = struct.pack("!HH4s", 0x0015, 4, b"one!") + struct.pack("!HH4s", 0x0015, 4, b"two!")
    data = struct.pack("!HHI12s", 0x0113, len(body), wire.MAGIC_COOKIE, bytes(12)) + body
    assert wire.parse_reply(data).text(wire.ATTR_NONCE) == "one!"


def test_channel_data_framing() -> None:
    assert wire.channel_data(0x4001, b"abc") == b"\x40\x01\x00\x03abc"
    padded = wire.channel_data(0x4001, b"abc", pad=True)
    assert padded == b"\x40\x01\x00\x03abc\x00"
    assert wire.stream_frame_length(padded) == 8
    assert wire.stream_frame_length(b"\x40\x01\x00\x04") == 8
    stun = wire.encode_request(wire.BINDING, bytes(12), [], fingerprint=True)
    assert wire.stream_frame_length(stun) == len(stun) == 28
    assert wire.stream_frame_length(b"xx" + stun, 2) == 28
    assert wire.stream_frame_length(b"\x40\x01") is None
    with pytest.raises(wire.WireError):
        wire.stream_frame_length(b"\xff\x00\x00\x00")


_attribute = st.tuples(
    st.integers(0x0020, 0x7FFF).filter(lambda k: k not in (0x0008, 0x0009, 0x0014, 0x0015)),
    st.binary(max_size=40),
)


@settings(deadline=None)
@given(
    st.lists(_attribute, max_size=6, unique_by=lambda a: a[0]), st.binary(min_size=12, max_size=12)
)
def test_encode_then_parse_round_trips(attributes: list[tuple[int, bytes]], txid: bytes) -> None:
    data = wire.encode_request(wire.REFRESH, txid, attributes)
    reply = wire.parse_reply(data)
    assert (reply.method, reply.klass, reply.txid) == (wire.REFRESH, wire.CLASS_REQUEST, txid)
    for kind, value in attributes:
        assert reply.attributes[kind] == value
    assert parse_message(data).check_fingerprint()
