"""STUN/TURN listeners: UDP datagrams and TCP/TLS streams from clients.

Each listener feeds the core and performs what it returns: answer bytes go back the way the
request came; a :class:`~tsunagu.turn.Reply` (an RFC 5780 Binding response from another of
the server's addresses, or to another port of the client) goes out through the UDP
listener of this worker bound to its source address (:attr:`CoreDriver.udp_listeners`:
every worker binds all of them). The one exception is
ChannelData, the hot path: the listener finds the allocation itself and applies the core's
rule, :func:`~tsunagu.turn.forwarding.channel_data_forward`, without a call through the
core (see :mod:`tsunagu.turn.allocation`).

What differs between the relay engines (who reads a UDP socket, who frames a stream, who
pads frames to a stream client) is carried by the objects the engine makes: the listener
:class:`~.engine.RelayEngine` built, its relay endpoints and its stream framer. Nothing here
asks which engine runs.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from ..stun.framing import FramingError, StreamFramer
from ..turn.allocation import Allocation, FiveTuple
from ..turn.authentication import KeyLookup
from ..turn.discovery import Reply
from ..turn.forwarding import Forward, channel_data_forward, send_failed, within_limit
from ..turn.refusals import RefusalTally
from ..turn.server import TurnServer
from .failures import NOT_STUN, not_stun
from .relay import RelayEndpointLike

__all__ = [
    "DEFAULT_STREAM_LIMITS",
    "ClientSide",
    "CoreDriver",
    "FrameHandler",
    "PythonStreamFramer",
    "StreamConnection",
    "StreamFramerLike",
    "StreamLimits",
    "UdpListener",
]

log = logging.getLogger("tsunagu.transport")

_READ_BUFFER = memoryview(bytearray(256 * 1024))
# The bandwidth limits' clock (turn/bandwidth.py): read only for an allocation with limits.
_monotonic_ns = time.monotonic_ns
_PADDING = (b"", b"\x00\x00\x00", b"\x00\x00", b"\x00")


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """What one TCP/TLS client may cost: buffered bytes and time.

    Above ``high_water`` bytes unsent (asyncio's write buffer limits; for TLS the TLS
    layer's buffers) the client is not reading what it is sent: reading from it pauses, so
    it gets no further answers to pile up, and what its peers send it is dropped, as a
    congested UDP path would drop it. Both resume below ``low_water``. A client paused for
    ``stall_timeout`` seconds, or with more than ``hard_cap`` bytes unsent (what one read
    of requests can add beyond the mark), is disconnected. So is one that has no allocation
    ``allocate_timeout`` seconds after connecting (a TLS handshake must end within it too).
    """

    # 256 KiB is about a second of a 2 Mbit/s video stream on top of the kernel's own
    # send buffer: beyond that, relayed media is too late to be of use anyway.
    high_water: int = 256 * 1024
    low_water: int = 64 * 1024
    # One 256 KiB read of the smallest requests draws at most a few times that in answers.
    hard_cap: int = 4 << 20
    stall_timeout: float = 30.0
    # Like coturn's and eturnal's limits on unauthenticated TCP sessions.
    allocate_timeout: float = 10.0


DEFAULT_STREAM_LIMITS = StreamLimits()

# Handles one frame of a stream; True when the connection is closing and reading must stop.
FrameHandler = Callable[[bool, bytes], bool]


class StreamFramerLike(Protocol):
    """A stream's framer: relays ChannelData for ``allocation`` itself, hands the rest over.

    ``feed`` raises :class:`~tsunagu.stun.framing.FramingError` when the stream is not TURN.
    """

    allocation: Allocation | None

    def feed(self, data: bytes | memoryview) -> Any: ...


class ClientSide(Protocol):
    """A listener or connection the driver attaches a newly created allocation to."""

    def attach(self, allocation: Allocation, addr: Any) -> None: ...


class CoreDriver(Protocol):
    """What the listeners need of :class:`~.driver.TurnDriver`."""

    @property
    def server(self) -> TurnServer: ...

    @property
    def streams(self) -> set[StreamConnection]: ...

    @property
    def stream_framer(self) -> Callable[[FrameHandler], StreamFramerLike]: ...

    @property
    def failures(self) -> RefusalTally: ...

    @property
    def udp_listeners(self) -> dict[tuple[str, int], UdpListener]:
        """This worker's UDP listeners by local address, for :class:`~tsunagu.turn.Reply`."""
        ...

    def after_message(self, origin: ClientSide, addr: Any) -> None: ...

    def after_core_call(self) -> None: ...

    def await_keys(self, lookup: KeyLookup, again: Callable[[], None]) -> None:
        """Look ``lookup``'s user up, then call ``again`` to hand the request in again."""
        ...


def _relays(allocation: Allocation) -> list[RelayEndpointLike]:
    # The core types relay sockets as its own RelaySocket; the transports made them.
    return cast(list[RelayEndpointLike], list(allocation.relays.values()))


def _forward(forward: Forward, server: TurnServer, five_tuple: FiveTuple) -> None:
    # The relay socket knows its allocation: no look-up by 5-tuple unless limits apply.
    allocation = forward.relay.allocation
    if (
        allocation is not None
        and allocation.limits is not None
        and not within_limit(allocation, forward, server.drops, _monotonic_ns())
    ):
        return
    try:
        forward.relay.sendto(forward.data, forward.peer)
    except OSError:  # unreachable peer or full buffer: the datagram is lost
        send_failed(server.allocations.get(five_tuple), forward)


class UdpClientLink:
    """Ties an allocation to the UDP listener that serves its client, until it ends."""

    __slots__ = ("address", "listener")

    def __init__(self, listener: UdpListener, address: Any) -> None:
        self.listener = listener
        self.address = address

    def detach(self, allocation: Allocation) -> None:
        self.listener.allocations.pop(self.address, None)


class UdpListener(asyncio.DatagramProtocol):
    """A UDP STUN/TURN port on one local address.

    Reading goes through the event loop's datagram transport, whose receive loop is native
    code: a busy listener has many datagrams queued at each wake-up. Sending goes straight
    to the non-blocking socket, so a full buffer drops the datagram instead of queueing it
    without bound.
    """

    def __init__(self, driver: CoreDriver, sock: socket.socket) -> None:
        self.driver = driver
        self.sock = sock
        self.local: tuple[str, int] = sock.getsockname()[:2]
        self.transport: asyncio.BaseTransport | None = None
        # client address -> allocation, for the ChannelData path.
        self.allocations: dict[Any, Allocation] = {}
        self.dropped = 0
        self._drops = driver.server.drops
        driver.udp_listeners[self.local] = self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def error_received(self, exc: Exception) -> None:
        self.dropped += 1  # an ICMP error about an earlier send

    def close(self) -> None:
        self._unregister()
        if self.transport is not None:
            self.transport.close()
        else:
            self.sock.close()

    def _unregister(self) -> None:
        listeners = self.driver.udp_listeners
        if listeners.get(self.local) is self:
            del listeners[self.local]

    def send(self, data: bytes, addr: Any) -> None:
        try:
            self.sock.sendto(data, addr)
        except OSError:
            self.dropped += 1

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) >= 4 and 0x40 <= data[0] <= 0x7F:
            # ChannelData: the core's rule on this listener's own client -> allocation map.
            allocation = self.allocations.get(addr)
            forward = channel_data_forward(allocation, data, self._drops, _monotonic_ns)
            if forward is not None:
                relay, payload, peer = forward
                try:
                    relay.sendto(payload, peer)
                except OSError:  # unreachable peer or full buffer: the packet is lost
                    send_failed(allocation, forward)
            return
        self._stun(data, addr)

    def _stun(self, data: bytes, addr: Any, *, again: bool = False) -> None:
        driver = self.driver
        five_tuple = FiveTuple("udp", (addr[0], addr[1]), self.local)
        result = driver.server.receive(data, five_tuple, time.time())
        if result is not None:
            kind = type(result)
            if kind is bytes:
                self.send(cast(bytes, result), addr)
            elif kind is Reply:
                self._reply(cast(Reply, result))
            elif kind is KeyLookup:
                # Handed in again once the key is looked up; a second lookup is dropped (the
                # answer left the cache at once: the client retransmits).
                if not again:
                    driver.await_keys(
                        cast(KeyLookup, result), lambda: self._stun(data, addr, again=True)
                    )
            else:
                _forward(cast(Forward, result), driver.server, five_tuple)
        driver.after_message(self, addr)

    def _reply(self, reply: Reply) -> None:
        """Send an RFC 5780 Binding response from the listener bound to its source."""
        listener = self.driver.udp_listeners.get(reply.source)
        if listener is None:  # not bound in this worker: a configuration the core never made
            self.dropped += 1
        else:
            listener.send(reply.data, reply.destination)

    def attach(self, allocation: Allocation, addr: Any) -> None:
        allocation.client_link = UdpClientLink(self, addr)
        self.allocations[addr] = allocation
        for relay in _relays(allocation):
            relay.connect_udp(self.sock, addr)


