"""The ICE servers a browser should use: this server's STUN and TURN addresses only.

Pure functions of the configuration, the HTTP Host the browser used and the time. TURN
entries carry time-limited TURN REST API credentials, so the page never sees a long-term
password; without a shared secret there are no TURN entries at all.

Three TURN URIs at most, one per transport: a browser allocates for every URI (on every
interface it gathers on), and the per-user and per-address quotas are sized for three
(:mod:`tsunagu.turn.quotas`). When the host takes TCP on port 443 (the TLS port or the main
port is 443, or an aux server on 443 listens where the host leads), the TCP and the TLS URI
both name port 443, which every TCP listener serves in both forms: a network that lets
only HTTPS out lets them through, and one that lets 3478 and 5349 through lets 443 through
too.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from tsunagu.auth.rest import mint_credentials
from tsunagu.config import Config, IPAddress

__all__ = [
    "HTTPS_PORT",
    "TurnCredentials",
    "choose_host",
    "format_host",
    "ice_config",
    "stun_uris",
    "takes_tcp_on_443",
    "turn_uris",
]

# Open where little else is: a firewall that lets only HTTPS out lets port 443 through.
HTTPS_PORT = 443


@dataclass(frozen=True, slots=True)
class TurnCredentials:
    """The TURN REST API answer: ``{username, password, ttl, uris}``."""

    username: str
    password: str
    ttl: int
    uris: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "username": self.username,
            "password": self.password,
            "ttl": self.ttl,
            "uris": list(self.uris),
        }


def format_host(host: str) -> str:
    """Put an IPv6 literal in brackets, as URIs need; leave names and IPv4 alone."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(bare.split("%", 1)[0])
    except ValueError:
        return bare
    return f"[{bare}]" if address.version == 6 else bare


def host_from_header(header: str | None) -> str | None:
    """The host part of an HTTP ``Host`` header (``name``, ``name:port``, ``[v6]:port``)."""
    if not header:
        return None
    header = header.strip()
    if header.startswith("["):
        end = header.find("]")
        return header[1:end] if end > 1 else None
    if header.count(":") > 1:
        return header  # a bare IPv6 literal, which is not valid in Host but is unambiguous
    host = header.partition(":")[0]
    return host or None


def choose_host(config: Config, request_host: str | None) -> str | None:
    """Host for the URIs: public_host, first external IP, first specific listening IP,
    else the host the browser reached us by. Returned bracketed when IPv6."""
    if config.public_host:
        return format_host(config.public_host)
    if config.external_ips:
        return format_host(str(config.external_ips[0].public))
    for ip in config.listening_ips:
        if not ip.is_unspecified:
            return format_host(str(ip))
    host = host_from_header(request_host)
    return None if host is None else format_host(host)


def stun_uris(config: Config, host: str) -> list[str]:
    # Browsers speak STUN over UDP only, so a server without UDP offers them no STUN.
    if config.no_turn or config.no_stun or config.no_udp:
        return []
    return [f"stun:{host}:{config.listening_port}"]


def _main_listeners_take(config: Config, ip: IPAddress) -> bool:
    """Whether the main listeners take ``ip`` too (so the URIs' host leads there as well)."""
    if ip.is_unspecified or not config.listening_ips:
        return True
    return any(
        other.version == ip.version and (other.is_unspecified or other == ip)
        for other in config.listening_ips
    )


def takes_tcp_on_443(config: Config) -> bool:
    """Whether the URIs' host takes TCP, TLS and plain alike, on port 443: the main or the
    TLS port is 443, or an aux server on 443 listens on an address the main listeners have
    (an aux server elsewhere may not be where the host leads)."""
    if config.no_tcp and config.no_tls:
        return False
    if config.listening_port == HTTPS_PORT and not config.no_tcp:
        return True
    if config.tls_listening_port == HTTPS_PORT and not config.no_tls:
        return True
    return any(
        aux.port == HTTPS_PORT and _main_listeners_take(config, aux.ip)
        for aux in config.aux_servers
    )


def turn_uris(config: Config, host: str) -> list[str]:
    """One URI per transport; TCP and TLS on port 443 when the host takes it there."""
    if config.no_turn or config.stun_only:
        return []
    on_443 = takes_tcp_on_443(config)
    uris = []
    if not config.no_udp:
        uris.append(f"turn:{host}:{config.listening_port}?transport=udp")
    if not config.no_tcp:
        port = HTTPS_PORT if on_443 else config.listening_port
        uris.append(f"turn:{host}:{port}?transport=tcp")
    if not config.no_tls:
        port = HTTPS_PORT if on_443 else config.tls_listening_port
        uris.append(f"turns:{host}:{port}?transport=tcp")
    return uris


def mint(
    config: Config, secret: str, host: str, user_id: str, now: float
) -> TurnCredentials | None:
    """TURN REST credentials for ``user_id``, or None when this server offers no TURN."""
    uris = turn_uris(config, host)
    if not uris:
        return None
    ttl = config.credential_ttl
    username, password = mint_credentials(secret, user_id, ttl, now)
    return TurnCredentials(username, password, ttl, tuple(uris))


def ice_config(
    config: Config,
    *,
    turn_secret: str | None,
    request_host: str | None,
    user_id: str,
    now: float,
) -> dict[str, Any]:
    """What the page needs to build its RTCPeerConnections, as sent inside ``joined``."""
    host = choose_host(config, request_host)
    servers: list[dict[str, Any]] = []
    turn: TurnCredentials | None = None
    if host is not None:
        stun = stun_uris(config, host)
        if stun:
            servers.append({"urls": stun})
        if turn_secret is not None:
            turn = mint(config, turn_secret, host, user_id, now)
            if turn is not None:
                servers.append(
                    {
                        "urls": list(turn.uris),
                        "username": turn.username,
                        "credential": turn.password,
                    }
                )
    policy = config.ice_transport_policy
    return {
        "iceServers": servers,
        "iceTransportPolicy": policy,
        # The user may choose relay-only on a server that allows both, if it has a relay.
        "relayOnlyAllowed": policy == "all" and turn is not None,
        "turn": None if turn is None else turn.to_json(),
    }
