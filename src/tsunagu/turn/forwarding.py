"""Client to peer: the one ChannelData rule (RFC 8656 §12.4, §12.6) and what it yields.

:func:`channel_data_forward` is the whole decision for a ChannelData message from a client:
which relay socket sends which bytes to which peer, or why the message is dropped. The
core's :meth:`~.server.TurnServer.receive` uses it, and so can a transport's listener that
looks the allocation up itself, so every path counts the same packets the same way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any, NamedTuple

from ..stun.attributes import Address
from .allocation import ForwardingState
from .bandwidth import admit

__all__ = ["Forward", "channel_data_forward", "over_limit", "send_failed", "within_limit"]


class Forward(NamedTuple):
    """Send ``data`` from ``relay`` to ``peer``."""

    relay: Any
    data: bytes
    peer: Address


# tuple.__new__ skips the NamedTuple's Python-level __new__: half the cost, per packet.
_new_forward = tuple.__new__


def channel_data_forward(
    state: ForwardingState | None,
    data: bytes,
    drops: Counter[str],
    clock: Callable[[], int] | None = None,
) -> Forward | None:
    """What to do with ChannelData ``data`` from the client of ``state`` (RFC 8656 §12.6).

    The caller guarantees that ``len(data) >= 4`` (a ChannelData header is there) and that
    ``state`` is the allocation of the 5-tuple the message came on, or None when that
    5-tuple has none. A message longer than its header says (UDP padding) is fine; a stream
    frame from :class:`~tsunagu.stun.framing.StreamFramer` is exactly header and payload.

    Returns a :class:`Forward` when the channel is bound and its peer has a permission, and
    counts the packet and its bytes as relayed to the peers; a caller whose send then fails
    calls :func:`send_failed`. Otherwise returns None and counts the drop by cause in
    ``drops`` ("no allocation", "short channel data", "unbound channel"; a channel without
    a live permission is "unbound" too, "bandwidth" over a limit of the allocation's
    :attr:`~.allocation.ForwardingState.limits`) and, when there is an allocation, in its
    ``dropped``.

    ``clock`` is the transport's monotonic clock in nanoseconds, read only when the
    allocation has bandwidth limits. Without one (the core's own
    :meth:`~.server.TurnServer.receive`, which has no monotonic clock and is not the
    relaying path) limits are not applied.
    """
    if state is None:
        drops["no allocation"] += 1
        return None
    length = (data[2] << 8) | data[3]
    if len(data) < 4 + length:
        state.dropped += 1
        drops["short channel data"] += 1
        return None
    entry = state.channels.get((data[0] << 8) | data[1])
    if entry is None or entry[1][0] not in state.permissions:
        state.dropped += 1
        drops["unbound channel"] += 1
        return None
    limits = state.limits
    if limits is not None and clock is not None and not admit(limits.to_peers, clock(), length):
        over_limit(state, drops)
        return None
    state.packets_to_peers += 1
    state.bytes_to_peers += length
    return _new_forward(Forward, (entry[0], data[4 : 4 + length], entry[1]))


def send_failed(state: ForwardingState | None, forward: Forward) -> None:
    """The transport could not send ``forward`` (unreachable peer, full buffer).

    The packet was counted as relayed when the forward was decided; it was lost instead, as
    a router loses it, so it moves from the relayed counters to ``dropped``.
    """
    if state is not None:
        state.packets_to_peers -= 1
        state.bytes_to_peers -= len(forward.data)
        state.dropped += 1


def over_limit(state: ForwardingState, drops: Counter[str]) -> None:
    """Count a packet a bandwidth limit refused, either way."""
    state.dropped += 1
    state.bandwidth_dropped += 1
    drops["bandwidth"] += 1


def within_limit(
    state: ForwardingState | None, forward: Forward, drops: Counter[str], now: int
) -> bool:
    """Whether a :class:`Forward` the core decided (a Send indication) fits the allocation's
    bandwidth limit towards the peers at ``now`` (monotonic ns); if not, it moves from the
    relayed counters to the drops, as :func:`send_failed` does."""
    if state is None or state.limits is None:
        return True
    if admit(state.limits.to_peers, now, len(forward.data)):
        return True
    state.packets_to_peers -= 1
    state.bytes_to_peers -= len(forward.data)
    over_limit(state, drops)
    return False
