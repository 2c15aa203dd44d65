"""Reloading a running server (``SIGHUP``, ``tsunagu reload``) with aioice clients relaying:
no call is dropped, what the new configuration says applies, a broken one changes nothing.

The server runs as users run it (the default worker count) from a configuration file; each
reload rewrites that file. The TLS certificate is replaced both ways operators do it: a new
path in the file, and new contents under the same path (what certbot's renewal does).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509

from support.certs import make_certificate
from support.interop import (
    ServeProcess,
    TurnClient,
    error_code,
    run_serve,
    turn_allocate,
    udp_echo_server,
)
from tsunagu.auth.rest import mint_credentials

pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]

log = logging.getLogger(__name__)

ALLOCATIONS = {"udp": 100, "tcp": 50, "tls": 50}
RELOADS = 10


def write_config(path: Path, **values: Any) -> None:
    lines = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, str):
            lines.append(f'{key} = "{value}"')
        elif isinstance(value, list):
            lines.append(f"{key} = [{', '.join(repr(str(item)) for item in value)}]")
        else:
            lines.append(f"{key} = {value}")
    path.write_text("\n".join(lines) + "\n")


def reload_command(server: ServeProcess) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tsunagu", "reload", "--admin-socket", server.admin_socket],
        capture_output=True,
        text=True,
        timeout=30,
    )


def der_fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def file_fingerprint(cert: Path) -> str:
    return der_fingerprint(ssl.PEM_cert_to_DER_cert(cert.read_text()))


def any_certificate() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def served_fingerprint(port: int) -> str:
    """The certificate a new TLS client gets on ``port``."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
        any_certificate().wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        return der_fingerprint(tls.getpeercert(binary_form=True) or b"")


def new_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return make_certificate(directory, name, [x509.DNSName("localhost")])


async def echo_all(clients: list[TurnClient], peer: tuple[str, int], tag: bytes) -> int:
    """One echo through every allocation at once; how many came back."""

    async def one(index: int, client: TurnClient) -> bool:
        payload = b"%s-%d" % (tag, index)
        try:
            return await client.echo(payload, peer, timeout=5) == payload
        except (TimeoutError, AssertionError):
            return False

    results = await asyncio.gather(*(one(i, c) for i, c in enumerate(clients)))
    return sum(results)


async def test_200_allocations_relay_through_10_reloads(tmp_path: Path) -> None:
    config = tmp_path / "tsunagu.toml"
    pairs = [new_certificate(tmp_path / "certs" / str(k), f"cert-{k}") for k in range(RELOADS + 1)]
    in_place_cert, in_place_key = tmp_path / "live-cert.pem", tmp_path / "live-key.pem"

    def configure(index: int) -> Path:
        """Reload ``index``'s file: odd ones name a new path, even ones keep the path and
        change what is in it; a quota moves each time too."""
        cert, key = pairs[index]
        if index % 2 == 0:
            in_place_cert.write_bytes(cert.read_bytes())
            in_place_key.write_bytes(key.read_bytes())
            cert, key = in_place_cert, in_place_key
        write_config(
            config,
            cert=str(cert),
            pkey=str(key),
            user_quota=0,
            address_quota=0,
            total_quota=1000 + index,
        )
        return pairs[index][0]

    configure(0)
    with run_serve(tmp_path / "serve", "-c", str(config), relay_ports=600) as server:
        assert served_fingerprint(server.tls_port) == file_fingerprint(pairs[0][0])
        async with udp_echo_server() as (echo, peer):
            clients: list[TurnClient] = []
            started = time.monotonic()
            for transport, count in ALLOCATIONS.items():
                for _ in range(count):
                    clients.append(
                        await turn_allocate(
                            server,
                            "udp" if transport == "udp" else "tcp",
                            ssl=any_certificate() if transport == "tls" else None,
                        )
                    )
            log.info("%d allocations in %.1f s", len(clients), time.monotonic() - started)
            assert await echo_all(clients, peer, b"before") == len(clients)

            # Traffic runs through every allocation while the reloads happen.
            stop = asyncio.Event()
            rounds: list[int] = []

            async def traffic() -> None:
                while not stop.is_set():
                    rounds.append(await echo_all(clients, peer, b"during"))

            running = asyncio.create_task(traffic())
            times = []
            for index in range(1, RELOADS + 1):
                expected = file_fingerprint(configure(index))
                began = time.monotonic()
                if index % 2:
                    done = await asyncio.to_thread(reload_command, server)
                    assert done.returncode == 0, (done.stdout, done.stderr)
                    assert "total_quota" in done.stdout and "TLS certificate" in done.stdout
                else:
                    marks = server.log_text().count("reload: configuration file")
                    server.send_signal(signal.SIGHUP)
                    deadline = time.monotonic() + 10
                    while server.log_text().count("reload: configuration file") == marks:
                        assert time.monotonic() < deadline, server.log_text()[-3000:]
                        await asyncio.sleep(0.05)
                times.append(time.monotonic() - began)
                # Every worker serves the new certificate to new clients.
                seen = {
                    await asyncio.to_thread(served_fingerprint, server.tls_port) for _ in range(8)
                }
                assert seen == {expected}, index
            stop.set()
            await running

            after = await echo_all(clients, peer, b"after")
            status = server.ask({"command": "status"})
            lost = len(clients) - after
            log.info(
                "%d reloads (%.2f s at most), %d echo rounds during them (%d of %d echoes"
                " back), %d allocations lost, %d alive on the server",
                RELOADS,
                max(times),
                len(rounds),
                sum(rounds),
                len(rounds) * len(clients),
                lost,
                status["allocations"]["total"],
            )
            assert lost == 0
            assert rounds and all(count == len(clients) for count in rounds), rounds
            assert status["allocations"] == {
                "total": 200,
                "udp": 100,
                "tcp": 50,
                "tls": 50,
            }
            assert "SIGHUP: reloading" in server.log_text()
            for client in clients:
                client.transport.close()
            await asyncio.sleep(0)


