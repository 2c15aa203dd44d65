"""``tsunagu probe stun`` and ``probe turn``: check one URL as a WebRTC client would use it.

A check is a sequence of steps, each timed and reported as it runs to an :class:`Observer`
(a progress display, plain lines, or nothing for ``--json``), and ends with one
:class:`~.verdicts.Verdict`. The first step that fails ends the check; its cause, known at
the place it was found (see :mod:`.net` and :func:`_session_failure`), is the verdict.

The TURN check makes two allocations on the same server, A and B, over the same transport,
and lets each permit and bind a channel to the other's relayed address. Test packets then
go A -> relay A -> relay B -> B, and B sends each straight back the same way: everything a
call's media needs from the server, with no third party and no extra open port. What comes
back gives loss, round-trip time, jitter and throughput at a fixed offered rate (about one
video stream by default) over a short bounded run.

The TURN client is :class:`~.session.TurnSession`, the load generator's, driven one
allocation at a time; the Binding check uses its :class:`~.session.Retransmitter`.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..auth.rest import rest_expiry
from . import net, verdicts, wire
from .net import Link, Proxy, TlsOptions
from .session import Phase, Retransmitter, TurnSession
from .urls import IceUrl
from .verdicts import Failure, Verdict

__all__ = [
    "CheckResult",
    "Observer",
    "Step",
    "StunOptions",
    "TurnOptions",
    "check_stun",
    "check_turn",
]

_CHANNEL = 0x4000
_PROBE = struct.Struct("!IQ")  # sequence, send time (ns)
_ATTR_MAPPED_ADDRESS = 0x0001
_ATTR_SOFTWARE = 0x8022
_ATTR_RESPONSE_ORIGIN = 0x802B
_ATTR_OTHER_ADDRESS = 0x802C
_LOSSY = 0.05  # more loss than this in the relay test is a finding
_DRAIN = 1.0  # seconds to wait for the last test packets
_REST_EPOCH = 1_000_000_000  # a "REST expiry" before 2001 is a user name made of digits


@dataclass(slots=True)
class Step:
    """One step of a check, as reported."""

    name: str
    ok: bool
    detail: str
    seconds: float
    facts: dict[str, Any] = field(default_factory=dict)
    #: The verdict code of the failure that stopped the check here.
    code: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "ok": self.ok,
            "detail": self.detail,
            "ms": round(self.seconds * 1000, 2),
        }
        if self.code is not None:
            out["code"] = self.code
        if self.facts:
            out.update(self.facts)
        return out


class Observer(Protocol):
    """Who watches a check run: called as each step starts, progresses and ends."""

    def begin(self, name: str, detail: str) -> None: ...

    def progress(self, text: str) -> None: ...

    def end(self, step: Step) -> None: ...


@dataclass(slots=True)
class CheckResult:
    url: IceUrl
    steps: list[Step]
    figures: dict[str, Any]
    verdict: Verdict
    server: str | None = None
    proxy: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "url": str(self.url),
            "transport": self.url.transport,
            "server": self.server,
            "proxy": self.proxy,
            "steps": [step.as_dict() for step in self.steps],
            "figures": self.figures,
            "verdict": self.verdict.as_dict(),
        }


@dataclass(frozen=True, slots=True)
class StunOptions:
    timeout: float = 5.0
    count: int = 3
    tls: TlsOptions = TlsOptions()
    proxy: Proxy | None = None


@dataclass(frozen=True, slots=True)
class TurnOptions:
    username: str
    password: str
    minted: bool = False  # the credential was minted here from --secret
    timeout: float = 5.0
    seconds: float = 3.0
    rate: float = 200.0  # test packets per second from A
    size: int = 1000  # bytes of payload per packet
    tls: TlsOptions = TlsOptions()
    proxy: Proxy | None = None


class _StepFailed(Exception):
    """A step failed; the Failure that says why has been recorded."""


class _Run:
    """The steps of one check: timing, reporting, and the first failure."""

    def __init__(self, observer: Observer) -> None:
        self.observer = observer
        self.steps: list[Step] = []
        self.clock = time.perf_counter

    @contextlib.contextmanager
    def step(self, name: str, detail: str = "") -> Iterator[dict[str, Any]]:
        """Run one step; the body fills in ``detail`` (and facts) in the dict it gets."""
        handle: dict[str, Any] = {"detail": detail}
        self.observer.begin(name, detail)
        started = self.clock()
        try:
            yield handle
        except Failure as failure:
            verdict = failure.verdict
            step = Step(name, False, verdict.sentence, self.clock() - started, code=verdict.code)
            self.steps.append(step)
            self.observer.end(step)
            raise
        text = str(handle.pop("detail"))
        step = Step(name, True, text, self.clock() - started, handle)
        self.steps.append(step)
        self.observer.end(step)


def _where(url: IceUrl, address: tuple[str, int] | None) -> str:
    if address is None or url.host_is_ip:
        return url.authority
    return f"{url.authority} ({address[0]})"


def _addr(address: tuple[str, int] | None) -> str:
    if address is None:
        return "?"
    ip, port = address
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _open(
    run: _Run,
    url: IceUrl,
    address: tuple[str, int] | None,
    tls: TlsOptions,
    proxy: Proxy | None,
    timeout: float,
    facts: dict[str, Any],
    label: str = "",
) -> Link:
    """Connect to the server over the URL's transport, each part a step of its own."""
    where = _where(url, address)
    if url.transport == "udp":
        assert address is not None
        return Link(net.open_udp(address), stream=False)
    sock: socket.socket
    if proxy is not None:
        with run.step(f"proxy{label}", f"CONNECT {url.authority} through {proxy}") as step:
            sock, status = net.proxy_connect(proxy, url.host, url.port, timeout)
            step["detail"] = f"{proxy} tunnels to {url.authority}: {status}"
    else:
        assert address is not None
        with run.step(f"connect{label}", f"TCP to {_addr(address)}") as step:
            sock = net.connect_tcp(address, timeout)
            step["detail"] = f"TCP to {_addr(address)}"
    if url.transport == "tls":
        with run.step(f"tls{label}", f"handshake with {url.host}") as step:
            tls_sock, info = net.start_tls(sock, url.host, where, tls, timeout)
            sock = tls_sock
            verified = "verified against " + info.trust if info.verified else "NOT verified"
            if tls.pins:
                verified = "matches the pin"
            step["detail"] = (
                f"{info.version}, certificate for {info.subject} from {info.issuer}, "
                f"valid until {info.not_after}; {verified}"
            )
            facts["tls"] = info.as_dict()
    return Link(sock, stream=True)


