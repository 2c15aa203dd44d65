"""``tsunagu revoke`` ends a live allocation within a second, on a running ``tsunagu serve``.

aioice holds a TURN allocation made with a REST credential whose secret lives in the user
database (``tsunagu secret add``) and relays to coturn's echo peer. ``tsunagu revoke`` writes
the revocation to the database; the server (default worker count: the allocation may be on
any worker) ends the allocation, logs its end with the reason ``revoked``, and refuses the
credential afterwards, while another user's allocation carries on.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import aioice.turn
import pytest

from support.interop import Collector, allocation_or_none, run_serve, run_turnutils_peer
from tsunagu.auth.rest import mint_credentials

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90)]


def tsunagu(*argv: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "tsunagu", *argv], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_a_revoked_allocation_ends_within_a_second(tmp_path: Path) -> None:
    database = str(tmp_path / "users.db")
    secret = tsunagu("secret", "add", "-b", database).strip()
    with (
        run_turnutils_peer(tmp_path) as peer,
        run_serve(tmp_path / "serve", "-b", database) as server,
    ):
        clients = {}
        for user in ("ann", "bob"):
            username, password = mint_credentials(secret, user, 600, time.time())
            clients[user] = await asyncio.wait_for(
                aioice.turn.create_turn_endpoint(
                    Collector,
                    server_addr=(server.host, server.port),
                    username=username,
                    password=password,
                ),
                10,
            )
        for transport, _ in clients.values():
            transport.sendto(b"hello", (peer.host, peer.port))
        for _, app in clients.values():
            assert (await asyncio.wait_for(app.queue.get(), 5))[0] == b"hello"

        tsunagu("revoke", "--user", "ann", "-b", database)
        # From the moment the revocation is in the database.
        started = time.monotonic()
        ended: list[dict[str, object]] = []
        while time.monotonic() - started < 5 and not ended:
            ended = [r for r in server.audit_records() if r["reason"] == "revoked"]
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - started
        assert ended and elapsed < 1.0, (elapsed, server.log_text()[-3000:])
        [record] = ended
        assert str(record["user"]).endswith(":ann")

        # Every worker has it within the same second (each reads the database on its own).
        deadline = time.monotonic() + 1.0
        while server.log_text().count("revocation 1 of ann") < server.workers:
            assert time.monotonic() < deadline, server.log_text()[-3000:]
            await asyncio.sleep(0.05)

        # Bob still relays; Ann's credential is refused from now on.
        bob_transport, bob = clients["bob"]
        bob_transport.sendto(b"still here", (peer.host, peer.port))
        assert (await asyncio.wait_for(bob.queue.get(), 5))[0] == b"still here"
        username, password = mint_credentials(secret, "ann", 600, time.time() - 5)
        again = await allocation_or_none(server, username, password)
        if again is not None:
            again.close()
            raise AssertionError(f"{username} allocated after the revocation")
        assert await server.wait_for_log_async("revoked", 15)
        for transport, _ in clients.values():
            transport.close()
