"""The probe's allocation state machine, driven against the real (sans-I/O) TURN core."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from tsunagu.auth.rest import mint_credentials
from tsunagu.auth.store import StaticCredentialStore
from tsunagu.probe import wire
from tsunagu.probe.session import Phase, SessionError, TurnSession
from tsunagu.turn import FiveTuple, TurnServer, TurnSettings
from tsunagu.turn.policy import PeerPolicy

NOW = 1_700_000_000.0
CLIENT = ("127.0.0.1", 50000)
SERVER = ("127.0.0.1", 3478)
PEER = ("127.0.0.1", 40000)
FIVE = FiveTuple("udp", CLIENT, SERVER)
SECRET = "rest-secret"


@dataclass(frozen=True)
class Relay:
    ip: str
    port: int

    @property
    def address(self) -> tuple[str, int]:
        return (self.ip, self.port)


@dataclass
class Binder:
    bound: dict[tuple[str, int], Relay] = field(default_factory=dict)

    def bind(self, ip: str, port: int, *, dont_fragment: bool) -> Relay | None:
        if (ip, port) in self.bound:
            return None
        relay = Relay(ip, port)
        self.bound[(ip, port)] = relay
        return relay

    def release(self, relay: Any) -> None:
        del self.bound[(relay.ip, relay.port)]


def make_server(**overrides: Any) -> tuple[TurnServer, Binder]:
    settings = TurnSettings(
        min_port=20000,
        max_port=20100,
        policy=PeerPolicy.create(("127.0.0.1",), ()),
        **overrides,
    )
    store = StaticCredentialStore("tsunagu", [("alice", "secret")], [SECRET])
    binder = Binder()
    return TurnServer(settings, store, binder, random.Random(1)), binder


def session(password: str = "secret", *, channel: int | None = 0x4000, **kw: Any) -> TurnSession:
    return TurnSession(
        kw.pop("username", "alice"),
        password,
        kw.pop("peer", PEER),
        channel=channel,
        random_bytes=random.Random(2).randbytes,
        **kw,
    )


def exchange(server: TurnServer, client: TurnSession, request: bytes | None, now: float) -> int:
    """Pass requests and answers between the two until the client has nothing to send."""
    rounds = 0
    while request is not None:
        rounds += 1
        assert rounds < 20
        answer = server.receive(request, FIVE, now)
        assert isinstance(answer, bytes), f"no answer to {wire.parse_reply(request)}"
        request = client.receive(wire.parse_reply(answer), now)
    return rounds


def test_channel_mode_reaches_ready_with_a_bound_channel() -> None:
    server, binder = make_server()
    client = session()
    rounds = exchange(server, client, client.start(NOW), NOW)
    assert rounds == 4  # 401, Allocate, CreatePermission, ChannelBind
    assert client.phase is Phase.READY and client.done and client.error is None
    assert client.requests == 4 and client.retransmissions == 0
    assert client.relayed is not None and client.relayed in binder.bound
    assert client.mapped == CLIENT
    assert client.realm == "tsunagu" and client.nonce
    assert client.started == NOW and client.finished == NOW
    allocation = server.allocations[FIVE]
    assert "127.0.0.1" in allocation.permissions
    assert allocation.channels[0x4000][1] == PEER
    assert client.deadline is None


def test_indication_mode_stops_after_the_permission() -> None:
    server, _ = make_server()
    client = session(channel=None)
    assert exchange(server, client, client.start(NOW), NOW) == 3
    assert client.phase is Phase.READY
    assert not server.allocations[FIVE].channels


def test_release_ends_the_allocation() -> None:
    server, binder = make_server()
    client = session()
    exchange(server, client, client.start(NOW), NOW)
    exchange(server, client, client.release(NOW + 1), NOW + 1)
    assert client.phase is Phase.RELEASED
    assert FIVE not in server.allocations
    assert not binder.bound


def test_release_only_when_ready() -> None:
    client = session()
    with pytest.raises(SessionError):
        client.release(NOW)
    client.start(NOW)
    with pytest.raises(SessionError):
        client.start(NOW)


def test_wrong_password_fails_with_the_servers_code() -> None:
    server, _ = make_server()
    client = session("not-the-password")
    exchange(server, client, client.start(NOW), NOW)
    assert client.phase is Phase.FAILED
    assert client.error_code == 401 and client.failed_in is Phase.ALLOCATE
    assert client.error is not None and "401" in client.error
    assert not server.allocations


def test_rest_credentials() -> None:
    server, _ = make_server()
    username, password = mint_credentials(SECRET, "probe1", 600, NOW)
    client = session(password, username=username)
    exchange(server, client, client.start(NOW), NOW)
    assert client.phase is Phase.READY
    assert server.allocations[FIVE].username == username


def test_stale_nonce_is_retried_with_the_new_one() -> None:
    server, _ = make_server(nonce_lifetime=10)
    client = session()
    first = client.start(NOW)
    challenge = server.receive(first, FIVE, NOW)
    assert isinstance(challenge, bytes)
    allocate = client.receive(wire.parse_reply(challenge), NOW)
    assert allocate is not None
    old_nonce = client.nonce
    # The authenticated Allocate reaches the server after its nonce expired.
    late = NOW + 60
    exchange(server, client, allocate, late)
    assert client.phase is Phase.READY
    assert client.nonce != old_nonce
    assert client.requests == 5  # the Allocate went twice


def test_allocation_mismatch_is_reported_for_a_new_port() -> None:
    server, _ = make_server()
    exchange(server, first := session(), first.start(NOW), NOW)
    second = TurnSession(
        "alice", "secret", PEER, channel=0x4000, random_bytes=random.Random(9).randbytes
    )
    exchange(server, second, second.start(NOW), NOW)  # same 5-tuple, other transaction
    assert second.phase is Phase.FAILED
    assert second.error_code == 437 and second.failed_in is Phase.ALLOCATE


def test_replies_to_other_transactions_are_ignored() -> None:
    server, _ = make_server()
    client = session()
    request = client.start(NOW)
    answer = server.receive(request, FIVE, NOW)
    assert isinstance(answer, bytes)
    reply = wire.parse_reply(answer)
    stranger = wire.StunReply(reply.method, reply.klass, bytes(12), reply.attributes)
    assert client.receive(stranger, NOW) is None
    assert client.phase is Phase.ALLOCATE and client.realm is None


def test_retransmits_over_udp_then_gives_up() -> None:
    client = session()
    request = client.start(NOW)
    assert client.deadline == pytest.approx(NOW + 0.5)
    assert client.poll(NOW + 0.4) is None
    sent = []
    now = NOW
    while client.deadline is not None:
        now = client.deadline
        again = client.poll(now)
        if again is not None:
            sent.append((now, again))
    assert [data for _, data in sent] == [request] * 4
    # 500 ms doubling: 0.5, 1.5, 3.5, 7.5 s after the first transmission.
    assert [round(at - NOW, 3) for at, _ in sent] == [0.5, 1.5, 3.5, 7.5]
    assert client.phase is Phase.FAILED and client.retransmissions == 4
    assert client.error is not None and "no answer" in client.error


def test_streams_do_not_retransmit() -> None:
    client = session(reliable=True)
    client.start(NOW)
    assert client.deadline == pytest.approx(NOW + 10)
    assert client.poll(NOW + 10) is None
    assert client.phase is Phase.FAILED and client.retransmissions == 0


def test_requests_carry_fingerprint_unless_told_not_to() -> None:
    with_fp = wire.parse_reply(session().start(NOW))
    without = wire.parse_reply(session(fingerprint=False).start(NOW))
    assert wire.ATTR_FINGERPRINT in with_fp.attributes
    assert wire.ATTR_FINGERPRINT not in without.attributes


def test_lifetime_is_requested_when_given() -> None:
    reply = wire.parse_reply(session(lifetime=120).start(NOW))
    assert reply.attributes[wire.ATTR_LIFETIME] == (120).to_bytes(4, "big")


def test_without_a_peer_the_session_waits_after_the_allocate() -> None:
    server, _ = make_server()
    client = session(peer=None)
    rounds = exchange(server, client, client.start(NOW), NOW)
    assert rounds == 2  # 401, Allocate
    assert client.waiting and not client.done and client.deadline is None
    assert client.relayed is not None and client.lifetime_granted is not None
    assert client.poll(NOW + 100) is None and client.waiting
    exchange(server, client, client.permit(PEER, NOW + 1), NOW + 1)
    assert client.phase is Phase.READY
    assert server.allocations[FIVE].channels[0x4000][1] == PEER
    with pytest.raises(SessionError):
        client.permit(PEER, NOW + 2)


def test_a_bounded_timeout_gives_up_early() -> None:
    client = session(timeout=1.2)
    client.start(NOW)
    times = []
    while client.deadline is not None:
        times.append(round(client.deadline - NOW, 3))
        client.poll(client.deadline)
    assert times == [0.5, 1.2]  # one retransmission, then the bound
    assert client.phase is Phase.FAILED and client.timed_out
    assert client.error == "no answer to allocate after 1.2 s"


def test_wrong_password_is_told_from_the_first_challenge() -> None:
    server, _ = make_server()
    client = session("not-the-password")
    exchange(server, client, client.start(NOW), NOW)
    assert client.authenticated and client.error_code == 401
    assert client.error_reason and not client.timed_out


def test_a_failed_session_still_releases_its_allocation() -> None:
    server, binder = make_server()
    client = session(peer=None)
    exchange(server, client, client.start(NOW), NOW)
    # The peer is denied (not in the policy): 403 to CreatePermission.
    exchange(server, client, client.permit(("10.0.0.1", 9), NOW), NOW)
    assert client.phase is Phase.FAILED and client.error_code == 403
    assert client.failed_in is Phase.PERMISSION
    exchange(server, client, client.release(NOW), NOW)
    assert client.phase is Phase.RELEASED and FIVE not in server.allocations and not binder.bound


def test_an_ipv6_relayed_address_is_requested_when_asked() -> None:
    allocate = wire.parse_reply(session(family=2).start(NOW))
    assert allocate.attributes[wire.ATTR_REQUESTED_ADDRESS_FAMILY] == b"\x02\x00\x00\x00"
    plain = wire.parse_reply(session().start(NOW))
    assert wire.ATTR_REQUESTED_ADDRESS_FAMILY not in plain.attributes