def _resolve(run: _Run, url: IceUrl, proxy: Proxy | None) -> tuple[str, int] | None:
    """The server's address; through a proxy the proxy resolves the name, not this host."""
    if proxy is not None and url.transport != "udp":
        return None
    if url.host_is_ip:
        return (url.host, url.port)
    with run.step("resolve", url.host) as step:
        address = net.resolve(url.host, url.port, url.transport != "udp")
        step["detail"] = f"{url.host} is {address[0]}"
    return address


def _failure_while(
    exc: BaseException, url: IceUrl, where: str, step: str, seconds: float
) -> Failure:
    """Put an exception from a :class:`~.net.Link` into words."""
    if isinstance(exc, Failure):
        return exc
    if isinstance(exc, net.Closed):
        return Failure(verdicts.connection_closed(where, step))
    if isinstance(exc, ConnectionRefusedError):
        return Failure(verdicts.connection_refused(where, url.transport_name))
    if isinstance(exc, TimeoutError):
        return Failure(verdicts.no_answer_request(where, step, seconds, url.transport_name))
    if isinstance(exc, wire.WireError):
        return Failure(verdicts.not_stun(where, str(exc)))
    if isinstance(exc, ssl.SSLError):
        return Failure(verdicts.tls_failed(where, exc.reason or str(exc)))
    assert isinstance(exc, OSError)
    return Failure(verdicts.connection_closed(where, f"{step} ({exc.strerror or exc})"))


# --- STUN -----------------------------------------------------------------------------------


