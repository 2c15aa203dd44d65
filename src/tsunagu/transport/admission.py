"""TCP/TLS listening sockets that admit connections within caps, and tell TLS from plain.

Connections are accepted here rather than by asyncio's server, so that one over a cap is
refused at accept time (closed with a reset), before a TLS handshake or a protocol is spent
on it. :class:`ConnectionCounter` counts the connections of one worker per client address
(an IPv4 address, or an IPv6 /64: one subscriber's prefix) and in total, from accept until
the connection is gone, the TLS handshake included. Refusals are logged once per interval,
whatever their number.

Every listener takes TLS and plain TCP on the same port, as coturn does on each of its TCP
listeners: a TURN client speaks first, so the first byte it sends tells which one it
speaks (:func:`stream_kind`), read with ``MSG_PEEK`` so that it stays in the kernel for the
TLS layer or the framer. Until that byte comes the connection holds only its socket and one
timer; the wait counts against the allocation deadline. A connection whose first byte is
neither is closed at once and counted, once per interval too.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..logs import structured
from ..turn.quotas import address_key
from ..turn.refusals import Facts, RefusalTally
from .failures import NOT_STUN, NOT_TLS, tls_failure

__all__ = [
    "ConnectionCounter",
    "ConnectionLimits",
    "ProtocolFactory",
    "StreamListener",
    "address_key",
    "descriptor_budget",
    "stream_kind",
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
# The first byte of a TLS record of type handshake: a ClientHello (RFC 8446 §5.1).
_TLS_HANDSHAKE = 0x16
# The first byte of a STUN message is 0 0 M11 M10 M9 M8 M7 C1 (RFC 8489 §5): every STUN and
# TURN method is below 0x080, so only the class bit C1 may be set.
_STUN_FIRST_BYTES = frozenset({0x00, 0x01})


def stream_kind(first: int) -> str | None:
    """What a new connection whose first byte is ``first`` speaks: ``"tls"``, ``"plain"``
    (STUN), or None (neither).

    ChannelData (0x40-0x7F) is not a first frame: it needs an allocation, which a new
    connection cannot have. That range is where HTTP requests fall ("GET", "POST", ...).
    """
    if first == _TLS_HANDSHAKE:
        return "tls"
    if first in _STUN_FIRST_BYTES:
        return "plain"
    return None


def _first_byte(first: int) -> str:
    shown = chr(first) if 0x20 < first < 0x7F else ""
    return f"{first:#04x} {shown!r}" if shown else f"{first:#04x}"


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


class _Window:
    """Events of one logging interval, by cause and by client address; ``report`` is called
    with both at the interval's end (or at :meth:`close`), once, however many came."""

    def __init__(
        self, interval: float, report: Callable[[Counter[str], Counter[str]], None]
    ) -> None:
        self.interval = interval
        self._report = report
        self._causes: Counter[str] = Counter()
        self._addresses: Counter[str] = Counter()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, cause: str, key: str) -> None:
        self._causes[cause] += 1
        if key in self._addresses or len(self._addresses) < _TRACKED_ADDRESSES:
            self._addresses[key] += 1
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._fire)

    def _fire(self) -> None:
        self._timer = None
        causes, addresses = self._causes, self._addresses
        self._causes, self._addresses = Counter(), Counter()
        self._report(causes, addresses)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._fire()


def _busiest(addresses: Counter[str]) -> str:
    return ", ".join(f"{key} ({count})" for key, count in addresses.most_common(3))


