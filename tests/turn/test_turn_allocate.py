"""Allocate (RFC 8656 §7.1-7.2, RFC 6156 / RFC 8656 dual allocations)."""

from __future__ import annotations

import pytest

from support.turn_harness import (
    CLIENT,
    NOW,
    SERVER,
    SERVER_IP,
    Client,
    FakeBinder,
    error_code,
    events,
    make_server,
    success,
    udp,
)
from tsunagu.stun import (
    FAMILY_IPV4,
    FAMILY_IPV6,
    TRANSPORT_TCP,
    AdditionalAddressFamily,
    AddressErrorCode,
    AlternateServer,
    Attribute,
    ChannelNumber,
    DontFragment,
    ErrorCode,
    EvenPort,
    Lifetime,
    Message,
    Method,
    RequestedAddressFamily,
    RequestedTransport,
    ReservationToken,
    Software,
    UnknownAttribute,
    UnknownAttributes,
    XorMappedAddress,
    XorPeerAddress,
    XorRelayedAddress,
)
from tsunagu.turn import AllocationCreated, TurnServer, TurnSettings

FALLBACK6 = "2001:db8::5"


def relayed(response: Message) -> list[tuple[str, int]]:
    return [a.address for a in response.get_all(XorRelayedAddress)]


def lifetime(response: Message) -> int:
    attribute = response.get(Lifetime)
    assert attribute is not None
    return attribute.value


def other(server: TurnServer, number: int, username: str = "alice") -> Client:
    """Another client (its own 5-tuple), same user unless told."""
    password = {"alice": "alice-pw", "bob": "bob-pw"}[username]
    return Client(server, udp(("198.51.100.100", 40000 + number)), username, password)


def test_success_attributes(alice: Client, server: TurnServer, binder: FakeBinder) -> None:
    response = alice.allocate()
    assert success(response)
    (address,) = relayed(response)
    assert address[0] == SERVER_IP
    assert server.settings.min_port <= address[1] <= server.settings.max_port
    assert lifetime(response) == server.settings.default_lifetime
    assert response.get(XorMappedAddress) == XorMappedAddress(*CLIENT)
    assert response.get(ReservationToken) is None
    assert response.integrity_offset is not None
    assert [relay.address for relay in binder.binds] == [address]
    assert not binder.binds[0].dont_fragment
    allocation = server.allocations[alice.five_tuple]
    assert allocation.username == "alice"
    assert allocation.relayed_addresses == {4: address}
    assert allocation.expiry == NOW + 600
    assert allocation.created == NOW
    (event,) = events(server)
    assert isinstance(event, AllocationCreated) and event.allocation is allocation


def test_retransmission_gets_identical_response(alice: Client, server: TurnServer) -> None:
    first = alice.allocate()
    again = alice.send(alice.last_request)
    assert again == first.raw
    # Also after the response cache has forgotten it: the allocation keeps its answer.
    later = NOW + server.settings.response_cache_lifetime + 1
    assert alice.send(alice.last_request, later) == first.raw
    assert len(server.allocations) == 1
    assert len(events(server)) == 1


def test_second_allocate_on_same_five_tuple_gets_437(allocated: Client) -> None:
    response = allocated.allocate()
    assert error_code(response) == 437
    assert len(allocated.server.allocations) == 1


def test_another_user_on_the_five_tuple_gets_437_on_allocate(allocated: Client) -> None:
    bob = Client(allocated.server, allocated.five_tuple, "bob", "bob-pw")
    assert error_code(bob.allocate()) == 437


def test_missing_requested_transport_gets_400(alice: Client, binder: FakeBinder) -> None:
    response = alice.allocate(transport=False)
    assert error_code(response) == 400
    assert not binder.binds


def test_tcp_transport_gets_442(alice: Client, binder: FakeBinder) -> None:
    response = alice.request(Method.ALLOCATE, [RequestedTransport(TRANSPORT_TCP)])
    assert error_code(response) == 442
    assert not binder.binds


def test_dont_fragment_reaches_the_binder(alice: Client, binder: FakeBinder) -> None:
    assert success(alice.allocate([DontFragment()]))
    assert binder.binds[0].dont_fragment
    assert alice.server.allocations[alice.five_tuple].dont_fragment


def test_explicit_relay_ip() -> None:
    server, _ = make_server(TurnSettings(relay_ips=("192.0.2.50", "2001:db8::50")))
    (address,) = relayed(Client(server).allocate())
    assert address[0] == "192.0.2.50"


