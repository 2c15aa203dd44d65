"""A user database in an SQLite file, in coturn's layout (``--userdb FILE``).

The file is created on first use with coturn's tables, so that coturn's ``turnadmin -b FILE``
and ``turnserver -b FILE`` work on it as well, plus one table of tsunagu's own: the SHA-256
key beside the MD5 key coturn keeps (``tsunagu_user_sha256``). That row also records the MD5
key it was made with: a password changed by ``turnadmin`` (which knows nothing of the row)
makes the SHA-256 key stale, and a stale one is never used.

sqlite3 blocks, so every query runs on one thread of the database's own, and the event loop
waits for it without blocking (a query takes microseconds to milliseconds; a locked file
waits at most ``busy_timeout``).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from ..turn.revocations import Revocation
from .cache import UserKeys
from .database import MAX_ROWS, REALM_OPTIONS, DatabaseError, PeerRanges, keys_from_hex

__all__ = ["SqliteUserDatabase"]

T = TypeVar("T")

# coturn's tables (its schema.sql), so that a file made here is one coturn reads too.
_COTURN_TABLES = (
    "CREATE TABLE IF NOT EXISTS turnusers_lt (realm varchar(127) default '',"
    " name varchar(512), hmackey char(128), PRIMARY KEY (realm, name))",
    "CREATE TABLE IF NOT EXISTS turn_secret (realm varchar(127) default '',"
    " value varchar(256), primary key (realm, value))",
    "CREATE TABLE IF NOT EXISTS allowed_peer_ip (realm varchar(127) default '',"
    " ip_range varchar(256), primary key (realm, ip_range))",
    "CREATE TABLE IF NOT EXISTS denied_peer_ip (realm varchar(127) default '',"
    " ip_range varchar(256), primary key (realm, ip_range))",
    "CREATE TABLE IF NOT EXISTS turn_origin_to_realm (origin varchar(127),"
    " realm varchar(127), primary key (origin))",
    "CREATE TABLE IF NOT EXISTS turn_realm_option (realm varchar(127) default '',"
    " opt varchar(32), value varchar(128), primary key (realm, opt))",
    "CREATE TABLE IF NOT EXISTS oauth_key (kid varchar(128), ikm_key varchar(256),"
    " timestamp bigint default 0, lifetime integer default 0,"
    " as_rs_alg varchar(64) default '', realm varchar(127), primary key (kid))",
    "CREATE TABLE IF NOT EXISTS admin_user (name varchar(32), realm varchar(127),"
    " password varchar(127), primary key (name))",
)
_OWN_TABLES = (
    "CREATE TABLE IF NOT EXISTS tsunagu_user_sha256 (realm varchar(127) default '',"
    " name varchar(512), sha256 char(64), md5 char(32), primary key (realm, name))",
    "CREATE TABLE IF NOT EXISTS tsunagu_revocation (number integer primary key autoincrement,"
    " realm varchar(127) default '', user_id varchar(512), credential varchar(512),"
    " issued_before double precision, until double precision)",
)
BUSY_TIMEOUT = 1.0


class SqliteUserDatabase:
    """coturn's tables in one SQLite file; see :class:`~.database.UserDatabase`."""

    def __init__(self, path: Path | str, *, create: bool = True) -> None:
        self.path = Path(path)
        self._create = create
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="tsunagu-sqlite")
        self._connection: sqlite3.Connection | None = None

    @property
    def description(self) -> str:
        return f"SQLite {self.path}"

    # --- the thread's side ---

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            if not self._create and not self.path.exists():
                raise DatabaseError(f"{self.path} does not exist")
            if self._create:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
            try:
                for statement in (*_COTURN_TABLES, *_OWN_TABLES):
                    connection.execute(statement)
            except sqlite3.Error:
                connection.close()
                raise
            self._connection = connection
        return self._connection

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            try:
                return work(self._connect())
            except sqlite3.Error as exc:
                raise DatabaseError(f"{self.description}: {exc}") from None

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    # --- reads ---

    async def user_keys(self, realm: str, name: str) -> UserKeys | None:
        def read(db: sqlite3.Connection) -> UserKeys | None:
            row = db.execute(
                "SELECT hmackey FROM turnusers_lt WHERE realm = ? AND name = ?", (realm, name)
            ).fetchone()
            if row is None:
                return None
            own = db.execute(
                "SELECT sha256, md5 FROM tsunagu_user_sha256 WHERE realm = ? AND name = ?",
                (realm, name),
            ).fetchone()
            hmackey = str(row[0])
            fresh = own is not None and str(own[1]).lower() == hmackey.strip().lower()
            return keys_from_hex(hmackey, str(own[0]) if fresh else None)

        return await self._run(read)

    async def secrets(self, realm: str) -> tuple[str, ...]:
        def read(db: sqlite3.Connection) -> tuple[str, ...]:
            query = f"SELECT value FROM turn_secret WHERE realm = ? LIMIT {MAX_ROWS + 1}"
            return _bounded(db.execute(query, (realm,)).fetchall())

        return await self._run(read)

    async def peer_ranges(self, realm: str) -> PeerRanges:
        def read(db: sqlite3.Connection) -> PeerRanges:
            def ranges(table: str) -> tuple[str, ...]:
                query = f"SELECT ip_range FROM {table} WHERE realm = ? LIMIT {MAX_ROWS + 1}"
                return _bounded(db.execute(query, (realm,)).fetchall())

            return PeerRanges(ranges("allowed_peer_ip"), ranges("denied_peer_ip"))

        return await self._run(read)

    async def realm_options(self, realm: str) -> dict[str, str]:
        def read(db: sqlite3.Connection) -> dict[str, str]:
            rows = db.execute(
                "SELECT opt, value FROM turn_realm_option WHERE realm = ? LIMIT 64", (realm,)
            ).fetchall()
            return {str(o): str(v) for o, v in rows if o in REALM_OPTIONS and v is not None}

        return await self._run(read)

    async def users(self, realm: str | None) -> list[tuple[str, str]]:
        def read(db: sqlite3.Connection) -> list[tuple[str, str]]:
            if realm is None:
                rows = db.execute("SELECT realm, name FROM turnusers_lt ORDER BY realm, name")
            else:
                rows = db.execute(
                    "SELECT realm, name FROM turnusers_lt WHERE realm = ? ORDER BY name", (realm,)
                )
            return [(str(r[0]), str(r[1])) for r in rows]

        return await self._run(read)

    async def all_secrets(self, realm: str | None) -> list[tuple[str, str]]:
        def read(db: sqlite3.Connection) -> list[tuple[str, str]]:
            if realm is None:
                rows = db.execute("SELECT realm, value FROM turn_secret ORDER BY realm, value")
            else:
                rows = db.execute(
                    "SELECT realm, value FROM turn_secret WHERE realm = ? ORDER BY value", (realm,)
                )
            return [(str(r[0]), str(r[1])) for r in rows]

        return await self._run(read)

    # --- writes ---

    async def add_user(self, realm: str, name: str, keys: UserKeys) -> None:
        if keys.md5 is None:
            raise ValueError("coturn's table needs the MD5 key")
        md5 = keys.md5.hex()

        def write(db: sqlite3.Connection) -> None:
            with _transaction(db):
                db.execute(
                    "INSERT OR REPLACE INTO turnusers_lt (realm, name, hmackey) VALUES (?, ?, ?)",
                    (realm, name, md5),
                )
                db.execute(
                    "DELETE FROM tsunagu_user_sha256 WHERE realm = ? AND name = ?", (realm, name)
                )
                if keys.sha256 is not None:
                    db.execute(
                        "INSERT INTO tsunagu_user_sha256 (realm, name, sha256, md5)"
                        " VALUES (?, ?, ?, ?)",
                        (realm, name, keys.sha256.hex(), md5),
                    )

        await self._run(write)

    async def delete_user(self, realm: str, name: str) -> bool:
        def write(db: sqlite3.Connection) -> bool:
            with _transaction(db):
                gone = db.execute(
                    "DELETE FROM turnusers_lt WHERE realm = ? AND name = ?", (realm, name)
                ).rowcount
                db.execute(
                    "DELETE FROM tsunagu_user_sha256 WHERE realm = ? AND name = ?", (realm, name)
                )
            return gone > 0

        return await self._run(write)

    async def add_secret(self, realm: str, secret: str) -> None:
        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT OR IGNORE INTO turn_secret (realm, value) VALUES (?, ?)", (realm, secret)
            )

        await self._run(write)

    async def delete_secret(self, realm: str, secret: str) -> bool:
        def write(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "DELETE FROM turn_secret WHERE realm = ? AND value = ?", (realm, secret)
            )
            return cursor.rowcount > 0

        return await self._run(write)

    async def add_revocation(self, realm: str, revocation: Revocation) -> int:
        def write(db: sqlite3.Connection) -> int:
            with _transaction(db):
                db.execute(
                    "DELETE FROM tsunagu_revocation WHERE until <= ?", (revocation.issued_before,)
                )
                cursor = db.execute(
                    "INSERT INTO tsunagu_revocation (realm, user_id, credential, issued_before,"
                    " until) VALUES (?, ?, ?, ?, ?)",
                    (
                        realm,
                        revocation.user,
                        revocation.credential,
                        revocation.issued_before,
                        revocation.until,
                    ),
                )
            return int(cursor.lastrowid or 0)

        return await self._run(write)

    async def revocations(self, realm: str, after: int, now: float) -> list[Revocation]:
        def read(db: sqlite3.Connection) -> list[Revocation]:
            rows = db.execute(
                "SELECT number, issued_before, until, user_id, credential FROM tsunagu_revocation"
                " WHERE realm = ? AND number > ? AND until > ? ORDER BY number",
                (realm, after, now),
            )
            return [Revocation(int(r[0]), float(r[1]), float(r[2]), r[3], r[4]) for r in rows]

        return await self._run(read)

    async def close(self) -> None:
        def shut(_: object = None) -> None:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

        await asyncio.get_running_loop().run_in_executor(self._executor, shut)
        self._executor.shutdown(wait=False)


def _bounded(rows: list[tuple[object, ...]]) -> tuple[str, ...]:
    if len(rows) > MAX_ROWS:
        raise sqlite3.DataError(f"more than {MAX_ROWS} rows for a realm")
    return tuple(sorted(str(r[0]) for r in rows))


class _transaction:  # noqa: N801 - a context manager named for what it does
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if kind is not None else "COMMIT")
