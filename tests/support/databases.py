"""Throwaway PostgreSQL and Redis servers for the user database tests.

Each runs in the foreground from Debian's packages (``postgresql``, ``redis-server``) in a
directory of its own under /tmp, on a port picked from the kernel, on loopback only, with a
password, and is stopped by its PID. :meth:`stop` and :meth:`start` again keep the port,
the password and the data directory, for the outage tests.

PostgreSQL refuses to run as root: initdb and the server run as the ``postgres`` user,
whose directory must therefore be outside pytest's ``/tmp/pytest-of-root`` (mode 0700).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PG_BIN = Path("/usr/lib/postgresql/15/bin")
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
HOST = "127.0.0.1"


def postgres_available() -> bool:
    return (PG_BIN / "postgres").exists() and (PG_BIN / "initdb").exists()


def redis_available() -> bool:
    return Path(REDIS_SERVER).exists()


def _free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _stop(process: subprocess.Popen[bytes] | None, signum: int) -> None:
    if process is None or process.poll() is not None:
        return
    os.kill(process.pid, signum)
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-3000:]
    except FileNotFoundError:
        return ""


def _as_postgres() -> dict[str, Any]:
    return {
        "user": "postgres",
        "group": "postgres",
        "extra_groups": [],
        "env": {"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
    }


@dataclass
class PostgresServer:
    """A PostgreSQL 15 server with password authentication over TCP (scram-sha-256)."""

    directory: Path
    port: int
    password: str = field(default_factory=lambda: "pg-" + secrets.token_hex(8))
    process: subprocess.Popen[bytes] | None = None
    databases: int = 0

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def log_path(self) -> Path:
        return self.directory / "postgres.log"

    def init(self) -> None:
        pwfile = self.directory / "pw"
        pwfile.write_text(self.password + "\n")
        shutil.chown(pwfile, "postgres", "postgres")
        subprocess.run(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--no-sync",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                f"--pwfile={pwfile}",
            ],
            check=True,
            capture_output=True,
            timeout=60,
            **_as_postgres(),
        )
        pwfile.unlink()

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    str(PG_BIN / "postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.directory),
                    "-c",
                    f"listen_addresses={HOST}",
                    "-c",
                    "fsync=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "max_connections=60",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                **_as_postgres(),
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited:\n{_tail(self.log_path)}")
            ready = subprocess.run(
                [str(PG_BIN / "pg_isready"), "-q", "-h", HOST, "-p", str(self.port)],
                capture_output=True,
                timeout=10,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"postgres was not ready in time:\n{_tail(self.log_path)}")

    def stop(self) -> None:
        # SIGINT: fast shutdown, clients are disconnected at once (SIGTERM would wait).
        _stop(self.process, signal.SIGINT)

    def psql(self, sql: str, database: str = "postgres") -> str:
        done = subprocess.run(
            ["psql", "-X", "-q", "-At", "-h", HOST, "-p", str(self.port), "-U", "postgres",
             "-d", database, "-v", "ON_ERROR_STOP=1", "-c", sql],
            capture_output=True,
            text=True,
            timeout=30,
            env={"PATH": "/usr/bin:/bin", "PGPASSWORD": self.password},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    def new_database(self) -> str:
        self.databases += 1
        name = f"turn{self.databases}"
        self.psql(f"CREATE DATABASE {name}")
        return name

    def connection(self, database: str) -> str:
        """coturn's form: libpq's keyword=value connection string."""
        return (
            f"host={HOST} port={self.port} dbname={database} user=postgres"
            f" password={self.password} connect_timeout=5"
        )

    def url(self, database: str) -> str:
        return f"postgresql://postgres:{self.password}@{HOST}:{self.port}/{database}"


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    directory = Path(tempfile.mkdtemp(prefix="tsunagu-pg-", dir="/tmp"))
    try:
        os.chmod(directory, 0o755)
        shutil.chown(directory, "postgres", "postgres")
        server = PostgresServer(directory, _free_tcp_port())
        server.init()
        server.start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@dataclass
class RedisServer:
    """A Redis 7 server with a password, nothing saved to disk."""

    directory: Path
    port: int
    password: str = field(default_factory=lambda: "redis-" + secrets.token_hex(8))
    process: subprocess.Popen[bytes] | None = None
    databases: int = 0
    persistent: bool = False
    """Keep the data across a stop and start (an append-only file), as a real one does."""

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", HOST, "--save", "",
             "--appendonly", "yes" if self.persistent else "no", "--appendfsync", "no",
             "--daemonize", "no", "--dir", str(self.directory),
             "--logfile", str(self.log_path), "--requirepass", self.password,
             "--databases", "64"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited:\n{_tail(self.log_path)}")
            try:
                with socket.create_connection((HOST, self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"redis-server was not ready in time:\n{_tail(self.log_path)}")

    def stop(self) -> None:
        _stop(self.process, signal.SIGTERM)

    def new_database(self) -> int:
        """A database number no other test used (the server has 64)."""
        self.databases += 1
        assert self.databases < 64
        return self.databases

    def connection(self, database: int) -> str:
        """coturn's form: ``ip=... dbname=... password=... port=... connect_timeout=...``."""
        return (
            f"ip={HOST} dbname={database} password={self.password} port={self.port}"
            " connect_timeout=5"
        )

    def url(self, database: int) -> str:
        return f"redis://:{self.password}@{HOST}:{self.port}/{database}"


@contextlib.contextmanager
def redis_server(*, persistent: bool = False) -> Iterator[RedisServer]:
    directory = Path(tempfile.mkdtemp(prefix="tsunagu-redis-", dir="/tmp"))
    try:
        server = RedisServer(directory, _free_tcp_port(), persistent=persistent)
        server.start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
