"""The core names the cause of each refused request (turn/refusals.py), once per cause and
client in a bounded tally: wrong password, unknown user, expired REST credential, wrong
realm, stale nonce, denied peer (with the rule), quotas and capacity (with the numbers)."""

from __future__ import annotations

from support.turn_harness import NOW, Client, error_code, make_server, success, udp
from tsunagu.auth.rest import mint_credentials
from tsunagu.stun import ChannelNumber, Method, XorPeerAddress
from tsunagu.turn import PeerPolicy, TurnSettings
from tsunagu.turn.refusals import RefusalSummary, RefusalTally

SECRET = "s3cret"


def taken(server: object) -> dict[tuple[str, str], RefusalSummary]:
    tally: RefusalTally = server.refusals  # type: ignore[attr-defined]
    return {(s.cause, s.client): s for s in tally.take()}


def test_fifty_wrong_passwords_from_one_address_are_one_entry() -> None:
    server, _ = make_server()
    for port in range(1, 51):  # each attempt from a new port, as a client retrying does
        client = Client(server, udp(("198.51.100.9", port)), "alice", "not-her-password")
        assert error_code(client.allocate()) == 401
    (summary,) = server.refusals.take()
    assert (summary.cause, summary.client, summary.count) == ("wrong password", "198.51.100.9", 50)
    assert summary.users == (("alice", 50),)
    assert summary.facts == {"realm": "tsunagu"}
    assert not server.refusals


def test_a_first_401_without_credentials_is_no_refusal() -> None:
    server, _ = make_server()
    assert success(Client(server).allocate())
    assert not server.refusals  # the challenge before it is every client's first step


def test_unknown_user_and_wrong_realm() -> None:
    server, _ = make_server()
    assert error_code(Client(server, udp(("198.51.100.1", 1)), "mallory", "x").allocate()) == 401
    assert error_code(Client(server, udp(("198.51.100.2", 1)), realm="other").allocate()) == 401
    found = taken(server)
    unknown = found[("unknown user", "198.51.100.1")]
    assert unknown.user == "mallory" and unknown.facts == {"realm": "tsunagu"}
    realm = found[("wrong realm", "198.51.100.2")]
    assert realm.user == "alice" and realm.facts == {"realm": "other"}


def test_unknown_userhash() -> None:
    server, _ = make_server()
    client = Client(server, udp(("198.51.100.1", 1)), "mallory", "x", userhash=True)
    assert error_code(client.allocate()) == 401
    (summary,) = server.refusals.take()
    assert summary.cause == "unknown user" and summary.facts == {"userhash": True}


def test_expired_rest_credential_says_when_it_expired() -> None:
    server, _ = make_server(secrets=[SECRET])
    username, password = mint_credentials(SECRET, "erin", 100, NOW - 400)  # expired at NOW-300
    client = Client(server, udp(("198.51.100.3", 7)), username, password)
    assert error_code(client.allocate()) == 401
    (summary,) = server.refusals.take()
    assert (summary.cause, summary.user) == ("expired credential", username)
    assert summary.last - summary.facts["expired_at"] == 300


def test_a_rest_credential_signed_with_another_secret_is_a_wrong_password() -> None:
    server, _ = make_server(secrets=[SECRET])
    username, password = mint_credentials("another-secret", "erin", 100, NOW)
    assert error_code(Client(server, udp(("198.51.100.3", 7)), username, password).allocate())
    (summary,) = server.refusals.take()
    assert (summary.cause, summary.user) == ("wrong password", username)


def test_stale_nonce_is_counted_per_transport_address() -> None:
    server, _ = make_server(TurnSettings(nonce_lifetime=60))
    client = Client(server, udp(("198.51.100.4", 4000)))
    assert success(client.allocate())
    # The nonce is stale a minute later: one 438, then the fresh nonce works.
    assert success(client.request(Method.REFRESH, [], NOW + 100))
    # A nonce made for another address is not valid here (and not expired either).
    other = Client(server, udp(("198.51.100.5", 4000)))
    other.nonce = client.nonce
    assert error_code(other.exchange(other.build(Method.ALLOCATE), NOW + 100)) == 438
    found = taken(server)
    assert found[("stale nonce", "198.51.100.4:4000")].count == 1
    assert found[("stale nonce", "198.51.100.4:4000")].facts == {"nonce": "stale"}
    assert found[("stale nonce", "198.51.100.5:4000")].facts == {"nonce": "invalid"}


def test_denied_peers_name_the_rule() -> None:
    policy = PeerPolicy.create(denied=["8.8.4.0/24"])
    server, _ = make_server(TurnSettings(policy=policy))
    client = Client(server, udp(("198.51.100.6", 1)))
    assert success(client.allocate())
    for peer in ("10.1.2.3", "127.0.0.1", "8.8.4.4", "10.1.2.3"):
        assert (
            error_code(client.request(Method.CREATE_PERMISSION, [XorPeerAddress(peer, 9)])) == 403
        )
    bind = [ChannelNumber(0x4001), XorPeerAddress("169.254.169.254", 80)]
    assert error_code(client.request(Method.CHANNEL_BIND, bind)) == 403
    (summary,) = server.refusals.take()
    assert (summary.cause, summary.client, summary.count) == ("peer denied", "198.51.100.6", 5)
    assert summary.user == "alice"
    rules = {dict(facts)["peer"]: dict(facts)["rule"] for facts, _ in summary.details}
    assert rules == {
        "10.1.2.3:9": "private range 10.0.0.0/8, denied by default",
        "127.0.0.1:9": "loopback range 127.0.0.0/8, denied by default",
        "8.8.4.4:9": "range 8.8.4.0/24, denied by the operator (--denied-peer-ip)",
        "169.254.169.254:80": "link-local range 169.254.0.0/16, denied by default",
    }
    assert summary.details[0][1] == 2  # the peer tried twice comes first
    # The allocation's own record names the rule too, for its audit line.
    allocation = server.allocations[client.five_tuple]
    assert (
        allocation.refused[
            "CreatePermission 403 peer 10.1.2.3 not allowed: private range"
            " 10.0.0.0/8, denied by default"
        ]
        == 2
    )


