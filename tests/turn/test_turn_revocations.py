"""Revocations: which usernames each covers, how long it is kept, and what the core does.

A revoked credential's allocations end at once (``revoke``), and from then on the store
gives no key for it: Refresh and Allocate get 401, logged as a revoked credential.
"""

from __future__ import annotations

import random

import pytest

from support.turn_harness import NOW, REALM, Client, FakeBinder, error_code, events, success, udp
from tsunagu.auth.rest import mint_credentials
from tsunagu.auth.store import StaticCredentialStore
from tsunagu.stun.message import Method
from tsunagu.turn import AllocationEnded, TurnServer, TurnSettings
from tsunagu.turn.refusals import REVOKED_CREDENTIAL
from tsunagu.turn.revocations import Revocation, RevocationList

TTL = 600.0


def rest(user: str, issued: float, ttl: float = TTL) -> str:
    return f"{int(issued + ttl)}:{user}"


@pytest.mark.parametrize(
    ("revocation", "username", "covered"),
    [
        # One credential, exactly.
        (
            Revocation(1, NOW, NOW + 300, credential=rest("ann", NOW - 300)),
            rest("ann", NOW - 300),
            True,
        ),
        (
            Revocation(1, NOW, NOW + 300, credential=rest("ann", NOW - 300)),
            rest("ann", NOW - 200),
            False,
        ),
        # A user id: that id's REST credentials issued before, and the long-term user.
        (Revocation(2, NOW, NOW + TTL, user="ann"), rest("ann", NOW - 10), True),
        (Revocation(2, NOW, NOW + TTL, user="ann"), rest("ann", NOW + 10), False),
        (Revocation(2, NOW, NOW + TTL, user="ann"), rest("bob", NOW - 10), False),
        (Revocation(2, NOW, NOW + TTL, user="ann"), "ann", True),
        (Revocation(2, NOW, NOW + TTL, user="ann"), "anne", False),
        # Everything issued before a time; long-term users are not covered.
        (Revocation(3, NOW, NOW + TTL), rest("x", NOW - 1), True),
        (Revocation(3, NOW, NOW + TTL), rest("x", NOW + 1), False),
        (Revocation(3, NOW, NOW + TTL), "alice", False),
    ],
)
def test_what_a_revocation_covers(revocation: Revocation, username: str, covered: bool) -> None:
    assert revocation.covers(username, NOW, TTL) is covered


def test_a_revocation_lapses_when_what_it_covers_could_no_longer_be_valid() -> None:
    revocations = RevocationList(TTL)
    assert revocations.add(Revocation(4, NOW, NOW + TTL, user="ann"))
    assert not revocations.add(Revocation(4, NOW, NOW + TTL, user="ann"))
    assert revocations.last_number == 4
    assert revocations.covering("ann", NOW + TTL - 1) is not None
    assert revocations.covering("ann", NOW + TTL) is None
    revocations.prune(NOW + TTL)
    assert len(revocations) == 0 and revocations.last_number == 4


def test_revoked_allocations_end_and_their_credentials_are_refused() -> None:
    settings = TurnSettings()
    store = StaticCredentialStore(REALM, [("alice", "alice-pw")], ["s3cret"])
    server = TurnServer(settings, store, FakeBinder(), random.Random(5))
    username, password = mint_credentials("s3cret", "ann", int(TTL), NOW - 60)
    ann = Client(server, udp(("203.0.113.5", 5000)), username, password)
    other, other_password = mint_credentials("s3cret", "bob", int(TTL), NOW - 60)
    bob = Client(server, udp(("203.0.113.6", 5000)), other, other_password)
    alice = Client(server)
    for client in (ann, bob, alice):
        assert success(client.allocate())
    events(server)
    revocations = RevocationList(TTL)
    store.revocations = revocations
    revocation = Revocation(1, NOW, NOW + TTL, user="ann")
    revocations.add(revocation)
    assert server.revoke(revocation, TTL, NOW) == 1
    [ended] = [e for e in events(server) if isinstance(e, AllocationEnded)]
    assert ended.reason == "revoked" and ended.allocation.username == username
    assert len(server.allocations) == 2
    server.refusals.take()
    assert error_code(ann.request(Method.REFRESH)) == 401
    assert error_code(ann.allocate()) == 401
    assert {s.cause for s in server.refusals.take()} == {REVOKED_CREDENTIAL}
    # Others carry on; a credential issued after the revocation works.
    assert success(bob.request(Method.REFRESH)) and success(alice.request(Method.REFRESH))
    fresh, fresh_password = mint_credentials("s3cret", "ann", int(TTL), NOW + 1)
    assert success(Client(server, udp(("203.0.113.5", 5001)), fresh, fresh_password).allocate())
