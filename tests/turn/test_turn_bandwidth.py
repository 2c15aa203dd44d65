"""Bandwidth limits: the token bucket arithmetic and which buckets an allocation gets."""

from __future__ import annotations

from collections import Counter

import pytest

from support.turn_harness import (
    NOW,
    PEER,
    Client,
    FakeRelay,
    channel_data,
    make_server,
    success,
    udp,
)
from tsunagu.turn import Forward, ForwardingState, TurnServer, TurnSettings, channel_data_forward
from tsunagu.turn.bandwidth import MAX_BPS, NS, Limits, admit, new_bucket
from tsunagu.turn.forwarding import within_limit

RELAY = FakeRelay("192.0.2.1", 50000)
START = 10**12  # a monotonic clock reading, in ns


def test_a_new_bucket_is_full_and_passes_one_second_at_once() -> None:
    bucket = new_bucket(1000)
    assert list(bucket) == [1000 * NS, 0, 1000, 1000 * NS]
    assert admit((bucket,), START, 1000)
    assert not admit((bucket,), START, 1)
    # A millisecond refills one byte at 1000 bytes per second, exactly.
    assert admit((bucket,), START + 1_000_000, 1)
    assert bucket[0] == 0


def test_a_quiet_bucket_refills_to_one_second_and_no_more() -> None:
    bucket = new_bucket(1000)
    assert admit((bucket,), START, 1000)
    assert not admit((bucket,), START + 10 * NS, 1001)
    assert admit((bucket,), START + 10 * NS, 1000)


def test_a_clock_going_backwards_refills_nothing() -> None:
    bucket = new_bucket(1000)
    assert admit((bucket,), START, 1000)
    assert not admit((bucket,), START - NS, 1)
    assert bucket[1] == START


def test_a_flood_is_held_to_the_rate_after_the_burst() -> None:
    bucket = new_bucket(10_000)
    passed = 0
    for tick in range(10_000):  # 100 bytes every millisecond for 10 s: 10x the rate
        if admit((bucket,), START + tick * 1_000_000, 100):
            passed += 100
    # One second's burst, then 10,000 bytes per second, within a packet.
    assert abs(passed - (10_000 + 10_000 * 9.999)) <= 100


def test_a_packet_passes_only_when_every_bucket_holds_it_and_then_pays_each() -> None:
    small, large = new_bucket(100), new_bucket(10_000)
    assert admit((large, small), START, 100)
    assert large[0] == (10_000 - 100) * NS
    assert not admit((large, small), START, 50)  # the small one is empty
    assert large[0] == (10_000 - 100) * NS  # nothing paid for a refused packet


def test_rates_are_bounded() -> None:
    with pytest.raises(ValueError):
        new_bucket(0)
    with pytest.raises(ValueError):
        new_bucket(MAX_BPS + 1)
    bucket = new_bucket(MAX_BPS)
    assert admit((bucket,), START, 65535)
    assert admit((bucket,), START + 10 * NS, 65535)
    assert bucket[0] < 2**63


def limited_state(rate: int) -> tuple[ForwardingState, Counter[str]]:
    state = ForwardingState()
    state.relays[4] = RELAY
    state.channels[0x4000] = (RELAY, PEER)
    state.peer_channels[PEER] = 0x4000
    state.permissions[PEER[0]] = NOW + 300
    drops: Counter[str] = Counter()
    state.limits = Limits((new_bucket(rate),), (new_bucket(rate),), drops)
    return state, drops


def test_channel_data_over_the_limit_is_dropped_as_bandwidth() -> None:
    state, drops = limited_state(10)
    data = channel_data(0x4000, b"x" * 10)
    assert channel_data_forward(state, data, drops, lambda: START) is not None
    assert channel_data_forward(state, data, drops, lambda: START) is None
    assert drops == Counter({"bandwidth": 1})
    assert (state.packets_to_peers, state.bytes_to_peers) == (1, 10)
    assert (state.dropped, state.bandwidth_dropped) == (1, 1)
    # The core's own receive has no clock and does not meter.
    assert channel_data_forward(state, data, drops) is not None


def test_a_send_indication_over_the_limit_moves_to_the_drops() -> None:
    state, drops = limited_state(10)
    forward = Forward(RELAY, b"y" * 10, PEER)
    for _ in range(2):  # as the core counts a Send indication it forwards
        state.packets_to_peers += 1
        state.bytes_to_peers += 10
    assert within_limit(state, forward, drops, START)
    assert not within_limit(state, forward, drops, START)
    assert (state.packets_to_peers, state.bytes_to_peers, state.bandwidth_dropped) == (1, 10, 1)
    assert within_limit(None, forward, drops, START)


