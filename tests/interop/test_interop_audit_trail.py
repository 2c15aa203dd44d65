"""The audit trail of a call, in its own file (``--audit-file``), against ``tsunagu serve``.

A person joins a room over the signaling WebSocket and relays through TURN with the
credentials joining gave them (aioice), then leaves. The audit file holds, as JSON lines,
who joined which room, the allocation's creation and end under the same user id (with the
relayed address, peers and bytes), and when they left; the server's log holds none of it.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import aioice.turn
import pytest

from support.browser import run_server
from support.interop import Collector, udp_echo_server

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90)]


async def test_a_call_can_be_followed_in_the_audit_file(tmp_path: Path) -> None:
    audit_file = tmp_path / "audit.jsonl"
    with run_server(tmp_path, "--audit-file", str(audit_file)) as server:
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"{server.base}/ws")
            await ws.send_json({"type": "join", "v": 1, "room": "audited", "name": "Ada"})
            joined = await asyncio.wait_for(ws.receive_json(), 5)
            turn = joined["turn"]
            async with udp_echo_server() as (_, echo):
                relay, app = await asyncio.wait_for(
                    aioice.turn.create_turn_endpoint(
                        Collector,
                        server_addr=("127.0.0.1", server.turn_port),
                        username=turn["username"],
                        password=turn["password"],
                        transport="udp",
                    ),
                    10,
                )
                relay.sendto(b"hello", echo)
                assert (await app.next(5))[0] == b"hello"
                relay.close()
                await asyncio.wait_for(app.closed.wait(), 5)
            await ws.close()
            await asyncio.sleep(1.5)  # the hub notices the close; then the server stops
        log = server.log_text()
    lines = audit_file.read_text().splitlines()
    records: list[dict[str, Any]] = [json.loads(line) for line in lines]
    assert all("time" in r and "event" in r for r in records), records
    peer, user = joined["id"], turn["username"]
    by_event = {r["event"]: r for r in records if r.get("peer") == peer or r.get("user") == user}
    assert set(by_event) == {
        "peer-joined",
        "allocation-created",
        "allocation-ended",
        "peer-left",
    }, records
    assert by_event["peer-joined"]["room"] == "audited" and by_event["peer-joined"]["user"] == peer
    assert by_event["peer-left"]["room"] == "audited" and by_event["peer-left"]["duration"] > 0
    created, ended = by_event["allocation-created"], by_event["allocation-ended"]
    assert user.endswith(":" + peer)  # the TURN user names the peer who joined the room
    assert created["relay"] == ended["relay"] and ended["to_peers"]["bytes"] >= 5, ended
    assert ended["peers"], ended
    order = [r["event"] for r in records if r.get("peer") == peer or r.get("user") == user]
    assert order.index("peer-joined") < order.index("allocation-created")
    assert order.index("allocation-created") < order.index("allocation-ended")
    assert "tsunagu.audit" not in log, "audit records went to the log too"
