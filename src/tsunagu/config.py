"""Server configuration: one frozen :class:`Config`, read from a TOML file and flags.

Every field can be set in a TOML file given with ``-c/--config`` (keys are the field names;
dashes and underscores are interchangeable) and with a command-line flag named after the
field. Flags win over the file; a repeatable flag given on the command line replaces the
file's list for that field rather than extending it, so the command line always shows the
whole effective value. Long option names follow coturn where coturn has the option, so
``-c`` also reads coturn's ``turnserver.conf`` (:mod:`tsunagu.coturn_config`), the format
chosen by the file's name and content.

Everything is validated up front: a bad key, type or value raises :class:`ConfigError`, whose
message is one line naming the key and what is allowed.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import math
import os
import re
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final, NoReturn, TypeVar

__all__ = [
    "AlternateServer",
    "AuxServer",
    "Config",
    "ConfigError",
    "ExternalIp",
    "IPAddress",
    "IPNetwork",
    "PeerRange",
    "StaticUser",
    "build_parser",
    "config_from_args",
    "config_from_json",
    "config_to_json",
    "load_config",
    "parse_alternate_server",
    "parse_aux_server",
    "parse_config",
    "parse_external_ip",
    "parse_internal_network",
    "parse_ip_range",
    "parse_user",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_T = TypeVar("_T")
_Check = Callable[[str, Any], Any]


class ConfigError(ValueError):
    """An invalid configuration. ``str()`` is a single line naming the offending key."""

    def __init__(self, message: str) -> None:
        # The CLI prints this verbatim as the only line of output; keep it one line whatever
        # the offending value contained.
        super().__init__(" ".join(message.split()))


def _fail(key: str, requirement: str, value: Any = None, *, show: bool = True) -> NoReturn:
    got = f", got {value!r}" if show else ""
    raise ConfigError(f"config: {key}: {requirement}{got}")


# ---------------------------------------------------------------------------------------------
# Value parsers. Config holds what they return (see the typed values below); they are public
# for other commands that read the same forms (``tsunagu probe``).
# ---------------------------------------------------------------------------------------------


def _ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text.strip())


def parse_ip_range(text: str) -> tuple[IPAddress, IPAddress]:
    """Parse ``"ip"``, ``"cidr"`` or ``"ip1-ip2"`` into an inclusive ``(first, last)`` pair.

    Raises ValueError for anything else, for a CIDR with host bits set, for a range whose
    ends differ in family, and for a range that runs backwards.
    """
    text = text.strip()
    if "/" in text:
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            if "host bits set" in str(exc):
                loose = ipaddress.ip_network(text, strict=False)
                raise ValueError(f"{text!r} has host bits set; did you mean {loose}?") from None
            raise
        return net[0], net[-1]
    if "-" in text:
        low_text, _, high_text = text.partition("-")
        low, high = _ip(low_text), _ip(high_text)
        if low.version != high.version:
            raise ValueError(f"{text!r} mixes IPv4 and IPv6")
        if int(low) > int(high):
            raise ValueError(f"{text!r} runs backwards")
        return low, high
    address = _ip(text)
    return address, address


def parse_internal_network(text: str) -> IPNetwork:
    """Parse a CIDR network (``10.0.0.0/8``, ``fd00::/8``; a bare address is one host).

    Raises ValueError for anything else, for host bits set, and for a network of every
    address (``/0``), which would leave nothing outside.
    """
    text = text.strip()
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        if "host bits set" in str(exc):
            loose = ipaddress.ip_network(text, strict=False)
            raise ValueError(f"{text!r} has host bits set; did you mean {loose}?") from None
        raise
    if net.prefixlen == 0:
        raise ValueError(f"{text!r} is every address, which leaves nothing outside")
    return net


def parse_external_ip(text: str) -> tuple[IPAddress, IPAddress | None]:
    """Parse ``"public"`` or ``"public/private"`` (same family) into ``(public, private)``."""
    public_text, sep, private_text = text.strip().partition("/")
    public = _ip(public_text)
    private = _ip(private_text) if sep else None
    if private is not None and private.version != public.version:
        raise ValueError(f"{text!r} maps between IPv4 and IPv6")
    if public.is_unspecified or (private is not None and private.is_unspecified):
        raise ValueError(f"{text!r} uses a wildcard address")
    return public, private


def _parse_host_port(text: str, *, wildcard: bool) -> tuple[IPAddress, int]:
    text = text.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r} is not [ipv6]:port")
        address = _ip(host)
        if address.version != 6:
            raise ValueError(f"{text!r}: brackets are for IPv6 addresses")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r} has no port")
        address = _ip(host)
        if address.version != 4:
            raise ValueError(f"{text!r}: write IPv6 addresses as [ipv6]:port")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r} has no valid port")
    if address.is_unspecified and not wildcard:
        raise ValueError(f"{text!r} uses a wildcard address")
    return address, int(port_text)


def parse_alternate_server(text: str) -> tuple[IPAddress, int]:
    """Parse ``"ip:port"`` (IPv4) or ``"[ipv6]:port"`` into ``(address, port)``."""
    return _parse_host_port(text, wildcard=False)


def parse_aux_server(text: str) -> tuple[IPAddress, int]:
    """Parse an aux server, ``"ip:port"`` or ``"[ipv6]:port"``; a wildcard address (every
    address of its family) is allowed, as in ``listening_ips``."""
    return _parse_host_port(text, wildcard=True)


def parse_user(text: str) -> tuple[str, str]:
    """Split a static user entry ``"name:password"`` at the first colon."""
    name, sep, password = text.partition(":")
    if not sep or not name or not password:
        raise ValueError("expected name:password")
    return name, password


# ---------------------------------------------------------------------------------------------
# Typed values of the list options, made once when the configuration is checked. Each has
# ``text``, the form it was written in, so that a Config can be written out and read back.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExternalIp:
    """An ``external_ips`` entry: the public address, and the private one it maps to."""

    public: IPAddress
    private: IPAddress | None = None

    @classmethod
    def parse(cls, text: str) -> ExternalIp:
        return cls(*parse_external_ip(text))

    @property
    def text(self) -> str:
        return str(self.public) if self.private is None else f"{self.public}/{self.private}"


@dataclass(frozen=True, slots=True)
class AlternateServer:
    """An ``alternate_servers`` entry: where a refused Allocate is redirected (300)."""

    ip: IPAddress
    port: int

    @classmethod
    def parse(cls, text: str) -> AlternateServer:
        return cls(*parse_alternate_server(text))

    @property
    def text(self) -> str:
        host = f"[{self.ip}]" if self.ip.version == 6 else str(self.ip)
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class AuxServer:
    """An ``aux_servers`` entry: one more UDP and TCP listening address (coturn's
    ``aux-server``), with full STUN/TURN like the main listeners."""

    ip: IPAddress
    port: int

    @classmethod
    def parse(cls, text: str) -> AuxServer:
        return cls(*parse_aux_server(text))

    @property
    def text(self) -> str:
        host = f"[{self.ip}]" if self.ip.version == 6 else str(self.ip)
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class StaticUser:
    """A ``users`` entry. The password stays out of ``repr``."""

    name: str
    password: str = field(repr=False)

    @classmethod
    def parse(cls, text: str) -> StaticUser:
        return cls(*parse_user(text))

    @property
    def text(self) -> str:
        return f"{self.name}:{self.password}"


@dataclass(frozen=True, slots=True)
class PeerRange:
    """An ``allowed_peer_ips`` or ``denied_peer_ips`` entry: an inclusive address range."""

    first: IPAddress
    last: IPAddress

    @classmethod
    def parse(cls, text: str) -> PeerRange:
        return cls(*parse_ip_range(text))

    @property
    def networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """The range as the fewest networks that cover it exactly."""
        return tuple(ipaddress.summarize_address_range(self.first, self.last))

    @property
    def text(self) -> str:
        if self.first == self.last:
            return str(self.first)
        networks = self.networks
        return str(networks[0]) if len(networks) == 1 else f"{self.first}-{self.last}"


# ---------------------------------------------------------------------------------------------
# Per-field checks. Each takes (key, value) and returns the normalised value or calls _fail.
# ---------------------------------------------------------------------------------------------


def _check_int(low: int, high: int | None = None, note: str = "") -> _Check:
    allowed = f"an integer {low}-{high}" if high is not None else f"an integer >= {low}"
    allowed += note

    def check(key: str, value: Any) -> int:
        if type(value) is not int or value < low or (high is not None and value > high):
            _fail(key, f"must be {allowed}", value)
        return value

    return check


def _check_float(low: float, *, inclusive: bool) -> _Check:
    allowed = f"a number {'>=' if inclusive else '>'} {low:g}"

    def check(key: str, value: Any) -> float:
        if type(value) not in (int, float) or not math.isfinite(value):
            _fail(key, f"must be {allowed}", value)
        if value < low or (value == low and not inclusive):
            _fail(key, f"must be {allowed}", value)
        return float(value)

    return check


def _check_bool(key: str, value: Any) -> bool:
    if type(value) is not bool:
        _fail(key, "must be true or false", value)
    return value


def _check_text(max_chars: int | None = None, *, secret: bool = False) -> _Check:
    allowed = "a non-empty string without control characters"
    if max_chars is not None:
        allowed += f", at most {max_chars} characters"

    def check(key: str, value: Any) -> str:
        if (
            not isinstance(value, str)
            or not value
            or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)
            or (max_chars is not None and len(value) > max_chars)
        ):
            _fail(key, f"must be {allowed}", value, show=not secret)
        return value

    return check


def _optional(check: _Check) -> _Check:
    def optional(key: str, value: Any) -> Any:
        return None if value is None else check(key, value)

    return optional


def _check_choice(*choices: str) -> _Check:
    def check(key: str, value: Any) -> str:
        if value not in choices:
            _fail(key, "must be one of " + ", ".join(repr(c) for c in choices), value)
        return str(value)

    return check


def _address(key: str, value: Any, *, wildcard: bool) -> IPAddress:
    try:
        address = _ip(value)
    except (ValueError, AttributeError):
        _fail(key, "must be an IPv4 or IPv6 address", value)
    if address.is_unspecified and not wildcard:
        _fail(key, "must be a specific address, not a wildcard", value)
    return address


def _check_ip(*, wildcard: bool) -> _Check:
    def check(key: str, value: Any) -> str:
        return str(_address(key, value, wildcard=wildcard))

    return check


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")


def _check_host(key: str, value: Any) -> str:
    if isinstance(value, str):
        bare = value[1:-1] if value.startswith("[") and value.endswith("]") else value
        try:
            return str(_ip(bare))
        except ValueError:
            pass
        labels = value.split(".")
        if len(value) <= 253 and all(_HOST_LABEL.match(label) for label in labels):
            return value
    _fail(key, "must be an IP address or a DNS host name", value)


def _check_each(item: _Check, *, what: str, secret: bool = False) -> _Check:
    """Validate a list of strings item by item; a single string is taken as a one-item list."""

    def check(key: str, value: Any) -> tuple[Any, ...]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            _fail(key, f"must be a list of strings ({what})", value, show=not secret)
        out: list[Any] = []
        for entry in value:
            normalised = item(key, entry)
            if normalised not in out:
                out.append(normalised)
        return tuple(out)

    return check


def _entry(parse: Callable[[str], Any], what: str) -> _Check:
    def check(key: str, value: str) -> Any:
        try:
            return parse(value)
        except ValueError as exc:
            _fail(key, f"each entry must be {what} ({exc})", value, show=False)

    return check


def _ip_entry(*, wildcard: bool) -> _Check:
    def check(key: str, value: str) -> IPAddress:
        return _address(key, value, wildcard=wildcard)

    return check


def _range_entry(key: str, value: str) -> PeerRange:
    try:
        return PeerRange.parse(value)
    except ValueError as exc:
        _fail(key, f"each entry must be an IP, a CIDR network or ip1-ip2 ({exc})", show=False)


def _network_entry(key: str, value: str) -> IPNetwork:
    try:
        return parse_internal_network(value)
    except ValueError as exc:
        _fail(key, f"each entry must be a CIDR network such as 10.0.0.0/8 ({exc})", show=False)


def _check_connection(*schemes: str) -> _Check:
    """A database connection string: a URL of one of ``schemes``, or ``key=value`` pairs.
    The value is never shown: it may hold a password. The rest is read when the database
    is opened."""

    def check(key: str, value: Any) -> str:
        text = str(_check_text(secret=True)(key, value))
        if not text.startswith(tuple(f"{scheme}://" for scheme in schemes)) and "=" not in text:
            _fail(
                key,
                "must be key=value pairs (as coturn takes it) or a URL starting "
                + " or ".join(f"{scheme}://" for scheme in schemes),
                show=False,
            )
        return text

    return check


def _user_entry(key: str, value: str) -> StaticUser:
    try:
        user = StaticUser.parse(value)
    except ValueError:
        # Never echo the entry: it holds a password.
        _fail(key, "each entry must be name:password with both parts non-empty", show=False)
    _check_text(508)(key, user.name)
    return user


def _secret_entry(key: str, value: str) -> str:
    return str(_check_text(secret=True)(key, value))


_MIN_KEY_CHARS = 32


def _check_long_secret(key: str, value: Any) -> str:
    text = str(_check_text(secret=True)(key, value))
    if len(text) < _MIN_KEY_CHARS:
        # Guessable keys would make the endpoint or the tokens they protect open to anyone.
        _fail(
            key,
            f"must be at least {_MIN_KEY_CHARS} characters (try: openssl rand -hex 32)",
            value,
            show=False,
        )
    return text


def _long_secret_entry(key: str, value: str) -> str:
    return _check_long_secret(key, value)


def _check_domains(key: str, value: Any) -> tuple[str, ...]:
    """DNS names for a certificate, from a list, a repeated flag or comma-separated text.
    Lower-cased, without a trailing dot; HTTP-01 cannot validate wildcards or addresses."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        _fail(key, "must be a list of DNS names", value)
    out: list[str] = []
    for part in (p.strip() for entry in value for p in entry.split(",")):
        name = part.lower().rstrip(".")
        if not part:
            continue
        if name.startswith("*."):
            _fail(key, "cannot hold a wildcard name: the HTTP-01 challenge cannot prove it", part)
        try:
            _ip(name.strip("[]"))
        except ValueError:
            pass
        else:
            _fail(key, "must be DNS names, not IP addresses", part)
        labels = name.split(".")
        if len(name) > 253 or len(labels) < 2 or not all(_HOST_LABEL.match(x) for x in labels):
            _fail(
                key, "each entry must be a fully qualified DNS name such as turn.example.org", part
            )
        if name not in out:
            out.append(name)
    return tuple(out)


