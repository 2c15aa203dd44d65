"""Graceful shutdown of the real ``tsunagu serve`` process.

The first SIGTERM drains: new Allocates get 508, new TCP/TLS connections are refused, and
existing allocations keep relaying until their clients release them or the drain timeout
passes. A second SIGTERM exits at once. Each ended allocation leaves one audit record.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from support.interop import (
    HOST,
    USER,
    ServeProcess,
    client_field,
    error_code,
    run_serve,
    turn_allocate,
    udp_echo_server,
)
from tsunagu.admin.client import request

pytestmark = pytest.mark.interop

DRAINING = "draining: no new allocations"


async def start_draining(server: ServeProcess) -> float:
    server.terminate()
    assert await server.wait_for_log_async(DRAINING), server.log_text()
    return time.monotonic()


async def test_drain_refuses_new_work_and_exits_when_clients_release(tmp_path: Path) -> None:
    with run_serve(tmp_path, drain_timeout=20) as server:
        async with udp_echo_server() as (echo, peer):
            udp_started = time.monotonic()
            udp = await turn_allocate(server, "udp")
            tcp = await turn_allocate(server, "tcp")
            before = [b"first", b"second" * 10, bytes(300)]
            for payload in before:
                assert await udp.echo(payload, peer) == payload
            assert await tcp.echo(b"over tcp", peer) == b"over tcp"

            drain_started = await start_draining(server)

            # A new allocation is refused with 508 (Insufficient Capacity).
            with pytest.raises(Exception) as refused:
                await turn_allocate(server, "udp")
            assert error_code(refused.value) == 508, repr(refused.value)
            # New stream clients are not accepted at all.
            for port in (server.port, server.tls_port):
                with pytest.raises(ConnectionRefusedError):
                    await asyncio.wait_for(asyncio.open_connection(HOST, port), 5)

            # Existing allocations still relay, over UDP and over their TCP connection.
            after = [b"still relaying", b"x" * 1000]
            for payload in after:
                assert await udp.echo(payload, peer) == payload
            assert await tcp.echo(b"tcp still relaying", peer) == b"tcp still relaying"
            assert server.process.poll() is None

            await udp.close()
            udp_lifetime = time.monotonic() - udp_started
            assert server.process.poll() is None  # the TCP allocation is still open
            await tcp.close()
            code = await server.wait_async(10)
            drained_in = time.monotonic() - drain_started

    assert code == 0, server.log_text()
    assert drained_in < 10, "exit waited for the drain timeout instead of the last release"
    sent = before + after
    assert [data for data, _ in echo.received if data in sent] == sent

    records = {r["client"]: r for r in server.audit_records()}
    assert len(records) == 2, records
    record = records[client_field("udp", udp.mapped, (HOST, server.port))]
    assert record["user"] == USER
    assert record["reason"] == "deleted"
    assert record["relay"] == [f"{udp.relayed[0]}:{udp.relayed[1]}"]
    assert record["peers"] == [HOST]
    total = sum(len(p) for p in sent)
    assert record["to_peers"] == {"packets": len(sent), "bytes": total}
    assert record["to_client"] == {"packets": len(sent), "bytes": total}
    assert 0 < record["duration"] <= udp_lifetime + 0.5
    tcp_record = records[client_field("tcp", tcp.mapped, (HOST, server.port))]
    assert tcp_record["to_peers"]["packets"] == 2
    assert tcp_record["to_client"]["packets"] == 2


async def test_drain_timeout_ends_open_allocations(tmp_path: Path) -> None:
    drain_timeout = 1.5
    with run_serve(tmp_path, drain_timeout=drain_timeout) as server:
        async with udp_echo_server() as (_, peer):
            udp = await turn_allocate(server, "udp")
            tcp = await turn_allocate(server, "tcp")
            assert await udp.echo(b"ping", peer) == b"ping"
            assert await tcp.echo(b"ping", peer) == b"ping"

            drain_started = await start_draining(server)
            code = await server.wait_async(drain_timeout + 10)
            drained_in = time.monotonic() - drain_started
            # The server closed the TCP connection with its allocation.
            await asyncio.wait_for(tcp.app.closed.wait(), 5)
            await tcp.close()
            await udp.abort()

    assert code == 0, server.log_text()
    assert drain_timeout - 0.2 <= drained_in < drain_timeout + 5
    # Each worker process ends its own allocations and says how many.
    ended = re.findall(r"drain timeout: ending (\d+) allocations", server.log_text())
    assert sum(int(n) for n in ended) == 2, server.log_text()
    records = server.audit_records()
    assert sorted(r["client"] for r in records) == sorted(
        [
            client_field("udp", udp.mapped, (HOST, server.port)),
            client_field("tcp", tcp.mapped, (HOST, server.port)),
        ]
    )
    for record in records:
        assert record["user"] == USER
        assert record["reason"] == "shutdown"
        assert record["to_peers"] == {"packets": 1, "bytes": 4}
        assert record["to_client"] == {"packets": 1, "bytes": 4}
        assert record["duration"] >= drain_timeout - 0.2


async def test_second_signal_exits_at_once(tmp_path: Path) -> None:
    with run_serve(tmp_path, drain_timeout=60, check_exit=False) as server:
        async with udp_echo_server() as (_, peer):
            udp = await turn_allocate(server, "udp")
            assert await udp.echo(b"ping", peer) == b"ping"
            await start_draining(server)
            assert server.process.poll() is None
            second = time.monotonic()
            server.send_signal(signal.SIGTERM)
            code = await server.wait_async(5)
            assert code is not None, "a second SIGTERM did not end the process"
            assert time.monotonic() - second < 3
            assert "second signal" in server.log_text()
            await udp.abort()


@pytest.mark.parametrize("idle", [0, 1, 2])
async def test_every_workers_calls_relay_through_the_whole_drain(tmp_path: Path, idle: int) -> None:
    """A worker whose allocations are gone finishes its drain at once; the others' clients
    must still reach their workers (the kernel hashes a port's datagrams over the sockets
    bound to it, so none leaves before all have drained), for longer than 5 s."""
    with run_serve(
        tmp_path, "--workers", "3", "--user-quota", "0", drain_timeout=20, relay_ports=300
    ) as server:
        async with udp_echo_server() as (_, peer):
            clients = [await turn_allocate(server, "udp") for _ in range(24)]
            sessions = request(server.admin_socket, {"command": "sessions"}, 10)["sessions"]
            worker_of = {s["client"]: s["worker"] for s in sessions}
            by_worker: dict[int, list[Any]] = {}
            for client in clients:
                by_worker.setdefault(
                    worker_of[f"{client.mapped[0]}:{client.mapped[1]}"], []
                ).append(client)
            assert len(by_worker) == 3, by_worker.keys()
            # One worker has nothing left to drain: it is done at once.
            for client in by_worker.pop(idle):
                await client.close()
            staying = [client for group in by_worker.values() for client in group]

            drain_started = await start_draining(server)
            rounds = failures = 0
            while time.monotonic() - drain_started < 7.0:
                for index, client in enumerate(staying):
                    payload = b"drain-%d-%d" % (rounds, index)
                    try:
                        if await client.echo(payload, peer, timeout=2) != payload:
                            failures += 1
                    except (TimeoutError, AssertionError):
                        failures += 1
                rounds += 1
                await asyncio.sleep(0.3)
            assert failures == 0, f"{failures} of {rounds * len(staying)} echoes lost"
            assert server.process.poll() is None
            for client in staying:
                await client.close()
            code = await server.wait_async(15)
    assert code == 0, server.log_text()


async def test_workers_stop_when_worker_0_is_killed(tmp_path: Path) -> None:
    with run_serve(tmp_path, "--workers", "3", check_exit=False) as server:
        children = [
            int(pid)
            for pid in Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
        ]
        assert len(children) == 2
        server.process.kill()
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in children):
            assert time.monotonic() < deadline, "a worker outlived worker 0 by 10 s"
            await asyncio.sleep(0.05)
        assert "Traceback" not in server.log_text()
