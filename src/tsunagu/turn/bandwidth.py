"""Bandwidth limits: token buckets in bytes per second, one per direction (coturn's max-bps).

Three limits may apply to a relayed packet, each a pair of buckets (client to peers, peers
to client; coturn likewise treats the two directions separately):

* ``max_bps``: per allocation (coturn's ``--max-bps``, a session's bytes per second, and the
  realm option of that name in a user database);
* ``user_max_bps``: per user id (:func:`~.quotas.user_id`), shared by the user's
  allocations in this worker, as the user quota counts them;
* ``bps_capacity``: the whole worker, shared by every allocation (coturn's
  ``--bps-capacity``; the process wiring gives each worker its share).

What is counted is the relayed payload: the bytes a peer receives or sent, without the
ChannelData or Data indication wrapping. A packet passes only when every bucket that applies
holds its size; then each of them pays it. A refused packet is dropped and counted by the
cause ``"bandwidth"``.

The arithmetic is integer, in one unit, so that the C path (``transport/_fastpath.c``,
``admit_buckets``) and :func:`admit` decide the same on the same packets at the same times:
a bucket is an ``array('q')`` of :data:`BUCKET_FIELDS` signed 64-bit integers, ``tokens``
and ``capacity`` in bytes x 10^9, ``stamp`` the monotonic clock in nanoseconds when the
tokens were last refilled, ``rate`` in bytes per second. Nanoseconds times bytes per second
is bytes x 10^9, so a refill is one multiplication without rounding. The capacity is
:data:`BURST_SECONDS` of the rate: a keyframe after a quiet second passes whole. A bucket
starts full (its stamp 0 is long ago); time that goes backwards refills nothing.

The core holds no clock: the transports pass ``now`` from the monotonic clock in
nanoseconds (Python's ``time.monotonic_ns``, C's ``CLOCK_MONOTONIC``: the same clock).
"""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass

__all__ = [
    "BUCKET_FIELDS",
    "BURST_SECONDS",
    "MAX_BPS",
    "NS",
    "Limits",
    "admit",
    "new_bucket",
    "retune",
]

NS = 1_000_000_000
"""Nanoseconds per second: the scale of tokens and of the clock."""
BURST_SECONDS = 1
"""A bucket holds one second of its rate: a video keyframe after a quiet second passes."""
MAX_BPS = 0xFFFF_FFFF
"""The highest rate, about 34 Gbit/s: full bucket plus one second's refill stays within a
signed 64-bit integer in the C path."""
BUCKET_FIELDS = 4
"""tokens, stamp, rate, capacity: the layout the C path reads."""
_TOKENS, _STAMP = 0, 1
_MAX_ELAPSED = BURST_SECONDS * NS


def new_bucket(rate: int) -> array[int]:
    """A full bucket for ``rate`` bytes per second (1 to :data:`MAX_BPS`)."""
    if not 0 < rate <= MAX_BPS:
        raise ValueError(f"rate must be 1-{MAX_BPS} bytes per second")
    capacity = rate * NS * BURST_SECONDS
    return array("q", (capacity, 0, rate, capacity))


def retune(bucket: array[int], rate: int) -> None:
    """Give a bucket in use a new ``rate`` (a reload): the allocations sharing it see the new
    limit from their next packet; tokens above the new capacity are dropped."""
    if not 0 < rate <= MAX_BPS:
        raise ValueError(f"rate must be 1-{MAX_BPS} bytes per second")
    capacity = rate * NS * BURST_SECONDS
    bucket[2] = rate
    bucket[3] = capacity
    if bucket[_TOKENS] > capacity:
        bucket[_TOKENS] = capacity


def admit(buckets: tuple[array[int], ...], now: int, size: int) -> bool:
    """Whether ``size`` bytes may pass at ``now`` (ns); if so, every bucket pays for them.

    Refilling first is harmless when the packet is refused: it only moves the stamp to now.
    """
    cost = size * NS
    for bucket in buckets:
        # One unpacking reads the four fields at once: cheaper per packet than four indexings.
        tokens, stamp, rate, capacity = bucket
        if now > stamp:
            elapsed = now - stamp
            # Beyond the burst time the bucket is full anyway; the cap keeps the product small.
            tokens += (elapsed if elapsed < _MAX_ELAPSED else _MAX_ELAPSED) * rate
            if tokens > capacity:
                tokens = capacity
            bucket[_TOKENS] = tokens
            bucket[_STAMP] = now
        if tokens < cost:
            return False
    for bucket in buckets:
        bucket[_TOKENS] -= cost
    return True


@dataclass(slots=True, eq=False)
class Limits:
    """The buckets one allocation's packets pass through, fixed for its life.

    ``to_peers`` and ``to_client`` hold up to three buckets each (the allocation's, its
    user's, the worker's); the user's and the worker's are shared with other allocations.
    ``drops`` is the core's drop counter (:attr:`~.server.TurnServer.drops`), where a
    refused packet counts as ``"bandwidth"`` whichever path refused it.
    """

    to_peers: tuple[array[int], ...]
    to_client: tuple[array[int], ...]
    drops: Counter[str]