_EMAIL = re.compile(r"[^@\s]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+\Z")


def _check_email(key: str, value: Any) -> str:
    text = str(_check_text(254)(key, value))
    if not _EMAIL.match(text):
        _fail(key, "must be an e-mail address such as ops@example.org", value)
    return text


def _check_https_url(key: str, value: Any) -> str:
    text = str(_check_text()(key, value))
    if not re.match(r"https://[^/\s]+(/\S*)?\Z", text):
        _fail(key, "must be an https:// URL (an ACME directory)", value)
    return text


def _origin_entry(key: str, value: str) -> str:
    text = str(_check_text(253)(key, value)).rstrip("/").lower()
    scheme, sep, host = text.partition("://")
    if scheme not in ("http", "https") or not sep or not host or "/" in host:
        _fail(key, "must be an origin such as https://app.example.org[:port]", value)
    return text


# ---------------------------------------------------------------------------------------------
# The configuration itself.
# ---------------------------------------------------------------------------------------------


def _opt(
    default: _T,
    check: _Check,
    help: str,
    *,
    short: str | None = None,
    flag: str | None = None,
    metavar: str | None = None,
) -> _T:
    meta = {"check": check, "help": help, "short": short, "flag": flag, "metavar": metavar}
    return field(default=default, metadata=meta)


