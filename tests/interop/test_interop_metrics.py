"""Metrics and health of a running ``tsunagu serve`` with the default worker count: what a
scrape says while aioice clients allocate and relay through it (every worker's figures in
one scrape, the native path's counters included), per-user labels only on request,
``/readyz`` while draining, ``promtool check metrics`` on the scrape, and every query of
``docs/grafana-dashboard.json`` run by a real Prometheus (Debian's ``prometheus``) that
scrapes the server's web port.

Every server, client and wait is bounded in time. Prometheus hands a new target to its
scraper about 5 s after it starts, whatever the scrape interval, so its test waits up to
60 s for the first samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import aioice.stun
import aioice.turn
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.interop import (
    HOST,
    Collector,
    ServeProcess,
    TurnClient,
    free_port,
    run_serve,
    udp_echo_server,
)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

BOB = ("bob", "bob-password")
DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="prometheus and promtool (Debian's prometheus package) are not installed",
)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def scrape(port: int) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    status, body = http_get(f"http://{HOST}:{port}/metrics")
    assert status == 200, body
    text = body.decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return text, found


def total(found: dict[tuple[str, Any], float], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(
        value
        for (sample, keys), value in found.items()
        if sample == name and labels.items() <= dict(keys).items()
    )


async def allocate(server: ServeProcess) -> TurnClient:
    transport, app = await asyncio.wait_for(
        aioice.turn.create_turn_endpoint(
            Collector, server_addr=(server.host, server.port), username=BOB[0], password=BOB[1]
        ),
        10,
    )
    return TurnClient(transport, app)


async def spread(server: ServeProcess, limit: int = 24) -> list[TurnClient]:
    """Allocations until every worker holds one (bounded)."""
    clients: list[TurnClient] = []
    while len(clients) < limit:
        clients.append(await allocate(server))
        sessions = server.ask({"command": "sessions"})["sessions"]
        if len({s["worker"] for s in sessions}) == server.workers:
            return clients
    raise AssertionError(f"{limit} allocations did not reach all {server.workers} workers")


def binding(port: int) -> None:
    """One plain Binding request, answered (by the native path where it runs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2.0)
        message = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + os.urandom(12)
        sock.sendto(message, (HOST, port))
        assert sock.recv(2048)[8:20] == message[8:20]


def tls_handshake_fails(port: int) -> None:
    """A client that starts TLS with garbage: a transport failure."""
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(b"\x16\x03\x01\x00\x08" + b"\x00" * 8)
        with contextlib.suppress(OSError):
            sock.recv(1024)


