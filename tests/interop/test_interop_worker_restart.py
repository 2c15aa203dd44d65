"""A worker process that dies while ``tsunagu serve`` runs is started again.

The worker count is pinned: what is tested is the restart, which needs a second worker (and
what more than two change, four). A worker is killed with SIGKILL (as the OOM killer does).
The log names it and the cause; a new process takes its place, on the same sockets, with the
configuration in force (a user added by a reload authenticates there); the other workers'
allocations relay on throughout, through the gap. A worker that keeps dying is started
again at most 5 times a minute, then its clients go to the others, and the server still
serves and stops cleanly. The restarts are counted in the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.interop import (
    HOST,
    ServeProcess,
    TurnClient,
    free_port,
    run_serve,
    turn_allocate,
    udp_echo_server,
)
from tsunagu.admin.client import request

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

log = logging.getLogger(__name__)


def worker_pids(server: ServeProcess) -> dict[int, int]:
    status = server.ask({"command": "status"})
    return {part["worker"]: part["pid"] for part in status["per_worker"]}


def restart_counts(port: int) -> dict[str, float]:
    """``tsunagu_worker_restarts_total`` by worker, from a scrape of ``/metrics``."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return {
        sample.labels["worker"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "tsunagu_worker_restarts_total"
    }


async def restarted(server: ServeProcess, old: int, timeout: float = 20.0, worker: int = 1) -> int:
    """The worker's new pid once it answers again (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        pid = worker_pids(server).get(worker)
        if pid is not None and pid != old:
            return pid
    raise AssertionError(f"worker {worker} not started again:\n{server.log_text()[-3000:]}")


async def on_worker(
    server: ServeProcess, worker: int, username: str, password: str
) -> tuple[TurnClient, list[TurnClient]]:
    """A UDP allocation that lands on ``worker`` (the kernel picks by the client's port:
    up to 40 tries), and the others made on the way."""
    others: list[TurnClient] = []
    for _ in range(40):
        client = await turn_allocate(server, username=username, password=password)
        sessions = server.ask({"command": "sessions"})["sessions"]
        port = client.mapped[1]
        mine = [s for s in sessions if s["client"].endswith(f":{port}")]
        assert len(mine) == 1, (port, sessions)
        if mine[0]["worker"] == worker:
            return client, others
        others.append(client)
    raise AssertionError(f"no allocation on worker {worker} in 40 tries")


async def test_a_killed_worker_is_started_again_with_the_running_configuration(
    tmp_path: Path,
) -> None:
    config = tmp_path / "tsunagu.toml"
    users = tmp_path / "users.txt"
    users.write_text("carol:first\n")
    config.write_text(f'user_file = "{users}"\nallowed_peer_ips = ["127.0.0.1"]\n')
    metrics = free_port(udp=False)
    with run_serve(
        tmp_path / "serve",
        "-c",
        str(config),
        "--workers",
        "2",
        "--prometheus-port",
        str(metrics),
        allowed_peers=False,
    ) as server:
        assert restart_counts(metrics) == {"0": 0.0, "1": 0.0}
        async with udp_echo_server() as (_, peer):
            held, spare = await on_worker(server, 0, "carol", "first")
            assert await held.echo(b"before", peer) == b"before"

            # A reload adds a user: the restarted worker must know it.
            users.write_text("carol:first\nerin:late\n")
            server.send_signal(signal.SIGHUP)
            assert await server.wait_for_log_async("SIGHUP: reload done", timeout=10)

            old = worker_pids(server)[1]
            os.kill(old, signal.SIGKILL)
            began = time.monotonic()
            new = await restarted(server, old)
            log.info("worker 1 answered again %.2f s after SIGKILL", time.monotonic() - began)
            text = server.log_text()
            assert f"worker 1 (pid {old}) exited (killed by SIGKILL)" in text, text
            assert f"worker 1 started again (pid {new})" in text, text
            assert server.ask({"command": "status"})["not_answering"] == []
            assert restart_counts(metrics) == {"0": 0.0, "1": 1.0}

            # Worker 0's allocation relays on; the new worker 1 takes the reloaded user.
            assert await held.echo(b"after", peer) == b"after"
            late, more = await on_worker(server, 1, "erin", "late")
            assert await late.echo(b"late", peer) == b"late"
            for client in (held, late, *spare, *more):
                await client.close()


async def test_a_worker_that_keeps_dying_is_left_dead_after_five_restarts(
    tmp_path: Path,
) -> None:
    with run_serve(tmp_path / "serve", "--workers", "2") as server:
        pid = worker_pids(server)[1]
        for _ in range(5):
            os.kill(pid, signal.SIGKILL)
            pid = await restarted(server, pid)
        os.kill(pid, signal.SIGKILL)
        assert await server.wait_for_log_async("not started again: 5 restarts", timeout=10)
        await asyncio.sleep(1.5)  # the keeper's next rounds: no sixth start
        assert server.log_text().count("started again (pid") == 5
        status = request(server.admin_socket, {"command": "status"}, 10.0)
        assert [part["worker"] for part in status["per_worker"]] == [0]
        # Worker 0 serves every new client (worker 1's sockets left the ports with it: none
        # waits on a socket nobody reads), and the server stops cleanly (run_serve checks its
        # exit).
        for _ in range(8):
            client = await turn_allocate(server)
            await client.close()


def worker_of(server: ServeProcess, client: TurnClient) -> int:
    port = client.mapped[1]
    sessions = server.ask({"command": "sessions"})["sessions"]
    (mine,) = [s for s in sessions if s["client"].endswith(f":{port}")]
    return int(mine["worker"])


async def test_with_four_workers_a_restart_moves_no_other_workers_clients(
    tmp_path: Path,
) -> None:
    """Four workers, pinned: with more than two, a worker's socket that left a port's group
    would have the kernel hash every client anew while it was gone, and for good the
    clients of the worker whose socket took its place. The dead worker's sockets stay in
    place (worker 0 holds them) and its replacement takes them over: the other workers'
    clients relay through the gap and after it, each on the worker it had."""
    with run_serve(tmp_path / "serve", "--workers", "4") as server:
        async with udp_echo_server() as (_, peer):
            on: dict[int, list[TurnClient]] = {worker: [] for worker in range(4)}
            for _ in range(80):
                client = await turn_allocate(server)
                assert await client.echo(b"before", peer) == b"before"  # its channel is bound
                on[worker_of(server, client)].append(client)
                if all(on.values()):
                    break
            assert all(on.values()), {worker: len(clients) for worker, clients in on.items()}
            others = [(worker, c) for worker in (0, 1, 3) for c in on[worker]]

            old = worker_pids(server)[2]
            os.kill(old, signal.SIGKILL)
            began = time.monotonic()
            echoes = 0
            while time.monotonic() - began < 1.5:  # the keeper notices within 0.5 s
                for _, client in others:
                    assert await client.echo(b"gap", peer, timeout=2.0) == b"gap"
                    echoes += 1
            new = await restarted(server, old, worker=2)
            for worker, client in others:
                assert await client.echo(b"after", peer, timeout=2.0) == b"after"
                assert worker_of(server, client) == worker
            log.info(
                "worker 2 answered again %.2f s after SIGKILL; %d echoes of %d allocations"
                " on the other workers during the gap, none lost",
                time.monotonic() - began,
                echoes,
                len(others),
            )
            assert new != old
            for clients in on.values():
                for client in clients:
                    if clients is not on[2]:
                        await client.close()
            for client in on[2]:
                await client.abort()
