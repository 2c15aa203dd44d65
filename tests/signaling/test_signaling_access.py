"""Who may enter a room, who gets TURN credentials, and from which web pages."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient

from support.web_app import SECRET, WAIT, MakeClient, recv
from tsunagu.auth.rest import rest_password
from tsunagu.signaling import messages as m
from tsunagu.signaling.access import Access
from tsunagu.signaling.rooms import Hub, Limits, Send
from tsunagu.signaling.tokens import JoinTokens, TokenError, mint_join_token

pytestmark = pytest.mark.timeout(30)

JOIN_SECRET = "j" * 40


async def join(
    client: TestClient[Any, Any], room: str, name: str = "Ada", **extra: Any
) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]:
    ws = await client.ws_connect("/ws")
    await ws.send_json({"type": "join", "v": 1, "room": room, "name": name, **extra})
    return ws, await recv(ws)


def turn_of(joined: dict[str, Any]) -> dict[str, Any]:
    turn: dict[str, Any] = joined["turn"]
    assert turn is not None, joined
    assert turn["password"] == rest_password(SECRET, turn["username"])
    return turn


# --- origin --------------------------------------------------------------------------------


async def test_a_page_on_another_site_cannot_open_the_websocket(make_client: MakeClient) -> None:
    client = await make_client(config={"allowed_origins": ["https://app.example.org"]})
    host = f"127.0.0.1:{client.port}"
    for origin in ("https://evil.example", "null", f"http://{host}.evil.example", "file://"):
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await client.ws_connect("/ws", headers={"Origin": origin})
        assert info.value.status == 403, origin
    for origin in (f"http://{host}", f"https://{host}", "https://App.example.org"):
        ws = await client.ws_connect("/ws", headers={"Origin": origin})
        await ws.close()
    # Not a browser: nothing to ride on, and it still has to join like anyone else.
    ws, joined = await join(client, "r1")
    assert joined["type"] == "joined"
    await ws.close()


# --- credentials -----------------------------------------------------------------------------


async def test_credentials_come_only_with_joining_and_name_the_peer(
    make_client: MakeClient,
) -> None:
    client = await make_client()
    ws = await client.ws_connect("/ws")
    await ws.send_json({"type": "ping"})
    assert await recv(ws) == {"type": "pong"}  # connected, yet no ICE servers, no credential
    await ws.send_json({"type": "join", "v": 1, "room": "r2", "name": "Ada"})
    joined = await recv(ws)
    turn = turn_of(joined)
    expiry, _, user = turn["username"].partition(":")
    assert user == joined["id"] and turn["ttl"] == 600
    await ws.close()


async def test_credentials_are_renewed_before_they_expire(make_client: MakeClient) -> None:
    clock = [1_700_000_000.0]
    client = await make_client(now=lambda: clock[0], config={"credential_ttl": 20})
    ws, joined = await join(client, "renew")
    first = turn_of(joined)
    assert first["username"] == f"{int(clock[0]) + 20}:{joined['id']}"
    clock[0] += 11  # past half the lifetime: the next tick (each second) sends fresh ones
    fresh = await recv(ws, "ice")
    turn = turn_of(fresh)
    assert turn["username"] == f"{int(clock[0]) + 20}:{joined['id']}"
    assert fresh["iceServers"][1]["username"] == turn["username"]
    assert "seq" not in fresh  # not replayed on resume: a resume gets fresher ones anyway
    await ws.close()


# --- room access -------------------------------------------------------------------------------


async def test_info_tells_the_landing_page_how_rooms_are_entered(make_client: MakeClient) -> None:
    client = await make_client(config={"room_access": "token", "join_secrets": [JOIN_SECRET]})
    resp = await client.get("/api/info")
    assert await resp.json() == {
        "roomAccess": "token",
        "roomCapacity": 8,
        "relayPorts": [49152, 65535],
        "internalOnly": False,
    }
    client = await make_client()
    assert (await (await client.get("/api/info")).json())["roomAccess"] == "open"


async def test_token_access(make_client: MakeClient) -> None:
    clock = [1_700_000_000.0]
    client = await make_client(
        now=lambda: clock[0],
        config={"room_access": "token", "join_secrets": [JOIN_SECRET]},
    )

    def token(**kw: Any) -> str:
        args: dict[str, Any] = {"room": "board", "identity": "alice@corp", "ttl": 300}
        args.update(kw)
        secret = args.pop("secret", JOIN_SECRET)
        return mint_join_token(secret, now=clock[0], **args)

    refused = {
        None: "token-required",
        "not-a-jwt": "bad-token",
        token(secret="x" * 40): "bad-token",
        token(room="other"): "bad-token",
        token(ttl=-60): "bad-token",
    }
    for given, code in refused.items():
        extra = {} if given is None else {"token": given}
        ws, answer = await join(client, "board", **extra)
        assert answer["type"] == "error" and answer["code"] == code, (given, answer)
        await ws.close()
    ws, joined = await join(client, "board", "Typed Name", token=token(name="Alice A."))
    assert joined["type"] == "joined" and joined["name"] == "Alice A."
    assert turn_of(joined)["username"] == f"{int(clock[0]) + 600}:alice@corp"
    no_relay, joined2 = await join(client, "Board", token=token(identity="bob", turn=False))
    assert joined2["type"] == "joined" and joined2["turn"] is None
    assert all("username" not in s for s in joined2["iceServers"])
    for sock in (ws, no_relay):
        await sock.close()


async def test_password_access_and_its_attempt_limit(make_client: MakeClient) -> None:
    client = await make_client(config={"room_access": "password", "room_password": "letmein"})
    ws, answer = await join(client, "any")
    assert answer["code"] == "password-required"
    await ws.close()
    for attempt in range(10):
        ws, answer = await join(client, "any", password=f"guess{attempt}")
        assert answer["code"] == "bad-password", (attempt, answer)
        await ws.close()
    # The eleventh try from this address is not even checked, right password or not.
    ws, answer = await join(client, "any", password="letmein")
    assert answer["code"] == "rate-limited" and "try again in" in answer["message"], answer
    await ws.close()


def test_room_passwords_are_limited_per_room_whatever_the_address() -> None:
    hub = Hub(Limits(strike_limit=1e9), new_token=secrets.token_urlsafe)
    hub.connect(1, 0.0, address="10.0.0.1")
    hub.receive(
        1, m.encode({"type": "join", "v": 1, "room": "r", "name": "A", "password": "pw"}), 0.0
    )
    codes = []
    for i in range(40):
        conn = 100 + i
        hub.connect(conn, 1.0, address=f"10.1.{i}.1")  # a new address every time
        out = hub.receive(
            conn,
            m.encode({"type": "join", "v": 1, "room": "r", "name": "B", "password": f"g{i}"}),
            1.0,
        )
        codes.append(next(a.message["code"] for a in out if isinstance(a, Send)))
    assert codes[:30] == ["bad-password"] * 30 and set(codes[30:]) == {"rate-limited"}, codes
    # Forgiven with time: half a guess per second.
    hub.connect(999, 5.0, address="10.2.0.1")
    out = hub.receive(
        999, m.encode({"type": "join", "v": 1, "room": "r", "name": "C", "password": "pw"}), 5.0
    )
    assert [a.message["type"] for a in out if isinstance(a, Send) and a.conn == 999] == ["joined"]


def test_attempts_are_remembered_for_a_bounded_number_of_addresses() -> None:
    from tsunagu.signaling import access

    hub = Hub(
        Limits(strike_limit=1e9),
        new_token=secrets.token_urlsafe,
        access=Access("password", password_digest=b"\0" * 32),
    )
    join_msg = m.encode({"type": "join", "v": 1, "room": "r", "name": "A", "password": "x"})
    for i in range(access._MAX_KEYS + 100):
        hub.connect(i, 0.0, address=f"a{i}")
        hub.receive(i, join_msg, 0.0)
        hub.disconnect(i, 0.0, graceful=True)
    assert len(hub._attempts) <= access._MAX_KEYS


def test_join_tokens_refuse_what_they_should() -> None:
    tokens = JoinTokens(["new" * 11, JOIN_SECRET])
    now = 1_700_000_000.0
    ok = mint_join_token(JOIN_SECRET, room="r", identity="u-1", now=now, ttl=60)
    grant = tokens.verify(ok, now + 59)
    assert (grant.room, grant.identity, grant.turn, grant.name) == ("r", "u-1", True, None)
    with pytest.raises(TokenError, match="expired"):
        tokens.verify(ok, now + 60 + 31)
    import jwt

    unsigned = jwt.encode({"room": "r", "sub": "u", "exp": now + 60}, None, algorithm="none")
    with pytest.raises(TokenError):
        tokens.verify(unsigned, now)
    missing = jwt.encode({"room": "r", "exp": now + 60}, JOIN_SECRET, algorithm="HS256")
    with pytest.raises(TokenError, match="sub"):
        tokens.verify(missing, now)
    odd = jwt.encode({"room": "r", "sub": "a:b", "exp": now + 60}, JOIN_SECRET, algorithm="HS256")
    with pytest.raises(TokenError, match="sub"):
        tokens.verify(odd, now)  # ':' would let a token pick another user's TURN username
    later = jwt.encode(
        {"room": "r", "sub": "u", "exp": now + 600, "nbf": now + 300}, JOIN_SECRET, "HS256"
    )
    with pytest.raises(TokenError, match="not valid yet"):
        tokens.verify(later, now)
    with pytest.raises(TokenError, match="too long"):
        tokens.verify("x" * 5000, now)


def test_access_log_keeps_no_query_strings(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from tsunagu.signaling.server import _AccessLogger

    logger = logging.getLogger("tsunagu.web.access")
    request = make_mocked_request("GET", "/r/board?token=eyJ.secret.sig&name=Ada")
    with caplog.at_level(logging.INFO, logger="tsunagu.web.access"):
        _AccessLogger(logger, "").log(request, web.Response(status=200), 0.0123)
    assert "GET /r/board 200" in caplog.text and "secret" not in caplog.text, caplog.text


async def test_a_check_gets_a_members_ice_servers_without_a_seat(make_client: MakeClient) -> None:
    client = await make_client(config={"room_access": "token", "join_secrets": [JOIN_SECRET]})
    now = time.time()
    ws, member = await join(
        client,
        "board",
        token=mint_join_token(JOIN_SECRET, room="board", identity="ada", now=now, ttl=60),
    )
    assert member["type"] == "joined"
    probe = await client.ws_connect("/ws")
    await probe.send_json({"type": "join", "v": 1, "room": "board", "name": "Test", "check": True})
    refused = await recv(probe)
    assert refused["code"] == "token-required", refused
    await probe.close()
    probe = await client.ws_connect("/ws")
    token = mint_join_token(JOIN_SECRET, room="board", identity="bob", now=now, ttl=60)
    await probe.send_json(
        {"type": "join", "v": 1, "room": "board", "name": "Test", "check": True, "token": token}
    )
    checked = await recv(probe)
    assert checked["type"] == "checked" and checked["room"] == "board", checked
    assert turn_of(checked)["username"].endswith(":bob")
    closing = await asyncio.wait_for(probe.receive(), WAIT)
    assert closing.type in (WSMsgType.CLOSE, WSMsgType.CLOSED), closing
    # Nobody saw it come or go.
    await ws.send_json({"type": "ping"})
    assert await recv(ws) == {"type": "pong"}
    await ws.close()


async def test_a_check_needs_the_rooms_password(make_client: MakeClient) -> None:
    client = await make_client()
    ws, _ = await join(client, "locked", password="pw")
    for password, expected in (
        (None, "password-required"),
        ("no", "bad-password"),
        ("pw", "checked"),
    ):
        probe = await client.ws_connect("/ws")
        message: dict[str, Any] = {
            "type": "join",
            "v": 1,
            "room": "locked",
            "name": "T",
            "check": True,
        }
        if password is not None:
            message["password"] = password
        await probe.send_json(message)
        answer = await recv(probe)
        assert answer.get("code", answer["type"]) == expected, answer
        await probe.close()
    await ws.close()
