"""``tsunagu serve``: the configuration turned into running parts.

:func:`serve` turns the configuration into :class:`~tsunagu.turn.TurnSettings`, binds the
listeners on concrete addresses (a wildcard is expanded into the machine's addresses, so
every listener knows the IP a client reached and relays from that same IP), starts the
other worker processes and the web app, prints what a user needs to connect, and waits for
a signal.

The first SIGTERM or SIGINT drains: no new TCP/TLS clients, new Allocates are refused
(300 to the alternate servers in turn, else 508), existing allocations keep relaying until they
end or ``drain_timeout`` passes. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import faulthandler
import hashlib
import io
import ipaddress
import json
import logging
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .auth.backends import open_user_database, remote
from .auth.cache import KeyCache
from .auth.database import DatabaseError, PeerRanges, UserDatabase
from .auth.rest import mint_credentials
from .auth.store import StaticCredentialStore
from .config import Config, ConfigError, admin_socket_path, state_dir
from .logs import set_log_level, setup_logging, structured
from .transport.admission import (
    ConnectionCounter,
    ConnectionLimits,
    StreamListener,
    descriptor_budget,
    stream_socket,
    worker_share,
)
from .transport.driver import TurnDriver
from .transport.engine import EngineUnavailable, RelayEngine, load_engine
from .transport.listeners import StreamConnection, StreamLimits, UdpListener
from .transport.lookups import KeyLookups, RevocationWatch, SecretsRefresh
from .transport.relay import UdpRelayBinder
from .turn import NatDiscovery, PeerPolicy, TurnServer, TurnSettings
from .turn.policy import IPNetwork, inside, parse_range
from .turn.quotas import user_id
from .turn.revocations import Revocation, RevocationList
from .workers import (
    DRAINED_LINE,
    READING_LINE,
    READY_LINE,
    WorkerShare,
    release_workers,
    start_workers,
    wait_drained,
    wait_reading,
)

if TYPE_CHECKING:
    from .acme_certificates import AcmeCertificates
    from .config_reload import ReloadPlan
    from .tls import ServingCertificate, TlsMaterial

__all__ = [
    "Endpoints",
    "aux_addresses",
    "credential_store",
    "internal_network_line",
    "listening_addresses",
    "listening_ports",
    "local_addresses",
    "nat_discovery",
    "own_addresses",
    "peer_policy",
    "serve",
    "settings_from_config",
    "turn_endpoints",
]

# Lifetime of the credential in the start-up output.
_BANNER_CREDENTIAL_TTL = 600
log = logging.getLogger("tsunagu")

# Matching coturn's listener buffers, so that bursts are compared fairly.
LISTENER_BUFFER_BYTES = 2 * 1024 * 1024


def _raise_open_files_limit() -> None:
    """Every allocation holds a socket: lift the soft limit on open files to the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open files limit above %d: %s", soft, exc)


def _connection_limits(config: Config) -> ConnectionLimits:
    """This worker's caps on TCP/TLS connections: its share of the configured ones, and never
    more than its open files limit leaves room for (see ``descriptor_budget``)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    budget = descriptor_budget(1 << 20 if soft == resource.RLIM_INFINITY else soft)
    total = worker_share(config.max_tcp_connections, config.workers)
    return ConnectionLimits(
        per_address=worker_share(config.max_tcp_connections_per_ip, config.workers),
        total=min(total, budget) if total else budget,
    )


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


def settings_from_config(
    config: Config,
    fallback_relay_ips: tuple[str, ...] = (),
    aux: tuple[tuple[str, int], ...] = (),
) -> TurnSettings:
    """The core's settings for ``config``; ``fallback_relay_ips`` are the listening addresses,
    ``aux`` the aux servers' (:func:`aux_addresses`)."""
    external = tuple(
        (str(entry.public), None if entry.private is None else str(entry.private))
        for entry in config.external_ips
    )
    return TurnSettings(
        realm=config.realm,
        relay_ips=tuple(str(ip) for ip in config.relay_ips),
        fallback_relay_ips=fallback_relay_ips,
        external_ips=external,
        min_port=config.min_port,
        max_port=config.max_port,
        max_lifetime=config.max_allocate_lifetime,
        default_lifetime=min(600, config.max_allocate_lifetime),
        permission_lifetime=config.permission_lifetime,
        channel_lifetime=config.channel_lifetime,
        nonce_lifetime=config.stale_nonce,
        user_quota=config.user_quota,
        address_quota=config.address_quota,
        total_quota=config.total_quota,
        max_bps=config.max_bps,
        user_max_bps=config.user_max_bps,
        bps_capacity=worker_share(config.bps_capacity, config.workers),
        software="tsunagu" if config.software_attribute else None,
        rfc3489_compat=config.stun_backward_compatibility,
        nat_discovery=nat_discovery(config),
        strict_channel_numbers=config.strict_channel_numbers,
        stun_only=config.stun_only,
        no_stun=config.no_stun,
        alternate_servers=tuple((str(entry.ip), entry.port) for entry in config.alternate_servers),
        aux_addresses=frozenset(aux),
        unauth_rate=config.unauth_rate,
        policy=peer_policy(
            config, own_addresses(config, (*fallback_relay_ips, *(ip for ip, _ in aux)))
        ),
    )


def nat_discovery(config: Config) -> NatDiscovery | None:
    """The addresses and ports of RFC 5780 NAT behaviour discovery, None when it is off.

    The first two listening IPs of a family are its primary and alternate address (the
    configuration checked there are two); behind a 1:1 NAT each is advertised as the public
    address it maps to.
    """
    pairs = config.rfc5780_pairs
    if not pairs:
        return None
    advertised = tuple(
        (str(entry.private), str(entry.public))
        for entry in config.external_ips
        if entry.private is not None
    )
    return NatDiscovery(pairs, (config.listening_port, config.alternate_port), advertised)


def listening_ports(config: Config, ip: str) -> list[int]:
    """The main UDP and TCP ports on listening IP ``ip``: the listening port, and on the
    addresses of NAT behaviour discovery the alternate port too (as coturn, TCP listens there
    for symmetry; CHANGE-REQUEST works over UDP only)."""
    if any(ip in pair for pair in config.rfc5780_pairs):
        return [config.listening_port, config.alternate_port]
    return [config.listening_port]


