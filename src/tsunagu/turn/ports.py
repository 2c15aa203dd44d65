"""Relay ports: which port a relay socket gets, and ports held for EVEN-PORT reservations.

The pool picks ports at random in ``min_port``-``max_port`` (RFC 8656 §7.2 step 7 wants
them unpredictable), skipping ports whose pair number (``port // 2``) belongs to another
worker process (:attr:`~.settings.TurnSettings.port_share`). Binding is the transport's
(:class:`RelayBinder`); a port another program holds is skipped, and after
``_MAX_FAILED_BINDS`` such failures the pool answers 508 rather than scan the whole range.

EVEN-PORT with the R bit (§7.2 step 4, §14.6) also reserves port + 1 and answers with a
RESERVATION-TOKEN that a later Allocate redeems. A single process holds that port bound
and the token is random. Worker processes that share the range (``shared_reservations``)
cannot hand a bound socket to each other, so port + 1 is only set aside and the token is
signed with the secret the workers share: the port, its family, a 16-second timestamp and
a MAC, redeemable by any of them until it lapses.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Protocol

from .allocation import FiveTuple, RelaySocket
from .errors import InsufficientCapacity
from .refusals import NO_RELAY_PORT, RESERVATION_UNKNOWN, Facts, Refusal
from .settings import TurnSettings
from .timers import ExpiryHeap, ReservationExpiry, SetAsideExpiry

__all__ = ["RandomSource", "RelayBinder", "RelayPortPool"]

_MAX_FAILED_BINDS = 32


class RelayBinder(Protocol):
    """Binds and releases relay sockets for the core."""

    def bind(self, ip: str, port: int, *, dont_fragment: bool) -> RelaySocket | None:
        """Bind a UDP relay socket on ``ip:port``; None if that port is taken."""
        ...

    def release(self, relay: RelaySocket) -> None:
        """Close a relay socket the core no longer needs."""
        ...


class RandomSource(Protocol):
    """What the core needs of randomness; :class:`random.SystemRandom` fits."""

    def randrange(self, start: int, stop: int) -> int: ...

    def randbytes(self, n: int) -> bytes: ...


class RelayPortPool:
    """The relay ports this server holds, its reservations and its set-aside ports.

    Reservations and set-aside ports expire through ``timers``; the server hands their
    entries back to :meth:`expire_reservation` and :meth:`expire_set_aside`.
    """

    __slots__ = (
        "_binder",
        "_reservations",
        "_rng",
        "_secret",
        "_set_aside",
        "_settings",
        "_timers",
        "_used",
    )

    def __init__(
        self,
        settings: TurnSettings,
        binder: RelayBinder,
        rng: RandomSource,
        secret: bytes,
        timers: ExpiryHeap,
    ) -> None:
        self._settings = settings
        self._binder = binder
        self._rng = rng
        self._secret = secret
        self._timers = timers
        # Ports in use (bound, held for a reservation or set aside), by relay IP.
        self._used: dict[str, set[int]] = {}
        # Local reservation token -> (held socket on port + 1, expiry).
        self._reservations: dict[bytes, tuple[RelaySocket, float]] = {}
        # Ports set aside for signed reservations (shared_reservations), until they expire.
        self._set_aside: dict[tuple[str, int], float] = {}

    def relay_ip(self, five_tuple: FiveTuple, version: int) -> str | None:
        """The IP to relay from for IP ``version``: configured, else the one reached."""
        settings = self._settings
        explicit = [ip for ip in settings.relay_ips if (":" in ip) == (version == 6)]
        if explicit:
            return explicit[0]
        server_ip = five_tuple.server[0]
        if (":" in server_ip) == (version == 6) and server_ip not in ("0.0.0.0", "::"):
            return server_ip
        for ip in settings.fallback_relay_ips:
            if (":" in ip) == (version == 6):
                return ip
        return None

    def bind(
        self, ip: str, *, even: bool, reserve: bool, dont_fragment: bool, now: float
    ) -> tuple[RelaySocket, bytes | None]:
        """Pick a free port in the range and bind it; with ``reserve`` also hold port + 1.

        Returns the socket and, with ``reserve``, the RESERVATION-TOKEN. Raises 508.
        """
        settings = self._settings
        used = self._used.setdefault(ip, set())
        low, high = settings.min_port, settings.max_port
        span = high - low + 1
        start = self._rng.randrange(0, span)
        failures = 0
        share_index, share_count = settings.port_share
        for step in range(span):
            port = low + (start + step) % span
            if (even and port % 2) or port in used or (port // 2) % share_count != share_index:
                continue
            if reserve and (port + 1 > high or port + 1 in used):
                continue
            bound = self._try(ip, port, reserve=reserve, dont_fragment=dont_fragment, now=now)
            if bound is not None:
                return bound
            failures += 1
            if failures >= _MAX_FAILED_BINDS:
                break
        facts: Facts = (
            ("relay_ip", ip),
            ("range", f"{low}-{high}"),
            ("workers", share_count),
            ("in_use", len(used)),
            ("held_elsewhere", failures),
        )
        if even:
            facts += (("even_port", True),)
        raise InsufficientCapacity(
            "no relay port available", refusal=Refusal(NO_RELAY_PORT, facts=facts)
        )

    def _try(
        self, ip: str, port: int, *, reserve: bool, dont_fragment: bool, now: float
    ) -> tuple[RelaySocket, bytes | None] | None:
        """Bind ``port`` (and reserve port + 1); None, with nothing held, if either is taken."""
        relay = self._binder.bind(ip, port, dont_fragment=dont_fragment)
        if relay is None:
            return None
        self._used[ip].add(port)
        if not reserve:
            return relay, None
        token = self._reserve(ip, port + 1, dont_fragment=dont_fragment, now=now)
        if token is None:
            self.release(relay)
            return None
        return relay, token

    def _reserve(self, ip: str, port: int, *, dont_fragment: bool, now: float) -> bytes | None:
        """Hold or set aside ``port`` for a reservation; its token, or None if it is taken."""
        settings = self._settings
        if settings.shared_reservations:
            # Set aside, not held (another worker may redeem the token), but only if
            # nothing else holds it now.
            probe = self._binder.bind(ip, port, dont_fragment=False)
            if probe is None:
                return None
            self._binder.release(probe)
            expiry = now + settings.reservation_lifetime
            self._used[ip].add(port)
            self._set_aside[(ip, port)] = expiry
            self._timers.schedule(expiry, SetAsideExpiry(ip, port))
            return self._signed_token(ip, port, int(now // 16))
        reserved = self._binder.bind(ip, port, dont_fragment=dont_fragment)
        if reserved is None:
            return None
        self._used[ip].add(port)
        token = self._rng.randbytes(8)
        expiry = now + settings.reservation_lifetime
        self._reservations[token] = (reserved, expiry)
        self._timers.schedule(expiry, ReservationExpiry(token))
        return token

    def _signed_token(self, ip: str, port: int, bucket: int) -> bytes:
        # port | IPv6 flag and a 15-bit count of 16-second periods | MAC over both and the IP
        stamp = (bucket & 0x7FFF) | (0x8000 if ":" in ip else 0)
        head = port.to_bytes(2, "big") + stamp.to_bytes(2, "big")
        mac = hmac.new(self._secret, b"reservation" + ip.encode() + head, hashlib.sha256)
        return head + mac.digest()[:4]

    def redeem(
        self, token: bytes, five_tuple: FiveTuple, *, dont_fragment: bool, now: float
    ) -> RelaySocket:
        """The relay socket a RESERVATION-TOKEN stands for (RFC 8656 §7.2, step 5); or 508."""
        reserved = self._reservations.pop(token, None)
        if reserved is not None:
            return reserved[0]
        if self._settings.shared_reservations:
            stamp = int.from_bytes(token[2:4], "big")
            ip = self.relay_ip(five_tuple, 6 if stamp & 0x8000 else 4)
            port = int.from_bytes(token[:2], "big")
            # The period count wraps after six days; a token is good for its lifetime only.
            age = (int(now // 16) - stamp) & 0x7FFF
            if (
                ip is not None
                and age * 16 <= self._settings.reservation_lifetime + 16
                and hmac.compare_digest(token, self._signed_token(ip, port, stamp))
            ):
                self._set_aside.pop((ip, port), None)
                relay = self._binder.bind(ip, port, dont_fragment=dont_fragment)
                if relay is not None:
                    self._used.setdefault(ip, set()).add(port)
                    return relay
        raise InsufficientCapacity(
            "unknown or expired reservation token", refusal=Refusal(RESERVATION_UNKNOWN)
        )

    def release(self, relay: RelaySocket) -> None:
        """Give a relay socket back: its port is free again."""
        ip, port = relay.address[0], relay.address[1]
        self._used.get(ip, set()).discard(port)
        self._binder.release(relay)

    def expire_reservation(self, token: bytes, now: float) -> None:
        """Release the socket held for ``token`` if its reservation is over."""
        reserved = self._reservations.get(token)
        if reserved is not None and reserved[1] <= now:
            del self._reservations[token]
            self.release(reserved[0])

    def expire_set_aside(self, ip: str, port: int, now: float) -> None:
        """Free ``ip:port`` if it is still set aside and its time is over."""
        expiry = self._set_aside.get((ip, port))
        if expiry is not None and expiry <= now:
            del self._set_aside[(ip, port)]
            self._used.get(ip, set()).discard(port)

    def release_reservations(self) -> None:
        """Release every socket held for a reservation (shutdown)."""
        for relay, _ in self._reservations.values():
            self.release(relay)
        self._reservations.clear()
