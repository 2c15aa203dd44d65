"""A TURN driver, its listeners and relay sockets on the test's own event loop (loopback).

:func:`running` wires a :class:`~tsunagu.transport.driver.TurnDriver` with a UDP listener and a
TCP server made by the relay engine under test; :func:`make_engine` gives that engine by name.
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
from tsunagu.turn import PeerPolicy, TurnServer, TurnSettings

HOST = "127.0.0.1"
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


@contextlib.asynccontextmanager
async def running(engine: RelayEngine, *, worker: int = 0, **settings: Any) -> AsyncIterator[Rig]:
    loop = asyncio.get_running_loop()
    settings.setdefault("policy", PeerPolicy.create(allowed=("127.0.0.0/8",)))
    core = TurnServer(
        TurnSettings(fallback_relay_ips=(HOST,), **settings),
        StaticCredentialStore("tsunagu", [(USER, PASSWORD)], ()),
        UdpRelayBinder(loop, random.randbytes, engine.relay_endpoint),
        random.Random(),
    )
    driver = TurnDriver(core, loop, engine, worker=worker)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind((HOST, 0))
    udp = await engine.udp_listener(driver, sock, loop)
    tcp = await loop.create_server(lambda: StreamConnection(driver, "tcp"), HOST, 0)
    rig = Rig(driver, udp, tcp)
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
        await asyncio.sleep(0)


def audit_records(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "tsunagu.audit"]


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