def own_addresses(config: Config, listening: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The server's own IP addresses: where it listens, relays from, and what it advertises."""
    found: list[str] = []
    candidates = [
        *listening,
        *(str(ip) for ip in config.listening_ips if not ip.is_unspecified),
        *(str(aux.ip) for aux in config.aux_servers if not aux.ip.is_unspecified),
        *(str(ip) for ip in config.relay_ips),
        *(str(entry.public) for entry in config.external_ips),
        *(str(entry.private) for entry in config.external_ips if entry.private is not None),
    ]
    for ip in candidates:
        if ip not in found:
            found.append(ip)
    return tuple(found)


def peer_policy(config: Config, own: tuple[str, ...] = ()) -> PeerPolicy:
    """The default peer policy with the configured ranges allowed and denied, and the
    server's ``own`` addresses (:func:`own_addresses`) on its listening ports denied.

    Only the listening ports of those addresses are denied (relaying to them would make the
    server its own client, a loop; the aux servers' ports on every one of them, as a 1:1 NAT
    forwards the public address's port to the private one), not the addresses: two clients
    of this server relaying to each other's relayed addresses is the common case of a call
    through TURN. Requests from the server's relay port range on those addresses are ignored
    by the core, which closes the loop however a packet got there (a Send indication's
    permission is per IP).
    """
    ports = {config.listening_port, config.tls_listening_port}
    ports.update(aux.port for aux in config.aux_servers)
    if config.rfc5780:
        ports.add(config.alternate_port)
    base = PeerPolicy.create(internal=[str(net) for net in config.internal_networks])
    policy = PeerPolicy(
        allowed=tuple(net for entry in config.allowed_peer_ips for net in entry.networks),
        denied=base.denied
        + tuple(net for entry in config.denied_peer_ips for net in entry.networks),
        inside=base.inside,
    )
    if not own:
        return policy
    # Where a relay can send to unless the operator chose so: see PeerPolicy.is_own_relay.
    reachable = frozenset(
        ip for ip in own if policy.permits(ip) and not policy.allows_explicitly(ip)
    )
    return dataclasses.replace(
        policy,
        own=frozenset((ip, port) for ip in own for port in ports),
        own_relay=(reachable, config.min_port, config.max_port),
    )


def static_users(config: Config) -> list[tuple[str, str]]:
    """The static users ``config`` accepts: none with ``use_auth_secret``, which makes TURN
    REST API credentials the only ones, as coturn's ``use-auth-secret`` does (coturn then
    neither loads ``user`` entries nor looks them up); the log says so."""
    users = [(user.name, user.password) for user in config.users]
    if config.use_auth_secret and users:
        log.warning(
            "use_auth_secret: TURN REST API credentials only; %d static user(s) not accepted",
            len(users),
        )
        users = []
    return users


def rest_secrets(config: Config, share: WorkerShare) -> tuple[str, ...]:
    """The TURN REST API secrets: the configured ones, else one every worker derives from
    the share, so that the web page can mint credentials with no configuration."""
    if config.static_auth_secrets:
        return config.static_auth_secrets
    return (hashlib.sha256(b"tsunagu rest secret\0" + share.nonce_secret).hexdigest()[:32],)


def credential_store(config: Config, secrets_in_use: tuple[str, ...]) -> StaticCredentialStore:
    """The TURN credentials: static users and TURN REST API credentials from
    ``secrets_in_use`` (always accepted: the web app mints them)."""
    return StaticCredentialStore(
        config.realm,
        static_users(config),
        secrets_in_use,
        check_expiry_on_existing=config.rest_check_on_refresh,
    )


def local_addresses() -> list[str]:
    """The machine's IP addresses, loopback included, IPv6 link-local excluded."""
    import ifaddr

    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for entry in adapter.ips:
            ip = entry.ip if isinstance(entry.ip, str) else entry.ip[0]
            try:
                address = ipaddress.ip_address(ip.split("%")[0])
            except ValueError:
                continue
            if address.is_link_local or str(address) in found:
                continue
            found.append(str(address))
    return found or ["127.0.0.1"]


def _machine_addresses(config: Config) -> list[str]:
    """The machine's addresses a wildcard stands for: with ``internal_networks``, only those
    inside them (the configuration has checked every specific address already), so that no
    listener, and no relayed address taken from it, lies outside."""
    found = local_addresses()
    if config.internal_networks:
        found = [ip for ip in found if inside(ip, config.internal_networks)]
    return found


def listening_addresses(config: Config) -> list[str]:
    """The concrete addresses to listen on: a wildcard becomes the machine's addresses of its
    family (both families when no address is configured); with ``internal_networks`` only
    those inside them."""
    wildcards = {ip.version for ip in config.listening_ips if ip.is_unspecified}
    if not config.listening_ips:
        return _machine_addresses(config)
    specific = [str(ip) for ip in config.listening_ips if not ip.is_unspecified]
    if not wildcards:
        return specific
    expanded = {
        ip for ip in _machine_addresses(config) if ipaddress.ip_address(ip).version in wildcards
    }
    return sorted(expanded | set(specific))


def aux_addresses(config: Config) -> tuple[tuple[str, int], ...]:
    """The aux servers' concrete addresses: a wildcard becomes the machine's addresses of its
    family, as in :func:`listening_addresses`."""
    found: list[tuple[str, int]] = []
    machine: list[str] | None = None
    for aux in config.aux_servers:
        if aux.ip.is_unspecified:
            if machine is None:
                machine = _machine_addresses(config)
            ips = [ip for ip in machine if ipaddress.ip_address(ip).version == aux.ip.version]
        else:
            ips = [str(aux.ip)]
        for ip in ips:
            if (ip, aux.port) not in found:
                found.append((ip, aux.port))
    return tuple(found)


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where one worker listens: UDP and TCP addresses (ip, port), the main ones first; and
    those of them that are aux servers. Every TCP address takes TLS and plain TCP alike,
    as far as ``no_tls`` and ``no_tcp`` leave them on."""

    udp: tuple[tuple[str, int], ...]
    tcp: tuple[tuple[str, int], ...]
    aux: tuple[tuple[str, int], ...]


def turn_endpoints(
    config: Config, listening: list[str], aux: tuple[tuple[str, int], ...], *, tls: bool
) -> Endpoints:
    """The listening addresses of ``config`` on the ``listening`` IPs and the ``aux`` ones.

    As coturn: the main UDP port (with ``rfc5780``, on the two addresses of a pair, the
    alternate port too: :func:`listening_ports`) unless ``no_udp``, the same TCP ports unless
    ``no_tcp``, the TLS port with ``tls``; an aux server takes UDP unless ``no_udp`` and TCP
    unless both TCP and TLS are off. One TCP listener serves an address however many roles
    name it (the TLS port may be the main port); the main role wins over the aux one.
    """
    udp: list[tuple[str, int]] = []
    tcp: list[tuple[str, int]] = []
    for ip in listening:
        # Every worker binds all four addresses of NAT behaviour discovery, so that it can
        # answer from any of them whichever one a request reached.
        for port in listening_ports(config, ip):
            if not config.no_udp:
                udp.append((ip, port))
            if not config.no_tcp:
                tcp.append((ip, port))
        if tls and (ip, config.tls_listening_port) not in tcp:
            tcp.append((ip, config.tls_listening_port))
    main = set(udp) | set(tcp)
    aux = tuple(address for address in aux if address not in main)
    for address in aux:
        if not config.no_udp:
            udp.append(address)
        if not config.no_tcp or tls:
            tcp.append(address)
    return Endpoints(tuple(udp), tuple(tcp), aux)


def _setup_logging(config: Config) -> None:
    # Worker processes run this with the same configuration: same destination, same format.
    setup_logging(config.effective_log_level, config.log_format, config.log_file, config.audit_file)


def _host_for_uris(config: Config, listening: list[str]) -> str:
    if config.public_host:
        return config.public_host
    if config.external_ips:
        return str(config.external_ips[0].public)
    for ip in listening:
        if not ipaddress.ip_address(ip).is_loopback:
            return ip
    return listening[0] if listening else "127.0.0.1"


def web_serves_https(config: Config) -> bool:
    """Whether the web app takes HTTPS: with ``--cert`` or ACME, and on any address beyond loopback,
    since browsers give the camera and microphone only to a secure page and count a
    plain-HTTP one from another machine as insecure (localhost counts as secure).
    ``web_plain_http`` opts out, for a reverse proxy in front that terminates TLS."""
    if config.no_web or config.web_plain_http:
        return False
    if config.cert is not None or config.acme_domains:
        return True
    return not ipaddress.ip_address(config.web_ip).is_loopback


def certificate_hosts(config: Config, listening: list[str]) -> list[str]:
    """The names a generated certificate must cover: where TURN listens, the public host,
    and the web app's address (with a wildcard, every address of the machine)."""
    hosts = [*listening, config.public_host or "localhost"]
    if web_serves_https(config):
        if ipaddress.ip_address(config.web_ip).is_unspecified:
            hosts += _machine_addresses(config)
        else:
            hosts.append(config.web_ip)
    return list(dict.fromkeys(hosts))


def web_app_line(config: Config, material: Any) -> str:
    """The start-up line naming the web app's URL; over HTTPS, the certificate's
    fingerprints too, so that a tester can accept a generated one knowingly."""
    port = config.web_port
    web_ip = ipaddress.ip_address(config.web_ip)
    if material is None:
        line = f"tsunagu: web app on http://{_bracket(config.web_ip)}:{port}/"
        if not web_ip.is_loopback:
            line += (
                " (plain HTTP, --web-plain-http: browsers allow camera and microphone only if a"
                " reverse proxy in front serves it over HTTPS)"
            )
        return line
    host = config.web_ip
    if web_ip.is_unspecified:
        host = config.public_host or host
    line = f"tsunagu: web app on https://{_bracket(host)}:{port}/"
    if web_ip.is_unspecified and not config.public_host:
        line += " (every address of this machine)"
    kind = "self-signed certificate" if material.generated else "certificate"
    line += f"; {kind} sha256 {material.sha256_fingerprint} spki {material.spki_sha256_b64}"
    if material.generated:
        line += " (browsers warn until it is accepted; --cert gives a real one)"
    return line


def _say(text: str) -> None:
    """Start-up information for the person who ran the command, on stdout."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@dataclass
class _UserDatabase:
    """The user database of one worker, its key lookups and its secrets' refresh."""

    database: UserDatabase
    lookups: KeyLookups | None
    refresh: SecretsRefresh
    watch: RevocationWatch | None = None
    kind: str = "sqlite"
    on_user_revoked: Callable[[str], None] | None = None
    """Closes a revoked user's signaling sessions, in the process that runs the web app."""
    config: Config | None = None
    """The configured quotas and max-bps, which the realm's options in the database override."""
    base_policy: PeerPolicy | None = None
    """The configured peer policy, to which the database's peer ranges are added."""

    async def watch_revocations(
        self, store: StaticCredentialStore, driver: TurnDriver, ttl: float, worker: int
    ) -> None:
        """Read the revocations in force, then follow new ones: each ends the allocations
        made with what it covers, and the user's signaling sessions."""

        def revoked(revocation: Revocation) -> None:
            ended = driver.server.revoke(revocation, ttl, time.time())
            driver.after_core_call()
            what = revocation.credential or revocation.user or "credentials"
            log.info(
                "revocation %d of %s: %d allocations ended (worker %d)",
                revocation.number,
                what,
                ended,
                worker,
                extra=structured(
                    {"event": "revoked", "revocation": revocation.number, "ended": ended}
                ),
            )
            user = revocation.user or (revocation.credential and user_id(revocation.credential))
            if user and self.on_user_revoked is not None:
                self.on_user_revoked(user)

        self.watch = RevocationWatch(self.database, store, RevocationList(ttl), revoked)
        if not await self.watch.refresh():
            log.warning(
                "user database %s: cannot read the revocations (%s)",
                self.database.description,
                self.watch.last_error,
            )
        self.watch.start()

    async def follow_peer_ranges(self, server: TurnServer) -> None:
        """Add the realm's allowed and denied peer ranges in the database to ``server``'s
        peer policy, now and whenever they change (coturn's allowed_peer_ip and
        denied_peer_ip tables, read with the secrets)."""
        self.base_policy = server.settings.policy

        def apply(ranges: PeerRanges) -> None:
            assert self.base_policy is not None
            lists: dict[str, list[IPNetwork]] = {"allowed": [], "denied": []}
            ignored = []
            for kind, texts in (("allowed", ranges.allowed), ("denied", ranges.denied)):
                for text in texts:
                    try:
                        lists[kind] += parse_range(text)
                    except ValueError:
                        ignored.append(text[:64])
            if ignored:
                log.warning(
                    "user database %s: peer ranges not understood, ignored: %s",
                    self.database.description,
                    ", ".join(ignored[:10]),
                )
            server.set_peer_policy(self.base_policy.with_ranges(lists["allowed"], lists["denied"]))
            log.info(
                "user database %s: %d allowed and %d denied peer ranges in force",
                self.database.description,
                len(ranges.allowed),
                len(ranges.denied),
            )

        self.refresh.on_ranges = apply
        await self.refresh.refresh()

    async def follow_realm_options(self, server: TurnServer, config: Config) -> None:
        """Apply the realm's user-quota, total-quota and max-bps from the database
        (coturn's turn_realm_option, ``turnadmin -g``) over the configured ones, now and
        whenever they change; 0 or no row means the configured value. A new max-bps
        applies to allocations made from then on."""
        self.config = config

        def quota(options: dict[str, str], name: str, configured: int | None) -> int | None:
            text = options.get(name)
            if text is None:
                return configured
            try:
                value = int(text)
            except ValueError:
                log.warning("user database: realm option %s=%r is not a number", name, text[:32])
                return configured
            return value if value > 0 else configured

        def apply(options: dict[str, str]) -> None:
            config = self.config
            assert config is not None
            user = quota(options, "user-quota", config.user_quota)
            total = quota(options, "total-quota", config.total_quota)
            server.set_quotas(user, total)
            log.info(
                "user database %s: realm %s quotas in force: %d allocations per user id, "
                "%d in all (per worker)",
                self.database.description,
                config.realm,
                server.quotas.user,
                server.quotas.total,
            )
            max_bps = quota(options, "max-bps", config.max_bps) or 0
            if max_bps != server.max_bps:
                server.set_max_bps(max_bps)
                log.info(
                    "user database %s: realm %s: %s bytes per second per allocation each way",
                    self.database.description,
                    config.realm,
                    server.max_bps or "unlimited",
                )

        self.refresh.on_options = apply
        await self.refresh.refresh()

    def reconfigure(self, config: Config, server: TurnServer) -> None:
        """After a reload gave ``server`` new settings: the database's peer ranges and realm
        options, as last read, on top of them again."""
        self.config = config
        self.base_policy = server.settings.policy
        if self.refresh.on_ranges is not None:
            self.refresh.on_ranges(self.refresh.ranges)
        if self.refresh.on_options is not None:
            self.refresh.on_options(self.refresh.options)

    def figures(self) -> dict[str, Any]:
        """What ``tsunagu status`` shows of the user database in this worker."""
        lookups = self.lookups
        errors = [self.refresh.last_error] if not self.refresh.working else []
        if self.watch is not None and not self.watch.working:
            errors.append(self.watch.last_error)
        return {
            "kind": self.kind,
            "description": self.database.description,
            "reachable": not errors,
            "last_error": errors[0] if errors else "",
            "secrets": len(self.refresh.store.database_secrets),
            "cached_users": 0 if lookups is None else len(lookups.cache),
            "lookups": 0 if lookups is None else lookups.total_queries,
            "lookups_failed": 0 if lookups is None else lookups.total_failed,
        }

    async def reload(self) -> dict[str, Any]:
        """Read what the database can change without a restart now (``tsunagu reload``):
        the REST secrets, the revocations; forget the cached users, so that each is looked
        up again on its next request."""
        secrets_read = await self.refresh.refresh()
        dropped = 0
        if self.lookups is not None:
            dropped = len(self.lookups.cache)
            self.lookups.cache.clear()
        revocations_read = None if self.watch is None else await self.watch.refresh()
        errors = [] if secrets_read else [self.refresh.last_error]
        if revocations_read is False and self.watch is not None:
            errors.append(self.watch.last_error)
        return {
            "description": self.database.description,
            "secrets_read": secrets_read,
            "secrets": len(self.refresh.store.database_secrets),
            "cached_users_dropped": dropped,
            "revocations_read": revocations_read,
            "error": "; ".join(errors),
        }

    async def close(self) -> None:
        if self.lookups is not None:
            await self.lookups.close()
        if self.watch is not None:
            await self.watch.close()
        await self.refresh.close()
        await self.database.close()


async def _open_user_database(config: Config, store: StaticCredentialStore) -> _UserDatabase | None:
    """The user database the configuration names (SQLite, PostgreSQL or Redis), its users
    looked up through a cache in ``store`` (unless ``use_auth_secret``: REST credentials
    only) and its secrets read into it; None, after logging why, when it cannot be used.

    A SQLite file that cannot be opened stops the start: it is this machine's file, and
    the mistake is in the configuration. A PostgreSQL or Redis server that does not answer
    does not: it is another machine, and it may be restarting. The server starts with
    static users and REST secrets from the configuration; each lookup tries the database
    again (a failure is cached for a short while), and the secrets are read again every
    few seconds, so everything it holds serves as soon as it answers."""
    try:
        database = open_user_database(config)
    except DatabaseError as exc:
        log.error("user database: %s", exc)
        return None
    refresh = SecretsRefresh(database, store)
    if not await refresh.refresh():
        if not remote(config):
            log.error("user database %s: %s", database.description, refresh.last_error)
            await database.close()
            return None
        log.error(
            "user database %s unavailable at start (%s): serving static users and the"
            " configuration's REST secrets meanwhile; its users and secrets serve once it"
            " answers",
            database.description,
            refresh.last_error,
            extra=structured(
                {
                    "event": "database",
                    "cause": "user database unavailable",
                    "database": database.description,
                    "error": refresh.last_error,
                }
            ),
        )
    refresh.start()
    lookups = None
    if not config.use_auth_secret:
        cache = KeyCache()
        store.database = cache
        lookups = KeyLookups(database, cache)
    kind = "postgresql" if config.psql_userdb else "redis" if config.redis_userdb else "sqlite"
    return _UserDatabase(database, lookups, refresh, kind=kind)


@dataclass
class _Turn:
    """The running STUN/TURN side of one worker: the core's driver and its listeners."""

    driver: TurnDriver
    engine: RelayEngine
    servers: list[StreamListener] = field(default_factory=list)
    udp_listeners: list[UdpListener] = field(default_factory=list)
    counter: ConnectionCounter | None = None
    endpoints: Endpoints = Endpoints((), (), ())
    users: _UserDatabase | None = None
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
        limits and alternate servers (:data:`~tsunagu.config_reload.LIVE`)."""
        assert self.store is not None and self.users is not None
        self.store.replace_static(
            static_users(config),
            secrets,
            check_expiry_on_existing=config.rest_check_on_refresh,
        )
        server = self.driver.server
        server.reconfigure(settings_from_config(config, self.listening, self.endpoints.aux))
        self.users.reconfigure(config, server)


@dataclass
class _Running:
    """What one worker runs with and what a reload changes in it."""

    config: Config
    share: WorkerShare
    listening: list[str]
    certificate: ServingCertificate | None = None
    turn: _Turn | None = None
    web: Any = None
    """The web app's runner, in worker 0."""
    endpoint: Any = None
    """Worker 0's admin endpoint, which reaches every worker."""

    def material(self, config: Config) -> TlsMaterial:
        """The certificate ``config`` names (or ACME keeps, or the generated one), read
        from disk again: a renewed file under the same name is what a reload is usually for."""
        from .tls import ensure_certificate

        hosts = certificate_hosts(config, self.listening)
        if config.acme_domains:
            from .acme_certificates import AcmeCertificates

            cert, key = AcmeCertificates.from_config(config, state_dir()).paths()
            if os.path.exists(cert) and os.path.exists(key):
                return ensure_certificate(cert, key, hosts, state_dir())
            # Not obtained yet (the CA did not answer at start): the generated one serves
            # until the certificate arrives, rather than no TLS at all.
        return ensure_certificate(config.cert, config.pkey, hosts, state_dir())

    def reload_certificate(self) -> dict[str, Any]:
        """Load the running configuration's certificate from its files again (renewed)."""
        if self.certificate is None:
            return {}
        try:
            material = self.material(self.config)
            self.certificate.replace(material)
        except ConfigError as exc:
            log.error("the TLS certificate stays as it was: %s", exc)
            return {"error": str(exc), "certificate": self.certificate.material.sha256_fingerprint}
        return {"certificate": material.sha256_fingerprint}

    def check(self, config: Config) -> None:
        """Raise ConfigError if ``config`` cannot be applied (a certificate that does not
        load), before any worker changes anything."""
        if self.certificate is not None:
            from .tls import server_ssl_context

            server_ssl_context(self.material(config))

    async def reconfigure(self, config: Config) -> dict[str, Any]:
        """Apply ``config`` (already planned by :func:`~tsunagu.config_reload.reload_plan`)
        in this worker; what it did, for reload's answer."""
        set_log_level(config.effective_log_level)
        self.config = config
        done: dict[str, Any] = {"error": "", **self.reload_certificate()}
        secrets = rest_secrets(config, self.share)
        if self.turn is not None:
            self.turn.reconfigure(config, secrets)
        if self.web is not None and not config.no_turn:
            from .signaling.server import set_turn_secret

            set_turn_secret(self.web, secrets[0])
        return done


def _tls_enabled(config: Config, ssl_context: ssl.SSLContext | None) -> bool:
    return ssl_context is not None and not config.no_tls and not config.stun_only


async def _start_turn(
    config: Config,
    share: WorkerShare,
    listening: list[str],
    secrets_in_use: tuple[str, ...],
    ssl_context: ssl.SSLContext | None,
) -> _Turn | None:
    """Build the core and bind every listener; None (after logging why) if that fails."""
    loop = asyncio.get_running_loop()
    rng = random.SystemRandom()
    reuse_port = config.workers > 1
    tls = _tls_enabled(config, ssl_context)
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
    users = await _open_user_database(config, store)
    if users is None:
        return None
    server = TurnServer(settings, store, binder, rng)
    driver = TurnDriver(server, loop, engine, worker=share.index, lookups=users.lookups)
    await users.follow_peer_ranges(server)
    await users.follow_realm_options(server, config)
    await users.watch_revocations(store, driver, config.credential_ttl, share.index)
    driver.start_reports()
    turn = _Turn(driver, engine, users=users)
    # TCP and TLS clients of this worker, counted together against the caps.
    counter = ConnectionCounter(_connection_limits(config))
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
                    "cannot listen on %s:%d (%s): %s", _bracket(ip), port, kind, exc.strerror or exc
                )
                turn.close_listeners()
                return None
    turn.endpoints = endpoints
    turn.store = store
    turn.listening = tuple(listening)
    return turn