class StreamClientLink:
    """How an allocation reaches a client on TCP or TLS: frames padded to 4 bytes."""

    __slots__ = ("connection", "transport")

    def __init__(self, connection: StreamConnection) -> None:
        self.connection = connection
        self.transport = connection.transport

    @property
    def paused(self) -> bool:
        return self.connection.paused

    def send(self, data: bytes, address: Any = None) -> None:
        # A client that lets too much pile up unread loses packets instead of our memory.
        if not self.connection.paused:
            self.transport.write(data + _PADDING[len(data) & 3])

    def detach(self, allocation: Allocation) -> None:
        # An allocation tied to a stream dies with it, and the stream with the allocation.
        self.connection.set_allocation(None)
        self.connection.close()


class PythonStreamFramer(StreamFramer):
    """The pure-Python stream framer: every frame goes to the connection's handler.

    It has the native framer's interface, so that a connection feeds either the same way.
    """

    __slots__ = ("_handle", "allocation")

    def __init__(self, handle: FrameHandler) -> None:
        super().__init__()
        self._handle = handle
        self.allocation: Allocation | None = None

    def feed(self, data: bytes | memoryview) -> None:
        """Buffer ``data`` and handle every complete frame, until the handler says stop."""
        super().feed(data)
        handle = self._handle
        for is_channel_data, frame in self.frames():
            if handle(is_channel_data, frame):
                return


