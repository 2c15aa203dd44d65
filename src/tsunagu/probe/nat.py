"""``tsunagu probe nat``: how the NAT in front of this host behaves (RFC 5780).

A server that supports NAT behaviour discovery answers a Binding request with OTHER-ADDRESS,
its alternate address and port, and honours CHANGE-REQUEST (answer from the other IP, the
other port, or both) and RESPONSE-PORT (answer to another port of the client). From its
answers, over UDP:

- **mapping** (§4.3): test I asks the primary address for the mapped address; if it is the
  local address, there is no NAT. Test II asks the alternate IP (primary port): the same
  mapped address means endpoint-independent mapping. Otherwise test III asks the alternate
  IP and port: the same mapping as test II means address-dependent, a new one
  address-and-port-dependent (a "symmetric NAT").
- **filtering** (§4.4): test II asks for the answer from the other IP and port; it arrives
  through endpoint-independent filtering only. Test III asks for the other port only: it
  arrives through address-dependent filtering; nothing arrives through
  address-and-port-dependent filtering. Each missing answer costs the timeout.
- **hairpinning** (§4.5): a second socket sends a Binding request to the first one's mapped
  address; the NAT hairpins if the first socket receives it (bounded by the timeout).
- **binding lifetime** (§4.6), only with ``lifetime_max``: sockets X1, X2... each get a
  mapping at once; after T = 1, 2, 4... seconds (up to ``lifetime_max``) a fresh socket Y
  asks the primary address to answer to X's mapped port (RESPONSE-PORT). An answer that
  reaches X means the mapping lived T seconds. All waits run side by side, so the test takes
  ``lifetime_max`` plus a timeout, not their sum.

The steps and the verdict go out as for ``probe stun``; the verdict names the kind of NAT
and what it means for calls (see :mod:`.verdicts`).
"""

from __future__ import annotations

import os
import select
import socket
import time
from dataclasses import dataclass
from typing import Any

from . import verdicts, wire
from .checks import CheckResult, Observer, _addr, _plain_address, _resolve, _Run
from .session import Retransmitter
from .urls import IceUrl
from .verdicts import Failure, Verdict

__all__ = ["ADM", "APDM", "EIM", "NatOptions", "check_nat"]

_ATTR_MAPPED_ADDRESS = 0x0001
_ATTR_CHANGE_REQUEST = 0x0003
_ATTR_RESPONSE_PORT = 0x0027
_ATTR_RESPONSE_ORIGIN = 0x802B
_ATTR_OTHER_ADDRESS = 0x802C
_CHANGE_IP = 0x04
_CHANGE_PORT = 0x02
_READ = 2048

EIM = "endpoint-independent"
ADM = "address-dependent"
APDM = "address-and-port-dependent"


@dataclass(frozen=True, slots=True)
class NatOptions:
    timeout: float = 3.0
    #: Longest binding lifetime to try, in seconds; 0 skips the lifetime test.
    lifetime_max: float = 0.0
    hairpinning: bool = True


@dataclass(slots=True)
class _Answer:
    reply: wire.StunReply
    source: tuple[str, int]

    @property
    def mapped(self) -> tuple[str, int] | None:
        return self.reply.address(wire.ATTR_XOR_MAPPED_ADDRESS) or _plain_address(
            self.reply.attributes.get(_ATTR_MAPPED_ADDRESS)
        )

    @property
    def other(self) -> tuple[str, int] | None:
        return _plain_address(self.reply.attributes.get(_ATTR_OTHER_ADDRESS))

    @property
    def origin(self) -> tuple[str, int] | None:
        return _plain_address(self.reply.attributes.get(_ATTR_RESPONSE_ORIGIN))


