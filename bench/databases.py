"""User databases for the benchmark: one SQLite file, PostgreSQL or Redis server per run.

Each is filled once with coturn's rows for ``users`` long-term users (``turnusers_lt`` /
``turn/realm/<realm>/user/<name>/key``: the hex MD5 of name:realm:password, what coturn's
``turnadmin -a`` writes), and the very same database then serves coturn and tsunagu in turn.

PostgreSQL and Redis run in the foreground from Debian's packages, in a directory of their own
under /tmp, on a port picked from the kernel, on loopback only, with a password. They stop by
themselves: each runs under ``timeout`` (the run's time limit), and that ``timeout`` gets a
signal when the benchmark process dies, which it passes on. This mirrors
tests/support/databases.py, which the benchmark does not import (bench/ does not depend on the
tests).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .servers import HOST, REALM, BenchError

KINDS = ("sqlite", "postgresql", "redis")
LABELS = {"sqlite": "SQLite", "postgresql": "PostgreSQL", "redis": "Redis"}
PG_BIN = Path("/usr/lib/postgresql/15/bin")
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
COTURN_SCHEMA = Path("/usr/share/coturn/schema.sql")
START_TIMEOUT = 30.0
# The users' names and passwords; "{n}" is the user's number (tsunagu probe --users).
USER_PATTERN = ("bench{n}", "bench-pw-{n}")

# coturn's user table (its schema.sql), for when coturn's own copy is not installed.
_TURNUSERS_LT = (
    "CREATE TABLE turnusers_lt (realm varchar(127) default '', name varchar(512),"
    " hmackey char(128), PRIMARY KEY (realm,name))"
)


def available(kind: str) -> bool:
    if kind == "postgresql":
        return (PG_BIN / "postgres").exists() and shutil.which("psql") is not None
    if kind == "redis":
        return Path(REDIS_SERVER).exists()
    return True


def user(number: int) -> tuple[str, str]:
    name, password = USER_PATTERN
    return name.replace("{n}", str(number)), password.replace("{n}", str(number))


def hmackey(name: str, password: str, realm: str = REALM) -> str:
    """coturn's key for a long-term user, as turnadmin stores it."""
    return hashlib.md5(f"{name}:{realm}:{password}".encode()).hexdigest()


@dataclass
class UserDatabase:
    """A filled user database and the options that point each server at it."""

    kind: str
    users: int
    tsunagu_args: list[str]
    coturn_args: list[str]
    process: subprocess.Popen[bytes] | None = None
    fill_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return LABELS[self.kind]

    def cpu_seconds(self) -> float:
        """CPU used so far by the database server and every process it started."""
        if self.process is None:
            return 0.0
        return _tree_cpu(self.process.pid)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "users": self.users,
            "fill_seconds": round(self.fill_seconds, 3),
            "tsunagu": self.tsunagu_args,
            "coturn": self.coturn_args,
            **self.extra,
        }


def _tree_cpu(root: int) -> float:
    """utime + stime of ``root`` and its descendants, plus what their reaped children used."""
    parents: dict[int, int] = {}
    times: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rpartition(")")[2].split()
        except OSError:
            continue
        pid = int(entry)
        parents[pid] = int(fields[1])
        times[pid] = sum(int(value) for value in fields[11:15])
    total = 0
    for pid, ticks in times.items():
        ancestor = pid
        for _ in range(8):
            if ancestor == root:
                total += ticks
                break
            ancestor = parents.get(ancestor, 0)
            if ancestor <= 1:
                break
    return total / os.sysconf("SC_CLK_TCK")


def _free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


_PR_SET_PDEATHSIG = 1


def _die_with_parent(signum: int) -> Any:
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        # Runs after the switch to another user (which would clear it), right before exec.
        libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)

    return preexec


def _bounded(command: list[str], lifetime: float, signum: int) -> list[str]:
    """``command`` under ``timeout``: it gets ``signum`` after ``lifetime`` seconds at most,
    and whatever signal ``timeout`` gets (from the dying benchmark) too."""
    name = signal.Signals(signum).name.removeprefix("SIG")
    return ["timeout", "-s", name, "-k", "10", f"{max(1, int(lifetime))}", *command]


def _stop(process: subprocess.Popen[bytes] | None, signum: int) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signum)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-2000:]
    except FileNotFoundError:
        return ""


def _wait_ready(
    process: subprocess.Popen[bytes], ready: Any, what: str, log: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"{what} exited:\n{_tail(log)}")
        if ready():
            return
        time.sleep(0.05)
    raise BenchError(f"{what} was not ready within {timeout:.0f} s:\n{_tail(log)}")


# --- SQLite ----------------------------------------------------------------------------------


def _schema() -> str:
    return COTURN_SCHEMA.read_text() if COTURN_SCHEMA.exists() else _TURNUSERS_LT + ";"


def _rows(users: int) -> list[tuple[str, str, str]]:
    return [(REALM, name, hmackey(name, password)) for name, password in map(user, range(users))]


@contextlib.contextmanager
def sqlite_database(directory: Path, users: int) -> Iterator[UserDatabase]:
    path = directory / "turndb.sqlite"
    started = time.monotonic()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(_schema())
        db.executemany(
            "INSERT INTO turnusers_lt (realm, name, hmackey) VALUES (?, ?, ?)", _rows(users)
        )
        db.commit()
    database = UserDatabase("sqlite", users, ["-b", str(path)], ["-b", str(path)])
    database.fill_seconds = time.monotonic() - started
    try:
        yield database
    finally:
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


# --- PostgreSQL ------------------------------------------------------------------------------


