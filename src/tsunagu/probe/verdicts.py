"""Every way a ``tsunagu probe stun``, ``turn`` or ``nat`` check can end, in plain words.

A verdict is a stable ``code`` for machines (``--json``), one ``sentence`` that says what
happened, and ``advice``: what to do about it. All of them are made here, by one function
per cause, so that the wording stays consistent and the list of causes can be read in one
place. The I/O code raises :class:`Failure` with one of them at the point where the cause is
known (a refused connection, an SSL verification error, an error response).

=====================  ============================================================
code                   cause
=====================  ============================================================
ok                     everything worked
lossy                  it worked, but more than a few test packets were lost
dns-failed             the host name does not resolve
connection-refused     nothing listens on that TCP port (or ICMP port unreachable)
unreachable            no route to the host
no-answer              nothing came back in time (UDP blocked, a dropping firewall)
connection-closed      the server closed the connection
not-stun               something answered, but not STUN
tls-self-signed        certificate verification failed: self-signed
tls-name-mismatch      certificate verification failed: not issued for this name
tls-expired            certificate verification failed: expired or not yet valid
tls-untrusted          certificate verification failed for another reason
tls-pin-mismatch       the certificate is not the pinned one
tls-failed             the TLS handshake failed before any certificate was checked
proxy-unreachable      the HTTP proxy itself cannot be reached
proxy-auth-failed      the proxy wants (other) credentials: 407
proxy-refused          the proxy refused the CONNECT (403, 502, ...)
wrong-password         401 to a request signed with the password
credential-expired     401 to a TURN REST username whose expiry has passed
peer-denied            403 to CreatePermission or ChannelBind
quota-reached          486 Allocation Quota Reached
server-full            508 Insufficient Capacity
turn-error             any other error response
relay-silent           everything granted, but no test packet came back
stun-error             an error response to a Binding request
nat-none               probe nat: no NAT, nothing filters (or a firewall filters)
nat-cone               probe nat: endpoint-independent mapping (filtering named)
nat-symmetric          probe nat: address(-and-port)-dependent mapping
nat-undetermined       probe nat: the server has no RFC 5780 (or it broke off)
udp-blocked            several URLs: UDP ones got no answer, TCP or TLS ones work
blocked                several URLs: none got through, over UDP, TCP or TLS
proxy-only             with --proxy: it works through the proxy, nothing goes direct
=====================  ============================================================

``ok`` and the first three ``nat-`` codes are a check that ended well (exit status 0).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

__all__ = ["Failure", "Tried", "Verdict"]


@dataclass(frozen=True, slots=True)
class Verdict:
    code: str
    sentence: str
    advice: str = ""

    @property
    def ok(self) -> bool:
        return self.code in _FOUND

    def as_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "ok": self.ok,
            "sentence": self.sentence,
            "advice": self.advice,
        }


_FOUND = frozenset({"ok", "nat-none", "nat-cone", "nat-symmetric"})


class Failure(Exception):
    """A check stopped; :attr:`verdict` says why in plain words."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__(verdict.sentence)
        self.verdict = verdict


def _why(reason: str, phrase: str) -> str:
    """The server's reason beyond the standard phrase of its code, in parentheses."""
    head, _, tail = reason.partition(":")
    extra = tail.strip() if head.strip().lower() == phrase.lower() else reason.strip()
    if not extra or extra.lower() == phrase.lower():
        return ""
    return f" ({extra})"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 0.1 else f"{seconds * 1000:.0f} ms"


# --- reaching the server ------------------------------------------------------------------


def dns_failed(host: str, error: str) -> Verdict:
    return Verdict(
        "dns-failed",
        f"The name {host} does not resolve ({error}).",
        "Check the host name in the URL, and that this machine's DNS works "
        "(try the server's IP address in the URL to tell the two apart).",
    )


def connection_refused(where: str, transport: str) -> Verdict:
    if transport == "UDP":
        return Verdict(
            "connection-refused",
            f"Nothing listens on UDP {where}: the host answered 'port unreachable'.",
            "Check the port in the URL and that the server is running and listens on UDP there.",
        )
    return Verdict(
        "connection-refused",
        f"The connection to {where} was refused: nothing listens on that TCP port.",
        "Check the port in the URL (TURN over TCP usually 3478, over TLS 5349 or 443) and "
        "that the server is running with that listener enabled; a firewall that rejects "
        "rather than drops looks the same.",
    )


