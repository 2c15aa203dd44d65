"""What a reload (``SIGHUP``, ``tsunagu reload``) changes in a running server, and what only
a restart changes.

A running server holds sockets bound to its addresses and ports, worker processes, and a
user database connection; changing those means a new process. Everything else a call does
not depend on from one packet to the next can change under it: who may authenticate, the
limits a new allocation gets, where a draining server sends new clients, the certificate
the next TLS handshake presents. :data:`LIVE` names those options; a reload takes them
from the new configuration and keeps every other option as it runs, naming the ones that
differ so that the operator knows a restart is still owed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .config import Config, ConfigError, config_from_json, config_to_json

__all__ = ["LIVE", "RESTART_NEEDED", "ReloadPlan", "reload_plan"]

LIVE: dict[str, str] = {
    "users": "static users",
    "user_file": "static users",
    "static_auth_secrets": "TURN REST API secrets",
    "static_auth_secret_file": "TURN REST API secrets",
    "rest_check_on_refresh": "TURN REST API secrets",
    "allowed_peer_ips": "peer ranges",
    "denied_peer_ips": "peer ranges",
    "user_quota": "quotas (live allocations above a lowered quota stay until they end)",
    "address_quota": "quotas (live allocations above a lowered quota stay until they end)",
    "total_quota": "quotas (live allocations above a lowered quota stay until they end)",
    "max_bps": "bandwidth per allocation (for allocations made from now on)",
    "user_max_bps": "bandwidth per user (live allocations too)",
    "bps_capacity": "bandwidth of the whole server (live allocations too)",
    "log_level": "log level",
    "verbose": "log level",
    "alternate_servers": "alternate servers",
    "drain_timeout": "drain timeout",
    "max_allocate_lifetime": "allocation lifetimes (for Allocate and Refresh from now on)",
    "permission_lifetime": "permission lifetime (for permissions granted or refreshed from now on)",
    "channel_lifetime": "channel lifetime (for channels bound or refreshed from now on)",
    "unauth_rate": "unauthenticated answer rate (client addresses' budgets carry on)",
    "stale_nonce": "nonce lifetime (nonces handed out from now on)",
    "max_tcp_connections": "TCP/TLS connection caps (new connections; open ones stay)",
    "max_tcp_connections_per_ip": "TCP/TLS connection caps (new connections; open ones stay)",
    "room_access": "room access (joins from now on; people in rooms stay)",
    "room_password": "room access (joins from now on; people in rooms stay)",
    "join_secrets": "room access (joins from now on; people in rooms stay)",
    "room_capacity": "room capacity (joins from now on; people in rooms stay)",
    "api_key": "the web API key (requests from now on)",
    "allowed_origins": "allowed web origins (WebSockets opened from now on)",
    "cert": "TLS certificate (new handshakes; open connections keep theirs)",
    "pkey": "TLS certificate (new handshakes; open connections keep theirs)",
}
"""The options a reload applies, each with what it changes."""

RESTART_NEEDED = (
    "listening addresses and ports (listening_ips, listening_port, tls_listening_port,"
    " aux_servers, alt_listening_port, rfc5780)",
    "relay addresses and port range (relay_ips, external_ips, min_port, max_port)",
    "transports (no_udp, no_tcp, no_tls, stun_only, no_stun)",
    "workers and relay_engine",
    "the user database (userdb, psql_userdb, redis_userdb), use_auth_secret and realm",
    "internal_networks and tcp_allocate_timeout",
    "the web app's address and its other settings (web_ip, web_port, web_plain_http,"
    " public_host, ice_transport_policy, credential_ttl)",
    "log destinations (log_file, log_format, audit_file) and the admin API",
)
"""What only a restart changes, in groups, for ``tsunagu reload --help`` and its answer."""


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    config: Config
    """What runs after the reload: the new file's live options, the running rest."""
    applied: tuple[str, ...]
    """Live options whose value changed."""
    restart_needed: tuple[str, ...]
    """Options whose value changed in the file but that only a restart applies."""


def reload_plan(running: Config, new: Config) -> ReloadPlan:
    """How a reload from ``running`` to ``new`` (both already checked) goes; raises
    ConfigError when the planned configuration breaks a rule between options."""
    live = set(LIVE)
    if running.acme_domains or new.acme_domains:
        # ACME's certificate and a configured one exclude each other: moving between them
        # is a restart (the renewals start or stop with the process).
        live -= {"cert", "pkey"}
    applied: list[str] = []
    restart_needed: list[str] = []
    for field in dataclasses.fields(Config):
        name = field.name
        if getattr(running, name) == getattr(new, name):
            continue
        (applied if name in live else restart_needed).append(name)
    config = dataclasses.replace(running, **{name: getattr(new, name) for name in live})
    # The new file passed its checks with its own restart-only options; the plan has the
    # running ones, and the rules between options must hold for it too (room access that
    # follows from the running web address, say). The workers check it the same way.
    try:
        config_from_json(config_to_json(config))
    except ConfigError as exc:
        kept = ", ".join(restart_needed) or "none changed"
        raise ConfigError(
            f"{exc} (with the options only a restart changes as they run: {kept})"
        ) from None
    return ReloadPlan(config, tuple(applied), tuple(restart_needed))
