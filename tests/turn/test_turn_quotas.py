"""Allocation quotas: per user id (not per REST credential), per client address, in total."""

from __future__ import annotations

import pytest

from support.turn_harness import NOW, Client, error_code, make_server, udp
from tsunagu.auth.rest import mint_credentials
from tsunagu.stun import MessageClass
from tsunagu.turn import TurnSettings
from tsunagu.turn.quotas import (
    DEFAULT_ADDRESS_QUOTA,
    DEFAULT_USER_QUOTA,
    address_key,
    relay_ports_in_share,
    resolve_quotas,
    user_id,
)

SECRET = "s3cret"


def success(message: object) -> bool:
    return getattr(message, "message_class", None) is MessageClass.SUCCESS


@pytest.mark.parametrize(
    ("username", "expected"),
    [
        ("1700000000:alice", "alice"),
        ("alice:1700000000", "alice"),  # coturn accepts the timestamp last
        (":alice", "alice"),
        ("1700000000:alice:x", "alice:x"),
        ("1700000000", "1700000000"),  # no user id: the credential itself
        ("1700000000:", "1700000000:"),
        ("alice", "alice"),
    ],
)
def test_user_id_follows_coturn(username: str, expected: str) -> None:
    assert user_id(username) == expected


def test_user_id_other_separator() -> None:
    assert user_id("1700000000-alice", "-") == "alice"
    assert user_id("1700000000:alice", "-") == "1700000000:alice"


def test_address_key_groups_ipv6_by_64() -> None:
    assert address_key("198.51.100.7") == "198.51.100.7"
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::2")
    assert address_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:2::1") != address_key("2001:db8:1:3::1")
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key("fe80::1%eth0") == "fe80::/64"
    assert address_key("?") == "?"


def test_defaults_derive_from_the_port_range() -> None:
    wide = resolve_quotas(None, None, None, min_port=49152, max_port=65535, share=(0, 1))
    assert wide.user == DEFAULT_USER_QUOTA == 128
    assert wide.address == DEFAULT_ADDRESS_QUOTA == 512
    assert 16384 - 400 < wide.total < 16384
    # 1,000 ports shared by two workers: 500 each; one address gets at most half of it.
    assert relay_ports_in_share(50000, 50999, (0, 2)) == 500
    small = resolve_quotas(None, None, None, min_port=50000, max_port=50999, share=(1, 2))
    assert small.total < 500
    assert small.address <= small.total // 2
    assert small.user <= small.total // 2
    # Explicit values win, 0 is unlimited.
    explicit = resolve_quotas(0, 3, 0, min_port=50000, max_port=50999, share=(0, 1))
    assert (explicit.user, explicit.address, explicit.total) == (0, 3, 0)


def rest_client(server, number: int, user: str, ip: str = "198.51.100.100") -> Client:  # type: ignore[no-untyped-def]
    username, password = mint_credentials(SECRET, user, 600 + number, NOW)
    return Client(server, udp((ip, 40000 + number)), username, password)


def test_new_rest_credentials_do_not_reset_the_user_quota() -> None:
    server, _ = make_server(TurnSettings(user_quota=2, address_quota=0), secrets=[SECRET])
    # Each allocation with a freshly minted credential for the same user id.
    assert success(rest_client(server, 1, "mallory").allocate())
    assert success(rest_client(server, 2, "mallory").allocate())
    refused = rest_client(server, 3, "mallory").allocate()
    assert error_code(refused) == 486
    assert success(rest_client(server, 4, "alice").allocate())
    (summary,) = server.refusals.take()
    assert (summary.cause, summary.count) == ("user quota", 1)
    assert summary.facts == {"user_id": "mallory", "quota": 2}
    assert summary.user.endswith(":mallory") and summary.client == "198.51.100.100"


def test_address_quota_counts_per_address_whatever_the_user() -> None:
    server, _ = make_server(TurnSettings(address_quota=2), secrets=[SECRET])
    assert success(rest_client(server, 1, "u1").allocate())
    assert success(rest_client(server, 2, "u2").allocate())
    assert error_code(rest_client(server, 3, "u3").allocate()) == 486
    assert success(rest_client(server, 4, "u4", ip="198.51.100.101").allocate())
    # Ending one frees a place for the address.
    first = server.allocations[udp(("198.51.100.100", 40001))]
    server.handle_timer(first.expiry)
    assert success(rest_client(server, 5, "u5").allocate([], first.expiry + 1))
    (summary,) = server.refusals.take()
    assert summary.cause == "address quota" and summary.client == "198.51.100.100"
    assert summary.facts == {"address": "198.51.100.100", "quota": 2}
    assert not server.refusals


def test_address_quota_counts_an_ipv6_64_together() -> None:
    server, _ = make_server(TurnSettings(address_quota=1), secrets=[SECRET])
    assert success(rest_client(server, 1, "a", ip="2001:db8:5:6::1").allocate())
    assert error_code(rest_client(server, 2, "b", ip="2001:db8:5:6::2").allocate()) == 486


def test_default_limits_stop_one_address_taking_a_small_range() -> None:
    server, _ = make_server(TurnSettings(min_port=50000, max_port=50099), secrets=[SECRET])
    quotas = server.quotas
    assert quotas.total < 100 and quotas.address <= quotas.total // 2
    allocated = sum(success(rest_client(server, n, f"u{n}").allocate()) for n in range(1, 101))
    assert allocated == quotas.address
    # Another address still gets relay ports.
    assert success(rest_client(server, 200, "v", ip="198.51.100.200").allocate())


def test_quotas_change_while_the_server_runs() -> None:
    # A realm's user-quota and total-quota read from a user database apply to what comes
    # next; allocations beyond a lowered quota stay.
    server, _ = make_server(TurnSettings(address_quota=0), secrets=[SECRET])
    assert success(rest_client(server, 1, "mallory").allocate())
    assert success(rest_client(server, 2, "mallory").allocate())
    server.set_quotas(1, None)
    assert server.quotas.user == 1
    assert error_code(rest_client(server, 3, "mallory").allocate()) == 486
    assert success(rest_client(server, 4, "alice").allocate())
    # The default user quota follows the total: at most half of it.
    server.set_quotas(None, 4)
    assert (server.quotas.total, server.quotas.user) == (4, 2)
    assert error_code(rest_client(server, 5, "mallory").allocate()) == 486
    assert success(rest_client(server, 6, "bob").allocate())
    assert error_code(rest_client(server, 7, "carol").allocate()) == 508  # total: capacity
    assert len(server.allocations) == 4