def _plain_address(value: bytes | None) -> tuple[str, int] | None:
    """MAPPED-ADDRESS, RESPONSE-ORIGIN, OTHER-ADDRESS: the address in the clear."""
    if value is None or len(value) < 8:
        return None
    port = int.from_bytes(value[2:4], "big")
    if value[1] == 1:
        return socket.inet_ntop(socket.AF_INET, value[4:8]), port
    if value[1] == 2 and len(value) >= 20:
        return socket.inet_ntop(socket.AF_INET6, value[4:20]), port
    return None


def _nat_note(local: tuple[str, int], mapped: tuple[str, int], proxy: Proxy | None) -> str:
    if proxy is not None:
        return f"the address of the proxy {proxy.host}"
    if mapped == local:
        return "your own address: no NAT on the way"
    if mapped[0] == local[0]:
        return f"your address with another port than {local[1]}: a NAT or firewall maps ports"
    return f"not your local address {_addr(local)}: you are behind a NAT"


def _transaction(
    link: Link, request: bytes, txid: bytes, timeout: float
) -> tuple[wire.StunReply, float]:
    """One Binding transaction: retransmitted over UDP, bounded by ``timeout``."""
    clock = time.perf_counter
    retransmit = Retransmitter(reliable=link.stream, timeout=timeout)
    started = clock()
    link.send(retransmit.start(request, started))
    while True:
        deadline = retransmit.deadline
        if deadline is None:
            raise TimeoutError(f"no answer in {retransmit.gave_up_after or timeout:.1f} s")
        for data in link.receive(max(0.0, deadline - clock())):
            reply = wire.parse_reply(data)
            if reply.txid == txid and reply.klass != wire.CLASS_REQUEST:
                return reply, clock() - started
        again = retransmit.poll(clock())
        if again is not None:
            link.send(again)


def check_stun(url: IceUrl, options: StunOptions, observer: Observer) -> CheckResult:
    """Binding requests to ``url``: is it reachable, what address does it see, how fast."""
    run = _Run(observer)
    figures: dict[str, Any] = {}
    address: tuple[str, int] | None = None
    link: Link | None = None
    proxy = options.proxy if url.transport != "udp" else None
    try:
        address = _resolve(run, url, proxy)
        link = _open(run, url, address, options.tls, proxy, options.timeout, figures)
        where = _where(url, address)
        rtts: list[float] = []
        mapped: tuple[str, int] | None = None
        reply: wire.StunReply | None = None
        with run.step("binding", f"{options.count} Binding request(s)") as step:
            for _ in range(options.count):
                txid = os.urandom(12)
                request = wire.encode_request(wire.BINDING, txid, [])
                try:
                    reply, rtt = _transaction(link, request, txid, options.timeout)
                except (OSError, wire.WireError, net.Closed) as exc:
                    raise _failure_while(exc, url, where, "Binding", options.timeout) from None
                if reply.klass == wire.CLASS_ERROR:
                    raise Failure(verdicts.stun_error(reply.error_code, reply.reason))
                rtts.append(rtt)
                mapped = reply.address(wire.ATTR_XOR_MAPPED_ADDRESS) or _plain_address(
                    reply.attributes.get(_ATTR_MAPPED_ADDRESS)
                )
            assert reply is not None
            if mapped is None:
                raise Failure(verdicts.not_stun(where, "a Binding answer without an address"))
            local = link.local
            figures.update(
                {
                    "mapped": _addr(mapped),
                    "local": _addr(local),
                    "rtt_ms": {
                        "min": round(min(rtts) * 1000, 3),
                        "mean": round(sum(rtts) / len(rtts) * 1000, 3),
                        "max": round(max(rtts) * 1000, 3),
                    },
                    "requests": len(rtts),
                }
            )
            origin = _plain_address(reply.attributes.get(_ATTR_RESPONSE_ORIGIN))
            other = _plain_address(reply.attributes.get(_ATTR_OTHER_ADDRESS))
            software = reply.text(_ATTR_SOFTWARE)
            if origin is not None:
                figures["response_origin"] = _addr(origin)
            # OTHER-ADDRESS: the server supports RFC 5780 NAT behaviour discovery.
            figures["other_address"] = _addr(other) if other is not None else None
            if software:
                figures["software"] = software
            step["detail"] = (
                f"you are {_addr(mapped)}; round trip {min(rtts) * 1000:.1f} ms "
                f"(best of {len(rtts)})"
            )
        nat = _nat_note(local, mapped, proxy)
        verdict = verdicts.stun_ok(str(url), url.transport_name, min(rtts), _addr(mapped), nat)
    except Failure as failure:
        verdict = failure.verdict
    finally:
        if link is not None:
            link.close()
    return CheckResult(
        url,
        run.steps,
        figures,
        verdict,
        server=_addr(address) if address else None,
        proxy=str(proxy) if proxy else None,
    )


