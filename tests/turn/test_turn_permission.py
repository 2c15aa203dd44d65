"""CreatePermission (RFC 8656 §9) and the peer policy that keeps the relay off private nets."""

from __future__ import annotations

import pytest

from support.turn_harness import (
    NOW,
    PEER,
    PEER2,
    PEER6,
    Client,
    error_code,
    make_server,
    success,
)
from tsunagu.stun import (
    FAMILY_IPV6,
    AdditionalAddressFamily,
    Method,
    UnknownAttribute,
    XorPeerAddress,
)
from tsunagu.turn import PeerPolicy, TurnSettings

DENIED = [
    "127.0.0.1",
    "10.0.0.1",
    "0.0.0.0",
    "169.254.169.254",
    "192.168.1.1",
    "172.16.0.1",
    "100.64.0.1",
    "224.0.0.1",
    "255.255.255.255",
    "::1",
    "::",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::127.0.0.1",
    "64:ff9b::a9fe:a9fe",  # NAT64 spelling of 169.254.169.254
    "2002:7f00:1::1",  # 6to4 embedding of 127.0.0.1
    "fe80::1",
    "fc00::1",
    "ff02::1",
]


def dual_client() -> Client:
    """A client with an IPv4 and an IPv6 relay, so that either family of peer may be named."""
    server, _ = make_server(TurnSettings(fallback_relay_ips=("2001:db8::5",)))
    client = Client(server)
    assert success(client.allocate([AdditionalAddressFamily(FAMILY_IPV6)]))
    return client


def permit(client: Client, *peers: tuple[str, int], now: float = NOW) -> int | None:
    response = client.request(
        Method.CREATE_PERMISSION, [XorPeerAddress(ip, port) for ip, port in peers], now
    )
    return 200 if success(response) else error_code(response)


def test_multiple_peers(allocated: Client) -> None:
    third = ("9.9.9.9", 53)
    assert permit(allocated, PEER, PEER2, third) == 200
    allocation = allocated.server.allocations[allocated.five_tuple]
    expiry = NOW + allocated.server.settings.permission_lifetime
    assert allocation.permissions == {PEER[0]: expiry, PEER2[0]: expiry, third[0]: expiry}
    assert allocation.peers_seen == {PEER[0], PEER2[0], third[0]}


def test_permissions_are_per_ip_not_per_port(allocated: Client) -> None:
    assert permit(allocated, (PEER[0], 1)) == 200
    assert permit(allocated, (PEER[0], 2)) == 200
    assert list(allocated.server.allocations[allocated.five_tuple].permissions) == [PEER[0]]


def test_ipv6_peer_on_dual_allocation() -> None:
    client = dual_client()
    assert permit(client, PEER, PEER6) == 200
    assert set(client.server.allocations[client.five_tuple].permissions) == {PEER[0], PEER6[0]}


@pytest.mark.parametrize("ip", DENIED)
def test_denied_peer_gets_403_and_nothing_installed(ip: str) -> None:
    client = dual_client()
    response = client.request(
        Method.CREATE_PERMISSION, [XorPeerAddress(*PEER), XorPeerAddress(ip, 9)]
    )
    assert error_code(response) == 403
    assert response.has_integrity
    assert client.server.allocations[client.five_tuple].permissions == {}


def test_allowed_peer_ips_open_a_denied_range() -> None:
    policy = PeerPolicy.create(allowed=["127.0.0.1", "10.1.0.0-10.1.0.255"])
    server, _ = make_server(TurnSettings(policy=policy))
    client = Client(server)
    assert success(client.allocate())
    assert permit(client, ("127.0.0.1", 1), ("10.1.0.9", 2)) == 200
    assert permit(client, ("127.0.0.2", 1)) == 403
    assert permit(client, ("10.1.1.0", 1)) == 403


def test_operator_denied_range() -> None:
    server, _ = make_server(TurnSettings(policy=PeerPolicy.create(denied=["8.8.8.0/24"])))
    client = Client(server)
    assert success(client.allocate())
    assert permit(client, PEER) == 403
    assert permit(client, PEER2) == 200


def test_family_mismatch_gets_443(allocated: Client) -> None:
    assert permit(allocated, PEER6) == 443
    assert permit(allocated, PEER, PEER6) == 443
    assert allocated.server.allocations[allocated.five_tuple].permissions == {}


def test_missing_peer_gets_400(allocated: Client) -> None:
    response = allocated.request(Method.CREATE_PERMISSION)
    assert error_code(response) == 400
    assert response.has_integrity


def test_malformed_peer_gets_400(allocated: Client) -> None:
    bad = UnknownAttribute(XorPeerAddress.TYPE, bytes((0, 9, 0, 0, 1, 2, 3, 4)))  # family 9
    assert error_code(allocated.request(Method.CREATE_PERMISSION, [bad])) == 400


def test_without_allocation_gets_437(alice: Client) -> None:
    assert permit(alice, PEER) == 437


def test_permission_expires_through_handle_timer(allocated: Client) -> None:
    server = allocated.server
    lifetime = server.settings.permission_lifetime
    assert permit(allocated, PEER) == 200
    allocation = server.allocations[allocated.five_tuple]
    assert server.get_timer() == NOW + lifetime
    server.handle_timer(NOW + lifetime - 1)
    assert PEER[0] in allocation.permissions
    server.handle_timer(NOW + lifetime)
    assert allocation.permissions == {}
    assert allocated.five_tuple in server.allocations


def test_refreshed_permission_lives_on(allocated: Client) -> None:
    server = allocated.server
    lifetime = server.settings.permission_lifetime
    assert permit(allocated, PEER, PEER2) == 200
    assert permit(allocated, PEER, now=NOW + 200) == 200
    allocation = server.allocations[allocated.five_tuple]
    assert allocation.permissions[PEER[0]] == NOW + 200 + lifetime
    server.handle_timer(NOW + lifetime)
    assert list(allocation.permissions) == [PEER[0]]
    server.handle_timer(NOW + 200 + lifetime)
    assert allocation.permissions == {}


def test_permission_limit_gets_508(allocated: Client) -> None:
    peers = [(f"8.8.{n // 250}.{n % 250 + 1}", 1) for n in range(1000)]
    assert permit(allocated, *peers[:600]) == 200
    assert permit(allocated, *peers[600:]) == 200
    assert permit(allocated, PEER2) == 508
    assert permit(allocated, peers[0]) == 200  # refreshing an existing one is fine
    assert len(allocated.server.allocations[allocated.five_tuple].permissions) == 1000


def test_permission_limit_is_checked_before_installing(allocated: Client) -> None:
    peers = [(f"8.9.{n // 250}.{n % 250 + 1}", 1) for n in range(999)]
    assert permit(allocated, *peers) == 200
    assert permit(allocated, PEER, PEER2) == 508
    permissions = allocated.server.allocations[allocated.five_tuple].permissions
    assert PEER[0] not in permissions and len(permissions) == 999
