"""Client transactions and one TURN client allocation as state machines, without I/O.

A :class:`TurnSession` walks through what a WebRTC client does before media flows:

    Allocate (no credentials) -> 401 -> Allocate (long-term credentials)
    -> CreatePermission(peer) -> ChannelBind(peer)          (ChannelBind in channel mode)

and, at the end, Refresh with LIFETIME 0 to release the allocation. The caller sends what
the session returns, feeds it every reply for its transaction, and calls :meth:`poll` when
:attr:`deadline` passes (retransmission over UDP, a time limit over streams). Time is always
an argument; transaction ids come from an injected source of random bytes.

A session made without a peer stops after the Allocate, waiting in the permission phase
until :meth:`TurnSession.permit` names one: ``tsunagu probe turn`` needs both of its
allocations before either knows the other's relayed address.

When to send a request again and when to give up is :class:`Retransmitter`'s, shared with
the plain Binding transaction of ``tsunagu probe stun``.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

from . import wire

__all__ = ["Phase", "Retransmitter", "SessionError", "TurnSession"]

# RFC 8489 §6.2.1 suggests 500 ms doubling; over loopback that is only reached under
# overload, where retransmitting sooner would add load, not information.
_RTO = 0.5
_MAX_TRANSMISSIONS = 5
_STREAM_TIMEOUT = 10.0
_MAX_NONCE_RETRIES = 3


class Retransmitter:
    """When to send a request again, and when to stop waiting (RFC 8489 §6.2.1).

    Over UDP a request goes out again after ``rto`` seconds, doubling, up to
    ``max_transmissions`` times in all; over a stream it goes once and the wait is
    ``stream_timeout``. ``timeout``, if given, bounds the whole wait from the first
    transmission in either case: a diagnostic wants "no answer in 3 s", not the 7.5 s the
    RFC's schedule takes to give up.
    """

    def __init__(
        self,
        *,
        reliable: bool,
        rto: float = _RTO,
        max_transmissions: int = _MAX_TRANSMISSIONS,
        stream_timeout: float = _STREAM_TIMEOUT,
        timeout: float | None = None,
    ) -> None:
        self.reliable = reliable
        self.rto = rto
        self.max_transmissions = max_transmissions
        self.stream_timeout = stream_timeout
        self.timeout = timeout
        self.request = b""
        self.transmissions = 0
        self.sent_at = 0.0
        self.deadline: float | None = None
        #: Set when :meth:`poll` gave up: seconds since the first transmission.
        self.gave_up_after: float | None = None

    def start(self, request: bytes, now: float) -> bytes:
        """A new request: sent now, and the clock for its retransmissions starts."""
        self.request = request
        self.transmissions = 1
        self.sent_at = now
        self.gave_up_after = None
        self.deadline = self._limit(now + (self.stream_timeout if self.reliable else self.rto))
        return request

    def stop(self) -> None:
        """The answer came (or the caller lost interest): nothing more to send."""
        self.deadline = None

    def poll(self, now: float) -> bytes | None:
        """At or after :attr:`deadline`: the retransmission to send, or None.

        After the last one, :attr:`deadline` is None and :attr:`gave_up_after` says when.
        """
        if self.deadline is None or now < self.deadline:
            return None
        over = self.timeout is not None and now >= self.sent_at + self.timeout
        if over or self.reliable or self.transmissions >= self.max_transmissions:
            self.deadline = None
            self.gave_up_after = now - self.sent_at
            return None
        self.transmissions += 1
        self.deadline = self._limit(now + self.rto * (1 << (self.transmissions - 1)))
        return self.request

    def _limit(self, deadline: float) -> float:
        if self.timeout is None:
            return deadline
        return min(deadline, self.sent_at + self.timeout)


class SessionError(RuntimeError):
    """Why a session could not reach the phase it was driven to."""


class Phase(Enum):
    ALLOCATE = "allocate"
    PERMISSION = "permission"
    CHANNEL = "channel-bind"
    READY = "ready"
    RELEASING = "releasing"
    RELEASED = "released"
    FAILED = "failed"


class TurnSession:
    """Drive one allocation from the first Allocate to ready, and release it."""

    def __init__(
        self,
        username: str,
        password: str,
        peer: tuple[str, int] | None,
        *,
        channel: int | None,
        random_bytes: Callable[[int], bytes],
        reliable: bool = False,
        fingerprint: bool = True,
        lifetime: int | None = None,
        timeout: float | None = None,
        family: int | None = None,
    ) -> None:
        self.username = username
        self.password = password
        self.peer = peer
        self.channel = channel
        self.reliable = reliable
        self.fingerprint = fingerprint
        self.lifetime = lifetime
        #: REQUESTED-ADDRESS-FAMILY of the Allocate (2: an IPv6 relayed address); None: IPv4.
        self.family = family
        self._random_bytes = random_bytes
        self.phase = Phase.ALLOCATE
        self.failed_in: Phase | None = None
        self.error: str | None = None
        self.error_code: int | None = None
        self.error_reason = ""
        #: True when the session failed because no answer came in time.
        self.timed_out = False
        #: True once the server has challenged us (401 with REALM and NONCE) and the
        #: requests carry MESSAGE-INTEGRITY: a 401 after that means wrong credentials.
        self.authenticated = False
        self.lifetime_granted: int | None = None
        self.relayed: tuple[str, int] | None = None
        self.mapped: tuple[str, int] | None = None
        self.realm: str | None = None
        self.nonce: str | None = None
        self._key: bytes | None = None
        self._txid = b""
        self._nonce_retries = 0
        self._retransmit = Retransmitter(reliable=reliable, timeout=timeout)
        self.started: float | None = None
        self.finished: float | None = None
        self.retransmissions = 0
        self.requests = 0

    # --- what the caller drives ---------------------------------------------------------

    def start(self, now: float) -> bytes:
        """The first request: an Allocate without credentials, expecting a 401."""
        if self.started is not None:
            raise SessionError("already started")
        self.started = now
        return self._send(self._request_for_phase(), now)

    def release(self, now: float) -> bytes:
        """Refresh with LIFETIME 0: the allocation ends at once (RFC 8656 §7).

        Any allocation the server granted can be released, also one whose later steps
        failed (a diagnostic cleans up after a refused permission).
        """
        if self.relayed is None or self.phase in (Phase.RELEASING, Phase.RELEASED):
            raise SessionError(f"cannot release in phase {self.phase.value}")
        self.phase = Phase.RELEASING
        return self._send(self._request_for_phase(), now)

    def permit(self, peer: tuple[str, int], now: float) -> bytes:
        """Name the peer of a session made without one; the CreatePermission to send."""
        if not self.waiting:
            raise SessionError(f"not waiting for a peer in phase {self.phase.value}")
        self.peer = peer
        return self._send(self._request_for_phase(), now)

    @property
    def waiting(self) -> bool:
        """Allocated, and waiting for :meth:`permit` to name the peer."""
        return self.phase is Phase.PERMISSION and self.peer is None

    @property
    def deadline(self) -> float | None:
        """When :meth:`poll` is due: a retransmission, or the end of the wait."""
        return self._retransmit.deadline

    @property
    def txid(self) -> bytes:
        """The transaction id of the request in flight."""
        return self._txid

    @property
    def done(self) -> bool:
        return self.phase in (Phase.READY, Phase.RELEASED, Phase.FAILED)

    def poll(self, now: float) -> bytes | None:
        """Called at or after :attr:`deadline`: the retransmission to send, if any."""
        if self.done:
            return None
        again = self._retransmit.poll(now)
        if again is not None:
            self.retransmissions += 1
            return again
        waited = self._retransmit.gave_up_after
        if waited is not None:
            self.timed_out = True
            self._fail(f"no answer to {self.phase.value} after {waited:.1f} s", now)
        return None

    def receive(self, reply: wire.StunReply, now: float) -> bytes | None:
        """Take a reply; return the next request to send, or None."""
        if reply.txid != self._txid or self.done or reply.klass == wire.CLASS_REQUEST:
            return None
        if reply.klass == wire.CLASS_ERROR:
            return self._on_error(reply, now)
        if reply.klass != wire.CLASS_SUCCESS:
            return None
        phase = self.phase
        if phase is Phase.ALLOCATE:
            self.relayed = reply.address(wire.ATTR_XOR_RELAYED_ADDRESS)
            self.mapped = reply.address(wire.ATTR_XOR_MAPPED_ADDRESS)
            lifetime = reply.attributes.get(wire.ATTR_LIFETIME)
            if lifetime is not None and len(lifetime) == 4:
                self.lifetime_granted = int.from_bytes(lifetime, "big")
            if self.relayed is None:
                self._fail("Allocate success without XOR-RELAYED-ADDRESS", now)
                return None
            self.phase = Phase.PERMISSION
            if self.peer is None:
                self._retransmit.stop()
                return None
        elif phase is Phase.PERMISSION and self.channel is not None:
            self.phase = Phase.CHANNEL
        elif phase in (Phase.PERMISSION, Phase.CHANNEL):
            self.phase = Phase.READY
        elif phase is Phase.RELEASING:
            self.phase = Phase.RELEASED
        if self.done:
            self._retransmit.stop()
            self.finished = now
            return None
        return self._send(self._request_for_phase(), now)

    # --- internals ------------------------------------------------------------------------

    def _fail(self, why: str, now: float) -> None:
        self.failed_in = self.phase
        self.phase = Phase.FAILED
        self.error = why
        self._retransmit.stop()
        self.finished = now

    def _next_txid(self) -> bytes:
        self._txid = self._random_bytes(12)
        return self._txid

    def _request_for_phase(self) -> bytes:
        """The (authenticated) request that moves the current phase on."""
        txid = self._next_txid()
        phase = self.phase
        attributes: list[tuple[int, bytes]]
        if phase is Phase.ALLOCATE:
            method = wire.ALLOCATE
            attributes = [wire.attr_requested_transport()]
            if self.family is not None:
                attributes.append(wire.attr_requested_address_family(self.family))
            if self.lifetime is not None:
                attributes.append(wire.attr_lifetime(self.lifetime))
            if self._key is None:
                return wire.encode_request(method, txid, attributes, fingerprint=self.fingerprint)
        elif phase is Phase.PERMISSION:
            assert self.peer is not None
            method = wire.CREATE_PERMISSION
            attributes = [wire.attr_xor_address(wire.ATTR_XOR_PEER_ADDRESS, *self.peer, txid)]
        elif phase is Phase.CHANNEL:
            assert self.channel is not None and self.peer is not None
            method = wire.CHANNEL_BIND
            attributes = [
                wire.attr_channel_number(self.channel),
                wire.attr_xor_address(wire.ATTR_XOR_PEER_ADDRESS, *self.peer, txid),
            ]
        elif phase is Phase.RELEASING:
            method = wire.REFRESH
            attributes = [wire.attr_lifetime(0)]
        else:
            raise SessionError(f"nothing to send in phase {phase.value}")
        assert self._key is not None and self.realm is not None and self.nonce is not None
        credentials = (self.username, self.realm, self.nonce, self._key)
        return wire.encode_request(
            method, txid, attributes, credentials=credentials, fingerprint=self.fingerprint
        )

    def _send(self, request: bytes, now: float) -> bytes:
        self.requests += 1
        return self._retransmit.start(request, now)

    def _on_error(self, reply: wire.StunReply, now: float) -> bytes | None:
        code = reply.error_code
        realm = reply.text(wire.ATTR_REALM)
        nonce = reply.text(wire.ATTR_NONCE)
        if code == 401 and self._key is None and self.phase is Phase.ALLOCATE:
            if realm is None or nonce is None:
                self._fail("401 without REALM and NONCE", now)
                return None
            self.realm, self.nonce = realm, nonce
            self._key = wire.long_term_key(self.username, realm, self.password)
            self.authenticated = True
            return self._send(self._request_for_phase(), now)
        if code == 438 and nonce is not None and self._nonce_retries < _MAX_NONCE_RETRIES:
            # Stale nonce: repeat the same step with the new one (RFC 8489 §9.2.5).
            self._nonce_retries += 1
            self.nonce = nonce
            return self._send(self._request_for_phase(), now)
        if self.phase is Phase.RELEASING and code == 437:
            # Already gone (expired, or released by an earlier transmission): released.
            self.phase = Phase.RELEASED
            self._retransmit.stop()
            self.finished = now
            return None
        self.error_code = code
        self.error_reason = reply.reason
        self._fail(f"{self.phase.value}: error {code} {reply.reason}".rstrip(), now)
        return None
