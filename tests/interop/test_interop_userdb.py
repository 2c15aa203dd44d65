"""``tsunagu serve -b FILE`` serves the users and secrets coturn's ``turnadmin`` wrote.

The database is made and filled by coturn's own tool, as a coturn operator's is; tsunagu
then serves coturn's ``turnutils_uclient`` and aioice from it: a long-term user, a user
added while the server runs (no restart), and a TURN REST credential minted from a secret
that lives only in the database. A wrong password and an unknown user get 401, and the log
names them.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import aioice.turn
import pytest

from support.interop import (
    UCLIENT_SUMMARY,
    Collector,
    run_serve,
    run_turnutils_peer,
    uclient_command,
)
from tsunagu.auth.rest import mint_credentials

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

REALM = "example.org"


def turnadmin(*argv: str) -> None:
    done = subprocess.run(["turnadmin", *argv], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr + done.stdout


async def allocate(host: str, port: int, username: str, password: str) -> bool:
    try:
        transport, _ = await aioice.turn.create_turn_endpoint(
            Collector, server_addr=(host, port), username=username, password=password
        )
    except Exception:
        return False
    transport.close()
    return True


async def test_coturns_database_serves_turnutils_and_aioice(tmp_path: Path) -> None:
    database = tmp_path / "turndb"
    turnadmin("-a", "-b", str(database), "-u", "dana", "-r", REALM, "-p", "dana-pw")
    turnadmin("-s", "db-secret", "-b", str(database), "-r", REALM)
    with (
        run_turnutils_peer(tmp_path) as peer,
        run_serve(tmp_path / "serve", "-b", str(database), "-r", REALM) as server,
    ):
        command = uclient_command(
            server.port, (peer.host, peer.port), "-z", "5", messages=20, clients=2,
            user="dana", password="dana-pw",
        )  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        match = UCLIENT_SUMMARY.search(done.stdout)
        assert match and int(match.group(1)) == 40, done.stdout[-2000:]
        assert int(match.group(2)) >= 38, match.group(0)

        # A user added while the server runs; a REST credential from the database's secret.
        turnadmin("-a", "-b", str(database), "-u", "erin", "-r", REALM, "-p", "erin-pw")
        assert await allocate(server.host, server.port, "erin", "erin-pw")
        username, password = mint_credentials("db-secret", "fay", 600, time.time())
        assert await allocate(server.host, server.port, username, password)

        assert not await allocate(server.host, server.port, "dana", "wrong")
        assert not await allocate(server.host, server.port, "nobody", "x")
        assert await server.wait_for_log_async("wrong password for user 'dana'", 15)
        assert await server.wait_for_log_async("unknown user 'nobody'", 15)
