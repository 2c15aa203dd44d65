"""The SQLite user database in coturn's layout, its cache, and the lookups that fill it.

coturn's own ``turnadmin`` writes users and secrets into a file that tsunagu then reads, and
the reverse: what ``tsunagu`` writes, ``turnadmin -l`` lists. A database that does not answer
(a file locked by another writer) costs a lookup its timeout, never the event loop, and
leaves "unavailable" in the cache for a short while.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tsunagu.auth.cache import CachedAnswer, KeyCache, UserKeys
from tsunagu.auth.database import DatabaseError, keys_from_hex, keys_of_password
from tsunagu.auth.sqlite import SqliteUserDatabase
from tsunagu.transport.lookups import KeyLookups
from tsunagu.turn import KeyLookup

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


# --- SQLite in coturn's layout -----------------------------------------------------------


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


async def test_what_tsunagu_writes_turnadmin_reads(tmp_path: Path) -> None:
    path = tmp_path / "users.db"
    database = SqliteUserDatabase(path)
    try:
        await database.add_user(
            "example.org", "carol", keys_of_password("carol", "example.org", "pw")
        )
        await database.add_secret("example.org", "s1")
        await database.add_secret("example.org", "s1")  # once only
        keys = await database.user_keys("example.org", "carol")
        assert keys == keys_of_password("carol", "example.org", "pw")
        assert await database.all_secrets(None) == [("example.org", "s1")]
    finally:
        await database.close()
    assert "carol" in turnadmin("-l", "-b", str(path), "-r", "example.org")
    assert "s1" in turnadmin("-S", "-b", str(path), "-r", "example.org")


async def test_a_password_changed_by_turnadmin_drops_the_stale_sha256_key(tmp_path: Path) -> None:
    path = tmp_path / "users.db"
    database = SqliteUserDatabase(path)
    try:
        await database.add_user("r", "dave", keys_of_password("dave", "r", "old"))
        turnadmin("-a", "-b", str(path), "-u", "dave", "-r", "r", "-p", "new")
        keys = await database.user_keys("r", "dave")
        assert keys == UserKeys(md5=keys_of_password("dave", "r", "new").md5)
        assert await database.delete_user("r", "dave")
        assert not await database.delete_user("r", "dave")
        assert await database.user_keys("r", "dave") is None
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


async def test_lookups_ask_once_per_user_and_hand_every_request_in_again(tmp_path: Path) -> None:
    database = SqliteUserDatabase(tmp_path / "users.db")
    await database.add_user("r", "erin", keys_of_password("erin", "r", "pw"))
    cache = KeyCache()
    lookups = KeyLookups(database, cache)
    done: list[str] = []
    try:
        for number in range(5):
            assert lookups.submit(KeyLookup("erin", "r"), lambda n=number: done.append(f"e{n}"))
        assert lookups.submit(KeyLookup("ghost", "r"), lambda: done.append("g"))
        for _ in range(100):
            if len(done) == 6:
                break
            await asyncio.sleep(0.01)
        assert sorted(done) == ["e0", "e1", "e2", "e3", "e4", "g"]
        assert lookups.total_queries == 2 and lookups.pending == 0
        assert isinstance(cache.get("r", "erin", time.time()), UserKeys)
        assert cache.get("r", "ghost", time.time()) is CachedAnswer.UNKNOWN
    finally:
        await lookups.close()
        await database.close()


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