_PORT = _check_int(1, 65535)
_POSITIVE = _check_int(1)
_QUOTA = _check_int(0, note=" (0 = unlimited)")
# The highest rate turn/bandwidth.py's 64-bit arithmetic allows (MAX_BPS, about 34 Gbit/s).
_BPS = _check_int(0, 0xFFFF_FFFF, note=" (0 = unlimited)")


@dataclass(frozen=True, slots=True)
class Config:
    """Effective server configuration. Build it with :func:`load_config` or :func:`parse_config`."""

    listening_ips: tuple[IPAddress, ...] = _opt(
        (),
        _check_each(_ip_entry(wildcard=True), what="IP addresses"),
        "address to listen on for STUN/TURN (repeatable; default: all IPv4 and IPv6)",
        short="-L",
        flag="--listening-ip",
        metavar="IP",
    )
    listening_port: int = _opt(
        3478, _PORT, "STUN/TURN port for UDP and TCP (TCP takes TLS too)", short="-p"
    )
    tls_listening_port: int = _opt(
        5349, _PORT, "STUN/TURN port for TLS (takes plain TCP too; may equal listening_port)"
    )
    aux_servers: tuple[AuxServer, ...] = _opt(
        (),
        _check_each(_entry(AuxServer.parse, "ip:port or [ipv6]:port"), what="ip:port"),
        "one more STUN/TURN listening address, UDP and TCP (TCP takes TLS too), as coturn's"
        " aux-server; an Allocate through it is never redirected to an alternate server"
        " (repeatable: ip:port or [ipv6]:port; 0.0.0.0 or [::] for every address)",
        flag="--aux-server",
        metavar="ADDR",
    )
    relay_ips: tuple[IPAddress, ...] = _opt(
        (),
        _check_each(_ip_entry(wildcard=False), what="IP addresses"),
        "address to open relayed transport addresses on (repeatable; default: the listening "
        "address the client came in on)",
        short="-E",
        flag="--relay-ip",
        metavar="IP",
    )
    external_ips: tuple[ExternalIp, ...] = _opt(
        (),
        _check_each(_entry(ExternalIp.parse, "public or public/private"), what="public[/private]"),
        "public address to advertise, or public/private mapping behind a 1:1 NAT (repeatable)",
        short="-X",
        flag="--external-ip",
        metavar="PUBLIC[/PRIVATE]",
    )
    min_port: int = _opt(49152, _PORT, "lowest relay port")
    max_port: int = _opt(65535, _PORT, "highest relay port")
    realm: str = _opt(
        "tsunagu",
        _check_text(127),
        "realm of the long-term credentials",
        short="-r",
        metavar="REALM",
    )
    users: tuple[StaticUser, ...] = _opt(
        (),
        _check_each(_user_entry, what="name:password", secret=True),
        "static long-term user (repeatable)",
        short="-u",
        flag="--user",
        metavar="NAME:PASSWORD",
    )
    user_file: str | None = _opt(
        None,
        _optional(_check_text()),
        "file of static users, one name:password a line, # comments (keeps passwords out of"
        " the process list; TSUNAGU_USERS adds more, comma- or newline-separated)",
        metavar="FILE",
    )
    userdb: str | None = _opt(
        None,
        _optional(_check_text()),
        "SQLite file of users, REST secrets and peer ranges in coturn's layout (coturn's"
        " turnadmin -b fills it too), created on first use (default: users.db in the state"
        " directory, $XDG_STATE_HOME/tsunagu)",
        short="-b",
        metavar="FILE",
    )
    psql_userdb: str | None = _opt(
        None,
        _optional(_check_connection("postgresql", "postgres")),
        "PostgreSQL database of users, REST secrets and peer ranges in coturn's layout"
        " (coturn's turnadmin -e fills it too; missing tables are created): a libpq"
        " connection string as coturn takes it ('host=... port=... dbname=... user=..."
        " password=... connect_timeout=...'), or a postgresql://user:password@host/dbname URL;"
        " while it is unreachable, cached users and REST secrets from the configuration keep"
        " serving",
        short="-e",
        metavar="CONNECTION",
    )
    redis_userdb: str | None = _opt(
        None,
        _optional(_check_connection("redis", "rediss", "unix")),
        "Redis database of users, REST secrets and peer ranges in coturn's layout (coturn's"
        " turnadmin -N fills it too): a connection string as coturn takes it ('ip=..."
        " port=... dbname=N password=... connect_timeout=...'), or a"
        " redis://:password@host:port/N URL; while it is unreachable, cached users and REST"
        " secrets from the configuration keep serving",
        short="-N",
        metavar="CONNECTION",
    )
    use_auth_secret: bool = _opt(
        False,
        _check_bool,
        "TURN REST API credentials only, as coturn: static users are not accepted",
    )
    static_auth_secrets: tuple[str, ...] = _opt(
        (),
        _check_each(_secret_entry, what="secrets", secret=True),
        "shared secret for TURN REST API credentials (repeatable, to rotate secrets)",
        flag="--static-auth-secret",
        metavar="SECRET",
    )
    static_auth_secret_file: str | None = _opt(
        None,
        _optional(_check_text()),
        "file of TURN REST secrets, one a line, # comments (without it and without"
        " --static-auth-secret, TSUNAGU_STATIC_AUTH_SECRET is read)",
        metavar="FILE",
    )
    rest_check_on_refresh: bool = _opt(
        False,
        _check_bool,
        "end an allocation at its REST credential's expiry: refuse its Refresh, CreatePermission "
        "and ChannelBind (off: a credential gates new allocations only, as in coturn, so a call "
        "outlives its short-lived credential)",
    )
    allowed_peer_ips: tuple[PeerRange, ...] = _opt(
        (),
        _check_each(_range_entry, what="ip, cidr or ip1-ip2"),
        "peer addresses to allow even if denied by default (repeatable: ip, cidr, ip1-ip2)",
        flag="--allowed-peer-ip",
        metavar="RANGE",
    )
    denied_peer_ips: tuple[PeerRange, ...] = _opt(
        (),
        _check_each(_range_entry, what="ip, cidr or ip1-ip2"),
        "additional peer addresses to deny (repeatable: ip, cidr, ip1-ip2)",
        flag="--denied-peer-ip",
        metavar="RANGE",
    )
    internal_networks: tuple[IPNetwork, ...] = _opt(
        (),
        _check_each(_network_entry, what="CIDR networks"),
        "keep calls inside these networks (repeatable: cidr, IPv4 or IPv6): the relay reaches"
        " peers inside them only (their private ranges allowed), the signaling server forwards"
        " only ICE candidates with an address inside them, and a page whose connection comes"
        " from outside cannot join; every address the server listens on, relays from or"
        " advertises must lie inside them",
        flag="--internal-network",
        metavar="CIDR",
    )
    cert: str | None = _opt(
        None,
        _optional(_check_text()),
        "PEM certificate (chain) for TLS; default: a generated self-signed one",
        metavar="FILE",
    )
    pkey: str | None = _opt(
        None,
        _optional(_check_text()),
        "PEM private key for --cert; default: the key inside the --cert file",
        metavar="FILE",
    )
    acme_domains: tuple[str, ...] = _opt(
        (),
        _check_domains,
        "DNS name to get a certificate for from an ACME CA (Let's Encrypt by default) and"
        " renew, for TURN over TLS and the web app (repeatable or comma-separated; instead of"
        " cert and pkey); the CA checks each name over HTTP on acme_http_port",
        flag="--acme-domain",
        metavar="NAME",
    )
    acme_email: str | None = _opt(
        None,
        _optional(_check_email),
        "e-mail address of the ACME account, where the CA warns of expiry and problems",
        metavar="EMAIL",
    )
    acme_directory: str = _opt(
        "https://acme-v02.api.letsencrypt.org/directory",
        _check_https_url,
        "ACME directory URL of the CA (for Let's Encrypt's staging CA:"
        " https://acme-staging-v02.api.letsencrypt.org/directory)",
        metavar="URL",
    )
    acme_ca_file: str | None = _opt(
        None,
        _optional(_check_text()),
        "PEM CA bundle to trust for a private ACME server such as step-ca (default: the"
        " system's CAs)",
        metavar="FILE",
    )
    acme_http_port: int = _opt(
        80,
        _PORT,
        "port the ACME HTTP-01 challenge is answered on while a certificate is ordered (the CA"
        " connects to port 80; another one needs a forward from 80)",
    )
    stun_only: bool = _opt(False, _check_bool, "answer STUN only, no TURN", short="-S")
    no_stun: bool = _opt(False, _check_bool, "answer TURN only, no plain STUN Binding")
    no_udp: bool = _opt(False, _check_bool, "do not listen on UDP")
    no_tcp: bool = _opt(False, _check_bool, "do not listen on plain TCP")
    no_tls: bool = _opt(False, _check_bool, "do not listen on TLS")
    # Defaults (None) are derived per worker process from its share of the relay ports;
    # turn/quotas.py says why these numbers.
    user_quota: int | None = _opt(
        None,
        _optional(_QUOTA),
        "allocations per user, per worker: for a TURN REST username the user id after"
        " 'expiry:' (a new credential does not reset it), else the name (default: 128, at"
        " most half of total_quota)",
        metavar="N",
    )
    address_quota: int | None = _opt(
        None,
        _optional(_QUOTA),
        "allocations per client IPv4 address or IPv6 /64, per worker (default: 512, enough for"
        " an 8-person call behind one NAT, at most half of total_quota)",
        metavar="N",
    )
    total_quota: int | None = _opt(
        None,
        _optional(_QUOTA),
        "allocations in total, per worker (default: the worker's share of the relay ports,"
        " less 2%%)",
        metavar="N",
    )
    # Bytes per second, as coturn's options of these names; turn/bandwidth.py meters them.
    max_bps: int = _opt(
        0,
        _BPS,
        "bytes per second each allocation may relay in each direction, as coturn's max-bps"
        " (bytes, not bits; burst: one second's worth; 0 = unlimited)",
        metavar="BYTES",
    )
    user_max_bps: int = _opt(
        0,
        _BPS,
        "bytes per second all allocations of one user id may relay together in each"
        " direction, per worker (0 = unlimited)",
        metavar="BYTES",
    )
    bps_capacity: int = _opt(
        0,
        _BPS,
        "bytes per second the whole server may relay in each direction, as coturn's"
        " bps-capacity; each worker meters its share, N / workers (0 = unlimited)",
        metavar="BYTES",
    )
    max_allocate_lifetime: int = _opt(3600, _POSITIVE, "longest allocation lifetime, seconds")
    channel_lifetime: int = _opt(600, _POSITIVE, "channel binding lifetime, seconds")
    permission_lifetime: int = _opt(300, _POSITIVE, "permission lifetime, seconds")
    stale_nonce: int = _opt(600, _POSITIVE, "seconds before a nonce goes stale")
    software_attribute: bool = _opt(
        False, _check_bool, "send a SOFTWARE attribute (off: it tells attackers the version)"
    )
    stun_backward_compatibility: bool = _opt(
        False,
        _check_bool,
        "answer RFC 3489 clients: accept Binding requests without the magic cookie, and send"
        " MAPPED-ADDRESS in every Binding response",
    )
    rfc5780: bool = _opt(
        False,
        _check_bool,
        "NAT behaviour discovery (RFC 5780) over UDP: the first two listening IPs of a family"
        " are the primary and the alternate address, each listening on listening_port and"
        " alt_listening_port; Binding responses carry RESPONSE-ORIGIN and OTHER-ADDRESS and"
        " honour CHANGE-REQUEST, RESPONSE-PORT and PADDING (off, as in coturn since it made it"
        " opt-in: those get 420 Unknown Attribute; the larger responses count against"
        " unauth_rate)",
    )
    alt_listening_port: int = _opt(
        0,
        _check_int(0, 65535, note=" (0 = listening_port + 1)"),
        "the alternate port of NAT behaviour discovery (rfc5780), for UDP and TCP"
        " (default: 0, listening_port + 1, as in coturn)",
    )
    strict_channel_numbers: bool = _opt(
        False, _check_bool, "accept only RFC 8656 channel numbers 0x4000-0x4FFF (not up to 0x7FFF)"
    )
    alternate_servers: tuple[AlternateServer, ...] = _opt(
        (),
        _check_each(_entry(AlternateServer.parse, "ip:port or [ipv6]:port"), what="ip:port"),
        "server to redirect Allocate requests to while draining, each in turn (repeatable:"
        " ip:port or [ipv6]:port)",
        flag="--alternate-server",
        metavar="ADDR",
    )
    unauth_rate: float = _opt(
        200.0,
        _check_float(0, inclusive=False),
        "full-size unauthenticated answers over UDP (401, 438, 400) per second per client IPv4"
        " address or IPv6 /64, burst twice that; beyond it an answer is sent once its"
        " request's retransmissions add up to its size (no amplification)",
    )
    # coturn has no per-address or total connection caps to name these after.
    max_tcp_connections_per_ip: int = _opt(
        256,
        _QUOTA,
        "TCP and TLS connections per client IPv4 address or IPv6 /64 (enough for an office"
        " behind one NAT)",
    )
    max_tcp_connections: int = _opt(
        0,
        _check_int(0, note=" (0 = a quarter of each worker's open files limit)"),
        "TCP and TLS connections in total (0: a quarter of each worker's open files limit, so"
        " that TCP clients never use up the descriptors relay sockets need)",
    )
    tcp_allocate_timeout: float = _opt(
        10.0,
        _check_float(0, inclusive=False),
        "seconds a TCP or TLS client has from accept to send its first byte, complete its TLS"
        " handshake and allocate",
    )
    drain_timeout: float = _opt(
        30.0, _check_float(0, inclusive=True), "seconds to let allocations drain on shutdown"
    )
    log_file: str | None = _opt(
        None, _optional(_check_text()), "log to FILE instead of stderr", short="-l", metavar="FILE"
    )
    log_level: str = _opt(
        "info",
        _check_choice("debug", "info", "warning", "error"),
        "least severe lines logged: debug, info (each failure's cause, allocations' audit"
        " records), warning (quotas and capacity), error",
        metavar="{debug,info,warning,error}",
    )
    log_format: str = _opt(
        "text",
        _check_choice("text", "json"),
        "log lines as text (time logger LEVEL message) or JSON objects with structured"
        " fields, one a line",
        metavar="{text,json}",
    )
    audit_file: str | None = _opt(
        None,
        _optional(_check_text()),
        "write the audit trail to FILE as JSON lines, and not to the log: who joined which room"
        " and left when, and each allocation's creation and end (user, relayed addresses,"
        " peers, bytes, duration)",
        metavar="FILE",
    )
    verbose: bool = _opt(
        False, _check_bool, "log everything: the same as --log-level debug", short="-v"
    )
    no_turn: bool = _opt(False, _check_bool, "do not run the STUN/TURN listeners")
    no_web: bool = _opt(False, _check_bool, "do not serve signaling and the web page")
    web_ip: str = _opt(
        "127.0.0.1", _check_ip(wildcard=True), "address of the web server", metavar="IP"
    )
    web_port: int = _opt(8080, _PORT, "port of the web server")
    web_plain_http: bool = _opt(
        False,
        _check_bool,
        "serve the web app over plain HTTP on an address beyond loopback, for a reverse proxy"
        " in front that terminates TLS (browsers give camera and microphone to HTTPS pages"
        " only); default: HTTPS with --cert, else the generated certificate",
    )
    public_host: str | None = _opt(
        None,
        _optional(_check_host),
        "host name or IP put into the TURN URIs handed to browsers (default: first external "
        "IP, else first specific listening IP, else the host the browser used)",
        metavar="HOST",
    )
    ice_transport_policy: str = _opt(
        "all",
        _check_choice("all", "relay"),
        "ICE transport policy: relay makes browsers use TURN only, and the signaling server"
        " forwards only relayed candidates, so a client that ignores it gets no other path",
        metavar="{all,relay}",
    )
    room_capacity: int = _opt(8, _POSITIVE, "people per room")
    room_access: str | None = _opt(
        None,
        _optional(_check_choice("open", "password", "token")),
        "who may enter a room: open (anyone who can reach the page), password (--room-password)"
        " or token (a join token signed with --join-secret, see 'tsunagu token'); default: "
        "open while the web server listens on a loopback or private address, token otherwise",
        metavar="{open,password,token}",
    )
    room_password: str | None = _opt(
        None,
        _optional(_check_text(128, secret=True)),
        "the password everyone needs to enter a room (room-access password)",
        metavar="PASSWORD",
    )
    join_secrets: tuple[str, ...] = _opt(
        (),
        _check_each(_long_secret_entry, what="secrets", secret=True),
        "HS256 key of join tokens, at least 32 characters (repeatable to rotate: the first "
        "signs, all verify)",
        flag="--join-secret",
        metavar="SECRET",
    )
    api_key: str | None = _opt(
        None,
        _optional(_check_long_secret),
        "key a backend gives to GET /api/turn-credentials (key=... or Authorization: Bearer),"
        " at least 32 characters; without one the endpoint is off",
        metavar="KEY",
    )
    allowed_origins: tuple[str, ...] = _opt(
        (),
        _check_each(_origin_entry, what="origins such as https://app.example.org"),
        "another web origin whose pages may open the signaling WebSocket (repeatable; the "
        "page's own origin is always allowed)",
        flag="--allowed-origin",
        metavar="ORIGIN",
    )
    credential_ttl: int = _opt(
        600,
        _POSITIVE,
        "lifetime of minted TURN REST credentials, seconds (the page renews them before then)",
    )
    workers: int = _opt(
        0,
        _check_int(0, note=" (0 = one per core)"),
        "worker processes sharing the TURN ports (0: one per core this process may use)",
    )
    relay_engine: str = _opt(
        "auto",
        _check_choice("auto", "native", "python"),
        "per-packet relay path: native (C, Linux), python, or auto (native when built)",
        metavar="{auto,native,python}",
    )
    admin_socket: str | None = _opt(
        None,
        _optional(_check_text(4096)),
        "Unix socket of the admin API that tsunagu status, sessions, kill, drain and reload"
        " talk to, mode 0600: whoever can connect is the operator (default: admin.sock in the"
        " state directory, $XDG_STATE_HOME/tsunagu)",
        metavar="PATH",
    )
    no_admin: bool = _opt(False, _check_bool, "do not listen on the admin socket")
    admin_port: int = _opt(
        0,
        _check_int(0, 65535, " (0 = off)"),
        "also serve the admin API over HTTP on this port of 127.0.0.1 and ::1 only, to"
        " clients presenting the token of admin_token_file (POST /admin, Authorization:"
        " Bearer TOKEN; 0: off)",
    )
    admin_token_file: str | None = _opt(
        None,
        _optional(_check_text()),
        "file whose first line is the token the HTTP admin API (admin_port) requires, at least"
        " 32 characters; keep it readable by the server's user only",
        metavar="FILE",
    )
    prometheus_port: int = _opt(
        0,
        _check_int(0, 65535, " (0 = off)"),
        "also serve /metrics (Prometheus text format), /healthz and /readyz on this port of"
        " prometheus_ip (0: off; the web port serves them too)",
    )
    prometheus_ip: str = _opt(
        "127.0.0.1",
        _check_ip(wildcard=True),
        "address of the prometheus_port listener (loopback by default)",
        metavar="IP",
    )
    metrics_per_user: bool = _opt(
        False,
        _check_bool,
        "label relayed traffic and allocations by user id in /metrics (the busiest users,"
        " the rest as other); off: no user names in the metrics",
    )

    @property
    def alternate_port(self) -> int:
        """The alternate port of NAT behaviour discovery (``alt_listening_port``, or the
        listening port + 1)."""
        return self.alt_listening_port or self.listening_port + 1

    @property
    def rfc5780_pairs(self) -> tuple[tuple[str, str], ...]:
        """(primary, alternate) IP of each family that has two specific listening IPs: the
        first two in the order given. Empty unless ``rfc5780`` is on."""
        if not self.rfc5780:
            return ()
        return _pairs(self.listening_ips)

    @property
    def web_is_private(self) -> bool:
        """The web server listens only where strangers on the internet cannot reach it."""
        try:
            address = ipaddress.ip_address(self.web_ip)
        except ValueError:
            return False
        # A wildcard listens on every address, public ones included.
        return not address.is_unspecified and (address.is_loopback or address.is_private)

    @property
    def effective_log_level(self) -> str:
        """``log_level``, or "debug" with ``verbose`` (-v), whatever ``log_level`` says."""
        return "debug" if self.verbose else self.log_level

    @property
    def effective_room_access(self) -> str:
        if self.room_access is not None:
            return self.room_access
        return "open" if self.web_is_private else "token"

    def __repr__(self) -> str:
        # A Config ends up in logs and tracebacks; passwords and secrets must not.
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _SECRET_FIELDS and value:
                parts.append(f"{f.name}=<{len(value)} redacted>")
            else:
                parts.append(f"{f.name}={value!r}")
        return f"Config({', '.join(parts)})"


