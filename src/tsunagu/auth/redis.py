"""A user database in Redis, in coturn's layout (``--redis-userdb``).

coturn's keys, as its ``schema.userdb.redis`` describes them, so that ``turnadmin -N`` and
``turnserver -N`` work on the same database:

- ``turn/realm/<realm>/user/<name>/key``: the user's key, hex (MD5 of name:realm:password);
- ``turn/realm/<realm>/secret``: a set of TURN REST secrets;
- ``turn/realm/<realm>/allowed-peer-ip`` and ``.../denied-peer-ip``: sets of peer ranges.

tsunagu's own SHA-256 key lives beside coturn's under a name of its own,
``tsunagu/realm/<realm>/user/<name>/sha256``, holding ``<sha256 hex>:<md5 hex>``: the MD5 key
it was made with, so that a password changed by ``turnadmin`` (which knows nothing of it)
leaves it stale, and a stale one is never used.

The connection string is coturn's, ``ip=127.0.0.1 dbname=0 password=... port=6379
connect_timeout=30``, or a ``redis://`` (``rediss://``) URL. redis-py's client connects on
first use and again after an error by itself; every call is bounded in time, retries
nothing (the caller has its own cache and retry), and no error carries the password.
Listing users and secrets walks the keys with SCAN, never KEYS, which would stop the
server for everyone while it runs.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..turn.revocations import Revocation
from .cache import UserKeys
from .database import (
    CALL_TIMEOUT,
    MAX_ROWS,
    REALM_OPTIONS,
    DatabaseError,
    PeerRanges,
    keys_from_hex,
    parse_keyword_string,
    scrub,
    usable_name,
)

__all__ = ["RedisUserDatabase", "redis_connect_arguments"]

T = TypeVar("T")

CONNECT_TIMEOUT = 5.0
POOL_SIZE = 4
# After a failed connection, calls fail at once for this long instead of each trying again.
RETRY_AFTER = 1.0
# One SCAN step's hint, and the most keys a listing walks: an admin listing, bounded.
SCAN_COUNT = 1000
SCAN_LIMIT = 1_000_000
# A record no key or secret is this long; a bigger value is a broken record, not read whole.
MAX_VALUE_BYTES = 4096

# coturn's words for each setting of its Redis connection string.
_KEYWORDS = {
    "ip": "host",
    "host": "host",
    "port": "port",
    "dbname": "db",
    "db": "db",
    "database": "db",
    "user": "username",
    "username": "username",
    "password": "password",
    "pwd": "password",
    "passwd": "password",
    "secret": "password",
    "connect_timeout": "timeout",
    "timeout": "timeout",
}


def _glob(text: str) -> str:
    """``text`` as a literal inside a SCAN MATCH pattern."""
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)


def user_key(realm: str, name: str) -> str:
    return f"turn/realm/{realm}/user/{name}/key"


def own_key(realm: str, name: str) -> str:
    return f"tsunagu/realm/{realm}/user/{name}/sha256"


def secret_key(realm: str) -> str:
    return f"turn/realm/{realm}/secret"


def revocations_key(realm: str) -> str:
    """tsunagu's revocations of a realm: a sorted set of JSON records scored by number."""
    return f"tsunagu/realm/{realm}/revocations"


def revocation_counter(realm: str) -> str:
    return f"tsunagu/realm/{realm}/revocation-number"


# At most this many revocations are read at once; more wait for the next read.
REVOCATIONS_READ = 10_000


def redis_connect_arguments(text: str) -> tuple[dict[str, Any], str, str | None]:
    """redis-py's client arguments for a coturn connection string (``key=value`` pairs) or
    a ``redis://`` URL, with a description without the password, and the password."""
    what = "redis_userdb"
    if text.startswith(("redis://", "rediss://", "unix://")):
        try:
            url = urlsplit(text)
            port = url.port
        except ValueError as exc:
            raise DatabaseError(f"{what}: not a Redis URL ({exc})") from None
        password = unquote(url.password) if url.password else None
        if url.scheme == "unix":
            where = f"Redis {url.path}"
        else:
            where = f"Redis {url.hostname or 'localhost'}:{port or 6379}{url.path or '/0'}"
        return {"url": text}, scrub(where, password), password
    pairs = parse_keyword_string(text, what)
    arguments: dict[str, Any] = {}
    for key, value in pairs.items():
        name = _KEYWORDS.get(key)
        if name is None:
            known = ", ".join(sorted(_KEYWORDS))
            raise DatabaseError(f"{what}: unknown keyword {key!r} (known: {known})")
        if name in arguments:
            raise DatabaseError(f"{what}: {name} given twice")
        if name == "port":
            if not value.isdigit() or not 1 <= int(value) <= 65535:
                raise DatabaseError(f"{what}: port must be 1-65535")
            arguments[name] = int(value)
        elif name == "db":
            if not value.isdigit():
                raise DatabaseError(f"{what}: dbname must be a database number")
            arguments[name] = int(value)
        elif name == "timeout":
            try:
                seconds = float(value)
            except ValueError:
                raise DatabaseError(f"{what}: connect_timeout must be a number") from None
            arguments[name] = min(seconds, CONNECT_TIMEOUT) if seconds > 0 else CONNECT_TIMEOUT
        else:
            arguments[name] = value
    arguments.setdefault("host", "127.0.0.1")
    password = arguments.get("password")
    where = f"Redis {arguments['host']}:{arguments.get('port', 6379)}/{arguments.get('db', 0)}"
    return arguments, scrub(where, password), password


