"""What a reload changes in a running core (``TurnServer.reconfigure``) besides the peer
policy, quotas and bandwidth (test_turn_bandwidth.py): lifetimes count from the next request
that sets one, what was granted keeps its expiry; the unauthenticated answer rate applies to
the next answer."""

from __future__ import annotations

from support.turn_harness import (
    CLIENT,
    NOW,
    PEER,
    PEER2,
    Client,
    error_code,
    make_server,
    success,
    udp,
)
from tsunagu.stun import ChannelNumber, Lifetime, Method, XorPeerAddress
from tsunagu.turn import TurnSettings


def test_new_lifetimes_count_from_the_next_request_and_grants_keep_theirs() -> None:
    server, _ = make_server(TurnSettings())
    client = Client(server)
    assert success(client.allocate())
    allocation = server.allocations[client.five_tuple]
    assert success(client.request(Method.CREATE_PERMISSION, [XorPeerAddress(*PEER)]))
    assert allocation.permissions[PEER[0]] == NOW + 300

    server.reconfigure(
        TurnSettings(
            max_lifetime=120, default_lifetime=60, permission_lifetime=30, channel_lifetime=90
        )
    )
    # Granted before: unchanged.
    assert allocation.permissions[PEER[0]] == NOW + 300
    # Asked for from now on: the new bounds.
    later = NOW + 10
    refreshed = client.request(Method.REFRESH, [Lifetime(3600)], later)
    assert refreshed.get(Lifetime) == Lifetime(120)
    assert allocation.expiry == later + 120
    default = client.request(Method.REFRESH, [], later)
    assert default.get(Lifetime) == Lifetime(60)
    assert success(client.request(Method.CREATE_PERMISSION, [XorPeerAddress(*PEER2)], later))
    assert allocation.permissions[PEER2[0]] == later + 30
    bound = client.request(
        Method.CHANNEL_BIND, [ChannelNumber(0x4001), XorPeerAddress(*PEER)], later
    )
    assert success(bound)
    assert allocation.channel_expiry[0x4001] == later + 90
    assert allocation.permissions[PEER[0]] == later + 30


def test_a_new_unauthenticated_rate_applies_to_the_next_answer() -> None:
    server, _ = make_server(TurnSettings(unauth_rate=200.0))
    limiter = server.unauthenticated

    def answers(ip: str) -> list[bool]:
        # Full-size answers to small requests: only the budget lets them out.
        return [limiter.allow(ip, 1, bytes([n]) * 12, 20, 100, NOW) for n in range(4)]

    assert answers("203.0.113.1") == [True] * 4
    server.reconfigure(TurnSettings(unauth_rate=1.0))
    assert server.settings.unauth_rate == 1.0
    # A burst of twice the rate, for an address seen before and a new one alike.
    assert answers("203.0.113.1") == [True, True, False, False]
    assert answers("203.0.113.2") == [True, True, False, False]


def test_a_new_nonce_lifetime_applies_to_nonces_made_from_now_on() -> None:
    server, _ = make_server(TurnSettings(nonce_lifetime=600))
    before = Client(server)
    assert success(before.allocate())  # its nonce expires at NOW + 600

    server.reconfigure(TurnSettings(nonce_lifetime=30))
    assert server.settings.nonce_lifetime == 30
    after = Client(server, five_tuple=udp((CLIENT[0], CLIENT[1] + 1)))
    assert success(after.allocate())
    # 31 s on, the nonce made before still serves; the one made after is stale (438) and
    # the client takes the fresh one it is given.
    later = NOW + 31
    kept = before.nonce
    assert success(before.request(Method.REFRESH, [], later)) and before.nonce == kept
    stale = after.nonce
    attempt = after.exchange(after.build(Method.REFRESH), later)
    assert error_code(attempt) == 438
    assert success(after.request(Method.REFRESH, [], later)) and after.nonce != stale
