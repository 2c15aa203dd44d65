"""Allocations, their permissions and channels (RFC 8656 §2.2, §9, §12).

An :class:`Allocation` is shared between the core and the transports on purpose: the
transports' per-packet paths read ``permissions``, ``channels`` and ``peer_channels``
directly and bump the plain integer counters, so relaying a packet costs a few dictionary
look-ups and no call into the core. Only the core writes the dictionaries; expired entries
are removed by the server's timer heap, so membership alone means "valid now".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ..stun.attributes import Address

__all__ = ["Allocation", "FiveTuple", "RelaySocket"]


@dataclass(frozen=True, slots=True)
class FiveTuple:
    """Client address, server address and transport: what an allocation is bound to."""

    protocol: str  # "udp", "tcp" or "tls"
    client: Address
    server: Address

    def __str__(self) -> str:
        return f"{self.protocol}:{_format(self.client)}->{_format(self.server)}"


def _format(address: Address) -> str:
    ip, port = address[0], address[1]
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class RelaySocket(Protocol):
    """A bound relay socket, owned by the transport layer. The core only reads ``address``."""

    @property
    def address(self) -> Address: ...


@dataclass(slots=True, eq=False)
class Allocation:
    """One client's relayed transport address(es) and everything hanging off them."""

    five_tuple: FiveTuple
    username: str
    realm: str
    relays: dict[int, RelaySocket]  # by IP version, 4 and/or 6
    relayed_addresses: dict[int, Address]  # as advertised (after external IP mapping)
    created: float
    expiry: float
    allocate_transaction_id: bytes
    allocate_response: bytes
    dont_fragment: bool = False
    # ip -> expiry. The per-packet paths test membership only.
    permissions: dict[str, float] = field(default_factory=dict)
    # channel number -> (relay socket, peer); peer -> channel number; channel -> expiry
    channels: dict[int, tuple[Any, Address]] = field(default_factory=dict)
    peer_channels: dict[Address, int] = field(default_factory=dict)
    channel_expiry: dict[int, float] = field(default_factory=dict)
    peers_seen: set[str] = field(default_factory=set)
    # Plain counters, bumped by the transports' per-packet paths.
    packets_to_peers: int = 0
    bytes_to_peers: int = 0
    packets_to_client: int = 0
    bytes_to_client: int = 0
    dropped: int = 0
    # Opaque handle of the transport serving the client; told when the allocation ends.
    client_link: Any = None
    ended: bool = False