def _as_postgres() -> dict[str, Any]:
    return {
        "user": "postgres",
        "group": "postgres",
        "extra_groups": [],
        "env": {"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
    }


@contextlib.contextmanager
def postgres_database(users: int, lifetime: float) -> Iterator[UserDatabase]:
    # postgres refuses to run as root and must reach its directory as the postgres user.
    directory = Path(tempfile.mkdtemp(prefix="tsunagu-bench-pg-", dir="/tmp"))
    process = None
    try:
        os.chmod(directory, 0o755)
        shutil.chown(directory, "postgres", "postgres")
        password = "pg-" + secrets.token_hex(8)
        pwfile = directory / "pw"
        pwfile.write_text(password + "\n")
        shutil.chown(pwfile, "postgres", "postgres")
        subprocess.run(
            [str(PG_BIN / "initdb"), "-D", str(directory / "data"), "-U", "postgres",
             "--no-sync", "--auth-local=trust", "--auth-host=scram-sha-256",
             f"--pwfile={pwfile}"],
            check=True, capture_output=True, timeout=60, **_as_postgres(),
        )  # fmt: skip
        pwfile.unlink()
        port = _free_tcp_port()
        log = directory / "postgres.log"
        command = [
            str(PG_BIN / "postgres"), "-D", str(directory / "data"), "-p", str(port),
            "-k", str(directory), "-c", f"listen_addresses={HOST}", "-c", "fsync=off",
            "-c", "full_page_writes=off", "-c", "synchronous_commit=off",
        ]  # fmt: skip
        with open(log, "ab") as out:
            # SIGINT: a fast shutdown (SIGTERM would wait for the clients to leave).
            process = subprocess.Popen(
                _bounded(command, lifetime, signal.SIGINT),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent(signal.SIGINT),
                **_as_postgres(),
            )

        def ready() -> bool:
            done = subprocess.run(
                [str(PG_BIN / "pg_isready"), "-q", "-h", HOST, "-p", str(port)],
                capture_output=True,
                timeout=10,
            )
            return done.returncode == 0

        _wait_ready(process, ready, "postgres", log, START_TIMEOUT)
        started = time.monotonic()
        # coturn's schema, then every user in one statement, keys made by PostgreSQL itself.
        sql = (
            "CREATE DATABASE coturn;\n\\c coturn\n"
            + _schema()
            + "\nINSERT INTO turnusers_lt (realm, name, hmackey) SELECT "
            + f"'{REALM}', 'bench' || n, md5('bench' || n || ':{REALM}:bench-pw-' || n) "
            + f"FROM generate_series(0, {users - 1}) AS n;\n"
        )
        done = subprocess.run(
            ["psql", "-X", "-q", "-h", HOST, "-p", str(port), "-U", "postgres", "-d", "postgres",
             "-v", "ON_ERROR_STOP=1"],
            input=sql.encode(), capture_output=True, timeout=60,
            env={"PATH": "/usr/bin:/bin", "PGPASSWORD": password},
        )  # fmt: skip
        if done.returncode != 0:
            raise BenchError(f"filling PostgreSQL: {done.stderr.decode(errors='replace')}")
        connection = (
            f"host={HOST} port={port} dbname=coturn user=postgres password={password}"
            " connect_timeout=5"
        )
        database = UserDatabase(
            "postgresql",
            users,
            ["--psql-userdb", connection],
            ["--psql-userdb", connection],
            process,
        )
        database.fill_seconds = time.monotonic() - started
        yield database
    finally:
        _stop(process, signal.SIGINT)
        shutil.rmtree(directory, ignore_errors=True)


# --- Redis -----------------------------------------------------------------------------------


@contextlib.contextmanager
def redis_database(users: int, lifetime: float) -> Iterator[UserDatabase]:
    directory = Path(tempfile.mkdtemp(prefix="tsunagu-bench-redis-", dir="/tmp"))
    process = None
    try:
        password = "redis-" + secrets.token_hex(8)
        port = _free_tcp_port()
        log = directory / "redis.log"
        command = [
            REDIS_SERVER, "--port", str(port), "--bind", HOST, "--save", "",
            "--appendonly", "no", "--daemonize", "no", "--dir", str(directory),
            "--logfile", str(log), "--requirepass", password,
        ]  # fmt: skip
        process = subprocess.Popen(
            _bounded(command, lifetime, signal.SIGTERM),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent(signal.SIGTERM),
        )

        def ready() -> bool:
            try:
                with socket.create_connection((HOST, port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
            except OSError:
                return False

        _wait_ready(process, ready, "redis-server", log, START_TIMEOUT)
        started = time.monotonic()
        import redis

        client = redis.Redis(host=HOST, port=port, password=password, db=0)
        try:
            # coturn's layout (its schema.userdb.redis): one string per user, in one MSET.
            client.mset(
                {f"turn/realm/{REALM}/user/{name}/key": key for _, name, key in _rows(users)}
            )
        finally:
            client.close()
        connection = f"ip={HOST} dbname=0 password={password} port={port} connect_timeout=5"
        database = UserDatabase(
            "redis", users, ["--redis-userdb", connection], ["--redis-userdb", connection], process
        )
        database.fill_seconds = time.monotonic() - started
        yield database
    finally:
        _stop(process, signal.SIGTERM)
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def user_database(kind: str, workdir: Path, users: int, lifetime: float) -> Iterator[UserDatabase]:
    """A database of ``kind`` with ``users`` users, gone (and its server stopped) on exit."""
    if kind == "sqlite":
        with sqlite_database(workdir, users) as database:
            yield database
    elif kind == "postgresql":
        with postgres_database(users, lifetime) as database:
            yield database
    elif kind == "redis":
        with redis_database(users, lifetime) as database:
            yield database
    else:
        raise BenchError(f"unknown user database {kind!r}; known: {', '.join(KINDS)}")
