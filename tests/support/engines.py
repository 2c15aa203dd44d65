"""A TURN driver, its listeners and relay sockets on the test's own event loop (loopback).

:func:`running` wires a :class:`~tsunagu.transport.driver.TurnDriver` with a UDP listener and a
TCP server made by the relay engine under test (with ``rfc5780``, UDP listeners on the four
addresses of NAT behaviour discovery, 127.0.0.1 and 127.0.0.2 on two ports); :func:`make_engine`
gives that engine by name.
The native engine is built here and in CI: where it cannot be imported a test is skipped with
the reason, and in CI (``CI=true``) it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aioice.turn
import pytest

from support.interop import Collector, TurnClient
from tsunagu.auth.store import StaticCredentialStore
from tsunagu.transport.driver import TurnDriver
from tsunagu.transport.engine import PythonEngine, RelayEngine
from tsunagu.transport.listeners import StreamConnection, UdpListener
from tsunagu.transport.relay import UdpRelayBinder
from tsunagu.turn import NatDiscovery, PeerPolicy, TurnServer, TurnSettings

HOST = "127.0.0.1"
HOST2 = "127.0.0.2"
USER, PASSWORD = "alice", "alice-pw"


def make_engine(name: str) -> RelayEngine:
    if name == "python":
        return PythonEngine()
    try:
        from tsunagu.transport.native import NativeEngine
    except ImportError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the native relay engine must be built in CI: {exc}")
        pytest.skip(f"the native relay engine is not built here: {exc}")
    return NativeEngine()


@dataclass
class Rig:
    driver: TurnDriver
    udp: UdpListener
    tcp: asyncio.Server
    closers: list[Any] = field(default_factory=list)
    others: list[UdpListener] = field(default_factory=list)
    """With ``rfc5780``: the UDP listeners on HOST:P2, HOST2:P1 and HOST2:P2."""

    @property
    def udp_address(self) -> tuple[str, int]:
        return self.udp.local

    @property
    def tcp_address(self) -> tuple[str, int]:
        address = self.tcp.sockets[0].getsockname()
        return (address[0], address[1])

    async def allocate(self, transport: str = "udp", password: str = PASSWORD) -> TurnClient:
        address = self.udp_address if transport == "udp" else self.tcp_address
        turn_transport, app = await asyncio.wait_for(
            aioice.turn.create_turn_endpoint(
                Collector,
                server_addr=address,
                username=USER,
                password=password,
                transport=transport,
            ),
            5.0,
        )
        client = TurnClient(turn_transport, app)
        self.closers.append(client)
        return client


def discovery_sockets() -> tuple[list[socket.socket], tuple[int, int]]:
    """UDP sockets bound on HOST:P1, HOST:P2, HOST2:P1 and HOST2:P2 (P2 = P1 + 1)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((HOST, 0))
            first = int(probe.getsockname()[1])
        if first >= 65535:
            continue
        socks: list[socket.socket] = []
        try:
            for ip in (HOST, HOST2):
                for port in (first, first + 1):
                    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    socks.append(sock)
                    sock.setblocking(False)
                    sock.bind((ip, port))
        except OSError:
            for sock in socks:
                sock.close()
            continue
        return socks, (first, first + 1)
    raise RuntimeError("no free pair of ports on both loopback addresses")


@contextlib.asynccontextmanager
async def running(
    engine: RelayEngine, *, worker: int = 0, rfc5780: bool = False, **settings: Any
) -> AsyncIterator[Rig]:
    loop = asyncio.get_running_loop()
    settings.setdefault("policy", PeerPolicy.create(allowed=("127.0.0.0/8",)))
    if rfc5780:
        socks, ports = discovery_sockets()
        settings["nat_discovery"] = NatDiscovery(((HOST, HOST2),), ports)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind((HOST, 0))
        socks = [sock]
    core = TurnServer(
        TurnSettings(fallback_relay_ips=(HOST,), **settings),
        StaticCredentialStore("tsunagu", [(USER, PASSWORD)], ()),
        UdpRelayBinder(loop, random.randbytes, engine.relay_endpoint),
        random.Random(),
    )
    driver = TurnDriver(core, loop, engine, worker=worker)
    udp, *others = [await engine.udp_listener(driver, sock, loop) for sock in socks]
    tcp = await loop.create_server(lambda: StreamConnection(driver, "tcp"), HOST, 0)
    rig = Rig(driver, udp, tcp, others=others)
    try:
        yield rig
    finally:
        for client in rig.closers:
            client.transport.close()
        driver.shutdown()
        for stream in list(driver.streams):
            stream.transport.close()
        tcp.close()
        udp.close()
        for other in others:
            other.close()
        await asyncio.sleep(0)


def audit_records(
    caplog: pytest.LogCaptureFixture, events: tuple[str, ...] = ("allocation-ended",)
) -> list[dict[str, Any]]:
    """The audit records logged so far whose ``event`` is one of ``events`` (empty: all)."""
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "tsunagu.audit"]
    return [r for r in records if not events or r["event"] in events]


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "tsunagu" and r.levelno == logging.WARNING
    ]


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.01)


# --- relaying through a UDP listener and a TCP connection --------------------------------------