def unreachable(where: str, error: str) -> Verdict:
    return Verdict(
        "unreachable",
        f"There is no route to {where} ({error}).",
        "Check the address in the URL and this machine's network connection.",
    )


def no_answer_udp(where: str, seconds: float) -> Verdict:
    return Verdict(
        "no-answer",
        f"No answer from {where} over UDP in {seconds:.1f} s: UDP is blocked on the way, "
        "or nothing listens there.",
        "If TCP or TLS to the same server works, this network blocks UDP: give clients "
        "turn:…?transport=tcp and turns: URLs too (TLS on port 443 passes most firewalls). "
        "Otherwise check that the server runs and that its firewall lets this UDP port in.",
    )


def no_answer_connect(where: str, seconds: float) -> Verdict:
    return Verdict(
        "no-answer",
        f"The TCP connection to {where} got no answer in {seconds:.1f} s: a firewall drops "
        "it, or the host is down.",
        "Check the address and port, and the firewalls on the way and in front of the "
        "server; a network that only lets the web out often allows port 443.",
    )


def no_answer_request(where: str, step: str, seconds: float, transport: str) -> Verdict:
    if transport == "UDP":
        return no_answer_udp(where, seconds)
    return Verdict(
        "no-answer",
        f"{where} accepted the {transport} connection but did not answer the {step} request "
        f"in {seconds:.1f} s.",
        "Check that this port is the server's STUN/TURN port for this transport (a TLS "
        "port spoken to in plain TCP stays silent), and that the server is not overloaded.",
    )


def connection_closed(where: str, step: str) -> Verdict:
    return Verdict(
        "connection-closed",
        f"{where} closed the connection during {step}.",
        "The server's log says why; a TURN server closes connections it limits (too many "
        "from one address, or no allocation in time) or when it is shutting down.",
    )


def not_stun(where: str, detail: str) -> Verdict:
    return Verdict(
        "not-stun",
        f"{where} answered, but not with STUN ({detail}).",
        "Check the port: this one runs some other service (plain TCP on a TLS port, "
        "or a web server, say).",
    )


# --- TLS ----------------------------------------------------------------------------------


def tls_untrusted(kind: str, host: str, reason: str, trust: str) -> Verdict:
    """``kind`` is self-signed, name-mismatch, expired, not-yet-valid or untrusted."""
    pin_hint = (
        "To check the server anyway, trust that one certificate: --ca FILE (the certificate "
        "itself) or --pin sha256/… (tsunagu serve prints both at start-up)."
    )
    if kind == "self-signed":
        return Verdict(
            "tls-self-signed",
            f"The server's TLS certificate is self-signed, so it is not trusted ({reason}).",
            "Browsers refuse turns: URLs with a self-signed certificate: give the server a "
            "certificate from a CA (Let's Encrypt, say) with --cert/--pkey. " + pin_hint,
        )
    if kind == "name-mismatch":
        return Verdict(
            "tls-name-mismatch",
            f"The server's TLS certificate is not valid for {host} ({reason}).",
            f"Use the name the certificate was issued for in the URL, or give the server a "
            f"certificate that covers {host}.",
        )
    if kind in ("expired", "not-yet-valid"):
        when = "has expired" if kind == "expired" else "is not valid yet"
        return Verdict(
            "tls-expired",
            f"The server's TLS certificate {when} ({reason}).",
            "Renew the server's certificate; if it should be valid, check the clocks of this "
            "machine and of the server.",
        )
    return Verdict(
        "tls-untrusted",
        f"The server's TLS certificate is not trusted ({reason}; checked against {trust}).",
        "Give the server its full certificate chain (the intermediate certificates too), or "
        "a certificate from a CA that clients trust. " + pin_hint,
    )


def tls_pin_mismatch(pins: list[str], spki: str, sha256: str) -> Verdict:
    return Verdict(
        "tls-pin-mismatch",
        f"The server's TLS certificate is not the pinned one: its key is sha256/{spki} "
        f"(certificate {sha256}), the pin is {', '.join(pins)}.",
        "The certificate changed (renewed, or a different server answers): check the pin "
        "against what the server prints at start-up.",
    )


def tls_failed(where: str, reason: str) -> Verdict:
    return Verdict(
        "tls-failed",
        f"The TLS handshake with {where} failed: {reason}.",
        "Check that this is the server's TLS port and not its plain TCP one (TURN over TLS "
        "usually 5349 or 443).",
    )


# --- HTTP proxy ---------------------------------------------------------------------------


