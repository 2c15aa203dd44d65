"""ChannelBind (RFC 8656 §11, RFC 5766 channel numbers)."""

from __future__ import annotations

import pytest

from support.turn_harness import (
    NOW,
    PEER,
    PEER2,
    PEER6,
    Client,
    channel_data,
    error_code,
    make_server,
    success,
)
from tsunagu.stun import Attribute, ChannelNumber, Lifetime, Method, XorPeerAddress
from tsunagu.turn import Allocation, Forward, TurnSettings


def bind(client: Client, number: int, peer: tuple[str, int], now: float = NOW) -> int | None:
    response = client.request(
        Method.CHANNEL_BIND, [ChannelNumber(number), XorPeerAddress(*peer)], now
    )
    return 200 if success(response) else error_code(response)


def allocation_of(client: Client) -> Allocation:
    return client.server.allocations[client.five_tuple]


@pytest.mark.parametrize(
    ("number", "code"),
    [
        (0x3FFF, 400),
        (0x4000, 200),
        (0x4FFF, 200),
        (0x5000, 200),
        (0x7FFE, 200),
        (0x7FFF, 200),
        (0x8000, 400),
    ],
)
def test_channel_range_rfc5766(allocated: Client, number: int, code: int) -> None:
    assert bind(allocated, number, PEER) == code
    assert (number in allocation_of(allocated).channels) is (code == 200)


@pytest.mark.parametrize(
    ("number", "code"),
    [(0x3FFF, 400), (0x4000, 200), (0x4FFF, 200), (0x5000, 400), (0x7FFF, 400), (0x8000, 400)],
)
def test_channel_range_strict(number: int, code: int) -> None:
    server, _ = make_server(TurnSettings(strict_channel_numbers=True))
    client = Client(server)
    assert success(client.allocate())
    assert bind(client, number, PEER) == code


def test_bind_installs_channel_and_permission(allocated: Client) -> None:
    assert bind(allocated, 0x4001, PEER) == 200
    allocation = allocation_of(allocated)
    relay, peer = allocation.channels[0x4001]
    assert relay is allocation.relays[4]
    assert peer == PEER
    assert allocation.peer_channels == {PEER: 0x4001}
    assert allocation.channel_expiry == {0x4001: NOW + 600}
    assert allocation.permissions == {PEER[0]: NOW + 300}


def test_rebind_same_refreshes(allocated: Client) -> None:
    server = allocated.server
    assert bind(allocated, 0x4001, PEER) == 200
    assert bind(allocated, 0x4001, PEER, NOW + 500) == 200
    allocation = allocation_of(allocated)
    assert allocation.channel_expiry[0x4001] == NOW + 1100
    assert allocation.permissions[PEER[0]] == NOW + 800
    assert success(allocated.request(Method.REFRESH, [], NOW + 500))  # keep the allocation
    server.handle_timer(NOW + 600)
    assert allocation.channels[0x4001] == (allocation.relays[4], PEER)
    server.handle_timer(NOW + 1100)
    assert 0x4001 not in allocation.channels
    assert allocation.peer_channels == {}


def test_channel_to_another_peer_gets_400(allocated: Client) -> None:
    assert bind(allocated, 0x4001, PEER) == 200
    assert bind(allocated, 0x4001, PEER2) == 400
    assert bind(allocated, 0x4001, (PEER[0], PEER[1] + 1)) == 400  # same IP, other port
    assert allocation_of(allocated).channels[0x4001][1] == PEER


def test_peer_to_another_channel_gets_400(allocated: Client) -> None:
    assert bind(allocated, 0x4001, PEER) == 200
    assert bind(allocated, 0x4002, PEER) == 400
    assert list(allocation_of(allocated).channels) == [0x4001]


def test_same_ip_other_port_gets_its_own_channel(allocated: Client) -> None:
    other = (PEER[0], PEER[1] + 1)
    assert bind(allocated, 0x4001, PEER) == 200
    assert bind(allocated, 0x4002, other) == 200
    assert allocation_of(allocated).peer_channels == {PEER: 0x4001, other: 0x4002}


def test_channel_expiry_removes_both_maps(allocated: Client) -> None:
    server = allocated.server
    assert bind(allocated, 0x4001, PEER) == 200
    assert bind(allocated, 0x4002, PEER2, NOW + 100) == 200
    assert success(allocated.request(Method.REFRESH, [Lifetime(3600)]))
    allocation = allocation_of(allocated)
    server.handle_timer(NOW + 599)
    assert set(allocation.channels) == {0x4001, 0x4002}
    server.handle_timer(NOW + 600)
    assert set(allocation.channels) == {0x4002}
    assert allocation.peer_channels == {PEER2: 0x4002}
    assert set(allocation.channel_expiry) == {0x4002}
    server.handle_timer(NOW + 700)
    assert allocation.channels == {} and allocation.peer_channels == {}
    assert allocation.channel_expiry == {}
    # Both the number and the peer are free again (RFC 8656 waits 5 minutes; we need not).
    assert bind(allocated, 0x4002, PEER, NOW + 701) == 200


def test_denied_peer_gets_403(allocated: Client) -> None:
    assert bind(allocated, 0x4001, ("127.0.0.1", 5)) == 403
    allocation = allocation_of(allocated)
    assert allocation.channels == {} and allocation.permissions == {}


def test_family_mismatch_gets_443(allocated: Client) -> None:
    assert bind(allocated, 0x4001, PEER6) == 443
    assert allocation_of(allocated).channels == {}


@pytest.mark.parametrize(
    "attributes",
    [[ChannelNumber(0x4001)], [XorPeerAddress(*PEER)], []],
    ids=["no-peer", "no-number", "none"],
)
def test_missing_attributes_get_400(allocated: Client, attributes: list[Attribute]) -> None:
    assert error_code(allocated.request(Method.CHANNEL_BIND, attributes)) == 400


def test_without_allocation_gets_437(alice: Client) -> None:
    assert bind(alice, 0x4001, PEER) == 437


def test_channel_bind_respects_the_permission_limit(allocated: Client) -> None:
    peers = [XorPeerAddress(f"8.8.{n // 250}.{n % 250 + 1}", 1) for n in range(1000)]
    assert success(allocated.request(Method.CREATE_PERMISSION, peers))
    assert bind(allocated, 0x4000, PEER2) == 508  # a new IP would be permission 1001
    assert allocation_of(allocated).channels == {}
    assert bind(allocated, 0x4000, ("8.8.0.1", 77)) == 200  # an existing one is fine


def test_highest_rfc5766_channel_relays(allocated: Client) -> None:
    """turnutils_uclient may pick 0x7FFF: ChannelData on it is relayed like any other."""
    assert bind(allocated, 0x7FFF, PEER) == 200
    allocation = allocation_of(allocated)
    forward = allocated.server.receive_channel_data(
        channel_data(0x7FFF, b"last"), allocated.five_tuple
    )
    assert forward == Forward(allocation.relays[4], b"last", PEER)
