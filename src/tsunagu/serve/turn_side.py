"""The STUN/TURN side of one worker: the core and its driver, its listeners (with several
workers, on sockets worker 0 bound for all of them and keeps), the multi-worker start (no UDP
read until every worker serves) and the drain."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

from ..auth.store import StaticCredentialStore
from ..config import Config
from ..transport.admission import ConnectionCounter, StreamListener, stream_socket
from ..transport.driver import TurnDriver
from ..transport.engine import EngineUnavailable, RelayEngine, load_engine
from ..transport.listeners import StreamConnection, StreamLimits, UdpListener
from ..transport.relay import UdpRelayBinder
from ..turn import TurnServer
from ..workers import WorkerShare
from .banner import bracket
from .settings import (
    Endpoints,
    aux_addresses,
    connection_limits,
    credential_store,
    settings_from_config,
    static_users,
    tls_enabled,
    turn_endpoints,
)
from .userdb import WorkerUserDatabase, open_worker_database

log = logging.getLogger("tsunagu")


# Matching coturn's listener buffers, so that bursts are compared fairly.
LISTENER_BUFFER_BYTES = 2 * 1024 * 1024


def _discard_queued(sock: socket.socket, limit: int = 100_000) -> int:
    """Read and drop what ``sock`` holds now (at most ``limit`` datagrams); how many."""
    sock.setblocking(False)
    dropped = 0
    for _ in range(limit):
        try:
            sock.recv(1)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            continue  # a queued ICMP error, reported once
        dropped += 1
    return dropped


def _check_free(kind: str, ip: str, port: int) -> None:
    """Fail if another process holds a port the workers are about to share.

    SO_REUSEPORT would otherwise let a second server started by mistake on the same port
    bind it too and silently take part of the traffic. A socket bound without the option
    fails with EADDRINUSE whenever anyone holds the port.
    """
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    stream = kind == "tcp"
    with socket.socket(family, socket.SOCK_STREAM if stream else socket.SOCK_DGRAM) as probe:
        if stream:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((ip, port))


def _udp_socket(ip: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if reuse_port:
            # Workers share the port; the kernel hashes each client's 4-tuple to one of them,
            # so a client's allocation always lives in the same worker.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if ":" in ip:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, LISTENER_BUFFER_BYTES)
        sock.bind((ip, port))
    except OSError:
        sock.close()
        raise
    return sock


@dataclass
class WorkerSockets:
    """One worker's listening sockets, in the order of its endpoints (:class:`Endpoints`):
    UDP, then TCP (every TCP one serves TLS too)."""

    udp: list[socket.socket] = field(default_factory=list)
    tcp: list[socket.socket] = field(default_factory=list)

    def fds(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return tuple(s.fileno() for s in self.udp), tuple(s.fileno() for s in self.tcp)

    @classmethod
    def from_fds(cls, udp: tuple[int, ...], tcp: tuple[int, ...]) -> WorkerSockets:
        """The sockets worker 0 bound for this worker and passed on at its start."""
        return cls(
            [socket.socket(fileno=fd) for fd in udp], [socket.socket(fileno=fd) for fd in tcp]
        )

    def close_tcp(self) -> None:
        for sock in self.tcp:
            sock.close()
        self.tcp.clear()

    def close(self) -> None:
        for sock in self.udp:
            sock.close()
        self.udp.clear()
        self.close_tcp()


def worker_endpoints(
    config: Config, listening: list[str], ssl_context: ssl.SSLContext | None
) -> Endpoints:
    """Where each worker listens."""
    return turn_endpoints(
        config, listening, aux_addresses(config), tls=tls_enabled(config, ssl_context)
    )


def _cannot_listen(kind: str, ip: str, port: int, exc: OSError) -> None:
    log.error("cannot listen on %s:%d (%s): %s", bracket(ip), port, kind, exc.strerror or exc)


def bind_sockets(endpoints: Endpoints, *, reuse_port: bool) -> WorkerSockets:
    """Bind one worker's listening sockets; raise OSError (what was bound closed, the
    address named in the log) if one cannot be."""
    bound = WorkerSockets()
    for kind, addresses in (("udp", endpoints.udp), ("tcp", endpoints.tcp)):
        for ip, port in addresses:
            try:
                if kind == "udp":
                    bound.udp.append(_udp_socket(ip, port, reuse_port=reuse_port))
                else:
                    bound.tcp.append(stream_socket(ip, port, reuse_port=reuse_port))
            except OSError as exc:
                _cannot_listen(kind, ip, port, exc)
                bound.close()
                raise
    return bound


def bind_every_worker(endpoints: Endpoints, workers: int) -> list[WorkerSockets] | None:
    """Worker 0 binds the sockets of every worker, in worker order, before any starts; None
    (after logging why) if it cannot.

    A port's sockets form one SO_REUSEPORT group, and the kernel picks a client's socket by
    a hash of its addresses over the group's sockets in order. Worker 0 keeps a copy of each
    (it passes them to the workers and never reads them): when a worker dies, its socket
    stays in the group, in its place, and its replacement takes it over. Had the socket
    closed with the process, the kernel would move the group's last socket into its place
    and hash every client over one socket fewer until the replacement bound a new one: the
    clients of every other worker sent, meanwhile, to a worker that does not know them, and
    the last worker's clients for good.
    """
    for kind, addresses in (("udp", endpoints.udp), ("tcp", endpoints.tcp)):
        for ip, port in addresses:
            try:
                _check_free(kind, ip, port)
            except OSError as exc:
                _cannot_listen(kind, ip, port, exc)
                return None
    every: list[WorkerSockets] = []
    try:
        for _ in range(workers):
            every.append(bind_sockets(endpoints, reuse_port=True))
    except OSError:
        for sockets in every:
            sockets.close()
        return None
    return every


@dataclass
class TurnSide:
    """The running STUN/TURN side of one worker: the core's driver and its listeners."""

    driver: TurnDriver
    engine: RelayEngine
    servers: list[StreamListener] = field(default_factory=list)
    udp_listeners: list[UdpListener] = field(default_factory=list)
    counter: ConnectionCounter | None = None
    endpoints: Endpoints = Endpoints((), (), ())
    users: WorkerUserDatabase | None = None
    store: StaticCredentialStore | None = None
    listening: tuple[str, ...] = ()
    waiting_udp: list[socket.socket] = field(default_factory=list)
    """UDP sockets bound but not read yet: with several workers, until all have bound."""

    def close_listeners(self) -> None:
        for listener in self.udp_listeners:
            listener.close()
        for sock in self.waiting_udp:
            sock.close()
        for server in self.servers:
            server.close()

    async def start_udp(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve the waiting UDP sockets, dropping what arrived before every worker
        served.

        Every worker's sockets are bound before any worker starts (:func:`bind_every_worker`),
        so a client reaches one worker from its first datagram; but what queued while a
        worker was starting is old by now (at start nothing is allocated, and STUN clients
        send again within a second), and so is what a dead worker's clients sent to it
        before its replacement took its sockets over (their allocations died with it).
        """
        dropped = 0
        for sock in self.waiting_udp:
            dropped += _discard_queued(sock)
            self.udp_listeners.append(await self.engine.udp_listener(self.driver, sock, loop))
        self.waiting_udp.clear()
        if dropped:
            log.info(
                "worker %d: %d datagrams that came before every worker listened were dropped",
                self.driver.worker,
                dropped,
            )

    def reconfigure(self, config: Config, secrets: tuple[str, ...]) -> None:
        """Apply a reloaded ``config``'s users, secrets, peer ranges, quotas, bandwidth
        limits, alternate servers and TCP/TLS connection caps
        (:data:`~tsunagu.config_reload.LIVE`)."""
        assert self.store is not None and self.users is not None
        if self.counter is not None:
            # For the next connections; those above a lowered cap stay until they end.
            self.counter.limits = connection_limits(config)
        self.store.replace_static(
            static_users(config),
            secrets,
            check_expiry_on_existing=config.rest_check_on_refresh,
        )
        server = self.driver.server
        server.reconfigure(settings_from_config(config, self.listening, self.endpoints.aux))
        self.users.reconfigure(config, server)


async def start_turn_side(
    config: Config,
    share: WorkerShare,
    listening: list[str],
    secrets_in_use: tuple[str, ...],
    ssl_context: ssl.SSLContext | None,
    sockets: WorkerSockets | None = None,
) -> TurnSide | None:
    """Build the core and serve every listener: on ``sockets`` (with several workers, those
    worker 0 bound for this one, see :func:`bind_every_worker`), else on sockets bound now.
    None (after logging why) if that fails; the caller closes ``sockets`` then."""
    loop = asyncio.get_running_loop()
    rng = random.SystemRandom()
    reuse_port = config.workers > 1
    tls = tls_enabled(config, ssl_context)
    endpoints = worker_endpoints(config, listening, ssl_context)
    settings = dataclasses.replace(
        settings_from_config(config, tuple(listening), endpoints.aux),
        nonce_secret=share.nonce_secret,
        shared_reservations=reuse_port,
        port_share=(share.index, config.workers),
    )
    try:
        engine = load_engine(config.relay_engine)
    except EngineUnavailable as exc:
        log.error("%s", exc)
        return None
    binder = UdpRelayBinder(loop, rng.randbytes, engine.relay_endpoint)
    store = credential_store(config, secrets_in_use)
    users = await open_worker_database(config, store)
    if users is None:
        return None
    server = TurnServer(settings, store, binder, rng)
    driver = TurnDriver(server, loop, engine, worker=share.index, lookups=users.lookups)
    await users.follow_peer_ranges(server)
    await users.follow_realm_options(server, config)
    await users.watch_revocations(store, driver, config.credential_ttl, share.index)
    driver.start_reports()
    turn = TurnSide(driver, engine, users=users)
    # TCP and TLS clients of this worker, counted together against the caps.
    counter = ConnectionCounter(connection_limits(config))
    turn.counter = counter
    limits = StreamLimits(allocate_timeout=config.tcp_allocate_timeout)

    def stream(release: Callable[[], None], accepted: float, over_tls: bool) -> StreamConnection:
        protocol = "tls" if over_tls else "tcp"
        return StreamConnection(driver, protocol, limits, release, accepted=accepted)

    if sockets is None:
        try:
            sockets = bind_sockets(endpoints, reuse_port=reuse_port)
        except OSError:
            turn.close_listeners()
            return None
    if len(sockets.udp) != len(endpoints.udp) or len(sockets.tcp) != len(endpoints.tcp):
        log.error(
            "worker %d: given %d UDP and %d TCP sockets for %d and %d addresses",
            share.index,
            len(sockets.udp),
            len(sockets.tcp),
            len(endpoints.udp),
            len(endpoints.tcp),
        )
        turn.close_listeners()
        return None
    for sock in sockets.udp:
        if reuse_port:
            turn.waiting_udp.append(sock)
        else:
            turn.udp_listeners.append(await engine.udp_listener(driver, sock, loop))
    for sock in sockets.tcp:
        turn.servers.append(
            StreamListener(
                loop,
                sock,
                stream,
                counter,
                ssl=ssl_context if tls else None,
                plain=not config.no_tcp,
                deadline=config.tcp_allocate_timeout,
                failures=driver.failures,
            )
        )
    turn.endpoints = endpoints
    turn.store = store
    turn.listening = tuple(listening)
    return turn


async def drain(turn: TurnSide, timeout: float) -> None:
    """Refuse new allocations, let the others end for up to ``timeout`` seconds, end the rest."""
    driver = turn.driver
    driver.server.start_drain()
    if driver.server.allocations:
        driver.all_ended.clear()
        try:
            await asyncio.wait_for(driver.all_ended.wait(), timeout)
        except TimeoutError:
            log.info("drain timeout: ending %d allocations", len(driver.server.allocations))
    driver.shutdown()
    for stream in list(driver.streams):
        stream.close("the server is stopping")
