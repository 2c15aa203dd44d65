"""STUN message codec: attributes, message types, strict parsing, integrity and fingerprint.

Messages built by hand here use small helpers that follow RFC 8489 §5 and §14 directly,
so that the codec is checked against an independent reading rather than against itself.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import struct
from typing import Any

import pytest

from tsunagu.stun import (
    ATTRIBUTE_CLASSES,
    FAMILY_IPV4,
    FAMILY_IPV6,
    HEADER_LENGTH,
    MAGIC_COOKIE,
    AdditionalAddressFamily,
    AddressErrorCode,
    AlternateDomain,
    AlternateServer,
    Attribute,
    AttributeError_,
    CacheTimeout,
    ChangedAddress,
    ChangeRequest,
    ChannelNumber,
    ConnectionId,
    Data,
    DontFragment,
    ErrorCode,
    EvenPort,
    Fingerprint,
    IceControlled,
    IceControlling,
    Icmp,
    Lifetime,
    MappedAddress,
    Message,
    MessageClass,
    MessageIntegrity,
    MessageIntegritySha256,
    Method,
    MobilityTicket,
    Nonce,
    OtherAddress,
    Padding,
    PasswordAlgorithm,
    PasswordAlgorithms,
    Priority,
    Realm,
    RequestedAddressFamily,
    RequestedTransport,
    ReservationToken,
    ResponseAddress,
    ResponseOrigin,
    ResponsePort,
    Software,
    SourceAddress,
    StunError,
    UnknownAttribute,
    UnknownAttributes,
    UseCandidate,
    Userhash,
    Username,
    XorMappedAddress,
    XorPeerAddress,
    XorRelayedAddress,
    encode_message,
    is_channel_data,
    is_stun,
    parse_message,
)

TID = bytes.fromhex("0102030405060708090a0b0c")
COOKIE = struct.pack("!I", MAGIC_COOKIE)
KEY = b"shared secret"
SHA256_KEY = hashlib.sha256(b"user:realm:pass").digest()


# --- independent wire helpers (RFC 8489 §5, §14) -------------------------------------------


def tlv(kind: int, value: bytes, pad: bytes = b"\x00") -> bytes:
    return struct.pack("!HH", kind, len(value)) + value + pad * (-len(value) % 4)


def header(message_type: int, body: bytes, *, cookie: bytes = COOKIE, tid: bytes = TID) -> bytes:
    return struct.pack("!HH", message_type, len(body)) + cookie + tid


def raw(body: bytes = b"", message_type: int = 0x0001, **kwargs: bytes) -> bytes:
    return header(message_type, body, **kwargs) + body


def with_length(message: bytes, extra: int = 0) -> bytes:
    """The message with its header length set to its body size plus ``extra``."""
    return message[:2] + struct.pack("!H", len(message) - HEADER_LENGTH + extra) + message[4:]


def append(message: bytes, kind: int, value: bytes) -> bytes:
    return with_length(message + tlv(kind, value))


def append_integrity(message: bytes, key: bytes) -> bytes:
    prefix = with_length(message, 24)
    return prefix + tlv(0x0008, hmac.new(key, prefix, hashlib.sha1).digest())


def append_integrity_sha256(message: bytes, key: bytes, size: int = 32) -> bytes:
    prefix = with_length(message, 4 + size)
    return prefix + tlv(0x001C, hmac.new(key, prefix, hashlib.sha256).digest()[:size])


def append_fingerprint(message: bytes) -> bytes:
    prefix = with_length(message, 8)
    crc = (binascii.crc32(prefix) ^ 0x5354554E) & 0xFFFFFFFF
    return prefix + tlv(0x8028, struct.pack("!I", crc))


def expected_type(method: int, message_class: int) -> int:
    """RFC 8489 §5 figure 3, bit by bit: M0-M3, C0, M4-M6, C1, M7-M11."""
    method_bits = (0, 1, 2, 3, 5, 6, 7, 9, 10, 11, 12, 13)
    value = 0
    for index, position in enumerate(method_bits):
        if method >> index & 1:
            value |= 1 << position
    if message_class & 0b01:
        value |= 1 << 4
    if message_class & 0b10:
        value |= 1 << 8
    return value


# --- every attribute class round-trips -----------------------------------------------------

SAMPLES: dict[type[Attribute], list[Attribute]] = {
    MappedAddress: [MappedAddress("192.0.2.1", 32853), MappedAddress("2001:db8::1", 0)],
    ResponseAddress: [ResponseAddress("10.0.0.1", 3478)],
    ChangeRequest: [
        ChangeRequest(),
        ChangeRequest(change_ip=True),
        ChangeRequest(change_port=True),
        ChangeRequest(change_ip=True, change_port=True),
    ],
    SourceAddress: [SourceAddress("203.0.113.7", 1)],
    ChangedAddress: [ChangedAddress("2001:db8:ffff::2", 65535)],
    Username: [Username("alice"), Username("\u30de\u30c8\u30ea\u30c3\u30af\u30b9"), Username("")],
    MessageIntegrity: [MessageIntegrity(bytes(range(20)))],
    ErrorCode: [ErrorCode(401, "Unauthorized"), ErrorCode(300), ErrorCode(699, "\u00e9t\u00e9")],
    UnknownAttributes: [UnknownAttributes((0x7777,)), UnknownAttributes((1, 2, 0xFFFF))],
    ChannelNumber: [ChannelNumber(0x4000), ChannelNumber(0x4FFF)],
    Lifetime: [Lifetime(600), Lifetime(0), Lifetime(0xFFFFFFFF)],
    XorPeerAddress: [XorPeerAddress("203.0.113.5", 49152), XorPeerAddress("2001:db8::5", 1)],
    Data: [Data(b""), Data(b"hello"), Data(bytes(range(256)))],
    Realm: [Realm("example.org")],
    Nonce: [Nonce("obMatJos2AAACf//499k954d6OL34oL9FSTvy64sA")],
    XorRelayedAddress: [XorRelayedAddress("198.51.100.1", 50000), XorRelayedAddress("::1", 9)],
    RequestedAddressFamily: [
        RequestedAddressFamily(FAMILY_IPV4),
        RequestedAddressFamily(FAMILY_IPV6),
    ],
    EvenPort: [EvenPort(), EvenPort(reserve=True)],
    RequestedTransport: [RequestedTransport(17), RequestedTransport(6)],
    DontFragment: [DontFragment()],
    MessageIntegritySha256: [
        MessageIntegritySha256(bytes(range(32))),
        MessageIntegritySha256(bytes(16)),
    ],
    PasswordAlgorithm: [PasswordAlgorithm(2), PasswordAlgorithm(1, b"abc")],
    Userhash: [Userhash(bytes(range(32)))],
    XorMappedAddress: [XorMappedAddress("192.0.2.1", 32853), XorMappedAddress("fe80::1", 2)],
    ReservationToken: [ReservationToken(b"12345678")],
    Priority: [Priority(0x6E0001FF)],
    UseCandidate: [UseCandidate()],
    Padding: [Padding(b""), Padding(bytes(13))],
    ResponsePort: [ResponsePort(5000)],
    ConnectionId: [ConnectionId(0xDEADBEEF)],
    AdditionalAddressFamily: [AdditionalAddressFamily(FAMILY_IPV6)],
    AddressErrorCode: [AddressErrorCode(FAMILY_IPV6, 440, "Address Family not Supported")],
    PasswordAlgorithms: [
        PasswordAlgorithms(((2, b""), (1, b""))),
        PasswordAlgorithms(((1, b"ab"), (2, b"cdefg"))),
        PasswordAlgorithms(()),
    ],
    AlternateDomain: [AlternateDomain("turn.example.org")],
    Icmp: [Icmp(3, 4, 1400), Icmp(1, 0)],
    Software: [Software("tsunagu 0.1")],
    AlternateServer: [AlternateServer("192.0.2.10", 3478)],
    CacheTimeout: [CacheTimeout(60)],
    Fingerprint: [Fingerprint(0x12345678)],
    IceControlled: [IceControlled(0xFFFFFFFFFFFFFFFF)],
    IceControlling: [IceControlling(1)],
    ResponseOrigin: [ResponseOrigin("192.0.2.2", 3479)],
    OtherAddress: [OtherAddress("192.0.2.3", 3480)],
    MobilityTicket: [MobilityTicket(b"opaque ticket")],
}

ALL_SAMPLES = [sample for samples in SAMPLES.values() for sample in samples]


def test_every_attribute_class_has_samples() -> None:
    assert set(SAMPLES) == set(ATTRIBUTE_CLASSES.values())
    for kind, cls in ATTRIBUTE_CLASSES.items():
        assert cls.TYPE == kind
        assert all(type(sample) is cls for sample in SAMPLES[cls])


@pytest.mark.parametrize("sample", ALL_SAMPLES, ids=repr)
def test_attribute_round_trip(sample: Attribute) -> None:
    value = sample.encode(TID)
    assert type(sample).decode(value, TID) == sample
    # Padding on the wire never leaks into the value.
    assert type(sample).decode(bytes(value), TID).encode(TID) == value


@pytest.mark.parametrize(
    "sample", [s for s in ALL_SAMPLES if not isinstance(s, Fingerprint)], ids=repr
)
def test_attribute_round_trip_through_a_message(sample: Attribute) -> None:
    encoded = encode_message(Method.ALLOCATE, MessageClass.REQUEST, TID, [sample])
    assert len(encoded) % 4 == 0
    message = parse_message(encoded)
    assert message.attributes == [sample]
    assert message.get(type(sample)) == sample
    assert message.get_all(type(sample)) == [sample]
    assert message.has(type(sample))
    assert list(message) == [sample]


def test_fingerprint_is_reported_through_check_fingerprint() -> None:
    # FINGERPRINT is checked, not listed among the attributes.
    encoded = encode_message(Method.BINDING, MessageClass.REQUEST, TID, fingerprint=True)
    message = parse_message(encoded)
    assert message.fingerprint_offset == HEADER_LENGTH
    assert message.attributes == []
    assert message.check_fingerprint() is True


def test_many_attributes_keep_their_order() -> None:
    attributes = [s for s in ALL_SAMPLES if not isinstance(s, Fingerprint | MessageIntegrity)]
    attributes = [s for s in attributes if not isinstance(s, MessageIntegritySha256)]
    encoded = encode_message(Method.ALLOCATE, MessageClass.REQUEST, TID, attributes)
    assert parse_message(encoded).attributes == attributes


def test_get_all_keeps_repeated_attributes_in_order() -> None:
    peers = [XorPeerAddress("192.0.2.1", 0), XorPeerAddress("2001:db8::2", 0)]
    encoded = encode_message(
        Method.CREATE_PERMISSION, MessageClass.REQUEST, TID, [peers[0], Software("x"), peers[1]]
    )
    message = parse_message(encoded)
    assert message.get_all(XorPeerAddress) == peers
    assert message.get(XorPeerAddress) == peers[0]
    assert message.get(Lifetime) is None
    assert message.get_all(Lifetime) == []
    assert not message.has(Lifetime)


def test_unknown_attributes_are_kept_verbatim() -> None:
    attributes = [UnknownAttribute(0x7777, b"abc"), UnknownAttribute(0xC001, b"")]
    encoded = encode_message(Method.BINDING, MessageClass.REQUEST, TID, attributes)
    assert encoded[HEADER_LENGTH:] == tlv(0x7777, b"abc") + tlv(0xC001, b"")
    message = parse_message(encoded)
    assert message.attributes == attributes


# --- message type ----------------------------------------------------------------------------

KNOWN_TYPES = {
    (Method.BINDING, MessageClass.REQUEST): 0x0001,
    (Method.BINDING, MessageClass.INDICATION): 0x0011,
    (Method.BINDING, MessageClass.SUCCESS): 0x0101,
    (Method.BINDING, MessageClass.ERROR): 0x0111,
    (Method.ALLOCATE, MessageClass.REQUEST): 0x0003,
    (Method.ALLOCATE, MessageClass.SUCCESS): 0x0103,
    (Method.ALLOCATE, MessageClass.ERROR): 0x0113,
    (Method.REFRESH, MessageClass.REQUEST): 0x0004,
    (Method.SEND, MessageClass.INDICATION): 0x0016,
    (Method.DATA, MessageClass.INDICATION): 0x0017,
    (Method.CREATE_PERMISSION, MessageClass.REQUEST): 0x0008,
    (Method.CREATE_PERMISSION, MessageClass.SUCCESS): 0x0108,
    (Method.CHANNEL_BIND, MessageClass.REQUEST): 0x0009,
    (Method.CHANNEL_BIND, MessageClass.ERROR): 0x0119,
    (Method.CONNECT, MessageClass.REQUEST): 0x000A,
    (Method.CONNECTION_BIND, MessageClass.REQUEST): 0x000B,
    (Method.CONNECTION_ATTEMPT, MessageClass.INDICATION): 0x001C,
}


def test_method_values() -> None:
    assert {m.name: m.value for m in Method} == {
        "BINDING": 0x001,
        "ALLOCATE": 0x003,
        "REFRESH": 0x004,
        "SEND": 0x006,
        "DATA": 0x007,
        "CREATE_PERMISSION": 0x008,
        "CHANNEL_BIND": 0x009,
        "CONNECT": 0x00A,
        "CONNECTION_BIND": 0x00B,
        "CONNECTION_ATTEMPT": 0x00C,
    }


@pytest.mark.parametrize("method", list(Method), ids=lambda m: m.name)
@pytest.mark.parametrize("message_class", list(MessageClass), ids=lambda c: c.name)
def test_message_type_for_every_method_and_class(
    method: Method, message_class: MessageClass
) -> None:
    encoded = encode_message(method, message_class, TID)
    message_type = struct.unpack_from("!H", encoded)[0]
    assert message_type == expected_type(method, message_class)
    if (method, message_class) in KNOWN_TYPES:
        assert message_type == KNOWN_TYPES[method, message_class]
    message = parse_message(encoded)
    assert message.method == method
    assert message.message_class is message_class
    assert message.transaction_id == TID


def test_every_12_bit_method_round_trips() -> None:
    for method in range(0x1000):
        for message_class in MessageClass:
            message_type = expected_type(method, message_class)
            message = parse_message(raw(message_type=message_type))
            assert (message.method, message.message_class) == (method, message_class)
            assert encode_message(method, message_class, TID)[:2] == struct.pack("!H", message_type)


# --- strict header and attribute walk ------------------------------------------------------


def test_minimal_message() -> None:
    message = parse_message(raw())
    assert message.attributes == []
    assert message.raw == raw()


@pytest.mark.parametrize("size", [0, 1, 19])
def test_shorter_than_a_header(size: int) -> None:
    with pytest.raises(StunError):
        parse_message(raw()[:size])


@pytest.mark.parametrize("top", [0x40, 0x80, 0xC0])
def test_top_bits_must_be_zero(top: int) -> None:
    data = bytearray(raw(tlv(0x8022, b"abcd")))
    data[0] |= top
    with pytest.raises(StunError):
        parse_message(bytes(data))
    with pytest.raises(StunError):
        parse_message(bytes(data), allow_rfc3489=True)


def test_missing_cookie_is_rejected_unless_rfc3489_is_allowed() -> None:
    data = raw(tlv(0x0001, b"\x00\x01\x00\x50\xc0\x00\x02\x01"), cookie=b"\xde\xad\xbe\xef")
    with pytest.raises(StunError):
        parse_message(data)
    message = parse_message(data, allow_rfc3489=True)
    assert message.rfc3489
    assert message.transaction_id == b"\xde\xad\xbe\xef" + TID
    assert message.get(MappedAddress) == MappedAddress("192.0.2.1", 80)
    assert not is_stun(data)
    assert not parse_message(raw(), allow_rfc3489=True).rfc3489


@pytest.mark.parametrize("delta", [-8, -4, 4, 8])
def test_header_length_must_match_the_datagram(delta: int) -> None:
    data = raw(tlv(0x8022, b"abcd") + tlv(0x8022, b"efgh"))
    wrong = data[:2] + struct.pack("!H", len(data) - HEADER_LENGTH + delta) + data[4:]
    with pytest.raises(StunError):
        parse_message(wrong)


def test_trailing_bytes_beyond_the_length_are_rejected() -> None:
    with pytest.raises(StunError):
        parse_message(raw(tlv(0x8022, b"abcd")) + b"\x00\x00\x00\x00")


@pytest.mark.parametrize("length", [1, 2, 3, 5, 6, 7])
def test_length_must_be_a_multiple_of_four(length: int) -> None:
    body = bytes(length)
    with pytest.raises(StunError):
        parse_message(raw(body))
    with pytest.raises(StunError):
        parse_message(raw(body, cookie=b"\x00\x00\x00\x00"), allow_rfc3489=True)


def test_truncated_attribute_value() -> None:
    # A header claiming eight bytes of value when the message ends after four.
    body = struct.pack("!HH", 0x8022, 8) + b"abcd"
    with pytest.raises(StunError):
        parse_message(raw(body))


@pytest.mark.parametrize("claimed", [5, 6, 7, 8, 0xFFFF])
def test_attribute_running_past_the_end(claimed: int) -> None:
    # Four bytes of value are present: the padded claim does not fit.
    body = tlv(0x8022, b"abcd") + struct.pack("!HH", 0x0006, claimed) + b"wxyz"
    with pytest.raises(StunError):
        parse_message(raw(body))


def test_attribute_exactly_filling_the_message_with_its_padding() -> None:
    body = struct.pack("!HH", 0x0006, 5) + b"alice" + b"\xff\xff\xff"
    assert parse_message(raw(body)).get(Username) == Username("alice")


def test_attribute_after_fingerprint_is_rejected() -> None:
    fingerprinted = append_fingerprint(raw(tlv(0x8022, b"abcd")))
    assert parse_message(fingerprinted).check_fingerprint() is True
    for kind in (0x8022, 0x8028, 0x0008, 0x7777):
        with pytest.raises(StunError):
            parse_message(append(fingerprinted, kind, b"abcd"))


@pytest.mark.parametrize("size", [0, 4, 16, 19, 21, 24, 32])
def test_message_integrity_must_be_20_bytes(size: int) -> None:
    with pytest.raises(StunError):
        parse_message(raw(tlv(0x0008, bytes(size))))


@pytest.mark.parametrize("size", [0, 4, 12, 15, 17, 18, 30, 36, 64])
def test_message_integrity_sha256_size(size: int) -> None:
    with pytest.raises(StunError):
        parse_message(raw(tlv(0x001C, bytes(size))))


@pytest.mark.parametrize("size", [16, 20, 24, 28, 32])
def test_message_integrity_sha256_accepted_sizes(size: int) -> None:
    message = parse_message(raw(tlv(0x001C, bytes(size))))
    assert message.get(MessageIntegritySha256) == MessageIntegritySha256(bytes(size))


@pytest.mark.parametrize("size", [0, 2, 8])
def test_fingerprint_must_be_4_bytes(size: int) -> None:
    with pytest.raises(StunError):
        parse_message(raw(tlv(0x8028, bytes(size))))


# --- what follows MESSAGE-INTEGRITY ----------------------------------------------------------


def test_attributes_after_message_integrity_are_ignored() -> None:
    sealed = append_integrity(raw(tlv(0x8022, b"abcd")), KEY)
    extended = append(append(sealed, 0x0006, b"mallory"), 0x7777, b"unknown required")
    extended = append_integrity_sha256(extended, SHA256_KEY)
    extended = append_fingerprint(extended)

    message = parse_message(extended)
    assert message.get(Username) is None
    assert not message.has(Username)
    assert message.unknown_required == ()
    assert [type(a) for a in message.attributes] == [
        Software,
        MessageIntegrity,
        MessageIntegritySha256,
    ]
    # MESSAGE-INTEGRITY covers the message up to itself, whatever was added after it.
    assert message.check_integrity(KEY)
    assert message.check_integrity_sha256(SHA256_KEY)
    assert message.check_fingerprint() is True
    assert not message.check_integrity(b"other")
    assert not message.check_integrity_sha256(KEY)


def test_only_fingerprint_counts_after_message_integrity_sha256() -> None:
    sealed = append_integrity_sha256(raw(tlv(0x8022, b"abcd")), SHA256_KEY)
    extended = append(sealed, 0x0006, b"mallory")
    extended = append_integrity(extended, KEY)
    extended = append(extended, 0x001C, bytes(32))
    extended = append_fingerprint(extended)

    message = parse_message(extended)
    assert [type(a) for a in message.attributes] == [Software, MessageIntegritySha256]
    assert message.integrity_offset is None
    assert not message.check_integrity(KEY)
    assert message.check_integrity_sha256(SHA256_KEY)
    assert message.check_fingerprint() is True


def test_second_message_integrity_is_ignored() -> None:
    sealed = append_integrity(raw(tlv(0x8022, b"abcd")), KEY)
    twice = append_integrity(sealed, b"another key")
    message = parse_message(twice)
    assert message.check_integrity(KEY)
    assert not message.check_integrity(b"another key")
    assert message.get_all(MessageIntegrity) == [MessageIntegrity(sealed[-20:])]


def test_ignored_malformed_attributes_after_integrity_do_not_matter() -> None:
    sealed = append_integrity(raw(), KEY)
    # A malformed MESSAGE-INTEGRITY or attribute value after the first one is never read.
    extended = append(append(sealed, 0x0008, b"short"), 0x000D, b"bad")
    message = parse_message(extended)
    assert message.check_integrity(KEY)
    assert message.attributes == [MessageIntegrity(sealed[-20:])]


# --- integrity and fingerprint ---------------------------------------------------------------


def test_encoder_seals_match_the_rfc_formulas() -> None:
    attributes = [Username("alice"), Realm("example.org"), Nonce("n")]
    body = b"".join(tlv(a.TYPE, a.encode(TID)) for a in attributes)
    expected = append_fingerprint(
        append_integrity_sha256(append_integrity(raw(body), KEY), SHA256_KEY)
    )
    encoded = encode_message(
        Method.BINDING,
        MessageClass.REQUEST,
        TID,
        attributes,
        integrity_key=KEY,
        integrity_sha256_key=SHA256_KEY,
        fingerprint=True,
    )
    assert encoded == expected
    message = parse_message(encoded)
    assert message.has_integrity
    assert message.check_integrity(KEY)
    assert message.check_integrity_sha256(SHA256_KEY)
    assert message.check_fingerprint() is True


@pytest.mark.parametrize("size", [16, 20, 24, 28, 32])
def test_truncated_sha256_integrity_verifies(size: int) -> None:
    message = parse_message(append_integrity_sha256(raw(tlv(0x0006, b"bob")), SHA256_KEY, size))
    assert message.check_integrity_sha256(SHA256_KEY)
    assert not message.check_integrity_sha256(SHA256_KEY[::-1])


def test_no_integrity() -> None:
    message = parse_message(raw(tlv(0x0006, b"bob")))
    assert not message.has_integrity
    assert not message.check_integrity(KEY)
    assert not message.check_integrity_sha256(KEY)
    assert message.check_fingerprint() is None


def test_bad_fingerprint() -> None:
    good = append_fingerprint(raw(tlv(0x0006, b"bob")))
    bad = good[:-1] + bytes([good[-1] ^ 0x01])
    assert parse_message(bad).check_fingerprint() is False
    # The CRC is XOR-ed with 0x5354554E: a bare CRC-32 does not pass.
    bare = good[:-4] + struct.pack("!I", binascii.crc32(good[:-8]) & 0xFFFFFFFF)
    assert parse_message(bare).check_fingerprint() is False


def test_integrity_and_fingerprint_in_an_rfc3489_style_message() -> None:
    long_id = b"\x11\x22\x33\x44" + TID
    encoded = encode_message(
        Method.BINDING, MessageClass.REQUEST, long_id, [Username("u")], integrity_key=KEY
    )
    assert encoded[4:20] == long_id
    message = parse_message(encoded, allow_rfc3489=True)
    assert message.rfc3489
    assert message.transaction_id == long_id
    assert message.check_integrity(KEY)


# --- unknown attributes ------------------------------------------------------------------------


def test_unknown_comprehension_required_is_reported() -> None:
    body = tlv(0x7777, b"x") + tlv(0xC001, b"y") + tlv(0x0006, b"u") + tlv(0x0030, b"")
    message = parse_message(raw(body))
    assert message.unknown_required == (0x7777, 0x0030)
    assert message.attributes == [
        UnknownAttribute(0x7777, b"x"),
        UnknownAttribute(0xC001, b"y"),
        Username("u"),
        UnknownAttribute(0x0030, b""),
    ]


def test_unknown_optional_is_not_reported() -> None:
    message = parse_message(raw(tlv(0x8FFF, b"x") + tlv(0xFFFF, b"")))
    assert message.unknown_required == ()
    assert len(message.attributes) == 2


def test_known_attribute_types_are_not_unknown() -> None:
    # Integrity attributes are left out: an empty one breaks the message, not the attribute.
    integrity = {MessageIntegrity.TYPE, MessageIntegritySha256.TYPE}
    kinds = [kind for kind in ATTRIBUTE_CLASSES if kind < 0x8000 and kind not in integrity]
    body = b"".join(tlv(kind, b"") for kind in kinds)
    assert parse_message(raw(body)).unknown_required == ()


# --- RFC 3489 ----------------------------------------------------------------------------------


def test_rfc3489_message_round_trip() -> None:
    long_id = bytes(range(100, 116))
    attributes = [MappedAddress("192.0.2.1", 3478), ChangedAddress("192.0.2.2", 3479)]
    encoded = encode_message(Method.BINDING, MessageClass.SUCCESS, long_id, attributes)
    with pytest.raises(StunError):
        parse_message(encoded)
    message = parse_message(encoded, allow_rfc3489=True)
    assert message.rfc3489
    assert message.transaction_id == long_id
    assert message.attributes == attributes


@pytest.mark.parametrize("ip", ["192.0.2.1", "2001:db8::1"])
def test_xor_address_round_trip_in_an_rfc3489_style_message(ip: str) -> None:
    long_id = bytes(range(100, 116))
    sample = XorMappedAddress(ip, 3478)
    encoded = encode_message(Method.BINDING, MessageClass.SUCCESS, long_id, [sample])
    assert parse_message(encoded, allow_rfc3489=True).get(XorMappedAddress) == sample


@pytest.mark.parametrize("length", [0, 8, 11, 13, 20])
def test_transaction_id_must_be_12_or_16_bytes(length: int) -> None:
    with pytest.raises(ValueError):
        encode_message(Method.BINDING, MessageClass.REQUEST, bytes(length))


# --- XOR addresses -----------------------------------------------------------------------------


def xor(data: bytes, mask: bytes) -> bytes:
    return bytes(a ^ b for a, b in zip(data, mask, strict=True))


@pytest.mark.parametrize("cls", [XorMappedAddress, XorPeerAddress, XorRelayedAddress])
def test_xor_ipv4(cls: type[XorMappedAddress]) -> None:
    value = cls("192.0.2.33", 54321).encode(TID)
    expected = b"\x00\x01" + struct.pack("!H", 54321 ^ 0x2112) + xor(bytes([192, 0, 2, 33]), COOKIE)
    assert value == expected
    decoded = cls.decode(expected, TID)
    assert decoded == cls("192.0.2.33", 54321)
    assert decoded.family == FAMILY_IPV4
    assert decoded.address == ("192.0.2.33", 54321)


@pytest.mark.parametrize("cls", [XorMappedAddress, XorPeerAddress, XorRelayedAddress])
def test_xor_ipv6(cls: type[XorMappedAddress]) -> None:
    packed = bytes.fromhex("20010db8000000000000000000000abc")
    value = cls("2001:db8::abc", 1).encode(TID)
    assert value == b"\x00\x02" + struct.pack("!H", 1 ^ 0x2112) + xor(packed, COOKIE + TID)
    decoded = cls.decode(value, TID)
    assert decoded == cls("2001:db8::abc", 1)
    assert decoded.family == FAMILY_IPV6
    # The transaction id matters for IPv6 only.
    assert cls.decode(value, bytes(12)) != decoded
    assert cls.decode(cls("192.0.2.1", 5).encode(TID), bytes(12)) == cls("192.0.2.1", 5)


def test_xor_ipv6_needs_a_transaction_id() -> None:
    value = XorMappedAddress("2001:db8::1", 1).encode(TID)
    with pytest.raises(AttributeError_):
        XorMappedAddress.decode(value, b"")


def test_plain_address_is_not_xored() -> None:
    assert MappedAddress("192.0.2.1", 80).encode(TID) == bytes.fromhex("00010050c0000201")


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"\x00\x01\x00",
        bytes.fromhex("00010050c00002"),  # IPv4 one byte short
        bytes.fromhex("00010050c000020100"),  # IPv4 one byte long
        bytes.fromhex("00020050") + bytes(15),
        bytes.fromhex("00020050") + bytes(17),
        bytes.fromhex("00030050c0000201"),  # unknown family
        bytes.fromhex("00000050c0000201"),
    ],
)
@pytest.mark.parametrize("cls", [MappedAddress, XorMappedAddress, AlternateServer])
def test_malformed_addresses(cls: type[MappedAddress], value: bytes) -> None:
    with pytest.raises(AttributeError_):
        cls.decode(value, TID)


@pytest.mark.parametrize(
    ("ip", "port"), [("not an address", 1), ("192.0.2.1", -1), ("192.0.2.1", 65536)]
)
def test_unencodable_addresses(ip: str, port: int) -> None:
    with pytest.raises(AttributeError_):
        XorPeerAddress(ip, port).encode(TID)
    with pytest.raises(AttributeError_):
        MappedAddress(ip, port).encode(TID)


# --- value grammars ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "limit"),
    [(Username, 512), (Realm, 763), (Nonce, 763), (Software, 763), (AlternateDomain, 763)],
)
def test_text_attribute_length_limits(cls: type[Username], limit: int) -> None:
    assert cls.decode(b"a" * limit, TID) == cls("a" * limit)
    assert cls.decode(b"", TID) == cls("")
    with pytest.raises(AttributeError_):
        cls.decode(b"a" * (limit + 1), TID)
    # The limit is in bytes, not characters.
    three_byte = "\u30de" * (limit // 3 + 1)
    with pytest.raises(AttributeError_):
        cls.decode(three_byte.encode(), TID)
    # Through a message, the error surfaces only when the attribute is read.
    message = parse_message(raw(tlv(cls.TYPE, b"a" * (limit + 1)) + tlv(0x0024, bytes(4))))
    assert message.get(Priority) == Priority(0)
    with pytest.raises(AttributeError_):
        message.get(cls)
    with pytest.raises(AttributeError_):
        _ = message.attributes


@pytest.mark.parametrize("cls", [Username, Realm, Nonce, Software, AlternateDomain])
@pytest.mark.parametrize("value", [b"\xff", b"abc\xc3", b"\xed\xa0\x80", b"\xc0\xaf"])
def test_text_attribute_must_be_utf8(cls: type[Username], value: bytes) -> None:
    with pytest.raises(AttributeError_):
        cls.decode(value, TID)


def test_error_code_grammar() -> None:
    assert ErrorCode.decode(b"\x00\x00\x04\x14Bad", TID) == ErrorCode(420, "Bad")
    assert ErrorCode.decode(b"\x00\x00\x03\x00", TID) == ErrorCode(300)
    assert ErrorCode.decode(b"\x00\x00\x06\x63" + b"r" * 763, TID).code == 699
    for bad in (
        b"\x00\x00\x04",  # short
        b"\x00\x00\x02\x00",  # class 2
        b"\x00\x00\x07\x00",  # class 7
        b"\x00\x00\x04\x64",  # number 100
        b"\x00\x00\x04\x00\xff",  # reason not UTF-8
        b"\x00\x00\x04\x00" + b"r" * 764,  # reason too long
    ):
        with pytest.raises(AttributeError_):
            ErrorCode.decode(bad, TID)


@pytest.mark.parametrize(
    ("cls", "good_size"),
    [
        (Userhash, 32),
        (ReservationToken, 8),
        (MessageIntegrity, 20),
        (Priority, 4),
        (Lifetime, 4),
        (Fingerprint, 4),
        (ConnectionId, 4),
        (CacheTimeout, 4),
        (IceControlled, 8),
        (IceControlling, 8),
        (ChannelNumber, 4),
        (RequestedTransport, 4),
        (RequestedAddressFamily, 4),
        (AdditionalAddressFamily, 4),
        (ChangeRequest, 4),
        (ResponsePort, 4),
        (EvenPort, 1),
        (Icmp, 8),
        (DontFragment, 0),
        (UseCandidate, 0),
    ],
)
def test_fixed_size_attributes(cls: type[Attribute], good_size: int) -> None:
    cls.decode(bytes(good_size), TID)
    for size in {0, 1, 3, 4, 5, 7, 8, 9, 16, 20, 31, 33} - {good_size}:
        with pytest.raises(AttributeError_):
            cls.decode(bytes(size), TID)


def test_message_integrity_sha256_grammar() -> None:
    for size in (16, 20, 24, 28, 32):
        MessageIntegritySha256.decode(bytes(size), TID)
    for size in (0, 12, 17, 30, 36):
        with pytest.raises(AttributeError_):
            MessageIntegritySha256.decode(bytes(size), TID)


def test_unknown_attributes_grammar() -> None:
    assert UnknownAttributes.decode(bytes.fromhex("0001802a"), TID).types == (1, 0x802A)
    with pytest.raises(AttributeError_):
        UnknownAttributes.decode(b"\x00\x01\x00", TID)


def test_password_algorithms_grammar() -> None:
    value = bytes.fromhex("00020000 00010003 616263ff".replace(" ", ""))
    assert PasswordAlgorithms.decode(value, TID) == PasswordAlgorithms(((2, b""), (1, b"abc")))
    for bad in (b"\x00\x01", b"\x00\x01\x00\x04abc", b"\x00\x02\x00\x00\x00"):
        with pytest.raises(AttributeError_):
            PasswordAlgorithms.decode(bad, TID)
    assert PasswordAlgorithm.decode(b"\x00\x01\x00\x02ab\x00\x00", TID) == PasswordAlgorithm(
        1, b"ab"
    )
    for bad in (b"", b"\x00\x01\x00", b"\x00\x01\x00\x02a"):
        with pytest.raises(AttributeError_):
            PasswordAlgorithm.decode(bad, TID)


def test_flag_and_bit_attributes() -> None:
    assert EvenPort.decode(b"\x80", TID) == EvenPort(reserve=True)
    assert EvenPort.decode(b"\x7f", TID) == EvenPort(reserve=False)
    assert EvenPort(reserve=True).encode(TID) == b"\x80"
    assert ChangeRequest.decode(b"\x00\x00\x00\x06", TID) == ChangeRequest(True, True)
    assert ChangeRequest(change_ip=True).encode(TID) == b"\x00\x00\x00\x04"
    assert ChangeRequest(change_port=True).encode(TID) == b"\x00\x00\x00\x02"
    assert ChannelNumber(0x4001).encode(TID) == b"\x40\x01\x00\x00"
    assert RequestedTransport(17).encode(TID) == b"\x11\x00\x00\x00"
    assert Icmp(3, 4, 1400).encode(TID) == b"\x00\x00\x03\x04\x00\x00\x05\x78"
    assert AddressErrorCode(2, 440, "x").encode(TID) == b"\x02\x00\x04\x28x"
    assert ErrorCode(487, "x").encode(TID) == b"\x00\x00\x04\x57x"


def test_address_error_code_grammar() -> None:
    assert AddressErrorCode.decode(b"\x01\x00\x04\x28", TID) == AddressErrorCode(1, 440)
    for bad in (
        b"",
        b"\x01\x00\x04",
        b"\x01\x00\x02\x00",
        b"\x01\x00\x04\x64",
        b"\x01\x00\x04\x00\xff",
        b"\x01\x00\x04\x00" + b"r" * 764,
    ):
        with pytest.raises(AttributeError_):
            AddressErrorCode.decode(bad, TID)


def test_malformed_attribute_leaves_the_rest_readable() -> None:
    body = tlv(0x8022, b"ok") + tlv(0x000D, b"bad") + tlv(0x0019, b"\x11\x00\x00\x00")
    message = parse_message(raw(body, message_type=0x0003))
    assert message.get(Software) == Software("ok")
    assert message.get(RequestedTransport) == RequestedTransport(17)
    with pytest.raises(AttributeError_):
        message.get(Lifetime)
    with pytest.raises(AttributeError_):
        list(message)
    assert message.unknown_required == ()


# --- sizes -------------------------------------------------------------------------------------


def test_largest_message() -> None:
    encoded = encode_message(Method.SEND, MessageClass.INDICATION, TID, [Data(bytes(0xFFF8))])
    assert struct.unpack_from("!H", encoded, 2)[0] == 0xFFFC
    assert parse_message(encoded).get(Data) == Data(bytes(0xFFF8))


@pytest.mark.parametrize(
    ("attributes", "seals"),
    [
        ([Data(bytes(0x10000))], {}),
        ([Data(bytes(0xFFF8)), Software("x")], {}),
        ([Data(bytes(0xFFF8))], {"integrity_key": KEY}),
        ([Data(bytes(0xFFF8))], {"integrity_sha256_key": KEY}),
        ([Data(bytes(0xFFF8))], {"fingerprint": True}),
    ],
    ids=["attribute", "message", "integrity", "integrity-sha256", "fingerprint"],
)
def test_oversized_message_is_refused(attributes: list[Attribute], seals: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        encode_message(Method.DATA, MessageClass.INDICATION, TID, attributes, **seals)


# --- demultiplexing ------------------------------------------------------------------------------


def test_is_stun_and_is_channel_data() -> None:
    message = raw()
    assert is_stun(message)
    assert not is_channel_data(message)
    assert not is_stun(message[:19])
    assert not is_stun(raw(cookie=bytes(4)))
    assert not is_stun(b"\x40" + message[1:])
    channel = b"\x40\x00\x00\x04abcd"
    assert is_channel_data(channel)
    assert not is_stun(channel)
    assert is_channel_data(b"\x7f\xff\x00\x00")
    assert not is_channel_data(b"\x40\x00\x00")
    assert not is_channel_data(b"\x80\x00\x00\x00")
    assert not is_channel_data(b"\x3f\xff\x00\x00")


def test_message_type_is_a_message() -> None:
    assert isinstance(parse_message(raw()), Message)