async def allocate(server: ServeProcess, username: str, password: str) -> TurnClient:
    return await turn_allocate(server, username=username, password=password)


async def refused(server: ServeProcess, username: str, password: str) -> int | None:
    """The error code of an allocation that fails (whichever worker takes it: four tries)."""
    codes = set()
    for _ in range(4):
        with pytest.raises(Exception) as info:
            await allocate(server, username, password)
        codes.add(error_code(info.value))
    assert len(codes) == 1, codes
    return codes.pop()


async def allocates(server: ServeProcess, username: str, password: str) -> None:
    for _ in range(4):
        client = await allocate(server, username, password)
        await client.close()


async def test_reload_applies_users_secrets_peers_alternates_log_level_and_drain(
    tmp_path: Path,
) -> None:
    config = tmp_path / "tsunagu.toml"
    users = tmp_path / "users.txt"
    users.write_text("carol:first\n")
    settings: dict[str, Any] = {
        "user_file": str(users),
        "static_auth_secrets": ["secret-one"],
        "allowed_peer_ips": ["127.0.0.1"],
        "drain_timeout": 30,
    }
    write_config(config, **settings)

    def reload(**changes: Any) -> subprocess.CompletedProcess[str]:
        settings.update(changes)
        write_config(config, **settings)
        return reload_command(server)

    with run_serve(
        tmp_path / "serve", "-c", str(config), allowed_peers=False, drain_timeout=None
    ) as server:
        await allocates(server, "carol", "first")
        await allocates(server, *mint_credentials("secret-one", "dave", 600, time.time()))

        # Users and secrets: the old ones stop working at once, the new ones work.
        users.write_text("carol:second\n")
        done = reload(static_auth_secrets=["secret-two"])
        assert done.returncode == 0, done.stderr
        assert "  users: static users" in done.stdout
        assert "  static_auth_secrets: TURN REST API secrets" in done.stdout
        assert await refused(server, "carol", "first") == 401
        await allocates(server, "carol", "second")
        assert (
            await refused(server, *mint_credentials("secret-one", "dave", 600, time.time())) == 401
        )
        await allocates(server, *mint_credentials("secret-two", "dave", 600, time.time()))

        # Peer ranges: with loopback no longer allowed, a permission to it is refused (403).
        async with udp_echo_server() as (_, peer):
            client = await allocate(server, "carol", "second")
            assert await client.echo(b"allowed", peer) == b"allowed"
            done = reload(allowed_peer_ips=None)
            assert done.returncode == 0 and "allowed_peer_ips" in done.stdout
            later = await allocate(server, "carol", "second")
            later.transport.sendto(b"denied", peer)
            with pytest.raises(TimeoutError):
                await later.app.next(timeout=1.0)
            # The permission granted before the reload stays until it expires.
            assert await client.echo(b"still", peer) == b"still"
            later.transport.close()
            await client.close()

        # Log level: debug lines appear from the reload on.
        assert " DEBUG " not in server.log_text()
        done = reload(log_level="debug")
        assert done.returncode == 0
        for _ in range(4):  # a TCP connection's end is a debug line, in whichever worker
            stream = await turn_allocate(server, "tcp")
            await stream.close()
        assert await server.wait_for_log_async(" DEBUG ", timeout=5)
        reload(log_level="info")

        # Lifetimes: a new allocation gets the new longest lifetime, in whichever worker.
        done = reload(max_allocate_lifetime=120)
        assert done.returncode == 0 and "max_allocate_lifetime" in done.stdout
        short = [await allocate(server, "carol", "second") for _ in range(4)]
        ports = {f":{client.mapped[1]}" for client in short}
        sessions = server.ask({"command": "sessions"})["sessions"]
        mine = [s for s in sessions if any(s["client"].endswith(port) for port in ports)]
        assert len(mine) == 4 and all(s["expires_in"] <= 120 for s in mine), sessions
        for client in short:
            await client.close()

        # An option only a restart changes is named, and not applied.
        done = reload(realm="elsewhere.example")
        assert done.returncode == 0
        assert "changed, but only a restart applies: realm" in done.stdout
        await allocates(server, "carol", "second")

        # Broken configurations are refused whole; the running one keeps serving.
        config.write_text("user_quota = \n")
        done = reload_command(server)
        assert done.returncode == 1 and "configuration refused" in done.stderr
        assert "the running one is kept" in done.stderr
        users.write_text("carol:third\n")
        write_config(config, **{**settings, "cert": str(tmp_path / "missing.pem")})
        done = reload_command(server)
        assert done.returncode == 1 and "missing.pem" in done.stderr
        assert await server.wait_for_log_async("reload refused", timeout=5)
        await allocates(server, "carol", "second")  # the users file was not read either

        # Alternate servers: a draining server now sends new clients to one (300, not 508).
        holder = await allocate(server, "carol", "second")
        server.ask({"command": "drain"})
        assert await refused(server, "carol", "second") == 508
        users.write_text("carol:second\n")
        done = reload(alternate_servers=["127.0.0.1:9"], drain_timeout=1)
        assert done.returncode == 0, done.stderr
        assert await refused(server, "carol", "second") == 300

        # Drain timeout: an allocation still open holds the stop for 1 s, not 30.
        began = time.monotonic()
        server.terminate()
        assert await server.wait_async(15) == 0
        log.info("stopped %.1f s after SIGTERM with an allocation open", time.monotonic() - began)
        assert time.monotonic() - began < 10
        holder.transport.close()


