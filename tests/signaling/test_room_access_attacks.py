"""Getting a TURN relay or into a room without being invited, against a real ``tsunagu serve``.

The server runs its defaults (on loopback: rooms open to whoever reaches the page, no API
key). Each attack is bounded in count and time; after it, a legitimate person still joins a
room, gets TURN credentials over the WebSocket and relays with them (aioice over UDP and
TCP), and the server's memory and descriptors have not grown past a stated bound.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import aioice.turn
import pytest

from support.browser import Server, browser_joins, chromium, run_server
from support.interop import Collector, udp_echo_server

pytestmark = pytest.mark.timeout(180)

RSS_GROWTH_KIB = 20 * 1024
FD_GROWTH = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(tmp_path_factory.mktemp("room-access")) as running:
        yield running


def footprint(server: Server) -> tuple[int, int]:
    """(RSS in KiB, open descriptors) of the server and its worker processes."""
    pid = server.process.pid
    pids = [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]
    rss = fds = 0
    for p in pids:
        match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{p}/status").read_text())
        assert match is not None
        rss += int(match.group(1))
        fds += len(os.listdir(f"/proc/{p}/fd"))
    return rss, fds


def session(source: str = "127.0.0.1") -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source, 0)))


async def join(
    http: aiohttp.ClientSession, server: Server, room: str, name: str = "Ada", **extra: Any
) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]:
    ws = await http.ws_connect(f"{server.base}/ws")
    await ws.send_json({"type": "join", "v": 1, "room": room, "name": name, **extra})
    message = await asyncio.wait_for(ws.receive_json(), 5)
    return ws, message


async def still_served(server: Server, room: str) -> None:
    """A person joins, and relays over UDP and TCP with the credentials joining gave them."""
    async with session() as http:
        ws, joined = await join(http, server, room, "Legit")
        assert joined["type"] == "joined", joined
        turn = joined["turn"]
        assert turn["username"].endswith(":" + joined["id"]), turn
        async with udp_echo_server() as (_, echo_address):
            for transport in ("udp", "tcp"):
                relay, app = await asyncio.wait_for(
                    aioice.turn.create_turn_endpoint(
                        Collector,
                        server_addr=("127.0.0.1", server.turn_port),
                        username=turn["username"],
                        password=turn["password"],
                        transport=transport,
                    ),
                    10,
                )
                try:
                    relay.sendto(b"ping " + transport.encode(), echo_address)
                    data, _ = await app.next(5)
                    assert data == b"ping " + transport.encode()
                finally:
                    relay.close()
        await ws.close()
    state = await browser_joins(server.base, f"{room}-page", "Browser")
    assert state["turnUsername"].endswith(":" + state["id"]), state


async def test_no_credential_without_joining_a_room(server: Server) -> None:
    before = footprint(server)
    started = time.monotonic()
    statuses: Counter[int] = Counter()
    leaked = 0
    async with session() as http:
        for i in range(300):
            async with http.get(
                f"{server.base}/api/turn-credentials?service=turn&username=u{i}"
            ) as resp:
                statuses[resp.status] += 1
                leaked += "password" in await resp.text()
        # Connections that never join hear nothing but the answers to their pings.
        sockets = [await http.ws_connect(f"{server.base}/ws") for _ in range(20)]
        for ws in sockets:
            await ws.send_json({"type": "ping"})
        heard = [await asyncio.wait_for(ws.receive_json(), 5) for ws in sockets]
        for ws in sockets:
            await ws.close()
    elapsed = time.monotonic() - started
    assert statuses == Counter({404: 300}) and leaked == 0, (
        f"{dict(statuses)} answers and {leaked} credentials for 300 requests in {elapsed:.1f} s"
    )
    assert all(message == {"type": "pong"} for message in heard), heard
    await still_served(server, "after-credential-hunt")
    rss, fds = footprint(server)
    assert rss - before[0] < RSS_GROWTH_KIB and fds - before[1] < FD_GROWTH, (before, (rss, fds))


async def test_pages_of_other_sites_cannot_use_the_websocket(server: Server) -> None:
    refused = 0
    async with session() as http:
        for origin in ("https://evil.example", "null", f"http://127.0.0.1:{server.web_port}.evil"):
            for _ in range(10):
                try:
                    ws = await http.ws_connect(f"{server.base}/ws", headers={"Origin": origin})
                except aiohttp.WSServerHandshakeError as exc:
                    refused += exc.status == 403
                else:
                    await ws.close()
    assert refused == 30, f"{refused} of 30 cross-site WebSockets refused with 403"
    await still_served(server, "after-cross-site")


async def test_room_passwords_cannot_be_guessed_at_speed(server: Server) -> None:
    before = footprint(server)
    async with session() as owner_http:
        owner, joined = await join(owner_http, server, "vault", "Owner", password="correct horse")
        assert joined["type"] == "joined"

        # One address, 100 guesses on fresh connections (each also costs it strikes).
        answers: Counter[str] = Counter()
        started = time.monotonic()
        async with session("127.0.0.2") as http:
            for i in range(100):
                ws, answer = await join(http, server, "vault", "Eve", password=f"guess-{i}")
                answers[answer.get("code", answer["type"])] += 1
                await ws.close()
        elapsed = time.monotonic() - started
        checked = answers["bad-password"]
        assert checked <= 10 + elapsed / 6 + 1 and answers["rate-limited"] >= 80, (
            f"one address: {dict(answers)} in {elapsed:.1f} s ({checked / elapsed:.1f} checked "
            "guesses/s)"
        )

        # Many addresses, one guess each: the room's own limit holds them all.
        answers = Counter()
        started = time.monotonic()
        for i in range(60):
            async with session(f"127.0.3.{i + 1}") as http:
                ws, answer = await join(http, server, "vault", "Eve", password=f"spread-{i}")
                answers[answer.get("code", answer["type"])] += 1
                await ws.close()
        elapsed = time.monotonic() - started
        room_checked = answers["bad-password"]
        assert room_checked <= 30 - checked + 0.5 * elapsed + 1, (
            f"60 addresses: {dict(answers)} in {elapsed:.1f} s"
        )

        # The owner was never disturbed, and someone with the password gets in shortly after.
        await owner.send_json({"type": "ping"})
        assert await asyncio.wait_for(owner.receive_json(), 5) == {"type": "pong"}
        deadline = time.monotonic() + 10
        async with session("127.0.4.1") as http:
            while True:
                ws, answer = await join(http, server, "vault", "Friend", password="correct horse")
                if answer["type"] == "joined" or time.monotonic() > deadline:
                    break
                assert answer["code"] == "rate-limited", answer
                await ws.close()
                await asyncio.sleep(1)
            assert answer["type"] == "joined", answer
            await ws.close()
        await owner.close()
    await still_served(server, "after-guessing")
    rss, fds = footprint(server)
    assert rss - before[0] < RSS_GROWTH_KIB and fds - before[1] < FD_GROWTH, (before, (rss, fds))


async def test_generated_room_names_carry_64_random_bits(server: Server) -> None:
    async with chromium() as browser:
        page = await (await browser.new_context()).new_page()
        await page.goto(f"{server.base}/")
        names = await page.evaluate(
            """async () => {
                const { randomRoomName } = await import("/static/js/common.js");
                return Array.from({ length: 200 }, () => randomRoomName());
            }"""
        )
    assert len(set(names)) == 200
    for name in names:
        tail = name.rsplit("-", 1)[1]
        assert re.fullmatch(r"[a-z2-7]{13}", tail), name  # 13 base32 characters: 65 bits
        assert len(name) <= 48, name
    counts = Counter("".join(n.rsplit("-", 1)[1] for n in names))
    assert len(counts) == 32, f"only {len(counts)} of 32 base32 characters seen"
    json.dumps(names)
