"""An in-memory harness for the sans-I/O TURN core.

Nothing here opens a socket or reads a clock: a :class:`FakeBinder` hands out
:class:`FakeRelay` objects and records what was bound and released, randomness is a seeded
:class:`random.Random`, and every call takes an explicit ``now``. :class:`Client` speaks the
client side of the long-term credential mechanism (RFC 8489 §9.2.3): it answers a 401 with
the REALM and NONCE it got, can pick MESSAGE-INTEGRITY-SHA256 through PASSWORD-ALGORITHM,
can send USERHASH instead of USERNAME, and checks the integrity of every authenticated
answer with its own key.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tsunagu.auth.store import StaticCredentialStore
from tsunagu.stun import (
    PASSWORD_ALGORITHM_MD5,
    PASSWORD_ALGORITHM_SHA256,
    TRANSPORT_UDP,
    Address,
    Attribute,
    ErrorCode,
    Message,
    MessageClass,
    Method,
    Nonce,
    PasswordAlgorithm,
    PasswordAlgorithms,
    Realm,
    RequestedTransport,
    Userhash,
    Username,
    encode_message,
    parse_message,
)
from tsunagu.turn import (
    Event,
    FiveTuple,
    Forward,
    TurnServer,
    TurnSettings,
    long_term_key,
)

NOW = 1_700_000_000.0
REALM = "tsunagu"
SERVER_IP = "192.0.2.1"
SERVER_IP6 = "2001:db8::1"
SERVER = (SERVER_IP, 3478)
CLIENT = ("198.51.100.7", 50000)
# Globally routable peers: the default policy denies private and documentation ranges.
PEER = ("8.8.8.8", 4000)
PEER2 = ("1.1.1.1", 5000)
PEER6 = ("2001:4860:4860::8888", 6000)
USERS = (("alice", "alice-pw"), ("bob", "bob-pw"))


_client_numbers = itertools.count(1)


def udp(client: Address = CLIENT, server: Address = SERVER, protocol: str = "udp") -> FiveTuple:
    return FiveTuple(protocol, client, server)


@dataclass(frozen=True)
class FakeRelay:
    ip: str
    port: int
    dont_fragment: bool = False

    @property
    def address(self) -> Address:
        return (self.ip, self.port)


@dataclass
class FakeBinder:
    """Binds nothing for real. ``taken`` holds (ip, port) pairs another process owns."""

    taken: set[tuple[str, int]] = field(default_factory=set)
    bound: dict[tuple[str, int], FakeRelay] = field(default_factory=dict)
    binds: list[FakeRelay] = field(default_factory=list)
    releases: list[FakeRelay] = field(default_factory=list)
    refused: list[tuple[str, int]] = field(default_factory=list)

    def bind(self, ip: str, port: int, *, dont_fragment: bool) -> FakeRelay | None:
        key = (ip, port)
        if key in self.taken or key in self.bound:
            self.refused.append(key)
            return None
        relay = FakeRelay(ip, port, dont_fragment)
        self.bound[key] = relay
        self.binds.append(relay)
        return relay

    def release(self, relay: Any) -> None:
        assert self.bound.pop((relay.ip, relay.port)) is relay, "released twice or unknown"
        self.releases.append(relay)


def make_server(
    settings: TurnSettings | None = None,
    *,
    users: Sequence[tuple[str, str]] = USERS,
    secrets: Sequence[str] = (),
    check_expiry_on_existing: bool = True,
    binder: FakeBinder | None = None,
    seed: int = 7,
) -> tuple[TurnServer, FakeBinder]:
    settings = settings or TurnSettings()
    store = StaticCredentialStore(
        settings.realm, users, secrets, check_expiry_on_existing=check_expiry_on_existing
    )
    binder = binder if binder is not None else FakeBinder()
    return TurnServer(settings, store, binder, random.Random(seed)), binder


def events(server: TurnServer) -> list[Event]:
    found: list[Event] = []
    while (event := server.next_event()) is not None:
        found.append(event)
    return found


def error_code(message: Message) -> int | None:
    attribute = message.get(ErrorCode)
    return attribute.code if attribute is not None else None


def stun(
    method: int,
    attributes: Sequence[Attribute] = (),
    *,
    txid: bytes | None = None,
    klass: MessageClass = MessageClass.REQUEST,
    fingerprint: bool = False,
    rng: random.Random | None = None,
) -> bytes:
    """An unauthenticated message."""
    txid = txid if txid is not None else (rng or random.Random()).randbytes(12)
    return encode_message(method, klass, txid, list(attributes), fingerprint=fingerprint)


def channel_data(number: int, payload: bytes) -> bytes:
    return number.to_bytes(2, "big") + len(payload).to_bytes(2, "big") + payload


class Client:
    """A TURN client on one 5-tuple, talking to ``server`` in memory.

    ``algorithm`` None is the RFC 5389 client (MD5 key, no PASSWORD-ALGORITHM); MD5 or
    SHA256 makes it an RFC 8489 client that echoes PASSWORD-ALGORITHMS and names its
    choice. ``userhash`` sends USERHASH instead of USERNAME.
    """

    def __init__(
        self,
        server: TurnServer,
        five_tuple: FiveTuple | None = None,
        username: str = "alice",
        password: str = "alice-pw",
        *,
        realm: str = REALM,
        algorithm: int | None = None,
        userhash: bool = False,
        seed: int | None = None,
    ) -> None:
        self.server = server
        self.five_tuple = five_tuple or udp()
        self.username = username
        self.password = password
        self.realm = realm
        self.algorithm = algorithm
        self.userhash = userhash
        if seed is None:  # distinct clients must not share transaction ids
            seed = next(_client_numbers)
        self.rng = random.Random(seed)
        self.nonce: str | None = None
        self.offered: PasswordAlgorithms | None = None
        self.last_txid = b""
        self.last_request = b""

    @property
    def key(self) -> bytes:
        algorithm = self.algorithm or PASSWORD_ALGORITHM_MD5
        return long_term_key(self.username, self.realm, self.password, algorithm)

    def txid(self) -> bytes:
        return self.rng.randbytes(12)

    def build(
        self,
        method: int,
        attributes: Sequence[Attribute] = (),
        *,
        txid: bytes | None = None,
        fingerprint: bool = False,
        nonce: str | None = None,
    ) -> bytes:
        """A request with credentials (once a nonce is known), ``attributes`` first."""
        txid = txid if txid is not None else self.txid()
        nonce = nonce if nonce is not None else self.nonce
        if nonce is None:
            return stun(method, attributes, txid=txid, fingerprint=fingerprint)
        attrs = list(attributes)
        if self.userhash:
            digest = hashlib.sha256(f"{self.username}:{self.realm}".encode()).digest()
            attrs.append(Userhash(digest))
        else:
            attrs.append(Username(self.username))
        attrs += [Realm(self.realm), Nonce(nonce)]
        sha256 = self.algorithm == PASSWORD_ALGORITHM_SHA256
        if self.algorithm is not None:
            assert self.offered is not None, "the server offered no PASSWORD-ALGORITHMS"
            attrs += [self.offered, PasswordAlgorithm(self.algorithm)]
        return encode_message(
            method,
            MessageClass.REQUEST,
            txid,
            attrs,
            integrity_key=None if sha256 else self.key,
            integrity_sha256_key=self.key if sha256 else None,
            fingerprint=fingerprint,
        )

    def send(self, data: bytes, now: float = NOW) -> bytes | Forward | None:
        return self.server.receive(data, self.five_tuple, now)

    def exchange(self, data: bytes, now: float = NOW) -> Message:
        """Send ``data``; the server must answer with a STUN message."""
        answer = self.send(data, now)
        assert isinstance(answer, bytes), f"expected a response, got {answer!r}"
        return parse_message(answer)

    def learn(self, response: Message) -> None:
        """Take REALM, NONCE and PASSWORD-ALGORITHMS from a 401 or 438."""
        nonce = response.get(Nonce)
        assert nonce is not None
        self.nonce = nonce.value
        self.offered = response.get(PasswordAlgorithms)

    def request(
        self,
        method: int,
        attributes: Sequence[Attribute] = (),
        now: float = NOW,
        *,
        fingerprint: bool = False,
    ) -> Message:
        """An authenticated request, retried once after a 401 or 438 challenge."""
        for _ in range(2):
            self.last_txid = self.txid()
            self.last_request = self.build(
                method, attributes, txid=self.last_txid, fingerprint=fingerprint
            )
            response = self.exchange(self.last_request, now)
            assert response.transaction_id == self.last_txid
            assert response.method == method
            code = error_code(response)
            if code in (401, 438) and not response.has_integrity:
                self.learn(response)
                continue
            if self.nonce is not None:
                self.verify(response)
            return response
        return response

    def verify(self, response: Message) -> None:
        """Every answer to an authenticated request carries integrity with the same key."""
        if self.algorithm == PASSWORD_ALGORITHM_SHA256:
            assert response.integrity_offset is None
            assert response.check_integrity_sha256(self.key)
        else:
            assert response.integrity_sha256_offset is None
            assert response.check_integrity(self.key)

    def allocate(
        self, attributes: Sequence[Attribute] = (), now: float = NOW, *, transport: bool = True
    ) -> Message:
        attrs = [RequestedTransport(TRANSPORT_UDP)] if transport else []
        return self.request(Method.ALLOCATE, [*attrs, *attributes], now)


def success(message: Message) -> bool:
    return message.message_class is MessageClass.SUCCESS