def test_wildcard_listener_without_relay_ip_gets_440() -> None:
    server, binder = make_server()
    client = Client(server, udp(CLIENT, ("0.0.0.0", 3478)))
    assert error_code(client.allocate()) == 440
    assert not binder.binds


# --- EVEN-PORT and RESERVATION-TOKEN ---------------------------------------------------------


def test_even_port(alice: Client) -> None:
    response = alice.allocate([EvenPort(reserve=False)])
    (address,) = relayed(response)
    assert address[1] % 2 == 0
    assert response.get(ReservationToken) is None


def test_even_port_reserve_and_token(server: TurnServer, binder: FakeBinder) -> None:
    first = other(server, 1)
    response = first.allocate([EvenPort(reserve=True)])
    (address,) = relayed(response)
    assert address[1] % 2 == 0
    token = response.get(ReservationToken)
    assert token is not None and len(token.value) == 8
    assert (SERVER_IP, address[1] + 1) in binder.bound  # held for the token
    second = other(server, 2, "bob")
    response2 = second.allocate([ReservationToken(token.value)])
    assert success(response2)
    assert relayed(response2) == [(SERVER_IP, address[1] + 1)]
    assert len(binder.binds) == 2  # the reserved socket was handed over, not re-bound
    # A token is good once.
    third = other(server, 3)
    assert error_code(third.allocate([ReservationToken(token.value)])) == 508


def test_reserve_skips_a_pair_whose_odd_port_is_taken() -> None:
    binder = FakeBinder(taken={(SERVER_IP, port) for port in range(50001, 50100, 4)})
    server, _ = make_server(TurnSettings(min_port=50000, max_port=50099), binder=binder)
    response = Client(server).allocate([EvenPort(reserve=True)])
    (address,) = relayed(response)
    assert address[1] % 4 == 2  # 50000 + 4k + 1 are taken, so the pair starts at 4k + 2
    assert (SERVER_IP, address[1] + 1) in binder.bound
    assert len(binder.bound) == 2
    # Every even port whose partner was refused was given back.
    assert len(binder.releases) == len(binder.refused)


def test_reservation_fails_when_no_pair_fits() -> None:
    binder = FakeBinder(taken={(SERVER_IP, port) for port in range(50001, 50100, 2)})
    server, _ = make_server(TurnSettings(min_port=50000, max_port=50099), binder=binder)
    response = Client(server).allocate([EvenPort(reserve=True)])
    assert error_code(response) == 508
    assert not binder.bound  # nothing leaked
    assert len(binder.refused) == 32  # bounded number of attempts


def test_reserve_at_the_top_of_the_range() -> None:
    server, binder = make_server(TurnSettings(min_port=50000, max_port=50000))
    client = Client(server)
    assert error_code(client.allocate([EvenPort(reserve=True)])) == 508
    assert not binder.binds
    assert relayed(client.allocate([EvenPort()])) == [(SERVER_IP, 50000)]


@pytest.mark.parametrize(
    "extra", [EvenPort(), EvenPort(reserve=True), RequestedAddressFamily(FAMILY_IPV4)]
)
def test_token_with_even_port_or_family_gets_400(alice: Client, extra: Attribute) -> None:
    response = alice.allocate([ReservationToken(bytes(8)), extra])
    assert error_code(response) == 400
    assert not alice.server.allocations


def test_unknown_token_gets_508(alice: Client, binder: FakeBinder) -> None:
    response = alice.allocate([ReservationToken(b"12345678")])
    assert error_code(response) == 508
    assert not binder.binds


# --- address families ---------------------------------------------------------------------


def test_ipv6_without_ipv6_relay_gets_440(alice: Client, binder: FakeBinder) -> None:
    response = alice.allocate([RequestedAddressFamily(FAMILY_IPV6)])
    assert error_code(response) == 440
    assert not binder.binds


def test_bad_family_value_gets_440(alice: Client) -> None:
    assert error_code(alice.allocate([RequestedAddressFamily(0x03)])) == 440


def test_ipv6_relay_from_fallback() -> None:
    server, _ = make_server(TurnSettings(fallback_relay_ips=(FALLBACK6,)))
    client = Client(server)
    response = client.allocate([RequestedAddressFamily(FAMILY_IPV6)])
    (address,) = relayed(response)
    assert address[0] == FALLBACK6
    assert set(server.allocations[client.five_tuple].relays) == {6}