_SECRET_FIELDS = frozenset(
    {
        "users",
        "static_auth_secrets",
        "room_password",
        "join_secrets",
        "api_key",
        # Connection strings hold the database's password.
        "psql_userdb",
        "redis_userdb",
    }
)


_FIELDS = {f.name: f for f in fields(Config)}


def _pairs(listening: Sequence[IPAddress]) -> tuple[tuple[str, str], ...]:
    found: list[tuple[str, str]] = []
    for version in (4, 6):
        specific = [a for a in listening if a.version == version and not a.is_unspecified]
        if len(specific) >= 2:
            found.append((str(specific[0]), str(specific[1])))
    return tuple(found)


def _check_rfc5780(values: dict[str, Any]) -> None:
    """What NAT behaviour discovery needs: two addresses and two ports, UDP, Binding."""
    if not values["rfc5780"]:
        return
    alternate = values["alt_listening_port"] or values["listening_port"] + 1
    if alternate > 65535:
        _fail(
            "alt_listening_port",
            "must be given when listening_port is 65535 (the default is listening_port + 1)",
            0,
        )
    if alternate in (values["listening_port"], values["tls_listening_port"]):
        _fail(
            "alt_listening_port",
            "must differ from listening_port and tls_listening_port",
            alternate,
        )
    pairs = _pairs(values["listening_ips"])
    if not pairs:
        _fail(
            "rfc5780",
            "needs two listening_ips of one family, not wildcards: the first is the primary"
            " address, the second the alternate",
            [str(ip) for ip in values["listening_ips"]],
        )
    if values["no_udp"] or values["no_stun"] or values["no_turn"]:
        _fail(
            "rfc5780",
            "runs over UDP and answers Binding: not with no_udp, no_stun or no_turn",
            show=False,
        )
    # Behind a 1:1 NAT both addresses must be advertised, each as its own public address.
    for pair in pairs:
        version = ipaddress.ip_address(pair[0]).version
        mapped = [entry for entry in values["external_ips"] if entry.public.version == version]
        if not mapped:
            continue
        publics = {
            str(entry.private): str(entry.public) for entry in mapped if entry.private is not None
        }
        if any(ip not in publics for ip in pair) or publics[pair[0]] == publics[pair[1]]:
            _fail(
                "external_ips",
                f"with rfc5780 must map both {pair[0]} and {pair[1]} (public/private),"
                " each to its own public address",
                [entry.text for entry in mapped],
            )


