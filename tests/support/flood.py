"""A flood of unauthenticated STUN requests from one address, and a client that retransmits.

``python flood.py HOST PORT SOURCE RATE SECONDS`` sends attribute-less Refresh requests (20
bytes, the worst amplification a 401 can give) with fresh transaction ids, round-robin from
16 sockets bound to SOURCE (so that every worker process of the server gets its share: the
kernel hashes each 4-tuple to one), at RATE per second for SECONDS, reads whatever comes back
on those sockets, and prints one JSON line: requests and bytes sent, answers and bytes
received. Run as a separate process so that the flood does not share the test's GIL.

:class:`RetransmittingClient` is a TURN client over UDP that retransmits as RFC 8489 §6.2.1
says (RTO 0.5 s, doubled each time, 7 transmissions), from an address of the test's choice.
"""

from __future__ import annotations

import json
import os
import select
import socket
import sys
import time
from dataclasses import dataclass, field

SOCKETS = 16


def flood(host: str, port: int, source: str, rate: float, seconds: float) -> dict[str, int]:
    sockets = []
    for _ in range(SOCKETS):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((source, 0))
        sock.setblocking(False)
        sockets.append(sock)
    sent = sent_bytes = received = received_bytes = 0
    start = time.monotonic()
    end = start + seconds
    header = (0x0004).to_bytes(2, "big") + bytes(2) + (0x2112A442).to_bytes(4, "big")

    def drain(timeout: float) -> None:
        nonlocal received, received_bytes
        readable, _, _ = select.select(sockets, [], [], timeout)
        for sock in readable:
            while True:
                try:
                    data = sock.recv(2048)
                except BlockingIOError:
                    break
                received += 1
                received_bytes += len(data)

    while (now := time.monotonic()) < end:
        due = int((now - start) * rate)
        while sent < due:
            request = header + os.urandom(12)
            try:
                sockets[sent % SOCKETS].sendto(request, (host, port))
            except BlockingIOError:
                pass
            sent += 1
            sent_bytes += len(request)
        drain(0.001)
    settle = time.monotonic() + 1.0
    while time.monotonic() < settle:
        drain(0.05)
    for sock in sockets:
        sock.close()
    return {
        "sent": sent,
        "sent_bytes": sent_bytes,
        "received": received,
        "received_bytes": received_bytes,
    }


@dataclass
class RetransmittingClient:
    """Allocate over UDP with the long-term credential mechanism, retransmitting (RFC 8489)."""

    server: tuple[str, int]
    source: tuple[str, int]
    username: str
    password: str
    realm: str = "tsunagu"
    transmissions: list[float] = field(default_factory=list)

    def _transaction(self, build: object, deadline: float) -> tuple[object, float]:
        from tsunagu.stun import parse_message

        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(self.source)
        try:
            request, txid = build()  # type: ignore[operator]
            rto = 0.5
            started = time.monotonic()
            for _ in range(7):
                self.transmissions.append(time.monotonic() - started)
                sock.sendto(request, self.server)
                wait_until = min(time.monotonic() + rto, deadline)
                while (left := wait_until - time.monotonic()) > 0:
                    sock.settimeout(left)
                    try:
                        data = sock.recv(2048)
                    except TimeoutError:
                        break
                    message = parse_message(data)
                    if message.transaction_id == txid:
                        return message, time.monotonic() - started
                rto *= 2
                if time.monotonic() >= deadline:
                    break
            raise TimeoutError(f"no answer after {len(self.transmissions)} transmissions")
        finally:
            sock.close()

    def allocate(self, timeout: float) -> tuple[float, float]:
        """Allocate; return the seconds until the 401 came and until the allocation did."""
        from tsunagu.stun import (
            PASSWORD_ALGORITHM_MD5,
            TRANSPORT_UDP,
            ErrorCode,
            MessageClass,
            Method,
            Nonce,
            Realm,
            RequestedTransport,
            Username,
            encode_message,
        )
        from tsunagu.turn import long_term_key

        deadline = time.monotonic() + timeout

        def plain() -> tuple[bytes, bytes]:
            txid = os.urandom(12)
            message = encode_message(
                Method.ALLOCATE,
                MessageClass.REQUEST,
                txid,
                [RequestedTransport(TRANSPORT_UDP)],
            )
            return message, txid

        challenge, to_401 = self._transaction(plain, deadline)
        error = challenge.get(ErrorCode)  # type: ignore[attr-defined]
        assert error is not None and error.code == 401, challenge
        nonce = challenge.get(Nonce).value  # type: ignore[attr-defined]
        realm = challenge.get(Realm).value  # type: ignore[attr-defined]
        key = long_term_key(self.username, realm, self.password, PASSWORD_ALGORITHM_MD5)

        def signed() -> tuple[bytes, bytes]:
            txid = os.urandom(12)
            message = encode_message(
                Method.ALLOCATE,
                MessageClass.REQUEST,
                txid,
                [
                    RequestedTransport(TRANSPORT_UDP),
                    Username(self.username),
                    Realm(realm),
                    Nonce(nonce),
                ],
                integrity_key=key,
                fingerprint=True,
            )
            return message, txid

        started = time.monotonic()
        answer, _ = self._transaction(signed, deadline)
        assert answer.message_class is MessageClass.SUCCESS, answer  # type: ignore[attr-defined]
        return to_401, to_401 + (time.monotonic() - started)


if __name__ == "__main__":
    host, port, source, rate, seconds = sys.argv[1:6]
    result = flood(host, int(port), source, float(rate), float(seconds))
    sys.stdout.write(json.dumps(result) + "\n")
