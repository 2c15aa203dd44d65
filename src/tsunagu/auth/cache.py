"""Keys looked up in a user database, kept for a bounded time.

The TURN core asks for a user's key on every authenticated request; a database answers in
milliseconds, the relay must not wait that long. The driver looks a user up once
(:class:`~tsunagu.turn.KeyLookup`) and puts the answer here; requests for that user are then
answered from memory until the entry expires. Three kinds of answer are kept, each for its
own time:

- the user's keys (``ttl``): a password changed or a user deleted in the database takes
  effect within that time;
- "no such user" (``negative_ttl``): a client retrying a wrong name, or a flood of made-up
  names repeated, costs one query per name per interval;
- "the database did not answer" (``failure_ttl``): the request gets 401 at once, and the
  client's next retransmission after the interval asks the database again.

Keys still cached when the database goes away keep serving until they expire, and longer:
a user's keys that expired at most ``stale_ttl`` ago serve again whenever a lookup finds the
database unavailable (each time for ``failure_ttl``, then the database is asked again).
Clients refresh their allocations every few minutes, so most refreshes find their user's
keys expired from a 60 s cache; without this, every call would lose its allocations to an
outage of a few seconds. What the database cannot tell meanwhile (a password changed, a
user deleted) takes effect when it answers again.

The cache holds at most ``limit`` entries; beyond that the oldest go first. Pure: time comes
in as arguments.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass

from ..stun.attributes import PASSWORD_ALGORITHM_MD5, PASSWORD_ALGORITHM_SHA256

__all__ = ["CachedAnswer", "KeyCache", "UserKeys"]


@dataclass(frozen=True, slots=True)
class UserKeys:
    """A user's long-term keys as a database holds them: MD5(user:realm:password), and
    SHA-256 of the same where the database has it (coturn's tables hold one key only)."""

    md5: bytes | None = None
    sha256: bytes | None = None

    def key(self, algorithm: int) -> bytes | None:
        if algorithm == PASSWORD_ALGORITHM_SHA256:
            return self.sha256
        if algorithm == PASSWORD_ALGORITHM_MD5:
            return self.md5
        return None


class CachedAnswer(enum.Enum):
    """What the cache knows of a user other than keys."""

    MISSING = "not looked up"
    UNKNOWN = "no such user"
    UNAVAILABLE = "the database did not answer"


class KeyCache:
    """Answers of the user database by (realm, name), each until its expiry."""

    def __init__(
        self,
        *,
        ttl: float = 60.0,
        negative_ttl: float = 10.0,
        failure_ttl: float = 2.0,
        stale_ttl: float = 900.0,
        limit: int = 100_000,
    ) -> None:
        if min(ttl, negative_ttl, failure_ttl) <= 0 or stale_ttl < 0 or limit < 1:
            raise ValueError("cache lifetimes and size must be positive")
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.failure_ttl = failure_ttl
        self.stale_ttl = stale_ttl
        self.limit = limit
        self.stale_served = 0
        """How many times expired keys served again because the database did not answer."""
        self.generation = 0
        """Counts :meth:`clear` and :meth:`forget` calls: a lookup that started before one
        of them must not store what it read, which may be what was just dropped."""
        # (realm, name) -> (answer, expiry, until when the keys may serve stale)
        self._entries: OrderedDict[
            tuple[str, str], tuple[UserKeys | CachedAnswer, float, float]
        ] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, realm: str, name: str, now: float) -> UserKeys | CachedAnswer:
        entry = self._entries.get((realm, name))
        if entry is None:
            return CachedAnswer.MISSING
        answer, expiry, stale_until = entry
        if expiry <= now:
            # Expired keys stay, unseen, for put_failure to serve again in an outage.
            if not isinstance(answer, UserKeys) or stale_until <= now:
                del self._entries[(realm, name)]
            return CachedAnswer.MISSING
        return answer

    def put(self, realm: str, name: str, keys: UserKeys | None, now: float) -> None:
        """The database's answer: the user's keys, or None for no such user."""
        if keys is None:
            self._store(realm, name, CachedAnswer.UNKNOWN, now + self.negative_ttl)
        else:
            expiry = now + self.ttl
            self._store(realm, name, keys, expiry, expiry + self.stale_ttl)

    def put_failure(self, realm: str, name: str, now: float) -> None:
        """The database did not answer for this user: its keys of late serve again for a
        while if there are any, else "unavailable"."""
        entry = self._entries.get((realm, name))
        if entry is not None and isinstance(entry[0], UserKeys) and now < entry[2]:
            self.stale_served += 1
            self._store(realm, name, entry[0], now + self.failure_ttl, entry[2])
            return
        self._store(realm, name, CachedAnswer.UNAVAILABLE, now + self.failure_ttl)

    def forget(self, realm: str, name: str) -> None:
        """Drop what is known of one user (deleted, password changed, revoked)."""
        self._entries.pop((realm, name), None)
        self.generation += 1

    def clear(self) -> None:
        self._entries.clear()
        self.generation += 1

    def _store(
        self,
        realm: str,
        name: str,
        answer: UserKeys | CachedAnswer,
        expiry: float,
        stale_until: float = 0.0,
    ) -> None:
        entries = self._entries
        entries[(realm, name)] = (answer, expiry, stale_until)
        entries.move_to_end((realm, name))
        while len(entries) > self.limit:
            entries.popitem(last=False)
