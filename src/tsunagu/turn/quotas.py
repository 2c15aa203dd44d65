"""Allocation quotas: per user, per client address, in total.

Who a quota counts
------------------
``user_quota`` counts the *user id*, not the whole USERNAME. A TURN REST username is
``<expiry>:<user id>`` (:mod:`tsunagu.auth.rest`); keyed on the whole name, a client that can
mint credentials resets its quota with each new one. :func:`user_id` follows coturn's
``get_real_username`` (``--rest-api-separator``, default ``:``): the part after the
separator when what precedes it is all digits (or empty), the part before it when the
timestamp comes last (``alice:1700000000``), and the whole name when there is no
separator. Static user names cannot contain ``:`` (``--user`` splits at the first one), so
only REST names are affected. Where coturn leaves a name with an empty user id
(``1700000000:``) out of the user quota altogether, the whole username is counted here:
a credential minted without a user id still has a quota, for as long as it is valid.

``address_quota`` counts allocations per client address: the IPv4 address, or the /64 of an
IPv6 one (one subscriber's or one LAN's prefix; counting single IPv6 addresses would let a
host pick a new one per allocation). It is what stops one source from taking the relay
range whatever credentials it holds, including many fresh REST credentials from a web page.

Default numbers (``None`` in :class:`~.settings.TurnSettings`; ``0`` means unlimited)
-------------------------------------------------------------------------------------
A browser makes up to about 3 allocations per peer connection per TURN URL (one per local
interface or address family it gathers on), and the web app hands out 3 URLs (UDP, TCP,
TLS). In an 8-person mesh each person has 7 peer connections: 7 x 3 x 3 = 63 allocations at
the worst. ICE restarts and renegotiation allocate anew before the old ones are deleted, so
``DEFAULT_USER_QUOTA`` is twice that, 128. A whole 8-person room behind one office NAT is
8 x 63 = 504 allocations from one address: ``DEFAULT_ADDRESS_QUOTA`` is 512.

The total is derived from the relay ports this worker owns (its share of
``min_port``-``max_port``, see :mod:`.ports`): every allocation holds at least one port, so
more allocations than ports can never succeed, and the pool would scan the whole range
before answering 508. A margin of ``PORT_MARGIN_FRACTION`` of them is kept for EVEN-PORT
reservations and ports other programs hold. Neither per-source quota
may exceed half of that total, so that with a small range one user or one address still
cannot take it all. The limits are per worker process; a client's allocations are spread
over the workers (the kernel hashes each 4-tuple to one), so the effective limits grow with
the number of workers, as the range does. With several relay addresses each has the whole
range: raise ``total_quota`` explicitly.

Refusals
--------
A quota that refuses an Allocate raises its error with a
:class:`~.refusals.Refusal` naming the quota, the user and the numbers; the server tallies it
(:mod:`.refusals`) and the driver logs it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

__all__ = [
    "DEFAULT_ADDRESS_QUOTA",
    "DEFAULT_USER_QUOTA",
    "PORT_MARGIN_FRACTION",
    "Quotas",
    "address_key",
    "relay_ports_in_share",
    "resolve_quotas",
    "rest_expiry",
    "user_id",
]

DEFAULT_USER_QUOTA = 128
DEFAULT_ADDRESS_QUOTA = 512
PORT_MARGIN_FRACTION = 0.02


def rest_expiry(username: str) -> int | None:
    """Return the expiry (unix seconds) encoded in a REST username, or None if it has none.

    coturn accepts the timestamp before or after the separator; the common form, and the one
    minted here, puts it first.
    """
    head, sep, tail = username.partition(":")
    for part in (head, tail) if sep else (head,):
        # ASCII only: str.isdigit() also accepts digits such as "²" that int() refuses.
        if part.isascii() and part.isdigit():
            return int(part)
    return None


def user_id(username: str, separator: str = ":") -> str:
    """The user a quota counts for ``username`` (coturn's ``get_real_username``)."""
    if not separator:
        return username
    head, sep, tail = username.partition(separator)
    if not sep:
        return username
    if not head or (head.isascii() and head.isdigit()):
        found = tail
    else:
        found = head
    return found or username


def address_key(ip: str) -> str:
    """What limits per client count by, here and in the web and stream listeners: the IPv4
    address (also when written IPv4-mapped), or the /64 of an IPv6 address, since one
    subscriber usually holds a whole /64."""
    try:
        address = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def relay_ports_in_share(min_port: int, max_port: int, share: tuple[int, int]) -> int:
    """How many ports of ``min_port``-``max_port`` belong to worker ``share`` (index, count)."""
    index, count = share
    if count <= 1:
        return max(0, max_port - min_port + 1)
    return sum(1 for port in range(min_port, max_port + 1) if (port // 2) % count == index)


@dataclass(frozen=True, slots=True)
class Quotas:
    """The effective limits of one worker; 0 means unlimited."""

    user: int
    address: int
    total: int


def resolve_quotas(
    user: int | None,
    address: int | None,
    total: int | None,
    *,
    min_port: int,
    max_port: int,
    share: tuple[int, int],
) -> Quotas:
    """Fill in the defaults (``None``) as the module docstring explains."""
    ports = relay_ports_in_share(min_port, max_port, share)
    if total is None:
        margin = int(ports * PORT_MARGIN_FRACTION)
        total = max(1, ports - margin)
    half = max(1, total // 2) if total else 0
    if user is None:
        user = min(DEFAULT_USER_QUOTA, half) if half else DEFAULT_USER_QUOTA
    if address is None:
        address = min(DEFAULT_ADDRESS_QUOTA, half) if half else DEFAULT_ADDRESS_QUOTA
    return Quotas(user=user, address=address, total=total)
