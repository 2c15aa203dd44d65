"""Helpers for tests that run the real ``tsunagu serve`` process on loopback.

Used by tests/interop (third-party clients) and tests/transport (runtime behaviour such as
draining). Every process started here is bounded in time and ended by its PID.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aioice.stun
import aioice.turn

from support.audit import audit_records, worker_count
from tsunagu.admin.client import request

HOST = "127.0.0.1"
HOST6 = "::1"
USER = "alice"
PASSWORD = "secret"
READY_LINE = "tsunagu: ready"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0
ROOT = Path(__file__).resolve().parents[2]

# Relay ranges come from below the kernel's ephemeral range (32768 and up on Linux), so
# that client sockets and servers' ports picked with port 0 never fall inside them.
_RELAY_LOW = 10000
_RELAY_HIGH = 32000
# Handed out by this process: servers started side by side get distinct ports and ranges
# even before the first of them has bound anything. Only the latest ranges are kept: a test
# runs a few servers at once, and a whole run's ranges would fill the window (22,000 ports).
_given_ports: set[int] = set()
_given_ranges: collections.deque[tuple[int, int]] = collections.deque(maxlen=16)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _bindable(port: int, kinds: Sequence[int]) -> bool:
    """Whether ``port`` is free on both loopback addresses for every socket kind."""
    for host in (HOST, HOST6):
        for kind in kinds:
            with socket.socket(_family(host), kind) as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    return False
    return True


def free_port(*, udp: bool = True, tcp: bool = True, pair: bool = False) -> int:
    """A port the kernel hands out that is free for UDP and TCP (and port+1 too if ``pair``)."""
    kinds = [k for k, wanted in ((socket.SOCK_DGRAM, udp), (socket.SOCK_STREAM, tcp)) if wanted]
    for _ in range(100):
        with socket.socket(socket.AF_INET, kinds[0]) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port >= 65535 or {port, port + 1} & _given_ports:
            continue
        if _bindable(port, kinds) and (not pair or _bindable(port + 1, kinds)):
            _given_ports.update((port, port + 1) if pair else (port,))
            return port
    raise RuntimeError("no free port found")


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports, each free for both UDP and TCP."""
    ports: list[int] = []
    for _ in range(10 * count):
        port = free_port()
        if port not in ports:
            ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError("no free ports found")


def relay_range(size: int = 100) -> tuple[int, int]:
    """A window of ``size`` UDP ports, all free right now if possible.

    Other programs on the machine may hold ports scattered over any range; the server skips
    a port in use, so a window with a few of them still serves.
    """
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    best: tuple[int, int] | None = None
    for _ in range(40):
        start = rng.randrange(_RELAY_LOW, _RELAY_HIGH - size) // 10 * 10
        if any(start <= high and low < start + size for low, high in _given_ranges):
            continue
        free = sum(_bindable(port, [socket.SOCK_DGRAM]) for port in range(start, start + size))
        if free == size:
            best = (free, start)
            break
        if best is None or free > best[0]:
            best = (free, start)
    if best is None or best[0] < size * 3 // 4:
        raise RuntimeError("no free relay port range found")
    _given_ranges.append((best[1], best[1] + size - 1))
    return _given_ranges[-1]