_ROOM_ACCESS: dict[str, str] = {
    "open": "anyone who can reach the page may create and join rooms and use the TURN relay"
    " while in one; fine on loopback or a private network, choose token or password"
    " (--room-access) before exposing it",
    "password": "rooms admit whoever gives the room password (--room-password)",
    "token": "rooms admit invitation links only: a join token signed with the join secret"
    " names the room and the person ('tsunagu token', or three lines in the product's"
    " backend: docs/SIGNALING.md)",
}


def _room_access_line(config: Config) -> str:
    mode = config.effective_room_access
    chosen = "" if config.room_access is not None else " (default for this address)"
    api = "on (--api-key)" if config.api_key else "off"
    return (
        f"tsunagu: room access {mode}{chosen}: {_ROOM_ACCESS[mode]}; "
        f"TURN credentials only for people in a room, valid {config.credential_ttl} s and renewed;"
        f" /api/turn-credentials {api}"
    )


def internal_network_line(config: Config) -> str | None:
    """The start-up line naming the internal networks policy, None without one."""
    if not config.internal_networks:
        return None
    ranges = ", ".join(str(net) for net in config.internal_networks)
    parts = []
    if not config.no_turn:
        parts.append("the relay reaches peers inside them only (their private ranges allowed)")
    if not config.no_web:
        parts.append(
            "signaling forwards only ICE candidates with an address inside them, and a page"
            " connecting from outside cannot join"
        )
    return f"tsunagu: calls stay inside the internal networks {ranges}: {'; '.join(parts)}"


