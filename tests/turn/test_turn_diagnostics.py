"""Why an allocation never got a permission: its permission_requests and refused counts."""

from __future__ import annotations

from support.turn_harness import (
    NOW,
    PEER,
    Client,
    error_code,
    make_server,
    stun,
    success,
    udp,
)
from tsunagu.stun import ChannelNumber, Lifetime, Method, XorPeerAddress
from tsunagu.turn import Allocation, TurnSettings
from tsunagu.turn.allocation import MAX_REFUSAL_CAUSES

DEFAULT_PRIVATE = ": private range 10.0.0.0/8, denied by default"


def allocation_of(client: Client) -> Allocation:
    return client.server.allocations[client.five_tuple]


def test_a_fresh_allocation_has_nothing_counted(allocated: Client) -> None:
    allocation = allocation_of(allocated)
    assert (allocation.permission_requests, allocation.refused) == (0, {})


def test_permission_requests_count_what_reached_the_handler(allocated: Client) -> None:
    assert success(allocated.request(Method.CREATE_PERMISSION, [XorPeerAddress(*PEER)]))
    assert success(
        allocated.request(Method.CHANNEL_BIND, [ChannelNumber(0x4000), XorPeerAddress(*PEER)])
    )
    assert error_code(allocated.request(Method.CREATE_PERMISSION, [])) == 400
    assert error_code(allocated.request(Method.CHANNEL_BIND, [XorPeerAddress(*PEER)])) == 400
    assert success(allocated.request(Method.REFRESH))  # not a permission request
    allocation = allocation_of(allocated)
    assert allocation.permission_requests == 4
    assert allocation.refused == {
        "CreatePermission 400 XOR-PEER-ADDRESS is required": 1,
        "ChannelBind 400 CHANNEL-NUMBER and XOR-PEER-ADDRESS are required": 1,
    }


def test_a_denied_peer_is_named(allocated: Client) -> None:
    response = allocated.request(Method.CREATE_PERMISSION, [XorPeerAddress("10.0.0.5", 1)])
    assert error_code(response) == 403
    allocation = allocation_of(allocated)
    assert allocation.refused == {
        "CreatePermission 403 peer 10.0.0.5 not allowed: private range 10.0.0.0/8"
        ", denied by default": 1
    }
    assert allocation.permission_requests == 1
    assert not allocation.permissions


def test_a_stale_nonce_is_counted_though_the_retry_succeeds() -> None:
    server, _ = make_server(TurnSettings(nonce_lifetime=10))
    client = Client(server)
    assert success(client.allocate())
    later = NOW + 60
    bind = [ChannelNumber(0x4000), XorPeerAddress(*PEER)]
    assert success(client.request(Method.CHANNEL_BIND, bind, later))
    allocation = allocation_of(client)
    assert allocation.refused == {"ChannelBind 438 stale nonce": 1}
    assert allocation.permission_requests == 1  # the 438 never reached the handler


def test_unauthenticated_and_wrong_user_answers_are_counted(allocated: Client) -> None:
    answer = allocated.send(stun(Method.REFRESH))
    assert isinstance(answer, bytes)
    mallory = Client(allocated.server, allocated.five_tuple, "bob", "bob-pw")
    assert error_code(mallory.request(Method.CREATE_PERMISSION, [XorPeerAddress(*PEER)])) == 441
    allocation = allocation_of(allocated)
    assert allocation.refused == {
        "Refresh 401 unauthorized": 1,
        "CreatePermission 401 unauthorized": 1,  # mallory's first try, without a nonce
        "CreatePermission 441 credential mismatch": 1,
    }
    assert allocation.permission_requests == 0


def test_too_many_permissions_is_counted() -> None:
    server, _ = make_server()
    client = Client(server)
    assert success(client.allocate())
    peers = [XorPeerAddress(f"8.8.{n // 250}.{n % 250 + 1}", 1) for n in range(1001)]
    assert error_code(client.request(Method.CREATE_PERMISSION, peers)) == 508
    assert allocation_of(client).refused == {"CreatePermission 508 too many permissions": 1}


def test_only_requests_on_an_existing_allocation_count(allocated: Client) -> None:
    # Another 5-tuple has no allocation: its errors belong to nobody.
    stranger = Client(allocated.server, udp(("198.51.100.8", 1)))
    assert error_code(stranger.request(Method.CREATE_PERMISSION, [XorPeerAddress(*PEER)])) == 437
    # Allocate is not a permission matter.
    assert error_code(allocated.allocate()) == 437
    assert allocation_of(allocated).refused == {}


def test_refusal_causes_are_bounded(allocated: Client) -> None:
    for n in range(MAX_REFUSAL_CAUSES + 4):
        peer = XorPeerAddress(f"10.0.0.{n + 1}", 1)
        assert error_code(allocated.request(Method.CREATE_PERMISSION, [peer])) == 403
    allocated.request(Method.CREATE_PERMISSION, [XorPeerAddress("10.0.0.1", 1)])
    refused = allocation_of(allocated).refused
    assert len(refused) == MAX_REFUSAL_CAUSES + 1
    assert refused["other"] == 4
    assert refused[f"CreatePermission 403 peer 10.0.0.1 not allowed{DEFAULT_PRIVATE}"] == 2


def test_a_refresh_that_ends_the_allocation_leaves_the_counts(allocated: Client) -> None:
    allocation = allocation_of(allocated)
    assert error_code(allocated.request(Method.CREATE_PERMISSION, [])) == 400
    assert success(allocated.request(Method.REFRESH, [Lifetime(0)]))
    assert allocation.ended
    assert allocation.refused == {"CreatePermission 400 XOR-PEER-ADDRESS is required": 1}
