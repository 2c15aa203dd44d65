"""STUN and TURN URLs as ICE server configurations write them (RFC 7064, RFC 7065).

::

    stun:host[:port]              stuns:host[:port]
    turn:host[:port][?transport=udp|tcp]
    turns:host[:port][?transport=tcp]

``host`` is a name, an IPv4 address or an IPv6 address in brackets. The default port is
3478, or 5349 for the secure schemes. ``turn:`` without ``?transport=`` is UDP (RFC 7065
§3); ``turns:`` is TLS over TCP (``turns:…?transport=udp`` would be DTLS, which tsunagu does
not speak). For ``stun:`` URLs, which the RFC gives no transport parameter, ``?transport=``
is accepted too (``udp``, ``tcp`` or ``tls``) so that one can check a STUN server over each.

Parsing is strict and the errors say what to write instead: a URL copied from a web app's
ICE configuration is the first thing to get wrong.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

__all__ = ["IceUrl", "UrlError", "parse_ice_url"]

_DEFAULT_PORT = {"stun": 3478, "turn": 3478, "stuns": 5349, "turns": 5349}
_TRANSPORTS = {
    "stun": ("udp", "tcp", "tls"),
    "stuns": ("tls",),
    "turn": ("udp", "tcp"),
    "turns": ("tls",),
}


class UrlError(ValueError):
    """A STUN/TURN URL that cannot be used; the message says why and what to write."""


@dataclass(frozen=True, slots=True)
class IceUrl:
    """One parsed URL. ``transport`` is what goes on the wire: ``udp``, ``tcp`` or ``tls``."""

    scheme: str  # stun, stuns, turn, turns
    host: str  # without brackets
    port: int
    transport: str

    @property
    def turn(self) -> bool:
        return self.scheme in ("turn", "turns")

    @property
    def host_is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    @property
    def authority(self) -> str:
        """``host:port``, with brackets around an IPv6 address."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def transport_name(self) -> str:
        return {"udp": "UDP", "tcp": "TCP", "tls": "TLS"}[self.transport]

    def __str__(self) -> str:
        """The URL in its canonical form, port and transport always written."""
        if self.scheme in ("turns", "stuns"):
            suffix = "?transport=tcp" if self.scheme == "turns" else ""
        else:
            suffix = f"?transport={self.transport}"
        return f"{self.scheme}:{self.authority}{suffix}"


def parse_ice_url(text: str, *, turn: bool | None = None) -> IceUrl:
    """Parse ``text``; with ``turn`` True (False) only TURN (STUN) schemes are accepted."""
    original = text
    text = text.strip()
    scheme, sep, rest = text.partition(":")
    scheme = scheme.lower()
    if not sep or scheme not in _DEFAULT_PORT:
        raise UrlError(
            f"{original!r} is not a STUN or TURN URL: write stun:host:port, "
            "turn:host:port?transport=udp|tcp or turns:host:port?transport=tcp"
        )
    if turn is True and scheme.startswith("stun"):
        raise UrlError(f"{original!r} is a STUN URL: 'probe turn' takes turn: or turns: URLs")
    if turn is False and scheme.startswith("turn"):
        raise UrlError(f"{original!r} is a TURN URL: 'probe stun' takes stun: or stuns: URLs")
    if rest.startswith("//"):
        raise UrlError(f"{original!r}: STUN and TURN URLs have no '//' ({scheme}:host:port)")
    authority, qmark, query = rest.partition("?")
    host, port = _split_authority(authority, original, scheme)
    transport = _transport(query if qmark else "", scheme, original)
    return IceUrl(scheme, host, port, transport)


def _split_authority(authority: str, original: str, scheme: str) -> tuple[str, int]:
    if "@" in authority:
        raise UrlError(
            f"{original!r}: credentials do not go in the URL; use -u NAME:PASSWORD or --secret"
        )
    if authority.startswith("["):
        host, bracket, tail = authority[1:].partition("]")
        if not bracket:
            raise UrlError(f"{original!r}: an IPv6 address needs its closing ']'")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise UrlError(f"{original!r}: {host!r} is not an IPv6 address") from None
        if tail and not tail.startswith(":"):
            raise UrlError(f"{original!r}: expected ':port' after ']'")
        port_text = tail[1:] if tail else ""
    else:
        if authority.count(":") > 1:
            raise UrlError(f"{original!r}: write an IPv6 address in brackets, [{authority}]")
        host, _, port_text = authority.partition(":")
        if ":" in authority and not port_text:
            raise UrlError(f"{original!r}: empty port")
    if not host:
        raise UrlError(f"{original!r} names no host")
    if not port_text:
        return host, _DEFAULT_PORT[scheme]
    if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise UrlError(f"{original!r}: {port_text!r} is not a port (1-65535)")
    return host, int(port_text)


def _transport(query: str, scheme: str, original: str) -> str:
    secure = scheme.endswith("s")
    default = "tls" if secure else "udp"
    if not query:
        return default
    key, eq, value = query.partition("=")
    if key.lower() != "transport" or not eq or "&" in value:
        raise UrlError(f"{original!r}: the only parameter is ?transport=udp or ?transport=tcp")
    value = value.lower()
    if secure:
        if value == "tcp":
            return "tls"
        raise UrlError(
            f"{original!r}: {scheme}: runs TLS over TCP (write ?transport=tcp); "
            "DTLS over UDP is not supported"
        )
    if value not in _TRANSPORTS[scheme]:
        allowed = " or ".join(f"?transport={t}" for t in _TRANSPORTS[scheme])
        hint = " (for TLS write turns:host:port?transport=tcp)" if value == "tls" else ""
        raise UrlError(f"{original!r}: {scheme}: takes {allowed}{hint}")
    return value