def proxy_unreachable(proxy: str, error: str) -> Verdict:
    return Verdict(
        "proxy-unreachable",
        f"The HTTP proxy {proxy} cannot be reached ({error}).",
        "Check the proxy's address and port (the browser's or the system's proxy settings "
        "show them).",
    )


def proxy_auth_failed(proxy: str, status: str, sent_credentials: bool) -> Verdict:
    if sent_credentials:
        sentence = f"The HTTP proxy {proxy} refused the proxy credentials ({status})."
        advice = "Check the user name and password in --proxy http://user:password@host:port."
    else:
        sentence = f"The HTTP proxy {proxy} wants credentials ({status})."
        advice = "Give them in --proxy http://user:password@host:port."
    return Verdict("proxy-auth-failed", sentence, advice)


def proxy_refused(proxy: str, target: str, status: str) -> Verdict:
    return Verdict(
        "proxy-refused",
        f"The HTTP proxy {proxy} refused to connect to {target} ({status}).",
        "Many proxies allow CONNECT to port 443 only: run the TURN server's TLS listener on "
        "443 and give clients turns:host:443?transport=tcp.",
    )


# --- TURN answers -------------------------------------------------------------------------


def wrong_password(username: str, minted: bool) -> Verdict:
    if minted:
        return Verdict(
            "wrong-password",
            f"The server refused the TURN REST credential {username} minted with this "
            "secret (401 after the request was signed): the server has another secret.",
            "Use the server's static-auth-secret, and check that the server accepts TURN "
            "REST credentials at all (tsunagu: --static-auth-secret; coturn: "
            "use-auth-secret).",
        )
    return Verdict(
        "wrong-password",
        f"The server refused the password for user {username} (401 after the request was "
        "signed with it): wrong password, or no such user.",
        "Check the user name and password, and the server's realm; TURN REST credentials "
        "must come from the server's own secret.",
    )


def credential_expired(username: str, expiry: int, now: float) -> Verdict:
    ago = int(now) - expiry
    at = datetime.datetime.fromtimestamp(expiry, datetime.UTC)
    age = f"{ago} s" if ago < 120 else f"{ago // 60} min" if ago < 7200 else f"{ago // 3600} h"
    return Verdict(
        "credential-expired",
        f"The TURN REST credential {username} expired {age} ago "
        f"({at:%Y-%m-%d %H:%M:%S} UTC): the server refuses it (401).",
        "Get a fresh credential from the web app (or mint one with --secret); if it was "
        "just minted, the clocks of the web backend and the TURN server disagree.",
    )


def peer_denied(step: str, peer: str) -> Verdict:
    return Verdict(
        "peer-denied",
        f"The server refused to relay to {peer}: 403 Forbidden to {step}.",
        "The server denies that peer address. The probe's peer is its own second "
        "allocation on the same server, so the server denies its own relay addresses "
        "(tsunagu: loopback, private and special ranges unless --allowed-peer-ip; coturn: "
        "denied-peer-ip, allow-loopback-peers). Real calls relay to public addresses and "
        "may still work; a server that denies what clients need fails them the same way.",
    )


def quota_reached(reason: str) -> Verdict:
    return Verdict(
        "quota-reached",
        "The server refused another allocation: 486 Allocation Quota Reached"
        f"{_why(reason, 'Allocation Quota Reached')}.",
        "This user or this address holds as many allocations as the server allows (coturn "
        "also answers 486 when its total is reached): close other calls or wait for their "
        "allocations to expire, or raise the quota (tsunagu: --user-quota, --address-quota; "
        "coturn: user-quota, total-quota).",
    )


def server_full(reason: str) -> Verdict:
    return Verdict(
        "server-full",
        f"The server is full: 508 Insufficient Capacity{_why(reason, 'Insufficient Capacity')}.",
        "It has no relay port or allocation left, or it is draining for a restart: try "
        "again later, or give it a larger relay port range or total quota (tsunagu: "
        "--min-port/--max-port, --total-quota), or more servers.",
    )


def turn_error(step: str, code: int | None, reason: str) -> Verdict:
    what = f"{code} {reason}".strip() if code is not None else reason or "an error"
    return Verdict(
        "turn-error",
        f"The server answered {step} with {what}.",
        "See the error's meaning in RFC 8656 §19 and the server's log.",
    )


