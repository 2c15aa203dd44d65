"""What the TURN core tells the transports and the operator, one dataclass per event."""

from __future__ import annotations

from dataclasses import dataclass

from .allocation import Allocation

__all__ = ["AllocationCreated", "AllocationEnded", "Event"]


@dataclass(frozen=True, slots=True)
class AllocationCreated:
    """A new allocation: the transport attaches its client link and starts relaying."""

    allocation: Allocation


@dataclass(frozen=True, slots=True)
class AllocationEnded:
    """An allocation is gone: close its relay sockets and write the audit line.

    ``reason`` is one of "expired", "deleted" (Refresh with lifetime 0), "connection closed",
    "shutdown".
    """

    allocation: Allocation
    reason: str
    ended_at: float


Event = AllocationCreated | AllocationEnded
