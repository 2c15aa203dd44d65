"""The admin API over HTTP on loopback, for tools that cannot open a Unix socket.

``--admin-port N`` with ``--admin-token-file FILE``: worker 0 also listens on 127.0.0.1 and
::1 port N (never another address) and answers ``POST /admin`` whose body is a request of
the socket's protocol (:mod:`.server`) and which carries ``Authorization: Bearer TOKEN``.
The token is compared in constant time. A request carrying an ``Origin`` header is refused:
a web page in a browser on this machine has no business here. Everything is bounded: the
head (8 KiB) and body (:data:`~.server.MAX_REQUEST`), the time to send them, the
connections at once; one request per connection.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import Any

from .server import MAX_CONNECTIONS, MAX_REQUEST, READ_TIMEOUT, Handler, RequestError, parse_request

__all__ = ["MIN_TOKEN", "AdminHttp", "read_token"]

log = logging.getLogger("tsunagu")

MIN_TOKEN = 32
MAX_HEAD = 8 * 1024
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def read_token(path: str) -> str:
    """The token on the first line of ``path``; ValueError when it is too short to guess
    at, OSError when the file cannot be read."""
    with open(path, encoding="utf-8") as fh:
        token = fh.readline(4096).strip()
    if len(token) < MIN_TOKEN:
        raise ValueError(f"the token in {path} must be at least {MIN_TOKEN} characters")
    return token


class AdminHttp:
    """Serves the admin API over HTTP on loopback ``port`` with ``handler``'s answers."""

    def __init__(
        self,
        port: int,
        token: str,
        handler: Handler,
        *,
        max_connections: int = MAX_CONNECTIONS,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        self.port = port
        self._expected = f"Bearer {token}".encode()
        self.handler = handler
        self.max_connections = max_connections
        self.read_timeout = read_timeout
        self._servers: list[asyncio.AbstractServer] = []
        # Connections by arrival, and whether each still waits for its request: any local
        # user can connect to loopback, so idle ones make room for a request, oldest first.
        self._connections: dict[asyncio.StreamWriter, bool] = {}
        self.addresses: list[str] = []

    async def start(self) -> None:
        """Listen on 127.0.0.1 and, where the machine has IPv6, ::1; OSError if neither."""
        errors = []
        for host in ("127.0.0.1", "::1"):
            try:
                server = await asyncio.start_server(
                    self._connected, host, self.port, limit=MAX_HEAD, reuse_address=True
                )
            except OSError as exc:
                errors.append(f"{host}: {exc.strerror or exc}")
                continue
            self._servers.append(server)
            self.addresses.append(host)
        if not self._servers:
            raise OSError(f"cannot listen on port {self.port}: {'; '.join(errors)}")

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        self._servers.clear()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections = self._connections
        try:
            if len(connections) >= self.max_connections and not self._evict():
                await _respond(writer, 503, {"ok": False, "error": "busy"})
                return
            connections[writer] = True
            status, answer = await self._serve(reader, writer)
            if writer in connections:
                await _respond(writer, status, answer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            connections.pop(writer, None)
            writer.close()

    def _evict(self) -> bool:
        for writer, waiting in self._connections.items():
            if waiting:
                self._connections.pop(writer)
                writer.close()
                return True
        return False

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[int, dict[str, Any]]:
        try:
            async with asyncio.timeout(self.read_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
                status, body_length, error = self._check_head(head)
                if status != 200:
                    return status, {"ok": False, "error": error}
                body = await reader.readexactly(body_length)
        except TimeoutError:
            if writer not in self._connections:
                return 408, {}
            return 408, {"ok": False, "error": f"no request within {self.read_timeout:g} s"}
        except asyncio.LimitOverrunError:
            return 431, {"ok": False, "error": f"request head over {MAX_HEAD} bytes"}
        except asyncio.IncompleteReadError:
            return 400, {"ok": False, "error": "incomplete request"}
        if writer not in self._connections:
            return 400, {}  # evicted meanwhile: nothing is sent
        self._connections[writer] = False
        try:
            request = parse_request(body)
        except RequestError as exc:
            return 400, {"ok": False, "error": str(exc)}
        try:
            return 200, await self.handler(request)
        except Exception as exc:  # a bug must cost this request, not the server
            log.exception("admin request %s failed", request.get("command"))
            return 500, {"ok": False, "error": f"internal error: {type(exc).__name__}"}

    def _check_head(self, head: bytes) -> tuple[int, int, str]:
        """(status, body length, error) for a request head: 200 when it may go on."""
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return 400, 0, "not an HTTP/1.x request"
        method, target = parts[0], parts[1]
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, colon, value = line.partition(":")
            if not colon:
                return 400, 0, "a malformed header line"
            headers[name.strip().lower()] = value.strip()
        if target != "/admin":
            return 404, 0, "the admin API is POST /admin"
        if method != "POST":
            return 405, 0, "the admin API is POST /admin"
        if "origin" in headers:
            return 403, 0, "requests from web pages are refused"
        given = headers.get("authorization", "").encode("latin-1")
        if not hmac.compare_digest(given, self._expected):
            return 401, 0, "a valid Authorization: Bearer token is needed"
        length_text = headers.get("content-length")
        if length_text is None or not length_text.isdigit():
            return 411, 0, "Content-Length is needed"
        length = int(length_text)
        if length > MAX_REQUEST:
            return 413, 0, f"request over {MAX_REQUEST} bytes"
        return 200, length, ""


async def _respond(writer: asyncio.StreamWriter, status: int, answer: dict[str, Any]) -> None:
    body = json.dumps(answer, separators=(",", ":")).encode() + b"\n"
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await asyncio.wait_for(writer.drain(), READ_TIMEOUT)