def test_quotas_carry_their_numbers() -> None:
    server, _ = make_server(TurnSettings(user_quota=1, address_quota=0, total_quota=3))
    assert success(Client(server, udp(("198.51.100.7", 1))).allocate())
    assert error_code(Client(server, udp(("198.51.100.7", 2))).allocate()) == 486
    assert success(Client(server, udp(("198.51.100.8", 1)), "bob", "bob-pw").allocate())
    server2, _ = make_server(TurnSettings(user_quota=0, address_quota=0, total_quota=1))
    assert success(Client(server2, udp(("198.51.100.7", 1))).allocate())
    assert error_code(Client(server2, udp(("198.51.100.9", 1)), "bob", "bob-pw").allocate()) == 508
    (user,) = server.refusals.take()
    assert (user.cause, user.user, user.facts) == (
        "user quota",
        "alice",
        {"user_id": "alice", "quota": 1},
    )
    (total,) = server2.refusals.take()
    assert (total.cause, total.user, total.facts) == ("total quota", "bob", {"quota": 1})


def test_no_relay_port_says_how_many_ports_are_held() -> None:
    server, _ = make_server(
        TurnSettings(min_port=50000, max_port=50003, user_quota=0, address_quota=0, total_quota=0)
    )
    for port in range(1, 5):
        assert success(Client(server, udp(("198.51.100.10", port))).allocate())
    assert error_code(Client(server, udp(("198.51.100.10", 9))).allocate()) == 508
    (summary,) = server.refusals.take()
    assert summary.cause == "no relay port" and summary.user == "alice"
    assert summary.facts == {
        "relay_ip": "192.0.2.1",
        "range": "50000-50003",
        "workers": 1,
        "in_use": 4,
        "held_elsewhere": 0,
    }


def test_draining_is_a_refusal() -> None:
    server, _ = make_server()
    server.start_drain()
    assert error_code(Client(server).allocate()) == 508
    assert server.refusals.take()[0].cause == "draining"


def test_a_credential_mismatch_names_both_users() -> None:
    server, _ = make_server()
    client = Client(server, udp(("198.51.100.11", 1)))
    assert success(client.allocate())
    bob = Client(server, client.five_tuple, "bob", "bob-pw")
    assert error_code(bob.request(Method.REFRESH)) == 441
    (summary,) = server.refusals.take()
    assert (summary.cause, summary.user, summary.facts) == (
        "credential mismatch",
        "bob",
        {"allocation_user": "alice"},
    )


def test_the_tally_is_bounded_and_aggregates_beyond_it() -> None:
    tally = RefusalTally(limit=10)
    for n in range(5000):
        tally.add("wrong password", f"10.0.{n // 256}.{n % 256}", NOW + n, user=f"u{n}")
    for _ in range(3):  # one of the clients beyond the table, remembered to be named
        tally.add("wrong password", "10.0.0.20", NOW)
    tally.add("peer denied", "10.0.0.0", NOW, user="a", facts=(("peer", "p"),))
    summaries = tally.take()
    entries = [s for s in summaries if s.client]
    assert len(entries) == 10
    assert entries[0].client == "10.0.0.0" and entries[0].users == (("u0", 1),)
    (beyond_wp, beyond_peer) = [s for s in summaries if not s.client]
    assert beyond_wp.cause == "wrong password" and beyond_wp.count == 4993
    assert beyond_wp.clients == 1024 and (beyond_wp.top, beyond_wp.top_count) == ("10.0.0.20", 4)
    assert (beyond_peer.cause, beyond_peer.count) == ("peer denied", 1)
    assert tally.total["wrong password"] == 5003
    assert tally.take() == []


def test_an_entry_keeps_a_few_names_and_facts() -> None:
    tally = RefusalTally()
    for n in range(20):
        tally.add("peer denied", "10.0.0.1", NOW, user=f"u{n % 10}", facts=(("peer", str(n)),))
    (summary,) = tally.take()
    assert summary.count == 20 and len(summary.users) == 8 and len(summary.details) == 8
    assert summary.others == 12  # the refusals with peers 8-19: beyond the eight kept


def test_refusal_keeps_its_user_when_the_server_adds_none() -> None:
    server, _ = make_server()
    client = Client(server)
    assert success(client.allocate())
    # A denied peer's refusal has no user of its own: the authenticated one is named.
    client.request(Method.CREATE_PERMISSION, [XorPeerAddress("10.0.0.1", 1)])
    assert server.refusals.take()[0].user == "alice"