# --- TURN -----------------------------------------------------------------------------------


@dataclass(eq=False)
class _Side:
    """One of the two allocations: its link and its session."""

    link: Link
    session: TurnSession


def _session_failure(
    session: TurnSession, options: TurnOptions, url: IceUrl, where: str, step: str
) -> Verdict:
    """Why ``session`` failed, from the error response (or the silence) it got."""
    if session.timed_out:
        waited = options.timeout
        return verdicts.no_answer_request(where, step, waited, url.transport_name)
    code = session.error_code
    reason = session.error_reason
    if code == 401 and session.authenticated:
        expiry = rest_expiry(options.username)
        if expiry is not None and expiry > _REST_EPOCH and expiry < time.time():
            return verdicts.credential_expired(options.username, expiry, time.time())
        return verdicts.wrong_password(options.username, options.minted)
    if code == 403 and session.failed_in in (Phase.PERMISSION, Phase.CHANNEL):
        assert session.peer is not None
        return verdicts.peer_denied(step, _addr(session.peer))
    if code == 486:
        return verdicts.quota_reached(reason)
    if code == 508:
        return verdicts.server_full(reason)
    return verdicts.turn_error(step, code, reason or (session.error or ""))


def _drive(
    side: _Side, during: Phase, options: TurnOptions, url: IceUrl, where: str, step: str
) -> None:
    """Feed ``side``'s session its replies and timers while it is in phase ``during``."""
    session, link = side.session, side.link
    clock = time.perf_counter
    while session.phase is during:
        deadline = session.deadline
        if deadline is None:
            break
        try:
            frames = link.receive(max(0.0, deadline - clock()))
        except (OSError, net.Closed, wire.WireError) as exc:
            raise _failure_while(exc, url, where, step, options.timeout) from None
        now = clock()
        for data in frames:
            if not 0x00 <= data[0] <= 0x3F:
                continue  # ChannelData: not for the session
            try:
                reply = wire.parse_reply(data)
            except wire.WireError as exc:
                raise Failure(verdicts.not_stun(where, str(exc))) from None
            request = session.receive(reply, now)
            if request is not None:
                _send(link, request, url, where, step, options)
        request = session.poll(clock())
        if request is not None:
            _send(link, request, url, where, step, options)
    if session.phase is Phase.FAILED:
        raise Failure(_session_failure(session, options, url, where, step))


def _send(link: Link, data: bytes, url: IceUrl, where: str, step: str, o: TurnOptions) -> None:
    try:
        link.send(data)
    except (OSError, net.Closed, wire.WireError) as exc:
        raise _failure_while(exc, url, where, step, o.timeout) from None


def _allocate(
    run: _Run,
    name: str,
    link: Link,
    options: TurnOptions,
    url: IceUrl,
    where: str,
    family: int | None,
) -> _Side:
    session = TurnSession(
        options.username,
        options.password,
        None,
        channel=_CHANNEL,
        random_bytes=os.urandom,
        reliable=link.stream,
        timeout=options.timeout,
        family=family,
    )
    side = _Side(link, session)
    with run.step(name, f"as {options.username}") as step:
        _send(link, session.start(time.perf_counter()), url, where, "Allocate", options)
        _drive(side, Phase.ALLOCATE, options, url, where, "Allocate")
        step["detail"] = f"relayed address {_addr(session.relayed)}" + (
            f", the server sees you as {_addr(session.mapped)}" if session.mapped else ""
        )
        step["relayed"] = _addr(session.relayed)
        step["mapped"] = _addr(session.mapped) if session.mapped else None
        step["realm"] = session.realm
        step["lifetime"] = session.lifetime_granted
    return side