def _say_turn(
    config: Config,
    listening: list[str],
    turn: _Turn,
    ssl_context: ssl.SSLContext | None,
    material: Any,
    turn_secret: str,
) -> None:
    """What a user needs to reach the TURN side; tests and scripts parse these lines."""
    from .signaling.ice import turn_uris

    port = config.listening_port
    tls = _tls_enabled(config, ssl_context)
    _say(f"tsunagu: STUN/TURN on {', '.join(listening)} port {port}")
    taken = [
        name
        for name, enabled in (("udp", not config.no_udp), ("tcp", not config.no_tcp), ("tls", tls))
        if enabled
    ]
    aux = turn.endpoints.aux
    if aux:
        where = ", ".join(f"{_bracket(ip)}:{number}" for ip, number in aux)
        _say(f"tsunagu: aux servers on {where} ({', '.join(taken)})")
    if config.workers > 1:
        _say(f"tsunagu: {config.workers} worker processes")
    _say(
        f"tsunagu: transports: {', '.join(taken)}; realm {config.realm};"
        f" relay path: {turn.engine.name}"
    )
    for primary, alternate in config.rfc5780_pairs:
        _say(
            f"tsunagu: NAT behaviour discovery (RFC 5780) over UDP: {primary} and {alternate},"
            f" ports {port} and {config.alternate_port}"
        )
    if tls and not config.no_tcp:
        ports = list(dict.fromkeys(number for _, number in turn.endpoints.tcp))
        _say(
            "tsunagu: every TCP port takes TLS and plain TCP alike:"
            f" {', '.join(str(number) for number in ports)}"
        )
    if material is not None:
        _say(
            f"tsunagu: TLS certificate {material.cert_path}"
            f"{' (self-signed)' if material.generated else ''}"
            f" sha256 {material.sha256_fingerprint} spki {material.spki_sha256_b64}"
        )
    if not config.stun_only:
        host = _bracket(_host_for_uris(config, listening))
        # Start-up output ends up in logs (journald keeps it): a credential for a first test
        # only, not one that stays good for a day.
        username, password = mint_credentials(
            turn_secret, "test", _BANNER_CREDENTIAL_TTL, time.time()
        )
        # The URIs the web page hands out, the same way (signaling/ice.py).
        urls = [f"stun:{host}:{port}", *turn_uris(config, host)]
        entry = {"urls": urls, "username": username, "credential": password}
        _say(f"tsunagu: ICE server entry (valid {_BANNER_CREDENTIAL_TTL // 60} min):")
        _say(json.dumps(entry))


