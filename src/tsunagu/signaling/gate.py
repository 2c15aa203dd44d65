"""What the web port lets in: connections counted per client address and in total, at accept
time, before a byte of HTTP (or TLS) is read.

aiohttp bounds what one HTTP request may cost (header sizes, the keep-alive timer that also
closes a connection whose first request has not arrived in time) but not how many
connections there are. :class:`GatedSite` is the missing piece: an aiohttp site that accepts
connections itself, asks a :class:`ConnectionGate` whether the address may have one more,
closes it at once if not, and otherwise hands it to aiohttp's own protocol (after a bounded
TLS handshake when the site is HTTPS).

Fair share: while the gate is less than ``crowded_at`` full, an address may hold up to
``per_address`` connections (a school or office behind one NAT address with dozens of
people works); past that point only addresses holding fewer than ``crowded_per_address`` get
more. The slots above ``crowded_at`` are therefore left to small holders: as long as
``holders * crowded_per_address < total - crowded_at``, that many addresses cannot fill the
gate, and a newcomer still gets in. :meth:`Caps.fair` keeps that true for 64 addresses.

IPv6 addresses count per /64 (one subscriber's prefix); IPv4-mapped ones as IPv4.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from tsunagu.turn.quotas import address_key

__all__ = ["Caps", "ConnectionGate", "GatedSite", "address_key", "web_connection_budget"]

log = logging.getLogger("tsunagu.web")

_FAIR_HOLDERS: Final = 64
"""How many addresses together must not be able to lock a newcomer out (see :meth:`Caps.fair`)."""
_RESOURCE_ERRORS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def web_connection_budget(open_files: int) -> int:
    """The web port's share of this process's file descriptors (its RLIMIT_NOFILE).

    ``tsunagu serve`` runs the web app in worker 0, which also relays TURN: every allocation
    there holds a relay socket, and a TURN client over TCP or TLS one more. The web gets a
    quarter of the descriptors (at most 8192, at least 64); three quarters stay for TURN,
    whatever any web client does.
    """
    return max(64, min(8192, open_files // 4))


@dataclass(frozen=True, slots=True)
class Caps:
    """Bounds of one :class:`ConnectionGate`."""

    total: int
    per_address: int
    """What one address may hold while the gate is not crowded."""
    crowded_at: int
    """From this many connections on, only addresses below ``crowded_per_address`` get more."""
    crowded_per_address: int

    @classmethod
    def fair(cls, total: int, per_address: int) -> Caps:
        """Crowded at three quarters; then ``total // 320`` per address, so that 64 addresses
        hold at most a fifth of ``total`` of the last quarter (64 * total/320 = total/5 < total/4)
        and a newcomer still finds a slot."""
        crowded_at = total - total // 4
        crowded = max(1, total // (5 * _FAIR_HOLDERS))
        return cls(total, max(crowded, per_address), crowded_at, crowded)


class ConnectionGate:
    """Counts open connections per address key and in total (see the module docstring)."""

    def __init__(self, caps: Caps) -> None:
        self.caps = caps
        self.held: Counter[str] = Counter()
        self.count = 0
        self.refused = 0

    def refusal(self, key: str) -> str | None:
        """Why ``key`` may not have one more connection now, or None if it may."""
        caps = self.caps
        if self.count >= caps.total:
            return "total"
        limit = caps.per_address if self.count < caps.crowded_at else caps.crowded_per_address
        if self.held[key] >= limit:
            return "address"
        return None

    def admit(self, key: str) -> str | None:
        """Count one more connection for ``key``; or return why not (and count nothing)."""
        why = self.refusal(key)
        if why is None:
            self.held[key] += 1
            self.count += 1
        else:
            self.refused += 1
        return why

    def release(self, key: str) -> None:
        left = self.held[key] - 1
        if left > 0:
            self.held[key] = left
        else:
            del self.held[key]
        self.count -= 1


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, releasing the gate's slot when it ends."""

    __slots__ = ("_inner", "_release")

    def __init__(self, inner: asyncio.Protocol, release: Callable[[], None]) -> None:
        self._inner = inner
        self._release = release

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._inner.connection_lost(exc)
        finally:
            self._release()


def _abort(conn: socket.socket) -> None:
    """Close with a reset: nothing lingers in TIME_WAIT or in the kernel's send queue."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


class _Acceptor:
    """The accept loops of one site; ``close()`` is what ``BaseSite.stop`` calls."""

    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []
        self.tasks: set[asyncio.Task[None]] = set()

    def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for sock in self.sockets:
            sock.close()


class GatedSite(web.BaseSite):
    """A TCP site of an aiohttp runner whose connections pass a :class:`ConnectionGate`."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        gate: ConnectionGate,
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout: float = 10.0,
        backlog: int = 512,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self.host = host
        self.port = port
        self.gate = gate
        self.handshake_timeout = handshake_timeout
        self._acceptor = _Acceptor()

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((self.host, self.port))
            sock.listen(self._backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        acceptor = self._acceptor
        acceptor.sockets.append(sock)
        self._server = acceptor  # type: ignore[assignment]  # BaseSite.stop() calls close()
        task = asyncio.create_task(self._accept(sock), name=f"web-accept-{self.port}")
        acceptor.tasks.add(task)
        task.add_done_callback(acceptor.tasks.discard)

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        gate = self.gate
        acceptor = self._acceptor
        while True:
            try:
                conn, peer = await loop.sock_accept(sock)
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:
                    # Out of descriptors or memory: whatever holds them, try again shortly
                    # rather than spin (the connection waits in the listen backlog).
                    log.warning("web: cannot accept a connection: %s", exc.strerror or exc)
                    await asyncio.sleep(0.5)
                continue
            key = address_key(peer[0])
            why = gate.admit(key)
            if why is not None:
                if gate.refused % 1000 == 1:
                    log.warning(
                        "web: refusing connections (%s cap; %d open, %d from %s); %d so far",
                        why,
                        gate.count,
                        gate.held[key],
                        key,
                        gate.refused,
                    )
                _abort(conn)
                continue
            task = loop.create_task(self._connect(conn, key))
            acceptor.tasks.add(task)
            task.add_done_callback(acceptor.tasks.discard)

    async def _connect(self, conn: socket.socket, key: str) -> None:
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.gate.release(key)

        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                lambda: _Counted(server(), release),
                conn,
                ssl=self._ssl_context,
                ssl_handshake_timeout=self.handshake_timeout if self._ssl_context else None,
            )
        except BaseException as exc:
            # A failed or slow TLS handshake, or the site closing: the protocol never started.
            # The loop closes the socket itself (closing it here too could close a reused fd).
            release()
            if not isinstance(exc, Exception):
                raise
            log.debug("web: connection from %s not started: %s", key, exc)