def _check_acme_port(values: dict[str, Any]) -> None:
    """The HTTP-01 answerer binds acme_http_port on every address while an order is open: a
    listener of the server's own on that TCP port would make each order fail."""
    port = values["acme_http_port"]
    taken = []
    if not values["no_web"]:
        taken.append(("web_port", values["web_port"]))
    if not values["no_turn"]:
        taken += [("listening_port", values["listening_port"])]
        taken += [("tls_listening_port", values["tls_listening_port"])]
        taken += [("aux_servers", aux.port) for aux in values["aux_servers"]]
    for key, used in taken:
        if used == port:
            _fail(
                "acme_http_port",
                f"is {port}, which {key} uses too; the ACME HTTP-01 challenge needs the port"
                " free while a certificate is ordered (give acme_http_port another port and"
                " forward port 80 to it)",
                show=False,
            )


def _cross_check(values: dict[str, Any]) -> None:
    """Rules that involve more than one field; each error names the field to change."""
    if values["min_port"] > values["max_port"]:
        _fail(
            "max_port",
            f"must be an integer 1-65535 and >= min_port ({values['min_port']})",
            values["max_port"],
        )
    if values["acme_domains"] and (values["cert"] is not None or values["pkey"] is not None):
        _fail(
            "acme_domains",
            "cannot be combined with cert or pkey: the certificate comes either from an ACME"
            " CA or from the files, not both",
            show=False,
        )
    if values["pkey"] is not None and values["cert"] is None:
        _fail("pkey", "needs cert as well", values["pkey"])
    if values["acme_domains"]:
        _check_acme_port(values)
    if values["use_auth_secret"] and not values["static_auth_secrets"]:
        _fail("static_auth_secrets", "at least one secret is needed with use_auth_secret", ())
    access = values["room_access"]
    if access == "password" and values["room_password"] is None:
        _fail("room_password", "is needed with room_access password", show=False)
    if access == "token" and not values["join_secrets"]:
        _fail(
            "join_secrets", "at least one join secret is needed with room_access token", show=False
        )
    if access is None and not values["join_secrets"] and values["no_web"] is False:
        probe = Config(web_ip=values["web_ip"])
        if not probe.web_is_private:
            _fail(
                "room_access",
                f"must be chosen: the web server listens on {values['web_ip']}, which may be "
                "reachable from the internet, where rooms need join tokens by default. Set "
                "join_secret (and mint tokens with 'tsunagu token'), or choose room_access "
                "password (with room_password) or open (anyone reaching the page may use "
                "this server's TURN relay)",
                show=False,
            )
    if values["stun_only"] and values["no_stun"]:
        _fail("no_stun", "cannot be combined with stun_only (nothing would be answered)", True)
    if not values["no_turn"] and values["no_udp"] and values["no_tcp"] and values["no_tls"]:
        _fail("no_tls", "with no_udp and no_tcp leaves no STUN/TURN listener; use no_turn", True)
    if values["no_turn"] and values["no_web"]:
        _fail("no_web", "with no_turn leaves nothing to serve", True)
    if values["admin_port"] and not values["admin_token_file"]:
        _fail("admin_token_file", "is needed with admin_port (the HTTP admin API's token)", None)
    databases = [key for key in ("userdb", "psql_userdb", "redis_userdb") if values[key]]
    if len(databases) > 1:
        _fail(
            databases[1],
            f"cannot be combined with {databases[0]}: tsunagu reads one user database",
            show=False,
        )
    names = [user.name for user in values["users"]]
    for name in names:
        if names.count(name) > 1:
            _fail("users", "each user name may appear only once", name)
    _check_rfc5780(values)
    wild = {v for v in values["listening_ips"] if v.is_unspecified}
    for address in values["listening_ips"]:
        if address not in wild and any(w.version == address.version for w in wild):
            _fail(
                "listening_ips",
                "a wildcard address already covers every address of its family",
                str(address),
            )
    _check_aux_servers(values)
    _check_internal_networks(values)


