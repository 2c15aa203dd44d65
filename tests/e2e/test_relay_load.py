"""Relay-only calls between two browser pages, one after the other, over TURN/TCP and
TURN/TLS, while another process keeps loopback busy.

The server runs as users run it: the default worker count, a certificate (the page and
``turns:`` use it), a static user besides the page's own credentials, peers allowed on
127.0.0.1 only and a small relay range. The load: thousands of idle TCP connections held
open to a listener of its own and a steady UDP stream to a sink, both on loopback, from
``support/loopback_load.py``.

Every call must connect over the relay and the transport asked for, decode video and echo a
DataChannel message; the server's audit records of the call must show the packets relayed
each way. A call that fails does not stop the others: at the end the test fails with, for
each failed call, what the server logged meanwhile and what each page saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, BrowserContext, Page

from support.audit import relay_port, required_workers, warning_lines, workers_seen
from support.browser import ROOT, Server, chromium, run_server
from support.interop import relay_range
from tsunagu.tls import ensure_certificate

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(480)]

CALLS = 30
CONNECTIONS = 3000
UDP_RATE = 20000
LOAD_START_TIMEOUT = 60.0
JOIN_MS = 15_000
CONNECT_MS = 20_000
ECHO_MS = 10_000
FRAMES_WITHIN = 15.0
AUDIT_WITHIN = 10.0
RELAY_PORTS = 40
USER = "load:secret"

# Selected candidate pair, its two candidates, and every pair and candidate, from getStats.
STATS_JS = """async (peerId) => {
    const pc = window.tsunagu.peerConnection(peerId);
    if (!pc) return null;
    const report = await pc.getStats();
    const out = { pairs: [], candidates: [], transport: null };
    report.forEach((s) => {
        if (s.type === "candidate-pair") {
            out.pairs.push({ id: s.id, state: s.state, nominated: s.nominated,
                local: s.localCandidateId, remote: s.remoteCandidateId,
                sent: s.bytesSent, received: s.bytesReceived,
                requestsSent: s.requestsSent, responsesReceived: s.responsesReceived,
                requestsReceived: s.requestsReceived });
        } else if (s.type === "local-candidate" || s.type === "remote-candidate") {
            out.candidates.push({ id: s.id, kind: s.type, type: s.candidateType,
                address: s.address, port: s.port, protocol: s.protocol,
                relayProtocol: s.relayProtocol, url: s.url });
        } else if (s.type === "transport") {
            out.transport = { selected: s.selectedCandidatePairId, dtls: s.dtlsState,
                ice: s.iceState, selectedChanges: s.selectedCandidatePairChanges };
        }
    });
    return out;
}"""

# The answering side of the DataChannel echo: a negotiated channel (no renegotiation needed
# on a connection whose SCTP association is up) that sends back what it receives. Chromium
# may deliver the other side's first message before this side's channel has fired "open"
# (both were created on a live association; "open" is a task still queued), and send()
# throws until then: such an echo waits for "open".
ECHO_SERVER_JS = """(peerId) => {
    const pc = window.tsunagu.peerConnection(peerId);
    const channel = pc.createDataChannel("echo", { negotiated: true, id: 7 });
    channel.addEventListener("message", (event) => {
        if (channel.readyState === "open") channel.send(event.data);
        else channel.addEventListener("open", () => channel.send(event.data), { once: true });
    });
    window.echoChannel = channel;
    return channel.readyState;
}"""

ECHO_CLIENT_JS = """async ([peerId, text, ms]) => {
    const pc = window.tsunagu.peerConnection(peerId);
    const channel = pc.createDataChannel("echo", { negotiated: true, id: 7 });
    const within = (what, promise) => Promise.race([promise, new Promise((_, reject) =>
        setTimeout(() => reject(new Error(`${what}: channel ${channel.readyState}`)), ms))]);
    if (channel.readyState !== "open") {
        await within("not open", new Promise((resolve) =>
            channel.addEventListener("open", resolve, { once: true })));
    }
    const echoed = new Promise((resolve) =>
        channel.addEventListener("message", (event) => resolve(event.data), { once: true }));
    channel.send(text);
    return await within("no echo", echoed);
}"""


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, given to the server as an operator's ``--cert``
    (made by tsunagu's own generator, in a directory the server does not use)."""
    material = ensure_certificate(None, None, ["127.0.0.1"], directory / "operator-tls")
    return material.cert_path, material.key_path


@dataclass
class LoopbackLoad:
    process: subprocess.Popen[bytes]
    output: Path

    def status(self) -> str:
        lines = self.output.read_text(errors="replace").splitlines()
        return lines[-1] if lines else "(nothing yet)"


