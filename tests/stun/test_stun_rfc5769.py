"""RFC 5769 test vectors: parsing, integrity, fingerprint, re-encoding and tampering.

The vectors live in tests/vectors/stun_rfc5769.txt, written out line by line as in the RFC.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import re
import stringprep
import struct
import unicodedata
from pathlib import Path

import pytest

from tsunagu.stun import (
    IceControlled,
    MessageClass,
    MessageIntegrity,
    Method,
    Nonce,
    Priority,
    Realm,
    Software,
    StunError,
    Username,
    XorMappedAddress,
    encode_message,
    parse_message,
)

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
_VECTOR_LINE = re.compile(r"\s*([0-9a-f]{2}) ([0-9a-f]{2}) ([0-9a-f]{2}) ([0-9a-f]{2})(?:\s|$)")


def load_vectors(name: str) -> dict[str, bytes]:
    """Read a vector file: "[name]" starts a vector, each data line starts with four bytes."""
    vectors: dict[str, bytearray] = {}
    current: bytearray | None = None
    for line in (VECTORS / name).read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text.startswith("[") and text.endswith("]"):
            current = vectors.setdefault(text[1:-1], bytearray())
            continue
        match = _VECTOR_LINE.match(line)
        assert match is not None and current is not None, f"unreadable vector line {line!r}"
        current += bytes.fromhex("".join(match.groups()))
    return {name: bytes(data) for name, data in vectors.items()}


def saslprep(text: str) -> str:
    """SASLprep (RFC 4013) for stored strings, enough to derive the RFC 5769 key."""
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch for ch in text if not stringprep.in_table_b1(ch)
    )
    normal = unicodedata.normalize("NFKC", mapped)
    prohibited = (
        stringprep.in_table_c12,
        stringprep.in_table_c21,
        stringprep.in_table_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
        stringprep.in_table_a1,
    )
    for ch in normal:
        if any(table(ch) for table in prohibited):
            raise ValueError(f"prohibited character U+{ord(ch):04X}")
    return normal


ALL = load_vectors("stun_rfc5769.txt")
REQUEST = ALL["2.1 sample request"]
IPV4_RESPONSE = ALL["2.2 IPv4 response"]
IPV6_RESPONSE = ALL["2.3 IPv6 response"]
LONG_TERM = ALL["2.4 request with long-term authentication"]

SHORT_TERM_KEY = b"VOkJxbRl1RmTxUk/WvJxBt"
TRANSACTION_ID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
LONG_TERM_TRANSACTION_ID = bytes.fromhex("78ad3433c6ad72c029da412e")
USERNAME = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"
# U+2168 is ROMAN NUMERAL NINE, which NFKC turns into "IX".
PASSWORD = "The\u00adM\u00aatr\u2168"
REALM = "example.org"
NONCE = "f//499k954d6OL34oL9FSTvy64sA"
LONG_TERM_KEY = hashlib.md5(f"{USERNAME}:{REALM}:{saslprep(PASSWORD)}".encode()).digest()

# (vector, key, has FINGERPRINT)
SEALED = {
    "2.1": (REQUEST, SHORT_TERM_KEY, True),
    "2.2": (IPV4_RESPONSE, SHORT_TERM_KEY, True),
    "2.3": (IPV6_RESPONSE, SHORT_TERM_KEY, True),
    "2.4": (LONG_TERM, LONG_TERM_KEY, False),
}


def zero_padding(message: bytes) -> bytes:
    """The message with every attribute's padding bytes set to zero, as this encoder pads."""
    out = bytearray(message)
    offset = 20
    while offset < len(out):
        _, length = struct.unpack_from("!HH", out, offset)
        start = offset + 4 + length
        end = offset + 4 + length + (-length % 4)
        out[start:end] = bytes(end - start)
        offset = end
    assert offset == len(out)
    return bytes(out)


def attribute_offset(message: bytes, kind: int) -> int:
    offset = 20
    while offset < len(message):
        found, length = struct.unpack_from("!HH", message, offset)
        if found == kind:
            return offset
        offset += 4 + length + (-length % 4)
    raise AssertionError(f"no attribute {kind:#06x}")


def reference_seal(prefix: bytes, key: bytes, fingerprint: bool) -> bytes:
    """Append MESSAGE-INTEGRITY (and FINGERPRINT) to ``prefix`` straight from RFC 8489 §14."""

    def with_length(data: bytes, extra: int) -> bytes:
        return data[:2] + struct.pack("!H", len(data) - 20 + extra) + data[4:]

    mac = hmac.new(key, with_length(prefix, 24), hashlib.sha1).digest()
    sealed = with_length(prefix, 24) + struct.pack("!HH", 0x0008, 20) + mac
    if fingerprint:
        crc = (binascii.crc32(with_length(sealed, 8)) ^ 0x5354554E) & 0xFFFFFFFF
        sealed = with_length(sealed, 8) + struct.pack("!HHI", 0x8028, 4, crc)
    return sealed