def promtool_check(text: str) -> None:
    done = subprocess.run(
        ["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
    )
    assert done.returncode == 0, done.stderr.decode()


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """TMPDIR of the server: where worker 0 makes its private directory of worker sockets."""
    directory = tmp_path / "t"
    directory.mkdir()
    monkeypatch.setenv("TMPDIR", str(directory))
    return directory


# --- values move with real allocations ------------------------------------------------------


@needs_prometheus
async def test_a_scrape_covers_every_worker_and_follows_relayed_packets(
    tmp_path: Path, private_tmp: Path
) -> None:
    port = free_port(udp=False)
    with run_serve(
        tmp_path / "serve", "-u", ":".join(BOB), "--prometheus-port", str(port)
    ) as server:
        assert f"tsunagu: metrics on http://{HOST}:{port}/metrics (and /healthz, /readyz)" in (
            server.startup
        )
        text, before = scrape(port)
        promtool_check(text)
        workers = server.workers
        for worker in range(workers):
            assert before[("tsunagu_worker_up", (("worker", str(worker)),))] == 1
            assert total(before, "process_cpu_seconds_total", worker=str(worker)) > 0
            assert total(before, "process_resident_memory_bytes", worker=str(worker)) > 0

        clients = await spread(server)
        async with udp_echo_server() as (_, peer):
            for client in clients:
                for size in (100, 300):
                    assert await client.echo(b"m" * size, peer) == b"m" * size
            binding(server.port)
            text, after = scrape(port)
        promtool_check(text)

        count = len(clients)
        assert total(after, "tsunagu_allocations", transport="udp", family="ipv4") == count
        assert total(after, "tsunagu_allocations_created_total", transport="udp") == count
        for direction in ("to_peer", "to_client"):
            moved = total(
                after, "tsunagu_relayed_bytes_total", transport="udp", direction=direction
            )
            assert moved == 400 * count, (direction, moved)
            packets = total(
                after, "tsunagu_relayed_packets_total", transport="udp", direction=direction
            )
            assert packets == 2 * count
        # The relayed datagrams went through C (the default engine where it is built).
        if "relay path: native" in "\n".join(server.startup):
            assert total(after, "tsunagu_native_relayed_datagrams_total") >= 2 * count
            assert total(after, "tsunagu_stun_binding_requests_total", path="native") >= 1
        else:
            assert total(after, "tsunagu_stun_binding_requests_total", path="python") >= 1
        # aioice's first Allocate is answered 401 (the nonce), then 200.
        assert total(after, "tsunagu_responses_total", code="401") >= count
        assert total(after, "tsunagu_responses_total", code="200") >= 2 * count
        assert total(after, "tsunagu_userdb_up", kind="sqlite") == 1
        # No user names without --metrics-per-user.
        assert "tsunagu_user_" not in text and "bob" not in text

        # A wrong password is refused by cause; the counters survive the allocations' end.
        with pytest.raises(aioice.stun.TransactionFailed):
            await asyncio.wait_for(
                aioice.turn.create_turn_endpoint(
                    Collector,
                    server_addr=(server.host, server.port),
                    username=BOB[0],
                    password="wrong",
                ),
                10,
            )
        for client in clients:
            await client.close()
        deadline = time.monotonic() + 10
        while True:
            _, ended = scrape(port)
            if total(ended, "tsunagu_allocations") == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert total(ended, "tsunagu_allocations") == 0
        assert total(ended, "tsunagu_allocations_ended_total") == count
        assert total(ended, "tsunagu_relayed_bytes_total", direction="to_peer") == 400 * count
        assert total(ended, "tsunagu_refusals_total", cause="wrong password") >= 1
        assert total(ended, "process_open_fds") > 0


async def test_per_user_labels_on_request_and_readyz_while_draining(
    tmp_path: Path, private_tmp: Path
) -> None:
    port = free_port(udp=False)
    with run_serve(
        tmp_path / "serve",
        "-u",
        ":".join(BOB),
        "--prometheus-port",
        str(port),
        "--metrics-per-user",
        drain_timeout=5.0,
    ) as server:
        assert http_get(f"http://{HOST}:{port}/healthz") == (200, b'{"ok":true}\n')
        status, body = http_get(f"http://{HOST}:{port}/readyz")
        assert status == 200 and json.loads(body) == {"ready": True, "reasons": []}
        client = await allocate(server)
        async with udp_echo_server() as (_, peer):
            assert await client.echo(b"u" * 50, peer) == b"u" * 50
            _, found = scrape(port)
        assert found[("tsunagu_user_allocations", (("user", "bob"),))] == 1
        assert found[("tsunagu_user_relayed_bytes", (("direction", "to_peer"), ("user", "bob")))]

        server.ask({"command": "drain"})
        status, body = http_get(f"http://{HOST}:{port}/readyz")
        assert status == 503 and json.loads(body)["reasons"] == ["draining"]
        assert http_get(f"http://{HOST}:{port}/healthz")[0] == 200
        _, found = scrape(port)
        assert found[("tsunagu_draining", ())] == 1
        # SIGTERM: the web port closes at once, the metrics port answers until the end.
        server.terminate()
        await asyncio.sleep(0.5)
        status, body = http_get(f"http://{HOST}:{port}/readyz")
        assert status == 503 and "stopping" in json.loads(body)["reasons"]
        await client.close()


async def test_a_scrape_flood_on_the_web_port_is_bounded_and_serves_the_rest(
    tmp_path: Path,
) -> None:
    """A hostile client asks the web port's /metrics as fast as it can, 20 requests at a
    time, for at most 3 s (or 600 requests): the scrapes answered stay within the bound
    (5 a second after a burst of 10), the rest get 429, and meanwhile the page, the
    operator's metrics port and the relay serve as usual."""
    port = free_port(udp=False)
    with run_serve(
        tmp_path / "serve", "-u", ":".join(BOB), "--prometheus-port", str(port), web=True
    ) as server:
        web = f"http://{HOST}:{server.web_port}"
        statuses: list[int] = []
        async with aiohttp.ClientSession() as session:

            async def flood() -> None:
                deadline = time.monotonic() + 3.0
                while time.monotonic() < deadline and len(statuses) < 600:
                    async with session.get(f"{web}/metrics") as answer:
                        await answer.read()
                        statuses.append(answer.status)

            started = time.monotonic()
            flooding = [asyncio.create_task(flood()) for _ in range(20)]
            await asyncio.sleep(0.5)
            client = await allocate(server)
            async with udp_echo_server() as (_, peer):
                assert await client.echo(b"during the flood", peer) == b"during the flood"
            await client.close()
            assert (await asyncio.to_thread(http_get, f"{web}/"))[0] == 200
            for _ in range(20):
                status, _ = await asyncio.to_thread(http_get, f"http://{HOST}:{port}/metrics")
                assert status == 200
            await asyncio.gather(*flooding)
            elapsed = time.monotonic() - started
        answered = statuses.count(200)
        report = f"{len(statuses)} scrapes in {elapsed:.1f} s: {answered} answered"
        sys.stdout.write(f"\nweb port /metrics flood: {report}\n")
        assert set(statuses) == {200, 429}, report
        assert answered <= 10 + 5 * elapsed + 1, report
        assert len(statuses) >= 100, report  # the flood was well over the bound
        await asyncio.sleep(1.0)  # the bucket refills
        assert (await asyncio.to_thread(http_get, f"{web}/metrics"))[0] == 200


# --- the dashboard, through a real Prometheus -------------------------------------------------


@contextlib.contextmanager
def run_prometheus(target: str) -> Iterator[int]:
    """Prometheus scraping ``target`` (host:port) every second as job "tsunagu"; its port."""
    directory = tempfile.mkdtemp(prefix="prometheus-", dir="/tmp")
    port = free_port(udp=False)
    config = Path(directory, "prometheus.yml")
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: tsunagu\n    static_configs: [{{targets: ['{target}']}}]\n"
    )
    log = open(Path(directory, "prometheus.log"), "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={directory}/data",
            f"--web.listen-address={HOST}:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            if process.poll() is not None:
                raise RuntimeError(Path(directory, "prometheus.log").read_text()[-2000:])
            with contextlib.suppress(OSError):
                if http_get(f"http://{HOST}:{port}/-/ready", 1.0)[0] == 200:
                    break
            assert time.monotonic() < deadline, "prometheus was not ready in 15 s"
            time.sleep(0.05)
        yield port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()
        shutil.rmtree(directory, ignore_errors=True)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of the dashboard, its variables filled in as
    Grafana would: the job, and a rate interval."""
    document = json.loads(DASHBOARD.read_text())
    found = []
    for panel in document["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$job", "tsunagu").replace("$__rate_interval", "1m")
            found.append((panel["title"], expr))
    return found


def query(port: int, expr: str) -> dict[str, Any]:
    url = f"http://{HOST}:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    status, body = http_get(url)
    answer: dict[str, Any] = json.loads(body)
    assert status == 200 and answer["status"] == "success", (expr, answer)
    return answer


def test_the_dashboard_lists_its_queries() -> None:
    queries = dashboard_queries()
    assert len(queries) >= 16
    titles = " ".join(title for title, _ in queries).lower()
    for topic in ("allocations", "bandwidth", "code", "refusals", "rooms", "cpu", "memory"):
        assert topic in titles, topic


@needs_prometheus
async def test_every_dashboard_query_returns_data_from_prometheus(
    tmp_path: Path, private_tmp: Path
) -> None:
    with run_serve(tmp_path / "serve", "-u", ":".join(BOB), web=True) as server:
        with run_prometheus(f"{HOST}:{server.web_port}") as prometheus:
            started = time.monotonic()
            clients = [await allocate(server) for _ in range(3)]
            with pytest.raises(aioice.stun.TransactionFailed):  # a refusal: wrong password
                await asyncio.wait_for(
                    aioice.turn.create_turn_endpoint(
                        Collector,
                        server_addr=(server.host, server.port),
                        username=BOB[0],
                        password="wrong",
                    ),
                    10,
                )
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.sendto(b"\x00\x01\x00\x08" + b"\x00" * 20, (HOST, server.port))  # a drop
            binding(server.port)
            tls_handshake_fails(server.tls_port)
            async with aiohttp.ClientSession() as session:
                url = f"http://{HOST}:{server.web_port}/ws"
                async with session.ws_connect(url) as ws:
                    await ws.send_json(
                        {"type": "join", "v": 1, "room": "metrics-room", "name": "A"}
                    )
                    joined = await asyncio.wait_for(ws.receive_json(), 10)
                    assert joined["type"] == "joined"
                    await ws.send_str("not json")  # a signaling refusal
                    async with udp_echo_server() as (_, peer):
                        pending = dict(dashboard_queries_by_expr())
                        deadline = time.monotonic() + 60
                        while pending and time.monotonic() < deadline:
                            for client in clients:  # traffic for the rates
                                assert await client.echo(b"d" * 200, peer) == b"d" * 200
                            for expr in list(pending):
                                if query(prometheus, expr)["data"]["result"]:
                                    del pending[expr]
                            await asyncio.sleep(0.5)
                        assert not pending, f"no data from Prometheus for: {pending}"
            waited = time.monotonic() - started
            up = query(prometheus, 'tsunagu_worker_up{job="tsunagu"}')["data"]["result"]
            assert len(up) == server.workers and all(r["value"][1] == "1" for r in up)
            for client in clients:
                await client.close()
    assert waited < 60


def dashboard_queries_by_expr() -> dict[str, str]:
    return {expr: title for title, expr in dashboard_queries()}


async def test_readyz_while_a_remote_user_database_is_unreachable(
    tmp_path: Path, private_tmp: Path
) -> None:
    port = free_port(udp=False)
    nobody = free_port(udp=False)  # nothing listens there
    with run_serve(
        tmp_path / "serve",
        "--redis-userdb",
        f"ip={HOST} port={nobody} dbname=0 connect_timeout=1",
        "--prometheus-port",
        str(port),
        "--workers",
        "1",
    ) as server:
        status, body = http_get(f"http://{HOST}:{port}/readyz")
        assert status == 503, body
        assert json.loads(body)["reasons"] == ["redis user database unreachable"]
        assert http_get(f"http://{HOST}:{port}/healthz")[0] == 200
        _, found = scrape(port)
        assert found[("tsunagu_userdb_up", (("kind", "redis"),))] == 0
        assert str(nobody) not in body.decode() and server.workers == 1
