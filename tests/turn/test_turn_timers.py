"""The expiry heap: get_timer/handle_timer, and how allocations end."""

from __future__ import annotations

import random

from support.turn_harness import (
    NOW,
    PEER,
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
    ChannelNumber,
    EvenPort,
    Lifetime,
    Method,
    ReservationToken,
    XorPeerAddress,
)
from tsunagu.turn import AllocationCreated, AllocationEnded, TurnServer, TurnSettings


def test_no_timer_without_state(server: TurnServer, alice: Client) -> None:
    assert server.get_timer() is None
    alice.exchange(alice.build(Method.BINDING))
    alice.allocate(transport=False)  # refused: nothing scheduled
    assert server.get_timer() is None
    server.handle_timer(NOW + 10**6)  # harmless
    assert events(server) == []


def test_timer_is_the_earliest_deadline(allocated: Client) -> None:
    server = allocated.server
    assert server.get_timer() == NOW + 600
    assert success(allocated.request(Method.CREATE_PERMISSION, [XorPeerAddress(*PEER)], NOW + 10))
    assert server.get_timer() == NOW + 310


def test_handle_timer_before_the_deadline_changes_nothing(allocated: Client) -> None:
    server = allocated.server
    deadline = server.get_timer()
    assert deadline is not None
    server.handle_timer(deadline - 0.001)
    assert server.get_timer() == deadline
    assert allocated.five_tuple in server.allocations
    assert events(server) == []


def test_timer_after_handling_is_in_the_future() -> None:
    """Random operations with a clock that only moves forward; after handle_timer(now) the
    next timer is always later than now, and get_timer never lies about due work."""
    rng = random.Random(2024)
    server, binder = make_server(TurnSettings(min_port=50000, max_port=50199))
    clients = [Client(server, udp(("198.51.100.50", 1000 + n))) for n in range(6)]
    now = NOW
    for _ in range(400):
        now += rng.choice((0.0, 0.5, 7.0, 45.0, 120.0))
        client = rng.choice(clients)
        action = rng.randrange(6)
        if action == 0:
            client.allocate([Lifetime(rng.choice((0, 60, 700)))], now)
        elif action == 1:
            client.request(Method.REFRESH, [Lifetime(rng.choice((0, 30, 900)))], now)
        elif action == 2:
            client.request(Method.CREATE_PERMISSION, [XorPeerAddress(*PEER)], now)
        elif action == 3:
            number = 0x4000 + rng.randrange(3)
            peer = (PEER[0], 4000 + rng.randrange(3))
            client.request(Method.CHANNEL_BIND, [ChannelNumber(number), XorPeerAddress(*peer)], now)
        elif action == 4:
            client.allocate([EvenPort(reserve=True)], now)
        deadline = server.get_timer()
        if deadline is not None and deadline <= now:
            server.handle_timer(now)
        after = server.get_timer()
        assert after is None or after > now
        for allocation in server.allocations.values():
            assert allocation.expiry > now
            assert all(expiry > now for expiry in allocation.permissions.values())
            assert all(expiry > now for expiry in allocation.channel_expiry.values())
            assert set(allocation.channels) == set(allocation.channel_expiry)
            assert {peer: n for n, (_, peer) in allocation.channels.items()} == (
                allocation.peer_channels
            )
    # Everything still bound belongs to a live allocation or a reservation; shutdown frees it.
    live = {relay.address for a in server.allocations.values() for relay in a.relays.values()}
    assert live <= set(binder.bound)
    server.shutdown(now)
    assert not binder.bound


def test_allocation_expiry(binder: FakeBinder, allocated: Client) -> None:
    server = allocated.server
    allocation = server.allocations[allocated.five_tuple]
    assert success(
        allocated.request(Method.CHANNEL_BIND, [ChannelNumber(0x4000), XorPeerAddress(*PEER)])
    )
    server.handle_timer(NOW + 600)
    (ended,) = events(server)
    assert isinstance(ended, AllocationEnded)
    assert (ended.allocation, ended.reason, ended.ended_at) == (allocation, "expired", NOW + 600)
    assert allocation.ended
    assert allocation.permissions == {} and allocation.channels == {}
    assert allocation.peer_channels == {}
    assert binder.releases == [allocation.relays[4]]
    assert not binder.bound
    assert server.get_timer() is None  # the permission and channel entries went too


def test_expiry_frees_the_user_quota() -> None:
    server, _ = make_server(TurnSettings(user_quota=1))
    first = Client(server, udp(("198.51.100.1", 1)))
    second = Client(server, udp(("198.51.100.1", 2)))
    assert success(first.allocate())
    assert error_code(second.allocate()) == 486
    server.handle_timer(NOW + 600)
    assert success(second.allocate([], NOW + 601))


