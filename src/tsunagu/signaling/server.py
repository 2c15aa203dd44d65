"""The web side of ``tsunagu serve``: the video-room page, the signaling WebSocket and the
TURN REST credentials endpoint, as one aiohttp application.

Routes:

- ``GET /`` landing page; ``GET /r/<room>`` the room page; ``/static/...`` its assets.
- ``GET /ws`` the signaling WebSocket (protocol in ``docs/SIGNALING.md``).
- ``GET /api/turn-credentials?service=turn&username=<id>`` TURN REST API credentials.
- ``GET /healthz`` liveness.

All room logic lives in :mod:`tsunagu.signaling.rooms`; this module moves frames between
sockets and the :class:`~tsunagu.signaling.rooms.Hub`, and bounds what one client may cost:
frame size, a send queue per connection, connections per address.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import secrets
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from aiohttp import WSCloseCode, WSMsgType, web

from tsunagu.config import Config
from tsunagu.signaling import messages as m
from tsunagu.signaling.ice import choose_host, ice_config, mint
from tsunagu.signaling.rooms import Action, Close, Hub, Limits, Send

__all__ = ["create_app", "run_web", "STATIC_DIR"]

log = logging.getLogger("tsunagu.signaling")

STATIC_DIR: Final = Path(__file__).resolve().parent.parent / "web" / "static"

# aiohttp refuses (and closes with 1009) frames above this; frames between the protocol
# limit and this one get a polite "too-large" error instead.
_WS_FRAME_CAP: Final = 1024 * 1024
send_queue_size = 256
"""Messages waiting for one slow reader before its connection is dropped."""
_MAX_CONNECTIONS: Final = 4096
_MAX_CONNECTIONS_PER_ADDRESS: Final = 64
_TICK: Final = 1.0
_USER_RE: Final = re.compile(r"[A-Za-z0-9._@-]{1,64}")

_SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "media-src 'self' blob: mediastream:; connect-src 'self'; object-src 'none'; "
        "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Permissions-Policy": "camera=(self), microphone=(self), display-capture=(self)",
    "Cross-Origin-Opener-Policy": "same-origin",
}


@dataclass(eq=False)
class _Link:
    """One open WebSocket and the task that writes to it."""

    ws: web.WebSocketResponse
    request: web.Request
    address: str
    queue: asyncio.Queue[str | Close] = field(
        default_factory=lambda: asyncio.Queue(maxsize=send_queue_size)
    )
    writer: asyncio.Task[None] | None = None
    overflowed: bool = False


@dataclass(eq=False)
class _State:
    config: Config
    turn_secret: str | None
    now: Callable[[], float]
    heartbeat: float
    hub: Hub
    links: dict[int, _Link] = field(default_factory=dict)
    per_address: Counter[str] = field(default_factory=Counter)
    next_id: int = 1

    def apply(self, actions: Iterable[Action]) -> None:
        for action in actions:
            link = self.links.get(action.conn)
            if link is None or link.overflowed:
                continue
            item: str | Close = m.encode(action.message) if isinstance(action, Send) else action
            try:
                link.queue.put_nowait(item)
            except asyncio.QueueFull:
                # A reader this slow would hold unbounded memory, and its writer is stuck
                # waiting for the socket to drain: cut the connection. The hub sees a link
                # lost without a handshake, so the client can resume its seat on a new one.
                log.info("signaling: connection %d cannot keep up; dropping it", action.conn)
                link.overflowed = True
                if link.writer is not None:
                    link.writer.cancel()
                transport = link.request.transport
                if transport is not None:
                    transport.abort()
                # From now on messages for this peer wait in the hub for a resume.
                self.apply(self.hub.disconnect(action.conn, self.now(), graceful=False))


STATE: Final = web.AppKey("tsunagu_signaling", _State)


def create_app(
    config: Config,
    *,
    turn_secret: str | None,
    now: Callable[[], float] = time.time,
    heartbeat: float = 5.0,
    resume_grace: float = 5.0,
    limits: Limits | None = None,
) -> web.Application:
    """The page, the signaling WebSocket and the TURN REST endpoint.

    ``turn_secret`` is the shared secret used to mint TURN REST credentials; None means the
    page gets no TURN servers. A peer whose connection dies silently is noticed after at most
    ``1.5 * heartbeat`` seconds and announced as left ``resume_grace`` seconds later unless it
    reconnects first. ``limits`` tunes rate limits and the like (capacity comes from config).
    """
    limits = dataclasses.replace(
        limits or Limits(), capacity=config.room_capacity, resume_grace=resume_grace
    )
    state = _State(
        config, turn_secret, now, heartbeat, Hub(limits, new_token=secrets.token_urlsafe)
    )
    app = web.Application(client_max_size=64 * 1024)
    app[STATE] = state
    app.on_response_prepare.append(_security_headers)
    app.cleanup_ctx.append(_ticker)
    app.on_shutdown.append(_close_all)
    app.router.add_get("/", _index)
    app.router.add_get("/r/{room}", _room_page)
    app.router.add_get("/r/{room}/", _room_page)
    app.router.add_get("/ws", _websocket)
    app.router.add_get("/api/turn-credentials", _turn_credentials)
    app.router.add_get("/healthz", _health)
    app.router.add_static("/static/", STATIC_DIR, follow_symlinks=False)
    return app


async def run_web(
    config: Config, turn_secret: str | None, ssl_context: ssl.SSLContext | None
) -> web.AppRunner:
    """Start serving on ``config.web_ip:config.web_port`` and return the runner to clean up."""
    app = create_app(config, turn_secret=turn_secret)
    runner = web.AppRunner(
        app,
        access_log=logging.getLogger("tsunagu.web.access") if config.verbose else None,
        handle_signals=False,
    )
    await runner.setup()
    site = web.TCPSite(runner, config.web_ip, config.web_port, ssl_context=ssl_context)
    await site.start()
    scheme = "https" if ssl_context is not None else "http"
    host = f"[{config.web_ip}]" if ":" in config.web_ip else config.web_ip
    log.info("web: serving the video rooms on %s://%s:%d/", scheme, host, config.web_port)
    return runner


# --- HTTP ----------------------------------------------------------------------------------


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    # aiohttp would name itself and Python with their versions: nothing a scanner needs.
    response.headers["Server"] = "tsunagu"
    for key, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(key, value)
    if request.path == "/" or request.path.startswith(("/r/", "/api/")):
        response.headers.setdefault("Cache-Control", "no-store")


async def _index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC_DIR / "index.html")


async def _room_page(request: web.Request) -> web.StreamResponse:
    raw = request.match_info["room"]
    room = m.normalize_room(raw)
    if not m.is_valid_room(room):
        raise web.HTTPNotFound(
            text="Room names are 1-48 letters, digits, '-' or '_'.\n",
            content_type="text/plain",
        )
    if room != raw or request.path.endswith("/"):
        target = request.rel_url.with_path(f"/r/{room}").with_query(request.rel_url.query)
        raise web.HTTPFound(target)
    return web.FileResponse(STATIC_DIR / "room.html")


async def _health(request: web.Request) -> web.StreamResponse:
    hub = request.app[STATE].hub
    return web.json_response(
        {"ok": True, "rooms": len(hub.room_names()), "connections": hub.connection_count}
    )


async def _turn_credentials(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    service = request.query.get("service", "turn")
    if service != "turn":
        return _json_error(400, f"unknown service {service[:32]!r}; only 'turn' is offered")
    user = request.query.get("username", "")
    if user and _USER_RE.fullmatch(user) is None:
        return _json_error(400, "username must be 1-64 letters, digits or . _ @ -")
    if state.turn_secret is None:
        return _json_error(404, "this server does not hand out TURN credentials")
    host = choose_host(state.config, request.headers.get("Host") or request.host)
    creds = None if host is None else mint(state.config, state.turn_secret, host, user, state.now())
    if creds is None:
        return _json_error(404, "this server offers no TURN relay")
    return web.json_response(creds.to_json())


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


# --- WebSocket -----------------------------------------------------------------------------


async def _websocket(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    address = request.remote or "?"
    if len(state.links) >= _MAX_CONNECTIONS:
        raise web.HTTPServiceUnavailable(text="too many connections\n")
    if state.per_address[address] >= _MAX_CONNECTIONS_PER_ADDRESS:
        raise web.HTTPTooManyRequests(text="too many connections from this address\n")
    ws = web.WebSocketResponse(heartbeat=state.heartbeat, max_msg_size=_WS_FRAME_CAP)
    await ws.prepare(request)

    conn = state.next_id
    state.next_id += 1
    link = _Link(ws, request, address)
    state.links[conn] = link
    state.per_address[address] += 1
    extras = ice_config(
        state.config,
        turn_secret=state.turn_secret,
        request_host=request.headers.get("Host") or request.host,
        user_id=f"web-{secrets.token_hex(4)}",
        now=state.now(),
    )
    state.hub.connect(conn, state.now(), extras)
    link.writer = asyncio.create_task(_write(link), name=f"signaling-writer-{conn}")
    graceful = False
    try:
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.TEXT:
                state.apply(state.hub.receive(conn, msg.data, state.now()))
            elif msg.type is WSMsgType.BINARY:
                state.apply(state.hub.receive(conn, msg.data, state.now()))
            elif msg.type is WSMsgType.CLOSE:
                graceful = msg.data in (WSCloseCode.OK, WSCloseCode.GOING_AWAY)
                break
            else:  # CLOSING, CLOSED, ERROR: the link is gone
                break
    finally:
        state.links.pop(conn, None)
        state.per_address[address] -= 1
        if state.per_address[address] <= 0:
            del state.per_address[address]
        link.writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await link.writer
        state.apply(state.hub.disconnect(conn, state.now(), graceful=graceful))
        if not ws.closed:
            await ws.close()
    return ws


async def _write(link: _Link) -> None:
    ws = link.ws
    try:
        while True:
            item = await link.queue.get()
            if isinstance(item, Close):
                await ws.close(code=item.code, message=item.reason.encode()[:120])
                return
            await ws.send_str(item)
    except (ConnectionError, RuntimeError) as exc:
        # The peer went away mid-write; the reader side notices and cleans up.
        log.debug("signaling: write failed: %s", exc)


async def _ticker(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]

    async def tick() -> None:
        while True:
            await asyncio.sleep(_TICK)
            state.apply(state.hub.tick(state.now()))

    task = asyncio.create_task(tick(), name="signaling-ticker")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _close_all(app: web.Application) -> None:
    links = list(app[STATE].links.values())
    closes: list[Awaitable[bool]] = [
        link.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
        for link in links
    ]
    await asyncio.gather(*closes, return_exceptions=True)