def allocate(server: TurnServer, username: str, port: int) -> Client:
    client = Client(server, udp(("198.51.100.7", port)), username, f"{username}-pw")
    assert success(client.allocate())
    return client


def test_without_limits_an_allocation_has_none() -> None:
    server, _ = make_server()
    client = allocate(server, "alice", 50000)
    assert server.allocations[client.five_tuple].limits is None


def test_each_allocation_its_own_bucket_a_user_shares_one_the_worker_shares_one() -> None:
    settings = TurnSettings(max_bps=1000, user_max_bps=5000, bps_capacity=9000)
    server, _ = make_server(settings)
    a1, a2 = allocate(server, "alice", 50000), allocate(server, "alice", 50001)
    b = allocate(server, "bob", 50002)
    la1, la2, lb = (server.allocations[c.five_tuple].limits for c in (a1, a2, b))
    assert la1 is not None and la2 is not None and lb is not None
    assert [bucket[2] for bucket in la1.to_peers] == [1000, 5000, 9000]
    assert la1.to_peers[0] is not la2.to_peers[0]  # per allocation
    assert la1.to_peers[1] is la2.to_peers[1]  # per user
    assert la1.to_peers[1] is not lb.to_peers[1]
    assert la1.to_peers[2] is lb.to_peers[2] and la1.to_client[2] is lb.to_client[2]
    assert la1.to_peers[2] is not la1.to_client[2]  # each direction its own
    assert la1.drops is server.drops
    # The user's buckets go with the user's last allocation.
    shared = la1.to_peers[1]
    server.end_allocations(lambda allocation: allocation.username == "alice", "killed", NOW)
    again = allocate(server, "alice", 50003)
    limits = server.allocations[again.five_tuple].limits
    assert limits is not None and limits.to_peers[1] is not shared


def test_a_new_max_bps_applies_to_new_allocations() -> None:
    server, _ = make_server()
    first = allocate(server, "alice", 50000)
    server.set_max_bps(2000)
    second = allocate(server, "alice", 50001)
    assert server.allocations[first.five_tuple].limits is None
    limits = server.allocations[second.five_tuple].limits
    assert limits is not None and [b[2] for b in limits.to_client] == [2000]
    server.set_max_bps(0)
    assert server.allocations[allocate(server, "bob", 50002).five_tuple].limits is None


def test_a_reload_retunes_the_shared_buckets_of_live_allocations() -> None:
    server, _ = make_server(TurnSettings(max_bps=1000, user_max_bps=5000, bps_capacity=9000))
    live = allocate(server, "alice", 50000)
    limits = server.allocations[live.five_tuple].limits
    assert limits is not None
    server.reconfigure(TurnSettings(max_bps=2000, user_max_bps=3000, bps_capacity=4000))
    # The allocation's own bucket keeps its rate; the user's and the worker's take the new
    # one at once, with no more tokens than the new capacity.
    assert [b[2] for b in limits.to_peers] == [1000, 3000, 4000]
    assert [b[3] for b in limits.to_client] == [1000 * NS, 3000 * NS, 4000 * NS]
    assert all(b[0] <= b[3] for b in limits.to_peers + limits.to_client)
    new = server.allocations[allocate(server, "alice", 50001).five_tuple].limits
    assert new is not None and [b[2] for b in new.to_peers] == [2000, 3000, 4000]
    assert new.to_peers[1] is limits.to_peers[1] and new.to_peers[2] is limits.to_peers[2]

    # Limits removed: live buckets open up, new allocations get none.
    server.reconfigure(TurnSettings())
    assert [b[2] for b in limits.to_peers] == [1000, MAX_BPS, MAX_BPS]
    assert server.allocations[allocate(server, "bob", 50002).five_tuple].limits is None
    # And a server without a capacity gets one.
    server.reconfigure(TurnSettings(bps_capacity=700))
    later = server.allocations[allocate(server, "bob", 50003).five_tuple].limits
    assert later is not None and [b[2] for b in later.to_peers] == [700]


def test_retune_keeps_the_rate_bounded() -> None:
    from tsunagu.turn.bandwidth import retune

    bucket = new_bucket(1000)
    retune(bucket, 10)
    assert list(bucket) == [10 * NS, 0, 10, 10 * NS]
    with pytest.raises(ValueError):
        retune(bucket, 0)
