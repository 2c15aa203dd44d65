"""coturn's own client tools against ``tsunagu serve``.

``turnutils_uclient`` flags, as its ``-h`` and source say: channels are the default, ``-s``
uses Send/Data indications instead, ``-c`` only turns off the second (RTCP) allocation,
``-t`` is TCP, ``-t -S`` TLS, and ``-y`` makes the clients send to each other's relayed
addresses. It exits 0 even when every packet is lost, so the tests read its final
``tot_send_msgs``/``tot_recv_msgs`` line and compare it with the server's audit log.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from support.audit import required_workers, workers_seen
from support.interop import (
    HOST,
    HOST6,
    PASSWORD,
    UCLIENT_SUMMARY,
    USER,
    EchoPeer,
    ServeProcess,
    address_field,
    client_field,
    run_bounded,
    run_serve,
    run_uclient,
    turn_allocate,
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
LOST = re.compile(r"Total lost packets (\d+)")

MODES = {
    "udp-channels": [],
    "udp-send-indications": ["-s"],
    "tcp-channels": ["-t"],
    "tls-channels": ["-t", "-S"],
    # Clients send to each other's relayed addresses: relay to relay through the server.
    "udp-client-to-client": ["-y"],
    # -x asks for an IPv6 relayed address; client, server, relay and peer are all on ::1.
    "udp-ipv6": ["-x"],
    "tls-ipv6": ["-t", "-S", "-x"],
    # The same through the pure-Python relay path (the others run the native one).
    "udp-channels-python": [],
    "udp-send-indications-python": ["-s"],
    "tcp-channels-python": ["-t"],
    "udp-ipv6-python": ["-x"],
}


@dataclass
class UclientRun:
    mode: str
    server: ServeProcess
    command: list[str]
    process: subprocess.Popen[bytes]
    output_path: Path
    started: float
    finished: tuple[int, str, float] | None = field(default=None, init=False)

    def result(self) -> tuple[int, str, float]:
        """Exit status, output and run time, waiting (bounded) for the client to finish; a
        run that ended on uclient's own channel draw is run again, alone."""
        if self.finished is None:
            self.finished = self._finish()
        return self.finished

    def _finish(self) -> tuple[int, str, float]:
        remaining = max(1.0, UCLIENT_TIMEOUT - (time.monotonic() - self.started))
        try:
            code = self.process.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
            code = -1
        output = self.output_path.read_text(errors="replace")
        if uclient_redrew_a_channel(code, output):
            code, output = run_uclient(self.command, UCLIENT_TIMEOUT)
        return code, output, time.monotonic() - self.started


