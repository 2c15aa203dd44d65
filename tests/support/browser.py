"""Helpers for the browser tests: a real ``tsunagu serve`` subprocess and a headless Chromium,
both on loopback only."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from playwright.async_api import Browser, Page, ProxySettings, async_playwright

from support.audit import audit_records, worker_count

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
]
START_TIMEOUT = 30.0
ROOT = Path(__file__).resolve().parents[2]


def port_free(port: int) -> bool:
    """``port`` on 127.0.0.1 is free for both TCP and UDP."""
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def free_ports(count: int, *, low: int = 20000, high: int = 32000) -> list[int]:
    """``count`` ports free for both TCP and UDP on 127.0.0.1 (the kernel picks the start)."""
    found: list[int] = []
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in found and port_free(port):
            found.append(port)
            if len(found) == count:
                return found
    raise RuntimeError("no free ports")


def relay_range(size: int = 200) -> tuple[int, int]:
    """A window of ports for relayed transport addresses that is currently unused."""
    for _ in range(50):
        (start,) = free_ports(1)
        start = max(1024, start - start % 100)
        if start + size <= 65535 and all(port_free(p) for p in range(start, start + size, 17)):
            return start, start + size - 1
    raise RuntimeError("no free relay range")


@dataclass
class Server:
    """A running ``tsunagu serve``; ``output`` holds what it printed so far.

    Its log (audit records included) goes to ``log_path``; worker processes inherit that
    file as their stderr, so it holds what every worker logged.
    """

    process: subprocess.Popen[bytes]
    web_port: int
    turn_port: int
    tls_port: int
    spki: str | None
    log_path: Path
    scheme: str = "http"
    output: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.host}:{self.web_port}"

    @property
    def workers(self) -> int:
        """How many worker processes serve TURN."""
        return worker_count(self.output)

    def log_text(self, start: int = 0) -> str:
        """What the server logged, from byte offset ``start`` on."""
        with open(self.log_path, "rb") as log:
            log.seek(start)
            return log.read().decode(errors="replace")

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def audit_records(self, start: int = 0) -> list[dict[str, Any]]:
        """The audit records of every worker, logged from byte offset ``start`` on."""
        return audit_records(self.log_text(start))


def _read_until_ready(process: subprocess.Popen[bytes], deadline: float) -> list[str]:
    """Lines printed by the server up to "tsunagu: ready" (raw reads: no hidden buffering)."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    data = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        chunk = os.read(fd, 65536) if ready else b""
        data += chunk
        lines = data.decode(errors="replace").splitlines(keepends=True)
        if any(line.strip() == "tsunagu: ready" for line in lines):
            return lines
        if ready and not chunk:
            process.wait(timeout=5)
            printed = "".join(lines)
            raise RuntimeError(f"tsunagu serve exited with {process.returncode}:\n{printed}")
    raise RuntimeError("tsunagu serve did not get ready in time:\n" + data.decode(errors="replace"))


def _drain(process: subprocess.Popen[bytes], sink: list[str]) -> None:
    assert process.stdout is not None
    with contextlib.suppress(OSError, ValueError):
        for raw in iter(process.stdout.readline, b""):
            sink.append(raw.decode(errors="replace"))


@contextlib.contextmanager
def run_server(
    tmp: Path, *extra: str, host: str = "127.0.0.1", wrap: Sequence[str] = ()
) -> Iterator[Server]:
    """``tsunagu serve`` on ``host`` (TURN, relay and web), its command run under ``wrap``
    (``ip netns exec NS``, say), with peers on ``host`` allowed."""
    web_port, turn_port, tls_port = free_ports(3)
    low, high = relay_range()
    command = [
        *wrap,
        sys.executable,
        "-m",
        "tsunagu",
        "serve",
        "--listening-ip",
        host,
        "--listening-port",
        str(turn_port),
        "--tls-listening-port",
        str(tls_port),
        "--min-port",
        str(low),
        "--max-port",
        str(high),
        "--web-ip",
        host,
        "--web-port",
        str(web_port),
        "--allowed-peer-ip",
        host,
        "--drain-timeout",
        "0",
        *extra,
    ]
    env = dict(os.environ, XDG_STATE_HOME=str(tmp / "state"), PYTHONUNBUFFERED="1")
    log_path = tmp / "serve.stderr"
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, env=env, cwd=ROOT)
    try:
        lines = _read_until_ready(process, time.monotonic() + START_TIMEOUT)
        match = re.search(r"\bspki (\S+)", "".join(lines))
        # HTTPS with --cert, and beyond loopback unless --web-plain-http: as serve says.
        web = re.search(r"web app on (https?)://", "".join(lines))
        scheme = web.group(1) if web else "http"
        spki = match and match.group(1)
        server = Server(process, web_port, turn_port, tls_port, spki, log_path, scheme, lines, host)
        # Keep draining stdout so that a chatty server never blocks on a full pipe.
        threading.Thread(target=_drain, args=(process, server.output), daemon=True).start()
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        if process.stdout is not None:
            process.stdout.close()
        log.close()


@contextlib.asynccontextmanager
async def chromium(
    *extra_args: str, executable: str = CHROMIUM, proxy: ProxySettings | None = None
) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=executable,
            headless=True,
            args=[*CHROMIUM_ARGS, *extra_args],
            proxy=proxy,
        )
        try:
            yield browser
        finally:
            await browser.close()


CONNECT_MS = 40_000
"""How long a room page may take to connect to its peers (ICE over TURN included)."""


async def wait_connected(page: Page, count: int, timeout: float = CONNECT_MS) -> None:
    """Wait until the room page on ``page`` has ``count`` peers, all connected."""
    await page.wait_for_function(
        """(n) => {
            const peers = window.tsunagu.peers();
            return peers.length === n && peers.every((p) => p.connectionState === "connected");
        }""",
        arg=count,
        timeout=timeout,
    )


async def browser_joins(base: str, room: str, name: str = "Visitor") -> dict[str, Any]:
    """A Chromium page opens ``base``'s room ``room`` and joins; its page state (ICE servers
    and the TURN username it was given included)."""
    async with chromium() as browser:
        page = await (await browser.new_context()).new_page()
        await page.goto(f"{base}/r/{room}?name={name}")
        await page.wait_for_function("() => window.tsunagu?.state?.().joined", timeout=15_000)
        state: dict[str, Any] = await page.evaluate("window.tsunagu.state()")
        return state


async def one_peer_video(page: Page) -> dict[str, Any]:
    """The room page's stats of its one peer once video frames from it were decoded
    (bounded wait: 30 s)."""
    stats: list[dict[str, Any]] = []
    for _ in range(60):
        stats = await page.evaluate("window.tsunagu.stats()")
        if len(stats) == 1 and stats[0]["framesDecoded"] > 0:
            return stats[0]
        await asyncio.sleep(0.5)
    raise AssertionError(f"no decoded frames: {stats}")
