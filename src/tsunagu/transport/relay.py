"""Relay sockets: where peers' datagrams arrive and leave (the per-packet path).

A :class:`RelayEndpoint` is bound synchronously (the core must know the port before it
answers the Allocate) and joins the event loop right after. Its ``datagram_received``
knows its allocation without a look-up and does only what relaying needs: a permission
test, a channel look-up, one header, one send.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

from ..stun.attributes import Address
from ..stun.indication import data_indication
from ..turn.allocation import Allocation
from ..turn.bandwidth import admit
from ..turn.forwarding import over_limit

__all__ = [
    "EndpointFactory",
    "RelayEndpoint",
    "RelayEndpointLike",
    "StreamClient",
    "UdpRelayBinder",
]

log = logging.getLogger("tsunagu.relay")

_CHANNEL_HEADER = struct.Struct("!HH")
_BURST = 16
_monotonic = time.monotonic
_monotonic_ns = time.monotonic_ns
# Matching coturn's relay sockets, whose 64 KiB the kernel doubles.
RELAY_BUFFER_BYTES = 64 * 1024
# The socket option that sets IPv4's DF bit on Linux: IP_MTU_DISCOVER = IP_PMTUDISC_DO.
# Python's socket module does not export these two constants before 3.12 (<linux/in.h>: 10, 2).
_DF_OPTION: tuple[int, int] | None = None
if sys.platform == "linux":
    _DF_OPTION = (getattr(socket, "IP_MTU_DISCOVER", 10), getattr(socket, "IP_PMTUDISC_DO", 2))


class StreamClient(Protocol):
    """What a relay socket needs of a TCP/TLS client (:class:`.listeners.StreamClientLink`)."""

    @property
    def transport(self) -> asyncio.WriteTransport: ...

    @property
    def paused(self) -> bool: ...

    def send(self, data: bytes, address: Any = None) -> None: ...


class RelayEndpointLike(Protocol):
    """A relay socket of either engine, as the driver and the listeners use it.

    ``allocation`` is set by the driver once the core has created the allocation; the
    ``connect_*`` methods point the socket at the client, once per allocation.
    """

    allocation: Allocation | None

    @property
    def address(self) -> Address: ...

    def connect_udp(self, sock: socket.socket, address: Any) -> None: ...

    def connect_stream(self, client: StreamClient) -> None: ...

    def set_paused(self, paused: bool) -> None: ...

    def close(self) -> None: ...


class EndpointFactory(Protocol):
    """How :class:`UdpRelayBinder` turns a bound socket into an engine's relay endpoint."""

    def __call__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        address: Address,
        tid_prefix: bytes,
    ) -> RelayEndpointLike: ...


class RelayEndpoint:
    """One relay socket of one allocation, read straight from the event loop's poller.

    asyncio's datagram transports read in a loop until the socket is empty, which costs an
    extra failing ``recvfrom`` for every wake-up; a relay socket usually holds one packet
    when it becomes readable, so reading one per wake-up is cheaper. Sends go straight to
    the non-blocking socket: a full buffer drops the datagram, as a router would.
    """

    __slots__ = (
        "_address",
        "_closed",
        "_counter",
        "_last_wakeup",
        "_loop",
        "_recvfrom",
        "_sock",
        "_tid_prefix",
        "allocation",
        "client_address",
        "paused",
        "sendto",
        "to_client",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        address: Address,
        tid_prefix: bytes,
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._recvfrom = sock.recvfrom
        self._address = address
        self._tid_prefix = tid_prefix
        self._counter = 0
        self._last_wakeup = 0.0
        self._closed = False
        self.allocation: Allocation | None = None
        # The socket's own method: callers catch OSError (unreachable peer, full buffer).
        self.sendto = sock.sendto
        # Set when the allocation is attached: how to reach the client, one call per packet.
        self.to_client: Any = None
        self.client_address: Any = None
        # A stream client that does not read: what its peers send is dropped (as C does).
        self.paused = False
        loop.add_reader(sock.fileno(), self._readable)

    @property
    def address(self) -> Address:
        return self._address

    def _readable(self) -> None:
        # One read per wake-up suits most sockets (a call's packets arrive milliseconds
        # apart); a socket woken again within 100 µs is busy and likely holds more, so it
        # drains a few per wake-up instead of losing them when its buffer fills.
        now = _monotonic()
        reads = _BURST if now - self._last_wakeup < 0.0001 else 1
        self._last_wakeup = now
        allocation = self.allocation
        for _ in range(reads):
            try:
                data, addr = self._recvfrom(65536)
            except BlockingIOError:
                return
            except OSError:  # an ICMP error queued on the socket
                if allocation is not None:
                    allocation.dropped += 1
                continue
            if allocation is None:
                return
            if addr[0] not in allocation.permissions or self.paused:
                allocation.dropped += 1
                continue
            limits = allocation.limits
            if limits is not None and not admit(limits.to_client, _monotonic_ns(), len(data)):
                over_limit(allocation, limits.drops)
                continue
            if len(addr) != 2:  # IPv6 socket addresses carry flow info and scope id
                addr = (addr[0], addr[1])
            channel = allocation.peer_channels.get(addr)
            try:
                if channel is not None:
                    message = _CHANNEL_HEADER.pack(channel, len(data)) + data
                else:
                    self._counter += 1
                    tid = self._tid_prefix + self._counter.to_bytes(8, "big")
                    message = data_indication(tid, addr, data)
                self.to_client(message, self.client_address)
            except (OSError, ValueError):  # full buffer, or too large for a Data indication
                allocation.dropped += 1
                continue
            allocation.packets_to_client += 1
            allocation.bytes_to_client += len(data)

    def connect_udp(self, sock: socket.socket, address: Any) -> None:
        self.to_client = sock.sendto
        self.client_address = address

    def connect_stream(self, client: StreamClient) -> None:
        # The link pads frames; nothing is relayed to it while the client is paused.
        self.to_client = client.send
        self.paused = client.paused

    def set_paused(self, paused: bool) -> None:
        self.paused = paused

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.allocation = None
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()


class UdpRelayBinder:
    """Binds relay sockets for the TURN core (:class:`tsunagu.turn.RelayBinder`)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        random_bytes: Callable[[int], bytes],
        endpoint: EndpointFactory = RelayEndpoint,
    ) -> None:
        self._loop = loop
        self._random_bytes = random_bytes
        # The relay engine's endpoint class: RelayEndpoint, or native's NativeRelayEndpoint.
        self._endpoint = endpoint
        self.bind_errors = 0

    def bind(self, ip: str, port: int, *, dont_fragment: bool) -> RelayEndpointLike | None:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
        except OSError as exc:  # out of file descriptors: the Allocate gets 508
            self.bind_errors += 1
            log.warning("cannot open a relay socket: %s", exc)
            return None
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RELAY_BUFFER_BYTES)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, RELAY_BUFFER_BYTES)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if dont_fragment and family == socket.AF_INET and _DF_OPTION is not None:
                sock.setsockopt(socket.IPPROTO_IP, *_DF_OPTION)
            sock.bind((ip, port))
        except OSError as exc:
            sock.close()
            if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                self.bind_errors += 1
                log.warning("cannot bind relay socket on %s:%d: %s", ip, port, exc)
            return None
        return self._endpoint(self._loop, sock, (ip, port), self._random_bytes(4))

    def release(self, relay: Any) -> None:
        # The core hands back what bind() returned, typed as its own RelaySocket.
        relay.close()
