"""The user databases in coturn's layouts (SQLite, PostgreSQL, Redis), the cache, and the
lookups that fill it.

coturn's own ``turnadmin`` writes users and secrets into each kind of database that tsunagu
then reads, and the reverse: what ``tsunagu`` writes, ``turnadmin -l`` lists. A database that
does not answer (a file locked by another writer, a server stopped) costs a lookup its
timeout or less, never the event loop, and leaves "unavailable" in the cache for a short
while; a server that comes back is used again without anything being restarted. PostgreSQL
and Redis run for real, one server each for the whole run, a database per test.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import socket
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tsunagu.auth.backends import open_user_database
from tsunagu.auth.cache import CachedAnswer, KeyCache, UserKeys
from tsunagu.auth.database import (
    MAX_ROWS,
    DatabaseError,
    UserDatabase,
    keys_from_hex,
    keys_of_password,
    parse_keyword_string,
)
from tsunagu.auth.postgres import PostgresUserDatabase, postgres_connect_arguments
from tsunagu.auth.redis import RedisUserDatabase, redis_connect_arguments
from tsunagu.auth.sqlite import SqliteUserDatabase
from tsunagu.config import parse_config
from tsunagu.transport.lookups import KeyLookups
from tsunagu.turn import KeyLookup
from tsunagu.turn.revocations import Revocation

TURNADMIN = shutil.which("turnadmin") or "/usr/bin/turnadmin"


def turnadmin(*argv: str) -> str:
    done = subprocess.run([TURNADMIN, *argv], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr + done.stdout
    return done.stdout


# --- the cache ---------------------------------------------------------------------------


def test_cache_answers_each_for_its_own_lifetime() -> None:
    cache = KeyCache(ttl=60, negative_ttl=10, failure_ttl=2)
    keys = UserKeys(md5=b"m" * 16)
    cache.put("r", "known", keys, 100.0)
    cache.put("r", "nobody", None, 100.0)
    cache.put_failure("r", "unlucky", 100.0)
    assert cache.get("r", "known", 159.0) == keys
    assert cache.get("r", "nobody", 109.0) is CachedAnswer.UNKNOWN
    assert cache.get("r", "unlucky", 101.9) is CachedAnswer.UNAVAILABLE
    assert cache.get("r", "unlucky", 102.0) is CachedAnswer.MISSING
    assert cache.get("r", "nobody", 110.0) is CachedAnswer.MISSING
    assert cache.get("r", "known", 160.0) is CachedAnswer.MISSING
    assert cache.get("other", "known", 100.0) is CachedAnswer.MISSING


def test_expired_keys_serve_again_while_the_database_does_not_answer() -> None:
    cache = KeyCache(ttl=60, failure_ttl=2, stale_ttl=900)
    keys = UserKeys(md5=b"m" * 16)
    cache.put("r", "known", keys, 100.0)
    # Expired: the database is asked again ...
    assert cache.get("r", "known", 200.0) is CachedAnswer.MISSING
    # ... and when it does not answer, the keys of late serve for failure_ttl.
    cache.put_failure("r", "known", 200.0)
    assert cache.get("r", "known", 201.9) == keys
    assert cache.get("r", "known", 202.0) is CachedAnswer.MISSING
    cache.put_failure("r", "known", 500.0)
    assert cache.get("r", "known", 500.0) == keys and cache.stale_served == 2
    # Not beyond stale_ttl after their expiry, however long the outage.
    cache.put_failure("r", "known", 100.0 + 60 + 900)
    assert cache.get("r", "known", 100.0 + 60 + 900) is CachedAnswer.UNAVAILABLE
    # A user never seen, or known to be unknown, is unavailable.
    cache.put("r", "nobody", None, 100.0)
    cache.put_failure("r", "nobody", 120.0)
    cache.put_failure("r", "stranger", 120.0)
    assert cache.get("r", "nobody", 120.0) is CachedAnswer.UNAVAILABLE
    assert cache.get("r", "stranger", 120.0) is CachedAnswer.UNAVAILABLE
    # The database's answer, when it comes, wins at once; a forgotten user serves nothing.
    cache.put("r", "known", None, 1200.0)
    assert cache.get("r", "known", 1200.0) is CachedAnswer.UNKNOWN
    cache.put("r", "again", keys, 100.0)
    cache.forget("r", "again")
    cache.put_failure("r", "again", 200.0)
    assert cache.get("r", "again", 200.0) is CachedAnswer.UNAVAILABLE


def test_cache_is_bounded_oldest_first() -> None:
    cache = KeyCache(limit=3)
    for number in range(5):
        cache.put("r", f"u{number}", None, 100.0)
    assert len(cache) == 3
    assert cache.get("r", "u1", 100.0) is CachedAnswer.MISSING
    assert cache.get("r", "u4", 100.0) is CachedAnswer.UNKNOWN
    with pytest.raises(ValueError):
        KeyCache(ttl=0)


def test_keys_from_coturns_column() -> None:
    md5 = hashlib.md5(b"alice:example.org:secret").hexdigest()
    assert keys_from_hex(md5) == UserKeys(md5=bytes.fromhex(md5))
    sha = hashlib.sha256(b"alice:example.org:secret").hexdigest()
    assert keys_from_hex(sha.upper()) == UserKeys(sha256=bytes.fromhex(sha))
    for bad in ("zz", "00" * 20):
        with pytest.raises(DatabaseError):
            keys_from_hex(bad)


# --- each backend in coturn's layout ------------------------------------------------------

COTURN_SCHEMA = Path("/usr/share/coturn/schema.sql")


@dataclass
class Backend:
    """A fresh database of one kind: how tsunagu opens it and how turnadmin names it."""

    kind: str
    open: Callable[[], UserDatabase]
    turnadmin: tuple[str, ...]
    server: Any = None


# PostgreSQL and Redis are real servers from Debian's packages: interop tests.
SERVERS = [pytest.param(kind, marks=pytest.mark.interop) for kind in ("postgres", "redis")]


@pytest.fixture(params=["sqlite", *SERVERS])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    kind = request.param
    if kind == "sqlite":
        path = tmp_path / "users.db"
        return Backend(kind, lambda: SqliteUserDatabase(path), ("-b", str(path)))
    if kind == "postgres":
        server = request.getfixturevalue("postgres_server")
        name = server.new_database()
        # As a coturn operator makes it: coturn's own schema first, then turnadmin.
        server.psql(COTURN_SCHEMA.read_text(), name)
        text = server.connection(name)
        return Backend(kind, lambda: PostgresUserDatabase(text), ("-e", text), server)
    server = request.getfixturevalue("redis_server")
    text = server.connection(server.new_database())
    return Backend(kind, lambda: RedisUserDatabase(text), ("-N", text), server)


@pytest.fixture
async def opened(backend: Backend) -> AsyncIterator[UserDatabase]:
    database = backend.open()
    try:
        yield database
    finally:
        await database.close()


async def test_turnadmins_users_and_secrets_are_served(
    backend: Backend, opened: UserDatabase
) -> None:
    turnadmin("-a", *backend.turnadmin, "-u", "alice", "-r", "example.org", "-p", "secret")
    turnadmin("-a", *backend.turnadmin, "-u", "bob", "-r", "elsewhere", "-p", "x")
    turnadmin("-s", "rest-secret", *backend.turnadmin, "-r", "example.org")
    keys = await opened.user_keys("example.org", "alice")
    assert keys == UserKeys(md5=hashlib.md5(b"alice:example.org:secret").digest())
    assert await opened.user_keys("example.org", "bob") is None
    assert await opened.user_keys("elsewhere", "alice") is None
    assert await opened.user_keys("example.org", "x" * 600) is None
    assert await opened.user_keys("example.org", "al\x00ice") is None
    assert await opened.secrets("example.org") == ("rest-secret",)
    assert await opened.users(None) == [("elsewhere", "bob"), ("example.org", "alice")]
    assert await opened.users("example.org") == [("example.org", "alice")]
    assert await opened.all_secrets(None) == [("example.org", "rest-secret")]


async def test_turnadmins_realm_options_are_read(backend: Backend, opened: UserDatabase) -> None:
    assert await opened.realm_options("example.org") == {}
    turnadmin(
        "-g", *backend.turnadmin, "-r", "example.org",
        "--user-quota", "3", "--total-quota", "50", "--max-bps", "1000",
    )  # fmt: skip
    assert await opened.realm_options("example.org") == {
        "user-quota": "3",
        "total-quota": "50",
        "max-bps": "1000",
    }
    assert await opened.realm_options("elsewhere") == {}


async def test_what_tsunagu_writes_turnadmin_reads_on_each_backend(
    backend: Backend, opened: UserDatabase
) -> None:
    await opened.add_user("example.org", "carol", keys_of_password("carol", "example.org", "pw"))
    await opened.add_secret("example.org", "s1")
    await opened.add_secret("example.org", "s1")  # once only
    assert await opened.user_keys("example.org", "carol") == keys_of_password(
        "carol", "example.org", "pw"
    )
    assert await opened.all_secrets(None) == [("example.org", "s1")]
    assert "carol" in turnadmin("-l", *backend.turnadmin, "-r", "example.org")
    assert "s1" in turnadmin("-S", *backend.turnadmin, "-r", "example.org")
    assert await opened.delete_secret("example.org", "s1")
    assert not await opened.delete_secret("example.org", "s1")
    assert await opened.secrets("example.org") == ()


async def test_a_password_changed_by_turnadmin_leaves_the_sha256_key_stale(
    backend: Backend, opened: UserDatabase
) -> None:
    await opened.add_user("r", "dave", keys_of_password("dave", "r", "old"))
    assert (await opened.user_keys("r", "dave")) == keys_of_password("dave", "r", "old")
    turnadmin("-a", *backend.turnadmin, "-u", "dave", "-r", "r", "-p", "new")
    keys = await opened.user_keys("r", "dave")
    assert keys == UserKeys(md5=keys_of_password("dave", "r", "new").md5)
    # tsunagu's own write makes both keys fresh again.
    await opened.add_user("r", "dave", keys_of_password("dave", "r", "newer"))
    assert await opened.user_keys("r", "dave") == keys_of_password("dave", "r", "newer")
    assert await opened.delete_user("r", "dave")
    assert not await opened.delete_user("r", "dave")
    assert await opened.user_keys("r", "dave") is None
    turnadmin("-a", *backend.turnadmin, "-u", "dave", "-r", "r", "-p", "again")
    # The SHA-256 key of the deleted user does not come back with the name.
    assert await opened.user_keys("r", "dave") == UserKeys(
        md5=keys_of_password("dave", "r", "again").md5
    )


async def test_more_lookups_at_once_than_connections_wait_their_turn(
    opened: UserDatabase,
) -> None:
    await opened.add_user("r", "u7", keys_of_password("u7", "r", "pw"))
    answers = await asyncio.gather(*(opened.user_keys("r", f"u{n}") for n in range(40)))
    assert [n for n, keys in enumerate(answers) if keys is not None] == [7]


async def test_revocations_are_numbered_read_after_a_number_and_dropped_when_run_out(
    opened: UserDatabase,
) -> None:
    first = await opened.add_revocation("r", Revocation(0, 1000.0, 1600.0, user="u1"))
    second = await opened.add_revocation("r", Revocation(0, 1010.0, 1700.0, credential="9:u2"))
    await opened.add_revocation("other", Revocation(0, 1010.0, 1700.0))
    assert second > first
    found = await opened.revocations("r", 0, 1100.0)
    assert found == [
        Revocation(first, 1000.0, 1600.0, user="u1"),
        Revocation(second, 1010.0, 1700.0, credential="9:u2"),
    ]
    assert [r.number for r in await opened.revocations("r", first, 1100.0)] == [second]
    assert [r.number for r in await opened.revocations("r", 0, 1650.0)] == [second]
    # Adding one at a later time drops those run out by then.
    third = await opened.add_revocation("r", Revocation(0, 1650.0, 2000.0))
    assert [r.number for r in await opened.revocations("r", 0, 0.0)] == [second, third]


async def test_peer_ranges_from_coturns_tables_and_sets(
    backend: Backend, opened: UserDatabase
) -> None:
    rows = {"allowed_peer_ip": ["10.0.0.0/8"], "denied_peer_ip": ["10.1.0.0/16", "192.0.2.7"]}
    await opened.users(None)  # the tables exist once the database has been used
    for table, ranges in rows.items():
        for text in ranges:
            if backend.kind == "sqlite":
                with sqlite3.connect(backend.turnadmin[1]) as db:
                    db.execute(f"INSERT INTO {table} VALUES ('r', ?)", (text,))
            elif backend.kind == "postgres":
                name = backend.turnadmin[1].split("dbname=")[1].split()[0]
                backend.server.psql(f"INSERT INTO {table} VALUES ('r', '{text}')", name)
            else:
                assert isinstance(opened, RedisUserDatabase)
                await opened._client.sadd(f"turn/realm/r/{table.replace('_', '-')}", text)
    ranges = await opened.peer_ranges("r")
    assert ranges.allowed == ("10.0.0.0/8",)
    assert ranges.denied == ("10.1.0.0/16", "192.0.2.7")
    assert await opened.peer_ranges("elsewhere") == type(ranges)()


async def test_too_many_secrets_fail_the_read_and_a_broken_one_is_left_out(
    backend: Backend, opened: UserDatabase
) -> None:
    await opened.add_secret("r", "good")
    await opened.add_secret("big", "first")
    many = MAX_ROWS + 1
    if backend.kind == "sqlite":
        with sqlite3.connect(backend.turnadmin[1]) as db:
            db.executemany(
                "INSERT INTO turn_secret VALUES ('big', ?)", ((f"s{n}",) for n in range(many))
            )
    elif backend.kind == "postgres":
        name = backend.turnadmin[1].split("dbname=")[1].split()[0]
        backend.server.psql(
            f"INSERT INTO turn_secret SELECT 'big', 's' || n FROM generate_series(1, {many}) n",
            name,
        )
    else:
        assert isinstance(opened, RedisUserDatabase)
        await opened._client.sadd("turn/realm/big/secret", *(f"s{n}" for n in range(many)))
        await opened._client.sadd("turn/realm/r/secret", b"\xff\xfe")
    with pytest.raises(DatabaseError, match="more than"):
        await opened.secrets("big")
    assert await opened.secrets("r") == ("good",)


async def test_a_user_deleted_by_turnadmin_is_gone(backend: Backend, opened: UserDatabase) -> None:
    await opened.add_user("r", "gus", keys_of_password("gus", "r", "pw"))
    turnadmin("-d", *backend.turnadmin, "-u", "gus", "-r", "r")
    assert await opened.user_keys("r", "gus") is None
    assert await opened.users("r") == []


async def test_a_broken_record_is_an_error_for_that_user_only(
    backend: Backend, opened: UserDatabase
) -> None:
    await opened.add_user("r", "good", keys_of_password("good", "r", "pw"))
    await opened.add_user("r", "bad", keys_of_password("bad", "r", "pw"))
    if backend.kind == "sqlite":
        path = backend.turnadmin[1]
        with sqlite3.connect(path) as db:
            db.execute("UPDATE turnusers_lt SET hmackey = 'not hex' WHERE name = 'bad'")
    elif backend.kind == "postgres":
        database = backend.turnadmin[1].split("dbname=")[1].split()[0]
        backend.server.psql(
            "UPDATE turnusers_lt SET hmackey = 'not hex' WHERE name = 'bad'", database
        )
    else:
        assert isinstance(opened, RedisUserDatabase)
        await opened._client.set("turn/realm/r/user/bad/key", b"\xff" * 10_000)
    with pytest.raises(DatabaseError):
        await opened.user_keys("r", "bad")
    assert await opened.user_keys("r", "good") == keys_of_password("good", "r", "pw")


# --- PostgreSQL and Redis: connection strings, outages ----------------------------------------


def test_connection_strings_in_coturns_forms() -> None:
    assert parse_keyword_string("host = db  password='a b\\'c' port=1", "x") == {
        "host": "db",
        "password": "a b'c",
        "port": "1",
    }
    for bad in ("host", "host=a host=b", "password='open"):
        with pytest.raises(DatabaseError) as caught:
            parse_keyword_string(bad, "x")
        assert "open" not in str(caught.value)
    arguments, where, password = postgres_connect_arguments(
        "host=10.0.0.5 port=5433 dbname=coturn user=turn password=hunter2 connect_timeout=30"
    )
    assert arguments == {
        "host": "10.0.0.5",
        "port": 5433,
        "database": "coturn",
        "user": "turn",
        "password": "hunter2",
        "timeout": 5.0,
    }
    assert where == "PostgreSQL 10.0.0.5:5433/coturn as turn" and password == "hunter2"
    arguments, where, _ = postgres_connect_arguments("postgresql://turn:hunter2@db:5433/coturn")
    assert arguments == {"dsn": "postgresql://turn:hunter2@db:5433/coturn"}
    assert "hunter2" not in where and "db:5433/coturn" in where
    with pytest.raises(DatabaseError, match="unknown keyword 'hots'"):
        postgres_connect_arguments("hots=db password=hunter2")
    arguments, where, _ = redis_connect_arguments(
        "ip=127.0.0.1 dbname=2 password=hunter2 port=6380 connect_timeout=30"
    )
    assert arguments == {
        "host": "127.0.0.1",
        "db": 2,
        "password": "hunter2",
        "port": 6380,
        "timeout": 5.0,
    }
    assert where == "Redis 127.0.0.1:6380/2"
    _, where, _ = redis_connect_arguments("redis://:hunter2@cache:6390/4")
    assert where == "Redis cache:6390/4"
    with pytest.raises(DatabaseError, match="dbname"):
        redis_connect_arguments("ip=x dbname=first")


def test_the_configuration_picks_one_backend_and_hides_its_password(tmp_path: Path) -> None:
    psql = "host=127.0.0.1 dbname=turn user=turn password=hunter2"
    config = parse_config({"psql_userdb": psql})
    assert isinstance(open_user_database(config), PostgresUserDatabase)
    assert "hunter2" not in repr(config)
    config = parse_config({"redis_userdb": "redis://:hunter2@127.0.0.1/1"})
    assert isinstance(open_user_database(config), RedisUserDatabase)
    config = parse_config({"userdb": str(tmp_path / "u.db")})
    assert isinstance(open_user_database(config), SqliteUserDatabase)
    for mapping in (
        {"userdb": "u.db", "psql_userdb": psql},
        {"psql_userdb": psql, "redis_userdb": "ip=x password=hunter2"},
        {"redis_userdb": "hunter2"},
    ):
        with pytest.raises(ValueError) as caught:
            parse_config(mapping)
        assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize("kind", SERVERS)
async def test_a_stopped_server_fails_fast_and_is_used_again_when_back(
    kind: str, request: pytest.FixtureRequest
) -> None:
    server = request.getfixturevalue(f"{kind}_server")
    if kind == "postgres":
        database: UserDatabase = PostgresUserDatabase(server.connection(server.new_database()))
    else:
        database = RedisUserDatabase(server.connection(server.new_database()))
    wrong: UserDatabase = (PostgresUserDatabase if kind == "postgres" else RedisUserDatabase)(
        server.connection(server.new_database()).replace(server.password, "wrong-password")
    )
    try:
        await database.add_user("r", "erin", keys_of_password("erin", "r", "pw"))
        with pytest.raises(DatabaseError) as caught:
            await wrong.user_keys("r", "erin")
        assert "wrong-password" not in str(caught.value)
        server.stop()
        try:
            for _ in range(3):
                started = time.monotonic()
                with pytest.raises(DatabaseError) as caught:
                    await database.user_keys("r", "erin")
                assert time.monotonic() - started < 0.5
                assert server.password not in str(caught.value)
                await asyncio.sleep(0.4)
        finally:
            server.start()
        # Within a second of its return (calls fail at once for that long after a refusal).
        deadline = time.monotonic() + 5
        while True:
            try:
                keys = await database.user_keys("r", "erin")
                break
            except DatabaseError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
        if kind == "postgres":  # Redis here keeps nothing across a restart
            assert keys == keys_of_password("erin", "r", "pw")
    finally:
        await database.close()
        await wrong.close()


@pytest.mark.parametrize("kind", SERVERS)
async def test_keys_of_late_serve_again_while_the_server_is_away(
    kind: str, request: pytest.FixtureRequest
) -> None:
    server = request.getfixturevalue(f"{kind}_server")
    text = server.connection(server.new_database())
    database: UserDatabase = (
        PostgresUserDatabase(text) if kind == "postgres" else RedisUserDatabase(text)
    )
    cache = KeyCache(ttl=0.2, failure_ttl=0.5, stale_ttl=60)
    lookups = KeyLookups(database, cache)
    done: list[str] = []

    async def look_up(name: str) -> None:
        done.clear()
        assert lookups.submit(KeyLookup(name, "r"), lambda: done.append(name))
        for _ in range(300):
            if done:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"the lookup of {name} did not end")

    try:
        await database.add_user("r", "erin", keys_of_password("erin", "r", "pw"))
        await look_up("erin")
        await asyncio.sleep(0.3)
        assert cache.get("r", "erin", time.time()) is CachedAnswer.MISSING
        server.stop()
        try:
            await look_up("erin")
            assert cache.get("r", "erin", time.time()) == keys_of_password("erin", "r", "pw")
            await look_up("ghost")
            assert cache.get("r", "ghost", time.time()) is CachedAnswer.UNAVAILABLE
        finally:
            server.start()
        assert cache.stale_served == 1 and lookups.total_failed == 2
    finally:
        await lookups.close()
        await database.close()


@pytest.mark.parametrize("kind", SERVERS)
async def test_a_server_that_never_answers_costs_a_call_its_timeout_and_no_more(
    kind: str,
) -> None:
    # Connections are taken by the kernel and never answered: a frozen server.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        port = silent.getsockname()[1]
        if kind == "postgres":
            text = f"host=127.0.0.1 port={port} dbname=x user=x password=pw connect_timeout=0"
            database: UserDatabase = PostgresUserDatabase(text, timeout=0.5)
        else:
            text = f"ip=127.0.0.1 port={port} password=pw connect_timeout=0"
            database = RedisUserDatabase(text, timeout=0.5)
        try:
            started = time.monotonic()
            with pytest.raises(DatabaseError, match="no answer in 0.5 s"):
                await database.user_keys("r", "erin")
            assert time.monotonic() - started < 1.5
            # Then at once, for a while, instead of each call waiting again.
            started = time.monotonic()
            with pytest.raises(DatabaseError):
                await database.secrets("r")
            assert time.monotonic() - started < 0.1
        finally:
            await database.close()


# --- SQLite's own file -------------------------------------------------------------------


async def test_a_database_filled_by_turnadmin_serves_its_users_and_secrets(
    tmp_path: Path,
) -> None:
    path = tmp_path / "turndb"
    turnadmin("-a", "-b", str(path), "-u", "alice", "-r", "example.org", "-p", "secret")
    turnadmin("-s", "rest-secret", "-b", str(path), "-r", "example.org")
    database = SqliteUserDatabase(path, create=False)
    try:
        keys = await database.user_keys("example.org", "alice")
        assert keys == UserKeys(md5=hashlib.md5(b"alice:example.org:secret").digest())
        assert await database.user_keys("example.org", "bob") is None
        assert await database.user_keys("elsewhere", "alice") is None
        assert await database.secrets("example.org") == ("rest-secret",)
        assert await database.users(None) == [("example.org", "alice")]
    finally:
        await database.close()


async def test_a_missing_file_is_an_error_when_it_may_not_be_created(tmp_path: Path) -> None:
    database = SqliteUserDatabase(tmp_path / "absent.db", create=False)
    try:
        with pytest.raises(DatabaseError, match="does not exist"):
            await database.user_keys("r", "x")
    finally:
        await database.close()
    assert not (tmp_path / "absent.db").exists()


# --- lookups ---------------------------------------------------------------------------


async def test_lookups_ask_once_per_user_and_hand_every_request_in_again(
    opened: UserDatabase,
) -> None:
    await opened.add_user("r", "erin", keys_of_password("erin", "r", "pw"))
    cache = KeyCache()
    lookups = KeyLookups(opened, cache)
    done: list[str] = []
    try:
        for number in range(5):
            assert lookups.submit(KeyLookup("erin", "r"), lambda n=number: done.append(f"e{n}"))
        assert lookups.submit(KeyLookup("ghost", "r"), lambda: done.append("g"))
        for _ in range(200):
            if len(done) == 6:
                break
            await asyncio.sleep(0.01)
        assert sorted(done) == ["e0", "e1", "e2", "e3", "e4", "g"]
        assert lookups.total_queries == 2 and lookups.pending == 0
        assert isinstance(cache.get("r", "erin", time.time()), UserKeys)
        assert cache.get("r", "ghost", time.time()) is CachedAnswer.UNKNOWN
    finally:
        await lookups.close()


async def test_a_locked_database_is_unavailable_and_the_lookups_stay_bounded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "users.db"
    database = SqliteUserDatabase(path)
    await database.add_user("r", "erin", keys_of_password("erin", "r", "pw"))
    # Another writer holds the file: every query waits for the lock, then fails.
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    cache = KeyCache()
    lookups = KeyLookups(database, cache, pending_limit=10, waiting_per_user=2, timeout=0.5)
    done: list[str] = []
    try:
        started = time.monotonic()
        accepted = [
            lookups.submit(KeyLookup(f"user{n}", "r"), lambda n=n: done.append(str(n)))
            for n in range(15)
        ]
        assert accepted == [True] * 10 + [False] * 5
        # Retransmissions wait with the first request, up to two per user.
        assert lookups.submit(KeyLookup("user0", "r"), lambda: done.append("again"))
        assert not lookups.submit(KeyLookup("user0", "r"), lambda: None)
        # The event loop is not blocked while the queries wait.
        ticks = 0
        while len(done) < 11 and time.monotonic() - started < 10:
            await asyncio.sleep(0.01)
            ticks += 1
        assert len(done) == 11 and ticks > 20, (done, ticks)
        assert cache.get("r", "user3", time.time()) is CachedAnswer.UNAVAILABLE
        lookups.report(worker=0, interval=10.0)
        [record] = [r for r in caplog.records if "key lookups failed" in r.getMessage()]
        assert "10 of 10 key lookups failed" in record.getMessage()
        assert "6 requests dropped" in record.getMessage()
    finally:
        holder.rollback()
        holder.close()
        await lookups.close()
        await database.close()


async def test_an_answer_read_before_a_reload_is_not_cached_after_it(tmp_path: Path) -> None:
    path = tmp_path / "users.db"
    database = SqliteUserDatabase(path)
    await database.add_user("r", "erin", keys_of_password("erin", "r", "pw"))
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # the query waits for the lock
    cache = KeyCache()
    lookups = KeyLookups(database, cache, timeout=5)
    done: list[str] = []
    try:
        assert lookups.submit(KeyLookup("erin", "r"), lambda: done.append("erin"))
        await asyncio.sleep(0.2)
        cache.clear()  # tsunagu reload while the query waits
        holder.execute("ROLLBACK")
        for _ in range(300):
            if done:
                break
            await asyncio.sleep(0.01)
        assert done == ["erin"]
        # What the query read may be what the reload meant to drop: not kept.
        assert cache.get("r", "erin", time.time()) is CachedAnswer.MISSING
        assert lookups.submit(KeyLookup("erin", "r"), lambda: done.append("again"))
        for _ in range(300):
            if len(done) == 2:
                break
            await asyncio.sleep(0.01)
        assert cache.get("r", "erin", time.time()) == keys_of_password("erin", "r", "pw")
    finally:
        holder.close()
        await lookups.close()
        await database.close()
