"""The core's expiry heap: one timer for allocations, permissions, channels, reservations.

Each entry says what may expire; the entry type tells which (:data:`Expiry`). An entry is a
reminder, not the expiry itself: the deadline that counts is kept with the thing (an
allocation's ``expiry``, a permission's value in ``permissions``, a channel's in
``channel_expiry``), so refreshing costs a dictionary write, and when a reminder comes due
its handler either removes the thing or schedules a new reminder at the later deadline.
Entries of the same deadline come out in the order they were scheduled.

An ended allocation's reminders would stay in the heap (and keep the allocation, its relays
and its buffers alive) until their deadlines, up to a lifetime later: the core calls
:meth:`ExpiryHeap.drop_ended` once as many allocations have ended as are still live, which
keeps the cost per ended allocation constant and the heap free of the dead.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from .allocation import Allocation

__all__ = [
    "AllocationExpiry",
    "ChannelExpiry",
    "Expiry",
    "ExpiryHeap",
    "PermissionExpiry",
    "ReservationExpiry",
    "SetAsideExpiry",
]


@dataclass(frozen=True, slots=True)
class AllocationExpiry:
    """The allocation's lifetime may be over (RFC 8656 §7)."""

    allocation: Allocation


@dataclass(frozen=True, slots=True)
class PermissionExpiry:
    """The permission for ``ip`` may be over (RFC 8656 §9)."""

    allocation: Allocation
    ip: str


@dataclass(frozen=True, slots=True)
class ChannelExpiry:
    """The binding of channel ``number`` may be over (RFC 8656 §12)."""

    allocation: Allocation
    number: int


@dataclass(frozen=True, slots=True)
class ReservationExpiry:
    """The relay socket held for RESERVATION-TOKEN ``token`` may be released (§7.2)."""

    token: bytes


@dataclass(frozen=True, slots=True)
class SetAsideExpiry:
    """``ip:port``, set aside for a signed reservation token, may be handed out again."""

    ip: str
    port: int


Expiry = AllocationExpiry | PermissionExpiry | ChannelExpiry | ReservationExpiry | SetAsideExpiry


def _of_ended(entry: Expiry) -> bool:
    if isinstance(entry, AllocationExpiry | PermissionExpiry | ChannelExpiry):
        return entry.allocation.ended
    return False


class ExpiryHeap:
    """Entries by deadline; a sequence number keeps equal deadlines in scheduling order."""

    __slots__ = ("_heap", "_sequence")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Expiry]] = []
        self._sequence = 0

    def schedule(self, deadline: float, entry: Expiry) -> None:
        self._sequence += 1
        heapq.heappush(self._heap, (deadline, self._sequence, entry))

    def next_deadline(self) -> float | None:
        """The earliest deadline, or None when nothing is scheduled."""
        return self._heap[0][0] if self._heap else None

    def __len__(self) -> int:
        return len(self._heap)

    def drop_ended(self) -> int:
        """Remove the entries of ended allocations; how many there were."""
        kept = [item for item in self._heap if not _of_ended(item[2])]
        dropped = len(self._heap) - len(kept)
        if dropped:
            heapq.heapify(kept)
            self._heap = kept
        return dropped

    def pop_due(self, now: float) -> Expiry | None:
        """The next entry whose deadline is at or before ``now``, or None."""
        heap = self._heap
        if heap and heap[0][0] <= now:
            return heapq.heappop(heap)[2]
        return None
