"""Several worker processes behind one address: a shared nonce secret, signed reservations.

Each worker is its own TurnServer. Here two of them share a FakeBinder, as the processes
share the machine's relay ports.
"""

from __future__ import annotations

import dataclasses

import pytest

from support.turn_harness import (
    NOW,
    SERVER_IP,
    Client,
    FakeBinder,
    error_code,
    make_server,
    stun,
    success,
    udp,
)
from tsunagu.stun import (
    FAMILY_IPV6,
    TRANSPORT_UDP,
    EvenPort,
    Lifetime,
    Method,
    Nonce,
    RequestedAddressFamily,
    RequestedTransport,
    ReservationToken,
    XorRelayedAddress,
    parse_message,
)
from tsunagu.turn import TurnServer, TurnSettings

SECRET = bytes(range(32))
SHARED = TurnSettings(nonce_secret=SECRET, shared_reservations=True, min_port=50000, max_port=50099)


def workers(settings: TurnSettings = SHARED) -> tuple[TurnServer, TurnServer, FakeBinder]:
    binder = FakeBinder()
    first, _ = make_server(settings, binder=binder, seed=1)
    second, _ = make_server(settings, binder=binder, seed=2)
    return first, second, binder


def reserve(server: TurnServer, port: int = 1, now: float = NOW) -> tuple[int, bytes]:
    """An EVEN-PORT allocation with R from a fresh client: (its relay port, the token)."""
    client = Client(server, udp(("198.51.100.30", port)))
    response = client.allocate([EvenPort(reserve=True)], now)
    relayed = response.get(XorRelayedAddress)
    token = response.get(ReservationToken)
    assert relayed is not None and token is not None
    return relayed.port, token.value


def redeem(server: TurnServer, token: bytes, port: int = 2, now: float = NOW) -> int:
    """Allocate with the token from another client: the relay port, or the error code."""
    client = Client(server, udp(("198.51.100.31", port)), "bob", "bob-pw")
    response = client.allocate([ReservationToken(token)], now)
    relayed = response.get(XorRelayedAddress)
    if relayed is None:
        code = error_code(response)
        assert code is not None
        return code
    return relayed.port


def test_nonce_from_one_worker_is_valid_at_another() -> None:
    first, second, _ = workers()
    challenge = first.receive(stun(Method.ALLOCATE), udp(), NOW)
    assert isinstance(challenge, bytes)
    client = Client(second)
    client.learn(parse_message(challenge))
    assert success(client.exchange(client.build(Method.ALLOCATE, [RequestedTransport(17)])))
    assert second.responses[401] == 0  # no new challenge was needed


def test_workers_without_a_shared_secret_reject_each_others_nonces() -> None:
    first, _ = make_server(seed=1)
    second, _ = make_server(seed=2)
    challenge = first.receive(stun(Method.ALLOCATE), udp(), NOW)
    assert isinstance(challenge, bytes)
    client = Client(second)
    client.learn(parse_message(challenge))
    raw = client.build(Method.ALLOCATE, [RequestedTransport(TRANSPORT_UDP)])
    assert error_code(client.exchange(raw)) == 438


def test_configured_secret_makes_nonces_deterministic() -> None:
    first, second, _ = workers()
    nonces = []
    for server in (first, second):
        answer = server.receive(stun(Method.REFRESH), udp(), NOW)
        assert isinstance(answer, bytes)
        nonce = parse_message(answer).get(Nonce)
        assert nonce is not None
        nonces.append(nonce.value)
    assert nonces[0] == nonces[1]


def test_signed_reservation_redeemed_by_another_worker() -> None:
    first, second, binder = workers()
    port, token = reserve(first)
    assert port % 2 == 0 and len(token) == 8
    assert (SERVER_IP, port + 1) not in binder.bound  # set aside, not held bound
    assert redeem(second, token) == port + 1
    assert (SERVER_IP, port + 1) in binder.bound
    # The port is in use now: the same token again cannot have it.
    assert redeem(first, token, 3) == 508


def test_signed_reservation_redeemed_by_the_same_worker() -> None:
    first, _, binder = workers()
    port, token = reserve(first)
    assert redeem(first, token) == port + 1
    allocation = next(a for a in first.allocations.values() if a.username == "bob")
    assert allocation.relays[4].address == (SERVER_IP, port + 1)
    # Freed with the allocation like any other relay.
    bob = Client(first, allocation.five_tuple, "bob", "bob-pw")
    assert success(bob.request(Method.REFRESH, [Lifetime(0)]))
    assert (SERVER_IP, port + 1) not in binder.bound


