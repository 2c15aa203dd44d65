"""``tsunagu serve -b FILE`` (``-e`` PostgreSQL, ``-N`` Redis) serves the users and secrets
coturn's ``turnadmin`` wrote.

Each database is made and filled by coturn's own tool, as a coturn operator's is (PostgreSQL
with coturn's ``schema.sql`` first); tsunagu
then serves coturn's ``turnutils_uclient`` and aioice from it: a long-term user, a user
added while the server runs (no restart), and a TURN REST credential minted from a secret
that lives only in the database. A wrong password and an unknown user get 401, and the log
names them.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from support.interop import (
    UCLIENT_SUMMARY,
    ServeProcess,
    allocation_or_none,
    run_serve,
    run_turnutils_peer,
    run_uclient,
    uclient_command,
)
from tsunagu.auth.rest import mint_credentials
from tsunagu.cli import main

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

REALM = "example.org"


def turnadmin(*argv: str) -> None:
    done = subprocess.run(["turnadmin", *argv], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr + done.stdout


async def allocate(server: ServeProcess, username: str, password: str) -> bool:
    transport = await allocation_or_none(server, username, password)
    if transport is not None:
        transport.close()
    return transport is not None


def coturn_database(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> list[str]:
    """A fresh database of ``kind`` as coturn's tools name it: ``-b FILE``, ``-e``, ``-N``."""
    if kind == "sqlite":
        return ["-b", str(tmp_path / "turndb")]
    server: Any = request.getfixturevalue(f"{kind}_server")
    name = server.new_database()
    if kind == "postgres":
        server.psql(Path("/usr/share/coturn/schema.sql").read_text(), name)
        return ["-e", server.connection(name)]
    return ["-N", server.connection(name)]


@pytest.mark.parametrize("kind", ["sqlite", "postgres", "redis"])
async def test_coturns_database_serves_turnutils_and_aioice(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    database = coturn_database(kind, tmp_path, request)
    turnadmin("-a", *database, "-u", "dana", "-r", REALM, "-p", "dana-pw")
    turnadmin("-s", "db-secret", *database, "-r", REALM)
    with (
        run_turnutils_peer(tmp_path) as peer,
        run_serve(tmp_path / "serve", *database, "-r", REALM) as server,
    ):
        command = uclient_command(
            server.port, (peer.host, peer.port), "-z", "5", messages=20, clients=2,
            user="dana", password="dana-pw",
        )  # fmt: skip
        _, output = run_uclient(command, 60)
        match = UCLIENT_SUMMARY.search(output)
        assert match and int(match.group(1)) == 40, output[-2000:]
        assert int(match.group(2)) >= 38, match.group(0)

        # A user added while the server runs; a REST credential from the database's secret.
        turnadmin("-a", *database, "-u", "erin", "-r", REALM, "-p", "erin-pw")
        assert await allocate(server, "erin", "erin-pw")
        username, password = mint_credentials("db-secret", "fay", 600, time.time())
        assert await allocate(server, username, password)

        assert not await allocate(server, "dana", "wrong")
        assert not await allocate(server, "nobody", "x")
        assert await server.wait_for_log_async("wrong password for user 'dana'", 15)
        assert await server.wait_for_log_async("unknown user 'nobody'", 15)
        # The connection string's password is in no line the server wrote.
        password = database[1].split("password=")[-1].split()[0]
        if kind != "sqlite":
            assert password not in server.log_text()
            assert password not in server.stdout_path.read_text()


def probe_turn(server: Any) -> str:
    out = io.StringIO()
    argv = ["probe", "turn", f"turn:{server.host}:{server.port}", "-u", "alice:secret"]
    with contextlib.redirect_stdout(out):
        main([*argv, "--seconds", "0.5", "--timeout", "3", "--json"])
    return str(json.loads(out.getvalue())["verdict"]["code"])


async def test_peer_ranges_in_the_database_apply_while_the_server_runs(tmp_path: Path) -> None:
    """coturn's allowed_peer_ip and denied_peer_ip tables, edited while tsunagu serves: a
    loopback peer, denied by default, is allowed once the table names it, within the 5 s in
    which the database is read again; denied again once the row is gone and a denied row
    takes its place."""
    database = tmp_path / "users.db"
    with run_serve(tmp_path / "serve", "-b", str(database), allowed_peers=False) as server:
        assert await asyncio.to_thread(probe_turn, server) == "peer-denied"
        realm = "tsunagu"
        with sqlite3.connect(database) as db:
            db.execute(
                "INSERT INTO allowed_peer_ip VALUES (?, ?)", (realm, "127.0.0.0-127.0.0.255")
            )
        started = time.monotonic()
        verdict = "peer-denied"
        while verdict != "ok" and time.monotonic() - started < 12:
            await asyncio.sleep(1.0)
            verdict = await asyncio.to_thread(probe_turn, server)
        assert verdict == "ok", server.log_text()[-2000:]
        assert await every_worker_logs(server, "1 allowed and 0 denied peer ranges in force", 12)
        with sqlite3.connect(database) as db:
            db.execute("DELETE FROM allowed_peer_ip")
            db.execute("INSERT INTO denied_peer_ip VALUES (?, ?)", (realm, "10.0.0.0/8"))
        # Each worker reads the database on its own 5 s clock: the probe may reach any.
        assert await every_worker_logs(server, "0 allowed and 1 denied peer ranges in force", 12)
        assert await asyncio.to_thread(probe_turn, server) == "peer-denied"


async def every_worker_logs(server: ServeProcess, text: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while server.log_text().count(text) < server.workers:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def test_a_realm_user_quota_from_turnadmin_is_applied(tmp_path: Path) -> None:
    """``turnadmin -g --user-quota`` on the database a running server reads: within the 5 s
    in which the database is read again, one user id gets no more allocations than that
    (quotas count per worker: one worker here, so that the figure is exact)."""
    database = tmp_path / "turndb"
    turnadmin("-a", "-b", str(database), "-u", "dana", "-r", REALM, "-p", "dana-pw")
    with run_serve(
        tmp_path / "serve", "-b", str(database), "-r", REALM, "--workers", "1"
    ) as server:
        first = await allocation_or_none(server, "dana", "dana-pw")
        second = await allocation_or_none(server, "dana", "dana-pw")
        assert first is not None and second is not None
        turnadmin("-g", "-b", str(database), "-r", REALM, "--user-quota", "2")
        assert await server.wait_for_log_async("2 allocations per user id", 12)
        assert await allocation_or_none(server, "dana", "dana-pw") is None
        assert await server.wait_for_log_async("user quota", 15)
        for transport in (first, second):
            transport.close()
