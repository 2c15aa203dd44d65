"""Credentials taken back: which usernames a revocation covers, and for how long it is kept.

A TURN REST credential cannot be taken back by its issuer (coturn issues 888 and 1204): the
only way is to rotate the secret, which takes back everyone's. A :class:`Revocation` names
what to take back, in one of three ways:

- ``credential``: one username, exactly (a REST username ``<expiry>:<user id>``, or a
  long-term user name);
- ``user``: a user id (the part a quota counts, :func:`~.quotas.user_id`): every REST
  credential of that id issued before the revocation, and the long-term user of that name;
- neither: every REST credential issued before ``issued_before`` (long-term users have no
  issue time and are not covered: change their passwords).

A REST credential's issue time is its expiry less the credential lifetime the issuer uses
(``ttl``: this server's ``credential_ttl``), so "issued before T" is "expires before T +
ttl". REST usernames count whole seconds, so a credential issued in the revocation's own
second counts as issued before it. A revocation is kept only as long as what it covers could
still be valid: until the
credential's expiry, or ``issued_before + ttl`` for the others (a long-term user is shut
out for that long; deleting the user or changing the password is what lasts).

Pure: the current time comes in as arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

from .quotas import rest_expiry, user_id

__all__ = ["Revocation", "RevocationList"]


@dataclass(frozen=True, slots=True)
class Revocation:
    """One revocation, as stored (``number`` orders them in the database)."""

    number: int
    issued_before: float
    until: float
    user: str | None = None
    credential: str | None = None

    def covers(self, username: str, now: float, ttl: float) -> bool:
        if now >= self.until:
            return False
        if self.credential is not None:
            return username == self.credential
        expiry = rest_expiry(username)
        if self.user is not None and user_id(username) != self.user:
            return False
        if expiry is not None:
            return expiry < self.issued_before + ttl
        return self.user is not None  # a long-term user, named


class RevocationList:
    """The revocations in force, by number; :meth:`covering` asks whether one applies."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._by_number: dict[int, Revocation] = {}
        self.last_number = 0

    def __len__(self) -> int:
        return len(self._by_number)

    def add(self, revocation: Revocation) -> bool:
        """Keep ``revocation``; False if it was known already."""
        self.last_number = max(self.last_number, revocation.number)
        if revocation.number in self._by_number:
            return False
        self._by_number[revocation.number] = revocation
        return True

    def prune(self, now: float) -> None:
        for number in [n for n, r in self._by_number.items() if r.until <= now]:
            del self._by_number[number]

    def covering(self, username: str, now: float) -> Revocation | None:
        for revocation in self._by_number.values():
            if revocation.covers(username, now, self.ttl):
                return revocation
        return None
