"""Rooms, peers and the routing of signaling messages between them.

Pure: no I/O and no clock. The WebSocket server feeds :class:`Hub` with what happens
(a connection opened, a frame arrived, a connection ended, time passed) together with the
current time, and carries out the :class:`Send` and :class:`Close` actions it returns.

Rules enforced here:

- Who may enter is :class:`Access`: ``open`` (anyone; a room's first joiner may set a
  password for it), ``password`` (everyone needs the server's room password) or ``token``
  (a join token signed by the embedding product names the room and the person).
- Wrong passwords and tokens are limited per source address and per room, counted only
  when they fail, so that guessing stays slow while the people who know it get in.
- A room is created by its first join and removed when its last peer is gone. The first
  joiner's password (if any) becomes the room's password.
- TURN credentials are minted at join, not when a connection opens, for the person who
  joined, and renewed over the connection before they expire (``ice``), for as long as
  the peer stays.
- A room holds at most ``Limits.capacity`` peers.
- A message naming a peer is delivered to that peer only, and only inside the sender's room;
  any other target is refused with ``unknown-peer``, so rooms cannot see each other.
- With ``relay_only`` (``--ice-transport-policy relay``) only relayed ICE candidates are
  forwarded, in offers and answers and trickled: the policy holds even for a client that
  ignores it.
- With ``internal`` networks (``--internal-network``) only ICE candidates whose address lies
  inside them are forwarded (one whose address is a name, such as an mDNS ``.local`` one,
  cannot be checked and is dropped too), and a connection from an address outside them
  cannot join, check or resume: a call with internal people never gets a path that leaves
  the network. Refused joins are counted in :attr:`Hub.refusals` for the log.
- Every connection has a token bucket for all messages and a smaller one for chat. Each
  refused message adds to a misbehaviour score that decays with time; past
  ``Limits.strike_limit`` the connection is closed with 1008 (policy violation).
- A connection that ends without a close handshake (network loss, missed heartbeats) leaves
  its peer "away" for ``Limits.resume_grace`` seconds: messages for it are kept, and a new
  connection presenting the peer's id and token takes over without the others noticing more
  than an ICE restart. After the grace period the peer is announced as left.
- Every message delivered to a peer carries ``seq``, counting up per peer. The last
  ``Limits.replay_messages`` delivered (within ``Limits.replay_bytes``) are kept, because
  what was written to a connection just before it dropped may never have been read: a
  resume that names the last ``seq`` its client saw gets what came after it again, then what
  was kept while it was away.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from tsunagu.signaling import messages as m
from tsunagu.signaling.access import Access, Attempts, GrantLike, TokenBucket
from tsunagu.signaling.messages import ErrorCode, MessageError
from tsunagu.turn.policy import IPNetwork, inside
from tsunagu.turn.refusals import RefusalTally

__all__ = [
    "OUTSIDE_NETWORK",
    "Action",
    "Close",
    "Hub",
    "IceIssuer",
    "Limits",
    "POLICY_VIOLATION",
    "Send",
]

NORMAL_CLOSURE: Final = 1000
POLICY_VIOLATION: Final = 1008
OUTSIDE_NETWORK: Final = "outside network"
"""The cause :attr:`Hub.refusals` counts a join from outside the internal networks under."""

# How much each refusal adds to the misbehaviour score. A target that just left is a normal
# race (candidates still in flight), so it weighs little; a malformed message weighs a full point.
_STRIKE_WEIGHT: Final[Mapping[ErrorCode, float]] = {
    ErrorCode.UNKNOWN_PEER: 0.2,
    ErrorCode.ROOM_FULL: 0.5,
    ErrorCode.PASSWORD_REQUIRED: 0.5,
    ErrorCode.BAD_PASSWORD: 2.0,
    ErrorCode.TOKEN_REQUIRED: 0.5,
    ErrorCode.BAD_TOKEN: 2.0,
    ErrorCode.OUTSIDE_NETWORK: 0.5,
}


IceIssuer = Callable[[str, bool, float], tuple[dict[str, Any], float | None]]
"""``(user id, may use TURN, now) -> (ICE configuration for the page, seconds until it must
be renewed or None)``; the server binds it to the host the browser used."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Tunables of the hub; the defaults suit rooms of up to a dozen people."""

    capacity: int = 8
    rate: float = 40.0
    """Sustained messages per second per connection (trickle ICE is bursty, hence ``burst``)."""
    burst: float = 200.0
    chat_rate: float = 1.0
    chat_burst: float = 10.0
    strike_limit: float = 10.0
    strike_decay: float = 0.2
    """Misbehaviour points forgiven per second."""
    resume_grace: float = 5.0
    join_timeout: float = 10.0
    """A connection that has not joined by then is closed (1008): the page joins at once."""
    idle_timeout: float = 120.0
    """A joined connection that sends no frame at all for this long is dropped like a lost
    link (its seat may be resumed). The page pings every 8 s, but Chromium wakes the timers of
    a tab hidden for 5 minutes only once a minute, hence two minutes."""
    outbox_bytes: int = 192 * 1024
    """Bound on what is kept for an away peer; past it the peer is dropped."""
    replay_messages: int = 64
    """How many of the messages last delivered to a peer a resume can get again."""
    replay_bytes: int = 64 * 1024
    """Bound on the bytes of those messages."""
    held_bytes: int = 64 * 1024 * 1024
    """Bound on what the hub keeps for all peers together (replays and away peers'
    messages): a peer's own bounds times every WebSocket the server admits would be a
    gigabyte. Past it, the peers holding the most give it up, until a ``replay_bytes``
    below the bound: a replay is dropped (its peer can still resume, without one), an
    away peer whose waiting messages are more than its replay is dropped itself."""
    attempt_rate: float = 1 / 6
    """Failed passwords or tokens forgiven per second per source address (10 a minute)."""
    attempt_burst: float = 10.0
    room_attempt_rate: float = 0.5
    """Failed passwords forgiven per second per room, whatever the source addresses."""
    room_attempt_burst: float = 30.0