class RedisUserDatabase:
    """coturn's keys in a Redis database; see :class:`~.database.UserDatabase`."""

    def __init__(
        self,
        connection: str,
        *,
        timeout: float = CALL_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        arguments, self._description, self._password = redis_connect_arguments(connection)
        self.timeout = timeout
        self._clock = clock
        self._failed_at: float | None = None
        self._last_error = ""
        # A blocking pool: a call beyond its connections waits for one (within the call's
        # time) instead of failing at once with "too many connections".
        common: dict[str, Any] = {
            "max_connections": POOL_SIZE,
            "timeout": timeout,
            "socket_timeout": timeout,
            "socket_connect_timeout": arguments.pop("timeout", CONNECT_TIMEOUT),
            # The caller retries with its own cache and timing; a retry here only waits.
            "retry": Retry(NoBackoff(), 0),
        }
        try:
            if "url" in arguments:
                pool = aioredis.BlockingConnectionPool.from_url(arguments["url"], **common)
            else:
                pool = aioredis.BlockingConnectionPool(**arguments, **common)
        except ValueError as exc:
            raise DatabaseError(
                f"redis_userdb: not a Redis URL ({scrub(str(exc), self._password)})"
            ) from None
        self._client = aioredis.Redis.from_pool(pool)

    @property
    def description(self) -> str:
        return self._description

    async def _run(self, work: Callable[[Any], Awaitable[T]], timeout: float | None = None) -> T:
        if self._failed_at is not None and self._clock() - self._failed_at < RETRY_AFTER:
            raise DatabaseError(f"{self.description}: {self._last_error}")
        try:
            async with asyncio.timeout(timeout or self.timeout):
                result = await work(self._client)
        except DatabaseError:
            raise
        except Exception as exc:
            words = self._words(exc)
            if isinstance(exc, OSError | TimeoutError | aioredis.ConnectionError):
                # The server is away: calls fail at once for a while instead of each waiting.
                self._failed_at = self._clock()
                self._last_error = words
            raise DatabaseError(f"{self.description}: {words}") from None
        self._failed_at = None
        return result

    def _words(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError | aioredis.TimeoutError):
            text = f"no answer in {self.timeout:g} s"
        else:
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return scrub(text, self._password)

    def _text(self, value: Any, what: str) -> str:
        if not isinstance(value, bytes) or len(value) > MAX_VALUE_BYTES:
            raise DatabaseError(f"{self.description}: {what} is not a short string")
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise DatabaseError(f"{self.description}: {what} is not UTF-8") from None

    # --- reads ---

    async def user_keys(self, realm: str, name: str) -> UserKeys | None:
        if not usable_name(name):
            return None
        coturns, own = await self._run(
            lambda db: db.mget(user_key(realm, name), own_key(realm, name))
        )
        if coturns is None:
            return None
        hmackey = self._text(coturns, f"the key of user {name!r}").strip().lower()
        sha256 = None
        if own is not None:
            recorded, _, md5 = self._text(own, f"the SHA-256 key of {name!r}").partition(":")
            if md5.strip().lower() == hmackey:
                sha256 = recorded
        return keys_from_hex(hmackey, sha256)

    async def _members(self, key: str) -> tuple[str, ...]:
        async def read(db: Any) -> Any:
            # A key of another type (a broken record) reads as empty rather than failing
            # every refresh.
            if await db.type(key) not in (b"set", b"none"):
                return set()
            if await db.scard(key) > MAX_ROWS:
                raise DatabaseError(f"{self.description}: {key} has more than {MAX_ROWS} members")
            return await db.smembers(key)

        found = []
        for member in await self._run(read):
            try:
                found.append(self._text(member, key))
            except DatabaseError:
                continue  # one broken member; the others serve
        return tuple(sorted(found))

    async def secrets(self, realm: str) -> tuple[str, ...]:
        return await self._members(secret_key(realm))

    async def peer_ranges(self, realm: str) -> PeerRanges:
        allowed = await self._members(f"turn/realm/{realm}/allowed-peer-ip")
        denied = await self._members(f"turn/realm/{realm}/denied-peer-ip")
        return PeerRanges(allowed, denied)

    async def realm_options(self, realm: str) -> dict[str, str]:
        keys = [f"turn/realm/{realm}/{option}" for option in REALM_OPTIONS]
        values = await self._run(lambda db: db.mget(*keys))
        found = {}
        for option, value in zip(REALM_OPTIONS, values, strict=True):
            if value is not None:
                found[option] = self._text(value, f"the realm option {option}")
        return found

    async def _scan(self, pattern: str) -> list[str]:
        async def walk(db: Any) -> list[bytes]:
            found: list[bytes] = []
            async for key in db.scan_iter(match=pattern, count=SCAN_COUNT):
                found.append(key)
                if len(found) >= SCAN_LIMIT:
                    break
            return found

        # A listing walks the whole key space: it gets more time than one lookup.
        keys = await self._run(walk, self.timeout * 30)
        out = []
        for key in keys:
            try:
                out.append(key.decode("utf-8"))
            except UnicodeDecodeError:
                continue
        return sorted(set(out))

    async def users(self, realm: str | None) -> list[tuple[str, str]]:
        prefix = "turn/realm/"
        pattern = f"{prefix}{'*' if realm is None else _glob(realm)}/user/*/key"
        found = []
        for key in await self._scan(pattern):
            middle = key[len(prefix) : -len("/key")]
            if realm is not None:
                name = middle[len(realm) + len("/user/") :]
                found.append((realm, name))
            else:
                where, sep, name = middle.partition("/user/")
                if sep:
                    found.append((where, name))
        return sorted(found)

    async def all_secrets(self, realm: str | None) -> list[tuple[str, str]]:
        prefix = "turn/realm/"
        if realm is not None:
            return [(realm, secret) for secret in await self.secrets(realm)]
        found: list[tuple[str, str]] = []
        for key in await self._scan(f"{prefix}*/secret"):
            where = key[len(prefix) : -len("/secret")]
            found.extend((where, secret) for secret in await self._members(key))
        return sorted(found)

    # --- writes ---

    async def add_user(self, realm: str, name: str, keys: UserKeys) -> None:
        if keys.md5 is None:
            raise ValueError("coturn's key needs the MD5 key")
        md5 = keys.md5.hex()

        async def write(db: Any) -> None:
            async with db.pipeline(transaction=True) as pipe:
                pipe.set(user_key(realm, name), md5)
                if keys.sha256 is not None:
                    pipe.set(own_key(realm, name), f"{keys.sha256.hex()}:{md5}")
                else:
                    pipe.delete(own_key(realm, name))
                await pipe.execute()

        await self._run(write)

    async def delete_user(self, realm: str, name: str) -> bool:
        async def write(db: Any) -> bool:
            async with db.pipeline(transaction=True) as pipe:
                pipe.delete(user_key(realm, name))
                pipe.delete(own_key(realm, name))
                gone, _ = await pipe.execute()
            return bool(gone)

        return await self._run(write)

    async def add_secret(self, realm: str, secret: str) -> None:
        await self._run(lambda db: db.sadd(secret_key(realm), secret))

    async def delete_secret(self, realm: str, secret: str) -> bool:
        removed = await self._run(lambda db: db.srem(secret_key(realm), secret))
        return bool(removed)

    async def add_revocation(self, realm: str, revocation: Revocation) -> int:
        key = revocations_key(realm)

        async def write(db: Any) -> int:
            number = int(await db.incr(revocation_counter(realm)))
            record = json.dumps(
                {
                    "number": number,
                    "issued_before": revocation.issued_before,
                    "until": revocation.until,
                    "user": revocation.user,
                    "credential": revocation.credential,
                }
            )
            await db.zadd(key, {record: number})
            # Those that ran out go, so that the set stays as small as what is in force.
            stale = []
            for member in await db.zrange(key, 0, -1):
                kept = self._revocation(member, 0.0)
                if kept is None or kept.until <= revocation.issued_before:
                    stale.append(member)
            if stale:
                await db.zrem(key, *stale)
            return number

        return await self._run(write)

    def _revocation(self, member: Any, now: float) -> Revocation | None:
        """One stored record, or None for one that ran out or cannot be read."""
        try:
            data = json.loads(member)
            revocation = Revocation(
                int(data["number"]),
                float(data["issued_before"]),
                float(data["until"]),
                None if data.get("user") is None else str(data["user"]),
                None if data.get("credential") is None else str(data["credential"]),
            )
        except (ValueError, TypeError, KeyError):
            return None
        if not math.isfinite(revocation.until) or revocation.until <= now:
            return None
        return revocation

    async def revocations(self, realm: str, after: int, now: float) -> list[Revocation]:
        members = await self._run(
            lambda db: db.zrangebyscore(
                revocations_key(realm), f"({after}", "+inf", start=0, num=REVOCATIONS_READ
            )
        )
        found = [self._revocation(member, now) for member in members]
        return sorted((r for r in found if r is not None), key=lambda r: r.number)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._client.aclose(), self.timeout)
        except Exception:
            # A server that is gone cannot say goodbye; the sockets close with the client.
            pass
