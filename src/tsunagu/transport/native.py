"""The native relay engine: the per-packet path in C (:mod:`._fastpath`).

Importing this module fails with ImportError where the extension was not built; the
engine choice then falls back to :class:`~.engine.PythonEngine`. The C code relays only
what is relayable right now and hands everything else to the Python path unchanged, so the
core's decisions and counters are the same with both engines.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from ..stun.attributes import Address
from ..turn.allocation import Allocation
from . import _fastpath
from .listeners import CoreDriver, UdpListener
from .relay import StreamClient

__all__ = ["NativeEngine", "NativeRelayEndpoint", "NativeUdpListener"]


class NativeRelayEndpoint(_fastpath.Relay):
    """A relay socket read by C: ``readable`` relays what arrived (a batch when busy).

    Counters live in C while the allocation lasts; :meth:`NativeEngine.fold_counters` adds
    them to the allocation's when it ends.
    """

    __slots__ = ("_address", "_closed", "_loop", "_sock")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        address: Address,
        tid_prefix: bytes,
    ) -> None:
        super().__init__(sock.fileno(), tid_prefix)
        self._loop = loop
        self._sock = sock
        self._address = address
        self._closed = False
        loop.add_reader(self.fd, self.readable)

    @property
    def address(self) -> Address:
        return self._address

    def connect_udp(self, sock: socket.socket, address: Any) -> None:
        self.set_client(sock.fileno(), address)

    def connect_stream(self, client: StreamClient) -> None:
        # C pads and writes itself, and stops while the transport is paused.
        self.to_client = client.transport.write
        self.pad_stream = True
        self.paused = client.paused

    def set_paused(self, paused: bool) -> None:
        self.paused = paused

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.clear_client()
        self._loop.remove_reader(self.fd)
        self._sock.close()


class NativeUdpListener(UdpListener):
    """A UDP listener read by C; what C does not relay reaches ``datagram_received``."""

    def __init__(
        self, driver: CoreDriver, sock: socket.socket, loop: asyncio.AbstractEventLoop
    ) -> None:
        super().__init__(driver, sock)
        self._loop = loop
        self._fd = sock.fileno()
        self._core = _fastpath.Listener(self._fd, self.allocations, self.datagram_received)
        # C answers a plain Binding only when the answer has nothing but XOR-MAPPED-ADDRESS
        # (and FINGERPRINT); SOFTWARE, MAPPED-ADDRESS for RFC 3489, --no-stun, and every
        # Binding on an address with RFC 5780 (RESPONSE-ORIGIN, OTHER-ADDRESS, the
        # unauthenticated budget) are Python's. A Binding with any attribute, CHANGE-REQUEST,
        # RESPONSE-PORT or PADDING among them, always goes to Python.
        settings = driver.server.settings
        discovery = settings.nat_discovery
        self._core.answer_binding = not (
            settings.no_stun
            or settings.software is not None
            or settings.rfc3489_compat
            or (discovery is not None and discovery.other(self.local) is not None)
        )
        loop.add_reader(self._fd, self._core.readable)

    @property
    def relayed(self) -> int:
        """Datagrams relayed by C without reaching Python."""
        return self._core.relayed

    @property
    def bindings(self) -> int:
        """Binding requests answered by C without reaching Python."""
        return self._core.bindings

    def close(self) -> None:
        self._unregister()
        if self.sock.fileno() >= 0:
            self._loop.remove_reader(self._fd)
            self.sock.close()


class NativeEngine:
    """C reads the UDP listeners and relay sockets, and frames TCP/TLS streams."""

    name = "native"
    relay_endpoint = NativeRelayEndpoint
    # Relays ChannelData itself and hands every other frame to the connection's handler.
    stream_framer = _fastpath.Stream

    @staticmethod
    async def udp_listener(
        driver: CoreDriver, sock: socket.socket, loop: asyncio.AbstractEventLoop
    ) -> UdpListener:
        return NativeUdpListener(driver, sock, loop)

    @staticmethod
    def fold_counters(allocation: Allocation) -> None:
        """Add the C counters of an ended allocation's relay sockets to the allocation's."""
        for relay in allocation.relays.values():
            if isinstance(relay, _fastpath.Relay):
                allocation.packets_to_peers += relay.packets_to_peers
                allocation.bytes_to_peers += relay.bytes_to_peers
                allocation.packets_to_client += relay.packets_to_client
                allocation.bytes_to_client += relay.bytes_to_client
                allocation.dropped += relay.dropped
                allocation.bandwidth_dropped += relay.bandwidth_dropped

    @staticmethod
    def pending_counters(allocation: Allocation) -> tuple[int, int, int, int, int]:
        """The C counters of a live allocation's relay sockets: a few attribute reads."""
        totals = [0, 0, 0, 0, 0]
        for relay in allocation.relays.values():
            if isinstance(relay, _fastpath.Relay):
                totals[0] += relay.packets_to_peers
                totals[1] += relay.bytes_to_peers
                totals[2] += relay.packets_to_client
                totals[3] += relay.bytes_to_client
                totals[4] += relay.dropped
        return (totals[0], totals[1], totals[2], totals[3], totals[4])