def _native_counters(turn: _Turn) -> dict[str, int] | None:
    """What the native UDP listeners did without Python: relayed datagrams, Bindings."""
    listeners = [item for item in turn.udp_listeners if hasattr(item, "relayed")]
    if not listeners:
        return None
    return {
        "relayed": sum(int(getattr(item, "relayed", 0)) for item in listeners),
        "bindings": sum(int(getattr(item, "bindings", 0)) for item in listeners),
    }


def _admin_token(config: Config) -> str:
    """The HTTP admin API's token; ConfigError (before anything starts) when it is unusable."""
    from .admin.http import read_token

    assert config.admin_token_file is not None  # the configuration checked it
    try:
        return read_token(config.admin_token_file)
    except OSError as exc:
        raise ConfigError(
            f"config: admin_token_file: cannot read {config.admin_token_file}:"
            f" {exc.strerror or exc}"
        ) from None
    except ValueError as exc:
        raise ConfigError(f"config: admin_token_file: {exc}") from None


def _private_directory() -> str:
    """Where the other workers answer worker 0's admin requests: only this user may enter
    (mkdtemp makes it 0700). In $TMPDIR (short paths: a socket's is at most 107 bytes), else
    in the state directory; empty (logged) when neither can be made."""
    for parent in (None, str(state_dir())):
        try:
            return tempfile.mkdtemp(prefix="tsunagu-admin-", dir=parent)
        except OSError as exc:
            problem = exc.strerror or str(exc)
    log.error("admin API: cannot make a private directory for the workers: %s", problem)
    return ""