def test_ipv6_listener_relays_on_its_own_address() -> None:
    server, _ = make_server()
    client = Client(server, udp(("2001:db8::77", 1000), ("2001:db8::1", 3478)))
    response = client.allocate([RequestedAddressFamily(FAMILY_IPV6)])
    assert relayed(response)[0][0] == "2001:db8::1"
    # Without REQUESTED-ADDRESS-FAMILY the relay is IPv4, which this listener has not.
    other6 = Client(server, udp(("2001:db8::78", 1000), ("2001:db8::1", 3478)))
    assert error_code(other6.allocate()) == 440


def test_requested_and_additional_family_get_400(alice: Client) -> None:
    response = alice.allocate(
        [RequestedAddressFamily(FAMILY_IPV4), AdditionalAddressFamily(FAMILY_IPV6)]
    )
    assert error_code(response) == 400


def test_additional_family_ipv4_gets_400(alice: Client) -> None:
    assert error_code(alice.allocate([AdditionalAddressFamily(FAMILY_IPV4)])) == 400


def test_dual_allocation() -> None:
    server, binder = make_server(TurnSettings(fallback_relay_ips=(FALLBACK6,)))
    client = Client(server)
    response = client.allocate([AdditionalAddressFamily(FAMILY_IPV6)])
    assert success(response)
    addresses = relayed(response)
    assert [a[0] for a in addresses] == [SERVER_IP, FALLBACK6]
    assert response.get(AddressErrorCode) is None
    assert set(server.allocations[client.five_tuple].relays) == {4, 6}
    assert len(binder.bound) == 2


def test_dual_allocation_without_ipv6_reports_address_error(alice: Client) -> None:
    response = alice.allocate([AdditionalAddressFamily(FAMILY_IPV6)])
    assert success(response)
    assert len(relayed(response)) == 1
    assert response.get(AddressErrorCode) == AddressErrorCode(
        FAMILY_IPV6, 440, "Address Family not Supported"
    )


def test_dual_allocation_with_ipv6_ports_exhausted_reports_508() -> None:
    binder = FakeBinder(taken={(FALLBACK6, port) for port in range(50000, 50010)})
    server, _ = make_server(
        TurnSettings(fallback_relay_ips=(FALLBACK6,), min_port=50000, max_port=50009),
        binder=binder,
    )
    response = Client(server).allocate([AdditionalAddressFamily(FAMILY_IPV6)])
    assert success(response)
    assert [a[0] for a in relayed(response)] == [SERVER_IP]
    error = response.get(AddressErrorCode)
    assert error is not None and (error.family, error.code) == (FAMILY_IPV6, 508)


# --- LIFETIME ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("asked", "granted"), [(None, 600), (0, 600), (10, 600), (1200, 1200), (100_000, 3600)]
)
def test_lifetime_clamping(alice: Client, asked: int | None, granted: int) -> None:
    response = alice.allocate([] if asked is None else [Lifetime(asked)])
    assert lifetime(response) == granted
    assert alice.server.allocations[alice.five_tuple].expiry == NOW + granted


# --- quotas, draining, capacity ------------------------------------------------------------


def test_user_quota_gets_486() -> None:
    server, _ = make_server(TurnSettings(user_quota=2))
    assert success(other(server, 1).allocate())
    assert success(other(server, 2).allocate())
    third = other(server, 3)
    assert error_code(third.allocate()) == 486
    assert success(other(server, 4, "bob").allocate())  # per user
    # Freeing one of alice's allocations lets her allocate again.
    first = Client(server, udp(("198.51.100.100", 40001)))
    first.nonce, first.offered = third.nonce, third.offered
    assert success(first.request(Method.REFRESH, [Lifetime(0)]))
    assert success(third.allocate())


def test_total_quota_gets_508() -> None:
    # Per-source quotas are at most half the total unless given: here they are not the point.
    server, _ = make_server(TurnSettings(total_quota=2, user_quota=0, address_quota=0))
    assert success(other(server, 1).allocate())
    assert success(other(server, 2, "bob").allocate())
    response = other(server, 3, "bob").allocate()
    assert error_code(response) == 508
    assert len(server.allocations) == 2


def test_draining_gets_508_and_keeps_existing(allocated: Client) -> None:
    server = allocated.server
    server.start_drain()
    assert error_code(other(server, 1).allocate()) == 508
    assert success(allocated.request(Method.REFRESH))
    assert len(server.allocations) == 1


def test_draining_with_alternate_server_gets_300() -> None:
    server, binder = make_server(TurnSettings(alternate_servers=(("203.0.113.5", 3478),)))
    server.start_drain()
    response = Client(server).allocate()
    assert error_code(response) == 300
    assert response.get(AlternateServer) == AlternateServer("203.0.113.5", 3478)
    assert response.has_integrity
    assert not binder.binds


