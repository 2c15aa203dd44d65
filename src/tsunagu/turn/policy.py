"""Which peers a relay may talk to: the defence against TURN as an SSRF proxy.

A TURN server relays to any address a client names. Left open, it lets anyone on the
internet reach the server's loopback, its private network and the cloud metadata service
(the CVE-2020-26262 class). By default every non-global range is denied; an operator opens
ranges with ``allowed`` (an enterprise allows its internal network) and closes more with
``denied``. An allowed range wins over a denied one, the default or the operator's.

IPv6 addresses that carry an IPv4 address (IPv4-compatible ``::a.b.c.d``, 6to4 and NAT64)
are denied when the IPv4 address they carry is, so the v6 spelling of a denied v4 address is
denied too. An allowed range opens exactly the addresses it names: allowing ``127.0.0.1``
does not allow ``2002:7f00:1::`` or ``64:ff9b::7f00:1``, which are routed to a 6to4 relay or
a NAT64 gateway, elsewhere. IPv4-mapped addresses (``::ffff:0:0/96``) are not IPv6
destinations at all, and Teredo (``2001::/32``) tunnels through third-party relays: both are
denied by default.

The server's own listening addresses (``own``: IP and port, the UDP/TCP and the TLS port) are
denied as peers too, unless an allowed range covers the IP: relaying to them would make the
server a client of itself, a loop (RFC 8656 §21.2.4 on a peer address that is a TURN server).
Only those ports, not the whole IP: two clients of this server relaying to each other's
relayed addresses (both behind NATs that need TURN: the common case of a call through
TURN) is relaying to the server's own relay IP, and must work. The core also ignores
requests that come from the server's relay ports (:meth:`PeerPolicy.is_own_relay`), which
closes the loop whichever way a packet got there.

Internal networks (``inside``: a company whose media must never leave its own network) turn
the policy around: a peer outside every one of them is denied, whatever else says, and so is
an IPv6 address that carries an internal IPv4 address (it is routed elsewhere). Inside them,
the private ranges (RFC 1918, unique local, carrier-grade NAT, site-local) are no longer
denied by default, since they are what an internal network is made of; loopback, link-local
(the metadata service), multicast and the other special ranges stay denied there unless an
allowed range names them, and so do the operator's denied ranges and the server's own
listening addresses.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, replace

__all__ = ["DEFAULT_DENIED", "PeerPolicy", "inside", "parse_range"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# The ranges denied by default, each with the words a log line names it by.
_DEFAULT_RANGES: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "this network"),  # 0.0.0.0 reaches the local host on Linux
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),  # and the cloud metadata service 169.254.169.254
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),  # and broadcast
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::ffff:0:0/96", "IPv4-mapped"),  # an IPv4 peer spelled as IPv6, never an IPv6 destination
    ("2001::/32", "Teredo"),  # tunnelled through third-party relays
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("100::/64", "discard-only"),
    ("2001:db8::/32", "documentation"),
    ("fc00::/7", "unique local (private)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
)
DEFAULT_DENIED: tuple[str, ...] = tuple(text for text, _ in _DEFAULT_RANGES)
_DEFAULT_LABELS: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, str] = {
    ipaddress.ip_network(text): label for text, label in _DEFAULT_RANGES
}
# The default ranges an internal network is built from: not denied inside internal networks.
_PRIVATE_LABELS = frozenset(
    {"private", "unique local (private)", "carrier-grade NAT", "site-local"}
)


def parse_range(text: str) -> list[IPNetwork]:
    """Parse ``ip``, ``cidr`` or ``ip1-ip2`` (coturn's form) into networks."""
    text = text.strip()
    if "-" in text:
        first_text, last_text = (part.strip() for part in text.split("-", 1))
        first, last = ipaddress.ip_address(first_text), ipaddress.ip_address(last_text)
        if first.version != last.version or int(first) > int(last):
            raise ValueError(f"bad address range {text!r}")
        return list(ipaddress.summarize_address_range(first, last))
    return [ipaddress.ip_network(text, strict=False)]


def inside(ip: str, networks: Iterable[IPNetwork]) -> bool:
    """True when ``ip`` (an IPv4-mapped IPv6 address counts as its IPv4 address; a zone
    index is ignored) lies in one of ``networks``; False for anything that is not an IP."""
    try:
        address = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address.version == net.version and address in net for net in networks)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    packed = address.packed
    if packed[:12] == bytes(12) and int(address) > 1:  # IPv4-compatible ::a.b.c.d
        return ipaddress.IPv4Address(packed[12:])
    if packed[:12] == bytes.fromhex("0064ff9b0000000000000000"):  # NAT64 64:ff9b::/96
        return ipaddress.IPv4Address(packed[12:])
    return None


