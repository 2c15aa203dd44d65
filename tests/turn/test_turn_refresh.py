"""Refresh (RFC 8656 §7.3-7.4)."""

from __future__ import annotations

import pytest

from support.turn_harness import NOW, Client, FakeBinder, error_code, events, make_server, success
from tsunagu.stun import (
    FAMILY_IPV4,
    FAMILY_IPV6,
    AdditionalAddressFamily,
    Lifetime,
    Message,
    Method,
    RequestedAddressFamily,
)
from tsunagu.turn import AllocationEnded, TurnServer, TurnSettings


def lifetime(response: Message) -> int:
    attribute = response.get(Lifetime)
    assert attribute is not None
    return attribute.value


@pytest.mark.parametrize(
    ("asked", "granted"), [(None, 600), (1, 600), (1800, 1800), (99_999, 3600)]
)
def test_refresh_extends(allocated: Client, asked: int | None, granted: int) -> None:
    later = NOW + 500
    response = allocated.request(Method.REFRESH, [] if asked is None else [Lifetime(asked)], later)
    assert success(response)
    assert lifetime(response) == granted
    allocation = allocated.server.allocations[allocated.five_tuple]
    assert allocation.expiry == later + granted
    # The old deadline passes without ending the allocation; the new one ends it.
    allocated.server.handle_timer(NOW + 600)
    assert allocated.five_tuple in allocated.server.allocations
    allocated.server.handle_timer(later + granted - 0.5)
    assert allocated.five_tuple in allocated.server.allocations
    allocated.server.handle_timer(later + granted)
    assert allocated.five_tuple not in allocated.server.allocations
    (ended,) = events(allocated.server)
    assert isinstance(ended, AllocationEnded) and ended.reason == "expired"


def test_lifetime_zero_deletes(allocated: Client, binder: FakeBinder) -> None:
    server = allocated.server
    allocation = server.allocations[allocated.five_tuple]
    relay = allocation.relays[4]
    response = allocated.request(Method.REFRESH, [Lifetime(0)], NOW + 10)
    assert success(response)
    assert lifetime(response) == 0
    assert not server.allocations
    assert binder.releases == [relay]
    assert not binder.bound
    (ended,) = events(server)
    assert isinstance(ended, AllocationEnded)
    assert (ended.reason, ended.ended_at, ended.allocation) == ("deleted", NOW + 10, allocation)
    assert allocation.ended


def test_retransmitted_delete_gets_the_same_success(allocated: Client) -> None:
    server = allocated.server
    first = allocated.request(Method.REFRESH, [Lifetime(0)], NOW + 10)
    request = allocated.last_request
    again = allocated.send(request, NOW + 12)
    assert again == first.raw
    assert len(events(server)) == 1  # deleted once
    # Once the response cache has forgotten it, the 5-tuple has no allocation: 437.
    late = NOW + 10 + server.settings.response_cache_lifetime + 1
    answer = allocated.exchange(request, late)
    assert error_code(answer) == 437


def test_refresh_without_allocation_gets_437(alice: Client) -> None:
    response = alice.request(Method.REFRESH)
    assert error_code(response) == 437
    assert response.has_integrity


def test_delete_without_allocation_gets_437(alice: Client) -> None:
    assert error_code(alice.request(Method.REFRESH, [Lifetime(0)])) == 437


def test_refresh_after_expiry_gets_437(allocated: Client) -> None:
    allocated.server.handle_timer(NOW + 600)
    assert error_code(allocated.request(Method.REFRESH, [], NOW + 601)) == 437


def test_family_mismatch_gets_443(allocated: Client) -> None:
    response = allocated.request(Method.REFRESH, [RequestedAddressFamily(FAMILY_IPV6)])
    assert error_code(response) == 443
    assert allocated.server.allocations[allocated.five_tuple].expiry == NOW + 600
    assert success(allocated.request(Method.REFRESH, [RequestedAddressFamily(FAMILY_IPV4)]))


def test_family_refresh_of_dual_allocation() -> None:
    server, _ = make_server(TurnSettings(fallback_relay_ips=("2001:db8::5",)))
    client = Client(server)
    assert success(client.allocate([AdditionalAddressFamily(FAMILY_IPV6)]))
    for family in (FAMILY_IPV4, FAMILY_IPV6):
        response = client.request(Method.REFRESH, [RequestedAddressFamily(family)])
        assert success(response)
    assert error_code(client.request(Method.REFRESH, [RequestedAddressFamily(0x07)])) == 443


def test_refresh_is_cached_per_transaction(allocated: Client, server: TurnServer) -> None:
    response = allocated.request(Method.REFRESH, [Lifetime(1000)], NOW + 100)
    # A retransmission is not a second refresh: the expiry stays where the first put it.
    assert allocated.send(allocated.last_request, NOW + 130) == response.raw
    assert server.allocations[allocated.five_tuple].expiry == NOW + 1100