def _percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _relay_test(
    run: _Run, a: _Side, b: _Side, options: TurnOptions, url: IceUrl, where: str
) -> dict[str, Any]:
    """A -> relay A -> relay B -> B, and B sends each packet straight back."""
    clock = time.perf_counter
    now_ns = time.perf_counter_ns
    total = max(1, int(options.seconds * options.rate))
    stream = a.link.stream
    padding = bytes(options.size - _PROBE.size)
    sent_at: dict[int, int] = {}
    rtts: dict[int, float] = {}
    duplicates = strays = 0
    sent = 0
    links = (a.link, b.link)
    step_name = "the relay test"

    def send(link: Link, payload: bytes) -> None:
        _send(
            link, wire.channel_data(_CHANNEL, payload, pad=stream), url, where, step_name, options
        )

    started = clock()
    last_report = started
    last_send = started
    while True:
        now = clock()
        due = min(total, int((now - started) * options.rate) + 1) - sent
        for _ in range(max(0, due)):
            stamp = now_ns()
            payload = _PROBE.pack(sent, stamp) + padding
            sent_at[sent] = stamp
            send(a.link, payload)
            sent += 1
            last_send = clock()
        if sent >= total and (len(rtts) >= sent or now - last_send >= _DRAIN):
            break
        if now - last_report >= 0.25:
            last_report = now
            run.observer.progress(f"{sent} sent, {len(rtts)} back")
        wait = started + sent / options.rate - clock() if sent < total else 0.05
        ready = [link for link in links if link.pending()]
        if not ready:
            ready = select.select(list(links), [], [], max(0.0, min(wait, 0.05)))[0]
        for link in ready:
            try:
                frames = link.receive(0.0)
            except (OSError, net.Closed, wire.WireError) as exc:
                raise _failure_while(exc, url, where, step_name, options.timeout) from None
            for data in frames:
                if len(data) < 4 or not 0x40 <= data[0] <= 0x7F:
                    continue  # STUN: a late answer
                length = int.from_bytes(data[2:4], "big")
                payload = data[4 : 4 + length]
                if link is b.link:
                    send(b.link, payload)  # the echo, back the way it came
                    continue
                if len(payload) < _PROBE.size:
                    strays += 1
                    continue
                sequence, stamp = _PROBE.unpack_from(payload)
                if sent_at.get(sequence) != stamp:
                    strays += 1
                elif sequence in rtts:
                    duplicates += 1
                else:
                    rtts[sequence] = (now_ns() - stamp) / 1e9
    seconds = max(options.seconds, last_send - started)
    received = len(rtts)
    loss = 1.0 - received / sent if sent else 1.0
    in_order = [rtts[n] for n in sorted(rtts)]
    ordered = sorted(in_order)
    # Jitter: the mean change of the round-trip time from one packet to the next.
    jitter = (
        sum(abs(x - y) for x, y in zip(in_order[1:], in_order, strict=False)) / (len(in_order) - 1)
        if len(in_order) > 1
        else 0.0
    )
    figures: dict[str, Any] = {
        "sent": sent,
        "received": received,
        "loss": round(loss, 4),
        "duplicates": duplicates,
        "strays": strays,
        "send_dropped": a.link.dropped + b.link.dropped,
        "seconds": round(seconds, 3),
        "packet_bytes": options.size,
        "offered_mbps": round(options.rate * options.size * 8 / 1e6, 3),
        "throughput_mbps": round(received * options.size * 8 / seconds / 1e6, 3),
        "rtt_ms": None,
        "jitter_ms": round(jitter * 1000, 3) if received > 1 else None,
    }
    if ordered:
        figures["rtt_ms"] = {
            "min": round(ordered[0] * 1000, 3),
            "p50": round(_percentile(ordered, 0.5) * 1000, 3),
            "p95": round(_percentile(ordered, 0.95) * 1000, 3),
            "max": round(ordered[-1] * 1000, 3),
        }
    return figures


