"""NAT behaviour discovery (RFC 5780) on the server side: how a Binding is answered, and from
and to where.

A client finds out how its NAT maps and filters by asking the server to answer from its
other IP address and/or port (CHANGE-REQUEST), and learns which those are from every Binding
response (OTHER-ADDRESS, with RESPONSE-ORIGIN saying where the response came from). That
needs a server with two IP addresses of one family, A1 and A2, listening on two ports, P1 and
P2, on each (RFC 5780 §6). :class:`NatDiscovery` holds them; the request received on Da:Dp
(one of the four) is answered from (RFC 5780 §6.1, Table 1):

=====================  ==============  ===========  ===============
CHANGE-REQUEST         source address  source port  OTHER-ADDRESS
=====================  ==============  ===========  ===============
none (or no flag set)  Da              Dp           Ca:Cp
change IP              Ca              Dp           Ca:Cp
change port            Da              Cp           Ca:Cp
change IP and port     Ca              Cp           Ca:Cp
=====================  ==============  ===========  ===============

where Ca is the other IP of the pair and Cp the other port. RESPONSE-PORT sends the response
to another port of the client's IP (RFC 5780 §7.5, for binding lifetime tests), and PADDING
makes it larger (§7.6, for fragmentation tests).

What tsunagu decides where the RFC leaves room:

- **Only over UDP, only on the two addresses of a pair.** A response on a TCP or TLS
  connection cannot come from another address, and an address without a partner has no
  alternate. There, tsunagu answers as a server without RFC 5780 does (§6): plain Binding
  responses, and 420 (Unknown Attribute) naming CHANGE-REQUEST (when it asks for a change;
  an empty one, which some old clients always send, is fine), RESPONSE-PORT and PADDING,
  none of which could be honoured. A client told 420 knows where it stands; one answered 200
  from the same address, as tsunagu did before, concludes that its NAT filters nothing.
- **PADDING makes the response as large as the request, no larger.** §6.1 asks for the
  outgoing interface's MTU, which a client sets its own PADDING to (§5); echoing the
  request's size gives the client the fragmentation test it asked for, and never makes the
  server an amplifier. RESPONSE-PORT with PADDING is refused with 400, as §6.1 requires.
- **RESPONSE-PORT goes to the client's IP only**, never to port 0 nor to one of the server's
  own listening ports or relay ports (400): the server does not talk to itself.
- **Every answer here counts against the unauthenticated budget** of the client's address
  (:class:`~.unauthenticated.UnauthenticatedLimiter`): with MAPPED-ADDRESS,
  RESPONSE-ORIGIN and OTHER-ADDRESS a response is 3.4 times the size of the smallest
  request. One sent to another port (RESPONSE-PORT) is never sent beyond the budget: the
  retransmissions that pay for an answer beyond it come from a port other than the one it
  would go to.
- **RFC 3489 clients** (no magic cookie, accepted with ``rfc3489_compat``) get the RFC 3489
  names of the two attributes, SOURCE-ADDRESS and CHANGED-ADDRESS, as coturn sends them;
  classic NAT type detection (Debian's ``stun`` client) needs CHANGED-ADDRESS.
- Behind a 1:1 NAT the addresses in RESPONSE-ORIGIN and OTHER-ADDRESS are the public ones
  (``advertised``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..stun.attributes import (
    Address,
    Attribute,
    ChangedAddress,
    ChangeRequest,
    OtherAddress,
    Padding,
    ResponseOrigin,
    ResponsePort,
    SourceAddress,
    UnknownAttributes,
)
from ..stun.message import Message
from .errors import BadRequest, UnknownAttribute
from .policy import PeerPolicy

__all__ = ["BindingRoute", "NatDiscovery", "Reply", "padding_for", "route_binding"]

# A PADDING attribute's header.
_ATTRIBUTE_HEADER = 4


@dataclass(frozen=True, slots=True)
class Reply:
    """Send ``data`` over UDP from the server's local address ``source`` to ``destination``.

    What the core returns instead of plain bytes when a Binding response leaves from another
    of the server's addresses (CHANGE-REQUEST) or goes to another port of the client
    (RESPONSE-PORT); plain bytes always go back the way the request came.
    """

    data: bytes
    source: Address
    destination: Address


@dataclass(frozen=True, slots=True)
class NatDiscovery:
    """The server's addresses for RFC 5780: pairs of IPs (one pair per address family at
    most) and the two ports every IP of a pair listens on over UDP."""

    pairs: tuple[tuple[str, str], ...] = ()
    """(primary IP, alternate IP): the two addresses of a family, A1 and A2."""
    ports: tuple[int, int] = (3478, 3479)
    """(primary port, alternate port): P1 and P2."""
    advertised: tuple[tuple[str, str], ...] = ()
    """(private IP, public IP): what to put in RESPONSE-ORIGIN and OTHER-ADDRESS behind a 1:1
    NAT; an IP not listed is advertised as it is."""

    def other(self, local: Address) -> Address | None:
        """Ca:Cp for a request received on ``local`` (Da:Dp), or None when ``local`` is not
        one of the pairs' addresses: no alternate, so no RFC 5780 there."""
        ip, port = local[0], local[1]
        first, second = self.ports
        if port == first:
            other_port = second
        elif port == second:
            other_port = first
        else:
            return None
        for a1, a2 in self.pairs:
            if ip == a1:
                return (a2, other_port)
            if ip == a2:
                return (a1, other_port)
        return None

    def public(self, address: Address) -> Address:
        """``address`` as the world sees it."""
        for private, public in self.advertised:
            if private == address[0]:
                return (public, address[1])
        return address


