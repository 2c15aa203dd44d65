"""STUN messages: header, attribute walk, integrity and fingerprint (RFC 8489 §5, §14).

Parsing is strict, as a server needs: the magic cookie, the two zero bits, the length and
its 4-byte alignment, every attribute inside the message, FINGERPRINT last. A message that
breaks any of that raises :class:`StunError` and is dropped. Attributes are decoded on
access, so one malformed attribute raises :class:`AttributeError_` only where it is read and
the server can still answer 400 to an otherwise well-formed request.

Attributes after MESSAGE-INTEGRITY are ignored, except MESSAGE-INTEGRITY-SHA256 and
FINGERPRINT; after MESSAGE-INTEGRITY-SHA256 only FINGERPRINT counts (RFC 8489 §14.5-14.6).
"""

from __future__ import annotations

import binascii
import hmac
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TypeVar

from .attributes import (
    ATTRIBUTE_CLASSES,
    MAGIC_COOKIE,
    Attribute,
    Fingerprint,
    MessageIntegrity,
    MessageIntegritySha256,
    UnknownAttribute,
)

__all__ = [
    "HEADER_LENGTH",
    "MAGIC_COOKIE",
    "Message",
    "MessageClass",
    "Method",
    "StunError",
    "encode_message",
    "is_channel_data",
    "is_stun",
    "parse_message",
]

HEADER_LENGTH = 20
_MAX_LENGTH = 0xFFFF
_COOKIE_BYTES = MAGIC_COOKIE.to_bytes(4, "big")
_FINGERPRINT_XOR = 0x5354554E
_HEADER = struct.Struct("!HHI12s")
_TLV = struct.Struct("!HH")

A = TypeVar("A", bound=Attribute)


class StunError(ValueError):
    """The bytes are not a well-formed STUN message; the only answer is to drop them."""


class Method(IntEnum):
    """STUN and TURN methods (RFC 8489 §18.2, RFC 8656 §17, RFC 6062 §6.1)."""

    BINDING = 0x001
    ALLOCATE = 0x003
    REFRESH = 0x004
    SEND = 0x006
    DATA = 0x007
    CREATE_PERMISSION = 0x008
    CHANNEL_BIND = 0x009
    CONNECT = 0x00A
    CONNECTION_BIND = 0x00B
    CONNECTION_ATTEMPT = 0x00C


class MessageClass(IntEnum):
    """The two class bits of the message type (RFC 8489 §5)."""

    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


def _encode_type(method: int, message_class: int) -> int:
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((message_class & 0b01) << 4)
        | ((message_class & 0b10) << 7)
    )


def _decode_type(message_type: int) -> tuple[int, MessageClass]:
    t = message_type
    method = (t & 0x000F) | ((t & 0x00E0) >> 1) | ((t & 0x3E00) >> 2)
    klass = ((t & 0x0010) >> 4) | ((t & 0x0100) >> 7)
    return method, MessageClass(klass)


def is_stun(data: bytes) -> bool:
    """Cheap test used to demultiplex: a STUN header with the RFC 5389 magic cookie."""
    return len(data) >= HEADER_LENGTH and data[0] < 0x40 and data[4:8] == _COOKIE_BYTES


def is_channel_data(data: bytes) -> bool:
    """True when the first two bits are 01: a ChannelData message (RFC 8656 §12.4)."""
    return len(data) >= 4 and 0x40 <= data[0] <= 0x7F