def _release(sides: list[_Side]) -> None:
    """Refresh with LIFETIME 0 for every allocation made, briefly; errors do not matter."""
    clock = time.perf_counter
    for side in sides:
        session = side.session
        if session.relayed is None or session.phase in (Phase.RELEASING, Phase.RELEASED):
            continue
        try:
            side.link.send(session.release(clock()))
            deadline = clock() + 1.0
            while not session.done and clock() < deadline:
                for data in side.link.receive(max(0.0, deadline - clock())):
                    if data[0] <= 0x3F:
                        session.receive(wire.parse_reply(data), clock())
        except (OSError, net.Closed, wire.WireError):
            continue


def check_turn(url: IceUrl, options: TurnOptions, observer: Observer) -> CheckResult:
    """Allocate twice on ``url``, permit and bind each to the other, relay test traffic."""
    run = _Run(observer)
    figures: dict[str, Any] = {}
    address: tuple[str, int] | None = None
    sides: list[_Side] = []
    links: list[Link] = []
    proxy = options.proxy if url.transport != "udp" else None
    try:
        address = _resolve(run, url, proxy)
        where = _where(url, address)
        link_a = _open(run, url, address, options.tls, proxy, options.timeout, figures)
        links.append(link_a)
        # A relayed address of the server's own family, as a browser asks for first (a
        # server on IPv6 alone may have no IPv4 relay address); through a proxy, IPv4
        # unless the URL names an IPv6 address.
        server_ip = address[0] if address is not None else url.host
        family = 2 if ":" in server_ip else None
        a = _allocate(run, "allocate", link_a, options, url, where, family)
        sides.append(a)
        facts: dict[str, Any] = {}
        link_b = _open(run, url, address, options.tls, proxy, options.timeout, facts, " (peer)")
        links.append(link_b)
        b = _allocate(run, "allocate (peer)", link_b, options, url, where, family)
        sides.append(b)
        assert a.session.relayed is not None and b.session.relayed is not None
        figures["relayed"] = [_addr(a.session.relayed), _addr(b.session.relayed)]
        figures["mapped"] = _addr(a.session.mapped) if a.session.mapped else None
        with run.step("permission", "each allocation permits the other's relayed address"):
            for side, peer in ((a, b.session.relayed), (b, a.session.relayed)):
                request = side.session.permit(peer, time.perf_counter())
                _send(side.link, request, url, where, "CreatePermission", options)
                _drive(side, Phase.PERMISSION, options, url, where, "CreatePermission")
        with run.step("channel bind", f"channel 0x{_CHANNEL:04X} both ways"):
            for side in (a, b):
                _drive(side, Phase.CHANNEL, options, url, where, "ChannelBind")
        offered = options.rate * options.size * 8 / 1e6
        with run.step(
            "relay test",
            f"{options.seconds:g} s at {offered:.2f} Mbit/s A -> relay -> relay -> B and back",
        ) as step:
            figures["relay"] = relay = _relay_test(run, a, b, options, url, where)
            if relay["received"] == 0:
                raise Failure(verdicts.relay_silent(relay["sent"], url.transport_name))
            rtt = relay["rtt_ms"]
            step["detail"] = (
                f"{relay['received']} of {relay['sent']} back ({relay['loss']:.1%} loss), "
                f"round trip {rtt['p50']:.1f} ms median / {rtt['max']:.1f} ms max, "
                f"jitter {relay['jitter_ms'] or 0:.1f} ms, {relay['throughput_mbps']:.2f} Mbit/s"
            )
        rtt_s = relay["rtt_ms"]["p50"] / 1000
        if relay["loss"] > _LOSSY:
            verdict = verdicts.lossy(str(url), relay["loss"], rtt_s)
        else:
            verdict = verdicts.turn_ok(
                str(url), url.transport_name, rtt_s, relay["throughput_mbps"], relay["loss"]
            )
    except Failure as failure:
        verdict = failure.verdict
    finally:
        _release(sides)
        for link in links:
            link.close()
    return CheckResult(
        url,
        run.steps,
        figures,
        verdict,
        server=_addr(address) if address else None,
        proxy=str(proxy) if proxy else None,
    )