# --- the vectors themselves ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ALL))
def test_vector_header_length_matches_its_size(name: str) -> None:
    vector = ALL[name]
    assert struct.unpack_from("!H", vector, 2)[0] + 20 == len(vector)
    assert vector[4:8] == bytes.fromhex("2112a442")


def test_saslprep_maps_the_rfc_password() -> None:
    assert saslprep(PASSWORD) == "TheMatrIX"
    assert LONG_TERM_KEY == hashlib.md5(f"{USERNAME}:example.org:TheMatrIX".encode()).digest()
    assert USERNAME.encode() == bytes.fromhex("e3839ee38388e383aae38383e382afe382b9")


# --- 2.1 sample request ----------------------------------------------------------------


def test_sample_request_parses() -> None:
    message = parse_message(REQUEST)
    assert message.method == Method.BINDING
    assert message.message_class == MessageClass.REQUEST
    assert message.transaction_id == TRANSACTION_ID
    assert not message.rfc3489
    assert message.attributes == [
        Software("STUN test client"),
        Priority(0x6E0001FF),
        IceControlled(0x932FF9B151263B36),
        Username("evtj:h6vY"),
        MessageIntegrity(bytes.fromhex("9aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2")),
    ]
    assert message.unknown_required == ()
    assert message.check_integrity(SHORT_TERM_KEY)
    assert message.check_fingerprint() is True


def test_sample_request_reencodes() -> None:
    # RFC 5769 pads USERNAME with 0x20 bytes; this encoder pads with zeros (RFC 8489 §14
    # lets the sender choose), so MESSAGE-INTEGRITY and FINGERPRINT of the re-encoded
    # message differ from the RFC's. Everything before them must match byte for byte, and
    # the seals must be the ones RFC 8489 §14 gives for the zero-padded bytes.
    encoded = encode_message(
        Method.BINDING,
        MessageClass.REQUEST,
        TRANSACTION_ID,
        [
            Software("STUN test client"),
            Priority(0x6E0001FF),
            IceControlled(0x932FF9B151263B36),
            Username("evtj:h6vY"),
        ],
        integrity_key=SHORT_TERM_KEY,
        fingerprint=True,
    )
    integrity_at = attribute_offset(REQUEST, MessageIntegrity.TYPE)
    assert len(encoded) == len(REQUEST)
    assert encoded[:integrity_at] == zero_padding(REQUEST)[:integrity_at]
    assert encoded[:integrity_at] != REQUEST[:integrity_at]  # only the padding differs
    assert encoded == reference_seal(zero_padding(REQUEST)[:integrity_at], SHORT_TERM_KEY, True)
    reparsed = parse_message(encoded)
    assert reparsed.check_integrity(SHORT_TERM_KEY)
    assert reparsed.check_fingerprint() is True
    assert reparsed.attributes[:4] == parse_message(REQUEST).attributes[:4]


def test_reference_seal_reproduces_the_rfc_padding_choice() -> None:
    # The oracle used above, applied to the RFC's own 0x20-padded bytes, gives the RFC's
    # MESSAGE-INTEGRITY and FINGERPRINT: it is a faithful reading of RFC 8489 §14.
    integrity_at = attribute_offset(REQUEST, MessageIntegrity.TYPE)
    assert reference_seal(REQUEST[:integrity_at], SHORT_TERM_KEY, True) == REQUEST


# --- 2.2 and 2.3 responses -------------------------------------------------------------


@pytest.mark.parametrize(
    ("vector", "ip"),
    [
        (IPV4_RESPONSE, "192.0.2.1"),
        (IPV6_RESPONSE, "2001:db8:1234:5678:11:2233:4455:6677"),
    ],
    ids=["ipv4", "ipv6"],
)
def test_responses_parse_and_reencode(vector: bytes, ip: str) -> None:
    message = parse_message(vector)
    assert message.method == Method.BINDING
    assert message.message_class == MessageClass.SUCCESS
    assert message.transaction_id == TRANSACTION_ID
    mapped = message.get(XorMappedAddress)
    assert mapped == XorMappedAddress(ip, 32853)
    assert mapped is not None and mapped.address == (ip, 32853)
    integrity_at = attribute_offset(vector, MessageIntegrity.TYPE)
    assert message.attributes == [
        Software("test vector"),
        XorMappedAddress(ip, 32853),
        MessageIntegrity(vector[integrity_at + 4 : integrity_at + 24]),
    ]
    assert message.check_integrity(SHORT_TERM_KEY)
    assert message.check_fingerprint() is True

    # SOFTWARE is padded with 0x20 in the RFC, with zero here: see the 2.1 test.
    encoded = encode_message(
        Method.BINDING,
        MessageClass.SUCCESS,
        TRANSACTION_ID,
        [Software("test vector"), XorMappedAddress(ip, 32853)],
        integrity_key=SHORT_TERM_KEY,
        fingerprint=True,
    )
    assert encoded[:integrity_at] == zero_padding(vector)[:integrity_at]
    assert encoded == reference_seal(zero_padding(vector)[:integrity_at], SHORT_TERM_KEY, True)
    assert reference_seal(vector[:integrity_at], SHORT_TERM_KEY, True) == vector
    reparsed = parse_message(encoded)
    assert reparsed.check_integrity(SHORT_TERM_KEY)
    assert reparsed.check_fingerprint() is True


