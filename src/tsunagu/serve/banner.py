"""The start-up output: what a person needs to connect, on stdout. Tests and scripts parse
these lines."""

from __future__ import annotations

import ipaddress
import json
import ssl
import sys
import time
from typing import Any

from ..auth.rest import mint_credentials
from ..config import Config
from .settings import Endpoints, tls_enabled

# Lifetime of the credential in the start-up output.
_BANNER_CREDENTIAL_TTL = 600


def say(text: str) -> None:
    """Start-up information for the person who ran the command, on stdout."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _host_for_uris(config: Config, listening: list[str]) -> str:
    if config.public_host:
        return config.public_host
    if config.external_ips:
        return str(config.external_ips[0].public)
    for ip in listening:
        if not ipaddress.ip_address(ip).is_loopback:
            return ip
    return listening[0] if listening else "127.0.0.1"


def web_app_line(config: Config, material: Any) -> str:
    """The start-up line naming the web app's URL; over HTTPS, the certificate's
    fingerprints too, so that a tester can accept a generated one knowingly."""
    port = config.web_port
    web_ip = ipaddress.ip_address(config.web_ip)
    if material is None:
        line = f"tsunagu: web app on http://{bracket(config.web_ip)}:{port}/"
        if not web_ip.is_loopback:
            line += (
                " (plain HTTP, --web-plain-http: browsers allow camera and microphone only if a"
                " reverse proxy in front serves it over HTTPS)"
            )
        return line
    host = config.web_ip
    if web_ip.is_unspecified:
        host = config.public_host or host
    line = f"tsunagu: web app on https://{bracket(host)}:{port}/"
    if web_ip.is_unspecified and not config.public_host:
        line += " (every address of this machine)"
    kind = "self-signed certificate" if material.generated else "certificate"
    line += f"; {kind} sha256 {material.sha256_fingerprint} spki {material.spki_sha256_b64}"
    if material.generated:
        line += " (browsers warn until it is accepted; --cert gives a real one)"
    return line


_ROOM_ACCESS: dict[str, str] = {
    "open": "anyone who can reach the page may create and join rooms and use the TURN relay"
    " while in one; fine on loopback or a private network, choose token or password"
    " (--room-access) before exposing it",
    "password": "rooms admit whoever gives the room password (--room-password)",
    "token": "rooms admit invitation links only: a join token signed with the join secret"
    " names the room and the person ('tsunagu token', or three lines in the product's"
    " backend: docs/SIGNALING.md)",
}


def room_access_line(config: Config) -> str:
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


def say_turn(
    config: Config,
    listening: list[str],
    endpoints: Endpoints,
    engine_name: str,
    ssl_context: ssl.SSLContext | None,
    material: Any,
    turn_secret: str,
) -> None:
    """What a user needs to reach the TURN side; tests and scripts parse these lines."""
    from ..signaling.ice import turn_uris

    port = config.listening_port
    tls = tls_enabled(config, ssl_context)
    say(f"tsunagu: STUN/TURN on {', '.join(listening)} port {port}")
    taken = [
        name
        for name, enabled in (("udp", not config.no_udp), ("tcp", not config.no_tcp), ("tls", tls))
        if enabled
    ]
    aux = endpoints.aux
    if aux:
        where = ", ".join(f"{bracket(ip)}:{number}" for ip, number in aux)
        say(f"tsunagu: aux servers on {where} ({', '.join(taken)})")
    if config.workers > 1:
        say(f"tsunagu: {config.workers} worker processes")
    say(f"tsunagu: transports: {', '.join(taken)}; realm {config.realm}; relay path: {engine_name}")
    for primary, alternate in config.rfc5780_pairs:
        say(
            f"tsunagu: NAT behaviour discovery (RFC 5780) over UDP: {primary} and {alternate},"
            f" ports {port} and {config.alternate_port}"
        )
    if tls and not config.no_tcp:
        ports = list(dict.fromkeys(number for _, number in endpoints.tcp))
        say(
            "tsunagu: every TCP port takes TLS and plain TCP alike:"
            f" {', '.join(str(number) for number in ports)}"
        )
    if material is not None:
        say(
            f"tsunagu: TLS certificate {material.cert_path}"
            f"{' (self-signed)' if material.generated else ''}"
            f" sha256 {material.sha256_fingerprint} spki {material.spki_sha256_b64}"
        )
    if not config.stun_only:
        host = bracket(_host_for_uris(config, listening))
        # Start-up output ends up in logs (journald keeps it): a credential for a first test
        # only, not one that stays good for a day.
        username, password = mint_credentials(
            turn_secret, "test", _BANNER_CREDENTIAL_TTL, time.time()
        )
        # The URIs the web page hands out, the same way (signaling/ice.py).
        urls = [f"stun:{host}:{port}", *turn_uris(config, host)]
        entry = {"urls": urls, "username": username, "credential": password}
        say(f"tsunagu: ICE server entry (valid {_BANNER_CREDENTIAL_TTL // 60} min):")
        say(json.dumps(entry))
