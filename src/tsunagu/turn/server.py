"""The TURN server state machine (RFC 8656, RFC 6156, RFC 8489 authentication).

Sans-I/O: :meth:`TurnServer.receive` takes the bytes a client sent, the 5-tuple they came on
and the current time, and returns what to do: bytes to send back to that client
(``bytes``), a payload to send from a relay socket to a peer (:class:`Forward`), a Binding
response to send from another of the server's UDP addresses or to another port of the
client (:class:`~.discovery.Reply`, RFC 5780), a user's keys to look up before the request
can be answered (:class:`~.authentication.KeyLookup`: the driver resolves it and hands the
request in again), or nothing.
Events (:class:`~.events.AllocationCreated`, :class:`~.events.AllocationEnded`) queue up for
:meth:`next_event`. Time moves only through ``now`` arguments; the transport arms one
timer at :meth:`get_timer` and calls :meth:`handle_timer`.

Two things are injected because they are I/O the core cannot avoid deciding about: a
:class:`~.authentication.CredentialStore` that answers "what is the key of this user?" and
a :class:`~.ports.RelayBinder` that binds relay sockets on the ports the core picks.
Randomness comes from an injected :class:`~.ports.RandomSource`.

This module is the request pipeline and the method handlers; each other concern has its
own module: :mod:`.authentication` (the long-term credential check), :mod:`.ports` (relay
ports and EVEN-PORT reservations), :mod:`.timers` (the expiry heap), :mod:`.forwarding`
(the ChannelData rule) and :mod:`.allocation` (what the per-packet paths read).

How it works, in order, for a request:

1. Parse strictly; drop anything malformed, or with a wrong FINGERPRINT. ChannelData
   goes to :func:`~.forwarding.channel_data_forward` instead.
2. A retransmission (same 5-tuple and transaction id) gets the cached answer again.
3. Unknown comprehension-required attributes: 420 with UNKNOWN-ATTRIBUTES.
4. Binding is answered without authentication; with NAT behaviour discovery (RFC 5780,
   :mod:`.discovery`) perhaps from another of the server's addresses or to another port
   of the client. Every TURN request goes through the long-term credential mechanism
   (RFC 8489 §9.2): 401 with REALM and NONCE, 438 for a stale nonce. Unauthenticated
   answers over UDP (errors, and RFC 5780 Binding responses) go through
   :class:`~.unauthenticated.UnauthenticatedLimiter`, so the server cannot be used to
   amplify traffic towards a spoofed address, nor a spoofer deny a victim its 401.
5. The method's handler follows the numbered steps of its RFC section.
6. An error answer to Refresh, CreatePermission or ChannelBind on an existing allocation
   is counted in its ``refused``, for the operator. An error raised with a cause
   (:class:`~.refusals.Refusal`: failed authentication, a stale nonce, a denied peer, a
   quota, no relay port) is tallied by cause and client in :attr:`TurnServer.refusals`
   (:class:`~.refusals.RefusalTally`), and so are answers held back by the limiter; the
   driver logs the tally.
"""

from __future__ import annotations

import dataclasses
from array import array
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, assert_never

from ..stun.attributes import (
    FAMILY_IPV4,
    FAMILY_IPV6,
    TRANSPORT_UDP,
    AdditionalAddressFamily,
    Address,
    AddressErrorCode,
    AlternateServer,
    Attribute,
    AttributeError_,
    ChannelNumber,
    Data,
    DontFragment,
    ErrorCode,
    EvenPort,
    Lifetime,
    MappedAddress,
    RequestedAddressFamily,
    RequestedTransport,
    ReservationToken,
    Software,
    UnknownAttributes,
    XorMappedAddress,
    XorPeerAddress,
    XorRelayedAddress,
)
from ..stun.message import (
    Message,
    MessageClass,
    Method,
    StunError,
    encode_message,
    parse_message,
)
from .allocation import Allocation, FiveTuple, RelaySocket
from .authentication import Authenticated, Authenticator, CredentialStore, KeyLookup, KeysNotAtHand
from .bandwidth import MAX_BPS, Limits, new_bucket, retune
from .discovery import Reply, padding_for, route_binding
from .errors import (
    AddressFamilyNotSupported,
    AllocationMismatch,
    AllocationQuotaReached,
    BadRequest,
    Forbidden,
    InsufficientCapacity,
    PeerAddressFamilyMismatch,
    StaleNonce,
    TryAlternate,
    TurnError,
    Unauthorized,
    UnknownAttribute,
    UnsupportedTransportProtocol,
    WrongCredentials,
)
from .events import AllocationCreated, AllocationEnded, Event
from .forwarding import Forward, channel_data_forward
from .nonce import NonceManager
from .policy import PeerPolicy
from .ports import RandomSource, RelayBinder, RelayPortPool
from .quotas import address_key, resolve_quotas, user_id
from .refusals import (
    ADDRESS_QUOTA,
    CREDENTIAL_MISMATCH,
    DRAINING,
    PEER_DENIED,
    TOO_MANY_PERMISSIONS,
    TOTAL_QUOTA,
    UNAUTHENTICATED_WITHHELD,
    USER_QUOTA,
    Refusal,
    RefusalTally,
)
from .revocations import Revocation
from .settings import RELOADABLE, TurnSettings
from .timers import (
    AllocationExpiry,
    ChannelExpiry,
    ExpiryHeap,
    PermissionExpiry,
    ReservationExpiry,
    SetAsideExpiry,
)
from .unauthenticated import UnauthenticatedLimiter

