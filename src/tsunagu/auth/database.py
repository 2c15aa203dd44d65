"""The one narrow interface between tsunagu and a user database.

A user database holds what coturn keeps in one: long-term users (as keys, never
passwords), TURN REST secrets, allowed and denied peer ranges, per realm. tsunagu reads
coturn's own layouts as they are (the tables of coturn's ``schema.sql`` in SQLite and
PostgreSQL, the ``turn/realm/<realm>/...`` keys in Redis), so a database filled by coturn's
``turnadmin`` serves tsunagu unchanged, and one filled by ``tsunagu user add`` serves
coturn. What coturn's layout cannot hold lives beside it under names of tsunagu's own: the
SHA-256 key of RFC 8489 (coturn keeps one key per user, MD5 unless the whole server runs
SHA-256).

Every method is a coroutine and may raise :class:`DatabaseError` (the database is down,
refused, timed out): the driver counts it, logs it once per interval and carries on with
what it has cached. Implementations: :mod:`.sqlite`, :mod:`.postgres`, :mod:`.redis`;
:func:`.backends.open_user_database` picks the one the configuration names.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

from ..stun.attributes import PASSWORD_ALGORITHM_MD5, PASSWORD_ALGORITHM_SHA256
from ..turn.authentication import long_term_key
from ..turn.revocations import Revocation
from .cache import UserKeys

__all__ = [
    "REALM_OPTIONS",
    "DatabaseError",
    "PeerRanges",
    "UserDatabase",
    "keys_from_hex",
    "keys_of_password",
    "parse_keyword_string",
    "usable_name",
]

# coturn's turnusers_lt.name is varchar(512): a longer name is no user of any database.
MAX_NAME_CHARS = 512
# How long one call may take, whatever the connection string says: a lookup that waits
# longer than this is worth less than a quick 401 the client retries.
CALL_TIMEOUT = 2.0
# A realm's REST secrets or peer ranges are read every few seconds, whole: beyond this many
# the database is broken or hostile, and the read fails (what was read last stays in use).
MAX_ROWS = 10_000


REALM_OPTIONS = ("max-bps", "total-quota", "user-quota")
"""coturn's per-realm options (its turn_realm_option table, ``turnadmin -g``)."""


class DatabaseError(Exception):
    """The database could not answer (gone, refused, timed out, a broken record)."""


@dataclass(frozen=True, slots=True)
class PeerRanges:
    """A realm's ``allowed_peer_ip`` and ``denied_peer_ip`` entries, as stored."""

    allowed: tuple[str, ...] = ()
    denied: tuple[str, ...] = ()


def keys_of_password(name: str, realm: str, password: str) -> UserKeys:
    return UserKeys(
        md5=long_term_key(name, realm, password, PASSWORD_ALGORITHM_MD5),
        sha256=long_term_key(name, realm, password, PASSWORD_ALGORITHM_SHA256),
    )


def keys_from_hex(hmackey: str, sha256: str | None = None) -> UserKeys:
    """Keys from coturn's ``hmackey`` column (hex: 32 digits an MD5 key, 64 a SHA-256 one,
    as coturn writes it for a server run with SHA-256) and tsunagu's own SHA-256 column."""
    text = hmackey.strip().lower()
    try:
        raw = bytes.fromhex(text)
        extra = bytes.fromhex(sha256.strip()) if sha256 else None
    except ValueError:
        raise DatabaseError("a user's key is not hexadecimal") from None
    if len(raw) == hashlib.md5().digest_size:
        return UserKeys(md5=raw, sha256=extra if extra and len(extra) == 32 else None)
    if len(raw) == hashlib.sha256().digest_size:
        return UserKeys(md5=None, sha256=raw)
    raise DatabaseError(f"a user's key has {len(raw)} bytes, neither MD5 nor SHA-256")


class UserDatabase(Protocol):
    """What tsunagu asks of a user database; names and layout as coturn's."""

    @property
    def description(self) -> str:
        """Where it is, without any password: for logs and errors."""
        ...

    async def user_keys(self, realm: str, name: str) -> UserKeys | None:
        """The user's keys, or None when there is no such user in the realm."""
        ...

    async def secrets(self, realm: str) -> tuple[str, ...]:
        """The realm's TURN REST secrets."""
        ...

    async def peer_ranges(self, realm: str) -> PeerRanges: ...

    async def realm_options(self, realm: str) -> dict[str, str]:
        """The realm's options coturn keeps (``REALM_OPTIONS``: ``turnadmin -g``), as
        stored; the others are left out."""
        ...

    async def add_user(self, realm: str, name: str, keys: UserKeys) -> None:
        """Add the user, or give an existing one new keys."""
        ...

    async def delete_user(self, realm: str, name: str) -> bool:
        """Whether there was such a user."""
        ...

    async def users(self, realm: str | None) -> list[tuple[str, str]]:
        """(realm, name) of every user, of one realm or all."""
        ...

    async def add_secret(self, realm: str, secret: str) -> None: ...

    async def delete_secret(self, realm: str, secret: str) -> bool: ...

    async def all_secrets(self, realm: str | None) -> list[tuple[str, str]]:
        """(realm, secret) of every secret, of one realm or all."""
        ...

    async def add_revocation(self, realm: str, revocation: Revocation) -> int:
        """Store ``revocation`` (its ``number`` is ignored) and drop the revocations that
        have run out; the number it got."""
        ...

    async def revocations(self, realm: str, after: int, now: float) -> list[Revocation]:
        """The realm's revocations numbered above ``after`` and still in force at ``now``."""
        ...

    async def close(self) -> None: ...


def usable_name(name: str) -> bool:
    """Whether a user name from the network can be asked for at all. A name no database can
    hold (too long, a NUL that PostgreSQL refuses) is "no such user", not a database error
    that would fill the log on a stranger's behalf."""
    return 0 < len(name) <= MAX_NAME_CHARS and "\x00" not in name


def parse_keyword_string(text: str, what: str) -> dict[str, str]:
    """``key=value key='quoted value'`` pairs, as libpq reads a connection string (and
    coturn its Redis one): spaces around ``=`` allowed, single quotes around a value with
    spaces, backslash escaping a quote or a backslash. Errors never quote the text: it may
    hold a password."""
    pairs: dict[str, str] = {}
    index, end = 0, len(text)
    while True:
        while index < end and text[index].isspace():
            index += 1
        if index == end:
            return pairs
        start = index
        while index < end and not text[index].isspace() and text[index] != "=":
            index += 1
        key = text[start:index].lower()
        while index < end and text[index].isspace():
            index += 1
        if not key or index == end or text[index] != "=":
            raise DatabaseError(f"{what}: expected key=value pairs, as 'host=... dbname=...'")
        index += 1
        while index < end and text[index].isspace():
            index += 1
        value: list[str] = []
        if index < end and text[index] == "'":
            index += 1
            while True:
                if index == end:
                    raise DatabaseError(f"{what}: the value of {key} lacks its closing quote")
                char = text[index]
                if char == "\\" and index + 1 < end:
                    value.append(text[index + 1])
                    index += 2
                    continue
                index += 1
                if char == "'":
                    break
                value.append(char)
        else:
            while index < end and not text[index].isspace():
                if text[index] == "\\" and index + 1 < end:
                    index += 1
                value.append(text[index])
                index += 1
        if key in pairs:
            raise DatabaseError(f"{what}: {key} given twice")
        pairs[key] = "".join(value)


def scrub(text: str, *secrets: str | None) -> str:
    """``text`` with every secret in it replaced, for an error from a driver that might
    echo what it was given."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text
