"""STUN attributes as frozen dataclasses, one per RFC attribute.

Each class carries its wire ``TYPE`` and knows how to ``decode`` its value and ``encode`` it
again. XOR-ed addresses need the transaction id, so every ``decode``/``encode`` receives it.
A value that breaks its attribute's grammar raises :class:`AttributeError_`, which the
server answers with 400 Bad Request.

Types 0x0000-0x7FFF are comprehension-required: an agent that does not know one must reject
the message (420). Types 0x8000-0xFFFF may be ignored.
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from dataclasses import dataclass
from typing import ClassVar, Self

__all__ = [
    "ATTRIBUTE_CLASSES",
    "AdditionalAddressFamily",
    "Address",
    "AddressErrorCode",
    "AlternateDomain",
    "AlternateServer",
    "Attribute",
    "AttributeError_",
    "CacheTimeout",
    "ChangeRequest",
    "ChangedAddress",
    "ChannelNumber",
    "ConnectionId",
    "Data",
    "DontFragment",
    "ErrorCode",
    "EvenPort",
    "Fingerprint",
    "Icmp",
    "IceControlled",
    "IceControlling",
    "Lifetime",
    "MappedAddress",
    "MessageIntegrity",
    "MessageIntegritySha256",
    "MobilityTicket",
    "Nonce",
    "OtherAddress",
    "Padding",
    "PasswordAlgorithm",
    "PasswordAlgorithms",
    "Priority",
    "Realm",
    "RequestedAddressFamily",
    "RequestedTransport",
    "ReservationToken",
    "ResponseAddress",
    "ResponseOrigin",
    "ResponsePort",
    "Software",
    "SourceAddress",
    "UnknownAttribute",
    "UnknownAttributes",
    "UseCandidate",
    "Username",
    "Userhash",
    "XorMappedAddress",
    "XorPeerAddress",
    "XorRelayedAddress",
    "FAMILY_IPV4",
    "FAMILY_IPV6",
    "PASSWORD_ALGORITHM_MD5",
    "PASSWORD_ALGORITHM_SHA256",
    "TRANSPORT_UDP",
    "TRANSPORT_TCP",
]

MAGIC_COOKIE = 0x2112A442
_COOKIE_BYTES = MAGIC_COOKIE.to_bytes(4, "big")

FAMILY_IPV4 = 0x01
FAMILY_IPV6 = 0x02
TRANSPORT_UDP = 17
TRANSPORT_TCP = 6
PASSWORD_ALGORITHM_MD5 = 0x0001
PASSWORD_ALGORITHM_SHA256 = 0x0002

Address = tuple[str, int]
"""An IP address as text and a port: what asyncio and the socket module speak."""


class AttributeError_(ValueError):  # noqa: N801 - the builtin name is taken
    """An attribute's value does not follow its grammar."""


@dataclass(frozen=True, slots=True)
class Attribute:
    """Base of every attribute. ``TYPE`` is the 16-bit attribute type on the wire."""

    TYPE: ClassVar[int] = -1

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        raise NotImplementedError

    def encode(self, transaction_id: bytes) -> bytes:
        raise NotImplementedError


# --- generic shapes ---------------------------------------------------------------------


# The same few addresses (clients, peers, relays) are converted again and again, and the
# ipaddress module is slow: cache the conversions both ways.
@functools.lru_cache(maxsize=4096)
def _packed(text: str) -> tuple[int, bytes] | None:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return (FAMILY_IPV4 if ip.version == 4 else FAMILY_IPV6), ip.packed


@functools.lru_cache(maxsize=4096)
def _text(packed: bytes) -> str:
    return str(ipaddress.ip_address(packed))


def _pack_address(family_ip: str, port: int) -> tuple[int, bytes]:
    packed = _packed(family_ip)
    if packed is None:
        raise AttributeError_(f"not an IP address: {family_ip!r}")
    if not 0 <= port <= 0xFFFF:
        raise AttributeError_(f"port out of range: {port}")
    return packed


