"""One port for TLS and plain TCP, and aux servers, with real clients against ``tsunagu serve``.

Every TCP listener (the main port, the TLS port, an aux server's) takes TLS and plain TCP
alike, as coturn's do: aioice and coturn's ``turnutils_uclient`` allocate and relay over
both on one port, with both relay engines. An aux server (``--aux-server``) is one more
UDP and TCP listening address with full STUN/TURN; an Allocate through it is never
redirected while draining. What is neither TLS nor STUN is closed at once and logged once
per interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aioice.turn
import pytest

from support.audit import required_workers, workers_seen
from support.interop import (
    HOST,
    HOST6,
    PASSWORD,
    UCLIENT_SUMMARY,
    USER,
    Collector,
    EchoPeer,
    ServeProcess,
    TurnClient,
    binding_answered,
    client_field,
    error_code,
    free_ports,
    run_serve,
    run_uclient,
    uclient_command,
    uclient_redrew_a_channel,
    udp_echo_server,
)

pytestmark = pytest.mark.interop

UCLIENT_TIMEOUT = 60.0
MESSAGES = 100
CLIENTS = 4
LENGTH = 120
SUMMARY = UCLIENT_SUMMARY
LOG_INTERVAL = 10.0  # the accept loop's logging interval
NOT_TURN = re.compile(r"closed (\d+) TCP/TLS connections in the last 10 s that spoke neither")


@dataclass
class OnePort:
    """A server with one aux server on ``HOST``."""

    server: ServeProcess
    aux_port: int

    @property
    def tcp_ports(self) -> dict[str, int]:
        return {"main": self.server.port, "tls": self.server.tls_port, "aux": self.aux_port}

    def trusting(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.server.cert_path))


@contextlib.contextmanager
def one_port_serve(tmp: Path, *extra: str, drain_timeout: float = 1.0) -> Iterator[OnePort]:
    (aux_port,) = free_ports(1)
    aux = ("--aux-server", f"{HOST}:{aux_port}")
    # 400 relay ports: 200 per worker of two, so the default user quota (half of a worker's
    # total, 98) leaves room for every allocation a test here makes by chance on one worker.
    with run_serve(tmp, *aux, *extra, drain_timeout=drain_timeout, relay_ports=400) as server:
        yield OnePort(server, aux_port)


@pytest.fixture(scope="module", params=["native", "python"])
def engine_serve(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OnePort]:
    with one_port_serve(
        tmp_path_factory.mktemp(f"one-port-{request.param}"), "--relay-engine", request.param
    ) as served:
        assert any(f"relay path: {request.param}" in line for line in served.server.startup)
        yield served


async def allocate(
    host: str, port: int, *, transport: str = "tcp", tls: ssl.SSLContext | None = None
) -> TurnClient:
    turn_transport, app = await asyncio.wait_for(
        aioice.turn.create_turn_endpoint(
            Collector,
            server_addr=(host, port),
            username=USER,
            password=PASSWORD,
            ssl=tls,
            transport=transport,
        ),
        10.0,
    )
    return TurnClient(turn_transport, app)


async def all_or_none(allocations: list[Coroutine[Any, Any, TurnClient]]) -> list[TurnClient]:
    """Every allocation, or the first failure after the others are deleted: a client left
    open would outlive this test and be collected, unclosed, in another one."""
    results = await asyncio.gather(*allocations, return_exceptions=True)
    clients = [item for item in results if isinstance(item, TurnClient)]
    failures = [item for item in results if isinstance(item, BaseException)]
    if failures:
        await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)
        raise failures[0]
    return clients


async def wait_for_records(server: ServeProcess, clients: list[str]) -> dict[str, dict[str, Any]]:
    """The audit records of ``clients`` (5-tuples as the log writes them), bounded wait."""
    deadline = time.monotonic() + 5.0
    while True:
        records = {r["client"]: r for r in server.audit_records()}
        if all(client in records for client in clients) or time.monotonic() > deadline:
            return records
        await asyncio.sleep(0.05)


def test_the_start_up_output_lists_the_aux_server_and_the_shared_ports(
    engine_serve: OnePort,
) -> None:
    server, aux = engine_serve.server, engine_serve.aux_port
    startup = "\n".join(server.startup)
    assert f"tsunagu: aux servers on {HOST}:{aux} (udp, tcp, tls)" in startup, startup
    ports = f"{server.port}, {server.tls_port}, {aux}"
    assert f"every TCP port takes TLS and plain TCP alike: {ports}" in startup, startup


async def test_aioice_over_tls_and_plain_tcp_on_every_tcp_port(engine_serve: OnePort) -> None:
    server = engine_serve.server
    trusting = engine_serve.trusting()
    expected: list[str] = []
    async with udp_echo_server(HOST) as (echo, peer):
        for name, port in engine_serve.tcp_ports.items():
            # Both kinds at once on the same port, each relaying both ways.
            plain, tls = await asyncio.gather(
                allocate(HOST, port), allocate(HOST, port, tls=trusting)
            )
            for client, kind in ((plain, "tcp"), (tls, "tls")):
                payload = f"{kind} on the {name} port".encode()
                assert await client.echo(payload, peer) == payload
                assert client.relayed[0] == HOST
                expected.append(client_field(kind, client.mapped, (HOST, port)))
            await asyncio.gather(plain.close(), tls.close())
    records = await wait_for_records(server, expected)
    for client in expected:
        record = records[client]
        assert record["to_peers"]["packets"] == 1 and record["to_client"]["packets"] == 1, record
        assert record["dropped"] == 0, record
    assert len(echo.received) == 6


async def test_aioice_over_udp_through_the_aux_server(engine_serve: OnePort) -> None:
    server, aux = engine_serve.server, engine_serve.aux_port
    # Plain STUN answers there too.
    assert binding_answered(aux)
    async with udp_echo_server(HOST) as (echo, peer):
        client = await allocate(HOST, aux, transport="udp")
        for payload in (b"a", b"through the aux server" * 10):
            assert await client.echo(payload, peer) == payload
        # Relayed from the address the client reached, as for the main listeners.
        assert client.relayed[0] == HOST
        low, high = server.min_port, server.max_port
        assert low <= client.relayed[1] <= high
        await client.close()
    name = client_field("udp", client.mapped, (HOST, aux))
    record = (await wait_for_records(server, [name]))[name]
    assert record["to_peers"]["packets"] == 2 and record["to_client"]["packets"] == 2
    assert [data for data, _ in echo.received] == [b"a", b"through the aux server" * 10]


async def test_aux_server_clients_are_spread_over_every_worker(engine_serve: OnePort) -> None:
    """Every worker binds the aux server's ports with SO_REUSEPORT, as the main ones: the
    kernel spreads its clients over them (16 per worker and transport: a worker left
    without any by chance has odds below 1 in 10**6)."""
    server, aux = engine_serve.server, engine_serve.aux_port
    assert server.workers == len(os.sched_getaffinity(0)), server.startup
    async with udp_echo_server(HOST) as (_, peer):
        for transport in ("udp", "tcp"):
            clients = await all_or_none(
                [allocate(HOST, aux, transport=transport) for _ in range(16 * server.workers)]
            )
            for client in clients:
                assert await client.echo(b"which worker?", peer) == b"which worker?"
            await asyncio.gather(*(client.close() for client in clients))
            names = [client_field(transport, c.mapped, (HOST, aux)) for c in clients]
            records = await wait_for_records(server, names)
            seen = workers_seen([records[name] for name in names], server.workers)
            assert set(seen) <= set(range(server.workers)), (transport, seen)
            assert len(seen) >= required_workers(server.workers, len(names)), (transport, seen)


async def test_an_ipv6_aux_server(tmp_path: Path) -> None:
    """Clients reach an aux server on ::1; aioice asks for an IPv4 relay, which comes from the
    listening address of that family, as it does through the main listeners."""
    (aux,) = free_ports(1)
    aux_server = ("--aux-server", f"[{HOST6}]:{aux}")
    with run_serve(tmp_path, *aux_server, hosts=(HOST6, HOST)) as server:
        assert f"tsunagu: aux servers on [{HOST6}]:{aux} (udp, tcp, tls)" in server.startup
        trusting = ssl.create_default_context(cafile=str(server.cert_path))
        async with udp_echo_server(HOST) as (_, peer):
            for transport, tls in (("udp", None), ("tcp", None), ("tcp", trusting)):
                client = await allocate(HOST6, aux, transport=transport, tls=tls)
                assert client.relayed[0] == HOST
                assert await client.echo(b"via IPv6", peer) == b"via IPv6"
                await client.close()
                kind = "tls" if tls else transport
                name = client_field(kind, client.mapped, (HOST6, aux))
                assert name in await wait_for_records(server, [name])


# --- coturn's client ------------------------------------------------------------------------

# mode -> (uclient flags, which port)
UCLIENT_MODES = {
    "tcp-on-the-tls-port": (["-t"], "tls"),
    "tls-on-the-tls-port": (["-t", "-S"], "tls"),
    "tls-on-the-main-port": (["-t", "-S"], "main"),
    "udp-on-the-aux-server": ([], "aux"),
    "tcp-on-the-aux-server": (["-t"], "aux"),
    "tls-on-the-aux-server": (["-t", "-S"], "aux"),
}


@pytest.fixture(scope="module")
def uclient_runs(
    tmp_path_factory: pytest.TempPathFactory, echo_peer: EchoPeer
) -> Iterator[tuple[OnePort, dict[str, tuple[int, str]]]]:
    """Every mode at once against one server, each client summing up what it relayed."""
    tmp = tmp_path_factory.mktemp("one-port-uclient")
    with one_port_serve(tmp, drain_timeout=0.2) as served:
        processes: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        commands: dict[str, list[str]] = {}
        try:
            for mode, (flags, which) in UCLIENT_MODES.items():
                command = uclient_command(
                    served.tcp_ports[which],
                    (echo_peer.host, echo_peer.port),
                    *flags,
                    "-z",
                    "5",
                    messages=MESSAGES,
                    clients=CLIENTS,
                    length=LENGTH,
                )
                commands[mode] = command
                output = tmp / f"{mode}.out"
                with open(output, "wb") as out:
                    processes[mode] = (
                        subprocess.Popen(
                            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                        ),
                        output,
                    )
            results: dict[str, tuple[int, str]] = {}
            deadline = time.monotonic() + UCLIENT_TIMEOUT
            for mode, (process, output) in processes.items():
                try:
                    code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    code = -1
                text = output.read_text(errors="replace")
                if uclient_redrew_a_channel(code, text):
                    code, text = run_uclient(commands[mode], UCLIENT_TIMEOUT)
                results[mode] = (code, text)
            yield served, results
        finally:
            for process, _ in processes.values():
                if process.poll() is None:
                    process.kill()
                process.wait(timeout=5)


@pytest.mark.parametrize("mode", list(UCLIENT_MODES))
def test_uclient_relays_everything(
    mode: str, uclient_runs: tuple[OnePort, dict[str, tuple[int, str]]]
) -> None:
    served, results = uclient_runs
    code, out = results[mode]
    assert code == 0, out
    summaries = SUMMARY.findall(out)
    assert summaries, out
    sent, received = (int(n) for n in summaries[-1])
    assert sent == MESSAGES * CLIENTS and received == sent, out

    # The server's own count for this mode's protocol and port.
    flags, which = UCLIENT_MODES[mode]
    protocol = "tls" if "-S" in flags else "tcp" if "-t" in flags else "udp"
    port = served.tcp_ports[which]
    deadline = time.monotonic() + 5.0
    while True:
        records = [
            r
            for r in served.server.audit_records()
            if r["client"].startswith(f"{protocol}:") and r["client"].endswith(f"->{HOST}:{port}")
        ]
        if sum(r["to_peers"]["packets"] for r in records) >= sent or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert sum(r["to_peers"]["packets"] for r in records) == sent, records
    assert sum(r["to_client"]["packets"] for r in records) == received, records
    assert all(r["relay"][0].startswith(f"{HOST}:") for r in records), records


# --- what is neither --------------------------------------------------------------------------


def _closed_within(port: int, data: bytes, timeout: float) -> float | None:
    """Seconds until the server ends a connection that sent ``data``; None if it did not."""
    started = time.monotonic()
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(data)
        try:
            while sock.recv(4096):
                pass
        except TimeoutError:
            return None
        except ConnectionError:
            pass
    return time.monotonic() - started


async def test_garbage_on_a_shared_port_is_closed_at_once_and_logged_once(
    tmp_path: Path,
) -> None:
    with one_port_serve(tmp_path) as served:
        server = served.server
        garbage = [b"GET / HTTP/1.1\r\nHost: turn\r\n\r\n", b"\xff" * 32, b"SSH-2.0-OpenSSH\r\n"]
        closed = []
        for port in served.tcp_ports.values():
            for data in garbage:
                closed.append(await asyncio.to_thread(_closed_within, port, data, 5.0))
        assert all(t is not None and t < 1.0 for t in closed), closed
        # Well-behaved clients are served meanwhile, TLS and plain alike.
        async with udp_echo_server(HOST) as (_, peer):
            for tls in (None, served.trusting()):
                client = await allocate(HOST, served.aux_port, tls=tls)
                assert await client.echo(b"still serving", peer) == b"still serving"
                await client.close()
        # One line per worker and interval, whatever the number of connections.
        deadline = time.monotonic() + LOG_INTERVAL + 5
        while True:
            found = [NOT_TURN.search(line) for line in server.log_text().splitlines()]
            lines = [match.string for match in found if match]
            counted = sum(int(match.group(1)) for match in found if match)
            if counted >= len(closed) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert counted == len(closed), lines
        assert len(lines) <= server.workers, lines
        assert all("first byte 0x47 'G'" in line or "0xff" in line for line in lines), lines


# --- draining -----------------------------------------------------------------------------------


async def test_draining_redirects_the_main_port_but_never_the_aux_server(tmp_path: Path) -> None:
    """coturn's aux servers never answer ALTERNATE-SERVER: a client that came to that one
    port may reach no other. One worker, so that every request reaches the draining one."""
    with one_port_serve(
        tmp_path, "--alternate-server", "192.0.2.9:3478", "--workers", "1", drain_timeout=20
    ) as served:
        server = served.server
        async with udp_echo_server(HOST) as (_, peer):
            held = await allocate(HOST, served.aux_port, transport="udp")
            server.terminate()
            assert await server.wait_for_log_async("draining: no new allocations")
            with pytest.raises(Exception) as redirected:
                await allocate(HOST, server.port, transport="udp")
            assert error_code(redirected.value) == 300, repr(redirected.value)
            with pytest.raises(Exception) as refused:
                await allocate(HOST, served.aux_port, transport="udp")
            assert error_code(refused.value) == 508, repr(refused.value)
            # The allocation made through the aux server still relays.
            assert await held.echo(b"still relaying", peer) == b"still relaying"
            await held.close()
        assert await server.wait_async(10) == 0, server.log_text()