def _worker_socket(directory: str, index: int) -> str:
    return os.path.join(directory, f"worker-{index}.sock")


async def _start_admin(
    config: Config,
    share: WorkerShare,
    turn: _Turn,
    started: float,
    config_file: str | None,
    token: str | None,
    running: _Running,
    prepare: Callable[[], ReloadPlan] | None,
) -> tuple[list[Any], Callable[[dict[str, Any]], Awaitable[dict[str, Any]]] | None]:
    """The admin API: worker 0 on the operator's socket (and with ``token`` over HTTP on
    loopback), asking the others on their private ones; each other worker on its private
    socket. What was started, each with ``close()``, what could not be is logged; and in
    worker 0 the handler of admin requests, which SIGHUP's reload goes through too (with
    ``no_admin`` as well, when no socket is opened)."""
    from .admin.server import (
        MAX_INTERNAL_REQUEST,
        AdminEndpoint,
        AdminServer,
        Peer,
        WorkerControl,
        bind_unix_socket,
        worker_handler,
    )

    started_servers: list[Any] = []
    control = WorkerControl(
        turn.driver,
        turn.users,
        started=started,
        native=lambda: _native_counters(turn),
        reconfigure=running.reconfigure,
        certificate=running.reload_certificate,
    )
    endpoint_handler = None
    if share.index > 0:
        if not share.admin_dir:
            return started_servers, None
        path = _worker_socket(share.admin_dir, share.index)
        handler = worker_handler(control)
    else:
        path = str(admin_socket_path(config))
        # Without the private directory the other workers are reported as not answering.
        peers = [
            Peer(index, _worker_socket(share.admin_dir or "/nonexistent", index))
            for index in range(1, config.workers)
        ]
        endpoint = AdminEndpoint(
            control, peers, workers=config.workers, config_file=config_file, prepare=prepare
        )
        handler = endpoint_handler = endpoint.handle
        running.endpoint = endpoint
        if config.no_admin:
            return started_servers, endpoint_handler
        if token is not None:
            from .admin.http import AdminHttp

            web = AdminHttp(config.admin_port, token, handler)
            try:
                await web.start()
            except OSError as exc:
                log.error("admin API over HTTP: %s", exc.strerror or exc)
            else:
                started_servers.append(web)
                where = " and ".join(_bracket(ip) for ip in web.addresses)
                _say(f"tsunagu: admin API over HTTP on {where} port {config.admin_port}")
    try:
        if share.index == 0:
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        sock = bind_unix_socket(path)
    except OSError as exc:
        log.error(
            "admin socket %s: %s; tsunagu status and the other admin commands cannot reach"
            " this server (--admin-socket PATH chooses another place)",
            path,
            exc.strerror or exc,
        )
        return started_servers, endpoint_handler
    if share.index > 0:
        server = AdminServer(sock, handler, internal=True, max_request=MAX_INTERNAL_REQUEST)
    else:
        server = AdminServer(sock, handler)
    await server.start()
    started_servers.append(server)
    if share.index == 0:
        _say(f"tsunagu: admin socket {path} (tsunagu status, sessions, kill, drain, reload)")
    return started_servers, endpoint_handler


async def reload_on_signal(handler: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]) -> None:
    """SIGHUP (systemd's ``ExecReload``): what ``tsunagu reload`` does, through the same
    admin request, and its outcome in the log."""
    log.info("SIGHUP: reloading, as tsunagu reload does")
    try:
        answer = await handler({"command": "reload"})
    except Exception:
        log.exception("SIGHUP: reload failed")
        return
    if answer.get("ok") is not True:
        return  # refused, and the reason logged, by the handler
    missing = answer.get("not_answering") or []
    errors = [
        f"worker {part['worker']}: {part['user_database']['error']}"
        for part in answer.get("per_worker", [])
        if part.get("user_database") and part["user_database"].get("error")
    ]
    log.info(
        "SIGHUP: reload done: %d workers answered%s%s",
        len(answer.get("per_worker", [])),
        f", {len(missing)} did not" if missing else "",
        f"; {'; '.join(errors)}" if errors else "",
    )


def _log_tasks() -> None:
    for task in asyncio.all_tasks():
        where = io.StringIO()
        task.print_stack(limit=8, file=where)
        log.warning("task %s waits:\n%s", task.get_name(), where.getvalue().rstrip())


