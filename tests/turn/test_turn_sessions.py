"""What the core tells an operator of its allocations: ``TurnServer.sessions`` (plain
copies, numbered per server, never reused) and ``of_user`` (a user id or a username)."""

from __future__ import annotations

import random

from support.turn_harness import NOW, PEER, REALM, Client, FakeBinder, events, success, udp
from tsunagu.auth.rest import mint_credentials
from tsunagu.auth.store import StaticCredentialStore
from tsunagu.stun.attributes import XorPeerAddress
from tsunagu.stun.message import Method
from tsunagu.turn import AllocationEnded, Session, TurnServer, TurnSettings


def test_sessions_are_numbered_copies_and_users_match_by_id_or_name() -> None:
    store = StaticCredentialStore(REALM, [("alice", "alice-pw")], ["s3cret"])
    server = TurnServer(TurnSettings(), store, FakeBinder(), random.Random(3))
    username, password = mint_credentials("s3cret", "ann", 600, NOW)
    ann = Client(server, udp(("203.0.113.5", 5000)), username, password)
    alice = Client(server, udp(("203.0.113.6", 5000)))
    later = Client(server, udp(("203.0.113.7", 5000)))
    for client in (ann, alice):
        assert success(client.allocate())
    assert success(ann.request(Method.CREATE_PERMISSION, [XorPeerAddress(*PEER)]))
    events(server)

    sessions = server.sessions()
    assert [(s.number, s.username, s.user) for s in sessions] == [
        (1, username, "ann"),
        (2, "alice", "alice"),
    ]
    first = sessions[0]
    assert isinstance(first, Session) and first.five_tuple == ann.five_tuple
    assert first.peers == (PEER[0],) and first.channels == 0 and first.created == NOW
    assert first.relayed == tuple(server.allocations[ann.five_tuple].relayed_addresses.values())
    # A copy: what the per-packet paths count later does not change it.
    server.allocations[ann.five_tuple].bytes_to_peers += 100
    assert first.bytes_to_peers == 0 and server.sessions()[0].bytes_to_peers == 100

    assert [s.number for s in server.sessions(server.of_user("ann"))] == [1]
    assert [s.number for s in server.sessions(server.of_user(username))] == [1]
    assert [s.number for s in server.sessions(server.of_user("alice"))] == [2]
    assert server.sessions(server.of_user("an")) == []

    # Ended, and the number is not given again.
    assert server.end_allocations(server.of_user("ann"), "killed", NOW + 1) == 1
    [ended] = [e for e in events(server) if isinstance(e, AllocationEnded)]
    assert ended.reason == "killed" and ended.allocation.number == 1
    assert success(later.allocate())
    assert [s.number for s in server.sessions()] == [2, 3]