def _covers(networks: Sequence[IPNetwork], address: IPAddress) -> bool:
    return any(address.version == net.version and address in net for net in networks)


def _check_internal_networks(values: dict[str, Any]) -> None:
    """With internal networks, nothing of the server may lie outside them: an address it
    listens on, relays from or advertises would hand out a path that leaves the network,
    and a peer range allowed outside them could never apply."""
    networks: tuple[IPNetwork, ...] = values["internal_networks"]
    if not networks:
        return
    ranges = ", ".join(str(net) for net in networks)
    addresses: list[tuple[str, IPAddress]] = [
        *(("listening_ips", ip) for ip in values["listening_ips"] if not ip.is_unspecified),
        *(("aux_servers", aux.ip) for aux in values["aux_servers"] if not aux.ip.is_unspecified),
        *(("relay_ips", ip) for ip in values["relay_ips"]),
        *(("external_ips", entry.public) for entry in values["external_ips"]),
        *(
            ("external_ips", entry.private)
            for entry in values["external_ips"]
            if entry.private is not None
        ),
    ]
    if not values["no_web"]:
        web = ipaddress.ip_address(values["web_ip"])
        if not web.is_unspecified:
            addresses.append(("web_ip", web))
    for key, address in addresses:
        if not _covers(networks, address):
            hint = (
                " (behind a reverse proxy on this host, every page connects from the proxy's"
                " address: list that address as internal only if the proxy admits internal"
                " people only)"
                if key == "web_ip"
                else ""
            )
            _fail(
                key,
                f"{address} lies outside internal_networks ({ranges}): with internal networks"
                " every address the server listens on, relays from or advertises must be"
                f" inside them{hint}",
                show=False,
            )
    for entry in values["allowed_peer_ips"]:
        if not all(
            any(_covers((other,), net[0]) and _covers((other,), net[-1]) for other in networks)
            for net in entry.networks
        ):
            _fail(
                "allowed_peer_ips",
                f"{entry.text} lies outside internal_networks ({ranges}): with internal"
                " networks the relay reaches peers inside them only, so this entry could never"
                " apply; widen internal_networks or remove it",
                show=False,
            )


