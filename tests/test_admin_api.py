"""The admin API's pieces without a server: the request check, the socket and its bounds,
the merge of the workers' answers, and what the commands print."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from tsunagu.admin.commands import sessions_text, status_text, table
from tsunagu.admin.server import (
    AdminEndpoint,
    AdminServer,
    Peer,
    RequestError,
    bind_unix_socket,
    parse_request,
)

# --- requests -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"command": "status"}', {"command": "status"}),
        (b'{"command": "sessions", "user": "ann"}\n', {"command": "sessions", "user": "ann"}),
        (b'{"command": "kill", "session": "3-17"}', {"command": "kill", "session": "3-17"}),
        (
            b'{"command": "kill", "user": "1700000000:ann"}',
            {"command": "kill", "user": "1700000000:ann"},
        ),
        (b'{"command": "drain"}', {"command": "drain"}),
        (b'{"command": "reload"}', {"command": "reload"}),
    ],
)
def test_requests_taken(line: bytes, expected: dict[str, Any]) -> None:
    assert parse_request(line) == expected


@pytest.mark.parametrize(
    ("line", "words"),
    [
        (b"", "not a JSON object"),
        (b"null", "not a JSON object"),
        (b'"status"', "not a JSON object"),
        (b"\xff", "not a JSON object"),
        (b'{"command": 1}', "'command' must be one of"),
        (b'{"command": "shutdown"}', "'command' must be one of"),
        (b'{"command": "status", "user": "a"}', "status takes no user"),
        (b'{"command": "kill"}', "either"),
        (b'{"command": "kill", "user": "a", "session": "0-1"}', "either"),
        (b'{"command": "kill", "session": "1-"}', "session id"),
        (b'{"command": "kill", "session": 17}', "session id"),
        (b'{"command": "kill", "session": "123456-1"}', "session id"),
        (b'{"command": "sessions", "user": ""}', "1 to 513"),
        (b'{"command": "sessions", "user": ["a"]}', "1 to 513"),
        (b'{"command": "sessions", "user": "' + b"u" * 514 + b'"}', "1 to 513"),
        (b'{"command": "status"' + b', "command": "status"' * 3 + b", 1: 2}", "not a JSON"),
        # What worker 0 alone sends the other workers, on their private sockets.
        (b'{"command": "reload", "config": {}}', "reload takes no config"),
        (b'{"command": "certificate"}', "'command' must be one of"),
    ],
)
def test_requests_refused(line: bytes, words: str) -> None:
    with pytest.raises(RequestError, match=words):
        parse_request(line)


def test_worker_sockets_take_worker_0s_requests() -> None:
    assert parse_request(b'{"command": "reload", "config": {"realm": "x"}}', internal=True) == {
        "command": "reload",
        "config": {"realm": "x"},
    }
    assert parse_request(b'{"command": "certificate"}', internal=True) == {"command": "certificate"}
    with pytest.raises(RequestError, match="'config' must be an object"):
        parse_request(b'{"command": "reload", "config": []}', internal=True)
    with pytest.raises(RequestError, match="status takes no config"):
        parse_request(b'{"command": "status", "config": {}}', internal=True)


# --- the socket -----------------------------------------------------------------------------


def test_socket_is_0600_and_a_stale_one_is_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "admin.sock")
    first = bind_unix_socket(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with pytest.raises(OSError, match="another server answers"):
        bind_unix_socket(path)
    first.close()  # the file stays, nobody listens: a server that is gone
    second = bind_unix_socket(path)
    second.close()
    (tmp_path / "file").write_text("keep me")
    with pytest.raises(OSError, match="not a socket"):
        bind_unix_socket(str(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "keep me"
    with pytest.raises(OSError, match="too long"):
        bind_unix_socket(str(tmp_path / ("x" * 120)))


async def _exchange(path: str, data: bytes, *, eof: bool = False) -> dict[str, Any]:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(data)
    if eof:
        writer.write_eof()
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    result = json.loads(line)
    assert isinstance(result, dict)
    return result


async def test_server_bounds(tmp_path: Path) -> None:
    path = str(tmp_path / "admin.sock")
    release = asyncio.Event()

    async def handler(request: dict[str, Any]) -> dict[str, Any]:
        if request["command"] == "drain":
            await release.wait()
        return {"ok": True, "command": request["command"]}

    server = AdminServer(
        bind_unix_socket(path), handler, max_connections=4, read_timeout=0.5, max_request=1024
    )
    await server.start()
    try:
        assert await _exchange(path, b'{"command": "status"}\n') == {
            "ok": True,
            "command": "status",
        }
        over = await _exchange(path, b"x" * 2000 + b"\n")
        assert over == {"ok": False, "error": "request over 1024 bytes"}
        assert (await _exchange(path, b"\n"))["error"].startswith("empty request")
        assert (await _exchange(path, b"", eof=True))["error"].startswith("empty request")
        assert (await _exchange(path, b'{"command": "status"}', eof=True))["ok"] is True

        # Idle connections: the oldest make room for a request.
        idle = [await asyncio.open_unix_connection(path) for _ in range(6)]
        await asyncio.sleep(0.05)
        assert (await _exchange(path, b'{"command": "status"}\n'))["ok"] is True
        assert server.evicted >= 3
        for _, writer in idle:
            writer.close()
        await asyncio.sleep(0.1)

        # Connections busy with their requests are not closed: a new one hears why.
        busy = [asyncio.create_task(_exchange(path, b'{"command": "drain"}\n')) for _ in range(4)]
        await asyncio.sleep(0.1)
        assert await _exchange(path, b'{"command": "status"}\n') == {
            "ok": False,
            "error": "busy: too many admin connections",
        }
        release.set()
        assert all(answer["ok"] for answer in await asyncio.gather(*busy))

        # Silence is answered after the read timeout.
        reader, writer = await asyncio.open_unix_connection(path)
        line = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        assert json.loads(line) == {"ok": False, "error": "no request within 0.5 s"}
    finally:
        await server.close()
    assert not os.path.exists(path)


async def test_a_failing_handler_costs_one_request(tmp_path: Path) -> None:
    path = str(tmp_path / "admin.sock")

    async def handler(request: dict[str, Any]) -> dict[str, Any]:
        raise KeyError("bug")

    server = AdminServer(bind_unix_socket(path), handler)
    await server.start()
    try:
        answer = await _exchange(path, b'{"command": "status"}\n')
        assert answer == {"ok": False, "error": "internal error: KeyError"}
        assert (await _exchange(path, b'{"command": "status"}\n'))["ok"] is False
    finally:
        await server.close()


# --- merging the workers' answers -----------------------------------------------------------


class _Local:
    worker = 0
    started = 0.0

    async def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"worker": 0, "ended": 2}


async def test_workers_that_do_not_answer_are_named(tmp_path: Path) -> None:
    silent_path = str(tmp_path / "silent.sock")
    silent = bind_unix_socket(silent_path)  # listens, never accepts: no answer
    wrong_path = str(tmp_path / "wrong.sock")

    async def wrong(request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "part": "not an object"}

    wrong_server = AdminServer(bind_unix_socket(wrong_path), wrong)
    await wrong_server.start()
    try:
        peers = [
            Peer(1, silent_path),
            Peer(2, str(tmp_path / "gone.sock")),
            Peer(3, wrong_path),
        ]
        endpoint = AdminEndpoint(_Local(), peers, workers=4, timeout=0.3)  # type: ignore[arg-type]
        answer = await asyncio.wait_for(endpoint.handle({"command": "kill", "user": "a"}), 2)
    finally:
        silent.close()
        await wrong_server.close()
    assert answer["ended"] == 2 and answer["per_worker"] == [{"worker": 0, "ended": 2}]
    assert answer["not_answering"] == [
        {"worker": 1, "error": "no answer in 0.3 s"},
        {"worker": 2, "error": "not running (its socket does not answer)"},
        {"worker": 3, "error": "a malformed answer"},
    ]


# --- what the commands print ----------------------------------------------------------------


def test_table_aligns_text_left_and_numbers_right() -> None:
    text = table(["name", "count"], [["a", 5], ["long name", 1234], ["b", "-"]])
    assert text.splitlines() == [
        "name       count",
        "a              5",
        "long name   1234",
        "b              -",
    ]


def _status() -> dict[str, Any]:
    part = {
        "worker": 0,
        "pid": 10,
        "uptime": 3700.0,
        "draining": True,
        "allocations": {"total": 2, "udp": 1, "tcp": 0, "tls": 1},
        "relayed": {
            "to_peers": {"packets": 3, "bytes": 3000},
            "to_client": {"packets": 4, "bytes": 4096},
            "dropped": 1,
        },
    }
    return {
        "ok": True,
        "version": "9.9",
        "pid": 10,
        "uptime": 3700.0,
        "workers": 2,
        "draining": True,
        "allocations": part["allocations"],
        "relayed": part["relayed"],
        "user_database": {
            "kind": "sqlite",
            "description": "SQLite /var/lib/tsunagu/users.db",
            "reachable": False,
            "last_error": "disk I/O error",
            "cached_users": 3,
            "lookups": 9,
            "lookups_failed": 2,
        },
        "per_worker": [part],
        "not_answering": [{"worker": 1, "error": "no answer in 2 s"}],
    }


def test_status_text() -> None:
    lines = status_text(_status()).splitlines()
    assert lines[:5] == [
        "tsunagu 9.9, up 1 h 1 min, pid 10, 2 workers",
        "draining: yes, new allocations are refused",
        "allocations: 2 (udp 1, tcp 0, tls 1)",
        "relayed to peers: 3 packets, 2.9 KiB; to clients: 4 packets, 4.0 KiB; dropped 1",
        "user database: SQLite /var/lib/tsunagu/users.db, unreachable (disk I/O error),"
        " 3 cached users, 2 of 9 lookups failed",
    ]
    assert lines[6].split() == [
        "worker", "pid", "allocations", "udp", "tcp", "tls", "to", "peers", "B", "to",
        "clients", "B", "draining",
    ]  # fmt: skip
    assert lines[7].split() == ["0", "10", "2", "1", "0", "1", "3000", "4096", "yes"]
    assert lines[8].split() == ["1", "-", "-", "-", "-", "-", "-", "-", "not", "answering"]


def test_sessions_text() -> None:
    assert sessions_text({"sessions": []}) == "no allocations\n"
    session = {
        "id": "1-7",
        "user": "ann",
        "protocol": "udp",
        "client": "192.0.2.1:5000",
        "relayed": ["198.51.100.1:50000"],
        "peers": [],
        "to_peers": {"packets": 1, "bytes": 100},
        "to_client": {"packets": 2, "bytes": 200},
        "age": 75.0,
    }
    lines = sessions_text({"sessions": [session]}).splitlines()
    assert lines[1].split() == [
        "1-7", "ann", "udp:192.0.2.1:5000", "198.51.100.1:50000", "-", "1", "100", "2", "200",
        "1", "min", "15", "s",
    ]  # fmt: skip


# --- over HTTP on loopback ------------------------------------------------------------------

TOKEN = "t" * 40


async def _http(port: int, data: bytes) -> tuple[int, dict[str, Any]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body) if body else {}


def _post(body: bytes, *, token: str = TOKEN, extra: str = "") -> bytes:
    return (
        f"POST /admin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def test_http_needs_the_token_and_is_bounded(tmp_path: Path) -> None:
    from support.interop import free_port
    from tsunagu.admin.http import AdminHttp, read_token

    async def handler(request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "command": request["command"]}

    port = free_port(udp=False)
    server = AdminHttp(port, TOKEN, handler, max_connections=4, read_timeout=0.5)
    await server.start()
    try:
        assert server.addresses[0] == "127.0.0.1"
        assert set(server.addresses) <= {"127.0.0.1", "::1"}
        status = b'{"command": "status"}'
        assert await _http(port, _post(status)) == (200, {"ok": True, "command": "status"})
        assert (await _http(port, _post(status, token="t" * 39)))[0] == 401
        assert (await _http(port, _post(status, token=TOKEN + "x")))[0] == 401
        assert (await _http(port, _post(status).replace(b"Authorization", b"X-Other")))[0] == 401
        assert (await _http(port, b"nonsense\r\n\r\n"))[0] == 400
        assert (await _http(port, _post(status, extra="Origin: http://a.example\r\n")))[0] == 403
        assert (await _http(port, _post(b"{}")))[0] == 400
        assert (await _http(port, _post(b"x" * 70000)))[0] == 413
        get = f"GET /admin HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
        assert (await _http(port, get))[0] == 405
        other = _post(status).replace(b"POST /admin", b"POST /other")
        assert (await _http(port, other))[0] == 404
        no_length = f"POST /admin HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
        assert (await _http(port, no_length))[0] == 411
        assert (await _http(port, b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 2000 + b"\r\n"))[0] == 431
        assert (await _http(port, b"POST /admin HTTP/1.1\r\n"))[0] == 408

        # Idle connections make room for a request, oldest first.
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(6)]
        await asyncio.sleep(0.05)
        assert (await _http(port, _post(status)))[0] == 200
        for _, writer in idle:
            writer.close()
    finally:
        await server.close()

    path = tmp_path / "token"
    path.write_text(TOKEN + "\nignored\n")
    assert read_token(str(path)) == TOKEN
    path.write_text("short\n")
    with pytest.raises(ValueError, match="at least 32"):
        read_token(str(path))