def test_an_allocate_through_an_aux_server_is_never_redirected() -> None:
    """As coturn's aux servers never answer ALTERNATE-SERVER: their clients may reach that
    one port only. While draining they get 508; the main port's clients still get 300."""
    aux = (SERVER_IP, 443)
    server, binder = make_server(
        TurnSettings(alternate_servers=(("203.0.113.5", 3478),), aux_addresses=frozenset({aux}))
    )
    # Served like any other client while not draining, relayed from the address reached.
    first = Client(server, udp(("198.51.100.100", 40001), aux))
    response = first.allocate()
    assert success(response)
    assert relayed(response)[0][0] == SERVER_IP
    server.start_drain()
    for protocol in ("udp", "tcp", "tls"):
        response = Client(server, udp(("198.51.100.100", 40002), aux, protocol)).allocate()
        assert error_code(response) == 508, protocol
        assert response.get(AlternateServer) is None
    # The same IP on the main port, and the aux port on another IP, are not the aux server.
    for address in (SERVER, ("192.0.2.2", 443)):
        response = Client(server, udp(("198.51.100.100", 40003), address)).allocate()
        assert error_code(response) == 300, address
    assert len(binder.binds) == 1


def test_draining_names_each_alternate_server_in_turn() -> None:
    alternates = (("203.0.113.5", 3478), ("2001:db8::5", 3479), ("203.0.113.6", 443))
    server, _ = make_server(TurnSettings(alternate_servers=alternates))
    server.start_drain()
    named = []
    for n in range(7):
        client = other(server, n)
        response = client.allocate()
        assert error_code(response) == 300
        alternate = response.get(AlternateServer)
        assert alternate is not None
        named.append(alternate.address)
        # A retransmission gets the same answer, not the next server.
        assert client.exchange(client.last_request).get(AlternateServer) == alternate
    assert named == [*alternates, *alternates, alternates[0]]


def test_all_ports_taken_gets_508() -> None:
    binder = FakeBinder(taken={(SERVER_IP, port) for port in range(50000, 50010)})
    server, _ = make_server(TurnSettings(min_port=50000, max_port=50009), binder=binder)
    assert error_code(Client(server).allocate()) == 508
    assert sorted(port for _, port in binder.refused) == list(range(50000, 50010))
    assert not server.allocations


def test_port_search_gives_up_after_bounded_failures() -> None:
    binder = FakeBinder(taken={(SERVER_IP, port) for port in range(50000, 51000)})
    server, _ = make_server(TurnSettings(min_port=50000, max_port=50999), binder=binder)
    assert error_code(Client(server).allocate()) == 508
    assert len(binder.refused) == 32


def test_taken_ports_are_skipped() -> None:
    binder = FakeBinder(taken={(SERVER_IP, port) for port in range(50000, 50009)})
    server, _ = make_server(TurnSettings(min_port=50000, max_port=50009), binder=binder)
    assert relayed(Client(server).allocate()) == [(SERVER_IP, 50009)]


def test_ports_in_use_are_not_handed_out_twice() -> None:
    # Every port for one address and one user: per-source quotas are not the point here.
    server, binder = make_server(
        TurnSettings(min_port=50000, max_port=50003, user_quota=0, address_quota=0)
    )
    ports = set()
    for number in range(4):
        (address,) = relayed(other(server, number).allocate())
        ports.add(address[1])
    assert ports == {50000, 50001, 50002, 50003}
    assert not binder.refused  # the core knew which ports it had itself
    assert error_code(other(server, 9).allocate()) == 508


def test_unknown_required_attribute_gets_420(alice: Client, binder: FakeBinder) -> None:
    response = alice.allocate([UnknownAttribute(0x0031, b"x"), UnknownAttribute(0x7ABC, b"")])
    assert error_code(response) == 420
    assert response.get(UnknownAttributes) == UnknownAttributes((0x0031, 0x7ABC))
    assert not binder.binds


def test_external_ip_mapping() -> None:
    settings = TurnSettings(
        external_ips=(("203.0.113.50", SERVER_IP), ("2001:db8:ffff::1", None)),
        fallback_relay_ips=(FALLBACK6,),
    )
    server, binder = make_server(settings)
    client = Client(server)
    response = client.allocate([AdditionalAddressFamily(FAMILY_IPV6)])
    addresses = relayed(response)
    ports = {relay.ip: relay.port for relay in binder.binds}
    assert addresses == [("203.0.113.50", ports[SERVER_IP]), ("2001:db8:ffff::1", ports[FALLBACK6])]
    allocation = server.allocations[client.five_tuple]
    assert allocation.relays[4].address == (SERVER_IP, ports[SERVER_IP])  # bound privately
    assert allocation.relayed_addresses[4] == addresses[0]