__all__ = [
    "Forward",
    "RandomSource",
    "RelayBinder",
    "Reply",
    "Session",
    "TurnServer",
    "TurnSettings",
]


@dataclasses.dataclass(frozen=True, slots=True)
class Session:
    """What an operator sees of one allocation (``tsunagu sessions``): a copy, plain data.

    The counters are the allocation's own; a per-packet path that counts elsewhere while the
    allocation lasts (the native engine) adds its share at the driver's layer.
    """

    number: int
    username: str
    user: str
    """The user id quotas count (:func:`~.quotas.user_id`)."""
    five_tuple: FiveTuple
    relayed: tuple[tuple[str, int], ...]
    peers: tuple[str, ...]
    """Peer IPs with a permission now."""
    channels: int
    created: float
    expiry: float
    packets_to_peers: int
    bytes_to_peers: int
    packets_to_client: int
    bytes_to_client: int
    dropped: int


_FAMILY_TO_VERSION = {FAMILY_IPV4: 4, FAMILY_IPV6: 6}
_VERSION_TO_FAMILY = {4: FAMILY_IPV4, 6: FAMILY_IPV6}
# RFC 8656 narrowed channels to 0x4000-0x4FFF; RFC 5766 clients still use 0x4000-0x7FFF
# (coturn's turnutils_uclient picks from the whole range, 0x7FFF included, and coturn and
# pion accept it), and refusing them breaks calls for no gain on a TURN server's port.
_CHANNEL_MIN = 0x4000
_CHANNEL_MAX_RFC5766 = 0x7FFF
_MAX_PERMISSIONS = 1000
# Ended allocations after which (or after as many as are live) the expiry heap drops theirs.
_DROP_ENDED_AFTER = 64
_RESPONSE_CACHE_LIMIT = 100_000
# Requests on an existing allocation whose error answers are counted in its ``refused``.
_DIAGNOSED_METHODS: dict[int, str] = {
    Method.REFRESH: "Refresh",
    Method.CREATE_PERMISSION: "CreatePermission",
    Method.CHANNEL_BIND: "ChannelBind",
}


