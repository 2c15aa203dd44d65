"""The web app under aiohttp's test server: a fixture that starts it and a bounded reader."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient, TestServer

from tsunagu.config import parse_config
from tsunagu.signaling.server import create_app

__all__ = ["SECRET", "WAIT", "MakeClient", "make_client", "recv"]

SECRET = "shared-secret"
"""The TURN REST secret the app mints with, unless a test gives another."""
WAIT = 5.0

MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    """``await make_client(config={...}, **create_app_kwargs)``: a started test client."""
    clients: list[TestClient[Any, Any]] = []

    async def make(**kwargs: Any) -> TestClient[Any, Any]:
        config = parse_config(kwargs.pop("config", {}))
        kwargs.setdefault("turn_secret", SECRET)
        app = create_app(config, **kwargs)
        client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def recv(
    ws: aiohttp.ClientWebSocketResponse, kind: str | None = None, *, keep_seq: bool = False
) -> dict[str, Any]:
    """Next JSON message (of ``kind`` if given), bounded in time; ``seq`` dropped unless
    ``keep_seq`` (the room tests check it)."""
    async with asyncio.timeout(WAIT):
        while True:
            msg = await ws.receive()
            assert msg.type is WSMsgType.TEXT, (msg.type, msg.data, msg.extra)
            data: dict[str, Any] = json.loads(msg.data)
            if not keep_seq:
                data.pop("seq", None)
            if kind is None or data["type"] == kind:
                return data
