"""The web side of ``tsunagu serve``: the video-room page, the signaling WebSocket and the
TURN REST credentials endpoint, as one aiohttp application.

Routes:

- ``GET /`` landing page; ``GET /r/<room>`` the room page; ``/static/...`` its assets.
- ``GET /ws`` the signaling WebSocket (protocol in ``docs/SIGNALING.md``).
- ``GET /api/turn-credentials?service=turn&username=<id>&key=<api key>`` TURN REST API
  credentials for a backend; off unless ``--api-key`` is set. Browsers get theirs only by
  joining a room, over the WebSocket.
- ``GET /healthz`` liveness.

All room logic lives in :mod:`tsunagu.signaling.rooms`; this module moves frames between
sockets and the :class:`~tsunagu.signaling.rooms.Hub`, and bounds what one client may cost:
frame size, a send queue per connection, connections per address, and which web origins
may open the WebSocket at all (a page elsewhere must not ride on a visitor's browser).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import re
import resource
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.abc import AbstractAccessLogger

from tsunagu.config import Config
from tsunagu.logs import structured
from tsunagu.signaling import messages as m
from tsunagu.signaling.access import Access
from tsunagu.signaling.gate import (
    Caps,
    ConnectionGate,
    GatedSite,
    address_key,
    web_connection_budget,
)
from tsunagu.signaling.ice import choose_host, ice_config, mint
from tsunagu.signaling.rooms import Action, Close, Hub, IceIssuer, Limits, Send
from tsunagu.signaling.tokens import JoinTokens

__all__ = [
    "create_app",
    "hub_figures",
    "reconfigure",
    "revoke_user",
    "run_web",
    "STATIC_DIR",
]

log = logging.getLogger("tsunagu.signaling")
audit = logging.getLogger("tsunagu.audit")

STATIC_DIR: Final = Path(__file__).resolve().parent.parent / "web" / "static"

# aiohttp refuses (and closes with 1009) frames above this; frames between the protocol
# limit and this one get a polite "too-large" error instead.
_WS_FRAME_CAP: Final = m.MAX_MESSAGE_BYTES + 8 * 1024
send_queue_size = 256
"""Messages waiting for one slow reader before its connection is dropped."""
send_queue_bytes = 384 * 1024
"""Bytes waiting for one reader before it is dropped: room for a resume's burst (the last
64 KiB it may have missed and up to 192 KiB kept while it was away) and a few full offers."""
send_total_bytes = 64 * 1024 * 1024
"""Bytes waiting for all readers together; past it the reader with most waiting is dropped."""
_MAX_WEBSOCKETS: Final = 4096
_WEBSOCKETS_PER_ADDRESS: Final = 128
"""While not crowded; see :meth:`tsunagu.signaling.gate.Caps.fair` for when it is."""
_CONNECTIONS_PER_ADDRESS: Final = 256
"""HTTP connections of one address (or IPv6 /64) while the web port is not crowded."""
HTTP_TIMEOUT: Final = 10.0
"""A connection's request headers must be complete this long after it opened (or after the
previous response); an idle keep-alive connection is closed after it too."""
_TICK: Final = 1.0
REPORT_INTERVAL: Final = 10.0
"""Refused joins are logged once per this many seconds, one line per address, as TURN's
refusals are."""
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
    queue: asyncio.Queue[bytes | Close] = field(
        default_factory=lambda: asyncio.Queue(maxsize=send_queue_size)
    )
    queued: int = 0
    """Bytes in ``queue`` or being written (not yet handed to the socket)."""
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
    websockets: ConnectionGate = field(
        default_factory=lambda: ConnectionGate(Caps.fair(_MAX_WEBSOCKETS, _WEBSOCKETS_PER_ADDRESS))
    )
    queued: int = 0
    """Bytes waiting in every link's queue together."""
    next_id: int = 1

    def apply(self, actions: Iterable[Action]) -> None:
        for record in self.hub.take_audit():
            audit.info(
                "%s",
                json.dumps(record, separators=(",", ":")),
                extra=structured(record, record["event"].replace("-", " ")),
            )
        for action in actions:
            link = self.links.get(action.conn)
            if link is None or link.overflowed:
                continue
            item: bytes | Close = (
                m.encode(action.message).encode() if isinstance(action, Send) else action
            )
            size = len(item) if isinstance(item, bytes) else 0
            if link.queue.full() or link.queued + size > send_queue_bytes:
                # A reader this slow would hold unbounded memory, and its writer is stuck
                # waiting for the socket to drain: cut the connection.
                self._drop(action.conn, link, "cannot keep up")
                continue
            while self.queued + size > send_total_bytes:
                # Every reader is within its own bound but together they are not: the one
                # with the most waiting goes first.
                conn, slowest = max(self.links.items(), key=lambda item: item[1].queued)
                if slowest.queued == 0:
                    break
                self._drop(conn, slowest, "has the most waiting while the server is full")
                if slowest is link:
                    break
            if link.overflowed:
                continue
            link.queue.put_nowait(item)
            link.queued += size
            self.queued += size

    def written(self, link: _Link, size: int) -> None:
        """``size`` bytes of ``link``'s queue reached the socket (or were given up)."""
        size = min(size, link.queued)
        link.queued -= size
        self.queued -= size

    def _drop(self, conn: int, link: _Link, why: str) -> None:
        """Cut ``link`` without a close handshake: the hub sees a lost link, so the client
        can resume its seat on a new connection (messages for it wait in the hub)."""
        log.info("signaling: connection %d %s; dropping it", conn, why)
        link.overflowed = True
        self.written(link, link.queued)
        if link.writer is not None:
            link.writer.cancel()
        transport = link.request.transport
        if transport is not None:
            transport.abort()
        self.apply(self.hub.disconnect(conn, self.now(), graceful=False))


