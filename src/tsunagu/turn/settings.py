"""The TURN server's settings: limits and behaviour, each with a safe default."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from ..stun.attributes import Address
from .discovery import NatDiscovery
from .policy import PeerPolicy

__all__ = ["RELOADABLE", "TurnSettings"]


@dataclass(frozen=True, slots=True)
class TurnSettings:
    """Limits and behaviour of the server; every one has a safe default."""

    realm: str = "tsunagu"
    relay_ips: tuple[str, ...] = ()
    """Explicit relay IPs; when empty the IP the client reached is used."""
    fallback_relay_ips: tuple[str, ...] = ()
    """Used for a family the client's listener does not have (IPv6 relay asked on IPv4)."""
    external_ips: tuple[tuple[str, str | None], ...] = ()
    """(public, private or None): advertise ``public`` for relays on ``private``."""
    min_port: int = 49152
    max_port: int = 65535
    default_lifetime: int = 600
    max_lifetime: int = 3600
    permission_lifetime: int = 300
    channel_lifetime: int = 600
    nonce_lifetime: int = 600
    reservation_lifetime: int = 30
    response_cache_lifetime: float = 40.0
    user_quota: int | None = None
    """Allocations per user id (:func:`~.quotas.user_id`); None: derived, 0: unlimited."""
    address_quota: int | None = None
    """Allocations per client address (IPv6: per /64); None: derived, 0: unlimited."""
    total_quota: int | None = None
    """Allocations of this worker; None: derived from its relay ports, 0: unlimited.
    :mod:`.quotas` explains the derived defaults."""
    max_bps: int = 0
    """Bytes per second each allocation may relay in each direction (coturn's max-bps);
    0: unlimited. :mod:`.bandwidth` says how it is metered."""
    user_max_bps: int = 0
    """Bytes per second all of a user id's allocations in this worker may relay together,
    in each direction; 0: unlimited."""
    bps_capacity: int = 0
    """Bytes per second this worker may relay in all, in each direction (its share of
    coturn's bps-capacity); 0: unlimited."""
    rest_api_separator: str = ":"
    """What separates the expiry from the user id in a TURN REST username."""
    software: str | None = None
    rfc3489_compat: bool = False
    """Accept RFC 3489 Binding requests (no magic cookie) and add MAPPED-ADDRESS to every
    Binding response."""
    nat_discovery: NatDiscovery | None = None
    """RFC 5780 NAT behaviour discovery: the server's two addresses and two ports
    (:mod:`.discovery`); None: off, and CHANGE-REQUEST gets 420."""
    stun_only: bool = False
    no_stun: bool = False
    alternate_servers: tuple[Address, ...] = ()
    """Where a draining server sends new allocations (300, RFC 8489 §10): each 300 names
    the next one in turn."""
    aux_addresses: frozenset[tuple[str, int]] = frozenset()
    """The aux servers' listening addresses (IP, port). An Allocate that came in on one is
    never redirected to an alternate server, as coturn's aux servers never answer
    ALTERNATE-SERVER: its client may reach that port only (while draining it gets 508)."""
    unauth_rate: float = 200.0
    """Full-size unauthenticated UDP answers per second per source address (burst: twice
    that); beyond it an answer waits until its request has paid for it in bytes
    (:mod:`.unauthenticated`)."""
    security_features: bool = True
    nonce_secret: bytes | None = None
    """Shared by worker processes so that a nonce minted by one is valid at all."""
    port_share: tuple[int, int] = (0, 1)
    """(index, count): this worker relays only from ports whose pair number
    (``port // 2``) is ``index`` modulo ``count``. Workers thus never pick each other's
    ports, and the port after an even one (what EVEN-PORT reserves) stays with its worker."""
    shared_reservations: bool = False
    """Worker processes share the relay range: an EVEN-PORT reservation is then a signed
    token that any worker can redeem, and port + 1 is set aside rather than held bound
    (another worker could not take it over from this one's socket)."""
    strict_channel_numbers: bool = False
    """Accept only RFC 8656's 0x4000-0x4FFF instead of RFC 5766's 0x4000-0x7FFF."""
    policy: PeerPolicy = field(default_factory=PeerPolicy.create)


RELOADABLE: Final = (
    "policy",
    "user_quota",
    "address_quota",
    "total_quota",
    "max_bps",
    "user_max_bps",
    "bps_capacity",
    "alternate_servers",
    "max_lifetime",
    "default_lifetime",
    "permission_lifetime",
    "channel_lifetime",
    "nonce_lifetime",
    "unauth_rate",
)
"""The settings a running server takes from a reload (``TurnServer.reconfigure``); the others
keep what it started with: they name sockets and ports, or state made at start."""