async def test_sighup_reaches_every_worker_without_the_admin_socket(tmp_path: Path) -> None:
    config = tmp_path / "tsunagu.toml"
    write_config(config, total_quota=100)
    with run_serve(tmp_path / "serve", "-c", str(config), "--no-admin") as server:
        assert not Path(server.admin_socket).exists()
        write_config(config, total_quota=50)
        server.send_signal(signal.SIGHUP)
        assert await server.wait_for_log_async("applied total_quota", timeout=10)
        for worker in range(server.workers):
            assert await server.wait_for_log_async(f"cached users dropped (worker {worker})")
        assert "did not" not in server.log_text()


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc."""
    found = [pid]
    for current in found:
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        found.extend(int(child) for child in children)
    return found


async def test_sighup_while_starting_ends_no_process(tmp_path: Path) -> None:
    with run_serve(tmp_path / "serve", wait_ready=False) as server:
        # From the moment tsunagu serve runs (the interpreter's own start, before any of
        # its code, is out of its hands): SIGHUP ignored, bit 1 of SigIgn.
        deadline = time.monotonic() + 10
        while not int(proc_status(server.pid).get("SigIgn", "0"), 16) & 1:
            assert time.monotonic() < deadline and server.process.poll() is None
            await asyncio.sleep(0.002)
        sent = 0
        deadline = time.monotonic() + 30
        while "tsunagu: ready" not in server.stdout_path.read_text(errors="replace"):
            assert time.monotonic() < deadline and server.process.poll() is None
            for pid in process_tree(server.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGHUP)
                    sent += 1
            await asyncio.sleep(0.01)
        server.wait_ready()
        log.info("%d SIGHUPs sent while the server started", sent)
        assert sent > 10
        assert len(process_tree(server.pid)) == server.workers
        client = await turn_allocate(server)
        await client.close()


async def _join(
    session: aiohttp.ClientSession, server: ServeProcess, name: str, password: str
) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]:
    """A WebSocket that asked to join room "alpha", and the server's answer."""
    async with asyncio.timeout(10):
        ws = await session.ws_connect(f"http://127.0.0.1:{server.web_port}/ws")
    join = {"type": "join", "v": 1, "room": "alpha", "name": name, "password": password}
    await ws.send_json(join)
    return ws, await _next(ws, {"joined", "error"})


async def _next(ws: aiohttp.ClientWebSocketResponse, types: set[str]) -> dict[str, Any]:
    """The next message of one of ``types`` (pings and others skipped), within 10 s."""
    async with asyncio.timeout(10):
        while True:
            message: dict[str, Any] = await ws.receive_json()
            if message.get("type") in types:
                return message


