"""A TURN load generator: many allocations, a fixed offered rate, loss and round-trip times.

Every allocation is a client socket (UDP, TCP or TLS) to the server with a permission and,
in channel mode, a channel to an echo peer. Test messages carry the step, the allocation,
a sequence number and the send time; the peer sends each one back through the relay, so a
message that returns has been relayed twice (client -> peer and peer -> client).

The generator is one thread around ``epoll``, not asyncio: at tens of thousands of
messages per second the event loop's per-callback cost would be the bottleneck, and the
generator shares a two-core machine with the server it measures. Sends are paced against
the clock: on each wake-up (at most every millisecond) every message that has come due is
sent, round-robin over the allocations, so the offered rate holds whatever the wake-ups.

The echo peer is either an external UDP echo (``turnutils_peer``, say) or a socket in this
process that sends back everything it receives.
"""

from __future__ import annotations

import os
import random
import resource
import select
import socket
import ssl
import struct
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from . import procstat, wire
from .session import Phase, TurnSession

__all__ = ["LoadSpec", "run"]

_PROBE = struct.Struct("!HHIQ")  # step, allocation, sequence, send time (ns)
PROBE_BYTES = _PROBE.size
_CHANNEL = 0x4000
_STREAM_READ = 256 * 1024
_DRAIN_QUIET = 0.2
_DRAIN_MAX = 1.5
_SETUP_TICK = 0.05
# Client sockets: as large as the kernel allows without privileges, so that the
# generator's own buffers are not where packets are lost.
_CLIENT_BUFFER = 1 << 20


@dataclass(slots=True)
class LoadSpec:
    """What to run. Rates are messages per second from the clients towards the peer."""

    server: tuple[str, int]
    transport: str = "udp"  # udp, tcp, tls
    mode: str = "channel"  # channel, indication, allocate, binding
    allocations: int = 1
    username: str = ""
    password: str = ""
    rest_secret: str | None = None  # mint one REST credential per allocation
    # Long-term users to spread the allocations over: allocation i is user i mod ``users``,
    # with "{n}" in the username and password replaced by that number, so that each
    # allocation up to ``users`` makes the server look a new user up.
    users: int = 0
    peer: tuple[str, int] | None = None  # None: echo inside this process
    size: int = 100
    rates: list[float] = field(default_factory=list)
    interval: float | None = None  # seconds between messages of one allocation
    duration: float = 3.0
    warmup: float = 0.5
    setup_window: int = 32
    setup_timeout: float = 120.0
    hold: float = 0.0
    verify: bool = False
    release: bool = False
    stop_loss: float = 0.05  # end a rate ladder after a step with more loss than this
    server_pid: int | None = None
    binding_sockets: int = 4
    binding_window: int = 16
    fingerprint: bool = True


class _Conn:
    """One client socket, with its session and, once ready, its test message template."""

    __slots__ = (
        "buffer",
        "fd",
        "index",
        "outbuf",
        "session",
        "sock",
        "stream",
        "template",
    )

    def __init__(self, index: int, sock: socket.socket, session: TurnSession | None) -> None:
        self.index = index
        self.sock = sock
        self.fd = sock.fileno()
        self.session = session
        self.stream = sock.type == socket.SOCK_STREAM
        self.buffer = bytearray()
        self.outbuf = bytearray()
        self.template = bytearray()


class _Stats:
    __slots__ = ("lag", "late", "received", "rtts", "step", "strays")

    def __init__(self) -> None:
        self.step = 0
        self.lag = 0.0
        self.received = 0
        self.rtts: list[int] = []
        self.strays = 0
        self.late = 0


