"""A user database in PostgreSQL, in coturn's layout (``--psql-userdb``).

The tables are coturn's (its ``schema.sql``: ``turnusers_lt``, ``turn_secret``,
``allowed_peer_ip``, ``denied_peer_ip``...), so ``turnadmin -e`` and ``turnserver -e`` work on
the same database; those missing are created on first use, with tsunagu's own
``tsunagu_user_sha256`` (the SHA-256 key beside coturn's MD5 one, recorded with the MD5 key it
was made with, so that a password changed by ``turnadmin`` leaves it stale and unused). A role
without the right to create tables may still read coturn's: only the missing tables are
created, and without tsunagu's own users have their MD5 key alone.

The connection string is coturn's, libpq's ``host=... dbname=... user=... password=...
connect_timeout=...``, or a ``postgresql://`` URL. A small pool of connections (asyncpg)
is made on first use, never at start, so a server that is down costs each call one refused
connection and then nothing for :data:`RETRY_AFTER` seconds: calls fail at once with
:class:`~.database.DatabaseError` meanwhile, and the pool connects again by itself when
the server is back. Every call is bounded in time, and no error carries the password.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import asyncpg  # type: ignore[import-untyped]

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

__all__ = ["PostgresUserDatabase", "postgres_connect_arguments"]

T = TypeVar("T")

# coturn's tables (its schema.sql), so that a database made here is one coturn reads too.
_COTURN_TABLES = {
    "turnusers_lt": "CREATE TABLE turnusers_lt (realm varchar(127) default '',"
    " name varchar(512), hmackey char(128), PRIMARY KEY (realm, name))",
    "turn_secret": "CREATE TABLE turn_secret (realm varchar(127) default '',"
    " value varchar(256), primary key (realm, value))",
    "allowed_peer_ip": "CREATE TABLE allowed_peer_ip (realm varchar(127) default '',"
    " ip_range varchar(256), primary key (realm, ip_range))",
    "denied_peer_ip": "CREATE TABLE denied_peer_ip (realm varchar(127) default '',"
    " ip_range varchar(256), primary key (realm, ip_range))",
    "turn_origin_to_realm": "CREATE TABLE turn_origin_to_realm (origin varchar(127),"
    " realm varchar(127), primary key (origin))",
    "turn_realm_option": "CREATE TABLE turn_realm_option (realm varchar(127) default '',"
    " opt varchar(32), value varchar(128), primary key (realm, opt))",
    "oauth_key": "CREATE TABLE oauth_key (kid varchar(128), ikm_key varchar(256),"
    " timestamp bigint default 0, lifetime integer default 0,"
    " as_rs_alg varchar(64) default '', realm varchar(127), primary key (kid))",
    "admin_user": "CREATE TABLE admin_user (name varchar(32), realm varchar(127),"
    " password varchar(127), primary key (name))",
}
_OWN_TABLE = "tsunagu_user_sha256"
_OWN_TABLES = {
    _OWN_TABLE: f"CREATE TABLE {_OWN_TABLE} (realm varchar(127) default '',"
    " name varchar(512), sha256 char(64), md5 char(32), primary key (realm, name))",
    "tsunagu_revocation": "CREATE TABLE tsunagu_revocation (number bigserial primary key,"
    " realm varchar(127) default '', user_id varchar(512), credential varchar(512),"
    " issued_before double precision, until double precision)",
}
# Any number: several worker processes creating the tables at once take turns on it.
_SCHEMA_LOCK = 0x7473756E

POOL_SIZE = 4
CONNECT_TIMEOUT = 5.0
# After a failed connection, calls fail at once for this long instead of each trying again:
# a lookup burst during an outage costs the database server nothing.
RETRY_AFTER = 1.0

_CONNECTION_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
)

# libpq's keywords that mean something here, and asyncpg's names for them.
_KEYWORDS = {
    "host": "host",
    "hostaddr": "host",
    "port": "port",
    "dbname": "database",
    "user": "user",
    "password": "password",
    "connect_timeout": "timeout",
    "sslmode": "ssl",
    "application_name": "application_name",
}


def postgres_connect_arguments(text: str) -> tuple[dict[str, Any], str, str | None]:
    """asyncpg's connect arguments for a coturn connection string (libpq keyword=value form,
    or a ``postgresql://`` URL), with a description without the password, and the password.
    """
    what = "psql_userdb"
    if text.startswith(("postgresql://", "postgres://")):
        try:
            url = urlsplit(text)
            port = url.port
        except ValueError as exc:
            raise DatabaseError(f"{what}: not a PostgreSQL URL ({exc})") from None
        password = unquote(url.password) if url.password else None
        host = url.hostname or "localhost"
        database = url.path.lstrip("/") or (unquote(url.username) if url.username else "")
        where = f"PostgreSQL {host}:{port or 5432}/{unquote(database)}"
        if url.username:
            where += f" as {unquote(url.username)}"
        return {"dsn": text}, scrub(where, password), password
    pairs = parse_keyword_string(text, what)
    arguments: dict[str, Any] = {}
    for key, value in pairs.items():
        name = _KEYWORDS.get(key)
        if name is None:
            known = ", ".join(sorted(_KEYWORDS))
            raise DatabaseError(f"{what}: unknown keyword {key!r} (known: {known})")
        if name == "port":
            if not value.isdigit() or not 1 <= int(value) <= 65535:
                raise DatabaseError(f"{what}: port must be 1-65535")
            arguments[name] = int(value)
        elif name == "timeout":
            # libpq: seconds, 0 or less means wait forever; here nothing waits forever.
            try:
                seconds = float(value)
            except ValueError:
                raise DatabaseError(f"{what}: connect_timeout must be a number") from None
            arguments[name] = min(seconds, CONNECT_TIMEOUT) if seconds > 0 else CONNECT_TIMEOUT
        elif name == "application_name":
            arguments["server_settings"] = {"application_name": value}
        else:
            arguments[name] = value
    arguments.setdefault("host", "localhost")
    arguments.setdefault("timeout", CONNECT_TIMEOUT)
    password = arguments.get("password")
    database = arguments.get("database") or arguments.get("user") or ""
    where = f"PostgreSQL {arguments['host']}:{arguments.get('port', 5432)}/{database}"
    if "user" in arguments:
        where += f" as {arguments['user']}"
    return arguments, scrub(where, password), password


class PostgresUserDatabase:
    """coturn's tables in a PostgreSQL database; see :class:`~.database.UserDatabase`."""

    def __init__(
        self,
        connection: str,
        *,
        timeout: float = CALL_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._arguments, self._description, self._password = postgres_connect_arguments(connection)
        self.timeout = timeout
        self._clock = clock
        self._pool: Any = None
        self._opening = asyncio.Lock()
        self._own_table = False
        self._failed_at: float | None = None
        self._last_error = ""

    @property
    def description(self) -> str:
        return self._description

    # --- the pool ---

    async def _ready_pool(self) -> Any:
        if self._pool is not None:
            return self._pool
        async with self._opening:
            if self._pool is not None:
                return self._pool
            self._check_backoff()
            pool = None
            try:
                # min_size 0: the pool holds no connection the server went away from, and
                # each acquire connects anew when the old ones are gone.
                pool = await asyncpg.create_pool(
                    min_size=0,
                    max_size=POOL_SIZE,
                    max_inactive_connection_lifetime=60.0,
                    # asyncpg resets a connection's session state (locks, LISTEN, settings)
                    # on every release, a second round trip per lookup; nothing here sets any.
                    reset=_keep_session,
                    command_timeout=self.timeout,
                    **self._arguments,
                )
                async with pool.acquire(timeout=self.timeout) as connection:
                    await self._prepare_schema(connection)
            except Exception as exc:
                if pool is not None:
                    pool.terminate()
                raise self._failure(exc) from None
            except BaseException:
                # Cancelled (the call's time ran out): no half-made pool left connected.
                if pool is not None:
                    pool.terminate()
                raise
            self._pool = pool
            return pool

    def _check_backoff(self) -> None:
        if self._failed_at is not None and self._clock() - self._failed_at < RETRY_AFTER:
            raise DatabaseError(f"{self.description}: {self._last_error}")

    def _failure(self, exc: BaseException) -> DatabaseError:
        if isinstance(exc, DatabaseError):
            return exc
        words = self._words(exc)
        if isinstance(exc, _CONNECTION_ERRORS):
            # The server is away: calls fail at once for a while instead of each waiting.
            self._failed_at = self._clock()
            self._last_error = words
        return DatabaseError(f"{self.description}: {words}")

    async def _prepare_schema(self, connection: Any) -> None:
        tables = {**_COTURN_TABLES, **_OWN_TABLES}
        missing = await self._missing(connection, tables)
        if missing:
            try:
                async with connection.transaction():
                    await connection.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
                    for name in await self._missing(connection, tables):
                        await connection.execute(tables[name])
            except asyncpg.InsufficientPrivilegeError:
                # A role that may only read coturn's tables: serve them as they are.
                pass
        self._own_table = _OWN_TABLE not in await self._missing(connection, _OWN_TABLES)
        if "turnusers_lt" in await self._missing(connection, {"turnusers_lt": ""}):
            raise DatabaseError("there is no table turnusers_lt, and it cannot be created")

    @staticmethod
    async def _missing(connection: Any, tables: dict[str, str]) -> list[str]:
        rows = await connection.fetch(
            "SELECT name FROM unnest($1::text[]) AS name WHERE to_regclass(name) IS NULL",
            list(tables),
        )
        return [str(row["name"]) for row in rows]

    def _words(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            text = f"no answer in {self.timeout:g} s"
        elif isinstance(exc, OSError) and exc.strerror:
            text = f"cannot connect: {exc.strerror}"
        else:
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return scrub(text, self._password)

    async def _run(self, work: Callable[[Any], Awaitable[T]]) -> T:
        self._check_backoff()
        try:
            async with asyncio.timeout(self.timeout):
                pool = await self._ready_pool()
                async with pool.acquire() as connection:
                    result = await work(connection)
        except Exception as exc:
            raise self._failure(exc) from None
        self._failed_at = None
        return result

    # --- reads ---

    async def user_keys(self, realm: str, name: str) -> UserKeys | None:
        if not usable_name(name):
            return None

        async def read(db: Any) -> Any:
            if self._own_table:
                return await db.fetchrow(
                    "SELECT u.hmackey, s.sha256, s.md5 FROM turnusers_lt u"
                    f" LEFT JOIN {_OWN_TABLE} s ON s.realm = u.realm AND s.name = u.name"
                    " WHERE u.realm = $1 AND u.name = $2",
                    realm,
                    name,
                )
            return await db.fetchrow(
                "SELECT hmackey, NULL AS sha256, NULL AS md5 FROM turnusers_lt"
                " WHERE realm = $1 AND name = $2",
                realm,
                name,
            )

        row = await self._run(read)
        if row is None:
            return None
        if row["hmackey"] is None:
            raise DatabaseError(f"{self.description}: user {name!r} has no key")
        hmackey = str(row["hmackey"]).strip().lower()
        recorded = row["md5"]
        fresh = recorded is not None and str(recorded).strip().lower() == hmackey
        return keys_from_hex(hmackey, str(row["sha256"]) if fresh else None)

    async def _values(self, query: str, *arguments: Any) -> tuple[str, ...]:
        async def read(db: Any) -> Any:
            return await db.fetch(f"{query} LIMIT {MAX_ROWS + 1}", *arguments)

        rows = await self._run(read)
        if len(rows) > MAX_ROWS:
            raise DatabaseError(f"{self.description}: more than {MAX_ROWS} rows for a realm")
        return tuple(sorted(str(row[0]) for row in rows if row[0] is not None))

    async def secrets(self, realm: str) -> tuple[str, ...]:
        return await self._values("SELECT value FROM turn_secret WHERE realm = $1", realm)

    async def peer_ranges(self, realm: str) -> PeerRanges:
        allowed = await self._values("SELECT ip_range FROM allowed_peer_ip WHERE realm = $1", realm)
        denied = await self._values("SELECT ip_range FROM denied_peer_ip WHERE realm = $1", realm)
        return PeerRanges(allowed, denied)

    async def realm_options(self, realm: str) -> dict[str, str]:
        async def read(db: Any) -> Any:
            return await db.fetch(
                "SELECT opt, value FROM turn_realm_option WHERE realm = $1 LIMIT 64", realm
            )

        rows = await self._run(read)
        return {
            str(row[0]): str(row[1])
            for row in rows
            if row[0] in REALM_OPTIONS and row[1] is not None
        }

    async def _pairs(self, table: str, column: str, realm: str | None) -> list[tuple[str, str]]:
        async def read(db: Any) -> Any:
            if realm is None:
                return await db.fetch(
                    f"SELECT realm, {column} FROM {table} ORDER BY realm, {column}"
                )
            return await db.fetch(
                f"SELECT realm, {column} FROM {table} WHERE realm = $1 ORDER BY {column}", realm
            )

        rows = await self._run(read)
        return [(str(row[0] or ""), str(row[1])) for row in rows if row[1] is not None]

    async def users(self, realm: str | None) -> list[tuple[str, str]]:
        return await self._pairs("turnusers_lt", "name", realm)

    async def all_secrets(self, realm: str | None) -> list[tuple[str, str]]:
        return await self._pairs("turn_secret", "value", realm)

    # --- writes ---

    async def add_user(self, realm: str, name: str, keys: UserKeys) -> None:
        if keys.md5 is None:
            raise ValueError("coturn's table needs the MD5 key")
        md5 = keys.md5.hex()
        sha256 = keys.sha256.hex() if keys.sha256 is not None else None

        async def write(db: Any) -> None:
            async with db.transaction():
                await db.execute(
                    "INSERT INTO turnusers_lt (realm, name, hmackey) VALUES ($1, $2, $3)"
                    " ON CONFLICT (realm, name) DO UPDATE SET hmackey = EXCLUDED.hmackey",
                    realm,
                    name,
                    md5,
                )
                if not self._own_table:
                    return
                await db.execute(
                    f"DELETE FROM {_OWN_TABLE} WHERE realm = $1 AND name = $2", realm, name
                )
                if sha256 is not None:
                    await db.execute(
                        f"INSERT INTO {_OWN_TABLE} (realm, name, sha256, md5)"
                        " VALUES ($1, $2, $3, $4)",
                        realm,
                        name,
                        sha256,
                        md5,
                    )

        await self._run(write)

    async def delete_user(self, realm: str, name: str) -> bool:
        async def write(db: Any) -> bool:
            async with db.transaction():
                status = await db.execute(
                    "DELETE FROM turnusers_lt WHERE realm = $1 AND name = $2", realm, name
                )
                if self._own_table:
                    await db.execute(
                        f"DELETE FROM {_OWN_TABLE} WHERE realm = $1 AND name = $2", realm, name
                    )
            return bool(status != "DELETE 0")

        return await self._run(write)

    async def add_secret(self, realm: str, secret: str) -> None:
        async def write(db: Any) -> None:
            await db.execute(
                "INSERT INTO turn_secret (realm, value) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                realm,
                secret,
            )

        await self._run(write)

    async def delete_secret(self, realm: str, secret: str) -> bool:
        async def write(db: Any) -> bool:
            status = await db.execute(
                "DELETE FROM turn_secret WHERE realm = $1 AND value = $2", realm, secret
            )
            return bool(status != "DELETE 0")

        return await self._run(write)

    async def add_revocation(self, realm: str, revocation: Revocation) -> int:
        async def write(db: Any) -> int:
            async with db.transaction():
                await db.execute(
                    "DELETE FROM tsunagu_revocation WHERE until <= $1", revocation.issued_before
                )
                number = await db.fetchval(
                    "INSERT INTO tsunagu_revocation (realm, user_id, credential, issued_before,"
                    " until) VALUES ($1, $2, $3, $4, $5) RETURNING number",
                    realm,
                    revocation.user,
                    revocation.credential,
                    revocation.issued_before,
                    revocation.until,
                )
            return int(number)

        return await self._run(write)

    async def revocations(self, realm: str, after: int, now: float) -> list[Revocation]:
        async def read(db: Any) -> Any:
            return await db.fetch(
                "SELECT number, issued_before, until, user_id, credential FROM tsunagu_revocation"
                " WHERE realm = $1 AND number > $2 AND until > $3 ORDER BY number LIMIT 10000",
                realm,
                after,
                now,
            )

        rows = await self._run(read)
        try:
            return [
                Revocation(int(r[0]), float(r[1]), float(r[2]), r[3], r[4])
                for r in rows
                if r[1] is not None and r[2] is not None
            ]
        except (TypeError, ValueError):
            raise DatabaseError(f"{self.description}: a broken revocation record") from None

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), self.timeout)
            except Exception:
                # A server that is gone cannot say goodbye; drop the connections.
                pool.terminate()


async def _keep_session(connection: object) -> None:
    """What the pool does to a connection given back: nothing (see ``create_pool``)."""