def test_set_aside_port_is_not_handed_out_until_it_expires() -> None:
    settings = dataclasses.replace(
        SHARED,
        min_port=50000,
        max_port=50003,
        reservation_lifetime=30,
        user_quota=0,
        address_quota=0,
    )
    server, _ = make_server(settings)
    port, _token = reserve(server)
    ports = set()
    for n in range(2):
        response = Client(server, udp(("198.51.100.40", n))).allocate()
        relayed = response.get(XorRelayedAddress)
        assert relayed is not None
        ports.add(relayed.port)
    assert ports == {50000, 50001, 50002, 50003} - {port, port + 1}
    late = Client(server, udp(("198.51.100.41", 1)))
    assert error_code(late.allocate()) == 508  # port + 1 is set aside
    assert server.get_timer() == NOW + 30
    server.handle_timer(NOW + 30)
    relayed = late.allocate([], NOW + 31).get(XorRelayedAddress)
    assert relayed is not None and relayed.port == port + 1


@pytest.mark.parametrize("index", range(8))
def test_tampered_token_gets_508(index: int) -> None:
    first, second, binder = workers()
    _, token = reserve(first)
    forged = bytearray(token)
    forged[index] ^= 0x01
    assert redeem(second, bytes(forged)) == 508
    assert len(binder.bound) == 1  # only the reserving allocation's relay


def test_token_expires() -> None:
    first, second, _ = workers()
    lifetime = SHARED.reservation_lifetime
    _, token = reserve(first)
    assert redeem(second, token, now=NOW + lifetime + 64) == 508


def test_token_for_a_family_without_relay_gets_508() -> None:
    settings = dataclasses.replace(SHARED, fallback_relay_ips=("2001:db8::5",))
    first, _ = make_server(settings)
    client = Client(first, udp(("198.51.100.30", 1)))
    response = client.allocate([EvenPort(reserve=True), RequestedAddressFamily(FAMILY_IPV6)])
    token = response.get(ReservationToken)
    assert token is not None and token.value[2] & 0x80  # the IPv6 flag
    # A worker with no IPv6 relay address cannot redeem it.
    second, _ = make_server(SHARED)
    assert redeem(second, token.value) == 508
    # One that has it can.
    third, _ = make_server(settings)
    assert redeem(third, token.value) % 2 == 1


def test_token_with_a_flipped_family_flag_gets_508() -> None:
    first, second, _ = workers()
    _, token = reserve(first)
    assert redeem(second, token[:2] + bytes((token[2] ^ 0x80,)) + token[3:]) == 508


def test_local_reservations_still_work_without_sharing() -> None:
    server, binder = make_server(TurnSettings(nonce_secret=SECRET))
    port, token = reserve(server)
    assert (SERVER_IP, port + 1) in binder.bound
    assert redeem(server, token) == port + 1


def test_redeemed_port_stays_taken_after_the_set_aside_lapses() -> None:
    settings = dataclasses.replace(
        SHARED,
        min_port=50000,
        max_port=50003,
        reservation_lifetime=30,
        user_quota=0,
        address_quota=0,
    )
    server, binder = make_server(settings)
    port, token = reserve(server)
    assert redeem(server, token) == port + 1
    server.handle_timer(NOW + 30)  # the set-aside entry is gone, the port is not free
    for n in range(2):
        assert success(Client(server, udp(("198.51.100.40", n))).allocate([], NOW + 31))
    assert error_code(Client(server, udp(("198.51.100.41", 1))).allocate([], NOW + 31)) == 508
    assert binder.refused == []  # the core never offered a port it knew was in use


def test_redeeming_worker_knows_the_port_is_in_use() -> None:
    settings = dataclasses.replace(SHARED, min_port=50000, max_port=50003)
    first, second, binder = workers(settings)
    port, token = reserve(first)
    assert redeem(second, token) == port + 1
    for n in range(3):
        Client(second, udp(("198.51.100.50", n))).allocate()
    # The second worker may bump into the first one's port, never into its own.
    assert (SERVER_IP, port + 1) not in binder.refused


def test_token_is_tied_to_its_relay_address() -> None:
    first, second, binder = workers()
    port, token = reserve(first)
    # A client that reached the workers on another of their addresses.
    other = Client(second, udp(("198.51.100.31", 9), ("192.0.2.2", 3478)), "bob", "bob-pw")
    assert error_code(other.allocate([ReservationToken(token)])) == 508
    assert ("192.0.2.2", port + 1) not in binder.bound
