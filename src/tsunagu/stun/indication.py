"""The Data indication (RFC 8656 §11.4), built without the general encoder.

A relay sends one for every packet a peer sends to a client that has no channel to it, so
it is assembled from precomputed pieces: one struct pack for the header and the peer
attribute's header, the peer address (cached for IPv4, where it is XOR-ed with the magic
cookie alone), the DATA attribute and its padding. The result is byte for byte what
:func:`~.message.encode_message` makes.
"""

from __future__ import annotations

import functools
import struct

from .attributes import Address, Data, XorPeerAddress
from .message import MAGIC_COOKIE

__all__ = ["data_indication"]

_COOKIE = MAGIC_COOKIE.to_bytes(4, "big")
_TLV = struct.Struct("!HH")
_DATA_INDICATION = struct.Struct("!HH4s12sHH")
_PADDING = (b"", b"\x00\x00\x00", b"\x00\x00", b"\x00")


@functools.lru_cache(maxsize=4096)
def _xor_peer_ipv4(ip: str, port: int) -> bytes:
    return XorPeerAddress(ip, port).encode(bytes(12))


def data_indication(transaction_id: bytes, peer: Address, payload: bytes) -> bytes:
    """A Data indication (RFC 8656 §11.4) carrying ``payload`` from ``peer``.

    Raises ValueError when it would not fit in a STUN message.
    """
    ip, port = peer[0], peer[1]
    if ":" in ip:
        peer_value = XorPeerAddress(ip, port).encode(transaction_id)
    else:  # an IPv4 address is XOR-ed with the cookie alone: the same bytes every time
        peer_value = _xor_peer_ipv4(ip, port)
    size = len(payload)
    length = 8 + len(peer_value) + size + (-size & 3)
    if length > 0xFFFF:
        raise ValueError("payload too large for a Data indication")
    header = _DATA_INDICATION.pack(
        0x0017, length, _COOKIE, transaction_id, XorPeerAddress.TYPE, len(peer_value)
    )
    return b"".join((header, peer_value, _TLV.pack(Data.TYPE, size), payload, _PADDING[size & 3]))