@dataclass(frozen=True, slots=True)
class Send:
    conn: int
    message: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Close:
    conn: int
    code: int
    reason: str


Action = Send | Close


@dataclass(slots=True, eq=False)
class _Peer:
    id: str
    name: str
    room: str
    token: str
    conn: int | None
    away_since: float | None = None
    outbox: list[dict[str, Any]] = field(default_factory=list)
    outbox_size: int = 0
    seq: int = 0
    """``seq`` of the last message delivered (or queued) to this peer."""
    sent: deque[tuple[int, dict[str, Any]]] = field(default_factory=deque)
    """The last messages written to its connection, for a resume to replay."""
    sent_size: int = 0
    user_id: str = ""
    """Who TURN credentials name: the join token's identity, else the peer id."""
    turn: bool = True
    renew_at: float | None = None
    """When its TURN credentials are to be renewed."""
    joined_at: float = 0.0
    address: str = ""


@dataclass(slots=True, eq=False)
class _Room:
    name: str
    password_digest: bytes | None
    peers: dict[str, _Peer] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class _Conn:
    id: int
    opened: float
    bucket: TokenBucket
    chat_bucket: TokenBucket
    extras: dict[str, Any]
    address: str = ""
    remote: str = ""
    """The connection's own IP address (``address`` is what limits count by: an IPv6 /64)."""
    ice: IceIssuer | None = None
    peer: _Peer | None = None
    score: float = 0.0
    score_stamp: float = 0.0
    closed: bool = False
    last_frame: float = 0.0
    """When the connection last sent a frame (or opened)."""


def _digest(password: str) -> bytes:
    return hashlib.sha256(password.encode()).digest()


