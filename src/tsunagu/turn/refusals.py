"""What was refused, why and to whom: the causes the operator's log names.

Where a request is refused, the core knows why: the integrity check failed for a user it
does not know, a peer lies in a denied range, a quota is full. It raises the error with a
:class:`Refusal` (one of the causes below, the user, and the facts an operator needs), and
:meth:`TurnServer._error <tsunagu.turn.server.TurnServer>` adds it to a
:class:`RefusalTally`. The transport records what only it sees (a TLS handshake that
failed, bytes that are not STUN) in a tally of its own. The driver takes both every few
seconds and writes one line per cause and client (:mod:`tsunagu.transport.failures` has
the words); nothing is logged per packet.

The tally is a table of (cause, client) entries, each with its count, the user names and
the distinct facts seen (a few of each), bounded in size: beyond ``limit`` entries in one
interval, further refusals are counted per cause only, with the client refused most often.
Memory stays bounded whatever a flood sends, and so does the number of lines.

A client is its IP address, so that a client retrying from new ports is one entry; for a
stale nonce it is the IP address and port, since a stale nonce is routine once per client
(a nonce expires, the server restarts) and only one transport address getting it again and
again means the client keeps failing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ADDRESS_QUOTA",
    "CREDENTIAL_MISMATCH",
    "DATABASE_UNAVAILABLE",
    "DRAINING",
    "ENTRY_LIMIT",
    "EXPIRED_CREDENTIAL",
    "NO_RELAY_PORT",
    "PEER_DENIED",
    "RESERVATION_UNKNOWN",
    "REVOKED_CREDENTIAL",
    "STALE_NONCE",
    "TOO_MANY_PERMISSIONS",
    "TOTAL_QUOTA",
    "UNAUTHENTICATED_WITHHELD",
    "UNKNOWN_USER",
    "USER_QUOTA",
    "WRONG_PASSWORD",
    "WRONG_REALM",
    "Facts",
    "Refusal",
    "RefusalSummary",
    "RefusalTally",
]

# The causes the core decides. Each is a short fixed phrase: the ``cause`` field of a log line.
WRONG_PASSWORD = "wrong password"
UNKNOWN_USER = "unknown user"
EXPIRED_CREDENTIAL = "expired credential"
DATABASE_UNAVAILABLE = "user database unavailable"
REVOKED_CREDENTIAL = "revoked credential"
WRONG_REALM = "wrong realm"
CREDENTIAL_MISMATCH = "credential mismatch"
STALE_NONCE = "stale nonce"
PEER_DENIED = "peer denied"
USER_QUOTA = "user quota"
ADDRESS_QUOTA = "address quota"
TOTAL_QUOTA = "total quota"
NO_RELAY_PORT = "no relay port"
RESERVATION_UNKNOWN = "reservation unknown"
TOO_MANY_PERMISSIONS = "too many permissions"
DRAINING = "draining"
UNAUTHENTICATED_WITHHELD = "unauthenticated answer withheld"

Facts = tuple[tuple[str, Any], ...]
"""Named facts about one refusal, such as ``(("peer", "10.0.0.5:5000"), ("rule", ...))``."""

# (cause, client) entries per interval; beyond them refusals are counted per cause only.
ENTRY_LIMIT = 100
# User names and distinct facts kept per entry; the rest are counted as "others".
_NAMES_PER_ENTRY = 8
# Clients remembered per cause beyond the table, to name the one refused most often.
_OVERFLOW_CLIENTS = 1024


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request was refused, as the core decided it (carried by the error it raises)."""

    cause: str
    user: str = ""
    facts: Facts = ()