def _with_worker_count(config: Config) -> Config:
    if config.workers == 0:
        # Like coturn's relay threads: one per core this process may run on.
        return dataclasses.replace(config, workers=len(os.sched_getaffinity(0)))
    return config


def _prepare_reload(running: _Running, reread: Callable[[], Config]) -> ReloadPlan:
    """Read the configuration again and plan the reload; raise ConfigError, with nothing
    changed anywhere, if the new configuration is not valid or cannot be applied."""
    from .config_reload import reload_plan

    plan = reload_plan(running.config, _with_worker_count(reread()))
    running.check(plan.config)
    return plan


async def _acme_at_start(config: Config) -> AcmeCertificates:
    """The ACME certificates, obtained now unless a current one is kept from before. A CA
    that cannot give one now does not stop the start: the generated certificate serves
    meanwhile, and :meth:`AcmeCertificates.run` keeps trying."""
    from .acme_certificates import AcmeCertificates

    acme = AcmeCertificates.from_config(config, state_dir())
    if acme.current():
        log.info(
            "acme: the certificate for %s kept from before is current", ", ".join(acme.domains)
        )
        return acme
    log.info("acme: ordering a certificate for %s from %s", ", ".join(acme.domains), acme.directory)
    try:
        await acme.obtain()
    except Exception as exc:  # every failure is the CA's or the network's: keep serving
        log.error(
            "%s; serving a self-signed certificate meanwhile, and trying again",
            exc,
            extra=structured({"event": "acme", "cause": "certificate not obtained"}),
        )
    else:
        log.info("acme: certificate for %s obtained", ", ".join(acme.domains))
    return acme


async def _keep_acme_current(acme: AcmeCertificates, running: _Running) -> None:
    """Renew before expiry and put each renewed certificate in service in every worker."""

    async def renewed(cert: str, key: str) -> None:
        if running.endpoint is not None:
            await running.endpoint.certificate_renewed()
        else:
            running.reload_certificate()

    await acme.run(renewed)


async def _start_metrics(
    config: Config, share: WorkerShare, turn: _Turn | None
) -> tuple[Any, list[Any]]:
    """Worker 0's ``/metrics``, ``/healthz`` and ``/readyz`` (admin/metrics.py): the
    exporter, which the web app serves too, and the ``prometheus_port`` listener if one is
    configured. A scrape asks every other worker over its private admin socket, as
    ``tsunagu status`` does. Other workers: (None, [])."""
    if share.index > 0:
        return None, []
    from .admin.metrics import Exporter, MetricsHttp
    from .admin.server import AdminEndpoint, Peer, WorkerControl

    gather = None
    if turn is not None:
        running = turn
        control = WorkerControl(
            running.driver,
            running.users,
            started=time.time(),
            native=lambda: _native_counters(running),
        )
        # Without the private directory the others show as not answering.
        peers = [
            Peer(index, _worker_socket(share.admin_dir or "/nonexistent", index))
            for index in range(1, config.workers)
        ]
        endpoint = AdminEndpoint(control, peers, workers=config.workers)

        async def gather() -> tuple[list[dict[str, Any]], list[int]]:
            return await endpoint.metrics(per_user=config.metrics_per_user)

    def not_ready() -> list[str]:
        reasons = []
        if turn is not None:
            if turn.driver.server.draining:
                reasons.append("draining")
            users = turn.users
            if users is not None and users.kind != "sqlite" and not users.figures()["reachable"]:
                reasons.append(f"{users.kind} user database unreachable")
        return reasons

    exporter = Exporter(gather, not_ready)
    servers: list[Any] = []
    if config.prometheus_port:
        http = MetricsHttp(exporter, config.prometheus_ip, config.prometheus_port)
        try:
            await http.start()
        except OSError as exc:
            log.error(
                "metrics: cannot listen on %s port %d: %s",
                _bracket(config.prometheus_ip),
                config.prometheus_port,
                exc.strerror or exc,
            )
        else:
            servers.append(http)
            _say(
                f"tsunagu: metrics on http://{_bracket(config.prometheus_ip)}:"
                f"{config.prometheus_port}/metrics (and /healthz, /readyz)"
            )
    return exporter, servers


_START_MARGIN = 10.0
"""Seconds worker 0 waits for the other workers to read their UDP sockets once told to."""
_DRAIN_MARGIN = 10.0
"""Seconds beyond the drain timeout a worker waits for the others to finish draining."""


async def _start_udp_and_say(turn: _Turn, loop: asyncio.AbstractEventLoop) -> None:
    await turn.start_udp(loop)
    with contextlib.suppress(OSError):  # worker 0 may be gone
        _say(READING_LINE)