def _display_name(granted: str | None, chosen: str) -> str:
    """The name a join token fixes, cleaned as a typed one would be; else the typed one."""
    if granted is None:
        return chosen
    name = " ".join("".join(ch for ch in granted if ch.isprintable()).split())
    return name[: m.MAX_NAME_CHARS] or chosen


def _size(message: dict[str, Any]) -> int:
    return 64 + sum(len(v) for v in message.values() if isinstance(v, str))


class Hub:
    """All rooms of one server and the connections that joined them."""

    def __init__(
        self,
        limits: Limits | None = None,
        *,
        new_token: Callable[[int], str],
        access: Access | None = None,
        relay_only: bool = False,
        internal: tuple[IPNetwork, ...] = (),
    ) -> None:
        """``new_token(n)`` returns a fresh unguessable URL-safe string from ``n`` random bytes
        (``secrets.token_urlsafe`` in the server); it names peers and their resume tokens."""
        self.limits = limits or Limits()
        self.access = access or Access()
        self.relay_only = relay_only
        """Forward only relayed ICE candidates, in SDP and trickled (``--ice-transport-policy
        relay``)."""
        self.internal = internal
        """The internal networks (``--internal-network``): candidates outside them are not
        forwarded, connections from outside them cannot join. Empty: no such rule."""
        self.refusals = RefusalTally()
        """Joins refused for where they came from, by address, until the server takes them."""
        self._new_token = new_token
        lim = self.limits
        self._now = 0.0
        self._audit: list[dict[str, Any]] = []
        self._attempts = Attempts(
            lim.attempt_rate, lim.attempt_burst, lim.room_attempt_rate, lim.room_attempt_burst
        )
        self._rooms: dict[str, _Room] = {}
        self._conns: dict[int, _Conn] = {}
        self._peers: dict[str, _Peer] = {}
        self.held = 0
        """Bytes of every peer's replay and outbox together (``Limits.held_bytes``)."""
        self._releasing = False
        # Plain counts since start, read by the metrics exporter.
        self.messages = 0
        """Frames received from connections."""
        self.joined = 0
        """Joins admitted (resumed seats included)."""
        self.refused: Counter[str] = Counter()
        """``error`` answers sent, by code (refused joins, malformed and rate-limited
        messages)."""

    # --- introspection (for tests, metrics and the admin side) -----------------------------

    def set_rules(self, access: Access, capacity: int) -> None:
        """Admit joins from now on by ``access`` and ``capacity`` (a reload). People in rooms
        stay, and so do their seats: a resume proves its seat with the seat's own token, not
        with the rule that admitted it. A room above a lowered capacity keeps its people and
        takes nobody new until it is below."""
        self.access = access
        self.limits = dataclasses.replace(self.limits, capacity=capacity)

    def room_names(self) -> list[str]:
        return sorted(self._rooms)

    def room_peers(self, room: str) -> list[tuple[str, str]]:
        """``(id, name)`` of every peer in ``room``, in join order; empty if no such room."""
        found = self._rooms.get(room)
        return [] if found is None else [(p.id, p.name) for p in found.peers.values()]

    def peer_of(self, conn: int) -> str | None:
        c = self._conns.get(conn)
        return None if c is None or c.peer is None else c.peer.id

    def is_away(self, peer_id: str) -> bool:
        peer = self._peers.get(peer_id)
        return peer is not None and peer.away_since is not None

    @property
    def connection_count(self) -> int:
        return len(self._conns)

    @property
    def people_count(self) -> int:
        """People holding a seat in a room (those briefly away included)."""
        return len(self._peers)

    # --- events ----------------------------------------------------------------------------

    def connect(
        self,
        conn: int,
        now: float,
        extras: Mapping[str, Any] | None = None,
        *,
        address: str = "",
        ice: IceIssuer | None = None,
        remote: str | None = None,
    ) -> None:
        """A WebSocket opened from ``address`` (the key its failed attempts are counted
        under); ``extras`` are merged into the ``joined`` it will receive, and ``ice`` mints
        the ICE configuration for whoever joins on it. ``remote`` is the connection's own IP
        address, which the internal networks are checked against (default: ``address``)."""
        lim = self.limits
        self._conns[conn] = _Conn(
            id=conn,
            opened=now,
            bucket=TokenBucket(lim.rate, lim.burst, now),
            chat_bucket=TokenBucket(lim.chat_rate, lim.chat_burst, now),
            extras=dict(extras or {}),
            address=address,
            remote=address if remote is None else remote,
            ice=ice,
            score_stamp=now,
            last_frame=now,
        )

    def take_audit(self) -> list[dict[str, Any]]:
        """The audit records since the last call: who joined which room and when they left,
        with the user id their TURN credentials carry (so that the TURN side's allocation
        records can be matched to a room and a call)."""
        records, self._audit = self._audit, []
        return records

    def receive(self, conn: int, data: str | bytes, now: float) -> list[Action]:
        """One frame arrived on ``conn``."""
        self._now = now
        c = self._conns.get(conn)
        if c is None or c.closed:
            return []
        c.last_frame = now
        self.messages += 1
        if not c.bucket.take(now):
            return self._refuse(
                c,
                MessageError(ErrorCode.RATE_LIMITED, "too many messages; slow down"),
                now,
            )
        try:
            msg = m.parse(data)
            return self._dispatch(c, msg, now)
        except MessageError as exc:
            return self._refuse(c, exc, now)

    def disconnect(self, conn: int, now: float, *, graceful: bool) -> list[Action]:
        """``conn`` ended. ``graceful`` means a close handshake (the user left on purpose)."""
        self._now = now
        c = self._conns.pop(conn, None)
        if c is None or c.peer is None or c.peer.conn != conn:
            return []
        peer = c.peer
        if graceful or c.closed:
            return self._remove(peer, "left")
        peer.conn = None
        peer.away_since = now
        return []

    def revoke_user(self, user_id: str, now: float) -> list[Action]:
        """The TURN credentials of ``user_id`` were revoked: take every peer with that user
        id out of its room and close its connection (an ``error`` first says why)."""
        self._now = now
        actions: list[Action] = []
        for peer in [p for p in self._peers.values() if p.user_id == user_id]:
            conn = peer.conn
            actions += self._remove(peer, "revoked")
            if conn is not None:
                actions.append(
                    Send(
                        conn, m.error(m.ErrorCode.REVOKED, "Your access to this call was revoked.")
                    )
                )
                actions.append(Close(conn, POLICY_VIOLATION, "revoked"))
        return actions

    def tick(self, now: float) -> list[Action]:
        """Expire away peers, connections that never joined and joined ones gone silent;
        call about once a second."""
        self._now = now
        actions: list[Action] = []
        grace = self.limits.resume_grace
        for peer in list(self._peers.values()):
            if peer.away_since is not None and now - peer.away_since >= grace:
                actions += self._remove(peer, "timeout")
        deadline = self.limits.join_timeout
        idle = self.limits.idle_timeout
        for conn in list(self._conns.values()):
            if conn.closed:
                continue
            if conn.peer is None and now - conn.opened >= deadline:
                conn.closed = True
                actions.append(Close(conn.id, POLICY_VIOLATION, "join timeout"))
            elif conn.peer is not None and now - conn.last_frame >= idle:
                # Treated as a lost link: the seat waits resume_grace for a new connection.
                peer, conn.peer, conn.closed = conn.peer, None, True
                if peer.conn == conn.id:
                    peer.conn = None
                    peer.away_since = now
                actions.append(Close(conn.id, NORMAL_CLOSURE, "idle timeout"))
        for peer in self._peers.values():
            if peer.renew_at is not None and peer.conn is not None and now >= peer.renew_at:
                c = self._conns.get(peer.conn)
                if c is not None and not c.closed:
                    actions.append(Send(c.id, m.ice(self._issue(c, peer, now))))
        return actions

    # --- internals -------------------------------------------------------------------------

    def _refuse(self, c: _Conn, exc: MessageError, now: float) -> list[Action]:
        self.refused[str(exc.code)] += 1
        actions: list[Action] = [
            Send(c.id, m.error(exc.code, exc.message, ref=exc.ref, field=exc.field))
        ]
        decay = max(0.0, now - c.score_stamp) * self.limits.strike_decay
        c.score = max(0.0, c.score - decay) + _STRIKE_WEIGHT.get(exc.code, 1.0)
        c.score_stamp = max(c.score_stamp, now)
        if c.score >= self.limits.strike_limit:
            actions += self._kick(c, f"policy violation: {exc.code}")
        return actions

    def _kick(self, c: _Conn, reason: str) -> list[Action]:
        c.closed = True
        actions: list[Action] = []
        if c.peer is not None and c.peer.conn == c.id:
            actions += self._remove(c.peer, "left")
        actions.append(Close(c.id, POLICY_VIOLATION, reason))
        return actions

    def _dispatch(self, c: _Conn, msg: m.ClientMessage, now: float) -> list[Action]:
        if isinstance(msg, m.Join):
            return self._join(c, msg, now)
        if isinstance(msg, m.Ping):
            return [Send(c.id, m.pong())]
        peer = c.peer
        kind = type(msg).__name__.lower()
        if peer is None:
            raise MessageError(ErrorCode.NOT_JOINED, f"{kind}: join a room first", ref=kind)
        if msg.room is not None and msg.room != peer.room:
            raise MessageError(
                ErrorCode.WRONG_ROOM,
                f"{kind}: this connection is in room {peer.room!r}, not {msg.room!r}",
                ref=kind,
                field="room",
            )
        if isinstance(msg, m.Leave):
            c.closed = True
            return self._remove(peer, "left") + [Close(c.id, NORMAL_CLOSURE, "left")]
        if isinstance(msg, m.Chat):
            return self._chat(c, peer, msg, now)
        target = self._target(peer, msg.to, kind)
        if self.relay_only or self.internal:
            # The server's policy, not the page's: a client that ignores it still learns no
            # address of the other side but those the policy lets through.
            kept = m.keep_candidates(msg, self._forwardable)
            if kept is None:
                return []
            msg = kept
        return self._deliver(target, m.relay(msg, peer.id))

    def _forwardable(self, line: str) -> bool:
        """Whether an ICE candidate line may reach the other side under the policies."""
        if self.relay_only and m.candidate_type(line) != "relay":
            return False
        if self.internal:
            # A name (mDNS .local, a host name) cannot be checked here: fail closed.
            address = m.candidate_address(line)
            return address is not None and inside(address, self.internal)
        return True

    def _target(self, peer: _Peer, to: str, kind: str) -> _Peer:
        room = self._rooms[peer.room]
        target = room.peers.get(to)
        if target is None or target is peer:
            # Same answer whether the id exists elsewhere or nowhere: rooms stay opaque.
            raise MessageError(
                ErrorCode.UNKNOWN_PEER, f"{kind}: no peer {to!r} in this room", ref=kind, field="to"
            )
        return target

    def _chat(self, c: _Conn, peer: _Peer, msg: m.Chat, now: float) -> list[Action]:
        if not c.chat_bucket.take(now):
            raise MessageError(
                ErrorCode.RATE_LIMITED, "chat: too many chat messages; slow down", ref="chat"
            )
        if msg.to is not None:
            target = self._target(peer, msg.to, "chat")
            out = m.chat(peer.id, peer.name, msg.text, now, private=True)
            return self._deliver(target, out) + [Send(c.id, out)]
        out = m.chat(peer.id, peer.name, msg.text, now, private=False)
        actions: list[Action] = []
        for other in list(self._rooms[peer.room].peers.values()):
            actions += self._deliver(other, out)
        return actions

    def _deliver(self, peer: _Peer, message: dict[str, Any]) -> list[Action]:
        if self._peers.get(peer.id) is not peer:
            return []  # removed while a message for the room went round
        peer.seq += 1
        message = {**message, "seq": peer.seq}
        if peer.conn is not None:
            self._keep_sent(peer, message)
            return [Send(peer.conn, message), *self._release_held()]
        size = _size(message)
        peer.outbox.append(message)
        peer.outbox_size += size
        self.held += size
        if peer.outbox_size > self.limits.outbox_bytes:
            return self._remove(peer, "timeout")
        return self._release_held()

    def _keep_sent(self, peer: _Peer, message: dict[str, Any]) -> None:
        sent = peer.sent
        sent.append((message["seq"], message))
        size = _size(message)
        peer.sent_size += size
        self.held += size
        limits = self.limits
        while sent and (len(sent) > limits.replay_messages or peer.sent_size > limits.replay_bytes):
            size = _size(sent.popleft()[1])
            peer.sent_size -= size
            self.held -= size

    def _drop_replay(self, peer: _Peer) -> None:
        self.held -= peer.sent_size
        peer.sent.clear()
        peer.sent_size = 0

    def _drop_outbox(self, peer: _Peer) -> None:
        self.held -= peer.outbox_size
        peer.outbox = []
        peer.outbox_size = 0

    def _release_held(self) -> list[Action]:
        """Bring :attr:`held` under ``Limits.held_bytes`` (see there). One pass over the
        peers each time, and only once the hub is a whole replay over its bound."""
        limits = self.limits
        if self.held <= limits.held_bytes or self._releasing:
            return []
        # Removing a peer tells its room, which delivers again: those deliveries leave the
        # releasing to this loop rather than recurse.
        self._releasing = True
        try:
            actions: list[Action] = []
            target = max(0, limits.held_bytes - limits.replay_bytes)
            while self.held > target:
                # The largest holding first: it is at least the average, so a few steps do.
                peer = max(
                    self._peers.values(),
                    key=lambda p: max(p.outbox_size, p.sent_size),
                    default=None,
                )
                if peer is None or max(peer.outbox_size, peer.sent_size) == 0:
                    break
                if peer.outbox_size > peer.sent_size:
                    actions += self._remove(peer, "timeout")
                else:
                    self._drop_replay(peer)
            return actions
        finally:
            self._releasing = False

    def _join(self, c: _Conn, msg: m.Join, now: float) -> list[Action]:
        if c.peer is not None:
            raise MessageError(
                ErrorCode.ALREADY_JOINED,
                f"join: this connection already joined room {c.peer.room!r}",
                ref="join",
            )
        if self.internal and not inside(c.remote, self.internal):
            # Before any secret is checked or any seat taken: whoever is outside gets no
            # credentials and learns nothing of the room.
            self.refusals.add(OUTSIDE_NETWORK, c.remote, now)
            raise MessageError(
                ErrorCode.OUTSIDE_NETWORK,
                "join: this server keeps calls inside its internal network, and this"
                f" connection comes from {c.remote}, outside it",
                ref="join",
            )
        if msg.check:
            return self._check(c, msg, now)
        if msg.resume is not None:
            resumed = self._resume(c, msg, now)
            if resumed is not None:
                return resumed
        grant = self._admit(c, msg, now)
        room = self._rooms.get(msg.room)
        if room is None:
            # Only in open rooms does the first joiner's password lock the room.
            own = msg.password if self.access.mode == "open" else None
            room = _Room(msg.room, None if own is None else _digest(own))
        elif room.password_digest is not None:
            self._check_password(
                c, room, room.password_digest, msg.password, now, f"room {msg.room!r}"
            )
        if len(room.peers) >= self.limits.capacity:
            raise MessageError(
                ErrorCode.ROOM_FULL,
                f"join: room {msg.room!r} is full ({self.limits.capacity} people)",
                ref="join",
            )
        peer_id = self._fresh_id()
        name = msg.name if grant is None else _display_name(grant.name, msg.name)
        peer = _Peer(peer_id, name, msg.room, self._new_token(24), c.id)
        peer.user_id = peer_id if grant is None else grant.identity
        peer.turn = True if grant is None else grant.turn
        peer.joined_at = now
        peer.address = c.address
        self._audit.append(
            {
                "event": "peer-joined",
                "room": msg.room,
                "peer": peer_id,
                "user": peer.user_id,
                "name": peer.name,
                "address": c.address,
            }
        )
        others = list(room.peers.values())
        self._rooms[room.name] = room
        room.peers[peer_id] = peer
        self._peers[peer_id] = peer
        c.peer = peer
        actions: list[Action] = [Send(c.id, self._joined(c, peer, room, now, resumed=False))]
        announce = m.peer_joined(peer_id, peer.name)
        for other in others:
            actions += self._deliver(other, announce)
        return actions

    def _resume(self, c: _Conn, msg: m.Join, now: float) -> list[Action] | None:
        assert msg.resume is not None
        peer = self._peers.get(msg.resume.id)
        if (
            peer is None
            or peer.room != msg.room
            or not hmac.compare_digest(peer.token.encode(), msg.resume.token.encode())
        ):
            return None
        actions: list[Action] = []
        if peer.conn is not None:
            # The client gave up on a connection the server still thinks is alive.
            old = self._conns.get(peer.conn)
            if old is not None:
                old.closed = True
                old.peer = None
            actions.append(Close(peer.conn, NORMAL_CLOSURE, "replaced by a new connection"))
        peer.conn = c.id
        peer.away_since = None
        c.peer = peer
        room = self._rooms[peer.room]
        actions.append(Send(c.id, self._joined(c, peer, room, now, resumed=True)))
        seen = msg.resume.seq
        if seen is not None:
            # Written to the old connection, perhaps never read: again, in order.
            actions += [Send(c.id, sent) for seq, sent in peer.sent if seq > seen]
        queued, peer.outbox = peer.outbox, []
        self.held -= peer.outbox_size
        peer.outbox_size = 0
        for message in queued:
            self._keep_sent(peer, message)
            actions.append(Send(c.id, message))
        actions += self._release_held()
        return actions

    def _check(self, c: _Conn, msg: m.Join, now: float) -> list[Action]:
        """Whoever could enter the room gets the ICE servers a member would, and no seat:
        the connectivity test checks the very paths a call would use."""
        grant = self._admit(c, msg, now)
        room = self._rooms.get(msg.room)
        if room is not None and room.password_digest is not None:
            self._check_password(
                c, room, room.password_digest, msg.password, now, f"room {msg.room!r}"
            )
        extras: dict[str, Any] = {}
        if c.ice is not None:
            user_id = f"check-{self._new_token(6)}" if grant is None else grant.identity
            extras, _ = c.ice(user_id, True if grant is None else grant.turn, now)
        c.closed = True
        return [
            Send(c.id, m.checked(msg.room, extras)),
            Close(c.id, NORMAL_CLOSURE, "checked"),
        ]

    def _admit(self, c: _Conn, msg: m.Join, now: float) -> GrantLike | None:
        """Check the server's access rule for a new peer; its grant in ``token`` mode."""
        access = self.access
        if access.mode == "password":
            assert access.password_digest is not None
            self._check_password(c, None, access.password_digest, msg.password, now, "this server")
            return None
        if access.mode != "token":
            return None
        assert access.tokens is not None
        if msg.token is None:
            raise MessageError(
                ErrorCode.TOKEN_REQUIRED,
                "join: this server admits people with an invitation link only (a join token)",
                ref="join",
                field="token",
            )
        self._throttle(c, None, now)
        try:
            grant = access.tokens.verify(msg.token, now)
        except ValueError as exc:
            self._failed(c, None, now)
            raise MessageError(
                ErrorCode.BAD_TOKEN, f"join: {exc}", ref="join", field="token"
            ) from None
        if m.normalize_room(grant.room) != msg.room:
            self._failed(c, None, now)
            raise MessageError(
                ErrorCode.BAD_TOKEN,
                f"join: the join token is for another room, not {msg.room!r}",
                ref="join",
                field="token",
            )
        return grant

    def _check_password(
        self,
        c: _Conn,
        room: _Room | None,
        digest: bytes,
        password: str | None,
        now: float,
        what: str,
    ) -> None:
        if password is None:
            raise MessageError(
                ErrorCode.PASSWORD_REQUIRED,
                f"join: {what} needs a password",
                ref="join",
                field="password",
            )
        self._throttle(c, room, now)
        if not hmac.compare_digest(digest, _digest(password)):
            self._failed(c, room, now)
            raise MessageError(
                ErrorCode.BAD_PASSWORD,
                f"join: wrong password for {what}",
                ref="join",
                field="password",
            )

    def _throttle(self, c: _Conn, room: _Room | None, now: float) -> None:
        """Refuse to even check a secret once its source or its room has failed too often."""
        wait = self._attempts.wait(c.address, None if room is None else room.name, now)
        if wait is not None:
            raise MessageError(
                ErrorCode.RATE_LIMITED,
                f"join: too many wrong attempts; try again in {wait} s",
                ref="join",
            )

    def _failed(self, c: _Conn, room: _Room | None, now: float) -> None:
        self._attempts.failed(c.address, None if room is None else room.name, now)

    def _issue(self, c: _Conn, peer: _Peer, now: float) -> dict[str, Any]:
        """Mint the peer's ICE configuration on its current connection."""
        if c.ice is None:
            peer.renew_at = None
            return {}
        extras, renew = c.ice(peer.user_id, peer.turn, now)
        peer.renew_at = None if renew is None else now + renew
        return extras

    def _joined(
        self, c: _Conn, peer: _Peer, room: _Room, now: float, *, resumed: bool
    ) -> dict[str, Any]:
        self.joined += 1
        return m.joined(
            room=room.name,
            peer_id=peer.id,
            token=peer.token,
            name=peer.name,
            peers=[m.peer_info(p.id, p.name) for p in room.peers.values() if p is not peer],
            capacity=self.limits.capacity,
            resumed=resumed,
            extras={**c.extras, **self._issue(c, peer, now)},
        )

    def _fresh_id(self) -> str:
        for _ in range(100):
            candidate = self._new_token(6)
            if candidate not in self._peers and m.is_peer_id(candidate):
                return candidate
        raise RuntimeError("cannot draw a fresh peer id")

    def _remove(self, peer: _Peer, reason: str) -> list[Action]:
        """Take ``peer`` out of its room and tell the others; drop the room when empty."""
        if self._peers.pop(peer.id, None) is None:
            return []
        self._audit.append(
            {
                "event": "peer-left",
                "room": peer.room,
                "peer": peer.id,
                "user": peer.user_id,
                "reason": reason,
                "duration": round(max(0.0, self._now - peer.joined_at), 3),
            }
        )
        if peer.conn is not None:
            c = self._conns.get(peer.conn)
            if c is not None and c.peer is peer:
                c.peer = None
                c.closed = True
        peer.conn = None
        self._drop_outbox(peer)
        self._drop_replay(peer)
        room = self._rooms.get(peer.room)
        if room is None:
            return []
        room.peers.pop(peer.id, None)
        if not room.peers:
            del self._rooms[room.name]
            return []
        actions: list[Action] = []
        notice = m.peer_left(peer.id, reason)
        for other in list(room.peers.values()):
            actions += self._deliver(other, notice)
        return actions