@dataclass(frozen=True, slots=True)
class RefusalSummary:
    """One (cause, client) entry, or one cause beyond the table, since the last take."""

    cause: str
    client: str
    """The client's address; empty for the refusals counted beyond the table's bound."""
    count: int
    first: float
    last: float
    """When the first and the last of them happened (the core's ``now``)."""
    users: tuple[tuple[str, int], ...] = ()
    """User names and counts, most frequent first (at most a few)."""
    details: tuple[tuple[Facts, int], ...] = ()
    """Distinct facts and counts, most frequent first (at most a few)."""
    others: int = 0
    """Refusals whose user name or facts were beyond the few kept."""
    clients: int = 1
    """Distinct clients: 1 for an entry; beyond the table, how many were remembered."""
    top: str = ""
    """Beyond the table: the client refused most often."""
    top_count: int = 0
    """Beyond the table: how often ``top`` was refused."""

    @property
    def user(self) -> str:
        """The user name refused most often ("" when none was named)."""
        return self.users[0][0] if self.users else ""

    @property
    def facts(self) -> dict[str, Any]:
        """The facts of the most frequent detail, as a dict."""
        return dict(self.details[0][0]) if self.details else {}


@dataclass(slots=True)
class _Entry:
    first: float
    last: float
    count: int = 0
    others: int = 0
    users: Counter[str] = field(default_factory=Counter)
    details: Counter[Facts] = field(default_factory=Counter)


@dataclass(slots=True)
class _Overflow:
    first: float
    last: float
    count: int = 0
    clients: Counter[str] = field(default_factory=Counter)


def _bounded_add(counter: Counter[Any], key: Any) -> bool:
    if key in counter or len(counter) < _NAMES_PER_ENTRY:
        counter[key] += 1
        return True
    return False


class RefusalTally:
    """Refusals by cause and client, read and reset with :meth:`take`; bounded in size."""

    __slots__ = ("_entries", "_limit", "_overflow", "total")

    def __init__(self, limit: int = ENTRY_LIMIT) -> None:
        self._limit = limit
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._overflow: dict[str, _Overflow] = {}
        self.total: Counter[str] = Counter()
        """Refusals by cause since start (never reset): for metrics and tests."""

    def add(
        self, cause: str, client: str, now: float, *, user: str = "", facts: Facts = ()
    ) -> None:
        """Count one refusal of ``client`` (an address) for ``cause``."""
        self.total[cause] += 1
        key = (cause, client)
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= self._limit:
                overflow = self._overflow.get(cause)
                if overflow is None:
                    overflow = self._overflow[cause] = _Overflow(now, now)
                overflow.count += 1
                overflow.last = now
                clients = overflow.clients
                if client in clients or len(clients) < _OVERFLOW_CLIENTS:
                    clients[client] += 1
                return
            entry = self._entries[key] = _Entry(now, now)
        entry.count += 1
        entry.last = now
        kept = True
        if user:
            kept = _bounded_add(entry.users, user)
        if facts:
            kept = _bounded_add(entry.details, facts) and kept
        if not kept:
            entry.others += 1

    def add_refusal(self, refusal: Refusal, ip: str, port: int, now: float) -> None:
        """:meth:`add` for a :class:`Refusal` of the client at ``ip``:``port``: counted by
        its IP address, or for a stale nonce by its transport address (module docstring)."""
        client = ip
        if refusal.cause == STALE_NONCE:
            client = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        self.add(refusal.cause, client, now, user=refusal.user, facts=refusal.facts)

    def __bool__(self) -> bool:
        return bool(self._entries) or bool(self._overflow)

    def take(self) -> list[RefusalSummary]:
        """Every entry (in the order they were first seen), then each cause's refusals
        beyond the table; the tally starts again empty."""
        out = [
            RefusalSummary(
                cause,
                client,
                entry.count,
                entry.first,
                entry.last,
                users=tuple(entry.users.most_common()),
                details=tuple(entry.details.most_common()),
                others=entry.others,
            )
            for (cause, client), entry in self._entries.items()
        ]
        for cause, overflow in self._overflow.items():
            top, top_count = overflow.clients.most_common(1)[0]
            out.append(
                RefusalSummary(
                    cause,
                    "",
                    overflow.count,
                    overflow.first,
                    overflow.last,
                    clients=len(overflow.clients),
                    top=top,
                    top_count=top_count,
                )
            )
        self._entries = {}
        self._overflow = {}
        return out