def _overlap(one: IPAddress, other: IPAddress) -> bool:
    """Whether listening on ``one`` and on ``other`` would take a common address."""
    if one.version != other.version:
        return False
    return one == other or one.is_unspecified or other.is_unspecified


def _check_aux_servers(values: dict[str, Any]) -> None:
    main_ports = {values["listening_port"]}
    if not values["no_tls"] and not values["stun_only"]:
        main_ports.add(values["tls_listening_port"])
    listening: tuple[IPAddress, ...] = values["listening_ips"]
    seen: list[AuxServer] = []
    for aux in values["aux_servers"]:
        covered = not listening or any(_overlap(aux.ip, ip) for ip in listening)
        if aux.port in main_ports and covered:
            _fail(
                "aux_servers",
                f"{aux.text} is already a main listening address (listening_ips on port"
                f" {aux.port}); an aux server needs another port or address",
                aux.text,
                show=False,
            )
        for other in seen:
            if other.port == aux.port and _overlap(aux.ip, other.ip):
                _fail(
                    "aux_servers",
                    f"{aux.text} and {other.text} take the same address and port",
                    aux.text,
                    show=False,
                )
        seen.append(aux)


def _normalise_keys(mapping: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for raw_key, value in mapping.items():
        if not isinstance(raw_key, str):
            raise ConfigError(f"config: {raw_key!r}: keys must be strings")
        key = raw_key.replace("-", "_")
        if key not in _FIELDS:
            close = difflib.get_close_matches(key, list(_FIELDS), n=3, cutoff=0.6)
            hint = f" (did you mean: {', '.join(close)}?)" if close else ""
            raise ConfigError(f"config: {raw_key}: unknown key{hint}")
        if key in out:
            raise ConfigError(f"config: {key}: given twice (with dashes and with underscores)")
        out[key] = value
    return out


def parse_config(mapping: Mapping[str, Any]) -> Config:
    """Validate ``mapping`` (field name -> value, as TOML would give it) into a Config.

    Missing keys take their defaults. Lists may be given as lists or tuples, or a single string
    for a one-item list.
    """
    given = _normalise_keys(mapping)
    values: dict[str, Any] = {}
    for name, f in _FIELDS.items():
        check: _Check = f.metadata["check"]
        values[name] = check(name, given[name]) if name in given else f.default
    _cross_check(values)
    return Config(**values)


def config_to_json(config: Config) -> dict[str, Any]:
    """``config`` as a JSON-ready mapping that :func:`config_from_json` reads back.

    Each value is written in the form a TOML file would give it, so that the receiving
    side validates it again like any other configuration.
    """
    return {name: _to_json(getattr(config, name)) for name in _FIELDS}


def config_from_json(mapping: Mapping[str, Any]) -> Config:
    """The Config :func:`config_to_json` wrote (how worker processes get theirs)."""
    return parse_config(mapping)


def _to_json(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_json(item) for item in value]
    if isinstance(value, ExternalIp | AlternateServer | AuxServer | StaticUser | PeerRange):
        return value.text
    if isinstance(
        value,
        ipaddress.IPv4Address
        | ipaddress.IPv6Address
        | ipaddress.IPv4Network
        | ipaddress.IPv6Network,
    ):
        return str(value)
    return value


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that reports usage errors as ConfigError instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"config: {message} (see {self.prog} --help)")


def _flag_name(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def build_parser(prog: str | None = None, *, add_help: bool = True) -> argparse.ArgumentParser:
    """The argument parser for all configuration flags plus ``-c/--config FILE``.

    Only options actually given appear in the parsed namespace, so that absent flags do not
    override the file. Usage errors raise ConfigError.
    """
    parser = _Parser(
        prog=prog,
        add_help=add_help,
        allow_abbrev=False,
        description="Options may also be set in a file given with -c (TOML, or coturn's"
        " turnserver.conf); flags win.",
    )
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="configuration file: TOML, or coturn's turnserver.conf (a .conf name or content"
        " that is not TOML)",
    )
    for name, f in _FIELDS.items():
        meta = f.metadata
        names = [meta["short"]] if meta["short"] else []
        names.append(meta["flag"] or _flag_name(name))
        default = f.default
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
        if isinstance(default, bool):
            if name.startswith("no_"):
                # "--no-no-stun" would be absurd; these stay one-way switches.
                kwargs["action"] = "store_true"
            else:
                kwargs["action"] = argparse.BooleanOptionalAction
            shown = "on" if default else "off"
        elif isinstance(default, tuple):
            kwargs["action"] = "append"
            kwargs["metavar"] = meta["metavar"] or "VALUE"
            shown = "none"
        else:
            kwargs["metavar"] = meta["metavar"] or (
                "N" if isinstance(default, int | float) else "X"
            )
            shown = "none" if default is None else str(default)
        text = meta["help"]
        kwargs["help"] = text if "default:" in text else f"{text} (default: {shown})"
        parser.add_argument(*names, **kwargs)
    return parser


