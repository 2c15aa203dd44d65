"""One aioice agent, run as a program on a lab host (``ip netns exec HOST python ...``).

Two of them find each other through files in a shared directory (the lab's hosts share no
loopback, /work/shared/NATLAB.md trap 3): each writes its credentials and candidates to
``NAME.json``, waits for the other's, connects, exchanges a few datagrams, and prints one
JSON line: whether it connected, the pair it nominated, and every candidate it gathered.

aioice has no HTTP proxy support (trap 5). With ``--proxy`` the agent opens the TCP
connection to the TURN server itself, through the proxy's CONNECT, and hands it to aioice,
as a browser behind a proxy does.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aioice


def _proxied_loop(proxy: str, target: tuple[str, int]) -> None:
    """Make the running loop's TCP connections to ``target`` go through ``proxy``."""
    parts = urlsplit(proxy)
    assert parts.hostname is not None and parts.port is not None, proxy
    loop = asyncio.get_running_loop()
    plain = loop.create_connection

    async def create_connection(factory: Any, host: Any = None, port: Any = None, **kw: Any) -> Any:
        if (host, port) != target:
            return await plain(factory, host, port, **kw)
        sock = socket.create_connection((parts.hostname, parts.port), timeout=5)
        request = f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        if parts.username:
            token = f"{parts.username}:{parts.password or ''}".encode()
            request += f"Proxy-Authorization: Basic {base64.b64encode(token).decode()}\r\n"
        sock.sendall((request + "\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(1)
            if not chunk:
                raise ConnectionError(f"the proxy closed the connection: {head!r}")
            head += chunk
        status = head.split(b"\r\n", 1)[0].decode()
        if status.split()[1] != "200":
            raise ConnectionError(f"the proxy answered {status}")
        sock.setblocking(False)
        if kw.get("ssl"):
            kw.setdefault("server_hostname", host)
        return await plain(factory, sock=sock, **kw)

    loop.create_connection = create_connection  # type: ignore[method-assign]


def _candidates(connection: aioice.Connection) -> list[str]:
    return [c.to_sdp() for c in connection.local_candidates]


async def _peer(directory: Path, name: str, deadline: float) -> dict[str, Any]:
    path = directory / f"{name}.json"
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} never wrote {path}")
        await asyncio.sleep(0.05)
    data: dict[str, Any] = json.loads(path.read_text())
    return data


async def main(args: argparse.Namespace) -> dict[str, Any]:
    deadline = time.monotonic() + args.timeout
    turn: dict[str, Any] = {}
    if args.turn:
        host, port = args.turn.rsplit(":", 1)
        turn = {
            "turn_server": (host, int(port)),
            "turn_username": args.user,
            "turn_password": args.password,
            "turn_transport": args.transport,
        }
        if args.tls:
            context = ssl.create_default_context(cafile=args.cafile)
            turn["turn_ssl"] = context
        if args.proxy:
            _proxied_loop(args.proxy, (host, int(port)))
    stun = None
    if args.stun:
        host, port = args.stun.rsplit(":", 1)
        stun = (host, int(port))
    connection = aioice.Connection(
        ice_controlling=args.controlling,
        components=1,
        stun_server=stun,
        use_ipv6=False,
        **turn,
    )
    report: dict[str, Any] = {"name": args.name, "connected": False}
    try:
        await asyncio.wait_for(connection.gather_candidates(), args.gather_timeout)
        report["candidates"] = _candidates(connection)
        mine = {
            "ufrag": connection.local_username,
            "pwd": connection.local_password,
            "candidates": report["candidates"],
        }
        directory = Path(args.exchange)
        partial = directory / f".{args.name}.json"
        partial.write_text(json.dumps(mine))
        os.replace(partial, directory / f"{args.name}.json")
        theirs = await _peer(directory, args.peer, deadline)
        connection.remote_username = theirs["ufrag"]
        connection.remote_password = theirs["pwd"]
        for line in theirs["candidates"]:
            await connection.add_remote_candidate(aioice.Candidate.from_sdp(line))
        await connection.add_remote_candidate(None)
        remaining = max(0.5, deadline - time.monotonic())
        await asyncio.wait_for(connection.connect(), min(args.connect_timeout, remaining))
        pair = connection._nominated.get(1)
        if pair is not None:
            report["local"] = pair.local_candidate.type
            report["remote"] = pair.remote_candidate.type
            report["remote_address"] = pair.remote_candidate.host
        # Datagrams both ways over the nominated pair.
        received = 0
        for number in range(args.datagrams):
            await connection.send(f"{args.name} {number}".encode())
        while received < args.datagrams:
            data, _ = await asyncio.wait_for(connection.recvfrom(), 5)
            if data.startswith(args.peer.encode()):
                received += 1
        report["received"] = received
        report["connected"] = True
        # Keep answering until the other side has its datagrams too.
        await asyncio.sleep(1.0)
    except (TimeoutError, ConnectionError, OSError) as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        report.setdefault("candidates", _candidates(connection))
        await connection.close()
    return report


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--peer", required=True)
    parser.add_argument("--exchange", required=True, help="directory shared with the peer")
    parser.add_argument("--controlling", action="store_true")
    parser.add_argument("--stun", help="host:port")
    parser.add_argument("--turn", help="host:port")
    parser.add_argument("--transport", choices=("udp", "tcp"), default="udp")
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--cafile")
    parser.add_argument("--proxy", help="http://user:password@host:port")
    parser.add_argument("--user", default="alice")
    parser.add_argument("--password", default="secret")
    parser.add_argument("--datagrams", type=int, default=5)
    parser.add_argument("--gather-timeout", type=float, default=10.0)
    parser.add_argument("--connect-timeout", type=float, default=15.0)
    parser.add_argument("--timeout", type=float, default=30.0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.stdout.write(json.dumps(asyncio.run(main(parse(sys.argv[1:])))) + "\n")
