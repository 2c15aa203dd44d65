"""The aiohttp application: WebSocket signaling, pages and the TURN REST endpoint."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient

from support.web_app import SECRET, WAIT, MakeClient, recv
from tsunagu.auth.rest import rest_password
from tsunagu.signaling.messages import MAX_MESSAGE_BYTES
from tsunagu.signaling.rooms import Limits

pytestmark = pytest.mark.timeout(30)


async def closed(ws: aiohttp.ClientWebSocketResponse) -> list[dict[str, Any]]:
    """Read until the server closes; return what came before the close."""
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(WAIT):
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.TEXT:
                seen.append(json.loads(msg.data))
            elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return seen


async def enter(
    client: TestClient[Any, Any], room: str, name: str, **extra: Any
) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]:
    ws = await client.ws_connect("/ws", autoping=extra.pop("autoping", True))
    await ws.send_json({"type": "join", "v": 1, "room": room, "name": name, **extra})
    return ws, await recv(ws)


async def test_two_clients_exchange_offer_answer_and_candidates(make_client: MakeClient) -> None:
    client = await make_client()
    a, ja = await enter(client, "standup", "Ada")
    assert ja["type"] == "joined" and ja["peers"] == [] and ja["v"] == 1
    turn = ja["iceServers"][1]
    assert turn["urls"][0] == "turn:127.0.0.1:3478?transport=udp"
    assert turn["credential"] == rest_password(SECRET, turn["username"])
    assert ja["turn"]["password"] == turn["credential"]

    b, jb = await enter(client, "standup", "Bo")
    assert jb["peers"] == [{"id": ja["id"], "name": "Ada"}]
    assert await recv(a) == {"type": "peer-joined", "id": jb["id"], "name": "Bo"}

    await b.send_json({"type": "offer", "to": ja["id"], "sdp": "v=0 offer", "from": "forged"})
    assert await recv(a) == {"type": "offer", "from": jb["id"], "sdp": "v=0 offer"}
    await a.send_json({"type": "answer", "to": jb["id"], "sdp": "v=0 answer"})
    assert await recv(b) == {"type": "answer", "from": ja["id"], "sdp": "v=0 answer"}
    cand = {"candidate": "candidate:1 1 udp 9 192.0.2.1 9 typ host", "sdpMid": "0"}
    await a.send_json({"type": "candidate", "to": jb["id"], "candidate": cand})
    got = await recv(b)
    assert got["from"] == ja["id"] and got["candidate"]["candidate"] == cand["candidate"]
    await a.send_json({"type": "candidate", "to": jb["id"], "candidate": None})
    assert (await recv(b))["candidate"] is None

    await a.send_json({"type": "chat", "text": "hello"})
    for ws in (a, b):
        chat = await recv(ws, "chat")
        assert chat["text"] == "hello" and chat["name"] == "Ada"

    await a.close()  # a close handshake: announced at once
    left = await recv(b)
    assert left == {"type": "peer-left", "id": ja["id"], "reason": "left"}
    await b.close()


async def test_hostile_client_gets_errors_then_1008_other_room_unaffected(
    make_client: MakeClient,
) -> None:
    client = await make_client()
    victim, jv = await enter(client, "alpha", "Victim")
    bystander, _ = await enter(client, "beta", "Bystander")
    hostile, jh = await enter(client, "beta", "Hostile")
    await recv(bystander, "peer-joined")

    await hostile.send_json({"type": "offer", "to": jv["id"], "sdp": "v=0 evil"})
    err = await recv(hostile)
    assert err["type"] == "error" and err["code"] == "unknown-peer"
    await hostile.send_json({"type": "chat", "text": "x", "room": "alpha"})
    assert (await recv(hostile))["code"] == "wrong-room"
    await hostile.send_str("x" * (28 * 1024))
    err = await recv(hostile)
    assert err["code"] == "too-large" and str(MAX_MESSAGE_BYTES) in err["message"]
    await hostile.send_bytes(b"\x00binary")
    assert (await recv(hostile))["code"] == "bad-message"
    for _ in range(20):
        if hostile.closed:
            break
        await hostile.send_str('{"type": "self-destruct"}')
    seen = await closed(hostile)
    assert seen and {m["code"] for m in seen} == {"unknown-type"}
    assert hostile.close_code == 1008

    # The room next door heard nothing; the hostile one's own room heard it leave.
    left = await recv(bystander)
    assert left == {"type": "peer-left", "id": jh["id"], "reason": "left"}
    await bystander.send_json({"type": "ping"})
    assert await recv(bystander) == {"type": "pong"}
    await victim.send_json({"type": "ping"})
    assert await recv(victim) == {"type": "pong"}
    for ws in (victim, bystander):
        await ws.close()


async def test_flood_closes_with_1008(make_client: MakeClient) -> None:
    client = await make_client()
    ws, joined = await enter(client, "flood", "F")
    for _ in range(600):
        if ws.closed:
            break
        await ws.send_json({"type": "ping"})
    seen = await closed(ws)
    assert "rate-limited" in {m.get("code") for m in seen}
    assert ws.close_code == 1008


async def test_frame_beyond_hard_cap_is_closed(make_client: MakeClient) -> None:
    client = await make_client()
    ws, _ = await enter(client, "big", "B")
    await ws.send_str("x" * (2 * 1024 * 1024))
    await closed(ws)
    assert ws.close_code == 1009


async def test_vanished_peer_is_announced_by_heartbeat(make_client: MakeClient) -> None:
    client = await make_client(heartbeat=0.3, resume_grace=0.3)
    a, _ = await enter(client, "hb", "Alive")
    # autoping off: this client never answers the server's pings, like a dead network.
    ghost, jg = await enter(client, "hb", "Ghost", autoping=False)
    await recv(a, "peer-joined")
    loop = asyncio.get_running_loop()
    start = loop.time()
    left = await recv(a, "peer-left")
    assert left == {"type": "peer-left", "id": jg["id"], "reason": "timeout"}
    assert 0.3 <= loop.time() - start < 3.0
    await a.close()
    await ghost.close()


async def test_dropped_peer_resumes_without_others_noticing(make_client: MakeClient) -> None:
    client = await make_client(heartbeat=5.0, resume_grace=3.0)
    a, ja = await enter(client, "resume", "Ada")
    b, jb = await enter(client, "resume", "Bo")
    await recv(a, "peer-joined")
    # The TCP connection dies without a close handshake.
    assert b._response.connection is not None
    transport = b._response.connection.transport
    assert transport is not None
    transport.abort()
    await asyncio.sleep(0.2)
    await a.send_json({"type": "offer", "to": jb["id"], "sdp": "v=0 ice-restart"})
    b2, jb2 = await enter(client, "resume", "Bo", resume={"id": jb["id"], "token": jb["token"]})
    assert jb2["resumed"] is True and jb2["id"] == jb["id"]
    assert await recv(b2) == {"type": "offer", "from": ja["id"], "sdp": "v=0 ice-restart"}
    await a.send_json({"type": "ping"})
    assert await recv(a) == {"type": "pong"}  # no peer-left/peer-joined in between
    await b2.close()
    assert (await recv(a))["type"] == "peer-left"
    await a.close()


async def test_room_capacity_and_password_over_the_wire(make_client: MakeClient) -> None:
    client = await make_client(config={"room_capacity": 2})
    a, _ = await enter(client, "tiny", "A", password="pw")
    ws, err = await enter(client, "tiny", "B")
    assert err["code"] == "password-required"
    await ws.send_json({"type": "join", "v": 1, "room": "tiny", "name": "B", "password": "pw"})
    assert (await recv(ws))["type"] == "joined"
    c, err = await enter(client, "tiny", "C", password="pw")
    assert err["code"] == "room-full"
    for w in (a, ws, c):
        await w.close()


async def test_pages_and_redirects(make_client: MakeClient) -> None:
    client = await make_client()
    landing = await client.get("/")
    assert landing.status == 200 and "text/html" in landing.headers["Content-Type"]
    assert "'self'" in landing.headers["Content-Security-Policy"]
    room = await client.get("/r/weekly-sync")
    assert room.status == 200 and "room.js" in await room.text()
    redirect = await client.get("/r/Weekly-Sync?name=Ada", allow_redirects=False)
    assert redirect.status == 302 and redirect.headers["Location"] == "/r/weekly-sync?name=Ada"
    assert (await client.get("/r/bad%20name")).status == 404
    assert (await client.get("/static/js/room.js")).status == 200
    assert (await client.get("/static/../signaling/server.py")).status in (403, 404)
    health = await (await client.get("/healthz")).json()
    assert health["ok"] is True


async def test_server_header_names_no_versions(make_client: MakeClient) -> None:
    client = await make_client()
    for path in ("/", "/r/bad%20name", "/healthz", "/no-such-page"):
        response = await client.get(path)
        assert response.headers["Server"] == "tsunagu", (path, response.headers["Server"])


API_KEY = "k" * 40


async def test_turn_credentials_endpoint(make_client: MakeClient) -> None:
    now = 1_700_000_000.0
    client = await make_client(now=lambda: now, config={"api_key": API_KEY})
    for wrong in ("", "&key=" + "x" * 40, "&key=" + API_KEY[:-1]):
        refused = await client.get(f"/api/turn-credentials?service=turn&username=alice{wrong}")
        assert refused.status == 401, (wrong, refused.status)
        assert "API key" in (await refused.json())["error"]
    bearer = await client.get(
        "/api/turn-credentials?username=alice", headers={"Authorization": f"Bearer {API_KEY}"}
    )
    assert bearer.status == 200
    resp = await client.get(f"/api/turn-credentials?service=turn&username=alice&key={API_KEY}")
    assert resp.status == 200
    body = await resp.json()
    assert body == {
        "username": f"{int(now) + 600}:alice",
        "password": rest_password(SECRET, f"{int(now) + 600}:alice"),
        "ttl": 600,
        "uris": [
            "turn:127.0.0.1:3478?transport=udp",
            "turn:127.0.0.1:3478?transport=tcp",
            "turns:127.0.0.1:5349?transport=tcp",
        ],
    }
    assert resp.headers["Cache-Control"] == "no-store"
    bad = await client.get(f"/api/turn-credentials?service=stun&key={API_KEY}")
    assert bad.status == 400 and "service" in (await bad.json())["error"]
    bad = await client.get(f"/api/turn-credentials?username=a:b&key={API_KEY}")
    assert bad.status == 400
    hosted = await client.get(
        f"/api/turn-credentials?username=x&key={API_KEY}", headers={"Host": "meet.example:443"}
    )
    assert (await hosted.json())["uris"][0] == "turn:meet.example:3478?transport=udp"


async def test_turn_credentials_endpoint_is_off_without_an_api_key(
    make_client: MakeClient,
) -> None:
    client = await make_client()
    resp = await client.get("/api/turn-credentials?service=turn&username=alice")
    assert resp.status == 404 and "--api-key" in (await resp.json())["error"]


async def test_no_secret_means_no_turn(make_client: MakeClient) -> None:
    client = await make_client(turn_secret=None, config={"api_key": API_KEY})
    resp = await client.get(f"/api/turn-credentials?service=turn&key={API_KEY}")
    assert resp.status == 404
    ws, joined = await enter(client, "x", "X")
    assert joined["iceServers"] == [{"urls": ["stun:127.0.0.1:3478"]}]
    await ws.close()


async def test_slow_reader_is_dropped_and_may_resume(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tsunagu.signaling import server

    # Room for a resume's burst (joined, the replay of up to 64 KiB, what was kept meanwhile).
    monkeypatch.setattr(server, "send_queue_bytes", 200_000)
    client = await make_client(heartbeat=30.0, resume_grace=5.0, limits=Limits(rate=1e4, burst=1e4))
    assert client.app is not None
    hub = client.app[server.STATE].hub
    a, _ = await enter(client, "slow", "Sender")
    b, jb = await enter(client, "slow", "Sleeper")
    await recv(a, "peer-joined")
    # The sleeper stops reading; its socket buffers fill, then its send queue overflows and
    # the server cuts it. Offers go in small batches so that few are in flight at the cut.
    sdp = "v=0 " + "x" * 20_000
    for _ in range(200):
        for _ in range(4):
            await a.send_json({"type": "offer", "to": jb["id"], "sdp": sdp})
        await a.send_json({"type": "ping"})
        assert await recv(a) == {"type": "pong"}
        if hub.is_away(jb["id"]):
            break
    assert hub.is_away(jb["id"])
    await a.send_json({"type": "offer", "to": jb["id"], "sdp": "v=0 while away"})
    await a.send_json({"type": "ping"})
    assert await recv(a) == {"type": "pong"}
    # The seat is kept for a resume, with what was sent meanwhile; nobody saw it leave.
    b2, jb2 = await enter(client, "slow", "Sleeper", resume={"id": jb["id"], "token": jb["token"]})
    assert jb2["resumed"] is True
    # Offers that reached the server after the cut were kept; the last one is the newest.
    kept: list[dict[str, Any]] = []
    while not kept or kept[-1]["sdp"] != "v=0 while away":
        kept.append(await recv(b2))
        assert kept[-1]["type"] == "offer" and len(kept) <= 5
    await a.send_json({"type": "ping"})
    assert await recv(a) == {"type": "pong"}
    for ws in (a, b, b2):
        await ws.close()


# --- internal networks -------------------------------------------------------------------------


async def test_a_page_from_outside_the_internal_networks_is_refused_and_logged(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    from tsunagu.signaling.server import STATE, report_refusals

    config = {"internal_networks": ["10.80.0.0/24"], "web_ip": "10.80.0.4"}
    client = await make_client(config=config)
    assert (await (await client.get("/api/info")).json())["internalOnly"] is True
    for _ in range(2):
        ws, answer = await enter(client, "office", "Eve")
        assert answer["type"] == "error" and answer["code"] == "outside-network", answer
        assert "comes from 127.0.0.1, outside it" in answer["message"]
        await ws.close()
    state = client.app[STATE]  # type: ignore[index]
    with caplog.at_level(logging.INFO, logger="tsunagu.signaling"):
        report_refusals(state.hub, state.config)
        report_refusals(state.hub, state.config)  # nothing new: no second line
    (record,) = [r for r in caplog.records if "refused" in r.getMessage()]
    assert record.getMessage().startswith(
        "signaling: refused 2 joins from 127.0.0.1 in the last 10 s: the address is outside"
        " the internal networks 10.80.0.0/24 (--internal-network)"
    ), record.getMessage()

    # The page's own address inside: the room works as ever.
    inside = await make_client(config={"internal_networks": ["127.0.0.0/8"], "web_ip": "127.0.0.1"})
    ws, answer = await enter(inside, "office", "Ada")
    assert answer["type"] == "joined"
    await ws.close()