@contextlib.contextmanager
def loopback_load(tmp: Path) -> Iterator[LoopbackLoad]:
    """Start the load generator, wait (bounded) until its connections are up, stop it by PID."""
    output = tmp / "load.out"
    with open(output, "wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "support" / "loopback_load.py"),
                "--connections",
                str(CONNECTIONS),
                "--udp-rate",
                str(UDP_RATE),
                "--duration",
                "600",
            ],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    load = LoopbackLoad(process, output)
    try:
        deadline = time.monotonic() + LOAD_START_TIMEOUT
        while "ready " not in output.read_text(errors="replace"):
            assert process.poll() is None, output.read_text(errors="replace")
            assert time.monotonic() < deadline, "load did not start in time"
            time.sleep(0.1)
        assert f"ready connections={CONNECTIONS} " in output.read_text(), output.read_text()
        yield load
    finally:
        assert process.stdin is not None
        process.stdin.close()  # the generator stops when its input ends
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.fixture
def load_server(tmp_path: Path) -> Iterator[Server]:
    cert, key = make_certificate(tmp_path)
    low, high = relay_range(RELAY_PORTS)
    with run_server(
        tmp_path,
        "--ice-transport-policy",
        "relay",
        "--cert",
        str(cert),
        "--pkey",
        str(key),
        "--user",
        USER,
        "--min-port",
        str(low),
        "--max-port",
        str(high),
    ) as server:
        yield server


@dataclass
class Call:
    """One call's two pages and what is needed to explain a failure."""

    transport: str
    number: int
    log_start: int
    contexts: list[BrowserContext] = field(default_factory=list)
    pages: list[Page] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    relay_ports: set[int] = field(default_factory=set)
    peer_ids: list[str] = field(default_factory=list)
    connect_seconds: float = 0.0
    notes: Counter[str] = field(default_factory=Counter)

    @property
    def room(self) -> str:
        return f"load-{self.transport}-{self.number}"


async def open_page(browser: Browser, call: Call, server: Server, name: str) -> Page:
    context = await browser.new_context()
    call.contexts.append(context)
    page = await context.new_page()
    call.pages.append(page)
    page.on("console", lambda m: call.console.append(f"{name} {m.type}: {m.text}"))
    page.on("pageerror", lambda e: call.console.append(f"{name} page error: {e}"))
    # A second signaling WebSocket is a reconnection (the page resumes its seat).
    page.on("websocket", lambda ws: call.notes.update({"signaling sockets": 1}))
    await page.goto(f"{server.base}/r/{call.room}?name={name}&transport={call.transport}")
    await page.wait_for_function("() => window.tsunagu?.state?.().joined", timeout=JOIN_MS)
    return page


async def wait_video(page: Page) -> dict[str, Any]:
    """The page's stats once it decoded video from its one peer (bounded)."""
    deadline = time.monotonic() + FRAMES_WITHIN
    stats: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        stats = await page.evaluate("window.tsunagu.stats()")
        if len(stats) == 1 and stats[0]["framesDecoded"] > 0:
            return stats[0]
        await asyncio.sleep(0.2)
    raise AssertionError(f"no video frames decoded: {stats}")


async def run_call(browser: Browser, server: Server, call: Call) -> None:
    a = await open_page(browser, call, server, "A")
    b = await open_page(browser, call, server, "B")
    joined = time.monotonic()
    connected = """() => {
        const peers = window.tsunagu.peers();
        return peers.length === 1 && peers[0].connectionState === "connected";
    }"""
    await asyncio.gather(
        a.wait_for_function(connected, timeout=CONNECT_MS),
        b.wait_for_function(connected, timeout=CONNECT_MS),
    )
    call.connect_seconds = time.monotonic() - joined
    for page in (a, b):
        (peer,) = await page.evaluate("window.tsunagu.peers()")
        call.peer_ids.append(peer["id"])
        # What the negotiation went through on the way, for the summary.
        call.notes["offer collisions"] += sum("collision" in e for e in peer["events"])
        call.notes["candidate errors"] += len(peer["candidateErrors"])
        call.notes["ICE restarts"] += peer["restarts"]
        call.notes["renewed connections"] += peer["renewals"]
    for page in (a, b):
        stats = await wait_video(page)
        local, remote = stats["local"], stats["remote"]
        assert stats["path"]["kind"] == "relay", stats
        assert local["type"] == "relay" and remote["type"] == "relay", stats
        assert local["relayProtocol"] == call.transport, stats
        call.relay_ports.add(int(local["port"]))
    text = f"echo {call.room}"
    assert await b.evaluate(ECHO_SERVER_JS, call.peer_ids[1]) in ("connecting", "open")
    echoed = await a.evaluate(ECHO_CLIENT_JS, [call.peer_ids[0], text, ECHO_MS])
    assert echoed == text


