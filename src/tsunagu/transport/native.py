"""The UDP per-packet path in C (:mod:`._fastpath`), behind the same interface as the
pure-Python :class:`~.relay.RelayEndpoint` and :class:`~.listeners.UdpListener`.

Importing this module fails with ImportError where the extension was not built; the runtime
then uses the pure-Python path. The C code relays only what is relayable right now and hands
everything else to the Python path unchanged, so the core's decisions and counters are the
same on both.
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING, Any

from ..stun.attributes import Address
from ..turn.allocation import Allocation
from . import _fastpath
from .listeners import UdpListener

if TYPE_CHECKING:
    from .runtime import TurnRuntime

__all__ = ["NativeRelayEndpoint", "NativeUdpListener", "Stream", "fold_counters"]

# A TCP/TLS connection's framer: relays ChannelData itself, hands other frames back.
Stream = _fastpath.Stream


class NativeRelayEndpoint(_fastpath.Relay):
    """A relay socket read by C: ``readable`` relays what arrived (a batch when busy).

    Counters live in C while the allocation lasts; :func:`fold_counters` adds them to the
    allocation's when it ends.
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

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.clear_client()
        self._loop.remove_reader(self.fd)
        self._sock.close()


def fold_counters(allocation: Allocation) -> None:
    """Add the C counters of an ended allocation's relay sockets to the allocation's own."""
    for relay in allocation.relays.values():
        if isinstance(relay, _fastpath.Relay):
            allocation.packets_to_peers += relay.packets_to_peers
            allocation.bytes_to_peers += relay.bytes_to_peers
            allocation.packets_to_client += relay.packets_to_client
            allocation.bytes_to_client += relay.bytes_to_client
            allocation.dropped += relay.dropped


class NativeUdpListener(UdpListener):
    """A UDP listener read by C; what C does not relay reaches ``datagram_received``."""

    def __init__(
        self, runtime: TurnRuntime, sock: socket.socket, loop: asyncio.AbstractEventLoop
    ) -> None:
        super().__init__(runtime, sock)
        self._loop = loop
        self._fd = sock.fileno()
        self._core = _fastpath.Listener(self._fd, self.allocations, self.datagram_received)
        # C answers a plain Binding only when the answer has nothing but XOR-MAPPED-ADDRESS
        # (and FINGERPRINT); SOFTWARE, MAPPED-ADDRESS for RFC 3489 or --no-stun are Python's.
        settings = runtime.server.settings
        self._core.answer_binding = not (
            settings.no_stun or settings.software is not None or settings.rfc3489_compat
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
        if self.sock.fileno() >= 0:
            self._loop.remove_reader(self._fd)
            self.sock.close()

    def _connect(self, relay: Any, addr: Any) -> None:
        relay.set_client(self._fd, addr)
