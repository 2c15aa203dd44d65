"""Allocations, their permissions and channels (RFC 8656 §2.2, §9, §12).

An :class:`Allocation` is shared between the core and the transports on purpose: what the
per-packet paths need is its :class:`ForwardingState`, read in place, so relaying a packet
costs a few dictionary look-ups and no call into the core.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field
from typing import Any, Protocol

from ..stun.attributes import Address
from .bandwidth import Limits

__all__ = ["MAX_REFUSAL_CAUSES", "Allocation", "FiveTuple", "ForwardingState", "RelaySocket"]

MAX_REFUSAL_CAUSES = 16


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
class ForwardingState:
    """What the per-packet paths read and count: the contract between the core and them.

    These attributes are read by name by the Python per-packet paths (the listeners, the
    relay sockets, :func:`~.forwarding.channel_data_forward`) and by the C extension
    ``tsunagu.transport._fastpath``, which looks up ``relays``, ``permissions``,
    ``channels`` and ``peer_channels`` with ``PyObject_GetAttr`` and keeps references to
    the dictionaries it got. Hence:

    * The dictionaries are made with the allocation and never rebound: the core mutates
      them in place (``clear()`` when the allocation ends), so a reference taken once stays
      the live one. Only the core writes them.
    * Membership alone means "valid now". Deadlines are kept elsewhere (the values of
      ``permissions``, the allocation's ``channel_expiry``) and the core's expiry heap
      removes what is due; no reader compares times.
    * The counters are plain ints that the transports bump: packets and bytes relayed
      towards the peers and towards the client, and packets ``dropped`` on the way (no
      permission, unbound channel, short ChannelData, a send that failed, a bandwidth
      limit), of which ``bandwidth_dropped`` over a bandwidth limit.
    * ``limits`` is None (no bandwidth limit: the per-packet paths test only that) or the
      :class:`~.bandwidth.Limits` the core gave the allocation before any transport saw it,
      never rebound: the C path keeps the buckets it found when the allocation was handed
      to a relay socket, and refills and spends them with :func:`~.bandwidth.admit`'s
      arithmetic. The transports pass the monotonic clock in nanoseconds.
    """

    relays: dict[int, RelaySocket] = field(default_factory=dict, init=False)
    """Relay socket by IP version (4 and/or 6), fixed for the allocation's life."""
    permissions: dict[str, float] = field(default_factory=dict, init=False)
    """Peer IP -> expiry (RFC 8656 §9)."""
    channels: dict[int, tuple[Any, Address]] = field(default_factory=dict, init=False)
    """Channel number -> (relay socket, peer address) (RFC 8656 §12)."""
    peer_channels: dict[Address, int] = field(default_factory=dict, init=False)
    """Peer address -> channel number: ``channels`` the other way, changed with it."""
    packets_to_peers: int = field(default=0, init=False)
    bytes_to_peers: int = field(default=0, init=False)
    packets_to_client: int = field(default=0, init=False)
    bytes_to_client: int = field(default=0, init=False)
    dropped: int = field(default=0, init=False)
    bandwidth_dropped: int = field(default=0, init=False)
    limits: Limits | None = field(default=None, init=False)


@dataclass(slots=True, eq=False)
class Allocation(ForwardingState):
    """One client's relayed transport address(es) and everything hanging off them.

    ``relay_sockets`` fills :attr:`ForwardingState.relays`; the other fields are the core's
    own bookkeeping.
    """

    five_tuple: FiveTuple
    username: str
    realm: str
    relay_sockets: InitVar[dict[int, RelaySocket]]
    relayed_addresses: dict[int, Address]  # as advertised (after external IP mapping)
    created: float
    expiry: float
    allocate_transaction_id: bytes
    allocate_response: bytes
    dont_fragment: bool = False
    number: int = 0
    """This worker's serial number of the allocation, 1 up: with the worker's index, the
    session id operators name it by (``tsunagu sessions``, ``tsunagu kill``)."""
    # channel number -> expiry, for the channels in ``channels``
    channel_expiry: dict[int, float] = field(default_factory=dict)
    peers_seen: set[str] = field(default_factory=set)
    # Opaque handle of the transport serving the client; told when the allocation ends.
    client_link: Any = None
    ended: bool = False
    # Why a client may never have got a permission, for the operator's log.
    permission_requests: int = 0
    """Authenticated CreatePermission and ChannelBind requests that reached their handler."""
    refused: dict[str, int] = field(default_factory=dict)
    """Error answers to Refresh, CreatePermission and ChannelBind on this allocation's
    5-tuple, by "<method> <code> <cause>" (e.g. ``"ChannelBind 438 stale nonce"``). Every
    error answer counts, the 401 that only hands out a first nonce too; an answer withheld
    by the rate limit does not. At most ``MAX_REFUSAL_CAUSES`` causes, then ``"other"``."""

    def __post_init__(self, relay_sockets: dict[int, RelaySocket]) -> None:
        self.relays.update(relay_sockets)

    def count_refusal(self, cause: str) -> None:
        """Count an error answer in :attr:`refused`; memory stays bounded."""
        refused = self.refused
        if cause not in refused and len(refused) >= MAX_REFUSAL_CAUSES:
            cause = "other"
        refused[cause] = refused.get(cause, 0) + 1