@dataclass
class ServeProcess:
    """A running ``tsunagu serve`` with its ports, output files and audit log."""

    tmp: Path
    extra: Sequence[str]
    hosts: Sequence[str]
    drain_timeout: float | None
    """None: not on the command line (a configuration file gives it)."""
    min_port: int
    max_port: int
    allowed_peers: bool = True
    web: bool = False
    """Serve the web app too (on ``web_port``); by default ``--no-web``."""
    process: subprocess.Popen[bytes] = field(init=False)
    web_port: int = 0
    port: int = 0
    tls_port: int = 0
    alt_port: int = 0
    """The alternate port of NAT behaviour discovery (it listens there with --rfc5780)."""
    startup: list[str] = field(default_factory=list)
    terminated: bool = False

    @property
    def host(self) -> str:
        return self.hosts[0]

    @property
    def stdout_path(self) -> Path:
        return self.tmp / "serve.stdout"

    @property
    def log_path(self) -> Path:
        return self.tmp / "serve.log"

    @property
    def state_dir(self) -> Path:
        return self.tmp / "state"

    def launch(self) -> None:
        """Start the process on freshly picked ports (again, if they were taken meanwhile)."""
        self.port, self.tls_port, self.alt_port = free_ports(3)
        if self.web:
            self.web_port = free_port(udp=False)
        command = [
            sys.executable,
            "-m",
            "tsunagu",
            "serve",
            *(arg for host in self.hosts for arg in ("-L", host)),
            *(
                arg
                for host in (self.hosts if self.allowed_peers else ())
                for arg in ("--allowed-peer-ip", host)
            ),
            "-p",
            str(self.port),
            "--tls-listening-port",
            str(self.tls_port),
            "--alt-listening-port",
            str(self.alt_port),
            *(("--web-port", str(self.web_port)) if self.web else ("--no-web",)),
            "-u",
            f"{USER}:{PASSWORD}",
            "--min-port",
            str(self.min_port),
            "--max-port",
            str(self.max_port),
            *(() if self.drain_timeout is None else ("--drain-timeout", str(self.drain_timeout))),
            "--log-file",
            str(self.log_path),
            # As many worker processes as the server picks by default (one per usable core),
            # unless a test asks otherwise: what users run. Every worker appends to the log.
            *self.extra,
        ]
        env = dict(os.environ, XDG_STATE_HOME=str(self.state_dir), PYTHONUNBUFFERED="1")
        self.log_path.write_bytes(b"")
        with open(self.stdout_path, "wb") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def admin_socket(self) -> str:
        """Where the server's admin socket is (in its state directory)."""
        return str(self.state_dir / "tsunagu" / "admin.sock")

    def ask(self, payload: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """One admin request on the server's socket, which must succeed."""
        answer = request(self.admin_socket, payload, timeout)
        assert answer["ok"] is True, answer
        return answer

    @property
    def cert_path(self) -> Path:
        match = re.search(r"TLS certificate (\S+)", "\n".join(self.startup))
        assert match is not None, self.startup
        return Path(match.group(1))

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def workers(self) -> int:
        """How many worker processes serve TURN (known once the server is ready)."""
        return worker_count(self.startup)

    def audit_records(self) -> list[dict[str, Any]]:
        """The JSON records every worker wrote on the ``tsunagu.audit`` logger so far."""
        return audit_records(self.log_text())

    def wait_for_log(self, text: str, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log_text():
                return True
            time.sleep(0.02)
        return text in self.log_text()

    async def wait_for_log_async(self, text: str, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log_text():
                return True
            await asyncio.sleep(0.02)
        return text in self.log_text()

    def send_signal(self, signum: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signum)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    async def wait_async(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                return code
            await asyncio.sleep(0.02)
        return self.process.poll()

    def wait_ready(self, timeout: float = START_TIMEOUT, attempts: int = 3) -> None:
        """Wait (bounded) for the "tsunagu: ready" line.

        Between picking a free port and binding it, another program on the machine may
        take it; the server then exits saying so, and starts again on other ports.
        """
        for attempt in range(attempts):
            if self.startup:
                return
            try:
                self.startup = _wait_ready(self, time.monotonic() + timeout)
            except RuntimeError:
                if attempt + 1 == attempts or "cannot listen" not in self.log_text():
                    raise
                self.launch()

    def terminate(self) -> None:
        """Send the first SIGTERM (drain) once; a second one would exit at once."""
        if not self.terminated:
            self.terminated = True
            self.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait a bounded time, then SIGABRT (the server's fault handler writes
        every thread's stack to its output: why it did not stop) and SIGKILL if need be;
        return the exit status."""
        self.terminate()
        code = self.wait(timeout)
        if code is None:
            # Where each asyncio task waits (the server logs it), then every thread's stack.
            for pid in _process_tree(self.process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGUSR1)
            code = self.wait(1)
        if code is None:
            self.send_signal(signal.SIGABRT)
            code = self.wait(5)
        if code is None:
            self.process.kill()
            code = self.process.wait(timeout=5)
        return code


def _process_tree(pid: int) -> list[int]:
    found = [pid]
    for current in found:
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
            found.extend(int(child) for child in children)
    return found


def _wait_ready(server: ServeProcess, deadline: float) -> list[str]:
    while time.monotonic() < deadline:
        lines = server.stdout_path.read_text(errors="replace").splitlines()
        if READY_LINE in lines:
            return lines
        if server.process.poll() is not None:
            raise RuntimeError(
                f"tsunagu serve exited with {server.process.returncode}:\n"
                + "\n".join(lines)
                + "\n"
                + server.log_text()
            )
        time.sleep(0.02)
    raise RuntimeError("tsunagu serve was not ready in time:\n" + server.log_text())


@contextlib.contextmanager
def run_serve(
    tmp: Path,
    *extra: str,
    hosts: Sequence[str] = (HOST,),
    drain_timeout: float | None = 1.0,
    relay_ports: int = 100,
    check_exit: bool = True,
    wait_ready: bool = True,
    allowed_peers: bool = True,
    web: bool = False,
) -> Iterator[ServeProcess]:
    """Start ``tsunagu serve`` on loopback with fresh ports; stop it by PID afterwards.

    It listens on ``hosts`` and allows peers there (unless ``allowed_peers`` is false:
    then loopback peers are denied, as by default); clients use the first of them. With
    ``wait_ready`` false the caller waits, with :meth:`ServeProcess.wait_ready`, so that
    several servers can start side by side.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    low, high = relay_range(relay_ports)
    server = ServeProcess(tmp, extra, hosts, drain_timeout, low, high, allowed_peers, web)
    server.launch()
    try:
        if wait_ready:
            server.wait_ready()
        yield server
    finally:
        code = server.stop()
    if check_exit:
        output = server.stdout_path.read_text(errors="replace")[-6000:]
        assert code == 0, f"tsunagu serve exited with {code}:\n{server.log_text()}\n{output}"


@dataclass
class EchoPeer:
    """``turnutils_peer``: a UDP echo server on port and port+1."""

    process: subprocess.Popen[bytes]
    host: str
    port: int


@contextlib.contextmanager
def run_turnutils_peer(tmp: Path, host: str = HOST) -> Iterator[EchoPeer]:
    port = free_port(tcp=False, pair=True)
    with open(tmp / f"peer-{port}.out", "wb") as out:
        process = subprocess.Popen(
            ["turnutils_peer", "-L", host, "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        _wait_udp_echo(process, host, port)
        yield EchoPeer(process, host, port)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def _wait_udp_echo(
    process: subprocess.Popen[bytes], host: str, port: int, timeout: float = 10.0
) -> None:
    """Poll the peer until it echoes, so that no test races its start."""
    deadline = time.monotonic() + timeout
    with socket.socket(_family(host), socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.1)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"turnutils_peer exited with {process.returncode}")
            sock.sendto(b"ping", (host, port))
            try:
                if sock.recv(64) == b"ping":
                    return
            except (TimeoutError, ConnectionRefusedError):
                continue
    raise RuntimeError("turnutils_peer did not echo in time")


# --- small asyncio peers and a TURN client wrapper around aioice ---------------------------


class UdpEcho(asyncio.DatagramProtocol):
    """An asyncio UDP echo server that counts what it echoed."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.received: list[tuple[bytes, tuple[str, int]]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append((data, addr))
        assert self.transport is not None
        self.transport.sendto(data, addr)


@contextlib.asynccontextmanager
async def udp_echo_server(host: str = HOST) -> Any:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(UdpEcho, local_addr=(host, 0))
    try:
        yield protocol, transport.get_extra_info("sockname")[:2]
    finally:
        transport.close()


class Collector(asyncio.DatagramProtocol):
    """What a TURN client's application side receives."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
        self.errors: list[Exception] = []
        self.closed = asyncio.Event()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait((data, addr))

    def error_received(self, exc: Exception) -> None:
        self.errors.append(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()

    async def next(self, timeout: float = 5.0) -> tuple[bytes, tuple[str, int]]:
        return await asyncio.wait_for(self.queue.get(), timeout)


@dataclass
class TurnClient:
    """An aioice TURN allocation and the protocol that sees its data."""

    transport: aioice.turn.TurnTransport
    app: Collector

    @property
    def relayed(self) -> tuple[str, int]:
        address = self.transport.get_extra_info("sockname")
        return (address[0], address[1])

    @property
    def mapped(self) -> tuple[str, int]:
        address = self.transport.get_extra_info("related_address")
        return (address[0], address[1])

    async def echo(self, payload: bytes, peer: tuple[str, int], timeout: float = 5.0) -> bytes:
        """Send ``payload`` to ``peer`` through the relay and return what comes back."""
        self.transport.sendto(payload, peer)
        data, addr = await self.app.next(timeout)
        assert addr == peer
        return data

    @property
    def inner(self) -> Any:
        """aioice's protocol under the transport: the STUN client talking to the server."""
        return self.transport._TurnTransport__inner_protocol  # type: ignore[attr-defined]

    async def close(self, timeout: float = 5.0) -> None:
        """Delete the allocation (Refresh with LIFETIME 0) and wait until it is gone."""
        self.transport.close()
        await asyncio.wait_for(self.app.closed.wait(), timeout)

    async def abort(self, timeout: float = 5.0) -> None:
        """Drop the socket to the server without deleting the allocation."""
        self.inner.transport.close()
        await asyncio.wait_for(self.app.closed.wait(), timeout)
        # Stops aioice's refresh task; it sends nothing now that its socket is closed.
        self.transport.close()

    async def request(self, message: aioice.stun.Message, timeout: float = 5.0) -> Any:
        """One authenticated STUN transaction on the allocation's connection."""
        return await asyncio.wait_for(self.inner.request_with_retry(message), timeout)


async def turn_allocate(
    server: ServeProcess,
    transport: str = "udp",
    *,
    username: str = USER,
    password: str = PASSWORD,
    ssl: Any = None,
    timeout: float = 10.0,
) -> TurnClient:
    """Allocate with aioice over ``transport`` ("udp" or "tcp"; "tcp" with ``ssl`` is TLS)."""
    port = server.tls_port if ssl is not None else server.port
    turn_transport, app = await asyncio.wait_for(
        aioice.turn.create_turn_endpoint(
            Collector,
            server_addr=(server.host, port),
            username=username,
            password=password,
            ssl=ssl,
            transport=transport,
        ),
        timeout,
    )
    return TurnClient(turn_transport, app)


def error_code(exc: BaseException) -> int | None:
    """The STUN error code of a failed aioice transaction, if that is what ``exc`` is."""
    if isinstance(exc, aioice.stun.TransactionFailed):
        code = exc.response.attributes.get("ERROR-CODE")
        return None if code is None else int(code[0])
    return None


def address_field(address: tuple[str, int]) -> str:
    """How the audit log writes a transport address: IPv6 in brackets."""
    ip, port = address[0], address[1]
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def client_field(protocol: str, client: tuple[str, int], server: tuple[str, int]) -> str:
    """How the audit log names a client's 5-tuple."""
    return f"{protocol}:{address_field(client)}->{address_field(server)}"


def binding_answered(port: int, host: str = HOST) -> bool:
    """A STUN server on UDP ``port`` answers a Binding request within 0.2 s."""
    with socket.socket(_family(host), socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        request = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + os.urandom(12)
        try:
            sock.sendto(request, (host, port))
            return sock.recv(2048)[8:20] == request[8:20]
        except OSError:
            return False


@dataclass(frozen=True)
class Coturn:
    """A running coturn ``turnserver`` with user ``USER``/``PASSWORD`` in realm tsunagu."""

    process: subprocess.Popen[bytes]
    port: int
    tls_port: int
    log_path: Path


@contextlib.contextmanager
def run_coturn(
    tmp: Path,
    *extra: str,
    relay_ports: int = 100,
    loopback_peers: bool = True,
    tls: tuple[Path, Path] | None = None,
) -> Iterator[Coturn]:
    """Start coturn on loopback with fresh ports, ready once it answers a Binding; stop it.

    ``loopback_peers`` false leaves out ``--allow-loopback-peers`` (coturn's default: a
    loopback peer gets 403); ``tls`` is ``(cert, key)`` for its TLS listener (else none).
    """
    tmp.mkdir(parents=True, exist_ok=True)
    port, tls_port = free_ports(2)
    low, high = relay_range(relay_ports)
    command = [
        "turnserver",
        "-n",
        "--no-cli",
        "--log-file",
        "stdout",
        "--pidfile",
        str(tmp / "turnserver.pid"),
        "--userdb",
        str(tmp / "turndb"),
        "--listening-ip",
        HOST,
        "-p",
        str(port),
        "--tls-listening-port",
        str(tls_port),
        "--relay-ip",
        HOST,
        "--min-port",
        str(low),
        "--max-port",
        str(high),
        "--realm",
        "tsunagu",
        "--lt-cred-mech",
        "--user",
        f"{USER}:{PASSWORD}",
        *(["--allow-loopback-peers"] if loopback_peers else []),
        *(["--cert", str(tls[0]), "--pkey", str(tls[1])] if tls else ["--no-tls"]),
        "--no-dtls",
        *extra,
    ]
    log_path = tmp / "coturn.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not binding_answered(port):
            assert process.poll() is None, log_path.read_text(errors="replace")
            assert time.monotonic() < deadline, "coturn did not answer a Binding in 20 s"
            time.sleep(0.05)
        yield Coturn(process, port, tls_port, log_path)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


UCLIENT_SUMMARY = re.compile(r"start_mclient: tot_send_msgs=(\d+), tot_recv_msgs=(\d+)")
"""turnutils_uclient's closing "start_mclient: tot_send_msgs=N, tot_recv_msgs=M" (its
progress lines carry "msz=..." before the counters and are not matched)."""


def uclient_command(
    port: int,
    peer: tuple[str, int],
    *flags: str,
    messages: int,
    clients: int,
    length: int | None = None,
    host: str = HOST,
    user: str = USER,
    password: str = PASSWORD,
) -> list[str]:
    """coturn's ``turnutils_uclient``: ``clients`` clients of ``user`` on ``host:port`` each
    send ``messages`` messages (of ``length`` bytes) to ``peer`` and count what comes back;
    ``flags`` are uclient's own (``-t`` TCP, ``-S`` TLS, ``-c`` no RTCP allocation...)."""
    command = ["turnutils_uclient", *flags, "-u", user, "-w", password]
    command += ["-e", peer[0], "-r", str(peer[1]), "-n", str(messages), "-m", str(clients)]
    if length is not None:
        command += ["-l", str(length)]
    return [*command, "-p", str(port), host]


UCLIENT_CHANNEL_REDRAW = re.compile(
    r"channel bind: error 400 \((?:Bad Request: channel is bound to another peer"
    r"|You cannot use the same channel number with different peer)\)"
)
"""uclient's exit when it drew, for its peer, the channel it had just bound to the peer's
port + 1, in tsunagu's words or coturn's.

Each uclient client binds a random channel (0x4000-0x7FFF) to ``peer port + 1``, then
draws another for ``peer`` without leaving the first out: one client in 16,384 draws the
same number, the server must refuse a channel for a second peer (RFC 8656 section 12, 400),
and uclient exits. A hundred clients hit it once in 164 runs, against either server."""


def run_bounded(command: list[str], timeout: float) -> tuple[int, str]:
    """Run a client tool to completion, killing it by PID if it overstays."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate(timeout=5)
        raise AssertionError(
            f"{command[0]} did not finish in {timeout}s:\n{out.decode()}"
        ) from None
    return process.returncode, out.decode(errors="replace")


def uclient_redrew_a_channel(code: int, output: str) -> bool:
    """Whether a uclient run ended on its own channel draw (``UCLIENT_CHANNEL_REDRAW``) and
    nothing else: run once more, it draws again."""
    return code != 0 and UCLIENT_CHANNEL_REDRAW.search(output) is not None


def run_uclient(command: list[str], timeout: float) -> tuple[int, str]:
    """``run_bounded`` for uclient, run a second time (only) when the first ended on its
    channel draw; each run has the whole ``timeout``."""
    code, output = run_bounded(command, timeout)
    if uclient_redrew_a_channel(code, output):
        code, output = run_bounded(command, timeout)
    return code, output


async def allocation_or_none(
    server: ServeProcess, username: str, password: str, timeout: float = 10.0
) -> Any:
    """An aioice allocation on ``server`` over UDP, kept open (its transport), or None when
    the server refused it (aioice raises its own error for an error response)."""
    try:
        transport, _ = await asyncio.wait_for(
            aioice.turn.create_turn_endpoint(
                Collector,
                server_addr=(server.host, server.port),
                username=username,
                password=password,
            ),
            timeout,
        )
    except Exception:
        return None
    return transport
