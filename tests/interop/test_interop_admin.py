"""The admin API of a running ``tsunagu serve``: ``tsunagu status``, ``sessions``, ``kill``,
``drain`` and ``reload`` against a real server with the default worker count, its clients
aioice allocations spread over the workers by the kernel.

Every server, client and command is bounded in time; the admin socket is found where the
server makes it, in its state directory.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.interop import (
    ServeProcess,
    TurnClient,
    error_code,
    run_serve,
    turn_allocate,
    udp_echo_server,
)
from tsunagu.admin.client import request
from tsunagu.auth.rest import mint_credentials

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

log = logging.getLogger(__name__)
SECRET = "admin-test-secret"
BOB = ("bob", "bob-password")


def tsunagu(
    server: ServeProcess | None, *argv: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if server is not None:
        env["XDG_STATE_HOME"] = str(server.state_dir)
    done = subprocess.run(
        [sys.executable, "-m", "tsunagu", *argv],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    if check:
        assert done.returncode == 0, (done.stdout, done.stderr)
    return done


async def allocate(server: ServeProcess, username: str, password: str) -> TurnClient:
    return await turn_allocate(server, username=username, password=password)


def rest(user: str) -> tuple[str, str]:
    return mint_credentials(SECRET, user, 600, time.time())


def by_client(sessions: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {s["client"]: s for s in sessions}


def client_key(client: TurnClient) -> str:
    ip, port = client.mapped
    return f"{ip}:{port}"


async def spread(
    server: ServeProcess, username: str, password: str, *, limit: int = 24
) -> list[TurnClient]:
    """Allocations of one user until every worker holds one of them (bounded)."""
    clients: list[TurnClient] = []
    while len(clients) < limit:
        clients.append(await allocate(server, username, password))
        sessions = server.ask({"command": "sessions", "user": username})["sessions"]
        if len({s["worker"] for s in sessions}) == server.workers:
            return clients
    raise AssertionError(f"{limit} allocations did not reach all {server.workers} workers")


async def close_all(clients: list[TurnClient]) -> None:
    for client in clients:
        client.transport.close()
    await asyncio.sleep(0)


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """TMPDIR of the servers started by the test: where worker 0 makes its private
    directory of worker sockets."""
    directory = tmp_path / "t"
    directory.mkdir()
    monkeypatch.setenv("TMPDIR", str(directory))
    return directory


@pytest.fixture
def server(tmp_path: Path, private_tmp: Path) -> Iterator[ServeProcess]:
    with run_serve(
        tmp_path / "serve", "-u", ":".join(BOB), "--static-auth-secret", SECRET
    ) as process:
        yield process


# --- status and sessions --------------------------------------------------------------------


async def test_status_and_sessions_show_every_workers_allocations(server: ServeProcess) -> None:
    ann_user, ann_password = rest("ann")
    anns = await spread(server, ann_user, ann_password)
    bobs = [await allocate(server, *BOB) for _ in range(2)]
    async with udp_echo_server() as (_, peer):
        assert await bobs[0].echo(b"x" * 300, peer) == b"x" * 300

        status = server.ask({"command": "status"})
        total = len(anns) + len(bobs)
        assert status["workers"] == server.workers
        assert status["allocations"]["total"] == total
        assert status["allocations"]["udp"] == total
        per_worker = {part["worker"]: part for part in status["per_worker"]}
        assert sorted(per_worker) == list(range(server.workers))
        assert all(part["allocations"]["total"] >= 1 for part in per_worker.values())
        assert sum(p["allocations"]["total"] for p in per_worker.values()) == total
        assert status["not_answering"] == [] and status["draining"] is False
        assert status["relayed"]["to_peers"]["bytes"] >= 300
        assert status["relayed"]["to_client"]["bytes"] >= 300
        database = status["user_database"]
        assert database["kind"] == "sqlite" and database["reachable"] is True

        sessions = by_client(server.ask({"command": "sessions"})["sessions"])
        assert len(sessions) == total
        ids = [s["id"] for s in sessions.values()]
        assert len(set(ids)) == total
        for client in anns:
            record = sessions[client_key(client)]
            assert (record["user"], record["username"]) == ("ann", ann_user)
            assert record["id"].startswith(f"{record['worker']}-")
        sent = sessions[client_key(bobs[0])]
        assert sent["user"] == "bob" and sent["peers"] == [peer[0]]
        assert sent["relayed"] == ["{}:{}".format(*bobs[0].relayed)]
        assert sent["to_peers"] == {"packets": 1, "bytes": 300}
        assert sent["to_client"] == {"packets": 1, "bytes": 300}

    only_bob = server.ask({"command": "sessions", "user": "bob"})["sessions"]
    assert sorted(s["client"] for s in only_bob) == sorted(client_key(c) for c in bobs)
    assert len(server.ask({"command": "sessions", "user": ann_user})["sessions"]) == len(anns)

    # The commands: aligned text, and the same answer with --json.
    text = tsunagu(server, "status").stdout
    assert f"allocations: {total} (udp {total}, tcp 0, tls 0)" in text
    assert "draining: no" in text and "user database: SQLite" in text
    listing = tsunagu(server, "sessions", "--user", "bob").stdout.splitlines()
    assert listing[0].split()[:3] == ["session", "user", "client"] and len(listing) == 3
    assert json.loads(tsunagu(server, "sessions", "--json").stdout)["sessions"]
    await close_all(anns + bobs)


# --- kill -----------------------------------------------------------------------------------


async def test_kill_user_ends_their_allocations_on_every_worker(server: ServeProcess) -> None:
    ann_user, ann_password = rest("ann")
    anns = await spread(server, ann_user, ann_password)
    bob = await allocate(server, *BOB)
    async with udp_echo_server() as (_, peer):
        assert await bob.echo(b"before", peer) == b"before"

        started = time.monotonic()
        answer = server.ask({"command": "kill", "user": "ann"})
        elapsed = time.monotonic() - started
        assert answer["ended"] == len(anns), answer
        assert sum(1 for p in answer["per_worker"] if p["ended"]) == server.workers
        assert elapsed < 1.0, elapsed
        # The audit lines are written by the time the answer comes.
        killed = [r for r in server.audit_records() if r.get("reason") == "killed"]
        assert len(killed) == len(anns) and all(r["user"] == ann_user for r in killed)
        assert {r["worker"] for r in killed} == set(range(server.workers))
        log.info(
            "kill --user: %d allocations on %d workers in %.3f s",
            len(anns),
            server.workers,
            elapsed,
        )

        # Bob relays on; ann has nothing left.
        assert await bob.echo(b"after", peer) == b"after"
        assert server.ask({"command": "sessions", "user": "ann"})["sessions"] == []
        assert [s["user"] for s in server.ask({"command": "sessions"})["sessions"]] == ["bob"]
        done = tsunagu(server, "kill", "--user", "ann")
        assert done.stdout.startswith("ended 0 allocations of ann")
    await close_all([*anns, bob])


async def test_kill_session_ends_exactly_one(server: ServeProcess) -> None:
    clients = [await allocate(server, *BOB) for _ in range(3)]
    sessions = server.ask({"command": "sessions"})["sessions"]
    target = sessions[1]
    done = tsunagu(server, "kill", target["id"])
    assert done.stdout == f"ended session {target['id']}\n"
    left = server.ask({"command": "sessions"})["sessions"]
    assert sorted(s["id"] for s in left) == sorted(
        s["id"] for s in sessions if s["id"] != target["id"]
    )
    [record] = [r for r in server.audit_records() if r.get("reason") == "killed"]
    assert record["session"] == target["id"] and record["client"].startswith(
        f"udp:{target['client']}->"
    )
    again = tsunagu(server, "kill", target["id"], check=False)
    assert again.returncode == 1 and again.stdout == f"no session {target['id']}\n"
    usage = tsunagu(server, "kill", "nonsense", check=False)
    assert usage.returncode == 2 and "session id" in usage.stderr
    await close_all(clients)


# --- drain ----------------------------------------------------------------------------------


@pytest.mark.parametrize("alternate", [False, True], ids=["508", "300"])
async def test_drain_refuses_new_allocations_while_the_others_relay(
    tmp_path: Path, private_tmp: Path, alternate: bool
) -> None:
    extra = ["--alternate-server", "127.0.0.1:9"] if alternate else []
    with run_serve(tmp_path / "serve", "-u", ":".join(BOB), *extra) as server:
        clients = await spread(server, *BOB)
        done = tsunagu(server, "drain")
        assert done.stdout.startswith("draining: new allocations are refused;")
        status = server.ask({"command": "status"})
        assert status["draining"] is True
        assert all(part["draining"] for part in status["per_worker"])

        # Whichever worker a new client reaches refuses it.
        for _ in range(4):
            with pytest.raises(Exception) as info:
                await allocate(server, *BOB)
            assert error_code(info.value) == (300 if alternate else 508)
        async with udp_echo_server() as (_, peer):
            for client in clients:
                assert await client.echo(b"still", peer) == b"still"
        assert "draining: yes" in tsunagu(server, "status").stdout
        # The server stays up until it is stopped, even once every allocation ended.
        await close_all(clients)
        deadline = time.monotonic() + 10
        while server.ask({"command": "status"})["allocations"]["total"]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        assert server.process.poll() is None


# --- reload ---------------------------------------------------------------------------------


async def test_reload_reads_secrets_and_users_again_at_once(
    tmp_path: Path, private_tmp: Path
) -> None:
    database = str(tmp_path / "users.db")
    tsunagu(None, "user", "add", "carol", "--password", "carol-pw", "-b", database)
    with run_serve(tmp_path / "serve", "-b", database) as server:
        carols = await spread(server, "carol", "carol-pw")  # cached in every worker
        tsunagu(None, "user", "delete", "carol", "-b", database)
        answer = server.ask({"command": "reload"})
        dropped = [p["user_database"]["cached_users_dropped"] for p in answer["per_worker"]]
        assert len(dropped) == server.workers and all(count >= 1 for count in dropped), answer
        # Started from a command line: the configuration is read again as well.
        assert answer["configuration"]["reloaded"] is True
        assert answer["configuration"]["applied"] == []
        for _ in range(4):  # whichever worker a client reaches
            with pytest.raises(Exception) as info:
                await allocate(server, "carol", "carol-pw")
            assert error_code(info.value) == 401

        secret = tsunagu(None, "secret", "add", "-b", database).stdout.strip()
        added = time.monotonic()
        done = tsunagu(server, "reload")
        assert done.stdout.count("REST secrets in the database") == server.workers
        assert "the configuration: read again" in done.stdout
        assert "no option a reload applies has changed" in done.stdout
        username, password = mint_credentials(secret, "dave", 600, time.time())
        daves = [await allocate(server, username, password) for _ in range(4)]
        log.info("a new secret served %.2f s after it was added", time.monotonic() - added)
        # Live allocations are not the database's to end: tsunagu revoke or kill does that.
        assert len(server.ask({"command": "sessions", "user": "carol"})["sessions"]) == len(carols)
        await close_all(carols + daves)


# --- the socket -----------------------------------------------------------------------------


def test_sockets_are_private_and_removed_at_exit(tmp_path: Path, private_tmp: Path) -> None:
    with run_serve(tmp_path / "serve") as server:
        path = Path(server.admin_socket)
        info = path.stat()
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_uid == os.getuid()
        if server.workers > 1:
            [directory] = private_tmp.iterdir()
            assert stat.S_IMODE(directory.stat().st_mode) == 0o700
            sockets = sorted(p.name for p in directory.iterdir())
            assert sockets == [f"worker-{k}.sock" for k in range(1, server.workers)]
    assert not path.exists()
    assert list(private_tmp.iterdir()) == []


def test_no_admin_and_another_path(tmp_path: Path, private_tmp: Path) -> None:
    chosen = tmp_path / "a.sock"
    with run_serve(tmp_path / "one", "--admin-socket", str(chosen)) as server:
        assert stat.S_IMODE(chosen.stat().st_mode) == 0o600
        done = tsunagu(None, "status", "--admin-socket", str(chosen), "--json")
        assert json.loads(done.stdout)["workers"] == server.workers
    with run_serve(tmp_path / "two", "--no-admin") as server:
        assert not Path(server.admin_socket).exists()
        done = tsunagu(server, "status", check=False)
        assert done.returncode == 1 and "no admin socket at" in done.stderr
        # The workers' private sockets stay: a reload and a scrape reach them through it.
        assert len(list(private_tmp.iterdir())) == (1 if server.workers > 1 else 0)
    assert list(private_tmp.iterdir()) == []


def raw(path: str, data: bytes, timeout: float = 10.0) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(data)
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    result = json.loads(answer)
    assert isinstance(result, dict)
    return result


async def test_hostile_clients_are_bounded(server: ServeProcess) -> None:
    path = server.admin_socket
    for data, words in [
        (b"not json\n", "not a JSON object"),
        (b"[1, 2]\n", "not a JSON object"),
        (b"\n", "empty request"),
        (b'{"command": "format c:"}\n', "'command' must be one of"),
        (b'{"command": "kill", "user": "a", "session": "0-1"}\n', "either"),
        (b'{"command": "kill", "session": "0-1; rm"}\n', "session id"),
        (b'{"command": "sessions", "user": ' + b'"u' * 1 + b"x" * 600 + b'"}\n', "1 to 513"),
        (b'{"command": "status", "extra": 1}\n', "takes no extra"),
        (b"\xff\xfe\n", "not a JSON object"),
        (b"x" * (70 * 1024) + b"\n", "request over 65536 bytes"),
    ]:
        answer = raw(path, data)
        assert answer["ok"] is False and words in answer["error"], (data[:40], answer)

    # 50 idle connections: the server holds a bounded number, and still answers a command.
    idle = []
    try:
        for _ in range(50):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            idle.append(sock)
        await asyncio.sleep(0.3)
        started = time.monotonic()
        answer = await asyncio.to_thread(request, path, {"command": "status"}, 5.0)
        assert answer["ok"] is True and answer["workers"] == server.workers
        assert time.monotonic() - started < 2.0
        await asyncio.sleep(0.3)
        closed = 0
        for sock in idle:
            sock.settimeout(0.05)
            try:
                if sock.recv(1) == b"":
                    closed += 1
            except TimeoutError:
                pass
            except OSError:
                closed += 1
        # At most 32 are held; the oldest beyond that were closed.
        assert closed >= 50 + 1 - 32, closed
    finally:
        for sock in idle:
            sock.close()
    # One that never sends is closed after the read timeout with an answer saying so.
    started = time.monotonic()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        answer = json.loads(await asyncio.to_thread(sock.recv, 65536))
    assert answer == {"ok": False, "error": "no request within 5 s"}
    assert 4.5 < time.monotonic() - started < 7
    assert server.ask({"command": "status"})["not_answering"] == []


# --- a worker gone --------------------------------------------------------------------------


async def test_a_worker_that_does_not_answer_is_reported(tmp_path: Path, private_tmp: Path) -> None:
    with run_serve(tmp_path / "serve") as server:
        if server.workers < 2:
            pytest.skip("one worker on this machine")
        status = server.ask({"command": "status"})
        pids = {part["worker"]: part["pid"] for part in status["per_worker"]}

        # A stopped worker: the others answer, it is named after 2 s, by tsunagu status too.
        os.kill(pids[1], signal.SIGSTOP)
        try:
            started = time.monotonic()
            status = server.ask({"command": "status"})
            elapsed = time.monotonic() - started
            done = tsunagu(server, "status", check=False)
        finally:
            os.kill(pids[1], signal.SIGCONT)
        assert status["not_answering"] == [{"worker": 1, "error": "no answer in 2 s"}]
        assert [p["worker"] for p in status["per_worker"]] == [
            k for k in range(server.workers) if k != 1
        ]
        assert 1.9 < elapsed < 3.0, elapsed
        assert done.returncode == 1, done
        assert "worker 1 did not answer" in done.stderr
        assert "not answering" in done.stdout and f"{server.workers} workers" in done.stdout

        # A killed one: at once (worker 0 starts it again, test_interop_worker_restart.py,
        # but not within the first half second).
        os.kill(pids[1], signal.SIGKILL)
        started = time.monotonic()
        status = request(server.admin_socket, {"command": "status"}, 10.0)
        elapsed = time.monotonic() - started
        assert [part["worker"] for part in status["not_answering"]] == [1], status
        assert elapsed < 0.5, elapsed
        log.info("a killed worker reported in %.3f s", elapsed)


# --- over HTTP ------------------------------------------------------------------------------


def http_post(host: str, port: int, body: bytes, token: str) -> tuple[int, dict[str, Any]]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect((host, port))
        sock.sendall(
            (
                f"POST /admin HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body
        )
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head, _, rest = response.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(rest)


def test_admin_over_http_on_loopback_with_a_token(tmp_path: Path, private_tmp: Path) -> None:
    from support.interop import free_port
    from tsunagu.serve import local_addresses

    token = "k" * 48
    token_file = tmp_path / "admin.token"
    token_file.write_text(token + "\n")
    port = free_port(udp=False)
    extra = ("--admin-port", str(port), "--admin-token-file", str(token_file))
    with run_serve(tmp_path / "serve", *extra) as server:
        assert "admin API over HTTP on 127.0.0.1" in "\n".join(server.startup)
        status, answer = http_post("127.0.0.1", port, b'{"command": "status"}', token)
        assert status == 200 and answer["ok"] is True and answer["workers"] == server.workers
        assert len(answer["per_worker"]) == server.workers
        status, answer = http_post("127.0.0.1", port, b'{"command": "status"}', token[:-1] + "x")
        assert status == 401 and answer["ok"] is False
        # Nowhere but on loopback.
        for ip in local_addresses():
            if not ipaddress.ip_address(ip).is_loopback:
                family = socket.AF_INET6 if ":" in ip else socket.AF_INET
                with socket.socket(family, socket.SOCK_STREAM) as sock:
                    sock.settimeout(2)
                    with pytest.raises(OSError):
                        sock.connect((ip, port))