def _from_flag(name: str, raw: Any) -> Any:
    """Convert a flag's string to the field's type; the field check reports what is wrong."""
    default = _FIELDS[name].default
    if isinstance(raw, str) and not isinstance(default, bool):
        try:
            if isinstance(default, int):
                return int(raw, 10)
            if isinstance(default, float):
                return float(raw)
            if default is None and _FIELDS[name].type == "int | None":
                return int(raw, 10)
        except ValueError:
            return raw
    return raw


def _warn(message: str) -> None:
    # Said before logging is set up (the file may choose the log), so on standard error.
    sys.stderr.write(f"config: warning: {message}\n")


def _read_file(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The options of the ``-c`` file; and, for those read in coturn's format, where each
    was set (key -> ``file:line: name``)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ConfigError(f"config: {path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config: {path}: not UTF-8 text ({exc.reason})") from None
    # Only a file in coturn's format needs the reader.
    from . import coturn_config

    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".conf" and not coturn_config.has_toml_constructs(text):
        return _read_coturn(path, text)
    if suffix != ".toml" and coturn_config.reads_as_coturn(text):
        try:
            tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            return _read_coturn(path, text)
    try:
        return _normalise_keys(tomllib.loads(text)), {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path}: invalid TOML: {exc}") from None


def _read_coturn(path: str, text: str) -> tuple[dict[str, Any], dict[str, str]]:
    """A file in coturn's format (``turnserver.conf``). Each value is checked on its own,
    so that an error names the file and line; what tsunagu ignores is said once."""
    from . import coturn_config

    options: dict[str, coturn_config.Option] = {}
    for name, f in _FIELDS.items():
        kind: coturn_config.Kind = "value"
        if isinstance(f.default, bool):
            kind = "flag"
        elif isinstance(f.default, tuple):
            kind = "list"
        option = coturn_config.Option(name, kind)
        options[name.replace("_", "-")] = option
        options[(f.metadata["flag"] or _flag_name(name)).removeprefix("--")] = option
    try:
        read = coturn_config.read_coturn_config(text, options)
    except coturn_config.CoturnConfigError as exc:
        raise ConfigError(f"config: {path}:{exc.line}: {exc}") from None
    for setting in read.settings:
        raw = _from_flag(setting.key, setting.value)
        check: _Check = _FIELDS[setting.key].metadata["check"]
        try:
            check(setting.key, [raw] if read.kinds[setting.key] == "list" else raw)
        except ConfigError as exc:
            reason = str(exc).removeprefix(f"config: {setting.key}: ")
            raise ConfigError(f"config: {path}:{setting.line}: {setting.name}: {reason}") from None
    if read.ignored:
        _warn(f"{path}: coturn options tsunagu ignores: {', '.join(read.ignored)}")
    for note in read.notes:
        _warn(f"{path}: {note}")
    values = {key: _from_flag(key, value) for key, value in read.values.items()}
    origins = {}
    for key in values:
        last = read.last(key)
        if last is not None:
            origins[key] = f"{path}:{last.line}: {last.name}"
    return values, origins


def config_from_args(args: argparse.Namespace) -> Config:
    """Build a Config from a namespace parsed by :func:`build_parser` (file first, flags win).

    Attributes that are not configuration fields (a subcommand name, say) are ignored.
    """
    given = vars(args)
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if given.get("config") is not None:
        values, origins = _read_file(given["config"])
        merged.update(values)
    for name, raw in given.items():
        if name in _FIELDS:
            merged[name] = _from_flag(name, raw)
            origins.pop(name, None)
    _add_credentials_from_files(merged, os.environ)
    _add_web_secrets_from_env(merged, os.environ)
    try:
        return parse_config(merged)
    except ConfigError as exc:
        # A rule over several options, broken by a line of a coturn file: name that line.
        key, _, reason = str(exc).removeprefix("config: ").partition(": ")
        if key not in origins:
            raise
        raise ConfigError(f"config: {origins[key]}: {reason}") from None


USERS_ENV = "TSUNAGU_USERS"
SECRET_ENV = "TSUNAGU_STATIC_AUTH_SECRET"


def _read_lines(key: str, path: Any) -> list[str]:
    """The entries of a credentials file: one a line, blank lines and # comments skipped."""
    if not isinstance(path, str) or not path:
        _fail(key, "must be a file name", path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigError(f"config: {key}: {path}: cannot read: {reason}") from None
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _add_credentials_from_files(merged: dict[str, Any], environ: Mapping[str, str]) -> None:
    """Static users and REST secrets from ``user_file``, ``static_auth_secret_file`` and the
    environment, added to those given inline: arguments are visible in ``ps``, these are not.

    Only the command line and the TOML file are read this way (worker processes get the
    merged lists, not the files again).
    """
    users = _as_list(merged.get("users"))
    if merged.get("user_file") is not None:
        users += _read_lines("user_file", merged["user_file"])
    if environ.get(USERS_ENV):
        entries = environ[USERS_ENV].replace(",", "\n").splitlines()
        users += [entry.strip() for entry in entries if entry.strip()]
    if users:
        merged["users"] = users
    secrets = _as_list(merged.get("static_auth_secrets"))
    if merged.get("static_auth_secret_file") is not None:
        secrets += _read_lines("static_auth_secret_file", merged["static_auth_secret_file"])
    if not secrets and environ.get(SECRET_ENV):
        entries = environ[SECRET_ENV].splitlines()
        secrets = [entry.strip() for entry in entries if entry.strip()]
    if secrets:
        merged["static_auth_secrets"] = secrets


WEB_SECRET_ENV: Final = {
    "join_secrets": "TSUNAGU_JOIN_SECRET",
    "api_key": "TSUNAGU_API_KEY",
    "room_password": "TSUNAGU_ROOM_PASSWORD",
}


def _add_web_secrets_from_env(merged: dict[str, Any], environ: Mapping[str, str]) -> None:
    """The join secret, API key and room password from the environment when neither the file
    nor a flag gave them (a systemd credential or EnvironmentFile keeps them out of ``ps``)."""
    for key, variable in WEB_SECRET_ENV.items():
        value = environ.get(variable, "").strip()
        if value and not merged.get(key):
            merged[key] = value.split() if key == "join_secrets" else value


def load_config(argv: Sequence[str] | None = None, *, prog: str = "tsunagu serve") -> Config:
    """Parse ``argv`` (default ``sys.argv[1:]``): ``-c FILE`` plus flags, flags winning."""
    args = build_parser(prog).parse_args(list(sys.argv[1:] if argv is None else argv))
    return config_from_args(args)


def state_dir() -> Path:
    """Where tsunagu keeps what it makes (a certificate, the default user database)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "tsunagu"


def userdb_path(config: Config) -> Path:
    """The SQLite user database: ``userdb``, else users.db in :func:`state_dir`."""
    return Path(config.userdb) if config.userdb else state_dir() / "users.db"


def admin_socket_path(config: Config) -> Path:
    """The admin API's Unix socket: ``admin_socket``, else admin.sock in :func:`state_dir`."""
    return Path(config.admin_socket) if config.admin_socket else state_dir() / "admin.sock"
