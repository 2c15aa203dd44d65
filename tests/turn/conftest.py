"""Fixtures of the TURN core tests: a server with default settings and a client, alice."""

from __future__ import annotations

import pytest

from support.turn_harness import Client, FakeBinder, make_server, success
from tsunagu.turn import TurnServer


@pytest.fixture
def setup() -> tuple[TurnServer, FakeBinder]:
    return make_server()


@pytest.fixture
def server(setup: tuple[TurnServer, FakeBinder]) -> TurnServer:
    return setup[0]


@pytest.fixture
def binder(setup: tuple[TurnServer, FakeBinder]) -> FakeBinder:
    return setup[1]


@pytest.fixture
def alice(server: TurnServer) -> Client:
    return Client(server)


@pytest.fixture
def allocated(alice: Client) -> Client:
    """alice with an IPv4 allocation made at NOW, its events drained."""
    assert success(alice.allocate())
    while alice.server.next_event() is not None:
        pass
    return alice