STATE: Final = web.AppKey("tsunagu_signaling", _State)


_OWN_PATHS = frozenset({"/", "/ws", "/api/turn-credentials", "/healthz", "/api/info", "/test"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
"""An aiohttp GET handler (``extra_routes``)."""


def create_app(
    config: Config,
    *,
    turn_secret: str | None,
    now: Callable[[], float] = time.time,
    heartbeat: float = 5.0,
    resume_grace: float = 5.0,
    limits: Limits | None = None,
    websockets: Caps | None = None,
    extra_routes: Mapping[str, Handler] | None = None,
) -> web.Application:
    """The page, the signaling WebSocket and the TURN REST endpoint.

    ``turn_secret`` is the shared secret used to mint TURN REST credentials; None means the
    page gets no TURN servers. A peer whose connection dies silently is noticed after at most
    ``1.5 * heartbeat`` seconds and announced as left ``resume_grace`` seconds later unless it
    reconnects first. ``limits`` tunes rate limits and the like (capacity comes from config);
    ``websockets`` bounds the WebSockets in total and per address. ``extra_routes`` are
    more GET paths and their handlers (``/metrics``, ``/readyz``); a path the app serves
    already keeps its own handler.
    """
    limits = dataclasses.replace(
        limits or Limits(), capacity=config.room_capacity, resume_grace=resume_grace
    )
    hub = Hub(
        limits,
        new_token=secrets.token_urlsafe,
        access=room_access(config),
        relay_only=config.ice_transport_policy == "relay",
        internal=config.internal_networks,
    )
    state = _State(config, turn_secret, now, heartbeat, hub)
    if websockets is not None:
        state.websockets = ConnectionGate(websockets)
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
    app.router.add_get("/api/info", _info)
    app.router.add_get("/test", _test_page)
    app.router.add_static("/static/", STATIC_DIR, follow_symlinks=False)
    for path, handler in (extra_routes or {}).items():
        if path not in _OWN_PATHS:
            app.router.add_get(path, handler)
    return app


def hub_figures(runner: web.AppRunner) -> dict[str, Any]:
    """The signaling hub's counts for the metrics: plain numbers, no names."""
    hub = runner.app[STATE].hub
    refused = dict(hub.refused)
    for cause, count in hub.refusals.total.items():
        refused[cause] = refused.get(cause, 0) + count
    return {
        "rooms": len(hub.room_names()),
        "people": hub.people_count,
        "connections": hub.connection_count,
        "held": hub.held,
        "messages": hub.messages,
        "joins": hub.joined,
        "refused": refused,
    }


def room_access(config: Config) -> Access:
    """The hub's access rule from the configuration (``--room-access`` and its secrets)."""
    mode = config.effective_room_access
    if mode == "password":
        assert config.room_password is not None
        return Access(
            "password", password_digest=hashlib.sha256(config.room_password.encode()).digest()
        )
    if mode == "token":
        return Access("token", tokens=JoinTokens(config.join_secrets))
    return Access("open")


def revoke_user(runner: web.AppRunner, user_id: str) -> None:
    """Close the signaling sessions of ``user_id``, whose TURN credentials were revoked."""
    state = runner.app[STATE]
    state.apply(state.hub.revoke_user(user_id, state.now()))


def reconfigure(runner: web.AppRunner, config: Config, turn_secret: str | None) -> None:
    """Serve by ``config`` from now on (a reload planned it: only its live options differ
    from what runs): room access and capacity for the next joins, the API key and allowed
    origins for the next requests. Credentials are minted with ``turn_secret`` (None: keep
    the one in use); those handed out stay valid while the TURN side accepts their secret.
    People in rooms stay."""
    state = runner.app[STATE]
    state.config = config
    state.hub.set_rules(room_access(config), config.room_capacity)
    if state.turn_secret is not None and turn_secret is not None:
        state.turn_secret = turn_secret


async def run_web(
    config: Config,
    turn_secret: str | None,
    ssl_context: ssl.SSLContext | None,
    extra_routes: Mapping[str, Handler] | None = None,
) -> web.AppRunner:
    """Start serving on ``config.web_ip:config.web_port`` and return the runner to clean up.

    This process relays TURN too (it is worker 0), and every allocation holds a descriptor:
    the web port gets a fixed share of the descriptors (see ``web_connection_budget``;
    ``serve`` has already raised the soft limit to the hard one), counted at accept time, and
    WebSockets at most half of that share, so that no web client can starve TURN.
    """
    open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if open_files == resource.RLIM_INFINITY:
        open_files = 1 << 20
    budget = web_connection_budget(open_files)
    sockets = Caps.fair(min(_MAX_WEBSOCKETS, budget // 2), _WEBSOCKETS_PER_ADDRESS)
    app = create_app(config, turn_secret=turn_secret, websockets=sockets, extra_routes=extra_routes)
    runner = web.AppRunner(
        app,
        access_log=(
            logging.getLogger("tsunagu.web.access")
            if config.effective_log_level == "debug"
            else None
        ),
        access_log_class=_AccessLogger,
        handle_signals=False,
        # aiohttp arms this timer when a connection opens and after each response; if the
        # next request's headers are not complete when it fires, the connection is closed:
        # the header read timeout (slow headers) and the keep-alive timeout in one.
        keepalive_timeout=HTTP_TIMEOUT,
        max_line_size=8190,
        max_field_size=8190,
        max_headers=64,
    )
    await runner.setup()
    gate = ConnectionGate(Caps.fair(budget, _CONNECTIONS_PER_ADDRESS))
    site = GatedSite(
        runner,
        config.web_ip,
        config.web_port,
        gate=gate,
        ssl_context=ssl_context,
        handshake_timeout=HTTP_TIMEOUT,
    )
    await site.start()
    log.info(
        "web: at most %d connections (%d per address), %d WebSockets (%d per address)",
        gate.caps.total,
        gate.caps.per_address,
        sockets.total,
        sockets.per_address,
    )
    scheme = "https" if ssl_context is not None else "http"
    host = f"[{config.web_ip}]" if ":" in config.web_ip else config.web_ip
    log.info("web: serving the video rooms on %s://%s:%d/", scheme, host, config.web_port)
    return runner


# --- HTTP ----------------------------------------------------------------------------------


class _AccessLogger(AbstractAccessLogger):
    """One line per request without its query string: an invitation link's join token (and
    an API key given as ``key=``) travel there, and logs must not keep them."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %s %d %.3fs",
            request.remote,
            request.method,
            request.path,
            response.status,
            time,
        )


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


async def _test_page(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC_DIR / "test.html")


async def _info(request: web.Request) -> web.StreamResponse:
    # What the landing page needs to offer the right thing; anyone can learn it by trying.
    config = request.app[STATE].config
    return web.json_response(
        {
            "roomAccess": config.effective_room_access,
            "roomCapacity": config.room_capacity,
            # What a network's firewall must let through towards the relay.
            "relayPorts": [config.min_port, config.max_port],
            # Whether calls stay inside internal networks; which ones is not for strangers.
            "internalOnly": bool(config.internal_networks),
        }
    )


async def _turn_credentials(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    key = state.config.api_key
    if key is None:
        return _json_error(
            404,
            "off: browsers get TURN credentials by joining a room; a backend needs --api-key",
        )
    given = request.query.get("key")
    if given is None:
        scheme, _, bearer = request.headers.get("Authorization", "").partition(" ")
        given = bearer.strip() if scheme.lower() == "bearer" else None
    if given is None or not hmac.compare_digest(given.encode(), key.encode()):
        return _json_error(401, "a valid API key is required (key=... or Authorization: Bearer)")
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
    if not _origin_allowed(request, state.config.allowed_origins):
        log.info(
            "signaling: refused a WebSocket from %s: page origin %r is not this site's",
            address,
            request.headers.get("Origin", "")[:100],
        )
        raise web.HTTPForbidden(
            text="this page's origin may not use this server's signaling (see --allowed-origin)\n"
        )
    key = address_key(address)
    why = state.websockets.admit(key)
    if why == "total":
        raise web.HTTPServiceUnavailable(text="too many connections\n")
    if why is not None:
        raise web.HTTPTooManyRequests(text="too many connections from this address\n")
    try:
        # No permessage-deflate: it would cost every connection a compressor's memory
        # (about 128 KiB each) for SDP that is sent once.
        ws = web.WebSocketResponse(
            heartbeat=state.heartbeat, max_msg_size=_WS_FRAME_CAP, compress=False
        )
        await ws.prepare(request)
    except BaseException:
        state.websockets.release(key)
        raise

    conn = state.next_id
    state.next_id += 1
    link = _Link(ws, request, address)
    state.links[conn] = link
    state.hub.connect(
        conn, state.now(), address=key, ice=_ice_issuer(state, request), remote=address
    )
    link.writer = asyncio.create_task(_write(state, link), name=f"signaling-writer-{conn}")
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
        state.websockets.release(key)
        link.writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await link.writer
        state.written(link, link.queued)
        state.apply(state.hub.disconnect(conn, state.now(), graceful=graceful))
        if not ws.closed:
            await ws.close()
    return ws


def _origin_allowed(request: web.Request, allowed: tuple[str, ...]) -> bool:
    """A browser names the page that opens a WebSocket; only this site's pages (and the
    operator's ``--allowed-origin``) may use it. Clients that are not browsers send no
    Origin and cannot be made to act for someone else, so they pass."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    origin = origin.strip().lower().rstrip("/")
    if origin in allowed:
        return True
    scheme, sep, host = origin.partition("://")
    # The scheme is not compared: behind a TLS-terminating proxy this side sees http.
    own = (request.headers.get("Host") or "").strip().lower()
    return bool(sep) and scheme in ("http", "https") and bool(own) and host == own


def _ice_issuer(state: _State, request: web.Request) -> IceIssuer:
    """Mints the ICE configuration for whoever joins on this connection: TURN credentials
    name that person and are renewed at half their lifetime."""
    host = request.headers.get("Host") or request.host

    def issue(user_id: str, turn: bool, now: float) -> tuple[dict[str, Any], float | None]:
        extras = ice_config(
            state.config,
            turn_secret=state.turn_secret if turn else None,
            request_host=host,
            user_id=user_id,
            now=now,
        )
        creds = extras["turn"]
        return extras, None if creds is None else max(1.0, creds["ttl"] / 2)

    return issue


async def _write(state: _State, link: _Link) -> None:
    ws = link.ws
    try:
        while True:
            item = await link.queue.get()
            if isinstance(item, Close):
                await ws.close(code=item.code, message=item.reason.encode()[:120])
                return
            # Returns once the frame is in the transport's buffer, which aiohttp keeps below
            # its writer limit (64 KiB) by waiting for the socket to drain.
            await ws.send_frame(item, WSMsgType.TEXT)
            state.written(link, len(item))
    except (ConnectionError, RuntimeError) as exc:
        # The peer went away mid-write; the reader side notices and cleans up.
        log.debug("signaling: write failed: %s", exc)


async def _ticker(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]

    async def tick() -> None:
        reported = time.monotonic()
        while True:
            await asyncio.sleep(_TICK)
            state.apply(state.hub.tick(state.now()))
            if time.monotonic() - reported >= REPORT_INTERVAL:
                reported = time.monotonic()
                report_refusals(state.hub, state.config)

    task = asyncio.create_task(tick(), name="signaling-ticker")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    report_refusals(state.hub, state.config)


def report_refusals(hub: Hub, config: Config, interval: float = REPORT_INTERVAL) -> None:
    """One line per address whose joins were refused since the last report (the hub's tally
    is bounded: beyond it, one line naming the busiest address)."""
    ranges = ", ".join(str(net) for net in config.internal_networks)
    for summary in hub.refusals.take():
        who = summary.client or f"{summary.clients} addresses (most: {summary.top})"
        unit = "join" if summary.count == 1 else "joins"
        fields = {
            "event": "refused",
            "cause": summary.cause,
            "client": summary.client or summary.top,
            "count": summary.count,
            "interval": interval,
        }
        log.info(
            "signaling: refused %d %s from %s in the last %g s: the address is outside the"
            " internal networks %s (--internal-network); the page tells them this server keeps"
            " calls inside the internal network",
            summary.count,
            unit,
            who,
            interval,
            ranges,
            extra=structured(fields),
        )


async def _close_all(app: web.Application) -> None:
    links = list(app[STATE].links.values())
    closes: list[Awaitable[bool]] = [
        link.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
        for link in links
    ]
    await asyncio.gather(*closes, return_exceptions=True)