@dataclass(frozen=True, slots=True)
class BindingRoute:
    """Where a Binding response goes and what RFC 5780 adds to it."""

    source: Address
    destination: Address
    attributes: tuple[Attribute, ...]
    """RESPONSE-ORIGIN and OTHER-ADDRESS (SOURCE-ADDRESS and CHANGED-ADDRESS for RFC 3489)."""
    padding: bool
    redirected: bool
    """The response goes to another port than the request came from (RESPONSE-PORT)."""


def route_binding(
    message: Message,
    local: Address,
    client: Address,
    discovery: NatDiscovery | None,
    udp: bool,
    policy: PeerPolicy,
) -> BindingRoute | None:
    """The route of the response to Binding ``message``, received on ``local`` from
    ``client``: None for a plain response (no RFC 5780 here), else a :class:`BindingRoute`.

    Raises :class:`~.errors.UnknownAttribute` (420) for RFC 5780 request attributes where
    they cannot be honoured, :class:`~.errors.BadRequest` (400) for a request RFC 5780
    forbids, and :class:`~tsunagu.stun.attributes.AttributeError_` for a malformed one.
    """
    change = message.get(ChangeRequest)
    response_port = message.get(ResponsePort)
    padding = message.has(Padding)
    change_ip = change is not None and change.change_ip
    change_port = change is not None and change.change_port
    other = discovery.other(local) if discovery is not None and udp else None
    if other is None:
        # A server without an alternate address here (RFC 5780 §6).
        unknown = [
            kind
            for kind, present in (
                (ChangeRequest.TYPE, change_ip or change_port),
                (ResponsePort.TYPE, response_port is not None),
                (Padding.TYPE, padding),
            )
            if present
        ]
        if unknown:
            raise UnknownAttribute(attributes=[UnknownAttributes(tuple(unknown))])
        return None
    assert discovery is not None
    # RFC 5780 §6.1 and §7.5: never both.
    if padding and response_port is not None:
        raise BadRequest("PADDING and RESPONSE-PORT together")
    destination = client
    if response_port is not None:
        port = response_port.port
        if port == 0:
            raise BadRequest("RESPONSE-PORT 0")
        ip = client[0]
        if (ip, port) in policy.own or policy.is_own_relay(ip, port):
            raise BadRequest("RESPONSE-PORT names a port of this server")
        destination = (ip, port)
    # Table 1 of RFC 5780 §6.1.
    source = (other[0] if change_ip else local[0], other[1] if change_port else local[1])
    origin, alternate = discovery.public(source), discovery.public(other)
    attributes: tuple[Attribute, ...]
    if message.rfc3489:
        attributes = (SourceAddress(*origin), ChangedAddress(*alternate))
    else:
        attributes = (ResponseOrigin(*origin), OtherAddress(*alternate))
    return BindingRoute(source, destination, attributes, padding, redirected=destination != client)


def padding_for(request_size: int, response_size: int) -> Padding:
    """PADDING that makes a response of ``response_size`` bytes (FINGERPRINT included) as
    large as the request, as far as 4-byte steps allow; empty when it is already larger."""
    room = request_size - response_size - _ATTRIBUTE_HEADER
    return Padding(bytes(max(0, room) & ~3))