def _percentiles(values: list[int], scale: float) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    last = len(ordered) - 1

    def at(q: float) -> float:
        return round(ordered[min(last, int(q * len(ordered)))] * scale, 4)

    return {
        "p50": at(0.50),
        "p90": at(0.90),
        "p99": at(0.99),
        "max": round(ordered[-1] * scale, 4),
        "mean": round(sum(ordered) / len(ordered) * scale, 4),
    }


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed + 64:
        target = hard if hard == resource.RLIM_INFINITY else min(hard, max(needed + 64, soft))
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Server:
    """CPU and memory of the server under test, when its pid is known."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid

    def sample(self) -> procstat.ProcessSample | None:
        if self.pid is None:
            return None
        try:
            return procstat.sample(self.pid)
        except OSError:
            return None


class LoadGenerator:
    def __init__(self, spec: LoadSpec) -> None:
        if spec.transport not in ("udp", "tcp", "tls"):
            raise ValueError(f"unknown transport {spec.transport!r}")
        if spec.mode not in ("channel", "indication", "allocate", "binding"):
            raise ValueError(f"unknown mode {spec.mode!r}")
        if spec.mode != "binding" and spec.size < PROBE_BYTES:
            raise ValueError(f"messages carry at least {PROBE_BYTES} bytes")
        self.spec = spec
        self.epoll = select.epoll()
        self.conns: dict[int, _Conn] = {}
        self.ready: list[_Conn] = []
        self.stats = _Stats()
        self.server = _Server(spec.server_pid)
        self.rng = random.Random()
        self.echo: socket.socket | None = None
        self.peer: tuple[str, int] = spec.peer or ("", 0)
        self.verified: set[int] = set()
        self._ssl: ssl.SSLContext | None = None
        self._now_ns = time.perf_counter_ns
        self._payload_offset = 4
        self._pending_close: list[_Conn] = []

    # --- sockets --------------------------------------------------------------------------

    def _open_echo(self) -> None:
        family = socket.AF_INET6 if ":" in self.spec.server[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _CLIENT_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _CLIENT_BUFFER)
        sock.bind((self.spec.server[0], 0))
        sock.setblocking(False)
        self.echo = sock
        self.peer = sock.getsockname()[:2]
        self.epoll.register(sock.fileno(), select.EPOLLIN)

    def _echo_readable(self) -> None:
        sock = self.echo
        assert sock is not None
        recvfrom, sendto = sock.recvfrom, sock.sendto
        while True:
            try:
                data, addr = recvfrom(4096)
            except BlockingIOError:
                return
            try:
                sendto(data, addr)
            except OSError:
                pass

    def _connect(self, index: int) -> socket.socket:
        spec = self.spec
        family = socket.AF_INET6 if ":" in spec.server[0] else socket.AF_INET
        if spec.transport == "udp":
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _CLIENT_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _CLIENT_BUFFER)
            sock.connect(spec.server)
            sock.setblocking(False)
            return sock
        sock = socket.create_connection(spec.server, timeout=10.0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if spec.transport == "tls":
            if self._ssl is None:
                # A benchmark against a self-signed loopback certificate: no verification.
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                self._ssl = context
            sock = self._ssl.wrap_socket(sock, server_hostname=None)
        sock.setblocking(False)
        return sock

    def _send(self, conn: _Conn, data: bytes | bytearray) -> None:
        """Send a whole message; a stream queues what the kernel does not take."""
        if not conn.stream:
            try:
                conn.sock.send(data)
            except (BlockingIOError, ConnectionRefusedError):
                self.stats.late += 1
            return
        if conn.outbuf:
            conn.outbuf += data
            return
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            sent = 0
        if sent < len(data):
            conn.outbuf += data[sent:]
            self.epoll.modify(conn.fd, select.EPOLLIN | select.EPOLLOUT)

    def _flush(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.outbuf)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return
        del conn.outbuf[:sent]
        if not conn.outbuf:
            self.epoll.modify(conn.fd, select.EPOLLIN)

    def _read(self, conn: _Conn) -> list[bytes]:
        """Everything readable now: datagrams, or whole frames off a stream.

        A stream the server closed is closed here too, after its last frames are taken,
        so that an answer sent just before the close still counts.
        """
        sock = conn.sock
        if not conn.stream:
            out: list[bytes] = []
            while True:
                try:
                    out.append(sock.recv(4096))
                except (BlockingIOError, ConnectionRefusedError):
                    return out
        buffer = conn.buffer
        closed = False
        while True:
            try:
                chunk = sock.recv(_STREAM_READ)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except OSError:
                chunk = b""
            if not chunk:
                closed = True
                break
            buffer += chunk
        frames: list[bytes] = []
        offset = 0
        while True:
            try:
                length = wire.stream_frame_length(buffer, offset)
            except wire.WireError:
                closed = True
                break
            if length is None or offset + length > len(buffer):
                break
            frames.append(bytes(buffer[offset : offset + length]))
            offset += length
        del buffer[:offset]
        if closed:
            self._pending_close.append(conn)
        return frames

    def _close_pending(self) -> None:
        while self._pending_close:
            self._close(self._pending_close.pop())

    def _close(self, conn: _Conn) -> None:
        if self.conns.pop(conn.fd, None) is not None:
            try:
                self.epoll.unregister(conn.fd)
            except OSError:
                pass
            conn.sock.close()
            if conn.session is not None and not conn.session.done:
                conn.session.phase = Phase.FAILED
                conn.session.error = "connection closed by the server"

    # --- setup and release ----------------------------------------------------------------

    def _credentials(self, index: int) -> tuple[str, str]:
        spec = self.spec
        if spec.rest_secret is None:
            if spec.users:
                number = str(index % spec.users)
                return (
                    spec.username.replace("{n}", number),
                    spec.password.replace("{n}", number),
                )
            return spec.username, spec.password
        from ..auth.rest import mint_credentials

        return mint_credentials(spec.rest_secret, f"probe{index}", 86400, time.time())

    def _drive(
        self,
        conns: Iterable[_Conn],
        first: Callable[[_Conn, float], bytes],
        window: int,
        timeout: float,
        retry: Callable[[_Conn], _Conn | None] | None = None,
    ) -> tuple[int, float]:
        """Run sessions through ``first(...)`` and on to done, ``window`` at a time."""
        pending = deque(conns)
        active: dict[int, _Conn] = {}
        started = time.perf_counter()
        deadline = started + timeout
        next_tick = started + _SETUP_TICK
        completed = 0
        poll = self.epoll.poll
        while (pending or active) and time.perf_counter() < deadline:
            now = time.perf_counter()
            while pending and len(active) < window:
                conn = pending.popleft()
                if conn.fd not in self.conns:
                    self.conns[conn.fd] = conn
                    self.epoll.register(conn.fd, select.EPOLLIN)
                active[conn.fd] = conn
                self._send(conn, first(conn, now))
            for fd, events in poll(max(0.0, next_tick - time.perf_counter())):
                if fd in active:
                    conn = active[fd]
                    if events & select.EPOLLOUT:
                        self._flush(conn)
                    session = conn.session
                    assert session is not None
                    now = time.perf_counter()
                    for data in self._read(conn):
                        try:
                            reply = wire.parse_reply(data)
                        except wire.WireError:
                            continue
                        request = session.receive(reply, now)
                        if request is not None:
                            self._send(conn, request)
                    self._close_pending()
                    if session.done or conn.fd not in self.conns:
                        active.pop(fd, None)
                        completed += 1
                        if retry is not None and session.phase is Phase.FAILED:
                            again = retry(conn)
                            if again is not None:
                                pending.appendleft(again)
                elif self.echo is not None and fd == self.echo.fileno():
                    self._echo_readable()
                elif fd in self.conns:
                    self._read(self.conns[fd])  # late answers to sessions already done
                    self._close_pending()
            now = time.perf_counter()
            if now >= next_tick:
                next_tick = now + _SETUP_TICK
                for fd, conn in list(active.items()):
                    session = conn.session
                    assert session is not None
                    request = session.poll(now)
                    if request is not None:
                        self._send(conn, request)
                    if session.done:
                        active.pop(fd)
                        completed += 1
        for conn in active.values():
            assert conn.session is not None
            if not conn.session.done:
                conn.session.phase = Phase.FAILED
                conn.session.error = "setup time limit"
        return completed, time.perf_counter() - started

    def setup(self) -> dict[str, Any]:
        spec = self.spec
        _raise_fd_limit(spec.allocations + 16)
        channel = _CHANNEL if spec.mode in ("channel", "allocate") else None
        stream = spec.transport != "udp"
        conns: list[_Conn] = []

        def start(conn: _Conn, now: float) -> bytes:
            assert conn.session is not None
            return conn.session.start(now)

        # TCP/TLS clients connect when their session starts, so that connection set-up
        # counts towards the time of the allocation, as it does for a real client.
        def sessions() -> Iterable[_Conn]:
            for index in range(spec.allocations):
                username, password = self._credentials(index)
                session = TurnSession(
                    username,
                    password,
                    self.peer,
                    channel=channel,
                    random_bytes=self.rng.randbytes,
                    reliable=stream,
                    fingerprint=spec.fingerprint,
                )
                try:
                    sock = self._connect(index)
                except OSError as exc:
                    session.phase = Phase.FAILED
                    session.error = f"connect: {exc}"
                    failed_connects.append(session)
                    continue
                conn = _Conn(index, sock, session)
                conns.append(conn)
                yield conn

        def retry(conn: _Conn) -> _Conn | None:
            # 437 to the first Allocate: the kernel reused the port of an allocation the
            # server still holds (left by another client, or released a moment ago and
            # kept for late retransmissions). A real client would move to a new port, and
            # so does this one, up to three times.
            session = conn.session
            assert session is not None
            if session.error_code != 437 or session.failed_in is not Phase.ALLOCATE:
                return None
            if retried[conn.index] >= 3:
                return None
            retried[conn.index] += 1
            self._close(conn)
            try:
                sock = self._connect(conn.index)
            except OSError:
                return None
            fresh = TurnSession(
                session.username,
                session.password,
                self.peer,
                channel=channel,
                random_bytes=self.rng.randbytes,
                reliable=stream,
                fingerprint=spec.fingerprint,
            )
            again = _Conn(conn.index, sock, fresh)
            conns[conns.index(conn)] = again
            return again

        retried: Counter[int] = Counter()
        failed_connects: list[TurnSession] = []
        before = self.server.sample()
        cpu_before = _cpu_self()
        _, seconds = self._drive(sessions(), start, spec.setup_window, spec.setup_timeout, retry)
        after = self.server.sample()
        errors: Counter[str] = Counter()
        latencies: list[int] = []
        retransmissions = 0
        for conn in conns:
            session = conn.session
            assert session is not None
            retransmissions += session.retransmissions
            if session.phase is Phase.READY:
                self.ready.append(conn)
                assert session.started is not None and session.finished is not None
                latencies.append(int((session.finished - session.started) * 1e9))
            else:
                if session.started is None:
                    errors["not started within the set-up time limit"] += 1
                else:
                    errors[session.error or session.phase.value] += 1
        for session in failed_connects:
            errors[session.error or "connect"] += 1
        for conn in self.ready:
            self._prepare_template(conn)
        result: dict[str, Any] = {
            "requested": spec.allocations,
            "ready": len(self.ready),
            "failed": spec.allocations - len(self.ready),
            "errors": dict(errors.most_common(5)),
            "seconds": round(seconds, 4),
            "per_second": round(len(self.ready) / seconds, 1) if seconds > 0 else None,
            "latency_ms": _percentiles(latencies, 1e-6),
            "retransmissions": retransmissions,
            "new_ports": sum(retried.values()),
            "generator_cpu_s": round(_cpu_self() - cpu_before, 4),
        }
        result.update(_server_delta(before, after, len(self.ready), "allocation"))
        return result

    def release(self) -> dict[str, Any]:
        """Release every ready allocation with Refresh(LIFETIME 0)."""
        conns = [c for c in self.ready if c.fd in self.conns]

        def first(conn: _Conn, now: float) -> bytes:
            assert conn.session is not None
            return conn.session.release(now)

        before = self.server.sample()
        _, seconds = self._drive(conns, first, self.spec.setup_window, self.spec.setup_timeout)
        after = self.server.sample()
        released = sum(
            1 for c in conns if c.session is not None and c.session.phase is Phase.RELEASED
        )
        result: dict[str, Any] = {"released": released, "seconds": round(seconds, 4)}
        if before is not None and after is not None:
            result["server_rss_after"] = after.rss_bytes
        return result

    # --- the test messages ----------------------------------------------------------------

    def _prepare_template(self, conn: _Conn) -> None:
        """The bytes sent for each test message; the probe header is packed into them.

        Allocate mode binds a channel too, so that its allocations can be checked with
        ChannelData.
        """
        spec = self.spec
        payload = bytes(spec.size)
        if spec.mode == "indication":
            txid = self.rng.randbytes(12)
            message = wire.send_indication(txid, self.peer, payload)
            conn.template = bytearray(message)
            # The payload starts right after the DATA attribute header, the last one.
            self._payload_offset = len(message) - (-spec.size & 3) - spec.size
        else:
            conn.template = bytearray(wire.channel_data(_CHANNEL, payload, pad=conn.stream))
            self._payload_offset = 4

    def _on_test_message(self, data: bytes, now_ns: int) -> None:
        stats = self.stats
        first = data[0]
        if 0x40 <= first <= 0x7F:
            if len(data) < 4 + PROBE_BYTES:
                stats.strays += 1
                return
            step, index, _seq, sent_ns = _PROBE.unpack_from(data, 4)
        else:
            payload = wire.data_payload(data) if len(data) >= 20 else None
            if payload is None or len(payload) < PROBE_BYTES:
                stats.strays += 1
                return
            step, index, _seq, sent_ns = _PROBE.unpack_from(payload, 0)
        if step != stats.step:
            stats.strays += 1
            return
        stats.received += 1
        stats.rtts.append(now_ns - sent_ns)
        if step == 0:
            self.verified.add(index)

    def _service(self, timeout: float) -> None:
        """Wait up to ``timeout`` for input and handle all of it."""
        conns = self.conns
        echo_fd = self.echo.fileno() if self.echo is not None else -1
        now_ns = self._now_ns
        on_message = self._on_test_message
        for fd, events in self.epoll.poll(timeout):
            if fd == echo_fd:
                self._echo_readable()
                continue
            conn = conns.get(fd)
            if conn is None:
                continue
            if events & select.EPOLLOUT:
                self._flush(conn)
            if not conn.stream:
                recv = conn.sock.recv
                while True:
                    try:
                        data = recv(4096)
                    except (BlockingIOError, ConnectionRefusedError):
                        break
                    on_message(data, now_ns())
            else:
                for data in self._read(conn):
                    on_message(data, now_ns())
                self._close_pending()

    def _drain(self, sent: int) -> None:
        """Let the last messages come back: until all did, or nothing came for a while."""
        stats = self.stats
        end = time.perf_counter() + _DRAIN_MAX
        quiet_since = time.perf_counter()
        seen = stats.received
        while stats.received < sent:
            now = time.perf_counter()
            if now >= end or now - quiet_since >= _DRAIN_QUIET:
                break
            self._service(0.02)
            if stats.received != seen:
                seen = stats.received
                quiet_since = time.perf_counter()

    def _paced(self, rate: float, duration: float, step: int) -> tuple[int, float]:
        """Offer ``rate`` messages per second for ``duration``; return (sent, seconds).

        Messages are due at ``start + i / rate``; each wake-up sends all that are due, so a
        late wake-up turns into a burst rather than a lower rate. The largest lateness is
        kept in ``stats.lag``: a generator that cannot keep up shows there.
        """
        conns = [c for c in self.ready if c.fd in self.conns]
        if not conns:
            return 0, 0.0
        count = len(conns)
        pack_into = _PROBE.pack_into
        offset = self._payload_offset
        now_ns = self._now_ns
        clock = time.perf_counter
        send = self._send
        stats = self.stats
        stats.step = step
        stats.lag = 0.0
        total = int(duration * rate)
        sequence = 0
        turn = 0
        sent = 0
        start = clock()
        while sent < total:
            now = clock()
            due = min(int((now - start) * rate), total) - sent
            if due > 0:
                lag = now - start - (sent + 1) / rate
                if lag > stats.lag:
                    stats.lag = lag
            for _ in range(due):
                conn = conns[turn]
                turn += 1
                if turn == count:
                    turn = 0
                template = conn.template
                pack_into(template, offset, step, conn.index, sequence, now_ns())
                sequence += 1
                if conn.stream:
                    send(conn, template)
                else:
                    try:
                        conn.sock.send(template)
                    except (BlockingIOError, ConnectionRefusedError):
                        stats.late += 1
            if due > 0:
                sent += due
            if sent < total:
                # Sleep until the next message is due; epoll rounds up to whole
                # milliseconds, so at high rates each wake-up sends a batch.
                wait = start + (sent + 1) / rate - clock()
                self._service(wait if wait > 0 else 0.0)
        return sent, max(duration, clock() - start)

    def run_step(self, rate: float, duration: float, step: int) -> dict[str, Any]:
        stats = self.stats
        stats.received = 0
        stats.rtts = []
        stats.late = 0
        stats.strays = 0
        before = self.server.sample()
        cpu_before = _cpu_self()
        sent, seconds = self._paced(rate, duration, step)
        self._drain(sent)
        after = self.server.sample()
        generator_cpu = _cpu_self() - cpu_before
        received = stats.received
        loss = 1.0 - received / sent if sent else 1.0
        result: dict[str, Any] = {
            "offered_msgs_per_s": rate,
            "offered_relayed_pps": 2 * rate,
            "seconds": round(seconds, 4),
            "sent": sent,
            "received": received,
            "send_blocked": stats.late,
            "send_lag_ms_max": round(stats.lag * 1000, 3),
            "strays": stats.strays,
            "loss": round(max(0.0, loss), 6),
            "relayed_packets": 2 * received,
            "relayed_pps": round(2 * received / seconds, 1) if seconds else 0.0,
            "rtt_ms": _percentiles(stats.rtts, 1e-6),
            "generator_cpu_s": round(generator_cpu, 4),
            "generator_busy": round(generator_cpu / seconds, 3) if seconds else None,
        }
        result.update(_server_delta(before, after, 2 * received, "relayed_packet"))
        return result

    def verify(self) -> dict[str, Any]:
        """Send one message on every allocation; count the allocations that echo it back."""
        self.verified = set()
        conns = [c for c in self.ready if c.fd in self.conns]
        wanted = {c.index for c in conns}
        rounds = 0
        stats = self.stats
        stats.step = 0
        for rounds in range(1, 4):
            missing = [c for c in conns if c.index not in self.verified]
            if not missing:
                rounds -= 1
                break
            # Paced at 20k/s so that the check is not itself a burst that loses packets.
            start = time.perf_counter()
            for number, conn in enumerate(missing):
                _PROBE.pack_into(
                    conn.template, self._payload_offset, 0, conn.index, rounds, self._now_ns()
                )
                self._send(conn, conn.template)
                if number % 200 == 199:
                    self._service(max(0.0, start + (number + 1) / 20000 - time.perf_counter()))
            end = time.perf_counter() + 2.0
            while time.perf_counter() < end and not wanted <= self.verified:
                self._service(0.05)
        return {
            "allocations": len(conns),
            "relaying": len(self.verified & wanted),
            "rounds": rounds,
        }

    # --- STUN Binding ---------------------------------------------------------------------

    def binding(self) -> dict[str, Any]:
        """Closed loop: keep ``binding_window`` requests in flight on each socket."""
        spec = self.spec
        socks = []
        for _ in range(spec.binding_sockets):
            sock = self._connect(0) if spec.transport == "udp" else None
            if sock is None:
                raise ValueError("Binding load runs over UDP")
            socks.append(sock)
            self.epoll.register(sock.fileno(), select.EPOLLIN)
        by_fd = {s.fileno(): s for s in socks}
        kind = wire.message_type(wire.BINDING, wire.CLASS_REQUEST)
        header = struct.Struct("!HHI4sQ")  # type, length, cookie, 4 random bytes, send time
        salt = self.rng.randbytes(4)
        outstanding: dict[int, dict[bytes, int]] = {fd: {} for fd in by_fd}
        rtts: list[int] = []
        sent = received = lost = errors = 0
        now_ns = self._now_ns

        def send(fd: int) -> None:
            nonlocal sent
            stamp = now_ns()
            message = header.pack(kind, 0, wire.MAGIC_COOKIE, salt, stamp)
            outstanding[fd][message[8:20]] = stamp
            try:
                by_fd[fd].send(message)
            except BlockingIOError:
                pass
            sent += 1

        def run(seconds: float, count: bool) -> None:
            nonlocal received, lost, errors
            end = time.perf_counter() + seconds
            next_sweep = time.perf_counter() + 0.1
            while (now := time.perf_counter()) < end:
                for fd, _ in self.epoll.poll(min(0.05, end - now)):
                    sock = by_fd.get(fd)
                    if sock is None:
                        continue
                    pending = outstanding[fd]
                    while True:
                        try:
                            data = sock.recv(2048)
                        except (BlockingIOError, ConnectionRefusedError):
                            break
                        stamp = pending.pop(data[8:20], None)
                        if stamp is None:
                            continue
                        if count:
                            if (data[0] & 0x01, data[1] & 0x10) == (0x01, 0x00):
                                received += 1
                                rtts.append(now_ns() - stamp)
                            else:
                                errors += 1
                        send(fd)
                if time.perf_counter() >= next_sweep:
                    next_sweep = time.perf_counter() + 0.1
                    limit = now_ns() - 1_000_000_000
                    for fd, pending in outstanding.items():
                        for key, stamp in list(pending.items()):
                            if stamp < limit:
                                del pending[key]
                                if count:
                                    lost += 1
                                send(fd)

        for fd in by_fd:
            for _ in range(spec.binding_window):
                send(fd)
        run(spec.warmup, count=False)
        sent = 0
        before = self.server.sample()
        cpu_before = _cpu_self()
        started = time.perf_counter()
        run(spec.duration, count=True)
        seconds = time.perf_counter() - started
        after = self.server.sample()
        generator_cpu = _cpu_self() - cpu_before
        for sock in socks:
            self.epoll.unregister(sock.fileno())
            sock.close()
        result: dict[str, Any] = {
            "sockets": spec.binding_sockets,
            "window": spec.binding_window,
            "seconds": round(seconds, 4),
            "sent": sent,
            "responses": received,
            "errors": errors,
            "timed_out": lost,
            "per_second": round(received / seconds, 1) if seconds else 0.0,
            "rtt_ms": _percentiles(rtts, 1e-6),
            "generator_cpu_s": round(generator_cpu, 4),
            "generator_busy": round(generator_cpu / seconds, 3) if seconds else None,
        }
        result.update(_server_delta(before, after, received, "request"))
        return result

    # --- everything -----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        spec = self.spec
        result: dict[str, Any] = {"spec": _spec_dict(spec)}
        if spec.mode == "binding":
            result["binding"] = self.binding()
            return result
        if spec.peer is None:
            self._open_echo()
        result["setup"] = self.setup()
        if spec.hold > 0:
            end = time.perf_counter() + spec.hold
            while time.perf_counter() < end:
                self._service(min(0.2, max(0.0, end - time.perf_counter())))
            sample = self.server.sample()
            result["hold"] = {
                "seconds": spec.hold,
                "server_rss_bytes": sample.rss_bytes if sample else None,
            }
        if self.ready and spec.mode in ("channel", "indication"):
            rates = list(spec.rates)
            if spec.interval is not None:
                rates = [len(self.ready) / spec.interval]
            if spec.warmup > 0 and rates:
                self.run_step(rates[0], spec.warmup, 1)
            steps = []
            for number, rate in enumerate(rates, start=2):
                step = self.run_step(rate, spec.duration, number)
                steps.append(step)
                if step["loss"] > spec.stop_loss:
                    break
            result["steps"] = steps
        if spec.verify and self.ready:
            result["verify"] = self.verify()
        if spec.release and self.ready:
            result["release"] = self.release()
        return result

    def close(self) -> None:
        for conn in list(self.conns.values()):
            conn.sock.close()
        self.conns.clear()
        if self.echo is not None:
            self.echo.close()
        self.epoll.close()


def _server_delta(
    before: procstat.ProcessSample | None,
    after: procstat.ProcessSample | None,
    units: int,
    unit: str,
) -> dict[str, Any]:
    if before is None or after is None:
        return {}
    cpu = after.cpu_seconds - before.cpu_seconds
    out: dict[str, Any] = {
        "server_cpu_s": round(cpu, 4),
        "server_rss_before": before.rss_bytes,
        "server_rss_after": after.rss_bytes,
    }
    if units:
        out[f"server_cpu_us_per_{unit}"] = round(cpu / units * 1e6, 4)
        out[f"server_rss_bytes_per_{unit}"] = round((after.rss_bytes - before.rss_bytes) / units, 1)
    return out


def _spec_dict(spec: LoadSpec) -> dict[str, Any]:
    out = asdict(spec)
    out.pop("password", None)
    out.pop("rest_secret", None)
    return out


def run(spec: LoadSpec) -> dict[str, Any]:
    """Run ``spec`` and return the report (a JSON-able dict)."""
    generator = LoadGenerator(spec)
    try:
        result = generator.run()
    finally:
        generator.close()
    result["generator_pid"] = os.getpid()
    return result