class ConnectionCounter:
    """The TCP/TLS connections of one worker, per client address and in total; and those
    closed for speaking neither TLS nor STUN."""

    def __init__(self, limits: ConnectionLimits, *, log_interval: float = 10.0) -> None:
        self.limits = limits
        self.log_interval = log_interval
        self.per_address: dict[str, int] = {}
        self.total = 0
        # Refusals since start, by cap ("per-address", "total").
        self.refused: Counter[str] = Counter()
        # Connections closed since start for their first byte, by what it was.
        self.not_turn: Counter[str] = Counter()
        self._refusals = _Window(log_interval, self._log_refusals)
        self._not_turn = _Window(log_interval, self._log_not_turn)

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
        self._refusals.add(cap, key)

    def _log_refusals(self, window: Counter[str], addresses: Counter[str]) -> None:
        causes = []
        if window["per-address"]:
            causes.append(
                f"{window['per-address']} over the cap of {self.limits.per_address}"
                " per client address"
            )
        if window["total"]:
            causes.append(f"{window['total']} over the cap of {self.limits.total} in total")
        fields = {
            "event": "refused",
            "cause": "connection cap",
            "count": sum(window.values()),
            "caps": dict(window),
            "interval": self.log_interval,
            "top": dict(addresses.most_common(3)),
        }
        log.warning(
            "refused %d TCP/TLS connections in the last %g s: %s; most from %s",
            sum(window.values()),
            self.log_interval,
            "; ".join(causes),
            _busiest(addresses),
            extra=structured(fields),
        )

    def closed_not_turn(self, ip: str, cause: str) -> None:
        """Count a connection closed because its first byte was not what the port takes;
        ``cause`` says what it was."""
        self.not_turn[cause] += 1
        self._not_turn.add(cause, address_key(ip))

    def _log_not_turn(self, window: Counter[str], addresses: Counter[str]) -> None:
        # Scanners do this to every open port all day: information, not a warning.
        fields = {
            "event": "refused",
            "cause": "neither TLS nor STUN",
            "count": sum(window.values()),
            "first_bytes": dict(window.most_common(3)),
            "interval": self.log_interval,
            "top": dict(addresses.most_common(3)),
        }
        log.info(
            "closed %d TCP/TLS connections in the last %g s that spoke neither TLS nor STUN"
            " (%s); most from %s",
            sum(window.values()),
            self.log_interval,
            ", ".join(f"{cause} x{count}" for cause, count in window.most_common(3)),
            _busiest(addresses),
            extra=structured(fields),
        )

    def close(self) -> None:
        self._refusals.close()
        self._not_turn.close()


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


# Makes a connection's protocol from: the function that un-counts the connection once it is
# gone, the loop time it was accepted at (its deadlines count from there), and whether it
# speaks TLS.
ProtocolFactory = Callable[[Callable[[], None], float, bool], asyncio.BaseProtocol]


class _Undecided:
    """An accepted connection whose first byte has not come yet."""

    __slots__ = ("accepted", "conn", "ip", "release", "timer")

    def __init__(
        self, conn: socket.socket, ip: str, release: Callable[[], None], accepted: float
    ) -> None:
        self.conn = conn
        self.ip = ip
        self.release = release
        self.accepted = accepted
        self.timer: asyncio.TimerHandle | None = None


