"""The long-term credential mechanism, server side (RFC 8489 §9.2).

Every TURN request but Binding is authenticated here. A request without MESSAGE-INTEGRITY
gets 401 with a REALM and a NONCE (:meth:`Authenticator.challenge`); one with a stale or
foreign nonce gets 438 and a fresh nonce. The key comes from a :class:`CredentialStore`
(implemented in :mod:`tsunagu.auth`), looked up by USERNAME or by USERHASH (§14.4), for
the password algorithm the client chose from PASSWORD-ALGORITHMS (§14.11-14.12).

A store backed by a database may not have a user's key at hand: it raises
:class:`KeysNotAtHand`, and the server returns a :class:`KeyLookup` for the driver to resolve
outside the core; once the store has the answer, the driver hands the same request in again.

A request that carried credentials and failed is refused with its cause for the operator's
log (:mod:`.refusals`): wrong realm, unknown user or expired credential (the store tells
which, :meth:`CredentialStore.missing_key`), wrong password (the integrity check failed
with every key), stale nonce. The client's answer stays the plain 401 or 438.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from ..stun.attributes import (
    PASSWORD_ALGORITHM_MD5,
    PASSWORD_ALGORITHM_SHA256,
    Attribute,
    Nonce,
    PasswordAlgorithm,
    PasswordAlgorithms,
    Realm,
    Userhash,
    Username,
)
from ..stun.message import Message
from .errors import BadRequest, StaleNonce, Unauthorized
from .nonce import NonceManager, NonceStatus
from .refusals import STALE_NONCE, UNKNOWN_USER, WRONG_PASSWORD, WRONG_REALM, Refusal

__all__ = [
    "OFFERED_ALGORITHMS",
    "Authenticated",
    "Authenticator",
    "CredentialStore",
    "KeyLookup",
    "KeysNotAtHand",
    "long_term_key",
]

OFFERED_ALGORITHMS = PasswordAlgorithms(
    ((PASSWORD_ALGORITHM_MD5, b""), (PASSWORD_ALGORITHM_SHA256, b""))
)


def long_term_key(username: str, realm: str, password: str, algorithm: int) -> bytes:
    """The long-term credential key (RFC 8489 §9.2.2): hash of ``user:realm:password``.

    Passwords are taken as given (OpaqueString profile of RFC 8265 is the identity on the
    ASCII and normalised input users actually configure).
    """
    text = f"{username}:{realm}:{password}".encode()
    if algorithm == PASSWORD_ALGORITHM_SHA256:
        return hashlib.sha256(text).digest()
    return hashlib.md5(text, usedforsecurity=False).digest()


class KeyLookup(NamedTuple):
    """What :meth:`~.server.TurnServer.receive` returns for a request whose user's keys the
    store does not have at hand: the driver looks them up (a database query), puts the
    answer in the store, and hands the request in again."""

    username: str
    realm: str


class KeysNotAtHand(Exception):
    """Raised by :meth:`CredentialStore.get_keys` when the answer needs a lookup."""

    def __init__(self, username: str, realm: str) -> None:
        super().__init__(username, realm)
        self.lookup = KeyLookup(username, realm)


class CredentialStore(Protocol):
    """Where the core gets keys. Implementations live in :mod:`tsunagu.auth`."""

    def get_keys(
        self, username: str, realm: str, algorithm: int, now: float, *, existing: bool
    ) -> tuple[bytes, ...]:
        """Candidate keys for ``username`` (none if unknown or expired).

        More than one when secrets are being rotated: the integrity check picks the key that
        matches. ``existing`` is True for requests on an allocation that already exists
        (Refresh, CreatePermission, ChannelBind), where a store may choose to accept an
        expired time-limited credential.

        Raises :class:`KeysNotAtHand` when the answer is in a database the store has not
        asked yet; it must not raise it again for the same user once the driver has put the
        lookup's answer in.
        """
        ...

    def find_userhash(self, userhash: bytes, realm: str) -> str | None:
        """The username whose SHA-256(username:realm) is ``userhash`` (RFC 8489 §14.4)."""
        ...

    def missing_key(self, username: str, realm: str, now: float, *, existing: bool) -> Refusal:
        """Why :meth:`get_keys` had no key for ``username``, for the operator's log: a
        :class:`~.refusals.Refusal` for ``UNKNOWN_USER``, or for ``EXPIRED_CREDENTIAL`` with
        the fact ``expired_at`` (unix time) when a time-limited credential has expired."""
        ...


@dataclass(frozen=True, slots=True)
class Authenticated:
    """Who sent a request that passed the integrity check, and the key that checked it.

    The key signs the answer, with MESSAGE-INTEGRITY-SHA256 when ``sha256`` (the request
    used it) and MESSAGE-INTEGRITY otherwise.
    """

    username: str
    realm: str
    key: bytes
    sha256: bool


class Authenticator:
    """Checks requests against a :class:`CredentialStore` and stateless nonces."""

    __slots__ = ("_credentials", "_nonces", "_realm")

    def __init__(self, credentials: CredentialStore, nonces: NonceManager, realm: str) -> None:
        self._credentials = credentials
        self._nonces = nonces
        self._realm = realm

    def authenticate(
        self, message: Message, client_ip: str, now: float, *, existing: bool
    ) -> Authenticated:
        """RFC 8489 §9.2.4, in its order; raises 400, 401 or 438 (:mod:`.errors`).

        ``existing`` is passed on to the store: the request is on an allocation that exists.
        """
        if not message.has_integrity:
            raise Unauthorized()
        realm = message.get(Realm)
        nonce = message.get(Nonce)
        username = message.get(Username)
        userhash = message.get(Userhash)
        if realm is None or nonce is None or (username is None and userhash is None):
            raise BadRequest("USERNAME or USERHASH, REALM and NONCE are required")
        claimed = username.value if username is not None else ""
        status = self._nonces.check(nonce.value, client_ip, now)
        if status is not NonceStatus.VALID:
            # "stale": expired; "invalid": made for another address or with another secret.
            raise StaleNonce(refusal=Refusal(STALE_NONCE, claimed, (("nonce", status.value),)))
        algorithm = PASSWORD_ALGORITHM_MD5
        if self._nonces.security_features:
            chosen = message.get(PasswordAlgorithm)
            offered = message.get(PasswordAlgorithms)
            if chosen is not None or offered is not None:
                # The client must echo what this server offered (§9.2.4, bid-down attack).
                if chosen is None or offered != OFFERED_ALGORITHMS:
                    raise BadRequest("PASSWORD-ALGORITHMS does not match what was offered")
                if chosen.algorithm not in (PASSWORD_ALGORITHM_MD5, PASSWORD_ALGORITHM_SHA256):
                    raise BadRequest("unsupported PASSWORD-ALGORITHM")
                algorithm = chosen.algorithm
        if realm.value != self._realm:
            raise Unauthorized(refusal=Refusal(WRONG_REALM, claimed, (("realm", realm.value),)))
        if username is not None:
            name: str | None = username.value
        else:
            assert userhash is not None
            name = self._credentials.find_userhash(userhash.value, realm.value)
        if name is None:
            raise Unauthorized(refusal=Refusal(UNKNOWN_USER, facts=(("userhash", True),)))
        keys = self._credentials.get_keys(name, realm.value, algorithm, now, existing=existing)
        if not keys:
            refusal = self._credentials.missing_key(name, realm.value, now, existing=existing)
            raise Unauthorized(refusal=refusal)
        sha256 = message.integrity_sha256_offset is not None
        check = message.check_integrity_sha256 if sha256 else message.check_integrity
        for key in keys:
            if check(key):
                return Authenticated(name, realm.value, key, sha256)
        raise Unauthorized(refusal=Refusal(WRONG_PASSWORD, name, (("realm", realm.value),)))

    def challenge(self, client_ip: str, now: float) -> list[Attribute]:
        """What a 401 or 438 carries (§9.2.4): REALM, a fresh NONCE, PASSWORD-ALGORITHMS."""
        attributes: list[Attribute] = [
            Realm(self._realm),
            Nonce(self._nonces.make(client_ip, now)),
        ]
        if self._nonces.security_features:
            attributes.append(OFFERED_ALGORITHMS)
        return attributes
