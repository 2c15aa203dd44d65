"""The credential store behind the TURN core: static users and TURN REST API secrets.

Static users are kept as keys, never as passwords: MD5(user:realm:password) for
MESSAGE-INTEGRITY and SHA-256(user:realm:password) for RFC 8489's SHA-256 algorithm.
A username of the REST form (``expiry:user``) is checked against every configured secret,
so secrets can be rotated by running old and new side by side.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from ..stun.attributes import PASSWORD_ALGORITHM_MD5, PASSWORD_ALGORITHM_SHA256
from ..turn.authentication import long_term_key
from ..turn.refusals import EXPIRED_CREDENTIAL, UNKNOWN_USER, Refusal
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
    ) -> None:
        self.realm = realm
        self._keys: dict[tuple[str, int], bytes] = {}
        self._userhashes: dict[bytes, str] = {}
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
        return self._secrets

    def get_keys(
        self, username: str, realm: str, algorithm: int, now: float, *, existing: bool
    ) -> tuple[bytes, ...]:
        if realm != self.realm:
            return ()
        key = self._keys.get((username, algorithm))
        if key is not None:
            return (key,)
        expiry = rest_expiry(username) if self._secrets else None
        if expiry is None:
            return ()
        if expiry <= now and (not existing or self._check_expiry_on_existing):
            return ()
        return tuple(
            long_term_key(username, realm, rest_password(secret, username), algorithm)
            for secret in self._secrets
        )

    def find_userhash(self, userhash: bytes, realm: str) -> str | None:
        return self._userhashes.get(userhash) if realm == self.realm else None

    def missing_key(self, username: str, realm: str, now: float, *, existing: bool) -> Refusal:
        expiry = rest_expiry(username) if self._secrets else None
        if realm == self.realm and expiry is not None and expiry <= now:
            return Refusal(EXPIRED_CREDENTIAL, username, (("expired_at", expiry),))
        return Refusal(UNKNOWN_USER, username, (("realm", realm),))