def _xor(data: bytes, mask: bytes) -> bytes:
    return (int.from_bytes(data, "big") ^ int.from_bytes(mask, "big")).to_bytes(len(data), "big")


def _unpack_address(value: bytes) -> tuple[int, int, bytes]:
    if len(value) < 4:
        raise AttributeError_("address attribute shorter than 4 bytes")
    family, port = value[1], int.from_bytes(value[2:4], "big")
    raw = value[4:]
    if family == FAMILY_IPV4:
        if len(raw) != 4:
            raise AttributeError_("IPv4 address attribute must be 8 bytes")
    elif family == FAMILY_IPV6:
        if len(raw) != 16:
            raise AttributeError_("IPv6 address attribute must be 20 bytes")
    else:
        raise AttributeError_(f"unknown address family {family:#04x}")
    return family, port, raw


@dataclass(frozen=True, slots=True)
class _AddressAttribute(Attribute):
    ip: str
    port: int

    @property
    def address(self) -> Address:
        return (self.ip, self.port)

    @property
    def family(self) -> int:
        return FAMILY_IPV4 if ":" not in self.ip else FAMILY_IPV6

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        _, port, raw = _unpack_address(value)
        return cls(_text(bytes(raw)), port)

    def encode(self, transaction_id: bytes) -> bytes:
        family, raw = _pack_address(self.ip, self.port)
        return bytes((0, family)) + self.port.to_bytes(2, "big") + raw


@dataclass(frozen=True, slots=True)
class _XorAddressAttribute(_AddressAttribute):
    @staticmethod
    def _mask(length: int, transaction_id: bytes) -> bytes:
        # The mask is the 128 bits after the length field: the magic cookie and a 96-bit id,
        # or, in a message without the cookie, its whole 128-bit RFC 3489 id. The encoder and
        # the parser then agree whichever id length they are given.
        if len(transaction_id) == 16:
            return transaction_id[:length]
        return (_COOKIE_BYTES + transaction_id)[:length]

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        _, xport, raw = _unpack_address(value)
        mask = cls._mask(len(raw), transaction_id)
        if len(mask) != len(raw):
            raise AttributeError_("XOR address needs a 96-bit transaction id")
        return cls(_text(_xor(raw, mask)), xport ^ (MAGIC_COOKIE >> 16))

    def encode(self, transaction_id: bytes) -> bytes:
        family, raw = _pack_address(self.ip, self.port)
        mask = self._mask(len(raw), transaction_id)
        xip = _xor(raw, mask)
        xport = self.port ^ (MAGIC_COOKIE >> 16)
        return bytes((0, family)) + xport.to_bytes(2, "big") + xip


