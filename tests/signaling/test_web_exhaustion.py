"""What web clients can make a real ``tsunagu serve`` spend, and that it stays bounded.

Each test runs against one ``tsunagu serve`` subprocess with the default limits (on this
machine they follow from its open files limit: the server logs them at start). Loopback has
the whole of 127.0.0.0/8, so "many client addresses" are 127.x.y.z source addresses. The
WebSocket clients here are raw sockets, so that a test decides exactly what is read and when.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aioice.turn
import pytest

from support.browser import Server, browser_joins, run_server
from support.interop import Collector

pytestmark = pytest.mark.timeout(180)

USER, PASSWORD = "alice", "secret"
log = logging.getLogger("tests.web_exhaustion")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(tmp_path_factory.mktemp("web-limits"), "-u", f"{USER}:{PASSWORD}") as running:
        yield running


def caps(server: Server) -> dict[str, int]:
    """The limits the server logged at start."""
    match = re.search(
        r"web: at most (\d+) connections \((\d+) per address\), (\d+) WebSockets \((\d+) per",
        server.log_text(),
    )
    assert match is not None, server.log_text()[-2000:]
    total, per_address, sockets, sockets_per_address = map(int, match.groups())
    return {
        "connections": total,
        "per_address": per_address,
        "websockets": sockets,
        "websockets_per_address": sockets_per_address,
    }


def server_pids(server: Server) -> list[int]:
    """Worker 0 (web and TURN) and its TURN worker processes."""
    pid = server.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *map(int, children)]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match is not None
    return int(match.group(1))


async def http_get(server: Server, path: str, source: str = "127.0.0.1") -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", server.web_port, local_addr=(source, 0)
    )
    try:
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        writer.write(request.encode())
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    return status, data


async def turn_allocate_udp(server: Server) -> tuple[str, int]:
    transport, _ = await asyncio.wait_for(
        aioice.turn.create_turn_endpoint(
            Collector,
            server_addr=("127.0.0.1", server.turn_port),
            username=USER,
            password=PASSWORD,
            transport="udp",
        ),
        10,
    )
    try:
        relayed: tuple[str, int] = transport.get_extra_info("sockname")
        return relayed
    finally:
        transport.close()


# --- a raw WebSocket client ---------------------------------------------------------------


class RawSocket:
    """A WebSocket client that reads only when told to (``pump``) and answers pings then."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: str):
        self.reader = reader
        self.writer = writer
        self.head = head
        self.messages: list[dict[str, Any]] = []
        self.closed = False

    @classmethod
    async def connect(
        cls,
        server: Server,
        source: str = "127.0.0.1",
        *,
        extensions: str | None = None,
        rcvbuf: int | None = None,
    ) -> RawSocket | int:
        """An open WebSocket, or the HTTP status that refused it (0: the connection died)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        sock.bind((source, 0))
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", server.web_port)), 10)
            reader, writer = await asyncio.open_connection(sock=sock)
        except (OSError, TimeoutError):
            sock.close()
            return 0
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{server.web_port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        )
        if extensions:
            request += f"Sec-WebSocket-Extensions: {extensions}\r\n"
        try:
            writer.write((request + "\r\n").encode())
            head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode()
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            writer.close()
            return 0
        status = int(head.split(" ", 2)[1])
        if status != 101:
            writer.close()
            return status
        return cls(reader, writer, head)

    def send(self, message: dict[str, Any]) -> None:
        self._frame(0x1, json.dumps(message).encode())

    def _frame(self, opcode: int, payload: bytes) -> None:
        # A client must mask its frames; an all-zero key is a valid mask that leaves the
        # payload as it is (and keeps this client cheap enough to flood with).
        mask = b"\0\0\0\0"
        size = len(payload)
        if size < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
        elif size < 65536:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
        self.writer.write(header + mask + payload)

    def pong(self) -> None:
        """An unsolicited pong: keeps the server's heartbeat content without reading."""
        self._frame(0xA, b"")

    async def pump(self, until: str | None = None, timeout: float = 10.0) -> dict[str, Any] | None:
        """Read frames (answering pings) until a message of type ``until`` or the close."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    first, second = await self.reader.readexactly(2)
                    size = second & 0x7F
                    if size == 126:
                        (size,) = struct.unpack("!H", await self.reader.readexactly(2))
                    elif size == 127:
                        (size,) = struct.unpack("!Q", await self.reader.readexactly(8))
                    payload = await self.reader.readexactly(size)
                    opcode = first & 0x0F
                    if opcode == 0x9:
                        self._frame(0xA, payload)
                    elif opcode == 0x8:
                        self.closed = True
                        return None
                    elif opcode == 0x1:
                        message = json.loads(payload)
                        self.messages.append(message)
                        if until is not None and message.get("type") == until:
                            return message
        except (OSError, asyncio.IncompleteReadError):
            self.closed = True
            return None

    async def join(self, room: str, name: str = "Flood") -> dict[str, Any] | None:
        self.send({"type": "join", "v": 1, "room": room, "name": name})
        return await self.pump("joined")

    def close(self) -> None:
        self.writer.transport.abort()


# --- (a) slow HTTP headers ------------------------------------------------------------------


async def test_slow_headers_are_capped_closed_in_time_and_starve_nothing(server: Server) -> None:
    limits = caps(server)
    pids = server_pids(server)
    before = {pid: open_fds(pid) for pid in pids}
    attempts = 2 * limits["per_address"] + 100
    source = "127.0.0.2"
    loop = asyncio.get_running_loop()
    opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    started = time.monotonic()
    for _ in range(attempts):
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", server.web_port, local_addr=(source, 0)
            )
        except OSError:
            continue
        # Half a request: the request line and one header, never the blank line.
        writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        opened.append((reader, writer))

    async def lifetime(reader: asyncio.StreamReader) -> float:
        with contextlib.suppress(OSError):
            await reader.read()
        return loop.time()

    ends = [asyncio.create_task(lifetime(reader)) for reader, _ in opened]
    await asyncio.sleep(2.0)
    alive = sum(not end.done() for end in ends)
    assert alive <= limits["per_address"], (
        f"{alive} of {attempts} half-sent requests from one address still open after 2 s; "
        f"the cap per address is {limits['per_address']}"
    )
    assert alive >= limits["per_address"] // 2, f"only {alive} half-sent requests were let in"

    # Meanwhile another address is served, and TURN allocates.
    status, body = await http_get(server, "/")
    assert status == 200 and b"<html" in body.lower(), f"GET / answered {status}"
    relayed = await turn_allocate_udp(server)
    assert relayed[0] == "127.0.0.1", relayed
    fds = {pid: open_fds(pid) for pid in pids}
    grown = fds[pids[0]] - before[pids[0]]
    assert grown <= limits["per_address"] + 16, (
        f"worker 0 holds {fds[pids[0]]} descriptors ({grown} more than before) with "
        f"{alive} slow clients; the web's share is {limits['connections']}"
    )
    assert all(fds[pid] - before[pid] <= 16 for pid in pids[1:]), (before, fds)
    # And a browser joins a room and gets its TURN credentials.
    state = await browser_joins(server.base, "during-slow-headers")
    assert state["turnUsername"].endswith(":" + state["id"]), state

    # Every half-sent request is closed by the header timeout (10 s), none much later.
    done, pending = await asyncio.wait(ends, timeout=15.0)
    for _, writer in opened:
        writer.transport.abort()
    assert not pending, f"{len(pending)} half-sent requests still open at 17 s"
    latest = max(end.result() for end in done) - started
    log.info(
        "slow headers: %d held of %d, worker 0 fds +%d, last closed at %.1f s",
        alive,
        attempts,
        grown,
        latest,
    )
    assert latest < 14.0, f"the last half-sent request was closed {latest:.1f} s after it opened"


# --- (b) a signaling reader that never reads ------------------------------------------------


async def test_reader_that_never_reads_costs_bounded_memory(server: Server) -> None:
    pairs = 32
    pid = server.process.pid
    source = "127.0.0.3"
    before = rss_kib(pid)
    peak = before
    senders: list[RawSocket] = []
    sleepers: list[tuple[RawSocket, str]] = []
    for index in range(pairs):
        room = f"sleepy-{index}"
        sender = await RawSocket.connect(server, source)
        sleeper = await RawSocket.connect(server, source, rcvbuf=4096)
        assert isinstance(sender, RawSocket) and isinstance(sleeper, RawSocket), (sender, sleeper)
        assert await sender.join(room, "Sender") is not None
        joined = await sleeper.join(room, "Sleeper")
        assert joined is not None
        senders.append(sender)
        sleepers.append((sleeper, joined["id"]))
    # Offers as large as a frame may be, as fast as the rate limit lets them through.
    # JSON spells each CR LF in four bytes: this offer's frame is just under 24 KiB.
    sdp = "v=0\r\n" + "a=x\r\n" * ((24 * 1024 - 200) // 7)
    sent = 0
    deadline = time.monotonic() + 40.0
    last_pong = 0.0

    def dropped() -> list[bool]:
        return [
            any(m.get("type") == "peer-left" or m.get("code") == "unknown-peer" for m in s.messages)
            for s in senders
        ]

    while time.monotonic() < deadline and sent < 600 and not all(dropped()):
        if time.monotonic() - last_pong > 1.0:
            # The sleepers never read, but answer the heartbeat blindly.
            last_pong = time.monotonic()
            for sleeper, _ in sleepers:
                sleeper.pong()
        for _ in range(4):
            for sender, (_, peer_id) in zip(senders, sleepers, strict=True):
                sender.send({"type": "offer", "to": peer_id, "sdp": sdp})
        sent += 4
        await asyncio.gather(*(sender.pump(timeout=0.05) for sender in senders))
        peak = max(peak, rss_kib(pid))
        await asyncio.sleep(0.05)
    health = json.loads((await http_get(server, "/healthz"))[1].split(b"\r\n\r\n", 1)[1])
    gone = dropped()
    growth = (peak - before) / 1024
    log.info(
        f"never-reading peers: {pairs} pairs, {sent} offers of {len(sdp)} B each, "
        f"RSS peak +{growth:.1f} MiB, {sum(gone)} sleepers dropped"
    )
    for sender in senders:
        sender.close()
    for sleeper, _ in sleepers:
        sleeper.close()
    assert growth < 96, f"worker 0 grew by {growth:.1f} MiB for {pairs} pairs (before: 649 MiB)"
    assert all(gone), f"{gone.count(False)} of {pairs} never-reading peers were not dropped"
    cut = server.log_text().count("cannot keep up; dropping it")
    assert cut >= pairs, f"only {cut} connections were cut for not reading"
    assert health["connections"] <= 2 * pairs, health


# --- (c) a connection flood from 64 addresses ------------------------------------------------


async def test_flood_from_64_addresses_leaves_room_for_others(server: Server) -> None:
    limits = caps(server)
    held: list[RawSocket] = []
    pumps: list[asyncio.Task[Any]] = []
    refused: dict[int, int] = {}

    async def flood(address: str) -> None:
        for index in range(limits["websockets_per_address"] + 8):
            ws = await RawSocket.connect(server, address)
            if not isinstance(ws, RawSocket):
                refused[ws] = refused.get(ws, 0) + 1
                return
            if await ws.join(f"flood-{address.replace('.', '-')}-{index // 8}") is None:
                refused[-1] = refused.get(-1, 0) + 1
                return
            held.append(ws)
            # Answer the server's heartbeat, like a browser would, for as long as it lasts.
            pumps.append(asyncio.create_task(ws.pump(timeout=120)))

    started = time.monotonic()
    await asyncio.gather(*(flood(f"127.0.1.{host}") for host in range(1, 65)))
    took = time.monotonic() - started
    # Someone from another address opens the page, connects and joins.
    status, _ = await http_get(server, "/r/after-the-flood", "127.0.2.1")
    ws = await RawSocket.connect(server, "127.0.2.1")
    joined = None if not isinstance(ws, RawSocket) else await ws.join("after-the-flood", "Ada")
    state = await browser_joins(server.base, "during-the-flood")
    log.info(
        f"flood: 64 addresses hold {len(held)} WebSockets (cap {limits['websockets']}), "
        f"refusals {refused}, {took:.1f} s; newcomer page {status}, joined {joined is not None}"
    )
    for sock in held:
        sock.close()
    for pump in pumps:
        pump.cancel()
    assert status == 200, f"the page answered {status} with {len(held)} flood connections open"
    assert joined is not None and joined.get("resumed") is False, (
        f"a newcomer could not join while 64 addresses held {len(held)} WebSockets: {ws!r}"
    )
    assert state["turnUsername"].endswith(":" + state["id"]), state
    assert isinstance(ws, RawSocket)
    ws.close()
    assert len(held) <= limits["websockets"], f"{len(held)} WebSockets open"


# --- (d) no permessage-deflate ---------------------------------------------------------------


async def test_permessage_deflate_is_not_negotiated(server: Server) -> None:
    ws = await RawSocket.connect(server, extensions="permessage-deflate; client_max_window_bits")
    assert isinstance(ws, RawSocket), f"the upgrade was refused: {ws}"
    ws.close()
    assert "sec-websocket-extensions" not in ws.head.lower(), ws.head
