"""What the configuration means for one worker: the core's settings, the addresses to listen
on (wildcards expanded into the machine's addresses), the peer policy, the credentials, the names
a generated certificate covers. Pure but for reading the machine's addresses."""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import logging
import os
import ssl
from dataclasses import dataclass

from ..auth.store import StaticCredentialStore
from ..config import Config
from ..transport.admission import ConnectionLimits, descriptor_budget, worker_share
from ..turn import NatDiscovery, PeerPolicy, TurnSettings
from ..turn.policy import inside
from ..workers import WorkerShare

log = logging.getLogger("tsunagu")


def connection_limits(config: Config) -> ConnectionLimits:
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


def machine_addresses(config: Config) -> list[str]:
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
        return machine_addresses(config)
    specific = [str(ip) for ip in config.listening_ips if not ip.is_unspecified]
    if not wildcards:
        return specific
    expanded = {
        ip for ip in machine_addresses(config) if ipaddress.ip_address(ip).version in wildcards
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
                machine = machine_addresses(config)
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
            hosts += machine_addresses(config)
        else:
            hosts.append(config.web_ip)
    return list(dict.fromkeys(hosts))


def with_worker_count(config: Config) -> Config:
    if config.workers == 0:
        # Like coturn's relay threads: one per core this process may run on.
        return dataclasses.replace(config, workers=len(os.sched_getaffinity(0)))
    return config


def tls_enabled(config: Config, ssl_context: ssl.SSLContext | None) -> bool:
    return ssl_context is not None and not config.no_tls and not config.stun_only