class TurnServer:
    """One TURN server's state: allocations, nonces, quotas, the expiry heap."""

    def __init__(
        self,
        settings: TurnSettings,
        credentials: CredentialStore,
        binder: RelayBinder,
        rng: RandomSource,
    ) -> None:
        self.settings = settings
        secret = settings.nonce_secret or rng.randbytes(32)
        nonces = NonceManager(
            secret, settings.nonce_lifetime, security_features=settings.security_features
        )
        self._nonces = nonces
        self._authenticator = Authenticator(credentials, nonces, settings.realm)
        self.allocations: dict[FiveTuple, Allocation] = {}
        self.quotas = resolve_quotas(
            settings.user_quota,
            settings.address_quota,
            settings.total_quota,
            min_port=settings.min_port,
            max_port=settings.max_port,
            share=settings.port_share,
        )
        """The effective limits (defaults filled in from the relay port range)."""
        self._per_user: Counter[str] = Counter()
        self._per_address: Counter[str] = Counter()
        self.max_bps = settings.max_bps
        """Each new allocation's bandwidth limit (bytes per second each way; 0: none)."""
        self._user_buckets: dict[str, tuple[array[int], array[int]]] = {}
        self._capacity: tuple[array[int], array[int]] | None = None
        if settings.bps_capacity:
            self._capacity = (new_bucket(settings.bps_capacity), new_bucket(settings.bps_capacity))
        self.refusals = RefusalTally()
        """Refusals by cause and client, since the driver last took them."""
        self._timers = ExpiryHeap()
        self._ended_in_timers = 0
        """Allocations ended since the timers last dropped the reminders of ended ones."""
        self._ports = RelayPortPool(settings, binder, rng, secret, self._timers)
        self._events: deque[Event] = deque()
        self._cache: dict[tuple[FiveTuple, bytes], tuple[bytes, float]] = {}
        self.unauthenticated = UnauthenticatedLimiter(settings.unauth_rate)
        self.draining = False
        self._numbered = 0
        self._alternates_given = 0
        self.drops: Counter[str] = Counter()
        """Silent drops by cause; read by the metrics exporter."""
        self.responses: Counter[int] = Counter()
        """Responses sent by code (200 for success)."""
        self.lookups = 0
        """Requests that waited for a key lookup (:class:`KeyLookup`)."""
        self.bindings = 0
        """Binding requests handled here (the native path counts those it answers itself)."""
        self._handlers: dict[int, Callable[[Message, FiveTuple, Authenticated, float], bytes]] = {
            Method.ALLOCATE: self._allocate,
            Method.REFRESH: self._refresh,
            Method.CREATE_PERMISSION: self._create_permission,
            Method.CHANNEL_BIND: self._channel_bind,
        }

    # ------------------------------------------------------------------ public interface

    def receive(
        self, data: bytes, five_tuple: FiveTuple, now: float
    ) -> bytes | Forward | Reply | KeyLookup | None:
        """Handle one STUN message or ChannelData message from a client."""
        if len(data) >= 4 and 0x40 <= data[0] <= 0x7F:
            return channel_data_forward(self.allocations.get(five_tuple), data, self.drops)
        try:
            message = parse_message(data, allow_rfc3489=self.settings.rfc3489_compat)
        except StunError:
            self.drops["malformed"] += 1
            return None
        if message.check_fingerprint() is False:
            self.drops["bad fingerprint"] += 1
            return None
        klass = message.message_class
        if klass is MessageClass.REQUEST:
            return self._request(message, five_tuple, now)
        if klass is MessageClass.INDICATION and message.method == Method.SEND:
            return self._send_indication(message, five_tuple)
        self.drops["unexpected message"] += 1
        return None

    def receive_channel_data(self, data: bytes, five_tuple: FiveTuple) -> Forward | None:
        """ChannelData from a client (RFC 8656 §12.4, §12.6); ``data`` is at least 4 bytes long.

        Listeners that keep their own client -> allocation map call
        :func:`~.forwarding.channel_data_forward` directly.
        """
        return channel_data_forward(self.allocations.get(five_tuple), data, self.drops)

    def connection_closed(self, five_tuple: FiveTuple, now: float) -> None:
        """A TCP/TLS client went away: its allocation dies with the connection."""
        allocation = self.allocations.get(five_tuple)
        if allocation is not None:
            self._end(allocation, "connection closed", now)

    def start_drain(self) -> None:
        """Refuse new allocations (300 to an alternate server, else 508); keep the rest."""
        self.draining = True

    def shutdown(self, now: float) -> None:
        """End every allocation (the drain timed out or the operator insisted)."""
        for allocation in list(self.allocations.values()):
            self._end(allocation, "shutdown", now)
        self._ports.release_reservations()

    def set_quotas(self, user: int | None, total: int | None) -> None:
        """Limit allocations per user id and in all to ``user`` and ``total`` from now on
        (None: the default; a realm's options read from a user database). Allocations
        beyond a lowered quota stay until they end."""
        settings = self.settings
        self.quotas = resolve_quotas(
            user,
            settings.address_quota,
            total,
            min_port=settings.min_port,
            max_port=settings.max_port,
            share=settings.port_share,
        )

    def set_max_bps(self, max_bps: int) -> None:
        """Limit allocations made from now on to ``max_bps`` bytes per second each way (0:
        none; a realm's max-bps read from a user database). Live allocations keep theirs."""
        self.max_bps = max(0, min(max_bps, MAX_BPS))

    def _limits(self, user: str) -> Limits | None:
        """The buckets a new allocation of ``user`` passes through, None without a limit."""
        to_peers: list[array[int]] = []
        to_client: list[array[int]] = []
        if self.max_bps:
            to_peers.append(new_bucket(self.max_bps))
            to_client.append(new_bucket(self.max_bps))
        rate = self.settings.user_max_bps
        if rate:
            shared = self._user_buckets.get(user)
            if shared is None:
                shared = self._user_buckets[user] = (new_bucket(rate), new_bucket(rate))
            to_peers.append(shared[0])
            to_client.append(shared[1])
        if self._capacity is not None:
            to_peers.append(self._capacity[0])
            to_client.append(self._capacity[1])
        if not to_peers:
            return None
        return Limits(tuple(to_peers), tuple(to_client), self.drops)

    def reconfigure(self, settings: TurnSettings) -> None:
        """Take from ``settings`` what a reload changes (:mod:`tsunagu.config_reload`): the
        peer policy, quotas, bandwidth limits, alternate servers, lifetimes, the nonce
        lifetime and the unauthenticated answer rate. A new lifetime counts from the next
        request that sets one (Allocate, Refresh, CreatePermission, ChannelBind), and from
        the next nonce made; what is granted keeps its expiry.

        A new per-allocation limit applies to allocations made from then on; the per-user
        and whole-server buckets are shared, so their new rate reaches live allocations
        too. Removing one of those leaves the live allocations' buckets at the highest rate,
        in effect unlimited, and gives new allocations none.
        """
        self.settings = dataclasses.replace(
            self.settings, **{name: getattr(settings, name) for name in RELOADABLE}
        )
        self._nonces.set_lifetime(settings.nonce_lifetime)
        self.unauthenticated.retune(settings.unauth_rate)
        self.set_quotas(settings.user_quota, settings.total_quota)
        self.set_max_bps(settings.max_bps)
        rate = settings.user_max_bps or MAX_BPS
        for pair in self._user_buckets.values():
            for bucket in pair:
                retune(bucket, rate)
        if not settings.user_max_bps:
            self._user_buckets.clear()
        if self._capacity is not None:
            for bucket in self._capacity:
                retune(bucket, settings.bps_capacity or MAX_BPS)
        if not settings.bps_capacity:
            self._capacity = None
        elif self._capacity is None:
            self._capacity = (new_bucket(settings.bps_capacity), new_bucket(settings.bps_capacity))

    def set_peer_policy(self, policy: PeerPolicy) -> None:
        """Decide peers by ``policy`` from now on (ranges read again from a user database);
        permissions already granted stay until they expire."""
        self.settings = dataclasses.replace(self.settings, policy=policy)

    def end_allocations(self, match: Callable[[Allocation], bool], reason: str, now: float) -> int:
        """End every allocation ``match`` accepts (revoked, killed by the operator); how many."""
        ended = [a for a in self.allocations.values() if match(a)]
        for allocation in ended:
            self._end(allocation, reason, now)
        return len(ended)

    def of_user(self, user: str) -> Callable[[Allocation], bool]:
        """Matches the allocations of ``user``: a user id (a REST username's part after the
        expiry) or a full username."""
        separator = self.settings.rest_api_separator

        def match(allocation: Allocation) -> bool:
            name = allocation.username
            return name == user or user_id(name, separator) == user

        return match

    def sessions(self, match: Callable[[Allocation], bool] | None = None) -> list[Session]:
        """The live allocations ``match`` accepts (all without one), oldest first."""
        separator = self.settings.rest_api_separator
        found = [
            Session(
                number=a.number,
                username=a.username,
                user=user_id(a.username, separator),
                five_tuple=a.five_tuple,
                relayed=tuple(
                    (str(address[0]), int(address[1]))
                    for _, address in sorted(a.relayed_addresses.items())
                ),
                peers=tuple(sorted(a.permissions)),
                channels=len(a.channels),
                created=a.created,
                expiry=a.expiry,
                packets_to_peers=a.packets_to_peers,
                bytes_to_peers=a.bytes_to_peers,
                packets_to_client=a.packets_to_client,
                bytes_to_client=a.bytes_to_client,
                dropped=a.dropped,
            )
            for a in self.allocations.values()
            if match is None or match(a)
        ]
        found.sort(key=lambda session: session.number)
        return found

    def revoke(self, revocation: Revocation, ttl: float, now: float) -> int:
        """End the allocations made with credentials ``revocation`` covers; how many."""
        return self.end_allocations(
            lambda a: revocation.covers(a.username, now, ttl), "revoked", now
        )

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must next be called, or None if nothing expires."""
        return self._timers.next_deadline()

    def handle_timer(self, now: float) -> None:
        """Expire allocations, permissions, channels and reservations that are due."""
        timers = self._timers
        while (entry := timers.pop_due(now)) is not None:
            match entry:
                case AllocationExpiry(allocation):
                    if allocation.ended:
                        continue
                    if allocation.expiry <= now:
                        self._end(allocation, "expired", now)
                    else:
                        timers.schedule(allocation.expiry, entry)
                case PermissionExpiry(allocation, ip):
                    expiry = allocation.permissions.get(ip)
                    if allocation.ended or expiry is None:
                        continue
                    if expiry <= now:
                        del allocation.permissions[ip]
                    else:
                        timers.schedule(expiry, entry)
                case ChannelExpiry(allocation, number):
                    expiry = allocation.channel_expiry.get(number)
                    if allocation.ended or expiry is None:
                        continue
                    if expiry <= now:
                        del allocation.channel_expiry[number]
                        _, peer = allocation.channels.pop(number)
                        allocation.peer_channels.pop(peer, None)
                    else:
                        timers.schedule(expiry, entry)
                case ReservationExpiry(token):
                    self._ports.expire_reservation(token, now)
                case SetAsideExpiry(ip, port):
                    self._ports.expire_set_aside(ip, port, now)
                case _:  # pragma: no cover
                    assert_never(entry)

    # ------------------------------------------------------------------ requests

    def _request(
        self, message: Message, five_tuple: FiveTuple, now: float
    ) -> bytes | Reply | KeyLookup | None:
        client = five_tuple.client
        if self.settings.policy.is_own_relay(client[0], client[1]):
            # One of this server's relay sockets, sent here by a client: not a client itself.
            self.drops["from own relay"] += 1
            return None
        cache_key = (five_tuple, message.transaction_id)
        cached = self._cache.get(cache_key)
        if cached is not None and cached[1] > now:
            return cached[0]
        if message.rfc3489 and message.method != Method.BINDING:
            return None  # RFC 3489 had nothing else
        auth: Authenticated | None = None
        try:
            unknown = message.unknown_required
            if unknown:
                raise UnknownAttribute(attributes=[UnknownAttributes(unknown)])
            if message.method == Method.BINDING:
                self.bindings += 1
                return None if self.settings.no_stun else self._binding(message, five_tuple, now)
            handler = self._handlers.get(message.method)
            if handler is None:
                raise BadRequest("unknown method")
            if self.settings.stun_only:
                raise Forbidden("this server answers STUN only")
            existing = five_tuple in self.allocations and message.method != Method.ALLOCATE
            try:
                auth = self._authenticator.authenticate(
                    message, five_tuple.client[0], now, existing=existing
                )
            except KeysNotAtHand as pending:
                self.lookups += 1
                return pending.lookup
            response: bytes | None = handler(message, five_tuple, auth, now)
            self.responses[200] += 1
        except AttributeError_ as exc:
            response = self._error(message, five_tuple, BadRequest(str(exc)), auth, now)
        except TurnError as exc:
            response = self._error(message, five_tuple, exc, auth, now)
        if response is not None and auth is not None:
            self._remember(cache_key, response, now)
        return response

    def _remember(self, cache_key: tuple[FiveTuple, bytes], response: bytes, now: float) -> None:
        cache = self._cache
        # Insertion order is expiry order: trim expired entries from the front.
        while cache:
            oldest = next(iter(cache))
            if cache[oldest][1] > now and len(cache) < _RESPONSE_CACHE_LIMIT:
                break
            del cache[oldest]
        cache[cache_key] = (response, now + self.settings.response_cache_lifetime)

    def _error(
        self,
        message: Message,
        five_tuple: FiveTuple,
        error: TurnError,
        auth: Authenticated | None,
        now: float,
    ) -> bytes | None:
        refusal = error.refusal
        if refusal is not None:
            # A plain 401 is the first step of every client and has no cause; one for a
            # request that carried credentials is a failure the operator wants to see.
            if not refusal.user and auth is not None:
                refusal = Refusal(refusal.cause, auth.username, refusal.facts)
            self.refusals.add_refusal(refusal, five_tuple.client[0], five_tuple.client[1], now)
        # An authenticated client gets the precise cause, which is what makes a failure
        # debuggable; an unauthenticated one gets the short phrase (no amplification).
        reason = error.reason
        if auth is not None and error.detail:
            reason = f"{error.reason}: {error.detail}"[:127]
        attributes: list[Attribute] = [ErrorCode(error.code, reason), *error.attributes]
        if isinstance(error, Unauthorized | StaleNonce):
            attributes.extend(self._authenticator.challenge(five_tuple.client[0], now))
        answer = self._encode(message, MessageClass.ERROR, attributes, auth)
        # Only UDP answers can be aimed at a spoofed address; over TCP and TLS the handshake
        # proved it, and a client that gets no answer would wait forever.
        if (
            auth is None
            and five_tuple.protocol == "udp"
            and self._withheld(message, five_tuple, len(answer), now)
        ):
            return None
        self.responses[error.code] += 1
        name = _DIAGNOSED_METHODS.get(message.method)
        if name is not None:
            allocation = self.allocations.get(five_tuple)
            if allocation is not None:
                cause = (
                    error.note
                    or (refusal.cause if refusal is not None else None)
                    or error.detail
                    or error.reason.lower()
                )
                allocation.count_refusal(f"{name} {error.code} {cause}"[:127])
        return answer

    def _encode(
        self,
        message: Message,
        klass: MessageClass,
        attributes: list[Attribute],
        auth: Authenticated | None,
    ) -> bytes:
        if self.settings.software is not None and auth is not None:
            attributes.append(Software(self.settings.software))
        return encode_message(
            message.method,
            klass,
            message.transaction_id,
            attributes,
            integrity_key=auth.key if auth is not None and not auth.sha256 else None,
            integrity_sha256_key=auth.key if auth is not None and auth.sha256 else None,
            fingerprint=message.fingerprint_offset is not None,
        )

    def _withheld(
        self,
        message: Message,
        five_tuple: FiveTuple,
        answer_size: int,
        now: float,
        *,
        redirected: bool = False,
    ) -> bool:
        """True (and counted) when an unauthenticated UDP answer must not go out now."""
        if self.unauthenticated.allow(
            five_tuple.client[0],
            five_tuple.client[1],
            message.transaction_id,
            len(message.raw),
            answer_size,
            now,
            redirected=redirected,
        ):
            return False
        self.drops["unauthenticated rate limit"] += 1
        self.refusals.add(UNAUTHENTICATED_WITHHELD, five_tuple.client[0], now)
        return True

    def _binding(self, message: Message, five_tuple: FiveTuple, now: float) -> bytes | Reply | None:
        """Binding (RFC 8489 §6.3.1): tell the client where its request came from.

        Where NAT behaviour discovery runs (RFC 5780 §6.1, :mod:`.discovery`: UDP, on an
        address with an alternate), the response also says where it comes from and where
        the alternate address is, and may leave from that one, go to another port of the
        client, or be padded; it counts against the client's unauthenticated budget.
        """
        settings = self.settings
        ip, port = five_tuple.client[0], five_tuple.client[1]
        route = route_binding(
            message,
            five_tuple.server,
            five_tuple.client,
            settings.nat_discovery,
            five_tuple.protocol == "udp",
            settings.policy,
        )
        attributes: list[Attribute] = []
        if message.rfc3489:
            attributes.append(MappedAddress(ip, port))
        else:
            attributes.append(XorMappedAddress(ip, port))
            # RFC 5780 §6.1 wants both.
            if settings.rfc3489_compat or route is not None:
                attributes.append(MappedAddress(ip, port))
        if route is not None:
            attributes.extend(route.attributes)
        if settings.software is not None:
            attributes.append(Software(settings.software))
        fingerprint = message.fingerprint_offset is not None
        answer = encode_message(
            message.method,
            MessageClass.SUCCESS,
            message.transaction_id,
            attributes,
            fingerprint=fingerprint,
        )
        if route is None:
            self.responses[200] += 1
            return answer
        if route.padding:
            attributes.append(padding_for(len(message.raw), len(answer)))
            answer = encode_message(
                message.method,
                MessageClass.SUCCESS,
                message.transaction_id,
                attributes,
                fingerprint=fingerprint,
            )
        if self._withheld(message, five_tuple, len(answer), now, redirected=route.redirected):
            return None
        self.responses[200] += 1
        if route.source == five_tuple.server and not route.redirected:
            return answer
        return Reply(answer, route.source, route.destination)

    def _allocation_for(self, five_tuple: FiveTuple, auth: Authenticated) -> Allocation:
        allocation = self.allocations.get(five_tuple)
        if allocation is None:
            raise AllocationMismatch("no allocation for this 5-tuple")
        if allocation.username != auth.username:
            raise WrongCredentials(
                refusal=Refusal(
                    CREDENTIAL_MISMATCH, auth.username, (("allocation_user", allocation.username),)
                )
            )
        return allocation

    # ------------------------------------------------------------------ Allocate

    def _allocate(
        self, message: Message, five_tuple: FiveTuple, auth: Authenticated, now: float
    ) -> bytes:
        """Allocate (RFC 8656 §7.2)."""
        settings = self.settings
        # 2. An existing allocation: a retransmission gets the same answer, anything else 437.
        existing = self.allocations.get(five_tuple)
        if existing is not None:
            if existing.allocate_transaction_id == message.transaction_id:
                return existing.allocate_response
            raise AllocationMismatch("an allocation exists for this 5-tuple")
        # 3. REQUESTED-TRANSPORT: UDP only.
        transport = message.get(RequestedTransport)
        if transport is None:
            raise BadRequest("REQUESTED-TRANSPORT is required")
        if transport.protocol != TRANSPORT_UDP:
            raise UnsupportedTransportProtocol()
        dont_fragment = message.has(DontFragment)
        token = message.get(ReservationToken)
        even_port = message.get(EvenPort)
        requested_family = message.get(RequestedAddressFamily)
        additional_family = message.get(AdditionalAddressFamily)
        # 5-7. Attribute combinations the RFC forbids.
        if token is not None and (even_port is not None or requested_family is not None):
            raise BadRequest("RESERVATION-TOKEN excludes EVEN-PORT and REQUESTED-ADDRESS-FAMILY")
        if requested_family is not None and additional_family is not None:
            raise BadRequest("REQUESTED- and ADDITIONAL-ADDRESS-FAMILY are exclusive")
        if requested_family is not None and requested_family.family not in _FAMILY_TO_VERSION:
            raise AddressFamilyNotSupported()
        if additional_family is not None and additional_family.family != FAMILY_IPV6:
            raise BadRequest("ADDITIONAL-ADDRESS-FAMILY must be IPv6")
        # 8. Quotas and draining.
        if self.draining:
            if settings.alternate_servers and five_tuple.server not in settings.aux_addresses:
                ip, port = self._next_alternate()
                raise TryAlternate(attributes=[AlternateServer(ip, port)])
            raise InsufficientCapacity("server is draining", refusal=Refusal(DRAINING))
        quotas = self.quotas
        user = user_id(auth.username, settings.rest_api_separator)
        source = address_key(five_tuple.client[0])
        if quotas.total and len(self.allocations) >= quotas.total:
            raise InsufficientCapacity(
                "total allocation quota reached",
                refusal=Refusal(TOTAL_QUOTA, facts=(("quota", quotas.total),)),
            )
        if quotas.user and self._per_user[user] >= quotas.user:
            raise AllocationQuotaReached(
                "user quota reached",
                refusal=Refusal(USER_QUOTA, facts=(("user_id", user), ("quota", quotas.user))),
            )
        if quotas.address and self._per_address[source] >= quotas.address:
            raise AllocationQuotaReached(
                "address quota reached",
                refusal=Refusal(
                    ADDRESS_QUOTA, facts=(("address", source), ("quota", quotas.address))
                ),
            )

        relays: dict[int, RelaySocket] = {}
        address_error: AddressErrorCode | None = None
        reservation: bytes | None = None
        try:
            if token is not None:
                relay = self._ports.redeem(
                    token.value, five_tuple, dont_fragment=dont_fragment, now=now
                )
                relays[6 if ":" in relay.address[0] else 4] = relay
            else:
                version = 4
                if requested_family is not None:
                    version = _FAMILY_TO_VERSION[requested_family.family]
                relay_ip = self._ports.relay_ip(five_tuple, version)
                if relay_ip is None:
                    raise AddressFamilyNotSupported()
                relay, reservation = self._ports.bind(
                    relay_ip,
                    even=even_port is not None,
                    reserve=even_port is not None and even_port.reserve,
                    dont_fragment=dont_fragment,
                    now=now,
                )
                relays[version] = relay
                if additional_family is not None:
                    ip6 = self._ports.relay_ip(five_tuple, 6)
                    if ip6 is None:
                        address_error = AddressErrorCode(
                            FAMILY_IPV6, 440, "Address Family not Supported"
                        )
                    else:
                        try:
                            relays[6], _ = self._ports.bind(
                                ip6, even=False, reserve=False, dont_fragment=dont_fragment, now=now
                            )
                        except InsufficientCapacity:
                            address_error = AddressErrorCode(
                                FAMILY_IPV6, 508, "Insufficient Capacity"
                            )
        except TurnError:
            for relay in relays.values():
                self._ports.release(relay)
            raise

        lifetime = self._lifetime(message)
        advertised = {version: self._advertise(relay.address) for version, relay in relays.items()}
        attributes: list[Attribute] = [
            XorRelayedAddress(*advertised[version]) for version in sorted(advertised)
        ]
        if address_error is not None:
            attributes.append(address_error)
        attributes.append(Lifetime(lifetime))
        if reservation is not None:
            attributes.append(ReservationToken(reservation))
        attributes.append(XorMappedAddress(five_tuple.client[0], five_tuple.client[1]))
        response = self._encode(message, MessageClass.SUCCESS, attributes, auth)

        allocation = Allocation(
            five_tuple=five_tuple,
            username=auth.username,
            realm=auth.realm,
            relay_sockets=relays,
            relayed_addresses=advertised,
            created=now,
            expiry=now + lifetime,
            allocate_transaction_id=message.transaction_id,
            allocate_response=response,
            dont_fragment=dont_fragment,
            number=self._numbered + 1,
        )
        allocation.limits = self._limits(user)
        self._numbered += 1
        self.allocations[five_tuple] = allocation
        self._per_user[user] += 1
        self._per_address[source] += 1
        self._timers.schedule(allocation.expiry, AllocationExpiry(allocation))
        self._events.append(AllocationCreated(allocation))
        return response

    def _next_alternate(self) -> Address:
        # Round-robin spreads the clients of a draining server over all the others.
        servers = self.settings.alternate_servers
        server = servers[self._alternates_given % len(servers)]
        self._alternates_given += 1
        return server

    def _lifetime(self, message: Message) -> int:
        settings = self.settings
        requested = message.get(Lifetime)
        if requested is None:
            return settings.default_lifetime
        return max(settings.default_lifetime, min(requested.value, settings.max_lifetime))

    def _advertise(self, address: Address) -> Address:
        ip = address[0]
        for public, private in self.settings.external_ips:
            if private == ip or (private is None and (":" in public) == (":" in ip)):
                return (public, address[1])
        return (address[0], address[1])

    # ------------------------------------------------------------------ Refresh

    def _refresh(
        self, message: Message, five_tuple: FiveTuple, auth: Authenticated, now: float
    ) -> bytes:
        """Refresh (RFC 8656 §7.3-7.4): extend the lifetime, or delete with lifetime 0."""
        allocation = self._allocation_for(five_tuple, auth)
        requested_family = message.get(RequestedAddressFamily)
        if requested_family is not None:
            version = _FAMILY_TO_VERSION.get(requested_family.family)
            if version not in allocation.relays:
                raise PeerAddressFamilyMismatch()
        requested = message.get(Lifetime)
        if requested is not None and requested.value == 0:
            lifetime = 0
        else:
            lifetime = self._lifetime(message)
        response = self._encode(message, MessageClass.SUCCESS, [Lifetime(lifetime)], auth)
        if lifetime == 0:
            self._end(allocation, "deleted", now)
        else:
            allocation.expiry = now + lifetime
        return response

    # ------------------------------------------------------------------ permissions, channels

    def _check_peer(self, allocation: Allocation, peer: XorPeerAddress) -> Any:
        """The relay socket for this peer's family, after the policy check (403, 443)."""
        relay = allocation.relays.get(_FAMILY_TO_VERSION.get(peer.family, 0))
        if relay is None:
            raise PeerAddressFamilyMismatch()
        policy = self.settings.policy
        if not policy.permits_address(peer.ip, peer.port):
            rule = policy.denial(peer.ip, peer.port) or "denied"
            address = f"[{peer.ip}]:{peer.port}" if ":" in peer.ip else f"{peer.ip}:{peer.port}"
            raise Forbidden(
                "peer address not allowed",
                note=f"peer {peer.ip} not allowed: {rule}",
                refusal=Refusal(PEER_DENIED, facts=(("peer", address), ("rule", rule))),
            )
        return relay

    def _permit(self, allocation: Allocation, ip: str, now: float) -> None:
        permissions = allocation.permissions
        if ip not in permissions:
            if len(permissions) >= _MAX_PERMISSIONS:
                raise _too_many_permissions()
            self._timers.schedule(
                now + self.settings.permission_lifetime, PermissionExpiry(allocation, ip)
            )
            allocation.peers_seen.add(ip)
        permissions[ip] = now + self.settings.permission_lifetime

    def _create_permission(
        self, message: Message, five_tuple: FiveTuple, auth: Authenticated, now: float
    ) -> bytes:
        """CreatePermission (RFC 8656 §9.2): all peers are installed, or none."""
        allocation = self._allocation_for(five_tuple, auth)
        allocation.permission_requests += 1
        peers = message.get_all(XorPeerAddress)
        if not peers:
            raise BadRequest("XOR-PEER-ADDRESS is required")
        for peer in peers:
            self._check_peer(allocation, peer)
        # Only new IPs count against the limit: refreshing what exists must always work.
        new = {peer.ip for peer in peers} - allocation.permissions.keys()
        if len(allocation.permissions) + len(new) > _MAX_PERMISSIONS:
            raise _too_many_permissions()
        for peer in peers:
            self._permit(allocation, peer.ip, now)
        return self._encode(message, MessageClass.SUCCESS, [], auth)

    def _channel_bind(
        self, message: Message, five_tuple: FiveTuple, auth: Authenticated, now: float
    ) -> bytes:
        """ChannelBind (RFC 8656 §11.2)."""
        allocation = self._allocation_for(five_tuple, auth)
        allocation.permission_requests += 1
        channel = message.get(ChannelNumber)
        peer = message.get(XorPeerAddress)
        if channel is None or peer is None:
            raise BadRequest("CHANNEL-NUMBER and XOR-PEER-ADDRESS are required")
        number = channel.number
        highest = 0x4FFF if self.settings.strict_channel_numbers else _CHANNEL_MAX_RFC5766
        if not _CHANNEL_MIN <= number <= highest:
            raise BadRequest("channel number out of range")
        address = peer.address
        bound = allocation.channels.get(number)
        if bound is not None and bound[1] != address:
            raise BadRequest("channel is bound to another peer")
        other = allocation.peer_channels.get(address)
        if other is not None and other != number:
            raise BadRequest("peer is bound to another channel")
        relay = self._check_peer(allocation, peer)
        self._permit(allocation, peer.ip, now)
        if bound is None:
            allocation.channels[number] = (relay, address)
            allocation.peer_channels[address] = number
            self._timers.schedule(
                now + self.settings.channel_lifetime, ChannelExpiry(allocation, number)
            )
        allocation.channel_expiry[number] = now + self.settings.channel_lifetime
        return self._encode(message, MessageClass.SUCCESS, [], auth)

    def _send_indication(self, message: Message, five_tuple: FiveTuple) -> Forward | None:
        """Send indication (RFC 8656 §10.2): unauthenticated, dropped when not permitted."""
        allocation = self.allocations.get(five_tuple)
        if allocation is None:
            self.drops["no allocation"] += 1
            return None
        if message.unknown_required:  # RFC 8489 §6.3.2: discard the indication
            self.drops["unknown attribute"] += 1
            return None
        try:
            peer = message.get(XorPeerAddress)
            data = message.get(Data)
        except AttributeError_:
            peer = data = None
        if peer is None or data is None:
            self.drops["malformed send"] += 1
            return None
        relay = allocation.relays.get(_FAMILY_TO_VERSION.get(peer.family, 0))
        if relay is None or peer.ip not in allocation.permissions:
            allocation.dropped += 1
            self.drops["no permission"] += 1
            return None
        if peer.address in self.settings.policy.own and not self.settings.policy.permits_address(
            peer.ip, peer.port
        ):
            allocation.dropped += 1
            self.drops["peer denied"] += 1
            return None
        allocation.packets_to_peers += 1
        allocation.bytes_to_peers += len(data.value)
        return Forward(relay, data.value, peer.address)

    # ------------------------------------------------------------------ bookkeeping

    def _end(self, allocation: Allocation, reason: str, now: float) -> None:
        if allocation.ended:
            return
        allocation.ended = True
        del self.allocations[allocation.five_tuple]
        user = user_id(allocation.username, self.settings.rest_api_separator)
        self._per_user[user] -= 1
        if self._per_user[user] <= 0:
            del self._per_user[user]
            self._user_buckets.pop(user, None)
        source = address_key(allocation.five_tuple.client[0])
        self._per_address[source] -= 1
        if self._per_address[source] <= 0:
            del self._per_address[source]
        for relay in allocation.relays.values():
            self._ports.release(relay)
        allocation.permissions.clear()
        allocation.channels.clear()
        allocation.peer_channels.clear()
        self._events.append(AllocationEnded(allocation, reason, now))
        # Its reminders would keep it (relays, buffers) until their deadlines: drop them
        # once as many allocations have ended as are live, a constant cost per allocation.
        self._ended_in_timers += 1
        if self._ended_in_timers >= max(_DROP_ENDED_AFTER, len(self.allocations)):
            self._ended_in_timers = 0
            self._timers.drop_ended()


def _too_many_permissions() -> InsufficientCapacity:
    refusal = Refusal(TOO_MANY_PERMISSIONS, facts=(("permissions", _MAX_PERMISSIONS),))
    return InsufficientCapacity("too many permissions", refusal=refusal)