def stun_error(code: int | None, reason: str) -> Verdict:
    what = f"{code} {reason}".strip() if code is not None else "an error"
    return Verdict(
        "stun-error",
        f"The server answered the Binding request with {what}.",
        "A STUN server answers Binding without credentials; this one may serve TURN only "
        "(tsunagu: --no-stun).",
    )


# --- the relay test -----------------------------------------------------------------------


def relay_silent(sent: int, transport: str) -> Verdict:
    return Verdict(
        "relay-silent",
        f"The server granted both allocations, the permissions and the channels, but none "
        f"of {sent} test packets came back through the relay.",
        "Relayed packets leave and enter on the server's relay ports (UDP, often "
        "49152-65535): its firewall must let them in, and a server behind NAT must know its "
        "public address (tsunagu and coturn: --external-ip).",
    )


def lossy(url: str, loss: float, rtt: float | None) -> Verdict:
    rtt_text = f", round trip {_ms(rtt)}" if rtt is not None else ""
    return Verdict(
        "lossy",
        f"TURN through {url} works, but {loss:.1%} of the test packets were lost{rtt_text}.",
        "Calls will stutter. Packet loss comes from a congested or rate-limited link, on "
        "this side or the server's; try another network, or TCP/TLS, to tell where.",
    )


def turn_ok(url: str, transport: str, rtt: float | None, mbps: float, loss: float) -> Verdict:
    rtt_text = f"round trip {_ms(rtt)}" if rtt is not None else "no round trip measured"
    loss_text = "no loss" if loss == 0 else f"{loss:.1%} loss"
    return Verdict(
        "ok",
        f"TURN over {transport} works: {url} relayed test traffic between two allocations "
        f"({rtt_text}, {loss_text}, {mbps:.2f} Mbit/s).",
        "Nothing to do for this URL; if a call still fails, check the other URLs clients "
        "are given and the signaling.",
    )


def stun_ok(url: str, transport: str, rtt: float, mapped: str, nat: str) -> Verdict:
    return Verdict(
        "ok",
        f"The STUN server {url} answers over {transport} in {_ms(rtt)}; it sees you as "
        f"{mapped} ({nat}).",
        "Nothing to do: clients can learn their public address here. Whether two peers can "
        "connect without a relay also depends on their NATs; give them a TURN server too.",
    )


# --- probe nat (RFC 5780) -----------------------------------------------------------------

_FILTERING = {
    "endpoint-independent": "lets in packets from anywhere to a mapped port",
    "address-dependent": "lets in only packets from addresses this host has sent to",
    "address-and-port-dependent": "lets in only packets from addresses and ports this host "
    "has sent to",
}


def nat_none(mapped: str, filtering: str) -> Verdict:
    if filtering == "endpoint-independent":
        return Verdict(
            "nat-none",
            f"No NAT: this host has a public address ({mapped}) and nothing filters what "
            "comes in: direct calls work.",
            "Peers reach this host directly, whatever their NAT; TURN is needed only "
            "between two peers that cannot reach each other.",
        )
    return Verdict(
        "nat-none",
        f"No NAT, but a firewall ({filtering} filtering) {_FILTERING[filtering]}: "
        "direct calls work with most peers.",
        "Calls with peers behind a symmetric NAT (mobile networks, many corporate ones) "
        "need TURN: give clients a TURN server.",
    )


def nat_cone(filtering: str) -> Verdict:
    if filtering == "endpoint-independent":
        return Verdict(
            "nat-cone",
            "Endpoint-independent mapping and filtering: direct calls work with most peers.",
            "This NAT (a full cone) keeps one public port per local port and lets anyone "
            "answer on it: even peers behind symmetric NATs reach this host directly.",
        )
    return Verdict(
        "nat-cone",
        f"Endpoint-independent mapping, {filtering} filtering: direct calls work with "
        "most peers, but not with peers behind a symmetric NAT.",
        f"This NAT keeps one public port per local port, but {_FILTERING[filtering]}: ICE "
        "hole punching connects it with cone NATs. Calls with peers behind symmetric NATs "
        "(mobile networks, many corporate ones) need TURN: give clients a TURN server.",
    )


def nat_symmetric(mapping: str, filtering: str) -> Verdict:
    return Verdict(
        "nat-symmetric",
        f"Symmetric NAT ({mapping} mapping, {filtering} filtering): calls from here need TURN.",
        "This NAT gives each destination a new public port, so the address a STUN server "
        "sees is useless to peers: direct calls work only with peers that have no NAT or "
        "endpoint-independent filtering. Give clients a TURN server (UDP, with TCP and TLS "
        "URLs as fallback).",
    )


