"""How many unauthenticated answers one source address gets over UDP, and how large.

Why there is a limit
--------------------
Anyone can send a TURN request without credentials and get an answer (a 401 with REALM and
NONCE, a 438, a 400, and with NAT behaviour discovery a Binding response carrying
MAPPED-ADDRESS, RESPONSE-ORIGIN and OTHER-ADDRESS besides XOR-MAPPED-ADDRESS). Over UDP the
source address can be forged, so the answer can be aimed at a victim, and a 401 (about 108
bytes with the default realm) is larger than the request that draws it (20 bytes at the
least, 28 for the smallest valid Allocate): a reflector with an amplification of up to 5.4.
Over TCP and TLS the handshake proves the address, so streams are never limited here.

What the old limit got wrong
----------------------------
A token bucket of answers per source IP (20 per second, burst 40), with everything beyond it
dropped, bounded the amplification but

1. let a spoofer deny TURN over UDP to any chosen address: 200 forged requests per second
   from the victim's IP used up its bucket, and the victim's own Allocate got no 401;
2. slowed honest users behind one NAT: 100 clients starting together from one address
   waited for their 401s in turn (24.5 s for a run that takes 16.4 s unlimited).

The design
----------
Two budgets per source address (an IPv4 address, or an IPv6 /64, as the quotas count):

- **A generous budget of full answers** (``rate`` per second, a burst of ``2 * rate``; 200
  and 400 by default). It is sized for a whole office behind one NAT starting its calls at
  once; what it lets a spoofer reflect at one victim is ``rate`` answers of about 110 bytes,
  some 22 KB/s per worker process, with no more gain than that.
- **Beyond the budget, no amplification at all**: an answer is sent only once the same
  request (same client address and port, same transaction id) has been received often
  enough that the bytes received for it are at least the size of the answer. A real
  client retransmits its request (RFC 8489 §6.2.1: after 0.5, 1.5, 3.5 s...), so a 28-byte
  Allocate gets its 108-byte 401 on the fourth transmission, 3.5 s after the first, however
  hard the address is being flooded. A flood gains nothing: every answer beyond the budget
  is paid for by at least as many bytes received, so what leaves towards any address is at
  most the budget plus what was sent to the server in that address's name.

A spoofer cannot stop this: it cannot guess the victim's transaction id (96 random bits),
so it cannot make the server forget or answer the victim's request; it can only send its
own requests, and they are answered at a ratio of one byte out per byte in. A request whose
answer is small enough (a large request; a plain Binding, 12 bytes more than its request
and not limited at all) is answered at once.

RFC 5780 answers
----------------
Where NAT behaviour discovery runs (:mod:`.discovery`), every Binding response goes through
the same budget: it is 68 bytes to a 20-byte request. One that leaves from the server's
other address (CHANGE-REQUEST) still goes to the requester, and is treated as any other. One
sent to another port of the requester's IP (RESPONSE-PORT) is ``redirected``: it is sent
within the budget only, never paid for by retransmissions, which come from another port
than the one it goes to; and it carries no PADDING (the server refuses both together).
Whatever a client asks, what leaves towards one address stays within the budget plus what
was sent to the server in that address's name.

Alternatives weighed: a smaller 401 (a short nonce, no PASSWORD-ALGORITHMS, no reason
phrase) still cannot be made as small as a 20-byte request, and needs two nonce formats;
keeping the 401 within the request's size for everyone would break every client, whose
first Allocate is 28-40 bytes. A stateless cookie exchange before the 401 adds a round
trip for every client and exists in no TURN client. Per-(address, port) budgets would let a
spoofer that varies the port reflect without limit.

State is bounded: at most ``_BUCKET_LIMIT`` addresses (the table is cleared when full, which
only ever gives budgets back) and ``_PENDING_LIMIT`` pending requests, the oldest forgotten
first and none kept longer than ``_PENDING_LIFETIME``.
"""

from __future__ import annotations

from .quotas import address_key

__all__ = ["UnauthenticatedLimiter"]

_BUCKET_LIMIT = 100_000
_PENDING_LIMIT = 65_536
# RFC 8489's default transaction lasts 39.5 s: the last of 7 transmissions, plus 16 s.
_PENDING_LIFETIME = 40.0


class UnauthenticatedLimiter:
    """Decides whether an unauthenticated UDP answer may be sent (see the module docstring)."""

    __slots__ = ("_buckets", "_pending", "_rate", "answered_over_budget", "withheld")

    def __init__(self, rate: float) -> None:
        self._rate = rate
        # address key -> (tokens, last update)
        self._buckets: dict[str, tuple[float, float]] = {}
        # (ip, port, transaction id) -> (bytes received for it, first seen); insertion order
        # is age order
        self._pending: dict[tuple[str, int, bytes], tuple[int, float]] = {}
        self.withheld = 0
        """Answers not sent (yet): the request had not paid for its answer."""
        self.answered_over_budget = 0
        """Answers sent beyond the budget, each paid for by the bytes of its request."""

    def retune(self, rate: float) -> None:
        """Grant ``rate`` answers per second from now on; each address keeps what it has
        (up to the new burst, at its next request)."""
        self._rate = rate

    def allow(
        self,
        ip: str,
        port: int,
        transaction_id: bytes,
        request_size: int,
        answer_size: int,
        now: float,
        *,
        redirected: bool = False,
    ) -> bool:
        """True if the answer of ``answer_size`` bytes to this request may be sent now.

        A ``redirected`` answer (to another port than the request came from) is sent
        within the budget only.
        """
        key = address_key(ip)
        rate = self._rate
        buckets = self._buckets
        tokens, last = buckets.get(key, (2 * rate, now))
        tokens = min(2 * rate, tokens + max(0.0, now - last) * rate)
        if tokens >= 1:
            if len(buckets) >= _BUCKET_LIMIT and key not in buckets:
                buckets.clear()
            buckets[key] = (tokens - 1, now)
            return True
        buckets[key] = (tokens, now)
        if redirected:
            self.withheld += 1
            return False
        if request_size >= answer_size:
            self.answered_over_budget += 1
            return True
        pending = self._pending
        self._expire(now)
        entry = (ip, port, transaction_id)
        received, first = pending.pop(entry, (0, now))
        received += request_size
        if received >= answer_size:
            self.answered_over_budget += 1
            return True
        if len(pending) >= _PENDING_LIMIT:
            del pending[next(iter(pending))]
        pending[entry] = (received, first)
        self.withheld += 1
        return False

    def _expire(self, now: float) -> None:
        pending = self._pending
        while pending:
            oldest = next(iter(pending))
            if pending[oldest][1] + _PENDING_LIFETIME > now:
                break
            del pending[oldest]

    @property
    def tracked(self) -> int:
        """Addresses and pending requests held in memory."""
        return len(self._buckets) + len(self._pending)
