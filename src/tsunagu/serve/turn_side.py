"""The STUN/TURN side of one worker: the core and its driver, every listener bound, the
multi-worker start (no UDP read until every worker has bound) and the drain."""

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
        """Serve the waiting UDP sockets, dropping what arrived before every worker had
        bound the ports.

        The kernel spreads a port's datagrams over the workers' sockets by a hash of the
        client's address over the sockets bound so far: each worker that joins moves some
        clients to another socket. A client served before the last one joined would find
        its allocation in a worker its next packets no longer reach. So no worker answers
        until all have bound, and what queued meanwhile is dropped (at start nothing is
        allocated; STUN clients send again within a second).
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
) -> TurnSide | None:
    """Build the core and bind every listener; None (after logging why) if that fails."""
    loop = asyncio.get_running_loop()
    rng = random.SystemRandom()
    reuse_port = config.workers > 1
    tls = tls_enabled(config, ssl_context)
    endpoints = turn_endpoints(config, listening, aux_addresses(config), tls=tls)
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

    for kind, addresses in (("udp", endpoints.udp), ("tcp", endpoints.tcp)):
        for ip, port in addresses:
            try:
                if reuse_port and share.index == 0:
                    _check_free(kind, ip, port)
                if kind == "udp":
                    sock = _udp_socket(ip, port, reuse_port=reuse_port)
                    if reuse_port:
                        turn.waiting_udp.append(sock)
                    else:
                        turn.udp_listeners.append(await engine.udp_listener(driver, sock, loop))
                else:
                    sock = stream_socket(ip, port, reuse_port=reuse_port)
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
            except OSError as exc:
                log.error(
                    "cannot listen on %s:%d (%s): %s", bracket(ip), port, kind, exc.strerror or exc
                )
                turn.close_listeners()
                return None
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
