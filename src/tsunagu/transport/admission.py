"""TCP/TLS listening sockets that admit connections within caps.

Connections are accepted here rather than by asyncio's server, so that one over a cap is
refused at accept time (closed with a reset), before a TLS handshake or a protocol is spent
on it. :class:`ConnectionCounter` counts the connections of one worker per client address
(an IPv4 address, or an IPv6 /64: one subscriber's prefix) and in total, from accept until
the connection is gone, the TLS handshake included. Refusals are logged once per interval,
whatever their number.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import socket
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..turn.quotas import address_key

__all__ = [
    "ConnectionCounter",
    "ConnectionLimits",
    "StreamListener",
    "address_key",
    "descriptor_budget",
    "stream_socket",
    "worker_share",
]

log = logging.getLogger("tsunagu")

# Connections taken per wake-up of a listening socket: a flood cannot starve the loop.
_ACCEPT_BATCH = 64
# Kernel queue of connections not accepted yet (asyncio's default is 100).
_BACKLOG = 511
# Descriptors kept out of the TCP/TLS budget: listening sockets, logs, the web app, pipes.
_RESERVED_DESCRIPTORS = 64
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# Addresses remembered per logging interval, to name the busiest in the log line.
_TRACKED_ADDRESSES = 1024


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """One worker's caps on TCP/TLS connections; 0 means no cap."""

    per_address: int = 0
    total: int = 0


def worker_share(limit: int, workers: int) -> int:
    """One worker's part of a server-wide cap (0 stays 0, "no cap").

    The kernel spreads connections over the workers by hashing each 4-tuple, so a client
    address's connections are spread evenly too; each worker admits its share.
    """
    return 0 if limit == 0 else math.ceil(limit / max(1, workers))


def descriptor_budget(open_files: int) -> int:
    """How many TCP/TLS connections one process may hold with ``open_files`` descriptors.

    Each TCP/TLS client holds its connection and its allocation's relay sockets (two with
    both address families): a quarter of the descriptors for connections leaves at least a
    quarter for UDP clients' relay sockets, so TCP clients can never take them all.
    """
    return max(16, (open_files - _RESERVED_DESCRIPTORS) // 4)


class ConnectionCounter:
    """The TCP/TLS connections of one worker, per client address and in total."""

    def __init__(self, limits: ConnectionLimits, *, log_interval: float = 10.0) -> None:
        self.limits = limits
        self.log_interval = log_interval
        self.per_address: dict[str, int] = {}
        self.total = 0
        # Refusals since start, by cap ("per-address", "total").
        self.refused: Counter[str] = Counter()
        self._window: Counter[str] = Counter()
        self._window_addresses: Counter[str] = Counter()
        self._report: asyncio.TimerHandle | None = None

    def admit(self, ip: str) -> Callable[[], None] | None:
        """Count a new connection from ``ip``; None when a cap refuses it.

        The returned function un-counts it; calling it more than once does nothing.
        """
        limits = self.limits
        key = address_key(ip)
        count = self.per_address.get(key, 0)
        if limits.total and self.total >= limits.total:
            self._refuse("total", key)
            return None
        if limits.per_address and count >= limits.per_address:
            self._refuse("per-address", key)
            return None
        self.per_address[key] = count + 1
        self.total += 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.total -= 1
            left = self.per_address[key] - 1
            if left:
                self.per_address[key] = left
            else:
                del self.per_address[key]

        return release

    def _refuse(self, cap: str, key: str) -> None:
        self.refused[cap] += 1
        self._window[cap] += 1
        if key in self._window_addresses or len(self._window_addresses) < _TRACKED_ADDRESSES:
            self._window_addresses[key] += 1
        if self._report is None:
            self._report = asyncio.get_running_loop().call_later(
                self.log_interval, self._log_refusals
            )

    def _log_refusals(self) -> None:
        self._report = None
        window, addresses = self._window, self._window_addresses
        self._window, self._window_addresses = Counter(), Counter()
        causes = []
        if window["per-address"]:
            causes.append(
                f"{window['per-address']} over the cap of {self.limits.per_address}"
                " per client address"
            )
        if window["total"]:
            causes.append(f"{window['total']} over the cap of {self.limits.total} in total")
        busiest = ", ".join(f"{key} ({count})" for key, count in addresses.most_common(3))
        log.warning(
            "refused %d TCP/TLS connections in the last %g s: %s; most from %s",
            sum(window.values()),
            self.log_interval,
            "; ".join(causes),
            busiest,
        )

    def close(self) -> None:
        if self._report is not None:
            self._report.cancel()
            self._log_refusals()


def stream_socket(ip: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket on ``ip``:``port`` (IPv6 sockets take IPv6 only)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((ip, port))
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


# Makes a connection's protocol; its argument un-counts the connection once it is gone.
ProtocolFactory = Callable[[Callable[[], None]], asyncio.BaseProtocol]


class StreamListener:
    """Accepts TCP (or, with ``ssl``, TLS) connections on ``sock`` within ``counter``'s caps.

    A TLS handshake must end within ``handshake_timeout`` seconds.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol_factory: ProtocolFactory,
        counter: ConnectionCounter,
        *,
        ssl: Any = None,
        handshake_timeout: float | None = None,
    ) -> None:
        self._loop = loop
        self.sock = sock
        self._fd = sock.fileno()
        self._factory = protocol_factory
        self.counter = counter
        self._ssl = ssl
        self._handshake_timeout = handshake_timeout if ssl is not None else None
        self._pending: set[asyncio.Task[None]] = set()
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False
        loop.add_reader(self._fd, self._accept)

    @property
    def address(self) -> tuple[str, int]:
        address = self.sock.getsockname()
        return (address[0], address[1])

    def _accept(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    # Out of descriptors or memory: let the queue wait a second, as asyncio's
                    # own servers do, rather than spin on it.
                    log.warning("cannot accept TCP/TLS connections for now: %s", exc)
                    self._loop.remove_reader(self._fd)
                    self._retry = self._loop.call_later(1.0, self._resume)
                    return
                continue  # the client gave up before we took it (ECONNABORTED)
            release = self.counter.admit(addr[0])
            if release is None:
                try:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                except OSError:
                    pass
                conn.close()
                continue
            try:
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # already reset by the client
                release()
                conn.close()
                continue
            task = self._loop.create_task(self._start(conn, release))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _start(self, conn: socket.socket, release: Callable[[], None]) -> None:
        # The transport owns the socket from here, failed or not; it closes it.
        try:
            if self._ssl is None:
                await self._loop.connect_accepted_socket(lambda: self._factory(release), conn)
            else:
                await self._loop.connect_accepted_socket(
                    lambda: self._factory(release),
                    conn,
                    ssl=self._ssl,
                    ssl_handshake_timeout=self._handshake_timeout,
                )
        except asyncio.CancelledError:
            release()
            raise
        except Exception as exc:  # a failed or timed-out TLS handshake, a reset
            release()
            log.debug("TCP/TLS connection not started: %r", exc)

    def _resume(self) -> None:
        self._retry = None
        if not self._closed:
            self._loop.add_reader(self._fd, self._accept)

    def close(self) -> None:
        """Stop accepting; connections already accepted go on (the drain ends them)."""
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        else:
            self._loop.remove_reader(self._fd)
        self.sock.close()
