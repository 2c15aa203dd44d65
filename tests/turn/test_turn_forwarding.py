"""The ChannelData rule shared by the core and the listeners (RFC 8656 §12.6)."""

from __future__ import annotations

from collections import Counter

import pytest

from support.turn_harness import NOW, PEER, PEER2, Client, FakeRelay, channel_data, success
from tsunagu.stun import ChannelNumber, Method, XorPeerAddress
from tsunagu.turn import Forward, ForwardingState, channel_data_forward
from tsunagu.turn.forwarding import send_failed

RELAY = FakeRelay("192.0.2.1", 50000)


@pytest.fixture
def state() -> ForwardingState:
    """Channel 0x4000 bound to PEER with a permission; 0x4001 bound to PEER2 without."""
    state = ForwardingState()
    state.relays[4] = RELAY
    state.channels[0x4000] = (RELAY, PEER)
    state.peer_channels[PEER] = 0x4000
    state.channels[0x4001] = (RELAY, PEER2)
    state.peer_channels[PEER2] = 0x4001
    state.permissions[PEER[0]] = NOW + 300
    return state


def test_bound_channel_with_permission_is_forwarded(state: ForwardingState) -> None:
    drops: Counter[str] = Counter()
    forward = channel_data_forward(state, channel_data(0x4000, b"hello"), drops)
    assert type(forward) is Forward
    assert forward == Forward(RELAY, b"hello", PEER)
    assert (forward.relay, forward.data, forward.peer) == (RELAY, b"hello", PEER)
    assert (state.packets_to_peers, state.bytes_to_peers, state.dropped) == (1, 5, 0)
    assert not drops


def test_udp_padding_is_not_payload(state: ForwardingState) -> None:
    padded = channel_data(0x4000, b"abc") + b"\x00"
    forward = channel_data_forward(state, padded, Counter())
    assert forward == Forward(RELAY, b"abc", PEER)
    assert state.bytes_to_peers == 3


def test_empty_payload_is_forwarded(state: ForwardingState) -> None:
    assert channel_data_forward(state, channel_data(0x4000, b""), Counter()) == Forward(
        RELAY, b"", PEER
    )
    assert (state.packets_to_peers, state.bytes_to_peers) == (1, 0)


@pytest.mark.parametrize(
    ("data", "cause"),
    [
        (channel_data(0x4000, b"payload")[:-1], "short channel data"),
        (channel_data(0x4002, b"x"), "unbound channel"),
        (channel_data(0x4001, b"x"), "unbound channel"),  # bound, but no permission
        (channel_data(0x7FFF, b"x"), "unbound channel"),
        (b"\x40\x02\x00\x00", "unbound channel"),  # a header alone
    ],
)
def test_drops_count_on_the_allocation_and_by_cause(
    state: ForwardingState, data: bytes, cause: str
) -> None:
    drops: Counter[str] = Counter()
    assert channel_data_forward(state, data, drops) is None
    assert drops == Counter({cause: 1})
    assert (state.dropped, state.packets_to_peers, state.bytes_to_peers) == (1, 0, 0)


def test_no_allocation_counts_by_cause_only() -> None:
    drops: Counter[str] = Counter()
    assert channel_data_forward(None, channel_data(0x4000, b"x"), drops) is None
    assert drops == Counter({"no allocation": 1})


def test_the_core_uses_the_same_rule(allocated: Client) -> None:
    response = allocated.request(
        Method.CHANNEL_BIND, [ChannelNumber(0x4000), XorPeerAddress(*PEER)]
    )
    assert success(response)
    server = allocated.server
    allocation = server.allocations[allocated.five_tuple]
    sent = [
        channel_data(0x4000, b"abcd"),
        channel_data(0x4000, b"abcd")[:-1],
        channel_data(0x4001, b"x"),
    ]
    direct: Counter[str] = Counter()
    mirror = ForwardingState()
    mirror.channels.update(allocation.channels)
    mirror.permissions.update(allocation.permissions)
    for data in sent:
        assert allocated.send(data, NOW) == channel_data_forward(mirror, data, direct)
    assert server.drops == direct
    counted = (allocation.packets_to_peers, allocation.bytes_to_peers, allocation.dropped)
    assert counted == (mirror.packets_to_peers, mirror.bytes_to_peers, mirror.dropped)
    assert counted == (1, 4, 2)


def test_a_send_that_failed_counts_as_dropped_not_relayed(state: ForwardingState) -> None:
    drops: Counter[str] = Counter()
    forward = channel_data_forward(state, channel_data(0x4000, b"hello"), drops)
    assert forward is not None
    send_failed(state, forward)
    assert (state.packets_to_peers, state.bytes_to_peers, state.dropped) == (0, 0, 1)
    send_failed(None, forward)  # the allocation is gone already: nothing to count
    assert not drops