class StreamConnection(asyncio.BufferedProtocol):
    """One TCP or TLS client connection, within :class:`StreamLimits`.

    ``on_lost`` is called once the connection is gone (the listener's connection count).
    ``accepted`` is the loop time the connection was accepted at, which the allocation
    deadline counts from (by default: now).
    """

    # Set by connection_made, before anything else can run on the connection.
    transport: asyncio.Transport

    def __init__(
        self,
        driver: CoreDriver,
        protocol: str,
        limits: StreamLimits = DEFAULT_STREAM_LIMITS,
        on_lost: Callable[[], None] | None = None,
        *,
        accepted: float | None = None,
    ) -> None:
        self.driver = driver
        self.protocol = protocol
        self.limits = limits
        self.five_tuple: FiveTuple | None = None
        self.allocation: Allocation | None = None
        self.paused = False
        # Why the server ended the connection, if it did (for tests and the debug log).
        self.closed_because: str | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._stalled: asyncio.TimerHandle | None = None
        self._on_lost = on_lost
        # The allocation deadline counts from accept: the wait for the first byte and the
        # TLS handshake are within it.
        self._accepted = asyncio.get_running_loop().time() if accepted is None else accepted
        self._drops = driver.server.drops
        self.framer = driver.stream_framer(self._frame)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        self.five_tuple = FiveTuple(self.protocol, (peer[0], peer[1]), (local[0], local[1]))
        limits = self.limits
        # Beyond the high-water mark asyncio calls pause_writing(), below the low one
        # resume_writing() (for TLS, on the TLS layer's buffers).
        self.transport.set_write_buffer_limits(high=limits.high_water, low=limits.low_water)
        self.driver.streams.add(self)
        self._idle = asyncio.get_running_loop().call_at(
            self._accepted + limits.allocate_timeout, self._check_idle
        )

    def pause_writing(self) -> None:
        # The client does not read: stop reading its requests (each would add an answer),
        # and let the relay drop what its peers send. Reading from the socket stops, so the
        # kernel's buffers fill and the client's TCP stack stops sending.
        self._set_paused(True)
        if not self.transport.is_closing():
            self.transport.pause_reading()
        if self._stalled is None:
            self._stalled = asyncio.get_running_loop().call_later(
                self.limits.stall_timeout, self._stall_expired
            )

    def resume_writing(self) -> None:
        self._set_paused(False)
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def _set_paused(self, paused: bool) -> None:
        self.paused = paused
        if self.allocation is not None:
            for relay in _relays(self.allocation):
                relay.set_paused(paused)

    def _stall_expired(self) -> None:
        self._stalled = None
        self.close(f"not reading for {self.limits.stall_timeout:g} s")

    def _check_idle(self) -> None:
        self._idle = None
        if self.allocation is None:
            self.close(f"no allocation within {self.limits.allocate_timeout:g} s")

    def close(self, reason: str = "closed by the server") -> None:
        """End the connection; at once, dropping what is unsent, when anything is.

        A graceful close waits until the client has read everything sent; one that reads
        nothing would keep the connection, and its buffer, for ever.
        """
        transport = self.transport
        if self.closed_because is None:
            self.closed_because = reason
            log.debug("%s: %s", self.five_tuple, reason)
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()

    # Reads land in one buffer shared by every connection: the event loop hands it out and
    # reports what it holds before anything else runs, and both framers copy what they keep.
    # (Without it, uvloop's TLS layer allocates and shrinks a 256 KiB bytes object per read.)
    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self.framer.feed(_READ_BUFFER[:nbytes])
        except FramingError:
            self._not_stun(_READ_BUFFER[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        try:
            self.framer.feed(data)
        except FramingError:
            self._not_stun(data)

    def _not_stun(self, data: bytes | memoryview, *, channel_data: bool = False) -> None:
        """Close a connection that sent what is neither STUN nor ChannelData (or ChannelData
        without an allocation), and count it for the log with what ``data`` (what was read
        last) looks like."""
        assert self.five_tuple is not None
        what = not_stun(data, self.protocol, channel_data=channel_data)
        facts = (("what", what), ("transport", self.protocol), ("port", self.five_tuple.server[1]))
        self.driver.failures.add(NOT_STUN, self.five_tuple.client[0], time.time(), facts=facts)
        self.close(f"not STUN or ChannelData: {what}")

    def _frame(self, is_channel_data: bool, frame: bytes) -> bool:
        """Handle one frame; True when the connection is closing and reading must stop."""
        if is_channel_data:
            allocation = self.allocation
            if allocation is None:
                # ChannelData before any allocation: not a TURN client (say, "GET /").
                self._not_stun(frame, channel_data=True)
                return True
            forward = channel_data_forward(allocation, frame, self._drops, _monotonic_ns)
            if forward is not None:
                relay, payload, peer = forward
                try:
                    relay.sendto(payload, peer)
                except OSError:  # unreachable peer or full buffer: the packet is lost
                    send_failed(allocation, forward)
            return False
        return self._request(frame)

    def _request(self, frame: bytes, *, again: bool = False) -> bool:
        driver = self.driver
        assert self.five_tuple is not None
        if again and self.transport.is_closing():
            return True
        result = driver.server.receive(frame, self.five_tuple, time.time())
        if result is not None:
            if type(result) is KeyLookup:
                if not again:
                    driver.await_keys(result, lambda: self._after_lookup(frame))
            elif type(result) is bytes:
                transport = self.transport
                transport.write(result)
                # Reading pauses at the high-water mark, but what was already read is still
                # answered: only many small requests in one read get this far.
                if self.paused and transport.get_write_buffer_size() > self.limits.hard_cap:
                    self.close(f"more than {self.limits.hard_cap} bytes unread")
                    driver.after_message(self, None)
                    return True
            else:  # a Forward: a Reply (RFC 5780) is for UDP only
                _forward(cast(Forward, result), driver.server, self.five_tuple)
        driver.after_message(self, None)
        return False

    def _after_lookup(self, frame: bytes) -> None:
        self._request(frame, again=True)

    def set_allocation(self, allocation: Allocation | None) -> None:
        self.allocation = allocation
        self.framer.allocation = allocation

    def attach(self, allocation: Allocation, addr: Any) -> None:
        self.set_allocation(allocation)
        link = StreamClientLink(self)
        allocation.client_link = link
        for relay in _relays(allocation):
            relay.connect_stream(link)

    def connection_lost(self, exc: Exception | None) -> None:
        self.driver.streams.discard(self)
        for timer in (self._idle, self._stalled):
            if timer is not None:
                timer.cancel()
        self._idle = self._stalled = None
        if self._on_lost is not None:
            self._on_lost()
            self._on_lost = None
        if self.five_tuple is not None:
            self.driver.server.connection_closed(self.five_tuple, time.time())
            self.driver.after_core_call()
