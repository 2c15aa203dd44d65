"""Who may enter a room, and how often they may be wrong about it.

Pure like the rest of the room logic (:mod:`tsunagu.signaling.rooms`): no I/O, and time is
passed in.

- :class:`Access` is the server's rule: ``open``, ``password`` (the server's room password)
  or ``token`` (a join token, verified by a :class:`TokenVerifier`).
- :class:`Attempts` counts wrong passwords and join tokens per source address and per room,
  and only failures: the people who know the secret are not slowed, guessing is. Past the
  limit the next secret is not even checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Protocol

__all__ = ["Access", "Attempts", "GrantLike", "TokenBucket", "TokenVerifier"]

_MAX_KEYS: Final = 16384
"""Bound on the addresses (and the rooms) whose failed attempts are remembered."""


class TokenBucket:
    """Classic token bucket; time is passed in and may not go backwards."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def refill(self, now: float) -> float:
        """The tokens available at ``now``."""
        elapsed = max(0.0, now - self.stamp)
        self.stamp = max(self.stamp, now)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        return self.tokens

    def take(self, now: float, cost: float = 1.0) -> bool:
        if self.refill(now) >= cost:
            self.tokens -= cost
            return True
        return False


class GrantLike(Protocol):
    """What a verified join token allows (:class:`tsunagu.signaling.tokens.Grant`)."""

    @property
    def room(self) -> str: ...
    @property
    def identity(self) -> str: ...
    @property
    def name(self) -> str | None: ...
    @property
    def turn(self) -> bool: ...


class TokenVerifier(Protocol):
    def verify(self, token: str, now: float) -> GrantLike:
        """The grant of a valid ``token``; raises ``ValueError`` saying why it is not."""
        ...


@dataclass(frozen=True, slots=True)
class Access:
    """Who may enter a room: ``open``, ``password`` or ``token``."""

    mode: str = "open"
    password_digest: bytes | None = None
    """``password`` mode: SHA-256 of the server's room password."""
    tokens: TokenVerifier | None = None
    """``token`` mode: verifies join tokens."""

    def __post_init__(self) -> None:
        if self.mode not in ("open", "password", "token"):
            raise ValueError(f"unknown room access {self.mode!r}")
        if self.mode == "password" and self.password_digest is None:
            raise ValueError("password access needs the room password")
        if self.mode == "token" and self.tokens is None:
            raise ValueError("token access needs a token verifier")


class Attempts:
    """Failed secrets per source address and per room, each a token bucket of failures.

    ``rate`` failures are forgiven per second per address (``burst`` at once); a room's
    password, whatever the addresses guessing it, ``room_rate`` and ``room_burst``.
    """

    __slots__ = ("rate", "burst", "room_rate", "room_burst", "_addresses", "_rooms")

    def __init__(self, rate: float, burst: float, room_rate: float, room_burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.room_rate = room_rate
        self.room_burst = room_burst
        self._addresses: dict[str, TokenBucket] = {}
        self._rooms: dict[str, TokenBucket] = {}

    def __len__(self) -> int:
        return len(self._addresses) + len(self._rooms)

    def wait(self, address: str, room: str | None, now: float) -> int | None:
        """Seconds before a secret from ``address`` (for ``room``'s own password, if given)
        may be checked again; None when it may be checked now."""
        buckets = (self._addresses.get(address), None if room is None else self._rooms.get(room))
        for bucket in buckets:
            if bucket is not None and bucket.refill(now) < 1.0:
                return int((1.0 - bucket.tokens) / bucket.rate) + 1
        return None

    def failed(self, address: str, room: str | None, now: float) -> None:
        _bucket(self._addresses, address, self.rate, self.burst, now).take(now)
        if room is not None:
            _bucket(self._rooms, room, self.room_rate, self.room_burst, now).take(now)


def _bucket(
    table: dict[str, TokenBucket], key: str, rate: float, burst: float, now: float
) -> TokenBucket:
    bucket = table.get(key)
    if bucket is None:
        if len(table) >= _MAX_KEYS:
            _forget(table, now)
        bucket = table[key] = TokenBucket(rate, burst, now)
    return bucket


def _forget(table: dict[str, TokenBucket], now: float) -> None:
    """Drop the keys that have been forgiven; if that is not enough, the oldest half."""
    for key, bucket in list(table.items()):
        if bucket.refill(now) >= bucket.burst:
            del table[key]
    if len(table) >= _MAX_KEYS:
        for key in list(table)[: _MAX_KEYS // 2]:
            del table[key]
