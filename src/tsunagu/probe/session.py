"""One TURN client allocation as a state machine, without I/O.

A :class:`TurnSession` walks through what a WebRTC client does before media flows:

    Allocate (no credentials) -> 401 -> Allocate (long-term credentials)
    -> CreatePermission(peer) -> ChannelBind(peer)          (ChannelBind in channel mode)

and, at the end, Refresh with LIFETIME 0 to release the allocation. The caller sends what
the session returns, feeds it every reply for its transaction, and calls :meth:`poll` when
:attr:`deadline` passes (retransmission over UDP, a time limit over streams). Time is always
an argument; transaction ids come from an injected source of random bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

from . import wire

__all__ = ["Phase", "SessionError", "TurnSession"]

# RFC 8489 §6.2.1 suggests 500 ms doubling; over loopback that is only reached under
# overload, where retransmitting sooner would add load, not information.
_RTO = 0.5
_MAX_TRANSMISSIONS = 5
_STREAM_TIMEOUT = 10.0
_MAX_NONCE_RETRIES = 3


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
        peer: tuple[str, int],
        *,
        channel: int | None,
        random_bytes: Callable[[int], bytes],
        reliable: bool = False,
        fingerprint: bool = True,
        lifetime: int | None = None,
    ) -> None:
        self.username = username
        self.password = password
        self.peer = peer
        self.channel = channel
        self.reliable = reliable
        self.fingerprint = fingerprint
        self.lifetime = lifetime
        self._random_bytes = random_bytes
        self.phase = Phase.ALLOCATE
        self.failed_in: Phase | None = None
        self.error: str | None = None
        self.error_code: int | None = None
        self.relayed: tuple[str, int] | None = None
        self.mapped: tuple[str, int] | None = None
        self.realm: str | None = None
        self.nonce: str | None = None
        self._key: bytes | None = None
        self._txid = b""
        self._request = b""
        self._transmissions = 0
        self._nonce_retries = 0
        self._sent_at = 0.0
        self.deadline: float | None = None
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
        """Refresh with LIFETIME 0: the allocation ends at once (RFC 8656 §7)."""
        if self.phase is not Phase.READY:
            raise SessionError(f"cannot release in phase {self.phase.value}")
        self.phase = Phase.RELEASING
        return self._send(self._request_for_phase(), now)

    @property
    def txid(self) -> bytes:
        """The transaction id of the request in flight."""
        return self._txid

    @property
    def done(self) -> bool:
        return self.phase in (Phase.READY, Phase.RELEASED, Phase.FAILED)

    def poll(self, now: float) -> bytes | None:
        """Called at or after :attr:`deadline`: the retransmission to send, if any."""
        if self.deadline is None or now < self.deadline:
            return None
        if self.reliable or self._transmissions >= _MAX_TRANSMISSIONS:
            self._fail(f"no answer to {self.phase.value} after {now - self._sent_at:.1f} s", now)
            return None
        self._transmissions += 1
        self.retransmissions += 1
        self.deadline = now + _RTO * (1 << (self._transmissions - 1))
        return self._request

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
            if self.relayed is None:
                self._fail("Allocate success without XOR-RELAYED-ADDRESS", now)
                return None
            self.phase = Phase.PERMISSION
        elif phase is Phase.PERMISSION and self.channel is not None:
            self.phase = Phase.CHANNEL
        elif phase in (Phase.PERMISSION, Phase.CHANNEL):
            self.phase = Phase.READY
        elif phase is Phase.RELEASING:
            self.phase = Phase.RELEASED
        if self.done:
            self.deadline = None
            self.finished = now
            return None
        return self._send(self._request_for_phase(), now)

    # --- internals ------------------------------------------------------------------------

    def _fail(self, why: str, now: float) -> None:
        self.failed_in = self.phase
        self.phase = Phase.FAILED
        self.error = why
        self.deadline = None
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
            if self.lifetime is not None:
                attributes.append(wire.attr_lifetime(self.lifetime))
            if self._key is None:
                return wire.encode_request(method, txid, attributes, fingerprint=self.fingerprint)
        elif phase is Phase.PERMISSION:
            method = wire.CREATE_PERMISSION
            attributes = [wire.attr_xor_address(wire.ATTR_XOR_PEER_ADDRESS, *self.peer, txid)]
        elif phase is Phase.CHANNEL:
            assert self.channel is not None
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
        self._request = request
        self._transmissions = 1
        self._sent_at = now
        self.requests += 1
        self.deadline = now + (_STREAM_TIMEOUT if self.reliable else _RTO)
        return request

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
            return self._send(self._request_for_phase(), now)
        if code == 438 and nonce is not None and self._nonce_retries < _MAX_NONCE_RETRIES:
            # Stale nonce: repeat the same step with the new one (RFC 8489 §9.2.5).
            self._nonce_retries += 1
            self.nonce = nonce
            return self._send(self._request_for_phase(), now)
        if self.phase is Phase.RELEASING and code == 437:
            # Already gone (expired, or released by an earlier transmission): released.
            self.phase = Phase.RELEASED
            self.deadline = None
            self.finished = now
            return None
        self.error_code = code
        self._fail(f"{self.phase.value}: error {code} {reply.reason}".rstrip(), now)
        return None