def test_reservation_expiry_releases_the_socket() -> None:
    server, binder = make_server(TurnSettings(reservation_lifetime=30))
    client = Client(server)
    response = client.allocate([EvenPort(reserve=True)])
    token = response.get(ReservationToken)
    assert token is not None
    allocation = server.allocations[client.five_tuple]
    reserved = (SERVER_IP, allocation.relays[4].address[1] + 1)
    assert reserved in binder.bound
    assert server.get_timer() == NOW + 30
    server.handle_timer(NOW + 29)
    assert reserved in binder.bound
    server.handle_timer(NOW + 30)
    assert reserved not in binder.bound
    assert [relay.address for relay in binder.releases] == [reserved]
    assert client.five_tuple in server.allocations
    later = Client(server, udp(("198.51.100.2", 2)), "bob", "bob-pw")
    assert error_code(later.allocate([ReservationToken(token.value)], NOW + 31)) == 508


def test_used_reservation_is_not_released_by_its_timer() -> None:
    server, binder = make_server()
    client = Client(server)
    token = client.allocate([EvenPort(reserve=True)]).get(ReservationToken)
    assert token is not None
    taker = Client(server, udp(("198.51.100.2", 2)), "bob", "bob-pw")
    assert success(taker.allocate([ReservationToken(token.value)], NOW + 5))
    server.handle_timer(NOW + 100)
    assert binder.releases == []
    assert len(server.allocations) == 2


def test_events_in_order(server: TurnServer, alice: Client) -> None:
    assert success(alice.allocate())
    assert success(alice.request(Method.REFRESH, [Lifetime(0)], NOW + 1))
    created, ended = events(server)
    assert isinstance(created, AllocationCreated) and isinstance(ended, AllocationEnded)
    assert created.allocation is ended.allocation
    assert ended.reason == "deleted"
    assert server.next_event() is None
    server.handle_timer(NOW + 600)  # the deleted allocation's deadline passes quietly
    assert server.next_event() is None


def test_connection_closed() -> None:
    server, binder = make_server()
    tcp = Client(server, udp(protocol="tcp"))
    assert success(tcp.allocate())
    events(server)
    server.connection_closed(udp(("198.51.100.99", 1), protocol="tcp"), NOW + 1)  # unknown
    assert events(server) == []
    server.connection_closed(tcp.five_tuple, NOW + 2)
    server.connection_closed(tcp.five_tuple, NOW + 3)  # already gone
    (ended,) = events(server)
    assert isinstance(ended, AllocationEnded)
    assert (ended.reason, ended.ended_at) == ("connection closed", NOW + 2)
    assert not server.allocations and not binder.bound


def test_shutdown_ends_everything() -> None:
    server, binder = make_server()
    clients = [Client(server, udp(("198.51.100.1", n))) for n in range(1, 4)]
    for client in clients:
        assert success(client.allocate())
    reserving = Client(server, udp(("198.51.100.1", 9)), "bob", "bob-pw")
    assert success(reserving.allocate([EvenPort(reserve=True)]))
    events(server)
    server.shutdown(NOW + 5)
    ended = events(server)
    assert len(ended) == 4
    assert all(isinstance(e, AllocationEnded) and e.reason == "shutdown" for e in ended)
    assert not server.allocations
    assert not binder.bound  # the reserved socket too
    server.handle_timer(NOW + 10_000)
    assert events(server) == []


def test_ended_allocations_leave_the_expiry_heap() -> None:
    """Reminders of allocations that ended (Refresh 0) do not keep them alive until their
    deadlines, up to a lifetime later: the heap drops them as allocations end."""
    import gc

    from tsunagu.turn.allocation import Allocation

    server, binder = make_server(
        TurnSettings(min_port=50000, max_port=50999, user_quota=0, address_quota=0)
    )
    clients = [Client(server, udp(("198.51.100.60", 2000 + n))) for n in range(300)]
    for client in clients:
        assert success(client.allocate())
        assert success(client.request(Method.CREATE_PERMISSION, [XorPeerAddress(*PEER)]))
        assert success(
            client.request(Method.CHANNEL_BIND, [ChannelNumber(0x4000), XorPeerAddress(*PEER)])
        )
    keeper = clients.pop()
    for client in clients:
        assert success(client.request(Method.REFRESH, [Lifetime(0)], NOW + 1))
    assert len(events(server)) == 300 + 299  # created, then ended
    gc.collect()
    ended = [o for o in gc.get_objects() if isinstance(o, Allocation) and o.ended]
    assert len(ended) < 64, f"{len(ended)} ended allocations still referenced"
    # The live one still expires on time, and everything is released.
    server.handle_timer(NOW + 600)
    assert keeper.five_tuple not in server.allocations
    assert server.get_timer() is None
    assert not binder.bound
