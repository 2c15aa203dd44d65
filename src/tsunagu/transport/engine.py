"""Relay engines: who runs the per-packet path, Python or C.

A :class:`RelayEngine` makes the objects that touch packets: the UDP listeners, the relay
endpoints :class:`~.relay.UdpRelayBinder` binds for the core, and the TCP/TLS framers. The
driver, the listeners and the binder take these from the engine and never ask which one
runs. :func:`load_engine` picks one for ``--relay-engine``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Protocol

from ..turn.allocation import Allocation
from .listeners import (
    CoreDriver,
    FrameHandler,
    PythonStreamFramer,
    StreamFramerLike,
    UdpListener,
)
from .relay import EndpointFactory, RelayEndpoint

__all__ = ["EngineUnavailable", "PythonEngine", "RelayEngine", "load_engine"]

log = logging.getLogger("tsunagu")


class RelayEngine(Protocol):
    """The per-packet path of a server: how packets are read, relayed and counted."""

    @property
    def name(self) -> str:
        """``"python"`` or ``"native"``, as ``--relay-engine`` names it."""
        ...

    @property
    def relay_endpoint(self) -> EndpointFactory:
        """Makes a relay endpoint from a bound socket (for :class:`~.relay.UdpRelayBinder`)."""
        ...

    @property
    def stream_framer(self) -> Callable[[FrameHandler], StreamFramerLike]:
        """Makes a TCP/TLS connection's framer, which calls the handler for each frame it
        does not relay itself."""
        ...

    async def udp_listener(
        self, driver: CoreDriver, sock: socket.socket, loop: asyncio.AbstractEventLoop
    ) -> UdpListener:
        """Start serving the bound UDP socket ``sock``."""
        ...

    def fold_counters(self, allocation: Allocation) -> None:
        """Add whatever the engine counted outside the allocation to it, once it ended."""
        ...

    def pending_counters(self, allocation: Allocation) -> tuple[int, int, int, int, int]:
        """What the engine counted outside a live allocation so far, not yet folded in:
        packets and bytes to the peers, packets and bytes to the client, drops."""
        ...


class PythonEngine:
    """Everything in Python on the event loop; runs wherever tsunagu runs."""

    name = "python"
    relay_endpoint = RelayEndpoint
    stream_framer = PythonStreamFramer

    @staticmethod
    async def udp_listener(
        driver: CoreDriver, sock: socket.socket, loop: asyncio.AbstractEventLoop
    ) -> UdpListener:
        listener = UdpListener(driver, sock)
        await loop.create_datagram_endpoint(lambda: listener, sock=sock)
        return listener

    @staticmethod
    def fold_counters(allocation: Allocation) -> None:
        pass  # the Python path counts on the allocation itself

    @staticmethod
    def pending_counters(allocation: Allocation) -> tuple[int, int, int, int, int]:
        return (0, 0, 0, 0, 0)


class EngineUnavailable(RuntimeError):
    """``--relay-engine native`` where the C extension was not built."""


def load_engine(choice: str) -> RelayEngine:
    """The engine for ``choice``: ``"python"``, ``"native"``, or ``"auto"`` (native if built).

    Raises :class:`EngineUnavailable` for ``"native"`` without the C extension.
    """
    if choice == "python":
        return PythonEngine()
    try:
        from .native import NativeEngine
    except ImportError as exc:
        if choice == "native":
            raise EngineUnavailable(
                "the native relay engine is not built; --relay-engine python runs without"
            ) from exc
        log.debug("the native relay engine is not built; using the Python path")
        return PythonEngine()
    return NativeEngine()