def nat_undetermined(url: str, mapped: str, local: str) -> Verdict:
    behind = (
        f"this host is behind a NAT (the server sees {mapped}, not {local})"
        if mapped != local
        else f"this host is not behind a NAT (the server sees its own address {mapped})"
    )
    return Verdict(
        "nat-undetermined",
        f"The server {url} does not do NAT behaviour discovery (RFC 5780: no OTHER-ADDRESS, "
        f"or no answer from it), so it cannot tell how this NAT maps and filters; it can "
        f"still tell that {behind}.",
        "Run the probe against a server with RFC 5780: tsunagu serve --rfc5780 with two "
        "listening IPs (-L IP1 -L IP2), or coturn with two listening IPs.",
    )


_NOTHING_CAME_BACK = frozenset({"no-answer", "unreachable"})


@dataclass(frozen=True, slots=True)
class Tried:
    """One URL's verdict, with how it was reached: what :func:`summary` reasons about."""

    url: str
    transport: str
    """``udp``, ``tcp`` or ``tls``."""
    verdict: Verdict
    proxied: bool = False


def summary(tried: list[Tried], *, direct: Verdict | None = None) -> Verdict:
    """One verdict for several URLs. It names the network when the pattern says what it is:
    UDP blocked while TCP or TLS works; nothing getting out at all; or, with a proxy, the
    proxy as the only way out (``direct``: a plain TCP connection tried beside the proxy's).
    Otherwise all well, or the first failure with a count."""
    if len(tried) == 1 and direct is None:
        return tried[0].verdict
    failed = [t for t in tried if not t.verdict.ok]
    udp = [t for t in tried if t.transport == "udp"]
    streams = [t for t in tried if t.transport != "udp"]
    udp_silent = bool(udp) and all(t.verdict.code in _NOTHING_CAME_BACK for t in udp)
    working = [t for t in streams if t.verdict.ok]
    if working and working[0].proxied and direct is not None and not direct.ok:
        if direct.code in _NOTHING_CAME_BACK | {"dns-failed"} and (not udp or udp_silent):
            return proxy_only(working[0].url, direct)
    if udp_silent and working and not working[0].proxied:
        return udp_blocked([t.url for t in udp], working[0].url)
    if (
        streams
        and not any(t.proxied for t in tried)
        and all(t.verdict.code in _NOTHING_CAME_BACK for t in tried)
    ):
        return blocked(len(tried))
    if not failed:
        return Verdict(
            "ok",
            "Both URLs work." if len(tried) == 2 else f"All {len(tried)} URLs work.",
            "Nothing to do; if a call still fails, check the signaling.",
        )
    first = failed[0]
    return Verdict(
        first.verdict.code,
        f"{len(tried) - len(failed)} of {len(tried)} URLs work; {first.url}: "
        f"{first.verdict.sentence}",
        first.verdict.advice,
    )


def udp_blocked(udp_urls: list[str], working: str) -> Verdict:
    listed = ", ".join(udp_urls)
    return Verdict(
        "udp-blocked",
        f"UDP is blocked on this network: {listed} got no answer, but {working} works.",
        "Calls from here relay over TCP or TLS, with more delay under loss. Give clients "
        "turn:…?transport=tcp and turns: URLs (TLS on port 443 passes most firewalls), or "
        "ask for the server's UDP port to be opened outbound.",
    )


def blocked(count: int) -> Verdict:
    return Verdict(
        "blocked",
        f"None of the {count} URLs got through: nothing reaches the server over UDP, TCP or "
        "TLS. A firewall blocks the way out, or this network lets out only what goes "
        "through a web proxy.",
        "If browsers here use a proxy (the system's or the browser's proxy settings), run "
        "again with --proxy http://user:password@proxy:port and a turns: URL on port 443; "
        "otherwise check the server's address and the firewalls on the way.",
    )


def proxy_only(working: str, direct: Verdict) -> Verdict:
    return Verdict(
        "proxy-only",
        f"This network lets traffic out only through the HTTP proxy: {working} works through "
        f"it, but nothing reaches the server directly ({direct.sentence[:1].lower()}"
        f"{direct.sentence[1:].rstrip('.')}).",
        "Calls from here need the browser's proxy settings (with the proxy's credentials) "
        "and a turns: URL on port 443 in the ICE servers; the proxy must allow CONNECT to "
        "that port.",
    )