async def page_report(page: Page) -> str:
    parts = []
    for expression in (
        "window.tsunagu.state()",
        "window.tsunagu.peers()",
        "window.tsunagu.diagnostics()",
        "window.tsunagu.stats()",
    ):
        try:
            parts.append(f"{expression}: {await page.evaluate(expression)!r}")
        except Exception as exc:  # the page may be gone; report what we can
            parts.append(f"{expression}: unavailable: {exc}")
    try:
        peers = await page.evaluate("window.tsunagu.peers()")
        for peer in peers:
            parts.append(f"getStats {peer['id']}: {await page.evaluate(STATS_JS, peer['id'])!r}")
    except Exception as exc:
        parts.append(f"getStats unavailable: {exc}")
    return "\n".join(parts)


async def close_call(call: Call) -> None:
    for context in call.contexts:
        with contextlib.suppress(Exception):
            await context.close()


async def call_audit(server: Server, call: Call) -> list[dict[str, Any]]:
    """The audit records logged since the call started, once the call's are there (bounded):
    those of the relayed ports it used, or two if it did not get that far."""

    def complete(records: list[dict[str, Any]]) -> bool:
        if call.relay_ports:
            return call.relay_ports <= {relay_port(r) for r in records if r["relay"]}
        return len(records) >= 2

    deadline = time.monotonic() + AUDIT_WITHIN
    records = server.audit_records(call.log_start)
    while not complete(records) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        records = server.audit_records(call.log_start)
    return records


@pytest.mark.parametrize("transport", ["tcp", "tls"])
async def test_relayed_calls_under_loopback_load(
    load_server: Server, tmp_path: Path, transport: str
) -> None:
    server = load_server
    assert server.spki, server.output
    assert server.workers >= 1
    failures: list[str] = []
    records_by_call: list[list[dict[str, Any]]] = []
    connects: list[float] = []
    notes: Counter[str] = Counter()
    with loopback_load(tmp_path) as load:
        async with chromium(f"--ignore-certificate-errors-spki-list={server.spki}") as browser:
            started = time.monotonic()
            for number in range(CALLS):
                call = Call(transport, number, server.log_size())
                error: BaseException | None = None
                report = ""
                try:
                    await run_call(browser, server, call)
                except Exception as exc:
                    error = exc
                    report = "\n".join([await page_report(page) for page in call.pages])
                await close_call(call)
                # Each page held one allocation over its own connection; closing the page
                # closes the connection, and the allocation ends with it.
                records = await call_audit(server, call)
                records_by_call.append(records)
                if error is None:
                    relayed = [r for r in records if relay_port(r) in call.relay_ports]
                    # Others, if any, are allocations a negotiation made and dropped (an
                    # offer collision under load rolls one back); the summary counts them.
                    call.notes["unused allocations"] += len(records) - len(relayed)
                    try:
                        assert len(relayed) == 2, records
                        for record in relayed:
                            assert record["client"].startswith(f"{transport}:127.0.0.1:"), record
                            assert record["peers"] == ["127.0.0.1"], record
                            assert not record.get("refused"), record
                            assert record["to_peers"]["packets"] > 0, record
                            assert record["to_client"]["packets"] > 0, record
                    except AssertionError as exc:
                        error = exc
                notes.update(call.notes)
                if error is None:
                    connects.append(call.connect_seconds)
                else:
                    log = server.log_text(call.log_start)
                    failures.append(
                        f"--- call {number} ({call.room}) failed: {error!r}\n"
                        f"load: {load.status()}\n"
                        f"server log during the call:\n{log}"
                        f"server warnings: {warning_lines(log)}\n"
                        f"console:\n" + "\n".join(call.console) + f"\npages:\n{report}\n"
                    )
            elapsed = time.monotonic() - started
        load_status = load.status()
    slowest = max(connects, default=0.0)
    notes["signaling reconnects"] = notes.pop("signaling sockets", 0) - 2 * CALLS
    sys.stdout.write(
        f"{transport}: {CALLS} calls in {elapsed:.1f} s, {len(failures)} failed,"
        f" slowest connect {slowest:.2f} s; {dict(notes)}; load: {load_status}\n"
    )
    assert not failures, f"{len(failures)} of {CALLS} calls failed:\n" + "\n".join(failures)
    # The kernel spreads the browsers' connections over the workers: 60 allocations, all on
    # one of two workers only if the other does not serve (by chance: 1 in 2**59).
    assert server.workers == len(os.sched_getaffinity(0)), server.output
    records = [r for call_records in records_by_call for r in call_records]
    seen = workers_seen(records, server.workers)
    assert set(seen) <= set(range(server.workers)), seen
    assert len(seen) >= required_workers(server.workers, 2 * CALLS), seen