class StreamListener:
    """Accepts connections on ``sock`` within ``counter``'s caps, and runs TLS (with
    ``ssl``) or plain TCP (with ``plain``) on each, as its first byte says.

    The first byte must come, and a TLS handshake end, within ``deadline`` seconds of
    accept (the allocation deadline, which the connection's protocol enforces from the same
    moment).

    What fails goes to ``failures`` (the driver's :attr:`~.driver.TurnDriver.failures`),
    logged per cause and client: a TLS handshake, with why (:func:`~.failures.tls_failure`:
    the client does not trust the certificate, offers no TLS version or cipher this server
    takes...); plain STUN on a port that takes only TLS (``--no-tcp``), and TLS on one that
    takes only plain TCP (``--no-tls``). A first byte that is neither TLS nor STUN (scanners
    do that all day) is summarised per interval by ``counter``.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol_factory: ProtocolFactory,
        counter: ConnectionCounter,
        *,
        ssl: Any = None,
        plain: bool = True,
        deadline: float = 10.0,
        failures: RefusalTally | None = None,
    ) -> None:
        if ssl is None and not plain:
            raise ValueError("a listener must take TLS or plain TCP")
        self._loop = loop
        self.sock = sock
        self._fd = sock.fileno()
        local = sock.getsockname()
        self._address: tuple[str, int] = (local[0], local[1])
        self._factory = protocol_factory
        self.counter = counter
        self._ssl = ssl
        self._plain = plain
        self._deadline = deadline
        self._failures = failures
        self._port = self.address[1]
        self._undecided: dict[int, _Undecided] = {}
        self._pending: set[asyncio.Task[None]] = set()
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False
        loop.add_reader(self._fd, self._accept)

    @property
    def address(self) -> tuple[str, int]:
        return self._address

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
            waiting = _Undecided(conn, addr[0], release, self._loop.time())
            fd = conn.fileno()
            self._undecided[fd] = waiting
            self._loop.add_reader(fd, self._first_byte, fd)
            waiting.timer = self._loop.call_at(waiting.accepted + self._deadline, self._silent, fd)

    def _first_byte(self, fd: int) -> None:
        waiting = self._undecided.get(fd)
        if waiting is None:
            return
        try:
            first = waiting.conn.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset by the client
            self._drop(fd)
            return
        if not first:  # the client closed without a word
            self._drop(fd)
            return
        kind = stream_kind(first[0])
        if (kind == "tls" and self._ssl is not None) or (kind == "plain" and self._plain):
            self._forget(fd)
            task = self._loop.create_task(self._start(waiting, tls=kind == "tls"))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
            return
        if kind == "tls":
            cause = "TLS, which this port does not take (--no-tls)"
        elif kind == "plain":
            cause = "plain STUN, which this port does not take (--no-tcp)"
        else:
            cause = f"first byte {_first_byte(first[0])}"
        if kind is not None and self._failures is not None:
            # A client of the wrong kind for this port: its own line, per client.
            self.counter.not_turn[cause] += 1
            if kind == "plain":
                failure = NOT_TLS
                facts: Facts = (
                    ("port", self._port),
                    ("reason", "plain STUN, and this port takes TLS only (--no-tcp)"),
                )
            else:
                failure = NOT_STUN
                facts = (
                    ("what", "TLS, and this port takes plain TCP only (--no-tls)"),
                    ("transport", "tcp"),
                    ("port", self._port),
                )
            self._failures.add(failure, waiting.ip, time.time(), facts=facts)
        else:
            self.counter.closed_not_turn(waiting.ip, cause)
        log.debug("TCP/TLS connection from %s closed: %s", waiting.ip, cause)
        self._drop(fd)

    def _silent(self, fd: int) -> None:
        waiting = self._undecided.get(fd)
        if waiting is not None:
            waiting.timer = None
            log.debug(
                "TCP/TLS connection from %s closed: nothing sent in %g s",
                waiting.ip,
                self._deadline,
            )
            self._drop(fd)

    def _forget(self, fd: int) -> _Undecided:
        waiting = self._undecided.pop(fd)
        self._loop.remove_reader(fd)
        if waiting.timer is not None:
            waiting.timer.cancel()
            waiting.timer = None
        return waiting

    def _drop(self, fd: int) -> None:
        # Unread bytes left in the kernel make close() send a reset.
        waiting = self._forget(fd)
        waiting.conn.close()
        waiting.release()

    async def _start(self, waiting: _Undecided, *, tls: bool) -> None:
        conn, release, accepted = waiting.conn, waiting.release, waiting.accepted

        def protocol() -> asyncio.BaseProtocol:
            return self._factory(release, accepted, tls)

        # The transport owns the socket from here, failed or not; it closes it.
        try:
            if not tls:
                await self._loop.connect_accepted_socket(protocol, conn)
                return
            left = accepted + self._deadline - self._loop.time()
            if left <= 0:
                conn.close()
                release()
                return
            await self._loop.connect_accepted_socket(
                protocol, conn, ssl=self._ssl, ssl_handshake_timeout=left
            )
        except asyncio.CancelledError:
            release()
            raise
        except Exception as exc:  # a failed or timed-out TLS handshake, a reset
            release()
            log.debug("TCP/TLS connection from %s not started: %r", waiting.ip, exc)
            if tls and self._failures is not None:
                cause, reason, code = tls_failure(exc, self._deadline)
                facts = (("port", self._port), ("reason", reason), ("tls_error", code))
                self._failures.add(cause, waiting.ip, time.time(), facts=facts)

    def _resume(self) -> None:
        self._retry = None
        if not self._closed:
            self._loop.add_reader(self._fd, self._accept)

    def close(self) -> None:
        """Stop accepting, and close the connections that have not said a word yet; those
        already started go on (the drain ends them)."""
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        else:
            self._loop.remove_reader(self._fd)
        self.sock.close()
        for fd in list(self._undecided):
            self._drop(fd)
