"""The words of a failure's log line, and the failures only the transport sees.

The core records why it refused a request (:mod:`tsunagu.turn.refusals`); the transport
records in a tally of the same kind what fails before the core is reached: a TLS handshake
(:func:`tls_failure` tells why from the TLS library's error), bytes that are not TLS on a
port that takes only TLS, bytes that are not STUN (:func:`not_stun`). Every ``interval``
the driver takes both tallies and writes, for each (cause, client) entry, the line
:func:`describe` makes: the cause in plain words with the facts an operator needs (the
user, the realm, the peer and the rule that denied it, the quota, how long ago a credential
expired), the count, and the same as structured fields for ``--log-format json``.

A stale nonce is routine once per client: its line is at DEBUG unless the same client
transport address got it again. A client that closed the connection during the TLS
handshake says nothing of why (port checks and clients that gave up do it): DEBUG too.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import Any

from ..turn import refusals
from ..turn.refusals import RefusalSummary

__all__ = [
    "NOT_STUN",
    "NOT_TLS",
    "TLS_CLOSED",
    "TLS_FAILED",
    "describe",
    "not_stun",
    "tls_failure",
]

# The causes the transport decides (beside the core's, :mod:`tsunagu.turn.refusals`).
TLS_FAILED = "TLS handshake failed"
TLS_CLOSED = "closed during the TLS handshake"
NOT_TLS = "not TLS"
NOT_STUN = "not STUN"

# What a TLS alert or error from the client means, by the TLS library's reason code.
_REJECTED_CERTIFICATE = {
    "TLSV1_ALERT_UNKNOWN_CA": "the client does not trust this server's certificate (its"
    " answer: unknown CA; a self-signed certificate, or one from a CA the client lacks)",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the client does not trust this server's certificate"
    " (its answer: certificate unknown)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the client rejected this server's certificate (its"
    " answer: bad certificate; often a host name the certificate does not name)",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the client says this server's certificate has expired",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "the client says this server's certificate is revoked",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "the client does not support this server's"
    " certificate (its key or signature type)",
    "TLSV1_ALERT_ACCESS_DENIED": "the client refused this server's certificate (access denied)",
}
_PROTOCOL_VERSION = frozenset(
    {
        "UNSUPPORTED_PROTOCOL",
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "VERSION_TOO_LOW",
        "NO_PROTOCOLS_AVAILABLE",
        "WRONG_SSL_VERSION",
        "UNSUPPORTED_SSL_VERSION",
    }
)
_NO_COMMON_CIPHER = frozenset(
    {
        "NO_SHARED_CIPHER",
        "NO_SHARED_GROUPS",
        "NO_SUITABLE_SIGNATURE_ALGORITHM",
        "SSLV3_ALERT_HANDSHAKE_FAILURE",
        "NO_CIPHERS_AVAILABLE",
    }
)
_NOT_TLS = {
    "WRONG_VERSION_NUMBER": "plain TCP, not TLS (a STUN client sending unencrypted, such"
    " as a turn: URL with transport=tcp aimed at this port?)",
    "HTTP_REQUEST": "a plain HTTP request, not TLS",
    "HTTPS_PROXY_REQUEST": "an HTTP CONNECT request (a proxy client), not TLS",
    "UNKNOWN_PROTOCOL": "not TLS",
}
_CLOSED = frozenset({"UNEXPECTED_EOF_WHILE_READING", "EOF"})


def tls_failure(exc: BaseException, timeout: float | None = None) -> tuple[str, str, str]:
    """Why a TLS handshake failed: ``(cause, reason in words, the library's code)``.

    ``cause`` is :data:`NOT_TLS` when the client did not speak TLS at all, :data:`TLS_CLOSED`
    when it closed the connection without a word on why, else :data:`TLS_FAILED`.
    """
    if isinstance(exc, TimeoutError):
        within = f" within {timeout:g} s" if timeout else ""
        return TLS_FAILED, f"the handshake did not finish{within}", "timeout"
    if isinstance(exc, ssl.SSLError):
        code = str(exc.reason or type(exc).__name__)
        if isinstance(exc, ssl.SSLEOFError) or code in _CLOSED:
            return TLS_CLOSED, "the client closed the connection", code
        if code in _NOT_TLS:
            return NOT_TLS, _NOT_TLS[code], code
        if code in _REJECTED_CERTIFICATE:
            return TLS_FAILED, _REJECTED_CERTIFICATE[code], code
        if code in _PROTOCOL_VERSION:
            return (
                TLS_FAILED,
                "protocol version: the client offers only TLS versions this server does not"
                " take (TLS 1.2 or newer)",
                code,
            )
        if code in _NO_COMMON_CIPHER:
            return TLS_FAILED, "no cipher suite, group or signature in common", code
        return TLS_FAILED, f"TLS error {code}", code
    if isinstance(exc, ConnectionError | EOFError):
        return TLS_CLOSED, "the client closed the connection", type(exc).__name__
    return TLS_FAILED, f"{type(exc).__name__}: {exc}", type(exc).__name__


_HTTP_METHODS = (b"GET ", b"POST", b"HEAD", b"PUT ", b"OPTI", b"CONN", b"DELE", b"PATC")


def not_stun(data: bytes | memoryview, protocol: str, *, channel_data: bool = False) -> str:
    """What bytes that are neither STUN nor ChannelData look like, in words; with
    ``channel_data``, they were framed as ChannelData on a connection without an allocation."""
    head = bytes(data[:8])
    if head[:1] == b"\x16" and head[1:2] == b"\x03":
        if protocol == "tcp":
            return "a TLS handshake on the plain TCP port (a turns: URL aimed at this port?)"
        return "a TLS handshake inside TLS"
    if head[:4] in _HTTP_METHODS:
        return "an HTTP request"
    if head[:4] == b"SSH-":
        return "an SSH client"
    if channel_data:
        return "ChannelData before any allocation"
    return f"bytes that are neither STUN nor ChannelData (starting {head.hex()})"


# --------------------------------------------------------------------------- log lines


def _names(summary: RefusalSummary, what: str = "user") -> str:
    users = summary.users
    if not users:
        return ""
    if len(users) == 1 and not summary.others:
        return f"{what} {users[0][0]!r}"
    listed = ", ".join(f"{name!r} ({count})" for name, count in users)
    more = " and others" if summary.others else ""
    return f"{what}s {listed}{more}"


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} days"


def _details(summary: RefusalSummary, render: Callable[[dict[str, Any]], str]) -> str:
    """Each distinct detail rendered, with its count when there are several."""
    details = summary.details
    if len(details) == 1 and not summary.others:
        return render(dict(details[0][0]))
    parts = [f"{render(dict(facts))} (x{count})" for facts, count in details]
    return "; ".join(parts) + ("; and others" if summary.others else "")


def _for_user(headline: str, summary: RefusalSummary) -> str:
    names = _names(summary)
    return f"{headline} for {names}" if names else headline


# Each cause's words: a headline (what failed, for whom), and the detail (why, the facts).
_Words = tuple[str, str]


def _wrong_password(s: RefusalSummary) -> _Words:
    return (
        f"wrong password for {_names(s) or 'a user'} in realm {s.facts.get('realm', '')!r}",
        "the message integrity check failed",
    )


def _unknown_user(s: RefusalSummary) -> _Words:
    if s.facts.get("userhash"):
        return "unknown user", "a USERHASH that matches no user"
    return f"unknown {_names(s) or 'user'} in realm {s.facts.get('realm', '')!r}", ""


def _expired(s: RefusalSummary) -> _Words:
    def render(facts: dict[str, Any]) -> str:
        return f"expired {_ago(s.last - float(facts.get('expired_at', s.last)))} before"

    return (
        f"expired TURN REST {_names(s, 'credential') or 'credential'}",
        f"{_details(s, render)} the last attempt (the client or its web backend must fetch a"
        " new one)",
    )


def _database_unavailable(s: RefusalSummary) -> _Words:
    return (
        f"user database unavailable for {_names(s) or 'a user'}",
        "the user database did not answer the lookup of a key not in the cache (live "
        "allocations and cached users are not affected; the client's next retry asks again)",
    )


def _revoked(s: RefusalSummary) -> _Words:
    return (
        f"revoked {_names(s, 'credential') or 'credential'}",
        "taken back with tsunagu revoke (the client or its web backend needs a new one)",
    )


def _wrong_realm(s: RefusalSummary) -> _Words:
    realms = _details(s, lambda facts: repr(facts.get("realm")))
    return _for_user("wrong realm", s), f"the client sent {realms}, not this server's --realm"


def _mismatch(s: RefusalSummary) -> _Words:
    owners = _details(s, lambda facts: repr(facts.get("allocation_user")))
    return (
        _for_user("credential mismatch", s),
        f"a request signed by another user than the allocation's ({owners}): 441",
    )


def _stale_nonce(s: RefusalSummary) -> _Words:
    def render(facts: dict[str, Any]) -> str:
        if facts.get("nonce") == "invalid":
            return (
                "a nonce this server did not give this address (the client's address"
                " changes between requests, or the nonce came from another server)"
            )
        return "an expired nonce (the client does not take the fresh one each 438 carries)"

    if s.count < 2:
        return _for_user("stale nonce", s), "routine: the client retries with the new one"
    return _for_user("the client keeps failing with a stale nonce", s), _details(s, render)


def _peer_denied(s: RefusalSummary) -> _Words:
    peers = _details(s, lambda facts: f"{facts.get('peer')} ({facts.get('rule')})")
    hint = ""
    if any("by default" in str(dict(facts).get("rule", "")) for facts, _ in s.details):
        hint = "; --allowed-peer-ip opens a range"
    return _for_user("peer denied", s), f"{peers}{hint}"


def _quota(flag: str, what: Callable[[dict[str, Any]], str]) -> Callable[[RefusalSummary], _Words]:
    def words(s: RefusalSummary) -> _Words:
        facts = s.facts
        return (
            _for_user(f"{flag[2:].replace('-', ' ')} reached", s),
            f"{what(facts)} already has {_plural(int(facts.get('quota', 0)), 'allocation')}"
            f" on this worker process, the most {flag} allows",
        )

    return words


def _no_relay_port(s: RefusalSummary) -> _Words:
    facts = s.facts
    workers = int(facts.get("workers", 1))
    share = f" (its share: 1/{workers} of them)" if workers > 1 else ""
    even = "even " if facts.get("even_port") else ""
    return (
        _for_user("508 no relay port", s),
        f"no free {even}relay port on {facts.get('relay_ip')}: this worker holds"
        f" {facts.get('in_use')} ports of {facts.get('range')}{share}, and"
        f" {facts.get('held_elsewhere')} more it tried are held by other programs"
        " (--min-port and --max-port widen the range)",
    )


def _tls(s: RefusalSummary) -> str:
    return _details(s, lambda facts: f"{facts.get('reason')} (port {facts.get('port')})")


def _not_stun(s: RefusalSummary) -> _Words:
    return "connection closed, not STUN", _details(
        s, lambda f: f"{f.get('what')} ({f.get('transport')} port {f.get('port')})"
    )


_WORDS: dict[str, Callable[[RefusalSummary], _Words]] = {
    refusals.WRONG_PASSWORD: _wrong_password,
    refusals.UNKNOWN_USER: _unknown_user,
    refusals.EXPIRED_CREDENTIAL: _expired,
    refusals.DATABASE_UNAVAILABLE: _database_unavailable,
    refusals.REVOKED_CREDENTIAL: _revoked,
    refusals.WRONG_REALM: _wrong_realm,
    refusals.CREDENTIAL_MISMATCH: _mismatch,
    refusals.STALE_NONCE: _stale_nonce,
    refusals.PEER_DENIED: _peer_denied,
    refusals.USER_QUOTA: _quota("--user-quota", lambda f: f"user id {f.get('user_id')!r}"),
    refusals.ADDRESS_QUOTA: _quota("--address-quota", lambda f: f"address {f.get('address')}"),
    refusals.TOTAL_QUOTA: _quota("--total-quota", lambda f: "this server"),
    refusals.NO_RELAY_PORT: _no_relay_port,
    refusals.RESERVATION_UNKNOWN: lambda s: (
        _for_user("508 reservation unknown", s),
        "an unknown or expired RESERVATION-TOKEN",
    ),
    refusals.TOO_MANY_PERMISSIONS: lambda s: (
        _for_user("508 too many permissions", s),
        f"the allocation has {s.facts.get('permissions')} permissions, the most one may have",
    ),
    refusals.DRAINING: lambda s: (
        _for_user("508 draining", s),
        "the server is stopping: no new allocations",
    ),
    refusals.UNAUTHENTICATED_WITHHELD: lambda s: (
        "unauthenticated answers withheld",
        "more requests without credentials than --unauth-rate allows one address (a flood,"
        " maybe with this address forged)",
    ),
    TLS_FAILED: lambda s: ("TLS handshake failed", _tls(s)),
    TLS_CLOSED: lambda s: ("TLS handshake not finished", _tls(s)),
    NOT_TLS: lambda s: ("not TLS on a TLS-only port", _tls(s)),
    NOT_STUN: _not_stun,
}

# Refusals the operator may have to act on (raise a limit, add capacity) are warnings; the
# others (a denied peer, a wrong password, a scanner) are what misconfigured clients and
# scanners cause every day, and are information.
_WARNINGS = frozenset(
    {
        refusals.USER_QUOTA,
        refusals.ADDRESS_QUOTA,
        refusals.TOTAL_QUOTA,
        refusals.NO_RELAY_PORT,
    }
)


def _level(summary: RefusalSummary) -> int:
    cause = summary.cause
    if cause in _WARNINGS:
        return logging.WARNING
    if cause == TLS_CLOSED or (cause == refusals.STALE_NONCE and summary.count < 2):
        return logging.DEBUG
    return logging.INFO


def _unit(cause: str) -> str:
    if cause in (TLS_FAILED, TLS_CLOSED, NOT_TLS, NOT_STUN):
        return "connection"
    if cause == refusals.UNAUTHENTICATED_WITHHELD:
        return "answer"
    return "request"


def _plural(count: int, unit: str) -> str:
    return f"{count} {unit}" + ("" if count == 1 else "s")


def _fields(summary: RefusalSummary, worker: int, interval: float) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "event": "refused",
        "cause": summary.cause,
        "client": summary.client or None,
        "count": summary.count,
        "interval": interval,
        "worker": worker,
    }
    if summary.users:
        fields["user"] = summary.user
        if len(summary.users) > 1:
            fields["users"] = dict(summary.users)
    facts = summary.facts
    if "expired_at" in facts:
        facts["expired_ago"] = round(summary.last - float(facts["expired_at"]))
    for key, value in facts.items():
        fields.setdefault(key, value)
    if len(summary.details) > 1:
        fields["details"] = [dict(facts, count=count) for facts, count in summary.details]
    if summary.others:
        fields["others"] = summary.others
    return fields


def describe(
    summary: RefusalSummary, *, worker: int, interval: float
) -> tuple[int, str, dict[str, Any]]:
    """The level, the text and the structured fields of ``summary``'s log line."""
    unit = _unit(summary.cause)
    when = f"in the last {interval:g} s (worker {worker})"
    if not summary.client:
        # Beyond the table's bound: one line for the cause, naming the busiest client.
        more = "+" if summary.clients >= 1024 else ""
        text = (
            f"{summary.cause}: {_plural(summary.count, unit)} more from {summary.clients}{more}"
            f" other clients {when} (beyond the {refusals.ENTRY_LIMIT} clients logged one by"
            f" one); most often {summary.top!r} ({summary.top_count})"
        )
        fields: dict[str, Any] = {
            "event": "refused",
            "cause": summary.cause,
            "client": None,
            "count": summary.count,
            "clients": summary.clients,
            "top": summary.top,
            "top_count": summary.top_count,
            "interval": interval,
            "worker": worker,
        }
        return _level(summary), text, fields
    render = _WORDS.get(summary.cause)
    headline, detail = render(summary) if render is not None else (summary.cause, "")
    detail = f": {detail}" if detail else ""
    text = f"{headline} from {summary.client}{detail}; {_plural(summary.count, unit)} {when}"
    return _level(summary), text, _fields(summary, worker, interval)