@dataclass(slots=True)
class Message:
    """A parsed STUN message. ``raw`` is kept verbatim: integrity is computed over it."""

    method: int
    message_class: MessageClass
    transaction_id: bytes
    raw: bytes = b""
    # (type, value start, value length) of every attribute that counts, in wire order.
    fields: list[tuple[int, int, int]] = field(default_factory=list)
    integrity_offset: int | None = None
    integrity_sha256_offset: int | None = None
    fingerprint_offset: int | None = None
    rfc3489: bool = False
    _decoded: dict[int, Attribute] = field(default_factory=dict)

    # -- attribute access ---------------------------------------------------------------

    def _decode(self, index: int) -> Attribute:
        attribute = self._decoded.get(index)
        if attribute is None:
            kind, start, length = self.fields[index]
            value = self.raw[start : start + length]
            cls = ATTRIBUTE_CLASSES.get(kind)
            if cls is None:
                attribute = UnknownAttribute(kind, value)
            else:
                attribute = cls.decode(value, self.transaction_id)
            self._decoded[index] = attribute
        return attribute

    def get(self, cls: type[A]) -> A | None:
        """The first attribute of this class, decoded, or None. May raise AttributeError_."""
        for index, (kind, _, _) in enumerate(self.fields):
            if kind == cls.TYPE:
                attribute = self._decode(index)
                assert isinstance(attribute, cls)
                return attribute
        return None

    def get_all(self, cls: type[A]) -> list[A]:
        """Every attribute of this class, in order (CreatePermission may carry several)."""
        found: list[A] = []
        for index, (kind, _, _) in enumerate(self.fields):
            if kind == cls.TYPE:
                attribute = self._decode(index)
                assert isinstance(attribute, cls)
                found.append(attribute)
        return found

    def has(self, cls: type[Attribute]) -> bool:
        return any(kind == cls.TYPE for kind, _, _ in self.fields)

    @property
    def attributes(self) -> list[Attribute]:
        """All attributes that count, decoded. May raise AttributeError_."""
        return [self._decode(index) for index in range(len(self.fields))]

    def __iter__(self) -> Iterator[Attribute]:
        return iter(self.attributes)

    @property
    def unknown_required(self) -> tuple[int, ...]:
        """Comprehension-required types (< 0x8000) this codec does not know (→ 420)."""
        return tuple(
            kind for kind, _, _ in self.fields if kind < 0x8000 and kind not in ATTRIBUTE_CLASSES
        )

    # -- integrity --------------------------------------------------------------------------

    def _digest_input(self, offset: int, trailer: int) -> bytes:
        # The length field must cover everything up to and including the integrity attribute
        # being checked (RFC 8489 §14.5), whatever follows it on the wire.
        length = offset - HEADER_LENGTH + trailer
        return self.raw[:2] + length.to_bytes(2, "big") + self.raw[4:offset]

    def check_integrity(self, key: bytes) -> bool:
        """Verify MESSAGE-INTEGRITY (HMAC-SHA1) with ``key``, in constant time."""
        if self.integrity_offset is None:
            return False
        offset = self.integrity_offset
        expected = hmac.digest(key, self._digest_input(offset, 24), "sha1")
        return hmac.compare_digest(expected, self.raw[offset + 4 : offset + 24])

    def check_integrity_sha256(self, key: bytes) -> bool:
        """Verify MESSAGE-INTEGRITY-SHA256 (possibly truncated) with ``key``."""
        if self.integrity_sha256_offset is None:
            return False
        offset = self.integrity_sha256_offset
        length = int.from_bytes(self.raw[offset + 2 : offset + 4], "big")
        data = self._digest_input(offset, 4 + length)
        expected = hmac.digest(key, data, "sha256")[:length]
        return hmac.compare_digest(expected, self.raw[offset + 4 : offset + 4 + length])

    def check_fingerprint(self) -> bool | None:
        """None when absent, else whether FINGERPRINT matches the CRC-32 of the message."""
        if self.fingerprint_offset is None:
            return None
        offset = self.fingerprint_offset
        crc = (binascii.crc32(self.raw[:offset]) ^ _FINGERPRINT_XOR) & 0xFFFFFFFF
        return crc == int.from_bytes(self.raw[offset + 4 : offset + 8], "big")

    @property
    def has_integrity(self) -> bool:
        return self.integrity_offset is not None or self.integrity_sha256_offset is not None