@dataclass(frozen=True, slots=True)
class PeerPolicy:
    """Decides whether a peer IP may be relayed to. Build with :meth:`create`."""

    allowed: tuple[IPNetwork, ...]
    denied: tuple[IPNetwork, ...]
    own: frozenset[tuple[str, int]] = frozenset()
    """The server's listening addresses (IP, port), denied unless an allowed range has the IP."""
    own_relay: tuple[frozenset[str], int, int] = (frozenset(), 0, -1)
    """The server's relay IPs and its relay port range (``min_port``, ``max_port``)."""
    inside: tuple[IPNetwork, ...] = ()
    """The internal networks: when there are any, a peer outside them is denied."""

    @classmethod
    def create(
        cls,
        allowed: Iterable[str] = (),
        denied: Iterable[str] = (),
        *,
        defaults: bool = True,
        internal: Iterable[str] = (),
    ) -> PeerPolicy:
        networks = tuple(net for text in internal for net in parse_range(text))
        deny = [
            text
            for text, label in _DEFAULT_RANGES
            if defaults and not (networks and label in _PRIVATE_LABELS)
        ]
        return cls(
            allowed=tuple(net for text in allowed for net in parse_range(text)),
            denied=tuple(net for text in (*deny, *denied) for net in parse_range(text)),
            inside=networks,
        )

    def with_ranges(self, allowed: Iterable[IPNetwork], denied: Iterable[IPNetwork]) -> PeerPolicy:
        """This policy with more ranges allowed and denied (a user database's, per realm)."""
        return replace(
            self, allowed=self.allowed + tuple(allowed), denied=self.denied + tuple(denied)
        )

    def _matches(self, address: IPAddress, networks: tuple[IPNetwork, ...]) -> bool:
        return any(address.version == net.version and address in net for net in networks)

    def permits(self, ip: str) -> bool:
        """True when relaying to ``ip`` is allowed."""
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if self.inside and not self._matches(address, self.inside):
            return False
        if self._matches(address, self.allowed):
            return True
        candidates: list[IPAddress] = [address]
        if isinstance(address, ipaddress.IPv6Address):
            embedded = _embedded_ipv4(address)
            if embedded is not None:
                candidates.append(embedded)
        return not any(self._matches(candidate, self.denied) for candidate in candidates)

    def allows_explicitly(self, ip: str) -> bool:
        """True when one of the ``allowed`` ranges has ``ip``."""
        try:
            return self._matches(ipaddress.ip_address(ip), self.allowed)
        except ValueError:
            return False

    def permits_address(self, ip: str, port: int) -> bool:
        """True when relaying to ``ip:port`` is allowed: :meth:`permits` for the IP, and not
        one of the server's own listening addresses (unless an allowed range has the IP)."""
        if not self.permits(ip):
            return False
        return (ip, port) not in self.own or self.allows_explicitly(ip)

    def denial(self, ip: str, port: int) -> str | None:
        """Which rule denies relaying to ``ip:port``, in words for the operator's log (for
        example ``"private range 10.0.0.0/8, denied by default"``); None when allowed.

        Called only for a peer that is refused, so it may take its time.
        """
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return "not an IP address"
        if self.inside and not self._matches(address, self.inside):
            ranges = ", ".join(str(net) for net in self.inside)
            return f"outside the internal networks {ranges} (--internal-network)"
        if self._matches(address, self.allowed):
            return None
        if (ip, port) in self.own:
            return "this server's own listening address"
        candidates: list[IPAddress] = [address]
        if isinstance(address, ipaddress.IPv6Address):
            embedded = _embedded_ipv4(address)
            if embedded is not None:
                candidates.append(embedded)
        for candidate in candidates:
            for net in self.denied:
                if candidate.version == net.version and candidate in net:
                    label = _DEFAULT_LABELS.get(net)
                    words = (
                        f"{label} range {net}, denied by default"
                        if label is not None
                        else f"range {net}, denied by the operator (--denied-peer-ip)"
                    )
                    if candidate is not address:
                        words = f"it carries IPv4 {candidate}: {words}"
                    return words
        return None

    def is_own_relay(self, ip: str, port: int) -> bool:
        """True when ``ip:port`` is (or may be, in another worker) one of this server's relay
        sockets: a request from it is the server talking to itself.

        Only addresses a relay may send to count (``own_relay`` is built that way): one the
        policy denies (loopback, private ranges, by default) cannot be reached from a relay,
        and one the operator allowed explicitly is the operator's choice; a client on the
        server's own host reaching it on such an address is served as any other.
        """
        ips, low, high = self.own_relay
        return low <= port <= high and ip in ips