@pytest.fixture(scope="module")
def uclient_runs(
    tmp_path_factory: pytest.TempPathFactory, echo_peer: EchoPeer, echo_peer6: EchoPeer
) -> Iterator[dict[str, UclientRun]]:
    """Every uclient mode at once, each against a server of its own.

    uclient spends seconds before and after sending; running the modes side by side keeps
    the module fast, and one server per mode keeps each audit log to one mode.
    """
    runs: dict[str, UclientRun] = {}
    servers: dict[str, tuple[ServeProcess, str, EchoPeer, list[str], Path]] = {}
    with contextlib.ExitStack() as stack:
        for mode, flags in MODES.items():
            tmp = tmp_path_factory.mktemp(mode)
            host, peer = (HOST6, echo_peer6) if "-x" in flags else (HOST, echo_peer)
            engine = "python" if mode.endswith("-python") else "native"
            server = stack.enter_context(
                run_serve(
                    tmp,
                    "--relay-engine",
                    engine,
                    hosts=[host],
                    wait_ready=False,
                    drain_timeout=0.2,
                )
            )
            servers[mode] = (server, host, peer, flags, tmp)
        for mode, (server, host, peer, flags, tmp) in servers.items():
            server.wait_ready()
            port = server.tls_port if "-S" in flags else server.port
            command = uclient_command(
                port,
                (peer.host, peer.port),
                *flags,
                "-z",
                "5",
                messages=MESSAGES,
                clients=CLIENTS,
                length=LENGTH,
                host=host,
            )
            output_path = tmp / "uclient.out"
            with open(output_path, "wb") as out:
                process = subprocess.Popen(
                    command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            stack.callback(_reap, process)
            runs[mode] = UclientRun(mode, server, command, process, output_path, time.monotonic())
        yield runs
        for run in runs.values():
            # Draining side by side rather than one after the other.
            run.server.terminate()


def _reap(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=5)


def wait_for_audit_packets(
    server: ServeProcess, expected: int, timeout: float = 5.0
) -> list[dict[str, Any]]:
    """Audit records once the relayed packets they count reach ``expected`` (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        records = server.audit_records()
        if sum(r["to_peers"]["packets"] for r in records) >= expected:
            return records
        if time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def test_stunclient_gets_its_reflexive_address(serve: ServeProcess) -> None:
    code, out = run_bounded(["turnutils_stunclient", "-p", str(serve.port), HOST], 15.0)
    assert code == 0, out
    found = re.findall(r"UDP reflexive addr: ([0-9.]+):(\d+)", out)
    assert found, out
    assert {ip for ip, _ in found} == {HOST}
    assert all(0 < int(port) < 65536 for _, port in found)


@pytest.mark.parametrize("mode", list(MODES))
def test_uclient_relays_everything(mode: str, uclient_runs: dict[str, UclientRun]) -> None:
    run = uclient_runs[mode]
    code, out, _ = run.result()
    assert code == 0, out
    engine = "python" if mode.endswith("-python") else "native"
    assert any(f"relay path: {engine}" in line for line in run.server.startup), run.server.startup
    summaries = SUMMARY.findall(out)
    assert summaries, out
    sent, received = (int(n) for n in summaries[-1])
    assert sent == MESSAGES * CLIENTS, out
    assert received == sent, out
    lost = LOST.findall(out)
    assert lost and int(lost[-1]) == 0, out

    # The server's own count: every message went to the peer and every echo back.
    protocol = mode.split("-")[0]
    host = run.server.host
    client_prefix = protocol + ":" + address_field((host, 0)).rsplit(":", 1)[0] + ":"
    records = wait_for_audit_packets(run.server, sent)
    relayed = [r for r in records if r["to_peers"]["packets"]]
    assert relayed, run.server.log_text()
    assert all(r["client"].startswith(client_prefix) for r in relayed), relayed
    assert all(r["user"] == USER for r in relayed)
    assert all(r["peers"] == [host] for r in relayed)
    assert sum(r["to_peers"]["packets"] for r in relayed) == sent
    assert sum(r["to_client"]["packets"] for r in relayed) == received
    assert sum(r["to_peers"]["bytes"] for r in relayed) == sent * LENGTH
    assert sum(r["to_client"]["bytes"] for r in relayed) == received * LENGTH
    low, high = run.server.min_port, run.server.max_port
    for record in records:
        for relay in record["relay"]:
            port = int(relay.rsplit(":", 1)[1])
            assert relay == address_field((host, port)) and low <= port <= high, record


async def test_wrong_password_is_refused_and_server_keeps_serving(
    fresh_serve: ServeProcess, tmp_path: Path
) -> None:
    code, out = run_bounded(
        uclient_command(
            fresh_serve.port, (HOST, 9), "-c", messages=5, clients=1, password="not-" + PASSWORD
        ),
        UCLIENT_TIMEOUT,
    )
    assert code != 0, out
    assert "Cannot complete Allocation" in out, out
    assert "tot_send_msgs" not in out, out

    # Right after, a client with the right password allocates and relays.
    async with udp_echo_server() as (echo, peer):
        client = await turn_allocate(fresh_serve)
        assert await client.echo(b"still serving", peer) == b"still serving"
        await client.close()
    assert echo.received == [(b"still serving", client.relayed)]

    mapped = client.mapped
    assert fresh_serve.stop() == 0
    # The only allocation the server ever made is the good client's.
    records = fresh_serve.audit_records()
    assert [r["client"] for r in records] == [
        client_field("udp", mapped, (HOST, fresh_serve.port))
    ], records


def test_uclient_allocations_land_on_every_worker(uclient_runs: dict[str, UclientRun]) -> None:
    """Every server above runs the default worker count, one per core, and the kernel spreads
    uclient's sockets over the workers by their addresses and ports.

    Each mode makes at least four allocations on sockets of their own, which the kernel
    places independently: 28 over UDP, 16 over TCP and TLS together. With two workers, all of
    them on one would mean the other is not serving (by chance: 1 in 2**15); with more
    workers, as many as these numbers can tell (``required_workers``).
    """
    cores = len(os.sched_getaffinity(0))
    seen: dict[str, Counter[int]] = {}
    for mode, run in uclient_runs.items():
        code, out, _ = run.result()
        assert code == 0, out
        assert run.server.workers == cores, run.server.startup
        records = wait_for_audit_packets(run.server, MESSAGES * CLIENTS)
        kind = "udp" if mode.startswith("udp") else "stream"
        seen.setdefault(kind, Counter()).update(workers_seen(records, run.server.workers))
    assert set(seen) == {"udp", "stream"}
    independent = {"udp": 28, "stream": 16}
    for kind, workers in seen.items():
        assert set(workers) <= set(range(cores)), (kind, workers)
        assert len(workers) >= required_workers(cores, independent[kind]), (kind, workers)