def parse_message(data: bytes, *, allow_rfc3489: bool = False) -> Message:
    """Parse one STUN message occupying all of ``data``.

    With ``allow_rfc3489`` a message without the magic cookie is accepted as an RFC 3489
    message whose transaction id is the 16 bytes after the length.
    """
    if len(data) < HEADER_LENGTH:
        raise StunError("shorter than a STUN header")
    message_type, length, cookie, tail = _HEADER.unpack_from(data)
    if message_type & 0xC000:
        raise StunError("the two most significant bits are not zero")
    rfc3489 = cookie != MAGIC_COOKIE
    if rfc3489 and not allow_rfc3489:
        raise StunError("no magic cookie")
    if length % 4:
        raise StunError("length is not a multiple of 4")
    if HEADER_LENGTH + length != len(data):
        raise StunError("length does not match the datagram")
    method, klass = _decode_type(message_type)
    message = Message(
        method=method,
        message_class=klass,
        transaction_id=bytes(data[4:20]) if rfc3489 else bytes(tail),
        raw=bytes(data),
        rfc3489=rfc3489,
    )

    offset = HEADER_LENGTH
    end = len(data)
    counting = True  # False once past MESSAGE-INTEGRITY(-SHA256): the rest is ignored
    while offset < end:
        if offset + 4 > end:
            raise StunError("truncated attribute header")
        kind, value_length = _TLV.unpack_from(data, offset)
        value_start = offset + 4
        next_offset = value_start + value_length + (-value_length % 4)
        if next_offset > end:
            raise StunError(f"attribute {kind:#06x} runs past the end of the message")
        if message.fingerprint_offset is not None:
            raise StunError("attribute after FINGERPRINT")
        if kind == Fingerprint.TYPE:
            if value_length != 4:
                raise StunError("FINGERPRINT must be 4 bytes")
            message.fingerprint_offset = offset
        elif kind == MessageIntegrity.TYPE:
            if counting and message.integrity_offset is None:
                if value_length != 20:
                    raise StunError("MESSAGE-INTEGRITY must be 20 bytes")
                message.integrity_offset = offset
                message.fields.append((kind, value_start, value_length))
                counting = False
        elif kind == MessageIntegritySha256.TYPE:
            if message.integrity_sha256_offset is None and (
                counting or message.integrity_offset is not None
            ):
                if not 16 <= value_length <= 32 or value_length % 4:
                    raise StunError("MESSAGE-INTEGRITY-SHA256 has a bad length")
                message.integrity_sha256_offset = offset
                message.fields.append((kind, value_start, value_length))
            counting = False
        elif counting:
            message.fields.append((kind, value_start, value_length))
        offset = next_offset
    return message


def _encode_attributes(attributes: Iterable[Attribute], transaction_id: bytes) -> bytearray:
    body = bytearray()
    for attribute in attributes:
        value = attribute.encode(transaction_id)
        kind = attribute.type if isinstance(attribute, UnknownAttribute) else attribute.TYPE
        if len(value) > _MAX_LENGTH:
            raise ValueError(f"attribute {kind:#06x} is longer than {_MAX_LENGTH} bytes")
        body += _TLV.pack(kind, len(value))
        body += value
        body += bytes(-len(value) % 4)
    return body


def encode_message(
    method: int,
    message_class: MessageClass,
    transaction_id: bytes,
    attributes: Iterable[Attribute] = (),
    *,
    integrity_key: bytes | None = None,
    integrity_sha256_key: bytes | None = None,
    fingerprint: bool = False,
) -> bytes:
    """Serialise a message, appending integrity attributes and FINGERPRINT as asked.

    A 16-byte ``transaction_id`` produces an RFC 3489 message (no magic cookie). A message
    whose attributes would not fit the 16-bit length field raises ValueError.
    """
    if len(transaction_id) == 16:
        after_length = transaction_id
    elif len(transaction_id) == 12:
        after_length = _COOKIE_BYTES + transaction_id
    else:
        raise ValueError("a transaction id is 12 bytes (16 for RFC 3489)")
    # XOR-ed addresses use the same id the parser hands them: 12 bytes, or all 16.
    body = _encode_attributes(attributes, transaction_id)
    trailers = (
        (24 if integrity_key is not None else 0)
        + (36 if integrity_sha256_key is not None else 0)
        + (8 if fingerprint else 0)
    )
    if len(body) + trailers > _MAX_LENGTH:
        raise ValueError(f"message longer than {_MAX_LENGTH} bytes after its header")
    message_type = _encode_type(method, message_class).to_bytes(2, "big")

    def header(extra: int) -> bytes:
        return message_type + (len(body) + extra).to_bytes(2, "big") + after_length

    if integrity_key is not None:
        digest = hmac.digest(integrity_key, header(24) + body, "sha1")
        body += _TLV.pack(MessageIntegrity.TYPE, 20) + digest
    if integrity_sha256_key is not None:
        digest = hmac.digest(integrity_sha256_key, header(36) + body, "sha256")
        body += _TLV.pack(MessageIntegritySha256.TYPE, 32) + digest
    if fingerprint:
        crc = (binascii.crc32(header(8) + body) ^ _FINGERPRINT_XOR) & 0xFFFFFFFF
        body += _TLV.pack(Fingerprint.TYPE, 4) + crc.to_bytes(4, "big")
    return header(0) + bytes(body)