async def _bounded(waiting: Awaitable[Any], timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(waiting, timeout)


async def _drain(turn: _Turn, timeout: float) -> None:
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


async def serve(
    config: Config,
    share: WorkerShare | None = None,
    *,
    config_file: str | None = None,
    reread: Callable[[], Config] | None = None,
) -> int:
    """Run everything ``config`` enables until a signal; return the exit status.

    With ``workers`` > 1 this process is worker 0 (and serves the web app); it starts the
    other workers, which run this function with the same configuration and ``share``.
    ``config_file`` is the file given with ``-c``, named by ``tsunagu reload``'s answer;
    ``reread`` reads the configuration again from the same command line, for reloads.
    """
    started = time.time()
    # A reload asked for while the server starts (systemctl reload, a SIGHUP to the process
    # group) must not end it: ignored until the handler below is in place. Worker processes
    # inherit this across exec, so their start is covered from their first instruction.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # A process that will not stop can be asked why: SIGABRT writes every thread's stack.
    faulthandler.enable()
    admin_token = None
    if config.admin_port and not config.no_admin and (share is None or share.index == 0):
        admin_token = _admin_token(config)
    config = _with_worker_count(config)
    _setup_logging(config)
    _raise_open_files_limit()
    loop = asyncio.get_running_loop()

    def on_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # A bug in a callback must be seen in the server's own log, and must not stop it.
        log.error("unexpected error: %s", context.get("message"), exc_info=context.get("exception"))

    loop.set_exception_handler(on_loop_error)

    if share is None:
        share = WorkerShare("", random.SystemRandom().randbytes(32), 0)
        # The web page mints time-limited credentials; without an operator's secret one
        # derived from the share's random secret keeps that working with no configuration.
        share = dataclasses.replace(share, turn_secret=rest_secrets(config, share)[0])
    turn_secret = share.turn_secret
    listening = listening_addresses(config)
    if config.internal_networks and not config.no_turn and not listening:
        log.error(
            "internal_networks: none of this machine's addresses (%s) lies inside %s: nothing"
            " to listen on; give listening_ips inside them",
            ", ".join(local_addresses()),
            ", ".join(str(net) for net in config.internal_networks),
        )
        return 1

    running = _Running(config, share, listening)
    ssl_context: ssl.SSLContext | None = None
    material: Any = None
    web_tls = web_serves_https(config)
    need_tls = (not config.no_turn and not config.no_tls and not config.stun_only) or web_tls
    acme = None
    if need_tls and config.acme_domains and share.index == 0:
        acme = await _acme_at_start(config)
    if need_tls:
        from .tls import ServingCertificate

        material = running.material(config)
        running.certificate = ServingCertificate(material)
        ssl_context = running.certificate.context

    turn: _Turn | None = None
    children: list[subprocess.Popen[bytes]] = []
    admin: list[Any] = []
    admin_handler: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]] | None = None
    admin_dir = ""
    if not config.no_turn:
        turn = await _start_turn(config, share, listening, rest_secrets(config, share), ssl_context)
        if turn is None:
            return 1
        running.turn = turn
        if share.index == 0 and config.workers > 1:
            # The workers' private sockets are how a reload, a renewed certificate and a
            # scrape reach them, with or without the operator's socket (no_admin).
            admin_dir = _private_directory()
            share = dataclasses.replace(share, admin_dir=admin_dir)
            children = await start_workers(config, share)
            if len(children) != config.workers - 1:
                for child in children:
                    child.kill()
                if admin_dir:
                    shutil.rmtree(admin_dir, ignore_errors=True)
                turn.close_listeners()
                log.error("worker processes did not start")
                return 1
            release_workers(children)
        if share.index == 0:
            # The other workers start on worker 0's word, on their stdin (below); ready
            # means every worker reads.
            await turn.start_udp(loop)
            reading = await wait_reading(children, _START_MARGIN)
            if reading < len(children):
                log.warning("%d worker processes did not start reading", len(children) - reading)
        _say_turn(config, listening, turn, ssl_context, material, turn_secret)
        prepare = None
        if reread is not None:
            source = reread

            def prepare() -> ReloadPlan:
                return _prepare_reload(running, source)

        admin, admin_handler = await _start_admin(
            config, share, turn, started, config_file, admin_token, running, prepare
        )

    renewals = None if acme is None else loop.create_task(_keep_acme_current(acme, running))
    exporter, metrics_servers = await _start_metrics(config, share, turn)
    runner: Any = None
    if not config.no_web:
        from .signaling.server import revoke_user, run_web

        web_ssl = ssl_context if web_tls else None
        from .admin.metrics import routes
        from .signaling.server import hub_figures

        runner = await run_web(
            config,
            None if config.no_turn else turn_secret,
            web_ssl,
            extra_routes=None if exporter is None else routes(exporter),
        )
        running.web = runner
        if exporter is not None:
            signaling = runner
            exporter.hub = lambda: hub_figures(signaling)
        if turn is not None and turn.users is not None:
            web = runner
            turn.users.on_user_revoked = lambda user: revoke_user(web, user)
        _say(web_app_line(config, material if web_tls else None))
        _say(_room_access_line(config))
    internal = internal_network_line(config)
    if internal is not None and share.index == 0:
        _say(internal)

    stop = asyncio.Event()
    signals_seen = 0

    def on_signal() -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info(
                "draining: no new allocations; waiting up to %ss", running.config.drain_timeout
            )
            stop.set()
            for child in children:
                child.send_signal(signal.SIGTERM)
        else:
            log.info("second signal: exiting now")
            for child in children:
                child.kill()
            os._exit(1)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    # SIGUSR1: where every task of this worker waits, in the log (a stop that hangs).
    loop.add_signal_handler(signal.SIGUSR1, _log_tasks)
    # Tasks started by signals and by worker 0's word, held until done.
    background: set[asyncio.Task[None]] = set()
    if share.index == 0:
        reload_handler = admin_handler

        def on_hangup() -> None:
            if reload_handler is None:
                log.info("SIGHUP: nothing to reload without TURN")
                return
            task = loop.create_task(reload_on_signal(reload_handler))
            background.add(task)
            task.add_done_callback(background.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hangup)
    else:
        # Worker 0 asks this worker over its admin socket; a SIGHUP sent to the whole
        # process group must not end it.
        loop.add_signal_handler(signal.SIGHUP, lambda: None)
    parent_gone = asyncio.Event()
    if share.index > 0:
        # A worker drains when its parent goes away: the parent holds our stdin open. The
        # parent's first line on it says every worker has bound the ports.
        def on_stdin() -> None:
            data = os.read(0, 4096)
            if not data:
                loop.remove_reader(0)
                parent_gone.set()
                stop.set()
            elif turn is not None and turn.waiting_udp:
                task = loop.create_task(_start_udp_and_say(turn, loop))
                background.add(task)
                task.add_done_callback(background.discard)

        loop.add_reader(0, on_stdin)
    _say(READY_LINE)
    await stop.wait()
    if renewals is not None:
        renewals.cancel()
        await asyncio.gather(renewals, return_exceptions=True)
    if exporter is not None:
        exporter.stopping = True  # /readyz: 503 from now on, while the drain runs

    if turn is not None:
        for item in turn.servers:
            item.close()
    if runner is not None:
        await runner.cleanup()
    if turn is not None:
        await _drain(turn, running.config.drain_timeout)
        # Every worker's UDP sockets stay bound until all workers have drained: one that
        # leaves the port's group makes the kernel hash other workers' clients anew.
        if share.index > 0:
            with contextlib.suppress(OSError):  # worker 0 may be gone (then stdin is closed)
                _say(DRAINED_LINE)
            await _bounded(parent_gone.wait(), running.config.drain_timeout + _DRAIN_MARGIN)
        elif children:
            drained = await wait_drained(children, running.config.drain_timeout + _DRAIN_MARGIN)
            if drained < len(children):
                log.warning("%d worker processes did not finish draining", len(children) - drained)
            release_workers(children, stop=True)
        for listener in turn.udp_listeners:
            listener.close()
        if turn.counter is not None:
            turn.counter.close()  # what is left of the interval's counts reaches the log
        if turn.users is not None:
            await turn.users.close()
    for item in admin:
        await item.close()
    deadline = time.monotonic() + 5.0
    for child in children:
        try:
            await asyncio.to_thread(child.wait, max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
    # Open until the other workers are gone too: /readyz keeps saying 503 while any of
    # them still drains its allocations.
    for item in metrics_servers:
        await item.close()
    if admin_dir:
        shutil.rmtree(admin_dir, ignore_errors=True)
    await asyncio.sleep(0)
    log.info("stopped")
    return 0
