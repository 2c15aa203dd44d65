"""The ICE servers a browser should use: this server's STUN and TURN addresses only.

Pure functions of the configuration, the HTTP Host the browser used and the time. TURN
entries carry time-limited TURN REST API credentials, so the page never sees a long-term
password; without a shared secret there are no TURN entries at all.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from tsunagu.auth.rest import mint_credentials
from tsunagu.config import Config

__all__ = ["TurnCredentials", "choose_host", "format_host", "stun_uris", "turn_uris", "ice_config"]


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


def turn_uris(config: Config, host: str) -> list[str]:
    if config.no_turn or config.stun_only:
        return []
    uris = []
    if not config.no_udp:
        uris.append(f"turn:{host}:{config.listening_port}?transport=udp")
    if not config.no_tcp:
        uris.append(f"turn:{host}:{config.listening_port}?transport=tcp")
    if not config.no_tls:
        uris.append(f"turns:{host}:{config.tls_listening_port}?transport=tcp")
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
