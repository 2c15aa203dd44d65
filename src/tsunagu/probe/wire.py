"""The client side of the STUN/TURN wire format, as small and fast as a load generator needs.

This is deliberately independent of :mod:`tsunagu.stun`, the server's codec: a load tool
that shared the server's encoder could not notice when both are wrong in the same way, and
the hot path here (ChannelData and Send indications built from templates) must cost as
little as possible on the generator's core.

Only what a TURN client sends and reads is covered: requests with long-term integrity and
FINGERPRINT, the attributes of Allocate, CreatePermission, ChannelBind, Refresh and Binding,
Send indications, ChannelData, and a lenient reader for the server's answers.
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import hmac
import socket
import struct
from dataclasses import dataclass, field

__all__ = [
    "ALLOCATE",
    "BINDING",
    "CHANNEL_BIND",
    "CLASS_ERROR",
    "CLASS_INDICATION",
    "CLASS_REQUEST",
    "CLASS_SUCCESS",
    "CREATE_PERMISSION",
    "DATA",
    "MAGIC_COOKIE",
    "REFRESH",
    "SEND",
    "StunReply",
    "WireError",
    "attr_channel_number",
    "attr_lifetime",
    "attr_requested_address_family",
    "attr_requested_transport",
    "attr_xor_address",
    "credential_attributes",
    "channel_data",
    "data_payload",
    "decode_xor_address",
    "encode_request",
    "long_term_key",
    "message_type",
    "parse_reply",
    "send_indication",
    "split_type",
    "stream_frame_length",
]

MAGIC_COOKIE = 0x2112A442
_COOKIE_BYTES = MAGIC_COOKIE.to_bytes(4, "big")
_FINGERPRINT_XOR = 0x5354554E
_HEADER = struct.Struct("!HHI12s")
_TLV = struct.Struct("!HH")

# Methods.
BINDING = 0x001
ALLOCATE = 0x003
REFRESH = 0x004
SEND = 0x006
DATA = 0x007
CREATE_PERMISSION = 0x008
CHANNEL_BIND = 0x009

# Classes (the two class bits, C1 C0).
CLASS_REQUEST = 0
CLASS_INDICATION = 1
CLASS_SUCCESS = 2
CLASS_ERROR = 3

# Attributes.
ATTR_MAPPED_ADDRESS = 0x0001
ATTR_USERNAME = 0x0006
ATTR_MESSAGE_INTEGRITY = 0x0008
ATTR_ERROR_CODE = 0x0009
ATTR_CHANNEL_NUMBER = 0x000C
ATTR_LIFETIME = 0x000D
ATTR_XOR_PEER_ADDRESS = 0x0012
ATTR_DATA = 0x0013
ATTR_REALM = 0x0014
ATTR_NONCE = 0x0015
ATTR_XOR_RELAYED_ADDRESS = 0x0016
ATTR_REQUESTED_ADDRESS_FAMILY = 0x0017
ATTR_REQUESTED_TRANSPORT = 0x0019
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_FINGERPRINT = 0x8028


class WireError(ValueError):
    """Bytes that are not a STUN message this client can read."""


def message_type(method: int, klass: int) -> int:
    """Interleave the 12 method bits and the 2 class bits (RFC 8489 §5)."""
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((klass & 1) << 4)
        | ((klass & 2) << 7)
    )


def split_type(value: int) -> tuple[int, int]:
    """The inverse of :func:`message_type`: ``(method, class)``."""
    method = (value & 0x000F) | ((value >> 1) & 0x0070) | ((value >> 2) & 0x0F80)
    klass = ((value >> 4) & 1) | ((value >> 7) & 2)
    return method, klass


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """The long-term credential key, MD5(username ":" realm ":" password) (RFC 8489 §9.2.2)."""
    return hashlib.md5(f"{username}:{realm}:{password}".encode()).digest()


def _tlv(kind: int, value: bytes) -> bytes:
    return _TLV.pack(kind, len(value)) + value + b"\x00" * (-len(value) & 3)


def _pack_ip(ip: str) -> bytes:
    # inet_pton is a tenth of the cost of ipaddress, and this runs for every allocation.
    try:
        return socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
    except OSError:
        raise WireError(f"not an IP address: {ip!r}") from None


def attr_xor_address(kind: int, ip: str, port: int, txid: bytes) -> tuple[int, bytes]:
    """An XOR-*-ADDRESS attribute (RFC 8489 §14.2) for ``(ip, port)``."""
    packed = _pack_ip(ip)
    xport = port ^ (MAGIC_COOKIE >> 16)
    if len(packed) == 4:
        xaddr = (int.from_bytes(packed, "big") ^ MAGIC_COOKIE).to_bytes(4, "big")
        return kind, struct.pack("!BBH", 0, 1, xport) + xaddr
    mask = _COOKIE_BYTES + txid
    xaddr = bytes(a ^ b for a, b in zip(packed, mask, strict=True))
    return kind, struct.pack("!BBH", 0, 2, xport) + xaddr


def decode_xor_address(value: bytes, txid: bytes) -> tuple[str, int]:
    """Read an XOR-*-ADDRESS value back into ``(ip, port)``."""
    if len(value) < 8:
        raise WireError("address attribute too short")
    family = value[1]
    port = int.from_bytes(value[2:4], "big") ^ (MAGIC_COOKIE >> 16)
    if family == 1:
        raw = (int.from_bytes(value[4:8], "big") ^ MAGIC_COOKIE).to_bytes(4, "big")
        return socket.inet_ntop(socket.AF_INET, raw), port
    if family == 2 and len(value) >= 20:
        mask = _COOKIE_BYTES + txid
        raw = bytes(a ^ b for a, b in zip(value[4:20], mask, strict=True))
        return socket.inet_ntop(socket.AF_INET6, raw), port
    raise WireError(f"unknown address family {family}")


def attr_requested_transport(protocol: int = 17) -> tuple[int, bytes]:
    return ATTR_REQUESTED_TRANSPORT, bytes((protocol, 0, 0, 0))


def attr_requested_address_family(family: int) -> tuple[int, bytes]:
    """REQUESTED-ADDRESS-FAMILY (RFC 8656 §18.11): 1 for IPv4, 2 for IPv6."""
    return ATTR_REQUESTED_ADDRESS_FAMILY, bytes((family, 0, 0, 0))


def attr_lifetime(seconds: int) -> tuple[int, bytes]:
    return ATTR_LIFETIME, seconds.to_bytes(4, "big")


def attr_channel_number(number: int) -> tuple[int, bytes]:
    return ATTR_CHANNEL_NUMBER, number.to_bytes(2, "big") + b"\x00\x00"


@functools.lru_cache(maxsize=64)
def credential_attributes(username: str, realm: str, nonce: str) -> bytes:
    """USERNAME, REALM and NONCE, encoded: the same for every request of a client."""
    return (
        _tlv(ATTR_USERNAME, username.encode())
        + _tlv(ATTR_REALM, realm.encode())
        + _tlv(ATTR_NONCE, nonce.encode())
    )


def encode_request(
    method: int,
    txid: bytes,
    attributes: list[tuple[int, bytes]],
    *,
    klass: int = CLASS_REQUEST,
    credentials: tuple[str, str, str, bytes] | None = None,
    fingerprint: bool = True,
) -> bytes:
    """Encode a request (or indication) from ``(type, value)`` attributes.

    ``credentials`` is ``(username, realm, nonce, key)``: USERNAME, REALM and NONCE are added
    and the message is protected with MESSAGE-INTEGRITY (HMAC-SHA1 with the long-term key).
    """
    if len(txid) != 12:
        raise ValueError("a transaction id is 12 bytes")
    body = b"".join([_tlv(kind, value) for kind, value in attributes])
    kind = message_type(method, klass)
    if credentials is not None:
        username, realm, nonce, key = credentials
        body += credential_attributes(username, realm, nonce)
        # The length covers MESSAGE-INTEGRITY itself but not a FINGERPRINT after it.
        head = _HEADER.pack(kind, len(body) + 24, MAGIC_COOKIE, txid)
        mac = hmac.new(key, head + body, hashlib.sha1).digest()
        body += _TLV.pack(ATTR_MESSAGE_INTEGRITY, 20) + mac
    if fingerprint:
        head = _HEADER.pack(kind, len(body) + 8, MAGIC_COOKIE, txid)
        crc = (binascii.crc32(head + body) ^ _FINGERPRINT_XOR) & 0xFFFFFFFF
        return head + body + _TLV.pack(ATTR_FINGERPRINT, 4) + crc.to_bytes(4, "big")
    return _HEADER.pack(kind, len(body), MAGIC_COOKIE, txid) + body


def send_indication(txid: bytes, peer: tuple[str, int], payload: bytes) -> bytes:
    """A Send indication (RFC 8656 §10.1) carrying ``payload`` to ``peer``."""
    return encode_request(
        SEND,
        txid,
        [attr_xor_address(ATTR_XOR_PEER_ADDRESS, peer[0], peer[1], txid), (ATTR_DATA, payload)],
        klass=CLASS_INDICATION,
        fingerprint=False,
    )


def channel_data(channel: int, payload: bytes, *, pad: bool = False) -> bytes:
    """A ChannelData message; ``pad`` rounds it up to 4 bytes, as stream transports need."""
    message = struct.pack("!HH", channel, len(payload)) + payload
    if pad:
        message += b"\x00" * (-len(payload) & 3)
    return message


def data_payload(message: bytes | memoryview) -> bytes | None:
    """The DATA attribute of a Data indication, or None if ``message`` has none."""
    end = 20 + int.from_bytes(message[2:4], "big")
    if end > len(message):
        return None
    offset = 20
    while offset + 4 <= end:
        kind = (message[offset] << 8) | message[offset + 1]
        length = (message[offset + 2] << 8) | message[offset + 3]
        if kind == ATTR_DATA:
            return bytes(message[offset + 4 : offset + 4 + length])
        offset += 4 + ((length + 3) & ~3)
    return None


def stream_frame_length(buffer: bytes | bytearray, offset: int = 0) -> int | None:
    """Length of the STUN or (padded) ChannelData frame at ``offset``, if its header is in."""
    if len(buffer) - offset < 4:
        return None
    first = buffer[offset]
    length = (buffer[offset + 2] << 8) | buffer[offset + 3]
    if 0x40 <= first <= 0x7F:
        return 4 + ((length + 3) & ~3)
    if first & 0xC0:
        raise WireError("neither STUN nor ChannelData on the stream")
    return 20 + length


@dataclass(slots=True)
class StunReply:
    """A STUN message read leniently: enough to drive a client."""

    method: int
    klass: int
    txid: bytes
    attributes: dict[int, bytes] = field(default_factory=dict)

    @property
    def error_code(self) -> int | None:
        value = self.attributes.get(ATTR_ERROR_CODE)
        if value is None or len(value) < 4:
            return None
        return (value[2] & 0x7) * 100 + value[3]

    @property
    def reason(self) -> str:
        value = self.attributes.get(ATTR_ERROR_CODE)
        return "" if value is None else value[4:].decode("utf-8", "replace")

    def text(self, kind: int) -> str | None:
        value = self.attributes.get(kind)
        return None if value is None else value.decode("utf-8", "replace")

    def address(self, kind: int) -> tuple[str, int] | None:
        value = self.attributes.get(kind)
        return None if value is None else decode_xor_address(value, self.txid)


def parse_reply(data: bytes | bytearray | memoryview) -> StunReply:
    """Parse a STUN message; the first instance of each attribute wins."""
    if len(data) < 20:
        raise WireError("shorter than a STUN header")
    kind, length, cookie, txid = _HEADER.unpack_from(data, 0)
    if kind & 0xC000 or cookie != MAGIC_COOKIE:
        raise WireError("not a STUN message")
    if 20 + length > len(data) or length & 3:
        raise WireError("bad STUN length")
    method, klass = split_type(kind)
    reply = StunReply(method, klass, bytes(txid))
    offset, end = 20, 20 + length
    attributes = reply.attributes
    while offset + 4 <= end:
        akind, alen = _TLV.unpack_from(data, offset)
        if offset + 4 + alen > end:
            raise WireError("attribute runs past the end")
        if akind not in attributes:
            attributes[akind] = bytes(data[offset + 4 : offset + 4 + alen])
        offset += 4 + ((alen + 3) & ~3)
    return reply