def test_xor_mapped_address_wire_values() -> None:
    # The XOR-ed port and address bytes printed in the RFC, attribute by attribute.
    ipv4 = XorMappedAddress("192.0.2.1", 32853).encode(TRANSACTION_ID)
    assert ipv4 == bytes.fromhex("0001a147e112a643")
    ipv6 = XorMappedAddress("2001:db8:1234:5678:11:2233:4455:6677", 32853).encode(TRANSACTION_ID)
    assert ipv6 == bytes.fromhex("0002a1470113a9faa5d3f179bc25f4b5bed2b9d9")


# --- 2.4 long-term credentials ---------------------------------------------------------


def test_long_term_request_parses() -> None:
    message = parse_message(LONG_TERM)
    assert message.method == Method.BINDING
    assert message.message_class == MessageClass.REQUEST
    assert message.transaction_id == LONG_TERM_TRANSACTION_ID
    assert message.attributes == [
        Username(USERNAME),
        Nonce(NONCE),
        Realm(REALM),
        MessageIntegrity(bytes.fromhex("f67024656dd64a3e02b8e0712e85c9a28ca89666")),
    ]
    assert message.check_integrity(LONG_TERM_KEY)
    assert message.check_fingerprint() is None


def test_long_term_request_reencodes_byte_for_byte() -> None:
    # The RFC pads with zeros here, so the encoder must reproduce the vector exactly.
    encoded = encode_message(
        Method.BINDING,
        MessageClass.REQUEST,
        LONG_TERM_TRANSACTION_ID,
        [Username(USERNAME), Nonce(NONCE), Realm(REALM)],
        integrity_key=LONG_TERM_KEY,
    )
    assert encoded == LONG_TERM


# --- keys and tampering ----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SEALED))
def test_wrong_key_fails(name: str) -> None:
    vector, key, _ = SEALED[name]
    message = parse_message(vector)
    assert message.check_integrity(key)
    assert not message.check_integrity(key[:-1] + bytes([key[-1] ^ 1]))
    assert not message.check_integrity(key + b"x")
    assert not message.check_integrity(b"")
    assert not message.check_integrity_sha256(key)  # there is no SHA-256 integrity at all


def test_unprepared_password_gives_a_wrong_key() -> None:
    raw_key = hashlib.md5(f"{USERNAME}:{REALM}:{PASSWORD}".encode()).digest()
    assert not parse_message(LONG_TERM).check_integrity(raw_key)


def _accepted(data: bytes, key: bytes, with_fingerprint: bool) -> bool:
    """What a receiver that requires the vector's protections would conclude."""
    try:
        message = parse_message(data)
    except StunError:
        return False
    fingerprint_ok = message.check_fingerprint() is True if with_fingerprint else True
    return message.check_integrity(key) and fingerprint_ok


@pytest.mark.parametrize("name", sorted(SEALED))
def test_every_single_bit_flip_is_detected(name: str) -> None:
    vector, key, with_fingerprint = SEALED[name]
    assert _accepted(vector, key, with_fingerprint)
    flips = 0
    for position in range(len(vector)):
        for bit in range(8):
            tampered = bytearray(vector)
            tampered[position] ^= 1 << bit
            assert not _accepted(bytes(tampered), key, with_fingerprint), (position, bit)
            flips += 1
    assert flips == 8 * len(vector)


@pytest.mark.parametrize("name", ["2.1", "2.2", "2.3"])
def test_fingerprint_alone_detects_flips(name: str) -> None:
    # Without the key a receiver still has FINGERPRINT: every bit before it is covered.
    vector, _, _ = SEALED[name]
    fingerprint_at = attribute_offset(vector, 0x8028)
    for position in range(20, fingerprint_at):
        tampered = bytearray(vector)
        tampered[position] ^= 0x10
        try:
            message = parse_message(bytes(tampered))
        except StunError:
            continue
        assert message.check_fingerprint() is not True, position