def _socket(local_ip: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in local_ip else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((local_ip, 0))
    sock.setblocking(False)
    return sock


def _local_ip(server: tuple[str, int]) -> str:
    """The address this host sends from towards ``server``: the one to compare the mapping to."""
    with socket.socket(
        socket.AF_INET6 if ":" in server[0] else socket.AF_INET, socket.SOCK_DGRAM
    ) as sock:
        try:
            sock.connect(server)
        except OSError as exc:
            raise Failure(verdicts.unreachable(_addr(server), exc.strerror or str(exc))) from None
        return str(sock.getsockname()[0])


def _request(attributes: list[tuple[int, bytes]]) -> tuple[bytes, bytes]:
    txid = os.urandom(12)
    return wire.encode_request(wire.BINDING, txid, attributes), txid


def _receive(sock: socket.socket, timeout: float) -> list[tuple[bytes, tuple[str, int]]]:
    if not select.select([sock], [], [], max(0.0, timeout))[0]:
        return []
    out: list[tuple[bytes, tuple[str, int]]] = []
    for _ in range(64):
        try:
            data, source = sock.recvfrom(_READ)
        except (BlockingIOError, ConnectionRefusedError):
            break
        out.append((data, (str(source[0]), int(source[1]))))
    return out


def _transaction(
    sock: socket.socket,
    destination: tuple[str, int],
    attributes: list[tuple[int, bytes]],
    timeout: float,
) -> _Answer | None:
    """One Binding transaction, retransmitted, bounded by ``timeout``; None if no answer."""
    request, txid = _request(attributes)
    return _exchange(sock, sock, destination, request, txid, timeout, answer=True)


def _exchange(
    sender: socket.socket,
    receiver: socket.socket,
    destination: tuple[str, int],
    request: bytes,
    txid: bytes,
    timeout: float,
    *,
    answer: bool,
) -> _Answer | None:
    """Send ``request`` from ``sender`` (retransmitted, bounded by ``timeout``) until
    ``receiver`` gets the message of that transaction: its answer, or with ``answer`` false
    the request itself (a hairpinned one)."""
    clock = time.perf_counter
    retransmit = Retransmitter(reliable=False, timeout=timeout)
    sender.sendto(retransmit.start(request, clock()), destination)
    while True:
        deadline = retransmit.deadline
        if deadline is None:
            return None
        for data, source in _receive(receiver, deadline - clock()):
            try:
                reply = wire.parse_reply(data)
            except wire.WireError:
                continue
            if reply.txid == txid and (reply.klass != wire.CLASS_REQUEST) == answer:
                return _Answer(reply, source)
        again = retransmit.poll(clock())
        if again is not None:
            try:
                sender.sendto(again, destination)
            except OSError:
                if answer:
                    raise
                # Sending to our own mapped address may be refused: no hairpinning, then.


def _change_request(flags: int) -> tuple[int, bytes]:
    return _ATTR_CHANGE_REQUEST, flags.to_bytes(4, "big")


def _response_port(port: int) -> tuple[int, bytes]:
    return _ATTR_RESPONSE_PORT, port.to_bytes(2, "big") + b"\x00\x00"


def _is_error(answer: _Answer | None) -> bool:
    """An error response (420 Unknown Attribute from a server without RFC 5780)."""
    return answer is not None and answer.reply.klass == wire.CLASS_ERROR


def _code(answer: _Answer | None) -> str:
    code = None if answer is None else answer.reply.error_code
    return "an error" if code is None else str(code)


def check_nat(url: IceUrl, options: NatOptions, observer: Observer) -> CheckResult:
    """Classify the NAT between this host and the server ``url`` names (UDP)."""
    run = _Run(observer)
    figures: dict[str, Any] = {
        "mapping": None,
        "filtering": None,
        "hairpinning": None,
        "lifetime": None,
    }
    address: tuple[str, int] | None = None
    sockets: list[socket.socket] = []
    try:
        resolved = _resolve(run, url, None)
        assert resolved is not None  # no proxy: always an address
        address = server = resolved
        local_ip = _local_ip(server)
        sock = _socket(local_ip)
        sockets.append(sock)
        local = (local_ip, int(sock.getsockname()[1]))
        where = url.authority if url.host_is_ip else f"{url.authority} ({server[0]})"

        # Mapping, test I: the primary address.
        with run.step("binding", f"test I to {_addr(server)}") as step:
            first = _transaction(sock, server, [], options.timeout)
            if first is None:
                raise Failure(verdicts.no_answer_udp(where, options.timeout))
            if first.reply.klass == wire.CLASS_ERROR:
                raise Failure(verdicts.stun_error(first.reply.error_code, first.reply.reason))
            mapped = first.mapped
            if mapped is None:
                raise Failure(verdicts.not_stun(where, "a Binding answer without an address"))
            other = first.other
            figures.update(
                local=_addr(local),
                mapped=_addr(mapped),
                other_address=_addr(other) if other else None,
                response_origin=_addr(first.origin) if first.origin else None,
            )
            behind = mapped != local
            seen = f"you are {_addr(mapped)}" + (f" (local {_addr(local)})" if behind else "")
            step["detail"] = seen + (
                f"; other address {_addr(other)}" if other else "; no OTHER-ADDRESS"
            )
        # A server without an alternate address cannot say more than "NAT or not".
        rfc5780 = other is not None and other[0] != server[0] and other[1] != server[1]
        mapping: str | None = None if behind else "none"
        filtering: str | None = None
        if rfc5780:
            assert other is not None
            with run.step("mapping", f"tests II and III to {other[0]}") as step:
                second = _transaction(sock, (other[0], server[1]), [], options.timeout)
                if second is None or second.mapped is None:
                    rfc5780 = False
                    step["detail"] = (
                        f"no answer from the alternate address {other[0]}:{server[1]}: cannot tell"
                    )
                elif not behind:
                    step["detail"] = "no NAT: the server sees this host's own address"
                elif second.mapped == mapped:
                    mapping = EIM
                    step["detail"] = f"{_addr(second.mapped)} again: {EIM}"
                else:
                    third = _transaction(sock, other, [], options.timeout)
                    if third is None or third.mapped is None:
                        rfc5780 = False
                        step["detail"] = f"no answer from {_addr(other)}: cannot tell"
                    elif third.mapped == second.mapped:
                        mapping = ADM
                        step["detail"] = (
                            f"{_addr(second.mapped)} to {other[0]}, the same to its other port: "
                            f"{ADM}"
                        )
                    else:
                        mapping = APDM
                        step["detail"] = (
                            f"{_addr(mapped)}, {_addr(second.mapped)}, {_addr(third.mapped)}: "
                            "a new mapping per destination"
                        )
                if second is not None and second.mapped is not None:
                    step["mapped_ii"] = _addr(second.mapped)
        if rfc5780:
            assert other is not None
            with run.step("filtering", "answers from the other IP and port, then port") as step:
                both = _transaction(
                    sock, server, [_change_request(_CHANGE_IP | _CHANGE_PORT)], options.timeout
                )
                if _is_error(both):
                    rfc5780 = False
                    step["detail"] = (
                        f"the server refuses CHANGE-REQUEST ({_code(both)}): cannot tell"
                    )
                elif both is not None and both.source != other:
                    rfc5780 = False
                    step["detail"] = (
                        f"asked to answer from {_addr(other)}, the server answered from "
                        f"{_addr(both.source)}: cannot tell"
                    )
                elif both is not None:
                    filtering = EIM
                    step["detail"] = f"the answer from {_addr(both.source)} came in: {EIM}"
                else:
                    port = _transaction(
                        sock, server, [_change_request(_CHANGE_PORT)], options.timeout
                    )
                    if _is_error(port):
                        rfc5780 = False
                        step["detail"] = (
                            f"the server refuses CHANGE-REQUEST ({_code(port)}): cannot tell"
                        )
                    elif port is not None and port.source != (server[0], other[1]):
                        rfc5780 = False
                        step["detail"] = (
                            f"asked to answer from port {other[1]}, the server answered from "
                            f"{_addr(port.source)}: cannot tell"
                        )
                    elif port is not None:
                        filtering = ADM
                        step["detail"] = (
                            f"only the answer from the same IP, port {port.source[1]}, came "
                            f"in: {ADM}"
                        )
                    else:
                        filtering = APDM
                        step["detail"] = (
                            f"neither answer came in within {options.timeout:.1f} s: {APDM}"
                        )
        figures["mapping"] = mapping
        figures["filtering"] = filtering
        figures["rfc5780"] = rfc5780
        if options.hairpinning:
            with run.step("hairpinning", f"to {_addr(mapped)} from another port") as step:
                hairpin = _hairpin(sock, local_ip, mapped, options.timeout, sockets)
                figures["hairpinning"] = hairpin
                step["detail"] = (
                    (
                        "the request came back through the NAT: it hairpins"
                        if behind
                        else "the request arrived (no NAT on the way)"
                    )
                    if hairpin
                    else f"the request did not come back in {options.timeout:.1f} s: no hairpinning"
                )
        if options.lifetime_max > 0 and rfc5780:
            with run.step("lifetime", f"up to {options.lifetime_max:g} s") as step:
                alive, expired = _lifetime(
                    server, local_ip, options.lifetime_max, options.timeout, observer, sockets
                )
                figures["lifetime"] = {
                    "alive_s": alive,
                    "expired_s": expired,
                    "max_s": options.lifetime_max,
                }
                if expired is None:
                    step["detail"] = f"a mapping lives at least {alive:g} s"
                elif alive is None:
                    step["detail"] = f"a mapping is gone after {expired:g} s"
                else:
                    step["detail"] = f"a mapping lives {alive:g} s, but not {expired:g} s"
        verdict = _verdict(url, mapped, local, rfc5780, mapping, filtering)
    except Failure as failure:
        verdict = failure.verdict
    finally:
        for one in sockets:
            one.close()
    return CheckResult(url, run.steps, figures, verdict, server=_addr(address) if address else None)


def _verdict(
    url: IceUrl,
    mapped: tuple[str, int],
    local: tuple[str, int],
    rfc5780: bool,
    mapping: str | None,
    filtering: str | None,
) -> Verdict:
    if not rfc5780 or mapping is None or filtering is None:
        return verdicts.nat_undetermined(str(url), _addr(mapped), _addr(local))
    if mapping == "none":
        return verdicts.nat_none(_addr(mapped), filtering)
    if mapping == EIM:
        return verdicts.nat_cone(filtering)
    return verdicts.nat_symmetric(mapping, filtering)


def _hairpin(
    sock: socket.socket,
    local_ip: str,
    mapped: tuple[str, int],
    timeout: float,
    sockets: list[socket.socket],
) -> bool:
    """Send a Binding request to our own mapped address from another socket (§4.5)."""
    sender = _socket(local_ip)
    sockets.append(sender)
    request, txid = _request([])
    return _exchange(sender, sock, mapped, request, txid, timeout, answer=False) is not None


def _lifetime(
    server: tuple[str, int],
    local_ip: str,
    longest: float,
    timeout: float,
    observer: Observer,
    sockets: list[socket.socket],
) -> tuple[float | None, float | None]:
    """The longest wait a mapping survived and the shortest it did not (§4.6), side by side."""
    waits: list[float] = []
    wait = 1.0
    while wait < longest and len(waits) < 16:
        waits.append(wait)
        wait *= 2
    waits.append(longest)
    # Each X gets its mapping now; each check from a fresh Y comes at its own time.
    trials: list[tuple[float, socket.socket, int]] = []
    for wait in waits:
        x = _socket(local_ip)
        sockets.append(x)
        answer = _transaction(x, server, [], timeout)
        if answer is None or answer.mapped is None:
            raise Failure(verdicts.no_answer_udp(_addr(server), timeout))
        trials.append((wait, x, answer.mapped[1]))
    started = time.perf_counter()
    alive: float | None = None
    expired: float | None = None
    for wait, x, port in trials:
        while (left := started + wait - time.perf_counter()) > 0:
            observer.progress(f"waiting {left:.0f} s, then checking the {wait:g} s mapping")
            time.sleep(min(1.0, left))
        y = _socket(local_ip)
        sockets.append(y)
        request, txid = _request([_response_port(port)])
        y.sendto(request, server)
        # Retransmitted from Y: each copy is a new chance for the answer to reach X.
        retransmit = Retransmitter(reliable=False, timeout=timeout)
        retransmit.start(request, time.perf_counter())
        arrived = False
        while not arrived and retransmit.deadline is not None:
            for data, _ in _receive(x, retransmit.deadline - time.perf_counter()):
                try:
                    reply = wire.parse_reply(data)
                except wire.WireError:
                    continue
                arrived = arrived or reply.txid == txid
            again = None if arrived else retransmit.poll(time.perf_counter())
            if again is not None:
                y.sendto(again, server)
        if arrived:
            alive = wait
        elif expired is None:
            expired = wait
    return alive, expired