def test_external_ip_for_another_private_address_is_not_used() -> None:
    server, _ = make_server(TurnSettings(external_ips=(("203.0.113.50", "192.0.2.99"),)))
    assert relayed(Client(server).allocate())[0][0] == SERVER_IP


@pytest.mark.parametrize("method", [Method.REFRESH, Method.CREATE_PERMISSION, Method.CHANNEL_BIND])
def test_another_user_on_the_five_tuple_gets_441(allocated: Client, method: Method) -> None:
    bob = Client(allocated.server, allocated.five_tuple, "bob", "bob-pw")
    choices: dict[Method, list[Attribute]] = {
        Method.REFRESH: [],
        Method.CREATE_PERMISSION: [XorPeerAddress("8.8.8.8", 1)],
        Method.CHANNEL_BIND: [ChannelNumber(0x4000), XorPeerAddress("8.8.8.8", 1)],
    }
    response = bob.request(method, choices[method])
    assert error_code(response) == 441
    assert response.has_integrity  # bob authenticated: his key signs the answer
    allocation = allocated.server.allocations[allocated.five_tuple]
    assert not allocation.permissions and not allocation.channels


def test_allocation_on_tcp_five_tuple() -> None:
    server, _ = make_server()
    client = Client(server, udp(protocol="tcp"))
    assert success(client.allocate())
    # The same addresses over UDP are another 5-tuple.
    assert error_code(Client(server).request(Method.REFRESH)) == 437


def test_error_code_reason_is_bounded(alice: Client) -> None:
    response = alice.allocate([ReservationToken(bytes(8)), EvenPort()])
    reason = response.get(ErrorCode)
    assert reason is not None and len(reason.reason.encode()) <= 127


def test_fallback_relay_ip_of_the_right_family() -> None:
    server, _ = make_server(TurnSettings(fallback_relay_ips=("192.0.2.9", FALLBACK6)))
    six = Client(server, udp(("198.51.100.1", 1)))
    assert relayed(six.allocate([RequestedAddressFamily(FAMILY_IPV6)]))[0][0] == FALLBACK6
    # A wildcard listener has no address of its own to relay on: the fallback serves.
    wildcard = Client(server, udp(("198.51.100.1", 2), ("0.0.0.0", 3478)))
    assert relayed(wildcard.allocate())[0][0] == "192.0.2.9"
    # The listener's own address wins over the fallback.
    assert relayed(Client(server).allocate())[0][0] == SERVER_IP


def test_software_only_on_authenticated_answers() -> None:
    server, _ = make_server(TurnSettings(software="tsunagu/test"))
    client = Client(server)
    challenge = client.exchange(client.build(Method.ALLOCATE, []))
    assert error_code(challenge) == 401
    assert challenge.get(Software) is None  # nothing to amplify with
    response = client.allocate()  # integrity checked by the client, SOFTWARE included
    assert response.get(Software) == Software("tsunagu/test")
    assert error_code(client.allocate()) == 437


def test_released_ports_are_handed_out_again() -> None:
    server, binder = make_server(
        TurnSettings(
            min_port=50000, max_port=50001, reservation_lifetime=30, user_quota=0, address_quota=0
        )
    )
    first, second, third = (other(server, n) for n in range(3))
    assert success(first.allocate())
    response = second.allocate()
    assert success(response)
    assert error_code(third.allocate()) == 508
    assert success(second.request(Method.REFRESH, [Lifetime(0)]))  # frees its port
    assert relayed(third.allocate()) == relayed(response)
    server.handle_timer(NOW + 600)  # both expire
    assert not binder.bound
    fourth = other(server, 4, "bob")
    token = fourth.allocate([EvenPort(reserve=True)], NOW + 601).get(ReservationToken)
    assert token is not None
    server.handle_timer(NOW + 631)  # the reservation lapses: its port is free again
    assert success(other(server, 5, "bob").allocate([], NOW + 632))


def test_five_tuple_text() -> None:
    assert str(udp()) == "udp:198.51.100.7:50000->192.0.2.1:3478"
    six = udp(("2001:db8::7", 5), ("2001:db8::1", 3478), protocol="tls")
    assert str(six) == "tls:[2001:db8::7]:5->[2001:db8::1]:3478"
