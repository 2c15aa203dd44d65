"""Clients that arrive while a multi-worker server starts keep their allocations.

Every worker binds the same UDP port with SO_REUSEPORT; the kernel picks a worker's socket
by a hash of the client's address over the sockets bound so far. A client answered by
worker 0 before worker 1 had bound would have its later packets hashed to worker 1, which
knows nothing of it. The server therefore reads UDP only once every worker has bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from support.interop import TurnClient, run_serve, turn_allocate, udp_echo_server

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

log = logging.getLogger(__name__)


async def test_allocations_made_while_the_workers_start_stay_reachable(tmp_path: Path) -> None:
    # Pinned: the test is about several workers starting, whatever the machine's cores;
    # one user makes every allocation, from one address.
    with run_serve(
        tmp_path / "serve",
        *("--workers", "3", "--user-quota", "0", "--address-quota", "0"),
        wait_ready=False,
        relay_ports=900,
    ) as server:
        clients: list[TurnClient] = []
        attempts: list[asyncio.Task[TurnClient]] = []
        ready_at = None
        deadline = time.monotonic() + 30
        # One new allocation every 20 ms from the moment the process exists until 1 s after
        # it says it is ready, each on its own client port.
        while ready_at is None or time.monotonic() < ready_at + 1.0:
            assert time.monotonic() < deadline and server.process.poll() is None
            attempts.append(asyncio.create_task(turn_allocate(server, timeout=20)))
            await asyncio.sleep(0.02)
            if ready_at is None and "tsunagu: ready" in server.stdout_path.read_text():
                ready_at = time.monotonic()
        server.wait_ready()
        results = await asyncio.gather(*attempts, return_exceptions=True)
        clients = [result for result in results if isinstance(result, TurnClient)]
        failed = [result for result in results if not isinstance(result, TurnClient)]
        assert not failed, failed[:3]

        # Every allocation still relays: its packets reach the worker that holds it.
        async with udp_echo_server() as (_, peer):

            async def relays(client: TurnClient) -> bool:
                try:
                    return await client.echo(b"here", peer, timeout=5) == b"here"
                except (TimeoutError, AssertionError):
                    return False

            reached = await asyncio.gather(*(relays(client) for client in clients))
        log.info(
            "%d allocations made while %d workers started, %d relay",
            len(clients),
            server.workers,
            sum(reached),
        )
        assert server.workers == 3
        assert all(reached), f"{reached.count(False)} of {len(clients)} unreachable"
        for client in clients:
            client.transport.close()
        await asyncio.sleep(0)
