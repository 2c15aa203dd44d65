"""The credential store behind the TURN core: static users, TURN REST API secrets, and
the users of a database through a :class:`~.cache.KeyCache`.

Static users are kept as keys, never as passwords: MD5(user:realm:password) for
MESSAGE-INTEGRITY and SHA-256(user:realm:password) for RFC 8489's SHA-256 algorithm.
A username of the REST form (``expiry:user``) is checked against every secret, those
configured and those the database holds (the driver keeps :attr:`database_secrets` fresh),
so secrets can be rotated by running old and new side by side. Any other name, with a
database configured, is looked up there: the first time, :meth:`get_keys` raises
:class:`~tsunagu.turn.KeysNotAtHand` and the driver puts the answer in the cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from ..stun.attributes import PASSWORD_ALGORITHM_MD5, PASSWORD_ALGORITHM_SHA256
from ..turn.authentication import KeysNotAtHand, long_term_key
from ..turn.refusals import (
    DATABASE_UNAVAILABLE,
    EXPIRED_CREDENTIAL,
    REVOKED_CREDENTIAL,
    UNKNOWN_USER,
    Refusal,
)
from ..turn.revocations import RevocationList
from .cache import CachedAnswer, KeyCache, UserKeys
from .rest import rest_expiry, rest_password

__all__ = ["StaticCredentialStore"]


class StaticCredentialStore:
    """Static users plus REST secrets; satisfies :class:`tsunagu.turn.CredentialStore`."""

    def __init__(
        self,
        realm: str,
        users: Iterable[tuple[str, str]] = (),
        secrets: Iterable[str] = (),
        *,
        check_expiry_on_existing: bool = True,
        database: KeyCache | None = None,
    ) -> None:
        self.realm = realm
        self.database = database
        """Keys of the users of a database, when one is configured."""
        self.database_secrets: tuple[str, ...] = ()
        """REST secrets the database holds for this realm (kept fresh by the driver)."""
        self.revocations: RevocationList | None = None
        """Credentials taken back (kept fresh by the driver from the database)."""
        self._keys: dict[tuple[str, int], bytes] = {}
        self._userhashes: dict[bytes, str] = {}
        for name, password in users:
            self.add_user(name, password)
        self._secrets = tuple(secrets)
        self._check_expiry_on_existing = check_expiry_on_existing

    def replace_static(
        self,
        users: Iterable[tuple[str, str]],
        secrets: Iterable[str],
        *,
        check_expiry_on_existing: bool,
    ) -> None:
        """Serve these static users and configured secrets from now on, instead of the
        ones before (a reload); the database's users and secrets are left as they are."""
        self._keys = {}
        self._userhashes = {}
        for name, password in users:
            self.add_user(name, password)
        self._secrets = tuple(secrets)
        self._check_expiry_on_existing = check_expiry_on_existing

    def add_user(self, name: str, password: str) -> None:
        for algorithm in (PASSWORD_ALGORITHM_MD5, PASSWORD_ALGORITHM_SHA256):
            self._keys[(name, algorithm)] = long_term_key(name, self.realm, password, algorithm)
        self._userhashes[hashlib.sha256(f"{name}:{self.realm}".encode()).digest()] = name

    @property
    def secrets(self) -> tuple[str, ...]:
        return self._secrets + self.database_secrets

    def get_keys(
        self, username: str, realm: str, algorithm: int, now: float, *, existing: bool
    ) -> tuple[bytes, ...]:
        if realm != self.realm:
            return ()
        if self.revocations is not None and self.revocations.covering(username, now):
            return ()
        key = self._keys.get((username, algorithm))
        if key is not None:
            return (key,)
        secrets = self.secrets
        expiry = rest_expiry(username) if secrets else None
        if expiry is not None:
            if expiry <= now and (not existing or self._check_expiry_on_existing):
                return ()
            return tuple(
                long_term_key(username, realm, rest_password(secret, username), algorithm)
                for secret in secrets
            )
        if self.database is None:
            return ()
        answer = self.database.get(realm, username, now)
        if answer is CachedAnswer.MISSING:
            raise KeysNotAtHand(username, realm)
        if isinstance(answer, UserKeys):
            database_key = answer.key(algorithm)
            return (database_key,) if database_key is not None else ()
        return ()

    def find_userhash(self, userhash: bytes, realm: str) -> str | None:
        return self._userhashes.get(userhash) if realm == self.realm else None

    def missing_key(self, username: str, realm: str, now: float, *, existing: bool) -> Refusal:
        if self.revocations is not None:
            revocation = self.revocations.covering(username, now)
            if revocation is not None:
                return Refusal(REVOKED_CREDENTIAL, username, (("revocation", revocation.number),))
        expiry = rest_expiry(username) if self.secrets else None
        if realm == self.realm and expiry is not None and expiry <= now:
            return Refusal(EXPIRED_CREDENTIAL, username, (("expired_at", expiry),))
        if self.database is not None and expiry is None:
            answer = self.database.get(realm, username, now)
            if answer is CachedAnswer.UNAVAILABLE:
                return Refusal(DATABASE_UNAVAILABLE, username, (("realm", realm),))
            if isinstance(answer, UserKeys):
                # Known, but not with the algorithm asked for (coturn's tables: MD5 only).
                return Refusal(UNKNOWN_USER, username, (("realm", realm), ("algorithm", "SHA-256")))
        return Refusal(UNKNOWN_USER, username, (("realm", realm),))