async def test_reload_changes_room_access_and_the_web_api_while_a_call_goes_on(
    tmp_path: Path,
) -> None:
    config = tmp_path / "tsunagu.toml"
    settings: dict[str, Any] = {"room_access": "password", "room_password": "first password"}
    write_config(config, **settings)
    key = "k" * 32
    origin = "https://app.example.org"
    with run_serve(tmp_path / "serve", "-c", str(config), web=True) as server:
        base = f"http://127.0.0.1:{server.web_port}"
        async with aiohttp.ClientSession() as session:
            ada, joined = await _join(session, server, "Ada", "first password")
            assert joined["type"] == "joined" and joined["capacity"] == 8, joined
            async with session.get(f"{base}/api/turn-credentials?key={key}") as answer:
                assert answer.status == 404  # no API key yet: off
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(f"{base}/ws", headers={"Origin": origin})
            assert refused.value.status == 403

            settings.update(
                room_password="second password",
                room_capacity=3,
                api_key=key,
                allowed_origins=[origin],
            )
            write_config(config, **settings)
            done = reload_command(server)
            assert done.returncode == 0, done.stdout + done.stderr
            for option in ("room_password", "room_capacity", "api_key", "allowed_origins"):
                assert option in done.stdout, done.stdout
            assert "second password" not in done.stdout + server.log_text()

            # The next joins follow the new password and capacity...
            refused_ws, wrong = await _join(session, server, "Bo", "first password")
            assert wrong["type"] == "error" and wrong["code"] == "bad-password", wrong
            await refused_ws.close()
            bo, joined = await _join(session, server, "Bo", "second password")
            assert joined["type"] == "joined" and joined["capacity"] == 3, joined
            # ...and Ada, admitted before, is still in the room: she hears of Bo and
            # reaches him.
            arrived = await _next(ada, {"peer-joined"})
            assert arrived["id"] == joined["id"], arrived
            await ada.send_json({"type": "offer", "to": joined["id"], "sdp": "v=0"})
            offer = await _next(bo, {"offer"})
            assert offer["sdp"] == "v=0", offer

            async with session.get(f"{base}/api/turn-credentials?key={key}") as answer:
                assert answer.status == 200, await answer.text()
                assert (await answer.json())["uris"], "credentials name the TURN server"
            other = await session.ws_connect(f"{base}/ws", headers={"Origin": origin})
            await other.close()
            for ws in (ada, bo):
                await ws.close()


def _kept_open(server: ServeProcess, held: list[socket.socket], seconds: float = 1.0) -> bool:
    """Whether the server kept a new TCP connection to its TURN port open ``seconds`` (a
    refused one is reset at once, sometimes before ``connect`` returns); kept ones are
    added to ``held``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.connect((server.host, server.port))
        sock.settimeout(seconds)
        kept = sock.recv(1) != b""  # nothing comes before a request: b"" is closed
    except TimeoutError:
        kept = True
    except ConnectionResetError:
        kept = False
    if kept:
        held.append(sock)
    else:
        sock.close()
    return kept


async def test_reload_changes_the_tcp_connection_caps_for_new_connections(tmp_path: Path) -> None:
    config = tmp_path / "tsunagu.toml"
    # Connections without an allocation are kept for tcp_allocate_timeout: longer than the test.
    write_config(config, max_tcp_connections_per_ip=2, tcp_allocate_timeout=120)
    # One worker: with more, each admits its share of the cap and the kernel picks the worker
    # by each connection's addresses, so the count one address reaches would vary.
    with run_serve(tmp_path / "serve", "-c", str(config), "--workers", "1") as server:
        held: list[socket.socket] = []
        try:
            # A refusal is a reset at once; waiting 5 s for one leaves room for a busy machine.
            assert _kept_open(server, held) and _kept_open(server, held)
            assert not _kept_open(server, held, seconds=5.0)
            write_config(config, max_tcp_connections_per_ip=3, tcp_allocate_timeout=120)
            done = reload_command(server)
            assert done.returncode == 0 and "max_tcp_connections_per_ip" in done.stdout, done
            assert _kept_open(server, held)
            assert not _kept_open(server, held, seconds=5.0)
            # Lowered below what is open: the open ones stay, a new one is refused.
            write_config(config, max_tcp_connections_per_ip=1, tcp_allocate_timeout=120)
            assert reload_command(server).returncode == 0
            assert not _kept_open(server, held, seconds=5.0)
            assert len(held) == 3
            for sock in held:
                sock.settimeout(0.2)
                with pytest.raises(TimeoutError):
                    sock.recv(1)
        finally:
            for sock in held:
                sock.close()