@dataclass(frozen=True, slots=True)
class _TextAttribute(Attribute):
    value: str
    MAX_BYTES: ClassVar[int] = 763

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        if len(value) > cls.MAX_BYTES:
            raise AttributeError_(f"{cls.__name__} longer than {cls.MAX_BYTES} bytes")
        try:
            return cls(value.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise AttributeError_(f"{cls.__name__} is not UTF-8") from exc

    def encode(self, transaction_id: bytes) -> bytes:
        return self.value.encode("utf-8")


@dataclass(frozen=True, slots=True)
class _BytesAttribute(Attribute):
    value: bytes
    LENGTH: ClassVar[int | None] = None

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        if cls.LENGTH is not None and len(value) != cls.LENGTH:
            raise AttributeError_(f"{cls.__name__} must be {cls.LENGTH} bytes")
        return cls(bytes(value))

    def encode(self, transaction_id: bytes) -> bytes:
        return self.value


@dataclass(frozen=True, slots=True)
class _Uint32Attribute(Attribute):
    value: int

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        if len(value) != 4:
            raise AttributeError_(f"{cls.__name__} must be 4 bytes")
        return cls(int.from_bytes(value, "big"))

    def encode(self, transaction_id: bytes) -> bytes:
        return self.value.to_bytes(4, "big")


@dataclass(frozen=True, slots=True)
class _Uint64Attribute(Attribute):
    value: int

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        if len(value) != 8:
            raise AttributeError_(f"{cls.__name__} must be 8 bytes")
        return cls(int.from_bytes(value, "big"))

    def encode(self, transaction_id: bytes) -> bytes:
        return self.value.to_bytes(8, "big")


@dataclass(frozen=True, slots=True)
class _FlagAttribute(Attribute):
    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        if value:
            raise AttributeError_(f"{cls.__name__} must be empty")
        return cls()

    def encode(self, transaction_id: bytes) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class _FamilyAttribute(Attribute):
    family: int

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        if len(value) != 4:
            raise AttributeError_(f"{cls.__name__} must be 4 bytes")
        return cls(value[0])

    def encode(self, transaction_id: bytes) -> bytes:
        return bytes((self.family, 0, 0, 0))


def _decode_error_code(value: bytes, name: str) -> tuple[int, str]:
    """The code and reason of ERROR-CODE and ADDRESS-ERROR-CODE (RFC 8489 §14.8)."""
    if len(value) < 4 or len(value) > 4 + 763:
        raise AttributeError_(f"{name} has a bad length")
    klass, number = value[2] & 0x07, value[3]
    if not 3 <= klass <= 6 or number > 99:
        raise AttributeError_(f"{name} out of range")
    try:
        reason = value[4:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AttributeError_(f"{name} reason is not UTF-8") from exc
    return klass * 100 + number, reason


# --- RFC 8489 ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MappedAddress(_AddressAttribute):
    """MAPPED-ADDRESS (RFC 8489 §14.1): the reflexive address, for RFC 3489 clients."""

    TYPE: ClassVar[int] = 0x0001


@dataclass(frozen=True, slots=True)
class XorMappedAddress(_XorAddressAttribute):
    """XOR-MAPPED-ADDRESS (RFC 8489 §14.2): the client's reflexive address, obfuscated."""

    TYPE: ClassVar[int] = 0x0020


@dataclass(frozen=True, slots=True)
class Username(_TextAttribute):
    """USERNAME (RFC 8489 §14.3): fewer than 509 bytes once SASLprep-ed."""

    TYPE: ClassVar[int] = 0x0006
    MAX_BYTES: ClassVar[int] = 512


@dataclass(frozen=True, slots=True)
class Userhash(_BytesAttribute):
    """USERHASH (RFC 8489 §14.4): SHA-256(username ":" realm), to keep the name private."""

    TYPE: ClassVar[int] = 0x001E
    LENGTH: ClassVar[int | None] = 32


@dataclass(frozen=True, slots=True)
class MessageIntegrity(_BytesAttribute):
    """MESSAGE-INTEGRITY (RFC 8489 §14.5): HMAC-SHA1 over the message up to itself."""

    TYPE: ClassVar[int] = 0x0008
    LENGTH: ClassVar[int | None] = 20


@dataclass(frozen=True, slots=True)
class MessageIntegritySha256(_BytesAttribute):
    """MESSAGE-INTEGRITY-SHA256 (RFC 8489 §14.6): HMAC-SHA256, 16 to 32 bytes, 4-aligned."""

    TYPE: ClassVar[int] = 0x001C

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        if not 16 <= len(value) <= 32 or len(value) % 4:
            raise AttributeError_("MESSAGE-INTEGRITY-SHA256 must be 16-32 bytes, 4-aligned")
        return cls(bytes(value))


@dataclass(frozen=True, slots=True)
class Fingerprint(_Uint32Attribute):
    """FINGERPRINT (RFC 8489 §14.7): CRC-32 of the message XOR 0x5354554E."""

    TYPE: ClassVar[int] = 0x8028


@dataclass(frozen=True, slots=True)
class ErrorCode(Attribute):
    """ERROR-CODE (RFC 8489 §14.8): a code 300-699 and a reason phrase."""

    TYPE: ClassVar[int] = 0x0009
    code: int
    reason: str = ""

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        return cls(*_decode_error_code(value, "ERROR-CODE"))

    def encode(self, transaction_id: bytes) -> bytes:
        klass, number = divmod(self.code, 100)
        return bytes((0, 0, klass, number)) + self.reason.encode("utf-8")


@dataclass(frozen=True, slots=True)
class Realm(_TextAttribute):
    """REALM (RFC 8489 §14.9)."""

    TYPE: ClassVar[int] = 0x0014


@dataclass(frozen=True, slots=True)
class Nonce(_TextAttribute):
    """NONCE (RFC 8489 §14.10)."""

    TYPE: ClassVar[int] = 0x0015


@dataclass(frozen=True, slots=True)
class PasswordAlgorithms(Attribute):
    """PASSWORD-ALGORITHMS (RFC 8489 §14.11): the algorithms a server offers, in order."""

    TYPE: ClassVar[int] = 0x8002
    algorithms: tuple[tuple[int, bytes], ...]

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        items: list[tuple[int, bytes]] = []
        offset = 0
        while offset < len(value):
            if offset + 4 > len(value):
                raise AttributeError_("PASSWORD-ALGORITHMS is truncated")
            algorithm, length = struct.unpack_from("!HH", value, offset)
            params = value[offset + 4 : offset + 4 + length]
            if len(params) != length:
                raise AttributeError_("PASSWORD-ALGORITHMS is truncated")
            items.append((algorithm, bytes(params)))
            offset += 4 + length + (-length % 4)
        return cls(tuple(items))

    def encode(self, transaction_id: bytes) -> bytes:
        out = bytearray()
        for algorithm, params in self.algorithms:
            out += struct.pack("!HH", algorithm, len(params)) + params + bytes(-len(params) % 4)
        return bytes(out)


@dataclass(frozen=True, slots=True)
class PasswordAlgorithm(Attribute):
    """PASSWORD-ALGORITHM (RFC 8489 §14.12): the algorithm the client chose."""

    TYPE: ClassVar[int] = 0x001D
    algorithm: int
    parameters: bytes = b""

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        if len(value) < 4:
            raise AttributeError_("PASSWORD-ALGORITHM is truncated")
        algorithm, length = struct.unpack_from("!HH", value)
        if len(value) < 4 + length:
            raise AttributeError_("PASSWORD-ALGORITHM is truncated")
        return cls(algorithm, bytes(value[4 : 4 + length]))

    def encode(self, transaction_id: bytes) -> bytes:
        params = self.parameters
        return struct.pack("!HH", self.algorithm, len(params)) + params + bytes(-len(params) % 4)


@dataclass(frozen=True, slots=True)
class UnknownAttributes(Attribute):
    """UNKNOWN-ATTRIBUTES (RFC 8489 §14.13): the types that caused a 420."""

    TYPE: ClassVar[int] = 0x000A
    types: tuple[int, ...]

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        if len(value) % 2:
            raise AttributeError_("UNKNOWN-ATTRIBUTES has an odd length")
        return cls(tuple(struct.unpack(f"!{len(value) // 2}H", value)))

    def encode(self, transaction_id: bytes) -> bytes:
        return struct.pack(f"!{len(self.types)}H", *self.types)


@dataclass(frozen=True, slots=True)
class Software(_TextAttribute):
    """SOFTWARE (RFC 8489 §14.14)."""

    TYPE: ClassVar[int] = 0x8022


@dataclass(frozen=True, slots=True)
class AlternateServer(_AddressAttribute):
    """ALTERNATE-SERVER (RFC 8489 §14.15): where to try instead (with 300)."""

    TYPE: ClassVar[int] = 0x8023


@dataclass(frozen=True, slots=True)
class AlternateDomain(_TextAttribute):
    """ALTERNATE-DOMAIN (RFC 8489 §14.16): the name to check the alternate's certificate."""

    TYPE: ClassVar[int] = 0x8003


# --- RFC 8656 (TURN) ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChannelNumber(Attribute):
    """CHANNEL-NUMBER (RFC 8656 §18.1): 0x4000-0x4FFF, then 16 reserved bits."""

    TYPE: ClassVar[int] = 0x000C
    number: int

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        if len(value) != 4:
            raise AttributeError_("CHANNEL-NUMBER must be 4 bytes")
        return cls(int.from_bytes(value[:2], "big"))

    def encode(self, transaction_id: bytes) -> bytes:
        return self.number.to_bytes(2, "big") + b"\x00\x00"


@dataclass(frozen=True, slots=True)
class Lifetime(_Uint32Attribute):
    """LIFETIME (RFC 8656 §18.2): seconds until the allocation expires."""

    TYPE: ClassVar[int] = 0x000D


@dataclass(frozen=True, slots=True)
class XorPeerAddress(_XorAddressAttribute):
    """XOR-PEER-ADDRESS (RFC 8656 §18.3): a peer, as seen from the relay."""

    TYPE: ClassVar[int] = 0x0012


@dataclass(frozen=True, slots=True)
class Data(_BytesAttribute):
    """DATA (RFC 8656 §18.4): the application payload of Send and Data indications."""

    TYPE: ClassVar[int] = 0x0013


@dataclass(frozen=True, slots=True)
class XorRelayedAddress(_XorAddressAttribute):
    """XOR-RELAYED-ADDRESS (RFC 8656 §18.5): the relayed transport address."""

    TYPE: ClassVar[int] = 0x0016


@dataclass(frozen=True, slots=True)
class RequestedAddressFamily(_FamilyAttribute):
    """REQUESTED-ADDRESS-FAMILY (RFC 8656 §18.6): IPv4 (0x01) or IPv6 (0x02) relay."""

    TYPE: ClassVar[int] = 0x0017


@dataclass(frozen=True, slots=True)
class EvenPort(Attribute):
    """EVEN-PORT (RFC 8656 §18.7): an even relay port; R asks to reserve the next one."""

    TYPE: ClassVar[int] = 0x0018
    reserve: bool = False

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        if len(value) != 1:
            raise AttributeError_("EVEN-PORT must be 1 byte")
        return cls(bool(value[0] & 0x80))

    def encode(self, transaction_id: bytes) -> bytes:
        return b"\x80" if self.reserve else b"\x00"


@dataclass(frozen=True, slots=True)
class RequestedTransport(Attribute):
    """REQUESTED-TRANSPORT (RFC 8656 §18.8): IANA protocol number, 17 for UDP."""

    TYPE: ClassVar[int] = 0x0019
    protocol: int

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        if len(value) != 4:
            raise AttributeError_("REQUESTED-TRANSPORT must be 4 bytes")
        return cls(value[0])

    def encode(self, transaction_id: bytes) -> bytes:
        return bytes((self.protocol, 0, 0, 0))


@dataclass(frozen=True, slots=True)
class DontFragment(_FlagAttribute):
    """DONT-FRAGMENT (RFC 8656 §18.9): set DF on the relayed datagrams."""

    TYPE: ClassVar[int] = 0x001A


@dataclass(frozen=True, slots=True)
class ReservationToken(_BytesAttribute):
    """RESERVATION-TOKEN (RFC 8656 §18.10): names a relay port reserved by EVEN-PORT."""

    TYPE: ClassVar[int] = 0x0022
    LENGTH: ClassVar[int | None] = 8


@dataclass(frozen=True, slots=True)
class AdditionalAddressFamily(_FamilyAttribute):
    """ADDITIONAL-ADDRESS-FAMILY (RFC 8656 §18.11): ask for an IPv6 relay besides IPv4."""

    TYPE: ClassVar[int] = 0x8000


@dataclass(frozen=True, slots=True)
class AddressErrorCode(Attribute):
    """ADDRESS-ERROR-CODE (RFC 8656 §18.12): why one family of a dual allocation failed."""

    TYPE: ClassVar[int] = 0x8001
    family: int
    code: int
    reason: str = ""

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        # Same class/number/reason grammar as ERROR-CODE (RFC 8656 §18.12): without the range
        # check a number above 99 would decode to a code that encodes differently.
        code, reason = _decode_error_code(value, "ADDRESS-ERROR-CODE")
        return cls(value[0], code, reason)

    def encode(self, transaction_id: bytes) -> bytes:
        klass, number = divmod(self.code, 100)
        return bytes((self.family, 0, klass, number)) + self.reason.encode("utf-8")


@dataclass(frozen=True, slots=True)
class Icmp(Attribute):
    """ICMP (RFC 8656 §18.13): an ICMP type and code reported by the relay."""

    TYPE: ClassVar[int] = 0x8004
    icmp_type: int
    icmp_code: int
    error_data: int = 0

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        if len(value) != 8:
            raise AttributeError_("ICMP must be 8 bytes")
        return cls(value[2], value[3], int.from_bytes(value[4:8], "big"))

    def encode(self, transaction_id: bytes) -> bytes:
        return bytes((0, 0, self.icmp_type, self.icmp_code)) + self.error_data.to_bytes(4, "big")


# --- RFC 5780 (NAT behaviour discovery) and RFC 3489 ---------------------------------------


@dataclass(frozen=True, slots=True)
class ChangeRequest(Attribute):
    """CHANGE-REQUEST (RFC 5780 §7.2): answer from another IP and/or port."""

    TYPE: ClassVar[int] = 0x0003
    change_ip: bool = False
    change_port: bool = False

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        if len(value) != 4:
            raise AttributeError_("CHANGE-REQUEST must be 4 bytes")
        return cls(bool(value[3] & 0x04), bool(value[3] & 0x02))

    def encode(self, transaction_id: bytes) -> bytes:
        return bytes((0, 0, 0, (0x04 if self.change_ip else 0) | (0x02 if self.change_port else 0)))


@dataclass(frozen=True, slots=True)
class ResponseAddress(_AddressAttribute):
    """RESPONSE-ADDRESS (RFC 3489 §11.2.2): where an old client wants the answer."""

    TYPE: ClassVar[int] = 0x0002


@dataclass(frozen=True, slots=True)
class SourceAddress(_AddressAttribute):
    """SOURCE-ADDRESS (RFC 3489 §11.2.5): superseded by RESPONSE-ORIGIN."""

    TYPE: ClassVar[int] = 0x0004


@dataclass(frozen=True, slots=True)
class ChangedAddress(_AddressAttribute):
    """CHANGED-ADDRESS (RFC 3489 §11.2.3): superseded by OTHER-ADDRESS."""

    TYPE: ClassVar[int] = 0x0005


@dataclass(frozen=True, slots=True)
class Padding(_BytesAttribute):
    """PADDING (RFC 5780 §7.6): makes a response larger to probe fragmentation."""

    TYPE: ClassVar[int] = 0x0026


@dataclass(frozen=True, slots=True)
class ResponsePort(Attribute):
    """RESPONSE-PORT (RFC 5780 §7.5): answer to this port of the client."""

    TYPE: ClassVar[int] = 0x0027
    port: int

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        if len(value) != 4:
            raise AttributeError_("RESPONSE-PORT must be 4 bytes")
        return cls(int.from_bytes(value[:2], "big"))

    def encode(self, transaction_id: bytes) -> bytes:
        return self.port.to_bytes(2, "big") + b"\x00\x00"


@dataclass(frozen=True, slots=True)
class CacheTimeout(_Uint32Attribute):
    """CACHE-TIMEOUT (RFC 5780 §7.7): how long a NAT binding may live, in seconds."""

    TYPE: ClassVar[int] = 0x8027


@dataclass(frozen=True, slots=True)
class ResponseOrigin(_AddressAttribute):
    """RESPONSE-ORIGIN (RFC 5780 §7.3): the address the response was sent from."""

    TYPE: ClassVar[int] = 0x802B


@dataclass(frozen=True, slots=True)
class OtherAddress(_AddressAttribute):
    """OTHER-ADDRESS (RFC 5780 §7.4): the server's alternate IP and port."""

    TYPE: ClassVar[int] = 0x802C


# --- RFC 6062 (TCP relays), RFC 8016 (mobility), RFC 8445 (ICE) ----------------------------


@dataclass(frozen=True, slots=True)
class ConnectionId(_Uint32Attribute):
    """CONNECTION-ID (RFC 6062 §6.2.1): names a peer TCP connection."""

    TYPE: ClassVar[int] = 0x002A


@dataclass(frozen=True, slots=True)
class MobilityTicket(_BytesAttribute):
    """MOBILITY-TICKET (RFC 8016 §3.2): lets an allocation move to a new 5-tuple."""

    TYPE: ClassVar[int] = 0x8030


@dataclass(frozen=True, slots=True)
class Priority(_Uint32Attribute):
    """PRIORITY (RFC 8445 §16.1): a candidate's priority in an ICE check."""

    TYPE: ClassVar[int] = 0x0024


@dataclass(frozen=True, slots=True)
class UseCandidate(_FlagAttribute):
    """USE-CANDIDATE (RFC 8445 §16.1): nominates the pair."""

    TYPE: ClassVar[int] = 0x0025


@dataclass(frozen=True, slots=True)
class IceControlled(_Uint64Attribute):
    """ICE-CONTROLLED (RFC 8445 §16.1): tie-breaker of the controlled agent."""

    TYPE: ClassVar[int] = 0x8029


@dataclass(frozen=True, slots=True)
class IceControlling(_Uint64Attribute):
    """ICE-CONTROLLING (RFC 8445 §16.1): tie-breaker of the controlling agent."""

    TYPE: ClassVar[int] = 0x802A


@dataclass(frozen=True, slots=True)
class UnknownAttribute(Attribute):
    """An attribute this codec does not know; kept verbatim."""

    type: int
    value: bytes

    def encode(self, transaction_id: bytes) -> bytes:
        return self.value


ATTRIBUTE_CLASSES: dict[int, type[Attribute]] = {
    cls.TYPE: cls
    for cls in (
        MappedAddress,
        ResponseAddress,
        ChangeRequest,
        SourceAddress,
        ChangedAddress,
        Username,
        MessageIntegrity,
        ErrorCode,
        UnknownAttributes,
        ChannelNumber,
        Lifetime,
        XorPeerAddress,
        Data,
        Realm,
        Nonce,
        XorRelayedAddress,
        RequestedAddressFamily,
        EvenPort,
        RequestedTransport,
        DontFragment,
        MessageIntegritySha256,
        PasswordAlgorithm,
        Userhash,
        XorMappedAddress,
        ReservationToken,
        Priority,
        UseCandidate,
        Padding,
        ResponsePort,
        ConnectionId,
        AdditionalAddressFamily,
        AddressErrorCode,
        PasswordAlgorithms,
        AlternateDomain,
        Icmp,
        Software,
        AlternateServer,
        CacheTimeout,
        Fingerprint,
        IceControlled,
        IceControlling,
        ResponseOrigin,
        OtherAddress,
        MobilityTicket,
    )
}
"""Every attribute type this codec understands, by wire type."""
